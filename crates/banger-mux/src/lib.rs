//! The agent channel for a VMM whose vsock cannot be snapshotted: QEMU's
//! vsock here is a vhost-user device, which QEMU refuses to migrate, while
//! a virtio-serial port migrates like any other device. One port carries
//! many streams, multiplexed with yamux, each behaving like a vsock
//! connection to a guest port.
//!
//! On the wire, in order:
//! 1. [`handshake`]: the host repeats `HELLO <nonce>` until the guest
//!    answers `OK <nonce>`, then writes `GO <nonce>`; yamux starts after
//!    that line. A guest restored from a snapshot still holds the session
//!    of the host it was saved with; the handshake is how both ends agree
//!    that a new session begins, and where it begins in the byte stream.
//! 2. [`session`]: yamux, the host as client. Every stream opens with the
//!    guest port it is for (u32, big-endian). For a host-opened stream the
//!    guest answers one byte, 1 when something serves that port (the
//!    counterpart of vsock's connection refused), before the stream is the
//!    service's.
//!
//! [`bridge`] is the host's end: it serves the VM's streams on a Unix
//! socket in Firecracker's hybrid-vsock protocol, so the daemon talks to
//! every guest the same way. [`port`] is the guest's end of the device.

pub mod bridge;
pub mod handshake;
pub mod port;
pub mod session;

/// The name the host gives the port (`virtserialport,name=`), which the
/// guest finds in `/sys/class/virtio-ports/*/name`.
pub const PORT_NAME: &str = "banger.agent";

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the channel closed during {0}")]
    Closed(&'static str),
    #[error("no answer from the guest within {0:?}")]
    Timeout(std::time::Duration),
    #[error("nothing in the guest serves port {0}")]
    Refused(u32),
    #[error("the session ended: {0}")]
    Session(String),
    #[error("{0}")]
    Invalid(String),
}

/// Copies both ways between `a` and `b` until both directions end. Unlike
/// `tokio::io::copy_bidirectional`, a direction that fails (its reader went
/// away) does not cut the other short: the bytes still travelling the other
/// way (a process's last output, say, while an acknowledgement of it finds
/// the process gone) all arrive. Each direction's end is passed on as a
/// half-close. Returns the bytes copied a→b and b→a.
pub async fn relay<A, B>(a: A, b: B) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let there = async {
        let n = tokio::io::copy(&mut ar, &mut bw).await.unwrap_or(0);
        let _ = bw.shutdown().await;
        n
    };
    let back = async {
        let n = tokio::io::copy(&mut br, &mut aw).await.unwrap_or(0);
        let _ = aw.shutdown().await;
        n
    };
    tokio::join!(there, back)
}

pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MuxError {
    move |source| MuxError::Io { what, source }
}
