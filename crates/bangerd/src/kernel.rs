//! Guest kernels: Debian's cloud kernel, fetched with the host's package
//! tools (downloaded and unpacked, never installed), stored with a manifest.

use crate::error::{KernelError, SysError};
use crate::sys::{self, io};
use banger_proto::methods::daemon::KernelInfo;
use sha2::Digest;
use std::path::{Path, PathBuf};
use tokio::sync::Mutex;

/// Modules the guest needs, in load order (each after its dependencies).
/// ext4 is built into the cloud kernel; overlayfs and virtio are not.
pub const GUEST_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_mmio",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "drivers/char/virtio_console",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "net/vmw_vsock/vmw_vsock_virtio_transport",
    "fs/overlayfs/overlay",
];

const META_PACKAGE: &str = "linux-image-cloud-amd64";

pub struct KernelService {
    dir: PathBuf,
    /// Serialises fetches: two VMs created at once need one download.
    fetch_lock: Mutex<()>,
}

pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}

pub fn read_manifest(dir: &Path) -> Result<KernelInfo, KernelError> {
    let text = std::fs::read_to_string(manifest_path(dir)).map_err(|source| KernelError::NotStored {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut k: KernelInfo = serde_json::from_str(&text).map_err(|source| KernelError::CorruptManifest {
        dir: dir.to_path_buf(),
        source,
    })?;
    // The directory is where the manifest was read, never the `dir` it
    // claims: a kernel pulled from a bundle carries the manifest of the
    // machine it was exported on.
    k.dir = dir.display().to_string();
    Ok(k)
}

impl KernelService {
    pub fn new(dir: PathBuf) -> Self {
        KernelService {
            dir,
            fetch_lock: Mutex::new(()),
        }
    }

    pub fn list(&self) -> Vec<KernelInfo> {
        let mut out: Vec<KernelInfo> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_manifest(&e.path()).ok())
            .collect();
        out.sort_by(|a, b| a.version.cmp(&b.version));
        out
    }

    /// A kernel by version, or by directory path.
    /// A kernel by name (in banger's kernel directory) or by the absolute
    /// path of a kernel directory. The directory is always the one asked
    /// for, never the `dir` a manifest claims: a manifest is untrusted input.
    pub fn get(&self, name: &str) -> Result<KernelInfo, KernelError> {
        let p = Path::new(name);
        if p.is_absolute() {
            let real = p.canonicalize().map_err(io(format!("resolving {name}")))?;
            let mut k = read_manifest(&real)?;
            k.dir = real.display().to_string();
            return Ok(k);
        }
        Self::check_name(name)?;
        let dir = self.dir.join(name);
        let mut k = read_manifest(&dir).map_err(|e| KernelError::NoSuchKernel {
            name: name.into(),
            source: Box::new(e),
        })?;
        k.dir = dir.display().to_string();
        Ok(k)
    }

    fn check_name(name: &str) -> Result<(), KernelError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(KernelError::InvalidName { name: name.into() });
        }
        Ok(())
    }

    /// Removes a stored kernel, by name only, and only inside banger's
    /// kernel directory (a path, or a manifest naming another directory,
    /// can never make it delete anything else).
    pub fn remove(&self, name: &str) -> Result<(), KernelError> {
        Self::check_name(name)?;
        let dir = self.dir.join(name);
        read_manifest(&dir).map_err(|e| KernelError::NoSuchKernel {
            name: name.into(),
            source: Box::new(e),
        })?;
        std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
        Ok(())
    }

    /// The newest stored kernel, fetching one if there is none.
    pub async fn ensure(&self, progress: &(dyn Fn(&str) + Sync)) -> Result<KernelInfo, KernelError> {
        let _g = self.fetch_lock.lock().await;
        if let Some(k) = self.list().pop() {
            return Ok(k);
        }
        self.fetch_locked(progress).await
    }

    pub async fn fetch(&self, progress: &(dyn Fn(&str) + Sync)) -> Result<KernelInfo, KernelError> {
        let _g = self.fetch_lock.lock().await;
        self.fetch_locked(progress).await
    }

    async fn fetch_locked(&self, progress: &(dyn Fn(&str) + Sync)) -> Result<KernelInfo, KernelError> {
        progress("resolving kernel package");
        let deps = sys::run("apt-cache", ["depends", META_PACKAGE], None).await?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
            .ok_or_else(|| KernelError::NoImagePackage {
                meta: META_PACKAGE.into(),
            })?;
        std::fs::create_dir_all(&self.dir).map_err(io("creating the kernels directory"))?;
        let work = tempdir_in(&self.dir, ".fetch")?;
        let result = self.unpack(&package, &work, progress).await;
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    async fn unpack(
        &self,
        package: &str,
        work: &Path,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<KernelInfo, KernelError> {
        progress(&format!("downloading {package}"));
        sys::run("apt-get", ["download", package], Some(work)).await?;
        let deb = std::fs::read_dir(work)
            .map_err(io("listing the download"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| KernelError::NoDeb {
                package: package.into(),
            })?;
        progress("unpacking the kernel");
        let root = work.join("root");
        sys::run(
            "dpkg",
            [std::ffi::OsStr::new("-x"), deb.as_os_str(), root.as_os_str()],
            None,
        )
        .await?;
        let version = std::fs::read_dir(root.join("lib/modules"))
            .map_err(io("reading the package's modules"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .ok_or_else(|| KernelError::NoModulesDir {
                package: package.into(),
            })?;
        let staging = work.join("kernel");
        let mods_dir = staging.join("modules");
        std::fs::create_dir_all(&mods_dir).map_err(io("creating the staging directory"))?;
        let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
        std::fs::copy(&vmlinuz, staging.join("vmlinuz"))
            .map_err(io(format!("copying {}", vmlinuz.display())))?;
        let src = root.join(format!("lib/modules/{version}/kernel"));
        let mut modules = Vec::new();
        for m in GUEST_MODULES {
            let name = Path::new(m).file_name().unwrap().to_string_lossy().into_owned();
            let ko = src.join(format!("{m}.ko"));
            if !ko.exists() {
                return Err(KernelError::MissingModule {
                    version,
                    module: m.to_string(),
                });
            }
            std::fs::copy(&ko, mods_dir.join(format!("{name}.ko")))
                .map_err(io(format!("copying {}", ko.display())))?;
            modules.push(name);
        }
        let bytes = std::fs::read(staging.join("vmlinuz")).map_err(io("reading vmlinuz"))?;
        let sha256 = format!("{:x}", sha2::Sha256::digest(&bytes));
        progress("extracting vmlinux");
        let vmlinux = match extract_vmlinux(&bytes).await {
            Ok(elf) => {
                std::fs::write(staging.join("vmlinux"), elf).map_err(io("writing vmlinux"))?;
                Some("vmlinux".to_string())
            }
            Err(e) => {
                tracing::warn!(error = %e, "no vmlinux: the Firecracker back-end cannot boot this kernel");
                None
            }
        };
        let dest = self.dir.join(&version);
        let info = KernelInfo {
            version: version.clone(),
            dir: dest.display().to_string(),
            package: package.to_string(),
            sha256,
            source: format!("debian:{package}"),
            modules,
            vmlinux,
        };
        std::fs::write(
            manifest_path(&staging),
            serde_json::to_vec_pretty(&info).expect("serialisable"),
        )
        .map_err(io("writing the manifest"))?;
        // Publish atomically: a crash never leaves a half-copied kernel.
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&staging, &dest).map_err(io(format!("installing {}", dest.display())))?;
        progress(&format!("kernel {version} ready"));
        Ok(info)
    }
}

/// A fresh directory inside `parent` named `<prefix>-<random>`.
pub fn tempdir_in(parent: &Path, prefix: &str) -> Result<PathBuf, SysError> {
    for _ in 0..16 {
        let p = parent.join(format!("{prefix}-{:08x}", rand_u32()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("creating {}", p.display()))(e)),
        }
    }
    Err(SysError::NoTempDir {
        parent: parent.to_path_buf(),
    })
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom into a 4-byte buffer we own.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_ne_bytes(b)
}

/// The uncompressed ELF kernel inside a bzImage. Debian compresses its
/// kernels with LZ4 (legacy frame); the payload starts at that magic.
pub async fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, KernelError> {
    use tokio::io::AsyncWriteExt;
    const LZ4_LEGACY: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    let start = bzimage
        .windows(4)
        .position(|w| w == LZ4_LEGACY)
        .ok_or(KernelError::NoLz4Payload)?;
    let mut child = tokio::process::Command::new("lz4")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SysError::Spawn {
            tool: "lz4".into(),
            source,
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let payload = bzimage[start..].to_vec();
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&payload).await;
    });
    // lz4 complains about the bytes after the payload; the ELF is whole anyway.
    let out = child.wait_with_output().await.map_err(io("lz4"))?;
    let _ = feed.await;
    if out.stdout.starts_with(b"\x7fELF") {
        Ok(out.stdout)
    } else {
        Err(KernelError::NotElf)
    }
}
