//! The VM service: create, start, stop, delete, exec, reconcile.
//!
//! Locking: a per-VM async mutex is held for a whole lifecycle operation, so
//! operations on one VM are serialised while different VMs proceed in
//! parallel; `create_lock` serialises only name and CID allocation.

pub mod agent;
pub mod handles;
pub mod names;

use crate::image::{store_err, ImageService};
use crate::initramfs;
use crate::kernel;
use crate::network::NetworkService;
use crate::ops::{OpHandle, Operations};
use crate::ssh::SshService;
use crate::sys::{self, io};
use crate::workspace;
use banger_proto::methods::agent as a;
use banger_proto::methods::daemon::{
    StageInfo, VmCreate, VmCreateBegun, VmCreateStatus, VmInfo, WorkspaceExport, WorkspacePrepare,
    WorkspaceReady,
};
use banger_proto::methods::Empty;
use banger_proto::{Ctx, ErrorCode, OpId, RpcError};
use banger_store::{Store, VmRecord, VmRuntime, VmSpec, VmState};
use banger_vmm::qemu::Qemu;
use banger_vmm::{process, Drive, LaunchSpec, Launched, Vmm, VmmKind};
use handles::VmHandles;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a booting guest may take to answer (TCG is slow).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// How long to wait for the agent's "ready" before polling it anyway
/// (images whose agent does not announce itself).
const READY_WAIT: Duration = Duration::from_secs(20);
/// The first boot's share of it, after which the guest is booted again.
const FIRST_BOOT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a guest may take to power off before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// The system overlay: every write to `/` outside `/root` lands here.
const OVERLAY_BYTES: u64 = 4 << 30;
const MIN_WORK_DISK_MIB: u64 = 64;

pub struct Settings {
    pub vms_dir: PathBuf,
    pub vmm: String,
    pub qemu: Option<PathBuf>,
    pub firecracker: Option<PathBuf>,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub default_work_disk_mib: u64,
    pub agent_binary: PathBuf,
    pub busybox: PathBuf,
}

pub struct VmService {
    settings: Settings,
    store: Arc<Store>,
    images: Arc<ImageService>,
    ops: Arc<Operations>,
    network: Arc<NetworkService>,
    ssh: Arc<SshService>,
    /// What is true now: handles of running VMs by VM id.
    handles: Mutex<HashMap<String, VmHandles>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    create_lock: tokio::sync::Mutex<()>,
    cancels: Mutex<HashMap<OpId, CancellationToken>>,
}

