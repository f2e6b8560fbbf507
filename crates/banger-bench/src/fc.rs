//! Firecracker with the tiny guest: `fc-start` (against firecracker
//! configured by hand) and `fc-parallel` (many at once, VMs per second).

use crate::{ms, report_paired, run, Bench};
use anyhow::{bail, Context, Result};
use banger_vmm::firecracker::request;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tiny vsock guest as image `tiny` (its kernel, an empty rootfs):
/// the guest and the rootfs paths.
pub(crate) fn tiny_image(b: &Bench) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../banger-tests/fixtures/fc-tiny-guests");
    let guest = fixtures.join("vsockguest.elf");
    let kdir = b.home.join("tiny-kernel");
    std::fs::create_dir_all(&kdir)?;
    std::fs::copy(&guest, kdir.join("vsockguest.elf"))?;
    std::fs::copy(&guest, kdir.join("vmlinuz"))?;
    let manifest = serde_json::json!({"version":"tiny","dir":kdir.display().to_string(),"package":"fixture","sha256":"","source":"fixture","modules":[],"vmlinux":"vsockguest.elf"});
    std::fs::write(kdir.join("manifest.json"), manifest.to_string())?;
    let rootfs = b.home.join("tiny-rootfs.ext4");
    run(Command::new("truncate").arg("-s").arg("16M").arg(&rootfs))?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&rootfs))?;
    let _ = b.banger(&["image", "delete", "tiny"]);
    b.banger(&[
        "image",
        "register",
        "tiny",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        kdir.to_str().unwrap(),
    ])?;
    Ok((guest, kdir, rootfs))
}

/// A stopped VM of the tiny image, as small as banger makes one.
pub(crate) fn tiny_vm(b: &Bench, name: &str) -> Result<()> {
    b.banger(&[
        "vm",
        "create",
        "--no-start",
        "--name",
        name,
        "--image",
        "tiny",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--disk-size",
        "64",
        "--no-network",
    ])?;
    Ok(())
}

pub(crate) async fn fc_start(b: &Bench, runs: usize, fc: &Path) -> Result<()> {
    let _ = b.banger(&["vm", "delete", "fcbench"]);
    let (guest, kdir, rootfs) = tiny_image(b)?;
    tiny_vm(b, "fcbench")?;
    let vm: Value = serde_json::from_str(&b.banger(&["vm", "show", "fcbench", "--json"])?)?;
    let vm_dir = PathBuf::from(vm["vm_dir"].as_str().unwrap());
    // The initramfs banger passes, so both sides load the same bytes.
    b.banger(&["vm", "start", "fcbench"])?;
    b.banger(&["vm", "kill", "fcbench"])?;
    let initrd = std::fs::read_dir(&kdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cpio"))
        .context("no initramfs")?;
    let raw_dir = b.home.join("raw-fc");
    std::fs::create_dir_all(&raw_dir)?;
    let (mut banger, mut raw) = (vec![], vec![]);
    // Time the daemon's vm.start RPC itself: the CLI's own process start is
    // not what this compares.
    let client = banger_proto::Client::new(b.home.join("run/bangerd.sock"));
    let target = banger_proto::methods::daemon::VmRef {
        name: "fcbench".into(),
    };
    for _ in 0..runs {
        let t = Instant::now();
        client
            .call::<banger_proto::methods::daemon::VmStart>(&target, None)
            .await?;
        banger.push(t.elapsed());
        b.banger(&["vm", "kill", "fcbench"])?;
        let (d, child) = raw_fc(fc, &guest, &initrd, &rootfs, &vm_dir, &raw_dir, 3).await?;
        stop(child).await;
        raw.push(d);
    }
    b.banger(&["vm", "delete", "fcbench"])?;
    report_paired(
        "Firecracker start of a tiny guest to vsock-ready",
        "banger vm.start RPC",
        banger,
        "firecracker configured by hand",
        raw,
    );
    Ok(())
}

pub(crate) async fn put(api: &Path, method: &str, path: &str, body: Value) -> Result<()> {
    let (st, text) = request(api, method, path, Some(&body)).await?;
    if !(200..300).contains(&st) {
        bail!("{method} {path}: {st} {text}");
    }
    Ok(())
}

/// Firecracker started in `dir` (its API socket there; relative paths,
/// such as a snapshot's `drive-*` names, resolve there), until its API
/// socket answers. Dropping the handle kills it.
pub(crate) async fn spawn_fc(fc: &Path, dir: &Path) -> Result<(tokio::process::Child, PathBuf)> {
    let api = dir.join("api.sock");
    let _ = std::fs::remove_file(&api);
    let child = tokio::process::Command::new(fc)
        .arg("--api-sock")
        .arg(&api)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    while tokio::net::UnixStream::connect(&api).await.is_err() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok((child, api))
}

/// The time from `t` until the guest answers on vsock port 52 of `vs`.
/// The Firecracker is handed back, still running, so that stopping it is
/// not timed: many started at once must not wait on each other's ends.
pub(crate) async fn vsock_ready(
    child: tokio::process::Child,
    vs: &Path,
    t: Instant,
) -> Result<(Duration, tokio::process::Child)> {
    let ready = banger_vmm::vsock::connect_with_retry(vs, 52, Duration::from_secs(10), || true).await;
    let elapsed = t.elapsed();
    ready?;
    Ok((elapsed, child))
}

/// Stops a Firecracker started by hand and waits for its end.
pub(crate) async fn stop(mut child: tokio::process::Child) {
    let _ = child.kill().await;
}

pub(crate) async fn raw_fc(
    fc: &Path,
    guest: &Path,
    initrd: &Path,
    rootfs: &Path,
    vm_dir: &Path,
    dir: &Path,
    cid: u32,
) -> Result<(Duration, tokio::process::Child)> {
    let vs = dir.join("v.sock");
    let _ = std::fs::remove_file(&vs);
    let t = Instant::now();
    let (child, api) = spawn_fc(fc, dir).await?;
    let s = |p: &Path| p.display().to_string();
    let calls = [
        (
            "/machine-config",
            serde_json::json!({"vcpu_count":1,"mem_size_mib":128}),
        ),
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path":s(guest),"initrd_path":s(initrd),"boot_args":"console=ttyS0"}),
        ),
        (
            "/drives/base",
            serde_json::json!({"drive_id":"base","path_on_host":s(rootfs),"is_root_device":false,"is_read_only":true}),
        ),
        (
            "/drives/overlay",
            serde_json::json!({"drive_id":"overlay","path_on_host":s(&vm_dir.join("overlay.ext4")),"is_root_device":false,"is_read_only":false}),
        ),
        (
            "/drives/work",
            serde_json::json!({"drive_id":"work","path_on_host":s(&vm_dir.join("work.ext4")),"is_root_device":false,"is_read_only":false}),
        ),
        ("/vsock", serde_json::json!({"guest_cid":cid,"uds_path":s(&vs)})),
        ("/actions", serde_json::json!({"action_type":"InstanceStart"})),
    ];
    for (path, body) in calls {
        put(&api, "PUT", path, body).await?;
    }
    vsock_ready(child, &vs, t).await
}

