//! The daemon's errors, one enum per concern, and the one place that turns
//! them into wire errors.
//!
//! Services return these typed errors and never pick an `ErrorCode`
//! themselves: each enum's `code()` below decides it, and the `From` impls
//! at the end of the file build the `RpcError` a client sees, whose message
//! is the error's display form. Each variant carries what was being done
//! (path, tool, name, stderr tail), so that message says what failed and
//! why; an underlying error is kept as its `#[source]` and also quoted in
//! the message, because the wire carries one string.

use banger_proto::{ClientError, ErrorCode, RpcError};
use banger_store::StoreError;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use thiserror::Error;

/// Running host tools and plain file-system work.
#[derive(Debug, Error)]
pub enum SysError {
    #[error("{tool} is not installed (scripts/install-deps installs it)")]
    NotInstalled {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    /// The tool ran and failed; `stderr_tail` is the last lines it wrote.
    #[error("{tool} failed ({status}): {stderr_tail}")]
    Failed {
        tool: String,
        status: ExitStatus,
        stderr_tail: String,
    },
    /// `what` names the attempt and its path ("creating /x/y").
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("could not create a temporary directory in {}", parent.display())]
    NoTempDir { parent: PathBuf },
}

/// Calls to the root helper.
#[derive(Debug, Error)]
pub enum HelperError {
    /// The helper answered with an error: its code and op id are relayed.
    #[error("root helper: {}", .0.message)]
    Refused(#[source] RpcError),
    #[error(
        "the root helper is not reachable at {} ({source}); start it with `banger-helper serve --owner-uid $(id -u)` as root",
        path.display()
    )]
    Unreachable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The call reached the helper but the exchange broke (framing, decoding, idle).
    #[error("root helper: {0}")]
    Transport(#[source] ClientError),
    /// No answer within the deadline: a wedged helper never holds a VM's
    /// lifecycle lock for good.
    #[error("the root helper did not answer {method} within {secs} s")]
    Timeout { method: &'static str, secs: u64 },
}

impl From<ClientError> for HelperError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Rpc(e) => HelperError::Refused(e),
            ClientError::Connect { path, source } => HelperError::Unreachable { path, source },
            other => HelperError::Transport(other),
        }
    }
}

