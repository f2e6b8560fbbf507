//! `vm set`: new resources for a stopped VM. vCPUs and memory are only
//! spec; the work disk grows in place (a larger file, then the filesystem
//! grown offline), and never shrinks.

use super::{spec, VmService};
use crate::error::store_err;
use banger_proto::methods::daemon::{VmInfo, VmSet};
use banger_proto::RpcError;
use banger_store::VmState;
use std::path::Path;

impl VmService {
    pub async fn set(&self, p: VmSet) -> Result<VmInfo, RpcError> {
        let (_g, mut vm) = self.locked(&p.name).await?;
        let stopped = matches!(vm.runtime.state, VmState::Stopped | VmState::Failed);
        if !stopped || self.is_alive(&vm) {
            return Err(RpcError::bad_request(format!(
                "{} is {}: stop it first (banger vm stop {})",
                vm.name,
                vm.runtime.state.as_str(),
                vm.name
            )));
        }
        if vm.runtime.restore_from.is_some() {
            // Its disks and machine are the snapshot's until it first runs.
            return Err(RpcError::bad_request(format!(
                "{} has not yet been started from its snapshot: start it first (banger vm start {})",
                vm.name, vm.name
            )));
        }
        let new = spec::resized(&vm.spec, &p)?;
        if new.work_disk_bytes > vm.spec.work_disk_bytes {
            grow(Path::new(&vm.runtime.work_disk_path), new.work_disk_bytes).await?;
        }
        // The spec last: a crash before it leaves the old spec over a disk
        // that is larger or not yet grown, which starts as before and is
        // grown by the next `vm set`.
        self.store.update_vm_spec(&vm.id, &new).map_err(store_err)?;
        tracing::info!(vm = %vm.name, vcpus = new.vcpus, memory_mib = new.memory_mib,
            work_disk_mib = new.work_disk_bytes >> 20, "vm resources set");
        vm.spec = new;
        Ok(self.info(&vm))
    }
}

/// The work disk's file to `bytes`, then its ext4 grown to fill it.
async fn grow(disk: &Path, bytes: u64) -> Result<(), RpcError> {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| RpcError::failed(format!("{what} {}: {e}", disk.display()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(|e| failed("opening", &e))?;
    f.set_len(bytes).map_err(|e| failed("growing", &e))?;
    f.sync_all().map_err(|e| failed("syncing", &e))?;
    drop(f);
    // resize2fs wants a freshly checked filesystem; e2fsck's exit status 1
    // means it fixed something, which is fine here.
    let fsck = tokio::process::Command::new("e2fsck")
        .arg("-fy")
        .arg(disk)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| failed("checking", &e))?;
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(failed(
            "checking",
            &String::from_utf8_lossy(&fsck.stdout)
                .lines()
                .last()
                .unwrap_or("e2fsck failed"),
        ));
    }
    crate::sys::run("resize2fs", [disk.as_os_str()], None).await?;
    Ok(())
}
