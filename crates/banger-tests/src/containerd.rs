//! containerd for tests and benchmarks: a private instance (its own root,
//! state and socket) and an OCI image archive to import into it.

use crate::{bin_dir, wait_for};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The runtime name containerd maps to `containerd-shim-banger-v2`.
pub const RUNTIME: &str = "io.containerd.banger.v2";

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
pub fn oci_archive(name: &str) -> Vec<u8> {
    oci_archive_with(name, &["sh"], "busybox")
}

/// Like [`oci_archive`], with `cmd` as the image's command and `marker`
/// in its `/etc/banger-image` (which image a process sees as its root).
pub fn oci_archive_with(name: &str, cmd: &[&str], marker: &str) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (scripts/install-deps installs it)");
    let mut l = tar::Builder::new(Vec::new());
    entry(&mut l, tar::EntryType::Directory, "bin", 0o755, b"");
    entry(&mut l, tar::EntryType::Regular, "bin/busybox", 0o755, &busybox);
    for applet in [
        "sh", "uname", "echo", "sleep", "cat", "env", "true", "ls", "hostname", "ip",
    ] {
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
    entry(
        &mut l,
        tar::EntryType::Regular,
        "etc/banger-image",
        0o644,
        format!("{marker}\n").as_bytes(),
    );
    let layer = l.into_inner().unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
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
pub struct Containerd {
    child: Child,
    /// Run inside the network namespace of this process (nsenter), so
    /// what CNI makes on the engine's side stays out of the host's.
    netns_of: Option<u32>,
    pub sock: PathBuf,
    pub log: PathBuf,
    cfg: PathBuf,
    env: Vec<(String, String)>,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its shims outlive it by design; a failed test must not leave them.
        for pid in self.shims("") {
            // SAFETY: a shim of this containerd (its -address names our socket).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Containerd {
    /// Started with banger's environment (`banger_env`), so the shims it
    /// starts reach that daemon, and the workspace's binaries first on PATH.
    /// Without its CRI plugin.
    pub fn start(dir: &Path, banger_env: &[(String, String)]) -> Containerd {
        Self::start_with(dir, banger_env, None, None)
    }

    /// With its CRI plugin (on the same socket, as a kubelet finds it):
    /// runtime handler `banger` is this shim, the pod sandbox image is
    /// `sandbox_image` (imported here beforehand, never pulled), and CNI
    /// configurations are read from `cni_conf` with Debian's plugins.
    /// With `netns_of`, containerd runs in that process's network namespace.
    pub fn start_cri(
        dir: &Path,
        banger_env: &[(String, String)],
        sandbox_image: &str,
        cni_conf: &Path,
        netns_of: Option<u32>,
    ) -> Containerd {
        let cri = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{sandbox_image}\"\n\
             \x20 stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
             \x20 disable_apparmor = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"banger\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.banger]\n  runtime_type = \"{RUNTIME}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{c}\"\n",
            c = cni_conf.display()
        );
        Self::start_with(dir, banger_env, Some(&cri), netns_of)
    }

    /// containerd with its configuration, in its namespace.
    fn command(cfg: &Path, env: &[(String, String)], netns_of: Option<u32>) -> Command {
        let mut c = match netns_of {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &pid.to_string(), "-n", "--", "containerd"]);
                c
            }
            None => Command::new("containerd"),
        };
        c.arg("--config")
            .arg(cfg)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    fn start_with(
        dir: &Path,
        banger_env: &[(String, String)],
        cri: Option<&str>,
        netns_of: Option<u32>,
    ) -> Containerd {
        let sock = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{r}\"\nstate = \"{s}\"\n{disabled}\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{o}\"\n{cri}",
                r = dir.join("root").display(),
                s = dir.join("state").display(),
                o = dir.join("opt").display(),
                sock = sock.display(),
                disabled = if cri.is_some() {
                    ""
                } else {
                    "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
                },
                cri = cri.unwrap_or_default(),
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
        let mut env = banger_env.to_vec();
        env.push(("PATH".into(), path));
        let child = Self::command(&cfg, &env, netns_of)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("containerd (scripts/install-deps installs it)");
        wait_for("containerd's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
        Containerd {
            child,
            netns_of,
            sock,
            log,
            cfg,
            env,
        }
    }

    /// Kills containerd with SIGKILL and starts it again on the same
    /// root, state and socket (its shims run on).
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        let out = std::fs::OpenOptions::new().append(true).open(&self.log).unwrap();
        let mut cmd = Self::command(&self.cfg, &self.env, self.netns_of);
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        self.child = cmd.spawn().expect("containerd");
        let sock = self.sock.clone();
        wait_for("containerd's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
    }

    /// The pids of this containerd's shims, of task `id` (all when empty).
    pub fn shims(&self, id: &str) -> Vec<u32> {
        let address = format!("-address\0{}\0", self.sock.display());
        crate::processes_mentioning(&address)
            .into_iter()
            .filter(|pid| {
                id.is_empty()
                    || std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&format!("-id\0{id}\0")))
            })
            .collect()
    }

    /// The task servers among [`Containerd::shims`]: the processes the
    /// shims' keepers run and restart (their `-socket` ends `.server`).
    pub fn task_servers(&self, id: &str) -> Vec<u32> {
        self.shims(id)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(".server\0"))
            })
            .collect()
    }

    /// A `ctr` command to run in the background.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.sock).args(["-n", "default"]).args(args);
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in("default", args)
    }

    /// `ctr` in containerd namespace `ns` (the CRI plugin's is `k8s.io`).
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}\n{}",
            text(&o),
            self.log_tail()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().rev().take(40).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