/// Host networking: the bridge's configuration, addresses, taps.
#[derive(Debug, Error)]
pub enum NetworkError {
    #[error(transparent)]
    Helper(#[from] HelperError),
    #[error("root helper speaks protocol {helper} but the daemon speaks {daemon}; restart the helper")]
    ProtocolMismatch { helper: u32, daemon: u32 },
    #[error("bridge_address {address:?} has no prefix length")]
    NoPrefixLength { address: String },
    #[error("bad bridge_address {address:?}")]
    BadBridgeAddress { address: String },
    #[error("bridge_address prefix must be 8-30, not {len}")]
    PrefixOutOfRange { address: String, len: u8 },
    #[error("no free address left in {cidr}")]
    NoFreeAddress { cidr: String },
    #[error("the root helper opened tap {tap} but passed no descriptor")]
    NoTapDescriptor { tap: String },
}

/// Guest kernels: lookup, fetch, unpack.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("invalid kernel name {name:?}")]
    InvalidName { name: String },
    #[error("no kernel at {} ({source})", dir.display())]
    NotStored {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no kernel {name:?}")]
    NoSuchKernel {
        name: String,
        #[source]
        source: Box<KernelError>,
    },
    #[error("corrupt kernel manifest in {}: {source}", dir.display())]
    CorruptManifest {
        dir: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{meta} has no linux-image dependency (run apt-get update?)")]
    NoImagePackage { meta: String },
    #[error("apt-get download of {package} produced no .deb")]
    NoDeb { package: String },
    #[error("the kernel package {package} has no modules directory")]
    NoModulesDir { package: String },
    #[error("kernel {version} lacks module {module} (compressed modules are not supported)")]
    MissingModule { version: String, module: String },
    #[error("no LZ4 payload in the kernel image")]
    NoLz4Payload,
    #[error("lz4 did not produce an ELF kernel")]
    NotElf,
}

/// Images: registration, lookup, builds.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The name check's own sentence ("invalid image name ...").
    #[error("{0}")]
    InvalidName(String),
    #[error("no image named {name:?} (see `banger image list`)")]
    NotFound { name: String },
    #[error("rootfs must be an absolute path, not {rootfs:?}")]
    RelativeRootfs { rootfs: String },
    #[error("rootfs {rootfs}: {source}")]
    RootfsMissing {
        rootfs: String,
        #[source]
        source: io::Error,
    },
    #[error("{rootfs} is not an ext4 image")]
    NotExt4 { rootfs: String },
    #[error("image {name} is used by: {}", users.join(", "))]
    InUse { name: String, users: Vec<String> },
    /// A recipe refused before anything runs.
    #[error("{0}")]
    InvalidRecipe(String),
    #[error(
        "image {name} exists with another recipe ({existing}); rebuild it with --force \
         (VMs made from it keep the old one)"
    )]
    OtherRecipe { name: String, existing: String },
    #[error("image {name} exists; replace it with --force (VMs made from it keep the old one)")]
    Exists { name: String },
    /// Reading, checking or flattening an OCI or Docker image.
    #[error("importing {from}: {source}")]
    Oci {
        from: String,
        #[source]
        source: banger_oci::Error,
    },
    #[error("importing an image keeps its files' owners, which needs bangerd to run as root")]
    NeedsRoot,
    /// A bundle that is not what it claims (refused before anything is
    /// published), or one that could not be read or written.
    #[error("bundle {path}: {source}")]
    Bundle {
        path: String,
        #[source]
        source: crate::bundle::BundleError,
    },
    #[error("kernel {version} exists here with other contents than the bundle's")]
    KernelDiffers { version: String },
    /// A URL, catalog or download that is refused or failed.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
}

/// Workspaces: the host repository and the transfer into the guest.
#[derive(Debug, Error)]
pub enum WorkspaceError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("path {} is not UTF-8", path.display())]
    PathNotUtf8 { path: PathBuf },
    #[error("workspace path must be absolute, not {path:?}")]
    RelativePath { path: String },
    #[error("{path} is not a directory")]
    NotADirectory { path: String },
    /// `source` is git's refusal, kept for the logs.
    #[error("{path} is not inside a git repository")]
    NotARepository {
        path: String,
        #[source]
        source: Box<WorkspaceError>,
    },
    #[error("{path} is a bare git repository: use a work tree")]
    BareRepository { path: String },
    #[error("{} has git submodules, which workspaces do not support", root.display())]
    Submodules { root: PathBuf },
    #[error("invalid git ref {0:?}")]
    InvalidRef(String),
    #[error("guest agent unreachable: {source}")]
    AgentUnreachable {
        #[source]
        source: banger_vmm::vsock::VsockError,
    },
    #[error("guest answered {line:?}: {detail}")]
    BadAnswer { line: String, detail: String },
    #[error("transfer task: {source}")]
    TransferTask {
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Maps a store failure: a duplicate is the caller's, anything else ours.
fn store_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        _ => ErrorCode::OperationFailed,
    }
}

/// A store failure as a wire error (for services that still return `RpcError`).
pub fn store_err(e: StoreError) -> RpcError {
    RpcError::new(store_code(&e), e.to_string())
}

impl SysError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SysError::NotInstalled { .. }
            | SysError::Spawn { .. }
            | SysError::Failed { .. }
            | SysError::Io { .. }
            | SysError::NoTempDir { .. } => ErrorCode::OperationFailed,
        }
    }
}

impl HelperError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HelperError::Refused(e) => e.code,
            HelperError::Unreachable { .. } | HelperError::Transport(_) | HelperError::Timeout { .. } => {
                ErrorCode::OperationFailed
            }
        }
    }
}

