//! Pausing and resuming a running VM's vCPUs through its control socket:
//! QEMU's QMP (`stop`/`cont`), Firecracker's API (`PATCH /vm`). A paused
//! guest uses no CPU and keeps its memory and devices as they were, which
//! is also when Firecracker writes a snapshot of it.

use crate::{VmmError, VmmKind};
use std::path::Path;
use std::time::Duration;

/// How long one control exchange may take.
const DEADLINE: Duration = Duration::from_secs(5);

/// One QMP command on a fresh connection.
async fn qmp(sock: &Path, command: &str) -> Result<(), VmmError> {
    crate::qmp::Qmp::connect(sock)
        .await?
        .execute(command, None)
        .await
        .map(drop)
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

/// Writes a QEMU VM's whole state, devices and memory, to the file `state`
/// (paused first; left paused, for the caller to copy its disks before
/// resuming it with `cont`). QEMU migrates into a Unix socket beside the
/// file, which this side writes out: QEMU 7 has no `file:` migration, and
/// a socket needs neither a shell (`exec:`) nor descriptor passing.
pub async fn snapshot_qemu(qmp_sock: &Path, state: &Path) -> Result<(), VmmError> {
    let sock = state.with_extension("sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(|e| VmmError::io(format!("binding {}", sock.display()), e))?;
    let out =
        std::fs::File::create(state).map_err(|e| VmmError::io(format!("creating {}", state.display()), e))?;
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let (mut conn, _) = listener.accept()?;
        let mut out = out;
        let n = std::io::copy(&mut conn, &mut out)?;
        out.sync_all()?;
        Ok(n)
    });
    let migrated = async {
        let mut q = crate::qmp::Qmp::connect(qmp_sock).await?;
        q.execute("stop", None).await?;
        q.unthrottle().await?;
        q.migration_events().await?;
        q.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("unix:{}", sock.display()) })),
        )
        .await?;
        q.wait_migration(Duration::from_secs(300)).await
    }
    .await;
    if migrated.is_err() {
        // QEMU stops sending, and the writer stops waiting for it to connect.
        if let Ok(mut q) = crate::qmp::Qmp::connect(qmp_sock).await {
            let _ = q.execute("migrate_cancel", None).await;
        }
        let _ = std::os::unix::net::UnixStream::connect(&sock);
    }
    // A QEMU that neither finishes nor lets go leaves the thread behind,
    // never the caller.
    let written = tokio::time::timeout(Duration::from_secs(30), writer).await;
    let _ = std::fs::remove_file(&sock);
    migrated?;
    match written.map_err(|_| VmmError::Failed(format!("writing {} did not end", state.display())))? {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(VmmError::io(format!("writing {}", state.display()), e)),
        Err(e) => Err(VmmError::Failed(format!("writing {}: {e}", state.display()))),
    }
}
