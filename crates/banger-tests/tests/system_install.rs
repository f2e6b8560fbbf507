//! `banger system install` for a fresh, ordinary user: the units it writes
//! pass `systemd-analyze verify` and carry their hardening; started the
//! way the units say (the helper as root, the daemon as the owner with
//! the unit's environment only), the owner's `vm run` works from a plain
//! user PATH without root; another user is refused by both sockets and
//! never gets a daemon of its own; a daemon restart leaves a running VM
//! to be adopted; `system uninstall --purge` leaves nothing.
//!
//! There is no systemd here to start the units, so the test runs their
//! `ExecStart` lines itself, with their `User=`, `Group=` and
//! `Environment=`, as systemd would.

use banger_tests::{bin, in_private_netns, processes_mentioning, wait_for, Env};
use serde_json::Value;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// An ordinary user made for the test and removed with it.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl TestUser {
    fn new(prefix: &str) -> TestUser {
        let name = format!("{prefix}{:05x}", std::process::id() & 0xfffff);
        let _ = Command::new("userdel").args(["--remove", &name]).output();
        let out = Command::new("useradd")
            .args(["--create-home", "--user-group", "--shell", "/bin/sh", &name])
            .output()
            .expect("useradd");
        assert!(
            out.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let o = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
        };
        TestUser {
            uid: id("-u"),
            gid: id("-g"),
            home: PathBuf::from(format!("/home/{name}")),
            name,
        }
    }

    /// `prog` as this user, with only what a login would give it: HOME,
    /// USER, a plain PATH (no sbin, no cargo), the home as its directory.
    fn cmd(&self, prog: &Path) -> Command {
        let mut c = Command::new(prog);
        c.env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(&self.home)
            .stdin(Stdio::null());
        as_ids(&mut c, self.uid, self.gid, vec![self.gid]);
        c
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        for pid in processes_of(self.uid) {
            // SAFETY: a process of the user this test made.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = Command::new("userdel").args(["--remove", &self.name]).output();
    }
}

/// Drops to `uid`/`gid` (and `groups`) before exec, in the order systemd
/// does: groups, then gid, then uid.
fn as_ids(c: &mut Command, uid: u32, gid: u32, groups: Vec<u32>) {
    // SAFETY: setgroups/setgid/setuid are async-signal-safe and the vector
    // is allocated before the fork.
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn processes_of(uid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let real = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        // A zombie is dead already; reaping it is its parent's business.
        let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
        if real == Some(uid) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// A unit file's `[Service]` keys (a key given twice keeps every value).
fn unit(path: &Path) -> HashMap<String, Vec<String>> {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            keys.entry(k.into()).or_default().push(v.into());
        }
    }
    keys
}

fn one<'a>(u: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    let v = u.get(key).unwrap_or_else(|| panic!("no {key}= in the unit"));
    assert_eq!(v.len(), 1, "{key}= given {} times", v.len());
    &v[0]
}

