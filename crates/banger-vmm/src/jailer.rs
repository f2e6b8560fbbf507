//! Firecracker under its jailer: a chroot of its own, a uid and gid of its
//! own (one per VM), a cgroup, and nothing inherited (the jailer closes
//! every descriptor and clears the environment before it execs).
//!
//! Layout: the jailer builds `<vm dir>/jail/<exec name>/<vm id>/root` and
//! chroots there. banger hard-links what the VM uses into that root (the
//! kernel, the initrd, every drive; a read-only base is shared, never
//! chowned), gives the writable files to the VM's uid, and configures
//! Firecracker with paths inside the root. The jailer leaves its tree and
//! its cgroup behind when Firecracker exits; the Firecracker documentation
//! makes that the caller's job, done by [`cleanup`].
//!
//! Identity: a jailed process has no `BANGER_VM_DIR` (its environment is
//! cleared), but its root is the chroot inside the VM directory, which is
//! what [`crate::process`] checks instead.

use crate::{Drive, LaunchSpec, VmmError};
use std::path::{Path, PathBuf};

/// The cgroup every jailed VM's own cgroup is made under.
pub const PARENT_CGROUP: &str = "banger";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Room above the guest's memory for Firecracker itself (its threads,
/// page tables, device queues) before the cgroup's limit bites.
const VMM_OVERHEAD_MIB: u64 = 256;
/// Firecracker runs a thread per vCPU plus a handful: enough, and a
/// guest escape cannot fork-bomb the host.
const PIDS_MAX: u32 = 128;

/// cgroup v2 (one hierarchy at /sys/fs/cgroup), or v1 (one per controller).
fn cgroup_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// Where the jailer makes the VM's cgroup(s).
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if cgroup_v2() {
        vec![root.join(PARENT_CGROUP).join(id)]
    } else {
        ["memory", "pids"]
            .iter()
            .map(|c| root.join(c).join(PARENT_CGROUP).join(id))
            .collect()
    }
}

/// What running Firecracker under the jailer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub binary: PathBuf,
    /// VM `n` (its vsock CID) runs as uid and gid `uid_base + n`: no two
    /// VMs share a uid, and none shares one with a user.
    pub uid_base: u32,
}

impl JailConfig {
    pub fn uid(&self, cid: u32) -> u32 {
        self.uid_base.saturating_add(cid)
    }
}

/// The jail's directories for one VM.
pub struct Layout {
    /// `--chroot-base-dir`.
    pub base: PathBuf,
    /// The jail's `/`.
    pub root: PathBuf,
    pub id: String,
}

/// The jail's id: the VM directory's name (the VM id, hex), which the
/// jailer accepts (alphanumerics and `-`, at most 64).
fn jail_id(vm_dir: &Path) -> Result<String, VmmError> {
    let id = vm_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(VmmError::Failed(format!(
            "{} cannot name a jail",
            vm_dir.display()
        )));
    }
    Ok(id)
}

pub fn layout(vm_dir: &Path, firecracker: &Path) -> Result<Layout, VmmError> {
    let id = jail_id(vm_dir)?;
    let exec = firecracker
        .file_name()
        .ok_or_else(|| VmmError::Failed(format!("{} is not a file", firecracker.display())))?;
    let base = vm_dir.join("jail");
    let root = base.join(exec).join(&id).join("root");
    Ok(Layout { base, root, id })
}

/// Removes what the jailer leaves: the jail tree (links and device nodes
/// only: the files they link to stay) and the VM's cgroup. Safe to call
/// for a VM that never ran jailed.
pub async fn cleanup(vm_dir: &Path) {
    let _ = std::fs::remove_dir_all(vm_dir.join("jail"));
    let Ok(id) = jail_id(vm_dir) else {
        return;
    };
    // rmdir is all a cgroup takes, once it is empty: a VMM just killed
    // may still be in it for a moment (until it is reaped), so a busy
    // cgroup is tried again, briefly.
    for d in cgroup_dirs(&id) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&d) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < end => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(cgroup = %d.display(), error = %e, "could not remove a jailed VM's cgroup");
                    break;
                }
                _ => break,
            }
        }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> VmmError {
    move |e| VmmError::io(what, e)
}

/// Links `src` into the jail as `name`. A hard link, so a multi-GiB image
/// costs nothing; the jail must be on the same filesystem as banger's
/// images and VM directories (it is, under the state directory).
fn link_in(src: &Path, root: &Path, name: &str) -> Result<PathBuf, VmmError> {
    let dest = root.join(name);
    let _ = std::fs::remove_file(&dest);
    std::fs::hard_link(src, &dest).map_err(|e| {
        VmmError::io(
            format!(
                "linking {} into the jail (it must be on the same filesystem)",
                src.display()
            ),
            e,
        )
    })?;
    Ok(PathBuf::from("/").join(name))
}

fn chown(p: &Path, uid: u32) -> Result<(), VmmError> {
    std::os::unix::fs::chown(p, Some(uid), Some(uid))
        .map_err(io(format!("giving {} to uid {uid}", p.display())))
}

/// A dynamically linked Firecracker (the project's releases are static,
/// a distribution's build may not be) finds its loader and libraries in
/// the jail at the paths it was linked with: copied in, read-only.
fn bring_libraries(firecracker: &Path, root: &Path) -> Result<(), VmmError> {
    let libs =
        crate::shared_libs::of(firecracker).map_err(io(format!("running ldd {}", firecracker.display())))?;
    for lib in libs {
        let rel = lib.path.strip_prefix("/").unwrap_or(&lib.path);
        let dest = root.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::copy(&lib.path, &dest)
            .map_err(io(format!("copying {} into the jail", lib.path.display())))?;
    }
    Ok(())
}

