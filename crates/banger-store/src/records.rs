//! The durable records. Spec = what the user asked for; runtime = what the
//! daemon must remember across crashes to manage and clean up the VM.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    #[default]
    Creating,
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
    /// Being deleted: reconcile finishes the deletion.
    Deleting,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Failed => "failed",
            VmState::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub work_disk_bytes: u64,
    /// The VMM back-end, resolved at create time ("qemu" or "firecracker").
    pub vmm: String,
    #[serde(default)]
    pub nat: bool,
    /// May exchange traffic with other VMs that have `peers` too; guests
    /// are isolated from each other otherwise.
    #[serde(default)]
    pub peers: bool,
    /// A tap on banger's bridge, a static address, and `<name>.vm` in DNS.
    #[serde(default = "yes")]
    pub network: bool,
    /// Stop after this long idle; `None`: the daemon's setting, `Some(0)`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop_idle_secs: Option<u64>,
    /// A container engine's network namespace (CNI set it up): the VM's
    /// tap is made there, joined to the engine's interface, and the guest
    /// wears that interface's address and MAC instead of a lease on
    /// banger's bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

fn yes() -> bool {
    true
}

/// What the daemon must remember about a VM across its own crashes. Enough
/// to find and tear down every host resource if nothing else survives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    pub state: VmState,
    #[serde(default)]
    pub vm_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// The guest's gateway and MAC when they are not banger's own (a VM
    /// in an engine's namespace wears what the engine gave it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_gw: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub vsock_cid: u32,
    #[serde(default)]
    pub api_socket: String,
    #[serde(default)]
    pub vsock_uds: String,
    #[serde(default)]
    pub log_path: String,
    #[serde(default)]
    pub metrics_path: String,
    #[serde(default)]
    pub overlay_path: String,
    #[serde(default)]
    pub work_disk_path: String,
    /// Name of the tap the VM uses; recorded so a crash cannot leak it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Guest directory of the prepared workspace; `vm exec` runs there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// The image file this VM was made from, pinned at create: its overlay
    /// disk only makes sense over that base, so a rebuilt image never
    /// changes it. Absent for VMs made before pinning (the image's current
    /// file is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_rootfs: Option<String>,
    /// A warm-pool VM: booted ahead of demand and not yet claimed. It is
    /// shown as `pooled` and given away whole to a matching create.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
    /// The snapshot directory this VM's next start loads instead of
    /// booting (a restore's first start); cleared once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub spec: VmSpec,
    pub runtime: VmRuntime,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub rootfs: String,
    pub kernel: String,
    pub initrd: Option<String>,
    pub size_bytes: u64,
    pub source: String,
    pub created_at: String,
    /// `sha256:...`: the manifest digest of an imported image, the rootfs
    /// file's hash for one banger built; none for a registered image.
    pub digest: Option<String>,
}

/// A guest session as the daemon catalogs it. `state` is `starting` (the
/// agent was asked, no answer recorded yet), `running`, `exited` (with
/// `code` or `signal`) or `lost` (its process is gone and how it ended is
/// not known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub vm_id: String,
    pub name: String,
    pub argv: Vec<String>,
    pub tty: bool,
    pub state: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The guest boot it runs in, once the agent said.
    pub boot_id: Option<String>,
    /// The op id of the call that started it.
    pub op_id: String,
    pub created_at: String,
}

/// A saved VM to restore new VMs from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    /// The VM it was taken of (by name, at the time).
    pub source_vm: String,
    pub vmm: String,
    /// The spec a restored VM gets (its size and devices must match).
    pub spec: VmSpec,
    /// The image file the disks' overlay sits on.
    pub base_rootfs: String,
    /// Where its files are: `state`, `memory`, `overlay.ext4`, `work.ext4`.
    pub dir: String,
    pub size_bytes: u64,
    pub op_id: String,
    pub created_at: String,
    /// The last restore from it (its creation until then); the disk budget
    /// evicts the least recently used first.
    pub last_used_at: String,
}
