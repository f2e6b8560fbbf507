//! Images: a read-only root filesystem plus the kernel it boots with.
//! The default image is Debian bookworm (debootstrap minbase) made into an
//! ext4 file with `mkfs.ext4 -d`, no mounting; it is shared read-only by
//! every VM, each of which writes only to its own overlay disk.

use crate::error::ImageError;
use crate::kernel::{self, KernelService};
use crate::recipe::Recipe;
use crate::sys::{self, io};
use banger_proto::methods::daemon::ImageInfo;
use banger_store::{ImageRecord, Store};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Mutex;

pub const DEFAULT_IMAGE: &str = "default";
const SOURCE_REGISTERED: &str = "registered";
/// Prefix of a pulled image's source (`bundle:<where from>`).
const SOURCE_BUNDLE: &str = "bundle:";

pub struct ImageService {
    dir: PathBuf,
    store: Arc<Store>,
    kernels: Arc<KernelService>,
    build_lock: Mutex<()>,
}

/// Where a pulled bundle comes from: an absolute file, an https URL, or
/// the name of an entry in `catalog`; `sha256` pins a URL's bytes.
pub struct PullFrom<'a> {
    pub src: &'a str,
    pub sha256: Option<&'a str>,
    pub catalog: Option<&'a str>,
}

/// Store failures as wire errors, for the VM service (mapped in `crate::error`).
pub use crate::error::store_err;

pub fn info(r: &ImageRecord) -> ImageInfo {
    ImageInfo {
        name: r.name.clone(),
        rootfs: r.rootfs.clone(),
        kernel: r.kernel.clone(),
        size_bytes: r.size_bytes,
        source: r.source.clone(),
        created_at: r.created_at.clone(),
        digest: r.digest.clone(),
    }
}

/// Image names: like VM names, a DNS-label-ish token safe in paths.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    banger_proto::names::validate_vm_name(name)
        .map_err(|e| ImageError::InvalidName(e.replace("VM name", "image name")))
}