impl NetworkError {
    pub fn code(&self) -> ErrorCode {
        match self {
            NetworkError::Helper(e) => e.code(),
            NetworkError::ProtocolMismatch { .. }
            | NetworkError::NoPrefixLength { .. }
            | NetworkError::BadBridgeAddress { .. }
            | NetworkError::PrefixOutOfRange { .. }
            | NetworkError::NoFreeAddress { .. }
            | NetworkError::NoTapDescriptor { .. } => ErrorCode::OperationFailed,
        }
    }
}

impl KernelError {
    pub fn code(&self) -> ErrorCode {
        match self {
            KernelError::Sys(e) => e.code(),
            KernelError::InvalidName { .. } => ErrorCode::BadRequest,
            KernelError::NotStored { .. } | KernelError::NoSuchKernel { .. } => ErrorCode::NotFound,
            KernelError::CorruptManifest { .. }
            | KernelError::NoImagePackage { .. }
            | KernelError::NoDeb { .. }
            | KernelError::NoModulesDir { .. }
            | KernelError::MissingModule { .. }
            | KernelError::NoLz4Payload
            | KernelError::NotElf => ErrorCode::OperationFailed,
        }
    }
}

impl ImageError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ImageError::Sys(e) => e.code(),
            ImageError::Kernel(e) => e.code(),
            ImageError::Store(e) => store_code(e),
            ImageError::InvalidName(_)
            | ImageError::RelativeRootfs { .. }
            | ImageError::NotExt4 { .. }
            | ImageError::InUse { .. }
            | ImageError::InvalidRecipe(_) => ErrorCode::BadRequest,
            ImageError::OtherRecipe { .. } | ImageError::Exists { .. } => ErrorCode::AlreadyExists,
            ImageError::Oci { source, .. } => match source {
                banger_oci::Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    ErrorCode::NotFound
                }
                banger_oci::Error::Io { .. } | banger_oci::Error::Registry(_) => ErrorCode::OperationFailed,
                _ => ErrorCode::BadRequest,
            },
            ImageError::NeedsRoot => ErrorCode::OperationFailed,
            ImageError::Bundle { source, .. } => match source {
                crate::bundle::BundleError::Refused(_) => ErrorCode::BadRequest,
                crate::bundle::BundleError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    ErrorCode::NotFound
                }
                crate::bundle::BundleError::Io { .. } => ErrorCode::OperationFailed,
            },
            ImageError::KernelDiffers { .. } => ErrorCode::AlreadyExists,
            ImageError::Remote(e) => match e {
                crate::remote::RemoteError::Refused(_) | crate::remote::RemoteError::Catalog { .. } => {
                    ErrorCode::BadRequest
                }
                crate::remote::RemoteError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    ErrorCode::NotFound
                }
                crate::remote::RemoteError::Fetch { .. } | crate::remote::RemoteError::Io { .. } => {
                    ErrorCode::OperationFailed
                }
            },
            ImageError::NotFound { .. } | ImageError::RootfsMissing { .. } => ErrorCode::NotFound,
        }
    }
}

impl WorkspaceError {
    pub fn code(&self) -> ErrorCode {
        match self {
            WorkspaceError::Sys(e) => e.code(),
            WorkspaceError::PathNotUtf8 { .. }
            | WorkspaceError::RelativePath { .. }
            | WorkspaceError::NotARepository { .. }
            | WorkspaceError::BareRepository { .. }
            | WorkspaceError::Submodules { .. }
            | WorkspaceError::InvalidRef(_) => ErrorCode::BadRequest,
            WorkspaceError::NotADirectory { .. } => ErrorCode::NotFound,
            WorkspaceError::AgentUnreachable { .. } => ErrorCode::NotRunning,
            WorkspaceError::BadAnswer { .. } | WorkspaceError::TransferTask { .. } => {
                ErrorCode::OperationFailed
            }
        }
    }
}

impl From<SysError> for RpcError {
    fn from(e: SysError) -> Self {
        RpcError::new(e.code(), e.to_string())
    }
}

