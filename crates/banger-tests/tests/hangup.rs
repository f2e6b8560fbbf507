//! A client killed with SIGKILL at any moment of a lifecycle verb never
//! cuts the verb in half: the daemon runs it as an operation to its end,
//! and afterwards the record matches reality (a VM recorded running has a
//! live VMM and answers `exec`; one recorded stopped has no process and no
//! tap; a deleted one has nothing left at all).

use banger_tests::{processes_mentioning, wait_for, Env};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(st.status.success(), "git {args:?}");
}

fn taps(env: &Env) -> String {
    String::from_utf8_lossy(&env.ip_in_helper_ns(&["-o", "link", "show", "type", "tun"]).stdout).into_owned()
}

/// Waits until the daemon has no unfinished operation.
fn settle(env: &Env) {
    wait_for("every operation to finish", Duration::from_secs(180), || {
        let ops: Value = serde_json::from_str(&env.banger_ok(&["daemon", "operations", "--json"])).ok()?;
        ops.as_array()?
            .iter()
            .all(|o| o["done"].as_bool() == Some(true))
            .then_some(())
    });
}

/// The record matches reality for `name`; returns its state ("gone" when
/// it no longer exists).
fn check(env: &Env, name: &str) -> String {
    let list: Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    let Some(vm) = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
    else {
        assert!(env.vm_processes().is_empty(), "a deleted VM left processes");
        assert!(
            !taps(env).contains("bgt"),
            "a deleted VM left its tap: {}",
            taps(env)
        );
        let left: Vec<_> = std::fs::read_dir(env.vms_dir()).unwrap().flatten().collect();
        assert!(left.is_empty(), "a deleted VM left its directory");
        return "gone".into();
    };
    let state = vm["state"].as_str().unwrap().to_string();
    let dir = vm["vm_dir"].as_str().unwrap();
    match state.as_str() {
        "running" => {
            assert!(vm["pid"].is_u64(), "recorded running without a live VMM: {vm}");
            env.banger_ok(&["vm", "exec", name, "--", "true"]);
            assert!(taps(env).contains("bgt"), "running without its tap");
        }
        "stopped" => {
            assert!(
                processes_mentioning(dir).is_empty(),
                "recorded stopped while processes run: {:?}",
                processes_mentioning(dir)
            );
            assert!(
                !taps(env).contains("bgt"),
                "stopped VM kept its tap: {}",
                taps(env)
            );
        }
        other => panic!("after every operation settled the VM is {other:?}: {vm}"),
    }
    state
}

#[test]
fn a_client_killed_mid_verb_leaves_a_record_that_matches_reality() {
    let env = Env::with_image_in_netns();
    let repo = env.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    for i in 0..200 {
        std::fs::write(repo.join(format!("f{i}.txt")), format!("file {i}\n").repeat(200)).unwrap();
    }
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "base"]);
    let small = ["--vcpus", "1", "--memory", "512", "--disk-size", "128"];
    let create = |env: &Env| {
        let mut a = vec!["vm", "create", "--name", "hu"];
        a.extend_from_slice(&small);
        env.banger_ok(&a);
    };
    create(&env);

    // 24 rounds: each verb six times, the kill spread over its duration.
    let mut outcomes = Vec::new();
    for round in 0..24u64 {
        let state = check(&env, "hu");
        let (verb, args, span_ms): (&str, Vec<&str>, u64) = match round % 4 {
            0 => {
                if state == "running" {
                    env.banger_ok(&["vm", "stop", "hu"]);
                }
                if state == "gone" {
                    let mut a = vec!["vm", "create", "--no-start", "--name", "hu"];
                    a.extend_from_slice(&small);
                    env.banger_ok(&a);
                }
                ("start", vec!["vm", "start", "hu"], 4000)
            }
            1 => {
                if state != "running" {
                    if state == "gone" {
                        create(&env);
                    } else {
                        env.banger_ok(&["vm", "start", "hu"]);
                    }
                }
                ("stop", vec!["vm", "stop", "hu"], 2500)
            }
            2 => {
                if state == "gone" {
                    create(&env);
                } else if state == "stopped" {
                    env.banger_ok(&["vm", "start", "hu"]);
                }
                (
                    "workspace prepare",
                    vec!["vm", "workspace", "prepare", "hu", repo.to_str().unwrap()],
                    1500,
                )
            }
            _ => {
                if state == "gone" {
                    create(&env);
                }
                ("delete", vec!["vm", "delete", "hu"], 1500)
            }
        };
        let before = check(&env, "hu");
        // Spread the kill points over the verb's usual duration.
        let delay = (round * 7919 + 131) % span_ms;
        let mut child = env.cmd("banger").args(&args).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        settle(&env);
        let after = check(&env, "hu");
        eprintln!("round {round}: {verb}, client killed after {delay} ms: {before} -> {after}");
        // Completed or rolled back, never anything in between.
        let ok = match verb {
            "start" => ["running", "stopped"].contains(&after.as_str()),
            "stop" => after == "stopped" || after == "running",
            "delete" => after == "gone" || after == before,
            _ => after == "running",
        };
        assert!(ok, "round {round}: {verb} from {before} ended as {after}");
        outcomes.push((verb, after));
    }
    // The verbs really ran after their clients were gone, at least sometimes.
    assert!(outcomes.iter().any(|(v, a)| *v == "start" && a == "running"));
    assert!(outcomes.iter().any(|(v, a)| *v == "delete" && a == "gone"));
    let _ = env.banger(&["vm", "delete", "hu"]);
}

/// `vm set --disk-size` grows a stopped VM's work disk (the file, e2fsck,
/// resize2fs) and writes the spec last. A client killed at any point of it
/// must not cut it short: an interrupted resize2fs can leave the user's
/// filesystem broken. After each kill the verb has finished on its own:
/// the disk is the size the spec says, and its filesystem checks clean.
#[test]
fn a_client_killed_mid_vm_set_leaves_the_work_disk_grown_and_whole() {
    let env = Env::with_image();
    env.create_small("hs", &["--no-start", "--no-network"]);
    let dir = std::path::PathBuf::from(env.vm("hs")["vm_dir"].as_str().unwrap().to_string());
    let disk = dir.join("work.ext4");
    let (mut before, mut grown) = (128u64 << 20, 0);
    // Kill points spread over the grow's usual duration.
    for (round, delay) in [4u64, 7, 10, 13, 16, 20, 25, 30].into_iter().enumerate() {
        let mib = 256 + 128 * round as u64;
        let mut child = env
            .cmd("banger")
            .args(["vm", "set", "hs", "--disk-size", &mib.to_string()])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        settle(&env);
        let spec = env.vm("hs")["work_disk_bytes"].as_u64().unwrap();
        let size = std::fs::metadata(&disk).unwrap().len();
        eprintln!("round {round}: killed after {delay} ms: spec {spec}, file {size}");
        // Not sent yet (a client killed at once), or finished.
        assert!(spec == before || spec == mib << 20, "round {round}: spec {spec}");
        assert_eq!(size, spec, "round {round}: disk and spec disagree");
        grown += usize::from(spec == mib << 20);
        before = spec;
        let fsck = std::process::Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "round {round}: the work disk's filesystem is damaged: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    assert!(grown >= 4, "most sets never reached the daemon: {grown} of 8");
    env.banger_ok(&["vm", "delete", "hs"]);
}
