//! Firecracker: the production back-end on hosts with a usable KVM.
//!
//! The process is started with its API socket, log and metrics files on
//! its command line, its standard output the guest's console; everything
//! else is configured through its REST API. The sequence of calls is
//! computed by [`plan`] as typed bodies, so a test can check every body
//! banger sends against Firecracker's own API description.

use crate::{process, LaunchFuture, LaunchSpec, Launched, Vmm, VmmError, VmmKind};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Request bodies, named after the API description's definitions.
pub mod api {
    use serde::Serialize;

    #[derive(Debug, Clone, Serialize)]
    pub struct MachineConfiguration {
        pub vcpu_count: u32,
        pub mem_size_mib: u32,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct BootSource {
        pub kernel_image_path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub initrd_path: Option<String>,
        pub boot_args: String,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct Drive {
        pub drive_id: String,
        pub path_on_host: String,
        pub is_root_device: bool,
        pub is_read_only: bool,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct Vsock {
        pub guest_cid: u32,
        pub uds_path: String,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct NetworkInterface {
        pub iface_id: String,
        pub host_dev_name: String,
        pub guest_mac: String,
    }

    #[derive(Debug, Clone, Serialize)]
    pub struct InstanceActionInfo {
        pub action_type: String,
    }
}

/// One API call: method, path, body, and the API definition the body
/// must satisfy.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: &'static str,
    pub path: String,
    pub definition: &'static str,
    pub body: serde_json::Value,
}

impl Call {
    /// Firecracker's answer to this call, as an error unless it is a 2xx.
    pub fn accepted(self, (status, body): (u16, String)) -> Result<(), VmmError> {
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err(VmmError::Api {
            method: self.method.into(),
            path: self.path,
            status,
            body,
        })
    }
}

fn call<T: Serialize>(path: impl Into<String>, definition: &'static str, body: &T) -> Call {
    Call {
        method: "PUT",
        path: path.into(),
        definition,
        body: serde_json::to_value(body).expect("API bodies serialise"),
    }
}

/// The files a Firecracker VM uses inside its directory.
pub struct Paths {
    pub api: PathBuf,
    pub vsock: PathBuf,
    pub log: PathBuf,
    pub metrics: PathBuf,
    pub serial: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Self {
        Paths {
            api: dir.join("firecracker.sock"),
            vsock: dir.join("vsock.sock"),
            log: dir.join("firecracker.log"),
            metrics: dir.join("metrics.json"),
            serial: dir.join("serial.log"),
        }
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every API call that configures and starts `spec`, in order.
pub fn plan(spec: &LaunchSpec, p: &Paths) -> Vec<Call> {
    // The logger and metrics are set on the command line ([`log_args`]),
    // and the console is Firecracker's standard output: three round trips
    // fewer on every start.
    let mut calls = vec![
        call(
            "/machine-config",
            "MachineConfiguration",
            &api::MachineConfiguration {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
            },
        ),
        call(
            "/boot-source",
            "BootSource",
            &api::BootSource {
                kernel_image_path: s(&spec.kernel),
                initrd_path: spec.initrd.as_deref().map(s),
                // Firecracker has no ACPI power-off: the guest resets instead.
                boot_args: format!("{} banger.halt=reboot", spec.cmdline),
            },
        ),
    ];
    for d in &spec.drives {
        calls.push(call(
            format!("/drives/{}", d.id),
            "Drive",
            &api::Drive {
                drive_id: d.id.clone(),
                path_on_host: s(&d.path),
                is_root_device: false,
                is_read_only: d.read_only,
            },
        ));
    }
    // The VM's tap, opened by Firecracker itself by name: it must exist in
    // Firecracker's network namespace and be owned by its uid (the helper
    // creates it persistent, owned by the daemon's user). The guest's
    // address is static (kernel command line), so only the MAC is given.
    if let Some(net) = &spec.net {
        calls.push(call(
            "/network-interfaces/eth0",
            "NetworkInterface",
            &api::NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: net.tap.clone(),
                guest_mac: net.mac.clone(),
            },
        ));
    }
    calls.push(call(
        "/vsock",
        "Vsock",
        &api::Vsock {
            guest_cid: spec.vsock_cid,
            uds_path: s(&p.vsock),
        },
    ));
    calls.push(call(
        "/actions",
        "InstanceActionInfo",
        &api::InstanceActionInfo {
            action_type: "InstanceStart".into(),
        },
    ));
    calls
}

/// Firecracker's arguments that set its log and metrics files, `p` as it
/// names them: what `PUT /logger` and `PUT /metrics` would set, without
/// the round trips.
pub fn log_args(p: &Paths) -> Vec<std::ffi::OsString> {
    vec![
        "--log-path".into(),
        p.log.clone().into_os_string(),
        "--level".into(),
        "Info".into(),
        "--show-level".into(),
        "--metrics-path".into(),
        p.metrics.clone().into_os_string(),
    ]
}

/// The call that brings a VM back from snapshot `r` instead of booting
/// it (log, metrics and console are set as the process starts): the
/// load, which resumes the guest on this VM's own tap and vsock socket.
/// Machine, kernel and drives come from the snapshot: the drives are
/// opened at the paths they had when it was taken, which is why they are
/// always given to Firecracker by a name relative to the VM's own
/// directory (see [`drive_links`]).
pub fn restore_plan(spec: &LaunchSpec, p: &Paths, r: &crate::Restore) -> Vec<Call> {
    let mut load = serde_json::json!({
        "snapshot_path": s(&r.state),
        "mem_backend": { "backend_type": "File", "backend_path": s(&r.memory) },
        "resume_vm": true,
        "vsock_override": { "uds_path": s(&p.vsock) },
    });
    if let Some(net) = &spec.net {
        load["network_overrides"] = serde_json::json!([{ "iface_id": "eth0", "host_dev_name": net.tap }]);
    }
    vec![Call {
        method: "PUT",
        path: "/snapshot/load".into(),
        definition: "SnapshotLoadParams",
        body: load,
    }]
}

/// The call that writes a paused VM's full snapshot to `state` and
/// `memory` (paths as Firecracker sees them).
pub fn snapshot_call(state: &Path, memory: &Path) -> Call {
    Call {
        method: "PUT",
        path: "/snapshot/create".into(),
        definition: "SnapshotCreateParams",
        body: serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": s(state),
            "mem_file_path": s(memory),
        }),
    }
}

/// Gives each drive a name in `dir` (`drive-<id>`, a symlink to its file)
/// and returns the drives by those relative names. Firecracker runs in
/// `dir`, so a snapshot records names that a VM restored elsewhere
/// resolves to its own copies, never the original VM's disks.
pub fn drive_links(dir: &Path, drives: &[crate::Drive]) -> Result<Vec<crate::Drive>, VmmError> {
    drives
        .iter()
        .map(|d| {
            let name = format!("drive-{}", d.id);
            let link = dir.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&d.path, &link)
                .map_err(|e| VmmError::io(format!("linking {}", link.display()), e))?;
            Ok(crate::Drive {
                path: PathBuf::from(name),
                ..d.clone()
            })
        })
        .collect()
}

/// A minimal HTTP/1.1 client for the API socket: requests in sequence on
/// one kept-alive connection, bodies sized by Content-Length.
pub struct ApiConn {
    stream: UnixStream,
}

impl ApiConn {
    pub async fn connect(sock: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(sock)
            .await
            .map_err(|e| VmmError::io(format!("connecting to {}", sock.display()), e))?;
        Ok(ApiConn { stream })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), VmmError> {
        let s = &mut self.stream;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let io = |e| VmmError::io(format!("Firecracker API {method} {path}"), e);
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head_end, content_len) = loop {
            let n = s.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err(VmmError::Failed(format!(
                    "Firecracker closed the API connection during {method} {path}"
                )));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (pos + 4, len);
            }
        };
        while buf.len() < head_end + content_len {
            let n = s.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let status_line = String::from_utf8_lossy(&buf[..head_end])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body =
            String::from_utf8_lossy(&buf[head_end..(head_end + content_len).min(buf.len())]).into_owned();
        Ok((status, body))
    }
}

