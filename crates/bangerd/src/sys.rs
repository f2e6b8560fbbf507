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

/// Like [`make_ext4`], but copied from a template made once per size and
/// label in `templates`: a VM's disks cost a sparse copy of a few MiB of
/// metadata instead of a `mkfs.ext4` run. Copies share the template's
/// filesystem UUID, which nothing relies on: a guest sees only its own
/// disks, found by label.
pub async fn make_ext4_from_template(
    templates: &Path,
    path: &Path,
    bytes: u64,
    label: &str,
) -> Result<(), SysError> {
    let template = templates.join(format!("{label}-{bytes}.ext4"));
    if !template.exists() {
        std::fs::create_dir_all(templates).map_err(io(format!("creating {}", templates.display())))?;
        sweep_template_leftovers(templates);
        // Made beside its final name and renamed: a daemon killed half-way
        // leaves no half-made template, only a temporary file.
        let tmp = templates.join(format!(
            ".{label}-{bytes}.{}-{:08x}.tmp",
            std::process::id(),
            crate::kernel::rand_u32()
        ));
        let made = make_ext4(&tmp, bytes, label).await;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &template).map_err(io(format!("installing {}", template.display())))?;
    }
    let (src, dst) = (template, path.to_path_buf());
    tokio::task::spawn_blocking(move || sparse_copy(&src, &dst))
        .await
        .map_err(|e| SysError::Io {
            what: "copying a disk template".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(io(format!("copying a disk template to {}", path.display())))
}

/// Removes half-made templates of daemons killed while making one: one
/// daemon serves a state directory, so a temporary file whose pid is not
/// this process's is nobody's.
fn sweep_template_leftovers(templates: &Path) {
    let mine = format!(".{}-", std::process::id());
    for e in std::fs::read_dir(templates).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') && n.ends_with(".tmp") && !n.contains(&mine) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Copies `src` to a new file `dst` of the same size, only its data
/// extents (found with SEEK_DATA/SEEK_HOLE, copied in the kernel with
/// copy_file_range): holes stay holes.
pub fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = std::fs::File::open(src)?;
    let len = from.metadata()?.len();
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let copied = (|| {
        to.set_len(len)?;
        let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
        let mut pos: i64 = 0;
        while (pos as u64) < len {
            // SAFETY: lseek on a descriptor we own.
            let data = unsafe { libc::lseek(fi, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // only a hole is left
                }
                return Err(e);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (mut off_in, mut off_out) = (data, data);
            while off_in < hole {
                // SAFETY: offsets are ours; the kernel copies between them.
                let n = unsafe {
                    libc::copy_file_range(fi, &mut off_in, fo, &mut off_out, (hole - off_in) as usize, 0)
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if n == 0 {
                    break;
                }
            }
            pos = hole;
        }
        Ok(())
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    copied
}

/// Replaces `dst` with a [`sparse_copy`] of `src`, by a rename: a crash
/// leaves `dst` whole (old or new) and at most `<dst>.fill`, which the
/// next copy over it removes first.
pub fn sparse_copy_over(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut name = dst.file_name().unwrap_or_default().to_os_string();
    name.push(".fill");
    let tmp = dst.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    sparse_copy(src, &tmp)?;
    std::fs::rename(&tmp, dst).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Bytes the files under `p` really use on disk: holes are free, and a
/// file linked in twice (a jail's hard links to a VM's disks) counts once.
/// Symlinks are not followed.
pub fn used_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
            total += m.blocks() * 512;
        }
    }
    total
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

#[cfg(test)]
mod sparse_tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn used_bytes_counts_data_once_and_holes_never() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("data"), vec![1u8; 1 << 20]).unwrap();
        std::fs::create_dir(d.path().join("jail")).unwrap();
        std::fs::hard_link(d.path().join("data"), d.path().join("jail/data")).unwrap();
        let f = std::fs::File::create(d.path().join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        let used = used_bytes(d.path());
        assert!((1 << 20..(1 << 20) + (256 << 10)).contains(&used), "{used}");
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&[7u8; 100_000]).unwrap();
        drop(f);
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            blocks < 4 << 20,
            "the copy is not sparse: {blocks} bytes allocated"
        );
        // An existing destination is never overwritten.
        assert!(sparse_copy(&src, &dst).is_err());
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }

    #[test]
    fn a_copy_over_replaces_the_destination_and_an_unfinished_copy() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("disk.ext4"));
        std::fs::write(&src, b"the snapshot's disk").unwrap();
        std::fs::write(&dst, b"what a failed start wrote over it").unwrap();
        std::fs::write(d.path().join("disk.ext4.fill"), b"a crash's half copy").unwrap();
        sparse_copy_over(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"the snapshot's disk");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A source that is gone leaves the destination as it was.
        std::fs::remove_file(&src).unwrap();
        assert!(sparse_copy_over(&src, &dst).is_err());
        assert_eq!(std::fs::read(&dst).unwrap(), b"the snapshot's disk");
    }
}
