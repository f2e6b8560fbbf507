//! What is true *now* about a running VM: its processes and sockets.
//! Never in SQLite. Kept in memory and mirrored to `<vm_dir>/handles.json`
//! so a restarted daemon can adopt the VM; when the file is missing or
//! corrupt, the VM directory (durable) still finds its processes.

use banger_vmm::Launched;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandles {
    pub launched: Launched,
}

fn path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("handles.json")
}

pub fn write(vm_dir: &Path, h: &VmHandles) -> std::io::Result<()> {
    let tmp = vm_dir.join("handles.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(h).expect("serialisable"))?;
    std::fs::rename(tmp, path(vm_dir))
}

/// `None` when absent or unreadable: the caller falls back to the durable
/// teardown identity.
pub fn read(vm_dir: &Path) -> Option<VmHandles> {
    let bytes = std::fs::read(path(vm_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn remove(vm_dir: &Path) {
    let _ = std::fs::remove_file(path(vm_dir));
}
