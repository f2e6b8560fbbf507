//! A yamux session driven by one task, with handles to open streams and a
//! queue of the streams the other end opened.

use crate::{io, MuxError};
use futures::channel::oneshot;
use std::future::Future;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// One stream of a session, as a tokio byte stream. Shutting its write half
/// down is a half-close: the other end reads EOF and may still answer.
///
/// It is the far end of a pipe that one task copies to and from the yamux
/// stream. Why: a yamux stream's reads and writes both park on the same
/// channel sender, which remembers one waker; a stream split between a
/// reading task and a writing task (as the agent's exec streams are) could
/// leave the writer unwoken forever once that channel filled. One pumping
/// task per stream cannot lose its own wake-up.
pub type Stream = tokio::io::DuplexStream;

/// How much each direction of a [`Stream`]'s pipe holds.
const PIPE: usize = 256 * 1024;

fn pumped(s: yamux::Stream) -> Stream {
    let (near, far) = tokio::io::duplex(PIPE);
    tokio::spawn(async move {
        let y: Compat<yamux::Stream> = s.compat();
        crate::relay(near, y).await;
    });
    far
}

pub use yamux::Mode;

type Reply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Opens streams on a running session; cheap to clone.
#[derive(Clone)]
pub struct Opener(mpsc::UnboundedSender<Reply>);

impl Opener {
    pub async fn open(&self) -> Result<Stream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .map_err(|_| MuxError::Closed("opening a stream"))?;
        match rx.await {
            Ok(Ok(s)) => Ok(pumped(s)),
            Ok(Err(e)) => Err(MuxError::Session(e.to_string())),
            Err(_) => Err(MuxError::Closed("opening a stream")),
        }
    }

    /// Opens a stream to `port` and, if `answered`, waits for the other end
    /// to say that something serves it.
    pub async fn open_port(&self, port: u32, answered: Option<Duration>) -> Result<Stream, MuxError> {
        let mut s = self.open().await?;
        s.write_all(&port.to_be_bytes())
            .await
            .map_err(io("naming the port"))?;
        s.flush().await.map_err(io("naming the port"))?;
        if let Some(within) = answered {
            let mut b = [0u8; 1];
            match tokio::time::timeout(within, s.read_exact(&mut b)).await {
                Err(_) => return Err(MuxError::Timeout(within)),
                Ok(Err(_)) => return Err(MuxError::Closed("opening a stream")),
                Ok(Ok(_)) if b[0] != 1 => return Err(MuxError::Refused(port)),
                Ok(Ok(_)) => {}
            }
        }
        Ok(s)
    }

    /// Whether the session this opener belongs to has ended.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The port a stream the other end opened is for.
pub async fn read_port(s: &mut Stream) -> Result<u32, MuxError> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.map_err(io("reading the port"))?;
    Ok(u32::from_be_bytes(b))
}

/// The answer to a host-opened stream: whether something serves its port.
pub async fn answer(s: &mut Stream, served: bool) -> Result<(), MuxError> {
    s.write_all(&[u8::from(served)]).await.map_err(io("answering"))?;
    s.flush().await.map_err(io("answering"))
}

/// Most streams open at once on one channel: an agent's execs, copies and
/// attached sessions, with room to spare.
pub const MAX_STREAMS: usize = 128;

/// Bounds what either end buffers for the other, whatever the other does:
/// yamux's default lets one connection's windows grow to 1 GiB, and a
/// guest paces the round trips that grow them.
fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    // In this order: each setting is checked against the other.
    c.set_max_num_streams(MAX_STREAMS);
    c.set_max_connection_receive_window(Some(MAX_STREAMS * 256 * 1024));
    c
}

