//! QEMU `microvm`: the back-end for hosts without Firecracker or without a
//! KVM that can boot Linux. KVM when usable, TCG otherwise. The guest's
//! vsock is a vhost-user device served by `vhost-device-vsock`, whose host
//! side speaks Firecracker's hybrid-vsock protocol.

use crate::{process, LaunchFuture, LaunchSpec, Launched, Vmm, VmmError, VmmKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Qemu {
    pub qemu: PathBuf,
    pub bridge: PathBuf,
    pub kvm: bool,
}

/// The bridge binary's name.
pub const BRIDGE: &str = "banger-vsock-bridge";

impl Qemu {
    /// Locates the binaries; `qemu` overrides the PATH lookup, and `bridge`
    /// the lookup beside this executable, then on PATH.
    pub fn detect(qemu: Option<PathBuf>, bridge: Option<PathBuf>) -> Result<Self, VmmError> {
        let qemu = qemu
            .or_else(|| crate::which("qemu-system-x86_64"))
            .ok_or(VmmError::MissingBinary {
                what: "qemu-system-x86_64",
                path: "PATH".into(),
            })?;
        if !crate::is_executable(&qemu) {
            return Err(VmmError::MissingBinary {
                what: "qemu-system-x86_64",
                path: qemu,
            });
        }
        let bridge = bridge
            .or_else(|| crate::which(BRIDGE))
            .ok_or(VmmError::MissingBinary {
                what: BRIDGE,
                path: "PATH".into(),
            })?;
        Ok(Qemu {
            qemu,
            bridge,
            kvm: crate::kvm_usable(),
        })
    }

    /// The host's TSC frequency in kHz. Under TCG the guest's early TSC
    /// calibration against the PIT hangs; giving the frequency skips it.
    fn tsc_khz() -> u64 {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("cpu MHz"))
                    .and_then(|l| l.split(':').nth(1))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map(|mhz| (mhz * 1000.0) as u64)
            .unwrap_or(2_000_000)
    }

    pub fn args(&self, spec: &LaunchSpec, qmp: &Path, channel: &Path, serial: &Path) -> Vec<String> {
        // The agent serves the serial channel when asked to.
        let mut cmdline = format!("{} banger.channel=serial", spec.cmdline);
        if !self.kvm {
            cmdline.push_str(&format!(" tsc_early_khz={}", Self::tsc_khz()));
        }
        let mem = format!("{}M", spec.memory_mib);
        let mut a: Vec<String> = vec![
            "-M".into(),
            "microvm,acpi=on".into(),
            "-accel".into(),
            if self.kvm { "kvm" } else { "tcg" }.into(),
            "-cpu".into(),
            if self.kvm { "host" } else { "max" }.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            mem,
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-append".into(),
            cmdline,
        ];
        if let Some(initrd) = &spec.initrd {
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        for d in &spec.drives {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            a.extend([
                "-drive".into(),
                format!(
                    "id={},file={},format=raw,if=none,cache=unsafe{ro}",
                    d.id,
                    d.path.display()
                ),
                "-device".into(),
                format!("virtio-blk-device,drive={}", d.id),
            ]);
        }
        if let Some(n) = &spec.net {
            // The tap arrives as fd 3 (see launch), opened by the root helper.
            let backend = match &n.fd {
                Some(_) => "tap,id=net0,fd=3".to_string(),
                None => format!("tap,id=net0,ifname={},script=no,downscript=no,vnet_hdr=on", n.tap),
            };
            a.extend([
                "-netdev".into(),
                backend,
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", n.mac),
            ]);
        }
        a.extend([
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", channel.display()),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={}", banger_mux::PORT_NAME),
        ]);
        if spec.restore.is_some() {
            // The state arrives later, through QMP's `migrate-incoming`
            // (see `load_state`).
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a
    }
}

fn remove_stale(paths: &[&Path]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> LaunchFuture<'a> {
        Box::pin(self.start(spec))
    }
}

