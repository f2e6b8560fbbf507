//! Properties of the helper's validators over generated input: what they
//! accept always has the shape the kernel and nftables will be given, and
//! they never panic, whatever a caller sends.

use banger_helper::validate::{
    bridge_cidr, bridge_name, guest_in_subnet, ipv4, ipv4_cidr, mac, network_and_broadcast, tap_name, vm_tag,
};
use proptest::prelude::*;
use std::net::Ipv4Addr;

fn ifname_ok(s: &str, prefix: &str) -> bool {
    s.len() > prefix.len()
        && s.len() <= 15
        && s.starts_with(prefix)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn names_accepted_are_short_lowercase_and_prefixed(s in "\\PC{0,20}|bgt[a-z0-9-]{0,14}|banger[a-z0-9-]{0,12}") {
        prop_assert_eq!(tap_name(&s).is_ok(), ifname_ok(&s, "bgt"), "tap {:?}", s);
        prop_assert_eq!(bridge_name(&s).is_ok(), ifname_ok(&s, "banger"), "bridge {:?}", s);
        let tag = !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        prop_assert_eq!(vm_tag(&s).is_ok(), tag, "tag {:?}", s);
    }

    #[test]
    fn bridge_addresses_accepted_are_canonical_private_hosts(
        s in "[0-9./+ a-f:]{0,24}|(10|172|192|127|169|8)\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}/[0-9]{1,3}",
    ) {
        let _ = ipv4_cidr(&s);
        let _ = ipv4(&s);
        if let Ok((ip, len)) = bridge_cidr(&s) {
            prop_assert_eq!(format!("{ip}/{len}"), s.clone());
            prop_assert!(ip.is_private());
            prop_assert!((16..=30).contains(&len));
            let (net, bcast) = network_and_broadcast(ip, len);
            prop_assert!(ip != net && ip != bcast);
        }
    }

    #[test]
    fn macs_accepted_are_unicast_and_not_zero(s in "[0-9a-fA-F:]{0,20}|([0-9a-f]{2}:){5}[0-9a-f]{2}") {
        if let Ok(m) = mac(&s) {
            let again = m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            prop_assert_eq!(again, s.to_ascii_lowercase());
            prop_assert!(m[0] & 1 == 0 && m != [0; 6]);
        }
    }

    #[test]
    fn guests_are_hosts_of_the_subnet_other_than_the_bridge(a in any::<u32>(), b in any::<u32>(), len in 16u8..=30) {
        let (bridge, guest) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
        if guest_in_subnet(guest, (bridge, len)) {
            let (net, bcast) = network_and_broadcast(bridge, len);
            let mask = u32::MAX << (32 - u32::from(len));
            prop_assert_eq!(u32::from(guest) & mask, u32::from(net));
            prop_assert!(guest != net && guest != bcast && guest != bridge);
        }
    }
}
