//! `vm cp`: a file or a directory between the host and a guest, over the
//! agent's bulk port, modes and symlinks kept.
//!
//! Into the guest, the host sends a tar of the one entry and the agent
//! unpacks it beside the destination and moves it into place. Out of the
//! guest, the agent sends a tar and the host unpacks it the same way; that
//! archive comes from the guest, so it is hostile input: only files,
//! directories and symlinks are taken, no path leaves the chosen
//! destination (nor goes through a symlink the archive made), setuid,
//! setgid and sticky bits are dropped (the daemon may run as root), and
//! only the one entry asked for is accepted.

use crate::error::CopyError;
use banger_proto::methods::agent::{BulkHeader, BulkResult, Line, BULK_CHUNK, BULK_PORT};
use banger_proto::OpId;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path};

/// How often a copy reports progress.
const PROGRESS_EVERY: u64 = 16 << 20;

/// What a copy moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub bytes: u64,
    pub entries: u64,
}

fn host_io(path: &Path) -> impl FnOnce(std::io::Error) -> CopyError + '_ {
    move |source| CopyError::Host {
        path: path.to_path_buf(),
        source,
    }
}

/// A guest path as the host may name it: absolute, no `..`.
pub fn guest_path(p: &str) -> Result<&str, CopyError> {
    let path = Path::new(p);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) || p.len() > 4096 {
        return Err(CopyError::GuestPath(p.to_string()));
    }
    Ok(p)
}

async fn connect(uds: &Path) -> Result<std::os::unix::net::UnixStream, CopyError> {
    let stream =
        banger_vmm::vsock::connect_with_retry(uds, BULK_PORT, std::time::Duration::from_secs(3), || true)
            .await
            .map_err(|source| CopyError::AgentUnreachable { source })?;
    let s = stream.into_std().map_err(host_io(uds))?;
    s.set_nonblocking(false).map_err(host_io(uds))?;
    Ok(s)
}

fn answer(s: &std::os::unix::net::UnixStream) -> Result<BulkResult, CopyError> {
    let mut line = String::new();
    BufReader::new(s)
        .take(64 * 1024)
        .read_line(&mut line)
        .map_err(|e| CopyError::BadArchive(format!("reading the guest's answer: {e}")))?;
    let r = BulkResult::from_line(&line)
        .map_err(|e| CopyError::BadArchive(format!("the guest's answer: {e}")))?;
    if r.ok {
        Ok(r)
    } else {
        Err(CopyError::Guest(r.error.unwrap_or_default()))
    }
}

/// Frames writes as bulk chunks (`workspace::Chunked`) and counts them
/// for progress.
struct Chunks<'a, W> {
    w: crate::workspace::Chunked<W>,
    sent: u64,
    next_report: u64,
    progress: &'a (dyn Fn(&str) + Sync),
}

impl<W: Write> Write for Chunks<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.sent += n as u64;
        if self.sent >= self.next_report {
            (self.progress)(&format!("{} MiB sent", self.sent >> 20));
            self.next_report += PROGRESS_EVERY;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Copies the host file or directory `src` to `dest` in the guest (into
/// it, if it is a directory there).
pub async fn push(
    uds: &Path,
    op: &OpId,
    src: &Path,
    dest: &str,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Moved, CopyError> {
    let dest = guest_path(dest)?;
    let meta = std::fs::symlink_metadata(src).map_err(host_io(src))?;
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| CopyError::HostPath(src.to_path_buf()))?;
    let s = connect(uds).await?;
    let header = BulkHeader {
        op_id: Some(op.to_string()),
        op: "place".into(),
        dest: dest.to_string(),
        name: Some(name.clone()),
    };
    tokio::task::block_in_place(|| {
        (&s).write_all(&header.to_line()).map_err(host_io(uds))?;
        let chunks = Chunks {
            w: crate::workspace::Chunked(std::io::BufWriter::with_capacity(BULK_CHUNK, &s)),
            sent: 0,
            next_report: PROGRESS_EVERY,
            progress,
        };
        let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(BULK_CHUNK, chunks));
        tar.follow_symlinks(false);
        let entries = if meta.is_dir() {
            tar.append_dir_all(&name, src).map_err(host_io(src))?;
            walkdir_count(src)
        } else {
            tar.append_path_with_name(src, &name).map_err(host_io(src))?;
            1
        };
        let chunks = tar
            .into_inner()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(host_io(src))?;
        let sent = chunks.sent;
        let mut w = chunks.w.0;
        w.flush().map_err(host_io(uds))?;
        drop(w);
        (&s).write_all(&0u32.to_be_bytes()).map_err(host_io(uds))?;
        answer(&s)?;
        Ok(Moved { bytes: sent, entries })
    })
}

fn walkdir_count(dir: &Path) -> u64 {
    let mut n = 1;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        n += match e.file_type() {
            Ok(t) if t.is_dir() => walkdir_count(&e.path()),
            _ => 1,
        };
    }
    n
}

