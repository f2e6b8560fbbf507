//! The host's end of the channel: one process per VM, beside QEMU. It
//! connects to the port's chardev socket and serves the guest's streams on
//! a Unix socket in the hybrid-vsock protocol Firecracker speaks
//! (`CONNECT <port>\n` → `OK <port>\n`; streams the guest opens to host port
//! P arrive at `<socket>_P`), so the daemon needs no second client.
//!
//! A session ends when the guest says it has none (a restarted agent, or
//! one whose session broke, writes a reset line, which this end's yamux
//! cannot parse) or breaks; the chardev is then reconnected and the
//! handshake starts a new one. A guest restored from a snapshot sees its
//! old session break on the first hello.
//!
//! Like a guest kernel's vsock, the bridge accepts a connection to a port
//! before the agent has: the client gets `OK` at once, and the agent's
//! answer (served or not) arrives as the stream's first byte, which the
//! bridge turns into a relay or a close. So a stopped or overloaded
//! agent makes calls time out, as it would on vsock, instead of being
//! taken for an absent one.

use crate::session::{self, Mode, Opener};
use crate::{handshake, io, MuxError};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

/// How often the hello is repeated while the guest boots or resumes: what
/// a restored guest waits at most, once its old session has ended, before
/// its new one begins.
const HELLO_EVERY: Duration = Duration::from_millis(5);
/// How long opening a stream may wait (yamux holds opens back while too
/// many of the guest's are unacknowledged).
const OPEN_WITHIN: Duration = Duration::from_secs(10);
/// How long the guest's agent may take to say whether it serves a port
/// (a stopped agent never does): a stream waiting longer is closed, so a
/// guest cannot hold the bridge's descriptors without end.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);
/// How long QEMU may take to create the chardev socket.
const SOCKET_WITHIN: Duration = Duration::from_secs(30);

/// A seed for the guest's first session (see
/// [`handshake::host_seeded`]): made when it is sent, and its answer
/// handed to `answered` before any client is served, so that the first
/// client finds it recorded.
pub struct Seeding {
    pub make: Box<dyn Fn() -> String + Send + Sync>,
    pub answered: Box<dyn FnOnce(Option<String>) + Send>,
}

