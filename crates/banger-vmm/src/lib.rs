//! VMM back-ends behind one trait.
//!
//! A back-end turns a [`LaunchSpec`] into running processes and reports
//! them as [`Launched`]. Everything after launch is back-end independent:
//! processes are supervised by PID (they outlive the daemon), and the guest
//! agent is reached over hybrid vsock (a Unix socket plus a `CONNECT <port>`
//! handshake), which Firecracker speaks and QEMU's channel bridge serves.
//!
//! [`backend`] is the one place that turns a [`VmmKind`] and the configured
//! binaries into a back-end; callers hold it as a `dyn Vmm`.

pub mod firecracker;
pub mod jailer;
pub mod pause;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod shared_libs;
pub mod vsock;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

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
    /// Resume this snapshot instead of booting (the drives must hold what
    /// they held when it was taken).
    pub restore: Option<Restore>,
    /// Puts the drives' contents in place (a restore's copies of its
    /// snapshot's disks). The back-end starts it first, on a thread of its
    /// own, and waits for it only before the VMM opens its drives, so that
    /// the copy and the VMM process's start overlap.
    pub fill_drives: Option<FillDrives>,
    /// A Firecracker started ahead of need in `vm_dir`
    /// ([`firecracker::Firecracker::prestart`]), by PID: the launch
    /// configures it instead of starting one, or starts one if it is gone.
    /// Handed over: a launch that fails kills it. Firecracker without a
    /// jail only (a jail is made for its VM): others kill it and start
    /// their own.
    pub prestarted: Option<u32>,
}

/// See [`LaunchSpec::fill_drives`]: blocking work.
#[derive(Clone)]
pub struct FillDrives(std::sync::Arc<dyn Fn() -> Result<(), VmmError> + Send + Sync>);

impl FillDrives {
    pub fn new(f: impl Fn() -> Result<(), VmmError> + Send + Sync + 'static) -> Self {
        FillDrives(std::sync::Arc::new(f))
    }

    /// Starts the fill of `spec`, if it has one.
    pub fn start(spec: &LaunchSpec) -> Filling {
        Filling(
            spec.fill_drives
                .clone()
                .map(|f| tokio::task::spawn_blocking(move || (f.0)())),
        )
    }
}

/// A fill under way: [`Filling::done`] waits for its end. Every path of a
/// launch waits for it, so that nothing writes to the VM's disks once the
/// launch has returned.
pub struct Filling(Option<tokio::task::JoinHandle<Result<(), VmmError>>>);

impl Filling {
    /// The fill's outcome, the first time; `Ok` once it was taken.
    pub async fn done(&mut self) -> Result<(), VmmError> {
        match self.0.take() {
            Some(h) => h
                .await
                .map_err(|e| VmmError::Failed(format!("filling the drives: {e}")))?,
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for FillDrives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FillDrives")
    }
}

/// A snapshot's files: the VMM's device and vCPU state, and the guest's
/// memory. QEMU keeps both in `state` (its migration stream) and ignores
/// `memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub state: PathBuf,
    pub memory: PathBuf,
    /// A seed plan (`SeedPlan`, JSON) the guest gets in its agent
    /// channel's handshake, its answer written beside it as
    /// `seeded.json`. QEMU only: Firecracker's guest is seeded over vsock.
    pub seed: Option<PathBuf>,
}

/// The VM's network interface: a tap on the host side.
#[derive(Debug, Clone)]
pub struct NetSpec {
    pub tap: String,
    /// An open descriptor of the tap (from the root helper); back-ends
    /// that can take one use it instead of opening the tap by name.
    pub fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    pub mac: String,
    /// The network namespace the tap lives in, when it is not the
    /// caller's (a jailed Firecracker is started inside it).
    pub netns: Option<std::path::PathBuf>,
}

/// What a launch produced: enough to supervise, reach and tear down the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    pub kind: VmmKind,
    pub pid: u32,
    /// Helper processes that belong to the VM (QEMU's channel bridge).
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

/// What [`Vmm::launch`] returns: boxed, so that `Vmm` is object-safe.
pub type LaunchFuture<'a> = Pin<Box<dyn Future<Output = Result<Launched, VmmError>> + Send + 'a>>;

/// One VMM back-end. Object-safe: see [`backend`].
pub trait Vmm: Send + Sync {
    fn kind(&self) -> VmmKind;
    /// Starts the VM. On error nothing the call started is left running.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> LaunchFuture<'a>;
}

/// The binaries the back-ends run, as configured; `None` looks one up.
#[derive(Debug, Clone, Default)]
pub struct BackendPaths {
    /// `qemu-system-x86_64`; `None`: PATH.
    pub qemu: Option<PathBuf>,
    /// `firecracker`; `None`: PATH.
    pub firecracker: Option<PathBuf>,
    /// `banger-vsock-bridge` (QEMU's agent channel); `None`: beside this
    /// executable, then PATH.
    pub bridge: Option<PathBuf>,
    /// Run Firecracker under this jailer.
    pub jail: Option<jailer::JailConfig>,
}

