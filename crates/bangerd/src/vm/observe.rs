//! Read-only views from inside a running guest: what listens (`vm.ports`,
//! with an HTTP check of what the host can reach) and what it uses
//! (`vm.stats`). The agent's replies are hostile input: lists are bounded,
//! numbers clamped, addresses parsed, text cut short (the CLI escapes it).
//! Each call has a short deadline so a wedged guest cannot hang a command.

use super::{agent, alloc, VmService};
use banger_proto::methods::agent::{self as a, GuestPorts, GuestStats, SocketProto, MAX_PORTS};
use banger_proto::methods::daemon::{DiskUsage, PortInfo, VmPorts, VmStats};
use banger_proto::{Ctx, Method, RpcError};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the guest has to answer `vm.stats` or `vm.ports`.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long one port has to connect and answer `HEAD /`.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(1);
/// At most this many ports are checked for HTTP, this many at a time: a
/// guest listening everywhere costs a few seconds, not minutes.
const HTTP_CHECKS: usize = 256;
const HTTP_PARALLEL: usize = 64;
/// The longest process name or interface name passed on.
const MAX_TEXT: usize = 64;
/// The most filesystems a stats reply may list.
const MAX_DISKS: usize = 8;

fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Bound to every address or to the guest's own, so the host can reach it.
fn reachable(bind: IpAddr, guest: Option<Ipv4Addr>) -> bool {
    let v4 = match bind {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    bind.is_unspecified() || (v4.is_some() && v4 == guest)
}

/// The agent's list, checked: at most [`MAX_PORTS`] entries, unparsable
/// addresses and port 0 dropped, duplicates merged, names cut, sorted by
/// port. `http` is left unset; the caller checks.
pub fn ports_view(name: &str, guest: Option<Ipv4Addr>, raw: GuestPorts) -> VmPorts {
    let truncated = raw.truncated || raw.sockets.len() > MAX_PORTS;
    let mut ports: Vec<PortInfo> = raw
        .sockets
        .into_iter()
        .take(MAX_PORTS)
        .filter_map(|s| {
            let bind: IpAddr = s.address.parse().ok()?;
            if s.port == 0 {
                return None;
            }
            let reachable = reachable(bind, guest);
            Some(PortInfo {
                proto: s.proto,
                bind: bind.to_string(),
                port: s.port,
                reachable,
                address: (reachable && guest.is_some()).then(|| format!("{name}.vm:{}", s.port)),
                pid: s.pid.filter(|p| *p > 0),
                process: s.comm.map(|c| cut(&c, MAX_TEXT)).filter(|c| !c.is_empty()),
                http: None,
            })
        })
        .collect();
    ports.sort_by(|x, y| (x.port, x.proto, &x.bind).cmp(&(y.port, y.proto, &y.bind)));
    ports.dedup_by(|x, y| (x.port, x.proto, &x.bind) == (y.port, y.proto, &y.bind));
    VmPorts {
        name: name.to_string(),
        ports,
        http_checked: false,
        truncated,
    }
}

/// A finite, non-negative number no larger than `max`; anything else is 0.
fn sane(x: f64, max: f64) -> f64 {
    if x.is_finite() && x >= 0.0 {
        x.min(max)
    } else {
        0.0
    }
}

/// The agent's figures, checked and turned into what `vm stats` shows.
pub fn stats_view(name: &str, raw: GuestStats) -> VmStats {
    let cpu_percent = match raw.cpu_total_ticks {
        0 => 0.0,
        t => (raw.cpu_busy_ticks.min(t) as f64 / t as f64 * 1000.0).round() / 10.0,
    };
    VmStats {
        name: name.to_string(),
        vcpus: raw.vcpus.min(4096),
        cpu_percent,
        memory_total_bytes: raw.mem_total_bytes,
        memory_available_bytes: raw.mem_available_bytes.min(raw.mem_total_bytes),
        disks: raw
            .disks
            .into_iter()
            .take(MAX_DISKS)
            .map(|d| DiskUsage {
                path: cut(&d.path, MAX_TEXT),
                total_bytes: d.total_bytes,
                used_bytes: d.used_bytes.min(d.total_bytes),
            })
            .collect(),
        net_interface: raw.net_interface.map(|n| cut(&n, MAX_TEXT)),
        net_rx_bytes: raw.net_rx_bytes,
        net_tx_bytes: raw.net_tx_bytes,
        // A century is more than any guest has been up.
        uptime_secs: sane(raw.uptime_secs, 100.0 * 365.0 * 86400.0) as u64,
        load: raw.load.map(|l| (sane(l, 1e6) * 100.0).round() / 100.0),
    }
}

/// Whether something at `addr` answers `HEAD /` with an HTTP status line
/// within `deadline`.
pub async fn answers_http(addr: SocketAddr, deadline: Duration) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"HEAD / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/")
    };
    matches!(tokio::time::timeout(deadline, probe).await, Ok(Some(true)))
}

