//! Hostile local users against the root helper: a foreign uid can neither
//! stall it nor grow it, and what it sends is not logged beyond a short,
//! escaped summary.

use banger_tests::Env;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLOOD: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Not a test: the flooding process the test below starts as uid 65534
/// (this same binary, re-executed). It opens connections to the socket in
/// `FLOOD_SOCKET`, sends half a frame on each, writes how many it holds to
/// the file `FLOOD_READY` and keeps them until its stdin closes.
#[test]
#[ignore = "helper process of foreign_uid_flood_cannot_stall_or_grow_the_helper"]
fn flood_child() {
    let Some(sock) = std::env::var_os("FLOOD_SOCKET") else {
        return;
    };
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        if let Ok(mut s) = UnixStream::connect(&sock) {
            use std::io::Write;
            // Half a frame: no newline, so a server that reads before
            // checking the peer would wait for the rest.
            let _ = s.write_all(&[b'x'; 16 * 1024]);
            held.push(s);
        }
    }
    let ready = std::env::var_os("FLOOD_READY").expect("FLOOD_READY");
    std::fs::write(ready, held.len().to_string()).unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn foreign_uid_flood_cannot_stall_or_grow_the_helper() {
    let env = Env::new();
    let helper = env.helper_pid();
    let ping = || {
        let t = Instant::now();
        let out = env
            .cmd("banger-helper")
            .args(["call", "--socket"])
            .arg(env.helper_socket())
            .args(["priv.ping", "{}"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        t.elapsed()
    };
    ping();
    let rss_before = rss_kib(helper);
    let log_before = std::fs::metadata(env.helper_log()).map(|m| m.len()).unwrap_or(0);

    // Defense in depth: the socket is 0600 for the owner; opened up, the
    // peer check at accept must still hold.
    std::fs::set_permissions(
        env.helper_socket(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let ready = env.dir.path().join("flood-ready");
    // The flood (another uid) writes its count into the test's directory.
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut flood = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "flood_child", "--test-threads", "1"])
        .env("FLOOD_SOCKET", env.helper_socket())
        .env("FLOOD_READY", &ready)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let held: usize = banger_tests::wait_for(
        "the flood to hold its connections",
        Duration::from_secs(60),
        || {
            assert!(
                flood.try_wait().unwrap().is_none(),
                "the flood process ended early"
            );
            std::fs::read_to_string(&ready).ok()?.trim().parse().ok()
        },
    );
    assert!(held > 0, "the foreign uid could not connect at all");

    // Root is still answered promptly (the CLI process start included).
    let slowest = (0..5).map(|_| ping()).max().unwrap();
    assert!(
        slowest < Duration::from_millis(100),
        "priv.ping took {slowest:?} with {held} foreign connections open"
    );
    let grown = rss_kib(helper).saturating_sub(rss_before);
    assert!(grown < 20 * 1024, "helper RSS grew by {grown} KiB");
    // One short line per refused connection, never what the peer sent.
    let logged = std::fs::metadata(env.helper_log()).map(|m| m.len()).unwrap_or(0) - log_before;
    assert!(
        logged < (held as u64 + 10) * 600,
        "{logged} bytes of log for {held} refused connections"
    );
    drop(flood.stdin.take());
    let _ = flood.wait();
}

/// `kernel rm` removes stored kernels by name only: a path, or a manifest
/// whose `dir` names another directory, never deletes anything else.
#[test]
fn kernel_rm_never_deletes_a_directory_it_was_not_given() {
    let env = Env::without_helper();
    let evil = env.dir.path().join("x/evilk");
    let victim = env.dir.path().join("x/victim");
    std::fs::create_dir_all(&evil).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("precious"), "data").unwrap();
    let manifest = serde_json::json!({
        "version": "evil", "dir": victim.display().to_string(), "package": "x",
        "sha256": "", "source": "x", "modules": [],
    });
    std::fs::write(evil.join("manifest.json"), manifest.to_string()).unwrap();
    let out = env.banger(&["kernel", "rm", evil.to_str().unwrap()]);
    assert!(!out.status.success(), "kernel rm of a path succeeded");
    assert!(
        victim.join("precious").exists(),
        "kernel rm deleted another directory"
    );
    assert!(evil.exists());
    // Shown by path, it is the path asked for, not the manifest's claim.
    let shown: serde_json::Value =
        serde_json::from_str(&env.banger_ok(&["kernel", "show", evil.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(shown["dir"], evil.canonicalize().unwrap().display().to_string());
}

/// Registered images are checked for what they are: a file holding only
/// the ext4 magic is refused, and a symlink is stored resolved.
#[test]
fn image_register_checks_the_file_and_resolves_links() {
    let env = Env::without_helper();
    let (rootfs, kernel) = banger_tests::shared_image();
    let fake = env.dir.path().join("fake.ext4");
    let mut bytes = vec![0u8; 1182];
    bytes[1024 + 56] = 0x53;
    bytes[1024 + 57] = 0xEF;
    std::fs::write(&fake, bytes).unwrap();
    let out = env.banger(&[
        "image",
        "register",
        "fake",
        "--rootfs",
        fake.to_str().unwrap(),
        "--kernel",
        &kernel,
    ]);
    assert!(
        !out.status.success(),
        "a 1,182-byte file was accepted as an image"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ext4 image"));

    let link = env.dir.path().join("link.ext4");
    std::os::unix::fs::symlink(&rootfs, &link).unwrap();
    env.banger_ok(&[
        "image",
        "register",
        "linked",
        "--rootfs",
        link.to_str().unwrap(),
        "--kernel",
        &kernel,
    ]);
    let shown: serde_json::Value =
        serde_json::from_str(&env.banger_ok(&["image", "show", "linked", "--json"])).unwrap();
    assert_eq!(
        shown["rootfs"],
        std::fs::canonicalize(&rootfs).unwrap().display().to_string(),
        "the link itself was stored"
    );
}

/// Privileged values are checked against what they must be, not only
/// their shape: the bridge gets one private host address, once; NAT only
/// for a guest of an existing banger bridge.
#[test]
fn the_helper_validates_addresses_against_the_bridge() {
    let env = Env::new();
    let call = |method: &str, params: &str| {
        let out = env
            .cmd("banger-helper")
            .args(["call", "--socket"])
            .arg(env.helper_socket())
            .args([method, params])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for bad in [
        "127.0.0.2/8",
        "169.254.1.1/16",
        "10.0.0.1/8",
        "172.30.0.1/+24",
        "172.30.0.0/24",
    ] {
        let (ok, err) = call(
            "priv.bridge.ensure",
            &format!(r#"{{"name":"banger0","address":"{bad}"}}"#),
        );
        assert!(!ok && err.contains("bad_request"), "{bad}: {err}");
    }
    // Guest rules (NAT) on a bridge that does not exist.
    let guest = |ip: &str| {
        format!(
            r#"{{"vm":"ab12","tap":"bgtab12","bridge":"banger0","mac":"52:54:00:ab:12:00","ip":"{ip}","nat":true}}"#
        )
    };
    let (ok, err) = call("priv.guest.allow", &guest("172.30.0.5"));
    assert!(!ok && err.contains("not_found"), "{err}");
    let (ok, err) = call(
        "priv.bridge.ensure",
        r#"{"name":"banger0","address":"172.30.0.1/24"}"#,
    );
    assert!(ok, "{err}");
    let (ok, err) = call(
        "priv.bridge.ensure",
        r#"{"name":"banger0","address":"172.31.0.1/24"}"#,
    );
    assert!(!ok && err.contains("already_exists"), "a second address: {err}");
    let addrs = String::from_utf8_lossy(
        &env.ip_in_helper_ns(&["-4", "-o", "addr", "show", "banger0"])
            .stdout,
    )
    .lines()
    .count();
    assert_eq!(addrs, 1, "addresses pile up on the bridge");
    for guest_ip in ["8.8.8.8", "172.30.0.0", "172.30.0.255", "172.30.0.1"] {
        let (ok, err) = call("priv.guest.allow", &guest(guest_ip));
        assert!(!ok && err.contains("bad_request"), "NAT for {guest_ip}: {err}");
    }
    let rules = env.in_helper_ns("nft", &["list", "ruleset"]);
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("banger:ab12"),
        "a refused NAT rule was installed"
    );
}

/// A guest writing to its console without end does not fill the host's
/// disk: the log stays within its budget and keeps the newest output.
#[test]
fn a_guest_cannot_grow_its_console_log_without_bound() {
    let env = Env::new();
    std::fs::create_dir_all(env.home()).unwrap();
    std::fs::write(env.home().join("config.toml"), "console_log_max_kib = 256\n").unwrap();
    let (rootfs, kernel) = banger_tests::shared_image();
    env.banger_ok(&[
        "image", "register", "default", "--rootfs", &rootfs, "--kernel", &kernel,
    ]);
    env.create_small("noisy", &[]);
    let dir = std::path::PathBuf::from(env.vm("noisy")["vm_dir"].as_str().unwrap());
    // ~2 MB of console output, then a marker.
    env.banger_ok(&[
        "vm", "exec", "noisy", "--", "sh", "-c",
        "yes 'console flood console flood console flood' | head -c 2000000 > /dev/console; echo FLOOD-DONE > /dev/console",
    ]);
    let log = dir.join("serial.log");
    banger_tests::wait_for(
        "the console log to be cut to its budget",
        Duration::from_secs(30),
        || {
            use std::os::unix::fs::MetadataExt;
            let used = std::fs::metadata(&log).ok()?.blocks() * 512;
            (used <= 256 * 1024 + 64 * 1024).then_some(())
        },
    );
    let logs = env.banger_ok(&["vm", "logs", "noisy"]);
    assert!(logs.contains("FLOOD-DONE"), "the newest output is gone");
    env.banger_ok(&["vm", "delete", "noisy"]);
}
