//! `fc-restore`: a tiny Firecracker guest saved once, then restored over
//! and over, through banger and by hand, alternated, from the same
//! snapshot files.
//!
//! banger's side is the `vm.restore` RPC: a whole new VM (name, CID,
//! directory, the snapshot's disks copied), Firecracker started and the
//! snapshot loaded, the guest answering on vsock, seeded. The raw side is
//! what Firecracker needs at the least: the process, `PUT /snapshot/load`
//! with resume, and the guest answering on vsock. `vm.snapshot` is timed
//! against pause + `PUT /snapshot/create` + resume by hand the same way.

use crate::fc::{put, spawn_fc, stop, tiny_image, tiny_vm, vsock_ready};
use crate::{report_paired, Bench};
use anyhow::{Context, Result};
use banger_proto::methods::daemon as d;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const SNAPSHOT: &str = "bench-snap";

/// One restore by hand: process, load with resume, vsock-ready.
async fn raw_restore(fc: &Path, dir: &Path, snap: &Path) -> Result<Duration> {
    let vs = dir.join("v.sock");
    let _ = std::fs::remove_file(&vs);
    let t = Instant::now();
    let (child, api) = spawn_fc(fc, dir).await?;
    let s = |p: &Path| p.display().to_string();
    put(
        &api,
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": s(&snap.join("state")),
            "mem_backend": {"backend_type": "File", "backend_path": s(&snap.join("memory"))},
            "resume_vm": true,
            "vsock_override": {"uds_path": s(&vs)},
        }),
    )
    .await?;
    let (d, child) = vsock_ready(child, &vs, t).await?;
    stop(child).await;
    Ok(d)
}

/// One snapshot by hand of a VM booted by hand: pause, create, resume.
async fn raw_snapshot(api: &Path, out: &Path) -> Result<Duration> {
    let s = |p: &Path| p.display().to_string();
    for f in ["state", "memory"] {
        let _ = std::fs::remove_file(out.join(f));
    }
    let t = Instant::now();
    put(api, "PATCH", "/vm", json!({"state": "Paused"})).await?;
    put(
        api,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": s(&out.join("state")), "mem_file_path": s(&out.join("memory"))}),
    )
    .await?;
    put(api, "PATCH", "/vm", json!({"state": "Resumed"})).await?;
    Ok(t.elapsed())
}

pub async fn fc_restore(b: &Bench, runs: usize, fc: &Path) -> Result<()> {
    let _ = b.banger(&["snapshot", "rm", SNAPSHOT]);
    let _ = b.banger(&["vm", "delete", "snapsrc"]);
    let (_guest, _kdir, rootfs) = tiny_image(b)?;
    tiny_vm(b, "snapsrc")?;
    b.banger(&["vm", "start", "snapsrc"])?;
    let client = banger_proto::Client::new(b.home.join("run/bangerd.sock"));

    // Snapshots: banger's RPC against pause + create + resume by hand, on
    // the same kind of VM (the source VM's own Firecracker for the latter).
    let src: Value = serde_json::from_str(&b.banger(&["vm", "show", "snapsrc", "--json"])?)?;
    let src_api = Path::new(src["vm_dir"].as_str().context("vm_dir")?).join("firecracker.sock");
    let raw_out = b.home.join("raw-snap");
    std::fs::create_dir_all(&raw_out)?;
    let (mut banger_snap, mut raw_snap) = (vec![], vec![]);
    for i in 0..runs {
        let name = format!("{SNAPSHOT}-{i}");
        let t = Instant::now();
        client
            .call::<d::VmSnapshotM>(
                &d::VmSnapshot {
                    name: "snapsrc".into(),
                    snapshot: Some(name.clone()),
                },
                None,
            )
            .await?;
        banger_snap.push(t.elapsed());
        b.banger(&["snapshot", "rm", &name])?;
        raw_snap.push(raw_snapshot(&src_api, &raw_out).await?);
    }
    report_paired(
        "snapshot of a running tiny guest (128 MiB)",
        "banger vm.snapshot RPC",
        banger_snap,
        "pause + snapshot/create + resume by hand",
        raw_snap,
    );

    let info = client
        .call::<d::VmSnapshotM>(
            &d::VmSnapshot {
                name: "snapsrc".into(),
                snapshot: Some(SNAPSHOT.into()),
            },
            None,
        )
        .await?;
    let snap = b.home.join("snapshots").join(&info.id);
    // The raw side's drives: the names the snapshot recorded, resolved in
    // its own directory to copies of the snapshot's disks.
    let raw_dir = b.home.join("raw-restore");
    let _ = std::fs::remove_dir_all(&raw_dir);
    std::fs::create_dir_all(&raw_dir)?;
    for (name, target) in [
        ("drive-base", rootfs.clone()),
        ("drive-overlay", raw_dir.join("overlay.ext4")),
        ("drive-work", raw_dir.join("work.ext4")),
    ] {
        std::os::unix::fs::symlink(&target, raw_dir.join(name))?;
    }
    std::fs::copy(snap.join("overlay.ext4"), raw_dir.join("overlay.ext4"))?;
    std::fs::copy(snap.join("work.ext4"), raw_dir.join("work.ext4"))?;

    let (mut banger, mut raw) = (vec![], vec![]);
    for i in 0..runs {
        let name = format!("restored-{i}");
        let t = Instant::now();
        client
            .call::<d::VmRestoreM>(
                &d::VmRestore {
                    name: name.clone(),
                    snapshot: SNAPSHOT.into(),
                },
                None,
            )
            .await?;
        banger.push(t.elapsed());
        b.banger(&["vm", "delete", &name])?;
        raw.push(raw_restore(fc, &raw_dir, &snap).await?);
    }
    report_paired(
        "restore of a tiny guest from a snapshot to vsock-ready",
        "banger vm.restore RPC (a new VM)",
        banger,
        "snapshot/load by hand",
        raw,
    );
    b.banger(&["snapshot", "rm", SNAPSHOT])?;
    b.banger(&["vm", "delete", "snapsrc"])?;
    Ok(())
}
