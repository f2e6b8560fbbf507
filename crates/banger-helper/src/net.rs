//! Privileged network effects behind a trait, so the service's validation and
//! sequencing can be tested without root (youki's approach). `LinuxNet` is
//! the real implementation: rtnetlink for links and addresses, the TUN ioctls
//! for persistent taps.

use crate::error::NetError;
use crate::firewall::{self, Claim, Guest};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Tap,
    /// One end of a veth pair: a jailed VM's port on the bridge.
    Veth,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub kind: LinkKind,
    pub up: bool,
    pub controller: Option<u32>,
}

/// The network effects the helper performs. Every method is given names the
/// service has already validated.
pub trait NetOps: Send + Sync + 'static {
    fn link(&self, name: &str) -> impl Future<Output = Result<Option<Link>, NetError>> + Send;
    fn create_bridge(&self, name: &str) -> impl Future<Output = Result<(), NetError>> + Send;
    fn create_tap(
        &self,
        name: &str,
        owner_uid: Option<u32>,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
    fn set_up(
        &self,
        index: u32,
        controller: Option<u32>,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
    fn add_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> impl Future<Output = Result<(), NetError>> + Send;
    fn delete_link(&self, index: u32) -> impl Future<Output = Result<(), NetError>> + Send;
    /// The IPv4 addresses (with prefix length) on link `index`.
    fn addresses(&self, index: u32) -> impl Future<Output = Result<Vec<(Ipv4Addr, u8)>, NetError>> + Send;
    /// Opens an existing persistent tap; the descriptor carries its traffic.
    fn open_tap(&self, name: &str) -> impl Future<Output = Result<std::os::fd::OwnedFd, NetError>> + Send;
    /// Installs one guest's rules (replacing its old ones); false when
    /// they were there already.
    fn guest_allow(&self, g: &Guest) -> impl Future<Output = Result<bool, NetError>> + Send;
    /// Removes every rule of `vm`; false when it had none.
    fn guest_revoke(&self, vm: &str) -> impl Future<Output = Result<bool, NetError>> + Send;
    /// What each VM with rules holds.
    fn guest_claims(&self) -> impl Future<Output = Result<Vec<Claim>, NetError>> + Send;
    /// Makes or completes a jailed VM's network (see [`JailLink`]); false
    /// when all of it was there.
    fn ensure_jail_net(&self, j: &JailLink) -> impl Future<Output = Result<bool, NetError>> + Send;
    /// Removes a jailed VM's veth pair and namespace; false when neither
    /// was there. Links that are not veths are left alone.
    fn delete_jail_net(
        &self,
        netns: &Path,
        tap: &str,
        peer: &str,
    ) -> impl Future<Output = Result<bool, NetError>> + Send;
    /// Makes or completes a VM's tap in an engine's namespace (checked by
    /// `podnet::engine_namespace`) joined to its interface: what the guest
    /// is to wear, the open tap, and whether anything was made.
    fn ensure_pod_net(
        &self,
        netns: &Path,
        tap: &str,
        owner_uid: u32,
    ) -> impl Future<Output = Result<(crate::podnet::PodAddress, std::os::fd::OwnedFd, bool), NetError>> + Send;
    /// Removes the tap and its redirects from an engine's namespace; false
    /// when there was no tap.
    fn delete_pod_net(&self, netns: &Path, tap: &str) -> impl Future<Output = Result<bool, NetError>> + Send;
}

/// A jailed VM's network, validated: in namespace `netns`, the tap `tap`
/// (owned by `owner_uid`) and the veth end `peer` are ports of a bridge
/// of the namespace's own; the other end of the veth, named `tap` too, is
/// a port of the host bridge `bridge` (an index), where the guest's rules
/// match it by that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLink {
    pub netns: PathBuf,
    pub tap: String,
    pub peer: String,
    pub bridge: u32,
    pub owner_uid: u32,
}

/// The bridge inside a jailed VM's namespace joining its tap and its veth.
const JAIL_BRIDGE: &str = "banger-jail";

/// The real thing.
pub struct LinuxNet {
    handle: Handle,
}

impl LinuxNet {
    /// Opens a netlink connection; must be called inside a tokio runtime.
    pub fn new() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetError::Os {
            what: "opening a netlink socket".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(LinuxNet { handle })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `f` with a netlink connection made on this thread, on a
    /// runtime of the thread's own: a thread that entered a namespace
    /// speaks for it, and no pool thread may be left in one.
    pub(crate) fn here<T, F, Fut>(f: F) -> Result<T, NetError>
    where
        F: FnOnce(LinuxNet) -> Fut,
        Fut: Future<Output = Result<T, NetError>>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| NetError::Os {
                what: "starting a runtime in the namespace".into(),
                source,
            })?;
        rt.block_on(async { f(LinuxNet::new()?).await })
    }
}

