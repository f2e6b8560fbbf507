//! Images made here (an OCI layout, its archive, a `docker save` archive)
//! flattened and written to a real directory; run as root (owners, setuid
//! bits and capabilities are only kept by root).

mod common;
use common::*;

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn an_oci_layout_flattens_with_whiteouts_owners_and_links() {
    assert!(
        root(),
        "these tests keep owners and capabilities: run them as root"
    );
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("layout");
    std::fs::create_dir(&src).unwrap();
    let digest = layout(&src);
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let (img, out, written) = import(&src, &work);
    assert_eq!(img.digest, digest);
    assert_eq!(written.hardlinks, 1);
    assert_eq!(written.xattrs_refused, 0);
    check_root(&out);
}

#[test]
fn an_oci_archive_reads_the_same() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("layout");
    std::fs::create_dir(&src).unwrap();
    let digest = layout(&src);
    let archive = t.path().join("image.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &src).unwrap();
    b.finish().unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let (img, out, _) = import(&archive, &work);
    assert_eq!(img.digest, digest);
    check_root(&out);
}

/// The `docker save` format before Docker 25: `manifest.json`, a config,
/// one `layer.tar` per directory, identical layers linked to one copy;
/// here gzip-compressed as `docker save | gzip` makes it.
#[test]
fn a_docker_save_archive_reads_the_same() {
    let t = tempfile::tempdir().unwrap();
    let (l1, l2) = (lower(), upper());
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]}})
    .to_string();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "cfg.json", 0o644, 0, config.as_bytes());
    file(&mut b, "one/layer.tar", 0o644, 0, &l1);
    file(&mut b, "two/real.tar", 0o644, 0, &l2);
    link(&mut b, tar::EntryType::Symlink, "two/layer.tar", "real.tar");
    let manifest = r#"[{"Config":"cfg.json","RepoTags":["t:1"],"Layers":["one/layer.tar","two/layer.tar"]}]"#;
    file(&mut b, "manifest.json", 0o644, 0, manifest.as_bytes());
    let archive = t.path().join("saved.tar.gz");
    std::fs::write(&archive, gzip(&b.into_inner().unwrap())).unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let (img, out, _) = import(&archive, &work);
    assert_eq!(img.digest, sha(config.as_bytes()));
    check_root(&out);
}

#[test]
fn a_tampered_layer_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("layout");
    std::fs::create_dir(&src).unwrap();
    layout(&src);
    // Corrupt the plain layer: its digest no longer matches.
    let l2 = sha(&upper());
    let p = src.join("blobs/sha256").join(l2.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let img = banger_oci::open(&src, &work).unwrap();
    let Err(err) = banger_oci::flatten(&img, &work, &|_| {}) else {
        panic!("a tampered layer was accepted")
    };
    assert!(matches!(err, banger_oci::Error::DigestMismatch { .. }), "{err}");
}

#[test]
fn not_an_image_says_so() {
    let t = tempfile::tempdir().unwrap();
    let err = banger_oci::open(t.path(), t.path()).err().unwrap();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
}
