//! What a create request asks for, checked: a name, an image name and the
//! VM's resources turned into a [`VmSpec`], or a `bad_request` that says
//! what is wrong.
//!
//! Pure on purpose: no store, no image lookup, no VMM probe, so every rule
//! here is unit-tested and bad input is refused before anything exists.
//! The checks that need the world (the image is registered, the VMM is
//! installed, the name is free) stay with the caller in `create.rs`.

use banger_proto::methods::daemon::VmCreate;
use banger_proto::RpcError;
use banger_store::VmSpec;
use banger_vmm::VmmKind;

use super::names;

pub const MIN_VCPUS: u32 = 1;
pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 262_144;
pub const MIN_WORK_DISK_MIB: u64 = 64;
/// 16 TiB: far beyond any real work disk, and far below `u64` bytes.
pub const MAX_WORK_DISK_MIB: u64 = 16 << 20;

/// The configured values used when the request leaves one out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub work_disk_mib: u64,
}

/// A create request that passed every check that needs nothing but itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: String,
    pub spec: VmSpec,
}

/// Checks `p` (whose empty name the caller has already replaced by a
/// generated one, passed as `name`) and builds the spec for `vmm`.
pub fn validate(
    p: &VmCreate,
    name: String,
    defaults: &Defaults,
    vmm: VmmKind,
) -> Result<CreateRequest, RpcError> {
    names::validate(&name).map_err(RpcError::bad_request)?;
    let image = p
        .image
        .clone()
        .unwrap_or_else(|| crate::image::DEFAULT_IMAGE.to_string());
    crate::image::validate_name(&image)?;
    let vcpus = check_vcpus(p.vcpus.unwrap_or(defaults.vcpus))?;
    let memory_mib = check_memory(p.memory_mib.unwrap_or(defaults.memory_mib))?;
    let work_mib = p.work_disk_mib.unwrap_or(defaults.work_disk_mib);
    let work_disk_bytes = work_disk_bytes(work_mib)?;
    if p.nat && p.no_network {
        return Err(RpcError::bad_request("--nat needs networking: drop --no-network"));
    }
    if p.peers && p.no_network {
        return Err(RpcError::bad_request(
            "--peers needs networking: drop --no-network",
        ));
    }
    if let Some(ns) = &p.netns {
        check_netns(ns, p, vmm)?;
    }
    if p.auto_stop_idle_secs
        .is_some_and(|s| s > banger_config::MAX_IDLE_SECS)
    {
        return Err(RpcError::bad_request("an idle limit longer than 30 days"));
    }
    Ok(CreateRequest {
        name,
        spec: VmSpec {
            image,
            vcpus,
            memory_mib,
            work_disk_bytes,
            vmm: vmm.as_str().to_string(),
            nat: p.nat,
            peers: p.peers,
            network: !p.no_network,
            auto_stop_idle_secs: p.auto_stop_idle_secs,
            netns: p.netns.clone(),
        },
    })
}

/// An engine's namespace: a path the helper will check for real; here,
/// what it cannot be combined with.
fn check_netns(ns: &str, p: &VmCreate, vmm: VmmKind) -> Result<(), RpcError> {
    if !ns.starts_with('/') || ns.len() > 4096 || ns.contains('\0') {
        return Err(RpcError::bad_request(format!(
            "--netns {ns:?} must be the absolute path of a network namespace"
        )));
    }
    if p.no_network || p.nat || p.peers {
        return Err(RpcError::bad_request(
            "--netns gives the VM the engine's network: drop --no-network, --nat and --peers",
        ));
    }
    if vmm != VmmKind::Qemu {
        return Err(RpcError::bad_request(
            "--netns needs the QEMU back-end: Firecracker opens its tap by name in its own namespace",
        ));
    }
    Ok(())
}

fn check_vcpus(vcpus: u32) -> Result<u32, RpcError> {
    if !(MIN_VCPUS..=MAX_VCPUS).contains(&vcpus) {
        return Err(RpcError::bad_request(format!(
            "vcpus must be {MIN_VCPUS}-{MAX_VCPUS}, not {vcpus}"
        )));
    }
    Ok(vcpus)
}

