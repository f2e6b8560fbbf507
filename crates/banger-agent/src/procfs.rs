//! Pure parsers of the `/proc` formats `agent.ports` and `agent.stats`
//! read. Each takes the file's text and returns what it found; a line it
//! does not understand is skipped, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A socket line of `/proc/net/{tcp,tcp6,udp,udp6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSocket {
    pub local: IpAddr,
    pub port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    /// The kernel's state number (`0A` is TCP_LISTEN, `07` TCP_CLOSE).
    pub state: u8,
    pub inode: u64,
}

pub const TCP_LISTEN: u8 = 0x0A;

/// An address as the kernel prints it: 32-bit words in hex, each in the
/// machine's byte order (so `0100007F` is 127.0.0.1 on little-endian).
fn parse_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |w: &str| u32::from_str_radix(w, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Every socket line of one `/proc/net/{tcp,udp}[6]` file.
pub fn parse_net_sockets(text: &str) -> Vec<NetSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, port) = parse_addr(f.get(1)?)?;
            let (remote, remote_port) = parse_addr(f.get(2)?)?;
            Some(NetSocket {
                local,
                port,
                remote,
                remote_port,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Whether a socket listens: TCP in LISTEN; UDP bound to a port and not
/// connected to a peer.
pub fn is_listening(s: &NetSocket, tcp: bool) -> bool {
    if s.port == 0 {
        return false;
    }
    if tcp {
        s.state == TCP_LISTEN
    } else {
        s.remote.is_unspecified() && s.remote_port == 0
    }
}

/// The socket inode an fd link names (`socket:[12345]`).
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// CPU time counters: busy and total jiffies over all CPUs, and how many
/// CPUs `/proc/stat` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
    pub cpus: u32,
}

/// `/proc/stat`: the aggregate `cpu` line (user nice system idle iowait irq
/// softirq steal; guest time is already inside user and nice) and the count
/// of `cpuN` lines.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let mut times = None;
    let mut cpus = 0u32;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.take(8).map_while(|x| x.parse().ok()).collect();
                if v.len() < 4 {
                    return None;
                }
                let total = v.iter().fold(0u64, |a, x| a.saturating_add(*x));
                let idle = v[3].saturating_add(v.get(4).copied().unwrap_or(0));
                times = Some((total.saturating_sub(idle), total));
            }
            Some(c) if c.len() > 3 && c.starts_with("cpu") && c[3..].bytes().all(|b| b.is_ascii_digit()) => {
                cpus += 1
            }
            _ => {}
        }
    }
    let (busy, total) = times?;
    Some(CpuTimes { busy, total, cpus })
}

/// `/proc/meminfo`: (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// `/proc/net/dev`: received and transmitted bytes of `iface`.
pub fn parse_net_dev(text: &str, iface: &str) -> Option<(u64, u64)> {
    text.lines().skip(2).find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let f: Vec<u64> = rest.split_whitespace().map_while(|x| x.parse().ok()).collect();
        Some((*f.first()?, *f.get(8)?))
    })
}

/// `/proc/uptime`: seconds since boot.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `/proc/loadavg`: the 1, 5 and 15-minute load averages.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut f = text.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([f.next()??, f.next()??, f.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines from a real x86-64 guest.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13217 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13300 1 0000000000000000 100 0 0 10 0
   2: 0264A8C0:0016 0164A8C0:D2F0 01 00000000:00000000 02:0008A5B3 00000000     0        0 14001 4 0000000000000000 20 4 29 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15410 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15411 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  512: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 16001 2 0000000000000000 0
  700: 0264A8C0:A1B2 0164A8C0:0035 01 00000000:00000000 00:00000000 00000000     0        0 16002 2 0000000000000000 0
";

    #[test]
    fn tcp_lines_give_addresses_ports_states_and_inodes() {
        let s = parse_net_sockets(TCP);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].local, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!((s[0].port, s[0].state, s[0].inode), (22, TCP_LISTEN, 13217));
        assert_eq!(s[1].local, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(s[1].port, 631);
        assert_eq!(s[2].local, "192.168.100.2".parse::<IpAddr>().unwrap());
        assert_eq!(s[2].remote_port, 0xD2F0);
        let listening: Vec<u16> = s
            .iter()
            .filter(|x| is_listening(x, true))
            .map(|x| x.port)
            .collect();
        assert_eq!(listening, [22, 631]);
    }

    #[test]
    fn tcp6_lines_give_v6_addresses() {
        let s = parse_net_sockets(TCP6);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].local, "::".parse::<IpAddr>().unwrap());
        assert_eq!((s[0].port, s[0].inode), (8080, 15410));
        assert_eq!(s[1].local, "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn only_unconnected_udp_sockets_listen() {
        let s = parse_net_sockets(UDP);
        assert_eq!(s.len(), 2);
        let listening: Vec<u16> = s
            .iter()
            .filter(|x| is_listening(x, false))
            .map(|x| x.port)
            .collect();
        assert_eq!(listening, [5353]);
    }

    #[test]
    fn malformed_socket_lines_are_skipped() {
        let text = "header\n 0: zz:0016 00000000:0000 0A 0 0 0 0 0 1\n 1: 00000000:0016\n\n 2: 00000000:0016 00000000:0000 0A a b c d e 77\n";
        let s = parse_net_sockets(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].inode, 77);
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[15410]"), Some(15410));
        assert_eq!(socket_inode("pipe:[15410]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn proc_stat_sums_busy_and_total_and_counts_cpus() {
        let text = "cpu  100 5 50 1000 20 3 2 0 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\ncpu1 50 3 25 500 10 2 1 0 0 0\nintr 1 2 3\ncpufreq 1\n";
        let t = parse_proc_stat(text).unwrap();
        // Total: user..steal; guest (7) is inside user already.
        assert_eq!(t.total, 100 + 5 + 50 + 1000 + 20 + 3 + 2);
        assert_eq!(t.busy, 100 + 5 + 50 + 3 + 2);
        assert_eq!(t.cpus, 2);
        assert_eq!(parse_proc_stat("intr 1\n"), None);
    }

    #[test]
    fn meminfo_gives_bytes() {
        let text = "MemTotal:         482344 kB\nMemFree:          300000 kB\nMemAvailable:     400000 kB\n";
        assert_eq!(parse_meminfo(text), Some((482344 * 1024, 400000 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn net_dev_gives_rx_and_tx_bytes_of_one_interface() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1200      12    0    0    0     0          0         0     1200      12    0    0    0     0       0          0
  eth0: 5000123    4000    0    0    0     0          0         0   777777     300    0    0    0     0       0          0
";
        assert_eq!(parse_net_dev(text, "eth0"), Some((5000123, 777777)));
        assert_eq!(parse_net_dev(text, "lo"), Some((1200, 1200)));
        assert_eq!(parse_net_dev(text, "eth1"), None);
    }

    #[test]
    fn uptime_and_loadavg() {
        assert_eq!(parse_uptime("1234.56 2000.00\n"), Some(1234.56));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(
            parse_loadavg("0.50 0.25 0.10 1/123 456\n"),
            Some([0.5, 0.25, 0.1])
        );
        assert_eq!(parse_loadavg("0.50 x 0.10"), None);
    }
}
