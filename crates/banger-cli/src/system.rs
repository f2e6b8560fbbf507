//! `banger system install|uninstall|status|restart`: banger as two system
//! services, the root helper and the owner's daemon, with the binaries
//! under a prefix and one system-wide default image.
//!
//! Every step is idempotent, so an install stopped at any line is finished
//! by running it again; the manifest, written after the binaries and units,
//! is what makes an installation one.

use crate::daemon;
use crate::output::print;
use anyhow::{bail, Context, Result};
use banger_config::install::{InstallManifest, DAEMON_UNIT, HELPER_UNIT};
use banger_config::units;
use banger_proto::methods::{daemon as d, helper as h, Empty};
use banger_proto::Client;
use clap::{Args, Subcommand};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Subcommand)]
pub enum SystemCmd {
    /// Install banger as system services for one user: the root helper and
    /// that user's daemon (run as root).
    Install(InstallArgs),
    /// Remove the services, binaries and manifest; `--purge` also the state
    /// (images, VMs, database) and logs.
    Uninstall {
        /// Where it was installed (default: this banger's installation,
        /// else /usr/local).
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Also delete the state directory and the helper's logs.
        #[arg(long)]
        purge: bool,
        /// Stop (kill) VMs that still run instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Whether the installed services run and answer.
    Status {
        #[arg(long)]
        prefix: Option<PathBuf>,
    },
    /// Restart the daemon (running VMs keep running and are adopted);
    /// `--helper` restarts the root helper too.
    Restart {
        #[arg(long)]
        prefix: Option<PathBuf>,
        #[arg(long)]
        helper: bool,
    },
}

#[derive(Args)]
pub struct InstallArgs {
    /// The user whose daemon this is; only that user (and root) may use it.
    #[arg(long)]
    owner: String,
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    #[arg(long, default_value = "/var/lib/banger")]
    state_dir: PathBuf,
    #[arg(long, default_value = "/run/banger")]
    runtime_dir: PathBuf,
    #[arg(long, default_value = banger_proto::names::DEFAULT_HELPER_SOCKET)]
    helper_socket: PathBuf,
    /// The helper's log directory (root's, readable by the owner's group).
    #[arg(long, default_value = "/var/log/banger")]
    log_dir: PathBuf,
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Make the default image from this bundle (`banger image export`)
    /// instead of building it from Debian.
    #[arg(long, conflicts_with = "no_image")]
    image_bundle: Option<PathBuf>,
    /// Leave the default image to be made later (by root: the owner's
    /// daemon cannot run debootstrap).
    #[arg(long)]
    no_image: bool,
    /// Write everything but start nothing.
    #[arg(long)]
    no_start: bool,
}

/// What `system install` did.
#[derive(serde::Serialize)]
struct Installed {
    manifest: PathBuf,
    units: Vec<PathBuf>,
    binaries: Vec<PathBuf>,
    default_image: Option<String>,
    started: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

struct User {
    uid: u32,
    gid: u32,
    group: String,
}

fn lookup_user(name: &str) -> Result<User> {
    let c = CString::new(name).context("a user name has no NUL")?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read
    // at once; this process has no other thread calling it.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        bail!("no user {name:?} on this host");
    }
    // SAFETY: non-NULL from getpwnam, as above.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    // SAFETY: getgrgid, as getpwnam above.
    let gr = unsafe { libc::getgrgid(gid) };
    let group = if gr.is_null() {
        gid.to_string()
    } else {
        // SAFETY: gr_name is a NUL-terminated string in static storage.
        unsafe { std::ffi::CStr::from_ptr((*gr).gr_name) }
            .to_string_lossy()
            .into_owned()
    };
    Ok(User { uid, gid, group })
}

fn group_exists(name: &str) -> bool {
    let c = CString::new(name).expect("a constant name");
    // SAFETY: as in lookup_user.
    !unsafe { libc::getgrnam(c.as_ptr()) }.is_null()
}

/// Copies `src` to `dst` through a temporary file and a rename, so a
/// binary that runs is replaced, never rewritten in place.
fn install_file(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let tmp = dst.with_extension("banger-new");
    std::fs::copy(src, &tmp).with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::os::unix::fs::chown(&tmp, Some(0), Some(0))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("installing {}", dst.display()))
}

fn write_file(dst: &Path, text: &str, mode: u32) -> Result<()> {
    let tmp = dst.with_extension("banger-new");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("writing {}", dst.display()))
}

