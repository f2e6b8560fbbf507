//! Deleting VMs: one by name (stopped first, then its directory, row,
//! lock and known_hosts entries go), or every VM that is not running.

use super::state::Lifecycle;
use super::VmService;
use crate::image::store_err;
use crate::sys::io;
use banger_proto::{OpId, RpcError};
use std::path::Path;

impl VmService {
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
