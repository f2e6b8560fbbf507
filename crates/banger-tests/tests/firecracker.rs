//! The Firecracker back-end against the real binary, driven through a whole
//! lifecycle with the bare-metal guest `vsockguest.elf` (it boots under
//! Firecracker even where KVM cannot run Linux, and answers vsock
//! connections on any port, which is all the readiness check needs).
//!
//! Needs `BANGER_TEST_FIRECRACKER=/path/to/firecracker`; `scripts/test` runs
//! it when that is set and says loudly that it did not run otherwise.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn firecracker() -> PathBuf {
    let p = std::env::var_os("BANGER_TEST_FIRECRACKER")
        .expect("BANGER_TEST_FIRECRACKER must name a firecracker binary");
    PathBuf::from(p)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fc-tiny-guests")
        .join(name)
}

/// A kernel directory holding the tiny guest as its `vmlinux`.
fn tiny_kernel(env: &Env) -> PathBuf {
    let dir = env.dir.path().join("tiny-kernel");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("vsockguest.elf"), dir.join("vsockguest.elf")).expect("fixture vsockguest.elf");
    std::fs::copy(fixture("vsockguest.elf"), dir.join("vmlinuz")).unwrap();
    let manifest = serde_json::json!({
        "version": "tiny-vsockguest",
        "dir": dir.display().to_string(),
        "package": "fixture",
        "sha256": "",
        "source": "fixture:fc-tiny-guests/vsockguest.elf",
        "modules": [],
        "vmlinux": "vsockguest.elf",
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

fn tiny_rootfs(env: &Env) -> PathBuf {
    let p = env.dir.path().join("tiny-rootfs.ext4");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 << 20).unwrap();
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&p)
        .status()
        .unwrap()
        .success());
    p
}

fn fc(env: &Env, args: &[&str]) -> std::process::Output {
    env.cmd("banger")
        .env("BANGER_VMM", "firecracker")
        .env("BANGER_FIRECRACKER", firecracker())
        .args(args)
        .output()
        .unwrap()
}

fn fc_ok(env: &Env, args: &[&str]) -> String {
    let out = fc(env, args);
    assert!(
        out.status.success(),
        "banger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test environment (in the helper's network namespace when `netns`,
/// where banger's bridge and the taps live) with the tiny guest registered
/// as image `tiny`, through `banger` as `run` invokes it.
fn with_tiny_image(netns: bool, run: impl Fn(&Env, &[&str]) -> String) -> Env {
    let mut env = Env::new();
    if netns {
        assert!(env
            .in_helper_ns("ip", &["link", "set", "lo", "up"])
            .status
            .success());
        env.in_netns = true;
    }
    let kernel = tiny_kernel(&env);
    let rootfs = tiny_rootfs(&env);
    run(
        &env,
        &[
            "image",
            "register",
            "tiny",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ],
    );
    env
}

fn show(env: &Env, name: &str) -> Value {
    serde_json::from_str(&fc_ok(env, &["vm", "show", name, "--json"])).unwrap()
}

#[test]
#[ignore = "needs a Firecracker binary: set BANGER_TEST_FIRECRACKER and run with --ignored"]
fn firecracker_lifecycle_with_the_real_binary() {
    let env = with_tiny_image(false, fc_ok);

    fc_ok(&env, &tiny_create("fc1"));
    let v = show(&env, "fc1");
    assert_eq!(v["vmm"], "firecracker");
    assert_eq!(v["state"], "running");
    let dir = PathBuf::from(v["vm_dir"].as_str().unwrap());
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    assert!(serial.contains("TINY_GUEST_VSOCK_READY"), "serial: {serial}");

    // Stop: the tiny guest has no agent, so the deadline kill path runs.
    fc_ok(&env, &["vm", "stop", "fc1"]);
    assert_eq!(show(&env, "fc1")["state"], "stopped");
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
    assert!(!dir.join("firecracker.sock").exists(), "stale API socket left");

    // Start again over the old files; then kill -9 the daemon: adopted.
    fc_ok(&env, &["vm", "start", "fc1"]);
    let pid = show(&env, "fc1")["pid"].as_u64().unwrap();
    env.kill_daemon();
    let v = show(&env, "fc1");
    assert_eq!(v["state"], "running");
    assert_eq!(v["pid"].as_u64(), Some(pid), "not adopted");

    // Paused and resumed as a warm-pool VM is (Firecracker's own word on
    // its state); resuming a running VM is no error.
    let api = dir.join("firecracker.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let set = |paused| {
        rt.block_on(banger_vmm::pause::set_paused(
            banger_vmm::VmmKind::Firecracker,
            &api,
            paused,
        ))
        .unwrap_or_else(|e| panic!("set_paused({paused}): {e}"))
    };
    set(true);
    assert_eq!(fc_api_get(&api, "/")["state"], "Paused");
    set(false);
    assert_eq!(fc_api_get(&api, "/")["state"], "Running");
    set(false);

    // Killed behind the daemon's back: found dead and cleaned up.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for("the dead VMM to be noticed", Duration::from_secs(20), || {
        (show(&env, "fc1")["state"] == "stopped").then_some(())
    });
    assert!(env.vm_processes().is_empty());

    fc_ok(&env, &["vm", "delete", "fc1"]);
    assert!(!dir.exists(), "VM directory left behind");
    assert!(env.vm_processes().is_empty());
}