/// `dir` made (with parents) and given `mode`, `uid` and `gid`.
fn own_dir(dir: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Gives everything under `dir` to `uid:gid`, never following a symlink.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for e in std::fs::read_dir(dir)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The binaries an installation ships: (name, where it comes from).
fn sources() -> Result<Vec<(&'static str, PathBuf)>> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut out = vec![("banger", exe)];
    for name in ["bangerd", "banger-helper", "banger-agent", "banger-vsock-bridge"] {
        let p = daemon::sibling(name);
        if !p.is_file() {
            bail!(
                "{name} is not beside this banger ({}); build the workspace first",
                p.display()
            );
        }
        out.push((name, p));
    }
    Ok(out)
}

/// Man pages and bash's completion registration, made by the installed
/// binary itself so both name it.
fn docs(prefix: &Path) -> Result<()> {
    let banger = prefix.join("bin/banger");
    let man = prefix.join("share/man/man1");
    let st = Command::new(&banger)
        .arg("man")
        .arg("-o")
        .arg(&man)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("writing man pages into {} failed ({st})", man.display());
    }
    let out = Command::new(&banger).args(["completions", "bash"]).output()?;
    if !out.status.success() {
        bail!("making bash completions failed ({})", out.status);
    }
    let dir = prefix.join("share/bash-completion/completions");
    std::fs::create_dir_all(&dir)?;
    write_file(&dir.join("banger"), &String::from_utf8_lossy(&out.stdout), 0o644)
}

