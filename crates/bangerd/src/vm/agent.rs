//! The daemon's client for the guest agent, over hybrid vsock.

use banger_proto::methods::agent::{AGENT_PORT, IDLE_DEADLINE};
use banger_proto::{Client, ClientError, Method, OpId, RpcError};
use banger_vmm::vsock;
use std::path::Path;
use std::time::Duration;

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
    Client::new(uds)
        .with_idle_timeout(IDLE_DEADLINE)
        .call_on::<M, _>(vsock::CreditAcked::new(stream), params, Some(op), on_event)
        .await
        .map_err(agent_err)
}
