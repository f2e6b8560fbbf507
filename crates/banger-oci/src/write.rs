//! Writes a flattened tree into a fresh directory, as root: owners, modes
//! (setuid kept: set after the owner), xattrs (file capabilities such as
//! `ping`'s), times, hard links, device nodes.
//!
//! Every parent written to is a directory this writer made, and every
//! file is created with `O_EXCL | O_NOFOLLOW`: the only symlinks in the
//! output are leaves it made itself, and nothing is written through one.

use crate::error::io;
use crate::tree::{Content, Kind, Name, Node, Tree};
use crate::{Error, Result};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What went into the directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub devices: u64,
    pub bytes: u64,
    /// Extended attributes the host filesystem refused (logged).
    pub xattrs_refused: u64,
}

struct Writer<'a> {
    tree: &'a Tree,
    layers: Vec<Option<File>>,
    out: Written,
    links: Vec<(PathBuf, Vec<Name>, Content)>,
}

/// Writes `tree` into `dest`, which must not exist yet.
pub fn write(tree: &Tree, dest: &Path) -> Result<Written> {
    std::fs::create_dir(dest).map_err(io(format!("creating {}", dest.display())))?;
    let mut w = Writer {
        tree,
        layers: Vec::new(),
        out: Written::default(),
        links: Vec::new(),
    };
    w.children(tree.root(), dest)?;
    w.meta(tree.root(), dest, false)?;
    // Hard links last: their targets exist by now.
    for (path, target, content) in std::mem::take(&mut w.links) {
        let target_path = target
            .iter()
            .fold(dest.to_path_buf(), |p, c| p.join(std::ffi::OsStr::from_bytes(c)));
        match tree.get(&target) {
            Some(Node {
                kind: Kind::File(c), ..
            }) if *c == content => {
                std::fs::hard_link(&target_path, &path).map_err(io(format!("linking {}", path.display())))?;
                w.out.hardlinks += 1;
            }
            // The target was replaced or removed by a later layer: the
            // link keeps the bytes it had.
            _ => {
                let meta = tree
                    .get(&target)
                    .map(|n| n.meta.clone())
                    .unwrap_or_else(|| crate::tree::Meta {
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        xattrs: Vec::new(),
                    });
                w.file(&path, content)?;
                w.meta(
                    &Node {
                        meta,
                        kind: Kind::File(content),
                    },
                    &path,
                    false,
                )?;
            }
        }
    }
    Ok(w.out)
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("a NUL byte in {}", p.display())))
}

impl Writer<'_> {
    fn children(&mut self, dir: &Node, path: &Path) -> Result<()> {
        let Kind::Dir(children) = &dir.kind else {
            return Ok(());
        };
        for (name, node) in children {
            if name.contains(&0) {
                return Err(Error::Invalid("a NUL byte in a file name".into()));
            }
            let p = path.join(std::ffi::OsStr::from_bytes(name));
            self.node(node, &p)?;
        }
        Ok(())
    }

    fn node(&mut self, node: &Node, path: &Path) -> Result<()> {
        let c = cstr(path)?;
        match &node.kind {
            Kind::Dir(_) => {
                std::fs::create_dir(path).map_err(io(format!("creating {}", path.display())))?;
                self.out.dirs += 1;
                self.children(node, path)?;
            }
            Kind::File(content) => {
                self.file(path, *content)?;
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), path)
                    .map_err(io(format!("creating {}", path.display())))?;
                self.out.symlinks += 1;
            }
            Kind::Hardlink { target, content } => {
                self.links.push((path.to_path_buf(), target.clone(), *content));
                return Ok(());
            }
            Kind::Char(major, minor) | Kind::Block(major, minor) => {
                let kind = if matches!(node.kind, Kind::Char(..)) {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                // SAFETY: a valid C path; mknod only creates the node.
                let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(*major, *minor)) };
                if rc != 0 {
                    return Err(io(format!("creating device {}", path.display()))(
                        std::io::Error::last_os_error(),
                    ));
                }
                self.out.devices += 1;
            }
            Kind::Fifo => {
                // SAFETY: a valid C path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    return Err(io(format!("creating fifo {}", path.display()))(
                        std::io::Error::last_os_error(),
                    ));
                }
                self.out.devices += 1;
            }
        }
        self.meta(node, path, matches!(node.kind, Kind::Symlink(_)))
    }

    fn file(&mut self, path: &Path, content: Content) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(path)
            .map_err(io(format!("creating {}", path.display())))?;
        let src = self.layer(content.layer)?;
        src.seek(SeekFrom::Start(content.offset))
            .map_err(io(format!("reading layer {}", content.layer + 1)))?;
        let n = std::io::copy(&mut src.take(content.size), &mut f)
            .map_err(io(format!("writing {}", path.display())))?;
        if n != content.size {
            return Err(Error::Invalid(format!(
                "layer {} ends inside {}",
                content.layer + 1,
                path.display()
            )));
        }
        self.out.files += 1;
        self.out.bytes += n;
        Ok(())
    }

    fn layer(&mut self, i: usize) -> Result<&mut File> {
        if self.layers.len() <= i {
            self.layers.resize_with(i + 1, || None);
        }
        if self.layers[i].is_none() {
            let p = self.tree.layer_path(i);
            self.layers[i] = Some(File::open(p).map_err(io(format!("opening {}", p.display())))?);
        }
        Ok(self.layers[i].as_mut().expect("opened above"))
    }

    /// Owner, then mode (a change of owner clears setuid), xattrs, times.
    fn meta(&mut self, node: &Node, path: &Path, symlink: bool) -> Result<()> {
        let m = &node.meta;
        std::os::unix::fs::lchown(path, Some(m.uid), Some(m.gid))
            .map_err(io(format!("setting the owner of {}", path.display())))?;
        if !symlink {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m.mode))
                .map_err(io(format!("setting the mode of {}", path.display())))?;
        }
        let c = cstr(path)?;
        for (name, value) in &m.xattrs {
            let Ok(name_c) = CString::new(name.clone()) else {
                continue;
            };
            // SAFETY: valid C strings and a live buffer of the given length.
            let rc = unsafe {
                libc::lsetxattr(c.as_ptr(), name_c.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            };
            if rc != 0 {
                self.out.xattrs_refused += 1;
                tracing::warn!(
                    path = %path.display(),
                    xattr = %String::from_utf8_lossy(name),
                    error = %std::io::Error::last_os_error(),
                    "the host filesystem refused an extended attribute"
                );
            }
        }
        let t = libc::timespec {
            tv_sec: m.mtime.min(i64::MAX as u64) as libc::time_t,
            tv_nsec: 0,
        };
        let times = [t, t];
        // SAFETY: a valid C path and two timespecs.
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        Ok(())
    }
}
