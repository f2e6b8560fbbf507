//! Validation of everything a caller hands the helper.

use std::net::Ipv4Addr;

/// Every bridge banger manages starts with this.
pub const BRIDGE_PREFIX: &str = "banger";
/// Every tap banger manages starts with this.
pub const TAP_PREFIX: &str = "bgt";
/// Linux's IFNAMSIZ minus the terminating NUL.
const MAX_IFNAME: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    #[error("interface name {0:?} must be 1-15 characters of [a-z0-9-]")]
    IfName(String),
    #[error("{kind} name {name:?} must start with {prefix:?}")]
    Prefix {
        kind: &'static str,
        name: String,
        prefix: &'static str,
    },
    #[error(
        "address {0:?} must be an IPv4 address with a prefix length between 8 and 30, e.g. 172.30.0.1/24"
    )]
    Address(String),
    #[error("MAC {0:?} must be six hex octets like 52:54:00:12:34:56, unicast and not all zero")]
    Mac(String),
}

fn ifname(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Invalid::IfName(name.to_string()))
    }
}

fn prefixed(kind: &'static str, name: &str, prefix: &'static str) -> Result<(), Invalid> {
    ifname(name)?;
    // The prefix alone is not a name: "banger" would be too easy to collide with.
    if name.len() > prefix.len() && name.starts_with(prefix) {
        Ok(())
    } else {
        Err(Invalid::Prefix {
            kind,
            name: name.to_string(),
            prefix,
        })
    }
}

pub fn bridge_name(name: &str) -> Result<(), Invalid> {
    prefixed("bridge", name, BRIDGE_PREFIX)
}

pub fn tap_name(name: &str) -> Result<(), Invalid> {
    prefixed("tap", name, TAP_PREFIX)
}

/// The namespace end of a jailed VM's veth pair, named after its tap (the
/// host end is named like the tap itself): `bgtX` gives `bgnX`.
pub fn jail_peer(tap: &str) -> Result<String, Invalid> {
    tap_name(tap)?;
    Ok(format!("bgn{}", &tap[TAP_PREFIX.len()..]))
}

/// Parses `a.b.c.d/len`.
pub fn ipv4_cidr(s: &str) -> Result<(Ipv4Addr, u8), Invalid> {
    let bad = || Invalid::Address(s.to_string());
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    // Canonical digits only: "+24" and "024" parse as 24 but are not how
    // anyone writes a prefix, so they are not taken as one.
    if s.rsplit_once('/').map(|(_, l)| l) != Some(len.to_string().as_str()) {
        return Err(bad());
    }
    if !(8..=30).contains(&len) || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(bad());
    }
    Ok((ip, len))
}

/// A bridge address: a host address (not the network or broadcast
/// address) in a private range (RFC 1918), with a prefix of 16-30.
/// Loopback, link-local and public ranges would put guests next to things
/// they must not reach.
pub fn bridge_cidr(s: &str) -> Result<(Ipv4Addr, u8), Invalid> {
    let (ip, len) = ipv4_cidr(s)?;
    let bad = || Invalid::Address(s.to_string());
    if !ip.is_private() || !(16..=30).contains(&len) {
        return Err(bad());
    }
    let (net, bcast) = network_and_broadcast(ip, len);
    if ip == net || ip == bcast {
        return Err(bad());
    }
    Ok((ip, len))
}

/// The network and broadcast addresses of `ip/len`.
pub fn network_and_broadcast(ip: Ipv4Addr, len: u8) -> (Ipv4Addr, Ipv4Addr) {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    let net = u32::from(ip) & mask;
    (Ipv4Addr::from(net), Ipv4Addr::from(net | !mask))
}

/// A guest address is a host address inside the bridge's subnet, other
/// than the bridge's own.
pub fn guest_in_subnet(guest: Ipv4Addr, bridge: (Ipv4Addr, u8)) -> bool {
    let (net, bcast) = network_and_broadcast(bridge.0, bridge.1);
    let (gnet, _) = network_and_broadcast(guest, bridge.1);
    gnet == net && guest != net && guest != bcast && guest != bridge.0
}

/// A VM's tag on its rules: 1-16 characters of [a-z0-9].
pub fn vm_tag(tag: &str) -> Result<(), Invalid> {
    if !tag.is_empty() && tag.len() <= 16 && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(Invalid::IfName(tag.to_string()))
    }
}

