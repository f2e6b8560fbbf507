//! `bangerd doctor` (run by `banger doctor`): what this host can and cannot
//! do for banger, one check per line with PASS, WARN or FAIL and what to
//! do about it. Read-only: it never migrates the database, never creates a
//! file or directory, never starts the daemon or the helper.

use banger_config::Config;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about a WARN or FAIL.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub worst: Status,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// `prog --version`'s first line, within 5 s.
fn version_of(prog: &Path) -> Option<String> {
    let mut child = std::process::Command::new(prog)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while child.try_wait().ok()?.is_none() {
        if std::time::Instant::now() > end {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

fn kvm() -> Check {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let exists = Path::new("/dev/kvm").exists();
    let usable = banger_vmm::kvm_usable();
    match (exists, opens, usable) {
        (_, _, true) => check(
            "kvm",
            Status::Pass,
            "/dev/kvm opens and the CPU offers hardware virtualisation: a Linux guest runs under KVM",
            "",
        ),
        (true, true, false) => check(
            "kvm",
            Status::Warn,
            "/dev/kvm opens but the CPU offers no VT-x/AMD-V (nested virtualisation without it, e.g. PVM): \
             a stock Linux guest cannot boot under KVM here; banger runs guests under QEMU's software \
             emulation (TCG), correct but several times slower",
            "run banger on a host (or a VM type) with nested hardware virtualisation for KVM speed",
        ),
        (true, false, _) => check(
            "kvm",
            Status::Warn,
            "/dev/kvm exists but this user cannot open it; guests run under software emulation",
            "add the user to the kvm group (or run as root)",
        ),
        (false, _, _) => check(
            "kvm",
            Status::Warn,
            "no /dev/kvm: guests run under QEMU's software emulation (TCG)",
            "load kvm_intel or kvm_amd, or use a host with virtualisation",
        ),
    }
}

fn backend(cfg: &Config) -> Check {
    let fc = cfg
        .firecracker
        .clone()
        .or_else(|| banger_vmm::which("firecracker"));
    let (pick, why) = match cfg.vmm.as_str() {
        "qemu" => ("qemu", "configured (vmm = \"qemu\")".to_string()),
        "firecracker" => ("firecracker", "configured (vmm = \"firecracker\")".to_string()),
        _ => match (fc.is_some(), banger_vmm::kvm_usable()) {
            (true, true) => (
                "firecracker",
                "auto: Firecracker is installed and KVM can run a Linux guest".into(),
            ),
            (true, false) => (
                "qemu",
                "auto: Firecracker is installed but KVM cannot run a Linux guest here".into(),
            ),
            (false, _) => ("qemu", "auto: no Firecracker binary found".into()),
        },
    };
    let status = if pick == "firecracker" && !banger_vmm::kvm_usable() {
        Status::Fail
    } else {
        Status::Pass
    };
    let fix = if status == Status::Fail {
        "Firecracker needs KVM that can run a Linux guest; set vmm = \"auto\" or \"qemu\""
    } else {
        ""
    };
    check("backend", status, format!("{pick} ({why})"), fix)
}

fn binary(name: &'static str, path: Option<PathBuf>, needed: bool, install: &str) -> Check {
    match path {
        Some(p) if banger_vmm::is_executable(&p) => {
            let v = version_of(&p).unwrap_or_else(|| "version unknown".into());
            check(name, Status::Pass, format!("{} ({v})", p.display()), "")
        }
        Some(p) => check(
            name,
            if needed { Status::Fail } else { Status::Warn },
            format!("{} is not an executable file", p.display()),
            install,
        ),
        None => check(
            name,
            if needed { Status::Fail } else { Status::Warn },
            "not found (PATH and the sbin directories)",
            install,
        ),
    }
}

fn host_tools() -> Vec<Check> {
    [
        ("tool:mkfs.ext4", "e2fsprogs", true),
        (
            "tool:debootstrap",
            "debootstrap (only to build the default image)",
            false,
        ),
        ("tool:ip", "iproute2", true),
        ("tool:nft", "nftables", true),
        ("tool:git", "git (workspaces)", false),
        ("tool:ssh", "openssh-client (vm ssh)", false),
    ]
    .into_iter()
    .map(|(name, pkg, needed)| {
        let tool = name.trim_start_matches("tool:");
        match banger_vmm::which(tool) {
            Some(p) => check(name, Status::Pass, p.display().to_string(), ""),
            None => check(
                name,
                if needed { Status::Fail } else { Status::Warn },
                "not found (PATH and the sbin directories)",
                format!("apt-get install {pkg} (scripts/install-deps installs everything)"),
            ),
        }
    })
    .collect()
}

/// Whether something answers `ping` on `sock`, within 2 s.
fn answers(sock: &Path, method: &str) -> Result<String, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let req = format!("{{\"version\":1,\"method\":\"{method}\",\"params\":{{}}}}\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    match (&v["result"], &v["error"]) {
        (r, _) if !r.is_null() => Ok(r.to_string()),
        (_, e) => Err(e["message"].as_str().unwrap_or("no answer").to_string()),
    }
}

fn helper(cfg: &Config) -> Check {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    match answers(&cfg.helper_socket, "priv.ping") {
        Ok(info) => {
            let v: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
            check(
                "helper",
                Status::Pass,
                format!(
                    "{} answers (version {}, pid {}); it serves root and its owner uid only",
                    cfg.helper_socket.display(),
                    v["version"].as_str().unwrap_or("?"),
                    v["pid"]
                ),
                "",
            )
        }
        Err(e) if root => check(
            "helper",
            Status::Pass,
            format!("not running ({e}); banger starts it on demand, since this user is root"),
            "",
        ),
        Err(e) => check(
            "helper",
            Status::Fail,
            format!("{} does not answer: {e}", cfg.helper_socket.display()),
            format!(
                "as root: banger-helper serve --owner-uid {} (it listens on {} by default)",
                // SAFETY: getuid cannot fail.
                unsafe { libc::getuid() },
                banger_config::DEFAULT_HELPER_SOCKET
            ),
        ),
    }
}

fn daemon(cfg: &Config) -> Check {
    let sock = cfg.runtime_dir.join("bangerd.sock");
    match answers(&sock, "ping") {
        Ok(_) => check("daemon", Status::Pass, format!("{} answers", sock.display()), ""),
        Err(e) if cfg.installed.is_some() => check(
            "daemon",
            Status::Fail,
            format!("the installed bangerd does not answer on {}: {e}", sock.display()),
            "sudo banger system status; sudo systemctl start bangerd.service",
        ),
        Err(_) => check(
            "daemon",
            Status::Pass,
            "not running; the CLI starts it on demand",
            "",
        ),
    }
}

fn disk(cfg: &Config) -> Check {
    // The state directory, or the nearest parent that exists.
    let mut p = cfg.state_dir.clone();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return check(
            "disk",
            Status::Warn,
            format!("cannot read free space of {}", p.display()),
            "",
        );
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let gib = free as f64 / (1u64 << 30) as f64;
    let (status, fix) = if gib < 1.0 {
        (Status::Fail, "free space: VMs need room for their disks")
    } else if gib < 10.0 {
        (
            Status::Warn,
            "less than 10 GiB free: an image build and a few VMs may not fit",
        )
    } else {
        (Status::Pass, "")
    };
    check(
        "disk",
        status,
        format!("{gib:.1} GiB free under {}", p.display()),
        fix,
    )
}

/// The database, opened read-only (never migrated), and what it says of
/// the default image and kernel.
fn state(cfg: &Config) -> Vec<Check> {
    let db = cfg.db_path();
    if !db.exists() {
        return vec![check(
            "database",
            Status::Pass,
            format!("{} does not exist yet (made at the first start)", db.display()),
            "",
        )];
    }
    if std::fs::metadata(&db).is_ok_and(|m| m.len() == 0) {
        return vec![check(
            "database",
            Status::Fail,
            format!(
                "{} is empty (0 bytes): the daemon refuses to start on it",
                db.display()
            ),
            "restore it from a backup, or move it away to start from scratch",
        )];
    }
    let store = match banger_store::Store::open_read_only(&db) {
        Ok(s) => s,
        Err(e) => {
            return vec![check(
                "database",
                Status::Fail,
                format!("{} cannot be read: {e}", db.display()),
                "restore it from a backup, or move it away to start from scratch",
            )]
        }
    };
    let mut out = Vec::new();
    match store.schema_version() {
        Ok(0) => {
            return vec![check(
                "database",
                Status::Fail,
                format!("{} holds no banger schema", db.display()),
                "move it away: it is not banger's database",
            )]
        }
        Ok(v) if v > banger_store::schema_latest() => out.push(check(
            "database",
            Status::Fail,
            format!(
                "schema version {v} is newer than this build ({})",
                banger_store::schema_latest()
            ),
            "use a banger at least as new as the one that wrote it",
        )),
        Ok(v) => out.push(check(
            "database",
            Status::Pass,
            format!(
                "{} readable, schema version {v} (this build: {})",
                db.display(),
                banger_store::schema_latest()
            ),
            "",
        )),
        Err(e) => out.push(check(
            "database",
            Status::Fail,
            format!("{}: {e}", db.display()),
            "",
        )),
    }
    match store.get_image("default") {
        Ok(Some(img)) => {
            out.push(file_check(
                "image:default",
                Path::new(&img.rootfs),
                img.digest.as_deref(),
            ));
            out.push(kernel_check(Path::new(&img.kernel)));
        }
        Ok(None) => out.push(check(
            "image:default",
            Status::Warn,
            "not built yet (the first `vm run` builds it, or `banger image build`)",
            "",
        )),
        Err(e) => out.push(check("image:default", Status::Fail, e.to_string(), "")),
    }
    out
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{:x}", h.finalize()))
}

fn file_check(name: &'static str, p: &Path, digest: Option<&str>) -> Check {
    let Ok(m) = std::fs::metadata(p) else {
        return check(
            name,
            Status::Fail,
            format!("{} is missing", p.display()),
            "rebuild it: banger image build",
        );
    };
    // An imported image's digest is its manifest's, not the file's.
    match digest.filter(|d| d.starts_with("sha256:")) {
        Some(want) => match sha256_file(p) {
            Ok(got) if got == want => check(
                name,
                Status::Pass,
                format!("{} ({} MiB), hash intact", p.display(), m.len() >> 20),
                "",
            ),
            Ok(got) if name == "image:default" => check(
                name,
                Status::Fail,
                format!("{} hashes to {got}, recorded {want}", p.display()),
                "the image changed behind banger's back: rebuild it (banger image build --force)",
            ),
            Ok(_) => check(
                name,
                Status::Pass,
                format!("{} ({} MiB)", p.display(), m.len() >> 20),
                "",
            ),
            Err(e) => check(name, Status::Fail, format!("reading {}: {e}", p.display()), ""),
        },
        None => check(
            name,
            Status::Pass,
            format!("{} ({} MiB)", p.display(), m.len() >> 20),
            "",
        ),
    }
}

fn kernel_check(p: &Path) -> Check {
    // A fetched kernel is a directory: vmlinuz, checked against the hash
    // its manifest recorded at fetch time.
    if p.is_dir() {
        let vmlinuz = p.join("vmlinuz");
        let want = std::fs::read(p.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|m| m["sha256"].as_str().map(|h| format!("sha256:{h}")));
        let c = kernel_check(&vmlinuz);
        return match (c.status, want) {
            (Status::Pass, Some(want)) => match sha256_file(&vmlinuz) {
                Ok(got) if got == want => check(
                    "kernel:default",
                    Status::Pass,
                    format!("{}, hash intact", c.detail),
                    "",
                ),
                Ok(got) => check(
                    "kernel:default",
                    Status::Fail,
                    format!("{} hashes to {got}, its manifest says {want}", vmlinuz.display()),
                    "fetch it again: banger kernel fetch",
                ),
                Err(e) => check(
                    "kernel:default",
                    Status::Fail,
                    format!("{}: {e}", vmlinuz.display()),
                    "",
                ),
            },
            _ => c,
        };
    }
    let mut head = [0u8; 0x210];
    let read = std::fs::File::open(p).and_then(|mut f| std::io::Read::read(&mut f, &mut head));
    match read {
        Err(e) => check(
            "kernel:default",
            Status::Fail,
            format!("{}: {e}", p.display()),
            "fetch it again: banger kernel fetch",
        ),
        Ok(n) => {
            let elf = n >= 4 && head[..4] == *b"\x7fELF";
            let bzimage = n >= 0x206 && head[0x202..0x206] == *b"HdrS";
            if elf || bzimage {
                check(
                    "kernel:default",
                    Status::Pass,
                    format!("{} ({})", p.display(), if elf { "ELF" } else { "bzImage" }),
                    "",
                )
            } else {
                check(
                    "kernel:default",
                    Status::Fail,
                    format!("{} is neither an ELF kernel nor a bzImage", p.display()),
                    "fetch it again: banger kernel fetch",
                )
            }
        }
    }
}

fn services(cfg: &Config) -> Check {
    use banger_config::install::{DAEMON_UNIT, HELPER_UNIT};
    let Some(m) = &cfg.installed else {
        return check(
            "services",
            Status::Pass,
            "not installed: single-user mode (the CLI starts the daemon, and the helper as root)",
            "",
        );
    };
    let mut problems = Vec::new();
    for u in [HELPER_UNIT, DAEMON_UNIT] {
        match std::fs::read_to_string(m.unit_dir.join(u)) {
            Ok(text) => {
                let missing = banger_config::units::missing_hardening(u, &text);
                if !missing.is_empty() {
                    problems.push(format!("{u} lacks {}", missing.join(", ")));
                }
            }
            Err(e) => problems.push(format!("{u} unreadable in {}: {e}", m.unit_dir.display())),
        }
    }
    if problems.is_empty() {
        check(
            "services",
            Status::Pass,
            format!(
                "installed for {} (uid {}) under {}: {HELPER_UNIT} and {DAEMON_UNIT} present and hardened",
                m.owner,
                m.owner_uid,
                m.prefix.display()
            ),
            "",
        )
    } else {
        check(
            "services",
            Status::Fail,
            format!("installed for {}, but {}", m.owner, problems.join("; ")),
            "write the units again: sudo banger system install --owner <owner> (idempotent)",
        )
    }
}

/// Every check, in a fixed order.
pub fn run(cfg: &Config) -> Report {
    let mut checks = vec![kvm(), backend(cfg)];
    checks.push(binary(
        "qemu",
        cfg.qemu
            .clone()
            .or_else(|| banger_vmm::which("qemu-system-x86_64")),
        cfg.vmm != "firecracker",
        "apt-get install qemu-system-x86 (scripts/install-deps)",
    ));
    checks.push(binary(
        banger_vmm::qemu::BRIDGE,
        banger_vmm::which(banger_vmm::qemu::BRIDGE),
        cfg.vmm != "firecracker",
        "build the workspace: it ships beside bangerd (cargo build)",
    ));
    checks.push(binary(
        "firecracker",
        cfg.firecracker
            .clone()
            .or_else(|| banger_vmm::which("firecracker")),
        cfg.vmm == "firecracker",
        "optional: a Firecracker release binary, on PATH or as `firecracker` in the config",
    ));
    checks.push(binary(
        "jailer",
        cfg.jailer.clone().or_else(|| banger_vmm::which("jailer")),
        cfg.jailer.is_some(),
        "optional: Firecracker's jailer, set as `jailer` in the config",
    ));
    checks.extend(host_tools());
    checks.push(helper(cfg));
    checks.push(daemon(cfg));
    checks.push(disk(cfg));
    checks.extend(state(cfg));
    checks.push(services(cfg));
    let worst = checks.iter().map(|c| c.status).max().unwrap_or(Status::Pass);
    Report { checks, worst }
}

/// Prints the report (one line per check, or JSON) and returns the exit
/// status: 1 when any check failed.
pub fn print(r: &Report, json: bool) -> i32 {
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
    } else {
        for c in &r.checks {
            let s = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{s}  {:<20} {}", c.name, c.detail);
            if !c.fix.is_empty() {
                println!("      {:<20} → {}", "", c.fix);
            }
        }
    }
    i32::from(r.worst == Status::Fail)
}
