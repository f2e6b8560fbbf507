//! Deleting VMs: one by name, or every VM that is not running.
//!
//! The intent (`Deleting`) is recorded first; then the VM is torn down and
//! its directory, row, lock and known_hosts entries go. Reconcile finishes
//! a deletion the daemon did not live to complete (`finish_delete`).

use super::state::Lifecycle;
use super::VmService;
use crate::image::store_err;
use crate::sync::Locked;
use crate::sys::io;
use banger_proto::{OpId, RpcError};
use banger_store::{VmRecord, VmState};
use std::path::Path;

impl VmService {
    pub async fn delete(&self, _op: &OpId, name: &str) -> Result<(), RpcError> {
        let (_g, mut vm) = self.locked(name).await?;
        if !vm.runtime.state.can_delete() {
            return Err(RpcError::bad_request(format!(
                "VM {} is still being created; cancel the creation instead",
                vm.name
            )));
        }
        vm.runtime.state = VmState::Deleting;
        self.save(&vm)?;
        self.finish_delete(&vm).await
    }

    /// The rest of a deletion whose intent is recorded: safe to repeat.
    pub(super) async fn finish_delete(&self, vm: &VmRecord) -> Result<(), RpcError> {
        crate::ops::stage("teardown");
        let h = self.cached(&vm.id);
        if !self.teardown(vm, h.as_ref()).await {
            // The row keeps the tap's name: dropping it now would leak the
            // tap for good. The watcher (or another delete) finishes.
            return Err(RpcError::failed(format!(
                "VM {} is stopped but its network could not be released (is the root helper running?); \
                 banger retries, and `banger vm delete {}` finishes the deletion",
                vm.name, vm.name
            )));
        }
        let dir = Path::new(&vm.runtime.vm_dir);
        // Only ever a directory banger made for this VM.
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
        self.locks.locked().remove(&vm.id);
        self.interrupts.locked().remove(&vm.id);
        let ip = vm.runtime.guest_ip.as_deref().and_then(|g| g.split('/').next());
        if let Err(e) = self.ssh.forget(&vm.name, ip) {
            tracing::warn!(vm = %vm.name, error = %e, "could not remove known_hosts entries");
        }
        tracing::info!(vm = %vm.name, "vm deleted");
        Ok(())
    }

    /// Deletes every VM that is not running (and not being created).
    pub async fn prune(&self, op: &OpId) -> Result<Vec<String>, RpcError> {
        let mut deleted = Vec::new();
        for vm in self.store.list_vms().map_err(store_err)? {
            if vm.runtime.state.prunable(self.is_alive(&vm)) {
                self.delete(op, &vm.name).await?;
                deleted.push(vm.name);
            }
        }
        Ok(deleted)
    }
}
