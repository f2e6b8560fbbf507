//! Pseudo-terminals for commands and sessions: a new pair of a given
//! size, resizing, and the master side as async reader and writer.

use banger_proto::stream::WinSize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};

/// A new terminal of `size`: (master, slave).
pub fn open_pty(size: WinSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-parameters are valid; name and termios may be null.
    if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty just gave us these descriptors.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [m.as_raw_fd(), s.as_raw_fd()] {
        // SAFETY: plain fcntl on descriptors we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: as above.
    unsafe {
        let fl = libc::fcntl(m.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(m.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((m, s))
}

pub fn set_size(fd: i32, w: WinSize) {
    let ws = libc::winsize {
        ws_row: w.rows,
        ws_col: w.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: a valid winsize; the kernel signals the foreground group.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// The terminal's master side as an async reader: EIO (every slave
/// closed) is the end of its output.
pub struct TtyReader(pub Arc<AsyncFd<OwnedFd>>);
pub struct TtyWriter(pub Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for TtyReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // SAFETY: reading into an initialised buffer of this length.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                )
            };
            if n >= 0 {
                buf.advance(n as usize);
                return std::task::Poll::Ready(Ok(()));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => guard.clear_ready(),
                Some(libc::EIO) => return std::task::Poll::Ready(Ok(())),
                _ => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TtyWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_write_ready(cx))?;
            // SAFETY: writing from a valid slice.
            let n = unsafe { libc::write(guard.get_inner().as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                return std::task::Poll::Ready(Ok(n as usize));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                guard.clear_ready();
            } else {
                return std::task::Poll::Ready(Err(e));
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