impl From<HelperError> for RpcError {
    fn from(e: HelperError) -> Self {
        let code = e.code();
        let message = e.to_string();
        // A relayed error keeps the op id the helper stamped on it.
        let op_id = match e {
            HelperError::Refused(r) => r.op_id,
            _ => None,
        };
        RpcError { code, message, op_id }
    }
}

impl From<NetworkError> for RpcError {
    fn from(e: NetworkError) -> Self {
        match e {
            NetworkError::Helper(h) => h.into(),
            other => RpcError::new(other.code(), other.to_string()),
        }
    }
}

impl From<KernelError> for RpcError {
    fn from(e: KernelError) -> Self {
        RpcError::new(e.code(), e.to_string())
    }
}

impl From<ImageError> for RpcError {
    fn from(e: ImageError) -> Self {
        RpcError::new(e.code(), e.to_string())
    }
}

/// `vm cp`: a file or directory between the host and a guest.
#[derive(Debug, Error)]
pub enum CopyError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{}: {source}", path.display())]
    Host {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("guest path {0:?} must be absolute, without `..`")]
    GuestPath(String),
    #[error("host path {} must be absolute and name a file or directory", .0.display())]
    HostPath(PathBuf),
    #[error("guest agent unreachable: {source}")]
    AgentUnreachable {
        #[source]
        source: banger_vmm::vsock::VsockError,
    },
    /// The agent's own refusal or failure, in its words.
    #[error("in the guest: {0}")]
    Guest(String),
    /// What the guest sent is not what a copy may write.
    #[error("the guest's archive was refused: {0}")]
    BadArchive(String),
}

impl CopyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CopyError::Sys(e) => e.code(),
            CopyError::Host { source, .. } if source.kind() == io::ErrorKind::NotFound => ErrorCode::NotFound,
            CopyError::Host { .. } | CopyError::BadArchive(_) => ErrorCode::OperationFailed,
            CopyError::GuestPath(_) | CopyError::HostPath(_) => ErrorCode::BadRequest,
            CopyError::AgentUnreachable { .. } => ErrorCode::NotRunning,
            CopyError::Guest(m) if m.contains("No such file") => ErrorCode::NotFound,
            CopyError::Guest(_) => ErrorCode::OperationFailed,
        }
    }
}

impl From<CopyError> for RpcError {
    fn from(e: CopyError) -> Self {
        RpcError::new(e.code(), e.to_string())
    }
}

impl From<WorkspaceError> for RpcError {
    fn from(e: WorkspaceError) -> Self {
        RpcError::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::OpId;
    use std::error::Error as _;
    use std::os::unix::process::ExitStatusExt;

    fn io_err(msg: &str) -> io::Error {
        io::Error::other(msg.to_string())
    }

    /// Converts `e` and checks its code and that the message names every
    /// piece of context in `parts`.
    fn wire(e: impl Into<RpcError>, code: ErrorCode, parts: &[&str]) -> RpcError {
        let r: RpcError = e.into();
        assert_eq!(r.code, code, "{}", r.message);
        for p in parts {
            assert!(r.message.contains(p), "{:?} lacks {p:?}", r.message);
        }
        r
    }

    fn sys_cases() -> Vec<(SysError, &'static [&'static str])> {
        vec![
            (
                SysError::NotInstalled {
                    tool: "debootstrap".into(),
                    source: io::ErrorKind::NotFound.into(),
                },
                &["debootstrap is not installed", "scripts/install-deps"],
            ),
            (
                SysError::Spawn {
                    tool: "mkfs.ext4".into(),
                    source: io_err("permission denied"),
                },
                &["running mkfs.ext4", "permission denied"],
            ),
            (
                SysError::Failed {
                    tool: "dpkg".into(),
                    status: ExitStatus::from_raw(2 << 8),
                    stderr_tail: "dpkg: error | no space".into(),
                },
                &["dpkg failed", "exit status: 2", "no space"],
            ),
            (
                SysError::Io {
                    what: "creating /srv/vm/overlay.ext4".into(),
                    source: io_err("disk full"),
                },
                &["creating /srv/vm/overlay.ext4", "disk full"],
            ),
            (
                SysError::NoTempDir {
                    parent: "/srv/kernels".into(),
                },
                &["temporary directory", "/srv/kernels"],
            ),
        ]
    }

