//! `vm ports` and `vm stats` on a real guest: what listens in it (with
//! the owning process and an HTTP check from the daemon), what it uses,
//! and a wedged guest that ends the command at the deadline instead of
//! hanging it. One guest for all of it: boots are slow under emulation.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::time::{Duration, Instant};

fn json(env: &Env, args: &[&str]) -> Value {
    let out = env.banger_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[test]
fn ports_and_stats_of_a_running_guest() {
    let env = Env::with_image_in_netns();
    env.create_small("obs", &[]);

    // An HTTP server on 8080 and a bound UDP socket on 5005, both left
    // running in the background.
    env.banger_ok(&[
        "vm",
        "exec",
        "obs",
        "--",
        "sh",
        "-c",
        "cd /tmp && nohup python3 -m http.server 8080 >/dev/null 2>&1 & \
         nohup python3 -c 'import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((\"0.0.0.0\", 5005)); time.sleep(3600)' >/dev/null 2>&1 &",
    ]);
    let started = Instant::now();
    let ports = wait_for(
        "8080 and 5005 listed and 8080 answering HTTP",
        Duration::from_secs(120),
        || {
            let v = json(&env, &["vm", "ports", "obs", "--json"]);
            let listed = |proto: &str, port: u64| {
                v["ports"]
                    .as_array()?
                    .iter()
                    .find(|p| p["proto"] == proto && p["port"] == port)
                    .cloned()
            };
            let http = listed("tcp", 8080)?;
            let udp = listed("udp", 5005)?;
            (http["http"] == true && http["process"] == "python3" && udp["process"] == "python3").then_some(v)
        },
    );
    eprintln!("ports ready after {:?}", started.elapsed());
    assert_eq!(ports["http_checked"], true, "{ports}");
    let port = |proto: &str, n: u64| {
        ports["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["proto"] == proto && p["port"] == n)
            .unwrap_or_else(|| panic!("no {proto} {n} in {ports}"))
            .clone()
    };
    let web = port("tcp", 8080);
    assert_eq!(web["address"], "obs.vm:8080", "{web}");
    assert!(web["pid"].as_u64().unwrap() > 1, "{web}");
    // sshd listens too, and is no HTTP server.
    let ssh = port("tcp", 22);
    assert_eq!(ssh["http"], false, "{ssh}");
    assert_eq!(ssh["process"], "sshd", "{ssh}");
    let udp = port("udp", 5005);
    assert_eq!(udp["address"], "obs.vm:5005", "{udp}");
    assert!(udp.get("http").is_none(), "UDP is not checked for HTTP: {udp}");
    let table = env.banger_ok(&["vm", "ports", "obs"]);
    assert!(
        table.lines().any(|l| l.contains("8080")
            && l.contains("python3")
            && l.contains("yes")
            && l.contains("obs.vm:8080")),
        "{table}"
    );

    let t = Instant::now();
    let s = json(&env, &["vm", "stats", "obs", "--json"]);
    eprintln!("vm stats took {:?}: {s}", t.elapsed());
    assert_eq!(s["vcpus"], 1, "{s}");
    let pct = s["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{s}");
    // The kernel keeps some of the 512 MiB for itself.
    let mem = s["memory_total_bytes"].as_u64().unwrap();
    assert!(mem > 400 << 20 && mem <= 512 << 20, "{s}");
    let avail = s["memory_available_bytes"].as_u64().unwrap();
    assert!(avail > 0 && avail < mem, "{s}");
    assert!(s["uptime_secs"].as_u64().unwrap() > 0, "{s}");
    let disks = s["disks"].as_array().unwrap();
    for path in ["/", "/root"] {
        let d = disks
            .iter()
            .find(|d| d["path"] == path)
            .unwrap_or_else(|| panic!("no {path} in {s}"));
        let (total, used) = (
            d["total_bytes"].as_u64().unwrap(),
            d["used_bytes"].as_u64().unwrap(),
        );
        assert!(total > 0 && used <= total, "{s}");
    }
    // The work disk is the 128 MiB one.
    let root = disks.iter().find(|d| d["path"] == "/root").unwrap();
    assert!(root["total_bytes"].as_u64().unwrap() <= 128 << 20, "{s}");
    assert_eq!(s["net_interface"], "eth0", "{s}");
    // The HTTP checks above came in through eth0.
    assert!(s["net_rx_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["net_tx_bytes"].as_u64().unwrap() > 0, "{s}");
    let text = env.banger_ok(&["vm", "stats", "obs"]);
    for field in ["cpu:", "memory:", "disk:", "network:", "uptime:", "load:"] {
        assert!(text.contains(field), "{field} missing:\n{text}");
    }

    // A wedged agent: the guest's kernel takes the connection, the agent
    // (stopped by a signal) never answers. The call ends at its deadline.
    env.banger_ok(&[
        "vm",
        "exec",
        "obs",
        "--",
        "sh",
        "-c",
        "(sleep 1; kill -STOP $(pgrep -f '[b]anger-agent.* serve')) >/dev/null 2>&1 &",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let out = env.banger(&["vm", "stats", "obs"]);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("did not answer within 5s"), "{err}");
    assert!(err.contains("code: operation_failed"), "{err}");
    assert!(err.contains("(op-"), "no op id: {err}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(15),
        "took {took:?}"
    );
    eprintln!("a wedged agent's stats failed after {took:?}");

    env.banger_ok(&["vm", "kill", "obs"]);
    env.banger_ok(&["vm", "delete", "obs"]);
}

#[test]
fn ports_and_stats_of_a_stopped_vm_say_it_is_not_running() {
    let env = Env::with_image();
    env.banger_ok(&[
        "vm",
        "create",
        "--name",
        "idle",
        "--no-start",
        "--memory",
        "512",
        "--disk-size",
        "128",
    ]);
    for verb in ["ports", "stats"] {
        let out = env.banger(&["vm", verb, "idle"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb}: {err}");
        assert!(err.contains("code: not_running"), "{verb}: {err}");
        assert!(err.contains("is not running"), "{verb}: {err}");
    }
}
