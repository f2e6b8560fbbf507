//! What the task server writes down so that a restarted one (see
//! `keeper`) carries on: one JSON file per task in the shim's state
//! directory, rewritten (write, then rename) on every change of a task's
//! processes. The VMs and sessions themselves are bangerd's; a record holds
//! only what bangerd does not know: containerd's ids, FIFOs and the host
//! pids of the commands relaying each process.
//!
//! A process that was running when its server died is followed by its
//! relay's pid: the keeper reaps that orphan and writes its exit code to
//! `exited/<pid>`, which the new server's watcher reads.

use crate::spec::Process;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stdio3 {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcRecord {
    pub process: Process,
    pub io: Stdio3,
    pub status: Status,
    pub pid: u32,
    /// Exit code and time (seconds, nanoseconds since the epoch).
    pub exit: Option<(u32, i64, i32)>,
    /// The host command whose end is this process's end (an exec's
    /// `banger vm exec`, a task's output relay).
    pub relay_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: String,
    pub bundle: String,
    pub vm: String,
    pub session: String,
    pub root: Option<String>,
    pub owns_vm: bool,
    pub main: ProcRecord,
    pub execs: BTreeMap<String, ProcRecord>,
}

/// The records of one shim.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// The directory the keeper named, if this server runs under one.
    pub fn from_env() -> Option<Records> {
        std::env::var_os(crate::keeper::STATE_ENV).map(|d| Records { dir: d.into() })
    }

    fn file(&self, id: &str) -> PathBuf {
        use sha2::Digest;
        let h = sha2::Sha256::digest(id.as_bytes());
        let hex: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("task-{hex}.json"))
    }

    pub fn save(&self, r: &TaskRecord) -> std::io::Result<()> {
        let path = self.file(&r.id);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(r)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.file(id));
    }

    /// Every task the last server had.
    pub fn load(&self) -> Vec<TaskRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }

    /// Waits for the end of `pid`, an orphan the keeper reaps; its exit
    /// code, or `None` if it ended unseen (it was no orphan of ours).
    pub fn wait_orphan(&self, pid: u32) -> Option<u32> {
        let note = self.dir.join("exited").join(pid.to_string());
        loop {
            if let Ok(code) = std::fs::read_to_string(&note) {
                let _ = std::fs::remove_file(&note);
                return code.trim().parse().ok();
            }
            if !Path::new(&format!("/proc/{pid}")).exists() {
                // Gone: the note may land just after the reap.
                std::thread::sleep(Duration::from_millis(100));
                let code = std::fs::read_to_string(&note).ok()?;
                let _ = std::fs::remove_file(&note);
                return code.trim().parse().ok();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_writer() {
        let d = tempfile_dir();
        let recs = Records { dir: d.clone() };
        let mut r = TaskRecord {
            id: "t/1".into(),
            bundle: "/b".into(),
            vm: "ct-1".into(),
            session: "main".into(),
            root: None,
            owns_vm: true,
            main: ProcRecord {
                process: Process {
                    args: vec!["sh".into()],
                    ..Default::default()
                },
                io: Stdio3::default(),
                status: Status::Running,
                pid: 42,
                exit: None,
                relay_pid: Some(43),
            },
            execs: BTreeMap::new(),
        };
        recs.save(&r).unwrap();
        r.main.exit = Some((7, 1, 2));
        recs.save(&r).unwrap();
        assert_eq!(recs.load(), vec![r]);
        recs.remove("t/1");
        assert!(recs.load().is_empty());
        let _ = std::fs::remove_dir_all(d);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("banger-shim-records-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
