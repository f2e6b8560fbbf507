//! Guest isolation on the bridge, with real parts: the root helper (in the
//! network namespace each test's `Env` gives it) makes a real bridge and
//! real taps and installs its real nftables rules; the test opens each tap
//! from the guest's side and writes raw Ethernet frames as a hostile guest
//! would, while sockets in the namespace play the host's services.
//!
//! Proving that a frame was dropped needs no sleep: a tap write is handled
//! to the end (bridge, IP stack, socket queues) before `write` returns, and
//! every check sends a frame that must get through *after* the ones that
//! must not, then waits (with a deadline) for it. Anything the bad frames
//! would have caused is in place by then. The test thread is pinned to one
//! CPU so that frames that do take a queue (veth) stay in order too.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(10);
const BRIDGE: &str = "banger0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const BROADCAST: [u8; 6] = [0xff; 6];
/// A host on the far side of the NAT, and the uplink's own address.
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

// ---- frames ----

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// UDP without a checksum (optional over IPv4).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    ipv4(src, dst, 17, &u)
}

/// A TCP segment with no options. `flags`: 0x02 SYN, 0x12 SYN-ACK.
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&t);
    let c = checksum(&pseudo);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(b"banger-ping");
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, &m)
}

/// An ARP request (op 1) or reply (op 2).
fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

/// What the tests look at in a received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Udp {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        dport: u16,
        data: Vec<u8>,
    },
    Tcp {
        src: Ipv4Addr,
        sport: u16,
        dport: u16,
        seq: u32,
        flags: u8,
    },
    EchoReply {
        src: Ipv4Addr,
        id: u16,
    },
    Arp {
        op: u16,
        sha: [u8; 6],
        spa: Ipv4Addr,
        tha: [u8; 6],
        tpa: Ipv4Addr,
    },
    Other,
}

fn ip_at(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn mac_at(b: &[u8]) -> [u8; 6] {
    b[..6].try_into().unwrap()
}

fn parse(f: &[u8]) -> Seen {
    if f.len() < 14 {
        return Seen::Other;
    }
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let p = &f[14..];
    match be16(&f[12..14]) {
        0x0806 if p.len() >= 28 => Seen::Arp {
            op: be16(&p[6..8]),
            sha: mac_at(&p[8..]),
            spa: ip_at(&p[14..]),
            tha: mac_at(&p[18..]),
            tpa: ip_at(&p[24..]),
        },
        0x0800 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let (src, dst, l4) = (ip_at(&p[12..]), ip_at(&p[16..]), &p[ihl..]);
            match p[9] {
                17 if l4.len() >= 8 => Seen::Udp {
                    src,
                    dst,
                    dport: be16(&l4[2..]),
                    data: l4[8..].to_vec(),
                },
                6 if l4.len() >= 20 => Seen::Tcp {
                    src,
                    sport: be16(&l4[0..]),
                    dport: be16(&l4[2..]),
                    seq: u32::from_be_bytes(l4[4..8].try_into().unwrap()),
                    flags: l4[13],
                },
                1 if l4.len() >= 8 && l4[0] == 0 => Seen::EchoReply {
                    src,
                    id: be16(&l4[4..]),
                },
                _ => Seen::Other,
            }
        }
        _ => Seen::Other,
    }
}

// ---- the namespace ----

/// Runs `f` on a thread inside network namespace of process `pid`: sockets
/// and taps it opens belong to that namespace, wherever they are used later.
fn in_ns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
        // SAFETY: a valid namespace descriptor; only this thread moves.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Pins the calling thread to one CPU, so that frames queued on the way
/// (veth backlogs) are handled in the order they were written.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set), 0);
    }
}

/// Opens tap `name` as its guest's VMM would (no packet info, no vnet
/// header), non-blocking.
fn open_tap(name: &str) -> File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a properly sized ifreq that outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    f
}

