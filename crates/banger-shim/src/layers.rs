//! An image's layers (containerd's overlayfs snapshots) merged in user
//! space into the tree overlayfs would show, and a key for that tree.
//!
//! The layers are root-owned but their contents come from whoever built
//! the image, so nothing here follows a symlink: not in a layer, and not
//! in the tree being built, where a lower layer's `a -> /etc` must not
//! let an upper layer's `a/passwd` land in the host's `/etc`. Every
//! directory we descend into in `dest` is one we checked (lstat) or made.

use crate::banger::Failed;
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const OPAQUE: &[u8] = b"trusted.overlay.opaque\0";

/// Builds at `dest` the merge of `layers` (topmost first, as overlayfs's
/// lowerdir lists them). Files are hard links into the layers where the
/// filesystem allows, so the tree must be read, never modified.
pub fn merge(layers: &[String], dest: &Path) -> Result<(), Failed> {
    let fail = |what: &str, e: io::Error| Failed(format!("{what} {}: {e}", dest.display()));
    // A crash of an earlier make may have left one.
    remove(dest).map_err(|e| fail("clearing", e))?;
    fs::create_dir(dest).map_err(|e| fail("creating", e))?;
    for layer in layers.iter().rev() {
        apply(Path::new(layer), dest)
            .map_err(|e| Failed(format!("merging layer {layer} into {}: {e}", dest.display())))?;
    }
    Ok(())
}

/// Applies the layer directory `src` over `dst`, a real directory.
fn apply(src: &Path, dst: &Path) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (s, d) = (entry.path(), dst.join(entry.file_name()));
        let m = s.symlink_metadata()?;
        let old = d.symlink_metadata().ok();
        if is_whiteout(&m) {
            remove(&d)?;
        } else if m.is_dir() {
            match old {
                Some(o) if o.is_dir() => {
                    if opaque(&s) {
                        for e in fs::read_dir(&d)? {
                            remove(&e?.path())?;
                        }
                    }
                }
                Some(_) => {
                    remove(&d)?;
                    fs::create_dir(&d)?;
                }
                None => fs::create_dir(&d)?,
            }
            apply(&s, &d)?;
        } else {
            if old.is_some() {
                remove(&d)?;
            }
            place(&s, &m, &d)?;
        }
    }
    // After the contents, whose creation would move the mtime; the upper
    // layer's directory is what overlayfs shows.
    set_attrs(dst, &src.symlink_metadata()?)
}

