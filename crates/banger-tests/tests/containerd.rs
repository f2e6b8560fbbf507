//! banger as a containerd runtime: the real containerd from Debian, started
//! here with a private root, state and socket, runs containers through
//! `containerd-shim-banger-v2` as banger VMs. `ctr run` prints the guest's
//! kernel and returns the container's exit code; `ctr task exec` runs in
//! a running task; `ctr task kill` ends it; after delete nothing of the VM
//! is left. The shim's log names each task with the op id of every banger
//! call it made, and the daemon's log has those op ids.

use banger_tests::containerd::{oci_archive, text, Containerd, RUNTIME};
use banger_tests::{wait_for, Env};
use std::time::Duration;

const IMAGE: &str = "docker.io/banger/busybox:test";

#[test]
fn containerd_runs_containers_as_banger_vms_and_leaves_nothing() {
    let env = Env::with_image();
    let d = tempfile::Builder::new().prefix("banger-ctrd").tempdir().unwrap();
    let ctrd = Containerd::start(d.path(), &env.banger_env());
    let archive = d.path().join("image.tar");
    std::fs::write(&archive, oci_archive(IMAGE)).unwrap();
    ctrd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(ctrd.ctr_ok(&["image", "ls", "-q"]).contains(IMAGE));

    // A container's exit code and output, from inside a VM.
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t1",
        "sh",
        "-c",
        "uname -r; exit 3",
    ]);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        out.status.code(),
        Some(3),
        "ctr run: {}\n{}",
        text(&out),
        ctrd.log_tail()
    );
    assert!(
        printed.contains("cloud") && printed != host.trim(),
        "not the guest's kernel: {printed:?}"
    );

    // A running task: exec into it, kill it, delete it.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "t2", "sleep", "1000"]);
    let hi = ctrd.ctr_ok(&["task", "exec", "--exec-id", "e1", "t2", "echo", "hello from exec"]);
    assert_eq!(hi, "hello from exec\n");
    let ids = ctrd.ctr_ok(&[
        "task",
        "exec",
        "--user",
        "1000:1001",
        "--exec-id",
        "u1",
        "t2",
        "sh",
        "-c",
        "id -u; id -g",
    ]);
    assert_eq!(ids, "1000\n1001\n", "an exec runs as the user it names");
    let code = ctrd.ctr(&["task", "exec", "--exec-id", "e2", "t2", "sh", "-c", "exit 7"]);
    assert_eq!(code.status.code(), Some(7), "{}", text(&code));
    assert!(ctrd.ctr_ok(&["task", "ls"]).contains("RUNNING"));
    // An exec with a terminal takes ctr's terminal size (ResizePty), here
    // a 33x111 pty that `script` gives ctr.
    let wait_size = "i=0; while [ $i -lt 150 ]; do s=$(stty size); [ \"$s\" = \"33 111\" ] && break; \
                     i=$((i+1)); sleep 0.1; done; echo \"size $s\"";
    let inner = format!(
        "stty rows 33 cols 111; ctr -a {} -n default task exec -t --exec-id tty1 t2 sh -c '{wait_size}'",
        ctrd.sock.display()
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("size 33 111"),
        "the exec's terminal was not resized: {}",
        text(&o)
    );
    // Its pid is the VMM's, a live process on the host.
    let ls = ctrd.ctr_ok(&["task", "ls"]);
    let pid: u32 = ls
        .lines()
        .find(|l| l.starts_with("t2"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    assert!(
        pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "task pid: {ls}"
    );
    // Metrics are the VM's, as cgroup v2 figures.
    let m: serde_json::Value =
        serde_json::from_str(&ctrd.ctr_ok(&["task", "metrics", "--format", "json", "t2"])).unwrap();
    let used = m["memory"]["usage"].as_u64().unwrap_or(0);
    let limit = m["memory"]["usage_limit"].as_u64().unwrap_or(0);
    assert!(used > 0 && used < limit, "memory figures: {m}");
    // A signal other than SIGKILL reaches the process as it is: its trap
    // decides how it ends (sent once the trap is set).
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t3",
        "sh",
        "-c",
        "trap 'exit 42' USR1; : > /tmp/trapped; while true; do sleep 1; done",
    ]);
    wait_for("t3's trap", Duration::from_secs(30), || {
        ctrd.ctr(&["task", "exec", "--exec-id", "probe", "t3", "cat", "/tmp/trapped"])
            .status
            .success()
            .then_some(())
    });
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGUSR1", "t3"]);
    wait_for("t3 to stop", Duration::from_secs(30), || {
        ctrd.ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with("t3") && l.contains("STOPPED"))
            .then_some(())
    });
    // ctr reports a task's non-zero exit code as it deletes it.
    let deleted = ctrd.ctr(&["task", "delete", "t3"]);
    assert!(
        String::from_utf8_lossy(&deleted.stderr).contains("exit code 42"),
        "t3's exit: {}",
        text(&deleted)
    );
    ctrd.ctr_ok(&["container", "rm", "t3"]);
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "t2"]);
    wait_for("t2 to stop", Duration::from_secs(30), || {
        ctrd.ctr_ok(&["task", "ls"]).contains("STOPPED").then_some(())
    });
    // A stopped task holds no VMM: its VM stopped with its process.
    wait_for("t2's VM to stop", Duration::from_secs(30), || {
        let list: serde_json::Value =
            serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
        let vms = list.as_array().unwrap();
        (vms.len() == 1 && vms[0]["state"] == "stopped").then_some(())
    });
    assert!(env.vm_processes().is_empty(), "a stopped task's VMM runs on");
    ctrd.ctr_ok(&["task", "delete", "t2"]);
    ctrd.ctr_ok(&["container", "rm", "t2"]);

    // Nothing of either VM is left: no record, no process, no directory.
    let vms: serde_json::Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 0, "VMs left: {vms}");
    wait_for("the VMs' processes to end", Duration::from_secs(10), || {
        env.vm_processes().is_empty().then_some(())
    });
    let left: Vec<_> = std::fs::read_dir(env.vms_dir())
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "VM directories left: {left:?}");
    wait_for("the shims to exit", Duration::from_secs(10), || {
        ctrd.shims("").is_empty().then_some(())
    });

    // One grep joins the task id and banger's op ids: the shim names both
    // on one line, and the daemon logged those op ids.
    let log = std::fs::read_to_string(&ctrd.log).unwrap();
    let op = log
        .lines()
        .filter(|l| l.contains("task=t1 ") && l.contains("call=vm create"))
        .find_map(|l| l.split("op_id=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no shim line names t1 with an op id:\n{}", ctrd.log_tail()))
        .to_string();
    let records = env.daemon_records();
    assert!(
        records.iter().any(|r| r["op_id"] == op.as_str()),
        "the daemon logged nothing under {op}"
    );
}

