//! Hybrid vsock, host side: connect to the VMM's Unix socket and ask for a
//! guest port (`CONNECT <port>\n` → `OK <host port>\n`). Firecracker and
//! vhost-device-vsock speak the same protocol.

use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("connecting to {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("vsock handshake for port {port} failed: {detail}")]
    Handshake { port: u32, detail: String },
    #[error("guest port {port} not reachable within {secs} s: {last}")]
    Timeout { port: u32, secs: u64, last: String },
}

/// One connection attempt.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|source| VsockError::Connect {
            path: uds.display().to_string(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| VsockError::Handshake {
            port,
            detail: e.to_string(),
        })?;
    // Read the reply byte by byte: anything after the newline is the
    // guest's and must stay in the stream.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b))
            .await
            .map_err(|_| VsockError::Handshake {
                port,
                detail: "no reply".into(),
            })?
            .map_err(|e| VsockError::Handshake {
                port,
                detail: e.to_string(),
            })?;
        if n == 0 {
            return Err(VsockError::Handshake {
                port,
                detail: "closed (nothing listens on that port yet)".into(),
            });
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(VsockError::Handshake {
                port,
                detail: "reply too long".into(),
            });
        }
    }
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(s)
    } else {
        Err(VsockError::Handshake {
            port,
            detail: format!("unexpected reply {line:?}"),
        })
    }
}

/// Retries [`connect`] until it succeeds or `deadline` passes, as long as
/// `still_alive` says the VM is worth waiting for.
pub async fn connect_with_retry(
    uds: &Path,
    port: u32,
    deadline: Duration,
    mut still_alive: impl FnMut() -> bool,
) -> Result<UnixStream, VsockError> {
    let end = Instant::now() + deadline;
    let mut last = String::from("not tried");
    let mut delay = Duration::from_millis(1);
    while Instant::now() < end {
        match connect(uds, port).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
        if !still_alive() {
            return Err(VsockError::Timeout {
                port,
                secs: 0,
                last: format!("the VMM exited ({last})"),
            });
        }
        // Poll fast at first (a microVM can be up in ~10 ms), then back off.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(25));
    }
    Err(VsockError::Timeout {
        port,
        secs: deadline.as_secs(),
        last,
    })
}
