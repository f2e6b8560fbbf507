//! Stopping a VM: gracefully (the agent syncs and powers the guest off,
//! killed at a deadline) or abruptly (`kill`); and `restart`.
//!
//! `stop_locked` is also the first half of `delete`, so a VM is always
//! torn down the same way before its files go.

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

impl VmService {
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
    pub(super) async fn stop_locked(
        &self,
        op: &OpId,
        mut vm: VmRecord,
        graceful: bool,
    ) -> Result<VmRecord, RpcError> {
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
}
