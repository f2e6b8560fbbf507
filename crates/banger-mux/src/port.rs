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
pub struct Port(AsyncFd<File>);

impl Port {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        // SAFETY: the file is owned by the AsyncFd and closed only with it.
        let fd = unsafe { AsyncFd::register(f) }.map_err(|e| e.into_parts().1)?;
        Ok(Port(fd))
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            match guard.try_io(|f| f.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
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