impl VmService {
    pub fn new(
        settings: Settings,
        store: Arc<Store>,
        images: Arc<ImageService>,
        ops: Arc<Operations>,
        network: Arc<NetworkService>,
        ssh: Arc<SshService>,
    ) -> Self {
        VmService {
            network,
            ssh,
            settings,
            store,
            images,
            ops,
            handles: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            cancels: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves `auto` to a back-end that can really boot here.
    pub fn resolve_vmm(&self) -> Result<VmmKind, RpcError> {
        match self.settings.vmm.as_str() {
            "qemu" => Ok(VmmKind::Qemu),
            "firecracker" => Ok(VmmKind::Firecracker),
            _ => {
                let fc = self
                    .settings
                    .firecracker
                    .clone()
                    .or_else(|| banger_vmm::which("firecracker"));
                if fc.is_some() && banger_vmm::kvm_usable() {
                    Ok(VmmKind::Firecracker)
                } else {
                    Ok(VmmKind::Qemu)
                }
            }
        }
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Takes the VM's lifecycle lock and re-reads the record under it (an
    /// operation that held the lock before may have changed it).
    async fn locked(&self, name: &str) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRecord), RpcError> {
        let vm = self.get(name)?;
        let guard = self.lock_for(&vm.id).lock_owned().await;
        Ok((guard, self.get(name)?))
    }

    fn get(&self, name: &str) -> Result<VmRecord, RpcError> {
        names::validate(name).map_err(RpcError::bad_request)?;
        self.store
            .get_vm(name)
            .map_err(store_err)?
            .ok_or_else(|| RpcError::not_found(format!("no VM named {name:?}")))
    }

    fn save(&self, vm: &VmRecord) -> Result<(), RpcError> {
        self.store
            .update_vm_runtime(&vm.id, &vm.runtime)
            .map_err(store_err)
    }

    fn cached(&self, id: &str) -> Option<VmHandles> {
        self.handles.lock().unwrap().get(id).cloned()
    }

    /// The one answer to "is this VM alive": its VMM process, checked
    /// against the VM directory in its command line.
    pub fn is_alive(&self, vm: &VmRecord) -> bool {
        self.cached(&vm.id)
            .is_some_and(|h| process::alive(h.launched.pid, &vm.runtime.vm_dir))
    }

    pub fn info(&self, vm: &VmRecord) -> VmInfo {
        let pid = self
            .cached(&vm.id)
            .map(|h| h.launched.pid)
            .filter(|_| self.is_alive(vm));
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: vm.runtime.state.as_str().to_string(),
            image: vm.spec.image.clone(),
            vmm: vm.spec.vmm.clone(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            work_disk_bytes: vm.spec.work_disk_bytes,
            pid,
            vsock_cid: vm.runtime.vsock_cid,
            vm_dir: vm.runtime.vm_dir.clone(),
            guest_ip: vm.runtime.guest_ip.clone(),
            last_error: vm.runtime.last_error.clone(),
            created_at: vm.created_at.clone(),
        }
    }

    pub fn list(&self) -> Result<Vec<VmInfo>, RpcError> {
        Ok(self
            .store
            .list_vms()
            .map_err(store_err)?
            .iter()
            .map(|v| self.info(v))
            .collect())
    }

    pub fn show(&self, name: &str) -> Result<VmInfo, RpcError> {
        Ok(self.info(&self.get(name)?))
    }

    // ---- create ----

    /// Validates synchronously (bad input fails before anything exists),
    /// then creates in a detached task registered under the call's op id.
    pub fn create_begin(self: &Arc<Self>, ctx: &Ctx, p: VmCreate) -> Result<VmCreateBegun, RpcError> {
        let name = if p.name.is_empty() {
            names::generate()
        } else {
            p.name.clone()
        };
        names::validate(&name).map_err(RpcError::bad_request)?;
        let image = p
            .image
            .clone()
            .unwrap_or_else(|| crate::image::DEFAULT_IMAGE.to_string());
        crate::image::validate_name(&image)?;
        if image != crate::image::DEFAULT_IMAGE {
            self.images.get(&image)?;
        }
        let vcpus = p.vcpus.unwrap_or(self.settings.default_vcpus);
        if !(1..=32).contains(&vcpus) {
            return Err(RpcError::bad_request(format!("vcpus must be 1-32, not {vcpus}")));
        }
        let memory_mib = p.memory_mib.unwrap_or(self.settings.default_memory_mib);
        if !(128..=262_144).contains(&memory_mib) {
            return Err(RpcError::bad_request(format!(
                "memory must be 128-262144 MiB, not {memory_mib}"
            )));
        }
        let work_mib = p.work_disk_mib.unwrap_or(self.settings.default_work_disk_mib);
        if work_mib < MIN_WORK_DISK_MIB {
            return Err(RpcError::bad_request(format!(
                "work disk of {work_mib} MiB is too small: at least {MIN_WORK_DISK_MIB} MiB"
            )));
        }
        let vmm = self.resolve_vmm()?;
        self.check_vmm(vmm)?;
        if self.store.get_vm(&name).map_err(store_err)?.is_some() {
            return Err(RpcError::already_exists(format!(
                "a VM named {name:?} already exists"
            )));
        }
        let spec = VmSpec {
            image,
            vcpus,
            memory_mib,
            work_disk_bytes: work_mib << 20,
            vmm: vmm.as_str().to_string(),
            nat: p.nat,
            network: !p.no_network,
        };
        if p.nat && p.no_network {
            return Err(RpcError::bad_request("--nat needs networking: drop --no-network"));
        }
        let op = self.ops.begin(&ctx.op_id, "vm.create", &name);
        let cancel = CancellationToken::new();
        self.cancels
            .lock()
            .unwrap()
            .insert(ctx.op_id.clone(), cancel.clone());
        let svc = self.clone();
        let start = p.start;
        let vm_name = name.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let res = svc.create(&op, &vm_name, spec, start, &cancel).await;
                if let Err(e) = &res {
                    tracing::warn!(error = %e.message, "vm create failed");
                }
                svc.cancels.lock().unwrap().remove(op.id());
                op.finish(res.map(|_| ()));
            }
            .instrument(span),
        );
        Ok(VmCreateBegun {
            op_id: ctx.op_id.to_string(),
            name,
        })
    }

    fn check_vmm(&self, kind: VmmKind) -> Result<(), RpcError> {
        match kind {
            VmmKind::Qemu => Qemu::detect(self.settings.qemu.clone())
                .map(|_| ())
                .map_err(|e| RpcError::failed(e.to_string())),
            VmmKind::Firecracker => {
                let fc = self
                    .settings
                    .firecracker
                    .clone()
                    .or_else(|| banger_vmm::which("firecracker"));
                match fc {
                    Some(p) if banger_vmm::is_executable(&p) => Ok(()),
                    Some(p) => Err(RpcError::failed(format!(
                        "firecracker binary not found: {}",
                        p.display()
                    ))),
                    None => Err(RpcError::failed("firecracker binary not found on PATH")),
                }
            }
        }
    }

