//! banger as a containerd runtime: the real containerd from Debian, started
//! here with a private root, state and socket, runs containers through
//! `containerd-shim-banger-v2` as banger VMs. `ctr run` prints the guest's
//! kernel and returns the container's exit code; `ctr task exec` runs in
//! a running task; `ctr task kill` ends it; after delete nothing of the VM
//! is left. The shim's log names each task with the op id of every banger
//! call it made, and the daemon's log has those op ids.

use banger_tests::{bin_dir, processes_mentioning, wait_for, Env};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn entry(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, data).unwrap();
}

/// An OCI image archive (what `ctr image import` takes): a busybox
/// userland in one layer, named `name`.
fn oci_archive(name: &str) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/install-deps installs it)");
    let mut l = tar::Builder::new(Vec::new());
    entry(&mut l, tar::EntryType::Directory, "bin", 0o755, b"");
    entry(&mut l, tar::EntryType::Regular, "bin/busybox", 0o755, &busybox);
    for applet in ["sh", "uname", "echo", "sleep", "cat", "env", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        l.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    for d in ["etc", "tmp", "root"] {
        entry(&mut l, tar::EntryType::Directory, d, 0o755, b"");
    }
    entry(
        &mut l,
        tar::EntryType::Regular,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    let layer = l.into_inner().unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&layer)]}})
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config.as_bytes()), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len()}]
    })
    .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest.as_bytes()),
         "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"},
         "annotations": {"io.containerd.image.name": name}}]})
    .to_string();
    let mut a = tar::Builder::new(Vec::new());
    entry(
        &mut a,
        tar::EntryType::Regular,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    entry(
        &mut a,
        tar::EntryType::Regular,
        "index.json",
        0o644,
        index.as_bytes(),
    );
    entry(&mut a, tar::EntryType::Directory, "blobs", 0o755, b"");
    entry(&mut a, tar::EntryType::Directory, "blobs/sha256", 0o755, b"");
    for blob in [layer.as_slice(), config.as_bytes(), manifest.as_bytes()] {
        let path = format!("blobs/sha256/{}", sha(blob).trim_start_matches("sha256:"));
        entry(&mut a, tar::EntryType::Regular, &path, 0o644, blob);
    }
    a.into_inner().unwrap()
}

/// A private containerd, killed on drop.
struct Containerd {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Containerd {
    /// Started with banger's environment, so the shims it starts reach
    /// this test's daemon, and the workspace's binaries first on PATH.
    fn start(dir: &Path, env: &Env) -> Containerd {
        let sock = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{r}\"\nstate = \"{s}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{o}\"\n",
                r = dir.join("root").display(),
                s = dir.join("state").display(),
                o = dir.join("opt").display(),
                sock = sock.display(),
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let out = std::fs::File::create(&log).unwrap();
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .env("PATH", path)
            .env("BANGER_HOME", env.home())
            .env("BANGER_RUNTIME_DIR", env.runtime())
            .env("BANGER_HELPER_SOCKET", env.helper_socket())
            .env("BANGER_HELPER_AUTOSTART", "0")
            .env("BANGER_DNS_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("containerd (scripts/install-deps installs it)");
        wait_for("containerd's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
        Containerd { child, sock, log }
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "default"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}\n{}",
            text(&o),
            self.log_tail()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const RUNTIME: &str = "io.containerd.banger.v2";
const IMAGE: &str = "docker.io/banger/busybox:test";

#[test]
fn containerd_runs_containers_as_banger_vms_and_leaves_nothing() {
    let env = Env::with_image();
    let d = tempfile::Builder::new().prefix("banger-ctrd").tempdir().unwrap();
    let ctrd = Containerd::start(d.path(), &env);
    let archive = d.path().join("image.tar");
    std::fs::write(&archive, oci_archive(IMAGE)).unwrap();
    ctrd.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(ctrd.ctr_ok(&["image", "ls", "-q"]).contains(IMAGE));

    // A container's exit code and output, from inside a VM.
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t1",
        "sh",
        "-c",
        "uname -r; exit 3",
    ]);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        out.status.code(),
        Some(3),
        "ctr run: {}\n{}",
        text(&out),
        ctrd.log_tail()
    );
    assert!(
        printed.contains("cloud") && printed != host.trim(),
        "not the guest's kernel: {printed:?}"
    );

    // A running task: exec into it, kill it, delete it.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, IMAGE, "t2", "sleep", "1000"]);
    let hi = ctrd.ctr_ok(&["task", "exec", "--exec-id", "e1", "t2", "echo", "hello from exec"]);
    assert_eq!(hi, "hello from exec\n");
    let code = ctrd.ctr(&["task", "exec", "--exec-id", "e2", "t2", "sh", "-c", "exit 7"]);
    assert_eq!(code.status.code(), Some(7), "{}", text(&code));
    assert!(ctrd.ctr_ok(&["task", "ls"]).contains("RUNNING"));
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "t2"]);
    wait_for("t2 to stop", Duration::from_secs(30), || {
        ctrd.ctr_ok(&["task", "ls"]).contains("STOPPED").then_some(())
    });
    ctrd.ctr_ok(&["task", "delete", "t2"]);
    ctrd.ctr_ok(&["container", "rm", "t2"]);

    // Nothing of either VM is left: no record, no process, no directory.
    let vms: serde_json::Value = serde_json::from_str(&env.banger_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 0, "VMs left: {vms}");
    wait_for("the VMs' processes to end", Duration::from_secs(10), || {
        env.vm_processes().is_empty().then_some(())
    });
    let left: Vec<_> = std::fs::read_dir(env.vms_dir())
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "VM directories left: {left:?}");
    assert!(
        processes_mentioning("containerd-shim-banger-v2").is_empty(),
        "a shim outlived its tasks"
    );

    // One grep joins the task id and banger's op ids: the shim names both
    // on one line, and the daemon logged those op ids.
    let log = std::fs::read_to_string(&ctrd.log).unwrap();
    let op = log
        .lines()
        .filter(|l| l.contains("task=t1 ") && l.contains("call=vm create"))
        .find_map(|l| l.split("op_id=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no shim line names t1 with an op id:\n{}", ctrd.log_tail()))
        .to_string();
    let records = env.daemon_records();
    assert!(
        records.iter().any(|r| r["op_id"] == op.as_str()),
        "the daemon logged nothing under {op}"
    );
}
