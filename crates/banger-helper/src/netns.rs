//! Named network namespaces, the way `ip netns` keeps them: a namespace is
//! held alive by a bind mount of its nsfs file at `/run/netns/<name>`, so
//! it outlives the thread that made it and the jailer can enter it by path.
//!
//! Namespaces are entered only on threads of their own, never on a pool
//! thread: a thread is in one network namespace at a time, and a pool
//! thread left in a VM's namespace would make the next task's links there.

use crate::error::NetError;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where named namespaces live (iproute2's convention).
pub const DIR: &str = "/run/netns";
/// The f_type of a mounted namespace file.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The path of the namespace banger keeps for VM `vm` (a validated tag).
pub fn path_for(vm: &str) -> PathBuf {
    Path::new(DIR).join(format!("banger-{vm}"))
}

fn os(what: String) -> NetError {
    NetError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

fn cstr(p: &Path) -> CString {
    // Paths made by `path_for` hold no NUL.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Whether a namespace is mounted at `p` (not merely a file left there by
/// a crash between creating the file and mounting onto it).
pub fn is_mounted(p: &Path) -> bool {
    // SAFETY: a zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = cstr(p);
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == NSFS_MAGIC
}

/// Runs `f` on a thread of its own that has entered the namespace at `ns`;
/// the thread ends with `f`.
pub async fn run_in<T, F>(ns: &Path, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let ns = ns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let r = std::fs::File::open(&ns)
                .map_err(|source| NetError::Os {
                    what: format!("opening {}", ns.display()),
                    source,
                })
                .and_then(|file| {
                    // SAFETY: plain syscall on a descriptor we own.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(os(format!("entering {}", ns.display())));
                    }
                    f()
                });
            let _ = tx.send(r);
        })
        .map_err(|source| NetError::Os {
            what: "starting a namespace thread".into(),
            source,
        })?;
    rx.await.map_err(|_| NetError::Os {
        what: "namespace thread".into(),
        source: std::io::Error::other("it ended without an answer"),
    })?
}

/// Makes the namespace at `p` unless one is mounted there; true when made.
pub async fn create(p: &Path) -> Result<bool, NetError> {
    if is_mounted(p) {
        return Ok(false);
    }
    let p = p.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-new".into())
        .spawn(move || {
            let _ = tx.send(create_on_this_thread(&p));
        })
        .map_err(|source| NetError::Os {
            what: "starting a namespace thread".into(),
            source,
        })?;
    rx.await.map_err(|_| NetError::Os {
        what: "namespace thread".into(),
        source: std::io::Error::other("it ended without an answer"),
    })??;
    Ok(true)
}

/// Moves this thread into a new namespace and pins it at `p`. The thread
/// must end afterwards (its caller's thread does).
fn create_on_this_thread(p: &Path) -> Result<(), NetError> {
    std::fs::create_dir_all(DIR).map_err(|source| NetError::Os {
        what: format!("creating {DIR}"),
        source,
    })?;
    // The mount point: an empty file, made only by us (no symlink followed).
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
    {
        Ok(_) => {}
        Err(source) => {
            return Err(NetError::Os {
                what: format!("creating {}", p.display()),
                source,
            })
        }
    }
    // SAFETY: plain syscall; it affects this thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(os("creating a network namespace".into()));
    }
    let src = CString::new(format!(
        "/proc/self/task/{}/ns/net",
        // SAFETY: gettid cannot fail.
        unsafe { libc::syscall(libc::SYS_gettid) }
    ))
    .unwrap_or_default();
    let dst = cstr(p);
    // SAFETY: NUL-terminated paths; no filesystem type or data for a bind mount.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = os(format!("mounting the namespace at {}", p.display()));
        let _ = std::fs::remove_file(p);
        return Err(e);
    }
    Ok(())
}

/// Unmounts and removes the namespace at `p`; false when there was none.
/// The namespace itself ends when nothing else holds it (its VMM gone).
pub fn remove(p: &Path) -> Result<bool, NetError> {
    let mounted = is_mounted(p);
    if mounted {
        let c = cstr(p);
        // SAFETY: NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(os(format!("unmounting {}", p.display())));
        }
    }
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(mounted),
        Err(source) => Err(NetError::Os {
            what: format!("removing {}", p.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_named_after_the_vm_under_run_netns() {
        assert_eq!(path_for("0a1b2c3d"), Path::new("/run/netns/banger-0a1b2c3d"));
    }
}
