//! Session streams on the stream port: attach (replay from a byte, then
//! follow; with input, own the session's stdin and resizes), logs (replay,
//! optionally follow) and send (stdin only). Closing the connection
//! detaches: a session is never stopped by a stream.
//!
//! Output is read from the log files at the stream's own pace, within the
//! host's acknowledgement window, so a slow or stalled client holds back
//! only itself.

use super::{log, Input, Session, Sessions};
use banger_proto::stream::{
    self, Attached, Frame, Kind, SessionEnd, SessionMode, SessionOpen, StreamError, OUTPUT_WINDOW,
    STDIN_WINDOW,
};
use banger_proto::RpcError;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// Output read from the log per pass.
const BATCH: usize = 256 * 1024;

/// Gives the input back when the stream ends, however it ends.
struct Release<'a>(&'a Session, u64);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.release_input(self.1);
    }
}

fn ended(reason: &str, next_seq: u64, bytes_sent: u64) -> SessionEnd {
    SessionEnd {
        reason: reason.into(),
        next_seq,
        bytes_sent,
    }
}

pub async fn serve<R>(
    sessions: Arc<Sessions>,
    open: SessionOpen,
    rd: R,
    tx: mpsc::Sender<Frame>,
) -> Result<SessionEnd, RpcError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let s = sessions.get(&open.id)?;
    let (input, force) = match open.mode {
        SessionMode::Attach { input, force } => (input, force),
        SessionMode::Logs { .. } => (false, false),
        SessionMode::Send { .. } => (true, false),
    };
    if matches!(open.mode, SessionMode::Send { .. }) && !s.running() {
        return Err(RpcError::new(
            banger_proto::ErrorCode::Conflict,
            format!("session {} has ended; it takes no input", s.id),
        ));
    }
    let owner = sessions.owner_id();
    let revoked = match input && s.running() {
        true => s.take_input(force, owner)?,
        false => CancellationToken::new(),
    };
    let _release = Release(&s, owner);
    let info = s.info();
    let from = match open.tail {
        Some(t) => info.next_seq.saturating_sub(t).max(info.first_seq),
        None => open
            .from_seq
            .unwrap_or(info.first_seq)
            .clamp(info.first_seq, info.next_seq),
    };
    let _ = tx
        .send(Frame::json(
            Kind::Attached,
            &Attached {
                first_seq: info.first_seq,
                next_seq: info.next_seq,
                from_seq: from,
                tty: info.tty,
            },
        ))
        .await;
    tracing::info!(session = %s.id, mode = ?open.mode, from, "session stream");

    let credit = Arc::new(Semaphore::new(OUTPUT_WINDOW as usize));
    let sent = Arc::new(AtomicU64::new(0));
    let (done_tx, mut host_done) = oneshot::channel::<String>();
    let host = tokio::spawn(read_host(
        s.clone(),
        rd,
        tx.clone(),
        input && s.running(),
        matches!(open.mode, SessionMode::Send { .. }),
        matches!(open.mode, SessionMode::Send { eof: true }),
        credit.clone(),
        sent.clone(),
        done_tx,
    ));
    let _host = tokio_util::task::AbortOnDropHandle::new(host);

    let follow = match open.mode {
        SessionMode::Send { .. } => {
            let why = (&mut host_done).await.unwrap_or_default();
            let next = s.info().next_seq;
            return Ok(ended(
                if why == "eof" { "sent" } else { "detached" },
                next,
                sent.load(Ordering::SeqCst),
            ));
        }
        SessionMode::Logs { follow } => follow,
        SessionMode::Attach { .. } => true,
    };
    // Without follow, the log as it was when the stream began.
    let stop_at = (!follow).then_some(info.next_seq);
    let mut pos = from;
    let mut progress = s.progress();
    loop {
        let recs = if stop_at.is_some_and(|end| pos >= end) {
            Vec::new()
        } else {
            let dir = s.dir().to_path_buf();
            tokio::task::spawn_blocking(move || log::read_from(&dir, pos, BATCH))
                .await
                .unwrap_or_default()
        };
        if recs.is_empty() {
            if let Some(end) = stop_at {
                return Ok(ended("end of log", end.max(pos), 0));
            }
            let (next, running) = *progress.borrow_and_update();
            if pos >= next && !running {
                return Ok(ended("exited", pos, 0));
            }
            if pos < next {
                // Behind what rotation kept: go on from the oldest kept byte.
                let first = s.info().first_seq;
                if pos < first {
                    pos = first;
                    continue;
                }
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = revoked.cancelled() => return Ok(ended("taken over", pos, 0)),
                _ = &mut host_done => return Ok(ended("detached", pos, 0)),
            }
            continue;
        }
        for (seq, stream_no, bytes) in recs {
            if stop_at.is_some_and(|end| seq >= end) {
                break;
            }
            let n = bytes.len() as u32;
            tokio::select! {
                p = credit.acquire_many(n) => match p {
                    Ok(p) => p.forget(),
                    Err(_) => return Ok(ended("detached", pos, 0)),
                },
                _ = revoked.cancelled() => return Ok(ended("taken over", pos, 0)),
                _ = &mut host_done => return Ok(ended("detached", pos, 0)),
            }
            if tx.send(Frame::output(seq, stream_no, &bytes)).await.is_err() {
                return Ok(ended("detached", pos, 0));
            }
            pos = seq + bytes.len() as u64;
        }
    }
}

