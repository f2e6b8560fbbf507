//! Process-level concerns: the single-instance lock, the socket, signals.

use crate::app::{self, App};
use crate::sync::Locked;
use anyhow::{bail, Context, Result};
use banger_config::{ensure_private_dir, Config};
use banger_store::Store;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub async fn run(cfg: Config) -> Result<()> {
    ensure_private_dir(&cfg.state_dir, 0o700)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    ensure_private_dir(&cfg.runtime_dir, 0o700)
        .with_context(|| format!("creating {}", cfg.runtime_dir.display()))?;

    // One daemon per runtime dir. The lock dies with the process, so a
    // daemon killed with -9 never blocks its successor.
    let pid_path = cfg.daemon_pid_file();
    let mut pid_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&pid_path)
        .with_context(|| format!("opening {}", pid_path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(pid_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another bangerd already runs for {}", cfg.runtime_dir.display());
    }
    pid_file.set_len(0)?;
    writeln!(pid_file, "{}", std::process::id())?;

    let store =
        Store::open(&cfg.db_path()).with_context(|| format!("opening {}", cfg.db_path().display()))?;
    let socket = cfg.daemon_socket();
    let _ = std::fs::remove_file(&socket);
    let listener =
        tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;

    let shutdown = CancellationToken::new();
    let app = App::new(cfg, store, shutdown.clone());
    let router = Arc::new(app::router(&app));

    // Adopt what still runs, finish or undo what a killed daemon left
    // half done, before serving: all under one op id.
    banger_proto::opid::run_as(banger_proto::OpId::mint(), "reconcile", app.vms.reconcile()).await;
    if !app.cfg.dns_listen.is_empty() {
        match app.cfg.dns_listen.parse::<std::net::SocketAddr>() {
            Ok(addr) => match crate::dns::bind(addr).await {
                Ok((sock, local)) => {
                    *app.dns_addr.locked() = Some(local);
                    let vms = app.vms.clone();
                    let lookup: crate::dns::Lookup = Arc::new(move |name: &str| vms.resolve(name));
                    let stop = shutdown.clone();
                    // The first socket is bound here (so a bad address fails
                    // loudly); a restart after a crash binds the same address.
                    let first = std::sync::Mutex::new(Some(sock));
                    supervise("dns server", shutdown.clone(), move || {
                        let (lookup, stop) = (lookup.clone(), stop.clone());
                        let sock = first.locked().take();
                        async move {
                            let sock = match sock {
                                Some(s) => s,
                                None => crate::dns::bind(local).await.map(|(s, _)| s)?,
                            };
                            crate::dns::serve(sock, lookup, stop).await
                        }
                    });
                }
                Err(e) => tracing::warn!(%addr, error = %e, "DNS server not started"),
            },
            Err(_) => {
                tracing::warn!(addr = %app.cfg.dns_listen, "dns_listen is not an address; DNS server not started")
            }
        }
    }
    // The warm pool, kept full in the background (after reconcile, which
    // adopted or tore down the pool VMs a killed daemon left).
    let keeper = app.vms.clone();
    let keeper_stop = shutdown.clone();
    supervise("warm pool", shutdown.clone(), move || {
        let (keeper, stop) = (keeper.clone(), keeper_stop.clone());
        async move {
            keeper.pool_keeper(stop).await;
            Ok(())
        }
    });
    // A Firecracker process started ahead of the next VM's start (after
    // reconcile, which removed the one a killed daemon left).
    // Not supervised: it must end with the daemon, its spare stopped.
    let spare_keeper = app
        .vms
        .spare_wanted()
        .then(|| tokio::spawn(app.vms.clone().spare_keeper(shutdown.clone())));
    let watcher = app.clone();
    let watch_stop = shutdown.clone();
    supervise("vm watcher", shutdown.clone(), move || {
        let (watcher, watch_stop) = (watcher.clone(), watch_stop.clone());
        async move {
            let mut last_idle_pass = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = watch_stop.cancelled() => return Ok(()),
                    // A VMM that dies is noticed within a second.
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => watcher.vms.reap_dead().await,
                }
                if last_idle_pass.elapsed() >= crate::vm::IDLE_SAMPLE_EVERY {
                    last_idle_pass = std::time::Instant::now();
                    watcher.vms.stop_idle().await;
                }
            }
        }
    });

    banger_proto::server::cancel_on_signals(shutdown.clone());

    tracing::info!(socket = %socket.display(), pid = std::process::id(), "bangerd listening");
    router.serve(listener, shutdown).await;
    if let Some(k) = spare_keeper {
        // A spare being started is finished, then stopped (its wait for
        // the API socket is bounded).
        if tokio::time::timeout(std::time::Duration::from_secs(15), k)
            .await
            .is_err()
        {
            tracing::warn!("the spare Firecracker may still run");
        }
    }
    // States answered before their sync (a start's `running`) reach the
    // disk before the daemon goes.
    if !app.store.wait_synced(std::time::Duration::from_secs(5)) {
        tracing::warn!("the store's last states may not be on disk");
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("bangerd stopped");
    drop(pid_file);
    Ok(())
}

/// Runs a long-lived background task and starts it again if it fails or
/// panics (after a pause, so a task that fails at once cannot spin), until
/// `shutdown`.
fn supervise<F, Fut>(what: &'static str, shutdown: CancellationToken, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let outcome = tokio::spawn(make()).await;
            if shutdown.is_cancelled() {
                return;
            }
            match outcome {
                Ok(Ok(())) => tracing::warn!("{what} stopped; starting it again"),
                Ok(Err(e)) => tracing::error!(error = %e, "{what} failed; starting it again"),
                Err(e) => tracing::error!(error = %e, "{what} panicked; starting it again"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    });
}
