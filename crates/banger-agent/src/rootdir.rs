//! A process run inside a directory of the guest as its root: how a pod's
//! later containers run in the pod's VM, each in its own image's tree.
//!
//! The process gets a mount namespace of its own, with /proc, /sys and
//! /dev mounted under the tree, then is chrooted into it. The mounts live
//! and die with the namespace, so they never show in the guest's root and
//! removing a tree never reaches through them into the real /dev.

use banger_proto::RpcError;
use std::ffi::CString;
use std::io;
use std::path::Path;

/// Everything the child needs between fork and exec, made beforehand
/// (nothing may allocate there).
pub struct Root {
    dir: CString,
    proc_: CString,
    sys: CString,
    dev: CString,
    cwd: CString,
}

fn cstring(p: &Path) -> Result<CString, RpcError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| RpcError::bad_request(format!("{} holds a NUL", p.display())))
}

impl Root {
    /// Checks `root` (an absolute path of an existing directory, not the
    /// guest's own root) and `cwd` inside it, and makes the mount points.
    pub fn prepare(root: &str, cwd: Option<&str>) -> Result<Root, RpcError> {
        let dir = Path::new(root);
        if !dir.is_absolute() || dir.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(RpcError::bad_request(format!(
                "root {root:?} must be an absolute path without '..'"
            )));
        }
        if dir.parent().is_none() {
            return Err(RpcError::bad_request(
                "root / is the guest's own root: leave it out",
            ));
        }
        if !dir.is_dir() {
            return Err(RpcError::not_found(format!(
                "root {root} does not exist in the guest"
            )));
        }
        let cwd = cwd.unwrap_or("/");
        if !cwd.starts_with('/')
            || Path::new(cwd)
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(RpcError::bad_request(format!(
                "working directory {cwd:?} must be an absolute path without '..'"
            )));
        }
        // Symlinks in the tree are resolved by the kernel after chroot;
        // checked here only so a missing one fails before the fork.
        if !dir.join(cwd.trim_start_matches('/')).is_dir() {
            return Err(RpcError::not_found(format!(
                "working directory {cwd} does not exist in root {root}"
            )));
        }
        for m in ["proc", "sys", "dev"] {
            let p = dir.join(m);
            if !p.is_dir() {
                std::fs::create_dir_all(&p)
                    .map_err(|e| RpcError::failed(format!("making {}: {e}", p.display())))?;
            }
        }
        Ok(Root {
            dir: cstring(dir)?,
            proc_: cstring(&dir.join("proc"))?,
            sys: cstring(&dir.join("sys"))?,
            dev: cstring(&dir.join("dev"))?,
            cwd: cstring(Path::new(cwd))?,
        })
    }

    /// Enters the tree. Called in the child between fork and exec: only
    /// system calls, on strings made by `prepare`.
    ///
    /// # Safety
    /// Only between fork and exec, in the child.
    pub unsafe fn enter(&self) -> io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let none = std::ptr::null();
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted from here on propagates back to the guest's root.
        check(libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            none.cast(),
        ))?;
        let quiet = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(libc::mount(
            c"proc".as_ptr(),
            self.proc_.as_ptr(),
            c"proc".as_ptr(),
            quiet,
            none.cast(),
        ))?;
        check(libc::mount(
            c"sysfs".as_ptr(),
            self.sys.as_ptr(),
            c"sysfs".as_ptr(),
            quiet | libc::MS_RDONLY,
            none.cast(),
        ))?;
        check(libc::mount(
            c"/dev".as_ptr(),
            self.dev.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            none.cast(),
        ))?;
        check(libc::chroot(self.dir.as_ptr()))?;
        check(libc::chdir(self.cwd.as_ptr()))
    }
}

/// Drops root for `user`: groups, then gid, then uid (after which none of
/// them could change). Called in the child between fork and exec, after
/// the root is entered (chroot needs root).
fn become_user(groups: &[libc::gid_t], gid: libc::gid_t, uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: plain system calls on a slice made before the fork.
    let r = unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) < 0
            || libc::setgid(gid) < 0
            || libc::setuid(uid) < 0
        {
            -1
        } else {
            0
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where a command runs: in `cwd` of the guest, or chrooted into `root`
/// (with `cwd` inside it), as root or as `user`. Errors before anything
/// is spawned.
pub fn place(
    cmd: &mut tokio::process::Command,
    root: Option<&str>,
    cwd: Option<&str>,
    user: Option<&banger_proto::methods::agent::User>,
) -> Result<(), RpcError> {
    match root {
        Some(r) => {
            let root = Root::prepare(r, cwd)?;
            // SAFETY: `enter` makes only system calls, on strings made above.
            unsafe {
                cmd.pre_exec(move || root.enter());
            }
        }
        None => {
            if let Some(cwd) = cwd {
                if !Path::new(cwd).is_dir() {
                    return Err(RpcError::not_found(format!(
                        "working directory {cwd} does not exist in the guest"
                    )));
                }
                cmd.current_dir(cwd);
            }
        }
    }
    if let Some(u) = user {
        u.validate().map_err(RpcError::bad_request)?;
        let (groups, gid, uid) = (u.groups.clone(), u.gid, u.uid);
        // SAFETY: `become_user` makes only system calls; registered after
        // the root's hook, so it runs after the chroot.
        unsafe {
            cmd.pre_exec(move || become_user(&groups, gid, uid));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_must_be_a_real_directory_and_cwd_inside_it() {
        let t = std::env::temp_dir().join(format!("banger-rootdir-{}", std::process::id()));
        std::fs::create_dir_all(t.join("app")).unwrap();
        let root = t.to_str().unwrap();
        assert!(Root::prepare("relative", None).is_err());
        assert!(Root::prepare("/", None).is_err());
        assert!(Root::prepare(&format!("{root}/../x"), None).is_err());
        assert!(Root::prepare(&format!("{root}/missing"), None).is_err());
        assert!(Root::prepare(root, Some("/nope")).is_err());
        assert!(Root::prepare(root, Some("/app/../..")).is_err());
        assert!(Root::prepare(root, Some("/app")).is_ok());
        // The mount points are made, in the tree.
        assert!(t.join("proc").is_dir() && t.join("dev").is_dir() && t.join("sys").is_dir());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
