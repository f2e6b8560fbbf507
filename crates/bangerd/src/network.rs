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

/// A VM's place on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}

impl NetworkService {
    /// Bridge address and prefix length from the configured CIDR.
    pub fn cidr(&self) -> Result<(std::net::Ipv4Addr, u8), RpcError> {
        let (ip, len) = self.bridge_address.split_once('/').ok_or_else(|| {
            RpcError::failed(format!(
                "bridge_address {:?} has no prefix length",
                self.bridge_address
            ))
        })?;
        let ip: std::net::Ipv4Addr = ip
            .parse()
            .map_err(|_| RpcError::failed(format!("bad bridge_address {:?}", self.bridge_address)))?;
        let len: u8 = len
            .parse()
            .map_err(|_| RpcError::failed(format!("bad bridge_address {:?}", self.bridge_address)))?;
        if !(8..=30).contains(&len) {
            return Err(RpcError::failed(format!(
                "bridge_address prefix must be 8-30, not {len}"
            )));
        }
        Ok((ip, len))
    }

    /// The lowest free address of the bridge's subnet. Called under the
    /// creation lock, with every address already leased.
    pub fn allocate(&self, used: &[std::net::Ipv4Addr]) -> Result<Lease, RpcError> {
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
            .ok_or_else(|| RpcError::failed(format!("no free address left in {}", self.bridge_address)))
    }

    /// Bridge, tap (attached to the bridge), and an open descriptor of it.
    pub async fn attach(&self, op: &OpId, tap: &str) -> Result<std::os::fd::OwnedFd, RpcError> {
        self.ensure(op).await?;
        self.helper
            .call::<m::TapCreateM>(
                op,
                &m::TapCreate {
                    name: tap.to_string(),
                    bridge: Some(self.bridge.clone()),
                    // SAFETY: getuid cannot fail.
                    owner_uid: Some(unsafe { libc::getuid() }),
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
        fd.ok_or_else(|| RpcError::failed("the root helper opened the tap but passed no descriptor"))
    }

    pub async fn detach(&self, op: &OpId, tap: &str) -> Result<(), RpcError> {
        self.helper
            .call::<m::TapDeleteM>(
                op,
                &m::LinkName {
                    name: tap.to_string(),
                },
            )
            .await
            .map(|_| ())
    }

    pub async fn nat_add(&self, op: &OpId, vm: &str, ip: std::net::Ipv4Addr) -> Result<(), RpcError> {
        let rule = m::NatRule {
            vm: vm.to_string(),
            guest_ip: ip.to_string(),
            bridge: self.bridge.clone(),
        };
        self.helper.call::<m::NatAddM>(op, &rule).await.map(|_| ())
    }

    pub async fn nat_remove(&self, op: &OpId, vm: &str) -> Result<(), RpcError> {
        self.helper
            .call::<m::NatRemoveM>(op, &m::NatRef { vm: vm.to_string() })
            .await
            .map(|_| ())
    }

    pub async fn nat_list(&self, op: &OpId) -> Result<Vec<String>, RpcError> {
        Ok(self
            .helper
            .call::<m::NatListM>(op, &Default::default())
            .await?
            .vms)
    }
}
