//! Starting a VM: network attachment, the VMM, and waiting until the guest
//! agent answers; one more boot for a guest that stays silent; on failure,
//! a full teardown and a stopped VM with `last_error`.
//!
//! Everything here runs under the VM's lifecycle lock (`start_locked`),
//! whether reached from `start`, `restart` or `create --start`.

use super::alloc::{self, mac_for};
use super::console::tail;
use super::handles::{self, VmHandles};
use super::state::Lifecycle;
use super::{current_op, VmService};
use crate::sync::Locked;
use banger_proto::methods::agent as a;
use banger_proto::methods::daemon::VmInfo;
use banger_proto::{OpId, RpcError};
use banger_store::{VmRecord, VmState};
use banger_vmm::{process, LaunchSpec, Launched, VmmKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a booting guest may take to answer (TCG is slow).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// How long to wait for the agent's "ready" before polling it anyway
/// (images whose agent does not announce itself).
const READY_WAIT: Duration = Duration::from_secs(20);
/// The first boot's share of it, after which the guest is booted again.
const FIRST_BOOT_DEADLINE: Duration = Duration::from_secs(30);

impl VmService {
    pub async fn start(&self, name: &str) -> Result<VmInfo, RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.start_locked(vm).await?;
        Ok(self.info(&vm))
    }

    pub(super) async fn start_locked(&self, mut vm: VmRecord) -> Result<VmRecord, RpcError> {
        if !vm.runtime.state.can_start() {
            return Err(RpcError::bad_request(format!(
                "VM {} is {}; it cannot be started now",
                vm.name,
                vm.runtime.state.as_str()
            )));
        }
        if self.is_alive(&vm) {
            if vm.runtime.state == VmState::Running {
                return Ok(vm);
            }
            // A VMM runs under a record that does not say running: whatever
            // it is, it is not a VM this start can vouch for.
            tracing::warn!(vm = %vm.name, state = vm.runtime.state.as_str(), "a VMM runs for a VM not recorded as running; tearing it down first");
            self.teardown(&vm, self.cached(&vm.id).as_ref()).await;
        }
        let op = current_op();
        // May build the initramfs (file reads, a cpio, busybox): blocking
        // work, off the async workers.
        let mut spec = match tokio::task::block_in_place(|| self.launch_spec(&vm)) {
            Ok(s) => s,
            // Recorded, and synced: a creation that starts ends here too.
            Err(e) => return Err(self.fail_start(vm, e).await),
        };
        // A restore's first start loads its snapshot instead of booting.
        let restoring = vm
            .runtime
            .restore_from
            .as_ref()
            .map(PathBuf::from)
            .filter(|d| d.join("state").is_file());
        // A restored guest still has its snapshot's name, entropy, clock
        // and network identity.
        let hostname = restoring.is_some().then(|| vm.name.clone());
        let net = restoring.is_some().then(|| self.seed_net(&vm)).flatten();
        // Whatever disks it may hold already (a spare's copies, an earlier
        // attempt's), a VM made to resume a snapshot never boots cold.
        if restoring.is_none() && vm.runtime.restore_from.is_some() {
            let e = RpcError::not_found(format!(
                "VM {} was never started from its snapshot, which is gone: delete it",
                vm.name
            ));
            return Err(self.fail_start(vm, e).await);
        }
        if let Some(d) = &restoring {
            // Its disks become the snapshot's, copied while the VMM
            // process starts: every start until one succeeds begins from
            // the snapshot again.
            let (snap, disks) = (
                d.clone(),
                (
                    PathBuf::from(&vm.runtime.overlay_path),
                    PathBuf::from(&vm.runtime.work_disk_path),
                ),
            );
            spec.fill_drives = Some(banger_vmm::FillDrives::new(move || {
                super::spare::copy_disks(&snap, &disks)
                    .map_err(|e| banger_vmm::VmmError::io("copying the snapshot's disks", e))
            }));
            // A QEMU guest takes its seed in its channel's handshake, the
            // moment its agent is back: a round trip fewer than a call.
            let seed = match VmmKind::parse(&vm.spec.vmm) {
                Some(VmmKind::Qemu) => match self.write_seed_plan(&vm, &op, hostname.as_deref(), net.clone())
                {
                    Ok(p) => Some(p),
                    Err(e) => return Err(self.fail_start(vm, e).await),
                },
                _ => None,
            };
            spec.restore = Some(banger_vmm::Restore {
                state: d.join("state"),
                memory: d.join("memory"),
                seed,
            });
        }
        let seed_plan = spec.restore.as_ref().and_then(|r| r.seed.clone());
        // The intent, before any side effect: a daemon killed from here on
        // leaves "starting", which reconcile undoes (tap, rules, processes).
        vm.runtime.state = VmState::Starting;
        vm.runtime.last_error = None;
        if let Err(e) = self.save_intent(&vm) {
            return Err(self.fail_start(vm, e).await);
        }
        // A new VM's spare VMM process, if it took one (see `spare`), and
        // perhaps its restore's disks, copied already.
        let mut first = spec.clone();
        if let Some(h) = self.spare_for_launch(&vm.id) {
            first.prestarted = Some(h.pid);
            if h.disks_filled && restoring.is_some() {
                first.fill_drives = None;
            }
        }
        // A guest that boots but never answers on vsock (seen, rarely, with
        // the userspace vsock backend under load) gets one fresh boot.
        // `agent`: the connection that found the guest's agent up, which
        // the seed call then uses (a round trip fewer).
        let (launched, agent) = match self.boot_once(&mut vm, &op, first, FIRST_BOOT_DEADLINE).await {
            Ok(l) => l,
            Err((e, true)) => {
                tracing::warn!(vm = %vm.name, error = %e.message, "the guest did not answer; booting it once more");
                match self.boot_once(&mut vm, &op, spec, BOOT_DEADLINE).await {
                    Ok(l) => l,
                    Err((e, _)) => return Err(self.fail_start(vm, e).await),
                }
            }
            Err((e, false)) => return Err(self.fail_start(vm, e).await),
        };
        let in_handshake = match &seed_plan {
            Some(plan) => {
                let _ = std::fs::remove_file(plan);
                self.handshake_seeded(&vm, net.as_ref())
            }
            None => None,
        };
        let seeded = match in_handshake {
            Some(r) => r,
            None => {
                self.seed_as(
                    &vm,
                    &launched.vsock_uds,
                    Some(agent),
                    &op,
                    hostname.as_deref(),
                    net,
                )
                .await
            }
        };
        if let Err(e) = seeded {
            self.teardown(&vm, self.cached(&vm.id).as_ref()).await;
            return Err(self.fail_start(vm, e).await);
        }
        vm.runtime.state = VmState::Running;
        vm.runtime.restore_from = None;
        self.save_sync_soon(&vm)?;
        tracing::info!(vm = %vm.name, "vm running");
        // Without a network there is no ssh to set up.
        if vm.runtime.guest_ip.is_none() {
            return Ok(vm);
        }
        crate::ops::stage("ssh");
        if let Err(e) = self
            .ssh_setup(&vm, &launched.vsock_uds, &op, restoring.is_some())
            .await
        {
            // An image without sshd still runs; only `vm ssh` is affected.
            tracing::warn!(vm = %vm.name, error = %e.message, "ssh set-up failed");
        }
        Ok(vm)
    }

    /// A VM in a container engine's namespace: its tap made there and
    /// joined to the engine's interface; the guest takes the engine's
    /// address, gateway and MAC, recorded before the VMM starts.
    async fn join_engine_net(
        &self,
        vm: &mut VmRecord,
        op: &OpId,
        ns: &str,
        tap: String,
        spec: &mut LaunchSpec,
    ) -> Result<(), (RpcError, bool)> {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let (ready, fd) = match self.network.attach_pod(op, ns, &tap, uid).await {
            Ok(a) => a,
            Err(e) => {
                self.teardown(vm, None).await;
                return Err((e.into(), false));
            }
        };
        tracing::info!(vm = %vm.name, netns = %ns, address = %ready.address, mac = %ready.mac, "joined the engine's network");
        vm.runtime.guest_ip = Some(ready.address);
        vm.runtime.guest_gw = ready.gateway;
        vm.runtime.guest_mac = Some(ready.mac.clone());
        if let Err(e) = self.save(vm) {
            self.teardown(vm, None).await;
            return Err((e, false));
        }
        spec.cmdline = super::vmm::cmdline(vm, None);
        spec.net = Some(banger_vmm::NetSpec {
            tap,
            fd: Some(Arc::new(fd)),
            mac: ready.mac,
            netns: None,
        });
        Ok(())
    }

    /// One boot: network, VMM, wait for the agent. On error everything it
    /// made is torn down; the flag says whether booting again may help.
    async fn boot_once(
        &self,
        vm: &mut VmRecord,
        op: &OpId,
        mut spec: LaunchSpec,
        deadline: Duration,
    ) -> Result<(Launched, tokio::net::UnixStream), (RpcError, bool)> {
        if let Some(tap) = vm.runtime.tap.clone() {
            crate::ops::stage("network");
            if let Some(ns) = vm.spec.netns.clone() {
                self.join_engine_net(vm, op, &ns, tap, &mut spec).await?;
            } else {
                // A jailed Firecracker runs in a network namespace of its own,
                // where its tap is, and opens the tap as the VM's own uid.
                let jailed_uid = match (&self.settings.jail, VmmKind::parse(&vm.spec.vmm)) {
                    (Some(j), Some(VmmKind::Firecracker)) => Some(j.uid(spec.vsock_cid)),
                    _ => None,
                };
                let attached = match jailed_uid {
                    Some(uid) => self
                        .network
                        .attach_jailed(op, &vm.id, &tap, uid)
                        .await
                        .map(|ns| (None, Some(ns))),
                    // SAFETY: getuid cannot fail.
                    None => self
                        .network
                        .attach(op, &tap, unsafe { libc::getuid() })
                        .await
                        .map(|fd| (Some(fd), None)),
                };
                let (fd, netns) = match attached {
                    Ok(a) => a,
                    Err(e) => {
                        self.teardown(vm, None).await;
                        return Err((e.into(), false));
                    }
                };
                // QEMU gets the open tap (it cannot open one unprivileged);
                // Firecracker opens it by name itself, which fails while
                // another descriptor is attached, so ours is closed.
                let fd = fd.filter(|_| VmmKind::parse(&vm.spec.vmm) == Some(VmmKind::Qemu));
                spec.net = Some(banger_vmm::NetSpec {
                    tap,
                    fd: fd.map(Arc::new),
                    mac: mac_for(&vm.id),
                    netns,
                });
                // The tap drops every frame until the guest's rules are in:
                // only its MAC and address, NAT and peers as the spec says.
                if let Some(g) = alloc::guest_net(vm) {
                    if let Err(e) = self.network.guest_allow(op, &g).await {
                        self.teardown(vm, None).await;
                        return Err((e.into(), false));
                    }
                }
            }
        }
        crate::ops::stage("vmm");
        let launched = match self.launch(vm, &spec).await {
            Ok(l) => l,
            Err(e) => {
                self.teardown(vm, None).await;
                return Err((e, false));
            }
        };
        tracing::info!(vm = %vm.name, pid = launched.pid, vmm = launched.kind.as_str(), "vmm started");
        let h = VmHandles {
            launched: launched.clone(),
        };
        let dir = PathBuf::from(&vm.runtime.vm_dir);
        if let Err(e) = handles::write(&dir, &h) {
            self.teardown(vm, Some(&h)).await;
            return Err((RpcError::failed(format!("writing handles.json: {e}")), false));
        }
        self.handles.locked().insert(vm.id.clone(), h);
        // Saved together with the Running state: until then handles.json
        // is what a restarted daemon adopts from.
        vm.runtime.api_socket = launched.api_socket.display().to_string();
        vm.runtime.vsock_uds = launched.vsock_uds.display().to_string();
        vm.runtime.log_path = launched.serial_log.display().to_string();

        crate::ops::stage("guest");
        let restoring = spec.restore.is_some();
        let marker = vm.runtime.vm_dir.clone();
        let pid = launched.pid;
        let interrupted = self.interrupt_token(&vm.id);
        let wait_guest = async {
            if launched.kind == VmmKind::Qemu && !restoring {
                // A booting agent announces itself when its channel is up:
                // the daemon connects then, not at the next tick of a poll.
                // A restored one is up within milliseconds, sooner found by
                // polling than by its announcement's trip; Firecracker's own
                // vsock is polled at once.
                wait_for_ready(&launched.vsock_uds, pid, &marker, READY_WAIT.min(deadline)).await;
            }
            banger_vmm::vsock::connect_with_retry(&launched.vsock_uds, a::AGENT_PORT, deadline, || {
                process::alive(pid, &marker)
            })
            .await
            .map_err(|e| e.to_string())
        };
        let ready = tokio::select! {
            r = wait_guest => r,
            _ = interrupted.cancelled() => {
                self.teardown(vm, self.cached(&vm.id).as_ref()).await;
                return Err((RpcError::new(banger_proto::ErrorCode::Cancelled, "start cut short by vm kill"), false));
            }
        };
        let agent = match ready {
            Ok(s) => s,
            Err(e) => {
                let serial = tail(&launched.serial_log, 1500);
                let vmm_died = !process::alive(pid, &marker);
                let vmm_log = tail(&Path::new(&vm.runtime.vm_dir).join("vmm.log"), 600);
                let e = RpcError::failed(format!(
                "the guest did not come up: {e}\n--- serial console (tail) ---\n{serial}\n--- VMM log (tail) ---\n{vmm_log}"
            ));
                self.teardown(vm, self.cached(&vm.id).as_ref()).await;
                return Err((e, !vmm_died));
            }
        };
        Ok((launched, agent))
    }

    async fn fail_start(&self, mut vm: VmRecord, e: RpcError) -> RpcError {
        self.spare_release(&vm).await;
        vm.runtime.state = VmState::Stopped;
        vm.runtime.last_error = Some(e.message.clone());
        let _ = self.save(&vm);
        e
    }
}

/// Waits until the guest agent connects to the host's ready port (or the
/// VMM exits, or `limit` passes). Guest-initiated connections to port P
/// arrive on `<vsock uds>_P`.
async fn wait_for_ready(uds: &Path, pid: u32, marker: &str, limit: Duration) {
    let path = PathBuf::from(format!("{}_{}", uds.display(), a::READY_PORT));
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "no ready listener; polling instead");
            return;
        }
    };
    let end = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if accepted.is_ok() {
                    break;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if !process::alive(pid, marker) || tokio::time::Instant::now() >= end {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
