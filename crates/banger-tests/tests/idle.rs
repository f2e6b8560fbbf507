//! `--auto-stop-idle`: a VM with nothing running in it is stopped once it
//! has been idle that long, by the daemon, under an op id of its own; a VM
//! with a command in flight is not, however quiet the command is, nor is
//! one running a guest session.

use banger_tests::{wait_for, Env};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn an_idle_vm_is_stopped_and_a_busy_one_is_not() {
    let env = Env::with_image();
    let t = Instant::now();
    env.create_small("idler", &["--auto-stop-idle", "10s"]);
    env.create_small("worker", &["--auto-stop-idle", "10s"]);
    env.create_small("server", &["--auto-stop-idle", "10s"]);
    // A quiet session, and no client at all: the VM is in use.
    env.banger_ok(&[
        "vm", "session", "start", "server", "--name", "quiet", "--", "sleep", "600",
    ]);
    // A quiet command in flight: no CPU, but the VM is in use.
    let mut sleeper = env
        .cmd("banger")
        .args(["vm", "exec", "worker", "--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the idle VM to be stopped", Duration::from_secs(120), || {
        (env.vm("idler")["state"] == "stopped").then_some(())
    });
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(10),
        "stopped after {took:?}, before its idle limit"
    );
    // Past the worker's own limit too (it was made after the idler), with
    // three samples in it: still running.
    let until = Instant::now() + Duration::from_secs(16);
    while Instant::now() < until {
        assert_eq!(
            env.vm("worker")["state"],
            "running",
            "a VM with a command in flight was stopped"
        );
        assert_eq!(
            env.vm("server")["state"],
            "running",
            "a VM running a session was stopped"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let stops: Vec<_> = env
        .daemon_records()
        .into_iter()
        .filter(|r| r["message"] == "stopping an idle VM")
        .collect();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0]["vm"], "idler");
    assert!(
        stops[0]["op_id"].as_str().is_some_and(|o| o.starts_with("op-")),
        "{stops:?}"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    env.banger_ok(&["vm", "delete", "idler"]);
    env.banger_ok(&["vm", "delete", "worker"]);
    env.banger_ok(&["vm", "delete", "server"]);
}