    pub fn create_status(&self, op_id: &str) -> Result<VmCreateStatus, RpcError> {
        let id =
            OpId::parse(op_id).ok_or_else(|| RpcError::bad_request(format!("invalid op id {op_id:?}")))?;
        let op = self
            .ops
            .get(&id)
            .ok_or_else(|| RpcError::not_found(format!("no operation {op_id}")))?;
        let stages = self
            .ops
            .stages(&id)
            .into_iter()
            .map(|(name, elapsed_ms)| StageInfo { name, elapsed_ms })
            .collect();
        let vm = self
            .store
            .get_vm(&op.subject)
            .ok()
            .flatten()
            .map(|v| self.info(&v));
        Ok(VmCreateStatus { op, stages, vm })
    }

    pub fn create_cancel(&self, op_id: &str) -> Result<Empty, RpcError> {
        let id =
            OpId::parse(op_id).ok_or_else(|| RpcError::bad_request(format!("invalid op id {op_id:?}")))?;
        match self.cancels.lock().unwrap().get(&id) {
            Some(t) => {
                t.cancel();
                Ok(Empty {})
            }
            None => Err(RpcError::not_found(format!(
                "no running create operation {op_id}"
            ))),
        }
    }

    async fn create(
        self: &Arc<Self>,
        op: &OpHandle,
        name: &str,
        spec: VmSpec,
        start: bool,
        cancel: &CancellationToken,
    ) -> Result<VmRecord, RpcError> {
        let cancelled = || -> Result<(), RpcError> {
            if cancel.is_cancelled() {
                Err(RpcError::new(ErrorCode::Cancelled, "creation cancelled"))
            } else {
                Ok(())
            }
        };
        op.stage("image");
        let progress = |s: &str| op.stage(s);
        let image = self.images.ensure(&spec.image, &progress).await?;
        cancelled()?;

        op.stage("allocate");
        let vm = {
            let _g = self.create_lock.lock().await;
            let all = self.store.list_vms().map_err(store_err)?;
            if all.iter().any(|v| v.name == name) {
                return Err(RpcError::already_exists(format!(
                    "a VM named {name:?} already exists"
                )));
            }
            let cid = all.iter().map(|v| v.runtime.vsock_cid).max().unwrap_or(2).max(2) + 1;
            let id = format!("{:08x}{:08x}", kernel::rand_u32(), kernel::rand_u32());
            let dir = self.settings.vms_dir.join(&id);
            let (guest_ip, tap) = if spec.network {
                let used: Vec<std::net::Ipv4Addr> = all
                    .iter()
                    .filter_map(|v| v.runtime.guest_ip.as_deref()?.split('/').next()?.parse().ok())
                    .collect();
                let lease = self.network.allocate(&used)?;
                (
                    Some(format!("{}/{}", lease.ip, lease.prefix)),
                    Some(format!("bgt{}", &id[..8])),
                )
            } else {
                (None, None)
            };
            let runtime = VmRuntime {
                guest_ip,
                tap,
                state: VmState::Creating,
                vm_dir: dir.display().to_string(),
                vsock_cid: cid,
                overlay_path: dir.join("overlay.ext4").display().to_string(),
                work_disk_path: dir.join("work.ext4").display().to_string(),
                log_path: dir.join("serial.log").display().to_string(),
                vsock_uds: dir.join("vsock.sock").display().to_string(),
                ..Default::default()
            };
            let vm = VmRecord {
                id,
                name: name.to_string(),
                spec,
                runtime,
                created_at: banger_store::now(),
            };
            self.store.insert_vm(&vm).map_err(store_err)?;
            vm
        };
        tracing::info!(vm = %vm.name, id = %vm.id, image = %image.name, "vm allocated");

        let made = async {
            cancelled()?;
            op.stage("disks");
            let dir = Path::new(&vm.runtime.vm_dir);
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            sys::make_ext4(
                Path::new(&vm.runtime.overlay_path),
                OVERLAY_BYTES,
                "banger-overlay",
            )
            .await?;
            sys::make_ext4(
                Path::new(&vm.runtime.work_disk_path),
                vm.spec.work_disk_bytes,
                "banger-work",
            )
            .await?;
            cancelled()?;
            Ok::<_, RpcError>(())
        }
        .await;
        if let Err(e) = made {
            self.discard(&vm);
            return Err(e);
        }
        let mut vm = vm;
        vm.runtime.state = VmState::Stopped;
        self.save(&vm)?;
        if start {
            op.stage("boot");
            let lock = self.lock_for(&vm.id);
            let _g = lock.lock().await;
            vm = self.start_locked(vm).await?;
        }
        op.stage("ready");
        Ok(vm)
    }

    /// Removes a VM that never finished creating: directory and row.
    fn discard(&self, vm: &VmRecord) {
        if !vm.runtime.vm_dir.is_empty() {
            let _ = std::fs::remove_dir_all(&vm.runtime.vm_dir);
        }
        let _ = self.store.delete_vm(&vm.id);
    }

