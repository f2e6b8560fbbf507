//! `qemu-restore`: `vm restore` of a real guest against QEMU's own restore
//! of the same snapshot done by hand, both to the point where the guest
//! agent answers.

use crate::boot::{agent_answers, initramfs};
use crate::{report_paired, run, Bench};
use anyhow::Result;
use banger_vmm::{Drive, LaunchSpec};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) async fn qemu_restore(b: &Bench, runs: usize) -> Result<()> {
    let img = b.default_image()?;
    let kdir = PathBuf::from(img["kernel"].as_str().unwrap());
    let rootfs = PathBuf::from(img["rootfs"].as_str().unwrap());
    let _ = b.banger(&["vm", "delete", "restore-src"]);
    let _ = b.banger(&["snapshot", "rm", "restore-snap"]);
    b.banger(&[
        "vm",
        "create",
        "--name",
        "restore-src",
        "--no-network",
        "--vcpus",
        "2",
        "--memory",
        "1024",
    ])?;
    let snap: Value = serde_json::from_str(&b.banger(&[
        "vm",
        "snapshot",
        "restore-src",
        "--name",
        "restore-snap",
        "--json",
    ])?)?;
    b.banger(&["vm", "delete", "restore-src"])?;
    let dir = b.home.join("snapshots").join(snap["id"].as_str().unwrap());
    let initrd = initramfs(&kdir)?;
    let work = b.home.join("raw-restore");
    let (mut banger, mut raw) = (vec![], vec![]);
    for i in 0..runs {
        let name = format!("restored-{i}");
        banger.push(b.timed(&["vm", "restore", "restore-snap", "--name", &name])?);
        b.banger(&["vm", "delete", &name])?;
        raw.push(raw_restore(&kdir.join("vmlinuz"), &initrd, &rootfs, &dir, &work).await?);
    }
    let _ = std::fs::remove_dir_all(&work);
    b.banger(&["snapshot", "rm", "restore-snap"])?;
    println!(
        "(snapshot of a 2 vCPU, 1024 MiB guest: {} MiB on disk)",
        snap["size_bytes"].as_u64().unwrap_or(0) >> 20
    );
    report_paired(
        "restore to agent-ready, QEMU/TCG",
        "banger vm restore (a whole new VM)",
        banger,
        "QEMU -incoming by hand",
        raw,
    );
    Ok(())
}

/// QEMU started on copies of the snapshot's disks, with the command line
/// banger's back-end would give it, its state loaded and resumed the way
/// the back-end does it (`load_state`), and waited on until the agent
/// answers. The disk copies are not timed.
async fn raw_restore(
    kernel: &Path,
    initrd: &Path,
    rootfs: &Path,
    snap: &Path,
    work: &Path,
) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    for f in ["overlay.ext4", "work.ext4"] {
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(snap.join(f))
            .arg(work.join(f)))?;
    }
    let drive = |id: &str, path: PathBuf, read_only| Drive {
        id: id.into(),
        path,
        read_only,
    };
    let spec = LaunchSpec {
        vm_dir: work.to_path_buf(),
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: "console=ttyS0 quiet".into(),
        vcpus: 2,
        memory_mib: 1024,
        drives: vec![
            drive("base", rootfs.to_path_buf(), true),
            drive("overlay", work.join("overlay.ext4"), false),
            drive("work", work.join("work.ext4"), false),
        ],
        vsock_cid: 3,
        net: None,
        restore: Some(banger_vmm::Restore {
            state: snap.join("state"),
            memory: snap.join("state"),
            seed: None,
        }),
        fill_drives: None,
        prestarted: None,
    };
    let qemu = banger_vmm::qemu::Qemu {
        qemu: "qemu-system-x86_64".into(),
        bridge: "unused".into(),
        kvm: false,
    };
    let (qmp, channel) = (work.join("qmp.sock"), work.join("agent.serial"));
    let t = Instant::now();
    let mut q = Command::new("qemu-system-x86_64")
        .args(qemu.args(&spec, &qmp, &channel, &work.join("serial.log")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let restored = async {
        banger_vmm::qemu::load_state(&qmp, &snap.join("state"), q.id()).await?;
        agent_answers(&channel, Duration::from_secs(30)).await
    }
    .await;
    let elapsed = t.elapsed();
    let _ = q.kill();
    let _ = q.wait();
    restored?;
    Ok(elapsed)
}
