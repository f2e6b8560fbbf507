//! A test harness that runs the real binaries. Each [`Env`] gets its own
//! state and runtime directories and its own root helper, started inside a
//! fresh network namespace so that bridges and taps it creates can never
//! touch the host's network and vanish with it.
//!
//! The binaries must be built first (`cargo build --workspace`); the test
//! command in the README does that.

pub mod containerd;

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (next to `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // A test runs from `deps/`; a benchmark binary sits beside banger's.
    let here = exe.parent().expect("exe dir");
    let dir = if here.join("banger").exists() {
        here.to_path_buf()
    } else {
        here.parent().expect("target dir").to_path_buf()
    };
    for b in ["banger", "bangerd", "banger-helper"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo build --workspace` first",
            dir.join(b).display()
        );
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `f` until it returns `Some`, failing the test at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub helper: Option<Child>,
    /// Run every banger command inside the helper's network namespace, so
    /// the whole stack (daemon, DNS, ssh) lives there.
    pub in_netns: bool,
}

impl Env {
    /// A fresh environment with a helper in its own network namespace.
    pub fn new() -> Env {
        let mut env = Env::without_helper();
        env.start_helper();
        env
    }

    /// A fresh environment with no helper running.
    pub fn without_helper() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("banger-e2e")
            .tempdir()
            .expect("tempdir");
        // Traversable by the unprivileged callers some tests impersonate.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Env {
            dir,
            helper: None,
            in_netns: false,
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn helper_socket(&self) -> PathBuf {
        self.dir.path().join("helper.sock")
    }

    pub fn daemon_socket(&self) -> PathBuf {
        self.runtime().join("bangerd.sock")
    }

    pub fn helper_log(&self) -> PathBuf {
        self.dir.path().join("helper.log")
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.home().join("logs/bangerd.log")
    }

    /// A fresh environment whose daemon knows the shared default image.
    pub fn with_image() -> Env {
        let env = Env::new();
        let (rootfs, kernel) = shared_image();
        env.banger_ok(&[
            "image", "register", "default", "--rootfs", &rootfs, "--kernel", &kernel,
        ]);
        env
    }

