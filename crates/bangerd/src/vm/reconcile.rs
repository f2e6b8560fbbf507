//! Making the records true again: at daemon start (`reconcile`: adopt VMs
//! whose VMM still runs, finish or undo what a killed daemon left half
//! done) and while running (`reap_dead`: the watcher for a VMM that died
//! behind the daemon's back). What each recorded state calls for is decided
//! in `state::Lifecycle::recovery`.
//!
//! Every teardown says in the log what it removed and why.

use super::handles;
use super::state::{Lifecycle, Recovery};
use super::VmService;
use crate::sync::Locked;
use banger_proto::{opid, OpId};
use banger_store::{VmRecord, VmState};
use banger_vmm::process;
use std::path::PathBuf;

impl VmService {
    /// Finds VMs whose VMM died while the daemon was running and cleans
    /// them up, each under an op id of its own. VMs busy in another
    /// lifecycle operation are left to it.
    pub async fn reap_dead(&self) {
        self.cap_console_logs();
        self.retry_unclean().await;
        let ids: Vec<String> = self.handles.locked().keys().cloned().collect();
        for id in ids {
            let lock = self.lock_for(&id);
            let Ok(_g) = lock.try_lock() else { continue };
            let Ok(Some(vm)) = self.store.get_vm(&id) else {
                continue;
            };
            if self.is_alive(&vm) {
                continue;
            }
            opid::run_as(OpId::mint(), "vm.reap", async {
                tracing::warn!(vm = %vm.name, "the VMM exited; cleaning up");
                self.clean_up(vm, "the VMM exited unexpectedly").await;
            })
            .await;
        }
    }

    /// Tears a VM down and records it stopped with `why`.
    async fn clean_up(&self, mut vm: VmRecord, why: &str) {
        let h = self
            .cached(&vm.id)
            .or_else(|| handles::read(&PathBuf::from(&vm.runtime.vm_dir)));
        self.teardown(&vm, h.as_ref()).await;
        vm.runtime.state = VmState::Stopped;
        vm.runtime.last_error = Some(why.to_string());
        if let Err(e) = self.save(&vm) {
            tracing::error!(vm = %vm.name, error = %e.message, "could not record the VM as stopped");
        }
    }

    /// At daemon start, before serving: adopt VMs whose VMM still runs;
    /// finish or undo every operation a killed daemon left half done; make
    /// sure nothing (process, tap, NAT rule) is left for a stopped VM.
    /// Runs under the caller's op id (one for the whole reconcile).
    pub async fn reconcile(&self) {
        tracing::info!("reconcile started");
        self.sweep_snapshots();
        let vms = match self.store.list_vms() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reconcile: cannot list VMs");
                return;
            }
        };
        let (mut adopted, mut cleaned) = (0, 0);
        for mut vm in vms {
            let dir = PathBuf::from(&vm.runtime.vm_dir);
            match vm.runtime.state.recovery() {
                Recovery::Discard => {
                    tracing::warn!(vm = %vm.name, "reconcile: removing a VM whose creation was interrupted");
                    self.teardown(&vm, handles::read(&dir).as_ref()).await;
                    self.discard(&vm).await;
                    cleaned += 1;
                }
                Recovery::AdoptOrCleanUp => match handles::read(&dir) {
                    Some(h) if process::alive(h.launched.pid, &vm.runtime.vm_dir) => {
                        tracing::info!(vm = %vm.name, pid = h.launched.pid, "reconcile: adopted running VM");
                        // A daemon killed while it claimed a paused pool VM,
                        // or while it snapshotted a VM, left it paused: a VM
                        // that is nobody's pool VM runs its vCPUs (resuming
                        // a running one is a no-op).
                        let kind = banger_vmm::VmmKind::parse(&vm.spec.vmm);
                        if let (Some(kind), false) = (kind, vm.runtime.pooled) {
                            if let Err(e) =
                                banger_vmm::pause::set_paused(kind, &h.launched.api_socket, false).await
                            {
                                tracing::warn!(vm = %vm.name, error = %e, "reconcile: could not make sure the VM runs");
                            }
                        }
                        self.handles.locked().insert(vm.id.clone(), h);
                        // Its rules are normally still there (nothing to
                        // do); a guest started by an older banger, or whose
                        // rules were flushed, is confined again.
                        if let Some(g) = super::alloc::guest_net(&vm) {
                            if let Err(e) = self.network.guest_allow(&super::current_op(), &g).await {
                                tracing::warn!(vm = %vm.name, error = %e, "reconcile: could not install the guest's rules");
                            }
                        }
                        adopted += 1;
                    }
                    h => {
                        tracing::warn!(vm = %vm.name, scratch = h.is_some(), "reconcile: VMM is gone; cleaning up");
                        self.clean_up(vm, "the VMM exited while banger was not watching")
                            .await;
                        cleaned += 1;
                    }
                },
                Recovery::TearDown => {
                    let what = if vm.runtime.state == VmState::Starting {
                        "start"
                    } else {
                        "stop"
                    };
                    tracing::warn!(vm = %vm.name, "reconcile: a {what} was interrupted by a daemon restart; tearing the VM down");
                    self.clean_up(vm, &format!("a {what} was interrupted by a daemon restart"))
                        .await;
                    cleaned += 1;
                }
                Recovery::FinishDelete => {
                    tracing::warn!(vm = %vm.name, "reconcile: finishing an interrupted delete");
                    if let Err(e) = self.finish_delete(&vm).await {
                        tracing::error!(vm = %vm.name, error = %e.message, "reconcile: could not finish the delete");
                    }
                    cleaned += 1;
                }
                Recovery::EnsureNothingRuns => {
                    // Nothing may run for a stopped VM, and its tap (taps are
                    // named by VM, so this never touches another daemon's)
                    // must not outlive a crash. A VM with a tap is torn down
                    // anyway, so the /proc scan is only for those without.
                    if vm.runtime.tap.is_some() || !process::find_by_marker(&vm.runtime.vm_dir).is_empty() {
                        self.teardown(&vm, None).await;
                    }
                    if vm.runtime.state == VmState::Failed {
                        vm.runtime.state = VmState::Stopped;
                        let _ = self.save(&vm);
                    }
                }
            }
        }
        self.sweep_guest_rules().await;
        self.sweep_vm_dirs().await;
        tracing::info!(adopted, cleaned, "reconcile finished");
    }

    /// Removes VM directories that no record names: a creation whose
    /// record never reached the disk (a power loss before its end; see
    /// `Store::insert_vm_intent`). A record is written before its
    /// directory, so one looked up after the directory was seen is there
    /// if the VM is; a directory a process still names is left alone,
    /// unless it is a spare's (see `spare`), whose process goes with it.
    async fn sweep_vm_dirs(&self) {
        for e in std::fs::read_dir(&self.settings.vms_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = e.path();
            let id = e.file_name().to_string_lossy().into_owned();
            if !dir.is_dir() || !matches!(self.store.get_vm(&id), Ok(None)) {
                continue;
            }
            if super::spare::is_spare_dir(&dir) {
                tracing::info!(dir = %dir.display(), "removing the spare Firecracker of the last daemon");
                super::spare::remove_spare_dir(dir).await;
                continue;
            }
            if !process::find_by_marker(&dir.display().to_string()).is_empty() {
                tracing::warn!(dir = %dir.display(), "a directory without a VM record is still in use; left alone");
                continue;
            }
            tracing::warn!(dir = %dir.display(), "removing the directory of a VM without a record");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