/// One request on a connection of its own.
pub async fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String), VmmError> {
    ApiConn::connect(sock).await?.send(method, path, body).await
}

/// A Firecracker process about to be started: its files on the host and
/// as it names them (the same, or inside its jail), the spec as it sees
/// it, and its command.
struct Prepared {
    host: Paths,
    inside: Paths,
    spec: LaunchSpec,
    cmd: tokio::process::Command,
}

/// A Firecracker process whose API socket is up.
struct Spawned {
    pid: u32,
    host: Paths,
    inside: Paths,
    spec: LaunchSpec,
}

pub struct Firecracker {
    pub binary: PathBuf,
    /// Started through the jailer when set.
    pub jail: Option<crate::jailer::JailConfig>,
}

impl Firecracker {
    /// Locates the binary; `binary` overrides the PATH lookup.
    pub fn detect(
        binary: Option<PathBuf>,
        jail: Option<crate::jailer::JailConfig>,
    ) -> Result<Self, VmmError> {
        let binary = binary
            .or_else(|| crate::which("firecracker"))
            .ok_or(VmmError::MissingBinary {
                what: "firecracker",
                path: "PATH".into(),
            })?;
        if !crate::is_executable(&binary) {
            return Err(VmmError::MissingBinary {
                what: "firecracker",
                path: binary,
            });
        }
        if let Some(j) = &jail {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err(VmmError::Failed(
                    "Firecracker's jailer must be started by root: run bangerd as root, or unset `jailer`"
                        .into(),
                ));
            }
            if !crate::is_executable(&j.binary) {
                return Err(VmmError::MissingBinary {
                    what: "jailer",
                    path: j.binary.clone(),
                });
            }
        }
        Ok(Firecracker { binary, jail })
    }

    /// Sends the plan (or, for a restore, the restore plan) over the API
    /// socket at `api` (on the host); `paths` are the files as Firecracker
    /// names them (inside its jail, if any).
    async fn configure(&self, api: &Path, spec: &LaunchSpec, paths: &Paths) -> Result<(), VmmError> {
        let mut api = ApiConn::connect(api).await?;
        let calls = match &spec.restore {
            Some(r) => restore_plan(spec, paths, r),
            None => plan(spec, paths),
        };
        for c in calls {
            let answer = api.send(c.method, &c.path, Some(&c.body)).await?;
            c.accepted(answer)?;
        }
        Ok(())
    }
}

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> LaunchFuture<'a> {
        Box::pin(self.start(spec))
    }
}

