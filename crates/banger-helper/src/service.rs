//! The `priv.*` methods: validate, then sequence idempotent effects.

use crate::error::NetError;
use crate::firewall::{mac_string, Guest};
use crate::net::{JailLink, Link, LinkKind, NetOps};
use crate::validate::{self, Invalid};
use banger_proto::methods::helper::{
    self as m, BridgeEnsure, Changed, GuestNet, GuestRef, GuestRules, HelperInfo, JailNet, JailNetReady,
    JailNetRef, LinkName, PodNet, PodNetReady, PodNetRef, TapCreate,
};
use banger_proto::{handler, Router, RpcError, PROTOCOL_VERSION};
use std::sync::Arc;

fn invalid(e: Invalid) -> RpcError {
    RpcError::bad_request(e.to_string())
}

fn failed(what: &str, e: NetError) -> RpcError {
    RpcError::failed(format!("{what}: {e}"))
}

pub struct PrivService<N> {
    net: N,
    /// Serialises changes to the guests' rules, so that two calls cannot
    /// both find an address free and both claim it.
    rules: tokio::sync::Mutex<()>,
}

impl<N: NetOps> PrivService<N> {
    pub fn new(net: N) -> Self {
        PrivService {
            net,
            rules: tokio::sync::Mutex::new(()),
        }
    }