/// The back-end for `kind`, its binaries located (a missing one is
/// [`VmmError::MissingBinary`]). The one place a kind becomes a back-end.
pub fn backend(kind: VmmKind, paths: &BackendPaths) -> Result<Box<dyn Vmm>, VmmError> {
    Ok(match kind {
        VmmKind::Qemu => Box::new(qemu::Qemu::detect(paths.qemu.clone(), paths.bridge.clone())?),
        VmmKind::Firecracker => Box::new(firecracker::Firecracker::detect(
            paths.firecracker.clone(),
            paths.jail.clone(),
        )?),
    })
}

/// Finds `name` beside this executable, then on PATH, then in the sbin
/// directories. An installation (`banger system install`) ships the tools
/// it runs beside its own binaries, so those win over whatever a user's
/// PATH holds.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| is_executable(p))
        .or_else(|| which_in(name, std::env::var_os("PATH")))
}

/// The sbin directories: not on an ordinary user's PATH on Debian, yet
/// where `mkfs.ext4` and `debootstrap` live.
const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// `name` in `path`, then in the sbin directories.
pub fn which_in(name: &str, path: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = path
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An executable file named `name` in `dir`.
    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\nexit 1\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn tools_in_sbin_are_found_off_a_user_path() {
        let d = tempfile::tempdir().unwrap();
        let mine = exe(d.path(), "mytool");
        // On PATH first; a tool only in sbin is still found with a PATH
        // that lacks sbin, as an ordinary user's does on Debian.
        assert_eq!(
            which_in("mytool", Some(d.path().as_os_str().to_owned())),
            Some(mine)
        );
        let sbin_tool = ["mkfs.ext4", "losetup", "ldconfig"]
            .into_iter()
            .find(|t| SBIN_DIRS.iter().any(|s| is_executable(&Path::new(s).join(t))));
        if let Some(t) = sbin_tool {
            let found = which_in(t, Some("/usr/bin:/bin".into())).expect("found in sbin");
            assert!(SBIN_DIRS.iter().any(|s| found.starts_with(s)), "{found:?}");
        }
        assert_eq!(which_in("no-such-tool-anywhere", Some("/usr/bin".into())), None);
    }

    fn missing(err: VmmError) -> (&'static str, PathBuf) {
        match err {
            VmmError::MissingBinary { what, path } => (what, path),
            other => panic!("expected MissingBinary, got {other:?}"),
        }
    }

    fn spec(dir: &Path) -> LaunchSpec {
        LaunchSpec {
            vm_dir: dir.to_path_buf(),
            kernel: dir.join("vmlinux"),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            drives: vec![],
            vsock_cid: 3,
            net: None,
            restore: None,
            fill_drives: None,
            prestarted: None,
        }
    }

    #[test]
    fn backend_kind_matches() {
        let d = tempfile::tempdir().unwrap();
        let paths = BackendPaths {
            qemu: Some(exe(d.path(), "qemu-system-x86_64")),
            firecracker: Some(exe(d.path(), "firecracker")),
            bridge: Some(exe(d.path(), "banger-vsock-bridge")),
            jail: None,
        };
        for kind in [VmmKind::Qemu, VmmKind::Firecracker] {
            let vmm = backend(kind, &paths).unwrap();
            assert_eq!(vmm.kind(), kind);
        }
    }

    #[test]
    fn missing_binary_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let absent = d.path().join("absent");
        let not_exec = d.path().join("not-exec");
        std::fs::write(&not_exec, "").unwrap();
        for path in [&absent, &not_exec] {
            let paths = BackendPaths {
                qemu: Some(path.clone()),
                firecracker: Some(path.clone()),
                bridge: Some(exe(d.path(), "banger-vsock-bridge")),
                jail: None,
            };
            let err = backend(VmmKind::Firecracker, &paths).err().unwrap();
            assert_eq!(
                err.to_string(),
                format!(
                    "firecracker binary not found: {} (install it or set its path in config.toml)",
                    path.display()
                )
            );
            assert_eq!(missing(err), ("firecracker", path.clone()));
            let err = backend(VmmKind::Qemu, &paths).err().unwrap();
            assert_eq!(missing(err), ("qemu-system-x86_64", path.clone()));
        }
    }

    #[tokio::test]
    async fn trait_objects_launch() {
        let d = tempfile::tempdir().unwrap();
        let absent = d.path().join("absent");
        // Object safety: both back-ends behind one type, shared or owned.
        let vmms: Vec<Box<dyn Vmm>> = vec![
            Box::new(qemu::Qemu {
                qemu: absent.clone(),
                bridge: absent.clone(),
                kvm: false,
            }),
            Box::new(firecracker::Firecracker {
                binary: absent.clone(),
                jail: None,
            }),
        ];
        let kinds: Vec<VmmKind> = vmms.iter().map(|v| v.kind()).collect();
        assert_eq!(kinds, [VmmKind::Qemu, VmmKind::Firecracker]);
        let shared: std::sync::Arc<dyn Vmm> = std::sync::Arc::from(
            backend(
                VmmKind::Firecracker,
                &BackendPaths {
                    firecracker: Some(exe(d.path(), "firecracker")),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        assert_eq!(shared.kind(), VmmKind::Firecracker);
        // A launch through the trait object runs the back-end's own checks.
        let err = vmms[1].launch(&spec(d.path())).await.err().unwrap();
        assert_eq!(missing(err), ("firecracker", absent));
    }
}
