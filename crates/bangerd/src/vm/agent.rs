//! The daemon's client for the guest agent, over hybrid vsock: JSON calls
//! (generation 1) and process streams (generation 2).

use banger_proto::methods::agent::{self as a, AGENT_PORT, IDLE_DEADLINE};
use banger_proto::stream::{self, Frame, Kind};
use banger_proto::{Client, ClientError, Method, OpId, RpcError};
use banger_vmm::vsock;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::AbortOnDropHandle;

fn agent_err(e: ClientError) -> RpcError {
    match e {
        ClientError::Rpc(mut e) => {
            e.message = format!("guest agent: {}", e.message);
            e
        }
        other => RpcError::failed(format!("guest agent: {other}")),
    }
}

/// One call to the agent, relaying its events to `on_event`. The stream
/// acknowledges what it reads (see [`vsock::CreditAcked`]), and a call that
/// hears nothing, not even a heartbeat, for [`IDLE_DEADLINE`] fails.
pub async fn call<M: Method>(
    uds: &Path,
    op: &OpId,
    params: &M::Params,
    on_event: impl FnMut(M::Event) + Send,
) -> Result<M::Output, RpcError> {
    let stream = vsock::connect_with_retry(uds, AGENT_PORT, Duration::from_secs(3), || true)
        .await
        .map_err(|e| RpcError::not_running(format!("guest agent unreachable: {e}")))?;
    call_on::<M>(stream, uds, op, params, on_event).await
}

/// [`call`] on a connection to the agent's port already open.
pub async fn call_on<M: Method>(
    stream: tokio::net::UnixStream,
    uds: &Path,
    op: &OpId,
    params: &M::Params,
    on_event: impl FnMut(M::Event) + Send,
) -> Result<M::Output, RpcError> {
    Client::new(uds)
        .with_idle_timeout(IDLE_DEADLINE)
        .call_on::<M, _>(vsock::CreditAcked::new(stream), params, Some(op), on_event)
        .await
        .map_err(agent_err)
}

pub(crate) fn stream_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::failed(format!("guest agent stream: {e}"))
}

/// One operation on the agent's stream port: the connection, opened with
/// its `Open` frame. Frames to the agent go through `to_agent`, written by
/// a task that dies with this value (so a call dropped mid-way, its client
/// gone, closes the connection and the agent ends or detaches the
/// operation); `credit` is the agent's stdin window.
pub(crate) struct AgentStream {
    rd: tokio::io::ReadHalf<tokio::net::UnixStream>,
    pub to_agent: mpsc::Sender<Frame>,
    pub credit: Arc<Semaphore>,
    _writer: AbortOnDropHandle<()>,
}

impl AgentStream {
    pub async fn open(uds: &Path, open: &stream::Open) -> Result<Self, RpcError> {
        let conn = vsock::connect_with_retry(uds, stream::STREAM_PORT, Duration::from_secs(3), || true)
            .await
            .map_err(|e| RpcError::not_running(format!("guest agent unreachable: {e}")))?;
        let (rd, mut wr) = tokio::io::split(conn);
        stream::write(&mut wr, &Frame::json(Kind::Open, open))
            .await
            .map_err(stream_err)?;
        let (to_agent, mut outbox) = mpsc::channel::<Frame>(64);
        let writer = AbortOnDropHandle::new(banger_proto::opid::spawn(async move {
            while let Some(f) = outbox.recv().await {
                if stream::write(&mut wr, &f).await.is_err() {
                    return;
                }
            }
        }));
        Ok(AgentStream {
            rd,
            to_agent,
            credit: Arc::new(Semaphore::new(stream::STDIN_WINDOW as usize)),
            _writer: writer,
        })
    }

    /// Relays the client's input frames (if the call takes input) to the
    /// agent within its credit, in a task that dies with the handle.
    pub fn relay_client_input(&self, ctx: &banger_proto::Ctx) -> Option<AbortOnDropHandle<()>> {
        ctx.take_input().map(|r| {
            AbortOnDropHandle::new(banger_proto::opid::spawn(relay_input(
                r,
                self.to_agent.clone(),
                self.credit.clone(),
            )))
        })
    }

