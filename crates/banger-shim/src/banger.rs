//! Calls into bangerd, through the `banger` command line that ships beside
//! this binary. Every call carries an op id (BANGER_OP_ID) that the shim
//! logs with the containerd task id, so a grep of either finds the other
//! in the shim's, the daemon's, the helper's and the guest's logs.

use banger_proto::OpId;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug)]
pub struct Failed(pub String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `banger` beside this executable, else on PATH.
pub fn exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("banger")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("banger"))
}

/// A `banger` command for `task`, under a fresh op id, logged.
pub fn command(task: &str, what: &str, args: &[&str]) -> (Command, OpId) {
    let op = OpId::mint();
    log::info!("task={task} op_id={op} call={what}");
    let mut c = Command::new(exe());
    c.args(args)
        .env("BANGER_OP_ID", op.as_str())
        // The shim never starts a daemon or a helper: bangerd must run.
        .env("BANGER_HELPER_AUTOSTART", "0")
        .stdin(Stdio::null());
    (c, op)
}

/// Runs `banger args…` to its end; its stdout on success, its stderr (with
/// the op id) on failure.
pub fn run(task: &str, what: &str, args: &[&str]) -> Result<String, Failed> {
    let (mut c, op) = command(task, what, args);
    let out = c
        .output()
        .map_err(|e| Failed(format!("running {}: {e} ({op})", exe().display())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        log::warn!("task={task} op_id={op} call={what} failed: {err}");
        Err(Failed(format!("banger {what}: {err}")))
    }
}

/// Like [`run`], parsed as JSON.
pub fn json(task: &str, what: &str, args: &[&str]) -> Result<serde_json::Value, Failed> {
    let out = run(task, what, args)?;
    serde_json::from_str(&out).map_err(|e| Failed(format!("banger {what}: unexpected output ({e})")))
}
