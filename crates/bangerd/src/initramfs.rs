//! The initramfs banger boots every guest with: busybox-static, the
//! kernel's virtio/vsock/overlay modules, banger's `/init`, and the guest
//! agent. Written as a newc cpio directly (no external cpio needed), cached
//! per (kernel, agent, init script) so a rebuild of the agent is picked up.

use crate::error::SysError;
use crate::sync::Locked;
use crate::sys::io;
use banger_proto::methods::daemon::KernelInfo;
use sha2::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};

/// PID 1 of the initramfs: assemble the root (read-only base + per-VM
/// overlay disk), mount the work disk at /root, then hand over to the agent.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin
msg() { echo "banger-init: $*" > /dev/console; }
fail() { msg "FATAL: $*"; echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger; sleep 5; }
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || msg "insmod $m failed"
done
for d in vda vdb vdc; do
    i=0; while [ ! -b /dev/$d ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
done
[ -b /dev/vda ] || fail "no root disk (/dev/vda)"
[ -b /dev/vdb ] || fail "no overlay disk (/dev/vdb)"
mkdir -p /mnt/base /mnt/ovl /newroot
mount -t ext4 -o ro /dev/vda /mnt/base || fail "cannot mount the base image"
mount -t ext4 /dev/vdb /mnt/ovl || fail "cannot mount the overlay disk"
mkdir -p /mnt/ovl/upper /mnt/ovl/work
mount -t overlay overlay -o lowerdir=/mnt/base,upperdir=/mnt/ovl/upper,workdir=/mnt/ovl/work /newroot || fail "cannot assemble the root overlay"
if [ -b /dev/vdc ]; then
    mkdir -p /newroot/root
    mount -t ext4 /dev/vdc /newroot/root || fail "cannot mount the work disk"
fi
# Static network from the command line: no DHCP wait.
IP=; GW=
for p in $(cat /proc/cmdline); do
    case "$p" in banger.ip=*) IP="${p#banger.ip=}";; banger.gw=*) GW="${p#banger.gw=}";; esac
done
ip link set lo up
if [ -n "$IP" ]; then
    i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do usleep 10000; i=$((i+1)); done
    ip link set eth0 up && ip addr add "$IP" dev eth0 || msg "cannot configure eth0"
    [ -n "$GW" ] && ip route add default via "$GW"
fi
mkdir -p /newroot/run /newroot/dev /newroot/proc /newroot/sys
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mkdir -p /newroot/run/banger /newroot/tmp /newroot/var/log
cp /banger/banger-agent /newroot/run/banger/banger-agent
[ -d /banger/lib ] && cp -a /banger/lib /newroot/run/banger/lib
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
# The agent runs on the libc it was built with, shipped beside it, so an
# image with another libc (or none) still has its agent.
if [ -e /newroot/run/banger/lib/ld.so ]; then
    exec switch_root /newroot /run/banger/lib/ld.so --library-path /run/banger/lib /run/banger/banger-agent init
fi
exec switch_root /newroot /run/banger/banger-agent init
"#;

#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data, (0, 0));
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

pub struct Inputs<'a> {
    pub kernel: &'a KernelInfo,
    pub agent: &'a Path,
    pub busybox: &'a Path,
}

fn read(p: &Path) -> Result<Vec<u8>, SysError> {
    std::fs::read(p).map_err(io(format!("reading {}", p.display())))
}

/// Identity of an input file without reading it: path, size, mtime.
fn stamp(p: &Path) -> Result<String, SysError> {
    let m = std::fs::metadata(p).map_err(io(format!("reading {}", p.display())))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    Ok(format!("{}:{}:{}", p.display(), m.len(), mtime.as_nanos()))
}

/// Built initramfs paths by input stamps, so a VM start does not re-hash
/// megabytes of unchanged binaries.
static BUILT: std::sync::Mutex<Option<std::collections::HashMap<String, PathBuf>>> =
    std::sync::Mutex::new(None);

/// Builds (or reuses) the initramfs for these inputs inside the kernel's
/// directory and returns its path.
pub fn ensure(inputs: &Inputs<'_>) -> Result<PathBuf, SysError> {
    let key = format!(
        "{}|{}|{}",
        inputs.kernel.dir,
        stamp(inputs.agent)?,
        stamp(inputs.busybox)?
    );
    if let Some(p) = BUILT.locked().get_or_insert_with(Default::default).get(&key) {
        if p.exists() {
            return Ok(p.clone());
        }
    }
    let path = build(inputs)?;
    BUILT
        .locked()
        .get_or_insert_with(Default::default)
        .insert(key, path.clone());
    Ok(path)
}

/// The agent as the guest gets it: without debug information when
/// `objcopy` is at hand. A debug build's agent is mostly DWARF (44 MiB
/// against 6); every boot would unpack and copy it under emulation.
/// Symbols stay, so a panic in the guest still names its functions.
fn agent_bytes(agent: &Path) -> Result<Vec<u8>, SysError> {
    let tmp = std::env::temp_dir().join(format!(
        "banger-agent-{}-{:x}",
        std::process::id(),
        crate::kernel::rand_u32()
    ));
    let Some(objcopy) = banger_vmm::which("objcopy") else {
        return read(agent);
    };
    let stripped = std::process::Command::new(objcopy)
        .arg("--strip-debug")
        .arg(agent)
        .arg(&tmp)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    let bytes = if stripped { read(&tmp) } else { read(agent) };
    let _ = std::fs::remove_file(&tmp);
    bytes
}