/// The Debian mirror apt uses here, so debootstrap reaches the same one.
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("BANGER_DEBIAN_MIRROR") {
        if !m.is_empty() {
            return m;
        }
    }
    if let Ok(s) = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources") {
        if let Some(uri) = s
            .lines()
            .find_map(|l| l.strip_prefix("URIs:"))
            .and_then(|u| u.split_whitespace().next())
        {
            return uri.to_string();
        }
    }
    if let Ok(s) = std::fs::read_to_string("/etc/apt/sources.list") {
        for l in s.lines() {
            let mut w = l.split_whitespace();
            if w.next() == Some("deb") {
                if let Some(u) = w.find(|t| t.starts_with("http")) {
                    return u.to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// True if `p` holds an ext2/3/4 superblock that describes a filesystem
/// the file can actually hold: the magic alone (a 1 KiB file with two
/// right bytes) is not an image.
pub(crate) fn is_ext4(p: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut sb = [0u8; 1024];
    if f.seek(SeekFrom::Start(1024)).is_err() || f.read_exact(&mut sb).is_err() {
        return false;
    }
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    let magic_ok = sb[56..58] == [0x53, 0xEF];
    let blocks = u64::from(u32_at(4)); // s_blocks_count_lo
    let log_block = u32_at(24); // s_log_block_size: block = 1024 << n
    let sane_block = log_block <= 6;
    let fs_bytes = blocks.saturating_mul(1024u64 << log_block.min(6));
    // At least 1 MiB, and the filesystem fits in the file.
    magic_ok && sane_block && blocks > 0 && fs_bytes >= 1 << 20 && fs_bytes <= len
}

/// Makes `image` (`size` bytes) from the tree at `root`, without mounting.
async fn mkfs(
    root: &Path,
    image: &Path,
    size: u64,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), ImageError> {
    progress("making rootfs.ext4");
    sys::run(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "banger-base".as_ref(),
            "-d".as_ref(),
            root.as_os_str(),
            image.as_os_str(),
            format!("{}M", size >> 20).as_ref(),
        ],
        None,
    )
    .await?;
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

impl ImageService {
    pub fn new(dir: PathBuf, store: Arc<Store>, kernels: Arc<KernelService>) -> Self {
        ImageService {
            dir,
            store,
            kernels,
            build_lock: Mutex::new(()),
        }
    }

    pub fn get(&self, name: &str) -> Result<ImageRecord, ImageError> {
        self.store
            .get_image(name)?
            .ok_or_else(|| ImageError::NotFound { name: name.into() })
    }

    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        Ok(self.store.list_images()?.iter().map(info).collect())
    }

    /// Returns the image, building the default one on first use and again
    /// when this build's default recipe differs from the one it was made
    /// with (VMs made from the old one keep it: see `VmRuntime::base_rootfs`).
    pub async fn ensure(
        &self,
        name: &str,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ImageRecord, ImageError> {
        match self.get(name) {
            // Only an image banger built is brought up to date; a registered
            // or pulled one is the user's and is used as it is (an installed,
            // unprivileged daemon could not rebuild it anyway).
            Ok(r)
                if name == DEFAULT_IMAGE
                    && r.source != SOURCE_REGISTERED
                    && !r.source.starts_with(SOURCE_BUNDLE)
                    && r.source != Recipe::default_image().source() =>
            {
                self.build(DEFAULT_IMAGE, &Recipe::default_image(), false, progress)
                    .await
            }
            Ok(r) => Ok(r),
            Err(ImageError::NotFound { .. }) if name == DEFAULT_IMAGE => {
                self.build(DEFAULT_IMAGE, &Recipe::default_image(), false, progress)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Builds `name` from `recipe`. An image of that name made from the
    /// same recipe is returned as is; a registered image or one made from
    /// another recipe is replaced only with `force` (the default image is
    /// brought up to date without it).
    pub async fn build(
        &self,
        name: &str,
        recipe: &Recipe,
        force: bool,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ImageRecord, ImageError> {
        validate_name(name)?;
        let _g = self.build_lock.lock().await;
        if let Some(existing) = self.store.get_image(name)? {
            let same = existing.source == recipe.source();
            if !force && same {
                return Ok(existing);
            }
            let users = existing.source == SOURCE_REGISTERED || existing.source.starts_with(SOURCE_BUNDLE);
            if !force && (name != DEFAULT_IMAGE || users) {
                return Err(ImageError::OtherRecipe {
                    name: name.into(),
                    existing: existing.source,
                });
            }
            // Built beside the old image, which stays until the new one is
            // complete (a failed rebuild loses nothing), and after that for
            // as long as a VM made from it exists.
        }
        let kernel = self.kernels.ensure(progress).await?;
        std::fs::create_dir_all(&self.dir).map_err(io("creating the images directory"))?;
        let work = kernel::tempdir_in(&self.dir, ".build")?;
        let result = self.build_in(name, recipe, &kernel.dir, &work, progress).await;
        let _ = std::fs::remove_dir_all(&work);
        self.collect_garbage();
        result
    }

    /// Removes image directories banger built that neither an image record
    /// nor a VM (its pinned base) refers to any more. Only ever inside
    /// banger's own images directory; registered images are never touched.
    pub fn collect_garbage(&self) {
        let (Ok(images), Ok(vms)) = (self.store.list_images(), self.store.list_vms()) else {
            return;
        };
        let used: Vec<PathBuf> = images
            .iter()
            .map(|i| PathBuf::from(&i.rootfs))
            .chain(
                vms.iter()
                    .filter_map(|v| v.runtime.base_rootfs.as_ref().map(PathBuf::from)),
            )
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            // In-progress builds are the build lock holder's business.
            if name.starts_with('.') || !path.is_dir() || used.contains(&path) {
                continue;
            }
            tracing::info!(dir = %path.display(), "removing an image no image record or VM uses");
            let _ = std::fs::remove_dir_all(&path);
        }
    }

    async fn build_in(
        &self,
        name: &str,
        recipe: &Recipe,
        kernel_dir: &str,
        work: &Path,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ImageRecord, ImageError> {
        let root = work.join("root");
        let mirror = debian_mirror();
        progress(&format!(
            "debootstrap {} from {mirror} ({} packages)",
            recipe.suite,
            recipe.packages.len()
        ));
        // debootstrap's own "I: Retrieving/Unpacking/Configuring ..." lines
        // are the progress: a build takes a minute or more.
        let include = recipe.include_arg();
        sys::run_lines(
            "debootstrap",
            [
                "--variant=minbase".as_ref(),
                include.as_ref(),
                recipe.suite.as_ref(),
                root.as_os_str(),
                mirror.as_ref(),
            ],
            &|line: &str| {
                if let Some(step) = line.strip_prefix("I: ") {
                    progress(&format!("debootstrap: {step}"));
                }
            },
        )
        .await?;
        // The guest needs nothing more from the image: banger's init and
        // agent come with the initramfs, so they always match the host.
        let _ = std::fs::remove_dir_all(root.join("var/cache/apt/archives"));
        let _ = std::fs::remove_dir_all(root.join("var/lib/apt/lists"));
        // Host keys are made per VM at first boot, never shared by an image.
        for e in std::fs::read_dir(root.join("etc/ssh"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // A walk of the whole tree: off the async workers.
        let content = tokio::task::block_in_place(|| dir_size(&root));
        // Read-only at run time: room for ext4's metadata, nothing more,
        // unless the recipe asks for a size.
        let size = match recipe.size_mib {
            Some(mib) => mib << 20,
            None => (content + content / 4 + (64 << 20)).div_ceil(1 << 20) << 20,
        };
        let image = work.join("rootfs.ext4");
        mkfs(&root, &image, size, progress).await?;
        let digest = tokio::task::block_in_place(|| sys::sha256_file(&image))?;
        self.install(
            name,
            &image,
            size,
            recipe.source(),
            Some(digest),
            kernel_dir,
            progress,
        )
    }

    /// Moves a finished `rootfs.ext4` into a directory of its own and
    /// records it, replacing the record of the same name (whose files stay
    /// while a VM uses them).
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        name: &str,
        image: &Path,
        size: u64,
        source: String,
        digest: Option<String>,
        kernel_dir: &str,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ImageRecord, ImageError> {
        // A directory per build: VMs made from an earlier build keep its
        // file (their overlays sit on it) until they are deleted.
        let dest_dir = self.dir.join(format!("{name}.{:08x}", kernel::rand_u32()));
        std::fs::create_dir_all(&dest_dir).map_err(io("creating the image directory"))?;
        let dest = dest_dir.join("rootfs.ext4");
        std::fs::rename(image, &dest).map_err(io("installing rootfs.ext4"))?;
        let rec = ImageRecord {
            name: name.to_string(),
            rootfs: dest.display().to_string(),
            kernel: kernel_dir.to_string(),
            initrd: None,
            size_bytes: size,
            source,
            created_at: banger_store::now(),
            digest,
        };
        // The swap: only now does the old record go (its files stay while
        // a VM uses them).
        if self.store.get_image(name)?.is_some() {
            self.store.delete_image(name)?;
        }
        self.store.insert_image(&rec)?;
        progress("image ready");
        Ok(rec)
    }

    /// Imports an OCI or Docker image: `from` is an absolute path (an OCI
    /// image layout, an OCI or `docker save` archive) or a registry
    /// reference. Its layers are flattened (whiteouts honoured; owners,
    /// modes, xattrs and hard links kept) and made into an ext4 image
    /// without mounting anything. The agent needs nothing from the image:
    /// it comes with the initramfs, with its own libc.
    pub async fn import(
        &self,
        name: &str,
        from: &str,
        force: bool,
        kernel: Option<&str>,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ImageRecord, ImageError> {
        validate_name(name)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ImageError::NeedsRoot);
        }
        let _g = self.build_lock.lock().await;
        if self.store.get_image(name)?.is_some() && !force {
            return Err(ImageError::Exists { name: name.into() });
        }
        let kernel = match kernel {
            Some(k) => self.kernels.get(k)?,
            None => self.kernels.ensure(progress).await?,
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating the images directory"))?;
        let work = kernel::tempdir_in(&self.dir, ".import")?;
        let result = self.import_in(name, from, &kernel.dir, &work, progress).await;
        let _ = std::fs::remove_dir_all(&work);
        self.collect_garbage();
        result
    }

    async fn import_in(
        &self,
        name: &str,
        from: &str,
        kernel_dir: &str,
        work: &Path,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ImageRecord, ImageError> {
        let oci = |source| ImageError::Oci {
            from: from.to_string(),
            source,
        };
        let (path, source) = if from.starts_with('/') {
            (PathBuf::from(from), format!("oci:{from}"))
        } else {
            let reference = banger_oci::registry::parse(from).map_err(oci)?;
            let layout = work.join("pulled");
            banger_oci::registry::pull(&reference, &layout, progress)
                .await
                .map_err(oci)?;
            (layout, format!("registry:{}", reference.whole()))
        };
        progress(&format!("reading {from}"));
        // Unpacking and writing are long stretches of blocking file work.
        let (image, written) = tokio::task::block_in_place(|| {
            let image = banger_oci::open(&path, work).map_err(oci)?;
            let tree = banger_oci::flatten(&image, work, progress).map_err(oci)?;
            let totals = tree.totals();
            progress(&format!(
                "writing {} entries ({} MiB)",
                totals.entries,
                totals.bytes >> 20
            ));
            let written = banger_oci::write::write(&tree, &work.join("root")).map_err(oci)?;
            // The unpacked layers are not needed any more: free the space
            // before the ext4 image takes as much again.
            for i in 0..image.layers.len() {
                let _ = std::fs::remove_file(work.join(format!("layer-{i}.tar")));
            }
            Ok::<_, ImageError>((image, written))
        })?;
        let entries = written.files + written.dirs + written.symlinks + written.devices;
        // Room for ext4's metadata and a block per small file; read-only
        // at run time, so nothing more.
        let size = (written.bytes + written.bytes / 4 + entries * 4096 + (64 << 20)).div_ceil(1 << 20) << 20;
        let rootfs = work.join("rootfs.ext4");
        mkfs(&work.join("root"), &rootfs, size, progress).await?;
        self.install(
            name,
            &rootfs,
            size,
            source,
            Some(image.digest),
            kernel_dir,
            progress,
        )
    }

    /// Writes image `name` and its kernel as a bundle at `out` (an
    /// absolute path); see [`crate::bundle`].
    pub async fn export(&self, name: &str, out: &str) -> Result<crate::bundle::Manifest, ImageError> {
        let img = self.get(name)?;
        let out = PathBuf::from(out);
        if !out.is_absolute() {
            return Err(ImageError::InvalidName(format!(
                "the bundle path must be absolute, not {}",
                out.display()
            )));
        }
        let k = self.kernels.get(&img.kernel)?;
        let (rootfs, kdir, version, name) = (
            PathBuf::from(&img.rootfs),
            PathBuf::from(&k.dir),
            k.version,
            img.name,
        );
        let path = out.display().to_string();
        tokio::task::spawn_blocking(move || {
            crate::bundle::export(&name, Some(&rootfs), &kdir, &version, &out)
        })
        .await
        .map_err(|e| ImageError::InvalidRecipe(e.to_string()))?
        .map_err(|source| ImageError::Bundle { path, source })
    }

    /// Unpacks the bundle `from` names (a file, an https URL or a catalog
    /// entry of `kind`) into a fresh staging directory. Returns its
    /// manifest, the staging directory (the caller removes it) and where
    /// the bundle came from, for the record. A download is removed here.
    async fn stage(
        &self,
        from: &PullFrom<'_>,
        kind: &str,
    ) -> Result<(crate::bundle::Manifest, PathBuf, String), ImageError> {
        let source = crate::remote::resolve(from.src, from.sha256, from.catalog, kind).await?;
        let tmp = self.dir.parent().unwrap_or(&self.dir).join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io("creating the staging directory"))?;
        let id = kernel::rand_u32();
        let staging = tmp.join(format!("pull-{id:08x}"));
        let (file, origin, download) = match source {
            crate::remote::Source::File(p) => {
                let o = p.display().to_string();
                (p, o, None)
            }
            crate::remote::Source::Https { url, sha256, size } => {
                let dl = tmp.join(format!("pull-{id:08x}.download"));
                crate::remote::download(&url, sha256.as_deref(), size, &dl).await?;
                (dl.clone(), url, Some(dl))
            }
        };
        let st = staging.clone();
        let unpacked = tokio::task::spawn_blocking(move || crate::bundle::unpack(&file, &st)).await;
        if let Some(dl) = download {
            let _ = std::fs::remove_file(dl);
        }
        let m = unpacked
            .map_err(|e| ImageError::InvalidRecipe(e.to_string()))?
            .map_err(|source| ImageError::Bundle {
                path: origin.clone(),
                source,
            })?;
        Ok((m, staging, origin))
    }

    /// Installs an image (and its kernel, unless this host has the same
    /// one) from a bundle: every hash checked while it streams; published
    /// by renames only once all of it is good, so a failed pull leaves
    /// nothing.
    pub async fn pull(&self, from: &PullFrom<'_>, name: Option<&str>) -> Result<ImageRecord, ImageError> {
        if let Some(n) = name {
            validate_name(n)?;
        }
        let _g = self.build_lock.lock().await;
        let (manifest, staging, origin) = self.stage(from, "image").await?;
        let published = self.publish(&manifest, &staging, name, &origin);
        let _ = std::fs::remove_dir_all(&staging);
        published
    }

    /// The bundle's kernel: reused when this host has the same one (same
    /// `vmlinuz` hash), refused when it has a different one of that
    /// version, else moved in. Returns its directory and whether it was
    /// moved in now.
    fn install_kernel(
        &self,
        m: &crate::bundle::Manifest,
        staging: &Path,
    ) -> Result<(PathBuf, bool), ImageError> {
        let kernels = self.dir.parent().unwrap_or(&self.dir).join("kernels");
        let kdir = kernels.join(&m.kernel_version);
        let want = m
            .member("kernel/vmlinuz")
            .map(|x| x.sha256.clone())
            .unwrap_or_default();
        if kdir.exists() {
            let have = crate::bundle::sha256_file(&kdir.join("vmlinuz")).unwrap_or_default();
            if have != want {
                return Err(ImageError::KernelDiffers {
                    version: m.kernel_version.clone(),
                });
            }
            return Ok((kdir, false));
        }
        std::fs::create_dir_all(&kernels).map_err(io("creating the kernels directory"))?;
        std::fs::rename(staging.join("kernel"), &kdir).map_err(io("installing the kernel"))?;
        Ok((kdir, true))
    }

    /// Writes a stored kernel as a bundle at `out` (an absolute path).
    pub async fn export_kernel(
        &self,
        version: &str,
        out: &str,
    ) -> Result<crate::bundle::Manifest, ImageError> {
        let k = self.kernels.get(version)?;
        let out = PathBuf::from(out);
        if !out.is_absolute() {
            return Err(ImageError::InvalidName(format!(
                "the bundle path must be absolute, not {}",
                out.display()
            )));
        }
        let (kdir, v) = (PathBuf::from(&k.dir), k.version);
        let path = out.display().to_string();
        tokio::task::spawn_blocking(move || crate::bundle::export(&v, None, &kdir, &v, &out))
            .await
            .map_err(|e| ImageError::InvalidRecipe(e.to_string()))?
            .map_err(|source| ImageError::Bundle { path, source })
    }

    /// Installs a kernel from a bundle (an image bundle's kernel too),
    /// after the same checks as `pull`; a kernel already here with the
    /// same hash is kept as it is. Returns its version.
    pub async fn pull_kernel(&self, from: &PullFrom<'_>) -> Result<String, ImageError> {
        let _g = self.build_lock.lock().await;
        let (m, staging, _) = self.stage(from, "kernel").await?;
        let r = self
            .install_kernel(&m, &staging)
            .and_then(|(kdir, _)| Ok(self.kernels.get(&kdir.display().to_string())?.version));
        let _ = std::fs::remove_dir_all(&staging);
        r
    }

    fn publish(
        &self,
        m: &crate::bundle::Manifest,
        staging: &Path,
        name: Option<&str>,
        src: &str,
    ) -> Result<ImageRecord, ImageError> {
        if m.kind != "image" {
            return Err(ImageError::Bundle {
                path: src.to_string(),
                source: crate::bundle::BundleError::Refused(format!(
                    "it holds a {}, not an image (banger kernel pull takes it)",
                    m.kind
                )),
            });
        }
        let name = name.unwrap_or(&m.name).to_string();
        validate_name(&name)?;
        if self.store.get_image(&name)?.is_some() {
            return Err(ImageError::Exists { name });
        }
        let (kdir, made_kernel) = self.install_kernel(m, staging)?;
        let undo = |e: ImageError| {
            if made_kernel {
                let _ = std::fs::remove_dir_all(&kdir);
            }
            e
        };
        let k = self
            .kernels
            .get(&kdir.display().to_string())
            .map_err(|e| undo(e.into()))?;
        let rootfs = staging.join("rootfs.ext4");
        if !is_ext4(&rootfs) {
            return Err(undo(ImageError::NotExt4 {
                rootfs: "rootfs.ext4 of the bundle".into(),
            }));
        }
        let size = m.member("rootfs.ext4").map(|x| x.size).unwrap_or(0);
        let digest = m.member("rootfs.ext4").map(|x| format!("sha256:{}", x.sha256));
        self.install(
            &name,
            &rootfs,
            size,
            format!("{SOURCE_BUNDLE}{src}"),
            digest,
            &k.dir,
            &|_| (),
        )
        .map_err(undo)
    }

    /// Registers an existing rootfs (used in place, never copied or
    /// deleted by banger) with a stored kernel.
    pub fn register(&self, name: &str, rootfs: &str, kernel: &str) -> Result<ImageRecord, ImageError> {
        validate_name(name)?;
        let p = Path::new(rootfs);
        if !p.is_absolute() {
            return Err(ImageError::RelativeRootfs {
                rootfs: rootfs.into(),
            });
        }
        // Stored resolved: a symlink could later be pointed elsewhere.
        let real = p.canonicalize().map_err(|source| ImageError::RootfsMissing {
            rootfs: rootfs.into(),
            source,
        })?;
        let meta = std::fs::metadata(&real).map_err(|source| ImageError::RootfsMissing {
            rootfs: rootfs.into(),
            source,
        })?;
        if !meta.is_file() || !is_ext4(&real) {
            return Err(ImageError::NotExt4 {
                rootfs: rootfs.into(),
            });
        }
        let k = self.kernels.get(kernel)?;
        let rec = ImageRecord {
            name: name.to_string(),
            rootfs: real.display().to_string(),
            kernel: k.dir,
            initrd: None,
            size_bytes: meta.len(),
            source: SOURCE_REGISTERED.into(),
            created_at: banger_store::now(),
            digest: None,
        };
        self.store.insert_image(&rec)?;
        Ok(rec)
    }

    /// Deletes an image no VM uses. Files are removed only for images banger built.
    /// Refuses when a VM uses the image.
    fn ensure_unused(&self, name: &str) -> Result<(), ImageError> {
        let users: Vec<String> = self
            .store
            .list_vms()?
            .into_iter()
            .filter(|v| v.spec.image == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(ImageError::InUse {
                name: name.into(),
                users,
            });
        }
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), ImageError> {
        let rec = self.get(name)?;
        self.ensure_unused(name)?;
        self.store.delete_image(name)?;
        if rec.source != SOURCE_REGISTERED {
            self.collect_garbage();
        }
        Ok(())
    }
}
