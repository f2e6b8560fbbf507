//! A VM's link in a container engine's network namespace.
//!
//! The engine (containerd's CRI plugin, through its CNI plugins) made the
//! namespace and gave it one interface, with the pod's address and routes.
//! The VM's tap is made in that namespace and joined to the interface by
//! two traffic-control redirects (ingress of each to egress of the other,
//! as Kata Containers does): every frame the engine's network sends the
//! pod reaches the guest, and every frame of the guest leaves through the
//! interface. The guest wears the interface's MAC and address, so to the
//! engine's network it is the pod. The namespace's own stack sees nothing.
//!
//! Only namespaces mounted directly under /run/netns are accepted, never
//! one banger keeps for its own VMs, and never the helper's own: the
//! redirects must not reach the host's interfaces.

use crate::error::NetError;
use crate::net::{tun, LinuxNet, NetOps};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What the guest is to wear, read from the engine's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddress {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// The form of a namespace path a caller may name: `/run/netns/NAME` (or
/// `/var/run/netns/NAME`), NAME of `[A-Za-z0-9._-]`, not `.`/`..`, and not
/// one banger keeps for its own VMs (`banger-…`).
pub fn engine_namespace_name(path: &str) -> Result<(), String> {
    let name = path
        .strip_prefix("/run/netns/")
        .or_else(|| path.strip_prefix("/var/run/netns/"))
        .ok_or_else(|| format!("network namespace {path:?} is not directly under /run/netns"))?;
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(format!(
            "network namespace name {name:?} must be of [A-Za-z0-9._-]"
        ));
    }
    if name.starts_with("banger-") {
        return Err(format!(
            "network namespace {path} is one banger keeps for its own VMs"
        ));
    }
    Ok(())
}

/// The namespace a caller names, checked: of the form above, then
/// resolved (`/var/run` is `/run`, and no symlink may lead elsewhere) to
/// a mounted namespace directly under /run/netns that is not the
/// helper's own.
pub fn engine_namespace(path: &str) -> Result<PathBuf, String> {
    engine_namespace_name(path)?;
    let real = std::fs::canonicalize(path).map_err(|e| format!("network namespace {path}: {e}"))?;
    let parent_ok = real.parent() == Some(Path::new(crate::netns::DIR));
    let name = real.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !parent_ok || engine_namespace_name(&format!("{}/{name}", crate::netns::DIR)).is_err() {
        return Err(format!("network namespace {path} resolves to {}", real.display()));
    }
    if !crate::netns::is_mounted(&real) {
        return Err(format!("{path} is not a mounted network namespace"));
    }
    let ns = std::fs::metadata(&real).map_err(|e| format!("{path}: {e}"))?;
    let own = std::fs::metadata("/proc/self/ns/net").map_err(|e| format!("the helper's namespace: {e}"))?;
    if (ns.dev(), ns.ino()) == (own.dev(), own.ino()) {
        return Err(format!("{path} is the helper's own network namespace"));
    }
    Ok(real)
}