/// Reads bulk chunks as one stream, acknowledging what it reads so the
/// guest's send credit comes back (see `banger_vmm::vsock::CreditAcked`).
struct ChunkReader<'a> {
    s: &'a std::os::unix::net::UnixStream,
    left: usize,
    done: bool,
    unacked: usize,
    read: u64,
    next_report: u64,
    progress: &'a (dyn Fn(&str) + Sync),
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.s.read_exact(&mut len)?;
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 {
                self.done = true;
                return Ok(0);
            }
            if len > BULK_CHUNK {
                return Err(std::io::Error::other(format!("a chunk of {len} bytes")));
            }
            self.left = len;
        }
        let want = buf.len().min(self.left);
        let n = self.s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        self.unacked += n;
        while self.unacked >= banger_vmm::vsock::ACK_EVERY {
            let mut w = self.s;
            w.write_all(&[banger_vmm::vsock::ACK_BYTE])?;
            self.unacked -= banger_vmm::vsock::ACK_EVERY;
        }
        self.read += n as u64;
        if self.read >= self.next_report {
            (self.progress)(&format!("{} MiB received", self.read >> 20));
            self.next_report += PROGRESS_EVERY;
        }
        Ok(n)
    }
}

/// Copies the guest's `src` to `dest` on the host (into it, if it is a
/// directory). The parent of what is written must exist.
pub async fn pull(
    uds: &Path,
    op: &OpId,
    src: &str,
    dest: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Moved, CopyError> {
    let src = guest_path(src)?;
    let name = Path::new(src)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| CopyError::GuestPath(src.to_string()))?;
    if !dest.is_absolute() {
        return Err(CopyError::HostPath(dest.to_path_buf()));
    }
    let target = if dest.is_dir() {
        dest.join(&name)
    } else {
        dest.to_path_buf()
    };
    let parent = target
        .parent()
        .filter(|p| p.is_dir())
        .ok_or_else(|| CopyError::Host {
            path: target.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?
        .to_path_buf();
    let s = connect(uds).await?;
    let header = BulkHeader {
        op_id: Some(op.to_string()),
        op: "tar".into(),
        dest: src.to_string(),
        name: None,
    };
    let aside = crate::kernel::tempdir_in(&parent, ".banger-cp")?;
    let result = tokio::task::block_in_place(|| {
        (&s).write_all(&header.to_line()).map_err(host_io(uds))?;
        let mut reader = ChunkReader {
            s: &s,
            left: 0,
            done: false,
            unacked: 0,
            read: 0,
            next_report: PROGRESS_EVERY,
            progress,
        };
        let unpacked = unpack_untrusted(&mut reader, &aside, &name);
        // Whatever the archive was, the stream is read to its end so the
        // guest's verdict can be heard.
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| CopyError::BadArchive(format!("receiving: {e}")))?;
        answer(&s)?;
        let moved = unpacked?;
        move_into_place(&aside.join(&name), &target)?;
        Ok(moved)
    });
    let _ = std::fs::remove_dir_all(&aside);
    result
}

/// Unpacks a guest's archive into `into` (a fresh directory): only `name`
/// and what is under it, only files, directories and symlinks, never
/// outside `into` or through a symlink, permission bits only.
pub fn unpack_untrusted<R: Read>(r: R, into: &Path, name: &str) -> Result<Moved, CopyError> {
    let bad = |e: String| CopyError::BadArchive(e);
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    // Never setuid, setgid or sticky: the daemon may run as root.
    ar.set_mask(0o7000);
    ar.set_unpack_xattrs(false);
    ar.set_preserve_ownerships(false);
    let mut moved = Moved::default();
    for e in ar.entries().map_err(|e| bad(e.to_string()))? {
        let mut e = e.map_err(|e| bad(e.to_string()))?;
        let path = e.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let mut comps = path.components();
        let first = comps.next();
        let inside = matches!(first, Some(Component::Normal(n)) if n == name)
            && comps.all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(bad(format!("{} is not part of {name}", path.display())));
        }
        match e.header().entry_type() {
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink => {}
            other => {
                return Err(bad(format!(
                    "{} is a {other:?}, which is not copied",
                    path.display()
                )))
            }
        }
        if !e
            .unpack_in(into)
            .map_err(|err| bad(format!("{}: {err}", path.display())))?
        {
            return Err(bad(format!(
                "{} would land outside the destination",
                path.display()
            )));
        }
        moved.entries += 1;
        moved.bytes += e.size();
    }
    if moved.entries == 0 {
        return Err(bad("the archive was empty".into()));
    }
    Ok(moved)
}

