//! Teardown: the one way a VM's host resources go away (every process
//! naming its directory, its sockets, `handles.json`, its tap and its
//! rules), and the sweep of guest rules leaked by a crash.
//!
//! Shared by failed starts, stop, delete, reconcile and the watcher, so
//! cleanup is written once and is safe to repeat.

use super::handles::{self, VmHandles};
use super::{current_op, VmService};
use crate::sync::Locked;
use banger_store::VmRecord;
use banger_vmm::process;
use std::path::Path;
use std::time::Duration;

impl VmService {
    /// Kills every process of the VM and removes its runtime files. Uses
    /// the handles when known, and the VM directory marker regardless, so
    /// a lost scratch file cannot leak a process.
    /// Returns false when the network part failed (retried later).
    pub(super) async fn teardown(&self, vm: &VmRecord, h: Option<&VmHandles>) -> bool {
        let marker = vm.runtime.vm_dir.clone();
        if marker.is_empty() {
            return true;
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
        for pid in &pids {
            process::terminate(*pid, &marker, Duration::from_secs(2)).await;
        }
        let dir = Path::new(&marker);
        for f in [
            "qmp.sock",
            "vsock.sock",
            "agent.serial",
            "incoming.sock",
            "firecracker.sock",
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        banger_vmm::vsock::remove_port_sockets(dir);
        // What a jailed Firecracker leaves: its jail and its cgroup.
        banger_vmm::jailer::cleanup(dir).await;
        handles::remove(dir);
        self.handles.locked().remove(&vm.id);
        // Host network resources: the tap, and the guest's rules (looked up
        // by tag, so a crash between adding and recording them cannot leak
        // one).
        // A failure is remembered and retried by the watcher: a helper
        // that died mid-call must not leak a tap for good.
        let mut network_clean = true;
        if let Some(tap) = &vm.runtime.tap {
            let op = current_op();
            // Every VM with a tap has rules (anti-spoofing at least), NAT
            // or not.
            if let Err(e) = self.network.guest_revoke(&op, &vm.id).await {
                tracing::warn!(vm = %vm.name, error = %e, "could not remove the guest's rules; will retry");
                network_clean = false;
            }
            // A VM whose VMM ran in a namespace of its own: the veth pair
            // and the namespace go first (the tap goes with them), or the
            // veth named like the tap would be refused as not a tap.
            let jailable = banger_vmm::VmmKind::parse(&vm.spec.vmm) == Some(banger_vmm::VmmKind::Firecracker);
            if let Some(ns) = &vm.spec.netns {
                // The tap is in the engine's namespace, not on the host.
                if let Err(e) = self.network.detach_pod(&op, ns, tap).await {
                    tracing::warn!(vm = %vm.name, tap = %tap, netns = %ns, error = %e, "could not remove the VM's link from the engine's namespace; will retry");
                    network_clean = false;
                }
            } else if jailable {
                if let Err(e) = self.network.detach_jailed(&op, &vm.id, tap).await {
                    tracing::warn!(vm = %vm.name, tap = %tap, error = %e, "could not remove the VM's network namespace; will retry");
                    network_clean = false;
                }
            }
            if vm.spec.netns.is_none() {
                if let Err(e) = self.network.detach(&op, tap).await {
                    tracing::warn!(vm = %vm.name, tap = %tap, error = %e, "could not delete the tap; will retry");
                    network_clean = false;
                }
            }
        }
        let mut unclean = self.unclean.locked();
        if network_clean {
            unclean.remove(&vm.id);
        } else {
            unclean.insert(vm.id.clone());
        }
        tracing::info!(
            vm = %vm.name,
            pids = ?pids,
            tap = vm.runtime.tap.as_deref().unwrap_or(""),
            nat = vm.spec.nat,
            network_clean,
            "teardown: processes signalled, sockets removed, network released"
        );
        network_clean
    }

    /// Retries the network teardown of VMs whose last one failed (the
    /// watcher calls this), each under an op id of its own.
    pub(super) async fn retry_unclean(&self) {
        let ids: Vec<String> = self.unclean.locked().iter().cloned().collect();
        for id in ids {
            let lock = self.lock_for(&id);
            let Ok(_g) = lock.try_lock() else { continue };
            match self.store.get_vm(&id) {
                Ok(Some(vm)) if !self.is_alive(&vm) => {
                    banger_proto::opid::run_as(banger_proto::OpId::mint(), "vm.teardown.retry", async {
                        if vm.runtime.state == banger_store::VmState::Deleting {
                            let _ = self.finish_delete(&vm).await;
                        } else {
                            self.teardown(&vm, None).await;
                        }
                    })
                    .await
                }
                Ok(Some(_)) => {}
                // Deleted since: its tap name is still known only here.
                _ => {
                    self.unclean.locked().remove(&id);
                }
            }
        }
    }

    /// Removes the rules of VMs that are not running (left by a crash).
    pub async fn sweep_guest_rules(&self) {
        let op = current_op();
        let tags = match self.network.guest_list(&op).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "sweep of guest rules skipped");
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
                tracing::warn!(vm = %tag, "removing leaked guest rules");
                let _ = self.network.guest_revoke(&op, &tag).await;
            }
        }
    }
}
