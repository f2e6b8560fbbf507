//! The warm pool, with real VMs: the daemon keeps `warm_pool` VMs booted;
//! a `vm create` or `vm run` of the pool's spec takes one (the same VM,
//! renamed, with the taker's hostname) and the pool refills; another spec
//! boots its own; a daemon killed with SIGKILL adopts the pool VMs;
//! `pool drain` removes them and nothing is left.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::time::Duration;

fn status(env: &Env) -> Value {
    serde_json::from_str(&env.banger_ok(&["pool", "status", "--json"])).unwrap()
}

/// QEMU's own word on a VM's vCPUs (`running`, `paused`), over its QMP
/// socket.
fn qmp_status(vm_dir: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let Ok(s) = std::os::unix::net::UnixStream::connect(std::path::Path::new(vm_dir).join("qmp.sock")) else {
        return String::new();
    };
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut ask = |cmd: &str| -> Value {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let v: Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    ask("qmp_capabilities");
    ask("query-status")["return"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn ready(env: &Env) -> Vec<String> {
    status(env)["ready"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_pool_hands_out_booted_vms_refills_and_survives_a_daemon_kill() {
    let env = Env::with_image_in_netns();
    std::fs::write(env.home().join("config.toml"), "warm_pool = { size = 1 }\n").unwrap();
    env.banger_ok(&["daemon", "stop"]);
    let st: Value = serde_json::from_str(&env.banger_ok(&["pool", "fill", "--wait", "--json"])).unwrap();
    assert_eq!(st["size"], 1, "{st}");
    let member = ready(&env).pop().expect("a ready pool VM");
    assert!(member.starts_with("pool-"), "{member}");
    assert_eq!(env.vm(&member)["state"], "pooled");
    // Listed with what it costs on disk: its overlay and work disk hold
    // something, but they are sparse, nothing like their 4 GiB + 8 GiB.
    let disk = env.vm(&member)["disk_bytes"].as_u64().unwrap_or(0);
    assert!(
        (1 << 20..2 << 30).contains(&disk),
        "a pool VM uses {disk} bytes on disk"
    );
    let member_id = env.vm(&member)["id"].clone();
    // It waits paused: no CPU spent on a guest nobody uses yet.
    let dir = env.vm(&member)["vm_dir"].as_str().unwrap().to_string();
    wait_for("the pool VM to be paused", Duration::from_secs(30), || {
        (qmp_status(&dir) == "paused").then_some(())
    });

    // A create of the pool's spec takes that very VM, under its own name.
    env.banger_ok(&["vm", "create", "--name", "w1"]);
    let w1 = env.vm("w1");
    let log = std::fs::read_to_string(env.daemon_log()).unwrap_or_default();
    let tail: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pool") || l.contains("w1"))
        .collect();
    assert_eq!(
        w1["id"],
        member_id,
        "not the pool's VM: {w1}\n{}",
        tail.join("\n")
    );
    assert_eq!(w1["state"], "running");
    assert_eq!(qmp_status(&dir), "running");
    let hostname = env.banger_ok(&["vm", "exec", "w1", "--", "hostname"]);
    assert_eq!(hostname.trim(), "w1");
    assert!(
        !env.banger(&["vm", "show", &member]).status.success(),
        "the pool name lives on"
    );
    // The pool refills in the background with a VM of its own.
    // The first pool VM was booted, and its snapshot is the pool's base:
    // the refill is restored from it.
    let base = wait_for("the pool's base snapshot", Duration::from_secs(60), || {
        let snaps: Value = serde_json::from_str(&env.banger_ok(&["snapshot", "list", "--json"])).unwrap();
        snaps.as_array().unwrap().iter().find_map(|s| {
            s["name"]
                .as_str()
                .filter(|n| n.starts_with("pool-base-"))
                .map(String::from)
        })
    });
    let refill = wait_for("the pool to refill", Duration::from_secs(120), || {
        ready(&env).pop().filter(|n| *n != member)
    });
    let log = std::fs::read_to_string(env.daemon_log()).unwrap_or_default();
    let restored = log.lines().any(|l| {
        l.contains("pool VM ready")
            && l.contains(&format!("\"vm\":\"{refill}\""))
            && l.contains("\"restored\":true")
    });
    assert!(restored, "the refill {refill} was not restored from {base}");
    assert_ne!(env.vm(&refill)["id"], member_id);

    // Another spec is not the pool's: it boots its own VM, the pool keeps its.
    env.banger_ok(&["vm", "create", "--name", "w2", "--memory", "512"]);
    assert_ne!(env.vm("w2")["id"], env.vm(&refill)["id"]);
    assert_eq!(ready(&env), std::slice::from_ref(&refill));

    // `vm run` takes from the pool too, and `--rm` leaves nothing of it.
    let out = env.banger_ok(&["vm", "run", "--rm", "--", "cat", "/etc/hostname"]);
    assert!(!out.trim().is_empty() && !out.contains("pool-"), "{out}");
    assert!(!env.banger(&["vm", "show", &refill]).status.success());
    let refill = wait_for("the pool to refill again", Duration::from_secs(120), || {
        ready(&env).pop()
    });

    // bangerd killed with SIGKILL: the pool VM is adopted, not remade.
    let refill_id = env.vm(&refill)["id"].clone();
    env.kill_daemon();
    // (The restarted keeper pauses it again, which briefly holds it.)
    wait_for("the adopted pool VM", Duration::from_secs(20), || {
        (ready(&env) == std::slice::from_ref(&refill)).then_some(())
    });
    assert_eq!(env.vm(&refill)["state"], "pooled");
    assert_eq!(env.vm(&refill)["id"], refill_id);
    // Three VMs (w1, w2, the pool's), three VMMs.
    let running: Vec<Value> = serde_json::from_str::<Value>(&env.banger_ok(&["vm", "list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(running.len(), 3, "{running:?}");

    // Drained: the pool's VMs go and it stays empty.
    let d: Value = serde_json::from_str(&env.banger_ok(&["pool", "drain", "--json"])).unwrap();
    assert_eq!(d["removed"][0], refill.as_str());
    // Its base snapshot goes with it.
    assert_eq!(env.banger_ok(&["snapshot", "list", "--json"]).trim(), "[]");
    let st = status(&env);
    assert!(
        st["paused"].as_bool().unwrap() && st["ready"].as_array().unwrap().is_empty(),
        "{st}"
    );
    for n in ["w1", "w2"] {
        env.banger_ok(&["vm", "kill", n]);
        env.banger_ok(&["vm", "delete", n]);
    }
    assert_eq!(env.banger_ok(&["vm", "list", "--json"]).trim(), "[]");
    wait_for("every VMM to go", Duration::from_secs(20), || {
        env.vm_processes().is_empty().then_some(())
    });
    let taps = env.ip_in_helper_ns(&["-o", "link", "show", "type", "tun"]);
    assert!(
        String::from_utf8_lossy(&taps.stdout).trim().is_empty(),
        "taps left"
    );
}

/// `pool drain` deletes VMs, and a client that hangs up while it does
/// (Ctrl-C, a dropped connection) must not leave one half deleted: the
/// drain runs to its end without it. The client is killed the moment a
/// pool VM shows `deleting`.
#[test]
fn a_drain_whose_client_hangs_up_still_deletes_every_pool_vm() {
    let env = Env::with_image_in_netns();
    std::fs::write(env.home().join("config.toml"), "warm_pool = { size = 2 }\n").unwrap();
    env.banger_ok(&["daemon", "stop"]);
    let list = |env: &Env| -> Vec<Value> {
        serde_json::from_str::<Value>(&env.banger_ok(&["vm", "list", "--json"]))
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let mut caught = false;
    for _ in 0..5 {
        env.banger_ok(&["pool", "fill", "--wait"]);
        let mut drain = env.cmd("banger").args(["pool", "drain"]).spawn().unwrap();
        loop {
            if list(&env).iter().any(|v| v["state"] == "deleting") {
                let _ = drain.kill();
                caught = true;
                break;
            }
            if drain.try_wait().unwrap().is_some() {
                break;
            }
        }
        let _ = drain.wait();
        // Every pool VM goes, the one being deleted when the client went
        // included, and none is left half deleted.
        wait_for(
            "the drain to end without its client",
            Duration::from_secs(60),
            || {
                let vms = list(&env);
                vms.iter()
                    .all(|v| !v["name"].as_str().unwrap_or("").starts_with("pool-"))
                    .then_some(())
            },
        );
        if caught {
            break;
        }
    }
    assert!(caught, "no drain was ever seen deleting a pool VM");
    assert!(
        env.vm_processes().is_empty(),
        "processes left: {:?}",
        env.vm_processes()
    );
}
