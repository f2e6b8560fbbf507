//! The foundation: wire protocol errors with op ids, op-id propagation into
//! the helper, the helper's peer check and validation, daemon auto-start and
//! recovery after kill -9. Real processes over real Unix sockets.

use banger_tests::{bin, json_lines, raw_exchange, wait_for, Env};
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::time::Duration;

fn error_of(frames: &[Value]) -> &Value {
    let last = frames.last().expect("the server answered");
    assert_eq!(last["type"], "error", "expected an error frame, got {last}");
    &last["error"]
}

fn assert_op_id(err: &Value) -> String {
    let op = err["op_id"]
        .as_str()
        .unwrap_or_else(|| panic!("error without op_id: {err}"));
    assert!(op.starts_with("op-"), "odd op id {op}");
    op.to_string()
}

#[test]
fn dispatch_stamps_op_ids_on_every_error() {
    let env = Env::new();
    env.banger_ok(&["ping"]);

    let unknown = env.raw_daemon(b"{\"version\":1,\"method\":\"no.such.method\"}\n");
    let e = error_of(&unknown);
    assert_eq!(e["code"], "unknown_method");
    assert_op_id(e);

    let bad_version = env.raw_daemon(b"{\"version\":99,\"method\":\"ping\",\"op_id\":\"op-cafe01\"}\n");
    let e = error_of(&bad_version);
    assert_eq!(e["code"], "bad_version");
    assert_eq!(e["op_id"], "op-cafe01", "the caller's op id is adopted");

    let malformed = env.raw_daemon(b"{this is not json\n");
    let e = error_of(&malformed);
    assert_eq!(e["code"], "bad_request");
    assert_op_id(e);

    let mut huge = vec![b'x'; 1024 * 1024 + 100];
    huge.push(b'\n');
    let e = error_of(&env.raw_daemon(&huge)).clone();
    assert_eq!(e["code"], "bad_request");
    assert_op_id(&e);

    let bad_params = env.raw_daemon(b"{\"version\":1,\"method\":\"ping\",\"params\":[1,2]}\n");
    assert_eq!(error_of(&bad_params)["code"], "bad_request");

    // After all of that the daemon still serves.
    env.banger_ok(&["ping"]);
}

#[test]
fn handler_errors_reach_the_cli_typed_with_op_id_and_the_helper_sees_the_same_id() {
    let env = Env::new();
    // A bridge name the helper must refuse: the error is produced in the
    // helper, relayed by the daemon's handler, and printed by the CLI.
    let out = env
        .cmd("banger")
        .env("BANGER_BRIDGE", "eth0")
        .args(["network", "ensure"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must start with \"banger\""), "{stderr}");
    assert!(
        stderr.contains("code: bad_request"),
        "CLI did not show the typed code: {stderr}"
    );
    let op = stderr
        .split(['(', ')'])
        .find(|s| s.starts_with("op-"))
        .unwrap_or_else(|| panic!("no op id in CLI error: {stderr}"))
        .to_string();
    // The daemon served the call under that same id...
    assert!(
        env.daemon_records()
            .iter()
            .any(|r| r["op_id"] == op.as_str() && r["message"] == "daemon rpc failed"),
        "the daemon did not log the failure under {op}"
    );
    // ...and so did the helper.
    let helper_lines: Vec<Value> = env
        .helper_records()
        .into_iter()
        .filter(|r| r["op_id"] == op.as_str())
        .collect();
    assert!(
        helper_lines
            .iter()
            .any(|r| r["message"] == "helper rpc failed" && r["code"] == "bad_request"),
        "helper did not log the failure under {op}: {helper_lines:?}"
    );
}

