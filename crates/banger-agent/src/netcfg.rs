//! A guest's network identity set by the host after a restore from a
//! snapshot: `eth0`'s MAC, its IPv4 address and the default route. The
//! ioctl interface needs nothing from the guest's userland (an image may
//! have no `ip`).

use banger_proto::methods::agent::SeedNet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const IFACE: &str = "eth0";

/// What a [`SeedNet`] says, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

pub fn parse(n: &SeedNet) -> Result<Identity, String> {
    let mac: Vec<u8> = n
        .mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{:?} is not a MAC address", n.mac))?;
    let mac: [u8; 6] = mac
        .try_into()
        .map_err(|_| format!("{:?} is not a MAC address", n.mac))?;
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("{:?} is not a unicast MAC address", n.mac));
    }
    let (ip, prefix) = n
        .address
        .split_once('/')
        .ok_or_else(|| format!("{:?} is not address/prefix", n.address))?;
    let address: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=30).contains(p))
        .ok_or_else(|| format!("{prefix:?} is not a prefix length of 1-30"))?;
    let gateway: Ipv4Addr = n
        .gateway
        .parse()
        .map_err(|_| format!("{:?} is not an IPv4 address", n.gateway))?;
    let mask = u32::MAX << (32 - u32::from(prefix));
    if u32::from(address) & mask != u32::from(gateway) & mask || address == gateway {
        return Err(format!(
            "gateway {gateway} is not another address of {}",
            n.address
        ));
    }
    Ok(Identity {
        mac,
        address,
        prefix,
        gateway,
    })
}

fn ifreq() -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(IFACE.bytes()) {
        *d = s as libc::c_char;
    }
    r
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` is the structure `req` takes, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets `eth0`'s MAC, address and netmask, and the default route.
pub fn apply(id: &Identity) -> Result<(), String> {
    // SAFETY: socket has no preconditions; the descriptor is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut r = ifreq();
    // SAFETY: the union was zeroed; its sockaddr view is plain data.
    let hw = unsafe { &mut r.ifr_ifru.ifru_hwaddr };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in hw.sa_data.iter_mut().zip(id.mac) {
        *d = s as libc::c_char;
    }
    ioctl(&fd, libc::SIOCSIFHWADDR, &mut r, "setting the MAC")?;

    let mut r = ifreq();
    r.ifr_ifru.ifru_addr = sockaddr_in(id.address);
    ioctl(&fd, libc::SIOCSIFADDR, &mut r, "setting the address")?;
    let mut r = ifreq();
    r.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(u32::MAX << (32 - u32::from(id.prefix))));
    ioctl(&fd, libc::SIOCSIFNETMASK, &mut r, "setting the netmask")?;

    // Replacing the address took the routes through it along.
    let mut dev = *b"eth0\0";
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(id.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr().cast();
    match ioctl(&fd, libc::SIOCADDRT, &mut rt, "adding the default route") {
        Err(e) if e.contains("File exists") => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(mac: &str, address: &str, gateway: &str) -> SeedNet {
        SeedNet {
            mac: mac.into(),
            address: address.into(),
            gateway: gateway.into(),
        }
    }

    #[test]
    fn parses_what_the_host_sends_and_refuses_the_rest() {
        assert_eq!(
            parse(&net("02:fc:00:00:00:07", "172.30.0.7/24", "172.30.0.1")),
            Ok(Identity {
                mac: [2, 0xfc, 0, 0, 0, 7],
                address: Ipv4Addr::new(172, 30, 0, 7),
                prefix: 24,
                gateway: Ipv4Addr::new(172, 30, 0, 1),
            })
        );
        for bad in [
            net("03:fc:00:00:00:07", "172.30.0.7/24", "172.30.0.1"),
            net("02:fc:00:00:00", "172.30.0.7/24", "172.30.0.1"),
            net("00:00:00:00:00:00", "172.30.0.7/24", "172.30.0.1"),
            net("02:fc:00:00:00:zz", "172.30.0.7/24", "172.30.0.1"),
            net("02:fc:00:00:00:07", "172.30.0.7", "172.30.0.1"),
            net("02:fc:00:00:00:07", "172.30.0.7/33", "172.30.0.1"),
            net("02:fc:00:00:00:07", "172.30.0.7/24", "10.0.0.1"),
            net("02:fc:00:00:00:07", "172.30.0.7/24", "172.30.0.7"),
            net("02:fc:00:00:00:07", "::1/24", "172.30.0.1"),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }
}
