//! Pulling from a registry: a fake registry (a real HTTP server on the
//! loopback address, serving the OCI distribution API's read side from a
//! layout made in the test) stands in for Docker Hub, which the build
//! machines cannot reach.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `GET /v2/`, `/v2/<repo>/manifests/<tag|digest>` and
/// `/v2/<repo>/blobs/<digest>` from `layout`; the tag `1.0` is the
/// layout's index. `tamper` flips a byte of every layer blob served.
async fn fake_registry(layout: PathBuf, tamper: bool) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let layout = layout.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("").to_string());
                seen.lock().unwrap().push(format!("{method} {path}"));
                let found = |digest: &str| {
                    std::fs::read(
                        layout
                            .join("blobs/sha256")
                            .join(digest.trim_start_matches("sha256:")),
                    )
                    .ok()
                };
                let (status, ctype, body): (&str, String, Vec<u8>) = if path == "/v2/" {
                    ("200 OK", "application/json".into(), b"{}".to_vec())
                } else if let Some(r) = path.strip_prefix("/v2/test/img/manifests/") {
                    let body = if r == "1.0" {
                        std::fs::read(layout.join("index.json")).ok()
                    } else {
                        found(r)
                    };
                    match body {
                        Some(b) => {
                            let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                            let mt = v["mediaType"].as_str().map(str::to_owned).unwrap_or_else(|| {
                                if v.get("manifests").is_some() {
                                    "application/vnd.oci.image.index.v1+json".into()
                                } else {
                                    "application/vnd.oci.image.manifest.v1+json".into()
                                }
                            });
                            ("200 OK", mt, b)
                        }
                        None => ("404 Not Found", "text/plain".into(), b"no".to_vec()),
                    }
                } else if let Some(d) = path.strip_prefix("/v2/test/img/blobs/") {
                    match found(d) {
                        Some(mut b) => {
                            if tamper && b.len() > 1024 {
                                b[700] ^= 1;
                            }
                            ("200 OK", "application/octet-stream".into(), b)
                        }
                        None => ("404 Not Found", "text/plain".into(), b"no".to_vec()),
                    }
                } else {
                    ("404 Not Found", "text/plain".into(), b"no".to_vec())
                };
                let digest = sha(&body);
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nDocker-Content-Digest: {digest}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                if method != "HEAD" {
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, log)
}

async fn pull(addr: &str, dest: &Path) -> banger_oci::Result<()> {
    let reference = banger_oci::registry::parse(&format!("{addr}/test/img:1.0"))?;
    banger_oci::registry::pull(&reference, dest, &|_| {}).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_pulled_from_a_registry_flattens_like_its_layout() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("served");
    std::fs::create_dir(&src).unwrap();
    let manifest = layout(&src);
    let (addr, log) = fake_registry(src, false).await;
    let pulled = t.path().join("pulled");
    pull(&addr, &pulled).await.unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let (img, out, _) = import(&pulled, &work);
    // The index was followed to the linux/amd64 manifest, by digest.
    assert_eq!(img.digest, manifest);
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|r| r.ends_with(&format!("manifests/{manifest}"))),
        "the amd64 manifest was not fetched by digest: {:?}",
        log.lock().unwrap()
    );
    check_root(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_serving_a_tampered_layer_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("served");
    std::fs::create_dir(&src).unwrap();
    layout(&src);
    let (addr, _) = fake_registry(src, true).await;
    let pulled = t.path().join("pulled");
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    // Refused while pulling, or at the latest when the layer is read.
    let refused = match pull(&addr, &pulled).await {
        Err(_) => true,
        Ok(()) => {
            let img = banger_oci::open(&pulled, &work).unwrap();
            banger_oci::flatten(&img, &work, &|_| {}).is_err()
        }
    };
    assert!(refused, "a layer that does not match its digest was accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_tag_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("served");
    std::fs::create_dir(&src).unwrap();
    layout(&src);
    let (addr, _) = fake_registry(src, false).await;
    let reference = banger_oci::registry::parse(&format!("{addr}/test/img:nope")).unwrap();
    let err = banger_oci::registry::pull(&reference, &t.path().join("p"), &|_| {})
        .await
        .expect_err("a missing tag was pulled");
    assert!(err.to_string().contains("test/img:nope"), "{err}");
}
