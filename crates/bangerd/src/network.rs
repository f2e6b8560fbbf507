//! Host networking, done through the root helper.

use crate::error::NetworkError;
use crate::helper_client::HelperClient;
use banger_proto::methods::daemon::NetworkStatus;
use banger_proto::methods::helper as m;
use banger_proto::{OpId, PROTOCOL_VERSION};

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
    pub async fn ensure(&self, op: &OpId) -> Result<NetworkStatus, NetworkError> {
        let info = self.helper.ping(op).await?;
        if info.protocol != PROTOCOL_VERSION {
            return Err(NetworkError::ProtocolMismatch {
                helper: info.protocol,
                daemon: PROTOCOL_VERSION,
            });
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

/// A VM's place on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}

impl NetworkService {
    /// Bridge address and prefix length from the configured CIDR.
    pub fn cidr(&self) -> Result<(std::net::Ipv4Addr, u8), NetworkError> {
        let address = || self.bridge_address.clone();
        let (ip, len) = self
            .bridge_address
            .split_once('/')
            .ok_or_else(|| NetworkError::NoPrefixLength { address: address() })?;
        let ip: std::net::Ipv4Addr = ip
            .parse()
            .map_err(|_| NetworkError::BadBridgeAddress { address: address() })?;
        let len: u8 = len
            .parse()
            .map_err(|_| NetworkError::BadBridgeAddress { address: address() })?;
        if !(8..=30).contains(&len) {
            return Err(NetworkError::PrefixOutOfRange {
                address: address(),
                len,
            });
        }
        Ok((ip, len))
    }

    /// The lowest free address of the bridge's subnet. Called under the
    /// creation lock, with every address already leased.
    pub fn allocate(&self, used: &[std::net::Ipv4Addr]) -> Result<Lease, NetworkError> {
        let (gw, prefix) = self.cidr()?;
        let mask = u32::MAX << (32 - prefix);
        let net = u32::from(gw) & mask;
        let broadcast = net | !mask;
        (net + 1..broadcast)
            .map(std::net::Ipv4Addr::from)
            .find(|ip| *ip != gw && !used.contains(ip))
            .map(|ip| Lease {
                ip,
                prefix,
                gateway: gw,
            })
            .ok_or_else(|| NetworkError::NoFreeAddress {
                cidr: self.bridge_address.clone(),
            })
    }

    /// Bridge, tap (attached to the bridge, owned by `owner_uid`, who may
    /// open it unprivileged), and an open descriptor of it.
    pub async fn attach(
        &self,
        op: &OpId,
        tap: &str,
        owner_uid: u32,
    ) -> Result<std::os::fd::OwnedFd, NetworkError> {
        self.ensure(op).await?;
        self.helper
            .call::<m::TapCreateM>(
                op,
                &m::TapCreate {
                    name: tap.to_string(),
                    bridge: Some(self.bridge.clone()),
                    owner_uid: Some(owner_uid),
                },
            )
            .await?;
        let (_, fd) = self
            .helper
            .call_with_fd::<m::TapOpenM>(
                op,
                &m::LinkName {
                    name: tap.to_string(),
                },
            )
            .await?;
        fd.ok_or_else(|| NetworkError::NoTapDescriptor { tap: tap.to_string() })
    }

    /// Bridge, then a network namespace of the VM's own holding its tap
    /// (owned by `owner_uid`), joined to the bridge by a veth pair whose
    /// host end is named like the tap. Returns the namespace's path, in
    /// which the VMM is to be started.
    pub async fn attach_jailed(
        &self,
        op: &OpId,
        vm: &str,
        tap: &str,
        owner_uid: u32,
    ) -> Result<std::path::PathBuf, NetworkError> {
        self.ensure(op).await?;
        let ready = self
            .helper
            .call::<m::JailNetEnsureM>(
                op,
                &m::JailNet {
                    vm: vm.to_string(),
                    tap: tap.to_string(),
                    bridge: self.bridge.clone(),
                    owner_uid,
                },
            )
            .await?;
        Ok(ready.netns.into())
    }

    /// Removes what `attach_jailed` made, if anything; a no-op for a VM
    /// whose tap is on the host.
    pub async fn detach_jailed(&self, op: &OpId, vm: &str, tap: &str) -> Result<(), NetworkError> {
        self.helper
            .call::<m::JailNetDeleteM>(
                op,
                &m::JailNetRef {
                    vm: vm.to_string(),
                    tap: tap.to_string(),
                },
            )
            .await?;
        Ok(())
    }

    /// The VM's tap in a container engine's namespace, joined to the
    /// engine's interface: what the guest is to wear, and the open tap.
    pub async fn attach_pod(
        &self,
        op: &OpId,
        netns: &str,
        tap: &str,
        owner_uid: u32,
    ) -> Result<(m::PodNetReady, std::os::fd::OwnedFd), NetworkError> {
        let (ready, fd) = self
            .helper
            .call_with_fd::<m::PodNetEnsureM>(
                op,
                &m::PodNet {
                    netns: netns.to_string(),
                    tap: tap.to_string(),
                    owner_uid,
                },
            )
            .await?;
        let fd = fd.ok_or_else(|| NetworkError::NoTapDescriptor { tap: tap.to_string() })?;
        Ok((ready, fd))
    }

    /// Removes what `attach_pod` made; a namespace the engine already
    /// removed took it along.
    pub async fn detach_pod(&self, op: &OpId, netns: &str, tap: &str) -> Result<(), NetworkError> {
        self.helper
            .call::<m::PodNetDeleteM>(
                op,
                &m::PodNetRef {
                    netns: netns.to_string(),
                    tap: tap.to_string(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn detach(&self, op: &OpId, tap: &str) -> Result<(), NetworkError> {
        self.helper
            .call::<m::TapDeleteM>(
                op,
                &m::LinkName {
                    name: tap.to_string(),
                },
            )
            .await?;
        Ok(())
    }

    /// Confines the guest on `tap` to its MAC and address, with NAT and
    /// traffic to other `peers` guests only when asked. Installed before
    /// the VMM starts: until then the tap drops everything.
    pub async fn guest_allow(&self, op: &OpId, guest: &GuestNet) -> Result<(), NetworkError> {
        let params = m::GuestNet {
            vm: guest.vm.clone(),
            tap: guest.tap.clone(),
            bridge: self.bridge.clone(),
            mac: guest.mac.clone(),
            ip: guest.ip.to_string(),
            nat: guest.nat,
            peers: guest.peers,
        };
        self.helper.call::<m::GuestAllowM>(op, &params).await?;
        Ok(())
    }

    /// Removes every rule of VM `vm` (anti-spoofing, NAT, peers).
    pub async fn guest_revoke(&self, op: &OpId, vm: &str) -> Result<(), NetworkError> {
        self.helper
            .call::<m::GuestRevokeM>(op, &m::GuestRef { vm: vm.to_string() })
            .await?;
        Ok(())
    }

    /// The VMs that have rules.
    pub async fn guest_list(&self, op: &OpId) -> Result<Vec<String>, NetworkError> {
        Ok(self
            .helper
            .call::<m::GuestListM>(op, &Default::default())
            .await?
            .vms)
    }
}

/// What the helper's rules let one guest do, bridge aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub vm: String,
    pub tap: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub nat: bool,
    pub peers: bool,
}
