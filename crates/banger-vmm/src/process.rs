//! Supervising VMM processes by PID. They are started in their own process group
//! so they outlive the daemon; after a daemon restart they are found again
//! by PID.
//!
//! Identity: every process banger starts for a VM carries the environment
//! entry `BANGER_VM_DIR=<vm dir>` (the marker). A process belongs to a VM
//! only if that exact entry is in its environment, so a recycled PID, or a
//! user's `tail -f <vm dir>/serial.log`, is never mistaken for (or
//! signalled as) one of its processes. Only when the environment cannot be
//! read (a process that made itself non-dumpable) does an argument that
//! *is* a path inside the VM directory stand in for it.

use crate::VmmError;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The environment variable that names the VM a process was started for.
pub const MARKER_ENV: &str = "BANGER_VM_DIR";

/// Spawns `cmd` detached (own process group, stdout and stderr to `log`,
/// or stdout to `stdout`, started empty), marked as belonging to the VM
/// whose directory is `marker`. Returns its PID.
pub fn spawn_detached(
    cmd: &mut tokio::process::Command,
    stdout: Option<&Path>,
    log: &Path,
    marker: &str,
) -> Result<u32, VmmError> {
    cmd.env(MARKER_ENV, marker);
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| VmmError::io(format!("opening {}", p.display()), e))
    };
    let err = open(log)?;
    let out = match stdout {
        Some(p) => {
            std::fs::File::create(p).map_err(|e| VmmError::io(format!("creating {}", p.display()), e))?
        }
        None => err.try_clone().map_err(|e| VmmError::io("dup log fd", e))?,
    };
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    // A process group of its own keeps the terminal's signals (a Ctrl-C to
    // a daemon run by hand) from reaching the VMM. It is set by
    // posix_spawn itself, where a `pre_exec` hook (setsid) would force a
    // fork of the whole daemon: half a millisecond off every VM start.
    cmd.process_group(0);
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

/// Does the process carry `marker` as its exact `BANGER_VM_DIR`?
fn belongs(pid: u32, marker: &str) -> bool {
    if marker.is_empty() {
        return false;
    }
    let dir = format!("{}/", marker.trim_end_matches('/'));
    let env = std::fs::read(format!("/proc/{pid}/environ"));
    if let Ok(env) = &env {
        let ours = format!("{MARKER_ENV}={marker}");
        let prefix = format!("{MARKER_ENV}=");
        if let Some(e) = env.split(|&b| b == 0).find(|e| e.starts_with(prefix.as_bytes())) {
            // Marked: for this VM or for another, nothing else decides.
            return e == ours.as_bytes();
        }
    }
    // Unmarked: a jailed Firecracker (the jailer clears the environment).
    if jailed_in(pid, Path::new(marker)) {
        return true;
    }
    if env.is_ok() {
        return false;
    }
    // Unreadable environment (a process that made itself non-dumpable):
    // an argument that is a path in the VM directory, never a mere
    // substring of one.
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c
            .split(|&b| b == 0)
            .skip(1)
            .any(|a| a.starts_with(dir.as_bytes()) || a == marker.as_bytes()),
        Err(_) => false,
    }
}

/// Is `pid` the Firecracker jailed for the VM in `vm_dir`? It runs as the
/// uid its jail's root belongs to (a uid of that VM's own, never root,
/// that no user has), with the VM's id as its `--id`. Its root link is no
/// help: the jailer pivots into a mount namespace of its own.
fn jailed_in(pid: u32, vm_dir: &Path) -> bool {
    let Some(id) = vm_dir.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(uid) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
        })
    else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    let owns_jail = std::fs::read_dir(vm_dir.join("jail"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|exec| std::fs::metadata(exec.path().join(id).join("root")).ok())
        .any(|m| m.uid() == uid);
    if uid == 0 || !owns_jail {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2).any(|w| w[0] == b"--id" && w[1] == id.as_bytes())
}

/// Is `pid` a live (non-zombie) process that banger started for the VM
/// whose directory is `marker`? The one answer to "is this VM's process
/// alive".
pub fn alive(pid: u32, marker: &str) -> bool {
    running(pid) && belongs(pid, marker)
}

/// Is `pid` a live (non-zombie) process, whoever it is? Only for a child
/// just started, before it can be recognised as the VM's (the jailer,
/// between clearing its environment and entering the jail).
pub fn running(pid: u32) -> bool {
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
    !matches!(state, Some("Z") | Some("X") | None)
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

/// SIGKILL, without waiting for the process to disappear.
pub fn kill_now(pid: u32, marker: &str) {
    if alive(pid, marker) {
        signal(pid, libc::SIGKILL);
    }
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

/// Every live process banger started for the VM whose directory is
/// `marker`. Used to tear a VM down when its handles file is lost.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that merely names the VM directory is not the VM's; one
    /// started with the marker is, and only for that exact directory.
    #[tokio::test]
    async fn identity_is_the_marker_not_a_path_in_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().display().to_string();
        let log = dir.path().join("log");
        let mut tail = std::process::Command::new("sleep")
            .arg("30")
            .arg(format!("{marker}/serial.log"))
            .spawn()
            .unwrap();
        let mut ours = tokio::process::Command::new("sleep");
        ours.arg("30");
        let pid = spawn_detached(&mut ours, None, &log, &marker).unwrap();
        // Its environment is readable as the new program's only once the
        // exec is through, which a loaded machine can delay past the spawn.
        let end = Instant::now() + Duration::from_secs(10);
        while !alive(pid, &marker) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(alive(pid, &marker));
        assert!(!alive(pid, &format!("{marker}-other")));
        assert!(
            !alive(pid, &marker[..marker.len() - 1]),
            "a prefix is not the marker"
        );
        assert!(
            !alive(tail.id(), &marker),
            "a process naming a VM file is not the VM's"
        );
        assert_eq!(find_by_marker(&marker), vec![pid]);
        kill(pid, &marker).await;
        assert!(!alive(pid, &marker));
        let _ = tail.kill();
        let _ = tail.wait();
    }
}
