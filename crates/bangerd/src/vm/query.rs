//! Read-only views of VMs: info, list, show, serial logs, and the address
//! behind `<name>.vm` for the DNS server. Nothing here takes a lock or
//! changes a record.

use super::console::tail;
use super::state::Lifecycle;
use super::{alloc, VmService};
use crate::image::store_err;
use banger_proto::methods::daemon::VmInfo;
use banger_proto::RpcError;
use banger_store::VmRecord;
use std::path::{Path, PathBuf};

impl VmService {
    pub fn info(&self, vm: &VmRecord) -> VmInfo {
        let pid = self
            .cached(&vm.id)
            .map(|h| h.launched.pid)
            .filter(|_| self.is_alive(vm));
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: if vm.runtime.pooled && vm.runtime.state == banger_store::VmState::Running {
                "pooled".to_string()
            } else {
                vm.runtime.state.as_str().to_string()
            },
            image: vm.spec.image.clone(),
            vmm: vm.spec.vmm.clone(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            work_disk_bytes: vm.spec.work_disk_bytes,
            pid,
            vsock_cid: vm.runtime.vsock_cid,
            vm_dir: vm.runtime.vm_dir.clone(),
            guest_ip: vm.runtime.guest_ip.clone(),
            last_error: vm.runtime.last_error.clone(),
            created_at: vm.created_at.clone(),
            disk_bytes: crate::sys::used_bytes(std::path::Path::new(&vm.runtime.vm_dir)),
        }
    }

    pub fn list(&self) -> Result<Vec<VmInfo>, RpcError> {
        Ok(self
            .store
            .list_vms()
            .map_err(store_err)?
            .iter()
            .map(|v| self.info(v))
            .collect())
    }

    pub fn show(&self, name: &str) -> Result<VmInfo, RpcError> {
        Ok(self.info(&self.get(name)?))
    }

    pub fn logs(&self, name: &str, tail_bytes: Option<u64>) -> Result<(String, String), RpcError> {
        let vm = self.get(name)?;
        let path = if vm.runtime.log_path.is_empty() {
            Path::new(&vm.runtime.vm_dir).join("serial.log")
        } else {
            PathBuf::from(&vm.runtime.log_path)
        };
        let text = tail(&path, tail_bytes.unwrap_or(64 * 1024) as usize);
        Ok((text, path.display().to_string()))
    }

    /// The running VM named `name` and its address, for DNS.
    pub fn resolve(&self, name: &str) -> Option<std::net::Ipv4Addr> {
        let vm = self.store.get_vm(name).ok()??;
        if vm.name != name || !vm.runtime.state.serves_dns() {
            return None;
        }
        alloc::address_of(vm.runtime.guest_ip.as_deref()?)
    }
}
