//! Stopping a VM: gracefully (the agent syncs and powers the guest off,
//! killed at a deadline) or abruptly (`kill`); and `restart`.
//!
//! The intent (`Stopping`) is recorded before anything is touched, so a
//! daemon killed mid-stop leaves a record that reconcile finishes. Every
//! wait on the guest is bounded, and `kill` cuts a graceful stop (or a
//! boot) short through the VM's interrupt token: it works at once whatever
//! the guest does.

use super::state::Lifecycle;
use super::{agent, VmService};
use banger_proto::methods::agent as a;
use banger_proto::methods::daemon::VmInfo;
use banger_proto::methods::Empty;
use banger_proto::{OpId, RpcError};
use banger_store::{VmRecord, VmState};
use banger_vmm::process;
use std::time::Duration;

/// How long a guest may take to power off before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// How long the guest may take to flush its disks before poweroff.
const SYNC_DEADLINE: Duration = Duration::from_secs(10);
/// How long the agent may take to accept the poweroff request.
const POWEROFF_DEADLINE: Duration = Duration::from_secs(5);

impl VmService {
    pub async fn stop(&self, op: &OpId, name: &str) -> Result<VmInfo, RpcError> {
        let (_g, vm) = self.locked(name).await?;
        let vm = self.stop_locked(op, vm, true).await?;
        Ok(self.info(&vm))
    }

    /// Abrupt stop. It first interrupts whatever holds the VM's lock and
    /// waits on the guest, so it never queues behind a wedged guest.
    pub async fn kill(&self, op: &OpId, name: &str) -> Result<VmInfo, RpcError> {
        let vm = self.get(name)?;
        self.interrupt(&vm.id);
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
    pub(super) async fn stop_locked(
        &self,
        op: &OpId,
        mut vm: VmRecord,
        graceful: bool,
    ) -> Result<VmRecord, RpcError> {
        if !vm.runtime.state.can_stop() {
            return Err(RpcError::bad_request(format!(
                "VM {} is {}; it cannot be stopped now",
                vm.name,
                vm.runtime.state.as_str()
            )));
        }
        let h = self.cached(&vm.id);
        let alive = self.is_alive(&vm);
        if alive || vm.runtime.state != VmState::Stopped {
            vm.runtime.state = VmState::Stopping;
            self.save(&vm)?;
        }
        if let (true, Some(h)) = (graceful && alive, h.as_ref()) {
            crate::ops::stage("poweroff");
            let interrupted = self.interrupt_token(&vm.id);
            let uds = &h.launched.vsock_uds;
            let graceful_part = async {
                match tokio::time::timeout(SYNC_DEADLINE, agent::call::<a::Sync>(uds, op, &Empty {}, |_| ()))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e.message, "sync before poweroff failed"),
                    Err(_) => tracing::warn!("sync before poweroff timed out"),
                }
                let asked = tokio::time::timeout(
                    POWEROFF_DEADLINE,
                    agent::call::<a::Poweroff>(uds, op, &Empty {}, |_| ()),
                )
                .await;
                match asked {
                    Ok(Ok(_)) => {
                        if !process::wait_gone(h.launched.pid, &vm.runtime.vm_dir, STOP_DEADLINE).await {
                            tracing::warn!(vm = %vm.name, "guest did not power off in time; killing it");
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e.message, "poweroff request failed; killing the VMM")
                    }
                    Err(_) => tracing::warn!("poweroff request timed out; killing the VMM"),
                }
            };
            tokio::select! {
                _ = graceful_part => {}
                _ = interrupted.cancelled() => {
                    tracing::warn!(vm = %vm.name, "graceful stop cut short by vm kill");
                }
            }
        }
        crate::ops::stage("teardown");
        self.teardown(&vm, h.as_ref()).await;
        vm.runtime.state = VmState::Stopped;
        self.save(&vm)?;
        tracing::info!(vm = %vm.name, graceful, "vm stopped");
        Ok(vm)
    }
}
