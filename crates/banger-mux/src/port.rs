//! The guest's end: the virtio-serial port as a non-blocking tokio stream.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The device of the port named `name`, if the guest has one. Without
/// udev there is no `/dev/virtio-ports/<name>` link: the name is in sysfs.
pub fn find(name: &str) -> Option<PathBuf> {
    find_in(Path::new("/sys/class/virtio-ports"), Path::new("/dev"), name)
}

fn find_in(sys: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(sys).ok()?.flatten().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim() == name).then(|| dev.join(e.file_name()))
    })
}

/// An open port. Reads return 0 while no host is connected to its other
/// end (the kernel reports a hang-up); writes wait for one.
///
/// The hang-up the driver reports while no host is connected sticks to the
/// descriptor's readiness for good (tokio never clears "closed"), so from
/// then on "ready" no longer means "try again and it may work": after a
/// would-block on a descriptor in that state, the port retries on a short
/// timer instead of spinning. The channel opens the device anew for each
/// session, which starts a clean registration.
pub struct Port {
    fd: AsyncFd<File>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How often a port whose host hung up once is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_millis(5);

impl Port {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        // SAFETY: the file is owned by the AsyncFd and closed only with it.
        let fd = unsafe { AsyncFd::register(f) }.map_err(|e| e.into_parts().1)?;
        Ok(Port { fd, retry: None })
    }

    /// After a would-block: whether to wait for the retry timer (the
    /// readiness says "closed", which will not change) rather than for the
    /// kernel to say ready again.
    fn must_wait(&mut self, cx: &mut Context<'_>, closed: bool) -> bool {
        use std::future::Future;
        if !closed {
            return false;
        }
        let t = self
            .retry
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(RETRY)));
        if t.as_mut().poll(cx).is_ready() {
            self.retry = None;
            return false;
        }
        true
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            match guard.try_io(|f| f.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {
                    if this.must_wait(cx, closed) {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {
                    if this.must_wait(cx, closed) {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_port_by_its_name() {
        let d = tempfile::tempdir().unwrap();
        for (dir, name) in [("vport0p0", "other\n"), ("vport0p1", "banger.agent\n")] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
            std::fs::write(d.path().join(dir).join("name"), name).unwrap();
        }
        assert_eq!(
            super::find_in(d.path(), std::path::Path::new("/dev"), "banger.agent"),
            Some("/dev/vport0p1".into())
        );
        assert_eq!(
            super::find_in(d.path(), std::path::Path::new("/dev"), "nope"),
            None
        );
    }
}
