//! Hybrid vsock, host side: connect to the VMM's Unix socket and ask for a
//! guest port (`CONNECT <port>\n` → `OK <host port>\n`). Firecracker and
//! vhost-device-vsock speak the same protocol.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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

/// Removes the sockets of guest-initiated connections in the VM directory
/// `dir` (`vsock.sock_<port>`, see [`crate::Launched::vsock_uds`]): a VMM
/// leaves them behind, and a listener cannot bind over a stale one.
pub fn remove_port_sockets(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("vsock.sock_") {
            let _ = std::fs::remove_file(e.path());
        }
    }
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

/// How many bytes read from the guest before one acknowledgement byte goes
/// back. Well under the 256 KiB window a guest gets from a vhost-user
/// vsock device.
pub const ACK_EVERY: usize = 64 * 1024;

/// The byte sent back: whitespace, which a line-framed peer that ignores
/// everything after its request (the agent) discards.
pub const ACK_BYTE: u8 = b'\n';

/// A host-side hybrid vsock stream that sends one byte back to the guest
/// for every [`ACK_EVERY`] bytes it reads.
///
/// Why: a guest's virtio-vsock driver may only send as much as the device
/// has told it was consumed, and it learns that from the header of packets
/// that travel *to* the guest. vhost-device-vsock (0.3.0) never sends a
/// credit update on its own, so a guest→host stream with no reverse
/// traffic stops dead after 256 KiB. Any byte back carries the device's
/// forwarded count and restores the credit. Harmless on Firecracker, whose
/// device sends credit updates itself.
///
/// Acknowledgements are written only from `poll_read`, so the stream suits
/// request-then-response exchanges: the caller must have finished writing
/// its request before it reads.
pub struct CreditAcked<S> {
    inner: S,
    unacked: usize,
}

impl<S> CreditAcked<S> {
    pub fn new(inner: S) -> Self {
        CreditAcked { inner, unacked: 0 }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for CreditAcked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.unacked >= ACK_EVERY {
            // Best effort: a failed write shows up on the read side soon
            // enough; a pending one is retried on the next read (its waker
            // is registered).
            match Pin::new(&mut this.inner).poll_write(cx, &[ACK_BYTE]) {
                Poll::Ready(_) => this.unacked -= ACK_EVERY,
                Poll::Pending => {}
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            this.unacked += n;
            if n > 0 && this.unacked >= ACK_EVERY {
                // Ack now rather than at the next read: the guest may be
                // waiting for exactly this credit before it sends more.
                if Pin::new(&mut this.inner).poll_write(cx, &[ACK_BYTE]).is_ready() {
                    this.unacked -= ACK_EVERY;
                }
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CreditAcked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading N bytes through the wrapper sends N / ACK_EVERY bytes back.
    #[tokio::test]
    async fn one_ack_byte_per_window_read() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut host = CreditAcked::new(host);
        let total = ACK_EVERY * 5 + 100;
        let writer = tokio::spawn(async move {
            guest.write_all(&vec![7u8; total]).await.unwrap();
            // The guest's view: it must see the acks while it sends.
            let mut acks = vec![0u8; 16];
            let mut got = 0;
            while got < 5 {
                let n = guest.read(&mut acks[got..]).await.unwrap();
                assert!(n > 0, "host closed before acking");
                got += n;
            }
            acks.truncate(got);
            acks
        });
        let mut seen = 0;
        let mut buf = vec![0u8; 8192];
        while seen < total {
            seen += host.read(&mut buf).await.unwrap();
        }
        let acks = writer.await.unwrap();
        assert_eq!(acks, vec![ACK_BYTE; 5]);
    }
}
