//! Teardown: the one way a VM's host resources go away (every process
//! naming its directory, its sockets, `handles.json`, its tap and NAT
//! rules), and the sweep of NAT rules leaked by a crash.
//!
//! Shared by failed starts, stop, delete, reconcile and the watcher, so
//! cleanup is written once and is safe to repeat.

use super::handles::{self, VmHandles};
use super::{current_op, VmService};
use banger_store::VmRecord;
use banger_vmm::process;
use std::path::Path;
use std::time::Duration;

impl VmService {
    /// Kills every process of the VM and removes its runtime files. Uses
    /// the handles when known, and the VM directory marker regardless, so
    /// a lost scratch file cannot leak a process.
    pub(super) async fn teardown(&self, vm: &VmRecord, h: Option<&VmHandles>) {
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
}
