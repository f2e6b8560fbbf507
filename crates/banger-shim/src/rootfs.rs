//! A container's root filesystem as a banger image.
//!
//! containerd hands the shim the snapshot's mounts: an overlay of the
//! image's unpacked layers (`lowerdir`) under the container's empty
//! writable layer, or a bind of a single directory. The image part is
//! what a VM boots from, so it is made into an ext4 file once per set of
//! layers and registered with bangerd under a name derived from them: a
//! second container of the same image costs nothing. The VM's own writes
//! go to its overlay disk, as for any banger VM.
//!
//! The layers are assembled by mounting them read-only (overlayfs does
//! the whiteouts) for as long as `mkfs.ext4 -d` reads them.

use crate::banger::{self, Failed};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// One of containerd's mounts.
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The read-only layers of a rootfs: the overlay's lower directories
/// (topmost first, as overlayfs lists them), or a bind's one directory.
pub fn layers(mounts: &[Mount]) -> Result<Vec<String>, Failed> {
    match mounts {
        [m] if m.kind == "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .map(|l| l.split(':').map(String::from).collect())
            .ok_or_else(|| Failed("an overlay rootfs without lowerdir".into())),
        [m] if m.kind == "bind" => Ok(vec![m.source.clone()]),
        [] => Err(Failed("no rootfs mounts: the container needs an image".into())),
        _ => Err(Failed(format!(
            "rootfs of {} mounts ({}): only one overlay or bind is supported",
            mounts.len(),
            mounts
                .iter()
                .map(|m| m.kind.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The image name for a set of layers: the same layers, the same image.
pub fn image_name(layers: &[String]) -> String {
    let h = Sha256::digest(layers.join(":").as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("ctr-{hex}")
}

fn cstr(p: &Path) -> Result<CString, Failed> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| Failed("a path with NUL".into()))
}

/// Mounts `layers` read-only at `at`: a bind for one, an overlay for more.
fn mount_ro(layers: &[String], at: &Path) -> Result<(), Failed> {
    let target = cstr(at)?;
    let rc = if let [one] = layers {
        let src = cstr(Path::new(one))?;
        // SAFETY: valid NUL-terminated strings; a bind, then made read-only.
        unsafe {
            let r = libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            );
            if r == 0 {
                libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                )
            } else {
                r
            }
        }
    } else {
        let opts = CString::new(format!("lowerdir={}", layers.join(":")))
            .map_err(|_| Failed("a layer path with NUL".into()))?;
        let fstype = CString::new("overlay").expect("constant");
        // SAFETY: valid NUL-terminated strings.
        unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY,
                opts.as_ptr().cast(),
            )
        }
    };
    if rc != 0 {
        return Err(Failed(format!(
            "mounting the image layers at {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn unmount(at: &Path) {
    if let Ok(t) = cstr(at) {
        // SAFETY: a path we mounted.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Bytes of regular files under `dir` (not following symlinks).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// The kernel images are booted with: the default image's.
fn kernel(task: &str) -> Result<String, Failed> {
    let img = banger::json(
        task,
        "image show default",
        &["image", "show", "default", "--json"],
    )?;
    img["kernel"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| Failed("the default image names no kernel".into()))
}

/// The registered image for these layers, made now if it is not yet.
pub fn ensure_image(task: &str, layers: &[String], cache: &Path) -> Result<String, Failed> {
    let name = image_name(layers);
    if banger::run(task, "image show", &["image", "show", &name, "--json"]).is_ok() {
        return Ok(name);
    }
    std::fs::create_dir_all(cache).map_err(|e| Failed(format!("creating {}: {e}", cache.display())))?;
    // One maker per image at a time; the loser finds it registered.
    let lock = std::fs::File::create(cache.join(format!("{name}.lock")))
        .map_err(|e| Failed(format!("locking the image cache: {e}")))?;
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if banger::run(task, "image show", &["image", "show", &name, "--json"]).is_ok() {
        return Ok(name);
    }
    let file = cache.join(format!("{name}.ext4"));
    with_tree(layers, &cache.join(format!("{name}.mnt")), |dir| {
        make_ext4(dir, &file)
    })??;
    let kernel = kernel(task)?;
    let rootfs = file.display().to_string();
    let r = banger::run(
        task,
        "image register",
        &[
            "image", "register", &name, "--rootfs", &rootfs, "--kernel", &kernel,
        ],
    );
    if r.is_err() {
        let _ = std::fs::remove_file(&file);
    }
    r.map(|_| name)
}

/// Runs `f` on the layers' merged tree, mounted read-only at `at` (made
/// and removed here) for as long as `f` runs.
pub fn with_tree<T>(layers: &[String], at: &Path, f: impl FnOnce(&Path) -> T) -> Result<T, Failed> {
    std::fs::create_dir_all(at).map_err(|e| Failed(format!("creating {}: {e}", at.display())))?;
    if let Err(e) = mount_ro(layers, at) {
        let _ = std::fs::remove_dir(at);
        return Err(e);
    }
    let r = f(at);
    unmount(at);
    let _ = std::fs::remove_dir(at);
    Ok(r)
}

/// An ext4 file holding `dir`'s tree (owners and modes kept), with room
/// to spare for what the guest's overlay does not cover.
fn make_ext4(dir: &Path, file: &Path) -> Result<(), Failed> {
    let mib = du(dir) / (1 << 20) * 5 / 4 + 64;
    let tmp = file.with_extension("ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    let out = std::process::Command::new(which("mkfs.ext4"))
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(dir)
        .arg(&tmp)
        .arg(format!("{mib}M"))
        .output()
        .map_err(|e| Failed(format!("running mkfs.ext4: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Failed(format!(
            "mkfs.ext4 -d {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, file).map_err(|e| Failed(format!("installing {}: {e}", file.display())))
}

fn which(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn layers_come_from_the_overlay_or_the_bind() {
        let o = m(
            "overlay",
            "overlay",
            &[
                "index=off",
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs",
            ],
        );
        assert_eq!(layers(&[o]).unwrap(), ["/s/2/fs", "/s/1/fs"]);
        assert_eq!(layers(&[m("bind", "/s/1/fs", &["rbind"])]).unwrap(), ["/s/1/fs"]);
        assert!(layers(&[]).is_err());
        assert!(layers(&[m("overlay", "overlay", &["upperdir=/x"])]).is_err());
        // The same layers, the same image; other layers, another.
        let a = image_name(&["/s/2/fs".into(), "/s/1/fs".into()]);
        assert_eq!(a, image_name(&["/s/2/fs".into(), "/s/1/fs".into()]));
        assert_ne!(a, image_name(&["/s/1/fs".into()]));
        assert!(a.starts_with("ctr-") && a.len() == 20);
    }
}
