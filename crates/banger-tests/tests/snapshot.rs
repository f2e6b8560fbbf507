//! Snapshots without Firecracker (the suite in `firecracker.rs` takes and
//! restores real ones): a QEMU VM is refused with the reason, bad names
//! and missing snapshots are clear errors, and what a crash leaves in the
//! snapshot directory (an unfinished snapshot, files without a row) is
//! removed when the daemon comes back.

use banger_tests::Env;

#[test]
fn snapshots_refuse_qemu_clearly_and_a_crash_leaves_no_files() {
    let env = Env::with_image();
    env.banger_ok(&["vm", "create", "--no-start", "--name", "q1", "--no-network"]);
    let out = env.banger(&["vm", "snapshot", "q1", "--name", "s1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("vhost-user") && err.contains("Firecracker") && err.contains("op-"),
        "no reason (or no op id) for refusing a QEMU VM: {err}"
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
