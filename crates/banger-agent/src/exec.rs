//! `agent.exec`: run a command, stream its output, report how it ended.

use banger_proto::methods::agent::{ExecOutput, ExecRequest, ExitStatus, StreamName};
use banger_proto::{Ctx, RpcError};
use base64::Engine;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

async fn pump(ctx: Ctx, stream: StreamName, mut r: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => ctx.emit(&ExecOutput {
                stream,
                data_b64: B64.encode(&buf[..n]),
            }),
        }
    }
}

pub async fn run(ctx: Ctx, req: ExecRequest) -> Result<ExitStatus, RpcError> {
    let Some((prog, args)) = req.argv.split_first() else {
        return Err(RpcError::bad_request("argv is empty"));
    };
    let stdin = match &req.stdin_b64 {
        Some(s) => Some(
            B64.decode(s)
                .map_err(|e| RpcError::bad_request(format!("stdin_b64: {e}")))?,
        ),
        None => None,
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The host hung up: the call's future is dropped and the command dies.
        .kill_on_drop(true);
    crate::rootdir::place(
        &mut cmd,
        req.root.as_deref(),
        req.cwd.as_deref(),
        req.user.as_ref(),
    )?;
    tracing::info!(argv = ?req.argv, cwd = ?req.cwd, root = ?req.root, "exec");
    let mut child = cmd
        .spawn()
        .map_err(|e| RpcError::failed(format!("cannot run {prog:?}: {e}")))?;
    if let (Some(bytes), Some(mut w)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = w.write_all(&bytes).await;
        });
    }
    let out = tokio::spawn(pump(
        ctx.clone(),
        StreamName::Stdout,
        child.stdout.take().expect("piped"),
    ));
    let err = tokio::spawn(pump(
        ctx.clone(),
        StreamName::Stderr,
        child.stderr.take().expect("piped"),
    ));
    let status = child
        .wait()
        .await
        .map_err(|e| RpcError::failed(format!("waiting for {prog:?}: {e}")))?;
    // Output still in the pipes belongs before the result.
    let _ = out.await;
    let _ = err.await;
    let st = ExitStatus {
        code: status.code(),
        signal: status.signal(),
    };
    tracing::info!(code = ?st.code, signal = ?st.signal, "exec finished");
    Ok(st)
}