fn describe(msg: &LinkMessage) -> Link {
    let mut kind = LinkKind::Other;
    let mut controller = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = match k {
                            InfoKind::Bridge => LinkKind::Bridge,
                            InfoKind::Tun => LinkKind::Tap,
                            InfoKind::Veth => LinkKind::Veth,
                            _ => LinkKind::Other,
                        };
                    }
                }
            }
            LinkAttribute::Controller(c) => controller = Some(*c),
            _ => {}
        }
    }
    let up = msg
        .header
        .flags
        .contains(rtnetlink::packet_route::link::LinkFlags::Up);
    Link {
        index: msg.header.index,
        kind,
        up,
        controller,
    }
}

impl LinuxNet {
    pub(crate) async fn dump_addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, rtnetlink::Error> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut found = Vec::new();
        let mut msgs = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = msgs.try_next().await? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                    found.push((*ip, msg.header.prefix_len));
                }
            }
        }
        Ok(found)
    }
}

impl NetOps for LinuxNet {
    async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(describe(&msg))),
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn create_bridge(&self, name: &str) -> Result<(), NetError> {
        Ok(self
            .handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await?)
    }

    async fn create_tap(&self, name: &str, owner_uid: Option<u32>) -> Result<(), NetError> {
        let name = name.to_string();
        tokio::task::spawn_blocking(move || tun::create_persistent_tap(&name, owner_uid))
            .await
            .map_err(|e| NetError::Os {
                what: "tap creation task".into(),
                source: std::io::Error::other(e),
            })?
    }

    async fn set_up(&self, index: u32, controller: Option<u32>) -> Result<(), NetError> {
        let mut msg = LinkUnspec::new_with_index(index).up();
        if let Some(c) = controller {
            msg = msg.controller(c);
        }
        Ok(self.handle.link().set(msg.build()).execute().await?)
    }

    async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        Ok(self
            .handle
            .address()
            .add(index, ip.into(), prefix)
            .replace()
            .execute()
            .await?)
    }

    async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        // A dump that races a concurrent change (two VMs starting at once)
        // is refused with EBUSY: read it again.
        let mut tries = 0;
        loop {
            match self.dump_addresses(index).await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EBUSY && tries < 10 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    async fn open_tap(&self, name: &str) -> Result<std::os::fd::OwnedFd, NetError> {
        let name = name.to_string();
        tokio::task::spawn_blocking(move || tun::open_tap(&name))
            .await
            .map_err(|e| NetError::Os {
                what: "tap open task".into(),
                source: std::io::Error::other(e),
            })?
    }

    async fn guest_allow(&self, g: &Guest) -> Result<bool, NetError> {
        firewall::allow(g).await
    }

    async fn guest_revoke(&self, vm: &str) -> Result<bool, NetError> {
        firewall::revoke(vm).await
    }

    async fn guest_claims(&self) -> Result<Vec<Claim>, NetError> {
        firewall::claims().await
    }

    async fn delete_link(&self, index: u32) -> Result<(), NetError> {
        let mut links = self.handle.link();
        Ok(links.del(index).execute().await?)
    }

    async fn ensure_jail_net(&self, j: &JailLink) -> Result<bool, NetError> {
        let mut changed = crate::netns::create(&j.netns).await?;
        if self.link(&j.tap).await?.is_none() {
            // A crash between making the pair and moving its end away
            // leaves that end here, alone once its partner is gone.
            if let Some(stale) = self.link(&j.peer).await? {
                self.delete_link(stale.index).await?;
            }
            self.handle
                .link()
                .add(LinkVeth::new(&j.tap, &j.peer).build())
                .execute()
                .await?;
            changed = true;
        }
        if self.link(&j.peer).await?.is_some() {
            let ns = std::fs::File::open(&j.netns).map_err(|source| NetError::Os {
                what: format!("opening {}", j.netns.display()),
                source,
            })?;
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_name(&j.peer)
                        .setns_by_fd(ns.as_raw_fd())
                        .build(),
                )
                .execute()
                .await?;
            changed = true;
        }
        let host = self
            .link(&j.tap)
            .await?
            .ok_or_else(|| NetError::NoLink(j.tap.clone()))?;
        if !host.up || host.controller != Some(j.bridge) {
            self.set_up(host.index, Some(j.bridge)).await?;
            changed = true;
        }
        let (tap, peer, owner) = (j.tap.clone(), j.peer.clone(), j.owner_uid);
        Ok(crate::netns::run_in(&j.netns, move || inside_jail(&tap, &peer, owner)).await? || changed)
    }

    async fn delete_jail_net(&self, netns: &Path, tap: &str, peer: &str) -> Result<bool, NetError> {
        let mut changed = false;
        for name in [tap, peer] {
            if let Some(l) = self.link(name).await? {
                if l.kind == LinkKind::Veth {
                    // Either end takes its partner with it.
                    self.delete_link(l.index).await?;
                    changed = true;
                }
            }
        }
        Ok(crate::netns::remove(netns)? || changed)
    }

    async fn ensure_pod_net(
        &self,
        netns: &Path,
        tap: &str,
        owner_uid: u32,
    ) -> Result<(crate::podnet::PodAddress, std::os::fd::OwnedFd, bool), NetError> {
        let tap = tap.to_string();
        crate::netns::run_in(netns, move || crate::podnet::ensure_inside(&tap, owner_uid)).await
    }

    async fn delete_pod_net(&self, netns: &Path, tap: &str) -> Result<bool, NetError> {
        if !crate::podnet::still_there(netns) {
            return Ok(false);
        }
        let tap = tap.to_string();
        crate::netns::run_in(netns, move || crate::podnet::delete_inside(&tap)).await
    }
}

