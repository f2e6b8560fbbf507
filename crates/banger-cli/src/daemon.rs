//! Finding the daemon, and starting it (and, for root, the helper) when it
//! is not running.

use anyhow::{bail, Context, Result};
use banger_config::{Config, InstallManifest};
use banger_proto::methods::{daemon as d, helper as h, Empty};
use banger_proto::Client;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const START_DEADLINE: Duration = Duration::from_secs(15);

/// A sibling binary of this executable, else one in the private binary
/// directory of its installation, else the name for a PATH lookup.
pub fn sibling(name: &str) -> PathBuf {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    exe_dir
        .into_iter()
        .chain(InstallManifest::current().map(|m| m.libexec_dir))
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn spawn_detached(cmd: &mut Command, log: &std::path::Path) -> Result<std::process::Child> {
    std::fs::create_dir_all(log.parent().unwrap_or(std::path::Path::new(".")))?;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our
    // terminal so Ctrl-C here never reaches the daemon.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// The last `n` lines of a log file, for an error message.
fn log_tail(log: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Waits for a process this command started to answer. If it exits
/// first, says so at once, with its status and the last lines it wrote.
async fn wait_until<F, Fut>(
    what: &str,
    child: &mut std::process::Child,
    log: &std::path::Path,
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + START_DEADLINE;
    while Instant::now() < deadline {
        if ready().await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited at start ({status}); its last words ({}):\n{}",
                log.display(),
                log_tail(log, 8)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "{what} did not become ready within {}s; see {}",
        START_DEADLINE.as_secs(),
        log.display()
    )
}

/// Waits (bounded) until no daemon answers on the socket.
pub async fn wait_gone(cfg: &Config) -> Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    while running(cfg).await.is_some() {
        if Instant::now() > deadline {
            bail!(
                "bangerd is still running {}s after it was asked to stop",
                START_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn ensure_helper(cfg: &Config) -> Result<()> {
    let helper = Client::new(cfg.helper_socket.clone());
    if helper.call::<h::Ping>(&Empty {}, None).await.is_ok() {
        return Ok(());
    }
    let log = cfg.log_dir().join("helper.log");
    let mut child = spawn_detached(
        Command::new(sibling("banger-helper"))
            .arg("serve")
            .arg("--socket")
            .arg(&cfg.helper_socket)
            .arg("--owner-uid")
            .arg("0")
            .arg("--log-file")
            .arg(&log),
        &log,
    )?;
    wait_until("banger-helper", &mut child, &log, || async {
        helper.call::<h::Ping>(&Empty {}, None).await.is_ok()
    })
    .await
}

/// The installed service, which this command never starts itself: says
/// why it cannot be reached and what to do.
async fn connect_installed(cfg: &Config, m: &InstallManifest) -> Result<Client> {
    let client = Client::new(cfg.daemon_socket());
    match client.call::<d::Ping>(&Empty {}, None).await {
        Ok(_) => Ok(client),
        Err(banger_proto::ClientError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            bail!(
                "permission denied on {}: this banger is installed for {} (uid {}); \
                 only that user (and root) may use its daemon",
                cfg.daemon_socket().display(),
                m.owner,
                m.owner_uid
            )
        }
        Err(e) => bail!(
            "the installed bangerd (owner {}) does not answer on {}: {e}; \
             check `sudo banger system status` and start it with \
             `sudo systemctl start {}`",
            m.owner,
            cfg.daemon_socket().display(),
            banger_config::install::DAEMON_UNIT
        ),
    }
}

/// A client for a running daemon, starting one if needed (never for an
/// installation: its services are systemd's to start).
pub async fn connect(cfg: &Config) -> Result<Client> {
    if let Some(m) = &cfg.installed {
        return connect_installed(cfg, m).await;
    }
    let autostart = std::env::var("BANGER_HELPER_AUTOSTART")
        .map(|v| v != "0")
        .unwrap_or(true);
    // SAFETY: getuid cannot fail.
    if autostart && unsafe { libc::getuid() } == 0 {
        // Single-user setup: root runs the helper itself, and brings it
        // back if it went away while the daemon kept running.
        ensure_helper(cfg).await.context("starting the root helper")?;
    }
    let client = Client::new(cfg.daemon_socket());
    if client.call::<d::Ping>(&Empty {}, None).await.is_ok() {
        return Ok(client);
    }
    let log = cfg.log_dir().join("bangerd.out");
    let mut child = spawn_detached(&mut Command::new(sibling("bangerd")), &log)?;
    wait_until("bangerd", &mut child, &log, || async {
        client.call::<d::Ping>(&Empty {}, None).await.is_ok()
    })
    .await?;
    Ok(client)
}

/// A client for the daemon only if it already runs.
pub async fn running(cfg: &Config) -> Option<Client> {
    let client = Client::new(cfg.daemon_socket());
    client.call::<d::Ping>(&Empty {}, None).await.ok().map(|_| client)
}

/// A bangerd of this installation started for one job (e.g. `system
/// install` making the default image as root) with its own environment
/// and socket; the caller shuts it down.
pub async fn start_private(
    bangerd: &std::path::Path,
    env: &[(&str, &std::ffi::OsStr)],
    socket: &std::path::Path,
    log: &std::path::Path,
) -> Result<(std::process::Child, Client)> {
    let mut cmd = Command::new(bangerd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = spawn_detached(&mut cmd, log)?;
    let client = Client::new(socket.to_path_buf());
    wait_until("bangerd", &mut child, log, || async {
        client.call::<d::Ping>(&Empty {}, None).await.is_ok()
    })
    .await?;
    Ok((child, client))
}
