//! The systemd units of an installation, rendered from its manifest.
//!
//! The root helper gets the capabilities its job needs (links, taps,
//! nftables, network namespaces) and a read-only system; the daemon runs
//! as the owner with no capabilities at all. Neither is a unit systemd
//! could make much narrower without breaking a verb: the reasons are in
//! the comments the units carry.

use crate::install::{InstallManifest, DAEMON_UNIT, HELPER_UNIT};
use std::path::Path;

/// The directives each unit must carry (`banger doctor` checks an
/// installed unit still has them).
pub const HARDENING: &[(&str, &[&str])] = &[
    (
        HELPER_UNIT,
        &[
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=",
        ],
    ),
    (
        DAEMON_UNIT,
        &[
            "User=",
            "KillMode=process",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=full",
            "RestrictSUIDSGID=yes",
        ],
    ),
];

/// The search path the daemon runs with: its own private directory first
/// (banger-vsock-bridge ships there), then the usual ones, sbin included
/// (mkfs.ext4 lives there on Debian).
fn daemon_path(m: &InstallManifest) -> String {
    format!(
        "{}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        m.libexec_dir.display()
    )
}

/// Whether a path can stand in a unit as it is: systemd splits on
/// whitespace, unquotes, and expands `%` and `$` in command lines, so a
/// path with any of those is refused rather than escaped.
pub fn unit_safe(p: &Path) -> bool {
    let s = p.to_string_lossy();
    p.is_absolute()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\%$;".contains(c))
}

fn q(p: &Path) -> String {
    debug_assert!(unit_safe(p), "{} is not unit-safe", p.display());
    p.display().to_string()
}

/// A directory under `/run` that systemd should make at each start, as
/// `RuntimeDirectory=` wants it (relative to `/run`).
fn under_run(p: &Path) -> Option<String> {
    p.strip_prefix("/run")
        .ok()
        .map(|r| r.display().to_string())
        .filter(|r| !r.is_empty())
}

/// The helper's unit. `log_dir` holds its log file (root's, readable by the
/// owner's group).
pub fn helper_unit(m: &InstallManifest, log_dir: &Path) -> String {
    let sock_dir = m.helper_socket.parent().unwrap_or(Path::new("/run"));
    let runtime = under_run(sock_dir)
        .map(|r| format!("RuntimeDirectory={r}\nRuntimeDirectoryMode=0755\n"))
        .unwrap_or_default();
    format!(
        "# Written by `banger system install`; `banger system uninstall` removes it.
[Unit]
Description=banger root helper: bridge, taps and nftables rules for {owner}'s bangerd
Before={daemon}

[Service]
Type=simple
ExecStart={lib}/banger-helper serve --socket {sock} --owner-uid {uid} --log-file {log}
Restart=on-failure
RestartSec=1
{runtime}# Links, taps and nftables (NET_ADMIN, NET_RAW); network namespaces for
# jailed VMMs (SYS_ADMIN: unshare and the bind mount that keeps one); giving
# a socket or tap to the owner (CHOWN, FOWNER). Nothing else.
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN CAP_CHOWN CAP_FOWNER
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={sock_dir} {log_dir} -/run/netns
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
RestrictNamespaces=net
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
",
        owner = m.owner,
        daemon = DAEMON_UNIT,
        lib = q(&m.libexec_dir),
        sock = q(&m.helper_socket),
        uid = m.owner_uid,
        log = q(&log_dir.join("helper.log")),
        sock_dir = q(sock_dir),
        log_dir = q(log_dir),
    )
}

