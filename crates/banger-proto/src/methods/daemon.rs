//! The daemon's RPC surface, as used by the CLI.

use super::{method, Empty};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub socket: String,
    pub state_dir: String,
    /// Where the DNS server for `<name>.vm` listens, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
}

/// An asynchronous operation; its id is the op id of the call that began it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperationInfo {
    pub op_id: String,
    pub kind: String,
    pub subject: String,
    pub stage: String,
    pub done: bool,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::RpcError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub bridge: String,
    pub helper_version: String,
    pub bridge_created: bool,
}

method!(
    /// Liveness of the daemon.
    Ping = "ping", Empty => DaemonInfo
);
method!(
    /// Asks the daemon to exit after answering. Running VMs keep running.
    Shutdown = "shutdown", Empty => Empty
);
method!(
    /// Lists asynchronous operations, finished ones included.
    OperationsList = "daemon.operations.list", Empty => Vec<OperationInfo>
);
method!(
    /// Checks the helper and makes sure banger's bridge exists.
    NetworkEnsure = "network.ensure", Empty => NetworkStatus
);

// ---- VMs ----

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmCreate {
    /// Empty: the daemon generates one.
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_disk_mib: Option<u64>,
    /// Start the VM once created.
    #[serde(default)]
    pub start: bool,
    /// Outbound network access through NAT.
    #[serde(default)]
    pub nat: bool,
    /// Traffic with other VMs created with `peers` (off: guests cannot
    /// reach each other).
    #[serde(default)]
    pub peers: bool,
    /// No tap, no address: the guest is reachable over vsock only.
    #[serde(default)]
    pub no_network: bool,
    /// A container engine's network namespace (under /run/netns, set up
    /// by CNI): the VM's link lives there and the guest takes the
    /// engine's address, gateway and MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Stop the VM after this long idle (seconds); 0: never; none: the
    /// daemon's `auto_stop_idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop_idle_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmCreateBegun {
    pub op_id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpRef {
    pub op_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageInfo {
    pub name: String,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmCreateStatus {
    pub op: OperationInfo,
    pub stages: Vec<StageInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRef {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: String,
    pub image: String,
    pub vmm: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub work_disk_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub vsock_cid: u32,
    pub vm_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: String,
    /// What the VM's files (disks, logs) really use on disk, in bytes.
    #[serde(default)]
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmExec {
    pub name: String,
    pub exec: crate::methods::agent::ExecRequest,
    /// The client sends the command's stdin after the request, as
    /// [`crate::stream`] frames (`Stdin`, an empty one at its end; with
    /// `tty`, `Resize` too): stdin of any size, paced by the command.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream_input: bool,
    /// A terminal of this size for the command instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::stream::WinSize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmLogsParams {
    pub name: String,
    /// Only the last `tail_bytes` of the serial log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmLogs {
    pub serial: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: Vec<String>,
}

method!(
    /// Begins creating a VM; the op id of this call is the operation's id.
    VmCreateBegin = "vm.create.begin", VmCreate => VmCreateBegun
);
/// `vm set`: new resources for a stopped VM; what is left out stays.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSet {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// The work disk grows in place; it never shrinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_disk_mib: Option<u64>,
}

method!(VmSetM = "vm.set", VmSet => VmInfo);
method!(VmCreateStatusM = "vm.create.status", OpRef => VmCreateStatus);
method!(VmCreateCancel = "vm.create.cancel", OpRef => Empty);
method!(VmStart = "vm.start", VmRef => VmInfo);
method!(VmStop = "vm.stop", VmRef => VmInfo);
method!(VmRestart = "vm.restart", VmRef => VmInfo);
method!(VmKill = "vm.kill", VmRef => VmInfo);
method!(VmDelete = "vm.delete", VmRef => Empty);
method!(VmPrune = "vm.prune", Empty => Pruned);
method!(VmList = "vm.list", Empty => Vec<VmInfo>);
method!(VmShow = "vm.show", VmRef => VmInfo);
method!(VmLogsM = "vm.logs", VmLogsParams => VmLogs);
method!(
    /// Runs a command in the VM through its agent, streaming output.
    VmExecM = "vm.exec", VmExec => crate::methods::agent::ExitStatus, event crate::methods::agent::ExecOutput
);

/// A listening socket of a VM, as the daemon checked it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortInfo {
    pub proto: crate::methods::agent::SocketProto,
    /// The local address the socket is bound to in the guest.
    pub bind: String,
    pub port: u16,
    /// Bound to every address or to the guest's own: reachable from the host.
    pub reachable: bool,
    /// `NAME.vm:PORT`, when the VM has a network and the port is reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The owner's command name as the guest reports it (guest text: escape
    /// it before printing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Whether the port answered `HEAD /` with an HTTP reply; absent when
    /// not checked (UDP, not reachable, no network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmPorts {
    pub name: String,
    pub ports: Vec<PortInfo>,
    /// Whether reachable TCP ports were checked for HTTP (not without a
    /// network).
    pub http_checked: bool,
    /// The guest listed more sockets than banger reads; the rest are left out.
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskUsage {
    pub path: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStats {
    pub name: String,
    pub vcpus: u32,
    /// Busy share of all vCPUs over a short sample, 0-100.
    pub cpu_percent: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disks: Vec<DiskUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_interface: Option<String>,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: u64,
    /// 1, 5 and 15-minute load averages.
    pub load: [f64; 3],
}

method!(
    /// Sockets listening in a running VM, each with its address and
    /// whether it answers HTTP.
    VmPortsM = "vm.ports", VmRef => VmPorts
);
method!(
    /// CPU, memory, disk, network and uptime of a running VM.
    VmStatsM = "vm.stats", VmRef => VmStats
);

// ---- images and kernels ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub rootfs: String,
    pub kernel: String,
    pub size_bytes: u64,
    pub source: String,
    pub created_at: String,
    /// What identifies the content: an imported image's manifest digest,
    /// the rootfs file's hash for a built one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// `image import NAME FROM`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageImport {
    pub name: String,
    /// An absolute path to an OCI image layout or an OCI / `docker save`
    /// archive, or a registry reference (`docker.io/library/python:3.12`).
    pub from: String,
    /// Replace an image of that name (VMs made from it keep the old one).
    #[serde(default)]
    pub force: bool,
    /// A kernel directory or version; default: the stored Debian kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageBuild {
    #[serde(default)]
    pub name: String,
    /// Rebuild even if it exists.
    #[serde(default)]
    pub force: bool,
    /// Debian packages beyond what banger needs (default image: a dev box).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Debian suite (bookworm, trixie).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// Fixed image size; else sized to its content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRegister {
    pub name: String,
    pub rootfs: String,
    /// A kernel directory (with manifest.json) or a kernel version.
    pub kernel: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NameRef {
    pub name: String,
}

/// A progress line of a long operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub stage: String,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelInfo {
    pub version: String,
    pub dir: String,
    pub package: String,
    pub sha256: String,
    pub source: String,
    pub modules: Vec<String>,
    /// Uncompressed ELF kernel (file name in `dir`) for Firecracker, which
    /// cannot boot a bzImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmlinux: Option<String>,
}

method!(ImageBuildM = "image.build", ImageBuild => ImageInfo, event Progress);
method!(ImageImportM = "image.import", ImageImport => ImageInfo, event Progress);
method!(ImageList = "image.list", Empty => Vec<ImageInfo>);
method!(ImageShow = "image.show", NameRef => ImageInfo);
method!(ImageDelete = "image.delete", NameRef => Empty);
method!(ImageRegisterM = "image.register", ImageRegister => ImageInfo);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageExport {
    pub name: String,
    /// Absolute path of the bundle to write.
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleInfo {
    pub path: String,
    pub name: String,
    pub kernel_version: String,
    /// Files the bundle carries, each with its pinned sha256.
    pub members: usize,
    /// Their bytes, uncompressed.
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImagePull {
    /// Absolute path of a bundle file, an https URL, or the name of an
    /// entry in the catalog.
    pub src: String,
    /// The image's name here (the bundle's own when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hex sha256 the downloaded bundle must have (a catalog pins its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A catalog (absolute path or https URL) instead of the configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
}

method!(ImageExportM = "image.export", ImageExport => BundleInfo);
method!(ImagePullM = "image.pull", ImagePull => ImageInfo);
method!(
    /// A stored kernel as a bundle (`name` is the kernel version).
    KernelExportM = "kernel.export", ImageExport => BundleInfo
);
method!(
    /// Installs a kernel from a bundle (an image bundle's kernel too);
    /// `name` is ignored.
    KernelPullM = "kernel.pull", ImagePull => KernelInfo
);
method!(KernelFetch = "kernel.fetch", Empty => KernelInfo, event Progress);
method!(KernelList = "kernel.list", Empty => Vec<KernelInfo>);
method!(KernelShow = "kernel.show", NameRef => KernelInfo);
method!(KernelRm = "kernel.rm", NameRef => Empty);

// ---- workspaces ----

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspacePlanParams {
    /// Absolute host path inside a git work tree.
    pub path: String,
    #[serde(default)]
    pub include_untracked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspacePlan {
    pub repo_root: String,
    pub files: Vec<String>,
    pub bytes: u64,
    /// Untracked, non-ignored files left out (without --include-untracked).
    pub skipped_untracked: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
    /// Tool-version files that ask for a bootstrap (.mise.toml, .tool-versions).
    pub bootstrap_files: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspacePrepare {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub include_untracked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspaceReady {
    pub guest_path: String,
    pub files: usize,
    pub bytes: u64,
    pub skipped_untracked: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkspaceExport {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_commit: Option<String>,
}

method!(
    /// Inspects a workspace without touching any VM.
    WorkspacePlanM = "workspace.plan", WorkspacePlanParams => WorkspacePlan
);
/// `vm cp`: one side is the host, the other the guest of VM `name`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmCopy {
    pub name: String,
    /// true: host `host` into the guest at `guest`; false: the other way.
    pub to_guest: bool,
    /// Absolute host path.
    pub host: String,
    /// Absolute guest path.
    pub guest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    pub entries: u64,
}

method!(VmCopyM = "vm.cp", VmCopy => Copied, event Progress);
method!(VmWorkspacePrepare = "vm.workspace.prepare", WorkspacePrepare => WorkspaceReady);
method!(
    /// A binary patch of the guest workspace against its base commit, streamed.
    VmWorkspaceExport = "vm.workspace.export", WorkspaceExport => crate::methods::agent::ExitStatus, event crate::methods::agent::ExecOutput
);

// ---- ssh ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SshInfo {
    /// banger's private key (made on first use).
    pub key: String,
    /// banger's own known_hosts, where guest host keys are pinned.
    pub known_hosts: String,
    pub user: String,
}

method!(SshInfoM = "ssh.info", Empty => SshInfo);

// ---- guest sessions ----

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStart {
    pub vm: String,
    /// A name unique within the VM; one is made up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// A terminal of this size instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::stream::WinSize>,
    /// Bytes of output kept (older output is dropped); the daemon's
    /// `session_log_max_kib` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_max: Option<u64>,
    /// Run inside this guest directory as its root (a container's tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Run as this user instead of root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<crate::methods::agent::User>,
}

/// A session as the daemon shows it: its catalog row, settled with what
/// the agent says when the VM runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionView {
    pub name: String,
    pub id: String,
    pub vm: String,
    pub argv: Vec<String>,
    pub tty: bool,
    /// `starting`, `running`, `exited` or `lost`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The output kept: bytes `first_seq..next_seq` (when the agent said).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
    /// Whether a client owns its input now (when the agent said).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_attached: Option<bool>,
    /// The op id of the call that started it.
    pub op_id: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionViews {
    pub sessions: Vec<SessionView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRef {
    pub vm: String,
    pub session: String,
}

/// The warm pool: VMs booted ahead of demand for `vm create`/`vm run`
/// of the pool's spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub image: String,
    /// How many the daemon keeps (0: no pool).
    pub size: u32,
    /// Booted and waiting to be taken.
    pub ready: Vec<String>,
    /// Being made or booted.
    pub starting: Vec<String>,
    /// `pool drain` stopped refilling (until `pool fill`).
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolFill {
    /// Answer once the pool is full (or after 10 minutes).
    #[serde(default)]
    pub wait: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolDrained {
    /// The pool VMs deleted.
    pub removed: Vec<String>,
}

/// `vm snapshot`: the VM to save, and the snapshot's name (made up when
/// absent).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSnapshot {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// `vm restore`: a new VM `name` from `snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmRestore {
    /// Empty: the daemon generates one.
    #[serde(default)]
    pub name: String,
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    pub image: String,
    pub vmm: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Its files on disk (memory, state, the VM's disks), in bytes used.
    pub size_bytes: u64,
    pub created_at: String,
    pub last_used_at: String,
    /// The op id of the call that took it.
    pub op_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRef {
    pub name: String,
}

method!(
    /// Saves a running VM (memory, device state, disks) as a snapshot; the
    /// VM is paused for the copy and runs on after.
    VmSnapshotM = "vm.snapshot", VmSnapshot => SnapshotInfo
);
method!(
    /// A new VM from a snapshot, with its own name, CID and disks; the
    /// guest is re-seeded (hostname, entropy, clock).
    VmRestoreM = "vm.restore", VmRestore => VmInfo
);
method!(SnapshotListM = "snapshot.list", crate::methods::Empty => Vec<SnapshotInfo>);
method!(SnapshotShowM = "snapshot.show", SnapshotRef => SnapshotInfo);
method!(SnapshotRmM = "snapshot.rm", SnapshotRef => crate::methods::Empty);

method!(PoolStatusM = "pool.status", crate::methods::Empty => PoolStatus);
method!(
    /// Refills the pool (and resumes refilling after a drain).
    PoolFillM = "pool.fill", PoolFill => PoolStatus
);
method!(
    /// Deletes the pool's VMs and stops refilling until `pool.fill`.
    PoolDrainM = "pool.drain", crate::methods::Empty => PoolDrained
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionSignalReq {
    pub vm: String,
    pub session: String,
    pub signal: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStopReq {
    pub vm: String,
    pub session: String,
    /// SIGTERM, then SIGKILL after this long (10 s when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionResizeReq {
    pub vm: String,
    pub session: String,
    pub size: crate::stream::WinSize,
}

/// Attach, logs or send. With input (attach, send), the client sends
/// stream frames after the request, as for `vm exec -i`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStreamReq {
    pub vm: String,
    pub session: String,
    #[serde(flatten)]
    pub mode: crate::stream::SessionMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
}

/// A piece of a session's output, numbered by byte.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionOutput {
    pub seq: u64,
    pub stream: crate::methods::agent::StreamName,
    pub data_b64: String,
}

method!(VmSessionStartM = "vm.session.start", SessionStart => SessionView);
method!(VmSessionListM = "vm.session.list", VmRef => SessionViews);
method!(VmSessionShowM = "vm.session.show", SessionRef => SessionView);
method!(VmSessionStopM = "vm.session.stop", SessionStopReq => SessionView);
method!(VmSessionKillM = "vm.session.kill", SessionRef => SessionView);
method!(
    /// A signal (1-64) for the session's whole process group; the session
    /// decides what it does with it.
    VmSessionSignalM = "vm.session.signal", SessionSignalReq => SessionView
);
method!(VmSessionRmM = "vm.session.rm", SessionRef => Empty);
method!(VmSessionResizeM = "vm.session.resize", SessionResizeReq => SessionView);
method!(
    /// Attach, logs or send: the session's output as events, ending with
    /// how the stream ended.
    VmSessionStreamM = "vm.session.stream", SessionStreamReq => crate::stream::SessionEnd, event SessionOutput
);
