//! Supervising VMM processes by PID. They are started in their own session
//! so they outlive the daemon; after a daemon restart they are found again
//! by PID and checked against a marker in their command line, so a recycled
//! PID is never mistaken for a VM.

use crate::VmmError;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Spawns `cmd` detached (new session, stdio to `log`). Returns its PID.
pub fn spawn_detached(cmd: &mut tokio::process::Command, log: &Path) -> Result<u32, VmmError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| VmmError::io(format!("opening {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| VmmError::io("dup log fd", e))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| VmmError::io(format!("starting {:?}", cmd.as_std().get_program()), e))?;
    let pid = child
        .id()
        .ok_or_else(|| VmmError::Failed("child exited at once".into()))?;
    // Dropping the handle hands the child to tokio's orphan reaper, so it
    // never lingers as a zombie while this daemon lives.
    drop(child);
    Ok(pid)
}

/// Is `pid` a live (non-zombie) process whose command line contains `marker`?
/// This is the one answer to "is this VM's process alive".
pub fn alive(pid: u32, marker: &str) -> bool {
    if pid == 0 {
        return false;
    }
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // State is the first field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => String::from_utf8_lossy(&c).contains(marker),
        Err(_) => false,
    }
}

/// Waits until the process is gone or the deadline passes.
pub async fn wait_gone(pid: u32, marker: &str, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while alive(pid, marker) {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we verified carries our marker.
    unsafe { libc::kill(pid as i32, sig) };
}

/// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
/// A hung or paused VMM is never waited on forever.
pub async fn terminate(pid: u32, marker: &str, grace: Duration) {
    if !alive(pid, marker) {
        return;
    }
    signal(pid, libc::SIGTERM);
    if wait_gone(pid, marker, grace).await {
        return;
    }
    kill(pid, marker).await;
}

/// SIGKILL and wait (bounded) for the process to disappear.
pub async fn kill(pid: u32, marker: &str) {
    if alive(pid, marker) {
        signal(pid, libc::SIGKILL);
        if !wait_gone(pid, marker, Duration::from_secs(5)).await {
            tracing::warn!(pid, "process survived SIGKILL for 5 s");
        }
    }
}

/// Every live process whose command line contains `marker` (a VM's
/// directory). Used to tear a VM down when its scratch file is lost.
pub fn find_by_marker(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid, marker))
        .collect()
}
