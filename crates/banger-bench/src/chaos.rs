//! `banger-bench chaos`: random lifecycle commands on a few real guests
//! while bangerd, the root helper, a VMM or the client itself is killed
//! with SIGKILL at a random moment. After each round, once every
//! operation has settled, the invariants are checked:
//!
//! - no command hung (each ends within its deadline, with a status);
//! - no VM is left in an intermediate state (creating, starting, stopping,
//!   deleting);
//! - every VM recorded running has a live VMM, its tap, and answers `exec`;
//! - every VM recorded stopped has no process, no tap, no NAT rule and no
//!   socket file;
//! - no process, tap, NAT rule or VM directory belongs to no VM;
//! - no guest session is left `starting`, and none of a stopped VM is
//!   `running` (the catalog settles to what the guest says);
//! - every snapshot listed has its directory and every snapshot directory
//!   is listed: none is left half written (`.tmp`).
//!
//! The whole stack runs in a network namespace of its own (the process
//! unshares one at start), so taps, the bridge and nft rules never touch
//! the host's network. Needs root.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one command may take before it counts as hung.
const COMMAND_DEADLINE: Duration = Duration::from_secs(240);
/// How long the invariants may take to hold after a round (a VMM killed
/// behind the daemon's back is reaped by the watcher within about 1 s; a
/// killed helper comes back with the next command).
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
const VMS: [&str; 3] = ["chaos0", "chaos1", "chaos2"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: plenty for picking moves.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// One of `items`, if there is any.
    fn pick<'a>(&mut self, items: &[&'a str]) -> Option<&'a str> {
        items.get(self.below(items.len().max(1) as u64) as usize).copied()
    }
}

struct Chaos {
    bin: PathBuf,
    home: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Nobody,
    Client,
    Daemon,
    Helper,
    Vmm,
}

impl Chaos {
    fn cmd(&self) -> Command {
        let mut c = Command::new(self.bin.join("banger"));
        c.env("BANGER_HOME", &self.home)
            .env("BANGER_RUNTIME_DIR", self.home.join("run"))
            .env("BANGER_HELPER_SOCKET", self.home.join("helper.sock"))
            .env("BANGER_DNS_LISTEN", "127.0.0.1:0")
            // A warm pool of one: chaos2 is created with the pool's spec
            // and takes its VM; pool VMs live through every kill too.
            .env("BANGER_WARM_POOL", "1")
            .stdin(Stdio::null());
        c
    }

