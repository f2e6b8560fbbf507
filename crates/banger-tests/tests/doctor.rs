//! `banger doctor`: every check present, the KVM check truthful about
//! this host, the exit status matching the worst result, and nothing
//! created or changed by running it.

use banger_tests::Env;
use serde_json::Value;
use std::path::Path;

const CHECKS: &[&str] = &[
    "kvm",
    "backend",
    "qemu",
    "banger-vsock-bridge",
    "firecracker",
    "jailer",
    "tool:mkfs.ext4",
    "tool:debootstrap",
    "tool:ip",
    "tool:nft",
    "helper",
    "daemon",
    "disk",
    "database",
    "services",
];

fn doctor(env: &Env) -> (i32, Value) {
    let out = env.banger(&["doctor", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), v)
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {v}"))
}

/// Every path under `root` (files and directories), sorted.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.display().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn doctor_reports_every_check_truthfully_and_changes_nothing() {
    let env = Env::new();
    let before = tree(env.dir.path());
    let (code, v) = doctor(&env);
    for name in CHECKS {
        let c = check(&v, name);
        assert!(
            ["PASS", "WARN", "FAIL"].contains(&c["status"].as_str().unwrap_or("")),
            "{c}"
        );
    }
    // The exit status follows the worst result.
    let worst = v["worst"].as_str().unwrap();
    assert_eq!(code == 1, worst == "FAIL", "exit {code} with worst {worst}");
    // KVM: a PASS only where a Linux guest can run under it, which needs
    // hardware virtualisation in the CPU flags (absent on PVM hosts).
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw = cpu
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = check(&v, "kvm");
    assert_eq!(
        kvm["status"] == "PASS",
        hw && Path::new("/dev/kvm").exists(),
        "the KVM check is not truthful here: {kvm}"
    );
    // A fresh state directory: nothing to read yet, and nothing made.
    assert!(
        check(&v, "database")["detail"]
            .as_str()
            .unwrap()
            .contains("does not exist yet"),
        "{v}"
    );
    assert_eq!(tree(env.dir.path()), before, "doctor created or removed files");
    assert!(env.daemon_pid().is_none(), "doctor started the daemon");

    // A database that is there but empty: FAIL, exit 1, left as it was.
    let db = env.home().join("state.db");
    std::fs::create_dir_all(env.home()).unwrap();
    std::fs::write(&db, b"").unwrap();
    let (code, v) = doctor(&env);
    assert_eq!(check(&v, "database")["status"], "FAIL", "{v}");
    assert_eq!(code, 1);
    assert_eq!(
        std::fs::metadata(&db).unwrap().len(),
        0,
        "doctor wrote the database"
    );
}

#[test]
fn version_names_the_build_and_its_protocols() {
    let env = Env::new();
    let out = env.banger(&["version", "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["version"].as_str().is_some_and(|s| s.split('.').count() == 3),
        "{v}"
    );
    let commit = v["commit"].as_str().unwrap();
    assert!(
        commit == "unknown" || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{v}"
    );
    let date = v["build_date"].as_str().unwrap();
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "{v}"
    );
    assert_eq!(
        (v["rpc_protocol"].as_u64(), v["agent_protocol"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(env.daemon_pid().is_none(), "version started the daemon");
}

#[test]
fn config_show_says_where_each_setting_comes_from() {
    let env = Env::new();
    std::fs::create_dir_all(env.home()).unwrap();
    std::fs::write(env.home().join("config.toml"), "default_vcpus = 3\n").unwrap();
    let out = env
        .cmd("banger")
        .env("BANGER_BRIDGE", "bangerq")
        .args(["config", "show", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
    };
    assert_eq!(
        (get("bridge")["value"].clone(), get("bridge")["source"].clone()),
        ("bangerq".into(), "env:BANGER_BRIDGE".into())
    );
    assert_eq!(
        (
            get("default_vcpus")["value"].clone(),
            get("default_vcpus")["source"].clone()
        ),
        ("3".into(), "file".into())
    );
    assert_eq!(get("default_memory_mib")["source"], "default");
    assert_eq!(get("state_dir")["source"], "env:BANGER_HOME");
}

/// A reader that went away (`banger … | head`) ends banger quietly, with
/// the shell's code for SIGPIPE, never a panic on stderr.
#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let env = Env::new();
    for args in [&["completions", "bash"][..], &["version"], &["config", "show"]] {
        let mut fds = [0; 2];
        // SAFETY: a two-element array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe just made these; the read end is closed at once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(r);
        let out = env
            .cmd("banger")
            .args(args)
            .stdout(std::process::Stdio::from(w))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "banger {args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "banger {args:?}: {:?}", out.status);
    }
}
