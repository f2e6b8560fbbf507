//! The root helper's narrow `priv.*` API.

use super::{method, Empty};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelperInfo {
    pub version: String,
    pub pid: u32,
    pub protocol: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BridgeEnsure {
    pub name: String,
    /// Host address of the bridge with prefix length, e.g. `172.30.0.1/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TapCreate {
    pub name: String,
    /// Bridge to attach the tap to (must carry banger's prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Uid allowed to open the tap without privileges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkName {
    pub name: String,
}

/// Whether an idempotent call changed anything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Changed {
    pub changed: bool,
}

method!(
    /// Liveness and version of the helper.
    Ping = "priv.ping", Empty => HelperInfo
);
method!(
    /// Creates the bridge if missing and brings it up.
    BridgeEnsureM = "priv.bridge.ensure", BridgeEnsure => Changed
);
method!(
    /// Creates a persistent tap if missing, attaches it, brings it up.
    TapCreateM = "priv.tap.create", TapCreate => Changed
);
method!(
    /// Deletes a tap; deleting a missing tap succeeds with `changed: false`.
    TapDeleteM = "priv.tap.delete", LinkName => Changed
);