/// GET on Firecracker's API socket; the body as JSON. The connection is
/// kept alive by Firecracker, so the body is read by its Content-Length.
fn fc_api_get(sock: &std::path::Path, path: &str) -> Value {
    use std::io::{BufRead, Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("API socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("API answer");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
}

/// The Firecracker VM gets its tap: the whole stack runs in the helper's
/// network namespace (where banger's bridge and the taps live), and
/// Firecracker reports the network card banger configured.
#[test]
#[ignore = "needs a Firecracker binary: set BANGER_TEST_FIRECRACKER and run with --ignored"]
fn firecracker_vm_gets_its_tap_in_the_helpers_namespace() {
    let env = with_tiny_image(true, fc_ok);
    fc_ok(
        &env,
        &[
            "vm",
            "create",
            "--name",
            "fcnet",
            "--image",
            "tiny",
            "--vcpus",
            "1",
            "--memory",
            "128",
            "--disk-size",
            "64",
        ],
    );
    let v = show(&env, "fcnet");
    assert_eq!(v["state"], "running");
    let id = v["id"].as_str().unwrap();
    let tap = format!("bgt{}", &id[..8]);
    let dir = PathBuf::from(v["vm_dir"].as_str().unwrap());
    let config = fc_api_get(&dir.join("firecracker.sock"), "/vm/config");
    let nics = config["network-interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nics.len(), 1, "Firecracker has no network card: {config}");
    assert_eq!(nics[0]["host_dev_name"], tap.as_str(), "{config}");
    assert!(nics[0]["guest_mac"]
        .as_str()
        .is_some_and(|m| m.starts_with("52:54:00:")));
    // The tap is on banger's bridge and up, in the helper's namespace.
    let link = env.ip_in_helper_ns(&["-d", "link", "show", &tap]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("tun type tap") || link.contains("tap"), "{link}");
    assert!(link.contains("master banger"), "not on the bridge: {link}");
    fc_ok(&env, &["vm", "stop", "fcnet"]);
    let stopped = env.ip_in_helper_ns(&["link", "show", &tap]);
    assert!(!stopped.status.success(), "the tap outlived the stop");
    fc_ok(&env, &["vm", "start", "fcnet"]);
    assert!(
        env.ip_in_helper_ns(&["link", "show", &tap]).status.success(),
        "no tap after start"
    );
    fc_ok(&env, &["vm", "delete", "fcnet"]);
    let gone = env.ip_in_helper_ns(&["link", "show", &tap]);
    assert!(!gone.status.success(), "the tap outlived its VM");
}

fn jailer() -> PathBuf {
    PathBuf::from(
        std::env::var_os("BANGER_TEST_JAILER").expect("BANGER_TEST_JAILER must name Firecracker's jailer"),
    )
}

/// `banger` with Firecracker under its jailer.
fn jailed(env: &Env, args: &[&str]) -> String {
    let out = env
        .cmd("banger")
        .env("BANGER_VMM", "firecracker")
        .env("BANGER_FIRECRACKER", firecracker())
        .env("BANGER_JAILER", jailer())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "banger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_ids(pid: u64, field: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// Under the jailer Firecracker runs as the VM's own uid and gid, chrooted
/// into a jail inside the VM directory, in a cgroup of its own, with
/// nothing of banger's environment; it still gets its tap (owned by that
/// uid), is adopted by a restarted daemon, and what the jailer leaves
/// (the jail, the cgroup) is gone after stop and delete.
#[test]
#[ignore = "needs Firecracker and its jailer: set BANGER_TEST_FIRECRACKER and BANGER_TEST_JAILER, run with --ignored"]
fn a_jailed_firecracker_is_confined_and_leaves_nothing() {
    let env = with_tiny_image(true, jailed);
    jailed(
        &env,
        &[
            "vm",
            "create",
            "--name",
            "fcj",
            "--image",
            "tiny",
            "--vcpus",
            "1",
            "--memory",
            "128",
            "--disk-size",
            "64",
        ],
    );
    let v: Value = serde_json::from_str(&jailed(&env, &["vm", "show", "fcj", "--json"])).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    let pid = v["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {v}"));
    let id = v["id"].as_str().unwrap().to_string();
    let dir = PathBuf::from(v["vm_dir"].as_str().unwrap());
    let uid = 200_000 + v["vsock_cid"].as_u64().unwrap() as u32;

    // Its own uid and gid, its jail as root, a cgroup of its own, an empty environment.
    assert_eq!(
        status_ids(pid, "Uid"),
        vec![uid; 4],
        "not running as the VM's uid"
    );
    assert_eq!(status_ids(pid, "Gid"), vec![uid; 4]);
    // Its `/` is the jail: what banger linked in, nothing of the host.
    let jail = dir.join("jail/firecracker").join(&id).join("root");
    let seen = PathBuf::from(format!("/proc/{pid}/root"));
    for inside in [
        "kernel",
        "firecracker.sock",
        "serial.log",
        "dev/kvm",
        "dev/net/tun",
    ] {
        assert!(seen.join(inside).exists(), "/{inside} missing in the jail");
        assert!(
            jail.join(inside).exists(),
            "{inside} is not in {}",
            jail.display()
        );
    }
    for host in ["etc/passwd", "home", "usr/bin", "proc/1"] {
        assert!(
            !seen.join(host).exists(),
            "the jailed VMM sees the host's /{host}"
        );
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.contains(&format!("/banger/{id}")),
        "no cgroup of its own: {cgroups}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "the jailed VMM inherited an environment");
    // The guest booted (its console is in the jail) and the tap is the VM uid's.
    let logs = jailed(&env, &["vm", "logs", "fcj"]);
    assert!(logs.contains("TINY_GUEST_VSOCK_READY"), "{logs}");
    let tap = format!("bgt{}", &id[..8]);
    // It runs in a network namespace of its own: the tap is there (owned by
    // the VM's uid) and no link of the host is.
    let netns = PathBuf::from(format!("/run/netns/banger-{id}"));
    let ns_of = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };
    assert_eq!(
        ns_of(&PathBuf::from(format!("/proc/{pid}/ns/net"))),
        ns_of(&netns),
        "the jailed VMM is not in its VM's namespace"
    );
    let ns_name = format!("banger-{id}");
    let inside = std::process::Command::new("ip")
        .args(["-n", &ns_name, "-d", "link", "show", &tap])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&inside.stdout).into_owned();
    assert!(
        link.contains("tun type tap"),
        "no tap in the VM's namespace: {link}"
    );
    assert!(
        link.contains(&format!("user {uid}")),
        "tap not owned by the VM's uid: {link}"
    );
    let all = std::process::Command::new("ip")
        .args(["-n", &ns_name, "-o", "link"])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&all.stdout).into_owned();
    assert!(!all.contains("banger0"), "the host's bridge is visible: {all}");
    // Its port on banger's bridge is the veth named like the tap.
    let port =
        String::from_utf8_lossy(&env.ip_in_helper_ns(&["-d", "link", "show", &tap]).stdout).into_owned();
    assert!(port.contains("veth") && port.contains("master banger"), "{port}");

    // A daemon killed with -9 adopts it (it is recognised by its jail).
    env.kill_daemon();
    let v: Value = serde_json::from_str(&jailed(&env, &["vm", "show", "fcj", "--json"])).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("running"), Some(pid)),
        "not adopted: {v}"
    );

    assert_eq!(
        env.vm_processes(),
        vec![pid as u32],
        "the jailed VMM is not found as the VM's"
    );
    jailed(&env, &["vm", "stop", "fcj"]);
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
    assert!(!netns.exists(), "the VM's namespace outlived the stop");
    assert!(
        !env.ip_in_helper_ns(&["link", "show", &tap]).status.success(),
        "the VM's port outlived the stop"
    );
    assert!(!dir.join("jail").exists(), "the jail outlived the stop");
    for c in [
        "/sys/fs/cgroup/banger",
        "/sys/fs/cgroup/memory/banger",
        "/sys/fs/cgroup/pids/banger",
    ] {
        assert!(
            !std::path::Path::new(c).join(&id).exists(),
            "cgroup {c}/{id} outlived the stop"
        );
    }
    // Started again over what a stop leaves, then deleted: nothing remains.
    jailed(&env, &["vm", "start", "fcj"]);
    jailed(&env, &["vm", "delete", "fcj"]);
    assert!(!dir.exists(), "VM directory left behind");
    assert!(env.vm_processes().is_empty());
    assert!(
        !env.ip_in_helper_ns(&["link", "show", &tap]).status.success(),
        "the tap outlived its VM"
    );
}