/// `count` tiny Firecracker guests started at once through the daemon
/// (`vm.start` RPCs in flight together) against as many firecracker
/// processes configured by hand at once: VMs per second to vsock-ready.
pub(crate) async fn fc_parallel(b: &Bench, count: usize, fc: &Path) -> Result<()> {
    let names: Vec<String> = (0..count).map(|i| format!("par-{i}")).collect();
    for n in &names {
        let _ = b.banger(&["vm", "delete", n]);
    }
    let (guest, kdir, rootfs) = tiny_image(b)?;
    for n in &names {
        tiny_vm(b, n)?;
    }
    // Warm-up: the initramfs both sides load.
    b.banger(&["vm", "start", &names[0]])?;
    b.banger(&["vm", "kill", &names[0]])?;
    let initrd = std::fs::read_dir(&kdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cpio"))
        .context("no initramfs")?;
    let client = banger_proto::Client::new(b.home.join("run/bangerd.sock"));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for n in names.clone() {
        let c = client.clone();
        set.spawn(async move {
            c.call::<banger_proto::methods::daemon::VmStart>(
                &banger_proto::methods::daemon::VmRef { name: n },
                None,
            )
            .await
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let banger = t.elapsed();
    for n in &names {
        b.banger(&["vm", "kill", n])?;
    }
    let mut dirs = vec![];
    for n in &names {
        let vm: Value = serde_json::from_str(&b.banger(&["vm", "show", n, "--json"])?)?;
        dirs.push(PathBuf::from(vm["vm_dir"].as_str().unwrap()));
    }
    let raw_root = b.home.join("raw-fc-parallel");
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, vm_dir) in dirs.into_iter().enumerate() {
        let (fc, guest, initrd, rootfs) = (fc.to_path_buf(), guest.clone(), initrd.clone(), rootfs.clone());
        let dir = raw_root.join(i.to_string());
        std::fs::create_dir_all(&dir)?;
        set.spawn(async move { raw_fc(&fc, &guest, &initrd, &rootfs, &vm_dir, &dir, 3 + i as u32).await });
    }
    let mut running = vec![];
    while let Some(r) = set.join_next().await {
        running.push(r??.1);
    }
    let raw = t.elapsed();
    for child in running {
        stop(child).await;
    }
    let _ = std::fs::remove_dir_all(&raw_root);
    for n in &names {
        b.banger(&["vm", "delete", n])?;
    }
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!("{count} tiny Firecracker guests started at once, to vsock-ready");
    println!(
        "  banger (vm.start RPCs together)  {:>8.1} ms  {:>6.1} VMs/s",
        ms(banger),
        rate(banger)
    );
    println!(
        "  firecracker by hand, together    {:>8.1} ms  {:>6.1} VMs/s",
        ms(raw),
        rate(raw)
    );
    println!(
        "  ratio banger / by hand = {:.3}",
        banger.as_secs_f64() / raw.as_secs_f64()
    );
    Ok(())
}
