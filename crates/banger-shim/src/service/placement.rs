//! Where a task runs: a VM of its own (a lone container, a pod's
//! sandbox), booted from its image; or, for a pod's later container, a
//! tree copied into the pod's VM that its processes are chrooted into.

use super::{err, member_key, vm_name, Service, TaskState, GUEST_TREES, MAIN, SESSION_FILE, VM_FILE};
use crate::banger;
use crate::rootfs;
use crate::spec;
use containerd_shim::TtrpcResult;
use std::path::Path;

/// Where a task's processes run: its VM, its session there, its root.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) vm: String,
    pub(super) session: String,
    pub(super) root: Option<String>,
    /// The VM is the task's own (not its pod's).
    pub(super) owns_vm: bool,
}

impl TaskState {
    pub(super) fn target(&self) -> Target {
        Target {
            vm: self.vm.clone(),
            session: self.session.clone(),
            root: self.root.clone(),
            owns_vm: self.owns_vm,
        }
    }
}

/// Where a new task's process will run.
pub(super) struct Placed {
    pub(super) vm: String,
    pub(super) session: String,
    pub(super) root: Option<String>,
    pub(super) owns_vm: bool,
    /// The VMM's host pid.
    pub(super) pid: u32,
}

impl Service {
    /// A container alone, or a pod's sandbox: a VM of its own, booted from
    /// the image made of its layers, sized and networked as the spec says.
    pub(super) fn boot_vm(
        &self,
        id: &str,
        spec: &serde_json::Value,
        layers: &[String],
        bundle: &Path,
    ) -> TtrpcResult<Placed> {
        let image = rootfs::ensure_image(id, layers, &Self::cache()).map_err(err)?;
        let vm = vm_name(&self.namespace, id);
        std::fs::write(bundle.join(VM_FILE), &vm).map_err(err)?;
        let mut args: Vec<String> = ["vm", "create", "--name", &vm, "--image", &image, "--json"]
            .map(String::from)
            .to_vec();
        match spec::network(spec) {
            spec::Network::Host => {}
            spec::Network::Isolated => args.push("--no-network".into()),
            // The engine's (CNI's) namespace: the VM's link goes there and
            // the guest takes the pod's address.
            spec::Network::Namespace(ns) => args.extend(["--netns".into(), ns]),
        }
        let size = spec::size(spec);
        if let Some(v) = size.vcpus {
            args.extend(["--vcpus".into(), v.to_string()]);
        }
        if let Some(m) = size.memory_mib {
            args.extend(["--memory".into(), m.to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        // `vm create --json` answers with the started VM: its VMM's pid.
        let info = banger::json(id, "vm create", &argv).map_err(err)?;
        Ok(Placed {
            vm,
            session: MAIN.into(),
            root: None,
            owns_vm: true,
            pid: info["pid"].as_u64().unwrap_or(0) as u32,
        })
    }

    /// A pod's later container: its image's tree is copied into the pod's
    /// VM (on its work disk), where its process will run chrooted.
    pub(super) fn place_member(
        &self,
        id: &str,
        sandbox: &str,
        spec: &serde_json::Value,
        layers: &[String],
        bundle: &Path,
    ) -> TtrpcResult<Placed> {
        let vm = vm_name(&self.namespace, sandbox);
        let info = banger::json(id, "vm show", &["vm", "show", &vm, "--json"])
            .map_err(|e| err(format!("the pod's VM for sandbox {sandbox}: {e}")))?;
        let key = member_key(id);
        let guest = format!("{GUEST_TREES}/{key}");
        let scratch = Self::cache()
            .parent()
            .map(|p| p.join("trees").join(&key))
            .ok_or_else(|| err("no cache directory"))?;
        let dest = format!("{vm}:{guest}");
        rootfs::with_tree(layers, &scratch, |dir| {
            let src = dir.display().to_string();
            banger::run(id, "vm cp", &["vm", "cp", &src, &dest])
        })
        .and_then(|r| r)
        .map_err(err)?;
        // The pod's names and resolvers, which the engine would bind in:
        // copied, as of now (bind mounts do not cross into a VM).
        for (src, dest) in spec::etc_files(spec) {
            let small = std::fs::metadata(&src).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20);
            if small {
                let to = format!("{vm}:{guest}{dest}");
                banger::run(id, "vm cp", &["vm", "cp", &src, &to]).map_err(err)?;
            }
        }
        std::fs::write(bundle.join(VM_FILE), &vm).map_err(err)?;
        std::fs::write(bundle.join(SESSION_FILE), &key).map_err(err)?;
        Ok(Placed {
            vm,
            session: key,
            root: Some(guest),
            owns_vm: false,
            pid: info["pid"].as_u64().unwrap_or(0) as u32,
        })
    }
}