/// The host's frames on a session stream: acknowledgements, and for the
/// input owner, stdin (within [`STDIN_WINDOW`]), resizes and signals.
/// Reports how the host's side ended on `done`: `eof` (an empty stdin
/// frame: the end of what it sends), or why it hung up.
#[allow(clippy::too_many_arguments)]
async fn read_host<R: AsyncRead + Unpin>(
    s: Arc<Session>,
    mut rd: R,
    tx: mpsc::Sender<Frame>,
    input: bool,
    sending: bool,
    close_on_eof: bool,
    credit: Arc<Semaphore>,
    sent: Arc<AtomicU64>,
    done: oneshot::Sender<String>,
) {
    let inflight = Arc::new(AtomicU32::new(0));
    let (credit_tx, mut credit_rx) = mpsc::unbounded_channel::<u32>();
    let give_back = {
        let (tx, inflight) = (tx.clone(), inflight.clone());
        tokio::spawn(async move {
            while let Some(n) = credit_rx.recv().await {
                inflight.fetch_sub(n, Ordering::SeqCst);
                if tx.send(Frame::u32(Kind::Credit, n)).await.is_err() {
                    return;
                }
            }
        })
    };
    let _give_back = tokio_util::task::AbortOnDropHandle::new(give_back);
    let why = loop {
        let f = match stream::read(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break "hung up".to_string(),
            Err(e) => break format!("bad frame: {e}"),
        };
        let r: Result<(), StreamError> = match f.kind {
            Kind::Ack => f.parse_u32().map(|n| {
                let room = OUTPUT_WINDOW as usize - credit.available_permits();
                credit.add_permits((n as usize).min(room));
            }),
            // The end of what the host sends: for `send`, the end of the
            // stream; an attach goes on following.
            Kind::Stdin if input && f.payload.is_empty() => {
                if close_on_eof || s.info().tty {
                    s.send_input(None);
                }
                if sending {
                    break "eof".to_string();
                }
                Ok(())
            }
            Kind::Stdin if input => {
                let n = f.payload.len() as u32;
                if inflight.fetch_add(n, Ordering::SeqCst) + n > STDIN_WINDOW {
                    break "stdin beyond its credit".to_string();
                }
                sent.fetch_add(u64::from(n), Ordering::SeqCst);
                let queued = s.send_input(Some(Input {
                    bytes: f.payload,
                    credit: credit_tx.clone(),
                }));
                if !queued {
                    // The session no longer takes input: credit it back.
                    let _ = credit_tx.send(n);
                }
                Ok(())
            }
            Kind::Resize if input => f.parse_resize().map(|w| s.resize(w)),
            Kind::Signal if input => f.parse_signal().map(|sig| {
                if let Some(pid) = s.info().pid.filter(|_| s.running()) {
                    crate::stream::kill_group(pid, sig);
                }
            }),
            k => break format!("unexpected {k:?} frame"),
        };
        if let Err(e) = r {
            break e.to_string();
        }
    };
    let _ = done.send(why);
}