fn check_memory(memory_mib: u32) -> Result<u32, RpcError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(RpcError::bad_request(format!(
            "memory must be {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB} MiB, not {memory_mib}"
        )));
    }
    Ok(memory_mib)
}

/// `vm set`: the spec with the new resources, under the same bounds as a
/// create. The work disk holds the VM's files: it may grow, never shrink.
pub fn resized(spec: &VmSpec, p: &banger_proto::methods::daemon::VmSet) -> Result<VmSpec, RpcError> {
    if p.vcpus.is_none() && p.memory_mib.is_none() && p.work_disk_mib.is_none() {
        return Err(RpcError::bad_request(
            "nothing to change: give --vcpus, --memory or --disk-size",
        ));
    }
    let mut new = spec.clone();
    if let Some(v) = p.vcpus {
        new.vcpus = check_vcpus(v)?;
    }
    if let Some(m) = p.memory_mib {
        new.memory_mib = check_memory(m)?;
    }
    if let Some(d) = p.work_disk_mib {
        let bytes = work_disk_bytes(d)?;
        if bytes < spec.work_disk_bytes {
            return Err(RpcError::bad_request(format!(
                "the work disk is {} MiB and holds the VM's files: it can grow, not shrink to {d} MiB",
                spec.work_disk_bytes >> 20
            )));
        }
        new.work_disk_bytes = bytes;
    }
    Ok(new)
}

