//! Bundles over https and from a catalog: a kernel bundle served by a real
//! TLS server on loopback (a certificate made for the test, trusted through
//! SSL_CERT_FILE) is pulled by catalog name and by URL; a bundle whose
//! bytes differ from the pin, a truncated one, an http:// URL, and a name
//! the catalog lacks are refused and leave nothing behind.

use banger_tests::{wait_for, Env};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A static https server for `dir` on 127.0.0.1, killed on drop.
struct Https {
    child: Child,
    port: u16,
}

impl Drop for Https {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SERVER: &str = r#"
import http.server, ssl, sys, os
os.chdir(sys.argv[1])
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

fn serve(dir: &Path, cert: &Path, key: &Path) -> Https {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SERVER)
        .arg(dir)
        .arg(cert)
        .arg(key)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 (scripts/install-deps installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("server said {line:?}"));
    Https { child, port }
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/install-deps installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority made for the test and a server certificate it
/// signed for 127.0.0.1: (CA certificate, server certificate, server key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=banger test CA",
        ]
        .iter()
        .chain(&["-keyout", "ca.key", "-out", "ca.pem"])
        .copied()
        .collect::<Vec<_>>(),
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
        dir,
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
        dir,
    );
    (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"))
}

fn hex_sha256(p: &Path) -> String {
    let mut h = Sha256::new();
    h.update(std::fs::read(p).unwrap());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn leftovers(home: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(home.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

#[test]
fn bundles_come_over_https_from_a_catalog_and_bad_ones_leave_nothing() {
    let src = Env::with_image();
    let web = tempfile::tempdir().unwrap();
    let bundle = web.path().join("kernel.tar.zst");
    // The default image's kernel (a directory the shared image names).
    let image: Value = serde_json::from_str(&src.banger_ok(&["image", "show", "default", "--json"])).unwrap();
    let kdir = image["kernel"].as_str().unwrap().to_string();
    let version = Path::new(&kdir)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    src.banger_ok(&["kernel", "export", &kdir, "-o", bundle.to_str().unwrap()]);
    let (sha, size) = (hex_sha256(&bundle), std::fs::metadata(&bundle).unwrap().len());
    // A copy cut short, and a copy with one byte flipped.
    let bytes = std::fs::read(&bundle).unwrap();
    std::fs::write(web.path().join("short.tar.zst"), &bytes[..bytes.len() / 2]).unwrap();
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    std::fs::write(web.path().join("flipped.tar.zst"), &flipped).unwrap();

    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(certs.path());
    let server = serve(web.path(), &cert, &key);
    let base = format!("https://127.0.0.1:{}", server.port);
    let arch = std::env::consts::ARCH;
    let entry = |name: &str, file: &str, sha: &str, size: u64| {
        format!(
            "[[bundle]]\nname = \"{name}\"\nkind = \"kernel\"\narch = \"{arch}\"\n\
             url = \"{base}/{file}\"\nsha256 = \"{sha}\"\nsize = {size}\n\n"
        )
    };
    let catalog = [
        entry("debian-cloud", "kernel.tar.zst", &sha, size),
        entry("flipped", "flipped.tar.zst", &sha, size),
        entry("short", "short.tar.zst", &sha, size),
    ]
    .concat();
    std::fs::write(web.path().join("catalog.toml"), catalog).unwrap();
    let catalog_url = format!("{base}/catalog.toml");

    // A clean state directory whose daemon trusts the test's certificate
    // (and nothing else: SSL_CERT_FILE replaces the system's roots).
    let clean = Env::new();
    let banger = |args: &[&str]| {
        clean
            .cmd("banger")
            .env("SSL_CERT_FILE", &ca)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert!(banger(&["ping"]).status.success());

    for (what, args, expect) in [
        (
            "a pinned hash the bytes do not have",
            vec!["kernel", "pull", "flipped", "--catalog", &catalog_url],
            "sha256",
        ),
        (
            "a bundle cut short",
            vec!["kernel", "pull", "short", "--catalog", &catalog_url],
            "bytes",
        ),
        (
            "a name the catalog lacks",
            vec!["kernel", "pull", "nope", "--catalog", &catalog_url],
            "no kernel named",
        ),
        (
            "plain http",
            vec!["kernel", "pull", "http://127.0.0.1:1/kernel.tar.zst"],
            "only https",
        ),
        (
            "a URL with a wrong --sha256",
            vec![
                "kernel",
                "pull",
                &format!("{base}/kernel.tar.zst"),
                "--sha256",
                &"0".repeat(64),
            ],
            "sha256",
        ),
    ] {
        let out = banger(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(expect), "{what}: unclear error: {err}");
        assert!(err.contains("op-"), "{what}: no op id in {err}");
        let ks: Value = serde_json::from_str(&clean.banger_ok(&["kernel", "list", "--json"])).unwrap();
        assert_eq!(ks.as_array().unwrap().len(), 0, "{what}: a kernel was installed");
        assert!(
            leftovers(&clean.home()).is_empty(),
            "{what}: left {:?}",
            leftovers(&clean.home())
        );
    }

    // By catalog name: verified and installed.
    let out = banger(&[
        "kernel",
        "pull",
        "debian-cloud",
        "--catalog",
        &catalog_url,
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let k: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k["version"], version.as_str());
    assert!(k["dir"]
        .as_str()
        .unwrap()
        .starts_with(clean.home().to_str().unwrap()));
    assert!(
        leftovers(&clean.home()).is_empty(),
        "left {:?}",
        leftovers(&clean.home())
    );

    // By URL, pinned on the command line, into another clean state: the
    // same kernel.
    let other = Env::new();
    let out = other
        .cmd("banger")
        .env("SSL_CERT_FILE", &ca)
        .args([
            "kernel",
            "pull",
            &format!("{base}/kernel.tar.zst"),
            "--sha256",
            &sha,
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let k2: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k2["sha256"], k["sha256"]);
    wait_for("nothing staged", Duration::from_secs(1), || {
        leftovers(&other.home()).is_empty().then_some(())
    });
}