/// The daemon's unit: the owner's, with no capability. `kvm_group` is added
/// when the host has one (so QEMU and Firecracker may open `/dev/kvm`).
pub fn daemon_unit(m: &InstallManifest, group: &str, kvm_group: bool) -> String {
    let runtime = under_run(&m.runtime_dir)
        .map(|r| {
            format!(
                "# Kept across restarts: running VMs' sockets live there.\n\
                 RuntimeDirectory={r}\nRuntimeDirectoryMode=0700\nRuntimeDirectoryPreserve=yes\n"
            )
        })
        .unwrap_or_default();
    let kvm = if kvm_group {
        "SupplementaryGroups=kvm\n"
    } else {
        ""
    };
    format!(
        "# Written by `banger system install`; `banger system uninstall` removes it.
[Unit]
Description=banger daemon for {owner}: VM lifecycle, images, workspaces, .vm DNS
Wants={helper}
After={helper} network.target

[Service]
Type=simple
User={owner}
Group={group}
{kvm}Environment=BANGER_HOME={state} BANGER_RUNTIME_DIR={run} BANGER_HELPER_SOCKET={sock} BANGER_HELPER_AUTOSTART=0
Environment=PATH={path}
ExecStart={lib}/bangerd
# Only bangerd stops on a restart or an upgrade: the VMs it started keep
# running and the next bangerd adopts them.
KillMode=process
Restart=on-failure
RestartSec=1
{runtime}CapabilityBoundingSet=
NoNewPrivileges=yes
# /usr, /boot and /etc read-only. Not stricter: `vm cp` and workspace
# export write where the owner asks, in a home or under /tmp.
ProtectSystem=full
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_VSOCK AF_NETLINK
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
# No MemoryDenyWriteExecute: QEMU's software emulation generates code.

[Install]
WantedBy=multi-user.target
",
        owner = m.owner,
        helper = HELPER_UNIT,
        state = q(&m.state_dir),
        run = q(&m.runtime_dir),
        sock = q(&m.helper_socket),
        path = daemon_path(m),
        lib = q(&m.libexec_dir),
    )
}

/// The directives a unit file lacks from [`HARDENING`].
pub fn missing_hardening(unit: &str, text: &str) -> Vec<&'static str> {
    HARDENING
        .iter()
        .filter(|(u, _)| *u == unit)
        .flat_map(|(_, keys)| keys.iter().copied())
        .filter(|k| !text.lines().any(|l| l.trim_start().starts_with(k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(runtime: &str) -> InstallManifest {
        InstallManifest {
            version: "0".into(),
            owner: "alice".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            prefix: "/usr/local".into(),
            libexec_dir: "/usr/local/lib/banger".into(),
            state_dir: "/var/lib/banger".into(),
            runtime_dir: runtime.into(),
            helper_socket: "/run/banger-helper/helper.sock".into(),
            unit_dir: "/etc/systemd/system".into(),
        }
    }

    #[test]
    fn the_units_carry_their_hardening() {
        let m = manifest("/run/banger");
        let h = helper_unit(&m, Path::new("/var/log/banger"));
        let d = daemon_unit(&m, "alice", true);
        assert_eq!(missing_hardening(HELPER_UNIT, &h), Vec::<&str>::new());
        assert_eq!(missing_hardening(DAEMON_UNIT, &d), Vec::<&str>::new());
        assert!(h.contains("--owner-uid 1000"));
        assert!(h.contains("RuntimeDirectory=banger-helper\n"));
        assert!(d.contains("User=alice\n"));
        assert!(d.contains("RuntimeDirectory=banger\n"));
        assert!(d.contains("RuntimeDirectoryPreserve=yes\n"));
        assert!(d.contains("SupplementaryGroups=kvm\n"));
        // The daemon holds no capability at all.
        assert!(d.contains("\nCapabilityBoundingSet=\n"));
        // A unit that lost a directive is noticed.
        let weakened = d.replace("KillMode=process\n", "");
        assert_eq!(
            missing_hardening(DAEMON_UNIT, &weakened),
            vec!["KillMode=process"]
        );
    }

    #[test]
    fn a_runtime_directory_outside_run_is_left_to_the_installer() {
        let d = daemon_unit(&manifest("/srv/banger/run"), "alice", false);
        assert!(!d.contains("RuntimeDirectory="));
        assert!(!d.contains("SupplementaryGroups"));
    }

    #[test]
    fn paths_systemd_would_split_or_expand_are_refused() {
        for bad in ["/a b/c", "/a/%h", "/a/$HOME", "rel/dir", "/a\"b", "/a;b", "/a\nb"] {
            assert!(!unit_safe(Path::new(bad)), "{bad:?} passed");
        }
        assert!(unit_safe(Path::new("/usr/local/lib/banger")));
    }
}