    pub fn ping(&self) -> HelperInfo {
        HelperInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            protocol: PROTOCOL_VERSION,
        }
    }

    /// Finds the link `name` of `kind`, creating it with `create` when
    /// missing. Returns it and whether it was created. A link of another
    /// kind under that name is never touched.
    async fn ensure_link<F, Fut>(
        &self,
        name: &str,
        kind: LinkKind,
        what: &str,
        create: F,
    ) -> Result<(Link, bool), RpcError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), NetError>>,
    {
        match self
            .net
            .link(name)
            .await
            .map_err(|e| failed(&format!("looking up the {what}"), e))?
        {
            Some(l) if l.kind != kind => Err(RpcError::already_exists(format!(
                "{name} exists and is not a {what}"
            ))),
            Some(l) => Ok((l, false)),
            None => {
                if let Err(e) = create().await {
                    // Lost a race with a concurrent creator: theirs will do.
                    return match self.net.link(name).await {
                        Ok(Some(l)) if l.kind == kind => Ok((l, false)),
                        _ => Err(failed(&format!("creating the {what}"), e)),
                    };
                }
                let l = self
                    .net
                    .link(name)
                    .await
                    .map_err(|e| failed(&format!("looking up the new {what}"), e))?
                    .ok_or_else(|| RpcError::failed(format!("{what} {name} vanished after creation")))?;
                Ok((l, true))
            }
        }
    }

    pub async fn bridge_ensure(&self, p: BridgeEnsure) -> Result<Changed, RpcError> {
        validate::bridge_name(&p.name).map_err(invalid)?;
        let addr = p
            .address
            .as_deref()
            .map(validate::bridge_cidr)
            .transpose()
            .map_err(invalid)?;
        let (link, mut changed) = self
            .ensure_link(&p.name, LinkKind::Bridge, "bridge", || {
                self.net.create_bridge(&p.name)
            })
            .await?;
        if let Some((ip, len)) = addr {
            // One address, set once: a bridge that has another one is not
            // silently given a second, and "changed" says what happened.
            let have = self
                .net
                .addresses(link.index)
                .await
                .map_err(|e| failed("reading the bridge addresses", e))?;
            if !have.contains(&(ip, len)) {
                if let Some((other, olen)) = have.first() {
                    return Err(RpcError::new(
                        banger_proto::ErrorCode::AlreadyExists,
                        format!(
                            "bridge {} already has address {other}/{olen}; not adding {ip}/{len}",
                            p.name
                        ),
                    ));
                }
                self.net
                    .add_address(link.index, ip, len)
                    .await
                    .map_err(|e| failed("adding the bridge address", e))?;
                changed = true;
            }
        }
        if !link.up {
            self.net
                .set_up(link.index, None)
                .await
                .map_err(|e| failed("bringing the bridge up", e))?;
            changed = true;
        }
        Ok(Changed { changed })
    }

    /// `caller` is the peer's uid; see [`may_own`].
    pub async fn tap_create(&self, p: TapCreate, caller: u32) -> Result<Changed, RpcError> {
        validate::tap_name(&p.name).map_err(invalid)?;
        if let Some(uid) = p.owner_uid {
            may_own(caller, uid)?;
        }
        let controller = match &p.bridge {
            Some(b) => {
                validate::bridge_name(b).map_err(invalid)?;
                match self
                    .net
                    .link(b)
                    .await
                    .map_err(|e| failed("looking up the bridge", e))?
                {
                    Some(l) if l.kind == LinkKind::Bridge => Some(l.index),
                    _ => return Err(RpcError::not_found(format!("bridge {b} does not exist"))),
                }
            }
            None => None,
        };
        let (link, mut changed) = self
            .ensure_link(&p.name, LinkKind::Tap, "tap", || {
                self.net.create_tap(&p.name, p.owner_uid)
            })
            .await?;
        if !link.up || link.controller != controller {
            self.net
                .set_up(link.index, controller)
                .await
                .map_err(|e| failed("bringing the tap up", e))?;
            changed = true;
        }
        Ok(Changed { changed })
    }

    /// A jailed VM's network: its namespace, its tap inside (owned as
    /// `tap_create` allows), and the veth pair to the bridge, whose host
    /// end takes the tap's name so the guest's rules apply to it as to a
    /// tap. Refused if that name is held by anything but such a veth.
    pub async fn jail_net_ensure(&self, p: JailNet, caller: u32) -> Result<JailNetReady, RpcError> {
        validate::vm_tag(&p.vm).map_err(invalid)?;
        let peer = validate::jail_peer(&p.tap).map_err(invalid)?;
        validate::bridge_name(&p.bridge).map_err(invalid)?;
        may_own(caller, p.owner_uid)?;
        let bridge = self.bridge(&p.bridge).await?;
        for name in [&p.tap, &peer] {
            match self
                .net
                .link(name)
                .await
                .map_err(|e| failed("looking up the VM's port", e))?
            {
                None => {}
                Some(l) if l.kind == LinkKind::Veth => {}
                Some(_) => {
                    return Err(RpcError::already_exists(format!(
                        "{name} exists and is not a jailed VM's port"
                    )))
                }
            }
        }
        let link = JailLink {
            netns: crate::netns::path_for(&p.vm),
            tap: p.tap,
            peer,
            bridge: bridge.index,
            owner_uid: p.owner_uid,
        };
        let changed = self
            .net
            .ensure_jail_net(&link)
            .await
            .map_err(|e| failed("making the VM's network namespace", e))?;
        Ok(JailNetReady {
            changed,
            netns: link.netns.display().to_string(),
        })
    }

    pub async fn jail_net_delete(&self, p: JailNetRef) -> Result<Changed, RpcError> {
        validate::vm_tag(&p.vm).map_err(invalid)?;
        let peer = validate::jail_peer(&p.tap).map_err(invalid)?;
        let changed = self
            .net
            .delete_jail_net(&crate::netns::path_for(&p.vm), &p.tap, &peer)
            .await
            .map_err(|e| failed("removing the VM's network namespace", e))?;
        Ok(Changed { changed })
    }

    /// A VM's tap in a container engine's namespace, joined to the
    /// engine's interface (see `podnet`), and its open descriptor.
    pub async fn pod_net_ensure(
        &self,
        p: PodNet,
        caller: u32,
    ) -> Result<(PodNetReady, std::os::fd::OwnedFd), RpcError> {
        validate::tap_name(&p.tap).map_err(invalid)?;
        let ns = crate::podnet::engine_namespace(&p.netns).map_err(RpcError::bad_request)?;
        may_own(caller, p.owner_uid)?;
        let (a, fd, changed) = self
            .net
            .ensure_pod_net(&ns, &p.tap, p.owner_uid)
            .await
            .map_err(|e| failed("joining the VM to the engine's network", e))?;
        Ok((
            PodNetReady {
                changed,
                address: format!("{}/{}", a.ip, a.prefix),
                gateway: a.gateway.map(|g| g.to_string()),
                mac: mac_string(&a.mac),
                mtu: a.mtu,
            },
            fd,
        ))
    }

    pub async fn pod_net_delete(&self, p: PodNetRef) -> Result<Changed, RpcError> {
        validate::tap_name(&p.tap).map_err(invalid)?;
        crate::podnet::engine_namespace_name(&p.netns).map_err(RpcError::bad_request)?;
        if std::fs::symlink_metadata(&p.netns).is_err() {
            // The engine removed its namespace first: the tap went with it.
            return Ok(Changed { changed: false });
        }
        let ns = crate::podnet::engine_namespace(&p.netns).map_err(RpcError::bad_request)?;
        let changed = self
            .net
            .delete_pod_net(&ns, &p.tap)
            .await
            .map_err(|e| failed("removing the VM's link from the engine's network", e))?;
        Ok(Changed { changed })
    }

    pub async fn tap_open(&self, p: LinkName) -> Result<std::os::fd::OwnedFd, RpcError> {
        validate::tap_name(&p.name).map_err(invalid)?;
        match self
            .net
            .link(&p.name)
            .await
            .map_err(|e| failed("looking up the tap", e))?
        {
            Some(l) if l.kind == LinkKind::Tap => self
                .net
                .open_tap(&p.name)
                .await
                .map_err(|e| failed("opening the tap", e)),
            Some(_) => Err(RpcError::bad_request(format!("{} is not a tap", p.name))),
            None => Err(RpcError::not_found(format!("tap {} does not exist", p.name))),
        }
    }

    /// Looks up bridge `name`; not found unless it exists and is a bridge.
    async fn bridge(&self, name: &str) -> Result<Link, RpcError> {
        match self
            .net
            .link(name)
            .await
            .map_err(|e| failed("looking up the bridge", e))?
        {
            Some(l) if l.kind == LinkKind::Bridge => Ok(l),
            _ => Err(RpcError::not_found(format!("bridge {name} does not exist"))),
        }
    }

    /// Confines a guest to its tap: only its MAC and address get in, NAT
    /// and peer traffic only when asked. Everything is checked against the
    /// host as it is: the bridge exists, the tap is a tap on that bridge,
    /// the address is a guest address of the bridge's subnet, and no other
    /// VM's rules hold the tap, the MAC or the address.
    pub async fn guest_allow(&self, p: GuestNet) -> Result<Changed, RpcError> {
        validate::vm_tag(&p.vm).map_err(invalid)?;
        validate::tap_name(&p.tap).map_err(invalid)?;
        validate::bridge_name(&p.bridge).map_err(invalid)?;
        let mac = validate::mac(&p.mac).map_err(invalid)?;
        let ip = validate::ipv4(&p.ip).map_err(invalid)?;
        let bridge = self.bridge(&p.bridge).await?;
        let subnets = self
            .net
            .addresses(bridge.index)
            .await
            .map_err(|e| failed("reading the bridge addresses", e))?;
        if !subnets.iter().any(|s| validate::guest_in_subnet(ip, *s)) {
            return Err(RpcError::bad_request(format!(
                "{ip} is not a guest address on bridge {}",
                p.bridge
            )));
        }
        match self
            .net
            .link(&p.tap)
            .await
            .map_err(|e| failed("looking up the tap", e))?
        {
            Some(l) if is_port(&l) && l.controller == Some(bridge.index) => {}
            Some(l) if is_port(&l) => {
                return Err(RpcError::bad_request(format!(
                    "tap {} is not attached to bridge {}",
                    p.tap, p.bridge
                )))
            }
            Some(_) => return Err(RpcError::bad_request(format!("{} is not a tap", p.tap))),
            None => return Err(RpcError::not_found(format!("tap {} does not exist", p.tap))),
        }
        let guest = Guest {
            vm: p.vm,
            tap: p.tap,
            bridge: p.bridge,
            mac,
            ip,
            nat: p.nat,
            peers: p.peers,
        };
        let _g = self.rules.lock().await;
        let claims = self
            .net
            .guest_claims()
            .await
            .map_err(|e| failed("reading the guests' rules", e))?;
        let (mac_s, ip_s) = (mac_string(&mac), ip.to_string());
        for c in claims.iter().filter(|c| c.vm != guest.vm) {
            let what = if c.tap.as_deref() == Some(guest.tap.as_str()) {
                Some(format!("tap {}", guest.tap))
            } else if c.mac.as_deref() == Some(mac_s.as_str()) {
                Some(format!("MAC {mac_s}"))
            } else if c.ip.as_deref() == Some(ip_s.as_str()) {
                Some(format!("address {ip_s}"))
            } else {
                None
            };
            if let Some(what) = what {
                return Err(RpcError::already_exists(format!(
                    "{what} belongs to VM {}; not giving it to VM {}",
                    c.vm, guest.vm
                )));
            }
        }
        let changed = self
            .net
            .guest_allow(&guest)
            .await
            .map_err(|e| failed("installing the guest's rules", e))?;
        Ok(Changed { changed })
    }

    pub async fn guest_revoke(&self, p: GuestRef) -> Result<Changed, RpcError> {
        validate::vm_tag(&p.vm).map_err(invalid)?;
        let _g = self.rules.lock().await;
        let changed = self
            .net
            .guest_revoke(&p.vm)
            .await
            .map_err(|e| failed("removing the guest's rules", e))?;
        Ok(Changed { changed })
    }

    pub async fn guest_list(&self) -> Result<GuestRules, RpcError> {
        let claims = self
            .net
            .guest_claims()
            .await
            .map_err(|e| failed("listing the guests' rules", e))?;
        Ok(GuestRules {
            vms: claims.into_iter().map(|c| c.vm).collect(),
        })
    }

    pub async fn tap_delete(&self, p: LinkName) -> Result<Changed, RpcError> {
        validate::tap_name(&p.name).map_err(invalid)?;
        match self
            .net
            .link(&p.name)
            .await
            .map_err(|e| failed("looking up the tap", e))?
        {
            None => Ok(Changed { changed: false }),
            Some(l) if l.kind != LinkKind::Tap => Err(RpcError::bad_request(format!(
                "{} is not a tap; refusing to delete it",
                p.name
            ))),
            Some(l) => {
                self.net
                    .delete_link(l.index)
                    .await
                    .map_err(|e| failed("deleting the tap", e))?;
                Ok(Changed { changed: true })
            }
        }
    }
}

