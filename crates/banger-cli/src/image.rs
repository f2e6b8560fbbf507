//! `banger image ...` and `banger kernel ...`.

use crate::output::print;
use anyhow::Result;
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::Client;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build an image from Debian bookworm (the default image unless named).
    Build {
        #[arg(long, default_value = "default")]
        name: String,
        /// Rebuild even if it exists (VMs made from the old one keep it).
        #[arg(long)]
        force: bool,
        /// Debian packages to add, comma-separated (banger's own needs are
        /// always included; the default image is a dev box).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// Debian suite: bookworm or trixie.
        #[arg(long)]
        suite: Option<String>,
        /// Image size in MiB (default: fitted to its content).
        #[arg(long)]
        size: Option<u64>,
    },
    /// Import an OCI or Docker image: an OCI image layout directory, an
    /// OCI or `docker save` archive (plain or gzip), or a registry
    /// reference such as docker.io/library/python:3.12.
    Import {
        name: String,
        from: String,
        /// Replace an image of that name (VMs made from it keep the old one).
        #[arg(long)]
        force: bool,
        /// Kernel version or kernel directory (default: the Debian kernel).
        #[arg(long)]
        kernel: Option<String>,
    },
    /// List images.
    List,
    /// Show one image.
    Show {
        #[arg(add = crate::complete::images())]
        name: String,
    },
    /// Delete an image no VM uses.
    Delete {
        #[arg(add = crate::complete::images())]
        name: String,
    },
    /// Write an image and its kernel as one .tar.zst bundle, every file's
    /// sha256 pinned in its manifest.
    Export {
        #[arg(add = crate::complete::images())]
        name: String,
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
    },
    /// Install an image (and its kernel) from a bundle: a file, an
    /// https:// URL or the name of a catalog entry. Every hash is checked
    /// while it streams; a bad bundle leaves nothing behind.
    Pull {
        #[command(flatten)]
        from: PullSource,
        /// The image's name here (the bundle's own by default).
        #[arg(long)]
        name: Option<String>,
    },
    /// Register an existing ext4 root filesystem (used in place).
    Register {
        name: String,
        #[arg(long)]
        rootfs: std::path::PathBuf,
        /// Kernel version or kernel directory.
        #[arg(long)]
        kernel: String,
    },
}

#[derive(Subcommand)]
pub enum KernelCmd {
    /// Download and store the Debian cloud kernel.
    Fetch,
    /// List stored kernels.
    List,
    /// Show one kernel.
    Show {
        #[arg(add = crate::complete::kernels())]
        version: String,
    },
    /// Remove a stored kernel.
    Rm {
        #[arg(add = crate::complete::kernels())]
        version: String,
    },
    /// Write a stored kernel as a .tar.zst bundle, every file's sha256
    /// pinned in its manifest.
    Export {
        #[arg(add = crate::complete::kernels())]
        version: String,
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
    },
    /// Install a kernel from a bundle (a kernel's or an image's): every
    /// hash checked while it streams; a bad bundle leaves nothing behind.
    Pull {
        #[command(flatten)]
        from: PullSource,
    },
}

/// Where `image pull` and `kernel pull` take a bundle from.
#[derive(clap::Args)]
pub struct PullSource {
    /// A bundle file, an https:// URL, or a catalog entry's name.
    src: String,
    /// The sha256 (hex) the downloaded bundle must have; a catalog entry
    /// carries its own.
    #[arg(long)]
    sha256: Option<String>,
    /// The catalog to look a name up in (a file or an https:// URL;
    /// default: `catalog` in config.toml).
    #[arg(long)]
    catalog: Option<String>,
}

impl PullSource {
    /// The request: files and catalog files made absolute (the daemon
    /// resolves nothing against this command's directory).
    fn request(self, name: Option<String>) -> Result<d::ImagePull> {
        let abs = |s: String| -> Result<String> {
            if s.contains("://") || !(s.contains('/') || std::path::Path::new(&s).exists()) {
                Ok(s)
            } else {
                Ok(std::path::absolute(&s)?.display().to_string())
            }
        };
        Ok(d::ImagePull {
            src: abs(self.src)?,
            name,
            sha256: self.sha256,
            catalog: self.catalog.map(abs).transpose()?,
        })
    }
}

fn show_image(i: &d::ImageInfo) {
    println!(
        "name:    {}\nrootfs:  {}\nkernel:  {}\nsize:    {} MiB\nsource:  {}\ndigest:  {}\ncreated: {}",
        i.name,
        i.rootfs,
        i.kernel,
        i.size_bytes >> 20,
        i.source,
        i.digest.as_deref().unwrap_or("-"),
        i.created_at
    );
}

