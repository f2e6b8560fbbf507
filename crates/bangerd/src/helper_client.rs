//! The daemon's side of the helper protocol. The op id of the call being
//! served travels in every request envelope, so the helper logs under it.

use crate::error::HelperError;
use banger_proto::methods::helper as m;
use banger_proto::{Client, Method, OpId};
use std::path::PathBuf;
use std::time::Duration;

/// Every privileged effect is a netlink message or an nft script: well
/// under a second. This bounds a helper that hangs.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

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

    pub async fn call<M: Method>(&self, op: &OpId, params: &M::Params) -> Result<M::Output, HelperError> {
        tokio::time::timeout(CALL_DEADLINE, self.client.call::<M>(params, Some(op)))
            .await
            .map_err(|_| timeout::<M>())?
            .map_err(HelperError::from)
    }

    /// Like `call`, also taking the descriptor the helper passes back.
    pub async fn call_with_fd<M: Method>(
        &self,
        op: &OpId,
        params: &M::Params,
    ) -> Result<(M::Output, Option<std::os::fd::OwnedFd>), HelperError> {
        tokio::time::timeout(CALL_DEADLINE, self.client.call_with_fd::<M>(params, Some(op)))
            .await
            .map_err(|_| timeout::<M>())?
            .map_err(HelperError::from)
    }

    pub async fn ping(&self, op: &OpId) -> Result<m::HelperInfo, HelperError> {
        self.call::<m::Ping>(op, &Default::default()).await
    }
}

fn timeout<M: Method>() -> HelperError {
    HelperError::Timeout {
        method: M::NAME,
        secs: CALL_DEADLINE.as_secs(),
    }
}