/// Starts a session on `io_`. The returned future drives it and ends with
/// the session (the channel closed or broke); until it is polled nothing
/// moves, so the caller spawns it.
pub fn start<T>(
    io_: T,
    mode: Mode,
) -> (
    Opener,
    mpsc::UnboundedReceiver<Stream>,
    impl Future<Output = Result<(), MuxError>> + Send,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<Reply>();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let mut conn = yamux::Connection::new(io_.compat(), config(), mode);
    let driver = async move {
        let mut waiting: std::collections::VecDeque<Reply> = Default::default();
        let end = std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(r)) = open_rx.poll_recv(cx) {
                waiting.push_back(r);
            }
            // A refused open (too many streams) fails that open alone; a
            // connection that broke shows in the inbound poll below.
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(r) => {
                        if let Some(w) = waiting.pop_front() {
                            let _ = w.send(r);
                        }
                    }
                    Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => {
                        let _ = in_tx.send(pumped(s));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(MuxError::Session(e.to_string()))),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        // Ends every opener's wait and tells holders the session is gone.
        drop(open_rx);
        end
    };
    (Opener(open_tx), in_rx, driver)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host and a guest session over an in-memory pipe of `buf` bytes,
    /// driven: (host opener, host inbound, guest opener, guest inbound).
    fn pair(
        buf: usize,
    ) -> (
        Opener,
        mpsc::UnboundedReceiver<Stream>,
        Opener,
        mpsc::UnboundedReceiver<Stream>,
    ) {
        let (h, g) = tokio::io::duplex(buf);
        let (host, host_in, hd) = start(h, Mode::Client);
        let (guest, guest_in, gd) = start(g, Mode::Server);
        tokio::spawn(hd);
        tokio::spawn(gd);
        (host, host_in, guest, guest_in)
    }

    #[tokio::test]
    async fn streams_both_ways_with_half_close_and_refusal() {
        let (host, mut host_in, guest, mut guest_in) = pair(1 << 16);
        // The guest serves port 52 only: it echoes until EOF, then says bye.
        tokio::spawn(async move {
            while let Some(mut s) = guest_in.recv().await {
                tokio::spawn(async move {
                    let port = read_port(&mut s).await.unwrap();
                    answer(&mut s, port == 52).await.unwrap();
                    let mut all = Vec::new();
                    s.read_to_end(&mut all).await.unwrap();
                    s.write_all(&all).await.unwrap();
                    s.write_all(b" bye").await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let mut s = host.open_port(52, Some(Duration::from_secs(2))).await.unwrap();
        // More than yamux's initial window: flow control must move it.
        let big = vec![7u8; 600 * 1024];
        let (mut rd, mut wr) = tokio::io::split(&mut s);
        let ((), r) = tokio::join!(
            async {
                wr.write_all(&big).await.unwrap();
                wr.shutdown().await.unwrap();
            },
            async {
                let mut back = Vec::new();
                rd.read_to_end(&mut back).await.unwrap();
                back
            }
        );
        assert_eq!(r.len(), big.len() + 4);
        assert!(r.ends_with(b" bye"));
        assert!(matches!(
            host.open_port(53, Some(Duration::from_secs(2))).await,
            Err(MuxError::Refused(53))
        ));
        // The guest opens one towards the host.
        let mut up = guest.open_port(9999, None).await.unwrap();
        up.write_all(b"ready").await.unwrap();
        up.shutdown().await.unwrap();
        let mut got = host_in.recv().await.unwrap();
        assert_eq!(read_port(&mut got).await.unwrap(), 9999);
        let mut msg = String::new();
        got.read_to_string(&mut msg).await.unwrap();
        assert_eq!(msg, "ready");
    }

    /// Both ends read in one task and write in another, as the agent's
    /// exec streams do, with a narrow channel between them so that yamux's
    /// queues fill up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_read_and_written_from_two_tasks_keeps_flowing() {
        const TOTAL: usize = 16 << 20;
        let (host, _, _, mut guest_in) = pair(16 * 1024);
        tokio::spawn(async move {
            let mut s = guest_in.recv().await.unwrap();
            read_port(&mut s).await.unwrap();
            answer(&mut s, true).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(s);
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
            tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    wr.write_all(&b).await.unwrap();
                }
            });
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = rd.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                tx.send(buf[..n].to_vec()).await.unwrap();
            }
        });
        let s = host.open_port(54, Some(Duration::from_secs(5))).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(s);
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            for _ in 0..TOTAL / chunk.len() {
                wr.write_all(&chunk).await.unwrap();
            }
        });
        let echoed = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < TOTAL {
                let n = rd.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {got} bytes");
                got += n;
            }
            got
        })
        .await;
        assert_eq!(echoed.expect("the stream stalled"), TOTAL);
        writer.await.unwrap();
    }

    /// The guest writes its last bytes and hangs up while the host is still
    /// acknowledging what it read: every byte must arrive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tail_of_a_stream_arrives_while_the_other_side_still_writes() {
        const TOTAL: usize = 4 << 20;
        for _ in 0..5 {
            let (host, _, _, mut guest_in) = pair(64 * 1024);
            tokio::spawn(async move {
                let mut s = guest_in.recv().await.unwrap();
                read_port(&mut s).await.unwrap();
                answer(&mut s, true).await.unwrap();
                s.write_all(&vec![3u8; TOTAL]).await.unwrap();
                // Gone, both ways, the moment its output is written.
                drop(s);
            });
            let s = host.open_port(54, Some(Duration::from_secs(5))).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(s);
            let mut got = 0;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
                    .await
                    .expect("stalled")
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                got += n;
                // An acknowledgement, as the exec protocol sends.
                let _ = wr.write_all(b"ack").await;
            }
            assert_eq!(got, TOTAL);
        }
    }
}