    /// Creates and starts a small VM (1 vCPU, 512 MiB, 128 MiB work disk).
    pub fn create_small(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "vm",
            "create",
            "--name",
            name,
            "--vcpus",
            "1",
            "--memory",
            "512",
            "--disk-size",
            "128",
        ];
        args.extend_from_slice(extra);
        self.banger_ok(&args)
    }

    /// `banger vm show NAME --json`.
    pub fn vm(&self, name: &str) -> Value {
        serde_json::from_str(&self.banger_ok(&["vm", "show", name, "--json"])).expect("vm show --json")
    }

    /// The VM's address without its prefix length.
    pub fn guest_ip(&self, name: &str) -> String {
        let v = self.vm(name);
        let ip = v["guest_ip"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no address: {v}"));
        ip.split('/').next().unwrap().to_string()
    }

    /// kill -9 of the daemon; returns once it is gone, with its pid.
    pub fn kill_daemon(&self) -> u32 {
        let pid = self.daemon_pid().expect("a running daemon");
        // SAFETY: the daemon this environment started (its pid file is private).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        // SAFETY: signal 0 only probes.
        wait_for("the killed daemon to die", Duration::from_secs(5), || {
            (unsafe { libc::kill(pid as i32, 0) } != 0).then_some(())
        });
        pid
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.home().join("vms")
    }

    /// Processes that belong to this environment's VMs: those that name
    /// the VM directory, and jailed VMMs (`--id <vm id>`, their only trace:
    /// the jailer clears their environment and they name nothing outside
    /// the jail). Not the spare Firecracker, which is no VM's yet.
    pub fn vm_processes(&self) -> Vec<u32> {
        let spares = self.spare_processes();
        let mut pids = processes_mentioning(&self.vms_dir().display().to_string());
        for e in std::fs::read_dir(self.vms_dir()).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            pids.extend(processes_mentioning(&format!("--id\u{0}{id}\u{0}")));
        }
        pids.retain(|p| !spares.contains(p));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The directories of spare Firecrackers: made for a VM that has not
    /// taken them yet (they hold a `spare` file).
    pub fn spare_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.vms_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|d| d.join("spare").is_file())
            .collect()
    }

    /// The processes of [`Env::spare_dirs`].
    pub fn spare_processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .spare_dirs()
            .iter()
            .flat_map(|d| processes_mentioning(&format!("{}/", d.display())))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub fn start_helper(&mut self) {
        self.helper = Some(spawn_helper(&self.helper_socket(), 0, &self.helper_log()));
    }

    pub fn helper_pid(&self) -> u32 {
        self.helper.as_ref().expect("helper").id()
    }

    /// Like [`Env::with_image`], with the whole stack inside the helper's
    /// network namespace (loopback up).
    pub fn with_image_in_netns() -> Env {
        let mut env = Env::new();
        let up = env.in_helper_ns("ip", &["link", "set", "lo", "up"]);
        assert!(up.status.success());
        env.in_netns = true;
        let (rootfs, kernel) = shared_image();
        env.banger_ok(&[
            "image", "register", "default", "--rootfs", &rootfs, "--kernel", &kernel,
        ]);
        env
    }

    /// A command run in this environment's network namespace when it has one.
    pub fn netns_cmd(&self, prog: &std::ffi::OsStr) -> Command {
        if self.in_netns {
            let mut c = Command::new("nsenter");
            c.arg("-t")
                .arg(self.helper_pid().to_string())
                .arg("-n")
                .arg("--")
                .arg(prog);
            c
        } else {
            Command::new(prog)
        }
    }

    /// A command for one of the binaries with this environment applied.
    /// The variables that point a banger process at this environment.
    pub fn banger_env(&self) -> Vec<(String, String)> {
        let p = |p: PathBuf| p.display().to_string();
        vec![
            ("BANGER_HOME".into(), p(self.home())),
            ("BANGER_RUNTIME_DIR".into(), p(self.runtime())),
            ("BANGER_HELPER_SOCKET".into(), p(self.helper_socket())),
            ("BANGER_HELPER_AUTOSTART".into(), "0".into()),
            ("BANGER_DNS_LISTEN".into(), "127.0.0.1:0".into()),
        ]
    }

    pub fn cmd(&self, bin_name: &str) -> Command {
        let mut c = self.netns_cmd(bin(bin_name).as_os_str());
        c.env("BANGER_HOME", self.home())
            .env("BANGER_RUNTIME_DIR", self.runtime())
            .env("BANGER_HELPER_SOCKET", self.helper_socket())
            .env("BANGER_HELPER_AUTOSTART", "0")
            // Each test's DNS server on its own free port.
            .env("BANGER_DNS_LISTEN", "127.0.0.1:0")
            .env_remove("BANGER_LOG_LEVEL")
            .stdin(Stdio::null());
        c
    }

    pub fn banger(&self, args: &[&str]) -> Output {
        self.cmd("banger").args(args).output().expect("run banger")
    }

    /// Runs banger and asserts it succeeded; returns stdout.
    pub fn banger_ok(&self, args: &[&str]) -> String {
        let out = self.banger(args);
        assert!(
            out.status.success(),
            "banger {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends raw bytes to the daemon and returns the frames it answered.
    pub fn raw_daemon(&self, bytes: &[u8]) -> Vec<Value> {
        raw_exchange(&self.daemon_socket(), bytes)
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.runtime().join("bangerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn daemon_records(&self) -> Vec<Value> {
        json_lines(&self.daemon_log())
    }

    pub fn helper_records(&self) -> Vec<Value> {
        json_lines(&self.helper_log())
    }

    /// Runs a program inside the helper's network namespace, where the
    /// bridge, the taps and the NAT rules live.
    pub fn in_helper_ns(&self, prog: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.helper_pid().to_string())
            .arg("-n")
            .arg(prog)
            .args(args)
            .output()
            .expect("nsenter")
    }

    /// The DNS server's address as `(ip, port)`.
    pub fn dns(&self) -> (String, String) {
        let st: Value = serde_json::from_str(&self.banger_ok(&["daemon", "status", "--json"])).unwrap();
        let addr = st["dns"].as_str().expect("the DNS server runs").to_string();
        let (ip, port) = addr.rsplit_once(':').unwrap();
        (ip.to_string(), port.to_string())
    }

    /// `dig +short` against banger's DNS server.
    pub fn dig(&self, name: &str) -> String {
        let (ip, port) = self.dns();
        let out = self
            .netns_cmd("dig".as_ref())
            .args([
                "+short",
                "+time=2",
                "+tries=1",
                &format!("@{ip}"),
                "-p",
                &port,
                name,
            ])
            .output()
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `ip` inside the helper's network namespace.
    pub fn ip_in_helper_ns(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.helper_pid().to_string())
            .arg("-n")
            .arg("ip")
            .args(args)
            .output()
            .expect("nsenter ip")
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

/// Every live process whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                == Some("Z");
            !zombie
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(needle))
                    .unwrap_or(false)
        })
        .collect()
}