impl Firecracker {
    /// [`Vmm::launch`]: the process, then its configuration over the API.
    async fn start(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        if !crate::is_executable(&self.binary) {
            return Err(VmmError::MissingBinary {
                what: "firecracker",
                path: self.binary.clone(),
            });
        }
        let filling = crate::FillDrives::start(spec);
        let dir = &spec.vm_dir;
        let marker = dir.display().to_string();
        let Spawned {
            pid,
            host,
            inside,
            spec: seen,
        } = self.spawn(spec, filling).await?;
        if let Err(e) = self.configure(&host.api, &seen, &inside).await {
            process::kill(pid, &marker).await;
            let _ = std::fs::remove_file(&host.api);
            let _ = std::fs::remove_file(&host.vsock);
            crate::jailer::cleanup(dir).await;
            return Err(e);
        }
        Ok(Launched {
            kind: VmmKind::Firecracker,
            pid,
            aux_pids: vec![],
            api_socket: host.api,
            vsock_uds: host.vsock,
            serial_log: host.serial,
        })
    }

    /// Starts the process (or takes the one started ahead of need) and
    /// waits for its API socket; `filling` ends before it returns.
    async fn spawn(&self, spec: &LaunchSpec, mut filling: crate::Filling) -> Result<Spawned, VmmError> {
        let dir = &spec.vm_dir;
        let marker = dir.display().to_string();
        let handed = match spec.prestarted {
            Some(pid) if self.jail.is_none() && process::alive(pid, &marker) => Some(pid),
            Some(pid) => {
                process::kill(pid, &marker).await;
                None
            }
            None => None,
        };
        // Firecracker's files as it names them, and where they are on the
        // host: the same in the VM directory, or its jail's root.
        let prepared = match &self.jail {
            None => drive_links(dir, &spec.drives).map(|drives| {
                let paths = Paths::new(dir);
                Prepared {
                    host: Paths::new(dir),
                    cmd: self.command(&paths, dir),
                    inside: paths,
                    spec: LaunchSpec {
                        drives,
                        ..spec.clone()
                    },
                }
            }),
            // The jail links the drives: they are filled first.
            Some(jail) => match filling.done().await {
                Ok(()) => self.prepare_jailed(spec, jail),
                Err(e) => Err(e),
            },
        };
        let spawned = match (prepared, handed) {
            // Up and waiting since its start: only the configuration is
            // left.
            (Ok(p), Some(pid)) => Ok(Spawned {
                pid,
                host: p.host,
                inside: p.inside,
                spec: p.spec,
            }),
            (Ok(p), None) => self.spawn_prepared(dir, p).await,
            (Err(e), handed) => {
                if let Some(pid) = handed {
                    process::kill(pid, &marker).await;
                }
                Err(e)
            }
        };
        // Firecracker opens its drives only when told to (a boot's drive
        // calls, a restore's load): the fill had until now.
        let filled = filling.done().await;
        match (spawned, filled) {
            (Ok(s), Ok(())) => Ok(s),
            (Ok(s), Err(e)) => {
                process::kill(s.pid, &marker).await;
                Err(e)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Firecracker's command without a jail: run in `dir`, its files `p`.
    fn command(&self, p: &Paths, dir: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("--api-sock")
            .arg(&p.api)
            .args(log_args(p))
            .current_dir(dir);
        cmd
    }

    /// Starts Firecracker in `dir`, unconfigured, and waits for its API
    /// socket: a process that a launch in that same directory later takes
    /// ([`LaunchSpec::prestarted`]) and only configures, so that a start or
    /// a restore does not wait the 1.5-2.5 ms Firecracker takes to open its
    /// socket. It is marked as `dir`'s VM's, like one the launch starts.
    /// Returns its PID. Not with a jail: the jail is made for its VM.
    pub async fn prestart(&self, dir: &Path) -> Result<u32, VmmError> {
        if self.jail.is_some() {
            return Err(VmmError::Failed(
                "a jailed Firecracker cannot be started ahead of its VM".into(),
            ));
        }
        let paths = Paths::new(dir);
        let cmd = self.command(&paths, dir);
        self.start_process(dir, &paths, cmd).await
    }

    /// The jail for `spec` (its files linked in), and the jailer's command.
    fn prepare_jailed(
        &self,
        spec: &LaunchSpec,
        jail: &crate::jailer::JailConfig,
    ) -> Result<Prepared, VmmError> {
        let layout = crate::jailer::layout(&spec.vm_dir, &self.binary)?;
        let uid = jail.uid(spec.vsock_cid);
        let jailed = crate::jailer::prepare(spec, &self.binary, &layout, uid)?;
        let netns = spec.net.as_ref().and_then(|n| n.netns.as_deref());
        Ok(Prepared {
            host: Paths::new(&layout.root),
            inside: Paths::new(Path::new("/")),
            spec: jailed,
            cmd: crate::jailer::command(jail, &self.binary, &layout, uid, spec.memory_mib, netns),
        })
    }

    /// [`Self::spawn`] once the command is made.
    async fn spawn_prepared(&self, dir: &Path, p: Prepared) -> Result<Spawned, VmmError> {
        let Prepared {
            host,
            inside,
            spec,
            cmd,
        } = p;
        let pid = self.start_process(dir, &host, cmd).await?;
        Ok(Spawned {
            pid,
            host,
            inside,
            spec,
        })
    }

    /// Runs `cmd` as `dir`'s VM's Firecracker, its files on the host
    /// `host`, until its API socket answers.
    async fn start_process(
        &self,
        dir: &Path,
        host: &Paths,
        mut cmd: tokio::process::Command,
    ) -> Result<u32, VmmError> {
        let marker = dir.display().to_string();
        // Firecracker leaves its sockets behind when it exits, and refuses
        // to start over a stale one.
        for f in [&host.api, &host.vsock] {
            let _ = std::fs::remove_file(f);
        }
        crate::vsock::remove_port_sockets(dir);
        if self.jail.is_none() {
            for f in [&host.log, &host.metrics] {
                std::fs::File::create(f).map_err(|e| VmmError::io(format!("creating {}", f.display()), e))?;
            }
        }
        let vmm_log = dir.join("vmm.log");
        // The guest's console is Firecracker's standard output: the serial
        // log, without a `PUT /serial` round trip.
        let pid = process::spawn_detached(&mut cmd, Some(&host.serial), &vmm_log, &marker)?;
        let end = Instant::now() + Duration::from_secs(10);
        let mut poll = Duration::from_micros(250);
        loop {
            if UnixStream::connect(&host.api).await.is_ok() {
                break;
            }
            // The child just started is simply watched: a jailer is
            // recognised as the VM's only once in its jail, and a process
            // caught in its exec shows no marker yet.
            if !process::running(pid) || Instant::now() > end {
                process::kill(pid, &marker).await;
                crate::jailer::cleanup(dir).await;
                let log = std::fs::read_to_string(&vmm_log).unwrap_or_default();
                return Err(VmmError::Failed(format!(
                    "firecracker did not open its API socket: {}",
                    log.trim()
                )));
            }
            // Firecracker opens its socket about 1-2 ms after its start:
            // polled finely at first, so the start is not rounded up.
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(2));
        }
        Ok(pid)
    }
}
