//! Host networking, done through the root helper.

use crate::helper_client::HelperClient;
use banger_proto::methods::daemon::NetworkStatus;
use banger_proto::methods::helper as m;
use banger_proto::{OpId, RpcError, PROTOCOL_VERSION};

pub struct NetworkService {
    helper: HelperClient,
    bridge: String,
    bridge_address: String,
}

impl NetworkService {
    pub fn new(helper: HelperClient, bridge: String, bridge_address: String) -> Self {
        NetworkService {
            helper,
            bridge,
            bridge_address,
        }
    }

    /// Checks the helper speaks our protocol, then makes sure the bridge exists.
    pub async fn ensure(&self, op: &OpId) -> Result<NetworkStatus, RpcError> {
        let info = self.helper.ping(op).await?;
        if info.protocol != PROTOCOL_VERSION {
            return Err(RpcError::failed(format!(
                "root helper speaks protocol {} but the daemon speaks {PROTOCOL_VERSION}; restart the helper",
                info.protocol
            )));
        }
        let changed = self
            .helper
            .call::<m::BridgeEnsureM>(
                op,
                &m::BridgeEnsure {
                    name: self.bridge.clone(),
                    address: Some(self.bridge_address.clone()),
                },
            )
            .await?;
        tracing::info!(bridge = %self.bridge, created = changed.changed, "bridge ready");
        Ok(NetworkStatus {
            bridge: self.bridge.clone(),
            helper_version: info.version,
            bridge_created: changed.changed,
        })
    }

    pub fn helper(&self) -> &HelperClient {
        &self.helper
    }
}