/// What [`docs`] wrote.
fn remove_docs(prefix: &Path) -> Result<()> {
    remove(&prefix.join("share/bash-completion/completions/banger"))?;
    let man = prefix.join("share/man/man1");
    for e in std::fs::read_dir(&man).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if (n == "banger.1" || n.starts_with("banger-")) && n.ends_with(".1") {
            remove(&e.path())?;
        }
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<()> {
    let st = Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl")?;
    if !st.success() {
        bail!("systemctl {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// The default image made once, system-wide: by the installed daemon when
/// it already answers (a re-install), else by a bangerd of this install
/// run as root for the occasion (debootstrap needs root) on a private
/// socket, then given to the owner.
async fn default_image(a: &InstallArgs, m: &InstallManifest) -> Result<Option<String>> {
    if a.no_image {
        return Ok(None);
    }
    let running = Client::new(m.runtime_dir.join("bangerd.sock"));
    let (client, mut temp) = if running.call::<d::Ping>(&Empty {}, None).await.is_ok() {
        (running, None)
    } else {
        let scratch = scratch_dir()?;
        let (child, client) = daemon::start_private(
            &m.libexec_dir.join("bangerd"),
            &[
                ("BANGER_HOME", m.state_dir.as_os_str()),
                ("BANGER_RUNTIME_DIR", scratch.as_os_str()),
                ("BANGER_HELPER_SOCKET", scratch.join("no-helper.sock").as_os_str()),
                ("BANGER_HELPER_AUTOSTART", "0".as_ref()),
                ("BANGER_DNS_LISTEN", "".as_ref()),
            ],
            &scratch.join("bangerd.sock"),
            &scratch.join("bangerd.out"),
        )
        .await?;
        (client, Some((child, scratch)))
    };
    let progress = |p: d::Progress| eprintln!("  [{:>6.1}s] {}", p.elapsed_ms as f64 / 1000.0, p.stage);
    let existing = client
        .call::<d::ImageShow>(
            &d::NameRef {
                name: "default".into(),
            },
            None,
        )
        .await
        .ok();
    let result = match (&a.image_bundle, existing) {
        // A re-install (an upgrade) keeps the default image it has (the
        // daemon rebuilds one of its own making when its recipe changes);
        // `banger image delete default` first to replace it.
        (_, Some(i)) => {
            eprintln!("keeping the default image there is ({})", i.source);
            Ok(i)
        }
        (Some(b), None) => {
            let src = std::path::absolute(b)?.display().to_string();
            let pull = d::ImagePull {
                src,
                name: Some("default".to_string()),
                ..Default::default()
            };
            client.call::<d::ImagePullM>(&pull, None).await
        }
        (None, None) => {
            let req = d::ImageBuild {
                name: "default".to_string(),
                ..Default::default()
            };
            client
                .call_with_events::<d::ImageBuildM>(&req, None, progress)
                .await
        }
    };
    if let Some((mut child, scratch)) = temp.take() {
        let _ = client.call::<d::Shutdown>(&Empty {}, None).await;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        let _ = std::fs::remove_dir_all(&scratch);
    }
    // Whatever the daemon run as root made (database, image, kernel, logs)
    // is the owner's, on success or not.
    chown_tree(&m.state_dir, m.owner_uid, m.owner_gid)?;
    let info = result.context("making the default image")?;
    Ok(Some(info.rootfs))
}

/// A scratch directory of root's (mode 0700) under the temporary directory,
/// for the socket of the bangerd that makes the default image; removed by
/// the caller.
fn scratch_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("banger-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    own_dir(&dir, 0o700, 0, 0)?;
    Ok(dir)
}

fn check_paths(a: &InstallArgs) -> Result<()> {
    for (what, p) in [
        ("--prefix", &a.prefix),
        ("--state-dir", &a.state_dir),
        ("--runtime-dir", &a.runtime_dir),
        ("--helper-socket", &a.helper_socket),
        ("--log-dir", &a.log_dir),
        ("--unit-dir", &a.unit_dir),
    ] {
        if !units::unit_safe(p) {
            bail!(
                "{what} {}: must be an absolute path without whitespace, quotes, `%`, `$` or `;` \
                 (systemd would split or expand it)",
                p.display()
            );
        }
    }
    Ok(())
}

async fn install(a: InstallArgs, json: bool) -> Result<()> {
    if !is_root() {
        bail!("system install needs root: run it with sudo");
    }
    check_paths(&a)?;
    let user = lookup_user(&a.owner)?;
    if user.uid == 0 {
        bail!("the owner must be an ordinary user: root uses banger without installing it");
    }
    let srcs = sources()?;
    let libexec = a.prefix.join("lib/banger");
    let m = InstallManifest {
        version: env!("CARGO_PKG_VERSION").to_string(),
        owner: a.owner.clone(),
        owner_uid: user.uid,
        owner_gid: user.gid,
        prefix: a.prefix.clone(),
        libexec_dir: libexec.clone(),
        state_dir: a.state_dir.clone(),
        runtime_dir: a.runtime_dir.clone(),
        helper_socket: a.helper_socket.clone(),
        unit_dir: a.unit_dir.clone(),
    };

    // Binaries: root's, world-readable, replaced by rename.
    own_dir(&a.prefix.join("bin"), 0o755, 0, 0)?;
    own_dir(&libexec, 0o755, 0, 0)?;
    let mut binaries = Vec::new();
    for (name, src) in &srcs {
        let dst = if *name == "banger" {
            a.prefix.join("bin/banger")
        } else {
            libexec.join(name)
        };
        install_file(src, &dst, 0o755)?;
        binaries.push(dst);
    }

    docs(&a.prefix)?;

    // The owner's state and sockets; the helper's log, root's but
    // readable by the owner's group (to grep an op id).
    own_dir(&a.state_dir, 0o750, user.uid, user.gid)?;
    own_dir(&a.runtime_dir, 0o700, user.uid, user.gid)?;
    own_dir(&a.log_dir, 0o750, 0, user.gid)?;
    let helper_log = a.log_dir.join("helper.log");
    if !helper_log.exists() {
        std::fs::File::create(&helper_log)?;
    }
    std::os::unix::fs::chown(&helper_log, Some(0), Some(user.gid))?;
    std::fs::set_permissions(&helper_log, std::fs::Permissions::from_mode(0o640))?;

    // Units.
    own_dir(&a.unit_dir, 0o755, 0, 0)?;
    let helper_unit = a.unit_dir.join(HELPER_UNIT);
    let daemon_unit = a.unit_dir.join(DAEMON_UNIT);
    write_file(&helper_unit, &units::helper_unit(&m, &a.log_dir), 0o644)?;
    write_file(
        &daemon_unit,
        &units::daemon_unit(&m, &user.group, group_exists("kvm")),
        0o644,
    )?;

    // Last: the manifest makes it an installation.
    write_file(&m.path(), &m.to_toml(), 0o644)?;

    let default_image = default_image(&a, &m).await?;

    let started = !a.no_start && systemd_runs();
    if started {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "--now", HELPER_UNIT, DAEMON_UNIT])?;
        let c = Client::new(m.runtime_dir.join("bangerd.sock"));
        banger_wait_ping(&c).await?;
    }
    let out = Installed {
        manifest: m.path(),
        units: vec![helper_unit, daemon_unit],
        binaries,
        default_image,
        started,
    };
    print(json, &out, |o| {
        println!(
            "installed banger {} for {} under {}",
            m.version,
            m.owner,
            m.prefix.display()
        );
        println!("manifest: {}", o.manifest.display());
        for u in &o.units {
            println!("unit:     {}", u.display());
        }
        match &o.default_image {
            Some(i) => println!("default image: {i}"),
            None => println!("default image: not made (--no-image)"),
        }
        if o.started {
            println!("services started; {} can now run `banger vm run`", m.owner);
        } else if a.no_start {
            println!("not started (--no-start)");
        } else {
            println!(
                "systemd does not run here: start `{} serve …` as root and `{}` as {} \
                 (the units' ExecStart lines)",
                m.libexec_dir.join("banger-helper").display(),
                m.libexec_dir.join("bangerd").display(),
                m.owner
            );
        }
    });
    Ok(())
}

async fn banger_wait_ping(c: &Client) -> Result<()> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if c.call::<d::Ping>(&Empty {}, None).await.is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > end {
            bail!("bangerd did not answer on {} within 15 s", c.path().display());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The installation to act on: `--prefix`'s, else this banger's, else
/// /usr/local's.
fn find(prefix: Option<PathBuf>) -> Result<InstallManifest> {
    let exe = match prefix {
        Some(p) => p.join("bin/banger"),
        None => match InstallManifest::current() {
            Some(m) => return Ok(m),
            None => PathBuf::from("/usr/local/bin/banger"),
        },
    };
    InstallManifest::for_exe(&exe)
        .map(|(_, m)| m)
        .with_context(|| format!("no banger installation beside {}", exe.display()))
}

async fn uninstall(prefix: Option<PathBuf>, purge: bool, force: bool) -> Result<()> {
    if !is_root() {
        bail!("system uninstall needs root: run it with sudo");
    }
    let m = find(prefix)?;
    let c = Client::new(m.runtime_dir.join("bangerd.sock"));
    if c.call::<d::Ping>(&Empty {}, None).await.is_ok() {
        let vms = c.call::<d::VmList>(&Empty {}, None).await?;
        let live: Vec<_> = vms.into_iter().filter(|v| v.pid.is_some()).collect();
        if !live.is_empty() && !force {
            bail!(
                "{} VM(s) still run ({}): stop them first, or pass --force to kill them",
                live.len(),
                live.iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for v in live {
            c.call::<d::VmKill>(&d::VmRef { name: v.name.clone() }, None)
                .await
                .with_context(|| format!("killing VM {}", v.name))?;
        }
    }
    if systemd_runs() {
        // Units already gone (a second uninstall) are fine.
        let _ = systemctl(&["disable", "--now", DAEMON_UNIT, HELPER_UNIT]);
    } else if c.call::<d::Ping>(&Empty {}, None).await.is_ok() {
        c.call::<d::Shutdown>(&Empty {}, None).await?;
    }
    // Read before its unit goes.
    let log_dir = helper_log_dir(&m);
    for u in [HELPER_UNIT, DAEMON_UNIT] {
        remove(&m.unit_dir.join(u))?;
    }
    if systemd_runs() {
        let _ = systemctl(&["daemon-reload"]);
    }
    remove(&m.prefix.join("bin/banger"))?;
    remove_docs(&m.prefix)?;
    // The manifest goes with the private directory: from here on this is
    // not an installation.
    if m.libexec_dir.exists() {
        std::fs::remove_dir_all(&m.libexec_dir)
            .with_context(|| format!("removing {}", m.libexec_dir.display()))?;
    }
    let _ = std::fs::remove_dir_all(&m.runtime_dir);
    if purge {
        for d in [&m.state_dir] {
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
        if let Some(log_dir) = log_dir {
            let _ = std::fs::remove_dir_all(log_dir);
        }
        println!("uninstalled banger; state and logs deleted");
    } else {
        println!(
            "uninstalled banger; state kept in {} (--purge deletes it)",
            m.state_dir.display()
        );
    }
    Ok(())
}

/// The helper's log directory, read back from its unit (it is not in the
/// manifest: only the helper writes there).
fn helper_log_dir(m: &InstallManifest) -> Option<PathBuf> {
    let text = std::fs::read_to_string(m.unit_dir.join(HELPER_UNIT)).ok()?;
    let exec = text.lines().find(|l| l.starts_with("ExecStart="))?;
    let log = exec
        .split_whitespace()
        .skip_while(|w| *w != "--log-file")
        .nth(1)?;
    Path::new(log).parent().map(Path::to_path_buf)
}

fn remove(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

#[derive(serde::Serialize)]
struct Status {
    owner: String,
    version: String,
    manifest: PathBuf,
    units_present: bool,
    missing_hardening: Vec<String>,
    systemd: bool,
    helper: Service,
    daemon: Service,
}

/// Whether one installed service answers, and what it said (or why not).
#[derive(serde::Serialize)]
struct Service {
    up: bool,
    detail: String,
}

impl From<Result<String, String>> for Service {
    fn from(r: Result<String, String>) -> Self {
        match r {
            Ok(detail) => Service { up: true, detail },
            Err(detail) => Service { up: false, detail },
        }
    }
}

async fn status(prefix: Option<PathBuf>, json: bool) -> Result<i32> {
    let m = find(prefix)?;
    let mut missing = Vec::new();
    let mut present = true;
    for u in [HELPER_UNIT, DAEMON_UNIT] {
        match std::fs::read_to_string(m.unit_dir.join(u)) {
            Ok(t) => missing.extend(
                units::missing_hardening(u, &t)
                    .into_iter()
                    .map(|k| format!("{u}: {k}")),
            ),
            Err(_) => present = false,
        }
    }
    let helper = Client::new(m.helper_socket.clone())
        .call::<h::Ping>(&Empty {}, None)
        .await
        .map(|p| format!("helper {} answers on {}", p.version, m.helper_socket.display()))
        .map_err(|e| e.to_string());
    let daemon = Client::new(m.runtime_dir.join("bangerd.sock"))
        .call::<d::Ping>(&Empty {}, None)
        .await
        .map(|p| format!("bangerd {} answers, pid {}", p.version, p.pid))
        .map_err(|e| e.to_string());
    let s = Status {
        owner: m.owner.clone(),
        version: m.version.clone(),
        manifest: m.path(),
        units_present: present,
        missing_hardening: missing,
        systemd: systemd_runs(),
        helper: helper.into(),
        daemon: daemon.into(),
    };
    let ok = s.units_present && s.missing_hardening.is_empty() && s.helper.up && s.daemon.up;
    print(json, &s, |s| {
        println!(
            "banger {} installed for {} ({})",
            s.version,
            s.owner,
            s.manifest.display()
        );
        println!(
            "units:  {}",
            if !s.units_present {
                "missing".to_string()
            } else if s.missing_hardening.is_empty() {
                "present, hardened".to_string()
            } else {
                format!("present, lacking {}", s.missing_hardening.join(", "))
            }
        );
        for (what, r) in [("helper", &s.helper), ("daemon", &s.daemon)] {
            let state = if r.up { "" } else { "DOWN: " };
            println!("{what}: {state}{}", r.detail);
        }
    });
    Ok(if ok { 0 } else { 3 })
}

async fn restart(prefix: Option<PathBuf>, helper: bool) -> Result<()> {
    if !is_root() {
        bail!("system restart needs root: run it with sudo");
    }
    let m = find(prefix)?;
    if !systemd_runs() {
        bail!("systemd does not run here: nothing to restart the services with");
    }
    if helper {
        systemctl(&["restart", HELPER_UNIT])?;
    }
    // KillMode=process: only bangerd goes; the next one adopts the VMs.
    systemctl(&["restart", DAEMON_UNIT])?;
    banger_wait_ping(&Client::new(m.runtime_dir.join("bangerd.sock"))).await?;
    println!(
        "restarted {}",
        if helper {
            "the helper and the daemon"
        } else {
            "the daemon"
        }
    );
    Ok(())
}

pub async fn run(cmd: SystemCmd, json: bool) -> Result<i32> {
    match cmd {
        SystemCmd::Install(a) => install(a, json).await?,
        SystemCmd::Uninstall { prefix, purge, force } => uninstall(prefix, purge, force).await?,
        SystemCmd::Status { prefix } => return status(prefix, json).await,
        SystemCmd::Restart { prefix, helper } => restart(prefix, helper).await?,
    }
    Ok(0)
}
