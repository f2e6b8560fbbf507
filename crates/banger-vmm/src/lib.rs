//! VMM back-ends behind one trait.
//!
//! A back-end turns a [`LaunchSpec`] into running processes and reports
//! them as [`Launched`]. Everything after launch is back-end independent:
//! processes are supervised by PID (they outlive the daemon), and the guest
//! agent is reached over hybrid vsock (a Unix socket plus a `CONNECT <port>`
//! handshake), which QEMU (through vhost-device-vsock) and Firecracker
//! both speak.

pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod vsock;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "qemu" => Some(VmmKind::Qemu),
            "firecracker" => Some(VmmKind::Firecracker),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything a back-end needs to boot one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Per-VM directory: sockets and logs are created here, and its path
    /// marks the VM's processes (see [`process::alive`]).
    pub vm_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// In guest order: vda, vdb, ...
    pub drives: Vec<Drive>,
    pub vsock_cid: u32,
    pub net: Option<NetSpec>,
}

/// The VM's network interface: a tap on the host side.
#[derive(Debug, Clone)]
pub struct NetSpec {
    pub tap: String,
    /// An open descriptor of the tap (from the root helper); back-ends
    /// that can take one use it instead of opening the tap by name.
    pub fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    pub mac: String,
}

/// What a launch produced: enough to supervise, reach and tear down the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    pub kind: VmmKind,
    pub pid: u32,
    /// Helper processes that belong to the VM (vhost-device-vsock).
    #[serde(default)]
    pub aux_pids: Vec<u32>,
    /// The VMM's control socket (QMP or Firecracker's API).
    pub api_socket: PathBuf,
    /// Host side of hybrid vsock.
    pub vsock_uds: PathBuf,
    pub serial_log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{what} binary not found: {path} (install it or set its path in config.toml)")]
    MissingBinary { what: &'static str, path: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Failed(String),
    #[error("Firecracker API {method} {path} answered {status}: {body}")]
    Api {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
}

impl VmmError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            what: what.into(),
            source,
        }
    }
}

/// One VMM back-end.
pub trait Vmm: Send + Sync {
    fn kind(&self) -> VmmKind;
    /// Starts the VM. On error nothing the call started is left running.
    fn launch(&self, spec: &LaunchSpec) -> impl Future<Output = Result<Launched, VmmError>> + Send;
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether KVM can boot an ordinary Linux guest here: `/dev/kvm` must open
/// and the CPU must offer hardware virtualisation (VT-x or AMD-V). Nested
/// set-ups without those flags (e.g. PVM) open `/dev/kvm` but cannot run a
/// stock guest kernel.
pub fn kvm_usable() -> bool {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    opens && hw
}