/// Moves `from` to `to`: a rename (atomic for a file), or, when both are
/// directories, entry by entry into the existing one.
fn move_into_place(from: &Path, to: &Path) -> Result<(), CopyError> {
    let from_dir = std::fs::symlink_metadata(from).map_err(host_io(from))?.is_dir();
    let to_meta = std::fs::symlink_metadata(to).ok();
    match to_meta {
        Some(m) if m.is_dir() && from_dir => {
            for e in std::fs::read_dir(from).map_err(host_io(from))? {
                let e = e.map_err(host_io(from))?;
                move_into_place(&e.path(), &to.join(e.file_name()))?;
            }
            Ok(())
        }
        Some(m) if m.is_dir() => Err(CopyError::Host {
            path: to.to_path_buf(),
            source: std::io::ErrorKind::IsADirectory.into(),
        }),
        _ => std::fs::rename(from, to).map_err(host_io(to)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn raw(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &[u8],
        link: Option<&str>,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn a_guests_archive_cannot_reach_outside_the_destination() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dot-dot",
                archive(|b| raw(b, tar::EntryType::Regular, b"d/../../outside/x", None, b"x")),
            ),
            (
                "absolute",
                archive(|b| raw(b, tar::EntryType::Regular, b"/tmp/x", None, b"x")),
            ),
            ("another top entry", archive(|b| file(b, "other/x", 0o644, b"x"))),
            (
                "through a symlink",
                archive(|b| {
                    raw(
                        b,
                        tar::EntryType::Symlink,
                        b"d/link",
                        Some(outside.to_str().unwrap()),
                        b"",
                    );
                    raw(b, tar::EntryType::Regular, b"d/link/planted", None, b"x");
                }),
            ),
            (
                "a device",
                archive(|b| raw(b, tar::EntryType::Block, b"d/sda", None, b"")),
            ),
            (
                "a hard link",
                archive(|b| raw(b, tar::EntryType::Link, b"d/h", Some("/etc/shadow"), b"")),
            ),
        ];
        for (what, bytes) in cases {
            let into = tempfile::tempdir_in(t.path()).unwrap();
            let r = unpack_untrusted(&bytes[..], into.path(), "d");
            assert!(r.is_err(), "{what}: accepted");
            assert_eq!(
                std::fs::read_dir(&outside).unwrap().count(),
                0,
                "{what}: wrote outside"
            );
        }
    }

    #[test]
    fn setuid_bits_are_dropped_and_modes_kept() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let bytes = archive(|b| {
            file(b, "d/tool", 0o4755, b"#!/bin/sh\n");
            file(b, "d/secret", 0o600, b"s");
        });
        let m = unpack_untrusted(&bytes[..], t.path(), "d").unwrap();
        assert_eq!(m.entries, 2);
        let mode = |p: &str| std::fs::metadata(t.path().join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("d/tool"), 0o755);
        assert_eq!(mode("d/secret"), 0o600);
    }

    #[test]
    fn a_directory_merges_into_an_existing_one() {
        let t = tempfile::tempdir().unwrap();
        let (from, to) = (t.path().join("from"), t.path().join("to"));
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("sub/new"), "new").unwrap();
        std::fs::write(from.join("changed"), "after").unwrap();
        std::fs::create_dir_all(to.join("sub")).unwrap();
        std::fs::write(to.join("sub/kept"), "kept").unwrap();
        std::fs::write(to.join("changed"), "before").unwrap();
        move_into_place(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(to.join("sub/new")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(to.join("sub/kept")).unwrap(), "kept");
        assert_eq!(std::fs::read_to_string(to.join("changed")).unwrap(), "after");
    }
}