#[test]
fn one_daemon_rpc_two_helper_calls_one_op_id_everywhere() {
    let env = Env::new();
    env.banger_ok(&["ping"]);
    let op = "op-e2e0000a11";
    let frames = env.raw_daemon(
        format!("{{\"version\":1,\"method\":\"network.ensure\",\"op_id\":\"{op}\"}}\n").as_bytes(),
    );
    let last = frames.last().unwrap();
    assert_eq!(last["type"], "result", "network.ensure failed: {last}");
    assert_eq!(last["result"]["bridge"], "banger0");

    // The bridge really exists, up, with its address, in the helper's netns.
    let out = env.ip_in_helper_ns(&["-br", "addr", "show", "banger0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("172.30.0.1/24"),
        "bridge missing or unaddressed: {text}"
    );

    // Every daemon record of this RPC carries the op id.
    let daemon: Vec<Value> = env
        .daemon_records()
        .into_iter()
        .filter(|r| r["method"] == "network.ensure")
        .collect();
    assert!(
        daemon.len() >= 2,
        "expected the service's line and the completion line: {daemon:?}"
    );
    for r in &daemon {
        assert_eq!(r["op_id"], op, "daemon record without the op id: {r}");
    }
    assert!(
        daemon.iter().any(|r| r["message"] == "bridge ready"),
        "service log line missing: {daemon:?}"
    );

    // The helper logged under the same id: exactly two calls, each with a duration.
    let helper: Vec<Value> = env
        .helper_records()
        .into_iter()
        .filter(|r| r["op_id"] == op)
        .collect();
    assert!(!helper.is_empty(), "helper never saw {op}");
    let done: Vec<&Value> = helper
        .iter()
        .filter(|r| r["message"] == "helper rpc completed" || r["message"] == "helper rpc failed")
        .collect();
    assert_eq!(done.len(), 2, "helper completion lines for {op}: {done:?}");
    let methods: Vec<&str> = done.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["priv.ping", "priv.bridge.ensure"]);
    for r in done {
        assert!(r["duration_ms"].is_u64(), "no duration: {r}");
    }
}

