//! Which VMM boots a VM, whether it is installed, and what it is launched
//! with: kernel, initramfs, command line, drives, vsock CID.
//!
//! Kept apart from `boot` so the back-end specifics (QEMU vs Firecracker,
//! kernel flavours) sit in one place and `boot` only orchestrates.

use super::VmService;
use crate::initramfs;
use crate::kernel;
use banger_proto::RpcError;
use banger_store::VmRecord;
use banger_vmm::{BackendPaths, Drive, LaunchSpec, Launched, Vmm, VmmKind};
use std::path::{Path, PathBuf};

impl VmService {
    /// Resolves `auto` to a back-end that can really boot here.
    pub fn resolve_vmm(&self) -> Result<VmmKind, RpcError> {
        match self.settings.vmm.as_str() {
            "qemu" => Ok(VmmKind::Qemu),
            "firecracker" => Ok(VmmKind::Firecracker),
            _ => {
                if self.firecracker_binary().is_some() && banger_vmm::kvm_usable() {
                    Ok(VmmKind::Firecracker)
                } else {
                    Ok(VmmKind::Qemu)
                }
            }
        }
    }

    /// The Firecracker configured, else the one on PATH.
    pub(super) fn firecracker_binary(&self) -> Option<PathBuf> {
        self.settings
            .firecracker
            .clone()
            .or_else(|| banger_vmm::which("firecracker"))
    }

    /// The binaries configured for the back-ends.
    fn backend_paths(&self) -> BackendPaths {
        BackendPaths {
            qemu: self.settings.qemu.clone(),
            firecracker: self.settings.firecracker.clone(),
            bridge: None,
            jail: self.settings.jail.clone(),
        }
    }

    /// The back-end for `kind`, its binaries located.
    fn backend(&self, kind: VmmKind) -> Result<Box<dyn Vmm>, RpcError> {
        banger_vmm::backend(kind, &self.backend_paths()).map_err(|e| RpcError::failed(e.to_string()))
    }

    /// Whether `kind` can be launched here (its binaries are installed).
    pub(super) fn check_vmm(&self, kind: VmmKind) -> Result<(), RpcError> {
        self.backend(kind).map(drop)
    }

    pub(super) fn launch_spec(&self, vm: &VmRecord) -> Result<LaunchSpec, RpcError> {
        let image = self.images.get(&vm.spec.image)?;
        // The base the VM was made from, never a rebuilt one: its overlay
        // holds changes relative to exactly that file.
        let base = PathBuf::from(vm.runtime.base_rootfs.as_deref().unwrap_or(&image.rootfs));
        if !base.is_file() {
            return Err(RpcError::not_found(format!(
                "the image file VM {} was made from is gone: {}",
                vm.name,
                base.display()
            )));
        }
        // Checked again at every start: a registered file can change.
        if !crate::image::is_ext4(&base) {
            return Err(RpcError::bad_request(format!(
                "{} is no longer an ext4 image",
                base.display()
            )));
        }
        let k = kernel::read_manifest(Path::new(&image.kernel))?;
        let initrd = initramfs::ensure(&initramfs::Inputs {
            kernel: &k,
            agent: &self.settings.agent_binary,
            busybox: &self.settings.busybox,
        })?;
        let kernel = match VmmKind::parse(&vm.spec.vmm) {
            Some(VmmKind::Firecracker) => match &k.vmlinux {
                Some(f) => Path::new(&k.dir).join(f),
                None => {
                    return Err(RpcError::failed(format!(
                        "kernel {} has no uncompressed vmlinux, which Firecracker needs",
                        k.version
                    )))
                }
            },
            _ => Path::new(&k.dir).join("vmlinuz"),
        };
        Ok(LaunchSpec {
            vm_dir: PathBuf::from(&vm.runtime.vm_dir),
            kernel,
            initrd: Some(initrd),
            cmdline: cmdline(vm, self.network.cidr().ok()),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            drives: vec![
                Drive {
                    id: "base".into(),
                    path: base.clone(),
                    read_only: true,
                },
                Drive {
                    id: "overlay".into(),
                    path: PathBuf::from(&vm.runtime.overlay_path),
                    read_only: false,
                },
                Drive {
                    id: "work".into(),
                    path: PathBuf::from(&vm.runtime.work_disk_path),
                    read_only: false,
                },
            ],
            vsock_cid: vm.runtime.vsock_cid,
            net: None,
            restore: None,
            fill_drives: None,
            prestarted: None,
        })
    }

    /// Launches `spec` with the back-end recorded for the VM at create.
    pub(super) async fn launch(&self, vm: &VmRecord, spec: &LaunchSpec) -> Result<Launched, RpcError> {
        let kind = VmmKind::parse(&vm.spec.vmm)
            .ok_or_else(|| RpcError::failed(format!("unknown vmm {:?}", vm.spec.vmm)))?;
        let vmm = self.backend(kind)?;
        vmm.launch(spec)
            .await
            .map_err(|e| RpcError::failed(e.to_string()))
    }
}

/// The kernel command line: console, hostname, static network, and the
/// boot-time savings (no crypto self-tests, no kprobe tracer set-up).
pub(super) fn cmdline(vm: &VmRecord, cidr: Option<(std::net::Ipv4Addr, u8)>) -> String {
    // BANGER_GUEST_DEBUG=1 keeps the kernel's boot messages in `vm logs`.
    let quiet = if std::env::var("BANGER_GUEST_DEBUG").is_ok_and(|v| v == "1") {
        ""
    } else {
        " quiet"
    };
    let mut c = format!(
        "console=ttyS0{quiet} panic=-1 cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace banger.hostname={}",
        vm.name
    );
    // A VM in an engine's namespace has the engine's gateway, else banger's.
    let gw = match &vm.runtime.guest_gw {
        Some(g) => Some(g.clone()),
        None => cidr.map(|(gw, _)| gw.to_string()),
    };
    if let (Some(ip), Some(gw)) = (&vm.runtime.guest_ip, gw) {
        c.push_str(&format!(" banger.ip={ip} banger.gw={gw}"));
    }
    c
}