/// The work disk size in bytes, within bounds and without wrapping.
pub fn work_disk_bytes(mib: u64) -> Result<u64, RpcError> {
    if mib < MIN_WORK_DISK_MIB {
        return Err(RpcError::bad_request(format!(
            "work disk of {mib} MiB is too small: at least {MIN_WORK_DISK_MIB} MiB"
        )));
    }
    let too_large = || {
        RpcError::bad_request(format!(
            "work disk of {mib} MiB is too large: at most {MAX_WORK_DISK_MIB} MiB (16 TiB)"
        ))
    };
    if mib > MAX_WORK_DISK_MIB {
        return Err(too_large());
    }
    mib.checked_mul(1 << 20).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_proto::ErrorCode;

    const DEFAULTS: Defaults = Defaults {
        vcpus: 2,
        memory_mib: 1024,
        work_disk_mib: 8192,
    };

    fn check(p: VmCreate) -> Result<CreateRequest, RpcError> {
        validate(&p, "dev".into(), &DEFAULTS, VmmKind::Qemu)
    }

    fn refused(p: VmCreate, text: &str) {
        let e = check(p.clone()).expect_err(&format!("{p:?} was accepted"));
        assert_eq!(e.code, ErrorCode::BadRequest, "{p:?}: {e:?}");
        assert!(e.message.contains(text), "{p:?}: {}", e.message);
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let r = check(VmCreate::default()).unwrap();
        assert_eq!(r.name, "dev");
        assert_eq!(
            r.spec,
            VmSpec {
                image: crate::image::DEFAULT_IMAGE.into(),
                vcpus: 2,
                memory_mib: 1024,
                work_disk_bytes: 8192 << 20,
                vmm: "qemu".into(),
                nat: false,
                peers: false,
                network: true,
                auto_stop_idle_secs: None,
                netns: None,
            }
        );
        let r = validate(
            &VmCreate::default(),
            "dev".into(),
            &DEFAULTS,
            VmmKind::Firecracker,
        )
        .unwrap();
        assert_eq!(r.spec.vmm, "firecracker");
    }

    #[test]
    fn the_request_overrides_defaults() {
        let r = check(VmCreate {
            image: Some("mine".into()),
            vcpus: Some(32),
            memory_mib: Some(128),
            work_disk_mib: Some(64),
            nat: true,
            peers: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.spec.image, "mine");
        assert_eq!((r.spec.vcpus, r.spec.memory_mib), (32, 128));
        assert_eq!(r.spec.work_disk_bytes, 64 << 20);
        assert!(r.spec.nat && r.spec.peers && r.spec.network);
        let r = check(VmCreate {
            no_network: true,
            ..Default::default()
        })
        .unwrap();
        assert!(!r.spec.network && !r.spec.nat);
    }

    #[test]
    fn names_are_dns_labels() {
        for bad in ["", "-bad", "Bad_Name", "a.b", "../etc"] {
            let e = validate(&VmCreate::default(), bad.into(), &DEFAULTS, VmmKind::Qemu).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
        }
        refused(
            VmCreate {
                image: Some("../etc".into()),
                ..Default::default()
            },
            "image name",
        );
    }

    #[test]
    fn vcpus_and_memory_are_bounded() {
        for vcpus in [0, 33, u32::MAX] {
            refused(
                VmCreate {
                    vcpus: Some(vcpus),
                    ..Default::default()
                },
                "vcpus must be 1-32",
            );
        }
        for memory_mib in [0, 127, 262_145] {
            refused(
                VmCreate {
                    memory_mib: Some(memory_mib),
                    ..Default::default()
                },
                "memory must be 128-262144 MiB",
            );
        }
        assert!(check(VmCreate {
            memory_mib: Some(262_144),
            vcpus: Some(1),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn work_disk_is_bounded_and_never_wraps() {
        refused(
            VmCreate {
                work_disk_mib: Some(63),
                ..Default::default()
            },
            "too small",
        );
        // 2^44 + 1 MiB: `<< 20` would wrap to 1 MiB.
        for mib in [17_592_186_044_417, MAX_WORK_DISK_MIB + 1, u64::MAX] {
            refused(
                VmCreate {
                    work_disk_mib: Some(mib),
                    ..Default::default()
                },
                "too large",
            );
        }
        assert_eq!(work_disk_bytes(MAX_WORK_DISK_MIB).unwrap(), 16 << 40);
        assert_eq!(work_disk_bytes(MIN_WORK_DISK_MIB).unwrap(), 64 << 20);
    }

    #[test]
    fn set_keeps_the_create_bounds_and_never_shrinks_the_disk() {
        use banger_proto::methods::daemon::VmSet;
        let spec = check(VmCreate {
            work_disk_mib: Some(1024),
            ..Default::default()
        })
        .unwrap()
        .spec;
        let set = |vcpus, memory_mib, work_disk_mib| VmSet {
            name: "x".into(),
            vcpus,
            memory_mib,
            work_disk_mib,
        };
        let grown = resized(&spec, &set(Some(4), Some(2048), Some(2048))).unwrap();
        assert_eq!(
            (grown.vcpus, grown.memory_mib, grown.work_disk_bytes),
            (4, 2048, 2048 << 20)
        );
        assert_eq!(resized(&spec, &set(None, None, Some(1024))).unwrap(), spec);
        for bad in [
            set(None, None, None),
            set(Some(0), None, None),
            set(Some(MAX_VCPUS + 1), None, None),
            set(None, Some(64), None),
            set(None, None, Some(512)),
            set(None, None, Some(u64::MAX)),
        ] {
            let e = resized(&spec, &bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn nat_needs_a_network() {
        refused(
            VmCreate {
                nat: true,
                no_network: true,
                ..Default::default()
            },
            "--nat needs networking",
        );
        refused(
            VmCreate {
                peers: true,
                no_network: true,
                ..Default::default()
            },
            "--peers needs networking",
        );
    }

    #[test]
    fn an_engines_namespace_takes_the_engines_network_on_qemu_only() {
        let ns = || Some("/run/netns/cni-1".to_string());
        for (p, why) in [
            (
                VmCreate {
                    netns: ns(),
                    nat: true,
                    ..Default::default()
                },
                "drop --no-network, --nat and --peers",
            ),
            (
                VmCreate {
                    netns: Some("cni-1".into()),
                    ..Default::default()
                },
                "absolute path",
            ),
        ] {
            refused(p, why);
        }
        let d = DEFAULTS;
        let fc = VmCreate {
            netns: ns(),
            ..Default::default()
        };
        let e = validate(&fc, "a".into(), &d, VmmKind::Firecracker).unwrap_err();
        assert!(e.message.contains("needs the QEMU back-end"), "{}", e.message);
        let ok = validate(&fc, "a".into(), &d, VmmKind::Qemu).unwrap();
        assert!(ok.spec.network && ok.spec.netns == ns());
    }
}
