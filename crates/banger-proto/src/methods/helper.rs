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

/// One guest's place on the bridge, as the helper's rules enforce it: the
/// tap it is plugged into, the only MAC and IPv4 address that tap accepts,
/// and what the guest may reach beyond the host's DNS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestNet {
    /// The VM's tag (its id): its rules are found and removed by it.
    pub vm: String,
    pub tap: String,
    pub bridge: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ip: String,
    /// Outbound access through NAT.
    #[serde(default)]
    pub nat: bool,
    /// Traffic with other guests that have `peers` too.
    #[serde(default)]
    pub peers: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestRef {
    pub vm: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestRules {
    /// Tags of the VMs that have rules.
    pub vms: Vec<String>,
}

method!(
    /// Opens an existing tap and passes its descriptor with the answer.
    TapOpenM = "priv.tap.open", LinkName => Changed
);
method!(
    /// Installs one guest's rules (anti-spoofing on its tap, NAT and peer
    /// traffic when asked), replacing any it had.
    GuestAllowM = "priv.guest.allow", GuestNet => Changed
);
method!(
    /// Removes every rule of one VM.
    GuestRevokeM = "priv.guest.revoke", GuestRef => Changed
);
method!(
    /// Lists the VMs that have rules.
    GuestListM = "priv.guest.list", Empty => GuestRules
);

/// The network of a VM whose VMM runs in a network namespace of its own
/// (Firecracker under its jailer): the namespace, the VM's tap inside it
/// (owned by `owner_uid`), and a veth pair carrying its frames to `bridge`.
/// The host end of the pair is named like the tap, so the guest's rules
/// (`priv.guest.allow` with `tap`) confine it exactly as they confine a tap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JailNet {
    /// The VM's tag (its id): it names the namespace.
    pub vm: String,
    pub tap: String,
    pub bridge: String,
    pub owner_uid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JailNetRef {
    pub vm: String,
    pub tap: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JailNetReady {
    pub changed: bool,
    /// The namespace's path, for the jailer's `--netns`.
    pub netns: String,
}

method!(
    /// Makes (or completes) a VM's namespace, its tap and the veth pair to
    /// the bridge; idempotent.
    JailNetEnsureM = "priv.netns.ensure", JailNet => JailNetReady
);
/// A VM's link in a network namespace a container engine made (its CNI
/// plugins gave it an interface, an address and routes): a tap there,
/// joined to that interface by traffic-control redirects both ways, so the
/// guest, wearing the interface's MAC and address, is the pod on the
/// engine's network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodNet {
    /// The namespace's path, as the engine gave it (under /run/netns).
    pub netns: String,
    pub tap: String,
    pub owner_uid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodNetRef {
    pub netns: String,
    pub tap: String,
}

/// What the guest is to wear: the engine's interface's address, MAC and
/// MTU, and its default gateway. The open tap comes with the answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodNetReady {
    pub changed: bool,
    /// `a.b.c.d/len`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    pub mac: String,
    pub mtu: u32,
}

method!(
    /// Makes (or completes) a VM's tap in an engine's namespace and the
    /// redirects joining it to the namespace's interface; answers with
    /// the tap's descriptor attached. Idempotent.
    PodNetEnsureM = "priv.podnet.ensure", PodNet => PodNetReady
);
method!(
    /// Removes the redirects and the tap from an engine's namespace; a
    /// namespace already gone (the engine removed it) succeeds with
    /// `changed: false`.
    PodNetDeleteM = "priv.podnet.delete", PodNetRef => Changed
);

method!(
    /// Removes a VM's namespace and its veth pair (the tap goes with the
    /// namespace); removing what is absent succeeds with `changed: false`.
    JailNetDeleteM = "priv.netns.delete", JailNetRef => Changed
);