fn argv(exec: &str) -> (PathBuf, Vec<String>) {
    let mut w = exec.split_whitespace().map(String::from);
    (PathBuf::from(w.next().unwrap()), w.collect())
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts the helper as its unit says, in a private network namespace (so
/// its bridge and taps never touch the host's network).
fn start_helper(unit_file: &Path, socket: &Path) -> Child {
    let u = unit(unit_file);
    let (prog, args) = argv(one(&u, "ExecStart"));
    let mut c = Command::new(prog);
    // Its log is the unit's --log-file; no pipe of the test's is held open.
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    in_private_netns(&mut c);
    let child = c.spawn().expect("start the helper");
    wait_for("the helper socket", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(socket).ok()
    });
    child
}

/// Starts the daemon as its unit says: as `User=`/`Group=`, with exactly
/// the unit's environment.
fn start_daemon(unit_file: &Path, owner: &TestUser, socket: &Path) -> Child {
    let u = unit(unit_file);
    assert_eq!(one(&u, "User"), owner.name);
    let group = one(&u, "Group");
    assert_eq!(group, owner.name, "the owner's own group");
    let (prog, args) = argv(one(&u, "ExecStart"));
    let mut c = Command::new(prog);
    c.args(args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for line in &u["Environment"] {
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            c.env(k, v);
        }
    }
    as_ids(&mut c, owner.uid, owner.gid, vec![owner.gid]);
    let child = c.spawn().expect("start bangerd");
    wait_for("the daemon socket", Duration::from_secs(15), || {
        std::os::unix::net::UnixStream::connect(socket).ok()
    });
    child
}

/// A child killed with the test, even when it fails half-way.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stop(mut c: Child) {
    // SIGTERM, as systemd's stop sends it (KillMode=process: to bangerd only).
    // SAFETY: a child this test started.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

#[test]
fn an_installed_banger_serves_its_owner_and_refuses_everyone_else() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test installs as root");
    // A bundle of the default image: what a team would hand to install.
    let src = Env::with_image();
    let bundle = src.dir.path().join("default.tar.zst");
    src.banger_ok(&["image", "export", "default", "-o", bundle.to_str().unwrap()]);

    let owner = TestUser::new("bgown");
    let other = TestUser::new("bgoth");
    let d = tempfile::Builder::new()
        .prefix("banger-install")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let p = |s: &str| d.path().join(s);
    let (prefix, state, run, helper_sock, logs, units) = (
        p("prefix"),
        p("state"),
        p("run"),
        p("helper/helper.sock"),
        p("log"),
        p("units"),
    );
    let install = |extra: &[&str]| -> Output {
        let mut c = Command::new(bin("banger"));
        c.args([
            "system",
            "install",
            "--owner",
            &owner.name,
            "--no-start",
            "--json",
        ])
        .arg("--prefix")
        .arg(&prefix)
        .arg("--state-dir")
        .arg(&state)
        .arg("--runtime-dir")
        .arg(&run)
        .arg("--helper-socket")
        .arg(&helper_sock)
        .arg("--log-dir")
        .arg(&logs)
        .arg("--unit-dir")
        .arg(&units)
        .args(extra)
        .env_remove("BANGER_HOME")
        .stdin(Stdio::null());
        c.output().unwrap()
    };
    let out = install(&["--image-bundle", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "install: {}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["default_image"].as_str().is_some(), "{report}");
    // Installing again (an upgrade) changes nothing that works.
    let again = install(&[]);
    assert!(again.status.success(), "re-install: {}", text(&again));

    // The units: systemd's own checker, then what the test relies on.
    let helper_unit = units.join("banger-helper.service");
    let daemon_unit = units.join("bangerd.service");
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let v = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&helper_unit)
            .arg(&daemon_unit)
            .output()
            .unwrap();
        assert!(
            v.status.success() && v.stderr.is_empty(),
            "systemd-analyze verify: {}",
            text(&v)
        );
    } else {
        eprintln!("systemd-analyze is not installed: the units are checked by this test alone");
    }
    // Man pages and completions came with it, naming the installed binary.
    assert!(prefix.join("share/man/man1/banger-vm-run.1").exists());
    let comp = std::fs::read_to_string(prefix.join("share/bash-completion/completions/banger")).unwrap();
    assert!(
        comp.contains(prefix.join("bin/banger").to_str().unwrap()),
        "{comp}"
    );
    let du = unit(&daemon_unit);
    assert_eq!(
        one(&du, "KillMode"),
        "process",
        "VMs must survive a daemon restart"
    );
    assert_eq!(
        one(&du, "CapabilityBoundingSet"),
        "",
        "the daemon holds no capability"
    );
    assert_eq!(one(&du, "NoNewPrivileges"), "yes");
    let hu = unit(&helper_unit);
    assert_eq!(one(&hu, "ProtectSystem"), "strict");
    assert!(one(&hu, "ExecStart").contains(&format!("--owner-uid {}", owner.uid)));

    // Start them the way the units say.
    let daemon_sock = run.join("bangerd.sock");
    let mut helper = Reaped(Some(start_helper(&helper_unit, &helper_sock)));
    // Test hygiene only: a DNS port of its own, so parallel tests never
    // collide on the default one. Written as the owner would.
    let cfg = state.join("config.toml");
    std::fs::write(&cfg, "dns_listen = \"127.0.0.1:0\"\n").unwrap();
    std::os::unix::fs::chown(&cfg, Some(owner.uid), Some(owner.gid)).unwrap();
    let mut daemon = Reaped(Some(start_daemon(&daemon_unit, &owner, &daemon_sock)));

    let banger = prefix.join("bin/banger");
    // The owner, from a plain login environment: no root, no sbin, no cargo.
    let out = owner
        .cmd(&banger)
        .args(["vm", "run", "--rm", "--", "uname", "-r"])
        .output()
        .unwrap();
    assert!(out.status.success(), "owner's vm run: {}", text(&out));
    let guest_kernel = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        guest_kernel.contains("cloud") && guest_kernel != host_kernel.trim(),
        "not the guest's kernel: {guest_kernel:?}"
    );
    // The helper's log, readable by the owner, has this run's op id.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let op = stderr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|w| w.starts_with("op-"))
        .unwrap_or_else(|| panic!("no op id in {stderr}"))
        .to_string();
    let log = owner
        .cmd(Path::new("/bin/cat"))
        .arg(logs.join("helper.log"))
        .output()
        .unwrap();
    assert!(
        log.status.success(),
        "the owner cannot read the helper's log: {}",
        text(&log)
    );
    assert!(
        String::from_utf8_lossy(&log.stdout).contains(&op),
        "the helper logged nothing for {op}"
    );

    // Doctor, as the owner, sees the installation.
    let doc = owner.cmd(&banger).args(["doctor", "--json"]).output().unwrap();
    let r: Value = serde_json::from_slice(&doc.stdout).unwrap_or_else(|_| panic!("doctor: {}", text(&doc)));
    let find = |name: &str| -> Value {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check: {r}"))
    };
    assert_eq!(find("services")["status"], "PASS", "{r}");
    assert!(find("services")["detail"].as_str().unwrap().contains(&owner.name));
    assert_eq!(find("daemon")["status"], "PASS", "{r}");
    let settings = owner
        .cmd(&banger)
        .args(["config", "show", "--json"])
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&settings.stdout).unwrap();
    let state_row = s
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["key"] == "state_dir")
        .unwrap();
    assert_eq!(state_row["value"], state.display().to_string());
    assert!(
        state_row["source"].as_str().unwrap().starts_with("install:"),
        "{state_row}"
    );

    // Anyone else: refused by the daemon's socket, with a reason, and no
    // daemon of their own started instead.
    let theirs = other.cmd(&banger).args(["vm", "list"]).output().unwrap();
    assert!(
        !theirs.status.success(),
        "another user reached the daemon: {}",
        text(&theirs)
    );
    let err = String::from_utf8_lossy(&theirs.stderr);
    assert!(
        err.contains("permission denied") && err.contains(&owner.name),
        "unclear refusal: {err}"
    );
    assert!(
        processes_of(other.uid).is_empty(),
        "a process was left running as the other user"
    );
    // ... and by the helper's.
    let h = other
        .cmd(&prefix.join("lib/banger/banger-helper"))
        .args(["call", "--socket"])
        .arg(&helper_sock)
        .args([
            "priv.bridge.ensure",
            r#"{"bridge":"banger0","address":"172.30.0.1/24"}"#,
        ])
        .output()
        .unwrap();
    assert!(
        !h.status.success(),
        "another user reached the helper: {}",
        text(&h)
    );
    assert!(
        String::from_utf8_lossy(&h.stderr)
            .to_lowercase()
            .contains("permission denied"),
        "{}",
        text(&h)
    );

    // A daemon restart (SIGTERM to bangerd only, as KillMode=process does)
    // leaves a running VM running, and the next daemon adopts it.
    let out = owner
        .cmd(&banger)
        .args(["vm", "run", "-d", "--name", "keep"])
        .output()
        .unwrap();
    assert!(out.status.success(), "vm run -d: {}", text(&out));
    stop(daemon.0.take().unwrap());
    daemon.0 = Some(start_daemon(&daemon_unit, &owner, &daemon_sock));
    let out = owner
        .cmd(&banger)
        .args(["vm", "exec", "keep", "--", "echo", "adopted"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "adopted\n",
        "{}",
        text(&out)
    );

    // Status, as root: units present and hardened, both services answer.
    let status = |prefix: &Path| {
        Command::new(bin("banger"))
            .args(["system", "status", "--json", "--prefix"])
            .arg(prefix)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let st = status(&prefix);
    assert!(st.status.success(), "status: {}", text(&st));
    let sv: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(sv["helper"]["up"], true, "{sv}");
    assert_eq!(sv["daemon"]["up"], true, "{sv}");
    assert_eq!(sv["missing_hardening"], serde_json::json!([]), "{sv}");
    // A unit that lost its hardening is reported, and doctor fails it.
    let weakened = std::fs::read_to_string(&daemon_unit)
        .unwrap()
        .replace("KillMode=process\n", "");
    std::fs::write(&daemon_unit, &weakened).unwrap();
    let st = status(&prefix);
    assert_eq!(st.status.code(), Some(3), "{}", text(&st));
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("KillMode=process"),
        "{}",
        text(&st)
    );
    let doc = owner.cmd(&banger).args(["doctor", "--json"]).output().unwrap();
    assert!(!doc.status.success(), "doctor passed a weakened unit");
    assert!(String::from_utf8_lossy(&doc.stdout).contains("KillMode=process"));
    std::fs::write(
        &daemon_unit,
        weakened.replace("Restart=on-failure\n", "KillMode=process\nRestart=on-failure\n"),
    )
    .unwrap();

    // Uninstall: refused while a VM runs, then forced; nothing is left.
    let un = |extra: &[&str]| -> Output {
        Command::new(bin("banger"))
            .args(["system", "uninstall", "--purge", "--prefix"])
            .arg(&prefix)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let refused = un(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("keep"),
        "{}",
        text(&refused)
    );
    let out = un(&["--force"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let mut bangerd = daemon.0.take().unwrap();
    wait_for("bangerd to stop", Duration::from_secs(15), || {
        bangerd.try_wait().unwrap()
    });
    stop(helper.0.take().unwrap());
    for gone in [
        prefix.join("bin/banger"),
        prefix.join("share/man/man1/banger.1"),
        prefix.join("share/bash-completion/completions/banger"),
        prefix.join("lib/banger"),
        helper_unit,
        daemon_unit,
        state,
        logs,
    ] {
        assert!(!gone.exists(), "{} was left behind", gone.display());
    }
    let marker = d.path().display().to_string();
    wait_for("the VM's processes to end", Duration::from_secs(10), || {
        processes_mentioning(&marker).is_empty().then_some(())
    });
    let left: Vec<String> = processes_of(owner.uid)
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
        })
        .collect();
    assert!(left.is_empty(), "processes of the owner were left: {left:?}");
}