    #[test]
    fn sys_errors_are_operation_failures_naming_tool_and_path() {
        for (e, parts) in sys_cases() {
            wire(e, ErrorCode::OperationFailed, parts);
        }
    }

    #[test]
    fn sys_errors_keep_their_source() {
        let e = SysError::Io {
            what: "reading vmlinuz".into(),
            source: io_err("gone"),
        };
        assert_eq!(e.source().unwrap().to_string(), "gone");
    }

    #[test]
    fn helper_refusals_keep_code_and_op_id() {
        let op = OpId::parse("op-12ab").unwrap();
        let refused = RpcError::not_found("bridge banger0 does not exist").with_op_id(&op);
        let r = wire(
            HelperError::from(ClientError::Rpc(refused)),
            ErrorCode::NotFound,
            &["root helper: bridge banger0 does not exist"],
        );
        assert_eq!(r.op_id, Some(op.clone()));
        // The op id is not repeated inside the message.
        assert!(!r.message.contains("op-12ab"), "{}", r.message);
        // Through the network service's error too.
        let refused = RpcError::bad_request("bad tap name").with_op_id(&op);
        let r = wire(
            NetworkError::from(HelperError::Refused(refused)),
            ErrorCode::BadRequest,
            &["root helper: bad tap name"],
        );
        assert_eq!(r.op_id, Some(op));
    }

    #[test]
    fn an_unreachable_helper_says_where_and_how_to_start_it() {
        let e = HelperError::from(ClientError::Connect {
            path: "/run/banger/helper.sock".into(),
            source: io_err("connection refused"),
        });
        assert!(matches!(e, HelperError::Unreachable { .. }));
        let r = wire(
            e,
            ErrorCode::OperationFailed,
            &[
                "/run/banger/helper.sock",
                "connection refused",
                "banger-helper serve",
            ],
        );
        assert_eq!(r.op_id, None);
        let e = HelperError::from(ClientError::NoAnswer {
            path: "/run/banger/helper.sock".into(),
        });
        wire(
            e,
            ErrorCode::OperationFailed,
            &["root helper:", "/run/banger/helper.sock", "without an answer"],
        );
    }

    #[test]
    fn network_errors_map_to_operation_failed_with_context() {
        let cases: Vec<(NetworkError, &[&str])> = vec![
            (
                NetworkError::ProtocolMismatch { helper: 0, daemon: 1 },
                &["protocol 0", "speaks 1", "restart the helper"],
            ),
            (
                NetworkError::NoPrefixLength {
                    address: "172.30.0.1".into(),
                },
                &["\"172.30.0.1\"", "no prefix length"],
            ),
            (
                NetworkError::BadBridgeAddress {
                    address: "x/24".into(),
                },
                &["bad bridge_address", "\"x/24\""],
            ),
            (
                NetworkError::PrefixOutOfRange {
                    address: "10.0.0.1/31".into(),
                    len: 31,
                },
                &["8-30", "31"],
            ),
            (
                NetworkError::NoFreeAddress {
                    cidr: "172.30.0.1/30".into(),
                },
                &["no free address", "172.30.0.1/30"],
            ),
            (
                NetworkError::NoTapDescriptor { tap: "bgt7".into() },
                &["bgt7", "no descriptor"],
            ),
        ];
        for (e, parts) in cases {
            wire(e, ErrorCode::OperationFailed, parts);
        }
    }