impl Qemu {
    /// [`Vmm::launch`]: QEMU, then the bridge to its agent channel; for a
    /// restore, the saved state loaded in between.
    async fn start(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        let dir = &spec.vm_dir;
        let marker = dir.display().to_string();
        if let Some(pid) = spec.prestarted {
            process::kill(pid, &marker).await;
        }
        let channel = dir.join("agent.serial");
        let uds = dir.join("vsock.sock");
        let qmp = dir.join("qmp.sock");
        let serial = dir.join("serial.log");
        let log = dir.join("vmm.log");
        remove_stale(&[&channel, &uds, &qmp, &serial]);
        crate::vsock::remove_port_sockets(dir);

        // QEMU opens its drives as it starts.
        crate::FillDrives::start(spec).done().await?;
        let mut qcmd = tokio::process::Command::new(&self.qemu);
        qcmd.args(self.args(spec, &qmp, &channel, &serial));
        if let Some(fd) = spec.net.as_ref().and_then(|n| n.fd.clone()) {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&*fd);
            // SAFETY: dup2/fcntl are async-signal-safe; `fd` outlives spawn.
            unsafe {
                qcmd.pre_exec(move || {
                    if raw == 3 {
                        let flags = libc::fcntl(3, libc::F_GETFD);
                        libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    } else if libc::dup2(raw, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let qpid = process::spawn_detached(&mut qcmd, None, &log, &marker)?;
        // The bridge waits for QEMU's chardev socket by itself.
        let mut bcmd = tokio::process::Command::new(&self.bridge);
        bcmd.arg("--serial").arg(&channel).arg("--uds").arg(&uds);
        if let Some(plan) = spec.restore.as_ref().and_then(|r| r.seed.as_ref()) {
            let answer = dir.join("seeded.json");
            let _ = std::fs::remove_file(&answer);
            bcmd.arg("--seed").arg(plan).arg("--seeded").arg(answer);
        }
        let bpid = match process::spawn_detached(&mut bcmd, None, &log, &marker) {
            Ok(p) => p,
            Err(e) => {
                process::kill(qpid, &marker).await;
                return Err(e);
            }
        };
        if let Some(r) = &spec.restore {
            if let Err(e) = load_state(&qmp, &r.state, qpid).await {
                process::kill(bpid, &marker).await;
                process::kill(qpid, &marker).await;
                return Err(e);
            }
        }
        Ok(Launched {
            kind: VmmKind::Qemu,
            pid: qpid,
            aux_pids: vec![bpid],
            api_socket: qmp,
            vsock_uds: uds,
            serial_log: serial,
        })
    }
}

/// Loads a saved state into a QEMU started with `-incoming defer`, through
/// a Unix socket QEMU listens on (see [`crate::pause::snapshot_qemu`]),
/// and runs the VM. `pid` is the QEMU just started: while its QMP socket
/// comes up it is only checked to be running, because a process caught in
/// its exec shows no environment yet, so no marker (see
/// [`process::running`]).
pub async fn load_state(qmp: &Path, state: &Path, pid: u32) -> Result<(), VmmError> {
    let end = Instant::now() + Duration::from_secs(10);
    let mut q = loop {
        match crate::qmp::Qmp::connect(qmp).await {
            Ok(q) => break q,
            Err(e) if !process::running(pid) || Instant::now() > end => {
                return Err(VmmError::Failed(format!(
                    "QEMU's QMP socket did not come up: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    let sock = qmp.with_file_name("incoming.sock");
    let _ = std::fs::remove_file(&sock);
    q.migration_events().await?;
    q.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": format!("unix:{}", sock.display()) })),
    )
    .await?;
    let input =
        std::fs::File::open(state).map_err(|e| VmmError::io(format!("opening {}", state.display()), e))?;
    let feed_sock = sock.clone();
    let feeder = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut conn = std::os::unix::net::UnixStream::connect(&feed_sock)?;
        let mut input = input;
        std::io::copy(&mut input, &mut conn)
    });
    let loaded = q.wait_migration(Duration::from_secs(120)).await;
    let _ = std::fs::remove_file(&sock);
    // On failure the caller kills QEMU, which ends the feeder's write.
    loaded?;
    let fed = feeder.await;
    match fed {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(VmmError::io(format!("feeding {}", state.display()), e)),
        Err(e) => return Err(VmmError::Failed(format!("feeding {}: {e}", state.display()))),
    }
    q.execute("cont", None).await.map(drop)
}
