//! A thread that makes relaxed commits durable off their callers' paths.
//!
//! A commit made with `synchronous=NORMAL` is in the write-ahead log, in
//! the page cache: a killed process loses nothing, a power loss may. One
//! `fdatasync` of the log makes it, and every commit before it, durable;
//! that is all a synced commit does beyond a relaxed one. Requests that
//! arrive while a sync runs are served by the next one.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// Syncs asked for, and the number the last finished sync covered.
    asked: u64,
    done: u64,
    /// Whether the last sync failed.
    failed: bool,
    closed: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub(crate) struct Syncer {
    shared: Shared,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Plain counters: usable whatever a panicking holder left.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Syncer {
    /// Starts the thread that syncs the log at `wal`.
    pub(crate) fn start(wal: &Path) -> Self {
        let shared: Shared = Arc::default();
        let (theirs, wal) = (shared.clone(), wal.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("store-sync".into())
            .spawn(move || run(&theirs, &wal))
            .ok();
        if thread.is_none() {
            // No thread: every request counts as failed, and a waiter is
            // told so; the next synced commit still syncs.
            lock(&shared.0).closed = true;
        }
        Syncer { shared, thread }
    }

    /// Asks for a sync of everything committed so far.
    pub(crate) fn ask(&self) {
        let mut st = lock(&self.shared.0);
        st.asked += 1;
        self.shared.1.notify_all();
    }

    /// Waits up to `limit` for every sync asked so far; true if they all
    /// ended, the last one without an error.
    pub(crate) fn wait(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let (m, cv) = &*self.shared;
        let mut st = lock(m);
        let target = st.asked;
        while st.done < target {
            let now = Instant::now();
            if now >= end || st.closed {
                return false;
            }
            st = cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        !st.failed
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        lock(&self.shared.0).closed = true;
        self.shared.1.notify_all();
        // The thread ends after the syncs already asked for.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, wal: &Path) {
    let (m, cv) = &**shared;
    loop {
        let target = {
            let mut st = lock(m);
            while st.asked == st.done && !st.closed {
                st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.asked == st.done {
                return;
            }
            st.asked
        };
        let ok = sync(wal);
        let mut st = lock(m);
        st.done = target;
        st.failed = !ok;
        cv.notify_all();
    }
}

/// Syncs the log's data. No log (none written yet, or removed as the last
/// connection closed) means nothing is waiting in one.
fn sync(wal: &Path) -> bool {
    match std::fs::File::open(wal) {
        Ok(f) => f.sync_data().is_ok(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_asked_for_is_done_before_wait_says_so() {
        let d = tempfile::tempdir().unwrap();
        let wal = d.path().join("db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let s = Syncer::start(&wal);
        assert!(s.wait(Duration::ZERO), "nothing asked, nothing to wait for");
        // Asked again and again: some requests come while the thread is
        // idle, waiting to be woken.
        for _ in 0..50 {
            s.ask();
            assert!(s.wait(Duration::from_secs(10)), "the sync never ended");
        }
    }

    #[test]
    fn a_waiter_waits_for_the_sync_under_way_and_hears_of_its_failure() {
        let d = tempfile::tempdir().unwrap();
        // A FIFO holds the sync in its open until a writer comes, and
        // cannot be synced: a sync that is seen under way, then failing.
        let wal = d.path().join("db-wal");
        let c = std::ffi::CString::new(wal.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let s = Syncer::start(&wal);
        s.ask();
        assert!(
            !s.wait(Duration::from_millis(100)),
            "wait did not wait for the sync"
        );
        // The syncer's open for reading lets a writer in (without one, a
        // non-blocking open for writing fails): it has begun.
        use std::os::unix::fs::OpenOptionsExt;
        let end = Instant::now() + Duration::from_secs(10);
        let _writer = loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&wal)
            {
                Ok(w) => break w,
                Err(e) if Instant::now() < end => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "{e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("the syncer never opened the log: {e}"),
            }
        };
        assert!(!s.wait(Duration::from_secs(10)), "a failed sync reads as done");
        std::fs::remove_file(&wal).unwrap();
        std::fs::write(&wal, b"frames").unwrap();
        s.ask();
        assert!(
            s.wait(Duration::from_secs(10)),
            "a later sync does not clear the failure"
        );
    }
}
