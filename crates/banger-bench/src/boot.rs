//! `run-vs-qemu` (`vm run --rm -- true` against a QEMU boot written out
//! by hand) and `warm-run` (the same from the warm pool against a cold one).

use crate::{report, report_paired, run, Bench};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Boots the same kernel, initramfs and rootfs with a QEMU command written
/// out by hand, to the same point banger waits for: the agent answering on
/// vsock. Disks are prepared outside the timed region.
pub(crate) async fn raw_qemu_boot(
    kernel: &Path,
    initrd: &Path,
    rootfs: &str,
    work: &Path,
) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    for (f, size) in [("overlay.ext4", "4G"), ("work.ext4", "8G")] {
        run(Command::new("truncate").arg("-s").arg(size).arg(work.join(f)))?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(work.join(f)))?;
    }
    let mhz: f64 = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
        .unwrap_or(2000.0);
    let channel = work.join("agent.serial");
    let t = Instant::now();
    let d = |f: &str| work.join(f).display().to_string();
    let mut q = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024M",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 banger.hostname=raw banger.channel=serial tsc_early_khz={}",
            (mhz * 1000.0) as u64
        ))
        .args([
            "-drive",
            &format!("id=base,file={rootfs},format=raw,if=none,readonly=on"),
            "-device",
            "virtio-blk-device,drive=base",
        ])
        .args([
            "-drive",
            &format!("id=ovl,file={},format=raw,if=none", d("overlay.ext4")),
            "-device",
            "virtio-blk-device,drive=ovl",
        ])
        .args([
            "-drive",
            &format!("id=work,file={},format=raw,if=none", d("work.ext4")),
            "-device",
            "virtio-blk-device,drive=work",
        ])
        .args([
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", channel.display()),
            "-device",
            &format!("virtserialport,chardev=agent,name={}", banger_mux::PORT_NAME),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ready = agent_answers(&channel, Duration::from_secs(120)).await;
    let elapsed = t.elapsed();
    let _ = q.kill();
    let _ = q.wait();
    ready?;
    Ok(elapsed)
}

/// Waits until the guest agent answers the serial channel's handshake:
/// the point at which banger's daemon can reach it.
pub(crate) async fn agent_answers(channel: &Path, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    let mut s = loop {
        match tokio::net::UnixStream::connect(channel).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => return Err(e).context("QEMU's chardev socket"),
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    tokio::time::timeout(
        end.saturating_duration_since(Instant::now()),
        banger_mux::handshake::host(&mut s, Duration::from_millis(25)),
    )
    .await
    .context("the agent did not answer")??;
    Ok(())
}

/// The initramfs banger boots guests of kernel directory `kdir` with
/// (made by its first boot).
pub(crate) fn initramfs(kdir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(kdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with("initramfs-")
                && p.extension().is_some_and(|e| e == "cpio")
        })
        .context("no initramfs")
}

pub(crate) async fn run_vs_qemu(b: &Bench, runs: usize) -> Result<()> {
    let img = b.default_image()?;
    let kdir = PathBuf::from(img["kernel"].as_str().unwrap());
    let rootfs = img["rootfs"].as_str().unwrap().to_string();
    // Warm-up: builds the initramfs banger boots with, reused as the baseline's.
    b.banger(&["vm", "run", "--rm", "--", "true"])?;
    let initrd = initramfs(&kdir)?;
    let work = b.home.join("raw-qemu");
    let (mut banger, mut raw) = (vec![], vec![]);
    for _ in 0..runs {
        banger.push(b.timed(&["vm", "run", "--rm", "--", "true"])?);
        raw.push(raw_qemu_boot(&kdir.join("vmlinuz"), &initrd, &rootfs, &work).await?);
    }
    let _ = std::fs::remove_dir_all(&work);
    report_paired(
        "boot to a command, QEMU/TCG",
        "banger vm run --rm -- true",
        banger,
        "raw qemu to agent-ready",
        raw,
    );
    Ok(())
}

/// `vm run --rm -- true` from a warm pool of one against a cold one, in
/// the same run. The pool is full before each warm run (its refill after
/// the previous take is not timed), as it is for a user whose runs are
/// further apart than a boot.
pub(crate) fn warm_run(b: &mut Bench, runs: usize) -> Result<()> {
    b.default_image()?;
    let restart = |b: &mut Bench, pool: &str| -> Result<()> {
        let _ = b.banger(&["daemon", "stop"]);
        b.env = vec![("BANGER_WARM_POOL".into(), pool.into())];
        b.banger(&["ping"])?;
        Ok(())
    };
    restart(b, "0")?;
    // Warm-up: the initramfs and the disk templates are made once.
    b.banger(&["vm", "run", "--rm", "--", "true"])?;
    // A snapshot of a VM of the same (default) spec, taken once.
    let _ = b.banger(&["snapshot", "rm", "warm-snap"]);
    b.banger(&["vm", "create", "--name", "warm-src"])?;
    b.banger(&["vm", "snapshot", "warm-src", "--name", "warm-snap"])?;
    b.banger(&["vm", "delete", "warm-src"])?;
    let (mut cold, mut snap) = (vec![], vec![]);
    for _ in 0..runs {
        cold.push(b.timed(&["vm", "run", "--rm", "--", "true"])?);
        snap.push(b.timed(&["vm", "run", "--rm", "--snapshot", "warm-snap", "--", "true"])?);
    }
    b.banger(&["snapshot", "rm", "warm-snap"])?;
    restart(b, "1")?;
    let mut warm = vec![];
    for _ in 0..runs {
        b.banger(&["pool", "fill", "--wait"])?;
        warm.push(b.timed(&["vm", "run", "--rm", "--", "true"])?);
    }
    b.banger(&["pool", "drain"])?;
    restart(b, "0")?;
    report(
        "vm run --rm -- true, QEMU/TCG",
        "from the warm pool",
        warm,
        "cold (a boot)",
        cold.clone(),
    );
    report_paired(
        "vm run --rm -- true, QEMU/TCG",
        "from a snapshot (no pool)",
        snap,
        "cold (a boot)",
        cold,
    );
    Ok(())
}
