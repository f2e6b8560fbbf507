//! `image import` of an OCI image layout made here (a busybox userland in
//! one layer, whiteouts and an owned file in a second), then a VM booted
//! from it runs a command from that image: the guest agent must run on an
//! image that has no glibc at all.

use banger_tests::Env;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn entry(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, mode: u32, uid: u64, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, data).unwrap();
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// A busybox image, as `FROM busybox` would give, plus files to delete.
fn base_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/install-deps installs it)");
    let mut b = tar::Builder::new(Vec::new());
    entry(&mut b, tar::EntryType::Directory, "bin", 0o755, 0, b"");
    entry(&mut b, tar::EntryType::Regular, "bin/busybox", 0o755, 0, &busybox);
    for applet in [
        "sh", "cat", "ls", "test", "stat", "echo", "id", "uname", "grep", "mount", "sleep", "true",
    ] {
        symlink(&mut b, &format!("bin/{applet}"), "busybox");
    }
    entry(&mut b, tar::EntryType::Directory, "etc", 0o755, 0, b"");
    entry(
        &mut b,
        tar::EntryType::Regular,
        "etc/passwd",
        0o644,
        0,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    entry(
        &mut b,
        tar::EntryType::Regular,
        "etc/group",
        0o644,
        0,
        b"root:x:0:\n",
    );
    entry(
        &mut b,
        tar::EntryType::Regular,
        "etc/gone",
        0o644,
        0,
        b"deleted upstairs",
    );
    entry(&mut b, tar::EntryType::Directory, "opq", 0o755, 0, b"");
    entry(&mut b, tar::EntryType::Regular, "opq/old", 0o644, 0, b"hidden");
    b.into_inner().unwrap()
}

fn upper_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    entry(&mut b, tar::EntryType::Regular, "etc/.wh.gone", 0o644, 0, b"");
    entry(
        &mut b,
        tar::EntryType::Regular,
        "etc/marker",
        0o644,
        0,
        b"from layer two\n",
    );
    entry(&mut b, tar::EntryType::Regular, "opq/.wh..wh..opq", 0o644, 0, b"");
    entry(&mut b, tar::EntryType::Regular, "opq/new", 0o644, 0, b"kept");
    entry(
        &mut b,
        tar::EntryType::Regular,
        "home/dev/owned",
        0o600,
        1000,
        b"mine",
    );
    b.into_inner().unwrap()
}

fn blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let p = dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    d
}

/// Writes the layout; returns its manifest digest.
fn layout(dir: &Path) -> String {
    let (l1, l2) = (base_layer(), upper_layer());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&l1).unwrap();
    let c1 = gz.finish().unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]}})
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob(dir, config.as_bytes()), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(dir, &c1), "size": c1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(dir, &l2), "size": l2.len()}
        ]
    })
    .to_string();
    let digest = blob(dir, manifest.as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(),
         "platform": {"architecture": "amd64", "os": "linux"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

#[test]
fn an_imported_oci_image_boots_and_runs_its_own_commands() {
    let env = Env::with_image();
    let kernel = banger_tests::shared_image().1;
    let src = env.home().join("layout");
    std::fs::create_dir_all(&src).unwrap();
    let digest = layout(&src);

    let info: serde_json::Value = serde_json::from_str(&env.banger_ok(&[
        "image",
        "import",
        "bb",
        src.to_str().unwrap(),
        "--kernel",
        &kernel,
        "--json",
    ]))
    .unwrap();
    assert_eq!(info["digest"], digest, "{info}");
    assert_eq!(info["source"], format!("oci:{}", src.display()), "{info}");
    let shown = env.banger_ok(&["image", "show", "bb"]);
    assert!(shown.contains(&digest), "image show lacks the digest: {shown}");

    // A second import under the same name is refused without --force.
    let again = env.banger(&[
        "image",
        "import",
        "bb",
        src.to_str().unwrap(),
        "--kernel",
        &kernel,
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let script = "cat /etc/marker; test -e /etc/gone && echo gone-present; ls /opq; \
                  stat -c '%u %a' /home/dev/owned; readlink /bin/sh; test -e /lib/libc.so.6 || echo no-glibc";
    let out = env.banger_ok(&[
        "vm",
        "run",
        "--image",
        "bb",
        "--rm",
        "--vcpus",
        "1",
        "--memory",
        "512",
        "--disk-size",
        "128",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"from layer two"), "{out}");
    assert!(
        !lines.contains(&"gone-present"),
        "a whiteout was not honoured: {out}"
    );
    assert!(
        lines.contains(&"new") && !lines.contains(&"old"),
        "opaque directory: {out}"
    );
    assert!(lines.contains(&"1000 600"), "owner and mode lost: {out}");
    assert!(lines.contains(&"busybox"), "{out}");
    assert!(lines.contains(&"no-glibc"), "{out}");
    assert!(
        env.banger_ok(&["vm", "list"]).lines().count() <= 1,
        "--rm left a VM"
    );

    // The image is removed with its files once nothing uses it.
    env.banger_ok(&["image", "delete", "bb"]);
    let rootfs = info["rootfs"].as_str().unwrap();
    assert!(!Path::new(rootfs).exists(), "{rootfs} left behind");
}

#[test]
fn importing_something_that_is_not_an_image_is_a_clear_error_and_leaves_nothing() {
    let env = Env::with_image();
    let kernel = banger_tests::shared_image().1;
    let dir = env.home().join("not-an-image");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README"), "hi").unwrap();
    let out = env.banger(&[
        "image",
        "import",
        "nope",
        dir.to_str().unwrap(),
        "--kernel",
        &kernel,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not an OCI image layout") && err.contains("op-"),
        "{err}"
    );
    assert!(!env.banger_ok(&["image", "list"]).contains("nope"));
    let images = env.home().join("images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", images.display());
}
