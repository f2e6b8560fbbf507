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

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    let result = match rd.read_line(&mut line).await {
        Ok(_) => match BulkHeader::from_line(&line) {
            Ok(h) => {
                let op = OpId::adopt_or_mint(h.op_id.as_deref());
                let span = tracing::info_span!("bulk", op_id = %op, dest = %h.dest);
                untar(&h, &mut rd).instrument(span).await
            }
            Err(e) => BulkResult {
                ok: false,
                bytes: 0,
                error: Some(format!("bad header: {e}")),
            },
        },
        Err(e) => BulkResult {
            ok: false,
            bytes: 0,
            error: Some(e.to_string()),
        },
    };
    let _ = wr.write_all(&result.to_line()).await;
    let _ = wr.flush().await;
}

async fn untar<R: AsyncRead + Unpin>(h: &BulkHeader, rd: &mut R) -> BulkResult {
    let fail = |e: String| BulkResult {
        ok: false,
        bytes: 0,
        error: Some(e),
    };
    if h.op != "untar" || !h.dest.starts_with('/') || h.dest.contains("..") {
        return fail(format!("unsupported bulk request {:?} into {:?}", h.op, h.dest));
    }
    if let Err(e) = tokio::fs::create_dir_all(&h.dest).await {
        return fail(format!("creating {}: {e}", h.dest));
    }
    let mut child = match tokio::process::Command::new("tar")
        .args(["-x", "-f", "-", "-C", &h.dest])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("running tar: {e}")),
    };
    let mut stdin = child.stdin.take().expect("piped");
    let copied = copy_chunks(rd, &mut stdin).await;
    drop(stdin);
    let out = match child.wait_with_output().await {
        Ok(o) => o,
        Err(e) => return fail(format!("waiting for tar: {e}")),
    };
    match copied {
        Err(e) => fail(format!("receiving: {e}")),
        Ok(_) if !out.status.success() => fail(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(n) => {
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
