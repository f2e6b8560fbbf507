//! Snapshots of real QEMU guests (the suite in `firecracker.rs` does the
//! same on the real Firecracker): two VMs restored from one snapshot come
//! up with the snapshot's files and their own name, entropy and clock, and
//! survive a daemon killed with SIGKILL; bad names and missing snapshots
//! are clear errors; what a crash leaves in the snapshot directory is
//! removed when the daemon comes back.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;

fn exec(env: &Env, vm: &str, script: &str) -> String {
    env.banger_ok(&["vm", "exec", vm, "--", "sh", "-c", script])
}

#[test]
fn two_guests_restored_from_one_snapshot_have_its_files_and_their_own_identity() {
    let env = Env::with_image();
    env.create_small("src", &["--no-network"]);
    exec(
        &env,
        "src",
        "echo kept > /root/in-work; echo kept > /etc/in-overlay; sync",
    );
    let snap: Value =
        serde_json::from_str(&env.banger_ok(&["vm", "snapshot", "src", "--name", "s1", "--json"])).unwrap();
    assert_eq!(snap["vmm"], "qemu", "{snap}");
    assert!(snap["size_bytes"].as_u64().unwrap() > 1 << 20, "{snap}");
    // The source runs on, and what it does next is its own.
    assert_eq!(exec(&env, "src", "cat /root/in-work").trim(), "kept");
    exec(&env, "src", "echo later > /root/in-work");

    let mut seen = Vec::new();
    for name in ["r1", "r2"] {
        env.banger_ok(&["vm", "restore", "s1", "--name", name]);
        let out = exec(
            &env,
            name,
            "hostname; cat /root/in-work /etc/in-overlay; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; date +%s",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[0], name, "the restored guest keeps the source's hostname");
        assert_eq!(&lines[1..3], ["kept", "kept"], "the snapshot's disks: {out}");
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let guest_now: i64 = lines[4].parse().unwrap();
        assert!(
            (host_now - guest_now).abs() < 30,
            "guest clock {guest_now}, host {host_now}"
        );
        seen.push(lines[3].to_string());
    }
    assert_ne!(seen[0], seen[1], "two clones read the same random bytes");
    // Each clone took its seed in its channel's handshake, not on a stream
    // of its own (a round trip fewer in a guest just restored).
    for name in ["r1", "r2"] {
        let via: Vec<Value> = env
            .daemon_records()
            .into_iter()
            .filter(|r| r["message"] == "guest clock and entropy seeded" && r["vm"] == name)
            .map(|r| r["via"].clone())
            .collect();
        assert_eq!(via, ["handshake"], "{name}");
    }
    assert_eq!(exec(&env, "src", "cat /root/in-work").trim(), "later");
    let pid = |vm: &str| -> u64 {
        let v: Value = serde_json::from_str(&env.banger_ok(&["vm", "show", vm, "--json"])).unwrap();
        v["pid"].as_u64().unwrap()
    };
    let pids = [pid("src"), pid("r1"), pid("r2")];
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2] && pids[0] != pids[2],
        "{pids:?}"
    );

    // A daemon killed with SIGKILL adopts the restored VMs.
    env.kill_daemon();
    assert_eq!(exec(&env, "r2", "cat /etc/in-overlay").trim(), "kept");
    assert_eq!(pid("r2"), pids[2]);

    // `vm run --snapshot`: a restore, the command, its status, the VM gone.
    let out = env.banger(&[
        "vm",
        "run",
        "--rm",
        "--snapshot",
        "s1",
        "--",
        "sh",
        "-c",
        "cat /root/in-work; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
    let vms: Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 3, "{vms}");

    // Removing the snapshot leaves its clones running; deleting everything
    // leaves no process and no snapshot file.
    env.banger_ok(&["snapshot", "rm", "s1"]);
    assert_eq!(exec(&env, "r1", "echo up").trim(), "up");
    for vm in ["src", "r1", "r2"] {
        env.banger_ok(&["vm", "delete", vm]);
    }
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
    let left: Vec<_> = std::fs::read_dir(env.home().join("snapshots"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn snapshot_errors_are_clear_and_a_crash_leaves_no_files() {
    let env = Env::with_image();
    env.banger_ok(&["vm", "create", "--no-start", "--name", "q1", "--no-network"]);
    let out = env.banger(&["vm", "snapshot", "q1", "--name", "s1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not running") && err.contains("op-"),
        "no reason (or no op id) for refusing a stopped VM: {err}"
    );
    assert_eq!(env.banger_ok(&["snapshot", "list", "--json"]).trim(), "[]");
    for (args, says) in [
        (
            vec!["vm", "restore", "nosuch", "--name", "r1"],
            "no snapshot named",
        ),
        (vec!["snapshot", "show", "nosuch"], "no snapshot named"),
        (vec!["snapshot", "rm", "nosuch"], "no snapshot named"),
        (vec!["vm", "snapshot", "nosuch"], "nosuch"),
        (vec!["vm", "snapshot", "q1", "--name", "../x"], "name"),
    ] {
        let out = env.banger(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    // Nothing was made for the refused or failed calls.
    let vms: serde_json::Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");

    // What a daemon killed mid-snapshot leaves: an unfinished directory, and
    // a finished one whose row was never written.
    let snaps = env.home().join("snapshots");
    for d in ["0123456789abcdef.tmp", "fedcba9876543210"] {
        std::fs::create_dir_all(snaps.join(d)).unwrap();
        std::fs::write(snaps.join(d).join("memory"), b"guest memory").unwrap();
    }
    env.kill_daemon();
    env.banger_ok(&["snapshot", "list"]);
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left by a crash and not removed: {left:?}");
    env.banger_ok(&["vm", "delete", "q1"]);
}

#[test]
fn networked_clones_get_their_own_address_mac_and_host_key_and_answer_ssh() {
    let env = Env::with_image_in_netns();
    env.create_small("nsrc", &[]);
    env.banger_ok(&["vm", "snapshot", "nsrc", "--name", "ns1"]);
    for name in ["c1", "c2"] {
        env.banger_ok(&["vm", "restore", "ns1", "--name", name]);
    }
    let vms = ["nsrc", "c1", "c2"];
    let ips: Vec<String> = vms.iter().map(|v| env.guest_ip(v)).collect();
    assert!(
        ips[0] != ips[1] && ips[1] != ips[2] && ips[0] != ips[2],
        "{ips:?}"
    );
    let mut macs = Vec::new();
    for (vm, ip) in vms.iter().zip(&ips) {
        // The guest wears the address banger gave it, and DNS agrees.
        let seen = exec(&env, vm, "cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0 2>/dev/null || cat /proc/net/fib_trie");
        assert!(
            seen.contains(&format!("{ip}/")) || seen.contains(ip.as_str()),
            "{vm}: {seen}"
        );
        macs.push(seen.lines().next().unwrap().to_string());
        assert_eq!(env.dig(&format!("{vm}.vm")), *ip, "{vm}.vm");
        // Reached over its tap, whose rules pass only its own MAC and
        // address: ssh works only if the guest took both.
        assert_eq!(env.banger_ok(&["vm", "ssh", vm, "--", "hostname"]).trim(), *vm);
    }
    assert!(
        macs[0] != macs[1] && macs[1] != macs[2] && macs[0] != macs[2],
        "{macs:?}"
    );
    // Each clone has host keys of its own, pinned under its own name.
    let pins = std::fs::read_to_string(env.home().join("ssh/known_hosts")).unwrap();
    let key = |vm: &str| -> String {
        pins.lines()
            .find(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|h| h.split(',').any(|n| n == format!("{vm}.vm")))
            })
            .unwrap_or_else(|| panic!("no pin for {vm}: {pins}"))
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_string()
    };
    assert!(key("c1") != key("c2") && key("c1") != key("nsrc"), "{pins}");
    for vm in vms {
        env.banger_ok(&["vm", "delete", vm]);
    }
    env.banger_ok(&["snapshot", "rm", "ns1"]);
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
}

/// bangerd killed with SIGKILL in the middle of a QEMU snapshot, then of a
/// restore: the source runs (not left paused), no half snapshot stays, and
/// the half-restored VM is gone or runs as itself.
#[test]
fn a_daemon_killed_mid_snapshot_or_mid_restore_leaves_running_vms_and_whole_snapshots() {
    let env = Env::with_image();
    env.create_small("k1", &["--no-network"]);
    let snaps = env.home().join("snapshots");
    let tmp_exists = || {
        std::fs::read_dir(&snaps)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .then_some(())
    };
    let mut taking = env
        .cmd("banger")
        .args(["vm", "snapshot", "k1", "--name", "ks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the snapshot to begin", Duration::from_secs(30), tmp_exists);
    env.kill_daemon();
    let _ = taking.wait();
    // The next command starts a daemon, which adopts k1 and resumes it.
    assert_eq!(exec(&env, "k1", "echo runs").trim(), "runs");
    assert!(tmp_exists().is_none(), "an unfinished snapshot was left");
    let listed: Value = serde_json::from_str(&env.banger_ok(&["snapshot", "list", "--json"])).unwrap();
    for s in listed.as_array().unwrap() {
        let dir = snaps.join(s["id"].as_str().unwrap());
        assert!(
            dir.join("state").is_file(),
            "a listed snapshot without its files: {s}"
        );
    }

    let _ = env.banger(&["snapshot", "rm", "ks"]);
    env.banger_ok(&["vm", "snapshot", "k1", "--name", "ks"]);
    let before = env.vm_processes().len();
    let mut restoring = env
        .cmd("banger")
        .args(["vm", "restore", "ks", "--name", "kr"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the restored VM's QEMU to start", Duration::from_secs(30), || {
        (env.vm_processes().len() > before).then_some(())
    });
    env.kill_daemon();
    let _ = restoring.wait();
    let vms: Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    if names.contains(&"kr") {
        // Kept: then it starts from its snapshot and is itself.
        env.banger_ok(&["vm", "start", "kr"]);
        assert_eq!(exec(&env, "kr", "hostname").trim(), "kr");
        env.banger_ok(&["vm", "delete", "kr"]);
    }
    assert_eq!(exec(&env, "k1", "echo still").trim(), "still");
    env.banger_ok(&["vm", "delete", "k1"]);
    env.banger_ok(&["snapshot", "rm", "ks"]);
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
}