fn build(inputs: &Inputs<'_>) -> Result<PathBuf, SysError> {
    let agent = agent_bytes(inputs.agent)?;
    let busybox = read(inputs.busybox)?;
    // The agent's libc and loader travel with it (the loader as `ld.so`).
    let libs = banger_vmm::shared_libs::of(inputs.agent)
        .map_err(io(format!("running ldd {}", inputs.agent.display())))?
        .into_iter()
        .map(|lib| {
            let name = match (lib.interpreter, lib.path.file_name()) {
                (true, _) => "ld.so".to_string(),
                (false, Some(n)) => n.to_string_lossy().into_owned(),
                (false, None) => return Ok(None),
            };
            Ok(Some((name, read(&lib.path)?)))
        })
        .filter_map(Result::transpose)
        .collect::<Result<Vec<_>, SysError>>()?;
    let mut h = sha2::Sha256::new();
    h.update(&agent);
    h.update(&busybox);
    for (name, bytes) in &libs {
        h.update(name.as_bytes());
        h.update(bytes);
    }
    h.update(INIT_SCRIPT.as_bytes());
    let key = format!("{:x}", h.finalize());
    let kdir = Path::new(&inputs.kernel.dir);
    let out = kdir.join(format!("initramfs-{}.cpio", &key[..16]));
    if out.exists() {
        return Ok(out);
    }
    let applets = std::process::Command::new(inputs.busybox)
        .arg("--list")
        .output()
        .map_err(io(format!("running {} --list", inputs.busybox.display())))?;
    let mut c = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "run",
        "mnt",
        "newroot",
        "lib",
        "lib/modules",
        "banger",
    ] {
        c.dir(d);
    }
    c.entry("dev/console", 0o020600, &[], (5, 1));
    c.file("bin/busybox", 0o755, &busybox);
    for a in String::from_utf8_lossy(&applets.stdout).lines().map(str::trim) {
        if !a.is_empty() && a != "busybox" && !a.contains('/') {
            c.symlink(&format!("bin/{a}"), "busybox");
        }
    }
    c.file("init", 0o755, INIT_SCRIPT.as_bytes());
    let mut order = String::new();
    for m in &inputs.kernel.modules {
        c.file(
            &format!("lib/modules/{m}.ko"),
            0o644,
            &read(&kdir.join("modules").join(format!("{m}.ko")))?,
        );
        order.push_str(m);
        order.push('\n');
    }
    c.file("lib/modules/load-order", 0o644, order.as_bytes());
    c.file("banger/banger-agent", 0o755, &agent);
    if !libs.is_empty() {
        c.dir("banger/lib");
        for (name, bytes) in &libs {
            c.file(&format!("banger/lib/{name}"), 0o755, bytes);
        }
    }
    // Daemons sharing a kernel directory may race here: unique temp name,
    // atomic rename.
    let tmp = out.with_extension(format!(
        "tmp-{}-{:08x}",
        std::process::id(),
        crate::kernel::rand_u32()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(&c.finish()).map_err(io("writing the initramfs"))?;
    f.sync_all().map_err(io("syncing the initramfs"))?;
    std::fs::rename(&tmp, &out).map_err(io("installing the initramfs"))?;
    prune_stale(kdir, &out, STALE_AFTER);
    Ok(out)
}

/// An initramfs older than this, and not the one just built, is one no
/// boot is about to read: VMMs load it whole when they start.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the initramfs images an older agent or busybox left in `kdir`
/// (each is tens of MiB, one per banger build that booted this kernel).
/// A daemon of another build sharing the directory just builds its own
/// again.
fn prune_stale(kdir: &Path, keep: &Path, age: std::time::Duration) {
    let now = std::time::SystemTime::now();
    for e in std::fs::read_dir(kdir).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p == keep || !name.starts_with("initramfs-") || !name.ends_with(".cpio") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|d| d > age);
        if old && std::fs::remove_file(&p).is_ok() {
            tracing::info!(path = %p.display(), "removed a stale initramfs");
        }
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;

    #[test]
    fn only_old_initramfs_images_other_than_the_current_one_go() {
        let d = tempfile::tempdir().unwrap();
        let mk = |n: &str, age_s: u64| {
            let p = d.path().join(n);
            let f = std::fs::File::create(&p).unwrap();
            f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age_s))
                .unwrap();
            p
        };
        let current = mk("initramfs-aaaa.cpio", 3600);
        let stale = mk("initramfs-bbbb.cpio", 3600);
        let fresh = mk("initramfs-cccc.cpio", 5);
        let other = mk("vmlinuz", 3600);
        prune_stale(d.path(), &current, STALE_AFTER);
        assert!(current.exists() && fresh.exists() && other.exists());
        assert!(!stale.exists());
    }
}
