//! A VM's console log (`serial.log`): written by the VMM, read by
//! `vm logs` and by boot failures, and bounded.
//!
//! The guest decides what goes to its console, so it could fill the host's
//! disk (10 MB a minute is easy). The watcher keeps each running VM's log
//! under `console_log_max_bytes` of disk by punching a hole over its older
//! part: the VMM keeps writing at its offset (no cooperation needed, no
//! O_APPEND assumed), the blocks are freed, and readers take the tail.

use super::VmService;
use crate::sync::Locked;
use std::os::fd::AsRawFd;
use std::path::Path;

/// What is kept of the newest output when the log is cut.
const KEEP_FRACTION: u64 = 4;

/// Frees all but the newest `max / 4` bytes of `path` when it uses more
/// than `max` bytes of disk. Returns the bytes freed.
pub(super) fn cap(path: &Path, max: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let used = meta.blocks() * 512;
    if used <= max {
        return Ok(0);
    }
    let keep = max / KEEP_FRACTION;
    // Whole 4 KiB blocks, so the cut frees what it says.
    let end = meta.len().saturating_sub(keep) & !4095;
    if end == 0 {
        return Ok(0);
    }
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    // SAFETY: a valid descriptor; the range lies inside the file.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            end as libc::off_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let after = std::fs::metadata(path)?.blocks() * 512;
    Ok(used.saturating_sub(after))
}

/// The last `max` bytes of a text file, read from the end (a console log
/// can be large and mostly hole), with the dropped part's zeros left out.
pub(super) fn tail(path: &Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    let mut buf = Vec::with_capacity(max.min(len as usize));
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(max as u64).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    buf.retain(|&b| b != 0);
    String::from_utf8_lossy(&buf).into_owned()
}

impl VmService {
    /// Keeps every running VM's console log within its budget (the
    /// watcher calls this every tick).
    pub(super) fn cap_console_logs(&self) {
        let logs: Vec<(String, std::path::PathBuf)> = self
            .handles
            .locked()
            .iter()
            .map(|(id, h)| (id.clone(), h.launched.serial_log.clone()))
            .collect();
        for (id, log) in logs {
            match cap(&log, self.settings.console_log_max_bytes) {
                Ok(0) => {}
                Ok(freed) => {
                    tracing::info!(vm_id = %id, freed, "console log over its budget; dropped its oldest output")
                }
                Err(e) => tracing::debug!(vm_id = %id, error = %e, "could not cap the console log"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_budget_keeps_its_newest_output_and_frees_the_rest() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut text = Vec::new();
        for i in 0..40_000 {
            text.extend_from_slice(format!("line {i:08}\n").as_bytes());
        }
        std::fs::write(&log, &text).unwrap();
        let max = 64 * 1024;
        assert!(cap(&log, max).unwrap() > 0);
        let m = std::fs::metadata(&log).unwrap();
        assert!(m.blocks() * 512 <= max, "still uses {} bytes", m.blocks() * 512);
        assert_eq!(m.len(), text.len() as u64, "offsets kept for the writer");
        let t = tail(&log, 200);
        assert!(t.ends_with("line 00039999\n"), "{t}");
        // Under budget: untouched.
        assert_eq!(cap(&log, max).unwrap(), 0);
    }
}