/// A guest's port on the bridge: its tap, or the host end of its veth
/// when its VMM runs in a namespace of its own.
fn is_port(l: &Link) -> bool {
    matches!(l.kind, LinkKind::Tap | LinkKind::Veth)
}

/// An unprivileged caller may give a link only to itself, never to anyone
/// else (root included). Root may give one to any uid (a daemon running as
/// root gives each jailed Firecracker's tap to that VM's own uid): root
/// needs no helper to do that, so nothing is granted that it did not have.
fn may_own(caller: u32, uid: u32) -> Result<(), RpcError> {
    if uid == caller || caller == 0 {
        Ok(())
    } else {
        Err(RpcError::new(
            banger_proto::ErrorCode::Unauthorized,
            format!("uid {caller} may not create a tap owned by uid {uid}"),
        ))
    }
}

/// The helper's router: root and `owner_uid` may call it, nobody else.
pub fn router<N: NetOps>(svc: Arc<PrivService<N>>, owner_uid: u32) -> Router {
    Router::new("helper")
        .authorize(move |uid| uid == 0 || uid == owner_uid)
        // Far above what a daemon starting many VMs at once needs.
        .max_connections_per_uid(64)
        .method::<m::Ping, _, _>(handler!(svc, |_, _| Ok(svc.ping())))
        .method::<m::BridgeEnsureM, _, _>(handler!(svc, |_, p| svc.bridge_ensure(p).await))
        .method::<m::TapCreateM, _, _>(handler!(svc, |ctx, p| svc.tap_create(p, ctx.peer_uid).await))
        .method::<m::TapDeleteM, _, _>(handler!(svc, |_, p| svc.tap_delete(p).await))
        .method::<m::TapOpenM, _, _>(handler!(svc, |ctx, p| {
            ctx.attach_fd(svc.tap_open(p).await?);
            Ok(Changed { changed: false })
        }))
        .method::<m::GuestAllowM, _, _>(handler!(svc, |_, p| svc.guest_allow(p).await))
        .method::<m::GuestRevokeM, _, _>(handler!(svc, |_, p| svc.guest_revoke(p).await))
        .method::<m::GuestListM, _, _>(handler!(svc, |_, _| svc.guest_list().await))
        .method::<m::JailNetEnsureM, _, _>(handler!(svc, |ctx, p| svc.jail_net_ensure(p, ctx.peer_uid).await))
        .method::<m::JailNetDeleteM, _, _>(handler!(svc, |_, p| svc.jail_net_delete(p).await))
        .method::<m::PodNetEnsureM, _, _>(handler!(svc, |ctx, p| {
            let (ready, fd) = svc.pod_net_ensure(p, ctx.peer_uid).await?;
            ctx.attach_fd(fd);
            Ok(ready)
        }))
        .method::<m::PodNetDeleteM, _, _>(handler!(svc, |_, p| svc.pod_net_delete(p).await))
}

