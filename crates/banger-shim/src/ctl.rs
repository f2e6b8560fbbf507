//! The control channel between the shim's keeper and its task server: a
//! SOCK_SEQPACKET socket pair over which the keeper hands the server a
//! copy of every descriptor containerd reaches the shim through (its
//! listener and each accepted connection), so that whichever of the two
//! dies, the other still holds them and containerd sees no hang-up. Its
//! end (EOF) is how each learns that the other died.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Where a spawned partner finds its end of the channel.
pub const CTL_FD: RawFd = 3;
pub const CTL_ENV: &str = "BANGER_SHIM_CTL_FD";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// containerd's listener (fd attached).
    Listener,
    /// An accepted containerd connection and its id (fd attached).
    Conn(u64),
    /// containerd closed connection `id`: its copy can go.
    Closed(u64),
    /// Everything held has been sent (the new partner may start).
    Synced,
    /// The server is ending cleanly (containerd's Shutdown): so does the
    /// keeper, rather than restarting it.
    Bye,
}

impl Msg {
    fn encode(self) -> [u8; 9] {
        let (kind, id) = match self {
            Msg::Listener => (1, 0),
            Msg::Conn(id) => (2, id),
            Msg::Closed(id) => (3, id),
            Msg::Synced => (4, 0),
            Msg::Bye => (5, 0),
        };
        let mut b = [0u8; 9];
        b[0] = kind;
        b[1..].copy_from_slice(&id.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        if b.len() != 9 {
            return None;
        }
        let id = u64::from_be_bytes(b[1..9].try_into().ok()?);
        Some(match b[0] {
            1 => Msg::Listener,
            2 => Msg::Conn(id),
            3 => Msg::Closed(id),
            4 => Msg::Synced,
            5 => Msg::Bye,
            _ => return None,
        })
    }
}

/// A pair of connected ends, close-on-exec.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `msg`, with `fd` attached when given.
pub fn send(sock: &OwnedFd, msg: Msg, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = msg.encode();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned as cmsg wants.
    let mut space = [0u64; 4];
    // SAFETY: msghdr points at live buffers of the given sizes; the cmsg
    // macros stay within `space`, sized for one int.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        if let Some(fd) = fd {
            m.msg_control = space.as_mut_ptr().cast();
            m.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        }
        if libc::sendmsg(sock.as_raw_fd(), &m, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The next message and its descriptor; `None` once the partner is gone.
pub fn recv(sock: &OwnedFd) -> std::io::Result<Option<(Msg, Option<OwnedFd>)>> {
    let mut bytes = [0u8; 16];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut space = [0u64; 4];
    // SAFETY: as in `send`; a descriptor the kernel installed is owned here.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = space.as_mut_ptr().cast();
        m.msg_controllen = std::mem::size_of_val(&space);
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut m, libc::MSG_CMSG_CLOEXEC);
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break n;
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        let mut fd = None;
        let c = libc::CMSG_FIRSTHDR(&m);
        if !c.is_null() && (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
            fd = Some(OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                libc::CMSG_DATA(c).cast::<RawFd>(),
            )));
        }
        let msg = Msg::decode(&bytes[..n as usize]).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed control message")
        })?;
        Ok(Some((msg, fd)))
    }
}

/// This process's end of the channel, if its partner started it with one.
pub fn from_env() -> Option<OwnedFd> {
    let fd: RawFd = std::env::var(CTL_ENV).ok()?.parse().ok()?;
    // SAFETY: the partner put our end at this descriptor for us alone; it
    // is made close-on-exec so our own children do not hold it.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Some(OwnedFd::from_raw_fd(fd))
    }
}

/// Spawns `c` (this executable, as keeper or server) with the other end
/// of a new channel at [`CTL_FD`]; returns the child and this end. The
/// child's end is not kept here, so its death is seen as this end's EOF.
pub fn spawn_partner(mut c: std::process::Command) -> std::io::Result<(std::process::Child, OwnedFd)> {
    use std::os::unix::process::CommandExt;
    let (mine, theirs) = pair()?;
    let end = theirs.as_raw_fd();
    c.env(CTL_ENV, CTL_FD.to_string());
    // SAFETY: only dup2 (or fcntl) between fork and exec.
    unsafe { c.pre_exec(move || install(end)) };
    let child = c.spawn()?;
    drop(theirs);
    Ok((child, mine))
}

/// Gives a new partner copies of the listener and of every connection,
/// then says it has everything.
pub fn hand_over<'a>(
    ctl: &OwnedFd,
    listener: &OwnedFd,
    conns: impl IntoIterator<Item = (&'a u64, &'a OwnedFd)>,
) -> std::io::Result<()> {
    send(ctl, Msg::Listener, Some(listener.as_raw_fd()))?;
    for (id, fd) in conns {
        send(ctl, Msg::Conn(*id), Some(fd.as_raw_fd()))?;
    }
    send(ctl, Msg::Synced, None)
}

/// Puts `end` at [`CTL_FD`] in a child about to exec.
///
/// # Safety
/// Only between fork and exec.
unsafe fn install(end: RawFd) -> std::io::Result<()> {
    // dup2 onto itself would leave close-on-exec set.
    let r = if end == CTL_FD {
        libc::fcntl(end, libc::F_SETFD, 0)
    } else {
        libc::dup2(end, CTL_FD)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_and_the_end_is_seen() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        send(&a, Msg::Conn(42), Some(x.as_raw_fd())).unwrap();
        send(&a, Msg::Closed(42), None).unwrap();
        let (m, fd) = recv(&b).unwrap().unwrap();
        assert_eq!(m, Msg::Conn(42));
        assert!(fd.is_some_and(|f| f.as_raw_fd() != x.as_raw_fd()));
        assert_eq!(recv(&b).unwrap().unwrap().0, Msg::Closed(42));
        drop(a);
        assert!(recv(&b).unwrap().is_none(), "the partner's end went unseen");
    }
}