/// Makes the jail's root for `spec` and returns the spec as Firecracker
/// sees it from inside (every path relative to the jail's `/`). Writable
/// drives are given to the VM's uid; read-only ones stay as they are
/// (world-readable images), so a shared base is never re-owned.
pub fn prepare(
    spec: &LaunchSpec,
    firecracker: &Path,
    layout: &Layout,
    uid: u32,
) -> Result<LaunchSpec, VmmError> {
    // A previous run's tree (sockets, links) would make Firecracker refuse.
    let _ = std::fs::remove_dir_all(layout.root.parent().unwrap_or(&layout.root));
    for d in cgroup_dirs(&layout.id) {
        let _ = std::fs::remove_dir(d);
    }
    std::fs::create_dir_all(&layout.root).map_err(io(format!("creating {}", layout.root.display())))?;
    bring_libraries(firecracker, &layout.root)?;
    let mut jailed = spec.clone();
    jailed.kernel = link_in(&spec.kernel, &layout.root, "kernel")?;
    if let Some(initrd) = &spec.initrd {
        jailed.initrd = Some(link_in(initrd, &layout.root, "initrd")?);
    }
    jailed.drives = spec
        .drives
        .iter()
        .map(|d| {
            if !d.read_only {
                chown(&d.path, uid)?;
            }
            Ok(Drive {
                path: link_in(&d.path, &layout.root, &format!("drive-{}", d.id))?,
                ..d.clone()
            })
        })
        .collect::<Result<_, VmmError>>()?;
    // A snapshot is copied in, not linked: it must be the VM uid's to
    // read, and the snapshot itself stays root's (guest memory is secret).
    if let Some(r) = &spec.restore {
        let mut inside = Vec::new();
        for (src, name) in [(&r.state, "snapshot-state"), (&r.memory, "snapshot-mem")] {
            let dest = layout.root.join(name);
            std::fs::copy(src, &dest).map_err(io(format!("copying {} into the jail", src.display())))?;
            chown(&dest, uid)?;
            inside.push(PathBuf::from("/").join(name));
        }
        jailed.restore = Some(crate::Restore {
            memory: inside.pop().expect("two files"),
            state: inside.pop().expect("two files"),
            seed: None,
        });
    }
    // Firecracker's own files, made here so they are the VM uid's (its
    // console is its standard output, which the daemon opens).
    for f in ["firecracker.log", "metrics.json"] {
        let p = layout.root.join(f);
        std::fs::File::create(&p).map_err(io(format!("creating {}", p.display())))?;
        chown(&p, uid)?;
    }
    chown(&layout.root, uid)?;
    jailed.vm_dir = PathBuf::from("/");
    Ok(jailed)
}

/// The jailer's command line (Firecracker's own arguments after `--`): the
/// VM's cgroup caps its memory (the guest's plus Firecracker's overhead)
/// and its processes; with `netns`, Firecracker runs in that network
/// namespace (where the root helper put the VM's tap) and sees no other
/// link of the host.
pub fn command(
    cfg: &JailConfig,
    firecracker: &Path,
    layout: &Layout,
    uid: u32,
    memory_mib: u32,
    netns: Option<&Path>,
) -> tokio::process::Command {
    let memory = (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20;
    let (version, memory_limit) = if cgroup_v2() {
        ("2", format!("memory.max={memory}"))
    } else {
        ("1", format!("memory.limit_in_bytes={memory}"))
    };
    let mut cmd = tokio::process::Command::new(&cfg.binary);
    cmd.arg("--id")
        .arg(&layout.id)
        .arg("--exec-file")
        .arg(firecracker)
        .arg("--uid")
        .arg(uid.to_string())
        .arg("--gid")
        .arg(uid.to_string())
        .arg("--chroot-base-dir")
        .arg(&layout.base)
        .arg("--cgroup-version")
        .arg(version)
        .arg("--parent-cgroup")
        .arg(PARENT_CGROUP)
        .arg("--cgroup")
        .arg(memory_limit)
        .arg("--cgroup")
        .arg(format!("pids.max={PIDS_MAX}"));
    if let Some(ns) = netns {
        cmd.arg("--netns").arg(ns);
    }
    let inside = crate::firecracker::Paths::new(Path::new("/"));
    cmd.arg("--")
        .arg("--api-sock")
        .arg(&inside.api)
        .args(crate::firecracker::log_args(&inside));
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_is_named_after_the_vm_directory_only_when_that_is_a_safe_id() {
        let l = layout(
            Path::new("/s/vms/0a1b2c3d4e5f6a7b"),
            Path::new("/usr/bin/firecracker"),
        )
        .unwrap();
        assert_eq!(l.id, "0a1b2c3d4e5f6a7b");
        assert_eq!(
            l.root,
            Path::new("/s/vms/0a1b2c3d4e5f6a7b/jail/firecracker/0a1b2c3d4e5f6a7b/root")
        );
        for bad in ["/s/vms/a b", "/s/vms/x;y", "/"] {
            assert!(
                layout(Path::new(bad), Path::new("/usr/bin/firecracker")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_vm_gets_its_own_uid() {
        let c = JailConfig {
            binary: "/j".into(),
            uid_base: 200_000,
        };
        assert_ne!(c.uid(3), c.uid(4));
        assert_eq!(c.uid(u32::MAX), u32::MAX);
    }
}