/// Inside a jailed VM's namespace (on the thread that entered it): the
/// loopback up, the VM's tap, and a bridge joining the tap to the veth.
/// Its own netlink socket, made here, speaks for this namespace.
fn inside_jail(tap: &str, peer: &str, owner_uid: u32) -> Result<bool, NetError> {
    LinuxNet::here(|net| async move {
        let mut changed = false;
        if let Some(lo) = net.link("lo").await? {
            if !lo.up {
                net.set_up(lo.index, None).await?;
            }
        }
        if net.link(tap).await?.is_none() {
            tun::create_persistent_tap(tap, Some(owner_uid))?;
            changed = true;
        }
        if net.link(JAIL_BRIDGE).await?.is_none() {
            net.create_bridge(JAIL_BRIDGE).await?;
            changed = true;
        }
        let bridge = net
            .link(JAIL_BRIDGE)
            .await?
            .ok_or_else(|| NetError::NoLink(JAIL_BRIDGE.into()))?;
        if !bridge.up {
            net.set_up(bridge.index, None).await?;
            changed = true;
        }
        for name in [tap, peer] {
            let l = net
                .link(name)
                .await?
                .ok_or_else(|| NetError::NoLink(name.into()))?;
            if !l.up || l.controller != Some(bridge.index) {
                net.set_up(l.index, Some(bridge.index)).await?;
                changed = true;
            }
        }
        Ok(changed)
    })
}

/// The TUN/TAP ioctls: netlink cannot create a tap.
pub(crate) mod tun {
    use super::*;

    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;

    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }

    fn os(what: &str) -> NetError {
        NetError::Os {
            what: what.to_string(),
            source: std::io::Error::last_os_error(),
        }
    }

    /// Attaches a fresh /dev/net/tun descriptor to the tap `name`.
    fn attach(name: &str) -> Result<std::fs::File, NetError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| NetError::Os {
                what: "opening /dev/net/tun".into(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // A child this helper forks (`nft`, for another VM's rules) holds a
        // copy of every descriptor until it execs, close-on-exec or not: a
        // tap whose creating descriptor was just closed can read as still
        // attached (EBUSY) for that long. A tap a VMM really holds stays
        // busy, and is refused after the wait.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            // SAFETY: `req` is a properly sized, initialised ifreq that outlives the call.
            if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } >= 0 {
                return Ok(f);
            }
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= end {
                return Err(NetError::Os {
                    what: "TUNSETIFF".into(),
                    source,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    pub fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd, NetError> {
        Ok(attach(name)?.into())
    }

    pub fn create_persistent_tap(name: &str, owner_uid: Option<u32>) -> Result<(), NetError> {
        let f = attach(name)?;
        let fd = f.as_raw_fd();
        if let Some(uid) = owner_uid {
            // SAFETY: plain integer argument.
            if unsafe { libc::ioctl(fd, TUNSETOWNER, uid as libc::c_ulong) } < 0 {
                return Err(os("TUNSETOWNER"));
            }
        }
        // SAFETY: plain integer argument.
        if unsafe { libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(os("TUNSETPERSIST"));
        }
        Ok(())
    }
}