    /// The next frame the caller must handle. Heartbeats and stdin credit
    /// are taken care of here (credit never beyond the window: the guest
    /// cannot give back what it was not sent); the guest's error frame is
    /// its error; silence past [`IDLE_DEADLINE`], a closed connection
    /// before the end of the `what`, or the client's hang-up end it.
    pub async fn next(&mut self, ctx: &banger_proto::Ctx, what: &str) -> Result<Frame, RpcError> {
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout(IDLE_DEADLINE, stream::read(&mut self.rd)) => r,
                _ = ctx.cancel.cancelled() => {
                    return Err(RpcError::new(banger_proto::ErrorCode::Cancelled, "the client hung up"))
                }
            };
            let f = match next {
                Err(_) => {
                    return Err(stream_err(format!(
                        "nothing heard for {}s, not even a heartbeat",
                        IDLE_DEADLINE.as_secs()
                    )))
                }
                Ok(Err(e)) => return Err(stream_err(e)),
                Ok(Ok(None)) => return Err(stream_err(format!("closed before the {what} ended"))),
                Ok(Ok(Some(f))) => f,
            };
            match f.kind {
                Kind::Heartbeat => {}
                Kind::Credit => {
                    let n = f.parse_u32().map_err(stream_err)?;
                    let room = stream::STDIN_WINDOW as usize - self.credit.available_permits();
                    self.credit.add_permits((n as usize).min(room));
                }
                Kind::Error => {
                    return Err(match f.parse_json::<RpcError>() {
                        Ok(mut e) => {
                            e.message = format!("guest agent: {}", e.message);
                            e
                        }
                        Err(e) => stream_err(e),
                    })
                }
                _ => return Ok(f),
            }
        }
    }

    /// Acknowledges output the client's connection has taken.
    pub async fn ack(&self, n: usize) {
        let _ = self.to_agent.send(Frame::u32(Kind::Ack, n as u32)).await;
    }
}

/// `vm exec` over the agent's stream port. The client's input (its
/// frames after the request, when `client_input`; else a whole stdin given
/// up front) goes to the agent within the agent's stdin credit; the
/// agent's output goes to the client as `ExecOutput` events, each
/// acknowledged to the agent once the client's connection has taken it,
/// so neither a slow client nor a command that never reads its stdin can
/// make the daemon buffer without bound. A client that hangs up ends the
/// connection, and the agent ends the command's process group.
pub async fn exec_stream(
    uds: &Path,
    ctx: &banger_proto::Ctx,
    open: stream::Open,
    stdin_b64: Option<String>,
    client_input: bool,
) -> Result<a::ExitStatus, RpcError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut agent = AgentStream::open(uds, &open).await?;
    let input = match (client_input, stdin_b64) {
        (true, _) => agent.relay_client_input(ctx),
        (false, Some(s)) => {
            let bytes = b64
                .decode(s)
                .map_err(|e| RpcError::bad_request(format!("stdin_b64: {e}")))?;
            let mut frames: Vec<Frame> = bytes
                .chunks(stream::MAX_PAYLOAD)
                .map(|c| Frame::new(Kind::Stdin, c.to_vec()))
                .collect();
            frames.push(Frame::new(Kind::Stdin, Vec::new()));
            let (tx, credit) = (agent.to_agent.clone(), agent.credit.clone());
            Some(AbortOnDropHandle::new(banger_proto::opid::spawn(async move {
                for f in frames {
                    if send_stdin(&tx, &credit, f).await.is_err() {
                        return;
                    }
                }
            })))
        }
        (false, None) => None,
    };
    let result = loop {
        let f = match agent.next(ctx, "command").await {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        match f.kind {
            Kind::Stdout | Kind::Stderr => {
                let stream = if f.kind == Kind::Stdout {
                    a::StreamName::Stdout
                } else {
                    a::StreamName::Stderr
                };
                ctx.emit_flow(&a::ExecOutput {
                    stream,
                    data_b64: b64.encode(&f.payload),
                })
                .await;
                agent.ack(f.payload.len()).await;
            }
            Kind::Started => match f.parse_json::<stream::Started>() {
                Ok(s) => tracing::info!(guest_pid = s.pid, "guest command started"),
                Err(e) => break Err(stream_err(e)),
            },
            Kind::Exit => break f.parse_json::<a::ExitStatus>().map_err(stream_err),
            k => break Err(stream_err(format!("unexpected {k:?} frame from the guest"))),
        }
    };
    drop(input);
    result
}

/// Sends a stdin frame once the agent has credit for it.
async fn send_stdin(to_agent: &mpsc::Sender<Frame>, credit: &Semaphore, f: Frame) -> Result<(), ()> {
    if !f.payload.is_empty() {
        credit
            .acquire_many(f.payload.len() as u32)
            .await
            .map_err(|_| ())?
            .forget();
    }
    to_agent.send(f).await.map_err(|_| ())
}

/// The client's frames after its request: stdin (within credit), resizes
/// and signals go on to the agent; anything else ends the relay.
pub(crate) async fn relay_input(
    mut r: impl tokio::io::AsyncRead + Unpin,
    to_agent: mpsc::Sender<Frame>,
    credit: Arc<Semaphore>,
) {
    loop {
        let f = match stream::read(&mut r).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad input frame from the client");
                return;
            }
        };
        let ok = match f.kind {
            Kind::Stdin => send_stdin(&to_agent, &credit, f).await.is_ok(),
            Kind::Resize | Kind::Signal => to_agent.send(f).await.is_ok(),
            k => {
                tracing::warn!(kind = ?k, "unexpected input frame from the client");
                false
            }
        };
        if !ok {
            return;
        }
    }
}