    #[test]
    fn kernel_errors_map_to_their_codes() {
        let bad_json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let cases: Vec<(KernelError, ErrorCode, &[&str])> = vec![
            (
                KernelError::InvalidName { name: "../x".into() },
                ErrorCode::BadRequest,
                &["invalid kernel name", "\"../x\""],
            ),
            (
                KernelError::NotStored {
                    dir: "/k/6.1".into(),
                    source: io::ErrorKind::NotFound.into(),
                },
                ErrorCode::NotFound,
                &["no kernel at /k/6.1"],
            ),
            (
                KernelError::NoSuchKernel {
                    name: "9.9.9-none".into(),
                    source: Box::new(KernelError::NotStored {
                        dir: "/k/9.9.9-none".into(),
                        source: io::ErrorKind::NotFound.into(),
                    }),
                },
                ErrorCode::NotFound,
                &["no kernel \"9.9.9-none\""],
            ),
            (
                KernelError::CorruptManifest {
                    dir: "/k/6.1".into(),
                    source: bad_json,
                },
                ErrorCode::OperationFailed,
                &["corrupt kernel manifest in /k/6.1"],
            ),
            (
                KernelError::NoImagePackage {
                    meta: "linux-image-cloud-amd64".into(),
                },
                ErrorCode::OperationFailed,
                &["linux-image-cloud-amd64", "apt-get update"],
            ),
            (
                KernelError::NoDeb {
                    package: "linux-image-6.1".into(),
                },
                ErrorCode::OperationFailed,
                &["no .deb", "linux-image-6.1"],
            ),
            (
                KernelError::NoModulesDir {
                    package: "linux-image-6.1".into(),
                },
                ErrorCode::OperationFailed,
                &["no modules directory", "linux-image-6.1"],
            ),
            (
                KernelError::MissingModule {
                    version: "6.1.0-9".into(),
                    module: "fs/overlayfs/overlay".into(),
                },
                ErrorCode::OperationFailed,
                &["6.1.0-9", "fs/overlayfs/overlay", "compressed modules"],
            ),
            (KernelError::NoLz4Payload, ErrorCode::OperationFailed, &["LZ4"]),
            (KernelError::NotElf, ErrorCode::OperationFailed, &["ELF"]),
        ];
        for (e, code, parts) in cases {
            wire(e, code, parts);
        }
        for (e, parts) in sys_cases() {
            wire(KernelError::from(e), ErrorCode::OperationFailed, parts);
        }
    }

    #[test]
    fn image_errors_map_to_their_codes() {
        let cases: Vec<(ImageError, ErrorCode, &[&str])> = vec![
            (
                ImageError::InvalidName("invalid image name \"A\"".into()),
                ErrorCode::BadRequest,
                &["invalid image name"],
            ),
            (
                ImageError::NotFound { name: "nope".into() },
                ErrorCode::NotFound,
                &["no image named \"nope\"", "banger image list"],
            ),
            (
                ImageError::RelativeRootfs {
                    rootfs: "rootfs.ext4".into(),
                },
                ErrorCode::BadRequest,
                &["absolute path", "\"rootfs.ext4\""],
            ),
            (
                ImageError::RootfsMissing {
                    rootfs: "/img/rootfs.ext4".into(),
                    source: io::ErrorKind::NotFound.into(),
                },
                ErrorCode::NotFound,
                &["rootfs /img/rootfs.ext4"],
            ),
            (
                ImageError::NotExt4 {
                    rootfs: "/img/x".into(),
                },
                ErrorCode::BadRequest,
                &["/img/x is not an ext4 image"],
            ),
            (
                ImageError::InUse {
                    name: "default".into(),
                    users: vec!["a".into(), "b".into()],
                },
                ErrorCode::BadRequest,
                &["image default is used by: a, b"],
            ),
            (
                ImageError::Store(StoreError::AlreadyExists("image \"x\"".into())),
                ErrorCode::AlreadyExists,
                &["image \"x\" already exists"],
            ),
            (
                ImageError::Store(StoreError::Corrupt {
                    what: "image x".into(),
                    detail: "bad json".into(),
                }),
                ErrorCode::OperationFailed,
                &["corrupt record image x", "bad json"],
            ),
            (
                ImageError::Kernel(KernelError::NoSuchKernel {
                    name: "9.9".into(),
                    source: Box::new(KernelError::NoLz4Payload),
                }),
                ErrorCode::NotFound,
                &["no kernel \"9.9\""],
            ),
            (
                ImageError::Sys(SysError::Failed {
                    tool: "debootstrap".into(),
                    status: ExitStatus::from_raw(1 << 8),
                    stderr_tail: "E: Couldn't download packages".into(),
                }),
                ErrorCode::OperationFailed,
                &["debootstrap failed", "Couldn't download"],
            ),
        ];
        for (e, code, parts) in cases {
            wire(e, code, parts);
        }
    }