/// A single guest address (no prefix).
pub fn ipv4(s: &str) -> Result<Ipv4Addr, Invalid> {
    let ip: Ipv4Addr = s.parse().map_err(|_| Invalid::Address(s.to_string()))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(Invalid::Address(s.to_string()));
    }
    Ok(ip)
}

/// A guest's MAC: `aa:bb:cc:dd:ee:ff` (lowercase or uppercase hex), a
/// unicast address other than all zeros. A multicast or broadcast source
/// would let one tap's rules match frames meant for everyone.
pub fn mac(s: &str) -> Result<[u8; 6], Invalid> {
    let bad = || Invalid::Mac(s.to_string());
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for o in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 == 1 || out == [0; 6] {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_addresses_are_private_host_addresses_with_a_sane_prefix() {
        assert!(bridge_cidr("172.30.0.1/24").is_ok());
        assert!(bridge_cidr("10.200.0.1/16").is_ok());
        assert!(bridge_cidr("192.168.77.1/30").is_ok());
        for bad in [
            "127.0.0.2/8",
            "169.254.1.1/16",
            "10.0.0.1/8",
            "172.30.0.1/+24",
            "172.30.0.1/024",
            "172.30.0.1/24 ",
            "8.8.8.1/24",
            "172.30.0.0/24",
            "172.30.0.255/24",
            "172.30.0.1/31",
            "172.30.0.1",
        ] {
            assert!(bridge_cidr(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn guests_must_be_hosts_of_the_bridge_subnet() {
        let br = (Ipv4Addr::new(172, 30, 0, 1), 24);
        assert!(guest_in_subnet(Ipv4Addr::new(172, 30, 0, 2), br));
        for bad in [
            Ipv4Addr::new(8, 8, 8, 8),
            Ipv4Addr::new(172, 30, 0, 0),
            Ipv4Addr::new(172, 30, 0, 255),
            Ipv4Addr::new(172, 30, 0, 1),
            Ipv4Addr::new(172, 30, 1, 2),
        ] {
            assert!(!guest_in_subnet(bad, br), "{bad} accepted");
        }
    }

    #[test]
    fn host_interfaces_are_never_accepted() {
        for name in ["eth0", "docker0", "lo", "wlan0", "banger", "bgt", ""] {
            assert!(bridge_name(name).is_err(), "{name} accepted as bridge");
            assert!(tap_name(name).is_err(), "{name} accepted as tap");
        }
        for name in [
            "banger0/../x",
            "banger0 ",
            "Banger0",
            "banger0123456789",
            "bgt;rm -rf /",
        ] {
            assert!(
                bridge_name(name).is_err() && tap_name(name).is_err(),
                "{name:?} accepted"
            );
        }
        assert!(bridge_name("banger0").is_ok());
        assert!(tap_name("bgt0a1b2c3d").is_ok());
        assert!(tap_name("banger0").is_err(), "a bridge name is not a tap name");
    }

    #[test]
    fn macs_are_unicast_and_well_formed() {
        assert_eq!(
            mac("52:54:00:a1:b2:c3").unwrap(),
            [0x52, 0x54, 0, 0xa1, 0xb2, 0xc3]
        );
        assert_eq!(
            mac("52:54:00:A1:B2:C3").unwrap(),
            [0x52, 0x54, 0, 0xa1, 0xb2, 0xc3]
        );
        for bad in [
            "",
            "52:54:00:a1:b2",
            "52:54:00:a1:b2:c3:d4",
            "52:54:00:a1:b2:c",
            "52:54:00:a1:b2:c3 ",
            "52-54-00-a1-b2-c3",
            "52:54:00:a1:b2:+3",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52:54:00:a1:b2:c3\"; flush ruleset",
        ] {
            assert!(mac(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            ipv4_cidr("172.30.0.1/24").unwrap(),
            ("172.30.0.1".parse().unwrap(), 24)
        );
        for bad in [
            "172.30.0.1",
            "172.30.0.1/33",
            "0.0.0.0/24",
            "x/24",
            "172.30.0.1/4",
            "1.2.3.4/24/1",
        ] {
            assert!(ipv4_cidr(bad).is_err(), "{bad} accepted");
        }
    }
}
