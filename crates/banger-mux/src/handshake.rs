//! Where a session begins. Lines start with a newline of their own so that
//! they stand apart from whatever an earlier session left in the stream.

use crate::{io, MuxError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const HELLO: &str = "BANGER-MUX-HELLO";
const OK: &str = "BANGER-MUX-OK";
const GO: &str = "BANGER-MUX-GO";
const RESET: &str = "BANGER-MUX-RESET";
const SEEDS: &str = "BANGER-MUX-SEEDS";
const SEED: &str = "BANGER-MUX-SEED";
const SEEDED: &str = "BANGER-MUX-SEEDED";
/// More than the largest yamux frame (a 16 KiB body and its header).
const FLUSH: usize = 16 * 1024 + 64;
/// Longer lines are not ours: the scanner drops them. Room for a seed and
/// its answer, one line of JSON each.
const MAX_LINE: usize = 2048;
/// The longest seed or answer a line carries.
pub const MAX_SEED_LINE: usize = MAX_LINE - 64;
/// How long the host waits for a seed's answer before it gives the session
/// up (and starts another): the agent said it takes seeds, so an answer
/// that never comes is a guest in trouble, and a `GO` sent without it
/// would let the late answer land inside the session.
const SEED_WITHIN: Duration = Duration::from_secs(30);

/// The host's side: repeats the hello until the guest answers (a guest may
/// still be booting, or may first have to notice that its old session is
/// gone), then marks the start of the session. The hello goes every
/// `every` at first, then less and less often: a booting guest reads the
/// hellos queued for it one byte at a time.
pub async fn host<S: AsyncRead + AsyncWrite + Unpin>(io_: &mut S, every: Duration) -> Result<(), MuxError> {
    host_seeded(io_, every, None).await.map(drop)
}

/// [`host`], with a seed: one line that `seed` makes (at the moment it is
/// sent, so a clock in it is fresh), given to the guest once it answered
/// the hello and before the session begins; the guest's one-line answer
/// is returned. A guest just restored from a snapshot gets what must
/// differ between clones there, without a round trip on a stream of its
/// own. `None` when the guest's agent knows no seeds: one that does says
/// so (`SEEDS`) just before its answer to the hello, a line older hosts
/// ignore.
pub async fn host_seeded<S: AsyncRead + AsyncWrite + Unpin>(
    io_: &mut S,
    every: Duration,
    seed: Option<&(dyn Fn() -> String + Send + Sync)>,
) -> Result<Option<String>, MuxError> {
    let nonce = format!("{:016x}", rand::random::<u64>());
    let hello = format!("\n{HELLO} {nonce}\n");
    let want = format!("{OK} {nonce}");
    let takes_seeds = format!("{SEEDS} {nonce}");
    let mut seeds = false;
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
                        let Some(line) = lines.push(b) else { continue };
                        if line == takes_seeds {
                            seeds = true;
                        } else if line == want {
                            let answer = match seed {
                                Some(make) if seeds => Some(give_seed(io_, &nonce, &make()).await?),
                                _ => None,
                            };
                            io_.write_all(format!("\n{GO} {nonce}\n").as_bytes())
                                .await
                                .map_err(io("writing go"))?;
                            io_.flush().await.map_err(io("writing go"))?;
                            return Ok(answer);
                        }
                    }
                }
            }
        }
    }
    unreachable!("the hello count ran out")
}

/// Sends the seed line and waits for its answer (see [`host_seeded`]). An
/// agent that restarts meanwhile (its reset line), or no answer within
/// [`SEED_WITHIN`], ends the handshake as closed: the caller starts a new
/// one, whose hello the guest tells apart from anything late of this one.
async fn give_seed<S: AsyncRead + AsyncWrite + Unpin>(
    io_: &mut S,
    nonce: &str,
    seed: &str,
) -> Result<String, MuxError> {
    if seed.len() > MAX_SEED_LINE || seed.contains('\n') {
        return Err(MuxError::Invalid(format!(
            "a seed must be one line of at most {MAX_SEED_LINE} bytes"
        )));
    }
    io_.write_all(format!("\n{SEED} {nonce} {seed}\n").as_bytes())
        .await
        .map_err(io("writing the seed"))?;
    io_.flush().await.map_err(io("writing the seed"))?;
    let prefix = format!("{SEEDED} {nonce} ");
    let mut lines = Lines::default();
    let mut buf = [0u8; 4096];
    let answer = tokio::time::timeout(SEED_WITHIN, async {
        loop {
            let n = io_
                .read(&mut buf)
                .await
                .map_err(io("reading the seed's answer"))?;
            if n == 0 {
                return Err(MuxError::Closed("the handshake"));
            }
            for &b in &buf[..n] {
                let Some(line) = lines.push(b) else { continue };
                if line == RESET {
                    return Err(MuxError::Closed("the seed: the agent restarted"));
                }
                if let Some(a) = line.strip_prefix(&prefix) {
                    return Ok(a.to_string());
                }
            }
        }
    })
    .await;
    answer.unwrap_or(Err(MuxError::Closed("the seed: no answer in time")))
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
    guest_seeded(io_, idle, None).await
}

