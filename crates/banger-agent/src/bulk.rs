//! The bulk port: a header line, raw bytes until EOF, a result line.

use banger_proto::methods::agent::{BulkHeader, BulkResult, Line, BULK_CHUNK, BULK_PORT};
use banger_proto::OpId;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::Instrument;

pub async fn serve() -> anyhow::Result<()> {
    let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        tokio_vsock::VMADDR_CID_ANY,
        BULK_PORT,
    ))?;
    tracing::info!(port = BULK_PORT, "bulk transfers on vsock");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(handle(stream));
    }
}

pub(crate) async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    let result = match rd.read_line(&mut line).await {
        Ok(_) => match BulkHeader::from_line(&line) {
            Ok(h) => {
                let op = OpId::adopt_or_mint(h.op_id.as_deref());
                let span = tracing::info_span!("bulk", op_id = %op, op = %h.op, dest = %h.dest);
                match h.op.as_str() {
                    "tar" => {
                        let (result, ended) = send_tar(&h, &mut wr).instrument(span).await;
                        // The host reads chunks until the empty one, then
                        // the verdict: a refusal ends the (empty) stream too.
                        if !ended {
                            let _ = wr.write_all(&0u32.to_be_bytes()).await;
                        }
                        result
                    }
                    "place" => place(&h, &mut rd).instrument(span).await,
                    _ => untar(&h, &mut rd).instrument(span).await,
                }
            }
            Err(e) => fail(format!("bad header: {e}")),
        },
        Err(e) => fail(e.to_string()),
    };
    let _ = wr.write_all(&result.to_line()).await;
    let _ = wr.flush().await;
}

fn fail(e: String) -> BulkResult {
    BulkResult {
        ok: false,
        bytes: 0,
        error: Some(e),
    }
}

/// An absolute guest path without `..`: what the host may name.
fn guest_path(p: &str) -> Result<&std::path::Path, String> {
    let path = std::path::Path::new(p);
    if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("{p:?} is not an absolute path"));
    }
    Ok(path)
}

/// Sends `dest` (a file or a directory, with modes and symlinks) as a
/// chunked tar archive, ended by a zero-length chunk; says whether that
/// end was sent.
async fn send_tar<W: AsyncWrite + Unpin>(h: &BulkHeader, wr: &mut W) -> (BulkResult, bool) {
    let src = match guest_path(&h.dest) {
        Ok(p) => p,
        Err(e) => return (fail(e), false),
    };
    let (Some(parent), Some(name)) = (src.parent(), src.file_name()) else {
        return (fail(format!("cannot copy {:?}", h.dest)), false);
    };
    if let Err(e) = tokio::fs::symlink_metadata(src).await {
        return (fail(format!("{}: {e}", h.dest)), false);
    }
    let mut child = match tokio::process::Command::new("tar")
        .arg("-c")
        .arg("-f")
        .arg("-")
        .arg("-C")
        .arg(parent)
        .arg("--")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (fail(format!("running tar: {e}")), false),
    };
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    let sent: std::io::Result<()> = async {
        loop {
            let n = out.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            wr.write_all(&(n as u32).to_be_bytes()).await?;
            wr.write_all(&buf[..n]).await?;
            total += n as u64;
        }
        wr.write_all(&0u32.to_be_bytes()).await?;
        wr.flush().await
    }
    .await;
    let ended = sent.is_ok();
    let status = match child.wait_with_output().await {
        Ok(o) => o,
        Err(e) => return (fail(format!("waiting for tar: {e}")), ended),
    };
    let result = match sent {
        Err(e) => fail(format!("sending: {e}")),
        Ok(()) if !status.status.success() => fail(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        )),
        Ok(()) => {
            tracing::info!(bytes = total, "sent");
            BulkResult {
                ok: true,
                bytes: total,
                error: None,
            }
        }
    };
    (result, ended)
}

