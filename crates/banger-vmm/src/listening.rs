//! Waiting for a VMM's control socket to accept connections, without
//! rounding the wait up to a timer tick.
//!
//! Firecracker listens on its API socket 1-2 ms after it is spawned.
//! Polled with tokio's timer (whole milliseconds), the wait overshoots by
//! up to a millisecond; polled finer, fifty VMs starting at once would
//! spend a core on failed connects. So the socket's directory is watched
//! with inotify: the poll wakes when a file appears there (or after
//! `TICK`, to notice a process that died), and only then connects.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

/// How often the process is checked while nothing appears.
const TICK: Duration = Duration::from_millis(2);

/// An inotify descriptor watching one directory for new entries.
struct DirWatch(AsyncFd<OwnedFd>);

impl DirWatch {
    fn new(dir: &Path) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscall; the descriptor is owned at once.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid descriptor and C string.
        let wd = unsafe {
            libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO)
        };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd's descriptor stays open, and the same, for
        // as long as it is owned, here by the AsyncFd.
        let registered = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        Ok(DirWatch(registered.map_err(io::Error::from)?))
    }

    /// Waits until something appeared in the directory (or `limit`).
    async fn changed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let Ok(mut ready) = self.0.readable().await else {
                    // The reactor refused: fall back to the timeout.
                    std::future::pending::<()>().await;
                    return;
                };
                let mut buf = [0u8; 1024];
                // SAFETY: reads into a buffer we own.
                let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    return;
                }
                ready.clear_ready();
            }
        })
        .await;
    }
}

/// Waits until `sock` accepts a connection, for at most `limit`, while
/// `alive` says the process that is to listen on it still runs.
pub async fn until_listening(
    sock: &Path,
    limit: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<(), String> {
    let end = Instant::now() + limit;
    // Without a watch (no inotify here) the loop below still polls.
    let watch = sock.parent().and_then(|d| DirWatch::new(d).ok());
    loop {
        match UnixStream::connect(sock).await {
            Ok(_) => return Ok(()),
            // Bound, not yet listening: a matter of microseconds.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => tokio::task::yield_now().await,
            Err(_) => match &watch {
                Some(w) => w.changed(TICK).await,
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            },
        }
        if !alive() {
            return Err("the process exited".into());
        }
        if Instant::now() > end {
            return Err(format!("nothing listened within {} s", limit.as_secs()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_made_later_is_connected_to() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("api.sock");
        let made = sock.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let l = std::os::unix::net::UnixListener::bind(&made).unwrap();
            l.accept().is_ok()
        });
        until_listening(&sock, Duration::from_secs(10), || true)
            .await
            .unwrap();
        assert!(t.join().unwrap(), "the listener was never connected to");
    }

    #[tokio::test]
    async fn the_watch_wakes_when_a_file_appears_not_at_its_limit() {
        let d = tempfile::tempdir().unwrap();
        let w = DirWatch::new(d.path()).unwrap();
        let file = d.path().join("new");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::fs::write(file, b"").unwrap();
        });
        let start = Instant::now();
        w.changed(Duration::from_secs(20)).await;
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "woken by the limit, not the file"
        );
        t.join().unwrap();
    }

    #[tokio::test]
    async fn a_dead_process_ends_the_wait() {
        let d = tempfile::tempdir().unwrap();
        let err = until_listening(&d.path().join("api.sock"), Duration::from_secs(10), || false)
            .await
            .unwrap_err();
        assert!(err.contains("exited"), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_times_out() {
        let d = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let err = until_listening(&d.path().join("api.sock"), Duration::from_millis(50), || true)
            .await
            .unwrap_err();
        assert!(err.contains("within"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
