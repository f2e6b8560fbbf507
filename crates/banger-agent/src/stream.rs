//! The stream port (protocol generation 2): one process per connection,
//! its stdin, stdout and stderr as binary frames, with pipes or a terminal.
//! See `banger_proto::stream` for the frames and the flow control.
//!
//! The process runs in a process group of its own (a session, with a
//! terminal), so a signal from the host reaches everything it started, and
//! a host that hangs up takes the whole group down with it.

use crate::tty::{open_pty, set_size, TtyReader, TtyWriter};
use banger_proto::methods::agent::ExitStatus;
use banger_proto::stream::{self, Frame, Kind, Open, Started, StreamError, OUTPUT_WINDOW, STDIN_WINDOW};
use banger_proto::{OpId, RpcError};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

/// Output is read in pieces of this size (a frame each).
const CHUNK: usize = 32 * 1024;

pub async fn serve(sessions: Arc<crate::sessions::Sessions>) -> anyhow::Result<()> {
    let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        tokio_vsock::VMADDR_CID_ANY,
        stream::STREAM_PORT,
    ))?;
    tracing::info!(port = stream::STREAM_PORT, "process streams on vsock");
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(handle(conn, sessions.clone()));
    }
}

pub(crate) async fn handle<S: AsyncRead + AsyncWrite + Send + 'static>(
    conn: S,
    sessions: Arc<crate::sessions::Sessions>,
) {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let open = match tokio::time::timeout(std::time::Duration::from_secs(10), stream::read(&mut rd)).await {
        Ok(Ok(Some(f))) if f.kind == Kind::Open => f.parse_json::<Open>().map_err(|e| e.to_string()),
        Ok(Ok(Some(f))) => Err(format!("expected an open frame, got {:?}", f.kind)),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out waiting for the open frame".into()),
    };
    let op = OpId::adopt_or_mint(open.as_ref().ok().and_then(|o| o.op_id.as_deref()));
    let span = tracing::info_span!("stream", op_id = %op);
    async move {
        let (tx, mut rx) = mpsc::channel::<Frame>(64);
        // One writer: frames from every task, a heartbeat when quiet.
        let writer = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(banger_proto::methods::agent::HEARTBEAT, rx.recv()).await {
                    Ok(Some(f)) => {
                        let last = matches!(f.kind, Kind::Exit | Kind::Error);
                        if stream::write(&mut wr, &f).await.is_err() {
                            return;
                        }
                        if last {
                            let _ = wr.flush().await;
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(_) => {
                        if stream::write(&mut wr, &Frame::new(Kind::Heartbeat, Vec::new()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let last = match open {
            Err(e) => Frame::json(Kind::Error, &RpcError::bad_request(e).with_op_id(&op)),
            Ok(Open {
                session: Some(so), ..
            }) => match crate::sessions::stream::serve(sessions, so, rd, tx.clone()).await {
                Ok(end) => Frame::json(Kind::End, &end),
                Err(e) => {
                    tracing::warn!(error = %e.message, "session stream failed");
                    Frame::json(Kind::Error, &e.with_op_id(&op))
                }
            },
            Ok(open) => match run(open, rd, tx.clone()).await {
                Ok(st) => Frame::json(Kind::Exit, &st),
                Err(e) => {
                    tracing::warn!(error = %e.message, "stream exec failed");
                    Frame::json(Kind::Error, &e.with_op_id(&op))
                }
            },
        };
        let _ = tx.send(last).await;
        drop(tx);
        let _ = writer.await;
    }
    .instrument(span)
    .await
}

async fn run<R>(open: Open, rd: R, tx: mpsc::Sender<Frame>) -> Result<ExitStatus, RpcError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let Some((prog, args)) = open.argv.split_first() else {
        return Err(RpcError::bad_request("argv is empty"));
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(open.env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    let pty = match open.tty {
        Some(size) => Some(open_pty(size).map_err(|e| RpcError::failed(format!("opening a terminal: {e}")))?),
        None => None,
    };
    match &pty {
        Some((_, slave)) => {
            let dup = || {
                slave
                    .try_clone()
                    .map(Stdio::from)
                    .map_err(|e| RpcError::failed(format!("terminal: {e}")))
            };
            cmd.stdin(dup()?).stdout(dup()?).stderr(dup()?);
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        None => {
            cmd.stdin(if open.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
    }
    // After the terminal's pre-exec: the root is entered last.
    crate::rootdir::place(
        &mut cmd,
        open.root.as_deref(),
        open.cwd.as_deref(),
        open.user.as_ref(),
    )?;
    tracing::info!(argv = ?open.argv, cwd = ?open.cwd, root = ?open.root, tty = open.tty.is_some(), stdin = open.stdin, "exec (stream)");
    let mut child = cmd
        .spawn()
        .map_err(|e| RpcError::failed(format!("cannot run {prog:?}: {e}")))?;
    // The command holds copies of the terminal's slave side: only once
    // they are closed does the master see the end when the process exits.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let _ = tx.send(Frame::json(Kind::Started, &Started { pid })).await;

    let credit = Arc::new(Semaphore::new(OUTPUT_WINDOW as usize));
    let inflight = Arc::new(AtomicU32::new(0));
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut pumps = Vec::new();
    let mut stdin_task = None;
    let mut master = None;
    match pty {
        Some((m, slave)) => {
            drop(slave);
            // SAFETY: the descriptor is ours alone (a fresh pty master) and
            // stays open as long as the AsyncFd that owns it.
            let m =
                unsafe { AsyncFd::register(m) }.map_err(|e| RpcError::failed(format!("terminal: {e}")))?;
            let m = Arc::new(m);
            pumps.push(tokio::spawn(pump(
                TtyReader(m.clone()),
                Kind::Stdout,
                tx.clone(),
                credit.clone(),
            )));
            stdin_task = Some(tokio::spawn(feed(
                TtyWriter(m.clone()),
                stdin_rx,
                tx.clone(),
                inflight.clone(),
                Some(0x04),
            )));
            master = Some(m);
        }
        None => {
            let (out, err) = (child.stdout.take(), child.stderr.take());
            pumps.push(tokio::spawn(pump(
                out.expect("piped"),
                Kind::Stdout,
                tx.clone(),
                credit.clone(),
            )));
            pumps.push(tokio::spawn(pump(
                err.expect("piped"),
                Kind::Stderr,
                tx.clone(),
                credit.clone(),
            )));
            if let Some(w) = child.stdin.take() {
                stdin_task = Some(tokio::spawn(feed(
                    w,
                    stdin_rx,
                    tx.clone(),
                    inflight.clone(),
                    None,
                )));
            }
        }
    }
    // The host's frames: input, resizes, signals, acknowledgements. A host
    // that hangs up or breaks the protocol ends the process group.
    let mut input = tokio::spawn(read_host(
        rd,
        stdin_tx,
        open.stdin || open.tty.is_some(),
        inflight,
        credit.clone(),
        master,
        pid,
    ));
    let gone = |why: Result<String, tokio::task::JoinError>| {
        let why = why.unwrap_or_else(|e| format!("input task: {e}"));
        tracing::warn!(why = %why, "the host went away; ending the process group");
        kill_group(pid, libc::SIGKILL);
        RpcError::failed(why)
    };
    let status = tokio::select! {
        st = child.wait() => st.map_err(|e| RpcError::failed(format!("waiting for {prog:?}: {e}")))?,
        why = &mut input => {
            let e = gone(why);
            let _ = child.wait().await;
            return Err(e);
        }
    };
    // Output still in the pipes (or the terminal) belongs before the exit.
    tokio::select! {
        _ = futures_join(pumps) => {}
        why = &mut input => return Err(gone(why)),
    }
    input.abort();
    if let Some(t) = stdin_task {
        t.abort();
    }
    let st = ExitStatus {
        code: status.code(),
        signal: status.signal(),
    };
    tracing::info!(code = ?st.code, signal = ?st.signal, "exec (stream) finished");
    Ok(st)
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

pub(crate) fn kill_group(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain syscall; the group is the process's own.
        unsafe { libc::kill(-(pid as i32), sig) };
    }
}

/// Reads the host's frames until it hangs up or breaks the protocol;
/// returns why it stopped. Stdin past the window is a protocol error:
/// the host must wait for credit.
async fn read_host<R: AsyncRead + Unpin>(
    mut rd: R,
    stdin: mpsc::UnboundedSender<Vec<u8>>,
    stdin_allowed: bool,
    inflight: Arc<AtomicU32>,
    credit: Arc<Semaphore>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    pid: u32,
) -> String {
    loop {
        let f = match stream::read(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => return "the host hung up".into(),
            Err(e) => return format!("bad frame from the host: {e}"),
        };
        let r: Result<(), StreamError> = match f.kind {
            Kind::Stdin if stdin_allowed => {
                let n = f.payload.len() as u32;
                if inflight.fetch_add(n, Ordering::SeqCst) + n > STDIN_WINDOW {
                    return "the host sent stdin beyond its credit".into();
                }
                let _ = stdin.send(f.payload);
                Ok(())
            }
            Kind::Resize => f.parse_resize().map(|w| {
                if let Some(m) = &master {
                    set_size(m.get_ref().as_raw_fd(), w);
                }
            }),
            Kind::Signal => f.parse_signal().map(|s| kill_group(pid, s)),
            Kind::Ack => f.parse_u32().map(|n| {
                // Never more credit than the window: a host cannot
                // acknowledge what was not sent.
                let room = OUTPUT_WINDOW as usize - credit.available_permits();
                credit.add_permits((n as usize).min(room));
            }),
            k => return format!("unexpected {k:?} frame from the host"),
        };
        if let Err(e) = r {
            return e.to_string();
        }
    }
}

/// Writes the host's stdin to the process, giving credit back as it goes.
/// An empty chunk closes stdin (with a terminal: sends `eof_byte`).
async fn feed<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    tx: mpsc::Sender<Frame>,
    inflight: Arc<AtomicU32>,
    eof_byte: Option<u8>,
) {
    let give_back = |n: usize| {
        inflight.fetch_sub(n as u32, Ordering::SeqCst);
        Frame::u32(Kind::Credit, n as u32)
    };
    while let Some(chunk) = rx.recv().await {
        if chunk.is_empty() {
            match eof_byte {
                Some(b) => {
                    let _ = w.write_all(&[b]).await;
                    continue;
                }
                None => return,
            }
        }
        if w.write_all(&chunk).await.is_err() {
            // The process closed its stdin: the rest is dropped, but
            // credited, so the host is never left waiting.
            let _ = tx.send(give_back(chunk.len())).await;
            while let Some(c) = rx.recv().await {
                let _ = tx.send(give_back(c.len())).await;
            }
            return;
        }
        let _ = tx.send(give_back(chunk.len())).await;
    }
}

/// Sends the process's output as frames, each once the host has credit
/// for it.
async fn pump<R: AsyncRead + Unpin>(mut r: R, kind: Kind, tx: mpsc::Sender<Frame>, credit: Arc<Semaphore>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match credit.acquire_many(n as u32).await {
            Ok(p) => p.forget(),
            Err(_) => return,
        }
        if tx.send(Frame::new(kind, buf[..n].to_vec())).await.is_err() {
            return;
        }
    }
}
