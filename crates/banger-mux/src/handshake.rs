//! Where a session begins. Lines start with a newline of their own so that
//! they stand apart from whatever an earlier session left in the stream.

use crate::{io, MuxError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const HELLO: &str = "BANGER-MUX-HELLO";
const OK: &str = "BANGER-MUX-OK";
const GO: &str = "BANGER-MUX-GO";
const RESET: &str = "BANGER-MUX-RESET";
/// More than the largest yamux frame (a 16 KiB body and its header).
const FLUSH: usize = 16 * 1024 + 64;
/// Longer lines are not ours: the scanner drops them.
const MAX_LINE: usize = 96;

/// The host's side: repeats the hello until the guest answers (a guest may
/// still be booting, or may first have to notice that its old session is
/// gone), then marks the start of the session. The hello goes every
/// `every` at first, then less and less often: a booting guest reads the
/// hellos queued for it one byte at a time.
pub async fn host<S: AsyncRead + AsyncWrite + Unpin>(io_: &mut S, every: Duration) -> Result<(), MuxError> {
    let nonce = format!("{:016x}", rand::random::<u64>());
    let hello = format!("\n{HELLO} {nonce}\n");
    let want = format!("{OK} {nonce}");
    let mut lines = Lines::default();
    let mut buf = [0u8; 4096];
    // A guest saved in the middle of a frame reads this as the rest of it
    // (frames carry at most 16 KiB): the hellos then reach its parser as
    // garbage at once, instead of being eaten one by one as frame bytes.
    // Empty lines are nothing to the guest's scanner.
    io_.write_all(&[b'\n'; FLUSH])
        .await
        .map_err(io("writing the hello"))?;
    for sent in 0u32.. {
        io_.write_all(hello.as_bytes())
            .await
            .map_err(io("writing the hello"))?;
        // 20 at `every`, 20 at twice that, and so on up to 32 times.
        let tick = tokio::time::sleep(every * (1 << (sent / 20).min(5)));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = &mut tick => break,
                n = io_.read(&mut buf) => {
                    let n = n.map_err(io("reading the guest's answer"))?;
                    if n == 0 {
                        return Err(MuxError::Closed("the handshake"));
                    }
                    for &b in &buf[..n] {
                        if lines.push(b).is_some_and(|l| l == want) {
                            io_.write_all(format!("\n{GO} {nonce}\n").as_bytes())
                                .await
                                .map_err(io("writing go"))?;
                            io_.flush().await.map_err(io("writing go"))?;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    unreachable!("the hello count ran out")
}

/// The guest's side: answers each host's hello once, and returns once that
/// host's `GO` has been read, with the bytes read past it: the session's
/// first bytes, for the caller to read before the channel's next ones
/// (see [`Prefixed`]). Reading in chunks matters: a guest that booted or
/// resumed late finds many repeated hellos queued. `idle` is how long to
/// wait when the channel reads as closed (no host connected).
pub async fn guest<S: AsyncRead + AsyncWrite + Unpin>(
    io_: &mut S,
    idle: Duration,
) -> Result<Vec<u8>, MuxError> {
    // A host still in a session with this guest's previous self (an agent
    // that restarted) cannot parse this line, ends that session, and says
    // hello. Written only if a host is there to take it at once.
    let reset = format!("\n{RESET}\n");
    let _ = tokio::time::timeout(idle, async {
        io_.write_all(reset.as_bytes()).await?;
        io_.flush().await
    })
    .await;
    let mut lines = Lines::default();
    let mut answered: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = io_.read(&mut buf).await.map_err(io("reading the hello"))?;
        if n == 0 {
            tokio::time::sleep(idle).await;
            continue;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            let Some(line) = lines.push(b) else { continue };
            if let Some(nonce) = line.strip_prefix(HELLO).and_then(|r| r.strip_prefix(' ')) {
                // Once per host: hellos it repeated while this guest was not
                // listening are queued behind the first, and a second answer
                // would reach the host after its session began.
                if answered.iter().any(|a| a == nonce) {
                    continue;
                }
                answered.push(nonce.to_string());
                io_.write_all(format!("\n{OK} {nonce}\n").as_bytes())
                    .await
                    .map_err(io("answering the hello"))?;
                io_.flush().await.map_err(io("answering the hello"))?;
            } else if let Some(nonce) = line.strip_prefix(GO).and_then(|r| r.strip_prefix(' ')) {
                if answered.iter().any(|a| a == nonce) {
                    return Ok(buf[i + 1..n].to_vec());
                }
            }
        }
    }
}

/// A byte stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Splits bytes into lines, dropping over-long ones.
#[derive(Default)]
struct Lines {
    cur: Vec<u8>,
    overflow: bool,
}

impl Lines {
    fn push(&mut self, b: u8) -> Option<String> {
        if b == b'\n' {
            let line = (!self.overflow).then(|| String::from_utf8_lossy(&self.cur).into_owned());
            self.cur.clear();
            self.overflow = false;
            return line.filter(|l| !l.is_empty());
        }
        if self.cur.len() >= MAX_LINE {
            self.overflow = true;
        } else {
            self.cur.push(b);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_agree_after_leftovers_and_a_stale_session() {
        let (mut h, mut g) = tokio::io::duplex(1 << 16);
        // What an earlier session left in the guest's direction: binary
        // yamux frames and a hello of a host that is gone.
        h.write_all(&[0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 9, 1, 2])
            .await
            .unwrap();
        h.write_all(b"\nBANGER-MUX-HELLO dead\n").await.unwrap();
        let guest = tokio::spawn(async move {
            let early = guest(&mut g, Duration::from_millis(5)).await.unwrap();
            // The session's first bytes are the guest's to read, whether
            // the handshake read them along or not.
            let mut g = Prefixed::new(early, g);
            let mut b = [0u8; 5];
            g.read_exact(&mut b).await.unwrap();
            b
        });
        host(&mut h, Duration::from_millis(20)).await.unwrap();
        h.write_all(b"yamux").await.unwrap();
        assert_eq!(&guest.await.unwrap(), b"yamux");
    }

    #[tokio::test]
    async fn a_go_for_a_hello_never_answered_is_ignored() {
        let (mut h, mut g) = tokio::io::duplex(1 << 16);
        h.write_all(b"\nBANGER-MUX-GO forged\nrest").await.unwrap();
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            guest(&mut g, Duration::from_millis(5)),
        )
        .await;
        assert!(r.is_err(), "the guest must still be waiting for a hello");
    }
}
