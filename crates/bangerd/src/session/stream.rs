//! Relaying one session stream: the agent's output frames become
//! `SessionOutput` events for the client, each acknowledged to the agent
//! once the client's connection took it; the client's input frames go to
//! the agent within its stdin credit (as for `vm exec -i`). Every frame
//! from the guest is checked as hostile input.

use crate::vm::agent::relay_input;
use banger_proto::methods::agent::{StreamName, IDLE_DEADLINE};
use banger_proto::methods::daemon::SessionOutput;
use banger_proto::stream::{self, Attached, Frame, Kind, Open, SessionEnd};
use banger_proto::{Ctx, RpcError};
use banger_vmm::vsock;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::AbortOnDropHandle;

fn stream_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::failed(format!("guest agent stream: {e}"))
}

pub async fn relay(uds: &Path, ctx: &Ctx, open: Open, input: bool) -> Result<SessionEnd, RpcError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let conn = vsock::connect_with_retry(uds, stream::STREAM_PORT, Duration::from_secs(3), || true)
        .await
        .map_err(|e| RpcError::not_running(format!("guest agent unreachable: {e}")))?;
    let (mut ard, mut awr) = tokio::io::split(conn);
    stream::write(&mut awr, &Frame::json(Kind::Open, &open))
        .await
        .map_err(stream_err)?;
    let (to_agent, mut outbox) = mpsc::channel::<Frame>(64);
    let _writer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(f) = outbox.recv().await {
            if stream::write(&mut awr, &f).await.is_err() {
                return;
            }
        }
    }));
    let credit = Arc::new(Semaphore::new(stream::STDIN_WINDOW as usize));
    let _input = match input {
        true => ctx
            .take_input()
            .map(|r| AbortOnDropHandle::new(tokio::spawn(relay_input(r, to_agent.clone(), credit.clone())))),
        false => None,
    };
    let mut last_seq = None::<u64>;
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(IDLE_DEADLINE, stream::read(&mut ard)) => r,
            // Detach: dropping the connection ends only this stream.
            _ = ctx.cancel.cancelled() => return Err(RpcError::new(banger_proto::ErrorCode::Cancelled, "the client hung up")),
        };
        let f = match next {
            Err(_) => {
                return Err(stream_err(format!(
                    "nothing heard for {}s, not even a heartbeat",
                    IDLE_DEADLINE.as_secs()
                )))
            }
            Ok(Err(e)) => return Err(stream_err(e)),
            Ok(Ok(None)) => return Err(stream_err("closed before the stream ended")),
            Ok(Ok(Some(f))) => f,
        };
        match f.kind {
            Kind::Output => {
                let (seq, stream_no, bytes) = f.parse_output().map_err(stream_err)?;
                // Output only moves forward.
                if last_seq.is_some_and(|l| seq < l) {
                    return Err(stream_err(format!(
                        "output went back from byte {:?} to {seq}",
                        last_seq
                    )));
                }
                last_seq = Some(seq + bytes.len() as u64);
                let stream = if stream_no == 1 {
                    StreamName::Stdout
                } else {
                    StreamName::Stderr
                };
                ctx.emit_flow(&SessionOutput {
                    seq,
                    stream,
                    data_b64: b64.encode(bytes),
                })
                .await;
                let _ = to_agent.send(Frame::u32(Kind::Ack, bytes.len() as u32)).await;
            }
            Kind::Credit => {
                let n = f.parse_u32().map_err(stream_err)?;
                let room = stream::STDIN_WINDOW as usize - credit.available_permits();
                credit.add_permits((n as usize).min(room));
            }
            Kind::Attached => {
                let a: Attached = f.parse_json().map_err(stream_err)?;
                tracing::info!(
                    first_seq = a.first_seq,
                    next_seq = a.next_seq,
                    from_seq = a.from_seq,
                    "session stream attached"
                );
            }
            Kind::Heartbeat => {}
            Kind::End => {
                let end: SessionEnd = f.parse_json().map_err(stream_err)?;
                if end.reason.len() > 64 {
                    return Err(stream_err("an end reason longer than 64 bytes"));
                }
                tracing::info!(reason = %end.reason, next_seq = end.next_seq, "session stream ended");
                return Ok(end);
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
            k => return Err(stream_err(format!("unexpected {k:?} frame from the guest"))),
        }
    }
}