#[cfg(test)]
mod fake_net;

#[cfg(test)]
mod tests {
    use super::fake_net::FakeNetForTests;
    use super::*;

    fn br(name: &str) -> BridgeEnsure {
        BridgeEnsure {
            name: name.into(),
            address: Some("172.30.0.1/24".into()),
        }
    }

    #[tokio::test]
    async fn ensure_is_idempotent() {
        let s = PrivService::new(FakeNetForTests::default());
        assert!(s.bridge_ensure(br("banger0")).await.unwrap().changed);
        assert!(!s.bridge_ensure(br("banger0")).await.unwrap().changed);
        let tap = TapCreate {
            name: "bgt1".into(),
            bridge: Some("banger0".into()),
            owner_uid: None,
        };
        assert!(s.tap_create(tap.clone(), 0).await.unwrap().changed);
        assert!(!s.tap_create(tap, 0).await.unwrap().changed);
        assert!(
            s.tap_delete(LinkName { name: "bgt1".into() })
                .await
                .unwrap()
                .changed
        );
        assert!(
            !s.tap_delete(LinkName { name: "bgt1".into() })
                .await
                .unwrap()
                .changed
        );
    }

    #[tokio::test]
    async fn bad_names_cause_no_effect() {
        let s = PrivService::new(FakeNetForTests::default());
        for name in ["eth0", "docker0", "lo"] {
            assert_eq!(
                s.bridge_ensure(br(name)).await.unwrap_err().code,
                banger_proto::ErrorCode::BadRequest
            );
            let e = s.tap_delete(LinkName { name: name.into() }).await.unwrap_err();
            assert_eq!(e.code, banger_proto::ErrorCode::BadRequest);
        }
        assert!(
            s.net.calls().is_empty(),
            "effects ran for bad input: {:?}",
            s.net.calls()
        );
    }