fn name_of(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn os(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Os {
        what: what.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Removes link `index`'s ingress qdisc, and the filters with it; absent
/// is fine.
async fn clear_ingress(h: &rtnetlink::Handle, index: u32) {
    let mut del = h.qdisc().del(index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(0xffff_0000);
    let _ = del.execute().await;
}

/// The engine's interface: `eth0` (CNI's name for it), else the one link
/// with an address that is neither loopback nor a tap of ours.
async fn engine_interface(
    net: &LinuxNet,
    tap: &str,
) -> Result<(String, LinkMessage, Ipv4Addr, u8), NetError> {
    let links: Vec<LinkMessage> = net.handle().link().get().execute().try_collect().await?;
    let mut candidates = Vec::new();
    for l in links {
        let Some(name) = name_of(&l).map(str::to_string) else {
            continue;
        };
        if name == "lo" || name == tap || name.starts_with(crate::validate::TAP_PREFIX) {
            continue;
        }
        if let Some((ip, prefix)) = net.dump_addresses(l.header.index).await?.first().copied() {
            candidates.push((name, l, ip, prefix));
        }
    }
    match candidates.iter().position(|c| c.0 == "eth0") {
        Some(i) => Ok(candidates.swap_remove(i)),
        None if candidates.len() == 1 => Ok(candidates.remove(0)),
        None => Err(os(
            "finding the engine's interface",
            format!(
                "{} interfaces with an address and none named eth0",
                candidates.len()
            ),
        )),
    }
}

/// In the engine's namespace, on the thread that entered it: the tap
/// (owned by `owner_uid`), the redirects, and an open descriptor of the
/// tap. True when anything was made.
pub fn ensure_inside(tap: &str, owner_uid: u32) -> Result<(PodAddress, OwnedFd, bool), NetError> {
    LinuxNet::here(|net| async move {
        let h = net.handle().clone();
        let (name, link, ip, prefix) = engine_interface(&net, tap).await?;
        let mut mac = [0u8; 6];
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => mac.copy_from_slice(m),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let mut gateway = None;
        let mut routes = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes.try_next().await? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            for a in &r.attributes {
                if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = a {
                    gateway = Some(*g);
                }
            }
        }
        let mut changed = false;
        if net.link(tap).await?.is_none() {
            tun::create_persistent_tap(tap, Some(owner_uid))?;
            changed = true;
        }
        let tap_index = net
            .link(tap)
            .await?
            .ok_or_else(|| NetError::NoLink(tap.to_string()))?
            .index;
        h.link()
            .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
            .execute()
            .await?;
        // Made afresh each time: a crash between the qdisc and its filter
        // must not leave a half-joined pair.
        for (from, to) in [(link.header.index, tap_index), (tap_index, link.header.index)] {
            clear_ingress(&h, from).await;
            h.qdisc().add(from as i32).ingress().execute().await?;
            h.traffic_filter(from as i32)
                .add()
                .ingress()
                // ETH_P_ALL, in network byte order as the kernel reads it.
                .protocol((libc::ETH_P_ALL as u16).to_be())
                .redirect(to)?
                .execute()
                .await?;
        }
        tracing::info!(interface = %name, %ip, prefix, tap, "pod interface joined to the tap");
        let fd = tun::open_tap(tap)?;
        Ok((
            PodAddress {
                ip,
                prefix,
                gateway,
                mac,
                mtu,
            },
            fd,
            changed,
        ))
    })
}

/// In the engine's namespace: the redirects and the tap go; the engine's
/// interface is left as the engine made it. False when there was no tap.
pub fn delete_inside(tap: &str) -> Result<bool, NetError> {
    LinuxNet::here(|net| async move {
        let h = net.handle().clone();
        let Some(tap) = net.link(tap).await? else {
            return Ok(false);
        };
        clear_ingress(&h, tap.index).await;
        if let Ok((_, link, _, _)) = engine_interface(&net, "").await {
            clear_ingress(&h, link.header.index).await;
        }
        h.link().del(tap.index).execute().await?;
        Ok(true)
    })
}

/// Whether a namespace is still there to clean (the engine may have
/// removed it first, taking the tap with it).
pub fn still_there(p: &Path) -> bool {
    crate::netns::is_mounted(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_under_run_netns_are_an_engines() {
        for ok in [
            "/run/netns/cni-1b2c",
            "/var/run/netns/cni-1b2c",
            "/run/netns/a.b_c",
        ] {
            assert!(engine_namespace_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/proc/1/ns/net",
            "/run/netns/../../proc/1/ns/net",
            "/run/netns/",
            "/run/netns/.",
            "/run/netns/..",
            "/run/netns/a/b",
            "/run/netns/banger-0a1b",
            "run/netns/x",
            "/run/netnsx",
            "/run/netns/x y",
        ] {
            assert!(engine_namespace_name(bad).is_err(), "{bad}");
        }
    }
}
