//! The daemon's side of the helper protocol. The op id of the call being
//! served travels in every request envelope, so the helper logs under it.

use banger_proto::methods::helper as m;
use banger_proto::{Client, ClientError, Method, OpId, RpcError};
use std::path::PathBuf;

#[derive(Clone)]
pub struct HelperClient {
    client: Client,
}

impl HelperClient {
    pub fn new(socket: PathBuf) -> Self {
        HelperClient {
            client: Client::new(socket),
        }
    }

    pub async fn call<M: Method>(&self, op: &OpId, params: &M::Params) -> Result<M::Output, RpcError> {
        self.client.call::<M>(params, Some(op)).await.map_err(Self::relay)
    }

    /// Like `call`, also taking the descriptor the helper passes back.
    pub async fn call_with_fd<M: Method>(
        &self,
        op: &OpId,
        params: &M::Params,
    ) -> Result<(M::Output, Option<std::os::fd::OwnedFd>), RpcError> {
        self.client
            .call_with_fd::<M>(params, Some(op))
            .await
            .map_err(Self::relay)
    }

    fn relay(e: ClientError) -> RpcError {
        match e {
            ClientError::Rpc(mut e) => {
                e.message = format!("root helper: {}", e.message);
                e
            }
            ClientError::Connect { path, source } => RpcError::failed(format!(
                "the root helper is not reachable at {} ({source}); start it with `banger-helper serve --owner-uid $(id -u)` as root",
                path.display()
            )),
            other => RpcError::failed(format!("root helper: {other}")),
        }
    }

    pub async fn ping(&self, op: &OpId) -> Result<m::HelperInfo, RpcError> {
        self.call::<m::Ping>(op, &Default::default()).await
    }
}