    fn guest(vm: &str, tap: &str, mac: &str, ip: &str) -> GuestNet {
        GuestNet {
            vm: vm.into(),
            tap: tap.into(),
            bridge: "banger0".into(),
            mac: mac.into(),
            ip: ip.into(),
            nat: true,
            peers: false,
        }
    }

    fn code(r: Result<Changed, RpcError>) -> banger_proto::ErrorCode {
        r.unwrap_err().code
    }

    /// A bridge with 172.30.0.1/24 and the taps `bgta` and `bgtb` on it.
    async fn with_taps() -> PrivService<FakeNetForTests> {
        let s = PrivService::new(FakeNetForTests::default());
        s.bridge_ensure(br("banger0")).await.unwrap();
        for t in ["bgta", "bgtb"] {
            let tap = TapCreate {
                name: t.into(),
                bridge: Some("banger0".into()),
                owner_uid: None,
            };
            s.tap_create(tap, 0).await.unwrap();
        }
        s
    }

    fn guest_calls(s: &PrivService<FakeNetForTests>) -> Vec<String> {
        s.net
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("guest_"))
            .collect()
    }

    #[tokio::test]
    async fn guest_inputs_are_validated_before_any_effect() {
        let s = PrivService::new(FakeNetForTests::default());
        let good = || guest("ab12", "bgta", "52:54:00:ab:12:00", "172.30.0.5");
        for bad in [
            GuestNet {
                ip: "172.30.0.5; flush ruleset".into(),
                ..good()
            },
            GuestNet {
                bridge: "eth0".into(),
                ..good()
            },
            GuestNet {
                tap: "eth0".into(),
                ..good()
            },
            GuestNet {
                vm: "AB\"; drop".into(),
                ..good()
            },
            GuestNet {
                ip: "127.0.0.1".into(),
                ..good()
            },
            GuestNet {
                mac: "ff:ff:ff:ff:ff:ff".into(),
                ..good()
            },
            GuestNet {
                mac: "52:54:00:ab:12:00\" accept".into(),
                ..good()
            },
        ] {
            assert_eq!(
                code(s.guest_allow(bad).await),
                banger_proto::ErrorCode::BadRequest
            );
        }
        assert!(s.net.calls().is_empty());
        // No such bridge; then a bridge, and guests outside its subnet.
        assert_eq!(
            code(s.guest_allow(good()).await),
            banger_proto::ErrorCode::NotFound
        );
        let s = with_taps().await;
        for ip in [
            "8.8.8.8",
            "172.30.0.0",
            "172.30.0.255",
            "172.30.0.1",
            "172.30.1.5",
        ] {
            let g = GuestNet {
                ip: ip.into(),
                ..good()
            };
            assert_eq!(
                code(s.guest_allow(g).await),
                banger_proto::ErrorCode::BadRequest,
                "{ip}"
            );
        }
        // A tap that does not exist, or is not on this bridge.
        let g = GuestNet {
            tap: "bgtnone".into(),
            ..good()
        };
        assert_eq!(code(s.guest_allow(g).await), banger_proto::ErrorCode::NotFound);
        s.net.add("bgtloose", LinkKind::Tap);
        let g = GuestNet {
            tap: "bgtloose".into(),
            ..good()
        };
        assert_eq!(code(s.guest_allow(g).await), banger_proto::ErrorCode::BadRequest);
        s.net.add("bgtveth", LinkKind::Other);
        let g = GuestNet {
            tap: "bgtveth".into(),
            ..good()
        };
        assert_eq!(code(s.guest_allow(g).await), banger_proto::ErrorCode::BadRequest);
        assert!(guest_calls(&s).is_empty(), "{:?}", s.net.calls());
        assert!(s.guest_allow(good()).await.unwrap().changed);
        assert_eq!(guest_calls(&s), ["guest_allow ab12"]);
    }

    #[tokio::test]
    async fn no_two_vms_hold_the_same_tap_mac_or_address() {
        let s = with_taps().await;
        let a = guest("aaaa", "bgta", "52:54:00:aa:aa:00", "172.30.0.2");
        assert!(s.guest_allow(a.clone()).await.unwrap().changed);
        assert!(
            !s.guest_allow(a.clone()).await.unwrap().changed,
            "same rules twice"
        );
        for (what, b) in [
            (
                "address",
                guest("bbbb", "bgtb", "52:54:00:bb:bb:00", "172.30.0.2"),
            ),
            ("MAC", guest("bbbb", "bgtb", "52:54:00:aa:aa:00", "172.30.0.3")),
            ("tap", guest("bbbb", "bgta", "52:54:00:bb:bb:00", "172.30.0.3")),
        ] {
            let e = s.guest_allow(b).await.unwrap_err();
            assert_eq!(e.code, banger_proto::ErrorCode::AlreadyExists, "{what}");
            assert!(
                e.message.contains(what) && e.message.contains("aaaa"),
                "{}",
                e.message
            );
        }
        // The same VM may change its own rules (NAT off), and once its
        // rules are gone its address is free for another.
        let a_no_nat = GuestNet { nat: false, ..a };
        assert!(s.guest_allow(a_no_nat).await.unwrap().changed);
        assert!(
            s.guest_revoke(GuestRef { vm: "aaaa".into() })
                .await
                .unwrap()
                .changed
        );
        assert!(
            !s.guest_revoke(GuestRef { vm: "aaaa".into() })
                .await
                .unwrap()
                .changed
        );
        let b = guest("bbbb", "bgtb", "52:54:00:bb:bb:00", "172.30.0.2");
        assert!(s.guest_allow(b).await.unwrap().changed);
        assert_eq!(s.guest_list().await.unwrap().vms, ["bbbb"]);
        assert_eq!(
            s.guest_revoke(GuestRef { vm: "x;y".into() })
                .await
                .unwrap_err()
                .code,
            banger_proto::ErrorCode::BadRequest
        );
    }

    #[tokio::test]
    async fn a_bridge_gets_one_address_once_and_says_so() {
        let s = PrivService::new(FakeNetForTests::default());
        assert!(s.bridge_ensure(br("banger0")).await.unwrap().changed);
        assert!(!s.bridge_ensure(br("banger0")).await.unwrap().changed);
        let other = BridgeEnsure {
            name: "banger0".into(),
            address: Some("172.31.0.1/24".into()),
        };
        assert_eq!(
            s.bridge_ensure(other).await.unwrap_err().code,
            banger_proto::ErrorCode::AlreadyExists
        );
        let adds = s
            .net
            .calls()
            .iter()
            .filter(|c| c.starts_with("add_address"))
            .count();
        assert_eq!(adds, 1, "{:?}", s.net.calls());
    }

    #[tokio::test]
    async fn unprivileged_callers_make_taps_only_for_themselves() {
        let s = PrivService::new(FakeNetForTests::default());
        let tap = |owner| TapCreate {
            name: "bgtown".into(),
            bridge: None,
            owner_uid: owner,
        };
        // The owner asking for a root-owned tap, or someone else's.
        for (caller, owner) in [(1000, Some(0)), (1000, Some(1001))] {
            assert_eq!(
                s.tap_create(tap(owner), caller).await.unwrap_err().code,
                banger_proto::ErrorCode::Unauthorized,
                "caller {caller} owner {owner:?}"
            );
        }
        assert!(s.net.calls().is_empty());
        s.tap_create(tap(Some(1000)), 1000).await.unwrap();
        s.tap_create(tap(Some(1000)), 0).await.unwrap();
        // Root gives a jailed VM's tap to that VM's own uid.
        s.tap_create(tap(Some(200_003)), 0).await.unwrap();
    }

    #[tokio::test]
    async fn never_deletes_what_is_not_a_tap() {
        let s = PrivService::new(FakeNetForTests::default());
        s.net.add("bgtveth", LinkKind::Other);
        assert!(s
            .tap_delete(LinkName {
                name: "bgtveth".into()
            })
            .await
            .is_err());
        assert!(s.net.calls().is_empty());
    }

    fn jail(vm: &str, tap: &str, uid: u32) -> JailNet {
        JailNet {
            vm: vm.into(),
            tap: tap.into(),
            bridge: "banger0".into(),
            owner_uid: uid,
        }
    }

    #[tokio::test]
    async fn a_jailed_vms_network_is_validated_before_any_effect() {
        let s = with_taps().await;
        let before = s.net.calls().len();
        let refused = [
            (jail("../x", "bgt1", 0), 0, "vm tag"),
            (jail("a1", "eth0", 0), 0, "not a banger tap"),
            (jail("a1", "bgt", 0), 0, "bare prefix"),
            (jail("a1", "bgt1", 0), 1000, "someone else's uid"),
            (
                JailNet {
                    bridge: "banger9".into(),
                    ..jail("a1", "bgt1", 0)
                },
                0,
                "no such bridge",
            ),
            // bgta is a real tap: never taken over as a port.
            (jail("a1", "bgta", 0), 0, "name held by a tap"),
        ];
        for (p, caller, why) in refused {
            assert!(s.jail_net_ensure(p, caller).await.is_err(), "{why}");
        }
        assert!(
            s.jail_net_delete(JailNetRef {
                vm: "a/b".into(),
                tap: "bgt1".into()
            })
            .await
            .is_err(),
            "delete with a bad tag"
        );
        assert_eq!(s.net.calls().len(), before, "{:?}", s.net.calls());

        let made = s.jail_net_ensure(jail("a1", "bgt1", 1000), 1000).await.unwrap();
        assert!(made.changed);
        assert_eq!(made.netns, "/run/netns/banger-a1");
        assert!(s
            .net
            .calls()
            .contains(&"ensure_jail_net /run/netns/banger-a1 bgt1 bgn1 uid=1000".to_string()));
        assert!(
            !s.jail_net_ensure(jail("a1", "bgt1", 1000), 1000)
                .await
                .unwrap()
                .changed
        );
        // The veth is a port the guest's rules may name.
        assert!(s
            .guest_allow(guest("a1", "bgt1", "52:54:00:00:00:09", "172.30.0.9"))
            .await
            .is_ok());
        let r = JailNetRef {
            vm: "a1".into(),
            tap: "bgt1".into(),
        };
        assert!(s.jail_net_delete(r.clone()).await.unwrap().changed);
        assert!(!s.jail_net_delete(r).await.unwrap().changed);
    }
}
