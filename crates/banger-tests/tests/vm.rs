//! Real guests under the QEMU back-end: boot, exec, persistence, teardown,
//! crash recovery, concurrency and bad input. The image is built once per
//! machine (see `shared_image`).

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::time::Duration;

fn assert_nothing_left(env: &Env) {
    let vms: Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 0, "VMs left: {vms}");
    let left: Vec<_> = std::fs::read_dir(env.vms_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");
    assert!(
        env.vm_processes().is_empty(),
        "processes left behind: {:?}",
        env.vm_processes()
    );
}

#[test]
fn vm_run_prints_the_guest_kernel_and_exits_with_the_command_status() {
    let env = Env::with_image();
    let out = env.banger(&[
        "vm",
        "run",
        "--rm",
        "--name",
        "runner",
        "--",
        "sh",
        "-c",
        "uname -r; echo to-stderr >&2; exit 7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stdout: {stdout}\nstderr: {stderr}");
    let kernel_dir = banger_tests::shared_image().1;
    let kernel: Value =
        serde_json::from_str(&env.banger_ok(&["kernel", "show", &kernel_dir, "--json"])).unwrap();
    let version = kernel["version"].as_str().unwrap();
    assert!(version.contains("cloud-amd64"), "{kernel}");
    // The uncompressed kernel Firecracker needs was extracted too.
    let vmlinux =
        std::path::Path::new(&kernel_dir).join(kernel["vmlinux"].as_str().expect("vmlinux in manifest"));
    let head = std::fs::read(&vmlinux).unwrap();
    assert_eq!(
        &head[..4],
        b"\x7fELF",
        "{} is not an ELF kernel",
        vmlinux.display()
    );
    assert_eq!(stdout.trim(), version, "guest kernel version not printed");
    assert!(stderr.contains("to-stderr"), "{stderr}");
    assert!(stderr.contains("spec:"), "{stderr}");
    assert_nothing_left(&env);
}

#[test]
fn lifecycle_keeps_root_across_stop_start_and_delete_leaves_nothing() {
    let env = Env::with_image();
    env.banger_ok(&[
        "vm",
        "create",
        "--name",
        "life",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "256",
    ]);
    let v = env.vm("life");
    assert_eq!(v["state"], "running");
    assert_eq!(v["vmm"], "qemu");
    let pid = v["pid"].as_u64().expect("pid of a running VM");

    // The work disk is mounted at /root and has the requested size.
    env.banger_ok(&[
        "vm",
        "exec",
        "life",
        "--",
        "sh",
        "-c",
        "echo kept > /root/marker; echo lost > /etc/marker; sync",
    ]);
    let df = env.banger_ok(&["vm", "exec", "life", "--", "df", "-m", "/root"]);
    assert!(df.contains("/root"), "{df}");
    assert_eq!(
        env.banger(&["vm", "exec", "life", "--", "false"]).status.code(),
        Some(1)
    );

    let stopped = env.banger_ok(&["vm", "stop", "life", "--json"]);
    let stopped: Value = serde_json::from_str(&stopped).unwrap();
    assert_eq!(stopped["state"], "stopped");
    assert!(
        env.vm_processes().is_empty(),
        "stop left processes: {:?}",
        env.vm_processes()
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || env.vm_processes().is_empty());
    let out = env.banger(&["vm", "exec", "life", "--", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_running"),
        "exec on a stopped VM"
    );

    env.banger_ok(&["vm", "start", "life"]);
    let kept = env.banger_ok(&["vm", "exec", "life", "--", "cat", "/root/marker"]);
    assert_eq!(kept.trim(), "kept", "/root did not survive stop/start");
    // The system overlay persists too: it is the VM's own disk.
    let etc = env.banger_ok(&["vm", "exec", "life", "--", "cat", "/etc/marker"]);
    assert_eq!(etc.trim(), "lost");
    // A client that hangs up cancels its call: the guest command dies.
    let mut exec = env
        .cmd("banger")
        .args([
            "vm",
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "echo $$ > /root/exec.pid; exec sleep 600",
        ])
        .spawn()
        .unwrap();
    wait_for("the guest command to start", Duration::from_secs(30), || {
        let out = env.banger(&["vm", "exec", "life", "--", "cat", "/root/exec.pid"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    exec.kill().unwrap();
    let _ = exec.wait();
    wait_for("the guest command to be killed", Duration::from_secs(30), || {
        env.banger(&[
            "vm",
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "kill -0 $(cat /root/exec.pid)",
        ])
        .status
        .code()
        .filter(|c| *c != 0)
    });
    let logs = env.banger_ok(&["vm", "logs", "life"]);
    assert!(!logs.is_empty(), "serial log is empty");

    env.banger_ok(&["vm", "delete", "life"]);
    assert_nothing_left(&env);
}

#[test]
fn daemon_kill_9_adopts_live_vms_and_reaps_dead_ones() {
    let env = Env::with_image();
    env.create_small("alive", &[]);
    env.create_small("doomed", &[]);
    let doomed = env.vm("doomed");
    let doomed_dir = doomed["vm_dir"].as_str().unwrap().to_string();
    let alive_pid = env.vm("alive")["pid"].as_u64().unwrap();

    // kill -9 the daemon, then kill one VMM behind its back.
    let daemon = env.kill_daemon();
    // SAFETY: the VMM this test started.
    unsafe { libc::kill(doomed["pid"].as_u64().unwrap() as i32, libc::SIGKILL) };
    // What a creation whose record never reached the disk leaves (a power
    // loss before its end): a VM directory no record names.
    let stray = std::path::Path::new(&doomed_dir).with_file_name("00000000deadbeef");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("overlay.ext4"), b"half made").unwrap();

    // Any command brings the daemon back; reconcile has run before it serves.
    let list: Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    assert_ne!(env.daemon_pid().unwrap(), daemon);
    let state = |n: &str| list.as_array().unwrap().iter().find(|v| v["name"] == n).unwrap()["state"].clone();
    assert_eq!(state("alive"), "running");
    assert_eq!(state("doomed"), "stopped");
    assert_eq!(
        env.vm("alive")["pid"].as_u64(),
        Some(alive_pid),
        "the VM was not adopted"
    );
    let out = env.banger_ok(&["vm", "exec", "alive", "--", "echo", "still here"]);
    assert_eq!(out.trim(), "still here");
    assert!(!stray.exists(), "a directory without a record was left");
    assert!(
        std::path::Path::new(&doomed_dir).is_dir(),
        "a recorded VM's directory was swept"
    );

    // The dead VM's leftovers (its vsock backend, sockets, scratch file) are gone.
    let doomed_procs = banger_tests::processes_mentioning(&doomed_dir);
    assert!(
        doomed_procs.is_empty(),
        "leftover processes of the dead VM: {doomed_procs:?}"
    );
    for f in ["vsock.sock", "agent.serial", "qmp.sock", "handles.json"] {
        assert!(
            !std::path::Path::new(&doomed_dir).join(f).exists(),
            "{f} left behind"
        );
    }
    // The adopted VM's log lines after restart carry the reconcile op id.
    let adopted: Vec<Value> = env
        .daemon_records()
        .into_iter()
        .filter(|r| r["message"] == "reconcile: adopted running VM")
        .collect();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert!(adopted[0]["op_id"].as_str().unwrap().starts_with("op-"));

    env.banger_ok(&["vm", "delete", "alive"]);
    env.banger_ok(&["vm", "delete", "doomed"]);
    assert_nothing_left(&env);
}

#[test]
fn a_vmm_killed_while_the_daemon_runs_is_found_and_cleaned_up() {
    let env = Env::with_image();
    env.create_small("victim", &[]);
    let v = env.vm("victim");
    // SAFETY: the VMM this test started.
    unsafe { libc::kill(v["pid"].as_u64().unwrap() as i32, libc::SIGKILL) };
    wait_for(
        "the daemon to notice the dead VMM",
        Duration::from_secs(20),
        || (env.vm("victim")["state"] == "stopped").then_some(()),
    );
    assert!(
        env.vm_processes().is_empty(),
        "leftovers: {:?}",
        env.vm_processes()
    );
    env.banger_ok(&["vm", "delete", "victim"]);
    assert_nothing_left(&env);
}

#[test]
fn two_concurrent_starts_both_succeed_with_distinct_op_ids() {
    let env = Env::with_image();
    for n in ["left", "right"] {
        env.create_small(n, &["--no-start"]);
        assert_eq!(env.vm(n)["state"], "stopped");
    }
    let spawn = |n: &str| {
        env.cmd("banger")
            .args(["vm", "start", n])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("left"), spawn("right"));
    for (n, c) in [("left", a), ("right", b)] {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "start {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let running: Vec<Value> = env
        .daemon_records()
        .into_iter()
        .filter(|r| r["message"] == "vm running")
        .collect();
    let op = |n: &str| {
        running
            .iter()
            .find(|r| r["vm"] == n)
            .map(|r| r["op_id"].clone())
            .unwrap_or_else(|| panic!("no 'vm running' line for {n}"))
    };
    assert_ne!(op("left"), op("right"));
    assert!(op("left").as_str().unwrap().starts_with("op-"));
    for n in ["left", "right"] {
        assert_eq!(env.banger_ok(&["vm", "exec", n, "--", "hostname"]).trim(), n);
        env.banger_ok(&["vm", "delete", n]);
    }
    assert_nothing_left(&env);
}

fn refused(env: &Env, args: &[&str], code: &str, text: &str) {
    let out = env.banger(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(text), "{args:?}: {stderr}");
    if !code.is_empty() {
        assert!(stderr.contains(&format!("code: {code}")), "{args:?}: {stderr}");
        assert!(stderr.contains("(op-"), "no op id: {stderr}");
    }
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    let env = Env::with_image();
    refused(
        &env,
        &["vm", "create", "--image", "nope"],
        "not_found",
        "no image named \"nope\"",
    );
    // The CLI refuses a bad name itself; the daemon refuses it too.
    refused(
        &env,
        &["vm", "create", "--name", "Bad_Name"],
        "",
        "invalid VM name",
    );
    let raw =
        env.raw_daemon(b"{\"version\":1,\"method\":\"vm.create.begin\",\"params\":{\"name\":\"-bad\"}}\n");
    assert_eq!(raw.last().unwrap()["error"]["code"], "bad_request");
    refused(
        &env,
        &["vm", "create", "--disk-size", "1"],
        "bad_request",
        "too small",
    );
    // A kernel that is not there.
    refused(
        &env,
        &[
            "image",
            "register",
            "nokernel",
            "--rootfs",
            &banger_tests::shared_image().0,
            "--kernel",
            "9.9.9-none",
        ],
        "not_found",
        "no kernel",
    );
    // A VMM binary that is not there.
    let out = env
        .cmd("banger")
        .env("BANGER_QEMU", "/nonexistent/qemu")
        .args(["daemon", "stop"])
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_for("daemon stop", Duration::from_secs(5), || {
        (env.banger(&["daemon", "status"]).status.code() == Some(3)).then_some(())
    });
    let out = env
        .cmd("banger")
        .env("BANGER_QEMU", "/nonexistent/qemu")
        .args(["vm", "create", "--name", "novmm"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/qemu") && stderr.contains("(op-"),
        "{stderr}"
    );
    env.banger_ok(&["daemon", "stop"]);
    wait_for("daemon stop", Duration::from_secs(5), || {
        (env.banger(&["daemon", "status"]).status.code() == Some(3)).then_some(())
    });
    // Unknown VMs.
    refused(
        &env,
        &["vm", "start", "ghost"],
        "not_found",
        "no VM named \"ghost\"",
    );
    refused(&env, &["vm", "exec", "ghost", "--", "true"], "not_found", "ghost");
    assert_nothing_left(&env);
}

#[test]
fn teardown_never_signals_a_process_banger_did_not_start() {
    let env = Env::with_image();
    env.create_small("tailed", &[]);
    let dir = env.vm("tailed")["vm_dir"].as_str().unwrap().to_string();
    // A user following the console: its command line names the VM's files.
    let mut tail = std::process::Command::new("tail")
        .args(["-f", &format!("{dir}/serial.log")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    env.banger_ok(&["vm", "kill", "tailed"]);
    env.banger_ok(&["vm", "start", "tailed"]);
    env.banger_ok(&["vm", "delete", "tailed"]);
    assert!(
        tail.try_wait().unwrap().is_none(),
        "banger signalled the user's tail -f"
    );
    let _ = tail.kill();
    let _ = tail.wait();
}