    // ---- start / stop ----

    pub async fn start(&self, name: &str) -> Result<VmInfo, RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.start_locked(vm).await?;
        Ok(self.info(&vm))
    }

    fn launch_spec(&self, vm: &VmRecord) -> Result<LaunchSpec, RpcError> {
        let image = self.images.get(&vm.spec.image)?;
        let k = kernel::read_manifest(Path::new(&image.kernel))?;
        let initrd = initramfs::ensure(&initramfs::Inputs {
            kernel: &k,
            agent: &self.settings.agent_binary,
            busybox: &self.settings.busybox,
        })?;
        let kernel = match VmmKind::parse(&vm.spec.vmm) {
            Some(VmmKind::Firecracker) => match &k.vmlinux {
                Some(f) => Path::new(&k.dir).join(f),
                None => {
                    return Err(RpcError::failed(format!(
                        "kernel {} has no uncompressed vmlinux, which Firecracker needs",
                        k.version
                    )))
                }
            },
            _ => Path::new(&k.dir).join("vmlinuz"),
        };
        Ok(LaunchSpec {
            vm_dir: PathBuf::from(&vm.runtime.vm_dir),
            kernel,
            initrd: Some(initrd),
            cmdline: cmdline(vm, self.network.cidr().ok()),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            drives: vec![
                Drive {
                    id: "base".into(),
                    path: PathBuf::from(&image.rootfs),
                    read_only: true,
                },
                Drive {
                    id: "overlay".into(),
                    path: PathBuf::from(&vm.runtime.overlay_path),
                    read_only: false,
                },
                Drive {
                    id: "work".into(),
                    path: PathBuf::from(&vm.runtime.work_disk_path),
                    read_only: false,
                },
            ],
            vsock_cid: vm.runtime.vsock_cid,
            net: None,
        })
    }

    async fn launch(&self, vm: &VmRecord, spec: &LaunchSpec) -> Result<Launched, RpcError> {
        match VmmKind::parse(&vm.spec.vmm) {
            Some(VmmKind::Qemu) => {
                let q =
                    Qemu::detect(self.settings.qemu.clone()).map_err(|e| RpcError::failed(e.to_string()))?;
                q.launch(spec).await.map_err(|e| RpcError::failed(e.to_string()))
            }
            Some(VmmKind::Firecracker) => {
                let fc = banger_vmm::firecracker::Firecracker {
                    binary: self
                        .settings
                        .firecracker
                        .clone()
                        .unwrap_or_else(|| "firecracker".into()),
                };
                fc.launch(spec).await.map_err(|e| RpcError::failed(e.to_string()))
            }
            None => Err(RpcError::failed(format!("unknown vmm {:?}", vm.spec.vmm))),
        }
    }

    async fn start_locked(&self, mut vm: VmRecord) -> Result<VmRecord, RpcError> {
        if self.is_alive(&vm) {
            return Ok(vm);
        }
        let op = current_op();
        let spec = self.launch_spec(&vm)?;
        // Not written as "starting": if the daemon dies before the VM is
        // running, the record still says stopped and reconcile kills
        // whatever the VM directory's processes are. One fsync less.
        vm.runtime.state = VmState::Starting;
        vm.runtime.last_error = None;
        // A guest that boots but never answers on vsock (seen, rarely, with
        // the userspace vsock backend under load) gets one fresh boot.
        let launched = match self
            .boot_once(&mut vm, &op, spec.clone(), FIRST_BOOT_DEADLINE)
            .await
        {
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
        vm.runtime.state = VmState::Running;
        self.save(&vm)?;
        tracing::info!(vm = %vm.name, "vm running");
        // Without a network there is no ssh to set up.
        if vm.runtime.guest_ip.is_none() {
            return Ok(vm);
        }
        if let Err(e) = self.ssh_setup(&vm, &launched.vsock_uds, &op).await {
            // An image without sshd still runs; only `vm ssh` is affected.
            tracing::warn!(vm = %vm.name, error = %e.message, "ssh set-up failed");
        }
        Ok(vm)
    }

    /// One boot: network, VMM, wait for the agent. On error everything it
    /// made is torn down; the flag says whether booting again may help.
    async fn boot_once(
        &self,
        vm: &mut VmRecord,
        op: &OpId,
        mut spec: LaunchSpec,
        deadline: Duration,
    ) -> Result<Launched, (RpcError, bool)> {
        if let Some(tap) = vm.runtime.tap.clone() {
            let fd = match self.network.attach(op, &tap).await {
                Ok(fd) => fd,
                Err(e) => {
                    self.teardown(vm, None).await;
                    return Err((e, false));
                }
            };
            spec.net = Some(banger_vmm::NetSpec {
                tap,
                fd: Some(Arc::new(fd)),
                mac: mac_for(&vm.id),
            });
            if vm.spec.nat {
                if let Some(ip) = vm
                    .runtime
                    .guest_ip
                    .as_deref()
                    .and_then(|g| g.split('/').next()?.parse().ok())
                {
                    if let Err(e) = self.network.nat_add(op, &vm.id, ip).await {
                        self.teardown(vm, None).await;
                        return Err((e, false));
                    }
                }
            }
        }
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
        self.handles.lock().unwrap().insert(vm.id.clone(), h);
        // Saved together with the Running state: until then handles.json
        // is what a restarted daemon adopts from.
        vm.runtime.api_socket = launched.api_socket.display().to_string();
        vm.runtime.vsock_uds = launched.vsock_uds.display().to_string();
        vm.runtime.log_path = launched.serial_log.display().to_string();

        let marker = vm.runtime.vm_dir.clone();
        let pid = launched.pid;
        if launched.kind == VmmKind::Qemu {
            // The agent announces itself; polling a guest whose vsock
            // driver is not up yet is what occasionally wedged
            // vhost-device-vsock. Firecracker's own vsock is polled at once.
            wait_for_ready(&launched.vsock_uds, pid, &marker, READY_WAIT.min(deadline)).await;
        }
        let ready =
            banger_vmm::vsock::connect_with_retry(&launched.vsock_uds, a::AGENT_PORT, deadline, || {
                process::alive(pid, &marker)
            })
            .await;
        if let Err(e) = ready {
            let serial = tail(&launched.serial_log, 1500);
            let vmm_died = !process::alive(pid, &marker);
            let vmm_log = self::tail(&Path::new(&vm.runtime.vm_dir).join("vmm.log"), 600);
            let e = RpcError::failed(format!(
                "the guest did not come up: {e}\n--- serial console (tail) ---\n{serial}\n--- VMM log (tail) ---\n{vmm_log}"
            ));
            self.teardown(vm, self.cached(&vm.id).as_ref()).await;
            return Err((e, !vmm_died));
        }
        Ok(launched)
    }

    async fn fail_start(&self, mut vm: VmRecord, e: RpcError) -> RpcError {
        vm.runtime.state = VmState::Stopped;
        vm.runtime.last_error = Some(e.message.clone());
        let _ = self.save(&vm);
        e
    }

    /// Kills every process of the VM and removes its runtime files. Uses
    /// the handles when known, and the VM directory marker regardless, so
    /// a lost scratch file cannot leak a process.
    async fn teardown(&self, vm: &VmRecord, h: Option<&VmHandles>) {
        let marker = vm.runtime.vm_dir.clone();
        if marker.is_empty() {
            return;
        }
        let mut pids: Vec<u32> = h
            .map(|h| {
                std::iter::once(h.launched.pid)
                    .chain(h.launched.aux_pids.iter().copied())
                    .collect()
            })
            .unwrap_or_default();
        for p in process::find_by_marker(&marker) {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
        for pid in pids {
            process::terminate(pid, &marker, Duration::from_secs(2)).await;
        }
        let dir = Path::new(&marker);
        for f in ["qmp.sock", "vsock.sock", "vhost-vsock.sock", "firecracker.sock"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vsock.sock_") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        handles::remove(dir);
        self.handles.lock().unwrap().remove(&vm.id);
        // Host network resources: the tap, and NAT rules (looked up by tag,
        // so a crash between adding and recording them cannot leak one).
        if let Some(tap) = &vm.runtime.tap {
            let op = current_op();
            if vm.spec.nat {
                if let Err(e) = self.network.nat_remove(&op, &vm.id).await {
                    tracing::warn!(vm = %vm.name, error = %e.message, "could not remove NAT rules");
                }
            }
            if let Err(e) = self.network.detach(&op, tap).await {
                tracing::warn!(vm = %vm.name, tap = %tap, error = %e.message, "could not delete the tap");
            }
        }
    }

    /// The running VM named `name` and its address, for DNS.
    pub fn resolve(&self, name: &str) -> Option<std::net::Ipv4Addr> {
        let vm = self.store.get_vm(name).ok()??;
        if vm.name != name || vm.runtime.state != VmState::Running {
            return None;
        }
        vm.runtime.guest_ip.as_deref()?.split('/').next()?.parse().ok()
    }

    /// Removes NAT rules whose VM is not running (after a crash).
    pub async fn sweep_nat(&self) {
        let op = current_op();
        let tags = match self.network.nat_list(&op).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e.message, "NAT sweep skipped");
                return;
            }
        };
        for tag in tags {
            let running = self
                .store
                .get_vm(&tag)
                .ok()
                .flatten()
                .is_some_and(|v| self.is_alive(&v));
            if !running {
                tracing::warn!(vm = %tag, "removing leaked NAT rules");
                let _ = self.network.nat_remove(&op, &tag).await;
            }
        }
    }

    pub async fn stop(&self, op: &OpId, name: &str) -> Result<VmInfo, RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.stop_locked(op, vm, true).await?;
        Ok(self.info(&vm))
    }

    pub async fn kill(&self, op: &OpId, name: &str) -> Result<VmInfo, RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.stop_locked(op, vm, false).await?;
        Ok(self.info(&vm))
    }

    pub async fn restart(&self, op: &OpId, name: &str) -> Result<VmInfo, RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.stop_locked(op, vm, true).await?;
        let vm = self.start_locked(vm).await?;
        Ok(self.info(&vm))
    }

    /// Graceful: agent sync + poweroff, then kill at the deadline.
    async fn stop_locked(&self, op: &OpId, mut vm: VmRecord, graceful: bool) -> Result<VmRecord, RpcError> {
        let h = self.cached(&vm.id);
        if let (true, Some(h)) = (graceful && self.is_alive(&vm), h.as_ref()) {
            vm.runtime.state = VmState::Stopping;
            self.save(&vm)?;
            let uds = &h.launched.vsock_uds;
            if let Err(e) = agent::call::<a::Sync>(uds, op, &Empty {}, |_| ()).await {
                tracing::warn!(error = %e.message, "sync before poweroff failed");
            }
            match agent::call::<a::Poweroff>(uds, op, &Empty {}, |_| ()).await {
                Ok(_) => {
                    if !process::wait_gone(h.launched.pid, &vm.runtime.vm_dir, STOP_DEADLINE).await {
                        tracing::warn!(vm = %vm.name, "guest did not power off in time; killing it");
                    }
                }
                Err(e) => tracing::warn!(error = %e.message, "poweroff request failed; killing the VMM"),
            }
        }
        self.teardown(&vm, h.as_ref()).await;
        vm.runtime.state = VmState::Stopped;
        self.save(&vm)?;
        tracing::info!(vm = %vm.name, graceful, "vm stopped");
        Ok(vm)
    }

    pub async fn delete(&self, op: &OpId, name: &str) -> Result<(), RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.stop_locked(op, vm, false).await?;
        let dir = Path::new(&vm.runtime.vm_dir);
        if !vm.runtime.vm_dir.is_empty() && dir.starts_with(&self.settings.vms_dir) {
            std::fs::remove_dir_all(dir)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io(format!("removing {}", dir.display())))?;
        }
        self.store.delete_vm(&vm.id).map_err(store_err)?;
        self.locks.lock().unwrap().remove(&vm.id);
        let ip = vm.runtime.guest_ip.as_deref().and_then(|g| g.split('/').next());
        if let Err(e) = self.ssh.forget(&vm.name, ip) {
            tracing::warn!(vm = %vm.name, error = %e.message, "could not remove known_hosts entries");
        }
        tracing::info!(vm = %vm.name, "vm deleted");
        Ok(())
    }

    /// Deletes every VM that is not running.
    pub async fn prune(&self, op: &OpId) -> Result<Vec<String>, RpcError> {
        let mut deleted = Vec::new();
        for vm in self.store.list_vms().map_err(store_err)? {
            if !self.is_alive(&vm) && vm.runtime.state != VmState::Creating {
                self.delete(op, &vm.name).await?;
                deleted.push(vm.name);
            }
        }
        Ok(deleted)
    }

    pub fn logs(&self, name: &str, tail_bytes: Option<u64>) -> Result<(String, String), RpcError> {
        let vm = self.get(name)?;
        let path = if vm.runtime.log_path.is_empty() {
            Path::new(&vm.runtime.vm_dir).join("serial.log")
        } else {
            PathBuf::from(&vm.runtime.log_path)
        };
        let text = tail(&path, tail_bytes.unwrap_or(64 * 1024) as usize);
        Ok((text, path.display().to_string()))
    }

    /// Authorises banger's key in the guest and pins the guest's host key.
    async fn ssh_setup(&self, vm: &VmRecord, uds: &Path, op: &OpId) -> Result<(), RpcError> {
        use base64::Engine;
        let public = self.ssh.public_key().await?;
        let req = a::ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "umask 077; mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys".into(),
            ],
            stdin_b64: Some(base64::engine::general_purpose::STANDARD.encode(format!("{public}\n"))),
            ..Default::default()
        };
        let st = agent::call::<a::Exec>(uds, op, &req, |_| ()).await?;
        if st.shell_code() != 0 {
            return Err(RpcError::failed("could not write authorized_keys in the guest"));
        }
        let host_key = self
            .guest_sh(uds, op, "cat /etc/ssh/ssh_host_ed25519_key.pub".into())
            .await?;
        let host_key = String::from_utf8_lossy(&host_key);
        let mut parts = host_key.split_whitespace();
        let (Some(kind), Some(key)) = (parts.next(), parts.next()) else {
            return Err(RpcError::failed("the guest has no ed25519 host key"));
        };
        let ip = vm.runtime.guest_ip.as_deref().and_then(|g| g.split('/').next());
        self.ssh.pin(&vm.name, ip, &format!("{kind} {key}"))
    }

    // ---- workspaces ----

    /// Runs a shell snippet in the guest and fails with its stderr.
    async fn guest_sh(&self, uds: &Path, op: &OpId, script: String) -> Result<Vec<u8>, RpcError> {
        let out = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let sink = out.clone();
        let req = a::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script],
            ..Default::default()
        };
        let st = agent::call::<a::Exec>(uds, op, &req, move |ev| {
            use base64::Engine;
            if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(&ev.data_b64) {
                let mut o = sink.lock().unwrap();
                match ev.stream {
                    a::StreamName::Stdout => o.0.extend(b),
                    a::StreamName::Stderr => o.1.extend(b),
                }
            }
        })
        .await?;
        let (stdout, stderr) = std::mem::take(&mut *out.lock().unwrap());
        if st.shell_code() != 0 {
            return Err(RpcError::failed(format!(
                "guest command failed ({}): {}",
                st.shell_code(),
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        Ok(stdout)
    }

    fn running_handles(&self, vm: &VmRecord) -> Result<VmHandles, RpcError> {
        match self.cached(&vm.id) {
            Some(h) if self.is_alive(vm) => Ok(h),
            _ => Err(RpcError::not_running(format!(
                "VM {} is not running (start it with `banger vm start {}`)",
                vm.name, vm.name
            ))),
        }
    }

    pub async fn workspace_prepare(
        &self,
        op: &OpId,
        p: WorkspacePrepare,
    ) -> Result<WorkspaceReady, RpcError> {
        for r in p.branch.iter().chain(p.from.iter()) {
            workspace::validate_ref(r)?;
        }
        let (root, plan) = workspace::plan(&p.path, p.include_untracked).await?;
        let (_g, mut vm) = self.locked(&p.name).await?;
        let h = self.running_handles(&vm)?;
        let work = kernel::tempdir_in(Path::new(&vm.runtime.vm_dir), ".workspace")?;
        let result = async {
            let mut from_sha = None;
            let dotgit = match &plan.base_commit {
                Some(base) => {
                    if let Some(f) = &p.from {
                        let sha = sys::run(
                            "git",
                            [
                                "-C",
                                &plan.repo_root,
                                "rev-parse",
                                "--verify",
                                &format!("{f}^{{commit}}"),
                            ],
                            None,
                        )
                        .await
                        .map_err(|_| RpcError::not_found(format!("no commit {f:?} in {}", plan.repo_root)))?;
                        from_sha = Some(sha.trim().to_string());
                    }
                    Some(workspace::shallow_git(&root, &work, base, from_sha.as_deref()).await?)
                }
                None => None,
            };
            let sent = workspace::push(
                &h.launched.vsock_uds,
                op,
                &root,
                &plan.files,
                dotgit.as_deref(),
                workspace::GUEST_REPO,
            )
            .await?;
            if !sent.ok {
                return Err(RpcError::failed(format!(
                    "guest could not unpack the workspace: {}",
                    sent.error.unwrap_or_default()
                )));
            }
            self.guest_sh(
                &h.launched.vsock_uds,
                op,
                workspace::finish_script(p.branch.as_deref(), from_sha.as_deref()),
            )
            .await?;
            Ok(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        result?;
        vm.runtime.workspace = Some(workspace::GUEST_REPO.to_string());
        self.save(&vm)?;
        tracing::info!(vm = %vm.name, files = plan.files.len(), bytes = plan.bytes, "workspace prepared");
        Ok(WorkspaceReady {
            guest_path: workspace::GUEST_REPO.to_string(),
            files: plan.files.len(),
            bytes: plan.bytes,
            skipped_untracked: plan.skipped_untracked,
            base_commit: plan.base_commit,
        })
    }

    pub async fn workspace_export(&self, ctx: &Ctx, p: WorkspaceExport) -> Result<a::ExitStatus, RpcError> {
        if let Some(b) = &p.base_commit {
            workspace::validate_ref(b)?;
        }
        let vm = self.get(&p.name)?;
        let h = self.running_handles(&vm)?;
        if vm.runtime.workspace.is_none() {
            return Err(RpcError::bad_request(format!("VM {} has no workspace", vm.name)));
        }
        let req = a::ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                workspace::export_script(p.base_commit.as_deref()),
            ],
            ..Default::default()
        };
        let ctx2 = ctx.clone();
        agent::call::<a::Exec>(&h.launched.vsock_uds, &ctx.op_id, &req, move |ev| ctx2.emit(&ev)).await
    }

    // ---- exec ----

    pub async fn exec(&self, ctx: &Ctx, name: &str, req: a::ExecRequest) -> Result<a::ExitStatus, RpcError> {
        if req.argv.is_empty() {
            return Err(RpcError::bad_request("nothing to run: argv is empty"));
        }
        let vm = self.get(name)?;
        let h = self.running_handles(&vm)?;
        let mut req = req;
        if req.cwd.is_none() {
            req.cwd = vm.runtime.workspace.clone();
        }
        let ctx2 = ctx.clone();
        agent::call::<a::Exec>(&h.launched.vsock_uds, &ctx.op_id, &req, move |ev| ctx2.emit(&ev)).await
    }

    // ---- reconcile ----

    /// Finds VMs whose VMM died while the daemon was running and cleans
    /// them up. VMs busy in another lifecycle operation are left to it.
    pub async fn reap_dead(&self) {
        let ids: Vec<String> = self.handles.lock().unwrap().keys().cloned().collect();
        for id in ids {
            let lock = self.lock_for(&id);
            let Ok(_g) = lock.try_lock() else { continue };
            let Ok(Some(mut vm)) = self.store.get_vm(&id) else {
                continue;
            };
            if self.is_alive(&vm) {
                continue;
            }
            tracing::warn!(vm = %vm.name, "the VMM exited; cleaning up");
            let h = self.cached(&id);
            self.teardown(&vm, h.as_ref()).await;
            vm.runtime.state = VmState::Stopped;
            vm.runtime.last_error = Some("the VMM exited unexpectedly".into());
            let _ = self.save(&vm);
        }
    }

    /// At daemon start: adopt VMs whose VMM still runs, tear down the rest.
    pub async fn reconcile(&self) {
        let vms = match self.store.list_vms() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reconcile: cannot list VMs");
                return;
            }
        };
        for mut vm in vms {
            let dir = PathBuf::from(&vm.runtime.vm_dir);
            match vm.runtime.state {
                VmState::Creating => {
                    tracing::warn!(vm = %vm.name, "reconcile: removing a VM whose creation was interrupted");
                    self.teardown(&vm, None).await;
                    self.discard(&vm);
                }
                VmState::Running | VmState::Starting | VmState::Stopping => {
                    let h = handles::read(&dir);
                    match h {
                        Some(h) if process::alive(h.launched.pid, &vm.runtime.vm_dir) => {
                            tracing::info!(vm = %vm.name, pid = h.launched.pid, "reconcile: adopted running VM");
                            self.handles.lock().unwrap().insert(vm.id.clone(), h);
                            if vm.runtime.state != VmState::Running {
                                vm.runtime.state = VmState::Running;
                                let _ = self.save(&vm);
                            }
                        }
                        h => {
                            tracing::warn!(vm = %vm.name, scratch = h.is_some(), "reconcile: VMM is gone; cleaning up");
                            self.teardown(&vm, h.as_ref()).await;
                            vm.runtime.state = VmState::Stopped;
                            vm.runtime.last_error =
                                Some("the VMM exited while banger was not watching".into());
                            let _ = self.save(&vm);
                        }
                    }
                }
                VmState::Stopped | VmState::Failed => {
                    // Nothing may run for a stopped VM.
                    if !process::find_by_marker(&vm.runtime.vm_dir).is_empty() {
                        self.teardown(&vm, None).await;
                    }
                }
            }
        }
    }
}

