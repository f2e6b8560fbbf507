//! Image bundles: `image export` → `image pull` of the file into a clean
//! state directory → a VM from the pulled image runs; a bundle with one
//! flipped byte, a `../` member or an extra member is refused and leaves
//! nothing behind (no image, no kernel, no staging files).

use banger_tests::Env;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// A small bundle, built by hand: `members` are written, `listed` are in
/// its manifest, and `raw_path` is a member whose path is set byte by byte.
fn bundle(
    path: &Path,
    members: &[(&str, Vec<u8>)],
    listed: &[(&str, &[u8])],
    raw_path: Option<(&str, &[u8])>,
) {
    let manifest = serde_json::json!({
        "format": 1,
        "kind": "image",
        "name": "evil",
        "arch": std::env::consts::ARCH,
        "kernel_version": "6.0.0-test",
        "members": listed.iter().map(|(p, b)| serde_json::json!({"path": p, "size": b.len(), "sha256": hex(b)})).collect::<Vec<_>>(),
    });
    let f = std::fs::File::create(path).unwrap();
    let enc = zstd::Encoder::new(f, 1).unwrap();
    let mut tar = tar::Builder::new(enc);
    let add = |tar: &mut tar::Builder<zstd::Encoder<'static, std::fs::File>>, p: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, p, data).unwrap();
    };
    let json = serde_json::to_vec(&manifest).unwrap();
    add(&mut tar, "manifest.json", &json);
    for (p, data) in members {
        add(&mut tar, p, data);
    }
    if let Some((p, data)) = raw_path {
        // A path the tar crate would refuse to write: set its bytes directly.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append(&h, data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

/// A hostile bundle: what it is, its members, a raw-path member, and
/// what the refusal must say.
type Case<'a> = (
    &'a str,
    Vec<(&'a str, Vec<u8>)>,
    Option<(&'a str, &'a [u8])>,
    &'a str,
);

/// Everything under `dir` (recursively), for "nothing left" checks.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn a_bundle_round_trips_and_a_bad_one_leaves_nothing() {
    // Hostile bundles against a clean state directory.
    let clean = Env::new();
    let rootfs = vec![7u8; 4096];
    let kernel = b"\x7fELF not really a kernel".to_vec();
    let kman = b"{}".to_vec();
    let listed: Vec<(&str, &[u8])> = vec![
        ("rootfs.ext4", &rootfs),
        ("kernel/vmlinuz", &kernel),
        ("kernel/manifest.json", &kman),
    ];
    let mut flipped = rootfs.clone();
    flipped[100] ^= 1;
    let cases: Vec<Case> = vec![
        (
            "flipped byte",
            vec![
                ("rootfs.ext4", flipped),
                ("kernel/vmlinuz", kernel.clone()),
                ("kernel/manifest.json", kman.clone()),
            ],
            None,
            "sha256",
        ),
        (
            "../ member",
            vec![
                ("rootfs.ext4", rootfs.clone()),
                ("kernel/vmlinuz", kernel.clone()),
                ("kernel/manifest.json", kman.clone()),
            ],
            Some(("../escaped", b"x")),
            "unexpected member",
        ),
        (
            "extra member",
            vec![
                ("rootfs.ext4", rootfs.clone()),
                ("kernel/vmlinuz", kernel.clone()),
                ("kernel/manifest.json", kman.clone()),
                ("kernel/extra", b"x".to_vec()),
            ],
            None,
            "unexpected member",
        ),
        (
            "missing member",
            vec![
                ("rootfs.ext4", rootfs.clone()),
                ("kernel/vmlinuz", kernel.clone()),
            ],
            None,
            "missing",
        ),
    ];
    for (what, members, raw, why) in cases {
        let path = clean
            .dir
            .path()
            .join(format!("{}.tar.zst", what.replace(' ', "-")));
        bundle(&path, &members, &listed, raw);
        let out = clean.banger(&["image", "pull", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(why) && err.contains("bad_request"), "{what}: {err}");
        assert_eq!(
            clean.banger_ok(&["image", "list"]).trim(),
            "",
            "{what}: an image was left"
        );
        let home = clean.home();
        let left: Vec<PathBuf> = ["images", "kernels", "tmp"]
            .iter()
            .flat_map(|d| files(&home.join(d)))
            .collect();
        assert!(left.is_empty(), "{what}: left behind {left:?}");
        assert!(!clean.dir.path().join("escaped").exists() && !home.join("escaped").exists());
    }

    // The round trip: the default image out of one state directory, into
    // the clean one, and a VM from it.
    let src = Env::with_image();
    let file = src.dir.path().join("default.tar.zst");
    let out = src.banger_ok(&[
        "image",
        "export",
        "default",
        "-o",
        file.to_str().unwrap(),
        "--json",
    ]);
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(b["members"].as_u64().unwrap() >= 3, "{b}");
    let pulled: serde_json::Value = serde_json::from_str(&clean.banger_ok(&[
        "image",
        "pull",
        file.to_str().unwrap(),
        "--name",
        "pulled",
        "--json",
    ]))
    .unwrap();
    assert!(
        pulled["source"].as_str().unwrap().starts_with("bundle:"),
        "{pulled}"
    );
    assert!(
        pulled["digest"].as_str().unwrap().starts_with("sha256:"),
        "{pulled}"
    );
    // The pulled kernel is used from where it was installed, never from
    // the directory its manifest names (the exporting machine's).
    let kernels: serde_json::Value =
        serde_json::from_str(&clean.banger_ok(&["kernel", "list", "--json"])).unwrap();
    for k in kernels.as_array().unwrap() {
        assert!(
            k["dir"]
                .as_str()
                .unwrap()
                .starts_with(clean.home().to_str().unwrap()),
            "a pulled kernel points outside its state directory: {k}"
        );
    }
    clean.create_small("frombundle", &["--image", "pulled"]);
    let hi = clean.banger_ok(&["vm", "exec", "frombundle", "--", "echo", "from a bundle"]);
    assert_eq!(hi, "from a bundle\n");
    // A second pull of the same name is refused; the first stays.
    let again = clean.banger(&["image", "pull", file.to_str().unwrap(), "--name", "pulled"]);
    assert!(!again.status.success());
    assert!(files(&clean.home().join("tmp")).is_empty(), "staging files left");
}

#[test]
fn a_kernel_travels_alone_and_is_not_taken_for_an_image() {
    let src = Env::with_image();
    let img: serde_json::Value =
        serde_json::from_str(&src.banger_ok(&["image", "show", "default", "--json"])).unwrap();
    let kdir = img["kernel"].as_str().unwrap().to_string();
    let file = src.dir.path().join("kernel.tar.zst");
    src.banger_ok(&["kernel", "export", &kdir, "-o", file.to_str().unwrap()]);

    let clean = Env::new();
    // A kernel bundle is not an image.
    let out = clean.banger(&["image", "pull", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an image"));
    assert!(
        files(&clean.home().join("kernels")).is_empty(),
        "a refused pull left a kernel"
    );
    // As a kernel it installs, and again is a no-op.
    let k: serde_json::Value =
        serde_json::from_str(&clean.banger_ok(&["kernel", "pull", file.to_str().unwrap(), "--json"]))
            .unwrap();
    let version = k["version"].as_str().unwrap().to_string();
    let list = clean.banger_ok(&["kernel", "list"]);
    assert!(list.contains(&version), "{list}");
    clean.banger_ok(&["kernel", "pull", file.to_str().unwrap()]);
    assert!(files(&clean.home().join("tmp")).is_empty(), "staging files left");
}