/// A crash on either side of the shim. containerd killed with SIGKILL and
/// started again finds the task still running (the shim and the VM ran
/// on), execs into it, and learns its real exit code. A shim killed with
/// SIGKILL is a dead task to containerd (as for runc): it runs the shim's
/// `delete`, which removes the VM, and nothing is left.
#[test]
fn a_crash_of_containerd_or_the_shim_loses_nothing_and_leaks_nothing() {
    let env = Env::with_image();
    let d = tempfile::Builder::new().prefix("banger-ctrd").tempdir().unwrap();
    let mut ctrd = Containerd::start(d.path(), &env.banger_env());
    let archive = d.path().join("image.tar");
    std::fs::write(&archive, oci_archive(IMAGE)).unwrap();
    ctrd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);

    // containerd dies and comes back.
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t3",
        "sh",
        "-c",
        "read x; exit 5",
    ]);
    ctrd.crash_and_restart();
    assert!(
        ctrd.ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with("t3") && l.contains("RUNNING")),
        "t3 is not running after containerd's restart:\n{}",
        ctrd.log_tail()
    );
    let hi = ctrd.ctr_ok(&["task", "exec", "--exec-id", "e1", "t3", "echo", "still here"]);
    assert_eq!(hi, "still here\n");
    // Its stdin is gone with the old containerd: `read` ends, the script exits 5.
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGTERM", "t3"]);
    wait_for("t3 to stop", Duration::from_secs(30), || {
        ctrd.ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with("t3") && l.contains("STOPPED"))
            .then_some(())
    });
    let del = ctrd.ctr(&["task", "delete", "t3"]);
    assert!(del.status.success(), "{}", text(&del));
    let said = String::from_utf8_lossy(&del.stderr);
    assert!(
        said.contains("exit code 143") || said.contains("exit code 5"),
        "no real exit code: {said}"
    );
    ctrd.ctr_ok(&["container", "rm", "t3"]);

    // The shim's task server is killed while a task runs and a client
    // waits on it: containerd keeps the task, the waiting `ctr run` gets
    // its real exit code and output, an exec still works.
    let script = "echo before; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo after; exit 7";
    let waiting = ctrd
        .ctr_command(&["run", "--runtime", RUNTIME, IMAGE, "t4", "sh", "-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let task_pid = |ctrd: &Containerd| {
        ctrd.ctr_ok(&["task", "ls"])
            .lines()
            .find(|l| l.starts_with("t4") && l.contains("RUNNING"))
            .and_then(|l| l.split_whitespace().nth(1).map(String::from))
    };
    let pid = wait_for("t4 to run", Duration::from_secs(60), || task_pid(&ctrd));
    let servers = ctrd.task_servers("t4");
    assert_eq!(servers.len(), 1, "one task server for t4: {servers:?}");
    assert_eq!(ctrd.shims("t4").len(), 2, "a keeper and its task server");
    // SAFETY: the task server this test's containerd's shim runs.
    unsafe { libc::kill(servers[0] as i32, libc::SIGKILL) };
    let restarted = wait_for("a restarted task server", Duration::from_secs(30), || {
        ctrd.task_servers("t4").into_iter().find(|p| *p != servers[0])
    });
    assert_eq!(
        task_pid(&ctrd).as_deref(),
        Some(pid.as_str()),
        "after the server's death containerd still has t4 running:\n{}",
        ctrd.log_tail()
    );
    // Then the keeper itself (the process containerd started, which holds
    // its connection): the server holds copies and starts a new keeper.
    let keeper = ctrd
        .shims("t4")
        .into_iter()
        .find(|p| *p != restarted)
        .expect("a keeper");
    // SAFETY: the keeper process this test's containerd started.
    unsafe { libc::kill(keeper as i32, libc::SIGKILL) };
    wait_for("a new keeper", Duration::from_secs(30), || {
        let shims = ctrd.shims("t4");
        (shims.len() == 2 && !shims.contains(&keeper) && shims.contains(&restarted)).then_some(())
    });
    assert_eq!(
        task_pid(&ctrd).as_deref(),
        Some(pid.as_str()),
        "after the keeper's death containerd still has t4 running:\n{}",
        ctrd.log_tail()
    );
    let hi = ctrd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "t4",
        "sh",
        "-c",
        "echo alive; touch /tmp/go",
    ]);
    assert_eq!(hi, "alive\n");
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "the waiting `ctr run` gets the task's real exit code: {}\n{}",
        text(&out),
        ctrd.log_tail()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("before") && said.contains("after"),
        "output across the restart: {said}"
    );
    ctrd.ctr_ok(&["container", "rm", "t4"]);
    // The restarted server shuts down with its last task, and the new
    // keeper with it.
    wait_for("t4's shim to exit", Duration::from_secs(20), || {
        ctrd.shims("t4").is_empty().then_some(())
    });
    // Gone, or a zombie: after its keeper died it is whoever reaps
    // orphans' to reap.
    let stat = std::fs::read_to_string(format!("/proc/{restarted}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        "the restarted server still runs: {stat}"
    );

    // The whole shim dies (keeper and server at once): containerd's own
    // clean-up runs `shim delete`, which removes the VM. Both are stopped
    // before either is killed: killed one after the other, the second
    // could see the first die and restart it, as it is meant to.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "t5", "sleep", "1000"]);
    let shims = ctrd.shims("t5");
    assert_eq!(shims.len(), 2, "a keeper and a server for t5: {shims:?}");
    for signal in [libc::SIGSTOP, libc::SIGKILL] {
        for pid in &shims {
            // SAFETY: the shim processes this test's containerd started.
            unsafe { libc::kill(*pid as i32, signal) };
        }
    }
    wait_for("containerd to see t5 end", Duration::from_secs(30), || {
        (!ctrd
            .ctr_ok(&["task", "ls"])
            .lines()
            .any(|l| l.starts_with("t5") && l.contains("RUNNING")))
        .then_some(())
    });
    let _ = ctrd.ctr(&["task", "delete", "t5"]);
    ctrd.ctr_ok(&["container", "rm", "t5"]);
    wait_for(
        "the shim's delete to remove the VM",
        Duration::from_secs(30),
        || {
            let vms: serde_json::Value =
                serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
            vms.as_array().unwrap().is_empty().then_some(())
        },
    );
    wait_for("the VMs' processes to end", Duration::from_secs(10), || {
        env.vm_processes().is_empty().then_some(())
    });
    wait_for("the shims to exit", Duration::from_secs(10), || {
        ctrd.shims("").is_empty().then_some(())
    });
}
