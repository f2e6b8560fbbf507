//! Making the records true again: at daemon start (`reconcile`: adopt VMs
//! whose VMM still runs, tear down the rest, discard interrupted creations)
//! and while running (`reap_dead`: the watcher for a VMM that died behind
//! the daemon's back). What each recorded state calls for is decided in
//! `state::Lifecycle::recovery`.

use super::handles;
use super::state::{Lifecycle, Recovery};
use super::VmService;
use banger_store::VmState;
use banger_vmm::process;
use std::path::PathBuf;

impl VmService {
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
            match vm.runtime.state.recovery() {
                Recovery::Discard => {
                    tracing::warn!(vm = %vm.name, "reconcile: removing a VM whose creation was interrupted");
                    self.teardown(&vm, None).await;
                    self.discard(&vm);
                }
                Recovery::AdoptOrCleanUp => {
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
                Recovery::EnsureNothingRuns => {
                    // Nothing may run for a stopped VM.
                    if !process::find_by_marker(&vm.runtime.vm_dir).is_empty() {
                        self.teardown(&vm, None).await;
                    }
                }
            }
        }
    }
}
