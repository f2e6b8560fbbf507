//! `banger-agent`: runs inside each guest.
//!
//! `banger-agent init` is PID 1 after the initramfs switched to the real
//! root: it sets the hostname, starts `banger-agent serve` and reaps every
//! orphan. `serve` answers the host over vsock, or over the serial
//! channel when the host asks for it (`channel`).

mod bulk;
mod channel;
mod exec;
mod init;
mod inspect;
mod netcfg;
mod procfs;
mod rootdir;
mod seed;
mod sessions;
mod stream;
mod system;
mod tty;

use anyhow::Result;
use banger_proto::methods::agent::{self as a, AGENT_PORT};
use banger_proto::methods::Empty;
use banger_proto::{Router, RpcError};
use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "banger-agent", version, about = "banger's guest agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Act as PID 1.
    Init,
    /// Serve the agent API on vsock.
    Serve {
        #[arg(long, default_value_t = AGENT_PORT)]
        port: u32,
        #[arg(long, default_value = "/var/log/banger-agent.log")]
        log_file: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Init => init::run(),
        Cmd::Serve { port, log_file } => {
            banger_log::init("agent", None, Some(&log_file))?;
            tokio::runtime::Runtime::new()?.block_on(serve(port))
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn router(sessions: Arc<sessions::Sessions>) -> Router {
    let started = Arc::new(Instant::now());
    let (s1, s2, s3, s4, s5, s6) = (
        sessions.clone(),
        sessions.clone(),
        sessions.clone(),
        sessions.clone(),
        sessions.clone(),
        sessions,
    );
    Router::new("agent")
        .heartbeat(a::HEARTBEAT)
        .method::<a::Health, _, _>(move |_, _| {
            let uptime_ms = started.elapsed().as_millis() as u64;
            async move {
                Ok(a::AgentHealth {
                    version: env!("CARGO_PKG_VERSION").into(),
                    hostname: hostname(),
                    uptime_ms,
                })
            }
        })
        .method::<a::Info, _, _>(|_, _| async {
            Ok(a::AgentInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: 2,
                features: vec![
                    a::FEATURE_EXEC_STREAM.into(),
                    a::FEATURE_SESSIONS.into(),
                    a::FEATURE_ROOT.into(),
                    a::FEATURE_USER.into(),
                ],
            })
        })
        .method::<a::SessionStartM, _, _>(move |_, spec| {
            let s = s1.clone();
            async move { s.start(spec).await }
        })
        .method::<a::SessionListM, _, _>(move |_, _| {
            let s = s2.clone();
            async move { Ok(s.list()) }
        })
        .method::<a::SessionSignalM, _, _>(move |_, p| {
            let s = s3.clone();
            async move { s.signal(&p.id, p.signal) }
        })
        .method::<a::SessionStopM, _, _>(move |_, p| {
            let s = s4.clone();
            async move {
                s.stop(&p.id, std::time::Duration::from_millis(p.grace_ms.min(600_000)))
                    .await
            }
        })
        .method::<a::SessionRemoveM, _, _>(move |_, p| {
            let s = s5.clone();
            async move { s.remove(&p.id).map(|_| Empty {}) }
        })
        .method::<a::SessionResizeM, _, _>(move |_, p| {
            let s = s6.clone();
            async move {
                let sess = s.get(&p.id)?;
                sess.resize(p.size);
                Ok(sess.info())
            }
        })
        .method::<a::Exec, _, _>(exec::run)
        .method::<a::Ports, _, _>(|_, _| inspect::ports())
        .method::<a::Stats, _, _>(|_, _| inspect::stats())
        .method::<a::SeedGuest, _, _>(|_, req| async move { seed::apply(req) })
        .method::<a::Sync, _, _>(|_, _| async {
            tokio::task::spawn_blocking(|| {
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() }
            })
            .await
            .map_err(|e| RpcError::failed(e.to_string()))?;
            Ok(Empty {})
        })
        .method::<a::Poweroff, _, _>(|_, _| async {
            tracing::info!("poweroff requested");
            // Answer first; the host treats the VMM's exit as the end.
            tokio::spawn(async {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                init::poweroff();
            });
            Ok(Empty {})
        })
}

/// Tells the host the agent listens (best effort: an old host or one that
/// is not listening simply polls instead).
async fn announce_ready() {
    use tokio::io::AsyncWriteExt;
    let host = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_HOST, a::READY_PORT);
    match tokio_vsock::VsockStream::connect(host).await {
        Ok(mut s) => {
            let _ = s.write_all(b"ready\n").await;
            let _ = s.shutdown(std::net::Shutdown::Write);
            tracing::info!("told the host the agent is ready");
        }
        Err(e) => tracing::debug!(error = %e, "no ready listener on the host"),
    }
}

async fn serve(port: u32) -> Result<()> {
    let sessions = sessions::Sessions::load(std::path::Path::new(sessions::ROOT));
    let router = Arc::new(router(sessions.clone()));
    let serial = channel::requested();
    if serial {
        tokio::spawn(channel::serve(router.clone(), sessions.clone()));
    }
    let listener = match tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        tokio_vsock::VMADDR_CID_ANY,
        port,
    )) {
        Ok(l) => l,
        Err(e) if serial => {
            tracing::info!(error = %e, "no vsock; serving the serial channel only");
            return std::future::pending().await;
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(port, "agent listening on vsock");
    if !serial {
        tokio::spawn(announce_ready());
    }
    tokio::spawn(async {
        if let Err(e) = bulk::serve().await {
            tracing::error!(error = %e, "bulk port failed");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = stream::serve(sessions).await {
            tracing::error!(error = %e, "stream port failed");
        }
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let router = router.clone();
        tokio::spawn(async move {
            tracing::debug!(peer_cid = peer.cid(), "connection");
            // Only the host can reach a guest's vsock; it acts as root here.
            router.serve_stream(stream, 0).await
        });
    }
}
