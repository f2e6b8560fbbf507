//! Identity handed to a new VM: its id, vsock CID, tap name, MAC, the
//! addresses already taken, the runtime record with its paths, and what
//! its tap's rules must say.
//!
//! Pure: the caller supplies the randomness and the existing records (read
//! under the creation lock), and the address lease itself stays with
//! `NetworkService`. That keeps the rules (CIDs above the reserved ones,
//! tap names the helper accepts, stable MACs) testable on their own.

use crate::network::GuestNet;
use banger_store::{VmRecord, VmRuntime, VmState};
use std::net::Ipv4Addr;
use std::path::Path;

/// CIDs 0-2 are reserved (hypervisor, local, host).
pub const FIRST_GUEST_CID: u32 = 3;

/// The next vsock CID: one above the highest in use, and at least
/// [`FIRST_GUEST_CID`].
pub fn next_cid(used: impl IntoIterator<Item = u32>) -> u32 {
    used.into_iter().max().unwrap_or(2).max(2) + 1
}

/// A VM id: 16 lowercase hex digits from two random words.
pub fn vm_id(a: u32, b: u32) -> String {
    format!("{a:08x}{b:08x}")
}

/// The VM's tap: `bgt` and the first 8 characters of its id, so it stays
/// within the 15 characters of an interface name and the helper's `bgt*`.
pub fn tap_name(id: &str) -> String {
    let short: String = id.chars().take(8).collect();
    format!("bgt{short}")
}

/// A stable, locally administered MAC derived from the VM id.
pub fn mac_for(id: &str) -> String {
    let b = id.as_bytes();
    let h = |i: usize| b.get(i).copied().unwrap_or(b'0');
    let hex = |x: u8, y: u8| format!("{}{}", x as char, y as char);
    format!(
        "52:54:00:{}:{}:{}",
        hex(h(0), h(1)),
        hex(h(2), h(3)),
        hex(h(4), h(5))
    )
}

/// What the helper's rules must enforce on `vm`'s tap: its MAC and
/// address, NAT and peers as its spec says. `None` without a tap or an
/// address.
pub fn guest_net(vm: &VmRecord) -> Option<GuestNet> {
    // In an engine's namespace the engine's own rules apply, not banger's.
    if vm.spec.netns.is_some() {
        return None;
    }
    Some(GuestNet {
        vm: vm.id.clone(),
        tap: vm.runtime.tap.clone()?,
        mac: mac_for(&vm.id),
        ip: vm.runtime.guest_ip.as_deref().and_then(address_of)?,
        nat: vm.spec.nat,
        peers: vm.spec.peers,
    })
}

/// The address of a recorded `ip/prefix`.
pub fn address_of(cidr: &str) -> Option<Ipv4Addr> {
    cidr.split('/').next()?.parse().ok()
}

/// The guest addresses the records already hold, for the lease to avoid.
pub fn used_addresses(vms: &[VmRecord]) -> Vec<Ipv4Addr> {
    vms.iter()
        .filter_map(|v| address_of(v.runtime.guest_ip.as_deref()?))
        .collect()
}

/// A leased address as the record keeps it.
pub fn guest_cidr(ip: Ipv4Addr, prefix: u8) -> String {
    format!("{ip}/{prefix}")
}