/// Starts a root helper serving `owner_uid` on `socket`, in a network
/// namespace of its own (so its bridge, taps and rules touch nothing
/// else), and waits until it accepts connections.
/// Makes `cmd` start in a network namespace of its own, so bridges and
/// taps it makes never touch the host's network and vanish with it.
pub fn in_private_netns(cmd: &mut Command) {
    // SAFETY: unshare is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn spawn_helper(socket: &Path, owner_uid: u32, log: &Path) -> std::process::Child {
    let mut cmd = Command::new(bin("banger-helper"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--owner-uid")
        .arg(owner_uid.to_string())
        .arg("--log-file")
        .arg(log)
        .stdin(Stdio::null());
    in_private_netns(&mut cmd);
    let child = cmd.spawn().expect("spawn banger-helper");
    wait_for("the helper socket", Duration::from_secs(10), || {
        UnixStream::connect(socket).ok()
    });
    child
}

/// The default image, built once per machine and shared by every test
/// environment through `banger image register` (the rootfs is used in
/// place, never copied). Returns (rootfs path, kernel directory).
pub fn shared_image() -> (String, String) {
    static CACHE: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| {
            // Bump the suffix when the image recipe changes.
            let root = bin_dir().join("banger-e2e-cache-v2");
            std::fs::create_dir_all(&root).unwrap();
            // Serialise builders across test binaries running at once.
            let lock = std::fs::File::create(root.join("lock")).unwrap();
            // SAFETY: flock on a descriptor we own.
            assert_eq!(
                unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
                0
            );
            let run = |args: &[&str]| {
                let out = Command::new(bin("banger"))
                    .env("BANGER_HOME", root.join("home"))
                    .env("BANGER_RUNTIME_DIR", root.join("run"))
                    .env("BANGER_HELPER_SOCKET", root.join("no-helper.sock"))
                    .env("BANGER_HELPER_AUTOSTART", "0")
                    .args(args)
                    .stdin(Stdio::null())
                    .output()
                    .expect("run banger");
                assert!(
                    out.status.success(),
                    "banger {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let info: Value = serde_json::from_str(&run(&["image", "build", "--json"])).unwrap();
            run(&["daemon", "stop"]);
            (
                info["rootfs"].as_str().unwrap().to_string(),
                info["kernel"].as_str().unwrap().to_string(),
            )
        })
        .clone()
}

impl Drop for Env {
    fn drop(&mut self) {
        // Whatever a failed test left running (VMMs, vsock backends) dies
        // with its environment.
        let marker = self.dir.path().display().to_string();
        for pid in processes_mentioning(&marker)
            .into_iter()
            .chain(self.vm_processes())
        {
            // SAFETY: only processes whose command line names this test's private directory.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(pid) = self.daemon_pid() {
            // SAFETY: signalling a pid we started; a stale pid is harmless
            // here because the pid file lives in this test's private dir.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(mut h) = self.helper.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// Writes `bytes`, half-closes, and reads every frame until EOF.
pub fn raw_exchange(sock: &Path, bytes: &[u8]) -> Vec<Value> {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before taking all of an oversize
    // frame, so a failed write is not an error here; the answer is.
    let _ = s.write_all(bytes);
    // Not shutting down the write side: the server treats a hang-up as a
    // cancelled request. It answers and closes on its own.
    let mut frames = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.expect("read (timed out?)");
        frames.push(serde_json::from_str(&line).expect("server wrote JSON"));
    }
    frames
}

pub fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("non-JSON log line in {}: {e}: {l}", path.display()))
        })
        .collect()
}