/// Unpacks an archive of one entry, `name`, beside its destination, then
/// moves it into place: a file replaces the old one atomically (rename),
/// a directory merges into an existing one. Nothing half-written is ever
/// at the destination.
async fn place<R: AsyncRead + Unpin>(h: &BulkHeader, rd: &mut R) -> BulkResult {
    let dest = match guest_path(&h.dest) {
        Ok(p) => p.to_path_buf(),
        Err(e) => return fail(e),
    };
    let name = match h.name.as_deref() {
        Some(n) if !n.is_empty() && n != "." && n != ".." && !n.contains('/') => n.to_string(),
        other => return fail(format!("bad entry name {other:?}")),
    };
    let target = if tokio::fs::metadata(&dest).await.is_ok_and(|m| m.is_dir()) {
        dest.join(&name)
    } else {
        dest
    };
    let Some(parent) = target.parent().map(std::path::Path::to_path_buf) else {
        return fail(format!("cannot write {}", target.display()));
    };
    if let Err(e) = tokio::fs::create_dir_all(&parent).await {
        return fail(format!("creating {}: {e}", parent.display()));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let aside = parent.join(format!(".banger-cp-{}-{nanos}", std::process::id()));
    let unpacked = untar(
        &BulkHeader {
            op: "untar".into(),
            dest: aside.display().to_string(),
            ..h.clone()
        },
        rd,
    )
    .await;
    let moved = if !unpacked.ok {
        Err(unpacked.error.clone().unwrap_or_default())
    } else {
        let src = aside.join(&name);
        let merge = tokio::fs::metadata(&target).await.is_ok_and(|m| m.is_dir())
            && tokio::fs::symlink_metadata(&src).await.is_ok_and(|m| m.is_dir());
        if merge {
            let from = format!("{}/.", src.display());
            match tokio::process::Command::new("cp")
                .args(["-a", "--", &from])
                .arg(&target)
                .output()
                .await
            {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(format!(
                    "cp failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(format!("running cp: {e}")),
            }
        } else {
            tokio::fs::rename(&src, &target)
                .await
                .map_err(|e| format!("moving into {}: {e}", target.display()))
        }
    };
    let _ = tokio::fs::remove_dir_all(&aside).await;
    match moved {
        Ok(()) => unpacked,
        Err(e) => fail(e),
    }
}

async fn untar<R: AsyncRead + Unpin>(h: &BulkHeader, rd: &mut R) -> BulkResult {
    if h.op != "untar" || !h.dest.starts_with('/') || h.dest.contains("..") {
        return fail(format!("unsupported bulk request {:?} into {:?}", h.op, h.dest));
    }
    if let Err(e) = tokio::fs::create_dir_all(&h.dest).await {
        return fail(format!("creating {}: {e}", h.dest));
    }
    // Unpacked here, not by the guest's tar, which a container image may
    // lack. Files belong to the guest's root, whoever owned them on the host.
    let (mut w, r) = tokio::io::duplex(BULK_CHUNK);
    let bridge = tokio_util::io::SyncIoBridge::new(r);
    let dest = std::path::PathBuf::from(&h.dest);
    let unpack = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(bridge);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        let r = archive.unpack(&dest);
        // What follows the archive's end (padding) is read and dropped, so
        // the sender is never cut off.
        let _ = std::io::copy(&mut archive.into_inner(), &mut std::io::sink());
        r
    });
    let copied = copy_chunks(rd, &mut w).await;
    drop(w);
    let unpacked = match unpack.await {
        Ok(r) => r,
        Err(e) => return fail(format!("unpacking: {e}")),
    };
    match (copied, unpacked) {
        (_, Err(e)) => fail(format!("unpacking into {}: {e}", h.dest)),
        (Err(e), _) => fail(format!("receiving: {e}")),
        (Ok(n), Ok(())) => {
            tracing::info!(bytes = n, "unpacked");
            BulkResult {
                ok: true,
                bytes: n,
                error: None,
            }
        }
    }
}

/// Copies length-prefixed chunks until the zero-length one.
async fn copy_chunks<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    w: &mut W,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; BULK_CHUNK];
    loop {
        let len = rd.read_u32().await? as usize;
        if len == 0 {
            return Ok(total);
        }
        if len > BULK_CHUNK {
            return Err(std::io::Error::other(format!(
                "chunk of {len} bytes exceeds {BULK_CHUNK}"
            )));
        }
        rd.read_exact(&mut buf[..len]).await?;
        w.write_all(&buf[..len]).await?;
        total += len as u64;
    }
}