/// Recreates the non-directory `s` at `d`, where nothing is.
fn place(s: &Path, m: &Metadata, d: &Path) -> io::Result<()> {
    let t = m.file_type();
    if t.is_file() {
        // A hard link already has the layer file's attributes: setting
        // them would write to the layer.
        return fs::hard_link(s, d).or_else(|_| copy(s, m, d));
    } else if t.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(s)?, d)?;
    } else if t.is_socket() {
        // A leftover of a process at build time; nothing can use it.
        return Ok(());
    } else {
        let p = cstr(d)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::mknod(p.as_ptr(), m.mode() as libc::mode_t, m.rdev() as libc::dev_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    set_attrs(d, m)
}

/// Copies the regular file `s` to `d`, for when a hard link cannot be
/// made (another filesystem).
fn copy(s: &Path, m: &Metadata, d: &Path) -> io::Result<()> {
    let mut from = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(s)?;
    // create_new (O_EXCL) refuses whatever is at `d`, a symlink included.
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(d)?;
    io::copy(&mut from, &mut to)?;
    drop(to);
    set_attrs(d, m)
}

/// Gives `p` (made by us, not a symlink unless `m` is one) `m`'s owner,
/// mode and times.
fn set_attrs(p: &Path, m: &Metadata) -> io::Result<()> {
    // Owner first: a chown clears setuid and setgid bits.
    std::os::unix::fs::lchown(p, Some(m.uid()), Some(m.gid()))?;
    if !m.file_type().is_symlink() {
        fs::set_permissions(p, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    let c = cstr(p)?;
    let times = [
        libc::timespec {
            tv_sec: m.atime() as libc::time_t,
            tv_nsec: m.atime_nsec() as _,
        },
        libc::timespec {
            tv_sec: m.mtime() as libc::time_t,
            tv_nsec: m.mtime_nsec() as _,
        },
    ];
    // SAFETY: a valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes whatever is at `p` (a directory with its contents; a symlink,
/// not what it points to), if anything.
fn remove(p: &Path) -> io::Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// overlayfs's "deleted here": a 0/0 character device.
fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Whether a layer's directory hides the lower layers' one.
fn opaque(dir: &Path) -> bool {
    let Ok(p) = cstr(dir) else { return false };
    let mut v = [0u8; 1];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), OPAQUE.as_ptr().cast(), v.as_mut_ptr().cast(), v.len()) };
    n == 1 && v[0] == b'y'
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with NUL"))
}

/// A key for the merged tree of `layers` from their metadata alone (no
/// file is read): every entry's path, type, mode, owner, size, mtime,
/// device, link target and opacity. The same image unpacked elsewhere
/// gives the same key; a file touched, resized, chmodded, added or
/// removed gives another.
pub fn fingerprint(layers: &[String]) -> String {
    let mut h = Sha256::new();
    for layer in layers {
        h.update(b"\x01layer\0");
        walk(Path::new(layer), Path::new(""), &mut h);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn walk(root: &Path, rel: &Path, h: &mut Sha256) {
    let p = root.join(rel);
    let Ok(m) = p.symlink_metadata() else {
        // Unreadable is not the same as absent.
        h.update(b"?\0");
        return;
    };
    let target = match m.file_type().is_symlink() {
        true => fs::read_link(&p).unwrap_or_default(),
        false => Default::default(),
    };
    // A directory's size is an artifact of its filesystem and history;
    // its contents are hashed as entries of their own.
    let size = if m.is_dir() { 0 } else { m.size() };
    h.update(rel.as_os_str().as_bytes());
    h.update(b"\0");
    h.update(
        format!(
            "{:o} {} {} {size} {}.{} {} {}\0",
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec(),
            m.rdev(),
            m.is_dir() && opaque(&p),
        )
        .as_bytes(),
    );
    h.update(target.as_os_str().as_bytes());
    h.update(b"\0");
    if m.is_dir() {
        let Ok(rd) = fs::read_dir(&p) else {
            h.update(b"?\0");
            return;
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        names.sort();
        for n in names {
            walk(root, &rel.join(n), h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    /// A fresh directory under the temp dir, removed when dropped.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!("banger-layers-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    fn whiteout(p: &Path) {
        let c = cstr(p).unwrap();
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, 0) }, 0);
    }

    fn set_opaque(p: &Path) {
        let c = cstr(p).unwrap();
        let rc = unsafe { libc::lsetxattr(c.as_ptr(), OPAQUE.as_ptr().cast(), b"y".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    /// Every path under `root` with its file contents or link target
    /// ("/" for a directory), sorted.
    fn listing(root: &Path) -> Vec<(String, String)> {
        let mut out = vec![];
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = p.symlink_metadata().unwrap();
                let what = if m.is_dir() {
                    stack.push(p.clone());
                    "/".into()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", fs::read_link(&p).unwrap().display())
                } else if m.is_file() {
                    fs::read_to_string(&p).unwrap()
                } else {
                    format!("node {:o}", m.mode())
                };
                out.push((rel, what));
            }
        }
        out.sort();
        out
    }

    fn strs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn layer_paths(l: &[&Tmp]) -> Vec<String> {
        l.iter().map(|t| t.0.display().to_string()).collect()
    }

    #[test]
    fn whiteouts_replacements_and_opaque_dirs() {
        let (lower, upper, out) = (Tmp::new("a-lower"), Tmp::new("a-upper"), Tmp::new("a-out"));
        write(&lower.0.join("gone"), "lower");
        write(&lower.0.join("kept"), "lower");
        write(&lower.0.join("replaced"), "lower");
        write(&lower.0.join("dir/old"), "lower");
        write(&lower.0.join("opq/hidden"), "lower");
        write(&lower.0.join("opq/sub/deep"), "lower");
        whiteout(&upper.0.join("gone"));
        write(&upper.0.join("replaced"), "upper");
        write(&upper.0.join("added"), "upper");
        write(&upper.0.join("dir/new"), "upper");
        write(&upper.0.join("opq/shown"), "upper");
        set_opaque(&upper.0.join("opq"));
        // A whiteout of nothing is harmless.
        whiteout(&upper.0.join("never"));
        let dest = out.0.join("tree");
        // A leftover of a crashed make is replaced.
        write(&dest.join("stale"), "old");

        merge(&layer_paths(&[&upper, &lower]), &dest).unwrap();
        assert_eq!(
            listing(&dest),
            strs(&[
                ("added", "upper"),
                ("dir", "/"),
                ("dir/new", "upper"),
                ("dir/old", "lower"),
                ("kept", "lower"),
                ("opq", "/"),
                ("opq/shown", "upper"),
                ("replaced", "upper"),
            ])
        );
        // Removing the tree leaves the layers' files.
        fs::remove_dir_all(&dest).unwrap();
        assert_eq!(fs::read_to_string(lower.0.join("kept")).unwrap(), "lower");
    }

    #[test]
    fn modes_owners_times_and_links_are_kept() {
        let (layer, out) = (Tmp::new("b-layer"), Tmp::new("b-out"));
        let l = &layer.0;
        write(&l.join("bin/su"), "setuid");
        std::os::unix::fs::chown(l.join("bin/su"), Some(0), Some(0)).unwrap();
        fs::set_permissions(l.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        write(&l.join("home/u/f"), "mine");
        std::os::unix::fs::chown(l.join("home/u/f"), Some(1000), Some(1001)).unwrap();
        std::os::unix::fs::chown(l.join("home/u"), Some(1000), Some(1001)).unwrap();
        fs::set_permissions(l.join("home/u"), fs::Permissions::from_mode(0o700)).unwrap();
        symlink("../bin/su", l.join("home/link")).unwrap();
        std::os::unix::fs::lchown(l.join("home/link"), Some(7), Some(8)).unwrap();
        let fifo = cstr(&l.join("fifo")).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        let null = cstr(&l.join("null")).unwrap();
        let rdev = libc::makedev(1, 3);
        assert_eq!(
            unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, rdev) },
            0
        );
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(1_000_000, 123_456_789);
        let f = fs::File::open(l.join("home/u")).unwrap();
        f.set_modified(old).unwrap();
        drop(f);
        let dest = out.0.join("tree");

        merge(&layer_paths(&[&layer]), &dest).unwrap();
        let same = |rel: &str| {
            let (a, b) = (
                l.join(rel).symlink_metadata().unwrap(),
                dest.join(rel).symlink_metadata().unwrap(),
            );
            assert_eq!(
                (a.mode(), a.uid(), a.gid(), a.rdev()),
                (b.mode(), b.uid(), b.gid(), b.rdev()),
                "{rel}"
            );
            assert_eq!((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec()), "{rel}");
        };
        for rel in [
            "",
            "bin",
            "bin/su",
            "home",
            "home/u",
            "home/u/f",
            "home/link",
            "fifo",
            "null",
        ] {
            same(rel);
        }
        assert_eq!(
            fs::read_link(dest.join("home/link")).unwrap(),
            Path::new("../bin/su")
        );
        // The same filesystem: a hard link, not a copy.
        let ino = |p: &Path| p.metadata().unwrap().ino();
        assert_eq!(ino(&l.join("home/u/f")), ino(&dest.join("home/u/f")));

        // Where linking fails, a copy with the same attributes.
        let su = l.join("bin/su");
        let copied = out.0.join("su");
        copy(&su, &su.symlink_metadata().unwrap(), &copied).unwrap();
        let (a, b) = (su.metadata().unwrap(), copied.metadata().unwrap());
        assert_ne!(a.ino(), b.ino());
        assert_eq!(
            (a.mode(), a.uid(), a.gid(), a.mtime(), a.mtime_nsec()),
            (b.mode(), b.uid(), b.gid(), b.mtime(), b.mtime_nsec())
        );
        assert_eq!(fs::read_to_string(&copied).unwrap(), "setuid");
    }

    #[test]
    fn symlinks_in_lower_layers_do_not_lead_out() {
        let (lower, upper, out, outside) = (
            Tmp::new("c-lower"),
            Tmp::new("c-upper"),
            Tmp::new("c-out"),
            Tmp::new("c-outside"),
        );
        symlink(&outside.0, lower.0.join("evil")).unwrap();
        symlink(&outside.0, lower.0.join("evil2")).unwrap();
        write(&upper.0.join("evil/x"), "upper");
        // A file over the symlink replaces it, not its target.
        write(&upper.0.join("evil2"), "upper");
        let dest = out.0.join("tree");

        merge(&layer_paths(&[&upper, &lower]), &dest).unwrap();
        assert!(fs::read_dir(&outside.0).unwrap().next().is_none());
        assert!(dest.join("evil").symlink_metadata().unwrap().is_dir());
        assert_eq!(fs::read_to_string(dest.join("evil/x")).unwrap(), "upper");
        assert!(dest.join("evil2").symlink_metadata().unwrap().is_file());
        // Removing the tree removes the merged symlink, not its target.
        symlink(&outside.0, upper.0.join("ln")).unwrap();
        write(&outside.0.join("keep"), "outside");
        merge(&layer_paths(&[&upper, &lower]), &dest).unwrap();
        fs::remove_dir_all(&dest).unwrap();
        assert!(outside.0.join("keep").exists());
    }

    #[test]
    fn fingerprints_follow_metadata_not_paths() {
        let (a, b) = (Tmp::new("d-a"), Tmp::new("d-b"));
        write(&a.0.join("etc/conf"), "x");
        symlink("conf", a.0.join("etc/link")).unwrap();
        whiteout(&a.0.join("wh"));
        set_opaque(&a.0.join("etc"));
        // The same image elsewhere: a copy with all its metadata.
        let copy = b.0.join("layer");
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(&a.0)
            .arg(&copy)
            .status();
        assert!(st.unwrap().success());
        let fp = |p: &Path| fingerprint(&[p.display().to_string()]);
        let first = fp(&a.0);
        assert_eq!(first.len(), 16);
        assert_eq!(first, fp(&copy));

        let conf = copy.join("etc/conf");
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
        let chmodded = fp(&copy);
        assert_ne!(chmodded, first);
        let f = fs::File::open(&conf).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let touched = fp(&copy);
        assert_ne!(touched, chmodded);
        write(&copy.join("etc/new"), "");
        assert_ne!(fp(&copy), touched);
        // The same layers in another order are another image.
        let (x, y) = (a.0.display().to_string(), copy.display().to_string());
        assert_ne!(fingerprint(&[x.clone(), y.clone()]), fingerprint(&[y, x]));
    }
}
