//! Calls into a running guest through its agent: ssh set-up after boot,
//! shell snippets for other operations, and the check
//! that a VM is running before any of them.

use super::handles::VmHandles;
use super::{agent, VmService};
use crate::sync::Locked;
use banger_proto::methods::agent as a;
use banger_proto::{OpId, RpcError};
use banger_store::VmRecord;
use std::path::Path;
use std::sync::{Arc, Mutex};

impl VmService {
    /// Gives a guest that just came up the host's time and 64 bytes of the
    /// host's entropy, and names it `hostname` when given (a claimed pool
    /// VM, a restored one). A guest that cannot take them still runs (its
    /// clock is the VMM's RTC), so that failure is logged, not returned;
    /// one that cannot take its network identity `net` (a restored one)
    /// would answer as another VM, so that failure is returned.
    pub(super) async fn seed_as(
        &self,
        vm: &VmRecord,
        uds: &Path,
        connected: Option<tokio::net::UnixStream>,
        op: &OpId,
        hostname: Option<&str>,
        net: Option<a::SeedNet>,
    ) -> Result<(), RpcError> {
        let req = a::Seed::from_host(hostname.map(String::from), net.clone());
        let answer = match connected {
            Some(s) => agent::call_on::<a::SeedGuest>(s, uds, op, &req, |_| ()).await,
            None => agent::call::<a::SeedGuest>(uds, op, &req, |_| ()).await,
        };
        seeded(vm, answer.map_err(|e| e.message), net.as_ref(), "stream")
    }

