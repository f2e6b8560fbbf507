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
