//! `ctr-run`: `ctr run --rm` through containerd and the shim against
//! `banger vm run --rm` of the same image.

use crate::{report_paired, Bench};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;

/// Start latency through containerd and the shim against banger's own
/// `vm run`, of the same image (the one the shim made from the
/// container's layers), with no network on either side.
pub(crate) fn ctr_run(b: &Bench, runs: usize) -> Result<()> {
    use banger_tests::containerd::{oci_archive, Containerd, RUNTIME};
    b.default_image()?;
    let dir = b.home.join("containerd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = |p: PathBuf| p.display().to_string();
    let mut env = vec![
        ("BANGER_HOME".to_string(), p(b.home.clone())),
        ("BANGER_RUNTIME_DIR".to_string(), p(b.home.join("run"))),
        ("BANGER_HELPER_SOCKET".to_string(), p(b.home.join("helper.sock"))),
        ("BANGER_HELPER_AUTOSTART".to_string(), "0".to_string()),
    ];
    env.extend(b.env.iter().cloned());
    let ctrd = Containerd::start(&dir, &env);
    let image = "docker.io/banger/bench:latest";
    let archive = dir.join("image.tar");
    std::fs::write(&archive, oci_archive(image))?;
    ctrd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    // Warm-up: the shim makes (and registers) the image once.
    ctrd.ctr_ok(&["run", "--rm", "--runtime", RUNTIME, image, "warm", "true"]);
    let images: Value = serde_json::from_str(&b.banger(&["image", "list", "--json"])?)?;
    let name = images
        .as_array()
        .and_then(|a| {
            a.iter()
                .find_map(|i| i["name"].as_str().filter(|n| n.starts_with("ctr-")))
        })
        .context("the shim registered no image")?
        .to_string();
    let (mut via_ctr, mut direct) = (vec![], vec![]);
    for i in 0..runs {
        let t = Instant::now();
        ctrd.ctr_ok(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            image,
            &format!("b{i}"),
            "true",
        ]);
        via_ctr.push(t.elapsed());
        direct.push(b.timed(&[
            "vm",
            "run",
            "--rm",
            "--no-network",
            "--image",
            &name,
            "--",
            "true",
        ])?);
    }
    report_paired(
        "container start to exit, QEMU/TCG",
        "ctr run --rm (containerd + shim)",
        via_ctr,
        "banger vm run --rm, same image",
        direct,
    );
    Ok(())
}
