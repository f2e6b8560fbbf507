//! What a distribution's init gives a system, without becoming one: the
//! usual mounts and `/dev` links, sysctls and limits that build tools and
//! test suites expect, `/etc/hosts` with the VM's name and a UTF-8 locale.
//!
//! Each step is best effort and reports what failed on the console: a
//! guest missing one feature is still a guest the host can reach.

use std::ffi::CString;

/// The open-files limit every guest process inherits (the kernel's default
/// `nr_open`): language servers, bundlers and test runners open many.
pub const NOFILE: u64 = 1 << 20;

/// The locale guest processes get: built into glibc, needs no locale data.
pub const LANG: &str = "C.UTF-8";

fn warn(what: &str, e: impl std::fmt::Display) {
    eprintln!("banger-agent: {what}: {e}");
}

fn mount(fstype: &str, target: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(std::io::Error::other);
    let (src, tgt, ty, dat) = (c(fstype)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        // Already there (an image or an earlier start mounted it): fine.
        if e.raw_os_error() == Some(libc::EBUSY) {
            Ok(())
        } else {
            Err(e)
        }
    }
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

/// `/dev/shm` (POSIX shared memory), `/dev/mqueue` (message queues) and
/// cgroup v2 at `/sys/fs/cgroup` (rootless containers, and build tools
/// that size themselves from cgroup limits).
fn mounts() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let steps: [(&str, &str, libc::c_ulong, &str); 3] = [
        ("tmpfs", "/dev/shm", nosuid_nodev, "mode=1777"),
        ("mqueue", "/dev/mqueue", nosuid_nodev | libc::MS_NOEXEC, ""),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            nosuid_nodev | libc::MS_NOEXEC,
            "nsdelegate",
        ),
    ];
    for (fstype, target, flags, data) in steps {
        if is_mountpoint(target) {
            continue;
        }
        if let Err(e) = mount(fstype, target, flags, data) {
            warn(&format!("mounting {fstype} on {target}"), e);
        }
    }
}

/// The links every Linux userland assumes (`bash`'s process substitution
/// needs `/dev/fd`).
fn dev_links() {
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/core", "/proc/kcore"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(target, link) {
                warn(&format!("linking {link}"), e);
            }
        }
    }
}

/// Values a desktop distribution ships: file watchers for dev servers,
/// unprivileged ping (raw ICMP sockets for every group), user namespaces.
const SYSCTLS: [(&str, &str); 5] = [
    ("fs/inotify/max_user_watches", "524288"),
    ("fs/inotify/max_user_instances", "1024"),
    ("net/ipv4/ping_group_range", "0 2147483647"),
    ("user/max_user_namespaces", "63807"),
    ("kernel/unprivileged_userns_clone", "1"),
];

fn sysctls() {
    for (key, value) in SYSCTLS {
        let path = format!("/proc/sys/{key}");
        // Absent on some kernels (e.g. unprivileged_userns_clone is a
        // Debian patch): nothing to set then.
        if std::path::Path::new(&path).exists() {
            if let Err(e) = std::fs::write(&path, value) {
                warn(&format!("setting {key}"), e);
            }
        }
    }
}

/// Raised on PID 1 before anything is spawned: every process inherits it.
fn rlimits() {
    let lim = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        warn("raising RLIMIT_NOFILE", std::io::Error::last_os_error());
    }
}

/// `/etc/hosts` naming the VM, so `hostname -f`, sudo and tools that
/// resolve their own host name do not stall or fail. An image's own file
/// is kept unless banger wrote it.
fn hosts(name: &str) {
    const MARK: &str = "# Written by banger at boot.";
    let current = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !current.is_empty() && !current.starts_with(MARK) {
        return;
    }
    let text = format!(
        "{MARK}\n127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    );
    if let Err(e) = std::fs::write("/etc/hosts", text) {
        warn("writing /etc/hosts", e);
    }
}

/// A UTF-8 locale for the agent's children (inherited) and for ssh logins
/// (PAM reads `/etc/default/locale`).
fn locale() {
    std::env::set_var("LANG", LANG);
    let path = "/etc/default/locale";
    if std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true) {
        let _ = std::fs::create_dir_all("/etc/default");
        if let Err(e) = std::fs::write(path, format!("LANG={LANG}\n")) {
            warn("writing /etc/default/locale", e);
        }
    }
}

/// Everything above, in PID 1 before any service starts.
pub fn prepare(hostname: Option<&str>) {
    mounts();
    dev_links();
    sysctls();
    rlimits();
    if let Some(name) = hostname {
        hosts(name);
    }
    locale();
}