    fn banger(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd().args(args).output()?;
        if !out.status.success() {
            bail!("banger {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn vms(&self) -> Result<Vec<Value>> {
        let v: Value = serde_json::from_str(&self.banger(&["vm", "list", "--json"])?)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    fn pid_file(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.home.join("run").join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the daemon (restarted by the call if it was killed) has
    /// no unfinished operation.
    fn settle(&self) -> Result<()> {
        let end = Instant::now() + SETTLE_DEADLINE * 4;
        loop {
            if let Ok(out) = self.banger(&["daemon", "operations", "--json"]) {
                let ops: Value = serde_json::from_str(&out)?;
                if ops
                    .as_array()
                    .is_some_and(|a| a.iter().all(|o| o["done"].as_bool() == Some(true)))
                {
                    return Ok(());
                }
            }
            if Instant::now() > end {
                bail!("operations still running after {:?}", SETTLE_DEADLINE * 4);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every invariant violation visible now.
    fn violations(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        let vms = self.vms()?;
        let taps = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-o", "link", "show", "type", "tun"])
                .output()?
                .stdout,
        )
        .into_owned();
        let nft = String::from_utf8_lossy(&Command::new("nft").args(["list", "ruleset"]).output()?.stdout)
            .into_owned();
        let vms_dir = self.home.join("vms");
        let mut known_dirs = Vec::new();
        for vm in &vms {
            let name = vm["name"].as_str().unwrap_or("?");
            let id = vm["id"].as_str().unwrap_or("?");
            let dir = vm["vm_dir"].as_str().unwrap_or("").to_string();
            let tap = format!("bgt{}", &id[..8.min(id.len())]);
            known_dirs.push(dir.clone());
            let procs = processes_in(&dir);
            match vm["state"].as_str() {
                Some("running") => {
                    if !vm["pid"].is_u64() {
                        v.push(format!("{name}: recorded running without a live VMM"));
                    } else if self.banger(&["vm", "exec", name, "--", "true"]).is_err() {
                        v.push(format!("{name}: recorded running but exec fails"));
                    }
                    if !taps.contains(&tap) {
                        v.push(format!("{name}: running without its tap {tap}"));
                    }
                }
                // A pool VM waits paused: alive, with its tap, no exec.
                Some("pooled") => {
                    if !vm["pid"].is_u64() {
                        v.push(format!("{name}: recorded pooled without a live VMM"));
                    }
                    if !taps.contains(&tap) {
                        v.push(format!("{name}: pooled without its tap {tap}"));
                    }
                }
                Some("stopped") => {
                    if !procs.is_empty() {
                        v.push(format!("{name}: recorded stopped while {procs:?} run"));
                    }
                    if taps.contains(&tap) {
                        v.push(format!("{name}: stopped but its tap {tap} exists"));
                    }
                    if nft.contains(&format!("banger:{id}")) {
                        v.push(format!("{name}: stopped but its nftables rules remain"));
                    }
                    let socks: Vec<String> = std::fs::read_dir(&dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|f| f.contains(".sock"))
                        .collect();
                    if !socks.is_empty() {
                        v.push(format!("{name}: stopped but sockets remain: {socks:?}"));
                    }
                }
                other => v.push(format!("{name}: left in state {other:?}")),
            }
            let sessions: Value = self
                .banger(&["vm", "session", "list", name, "--json"])
                .ok()
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or_default();
            for s in sessions["sessions"].as_array().into_iter().flatten() {
                let (sn, st) = (
                    s["name"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                );
                if st == "starting" {
                    v.push(format!("{name}: session {sn} left starting"));
                }
                if st == "running" && vm["state"] != "running" {
                    v.push(format!("{name}: session {sn} running in a stopped VM"));
                }
            }
        }
        // Anything that belongs to no VM.
        for e in std::fs::read_dir(&vms_dir).into_iter().flatten().flatten() {
            let d = e.path().display().to_string();
            if !known_dirs.contains(&d) {
                v.push(format!("orphan VM directory {d}"));
                let p = processes_in(&d);
                if !p.is_empty() {
                    v.push(format!("orphan processes {p:?} for {d}"));
                }
            }
        }
        let snaps: Value = serde_json::from_str(&self.banger(&["snapshot", "list", "--json"])?)?;
        let listed: Vec<String> = snaps
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect();
        let snap_dirs: Vec<String> = std::fs::read_dir(self.home.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for d in &snap_dirs {
            if !listed.contains(d) {
                v.push(format!("snapshot directory {d} without a snapshot"));
            }
        }
        for id in &listed {
            if !snap_dirs.contains(id) {
                v.push(format!("snapshot {id} without its files"));
            }
        }
        for line in taps.lines() {
            if let Some(tap) = line
                .split(':')
                .nth(1)
                .map(|t| t.trim().split('@').next().unwrap_or(""))
            {
                if tap.starts_with("bgt")
                    && !vms.iter().any(|vm| {
                        vm["id"]
                            .as_str()
                            .is_some_and(|id| tap == format!("bgt{}", &id[..8]))
                    })
                {
                    v.push(format!("orphan tap {tap}"));
                }
            }
        }
        Ok(v)
    }

    /// Invariants, given time to hold (watcher, helper restart).
    fn check(&self) -> Result<Vec<String>> {
        let end = Instant::now() + SETTLE_DEADLINE;
        loop {
            self.settle()?;
            let v = self.violations()?;
            if v.is_empty() || Instant::now() > end {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn kill(&self, victim: Victim, child: &mut std::process::Child, rng: &mut Rng) -> Option<i32> {
        let pid = match victim {
            Victim::Nobody => return None,
            Victim::Client => child.id() as i32,
            Victim::Daemon => self.pid_file("bangerd.pid")?,
            Victim::Helper => helper_pid(&self.home.join("helper.sock"))?,
            Victim::Vmm => {
                let vms = self.vms().ok()?;
                let pids: Vec<i32> = vms
                    .iter()
                    .filter_map(|v| v["pid"].as_i64())
                    .map(|p| p as i32)
                    .collect();
                *pids.get(rng.below(pids.len().max(1) as u64) as usize)?
            }
        };
        // SAFETY: a process of this chaos run (its client, daemon, helper or a VMM).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        Some(pid)
    }
}

/// Processes whose command line names `dir` (a VM directory); none for a
/// VM without one.
fn processes_in(dir: &str) -> Vec<u32> {
    if dir.is_empty() {
        return vec![];
    }
    banger_tests::processes_mentioning(dir)
}

/// The helper serving `sock` (found by its command line).
fn helper_pid(sock: &Path) -> Option<i32> {
    let s = sock.display().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("banger-helper") && c.contains(&s)
            })
        })
}

/// Moves into a network namespace of our own, loopback up.
fn private_netns() -> Result<()> {
    // SAFETY: unshare affects only this process (single-threaded here: it
    // runs before any runtime thread does network work) and its children.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "unshare(CLONE_NEWNET): {} (chaos needs root)",
            std::io::Error::last_os_error()
        );
    }
    let st = Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
    if !st.success() {
        bail!("ip link set lo up failed");
    }
    Ok(())
}

pub fn run(bin: &Path, home: &Path, rounds: usize, seed: Option<u64>) -> Result<()> {
    // The default image from the bench home, built (or brought up to date)
    // while the network is still reachable, by a daemon started here (not
    // one an earlier run left in its own namespace).
    let _ = Command::new(bin.join("banger"))
        .env("BANGER_HOME", home)
        .env("BANGER_RUNTIME_DIR", home.join("run"))
        .args(["daemon", "stop"])
        .output();
    let built = Command::new(bin.join("banger"))
        .env("BANGER_HOME", home)
        .env("BANGER_RUNTIME_DIR", home.join("run"))
        .args(["image", "build", "--json"])
        .stdin(Stdio::null())
        .output()
        .context("building the default image")?;
    if !built.status.success() {
        bail!("image build: {}", String::from_utf8_lossy(&built.stderr).trim());
    }
    let image: Value = serde_json::from_slice(&built.stdout).context("image build --json")?;
    let _ = Command::new(bin.join("banger"))
        .env("BANGER_HOME", home)
        .env("BANGER_RUNTIME_DIR", home.join("run"))
        .args(["daemon", "stop"])
        .output();
    private_netns()?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    let home = home.join("chaos");
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home)?;
    let c = Chaos {
        bin: bin.to_path_buf(),
        home,
    };
    // What `vm cp` copies in (and, as a directory, receives into).
    let cp_dir = c.home.join("chaos-cp");
    let _ = std::fs::remove_file(&cp_dir);
    std::fs::create_dir_all(&cp_dir)?;
    std::fs::write(cp_dir.join("payload"), vec![7u8; 1 << 20])?;
    // Registered in place: the chaos home never builds one.
    c.banger(&[
        "image",
        "register",
        "default",
        "--rootfs",
        image["rootfs"].as_str().unwrap_or_default(),
        "--kernel",
        image["kernel"].as_str().unwrap_or_default(),
    ])?;
    println!("chaos: {rounds} rounds, seed {seed}, home {}", c.home.display());
    let mut rng = Rng(seed);
    let mut violations = 0usize;
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut hung = 0usize;
    let started = Instant::now();
    for round in 1..=rounds {
        let name = VMS[rng.below(VMS.len() as u64) as usize];
        let vms = c.vms()?;
        let exists = vms.iter().any(|v| v["name"] == name);
        let cp_host = c.home.join("chaos-cp");
        let cp_host = cp_host.to_str().unwrap_or_default().to_string();
        let cp_guest = format!("{name}:/root/chaos-cp");
        let cp_out = format!("{name}:/etc/hostname");
        let session = format!("s{}", rng.below(3));
        // Each VM's snapshot, and the VM restored from it. A snapshot is
        // taken of a running VM and a restore made from a snapshot that
        // exists, when there is one: a refusal tests little.
        let running: Vec<&str> = vms
            .iter()
            .filter(|v| v["state"] == "running")
            .filter_map(|v| v["name"].as_str())
            .filter(|n| VMS.contains(n))
            .collect();
        let snap_of = rng.pick(&running).unwrap_or(name);
        let snaps: Value = serde_json::from_str(&c.banger(&["snapshot", "list", "--json"])?)?;
        let taken: Vec<&str> = snaps
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["vm"].as_str())
            .filter(|n| VMS.contains(n))
            .collect();
        let from = rng.pick(&taken).unwrap_or(name);
        let (new_snap, snap, restored) = (
            format!("{snap_of}-snap"),
            format!("{from}-snap"),
            format!("{from}-r"),
        );
        let verb: Vec<&str> = if !exists && name == "chaos2" {
            // The pool's spec (the defaults): taken from the pool if ready.
            vec!["vm", "create", "--name", name]
        } else if !exists {
            let nat = if name == "chaos0" { "--nat" } else { "--no-start" };
            vec![
                "vm",
                "create",
                "--name",
                name,
                "--vcpus",
                "1",
                "--memory",
                "512",
                "--disk-size",
                "128",
                nat,
            ]
        } else {
            match rng.below(18) {
                0 => vec!["vm", "start", name],
                1 => vec!["vm", "stop", name],
                2 => vec!["vm", "restart", name],
                3 => vec!["vm", "kill", name],
                4 => vec!["vm", "delete", name],
                5 => vec![
                    "vm",
                    "exec",
                    name,
                    "--",
                    "sh",
                    "-c",
                    "head -c 300000 /dev/zero | wc -c",
                ],
                // The verbs of a running VM's files and figures, and of a
                // stopped one's resources.
                6 => vec!["vm", "cp", &cp_host, &cp_guest],
                7 => vec!["vm", "cp", &cp_out, &cp_host],
                8 => vec!["vm", "set", name, "--memory", "640"],
                9 => vec!["vm", "stats", name],
                // Guest sessions: started (a name may be taken) and killed.
                10 => vec![
                    "vm", "session", "start", name, "--name", &session, "--", "sleep", "3600",
                ],
                11 => vec!["vm", "session", "kill", name, &session],
                // The warm pool emptied and refilled under the kills.
                12 => vec!["pool", "drain"],
                13 => vec!["pool", "fill"],
                // Snapshots: taken (refused when the name is taken or the VM
                // is not running), restored as a new VM, removed, and that
                // VM deleted again.
                14 => vec!["vm", "snapshot", snap_of, "--name", &new_snap],
                15 => vec!["vm", "restore", &snap, "--name", &restored],
                16 => vec!["snapshot", "rm", &snap],
                17 => vec!["vm", "delete", &restored],
                _ => vec!["vm", "start", name],
            }
        };
        let victim = match rng.below(10) {
            0..=2 => Victim::Client,
            3..=4 => Victim::Daemon,
            5 => Victim::Helper,
            6..=7 => Victim::Vmm,
            _ => Victim::Nobody,
        };
        // Kill points spread over how long the verb usually takes here.
        let slow = matches!(
            verb[1],
            "create" | "start" | "restart" | "drain" | "snapshot" | "restore"
        );
        let delay = Duration::from_millis(rng.below(if slow { 2000 } else { 400 }));
        let t = Instant::now();
        let mut child = c
            .cmd()
            .args(&verb)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut killed = None;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if killed.is_none() && t.elapsed() >= delay {
                killed = Some(c.kill(victim, &mut child, &mut rng));
            }
            if t.elapsed() > COMMAND_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let what = match killed {
            Some(Some(pid)) => {
                *kills.entry(format!("{victim:?}")).or_default() += 1;
                format!("killed {victim:?} ({pid}) at {} ms", delay.as_millis())
            }
            _ => "no kill".into(),
        };
        // Why a command was refused (or failed), in its own words.
        let mut said = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut said);
        }
        let first = said.lines().next().unwrap_or("");
        let why: String = first.trim_start_matches("error: ").chars().take(70).collect();
        let ended = match status {
            None => {
                hung += 1;
                "HUNG".to_string()
            }
            Some(st) if st.success() => "exit 0".to_string(),
            Some(st) => format!(
                "exit {} ({why})",
                st.code().map_or("signal".into(), |c| c.to_string())
            ),
        };
        let v = c.check()?;
        violations += v.len();
        println!(
            "round {round:>3}: {:<40} {what:<34} {ended} {}",
            verb[..verb.len().min(3)].join(" "),
            if v.is_empty() {
                "ok".to_string()
            } else {
                format!("VIOLATIONS: {v:?}")
            }
        );
    }
    // Clean up what the rounds left.
    let _ = c.banger(&["pool", "drain"]);
    for name in VMS {
        let _ = c.banger(&["vm", "delete", name]);
        let _ = c.banger(&["vm", "delete", &format!("{name}-r")]);
        let _ = c.banger(&["snapshot", "rm", &format!("{name}-snap")]);
    }
    let _ = c.banger(&["daemon", "stop"]);
    if let Some(pid) = helper_pid(&c.home.join("helper.sock")) {
        // SAFETY: this run's helper.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    println!(
        "chaos: {rounds} rounds in {:.0} s, kills {kills:?}, hung commands {hung}, violations {violations}",
        started.elapsed().as_secs_f64()
    );
    if violations + hung > 0 {
        bail!("{violations} violations, {hung} hung commands");
    }
    Ok(())
}
