//! QEMU `microvm`: the back-end for hosts without Firecracker or without a
//! KVM that can boot Linux. KVM when usable, TCG otherwise. The guest's
//! vsock is a vhost-user device served by `vhost-device-vsock`, whose host
//! side speaks Firecracker's hybrid-vsock protocol.

use crate::{process, LaunchFuture, LaunchSpec, Launched, Vmm, VmmError, VmmKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Qemu {
    pub qemu: PathBuf,
    pub vhost_vsock: PathBuf,
    pub kvm: bool,
}

impl Qemu {
    /// Locates the binaries; `qemu` overrides the PATH lookup, and
    /// `vhost_vsock` the lookup through `$BANGER_VHOST_VSOCK`, then PATH.
    pub fn detect(qemu: Option<PathBuf>, vhost_vsock: Option<PathBuf>) -> Result<Self, VmmError> {
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
        let vhost_vsock = vhost_vsock
            .or_else(|| std::env::var_os("BANGER_VHOST_VSOCK").map(PathBuf::from))
            .or_else(|| crate::which("vhost-device-vsock"))
            .ok_or(VmmError::MissingBinary {
                what: "vhost-device-vsock",
                path: "PATH".into(),
            })?;
        Ok(Qemu {
            qemu,
            vhost_vsock,
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

    pub fn args(&self, spec: &LaunchSpec, qmp: &Path, vhost: &Path, serial: &Path) -> Vec<String> {
        let mut cmdline = spec.cmdline.clone();
        if !self.kvm {
            cmdline.push_str(&format!(" tsc_early_khz={}", Self::tsc_khz()));
        }
        let mem = format!("{}M", spec.memory_mib);
        let mut a: Vec<String> = vec![
            "-M".into(),
            "microvm,acpi=on,memory-backend=mem".into(),
            "-accel".into(),
            if self.kvm { "kvm" } else { "tcg" }.into(),
            "-cpu".into(),
            if self.kvm { "host" } else { "max" }.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            mem.clone(),
            "-object".into(),
            // vhost-user needs guest RAM in a shareable fd.
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
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
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", vhost.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock0".into(),
        ]);
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
    /// [`Vmm::launch`]: vhost-device-vsock, then QEMU.
    async fn start(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        if spec.restore.is_some() {
            return Err(VmmError::Failed(crate::QEMU_NO_SNAPSHOTS.into()));
        }
        let dir = &spec.vm_dir;
        let marker = dir.display().to_string();
        let vhost = dir.join("vhost-vsock.sock");
        let uds = dir.join("vsock.sock");
        let qmp = dir.join("qmp.sock");
        let serial = dir.join("serial.log");
        let log = dir.join("vmm.log");
        remove_stale(&[&vhost, &uds, &qmp, &serial]);
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vsock.sock_") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }

        // The vhost-user backend must be listening before QEMU connects.
        let mut vcmd = tokio::process::Command::new(&self.vhost_vsock);
        vcmd.arg("--guest-cid")
            .arg(spec.vsock_cid.to_string())
            .arg("--socket")
            .arg(&vhost)
            .arg("--uds-path")
            .arg(&uds)
            // Larger than the 64 KiB default: bulk transfers (workspaces)
            // need fewer credit round trips with the guest.
            .arg("--tx-buffer-size")
            .arg((1u32 << 20).to_string());
        let vpid = process::spawn_detached(&mut vcmd, &log, &marker)?;
        let end = Instant::now() + Duration::from_secs(10);
        while !vhost.exists() {
            if !process::alive(vpid, &marker) || Instant::now() > end {
                process::kill(vpid, &marker).await;
                return Err(VmmError::Failed(format!(
                    "vhost-device-vsock did not create {} (see {})",
                    vhost.display(),
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let mut qcmd = tokio::process::Command::new(&self.qemu);
        qcmd.args(self.args(spec, &qmp, &vhost, &serial));
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
        let qpid = match process::spawn_detached(&mut qcmd, &log, &marker) {
            Ok(p) => p,
            Err(e) => {
                process::kill(vpid, &marker).await;
                return Err(e);
            }
        };
        Ok(Launched {
            kind: VmmKind::Qemu,
            pid: qpid,
            aux_pids: vec![vpid],
            api_socket: qmp,
            vsock_uds: uds,
            serial_log: serial,
        })
    }
}