/// The runtime of a VM being created in `dir`: every path it will use, so
/// a crash at any later point can still find and remove them.
pub fn creating_runtime(dir: &Path, cid: u32, guest_ip: Option<String>, tap: Option<String>) -> VmRuntime {
    VmRuntime {
        guest_ip,
        tap,
        state: VmState::Creating,
        vm_dir: dir.display().to_string(),
        vsock_cid: cid,
        overlay_path: dir.join("overlay.ext4").display().to_string(),
        work_disk_path: dir.join("work.ext4").display().to_string(),
        log_path: dir.join("serial.log").display().to_string(),
        vsock_uds: dir.join("vsock.sock").display().to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_is_above_the_highest_and_the_reserved_ones() {
        assert_eq!(next_cid([]), FIRST_GUEST_CID);
        assert_eq!(next_cid([0, 1, 2]), 3);
        assert_eq!(next_cid([0]), 3, "records without a CID yet");
        assert_eq!(next_cid([3]), 4);
        assert_eq!(next_cid([7, 3, 5]), 8, "max + 1, not the first gap");
    }

    #[test]
    fn ids_are_sixteen_hex_digits() {
        assert_eq!(vm_id(0, 0), "0000000000000000");
        assert_eq!(vm_id(0xdead_beef, 0x1f), "deadbeef0000001f");
        assert_eq!(vm_id(u32::MAX, u32::MAX).len(), 16);
    }

    #[test]
    fn tap_names_fit_an_interface_name() {
        let id = vm_id(0x0123_abcd, 0x4567_89ef);
        let tap = tap_name(&id);
        assert_eq!(tap, "bgt0123abcd");
        assert!(tap.len() <= 15);
        assert!(tap.starts_with("bgt"));
        assert!(tap.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert!(tap_name("a-very-long-identifier-indeed").len() <= 15);
    }

    #[test]
    fn macs_are_locally_administered_unicast_and_stable() {
        let id = "a1b2c3d4e5f60718";
        let mac = mac_for(id);
        assert_eq!(mac, "52:54:00:a1:b2:c3");
        assert_eq!(mac, mac_for(id), "same id, same MAC");
        assert_ne!(mac, mac_for("ffffffffffffffff"));
        let octets: Vec<u8> = mac
            .split(':')
            .map(|o| u8::from_str_radix(o, 16).unwrap())
            .collect();
        assert_eq!(octets.len(), 6);
        assert_eq!(octets[0] & 0b10, 0b10, "locally administered");
        assert_eq!(octets[0] & 0b01, 0, "unicast");
        assert_eq!(mac_for(""), "52:54:00:00:00:00", "short ids are padded");
    }

    #[test]
    fn addresses_come_from_recorded_cidrs() {
        assert_eq!(address_of("10.0.0.2/24"), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(address_of("10.0.0.3"), Some(Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(address_of("nonsense/24"), None);
        assert_eq!(guest_cidr(Ipv4Addr::new(10, 0, 0, 2), 24), "10.0.0.2/24");
        let rec = |ip: Option<&str>| VmRecord {
            id: "x".into(),
            name: "x".into(),
            spec: banger_store::VmSpec {
                image: "default".into(),
                vcpus: 1,
                memory_mib: 128,
                work_disk_bytes: 64 << 20,
                vmm: "qemu".into(),
                nat: false,
                peers: false,
                network: ip.is_some(),
                auto_stop_idle_secs: None,
                netns: None,
            },
            runtime: VmRuntime {
                guest_ip: ip.map(String::from),
                ..Default::default()
            },
            created_at: String::new(),
        };
        let used = used_addresses(&[rec(Some("10.0.0.2/24")), rec(None), rec(Some("10.0.0.9/24"))]);
        assert_eq!(used, [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 9)]);
    }

    #[test]
    fn a_guests_rules_follow_its_record() {
        let mut vm = VmRecord {
            id: "a1b2c3d4e5f60718".into(),
            name: "x".into(),
            spec: banger_store::VmSpec {
                image: "default".into(),
                vcpus: 1,
                memory_mib: 128,
                work_disk_bytes: 64 << 20,
                vmm: "qemu".into(),
                nat: true,
                peers: false,
                network: true,
                auto_stop_idle_secs: None,
                netns: None,
            },
            runtime: VmRuntime {
                guest_ip: Some("10.0.0.7/24".into()),
                tap: Some("bgta1b2c3d4".into()),
                ..Default::default()
            },
            created_at: String::new(),
        };
        assert_eq!(
            guest_net(&vm),
            Some(GuestNet {
                vm: "a1b2c3d4e5f60718".into(),
                tap: "bgta1b2c3d4".into(),
                mac: "52:54:00:a1:b2:c3".into(),
                ip: Ipv4Addr::new(10, 0, 0, 7),
                nat: true,
                peers: false,
            })
        );
        vm.runtime.tap = None;
        assert_eq!(guest_net(&vm), None, "no tap, no rules");
    }

    #[test]
    fn the_creating_runtime_names_every_path_in_the_vm_dir() {
        let dir = Path::new("/var/lib/banger/vms/0123abcd4567890e");
        let rt = creating_runtime(dir, 9, Some("10.0.0.2/24".into()), Some("bgt0123abcd".into()));
        assert_eq!(rt.state, VmState::Creating);
        assert_eq!(rt.vsock_cid, 9);
        assert_eq!(rt.vm_dir, dir.display().to_string());
        for p in [&rt.overlay_path, &rt.work_disk_path, &rt.log_path, &rt.vsock_uds] {
            assert!(Path::new(p).starts_with(dir), "{p}");
        }
        assert!(rt.overlay_path.ends_with("overlay.ext4"));
        assert!(rt.work_disk_path.ends_with("work.ext4"));
        assert_eq!(rt.guest_ip.as_deref(), Some("10.0.0.2/24"));
        assert_eq!(rt.tap.as_deref(), Some("bgt0123abcd"));
        assert!(rt.last_error.is_none() && rt.workspace.is_none());
    }
}
