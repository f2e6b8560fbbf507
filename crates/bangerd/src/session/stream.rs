//! Relaying one session stream: the agent's output frames become
//! `SessionOutput` events for the client, each acknowledged to the agent
//! once the client's connection took it; the client's input frames go to
//! the agent within its stdin credit (as for `vm exec -i`). Every frame
//! from the guest is checked as hostile input.

use crate::vm::agent::{stream_err, AgentStream};
use banger_proto::methods::agent::StreamName;
use banger_proto::methods::daemon::SessionOutput;
use banger_proto::stream::{Attached, Kind, Open, SessionEnd};
use banger_proto::{Ctx, RpcError};
use std::path::Path;

pub async fn relay(uds: &Path, ctx: &Ctx, open: Open, input: bool) -> Result<SessionEnd, RpcError> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut agent = AgentStream::open(uds, &open).await?;
    let _input = match input {
        true => agent.relay_client_input(ctx),
        false => None,
    };
    let mut last_seq = None::<u64>;
    loop {
        let f = agent.next(ctx, "stream").await?;
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
                agent.ack(bytes.len()).await;
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
            Kind::End => {
                let end: SessionEnd = f.parse_json().map_err(stream_err)?;
                if end.reason.len() > 64 {
                    return Err(stream_err("an end reason longer than 64 bytes"));
                }
                tracing::info!(reason = %end.reason, next_seq = end.next_seq, "session stream ended");
                return Ok(end);
            }
            k => return Err(stream_err(format!("unexpected {k:?} frame from the guest"))),
        }
    }
}