fn show_kernel(k: &d::KernelInfo) {
    println!(
        "version: {}\ndir:     {}\npackage: {}\nsha256:  {}\nmodules: {}",
        k.version,
        k.dir,
        k.package,
        k.sha256,
        k.modules.join(" ")
    );
}

fn progress(p: d::Progress) {
    eprintln!("  [{:>6.1}s] {}", p.elapsed_ms as f64 / 1000.0, p.stage);
}

pub async fn run_image(c: &Client, cmd: ImageCmd, json: bool) -> Result<i32> {
    match cmd {
        ImageCmd::Build {
            name,
            force,
            packages,
            suite,
            size,
        } => {
            let req = d::ImageBuild {
                name,
                force,
                packages,
                suite,
                size_mib: size,
            };
            let i = c.call_with_events::<d::ImageBuildM>(&req, None, progress).await?;
            print(json, &i, show_image);
        }
        ImageCmd::Import {
            name,
            from,
            force,
            kernel,
        } => {
            // A path that exists here is sent absolute; anything else is a
            // registry reference.
            let from = if std::path::Path::new(&from).exists() {
                std::path::absolute(&from)?.display().to_string()
            } else {
                from
            };
            let req = d::ImageImport {
                name,
                from,
                force,
                kernel,
            };
            let i = c
                .call_with_events::<d::ImageImportM>(&req, None, progress)
                .await?;
            print(json, &i, show_image);
        }
        ImageCmd::List => {
            let list = c.call::<d::ImageList>(&Empty {}, None).await?;
            print(json, &list, |l| {
                for i in l {
                    println!("{:<16} {:>6} MiB  {}", i.name, i.size_bytes >> 20, i.source);
                }
            });
        }
        ImageCmd::Show { name } => print(
            json,
            &c.call::<d::ImageShow>(&d::NameRef { name }, None).await?,
            show_image,
        ),
        ImageCmd::Delete { name } => {
            c.call::<d::ImageDelete>(&d::NameRef { name: name.clone() }, None)
                .await?;
            println!("deleted image {name}");
        }
        ImageCmd::Export { name, output } => {
            let path = std::path::absolute(&output)?.display().to_string();
            let b = c
                .call::<d::ImageExportM>(&d::ImageExport { name, path }, None)
                .await?;
            print(json, &b, |b| {
                println!(
                    "wrote {} ({} files, {} MiB before compression, kernel {})",
                    b.path,
                    b.members,
                    b.bytes >> 20,
                    b.kernel_version
                )
            });
        }
        ImageCmd::Pull { from, name } => {
            let i = c.call::<d::ImagePullM>(&from.request(name)?, None).await?;
            print(json, &i, show_image);
        }
        ImageCmd::Register { name, rootfs, kernel } => {
            let rootfs = std::path::absolute(&rootfs)?.display().to_string();
            let i = c
                .call::<d::ImageRegisterM>(&d::ImageRegister { name, rootfs, kernel }, None)
                .await?;
            print(json, &i, show_image);
        }
    }
    Ok(0)
}

pub async fn run_kernel(c: &Client, cmd: KernelCmd, json: bool) -> Result<i32> {
    match cmd {
        KernelCmd::Fetch => print(
            json,
            &c.call_with_events::<d::KernelFetch>(&Empty {}, None, progress)
                .await?,
            show_kernel,
        ),
        KernelCmd::List => {
            let list = c.call::<d::KernelList>(&Empty {}, None).await?;
            print(json, &list, |l| {
                for k in l {
                    println!("{:<24} {}", k.version, k.source);
                }
            });
        }
        KernelCmd::Show { version } => print(
            json,
            &c.call::<d::KernelShow>(&d::NameRef { name: version }, None)
                .await?,
            show_kernel,
        ),
        KernelCmd::Export { version, output } => {
            let path = std::path::absolute(&output)?.display().to_string();
            let b = c
                .call::<d::KernelExportM>(&d::ImageExport { name: version, path }, None)
                .await?;
            print(json, &b, |b| {
                println!(
                    "wrote {} ({} files, {} MiB before compression)",
                    b.path,
                    b.members,
                    b.bytes >> 20
                )
            });
        }
        KernelCmd::Pull { from } => {
            let k = c.call::<d::KernelPullM>(&from.request(None)?, None).await?;
            print(json, &k, |k| println!("kernel {} ready in {}", k.version, k.dir));
        }
        KernelCmd::Rm { version } => {
            c.call::<d::KernelRm>(
                &d::NameRef {
                    name: version.clone(),
                },
                None,
            )
            .await?;
            println!("removed kernel {version}");
        }
    }
    Ok(0)
}
