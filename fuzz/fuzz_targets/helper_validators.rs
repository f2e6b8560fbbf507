//! The root helper's validators: never a panic, and what they accept has
//! the exact shape the kernel and nftables are then given.
#![no_main]

use banger_helper::validate;
use libfuzzer_sys::fuzz_target;

fn ifname_ok(s: &str, prefix: &str) -> bool {
    s.len() > prefix.len()
        && s.len() <= 15
        && s.starts_with(prefix)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(validate::tap_name(s).is_ok(), ifname_ok(s, "bgt"));
    assert_eq!(validate::bridge_name(s).is_ok(), ifname_ok(s, "banger"));
    if validate::vm_tag(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= 16);
        assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }
    if let Ok(ip) = validate::ipv4(s) {
        assert_eq!(ip.to_string(), s);
        assert!(!ip.is_loopback() && !ip.is_multicast() && !ip.is_broadcast() && !ip.is_unspecified());
    }
    if let Ok(m) = validate::mac(s) {
        let again = m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        assert_eq!(again, s.to_ascii_lowercase());
        assert!(m[0] & 1 == 0 && m != [0; 6]);
    }
    let _ = validate::ipv4_cidr(s);
    if let Ok((ip, len)) = validate::bridge_cidr(s) {
        assert_eq!(format!("{ip}/{len}"), s);
        assert!(ip.is_private() && (16..=30).contains(&len));
        let (net, bcast) = validate::network_and_broadcast(ip, len);
        assert!(ip != net && ip != bcast);
        // Any guest the helper would NAT for lies inside that subnet.
        for probe in [net, bcast, ip] {
            assert!(!validate::guest_in_subnet(probe, (ip, len)));
        }
    }
});