impl VmService {
    /// One agent call on a running VM, given up after [`GUEST_DEADLINE`].
    async fn observe<M: Method>(
        &self,
        ctx: &Ctx,
        name: &str,
        params: &M::Params,
    ) -> Result<M::Output, RpcError> {
        let vm = self.get(name)?;
        let h = self.running_handles(&vm)?;
        let call = agent::call::<M>(&h.launched.vsock_uds, &ctx.op_id, params, |_| ());
        match tokio::time::timeout(GUEST_DEADLINE, call).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::failed(format!(
                "VM {name} did not answer within {}s: its guest may be wedged or overloaded",
                GUEST_DEADLINE.as_secs()
            ))),
        }
    }

    pub async fn ports(&self, ctx: &Ctx, name: &str) -> Result<VmPorts, RpcError> {
        let raw = self
            .observe::<a::Ports>(ctx, name, &banger_proto::methods::Empty {})
            .await?;
        let vm = self.get(name)?;
        let guest = vm.runtime.guest_ip.as_deref().and_then(alloc::address_of);
        let mut view = ports_view(name, guest, raw);
        let Some(ip) = guest else {
            return Ok(view);
        };
        view.http_checked = true;
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(HTTP_PARALLEL));
        let checks: Vec<_> = view
            .ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.proto == SocketProto::Tcp && p.reachable)
            .take(HTTP_CHECKS)
            .map(|(i, p)| {
                let addr = SocketAddr::new(IpAddr::V4(ip), p.port);
                let gate = gate.clone();
                let task = banger_proto::opid::spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    answers_http(addr, HTTP_DEADLINE).await
                });
                (i, task)
            })
            .collect();
        for (i, task) in checks {
            view.ports[i].http = Some(task.await.unwrap_or(false));
        }
        Ok(view)
    }

    pub async fn stats(&self, ctx: &Ctx, name: &str) -> Result<VmStats, RpcError> {
        let raw = self
            .observe::<a::Stats>(ctx, name, &banger_proto::methods::Empty {})
            .await?;
        Ok(stats_view(name, raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::methods::agent::{DiskFigures, ListeningSocket};

    fn sock(proto: SocketProto, address: &str, port: u16) -> ListeningSocket {
        ListeningSocket {
            proto,
            address: address.into(),
            port,
            pid: Some(7),
            comm: Some("srv".into()),
        }
    }

    const GUEST: Option<Ipv4Addr> = Some(Ipv4Addr::new(172, 30, 0, 2));

    #[test]
    fn reachable_ports_get_their_name_and_local_ones_do_not() {
        let raw = GuestPorts {
            sockets: vec![
                sock(SocketProto::Tcp, "::", 8080),
                sock(SocketProto::Tcp, "127.0.0.1", 631),
                sock(SocketProto::Tcp, "172.30.0.2", 22),
                sock(SocketProto::Udp, "0.0.0.0", 5353),
                sock(SocketProto::Tcp, "::ffff:172.30.0.2", 9000),
                sock(SocketProto::Tcp, "172.30.0.9", 9001),
            ],
            truncated: false,
        };
        let v = ports_view("web", GUEST, raw);
        let got: Vec<(u16, bool, Option<&str>)> = v
            .ports
            .iter()
            .map(|p| (p.port, p.reachable, p.address.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (22, true, Some("web.vm:22")),
                (631, false, None),
                (5353, true, Some("web.vm:5353")),
                (8080, true, Some("web.vm:8080")),
                (9000, true, Some("web.vm:9000")),
                (9001, false, None),
            ]
        );
        // Without a network nothing has an address.
        let v = ports_view(
            "web",
            None,
            GuestPorts {
                sockets: vec![sock(SocketProto::Tcp, "0.0.0.0", 80)],
                truncated: false,
            },
        );
        assert!(v.ports[0].reachable && v.ports[0].address.is_none());
    }

    #[test]
    fn hostile_port_lists_are_bounded_and_cleaned() {
        let mut sockets: Vec<ListeningSocket> = (0..MAX_PORTS as u32 + 500)
            .map(|i| sock(SocketProto::Udp, "0.0.0.0", (i % 60000 + 1) as u16))
            .collect();
        sockets[0] = ListeningSocket {
            comm: Some("x".repeat(10_000)),
            pid: Some(0),
            ..sock(SocketProto::Tcp, "0.0.0.0", 1)
        };
        sockets[1] = sock(SocketProto::Tcp, "not an address\u{1b}[2J", 2);
        sockets[2] = sock(SocketProto::Tcp, "0.0.0.0", 0);
        sockets[3] = sock(SocketProto::Udp, "0.0.0.0", 4);
        sockets[4] = sock(SocketProto::Udp, "0.0.0.0", 4);
        let v = ports_view(
            "web",
            GUEST,
            GuestPorts {
                sockets,
                truncated: false,
            },
        );
        assert!(v.truncated);
        assert!(v.ports.len() <= MAX_PORTS);
        assert_eq!(
            v.ports.len(),
            MAX_PORTS - 3,
            "bad address, port 0 and a duplicate dropped"
        );
        assert_eq!(v.ports[0].port, 1);
        assert_eq!(v.ports[0].process.as_ref().unwrap().len(), MAX_TEXT);
        assert_eq!(v.ports[0].pid, None);
        assert_eq!(v.ports.iter().filter(|p| p.port == 4).count(), 1);
        assert!(v.ports.iter().all(|p| p.port != 2 && p.port != 0));
    }

    #[test]
    fn stats_are_clamped_and_derived() {
        let raw = GuestStats {
            vcpus: 2,
            cpu_busy_ticks: 25,
            cpu_total_ticks: 100,
            sample_ms: 200,
            mem_total_bytes: 512 << 20,
            mem_available_bytes: 400 << 20,
            disks: vec![DiskFigures {
                path: "/".into(),
                total_bytes: 1000,
                used_bytes: 400,
                available_bytes: 500,
            }],
            net_interface: Some("eth0".into()),
            net_rx_bytes: 10,
            net_tx_bytes: 20,
            uptime_secs: 12.7,
            load: [0.123, 1.0, 2.5],
        };
        let s = stats_view("web", raw.clone());
        assert_eq!(s.cpu_percent, 25.0);
        assert_eq!(s.uptime_secs, 12);
        assert_eq!(s.load, [0.12, 1.0, 2.5]);
        assert_eq!(
            (s.memory_total_bytes, s.memory_available_bytes),
            (512 << 20, 400 << 20)
        );
        assert_eq!((s.disks[0].total_bytes, s.disks[0].used_bytes), (1000, 400));

        let hostile = GuestStats {
            vcpus: u32::MAX,
            cpu_busy_ticks: u64::MAX,
            cpu_total_ticks: 3,
            mem_available_bytes: u64::MAX,
            disks: (0..100)
                .map(|_| DiskFigures {
                    path: "\u{1b}".repeat(1000),
                    total_bytes: 1,
                    used_bytes: u64::MAX,
                    available_bytes: 0,
                })
                .collect(),
            uptime_secs: f64::INFINITY,
            load: [f64::NAN, -5.0, 1e300],
            ..raw
        };
        let s = stats_view("web", hostile);
        assert_eq!(s.cpu_percent, 100.0);
        assert_eq!(s.vcpus, 4096);
        assert_eq!(s.memory_available_bytes, s.memory_total_bytes);
        assert_eq!(s.disks.len(), MAX_DISKS);
        assert_eq!(s.disks[0].used_bytes, 1);
        assert_eq!(s.disks[0].path.chars().count(), MAX_TEXT);
        assert_eq!(s.uptime_secs, 0);
        assert_eq!(s.load, [0.0, 0.0, 1e6]);
        let idle = stats_view("web", GuestStats::default());
        assert_eq!(idle.cpu_percent, 0.0);
    }

    #[tokio::test]
    async fn http_is_told_from_other_services() {
        async fn serve(reply: &'static [u8]) -> SocketAddr {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(reply).await;
                }
            });
            addr
        }
        let http = serve(b"HTTP/1.0 200 OK\r\n\r\n").await;
        let ssh = serve(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        let short = serve(b"HTT").await;
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let d = Duration::from_millis(300);
        assert!(answers_http(http, d).await);
        assert!(!answers_http(ssh, d).await);
        assert!(!answers_http(short, d).await);
        let started = std::time::Instant::now();
        assert!(!answers_http(silent.local_addr().unwrap(), d).await);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
