//! `agent.ports` and `agent.stats`: what listens in the guest and what the
//! guest uses, read from `/proc` (parsed in [`crate::procfs`]) and
//! `statvfs`. Plain figures; the host decides what to make of them.

use crate::procfs;
use banger_proto::methods::agent::{
    DiskFigures, GuestPorts, GuestStats, ListeningSocket, SocketProto, MAX_PORTS,
};
use banger_proto::RpcError;
use std::collections::HashMap;
use std::time::Duration;

/// How long the CPU counters are sampled.
const CPU_SAMPLE: Duration = Duration::from_millis(200);
/// The longest command name passed on (the kernel's is 15 bytes).
const MAX_COMM: usize = 64;

/// Socket inode → (pid, comm) of the lowest pid holding it.
fn socket_owners() -> HashMap<u64, (u32, String)> {
    let mut owners: HashMap<u64, (u32, String)> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| procfs::socket_inode(l.to_str()?))
            else {
                continue;
            };
            let comm = comm
                .get_or_insert_with(|| {
                    let mut c = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                    c.truncate(c.trim_end_matches('\n').len());
                    c.chars().take(MAX_COMM).collect::<String>()
                })
                .clone();
            owners
                .entry(inode)
                .and_modify(|o| {
                    if pid < o.0 {
                        *o = (pid, comm.clone())
                    }
                })
                .or_insert((pid, comm));
        }
    }
    owners
}

fn ports_blocking() -> GuestPorts {
    let owners = socket_owners();
    let mut out = GuestPorts::default();
    for (file, proto) in [
        ("/proc/net/tcp", SocketProto::Tcp),
        ("/proc/net/tcp6", SocketProto::Tcp),
        ("/proc/net/udp", SocketProto::Udp),
        ("/proc/net/udp6", SocketProto::Udp),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for s in procfs::parse_net_sockets(&text) {
            if !procfs::is_listening(&s, proto == SocketProto::Tcp) {
                continue;
            }
            if out.sockets.len() == MAX_PORTS {
                out.truncated = true;
                return out;
            }
            let owner = owners.get(&s.inode);
            out.sockets.push(ListeningSocket {
                proto,
                address: s.local.to_string(),
                port: s.port,
                pid: owner.map(|o| o.0),
                comm: owner.map(|o| o.1.clone()),
            });
        }
    }
    out
}

pub async fn ports() -> Result<GuestPorts, RpcError> {
    tokio::task::spawn_blocking(ports_blocking)
        .await
        .map_err(|e| RpcError::failed(e.to_string()))
}

fn read(path: &str) -> Result<String, RpcError> {
    std::fs::read_to_string(path).map_err(|e| RpcError::failed(format!("reading {path}: {e}")))
}

fn cpu_times() -> Result<procfs::CpuTimes, RpcError> {
    procfs::parse_proc_stat(&read("/proc/stat")?)
        .ok_or_else(|| RpcError::failed("/proc/stat has no cpu line"))
}

fn disk(path: &str) -> Option<DiskFigures> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed struct statvfs fills.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut v) } != 0 {
        return None;
    }
    let unit = v.f_frsize as u64;
    let blocks = |n: u64| n.saturating_mul(unit);
    Some(DiskFigures {
        path: path.to_string(),
        total_bytes: blocks(v.f_blocks),
        used_bytes: blocks(v.f_blocks.saturating_sub(v.f_bfree)),
        available_bytes: blocks(v.f_bavail),
    })
}

pub async fn stats() -> Result<GuestStats, RpcError> {
    let before = cpu_times()?;
    let started = std::time::Instant::now();
    tokio::time::sleep(CPU_SAMPLE).await;
    let after = cpu_times()?;
    let sample_ms = started.elapsed().as_millis() as u64;
    let (mem_total_bytes, mem_available_bytes) = procfs::parse_meminfo(&read("/proc/meminfo")?)
        .ok_or_else(|| RpcError::failed("/proc/meminfo lacks MemTotal or MemAvailable"))?;
    let net_dev = read("/proc/net/dev").unwrap_or_default();
    let net = procfs::parse_net_dev(&net_dev, "eth0");
    Ok(GuestStats {
        vcpus: after.cpus,
        cpu_busy_ticks: after.busy.saturating_sub(before.busy),
        cpu_total_ticks: after.total.saturating_sub(before.total),
        sample_ms,
        mem_total_bytes,
        mem_available_bytes,
        disks: ["/", "/root"].into_iter().filter_map(disk).collect(),
        net_interface: net.map(|_| "eth0".to_string()),
        net_rx_bytes: net.map_or(0, |n| n.0),
        net_tx_bytes: net.map_or(0, |n| n.1),
        uptime_secs: procfs::parse_uptime(&read("/proc/uptime")?).unwrap_or_default(),
        load: procfs::parse_loadavg(&read("/proc/loadavg")?).unwrap_or_default(),
    })
}