/// [`guest`], answering a host's seed (see [`host_seeded`]) with what
/// `on_seed` makes of it: once per host, one line (cut to
/// [`MAX_SEED_LINE`] bytes; a newline in it ends it). Without `on_seed`
/// a seed is ignored, as an agent that knows none does.
pub async fn guest_seeded<S: AsyncRead + AsyncWrite + Unpin>(
    io_: &mut S,
    idle: Duration,
    mut on_seed: Option<&mut (dyn FnMut(&str) -> String + Send)>,
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
    let mut seeded: Vec<String> = Vec::new();
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
                // An agent that takes seeds says so first, in the same write.
                let seeds = match on_seed {
                    Some(_) => format!("\n{SEEDS} {nonce}\n"),
                    None => String::new(),
                };
                io_.write_all(format!("{seeds}\n{OK} {nonce}\n").as_bytes())
                    .await
                    .map_err(io("answering the hello"))?;
                io_.flush().await.map_err(io("answering the hello"))?;
            } else if let Some((nonce, seed)) = line
                .strip_prefix(SEED)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|r| r.split_once(' '))
            {
                // Only from a host this guest answered, and once: a seed
                // sets the clock, which a replay would set back.
                let Some(on_seed) = on_seed.as_deref_mut() else {
                    continue;
                };
                if !answered.iter().any(|a| a == nonce) || seeded.iter().any(|a| a == nonce) {
                    continue;
                }
                seeded.push(nonce.to_string());
                let mut answer = on_seed(seed);
                answer.retain(|c| c != '\n');
                let mut cut = answer.len().min(MAX_SEED_LINE);
                while !answer.is_char_boundary(cut) {
                    cut -= 1;
                }
                answer.truncate(cut);
                io_.write_all(format!("\n{SEEDED} {nonce} {answer}\n").as_bytes())
                    .await
                    .map_err(io("answering the seed"))?;
                io_.flush().await.map_err(io("answering the seed"))?;
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
    async fn a_seed_is_answered_once_before_the_session_and_ignored_by_a_guest_without_seeds() {
        let (mut h, mut g) = tokio::io::duplex(1 << 16);
        let guest = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut on_seed = |s: &str| {
                got.push(s.to_string());
                format!("seeded {s}")
            };
            let early = guest_seeded(&mut g, Duration::from_millis(5), Some(&mut on_seed))
                .await
                .unwrap();
            let mut g = Prefixed::new(early, g);
            let mut b = [0u8; 5];
            g.read_exact(&mut b).await.unwrap();
            (got, b)
        });
        let make = || "{\"hostname\":\"clone-1\"}".to_string();
        let answer = host_seeded(&mut h, Duration::from_millis(20), Some(&make))
            .await
            .unwrap();
        assert_eq!(answer.as_deref(), Some("seeded {\"hostname\":\"clone-1\"}"));
        h.write_all(b"yamux").await.unwrap();
        let (got, first) = guest.await.unwrap();
        assert_eq!(
            got,
            vec!["{\"hostname\":\"clone-1\"}".to_string()],
            "applied once"
        );
        assert_eq!(&first, b"yamux");

        // An agent that knows no seeds: the session begins without one, at
        // once.
        let (mut h, mut g) = tokio::io::duplex(1 << 16);
        let began = std::time::Instant::now();
        let plain =
            tokio::spawn(async move { super::guest(&mut g, Duration::from_millis(5)).await.map(drop) });
        let answer = host_seeded(&mut h, Duration::from_millis(20), Some(&make))
            .await
            .unwrap();
        assert_eq!(answer, None);
        assert!(began.elapsed() < Duration::from_secs(1), "{:?}", began.elapsed());
        plain.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_agent_that_restarts_while_it_holds_a_seed_ends_the_handshake() {
        let (mut h, g) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(g);
            let mut lines = Lines::default();
            let mut b = [0u8; 1];
            while r.read_exact(&mut b).await.is_ok() {
                let Some(line) = lines.push(b[0]) else { continue };
                if let Some(nonce) = line.strip_prefix("BANGER-MUX-HELLO ") {
                    let answer = format!("\n{SEEDS} {nonce}\n\n{OK} {nonce}\n");
                    w.write_all(answer.as_bytes()).await.unwrap();
                } else if line.starts_with(SEED) {
                    // The agent dies holding the seed; its next self says so.
                    w.write_all(b"\nBANGER-MUX-RESET\n").await.unwrap();
                }
            }
        });
        let make = || "{}".to_string();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            host_seeded(&mut h, Duration::from_millis(20), Some(&make)),
        )
        .await
        .expect("the host must not wait out the seed");
        assert!(matches!(r, Err(MuxError::Closed(_))), "{r:?}");
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
