//! Pausing and resuming a running VM's vCPUs through its control socket:
//! QEMU's QMP (`stop`/`cont`), Firecracker's API (`PATCH /vm`). A paused
//! guest uses no CPU and keeps its memory and devices as they were, which
//! is also when Firecracker writes a snapshot of it.

use crate::{VmmError, VmmKind};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long one control exchange may take.
const DEADLINE: Duration = Duration::from_secs(5);

/// One QMP command on a fresh connection: the greeting, capabilities
/// negotiation, then `command`, skipping the events QEMU interleaves.
async fn qmp(sock: &Path, command: &str) -> Result<(), VmmError> {
    let io = |what: &str| {
        let what = format!("QMP {what} on {}", sock.display());
        move |e: std::io::Error| VmmError::io(what, e)
    };
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(io("connect"))?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    // The greeting.
    lines.next_line().await.map_err(io("greeting"))?;
    for execute in ["qmp_capabilities", command] {
        let line = format!("{{\"execute\":\"{execute}\"}}\n");
        wr.write_all(line.as_bytes()).await.map_err(io(execute))?;
        loop {
            let Some(reply) = lines.next_line().await.map_err(io(execute))? else {
                return Err(VmmError::Failed(format!("QMP closed during {execute}")));
            };
            let v: serde_json::Value = serde_json::from_str(&reply)
                .map_err(|e| VmmError::Failed(format!("QMP answered {reply:?}: {e}")))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(VmmError::Failed(format!("QMP {execute}: {err}")));
            }
            break;
        }
    }
    Ok(())
}

/// Pauses (`true`) or resumes a running VM. Resuming a VM that runs, or
/// pausing one that is paused, succeeds.
pub async fn set_paused(kind: VmmKind, control: &Path, paused: bool) -> Result<(), VmmError> {
    let work = async {
        match kind {
            VmmKind::Qemu => qmp(control, if paused { "stop" } else { "cont" }).await,
            VmmKind::Firecracker => {
                let state = if paused { "Paused" } else { "Resumed" };
                let body = serde_json::json!({ "state": state });
                let (status, text) =
                    crate::firecracker::request(control, "PATCH", "/vm", Some(&body)).await?;
                // Firecracker refuses a resume of a running VM: nothing to do.
                if (200..300).contains(&status) || (!paused && text.contains("Resumed")) {
                    Ok(())
                } else {
                    Err(VmmError::Api {
                        method: "PATCH".into(),
                        path: "/vm".into(),
                        status,
                        body: text,
                    })
                }
            }
        }
    };
    tokio::time::timeout(DEADLINE, work).await.map_err(|_| {
        VmmError::Failed(format!(
            "no answer from {} within {DEADLINE:?}",
            control.display()
        ))
    })?
}

/// Writes a full snapshot of a Firecracker VM (paused first; left paused,
/// for the caller to copy its disks before resuming it) to `state` and
/// `memory`, paths as Firecracker sees them (inside its jail, if any).
pub async fn snapshot_firecracker(api: &Path, state: &Path, memory: &Path) -> Result<(), VmmError> {
    set_paused(VmmKind::Firecracker, api, true).await?;
    let c = crate::firecracker::snapshot_call(state, memory);
    // Writing guest memory takes time (about 1.4 ms per MiB here).
    let answer = tokio::time::timeout(
        Duration::from_secs(300),
        crate::firecracker::request(api, c.method, &c.path, Some(&c.body)),
    )
    .await
    .map_err(|_| VmmError::Failed("Firecracker did not finish the snapshot within 300 s".into()))??;
    c.accepted(answer)
}
