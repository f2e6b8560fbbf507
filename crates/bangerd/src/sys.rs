//! Running host tools (apt-get, dpkg, debootstrap, mkfs.ext4) with errors
//! that say what failed and why. Arguments are passed as argv, never
//! through a shell.

use crate::error::SysError;
use std::ffi::OsStr;
use std::path::Path;
use tokio::process::Command;

/// Where `prog` is: on PATH or in the sbin directories (a normal user's
/// PATH on Debian lacks those, which hold mkfs.ext4 and debootstrap);
/// as given when found nowhere, so that starting it says it is missing.
fn locate(prog: &str) -> std::path::PathBuf {
    if prog.contains('/') {
        return prog.into();
    }
    banger_vmm::which(prog).unwrap_or_else(|| prog.into())
}

/// A tool that could not be started: missing, or another reason.
fn spawn_error(prog: &str, source: std::io::Error) -> SysError {
    let tool = prog.to_string();
    if source.kind() == std::io::ErrorKind::NotFound {
        SysError::NotInstalled { tool, source }
    } else {
        SysError::Spawn { tool, source }
    }
}

/// Runs `prog args...` to completion; fails with its stderr tail.
pub async fn run<I, S>(prog: &str, args: I, cwd: Option<&Path>) -> Result<String, SysError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(locate(prog));
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd.output().await.map_err(|e| spawn_error(prog, e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(SysError::Failed {
            tool: prog.to_string(),
            status: out.status,
            stderr_tail: tail.join(" | "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], handing each line the tool writes (stdout or stderr) to
/// `on_line` as it comes: progress for long-running tools.
pub async fn run_lines<I, S>(prog: &str, args: I, on_line: &(dyn Fn(&str) + Sync)) -> Result<(), SysError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut cmd = Command::new(locate(prog));
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error(prog, e))?;
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let line = tokio::select! {
            l = out.next_line(), if out_open => l.ok().flatten().or_else(|| { out_open = false; None }),
            l = err.next_line(), if err_open => l.ok().flatten().or_else(|| { err_open = false; None }),
        };
        if let Some(line) = line {
            on_line(&line);
            tail.push_back(line);
            if tail.len() > 5 {
                tail.pop_front();
            }
        }
    }
    let status = child.wait().await.map_err(|source| SysError::Spawn {
        tool: prog.to_string(),
        source,
    })?;
    if !status.success() {
        return Err(SysError::Failed {
            tool: prog.to_string(),
            status,
            stderr_tail: Vec::from(tail).join(" | "),
        });
    }
    Ok(())
}

/// Maps an I/O error to a failure naming what was attempted.
pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SysError {
    move |source| SysError::Io {
        what: what.to_string(),
        source,
    }
}

/// Creates a sparse file of `bytes` and formats it ext4. Cost is flat in
/// size: nothing is written but metadata.
pub async fn make_ext4(path: &Path, bytes: u64, label: &str) -> Result<(), SysError> {
    let f = std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?;
    f.set_len(bytes)
        .map_err(io(format!("sizing {}", path.display())))?;
    drop(f);
    run(
        "mkfs.ext4",
        [
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-L"),
            OsStr::new(label),
            OsStr::new("-E"),
            OsStr::new("lazy_itable_init=1,lazy_journal_init=1"),
            path.as_os_str(),
        ],
        None,
    )
    .await?;
    Ok(())
}

/// `sha256:<hex>` of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String, SysError> {
    use sha2::Digest;
    use std::io::Read;
    let what = || format!("hashing {}", path.display());
    let mut f = std::fs::File::open(path).map_err(io(what()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(what()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}
