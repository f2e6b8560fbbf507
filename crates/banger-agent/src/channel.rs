//! The agent's streams over the virtio-serial channel, for a VMM whose
//! vsock cannot be snapshotted (QEMU; see `banger-mux`). The host asks for
//! it on the kernel command line with `banger.channel=serial`. Each stream
//! the host opens names its port and reaches the same service a vsock
//! connection to that port would.

use crate::sessions::Sessions;
use banger_mux::session::{self, Mode, Opener};
use banger_proto::methods::agent::{self as a, BULK_PORT};
use banger_proto::stream::STREAM_PORT;
use banger_proto::Router;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Whether the host asked for the serial channel.
pub fn requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|p| p == "banger.channel=serial"))
}

/// The port's device, waiting a little for the driver to announce it.
async fn device(within: Duration) -> Option<PathBuf> {
    let end = Instant::now() + within;
    loop {
        if let Some(p) = banger_mux::port::find(banger_mux::PORT_NAME) {
            return Some(p);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves sessions on the port for as long as the agent runs: a session
/// ends when the host hangs up (a new bridge, or a restore from a
/// snapshot), and the next begins with the next handshake. Processes and
/// guest sessions outlive it; only its streams end.
pub async fn serve(router: Arc<Router>, sessions: Arc<Sessions>) {
    let Some(dev) = device(Duration::from_secs(10)).await else {
        tracing::error!(
            name = banger_mux::PORT_NAME,
            "the host asked for the serial channel but there is no such port"
        );
        return;
    };
    loop {
        let mut port = match banger_mux::port::Port::open(&dev) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(dev = %dev.display(), error = %e, "cannot open the channel");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let early =
            match banger_mux::handshake::guest_seeded(&mut port, Duration::from_millis(10), Some(&mut seed))
                .await
            {
                Ok(early) => early,
                Err(e) => {
                    tracing::warn!(error = %e, "channel handshake");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
        tracing::info!(dev = %dev.display(), "agent channel up");
        let port = banger_mux::handshake::Prefixed::new(early, port);
        let (opener, mut inbound, driver) = session::start(port, Mode::Server);
        let driving = tokio::spawn(driver);
        tokio::spawn(announce_ready(opener));
        while let Some(s) = inbound.recv().await {
            tokio::spawn(dispatch(s, router.clone(), sessions.clone()));
        }
        let ended = driving.await;
        tracing::info!(result = ?ended, "agent channel ended");
    }
}

async fn dispatch(mut s: session::Stream, router: Arc<Router>, sessions: Arc<Sessions>) {
    let Ok(port) = session::read_port(&mut s).await else {
        return;
    };
    let served = matches!(port, a::AGENT_PORT | BULK_PORT | STREAM_PORT);
    if session::answer(&mut s, served).await.is_err() || !served {
        return;
    }
    match port {
        // Only the host can reach the channel; it acts as root here.
        a::AGENT_PORT => router.serve_stream(s, 0).await,
        BULK_PORT => crate::bulk::handle(s).await,
        _ => crate::stream::handle(s, sessions).await,
    }
}

async fn announce_ready(opener: Opener) {
    match opener.open_port(a::READY_PORT, None).await {
        Ok(mut s) => {
            let _ = s.write_all(b"ready\n").await;
            let _ = s.shutdown().await;
            tracing::info!("told the host the agent is ready");
        }
        Err(e) => tracing::debug!(error = %e, "no ready stream"),
    }
}

/// A seed the host gives in the handshake (a guest just restored from a
/// snapshot): applied as `agent.seed` would, under the host's op id, and
/// answered in one line.
fn seed(line: &str) -> String {
    let answer = match serde_json::from_str::<a::HandshakeSeed>(line) {
        Ok(h) => {
            let op = banger_proto::OpId::adopt_or_mint(h.op_id.as_deref());
            let _span = tracing::info_span!("seed", op_id = %op).entered();
            match crate::seed::apply(h.seed) {
                Ok(s) => a::SeedAnswer::Seeded(s),
                Err(e) => a::SeedAnswer::Failed(e.message),
            }
        }
        Err(e) => a::SeedAnswer::Failed(format!("not a seed: {e}")),
    };
    // Whole JSON within the line's limit: a long error is cut, not the line.
    let answer = match answer {
        a::SeedAnswer::Failed(m) if m.len() > 1000 => a::SeedAnswer::Failed(m.chars().take(1000).collect()),
        a => a,
    };
    serde_json::to_string(&answer).expect("serialisable")
}
