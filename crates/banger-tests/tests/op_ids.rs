//! One op id per command, on every line it causes in every process: the
//! daemon, the root helper and the guest agent. And start-up reconcile
//! after a `kill -9`: all of its lines and helper calls under one id.

use banger_tests::{json_lines, Env};
use serde_json::Value;

/// The op id a `vm create` / `vm run` printed ("creating NAME (op-…)").
fn printed_op(stderr: &str) -> String {
    stderr
        .split(|c: char| c == '(' || c == ')' || c.is_whitespace())
        .find(|w| w.starts_with("op-"))
        .unwrap_or_else(|| panic!("no op id printed: {stderr}"))
        .to_string()
}

fn op_of(line: &Value) -> Option<&str> {
    line["op_id"].as_str()
}

/// Every line after the first `skip` must carry `op`.
fn all_carry(what: &str, lines: &[Value], skip: usize, op: &str) {
    let new = &lines[skip..];
    assert!(!new.is_empty(), "no {what} lines at all");
    let strays: Vec<&Value> = new.iter().filter(|l| op_of(l) != Some(op)).collect();
    assert!(strays.is_empty(), "{what} lines not carrying {op}:\n{strays:#?}");
}

fn methods(lines: &[Value], skip: usize) -> Vec<String> {
    lines[skip..]
        .iter()
        .filter_map(|l| l["method"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn vm_create_and_vm_run_carry_the_printed_op_id_in_every_process() {
    let env = Env::with_image();
    // Daemon up, nothing else going on.
    env.banger_ok(&["vm", "list"]);

    // vm create, with a network (bridge, tap, ssh set-up in the guest).
    let (d0, h0) = (env.daemon_records().len(), env.helper_records().len());
    let out = env.banger(&[
        "vm",
        "create",
        "--name",
        "opa",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "128",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let op = printed_op(&stderr);
    all_carry("daemon", &env.daemon_records(), d0, &op);
    let helper = env.helper_records();
    all_carry("helper", &helper, h0, &op);
    let called = methods(&helper, h0);
    for m in ["priv.tap.create", "priv.tap.open"] {
        assert!(called.iter().any(|c| c == m), "no {m} in {called:?}");
    }
    // The guest agent: every line that belongs to a call carries the id of
    // the call that caused it; those of the create carry the create's.
    let log = env.banger_ok(&["vm", "exec", "opa", "--", "cat", "/var/log/banger-agent.log"]);
    let agent: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let exec_op = env
        .daemon_records()
        .iter()
        .rev()
        .find(|l| l["method"] == "vm.exec")
        .and_then(|l| op_of(l).map(str::to_owned))
        .expect("the exec's own op id");
    let ids: Vec<&str> = agent.iter().filter_map(op_of).collect();
    assert!(ids.contains(&op.as_str()), "no agent line carries {op}: {log}");
    assert!(
        ids.iter().all(|i| *i == op || *i == exec_op),
        "agent lines with other ids than {op} (create) and {exec_op} (this exec): {ids:?}"
    );

    // vm run: create, boot, run the command, all under the printed id; the
    // command reads the agent's log, so its own lines are in the output.
    let (d0, h0) = (env.daemon_records().len(), env.helper_records().len());
    let out = env.banger(&[
        "vm",
        "run",
        "--name",
        "opb",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "128",
        "--",
        "cat",
        "/var/log/banger-agent.log",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let op = printed_op(&stderr);
    all_carry("daemon", &env.daemon_records(), d0, &op);
    all_carry("helper", &env.helper_records(), h0, &op);
    let agent: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ids: Vec<&str> = agent.iter().filter_map(op_of).collect();
    assert!(!ids.is_empty(), "no agent line with an op id");
    assert!(
        ids.iter().all(|i| *i == op),
        "agent lines of vm run not under {op}: {ids:?}"
    );

    env.banger_ok(&["vm", "delete", "opa"]);
    env.banger_ok(&["vm", "delete", "opb"]);
}

#[test]
fn reconcile_after_kill_9_runs_under_one_op_id_with_its_helper_calls() {
    let env = Env::with_image();
    env.create_small("rec", &[]);
    let pid = env.vm("rec")["pid"].as_u64().expect("a running VM") as i32;
    env.kill_daemon();
    // The VMM dies too while no daemon watches: reconcile must release its
    // tap through the helper.
    // SAFETY: the VMM of this test's VM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (d0, h0) = (env.daemon_records().len(), env.helper_records().len());
    env.banger_ok(&["vm", "list"]);
    let daemon = env.daemon_records();
    let new = &daemon[d0..];
    let start = new
        .iter()
        .position(|l| l["message"] == "reconcile started")
        .expect("reconcile started");
    let end = new
        .iter()
        .position(|l| l["message"] == "reconcile finished")
        .expect("reconcile finished");
    let op = op_of(&new[start]).expect("reconcile has an op id").to_string();
    let strays: Vec<&Value> = new[start..=end]
        .iter()
        .filter(|l| op_of(l) != Some(&op))
        .collect();
    assert!(strays.is_empty(), "reconcile lines not under {op}: {strays:#?}");
    assert!(
        new[start..=end]
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains("VMM is gone"))),
        "reconcile did not see the dead VMM"
    );
    let helper = json_lines(&env.helper_log());
    all_carry("helper", &helper, h0, &op);
    assert!(
        methods(&helper, h0).iter().any(|m| m == "priv.tap.delete"),
        "reconcile did not release the tap"
    );
    assert_eq!(env.vm("rec")["state"], "stopped");
    env.banger_ok(&["vm", "delete", "rec"]);
}

/// Every other verb of a networked VM's life, each under an id of its own
/// (handed to the CLI in `BANGER_OP_ID`, as a program driving banger
/// does): every daemon and helper line the command causes carries that id,
/// and the helper calls the verb needs are among them. A guarantee shown
/// for `create` only would say nothing of `stop` or `restore`.
#[test]
fn every_lifecycle_verb_carries_its_op_id_into_the_daemon_and_the_helper() {
    let env = Env::with_image();
    env.create_small("lv", &[]);
    // (verb, the helper calls it must make under its id)
    let steps: [(&[&str], &[&str]); 7] = [
        (&["vm", "stop", "lv"], &["priv.guest.revoke", "priv.tap.delete"]),
        (&["vm", "start", "lv"], &["priv.tap.create", "priv.guest.allow"]),
        (
            &["vm", "restart", "lv"],
            &["priv.tap.delete", "priv.tap.create", "priv.guest.allow"],
        ),
        (&["vm", "snapshot", "lv", "--name", "lvs"], &[]),
        (
            &["vm", "restore", "lvs", "--name", "lv2"],
            &["priv.tap.create", "priv.guest.allow"],
        ),
        (
            &["vm", "delete", "lv2"],
            &["priv.guest.revoke", "priv.tap.delete"],
        ),
        (&["vm", "delete", "lv"], &["priv.guest.revoke", "priv.tap.delete"]),
    ];
    for (i, (args, calls)) in steps.iter().enumerate() {
        let op = format!("op-0000f{i:05x}");
        let (d0, h0) = (env.daemon_records().len(), env.helper_records().len());
        let out = env
            .cmd("banger")
            .env("BANGER_OP_ID", &op)
            .args(*args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "banger {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        all_carry(&format!("daemon ({args:?})"), &env.daemon_records(), d0, &op);
        let helper = env.helper_records();
        if calls.is_empty() {
            let strays: Vec<&Value> = helper[h0..].iter().filter(|l| op_of(l) != Some(&op)).collect();
            assert!(
                strays.is_empty(),
                "helper lines of {args:?} not carrying {op}: {strays:#?}"
            );
        } else {
            all_carry(&format!("helper ({args:?})"), &helper, h0, &op);
            let called = methods(&helper, h0);
            for m in *calls {
                assert!(called.iter().any(|c| c == m), "{args:?}: no {m} in {called:?}");
            }
        }
    }
    env.banger_ok(&["snapshot", "rm", "lvs"]);
}