/// Runs until the chardev socket goes away (QEMU exited).
pub async fn run(serial: &Path, uds: &Path, mut seeding: Option<Seeding>) -> Result<(), MuxError> {
    let _ = std::fs::remove_file(uds);
    let listener = UnixListener::bind(uds).map_err(io("binding the vsock socket"))?;
    let (current, watching) = watch::channel::<Option<Opener>>(None);
    tokio::spawn(accept(listener, watching));
    let mut first = true;
    // A guest whose sessions keep breaking at once (broken, or hostile)
    // gets the next one later and later: no busy loop, no flood of logs.
    let mut backoff = Duration::ZERO;
    loop {
        tokio::time::sleep(backoff).await;
        let mut chan = match connect(serial, if first { SOCKET_WITHIN } else { Duration::ZERO }).await {
            Ok(c) => c,
            Err(e) if first => return Err(e),
            // The VMM is gone: so is the VM.
            Err(_) => return Ok(()),
        };
        first = false;
        let answer =
            match handshake::host_seeded(&mut chan, HELLO_EVERY, seeding.as_ref().map(|s| &*s.make)).await {
                Ok(a) => a,
                Err(MuxError::Closed(_)) => continue,
                Err(e) => return Err(e),
            };
        if let Some(s) = seeding.take() {
            tracing::info!(answered = answer.is_some(), "seed given in the handshake");
            (s.answered)(answer);
        }
        tracing::info!("agent channel up");
        let began = Instant::now();
        let (opener, inbound, driver) = session::start(chan, Mode::Client);
        current.send_replace(Some(opener));
        let from_guest = tokio::spawn(guest_opened(inbound, uds.to_path_buf()));
        let ended = driver.await;
        tracing::info!(result = ?ended, "agent channel ended");
        current.send_replace(None);
        from_guest.abort();
        backoff = if began.elapsed() < Duration::from_secs(1) {
            (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
    }
}

async fn connect(serial: &Path, within: Duration) -> Result<UnixStream, MuxError> {
    let end = Instant::now() + within;
    loop {
        match UnixStream::connect(serial).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= end => {
                return Err(MuxError::Io {
                    what: "connecting to the VMM's chardev",
                    source: e,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn accept(listener: UnixListener, session: watch::Receiver<Option<Opener>>) {
    loop {
        let client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors, say: no busy loop while it lasts.
                tracing::warn!(error = %e, "accepting a client");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut session = session.clone();
        tokio::spawn(async move {
            // No session yet (a guest being restored or booted, an agent
            // restarting): the client is held until there is one, so it
            // is served the moment the agent is, not at its next retry.
            // Closing after OPEN_WITHIN is this protocol's "nothing listens".
            let up = |o: &Option<Opener>| o.as_ref().is_some_and(|o| !o.is_closed());
            let opener = match tokio::time::timeout(OPEN_WITHIN, session.wait_for(up)).await {
                Ok(Ok(o)) => o.clone().expect("a session is up"),
                _ => return,
            };
            if let Err(e) = serve_client(client, opener).await {
                tracing::debug!(error = %e, "client connection");
            }
        });
    }
}

async fn serve_client(mut client: UnixStream, opener: Opener) -> Result<(), MuxError> {
    let port = tokio::time::timeout(Duration::from_secs(5), connect_line(&mut client))
        .await
        .map_err(|_| MuxError::Timeout(Duration::from_secs(5)))??;
    let stream = tokio::time::timeout(OPEN_WITHIN, opener.open_port(port, None))
        .await
        .map_err(|_| MuxError::Timeout(OPEN_WITHIN))??;
    client
        .write_all(format!("OK {port}\n").as_bytes())
        .await
        .map_err(io("answering the client"))?;
    crate::relay(client, Answered::new(stream, port)).await;
    Ok(())
}

/// A host-opened stream whose first byte, the guest's answer, is checked
/// and not passed on: 1 lets the stream through, anything else ends it.
struct Answered<S> {
    inner: S,
    port: u32,
    /// Until the answer: when waiting for it ends.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Answered<S> {
    fn new(inner: S, port: u32) -> Self {
        Answered {
            inner,
            port,
            deadline: Some(Box::pin(tokio::time::sleep(ANSWER_WITHIN))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Answered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(deadline) = &mut self.deadline {
            use std::future::Future;
            if deadline.as_mut().poll(cx).is_ready() {
                let late = format!(
                    "no answer from the guest for port {} within {ANSWER_WITHIN:?}",
                    self.port
                );
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, late)));
            }
            let mut b = [0u8; 1];
            let mut one = ReadBuf::new(&mut b);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut one))?;
            match one.filled() {
                // Closed before answering: the end of the stream.
                [] => return Poll::Ready(Ok(())),
                [1] => self.deadline = None,
                _ => {
                    let refused = format!("nothing in the guest serves port {}", self.port);
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        refused,
                    )));
                }
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Answered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `CONNECT <port>\n`, read byte by byte: what follows is the guest's.
async fn connect_line(client: &mut UnixStream) -> Result<u32, MuxError> {
    let mut line = Vec::new();
    loop {
        let b = client.read_u8().await.map_err(io("reading CONNECT"))?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 32 {
            return Err(MuxError::Closed("an over-long CONNECT line"));
        }
    }
    String::from_utf8_lossy(&line)
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or(MuxError::Closed("a malformed CONNECT line"))
}

/// Streams the guest opened, each to the listener at `<uds>_<port>`.
async fn guest_opened(mut inbound: mpsc::UnboundedReceiver<session::Stream>, uds: PathBuf) {
    while let Some(mut s) = inbound.recv().await {
        let uds = uds.clone();
        tokio::spawn(async move {
            let Ok(Ok(port)) = tokio::time::timeout(Duration::from_secs(5), session::read_port(&mut s)).await
            else {
                return;
            };
            let path = format!("{}_{port}", uds.display());
            match UnixStream::connect(&path).await {
                Ok(host) => {
                    crate::relay(host, s).await;
                }
                Err(e) => tracing::debug!(port, error = %e, "nothing listens for the guest"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake;

    /// The guest's end of the chardev, as QEMU would hand it over: one
    /// connection per bridge session.
    async fn guest_session(listener: &UnixListener) -> (UnixStream, Vec<u8>) {
        let (mut chan, _) = listener.accept().await.unwrap();
        let early = handshake::guest(&mut chan, Duration::from_millis(5))
            .await
            .unwrap();
        (chan, early)
    }

    /// A bridge run against a chardev socket this test holds: (its
    /// directory, the vsock socket it serves, the chardev, the bridge).
    fn start_bridge() -> (
        tempfile::TempDir,
        PathBuf,
        UnixListener,
        tokio::task::JoinHandle<Result<(), MuxError>>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let (serial, uds) = (d.path().join("agent.serial"), d.path().join("vsock.sock"));
        let chardev = UnixListener::bind(&serial).unwrap();
        let bridge = tokio::spawn({
            let uds = uds.clone();
            async move { run(&serial, &uds, None).await }
        });
        (d, uds, chardev, bridge)
    }

    #[tokio::test]
    async fn a_client_that_comes_before_the_agent_is_served_once_it_is_up() {
        let (_d, uds, chardev, _bridge) = start_bridge();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !uds.exists() {
            assert!(Instant::now() < deadline, "the bridge never listened");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The daemon's first try at a guest being restored: before the
        // agent has even answered the handshake.
        let mut c = UnixStream::connect(&uds).await.unwrap();
        c.write_all(b"CONNECT 52\n").await.unwrap();
        c.shutdown().await.ok();
        let client = tokio::spawn(async move {
            let mut all = String::new();
            let _ = c.read_to_string(&mut all).await;
            all
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (chan, early) = guest_session(&chardev).await;
        let (_, mut inbound, driver) = session::start(handshake::Prefixed::new(early, chan), Mode::Server);
        tokio::spawn(driver);
        tokio::spawn(async move {
            while let Some(mut s) = inbound.recv().await {
                session::read_port(&mut s).await.unwrap();
                session::answer(&mut s, true).await.unwrap();
                s.write_all(b"up").await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        let got = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, "OK 52\nup", "the held client is served, not closed");
    }

    #[tokio::test]
    async fn serves_ports_as_hybrid_vsock_and_survives_a_guest_that_sends_garbage() {
        let (_d, uds, chardev, bridge) = start_bridge();

        // A guest that breaks its session at once, with garbage.
        let (mut chan, _) = guest_session(&chardev).await;
        chan.write_all(&[0xff; 64]).await.unwrap();
        // The bridge starts a new session; this guest serves port 52.
        let (chan, early) = guest_session(&chardev).await;
        let (_, mut inbound, driver) = session::start(handshake::Prefixed::new(early, chan), Mode::Server);
        tokio::spawn(driver);
        tokio::spawn(async move {
            while let Some(mut s) = inbound.recv().await {
                let port = session::read_port(&mut s).await.unwrap();
                session::answer(&mut s, port == 52).await.unwrap();
                if port == 52 {
                    let mut line = Vec::new();
                    s.read_to_end(&mut line).await.unwrap();
                    s.write_all(b"echo:").await.unwrap();
                    s.write_all(&line).await.unwrap();
                    s.shutdown().await.unwrap();
                }
            }
        });

        // A client speaks hybrid vsock to the bridge.
        let reply = |port: u32| {
            let uds = uds.clone();
            async move {
                let mut c = UnixStream::connect(&uds).await.unwrap();
                c.write_all(format!("CONNECT {port}\n").as_bytes()).await.unwrap();
                c.shutdown().await.ok();
                let mut all = String::new();
                let _ = c.read_to_string(&mut all).await;
                all
            }
        };
        let mut got = String::new();
        for _ in 0..200 {
            got = reply(52).await;
            if !got.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, "OK 52\necho:");
        // A port nothing serves: accepted, then closed without a byte of
        // the guest's (a guest kernel's vsock accepts before its program).
        assert_eq!(reply(99).await, "OK 99\n");
        // Malformed requests are closed too, and the bridge serves on.
        for bad in ["CONNECT x\n", "HELLO\n", &"C".repeat(100)] {
            let mut c = UnixStream::connect(&uds).await.unwrap();
            c.write_all(bad.as_bytes()).await.unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "{bad:?} got {rest:?}");
        }
        assert_eq!(reply(52).await, "OK 52\necho:");
        bridge.abort();
    }

    /// An agent that restarts says so on the channel; the bridge then
    /// starts a new session instead of talking to one nobody holds.
    #[tokio::test]
    async fn a_restarted_agent_gets_a_new_session() {
        let (_d, _uds, chardev, bridge) = start_bridge();
        let (mut old, _) = guest_session(&chardev).await;
        // The new agent's first words, on the same channel.
        let restarted = tokio::spawn(async move {
            let r = handshake::guest(&mut old, Duration::from_millis(5)).await;
            (old, r)
        });
        let next = tokio::time::timeout(Duration::from_secs(10), guest_session(&chardev)).await;
        assert!(next.is_ok(), "the bridge kept its old session");
        restarted.abort();
        bridge.abort();
    }
}
