//! Guest sessions on a real guest: a session keeps running and capturing
//! output while nothing is attached, through a `kill -9` of bangerd; an
//! attach replays from a byte and then follows; one input owner at a time;
//! `stop` ends the whole process group; a guest restart leaves the session
//! `lost`; the log is capped; a server in a session shows in `vm ports`.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

fn show(env: &Env, vm: &str, s: &str) -> Value {
    serde_json::from_str(&env.banger_ok(&["vm", "session", "show", vm, s, "--json"]))
        .expect("session show --json")
}

/// The highest `tick N` in `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .max()
}

fn guest_count(env: &Env, vm: &str, pattern: &str) -> String {
    env.banger_ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        &format!("pgrep -c -f '{pattern}' || true"),
    ])
    .trim()
    .to_string()
}

#[test]
fn a_session_outlives_its_clients_and_the_daemon_and_is_followed_from_any_byte() {
    let env = Env::with_image();
    env.create_small("sv", &[]);
    let started = env.banger_ok(&[
        "vm",
        "session",
        "start",
        "sv",
        "--name",
        "tick",
        "--json",
        "--",
        "sh",
        "-c",
        "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
    ]);
    let started: Value = serde_json::from_str(&started).unwrap();
    assert_eq!(started["state"], "running", "{started}");
    let op = started["op_id"].as_str().unwrap().to_string();

    // Nothing attached, and the daemon killed: the output still grows.
    wait_for("some output", DEADLINE, || {
        (show(&env, "sv", "tick")["next_seq"].as_u64()? > 20).then_some(())
    });
    let before = show(&env, "sv", "tick")["next_seq"].as_u64().unwrap();
    env.kill_daemon();
    // A window with no daemon at all (not a wait for anything).
    std::thread::sleep(Duration::from_millis(600));
    let after = wait_for("the session seen again", DEADLINE, || {
        let v = show(&env, "sv", "tick");
        (v["state"] == "running").then(|| v["next_seq"].as_u64())?
    });
    assert!(
        after > before,
        "no output captured while the daemon was gone: {before} -> {after}"
    );
    let v = show(&env, "sv", "tick");
    assert_eq!(
        v["op_id"],
        op.as_str(),
        "the session lost the op id that started it"
    );

    // Attach from byte 0 (read-only): the first ticks are replayed, then
    // ticks made after the attach began are followed.
    let now = last_tick(&env.banger_ok(&["vm", "session", "logs", "sv", "tick"])).unwrap();
    let mut attach = env
        .cmd("banger")
        .args([
            "vm",
            "session",
            "attach",
            "sv",
            "tick",
            "--read-only",
            "--since",
            "0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(attach.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "tick 0", "the replay did not start at byte 0");
    let followed = wait_for("a tick made after the attach began", DEADLINE, || {
        let l = lines.next()?.ok()?;
        last_tick(&l).filter(|n| *n > now + 3)
    });
    assert!(followed > now);
    attach.kill().unwrap();
    let _ = attach.wait();

    // Detaching never stops it.
    let v = show(&env, "sv", "tick");
    assert_eq!(v["state"], "running");

    // One input owner at a time: a second is refused, --force takes over.
    let mut owner = env
        .cmd("banger")
        .args(["vm", "session", "attach", "sv", "tick"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first attach to own the input", DEADLINE, || {
        (show(&env, "sv", "tick")["input_attached"] == true).then_some(())
    });
    let second = env
        .cmd("banger")
        .args(["vm", "session", "attach", "sv", "tick"])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second input attach was let in");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("conflict") && err.contains("--force"), "{err}");
    let mut forced = env
        .cmd("banger")
        .args(["vm", "session", "attach", "sv", "tick", "--force"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let code = wait_for("the first attach to be taken over", DEADLINE, || {
        owner.try_wait().unwrap()
    });
    assert!(code.success());
    let mut msg = String::new();
    owner.stderr.take().unwrap().read_to_string(&mut msg).unwrap();
    assert!(msg.contains("took the input over"), "{msg}");
    forced.kill().unwrap();
    let _ = forced.wait();

    // A guest restart: the session is lost, its exit never made up.
    env.banger_ok(&["vm", "restart", "sv"]);
    let v = show(&env, "sv", "tick");
    assert_eq!(v["state"], "lost", "{v}");
    assert!(v.get("code").is_none() && v.get("signal").is_none(), "{v}");
    // Its output is still there.
    let logs = env.banger_ok(&["vm", "session", "logs", "sv", "tick", "--since", "0"]);
    assert!(logs.starts_with("tick 0\n"), "{}", &logs[..logs.len().min(200)]);
    env.banger_ok(&["vm", "session", "rm", "sv", "tick"]);
    let l = env.banger_ok(&["vm", "session", "list", "sv", "--json"]);
    assert!(!l.contains("\"tick\""), "{l}");
}

#[test]
fn stop_ends_the_group_logs_are_capped_and_a_server_shows_in_ports() {
    // In a network namespace: the HTTP check needs the guest's network.
    let env = Env::with_image_in_netns();
    env.create_small("sg", &[]);

    // Stop: nothing of the session's group survives.
    env.banger_ok(&[
        "vm",
        "session",
        "start",
        "sg",
        "--name",
        "grp",
        "--",
        "sh",
        "-c",
        "sleep 1000 & sleep 1001 & wait",
    ]);
    wait_for("the group running", DEADLINE, || {
        (guest_count(&env, "sg", "sleep 100[01]") == "3").then_some(())
    });
    env.banger_ok(&["vm", "session", "stop", "sg", "grp", "--grace", "2"]);
    assert_eq!(
        guest_count(&env, "sg", "sleep 100[01]"),
        "0",
        "part of the group survived its stop"
    );
    let v = show(&env, "sg", "grp");
    assert_eq!(v["state"], "exited", "{v}");
    assert_eq!(v["signal"], 15, "{v}");

    // Input to a session: send, then its end closes the session's stdin.
    env.banger_ok(&[
        "vm",
        "session",
        "start",
        "sg",
        "--name",
        "cat",
        "--",
        "sh",
        "-c",
        "cat; echo done",
    ]);
    let mut send = env
        .cmd("banger")
        .args(["vm", "session", "send", "sg", "cat", "--eof"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(send.stdin.as_mut().unwrap(), b"hello session\n").unwrap();
    drop(send.stdin.take());
    assert!(send.wait().unwrap().success());
    wait_for("the session to read its input and end", DEADLINE, || {
        (show(&env, "sg", "cat")["state"] == "exited").then_some(())
    });
    assert_eq!(
        env.banger_ok(&["vm", "session", "logs", "sg", "cat"]),
        "hello session\ndone\n"
    );

    // The log keeps at most its cap: the newest output.
    env.banger_ok(&[
        "vm",
        "session",
        "start",
        "sg",
        "--name",
        "big",
        "--log-max",
        "65536",
        "--",
        "sh",
        "-c",
        "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo END",
    ]);
    wait_for("the big session to end", DEADLINE, || {
        (show(&env, "sg", "big")["state"] == "exited").then_some(())
    });
    let v = show(&env, "sg", "big");
    assert_eq!(v["next_seq"], 2_000_005, "{v}");
    let kept = v["next_seq"].as_u64().unwrap() - v["first_seq"].as_u64().unwrap();
    assert!(
        kept <= 65536 && kept > 32768,
        "{kept} bytes kept for a 64 KiB cap"
    );
    let logs = env.banger_ok(&["vm", "session", "logs", "sg", "big", "--since", "0"]);
    assert_eq!(logs.len() as u64, kept);
    assert!(logs.ends_with("x\nEND\n"));
    let on_disk = env.banger_ok(&["vm", "session", "show", "sg", "big", "--json"]);
    let id = serde_json::from_str::<Value>(&on_disk).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let du = env.banger_ok(&[
        "vm",
        "exec",
        "sg",
        "--",
        "sh",
        "-c",
        &format!("cat /var/lib/banger-agent/sessions/{id}/log.* | wc -c"),
    ]);
    assert!(
        du.trim().parse::<u64>().unwrap() <= 65536,
        "{du} bytes of log files"
    );

    // The cap a daemon is configured with is the default: a daemon
    // restarted with `session_log_max_kib = 32` keeps at most 32 KiB.
    env.kill_daemon();
    let out = env
        .cmd("banger")
        .env("BANGER_SESSION_LOG_MAX_KIB", "32")
        .args([
            "vm",
            "session",
            "start",
            "sg",
            "--name",
            "cfg",
            "--",
            "sh",
            "-c",
            "head -c 500000 /dev/zero | tr '\\0' y",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the cfg session to end", DEADLINE, || {
        (show(&env, "sg", "cfg")["state"] == "exited").then_some(())
    });
    let v = show(&env, "sg", "cfg");
    let kept = v["next_seq"].as_u64().unwrap() - v["first_seq"].as_u64().unwrap();
    assert!(
        kept <= 32 * 1024 && kept > 16 * 1024,
        "{kept} bytes kept for a configured 32 KiB: {v}"
    );

    // A server in a session is a listening port that answers HTTP.
    env.banger_ok(&[
        "vm",
        "session",
        "start",
        "sg",
        "--name",
        "web",
        "--cwd",
        "/tmp",
        "--",
        "python3",
        "-m",
        "http.server",
        "8080",
    ]);
    // Python starts slowly under emulation.
    wait_for(
        "the server in ports, answering HTTP",
        Duration::from_secs(120),
        || {
            let p: Value = serde_json::from_str(&env.banger_ok(&["vm", "ports", "sg", "--json"])).ok()?;
            let ports = p["ports"].as_array().cloned().or_else(|| p.as_array().cloned())?;
            ports
                .iter()
                .find(|x| x["port"] == 8080 && x["http"] == true)
                .cloned()
        },
    );
}
