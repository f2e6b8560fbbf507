//! `create-flat`: `vm create` with a 1 GiB image against an 8 GiB one.

use crate::{report_paired, run, Bench};
use anyhow::Result;
use std::path::Path;
use std::process::{Command, Stdio};

/// A sparse copy of `src` grown to `size` (ext4 resized in place).
pub(crate) fn sized_copy(src: &str, dst: &Path, size: &str) -> Result<()> {
    run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?;
    run(Command::new("truncate").arg("-s").arg(size).arg(dst))?;
    run(Command::new("e2fsck")
        .args(["-fy"])
        .arg(dst)
        .stdout(Stdio::null()))?;
    run(Command::new("resize2fs")
        .arg(dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null()))?;
    Ok(())
}

pub(crate) fn create_flat(b: &Bench, runs: usize) -> Result<()> {
    let img = b.default_image()?;
    let rootfs = img["rootfs"].as_str().unwrap();
    let kernel = img["kernel"].as_str().unwrap();
    let dir = b.home.join("bench-images");
    std::fs::create_dir_all(&dir)?;
    for (name, size) in [("img1g", "1G"), ("img8g", "8G")] {
        let p = dir.join(format!("{name}.ext4"));
        if !p.exists() {
            sized_copy(rootfs, &p, size)?;
        }
        let _ = b.banger(&["image", "delete", name]);
        b.banger(&[
            "image",
            "register",
            name,
            "--rootfs",
            p.to_str().unwrap(),
            "--kernel",
            kernel,
        ])?;
    }
    let (mut small, mut big) = (vec![], vec![]);
    for i in 0..runs {
        for (name, acc) in [("img1g", &mut small), ("img8g", &mut big)] {
            let vm = format!("bench-{name}-{i}");
            acc.push(b.timed(&["vm", "create", "--no-start", "--name", &vm, "--image", name])?);
            b.banger(&["vm", "delete", &vm])?;
        }
    }
    report_paired(
        "vm create (no start) with an 8 GiB vs a 1 GiB image",
        "8 GiB image",
        big,
        "1 GiB image",
        small,
    );
    Ok(())
}
