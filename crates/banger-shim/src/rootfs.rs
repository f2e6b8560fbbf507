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
//! The layers are merged in user space into a staging directory (hard
//! links into the layers, whiteouts and opaque directories applied; see
//! `layers`) for as long as `mkfs.ext4 -d` reads it. Nothing is mounted,
//! so a crash leaves at most that directory, removed by the next make.

use crate::banger::{self, Failed};
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

/// The image name for a set of layers, from their contents: the same
/// image unpacked anew (other snapshot paths) is the same image, and a
/// layer changed in place is another.
pub fn image_name(layers: &[String]) -> String {
    format!("ctr-{}", crate::layers::fingerprint(layers))
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
    with_tree(layers, &cache.join(format!("{name}.tree")), |dir| {
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

/// Runs `f` on the layers' merged tree, built at `at` and removed after.
/// Its files are hard links into the layers: `f` must only read them.
pub fn with_tree<T>(layers: &[String], at: &Path, f: impl FnOnce(&Path) -> T) -> Result<T, Failed> {
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Failed(format!("creating {}: {e}", parent.display())))?;
    }
    let built = crate::layers::merge(layers, at);
    let r = built.map(|()| f(at));
    let _ = std::fs::remove_dir_all(at);
    r
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
    }

    #[test]
    fn image_names_come_from_the_layers_contents() {
        let base = std::env::temp_dir().join(format!("banger-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = |p: &str| {
            let d = base.join(p);
            std::fs::create_dir_all(d.join("etc")).unwrap();
            std::fs::write(d.join("etc/hostname"), p).unwrap();
            d.display().to_string()
        };
        let (one, two) = (dir("one"), dir("two"));
        let a = image_name(&[two.clone(), one.clone()]);
        assert_eq!(a, image_name(&[two.clone(), one.clone()]));
        assert_ne!(a, image_name(std::slice::from_ref(&one)));
        assert!(a.starts_with("ctr-") && a.len() == 20);
        // A layer's content changed (a size here): another image.
        std::fs::write(base.join("one/etc/hostname"), "changed").unwrap();
        assert_ne!(a, image_name(&[two, one]));

        // The tree is built for `f` and gone after.
        let at = base.join("tree");
        let seen = with_tree(&[dir("three")], &at, |d| {
            std::fs::read_to_string(d.join("etc/hostname")).unwrap()
        });
        assert_eq!(seen.unwrap(), "three");
        assert!(!at.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
