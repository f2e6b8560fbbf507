//! Images made in the tests: layers with whiteouts, links, owners and a
//! capability, as an OCI layout; and the checks of what they flatten to.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

pub fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

pub fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, mode, uid, data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

pub fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(tar::EntryType::Directory, mode, 0, 0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

pub fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
    let mut h = header(kind, 0o777, 0, 0);
    b.append_link(&mut h, path, target).unwrap();
}

/// A raw entry whose name the builder would refuse (`..`).
pub fn raw_file(b: &mut tar::Builder<Vec<u8>>, name: &[u8], data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, 0, data.len() as u64);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

pub fn lower() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "etc", 0o755);
    file(&mut b, "etc/keep", 0o644, 0, b"old");
    file(&mut b, "etc/gone", 0o644, 0, b"gone");
    dir(&mut b, "opq", 0o755);
    file(&mut b, "opq/old", 0o644, 0, b"old");
    dir(&mut b, "usr/bin", 0o755);
    b.append_pax_extensions([(
        "SCHILY.xattr.security.capability",
        &[1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
    )])
    .unwrap();
    file(&mut b, "usr/bin/ping", 0o755, 0, b"ping");
    file(&mut b, "usr/bin/su", 0o4755, 0, b"su");
    link(&mut b, tar::EntryType::Symlink, "bin", "usr/bin");
    file(&mut b, "data/a", 0o600, 1000, b"hard");
    link(&mut b, tar::EntryType::Link, "data/b", "data/a");
    file(&mut b, "home/u/f", 0o640, 1000, b"mine");
    b.into_inner().unwrap()
}

pub fn upper() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "etc/.wh.gone", 0o644, 0, b"");
    file(&mut b, "opq/new", 0o644, 0, b"new");
    // After an entry of its own layer: it must hide only the lower one.
    file(&mut b, "opq/.wh..wh..opq", 0o644, 0, b"");
    file(&mut b, "bin/added", 0o755, 0, b"through the symlink");
    file(&mut b, "etc/keep", 0o644, 0, b"new");
    raw_file(&mut b, b"../../escape", b"clamped");
    link(&mut b, tar::EntryType::Symlink, "host", "/");
    file(&mut b, "host/etc/planted", 0o644, 0, b"inside");
    b.into_inner().unwrap()
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub fn blob(dir: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let p = dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    d
}

/// An OCI layout: a gzip layer, a plain one, behind a two-platform index.
pub fn layout(dir: &Path) -> String {
    let (l1, l2) = (lower(), upper());
    let (c1, c2) = (gzip(&l1), l2.clone());
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]}
    })
    .to_string();
    let config_d = blob(dir, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(dir, &c1), "size": c1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(dir, &c2), "size": c2.len()}
        ]
    })
    .to_string();
    let manifest_d = blob(dir, manifest.as_bytes());
    let arm = blob(dir, b"{}");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm, "size": 2,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_d, "size": manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_d
}

pub fn import(
    from: &Path,
    work: &Path,
) -> (banger_oci::Image, std::path::PathBuf, banger_oci::write::Written) {
    let img = banger_oci::open(from, work).unwrap();
    let tree = banger_oci::flatten(&img, work, &|_| {}).unwrap();
    let out = work.join("root");
    let written = banger_oci::write::write(&tree, &out).unwrap();
    (img, out, written)
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn check_root(out: &Path) {
    // Upper layer's version wins; whiteouts remove the lower files only.
    assert_eq!(read(&out.join("etc/keep")), "new");
    assert!(!out.join("etc/gone").exists(), "whiteout ignored");
    assert!(
        !out.join("opq/old").exists(),
        "opaque directory kept a lower file"
    );
    assert_eq!(
        read(&out.join("opq/new")),
        "new",
        "opaque whiteout hid its own layer"
    );
    // Entries under a symlinked directory land inside the image.
    assert_eq!(read(&out.join("usr/bin/added")), "through the symlink");
    assert!(out
        .join("bin")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read(&out.join("escape")), "clamped");
    assert!(!out.parent().unwrap().join("escape").exists());
    assert_eq!(read(&out.join("etc/planted")), "inside");
    assert!(!Path::new("/etc/planted").exists());
    // Owners, modes, hard links, capabilities.
    let su = std::fs::metadata(out.join("usr/bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    let f = std::fs::metadata(out.join("home/u/f")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 1000, 0o640));
    let (a, b) = (
        std::fs::metadata(out.join("data/a")).unwrap(),
        std::fs::metadata(out.join("data/b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hard link became a copy");
    assert_eq!(a.uid(), 1000);
    let len = unsafe {
        let p = std::ffi::CString::new(out.join("usr/bin/ping").as_os_str().as_encoded_bytes()).unwrap();
        libc::getxattr(
            p.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert_eq!(len, 20, "the file capability did not survive");
    assert_eq!(
        std::fs::metadata(out.join("etc/keep")).unwrap().mtime(),
        1_700_000_000
    );
    for d in ["proc", "sys", "dev", "run", "tmp"] {
        assert!(out.join(d).is_dir(), "/{d} missing");
    }
}