/// The last `max` bytes of a text file.
fn tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The op id of the call being served, or a fresh one for background work.
fn current_op() -> OpId {
    banger_proto::opid::current().unwrap_or_else(OpId::mint)
}

/// A stable, locally administered MAC derived from the VM id.
fn mac_for(id: &str) -> String {
    let b = id.as_bytes();
    let h = |i: usize| b.get(i).copied().unwrap_or(b'0');
    let hex = |x: u8, y: u8| format!("{}{}", x as char, y as char);
    format!(
        "52:54:00:{}:{}:{}",
        hex(h(0), h(1)),
        hex(h(2), h(3)),
        hex(h(4), h(5))
    )
}

/// The kernel command line: console, hostname, static network, and the
/// boot-time savings (no crypto self-tests, no kprobe tracer set-up).
fn cmdline(vm: &VmRecord, cidr: Option<(std::net::Ipv4Addr, u8)>) -> String {
    // BANGER_GUEST_DEBUG=1 keeps the kernel's boot messages in `vm logs`.
    let quiet = if std::env::var("BANGER_GUEST_DEBUG").is_ok_and(|v| v == "1") {
        ""
    } else {
        " quiet"
    };
    let mut c = format!(
        "console=ttyS0{quiet} panic=-1 cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace banger.hostname={}",
        vm.name
    );
    if let (Some(ip), Some((gw, _))) = (&vm.runtime.guest_ip, cidr) {
        c.push_str(&format!(" banger.ip={ip} banger.gw={gw}"));
    }
    c
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