    /// The seed plan a restored QEMU guest gets in its channel's
    /// handshake (see `banger_vmm::Restore::seed`), written into its
    /// directory: its name and network identity; the bridge adds the clock
    /// and entropy as it sends it.
    pub(super) fn write_seed_plan(
        &self,
        vm: &VmRecord,
        op: &OpId,
        hostname: Option<&str>,
        net: Option<a::SeedNet>,
    ) -> Result<std::path::PathBuf, RpcError> {
        let plan = a::SeedPlan {
            op_id: Some(op.to_string()),
            hostname: hostname.map(String::from),
            net,
        };
        let path = Path::new(&vm.runtime.vm_dir).join("seed.json");
        std::fs::write(&path, serde_json::to_vec(&plan).expect("serialisable"))
            .map_err(|e| RpcError::failed(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    }

    /// The guest's answer to the seed given in its handshake, once its
    /// channel is up: `None` when there is none (an agent that knows no
    /// seeds), and the seed is then given over a stream instead.
    pub(super) fn handshake_seeded(
        &self,
        vm: &VmRecord,
        net: Option<&a::SeedNet>,
    ) -> Option<Result<(), RpcError>> {
        let path = Path::new(&vm.runtime.vm_dir).join("seeded.json");
        let bytes = std::fs::read(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        // The guest wrote this: it is read as an answer or as nothing.
        let answer = (bytes.len() <= 4096)
            .then(|| serde_json::from_slice::<a::SeedAnswer>(&bytes).ok())
            .flatten()?;
        let outcome = match answer {
            a::SeedAnswer::Seeded(s) => Ok(s),
            a::SeedAnswer::Failed(e) => Err(e),
        };
        Some(seeded(vm, outcome, net, "handshake"))
    }

    /// The MAC, address and gateway a VM's guest must wear, when it has a
    /// network.
    pub(super) fn seed_net(&self, vm: &VmRecord) -> Option<a::SeedNet> {
        let address = vm.runtime.guest_ip.clone()?;
        let gateway = match &vm.runtime.guest_gw {
            Some(g) => g.clone(),
            None => self.network.cidr().ok()?.0.to_string(),
        };
        Some(a::SeedNet {
            mac: vm
                .runtime
                .guest_mac
                .clone()
                .unwrap_or_else(|| super::alloc::mac_for(&vm.id)),
            address,
            gateway,
        })
    }

    /// Authorises banger's key in the guest and pins the guest's host key;
    /// with `new_host_keys` (a guest restored from a snapshot, which holds
    /// the source's keys) the guest's host keys are made anew first.
    pub(super) async fn ssh_setup(
        &self,
        vm: &VmRecord,
        uds: &Path,
        op: &OpId,
        new_host_keys: bool,
    ) -> Result<(), RpcError> {
        // One exec (each is a round trip, slow in a guest just resumed).
        // A restored guest holds its source's host keys: it gets a new
        // Ed25519 pair made here (sshd reads its keys for each connection,
        // so no restart), and the pin is that key. Otherwise the guest's
        // own key is read back and pinned.
        let public = self.ssh.public_key().await?;
        let (script, stdin) = if new_host_keys {
            let (private, host_public) = self.ssh.new_host_key().await?;
            (
                "set -e; umask 077; mkdir -p /root/.ssh; IFS= read -r auth; IFS= read -r hostpub; \
                 printf '%s\\n' \"$auth\" > /root/.ssh/authorized_keys; \
                 if [ -d /etc/ssh ]; then rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub; \
                 cat > /etc/ssh/ssh_host_ed25519_key; \
                 printf '%s\\n' \"$hostpub\" > /etc/ssh/ssh_host_ed25519_key.pub; fi; \
                 printf '%s\\n' \"$hostpub\""
                    .to_string(),
                format!("{public}\n{host_public}\n{private}"),
            )
        } else {
            (
                "set -e; umask 077; mkdir -p /root/.ssh; cat > /root/.ssh/authorized_keys; \
                 cat /etc/ssh/ssh_host_ed25519_key.pub"
                    .to_string(),
                format!("{public}\n"),
            )
        };
        let host_key = self
            .guest_sh_with(uds, op, script, Some(stdin.into_bytes()))
            .await?;
        let host_key = String::from_utf8_lossy(&host_key);
        let mut parts = host_key.split_whitespace();
        let (Some(kind), Some(key)) = (parts.next(), parts.next()) else {
            return Err(RpcError::failed("the guest has no ed25519 host key"));
        };
        let ip = vm.runtime.guest_ip.as_deref().and_then(|g| g.split('/').next());
        self.ssh.pin(&vm.name, ip, &format!("{kind} {key}"))?;
        Ok(())
    }

    /// Runs a shell snippet in the guest and fails with its stderr.
    pub(super) async fn guest_sh(&self, uds: &Path, op: &OpId, script: String) -> Result<Vec<u8>, RpcError> {
        self.guest_sh_with(uds, op, script, None).await
    }

    /// [`Self::guest_sh`] with `stdin` for the snippet.
    async fn guest_sh_with(
        &self,
        uds: &Path,
        op: &OpId,
        script: String,
        stdin: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, RpcError> {
        use base64::Engine;
        let out = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let sink = out.clone();
        let req = a::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script],
            stdin_b64: stdin.map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            ..Default::default()
        };
        let st = agent::call::<a::Exec>(uds, op, &req, move |ev| {
            if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(&ev.data_b64) {
                let mut o = sink.locked();
                match ev.stream {
                    a::StreamName::Stdout => o.0.extend(b),
                    a::StreamName::Stderr => o.1.extend(b),
                }
            }
        })
        .await?;
        let (stdout, stderr) = std::mem::take(&mut *out.locked());
        if st.shell_code() != 0 {
            return Err(RpcError::failed(format!(
                "guest command failed ({}): {}",
                st.shell_code(),
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        Ok(stdout)
    }

    /// A VM's record, for other services (sessions).
    pub fn record(&self, name: &str) -> Result<VmRecord, RpcError> {
        self.get(name)
    }

    /// The socket of a running VM's agent; `None` when it is not running.
    pub fn agent_socket(&self, vm: &VmRecord) -> Option<std::path::PathBuf> {
        self.running_handles(vm).ok().map(|h| h.launched.vsock_uds)
    }

    pub(super) fn running_handles(&self, vm: &VmRecord) -> Result<VmHandles, RpcError> {
        match self.cached(&vm.id) {
            Some(h) if self.is_alive(vm) => Ok(h),
            _ => Err(RpcError::not_running(format!(
                "VM {} is not running (start it with `banger vm start {}`)",
                vm.name, vm.name
            ))),
        }
    }
}

/// What a seed's outcome means for the start: a guest that cannot take its
/// network identity would answer as another VM (an error); one that
/// cannot take its clock or entropy still runs (a warning). `via`: how it
/// was given, a stream of its own or the channel's handshake.
fn seeded(
    vm: &VmRecord,
    outcome: Result<a::Seeded, String>,
    net: Option<&a::SeedNet>,
    via: &str,
) -> Result<(), RpcError> {
    match outcome {
        Ok(s) => {
            tracing::info!(
                vm = %vm.name,
                clock_step_ms = s.clock_step_ms,
                entropy_bytes = s.entropy_bytes,
                address = net.map(|n| n.address.as_str()),
                via,
                "guest clock and entropy seeded"
            );
            Ok(())
        }
        Err(e) if net.is_some() => Err(RpcError::failed(format!(
            "could not give the guest its network identity: {e}"
        ))),
        Err(e) => {
            tracing::warn!(vm = %vm.name, error = %e, via, "could not seed the guest's clock and entropy");
            Ok(())
        }
    }
}
