//! Passing a file descriptor with a response (SCM_RIGHTS), so the root
//! helper can open a device (a tap) and hand it to an unprivileged caller.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Sends `bytes` with `fd` attached to the first byte. The socket may be
/// non-blocking: would-block is retried briefly.
pub async fn send_with_fd(sock: RawFd, bytes: &[u8], fd: &OwnedFd) -> std::io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let mut sent = 0;
    let mut first = true;
    for _ in 0..5000 {
        let iov = [IoSlice::new(&bytes[sent..])];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let res = if first {
            sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        } else {
            sendmsg::<()>(sock, &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
        };
        match res {
            Ok(n) => {
                first = false;
                sent += n;
                if sent >= bytes.len() {
                    return Ok(());
                }
            }
            Err(nix::errno::Errno::EAGAIN) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::other("peer did not drain the socket"))
}

/// Receives up to `buf.len()` bytes and any descriptors that came with them.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(received.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok(msg.bytes)
}