    #[tokio::test]
    async fn workspace_errors_map_to_their_codes() {
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        let join = task.await.unwrap_err();
        let cases: Vec<(WorkspaceError, ErrorCode, &[&str])> = vec![
            (
                WorkspaceError::PathNotUtf8 { path: "/r".into() },
                ErrorCode::BadRequest,
                &["/r", "UTF-8"],
            ),
            (
                WorkspaceError::RelativePath { path: "repo".into() },
                ErrorCode::BadRequest,
                &["must be absolute", "\"repo\""],
            ),
            (
                WorkspaceError::NotADirectory { path: "/nope".into() },
                ErrorCode::NotFound,
                &["/nope is not a directory"],
            ),
            (
                WorkspaceError::NotARepository {
                    path: "/tmp/x".into(),
                    source: Box::new(WorkspaceError::Sys(SysError::Failed {
                        tool: "git".into(),
                        status: ExitStatus::from_raw(128 << 8),
                        stderr_tail: "fatal: not a git repository".into(),
                    })),
                },
                ErrorCode::BadRequest,
                &["/tmp/x is not inside a git repository"],
            ),
            (
                WorkspaceError::BareRepository {
                    path: "/r.git".into(),
                },
                ErrorCode::BadRequest,
                &["/r.git is a bare git repository"],
            ),
            (
                WorkspaceError::Submodules { root: "/r".into() },
                ErrorCode::BadRequest,
                &["/r has git submodules"],
            ),
            (
                WorkspaceError::InvalidRef("a;b".into()),
                ErrorCode::BadRequest,
                &["invalid git ref \"a;b\""],
            ),
            (
                WorkspaceError::AgentUnreachable {
                    source: banger_vmm::vsock::VsockError::Timeout {
                        port: 53,
                        secs: 3,
                        last: "refused".into(),
                    },
                },
                ErrorCode::NotRunning,
                &["guest agent unreachable", "port 53"],
            ),
            (
                WorkspaceError::BadAnswer {
                    line: "garbage".into(),
                    detail: "expected value".into(),
                },
                ErrorCode::OperationFailed,
                &["\"garbage\"", "expected value"],
            ),
            (
                WorkspaceError::TransferTask { source: join },
                ErrorCode::OperationFailed,
                &["transfer task", "cancelled"],
            ),
            (
                WorkspaceError::Sys(SysError::NotInstalled {
                    tool: "git".into(),
                    source: io::ErrorKind::NotFound.into(),
                }),
                ErrorCode::OperationFailed,
                &["git is not installed"],
            ),
        ];
        for (e, code, parts) in cases {
            wire(e, code, parts);
        }
    }

    #[test]
    fn store_failures_outside_images_map_the_same_way() {
        let r = store_err(StoreError::AlreadyExists("vm \"dev\"".into()));
        assert_eq!(r.code, ErrorCode::AlreadyExists);
        assert_eq!(r.message, "vm \"dev\" already exists");
        let r = store_err(StoreError::TooNew { found: 9, known: 3 });
        assert_eq!(r.code, ErrorCode::OperationFailed);
        assert!(r.message.contains("newer"), "{}", r.message);
    }
}
