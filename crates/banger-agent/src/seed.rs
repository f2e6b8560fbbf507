//! The host's time and entropy, given to the guest as it comes up: a
//! guest's clock starts from whatever the VMM's RTC says (Firecracker has
//! none) and stands still while a VM is paused or snapshotted, and a fresh
//! guest's entropy pool is what its kernel could scrape together at boot.

use banger_proto::methods::agent as a;
use banger_proto::RpcError;
use std::path::Path;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn realtime_nanos() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn set_clock(unix_nanos: u64) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec; the agent runs as root in the guest.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `bytes` into the kernel's pool and credits them as entropy.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: the buffer holds the header and buf_size bytes after it.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Credited entropy reaches the output generator only at its next
    // reseed, up to a minute away: until then two guests restored from one
    // snapshot would read the same "random" bytes. Reseed now.
    // SAFETY: an ioctl without argument on a descriptor we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        let e = std::io::Error::last_os_error();
        // Kernels before 4.17 lack it: the entropy is in, reseeded later.
        if !matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) {
            return Err(e);
        }
        tracing::warn!(error = %e, "this kernel cannot reseed on demand");
    }
    Ok(())
}

/// Writes `bytes` over the start of `path` and cuts it to their length,
/// never truncating it to nothing first: ext4 flushes a file that was
/// truncated to zero and rewritten when it is closed (`auto_da_alloc`), a
/// disk write that takes tens of milliseconds in a guest under emulation,
/// on the path of every restore.
fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)
}

pub fn apply(req: a::Seed) -> Result<a::Seeded, RpcError> {
    use base64::Engine;
    let entropy = base64::engine::general_purpose::STANDARD
        .decode(&req.entropy_b64)
        .map_err(|e| RpcError::bad_request(format!("entropy is not base64: {e}")))?;
    if entropy.len() > a::MAX_SEED_BYTES {
        return Err(RpcError::bad_request(format!(
            "{} bytes of entropy; at most {}",
            entropy.len(),
            a::MAX_SEED_BYTES
        )));
    }
    // Before 2001 or after 2100 is not a host's clock.
    if !(978_307_200_000_000_000..4_102_444_800_000_000_000).contains(&req.unix_nanos) {
        return Err(RpcError::bad_request(format!("{} is not a time", req.unix_nanos)));
    }
    if let Some(h) = &req.hostname {
        let label = !h.is_empty()
            && h.len() <= 63
            && h.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !label {
            return Err(RpcError::bad_request(format!(
                "hostname {h:?} is not a DNS label"
            )));
        }
    }
    let net = req
        .net
        .as_ref()
        .map(crate::netcfg::parse)
        .transpose()
        .map_err(RpcError::bad_request)?;
    let step = i128::from(req.unix_nanos) - realtime_nanos();
    set_clock(req.unix_nanos).map_err(|e| RpcError::failed(format!("setting the clock: {e}")))?;
    add_entropy(&entropy).map_err(|e| RpcError::failed(format!("adding entropy: {e}")))?;
    let clock_step_ms = (step / 1_000_000).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    tracing::info!(
        clock_step_ms,
        entropy_bytes = entropy.len(),
        "clock and entropy seeded by the host"
    );
    if let Some(h) = &req.hostname {
        // SAFETY: a byte string of the length given.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            return Err(RpcError::failed(format!(
                "setting the hostname: {}",
                std::io::Error::last_os_error()
            )));
        }
        // What a later boot (or a tool reading the file) sees.
        let _ = write_in_place(Path::new("/etc/hostname"), format!("{h}\n").as_bytes());
        tracing::info!(hostname = %h, "hostname set by the host");
    }
    if let Some(id) = &net {
        crate::netcfg::apply(id).map_err(|e| RpcError::failed(format!("eth0: {e}")))?;
        tracing::info!(address = %id.address, prefix = id.prefix, gateway = %id.gateway, "network identity set by the host");
    }
    Ok(a::Seeded {
        clock_step_ms,
        entropy_bytes: entropy.len() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_in_place_leaves_exactly_the_new_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hostname");
        write_in_place(&p, b"a-much-longer-source-name\n").unwrap();
        write_in_place(&p, b"clone-1\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"clone-1\n");
        write_in_place(&p, b"clone-with-a-longer-name\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"clone-with-a-longer-name\n");
    }
}
