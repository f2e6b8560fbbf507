//! The daemon's RPC surface, as used by the CLI.

use super::{method, Empty};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub socket: String,
    pub state_dir: String,
}

/// An asynchronous operation; its id is the op id of the call that began it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperationInfo {
    pub op_id: String,
    pub kind: String,
    pub subject: String,
    pub stage: String,
    pub done: bool,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::RpcError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub bridge: String,
    pub helper_version: String,
    pub bridge_created: bool,
}

method!(
    /// Liveness of the daemon.
    Ping = "ping", Empty => DaemonInfo
);
method!(
    /// Asks the daemon to exit after answering. Running VMs keep running.
    Shutdown = "shutdown", Empty => Empty
);
method!(
    /// Lists asynchronous operations, finished ones included.
    OperationsList = "daemon.operations.list", Empty => Vec<OperationInfo>
);
method!(
    /// Checks the helper and makes sure banger's bridge exists.
    NetworkEnsure = "network.ensure", Empty => NetworkStatus
);