/// `vm create` of the smallest VM of the tiny image, without a network.
fn tiny_create(name: &str) -> Vec<&str> {
    vec![
        "vm",
        "create",
        "--name",
        name,
        "--image",
        "tiny",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--disk-size",
        "64",
        "--no-network",
    ]
}

/// Connects to a Firecracker VM's vsock port 52 through its socket: the
/// tiny guest answers `OK …`, then `hello from tiny guest`, then echoes.
fn vsock_echo(uds: &std::path::Path, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uds)
        .unwrap_or_else(|e| panic!("connecting {}: {e}", uds.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut got = String::new();
    for _ in 0..2 {
        r.read_line(&mut got).unwrap();
    }
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    r.read_line(&mut got).unwrap();
    got
}

fn snapshot_and_restore(env: &Env, run: impl Fn(&Env, &[&str]) -> String) {
    let ok = |args: &[&str]| run(env, args);
    ok(&tiny_create("src"));
    assert_eq!(ok(&["vm", "snapshot", "src", "--name", "s1"]).trim(), "s1");
    // The source was paused for the copy and runs on.
    let src: Value = serde_json::from_str(&ok(&["vm", "show", "src", "--json"])).unwrap();
    let src_dir = PathBuf::from(src["vm_dir"].as_str().unwrap());
    let src_api = if src_dir.join("jail").exists() {
        let id = src["id"].as_str().unwrap();
        src_dir
            .join("jail/firecracker")
            .join(id)
            .join("root/firecracker.sock")
    } else {
        src_dir.join("firecracker.sock")
    };
    assert_eq!(fc_api_get(&src_api, "/")["state"], "Running");
    let list: Value = serde_json::from_str(&ok(&["snapshot", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[0]["vm"], "src");
    assert!(list[0]["size_bytes"].as_u64().unwrap() > 1 << 20, "{list}");

    // Two VMs from one snapshot: each its own VMM, directory, disks and
    // socket, each guest resumed and answering on vsock.
    ok(&["vm", "restore", "s1", "--name", "r1"]);
    ok(&["vm", "restore", "s1", "--name", "r2"]);
    let mut seen = Vec::new();
    for name in ["r1", "r2", "src"] {
        let v: Value = serde_json::from_str(&ok(&["vm", "show", name, "--json"])).unwrap();
        assert_eq!(v["state"], "running", "{name}: {v}");
        let dir = PathBuf::from(v["vm_dir"].as_str().unwrap());
        let uds = if dir.join("jail").exists() {
            dir.join("jail/firecracker")
                .join(v["id"].as_str().unwrap())
                .join("root/vsock.sock")
        } else {
            dir.join("vsock.sock")
        };
        let said = vsock_echo(&uds, &format!("ping {name}"));
        assert!(
            said.contains("hello from tiny guest") && said.contains(&format!("echo:ping {name}")),
            "{name} does not answer on vsock: {said:?}"
        );
        seen.push((v["pid"].as_u64().unwrap(), dir));
    }
    assert!(seen[0].0 != seen[1].0 && seen[0].1 != seen[1].1);
    use std::os::unix::fs::MetadataExt;
    let inode = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_ne!(
        inode(seen[0].1.join("work.ext4")),
        inode(seen[1].1.join("work.ext4")),
        "restored VMs share a disk"
    );

    // The daemon killed: the restored VMs are adopted like any other.
    env.kill_daemon();
    for name in ["r1", "r2"] {
        let v: Value = serde_json::from_str(&ok(&["vm", "show", name, "--json"])).unwrap();
        assert_eq!(v["state"], "running", "{name} after the daemon's restart: {v}");
    }
    // A snapshot removed: what was restored from it runs on.
    ok(&["snapshot", "rm", "s1"]);
    assert_eq!(ok(&["snapshot", "list", "--json"]).trim(), "[]");
    for name in ["r1", "r2", "src"] {
        ok(&["vm", "delete", name]);
    }
    wait_for("the VMs' processes to end", Duration::from_secs(20), || {
        env.vm_processes().is_empty().then_some(())
    });
    let snaps = env.home().join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "snapshot files left: {left:?}");
}

#[test]
#[ignore = "needs a Firecracker binary: set BANGER_TEST_FIRECRACKER and run with --ignored"]
fn firecracker_snapshot_restores_two_vms_that_both_run() {
    let env = with_tiny_image(false, fc_ok);
    snapshot_and_restore(&env, fc_ok);
}

#[test]
#[ignore = "needs Firecracker and its jailer: set BANGER_TEST_FIRECRACKER and BANGER_TEST_JAILER, run with --ignored"]
fn a_jailed_firecracker_snapshot_restores_two_vms_that_both_run() {
    let env = with_tiny_image(true, jailed);
    snapshot_and_restore(&env, jailed);
}

/// The daemon killed with SIGKILL in the middle of a snapshot, then of a
/// restore: what comes back is whole. No unfinished snapshot files, the
/// source VM running (not left paused), and the half-restored VM either
/// gone or a VM that starts from its snapshot; no VMM without a VM.
#[test]
#[ignore = "needs a Firecracker binary: set BANGER_TEST_FIRECRACKER and run with --ignored"]
fn a_daemon_killed_mid_snapshot_or_restore_leaves_a_whole_state() {
    let env = with_tiny_image(false, fc_ok);
    let ok = |args: &[&str]| fc_ok(&env, args);
    ok(&tiny_create("src"));
    let snaps = env.home().join("snapshots");
    let background = |args: &[&str]| {
        env.cmd("banger")
            .env("BANGER_VMM", "firecracker")
            .env("BANGER_FIRECRACKER", firecracker())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // Mid-snapshot: once its unfinished directory exists.
    let mut snap = background(&["vm", "snapshot", "src", "--name", "s2"]);
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_dir(&snaps)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    {
        assert!(std::time::Instant::now() < end, "the snapshot never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    env.kill_daemon();
    let _ = snap.wait();
    let list: Value = serde_json::from_str(&ok(&["snapshot", "list", "--json"])).unwrap();
    let files: Vec<String> = std::fs::read_dir(&snaps)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !files.iter().any(|f| f.ends_with(".tmp")),
        "unfinished snapshot left: {files:?}"
    );
    assert_eq!(
        files.len(),
        list.as_array().unwrap().len(),
        "files {files:?} against rows {list}"
    );
    let src = show(&env, "src");
    assert_eq!(src["state"], "running");
    let api = PathBuf::from(src["vm_dir"].as_str().unwrap()).join("firecracker.sock");
    wait_for("the source VM to run again", Duration::from_secs(10), || {
        (fc_api_get(&api, "/")["state"] == "Running").then_some(())
    });

    // Mid-restore: once the new VM is in the store (its directory is no
    // longer a spare's).
    ok(&["vm", "snapshot", "src", "--name", "s3"]);
    let mut restore = background(&["vm", "restore", "s3", "--name", "r3"]);
    wait_for("the restore to begin", Duration::from_secs(20), || {
        let spares = env.spare_dirs();
        let vm_dirs = env.vms_dir().read_dir().ok()?.flatten();
        vm_dirs
            .filter(|e| !spares.contains(&e.path()))
            .count()
            .gt(&1)
            .then_some(())
    });
    env.kill_daemon();
    let _ = restore.wait();
    let vms: Value = serde_json::from_str(&ok(&["vm", "list", "--json"])).unwrap();
    if let Some(r3) = vms.as_array().unwrap().iter().find(|v| v["name"] == "r3") {
        if r3["state"] != "running" {
            // Its disks and machine are the snapshot's until it first
            // runs: resizing it now is refused, and changes nothing.
            let set = fc(&env, &["vm", "set", "r3", "--vcpus", "2"]);
            assert!(!set.status.success(), "vm set of an unfinished restore succeeded");
            assert!(
                String::from_utf8_lossy(&set.stderr).contains("not yet been started from its snapshot"),
                "{}",
                String::from_utf8_lossy(&set.stderr)
            );
            ok(&["vm", "start", "r3"]);
        }
        let v = show(&env, "r3");
        let said = vsock_echo(
            &PathBuf::from(v["vm_dir"].as_str().unwrap()).join("vsock.sock"),
            "r3",
        );
        assert!(
            said.contains("echo:r3"),
            "the restored VM does not answer: {said:?}"
        );
    }
    for v in serde_json::from_str::<Value>(&ok(&["vm", "list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
    {
        ok(&["vm", "delete", v["name"].as_str().unwrap()]);
    }
    wait_for("the VMs' processes to end", Duration::from_secs(20), || {
        env.vm_processes().is_empty().then_some(())
    });
    for s in ["s2", "s3"] {
        let _ = env.cmd("banger").args(["snapshot", "rm", s]).output();
    }
    let left: Vec<_> = std::fs::read_dir(&snaps)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "snapshot files left: {left:?}");
}

/// `daemon stop`, until the daemon is gone.
fn stop_daemon(env: &Env) {
    fc_ok(env, &["daemon", "stop"]);
    wait_for("the daemon to stop", Duration::from_secs(20), || {
        // SAFETY: signal 0 only probes.
        env.daemon_pid()
            .is_none_or(|p| unsafe { libc::kill(p as i32, 0) } != 0)
            .then_some(())
    });
}

/// The one spare Firecracker of a daemon, once it is up: its PID and
/// directory.
fn one_spare(env: &Env) -> (u64, PathBuf) {
    wait_for("a spare Firecracker", Duration::from_secs(20), || {
        let (dirs, pids) = (env.spare_dirs(), env.spare_processes());
        // Up: its API socket is there.
        (dirs.len() == 1 && pids.len() == 1 && dirs[0].join("firecracker.sock").exists())
            .then(|| (pids[0] as u64, dirs[0].clone()))
    })
}

/// The spare once it holds copies of the disks of the snapshot in `snap`.
fn spare_with_disks_of(env: &Env, snap: &std::path::Path) -> (u64, PathBuf) {
    let (pid, dir) = one_spare(env);
    wait_for(
        "the spare to hold the snapshot's disks",
        Duration::from_secs(20),
        || {
            env.daemon_records()
                .iter()
                .any(|r| {
                    r["message"] == "spare Firecracker ready"
                        && r["pid"].as_u64() == Some(pid)
                        && r["disks_of"]
                            .as_str()
                            .is_some_and(|d| d.contains(&*snap.to_string_lossy()))
                })
                .then_some(())
        },
    );
    (pid, dir)
}

/// Byte for byte, holes read as zeros.
fn same_bytes(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// A daemon whose back-end is Firecracker keeps one Firecracker started
/// ahead of need. The next VM that starts takes that very process (its PID
/// is the VM's), a restore takes one that holds the snapshot's disks
/// already, as copies of its own. A daemon killed with a spare waiting
/// leaves nothing once it is back, and a daemon that stops takes its spare
/// with it.
#[test]
#[ignore = "needs a Firecracker binary: set BANGER_TEST_FIRECRACKER and run with --ignored"]
fn the_spare_firecracker_is_taken_by_the_next_start_and_never_leaks() {
    let env = with_tiny_image(false, fc_ok);
    let ok = |args: &[&str]| fc_ok(&env, args);

    let (spare, spare_dir) = one_spare(&env);
    ok(&tiny_create("src"));
    let src = show(&env, "src");
    assert_eq!(
        src["pid"].as_u64(),
        Some(spare),
        "the new VM did not take the spare: {src}"
    );
    assert_eq!(src["vm_dir"].as_str(), spare_dir.to_str());
    assert!(
        !spare_dir.join("spare").exists(),
        "the VM's directory is still marked a spare's"
    );

    // A restore from a snapshot: the spare then made holds its disks.
    ok(&["vm", "snapshot", "src", "--name", "s1"]);
    let snap = env
        .home()
        .join("snapshots")
        .read_dir()
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let (spare, _) = one_spare(&env);
    ok(&["vm", "restore", "s1", "--name", "r1"]);
    assert_eq!(show(&env, "r1")["pid"].as_u64(), Some(spare));
    let (spare, spare_dir) = spare_with_disks_of(&env, &snap);
    ok(&["vm", "restore", "s1", "--name", "r2"]);
    let r2 = show(&env, "r2");
    assert_eq!(r2["pid"].as_u64(), Some(spare));
    let r1_dir = PathBuf::from(show(&env, "r1")["vm_dir"].as_str().unwrap());
    use std::os::unix::fs::MetadataExt;
    for disk in ["overlay.ext4", "work.ext4"] {
        let mine = spare_dir.join(disk);
        assert!(
            same_bytes(&snap.join(disk), &mine),
            "{disk} is not the snapshot's"
        );
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        assert_ne!(
            ino(&mine),
            ino(&snap.join(disk)),
            "{disk} is the snapshot's own file"
        );
        assert_ne!(ino(&mine), ino(&r1_dir.join(disk)), "{disk} is shared with r1");
    }
    for name in ["r1", "r2", "src"] {
        let v = show(&env, name);
        let said = vsock_echo(
            &PathBuf::from(v["vm_dir"].as_str().unwrap()).join("vsock.sock"),
            name,
        );
        assert!(
            said.contains(&format!("echo:{name}")),
            "{name} does not answer: {said:?}"
        );
    }

    // The snapshot removed: the spare's copies of its disks go with it.
    let (_, spare_dir) = spare_with_disks_of(&env, &snap);
    assert!(spare_dir.join("overlay.ext4").exists());
    ok(&["snapshot", "rm", "s1"]);
    for disk in ["overlay.ext4", "work.ext4"] {
        assert!(
            !spare_dir.join(disk).exists(),
            "the spare kept {disk} of a removed snapshot"
        );
    }

    // kill -9 with a spare waiting: back, the old spare is gone with its
    // directory, a new one is up, and the VMs are adopted.
    let (old, old_dir) = one_spare(&env);
    env.kill_daemon();
    assert_eq!(show(&env, "r2")["state"], "running");
    let (new, _) = one_spare(&env);
    assert_ne!(new, old);
    assert!(!old_dir.exists(), "the last daemon's spare directory is left");
    assert!(
        !banger_tests::processes_mentioning(&format!("{}/", old_dir.display())).contains(&(old as u32)),
        "the last daemon's spare Firecracker still runs"
    );

    // Every VM gone: only the spare runs. The daemon stopped: nothing.
    for name in ["r1", "r2", "src"] {
        ok(&["vm", "delete", name]);
    }
    wait_for("the VMs' processes to end", Duration::from_secs(20), || {
        env.vm_processes().is_empty().then_some(())
    });
    assert_eq!(env.spare_processes().len(), 1);
    stop_daemon(&env);
    let left = banger_tests::processes_mentioning(&env.vms_dir().display().to_string());
    assert!(left.is_empty(), "processes left by a stopped daemon: {left:?}");
    let dirs: Vec<_> = env
        .vms_dir()
        .read_dir()
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(dirs.is_empty(), "directories left by a stopped daemon: {dirs:?}");
}

/// A creation refused after it took the spare Firecracker (here: every
/// address of the bridge is taken) gives it back untouched: the next
/// start takes that very process, and nothing is left of the refused VM.
#[test]
#[ignore = "needs a Firecracker binary: set BANGER_TEST_FIRECRACKER and run with --ignored"]
fn a_refused_creation_leaves_the_spare_to_the_next() {
    let env = with_tiny_image(true, fc_ok);
    // One guest address: the bridge's /30 holds the gateway and one more.
    std::fs::write(
        env.home().join("config.toml"),
        "bridge_address = \"172.31.99.1/30\"\n",
    )
    .unwrap();
    stop_daemon(&env);
    let networked = |name: &'static str| -> Vec<&str> {
        tiny_create(name)
            .into_iter()
            .filter(|a| *a != "--no-network")
            .collect()
    };
    fc_ok(&env, &networked("n1"));
    let (spare, spare_dir) = one_spare(&env);
    let refused = fc(&env, &networked("n2"));
    assert!(!refused.status.success(), "a second address was handed out");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("free address"), "{err}");
    let vms: Value = serde_json::from_str(&fc_ok(&env, &["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(one_spare(&env), (spare, spare_dir.clone()));
    // The address free again: the next start takes the same spare.
    fc_ok(&env, &["vm", "delete", "n1"]);
    fc_ok(&env, &networked("n3"));
    let n3 = show(&env, "n3");
    assert_eq!(n3["pid"].as_u64(), Some(spare), "the spare was lost: {n3}");
    assert_eq!(n3["vm_dir"].as_str(), spare_dir.to_str());
    fc_ok(&env, &["vm", "delete", "n3"]);
}