#[test]
fn helper_refuses_other_uids_and_bad_names_and_keeps_serving() {
    let env = Env::new();
    let call = |method: &str, params: &str| {
        let mut c = env.cmd("banger-helper");
        c.args(["call", "--socket"])
            .arg(env.helper_socket())
            .args([method, params]);
        c
    };

    // Only root and the owner (uid 0 here) can even connect.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(env.helper_socket()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "the helper socket is open to others");
    assert_eq!(meta.uid(), 0, "the helper socket is not owned by the owner");
    let out = call("priv.ping", "{}").uid(65534).gid(65534).output().unwrap();
    assert!(
        !out.status.success(),
        "uid 65534 reached the helper through its socket"
    );

    // Opened up by hand, the peer check still refuses an unprivileged
    // caller (not root, not the owner) with a clear answer.
    std::fs::set_permissions(env.helper_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = call("priv.tap.create", r#"{"name":"bgtnobody"}"#)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("code: unauthorized"), "{stderr}");
    assert!(stderr.contains("(op-"), "no op id: {stderr}");
    let links = String::from_utf8_lossy(&env.ip_in_helper_ns(&["-br", "link"]).stdout).into_owned();
    assert!(
        !links.contains("bgtnobody"),
        "refused caller created a tap: {links}"
    );

    // Names outside banger's prefixes are refused, whatever they are.
    for name in ["eth0", "docker0", "lo", "bgt$(reboot)", "averyveryverylongname"] {
        let params = format!(r#"{{"name":"{name}"}}"#);
        let out = call("priv.tap.create", &params).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("code: bad_request"), "{name}: {stderr}");
        let out = call("priv.tap.delete", &params).output().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("code: bad_request"),
            "{name}"
        );
        let out = call("priv.bridge.ensure", &params).output().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("code: bad_request"),
            "{name}"
        );
    }
    // Garbage on the socket is answered, not fatal.
    let e = raw_exchange(&env.helper_socket(), b"\x00\x01garbage\n");
    assert_eq!(e.last().unwrap()["error"]["code"], "bad_request");

    // And it still does real work: a tap created, attached, deleted, idempotently.
    let ok = |m: &str, p: &str| {
        let out = call(m, p).output().unwrap();
        assert!(
            out.status.success(),
            "{m} {p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(
        "priv.bridge.ensure",
        r#"{"name":"banger7","address":"10.77.0.1/24"}"#,
    );
    assert!(ok("priv.tap.create", r#"{"name":"bgt7","bridge":"banger7"}"#).contains("true"));
    assert!(ok("priv.tap.create", r#"{"name":"bgt7","bridge":"banger7"}"#).contains("false"));
    let link =
        String::from_utf8_lossy(&env.ip_in_helper_ns(&["-d", "link", "show", "bgt7"]).stdout).into_owned();
    assert!(
        link.contains("master banger7") && link.contains("tun"),
        "tap not attached: {link}"
    );
    assert!(ok("priv.tap.delete", r#"{"name":"bgt7"}"#).contains("true"));
    assert!(ok("priv.tap.delete", r#"{"name":"bgt7"}"#).contains("false"));
    let links = String::from_utf8_lossy(&env.ip_in_helper_ns(&["-br", "link"]).stdout).into_owned();
    assert!(!links.contains("bgt7"), "tap left behind: {links}");
}

#[test]
fn cli_starts_the_daemon_and_recovers_after_kill_9() {
    let env = Env::new();
    assert_eq!(
        env.banger(&["daemon", "status"]).status.code(),
        Some(3),
        "daemon should not run yet"
    );
    env.banger_ok(&["ping"]);
    let first = env.daemon_pid().expect("pid file");
    let st = env.banger_ok(&["daemon", "status", "--json"]);
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["pid"], first);

    // Socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.daemon_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mode = std::fs::metadata(env.runtime()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // SAFETY: the daemon this test started.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    wait_for("the killed daemon to die", Duration::from_secs(5), || {
        // SAFETY: signal 0 only probes.
        (unsafe { libc::kill(first as i32, 0) } != 0).then_some(())
    });
    let out = env.banger_ok(&["ping"]);
    assert!(out.contains("pong"), "{out}");
    let second = env.daemon_pid().unwrap();
    assert_ne!(first, second, "a new daemon should have been started");

    env.banger_ok(&["daemon", "stop"]);
    wait_for("the daemon to stop", Duration::from_secs(5), || {
        (env.banger(&["daemon", "status"]).status.code() == Some(3)).then_some(())
    });
}

#[test]
fn daemon_logs_are_json_with_op_ids_and_level_is_configurable() {
    let env = Env::new();
    let out = env
        .cmd("banger")
        .env("BANGER_LOG_LEVEL", "debug")
        .arg("ping")
        .output()
        .unwrap();
    assert!(out.status.success());
    let recs = json_lines(&env.daemon_log());
    let rpc: Vec<&Value> = recs
        .iter()
        .filter(|r| r["message"] == "daemon rpc completed")
        .collect();
    assert!(!rpc.is_empty());
    for r in rpc {
        assert!(r["op_id"].as_str().unwrap().starts_with("op-"));
        assert!(r["duration_ms"].is_u64());
    }
    assert!(bin("bangerd").exists());
}

#[test]
fn a_daemon_that_cannot_start_is_reported_at_once_with_its_reason() {
    let env = Env::without_helper();
    // A zero-byte database where state should be: refused, never replaced.
    std::fs::create_dir_all(env.home()).unwrap();
    let db = env.home().join("state.db");
    std::fs::write(&db, b"").unwrap();
    let started = std::time::Instant::now();
    let out = env.banger(&["vm", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?} to say the daemon died",
        started.elapsed()
    );
    assert!(stderr.contains("exited at start"), "{stderr}");
    assert!(stderr.contains("is empty"), "the reason is not shown: {stderr}");
    assert_eq!(
        std::fs::metadata(&db).unwrap().len(),
        0,
        "the database was replaced"
    );
}