/// A raw packet socket bound to `ifname` (call inside the namespace).
fn packet_socket(ifname: &str) -> File {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the descriptor is owned by the File below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { File::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: a zeroed sockaddr_ll is valid; filled before bind.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind packet socket: {}", std::io::Error::last_os_error());
    sock
}

/// Every frame waiting on a non-blocking tap or packet socket.
fn drain(f: &mut File) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match f.read(&mut buf) {
            Ok(n) => out.push(parse(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("reading frames: {e}"),
        }
    }
}

/// Reads frames until one matches `want`, failing at the deadline; returns
/// every frame read (the match last).
fn read_until(f: &mut File, what: &str, want: impl Fn(&Seen) -> bool) -> Vec<Seen> {
    let mut seen = Vec::new();
    wait_for(what, DEADLINE, || {
        for s in drain(f) {
            let hit = want(&s);
            seen.push(s);
            if hit {
                return Some(());
            }
        }
        None
    });
    seen
}

/// Every datagram waiting on a non-blocking socket.
fn datagrams(s: &UdpSocket) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => out.push((from, buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Reads datagrams until one carries `data`; returns every one read.
fn recv_until(s: &UdpSocket, data: &[u8]) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut seen = Vec::new();
    let what = format!("datagram {:?}", String::from_utf8_lossy(data));
    wait_for(&what, DEADLINE, || {
        let got = datagrams(s);
        let hit = got.iter().any(|(_, d)| d == data);
        seen.extend(got);
        hit.then_some(())
    });
    seen
}

fn bind_udp(pid: u32, addr: &str) -> UdpSocket {
    let addr = addr.to_string();
    in_ns(pid, move || {
        let s = UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_nonblocking(true).unwrap();
        s
    })
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|o| u8::from_str_radix(o, 16).unwrap()).collect();
    v.try_into().unwrap()
}

/// A guest as the test plays it: its tap (guest side) and identity.
struct Guest {
    tag: &'static str,
    tap_name: &'static str,
    mac: [u8; 6],
    ip: Ipv4Addr,
    tap: File,
}

impl Guest {
    fn send(&mut self, frame: &[u8]) {
        self.tap.write_all(frame).expect("write to tap");
    }
}

/// A bridge with two taps, A (172.30.0.2) and B (172.30.0.3), and no
/// rules for either yet.
struct Lab {
    env: Env,
    pid: u32,
    bridge_mac: [u8; 6],
    a: Guest,
    b: Guest,
}

impl Lab {
    fn new() -> Lab {
        pin_to_one_cpu();
        let env = Env::new();
        let pid = env.helper_pid();
        let lab_call = |m: &str, p: &str| call(&env, m, p).unwrap_or_else(|e| panic!("{m}: {e}"));
        lab_call(
            "priv.bridge.ensure",
            &format!(r#"{{"name":"{BRIDGE}","address":"{GATEWAY}/24"}}"#),
        );
        for tap in ["bgta", "bgtb"] {
            lab_call(
                "priv.tap.create",
                &format!(r#"{{"name":"{tap}","bridge":"{BRIDGE}"}}"#),
            );
        }
        ip(&env, &["link", "set", "lo", "up"]);
        // A bridge whose MAC was never set takes its lowest port's, so it
        // may change as ports come (the veths below); frames to the old
        // one would be bridged instead of delivered to the host.
        ip(&env, &["link", "set", BRIDGE, "address", "02:00:00:00:00:01"]);
        let guest = |tag, tap_name: &'static str, last: u8| {
            let tap = in_ns(pid, move || open_tap(tap_name));
            Guest {
                tag,
                tap_name,
                mac: [0x52, 0x54, 0, last, last, last],
                ip: Ipv4Addr::new(172, 30, 0, last),
                tap,
            }
        };
        let (a, b) = (guest("aaaa", "bgta", 2), guest("bbbb", "bgtb", 3));
        // The ports carry traffic once their taps are open (carrier).
        wait_for("both bridge ports forwarding", DEADLINE, || {
            let out = String::from_utf8_lossy(&env.in_helper_ns("bridge", &["-j", "link", "show"]).stdout)
                .into_owned();
            let links: Vec<Value> = serde_json::from_str(&out).ok()?;
            let forwarding = links
                .iter()
                .filter(|l| l["master"] == BRIDGE && l["state"] == "forwarding")
                .count();
            (forwarding == 2).then_some(())
        });
        let bridge_mac = link_mac(&env, BRIDGE);
        Lab {
            env,
            pid,
            bridge_mac,
            a,
            b,
        }
    }

    fn allow(&self, g: &Guest, nat: bool, peers: bool) -> bool {
        let out = call(
            &self.env,
            "priv.guest.allow",
            &format!(
                r#"{{"vm":"{}","tap":"{}","bridge":"{BRIDGE}","mac":"{}","ip":"{}","nat":{nat},"peers":{peers}}}"#,
                g.tag,
                g.tap_name,
                mac_str(g.mac),
                g.ip
            ),
        )
        .unwrap_or_else(|e| panic!("priv.guest.allow {}: {e}", g.tag));
        changed(&out)
    }

    fn revoke(&self, g: &Guest) -> bool {
        let out = call(
            &self.env,
            "priv.guest.revoke",
            &format!(r#"{{"vm":"{}"}}"#, g.tag),
        )
        .unwrap();
        changed(&out)
    }

    /// Lets the host reach `g` without asking ARP first.
    fn neighbour(&self, g: &Guest) {
        ip(
            &self.env,
            &[
                "neigh",
                "replace",
                &g.ip.to_string(),
                "lladdr",
                &mac_str(g.mac),
                "dev",
                BRIDGE,
                "nud",
                "permanent",
            ],
        );
    }

    /// A frame from `g` to the host's side of the bridge.
    fn to_host(&self, g: &Guest, packet: &[u8]) -> Vec<u8> {
        eth(self.bridge_mac, g.mac, 0x0800, packet)
    }

    fn ruleset(&self) -> String {
        String::from_utf8_lossy(&self.env.in_helper_ns("nft", &["list", "ruleset"]).stdout).into_owned()
    }
}

fn changed(out: &str) -> bool {
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["changed"].as_bool().expect("changed")
}

/// One helper call; stdout on success, stderr on failure.
fn call(env: &Env, method: &str, params: &str) -> Result<String, String> {
    let out = env
        .cmd("banger-helper")
        .args(["call", "--socket"])
        .arg(env.helper_socket())
        .args([method, params])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ip(env: &Env, args: &[&str]) {
    let out = env.ip_in_helper_ns(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn link_mac(env: &Env, name: &str) -> [u8; 6] {
    let out = env.ip_in_helper_ns(&["-j", "link", "show", name]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
    parse_mac(v[0]["address"].as_str().expect("address"))
}

fn data_of(seen: &[(SocketAddr, Vec<u8>)]) -> Vec<String> {
    seen.iter()
        .map(|(from, d)| format!("{from} {}", String::from_utf8_lossy(d)))
        .collect()
}

// ---- the tests ----

/// A guest may send only from its own address: a frame from another
/// guest's address, or one no guest has, never reaches the host.
#[test]
fn a_guest_cannot_send_from_another_address() {
    let mut lab = Lab::new();
    lab.allow(&lab.a, false, false);
    let dns = bind_udp(lab.pid, "172.30.0.1:53");
    let (a_ip, b_ip) = (lab.a.ip, lab.b.ip);
    for (src, data) in [(b_ip, "as-b"), (Ipv4Addr::new(172, 30, 0, 99), "as-99")] {
        let f = lab.to_host(&lab.a, &udp(src, GATEWAY, 5000, 53, data.as_bytes()));
        lab.a.send(&f);
    }
    let f = lab.to_host(&lab.a, &udp(a_ip, GATEWAY, 5000, 53, b"legit"));
    lab.a.send(&f);
    let seen = recv_until(&dns, b"legit");
    assert_eq!(
        data_of(&seen),
        [format!("{a_ip}:5000 legit")],
        "a spoofed source address got through"
    );
}

/// A guest may send only from its own MAC, and the bridge never learns a
/// MAC a guest merely claimed.
#[test]
fn a_guest_cannot_send_from_another_mac() {
    let mut lab = Lab::new();
    lab.allow(&lab.a, false, false);
    let dns = bind_udp(lab.pid, "172.30.0.1:53");
    let a_ip = lab.a.ip;
    let spoofed = eth(
        lab.bridge_mac,
        lab.b.mac,
        0x0800,
        &udp(a_ip, GATEWAY, 5000, 53, b"as-b-mac"),
    );
    lab.a.send(&spoofed);
    let f = lab.to_host(&lab.a, &udp(a_ip, GATEWAY, 5000, 53, b"legit"));
    lab.a.send(&f);
    let seen = recv_until(&dns, b"legit");
    assert_eq!(
        data_of(&seen),
        [format!("{a_ip}:5000 legit")],
        "a spoofed MAC got through"
    );
    let fdb = String::from_utf8_lossy(
        &lab.env
            .in_helper_ns("bridge", &["fdb", "show", "br", BRIDGE])
            .stdout,
    )
    .into_owned();
    assert!(
        !fdb.contains(&mac_str(lab.b.mac)),
        "the bridge learned a spoofed MAC: {fdb}"
    );
    assert!(fdb.contains(&mac_str(lab.a.mac)), "{fdb}");
}

/// ARP must name the guest itself as sender (hardware and protocol
/// address): a guest cannot claim another's address or announce another
/// MAC, so the host's neighbour table and replies stay right.
#[test]
fn arp_must_name_the_guest_itself() {
    let mut lab = Lab::new();
    lab.allow(&lab.a, false, false);
    let (a_mac, a_ip, b_mac, b_ip) = (lab.a.mac, lab.a.ip, lab.b.mac, lab.b.ip);
    let request = |sha, spa| eth(BROADCAST, a_mac, 0x0806, &arp(1, sha, spa, [0; 6], GATEWAY));
    // Claims B's address; claims B's MAC as sender hardware address; then
    // asks honestly.
    lab.a.send(&request(a_mac, b_ip));
    lab.a.send(&request(b_mac, a_ip));
    lab.a.send(&request(a_mac, a_ip));
    let seen = read_until(
        &mut lab.a.tap,
        "the host's ARP reply to A",
        |s| matches!(s, Seen::Arp { op: 2, tha, tpa, .. } if *tha == a_mac && *tpa == a_ip),
    );
    let replies: Vec<&Seen> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Arp { op: 2, .. }))
        .collect();
    assert_eq!(
        replies.len(),
        1,
        "the host answered a spoofed ARP request: {replies:?}"
    );
    let neigh = String::from_utf8_lossy(&lab.env.ip_in_helper_ns(&["neigh", "show", "dev", BRIDGE]).stdout)
        .into_owned();
    assert!(!neigh.contains(&b_ip.to_string()), "{neigh}");
    assert!(!neigh.contains(&mac_str(b_mac)), "{neigh}");
}

/// Guests cannot reach each other (unicast or broadcast) unless both have
/// `peers`; one side asking is not enough; and never by routing through
/// the host (A has NAT, so the host forwards).
#[test]
fn guests_reach_each_other_only_when_both_are_peers() {
    let mut lab = Lab::new();
    lab.allow(&lab.a, true, false);
    lab.allow(&lab.b, false, false);
    lab.neighbour(&lab.b);
    let host = bind_udp(lab.pid, "172.30.0.1:4000");
    let (a_mac, a_ip, b_mac, b_ip, bridge_mac) = (lab.a.mac, lab.a.ip, lab.b.mac, lab.b.ip, lab.bridge_mac);
    // What B received from A in round `n`: datagrams by their data, ARP
    // requests as "arp".
    let round = |lab: &mut Lab, n: u32| -> Vec<String> {
        let direct = format!("direct-{n}");
        let routed = format!("routed-{n}");
        lab.a.send(&eth(
            b_mac,
            a_mac,
            0x0800,
            &udp(a_ip, b_ip, 4000, 9, direct.as_bytes()),
        ));
        lab.a
            .send(&eth(BROADCAST, a_mac, 0x0806, &arp(1, a_mac, a_ip, [0; 6], b_ip)));
        lab.a.send(&eth(
            bridge_mac,
            a_mac,
            0x0800,
            &udp(a_ip, b_ip, 4000, 9, routed.as_bytes()),
        ));
        // The host reaching B is the barrier: B sees it after anything A sent.
        let barrier = format!("host-{n}");
        host.send_to(barrier.as_bytes(), (b_ip, 9)).unwrap();
        let seen = read_until(
            &mut lab.b.tap,
            "the host's datagram on B",
            |s| matches!(s, Seen::Udp { data, .. } if *data == barrier.as_bytes()),
        );
        seen.iter()
            .filter_map(|s| match s {
                Seen::Udp { src, data, .. } if *src == a_ip => {
                    Some(String::from_utf8_lossy(data).into_owned())
                }
                Seen::Arp { spa, .. } if *spa == a_ip => Some("arp".into()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        round(&mut lab, 1),
        Vec::<String>::new(),
        "A reached B with peer traffic off"
    );
    lab.allow(&lab.a, true, true);
    assert_eq!(
        round(&mut lab, 2),
        Vec::<String>::new(),
        "A reached B though only A is a peer"
    );
    lab.allow(&lab.b, false, true);
    assert_eq!(
        round(&mut lab, 3),
        ["direct-3", "arp"],
        "peers talk on the bridge, never through the host's routing"
    );
}

/// NAT is decided by the tap: a guest without NAT is not forwarded at all,
/// and the NAT guest's own address sent from anything but its tap (here a
/// port on the bridge that is not a banger tap) is not forwarded either.
/// The NAT guest's traffic leaves masqueraded.
#[test]
fn nat_follows_the_tap_not_the_address() {
    let mut lab = Lab::new();
    lab.allow(&lab.a, true, false);
    lab.allow(&lab.b, false, false);
    let env = &lab.env;
    // An uplink (up0, the host's side; up1 is the far side, where the test
    // listens) and a port on the bridge that is not a tap (vx0, written
    // to through its peer vx1).
    ip(
        env,
        &["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
    );
    ip(
        env,
        &["link", "add", "vx0", "type", "veth", "peer", "name", "vx1"],
    );
    ip(env, &["link", "set", "vx0", "master", BRIDGE]);
    for l in ["up0", "up1", "vx0", "vx1"] {
        ip(env, &["link", "set", l, "up"]);
    }
    ip(env, &["addr", "add", &format!("{UPLINK}/24"), "dev", "up0"]);
    let up1_mac = mac_str(link_mac(env, "up1"));
    ip(
        env,
        &[
            "neigh",
            "replace",
            &REMOTE.to_string(),
            "lladdr",
            &up1_mac,
            "dev",
            "up0",
            "nud",
            "permanent",
        ],
    );
    let (mut far, mut port) = in_ns(lab.pid, || (packet_socket("up1"), packet_socket("vx1")));
    let dns = bind_udp(lab.pid, "172.30.0.1:53");
    // Frames sent before the kernel has activated a link (its operational
    // state says so) are dropped; the bridge forwards on vx0 only after.
    for l in ["up0", "up1", "vx0", "vx1"] {
        wait_for(&format!("{l} up"), DEADLINE, || {
            let out = lab.env.ip_in_helper_ns(&["-j", "link", "show", "dev", l]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v[0]["operstate"] == "UP").then_some(())
        });
    }
    wait_for("vx0 forwarding", DEADLINE, || {
        let out = String::from_utf8_lossy(
            &lab.env
                .in_helper_ns("bridge", &["-j", "link", "show", "dev", "vx0"])
                .stdout,
        )
        .into_owned();
        out.contains("\"forwarding\"").then_some(())
    });
    let (a_ip, b_ip) = (lab.a.ip, lab.b.ip);
    let out = |src, data: &str| udp(src, REMOTE, 6000, 7000, data.as_bytes());

    // B has no NAT.
    let f = lab.to_host(&lab.b, &out(b_ip, "from-b"));
    lab.b.send(&f);
    // A's address, from a port that is not A's tap.
    let stranger = [0x02, 0, 0, 0, 0, 0x99];
    port.write_all(&eth(lab.bridge_mac, stranger, 0x0800, &out(a_ip, "from-port")))
        .unwrap();
    // The host's DNS port answers that port: once this arrived, the frame
    // before it has been through the bridge and the routing decision.
    port.write_all(&eth(
        lab.bridge_mac,
        stranger,
        0x0800,
        &udp(Ipv4Addr::new(172, 30, 0, 50), GATEWAY, 5000, 53, b"port-barrier"),
    ))
    .unwrap();
    recv_until(&dns, b"port-barrier");
    let f = lab.to_host(&lab.a, &out(a_ip, "from-a"));
    lab.a.send(&f);
    let seen = read_until(
        &mut far,
        "A's datagram on the far side",
        |s| matches!(s, Seen::Udp { data, .. } if data == b"from-a"),
    );
    let udps: Vec<&Seen> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Udp { dport: 7000, .. }))
        .collect();
    assert_eq!(
        udps,
        [&Seen::Udp {
            src: UPLINK,
            dst: REMOTE,
            dport: 7000,
            data: b"from-a".to_vec()
        }],
        "only A's datagram may leave, masqueraded"
    );
}

/// From a guest, the host answers DNS (udp and tcp 53) and ping on the
/// bridge address and replies to its own connections; every other port,
/// and every other address of the host, is dropped.
#[test]
fn the_host_serves_guests_only_dns() {
    let mut lab = Lab::new();
    lab.allow(&lab.a, false, false);
    lab.neighbour(&lab.a);
    // Another address of the host's.
    ip(&lab.env, &["addr", "add", "10.99.0.1/32", "dev", "lo"]);
    let other_port = bind_udp(lab.pid, "0.0.0.0:5555");
    let other_addr = bind_udp(lab.pid, "10.99.0.1:53");
    let dns = bind_udp(lab.pid, "172.30.0.1:53");
    let tcp_listeners = in_ns(lab.pid, || {
        (
            TcpListener::bind("0.0.0.0:2222").unwrap(),
            TcpListener::bind("172.30.0.1:53").unwrap(),
        )
    });
    let a_ip = lab.a.ip;
    let other_host = Ipv4Addr::new(10, 99, 0, 1);
    for f in [
        udp(a_ip, GATEWAY, 5000, 5555, b"other-port"),
        udp(a_ip, other_host, 5000, 53, b"other-addr"),
        tcp(a_ip, GATEWAY, 40000, 2222, 1, 0, 0x02),
        icmp_echo(a_ip, other_host, 7),
        tcp(a_ip, GATEWAY, 40001, 53, 1, 0, 0x02),
        icmp_echo(a_ip, GATEWAY, 8),
        udp(a_ip, GATEWAY, 5000, 53, b"dns"),
    ] {
        let f = lab.to_host(&lab.a, &f);
        lab.a.send(&f);
    }
    recv_until(&dns, b"dns");
    let mut answers: Vec<Seen> = Vec::new();
    wait_for("the SYN-ACK from port 53 and the echo reply", DEADLINE, || {
        answers.extend(drain(&mut lab.a.tap));
        let syn_ack = answers.iter().any(|s| {
            matches!(
                s,
                Seen::Tcp {
                    sport: 53,
                    flags: 0x12,
                    ..
                }
            )
        });
        let echo = answers.iter().any(|s| matches!(s, Seen::EchoReply { id: 8, .. }));
        (syn_ack && echo).then_some(())
    });
    let stray: Vec<&Seen> = answers
        .iter()
        .filter(|s| matches!(s, Seen::Tcp { sport: 2222, .. } | Seen::EchoReply { id: 7, .. }))
        .collect();
    assert_eq!(
        stray,
        Vec::<&Seen>::new(),
        "the host answered on a port it does not serve guests"
    );
    assert_eq!(data_of(&datagrams(&other_port)), Vec::<String>::new());
    assert_eq!(data_of(&datagrams(&other_addr)), Vec::<String>::new());
    drop(tcp_listeners);

    // The host's own connection to the guest gets the guest's replies.
    let pid = lab.pid;
    let connect = std::thread::spawn(move || {
        in_ns(pid, move || {
            std::net::TcpStream::connect_timeout(&(a_ip, 22).into(), DEADLINE).map(|_| ())
        })
    });
    let is_syn = |s: &Seen| {
        matches!(
            s,
            Seen::Tcp {
                dport: 22,
                flags: 0x02,
                ..
            }
        )
    };
    let seen = read_until(&mut lab.a.tap, "the host's SYN to the guest", is_syn);
    let syn = match seen.last() {
        Some(Seen::Tcp { src, sport, seq, .. }) => Some((*src, *sport, *seq)),
        _ => None,
    };
    let (host_ip, sport, seq) = syn.unwrap();
    let f = lab.to_host(
        &lab.a,
        &tcp(a_ip, host_ip, 22, sport, 1000, seq.wrapping_add(1), 0x12),
    );
    lab.a.send(&f);
    connect
        .join()
        .unwrap()
        .expect("the guest's SYN-ACK did not reach the host's connection");
}

/// A tap without rules drops everything; rules are idempotent, say whether
/// they changed anything, and leave nothing behind when revoked.
#[test]
fn taps_fail_closed_and_rules_leave_nothing_behind() {
    let mut lab = Lab::new();
    assert!(lab.allow(&lab.a, true, true));
    assert!(
        !lab.allow(&lab.a, true, true),
        "the same rules twice changed something"
    );
    let dns = bind_udp(lab.pid, "172.30.0.1:53");
    let (a_ip, b_ip) = (lab.a.ip, lab.b.ip);
    let f = lab.to_host(&lab.b, &udp(b_ip, GATEWAY, 5000, 53, b"unguarded"));
    lab.b.send(&f);
    let f = lab.to_host(&lab.a, &udp(a_ip, GATEWAY, 5000, 53, b"guarded"));
    lab.a.send(&f);
    assert_eq!(
        data_of(&recv_until(&dns, b"guarded")),
        [format!("{a_ip}:5000 guarded")],
        "a tap without rules let a frame through"
    );
    let rules = lab.ruleset();
    assert_eq!(rules.matches("banger:aaaa").count(), 7, "{rules}");

    assert!(lab.revoke(&lab.a));
    assert!(!lab.revoke(&lab.a));
    let rules = lab.ruleset();
    assert!(!rules.contains("banger:"), "rules left after revoke: {rules}");
    assert!(!rules.contains(&a_ip.to_string()), "{rules}");
    let f = lab.to_host(&lab.a, &udp(a_ip, GATEWAY, 5000, 53, b"revoked"));
    lab.a.send(&f);
    lab.allow(&lab.b, false, false);
    let f = lab.to_host(&lab.b, &udp(b_ip, GATEWAY, 5000, 53, b"b-now"));
    lab.b.send(&f);
    assert_eq!(
        data_of(&recv_until(&dns, b"b-now")),
        [format!("{b_ip}:5000 b-now")],
        "a revoked guest's frame got through"
    );
}

/// The helper checks a guest's rules against the host as it is: the tap
/// must be on the bridge, the address in its subnet, and no two VMs may
/// hold the same tap, MAC or address.
#[test]
fn the_helper_refuses_rules_that_would_share_or_misplace_a_guest() {
    let lab = Lab::new();
    lab.allow(&lab.a, false, false);
    let try_allow = |vm: &str, tap: &str, mac: &str, ip: &str| {
        call(
            &lab.env,
            "priv.guest.allow",
            &format!(r#"{{"vm":"{vm}","tap":"{tap}","bridge":"{BRIDGE}","mac":"{mac}","ip":"{ip}"}}"#),
        )
    };
    let a_mac = mac_str(lab.a.mac);
    for (what, (tap, mac, ip), code) in [
        (
            "A's address",
            ("bgtb", "52:54:00:0b:0b:0b", "172.30.0.2"),
            "already_exists",
        ),
        (
            "A's MAC",
            ("bgtb", a_mac.as_str(), "172.30.0.3"),
            "already_exists",
        ),
        (
            "A's tap",
            ("bgta", "52:54:00:0b:0b:0b", "172.30.0.3"),
            "already_exists",
        ),
        (
            "an address off the subnet",
            ("bgtb", "52:54:00:0b:0b:0b", "10.0.0.3"),
            "bad_request",
        ),
        (
            "a broadcast MAC",
            ("bgtb", "ff:ff:ff:ff:ff:ff", "172.30.0.3"),
            "bad_request",
        ),
        (
            "a tap that does not exist",
            ("bgtzz", "52:54:00:0b:0b:0b", "172.30.0.3"),
            "not_found",
        ),
    ] {
        let err = try_allow("bbbb", tap, mac, ip).expect_err(what);
        assert!(err.contains(code), "{what}: {err}");
    }
    let rules = lab.ruleset();
    assert!(
        !rules.contains("banger:bbbb"),
        "a refused guest got rules: {rules}"
    );
}

/// Rules an older banger left (NAT by source address, in the base chains)
/// are replaced by the guest's new rules and gone after a revoke.
#[test]
fn rules_of_the_older_layout_are_replaced() {
    let lab = Lab::new();
    let old = "add table inet banger\n\
        add chain inet banger postrouting { type nat hook postrouting priority 100 ; }\n\
        add chain inet banger forward { type filter hook forward priority 0 ; }\n\
        add rule inet banger postrouting ip saddr 172.30.0.2 oifname != \"banger0\" masquerade comment \"banger:aaaa\"\n\
        add rule inet banger forward iifname \"banger0\" ip saddr 172.30.0.2 accept comment \"banger:aaaa\"\n\
        add rule inet banger forward oifname \"banger0\" ip daddr 172.30.0.2 ct state established,related accept comment \"banger:aaaa\"\n";
    let mut nft = std::process::Command::new("nsenter")
        .args(["-t", &lab.pid.to_string(), "-n", "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin.take().unwrap().write_all(old.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success());
    assert_eq!(lab.ruleset().matches("comment \"banger:aaaa\"").count(), 3);

    assert!(lab.allow(&lab.a, false, false));
    let rules = lab.ruleset();
    assert!(
        !rules.contains("comment \"banger:aaaa\""),
        "old rules survived: {rules}"
    );
    assert!(!rules.contains("masquerade"), "{rules}");
    assert_eq!(rules.matches("banger:aaaa tap=bgta").count(), 2, "{rules}");
    assert!(lab.revoke(&lab.a));
    assert!(!lab.ruleset().contains("banger:"), "{}", lab.ruleset());
}

/// Removes a named namespace the test made, however the test ends.
struct NamedNsGuard(String);

impl Drop for NamedNsGuard {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.clone()).unwrap();
        // SAFETY: a NUL-terminated path; failure (nothing mounted) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `f` on a thread inside the named namespace at `path`.
fn in_named_ns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace descriptor; only this thread moves.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// A guest whose VMM runs in a network namespace of its own (Firecracker
/// under its jailer) is confined exactly like one on a tap: the helper
/// makes the namespace, the tap inside it owned by the VM's uid, and a veth
/// pair to the bridge whose host end carries the tap's name and the
/// guest's rules. A spoofed address is dropped at that port, the guest's
/// own gets through, and removing it leaves no namespace and no link.
#[test]
fn a_guest_in_a_namespace_of_its_own_is_confined_the_same() {
    let lab = Lab::new();
    let env = &lab.env;
    // Named namespaces are the host's: a tag of this run's own.
    let tag: &'static str = Box::leak(format!("c{}", std::process::id()).into_boxed_str());
    let _cleanup = NamedNsGuard(format!("/run/netns/banger-{tag}"));
    let (tap, uid) = ("bgtc", 4242);
    let params = format!(r#"{{"vm":"{tag}","tap":"{tap}","bridge":"{BRIDGE}","owner_uid":{uid}}}"#);
    let out = call(env, "priv.netns.ensure", &params).unwrap_or_else(|e| panic!("priv.netns.ensure: {e}"));
    let ready: Value = serde_json::from_str(out.trim()).unwrap();
    let ns = ready["netns"].as_str().expect("netns").to_string();
    assert_eq!(ns, format!("/run/netns/banger-{tag}"));
    assert_eq!(ready["changed"], true);
    let again = call(env, "priv.netns.ensure", &params).unwrap();
    assert!(!changed(&again), "a second ensure changed something: {again}");

    // Inside: the tap, owned by the VM's uid, on the namespace's bridge.
    let inside = std::process::Command::new("ip")
        .args(["-n", &format!("banger-{tag}"), "-d", "link", "show", tap])
        .output()
        .unwrap();
    let inside = String::from_utf8_lossy(&inside.stdout);
    assert!(
        inside.contains("tun type tap"),
        "no tap in the namespace: {inside}"
    );
    assert!(inside.contains(&format!("user {uid}")), "{inside}");
    // On the host side, the name is the veth's, on banger's bridge.
    let host = env.ip_in_helper_ns(&["-d", "link", "show", tap]);
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(host.contains("veth"), "{host}");
    assert!(host.contains(&format!("master {BRIDGE}")), "{host}");

    let c = Guest {
        tag,
        tap_name: tap,
        mac: [0x52, 0x54, 0, 4, 4, 4],
        ip: Ipv4Addr::new(172, 30, 0, 4),
        tap: in_named_ns(&ns, move || open_tap(tap)),
    };
    assert!(lab.allow(&c, false, false));
    let dns = bind_udp(lab.pid, "172.30.0.1:53");
    let mut c = c;
    for (src, data) in [(lab.a.ip, "as-a"), (Ipv4Addr::new(172, 30, 0, 99), "as-99")] {
        let f = lab.to_host(&c, &udp(src, GATEWAY, 5000, 53, data.as_bytes()));
        c.send(&f);
    }
    let f = lab.to_host(&c, &udp(c.ip, GATEWAY, 5000, 53, b"legit"));
    c.send(&f);
    let seen = recv_until(&dns, b"legit");
    assert_eq!(
        data_of(&seen),
        [format!("{}:5000 legit", c.ip)],
        "a spoofed source address got through the namespace's port"
    );

    // The VMM is gone (its tap closed), then its network is removed.
    drop(c);
    assert!(lab.revoke(&Guest {
        tag,
        tap_name: tap,
        mac: [0; 6],
        ip: GATEWAY,
        tap: File::open("/dev/null").unwrap(),
    }));
    let del = format!(r#"{{"vm":"{tag}","tap":"{tap}"}}"#);
    assert!(changed(&call(env, "priv.netns.delete", &del).unwrap()));
    assert!(!std::path::Path::new(&ns).exists(), "{ns} outlived the delete");
    wait_for("the veth gone", DEADLINE, || {
        (!env.ip_in_helper_ns(&["link", "show", tap]).status.success()).then_some(())
    });
    assert!(!changed(&call(env, "priv.netns.delete", &del).unwrap()));
}
