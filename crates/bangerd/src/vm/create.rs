//! Creating a VM: synchronous validation, then a detached task registered
//! as an operation (image, allocation, disks, optional boot), with its
//! status and cancellation; and `discard`, which removes a VM whose
//! creation did not finish.
//!
//! The rules live in the pure `spec` and `alloc` modules; this file only
//! adds what needs the world: the image registry, the VMM on this host,
//! the store (under `create_lock`) and the address lease.

use super::alloc;
use super::spec::{self, Defaults};
use super::{names, VmService};
use crate::image::store_err;
use crate::kernel;
use crate::ops::OpHandle;
use crate::sync::Locked;
use crate::sys::{self, io};
use banger_proto::methods::daemon::{StageInfo, VmCreate, VmCreateBegun, VmCreateStatus};
use banger_proto::methods::Empty;
use banger_proto::{Ctx, ErrorCode, OpId, RpcError};
use banger_store::{VmRecord, VmSpec, VmState};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The system overlay: every write to `/` outside `/root` lands here.
const OVERLAY_BYTES: u64 = 4 << 30;

/// What `create` makes beyond the spec.
#[derive(Default)]
pub(super) struct Making {
    /// Boot it once made.
    pub start: bool,
    /// A warm-pool VM.
    pub pooled: bool,
    /// A VM restored from a snapshot: its disks are to be copies of the
    /// snapshot's, over the base they were made on, and its first start
    /// copies them and loads the snapshot instead of booting.
    pub restore: Option<FromSnapshot>,
}

pub(super) struct FromSnapshot {
    pub dir: std::path::PathBuf,
    pub base_rootfs: String,
}

impl VmService {
    /// Validates synchronously (bad input fails before anything exists),
    /// then creates in a detached task registered under the call's op id.
    pub fn create_begin(self: &Arc<Self>, ctx: &Ctx, p: VmCreate) -> Result<VmCreateBegun, RpcError> {
        let name = if p.name.is_empty() {
            names::generate()
        } else {
            p.name.clone()
        };
        let defaults = Defaults {
            vcpus: self.settings.default_vcpus,
            memory_mib: self.settings.default_memory_mib,
            work_disk_mib: self.settings.default_work_disk_mib,
        };
        let vmm = self.resolve_vmm()?;
        let spec::CreateRequest { name, spec } = spec::validate(&p, name, &defaults, vmm)?;
        if spec.image != crate::image::DEFAULT_IMAGE {
            self.images.get(&spec.image)?;
        }
        self.check_vmm(vmm)?;
        if self.store.get_vm(&name).map_err(store_err)?.is_some() {
            return Err(RpcError::already_exists(format!(
                "a VM named {name:?} already exists"
            )));
        }
        let op = self.ops.begin(&ctx.op_id, "vm.create", &name);
        let cancel = CancellationToken::new();
        self.cancels.locked().insert(ctx.op_id.clone(), cancel.clone());
        let svc = self.clone();
        let start = p.start;
        let vm_name = name.clone();
        let handle = op.clone();
        // Detached: the operation runs to its end (or its own clean-up)
        // whether or not anyone polls it.
        drop(op.run(async move {
            // A started VM of the warm pool's spec is taken from the pool
            // when one is ready; otherwise made and booted.
            let claimed = if start {
                svc.claim_pooled(handle.id(), &vm_name, &spec).await
            } else {
                None
            };
            let res = match claimed {
                Some(vm) => Ok(vm),
                None => {
                    let making = Making {
                        start,
                        ..Default::default()
                    };
                    svc.create(&handle, &vm_name, spec, making, &cancel).await
                }
            };
            svc.cancels.locked().remove(handle.id());
            res.map(|_| ())
        }));
        Ok(VmCreateBegun {
            op_id: ctx.op_id.to_string(),
            name,
        })
    }

    pub fn create_status(&self, op_id: &str) -> Result<VmCreateStatus, RpcError> {
        let id =
            OpId::parse(op_id).ok_or_else(|| RpcError::bad_request(format!("invalid op id {op_id:?}")))?;
        let op = self
            .ops
            .get(&id, "vm.create")
            .ok_or_else(|| RpcError::not_found(format!("no operation {op_id}")))?;
        let stages = self
            .ops
            .stages(&id, "vm.create")
            .into_iter()
            .map(|(name, elapsed_ms)| StageInfo { name, elapsed_ms })
            .collect();
        let vm = self
            .store
            .get_vm(&op.subject)
            .ok()
            .flatten()
            .map(|v| self.info(&v));
        Ok(VmCreateStatus { op, stages, vm })
    }

    pub fn create_cancel(&self, op_id: &str) -> Result<Empty, RpcError> {
        let id =
            OpId::parse(op_id).ok_or_else(|| RpcError::bad_request(format!("invalid op id {op_id:?}")))?;
        match self.cancels.locked().get(&id) {
            Some(t) => {
                t.cancel();
                Ok(Empty {})
            }
            None => Err(RpcError::not_found(format!(
                "no running create operation {op_id}"
            ))),
        }
    }

    pub(super) async fn create(
        self: &Arc<Self>,
        op: &OpHandle,
        name: &str,
        spec: VmSpec,
        making: Making,
        cancel: &CancellationToken,
    ) -> Result<VmRecord, RpcError> {
        let cancelled = || -> Result<(), RpcError> {
            if cancel.is_cancelled() {
                Err(RpcError::new(ErrorCode::Cancelled, "creation cancelled"))
            } else {
                Ok(())
            }
        };
        op.stage("image");
        let progress = |s: &str| op.stage(s);
        let image = self.images.ensure(&spec.image, &progress).await?;
        cancelled()?;

        op.stage("allocate");
        let vm = {
            let _g = self.create_lock.lock().await;
            let all = self.store.list_vms().map_err(store_err)?;
            if all.iter().any(|v| v.name == name) {
                return Err(RpcError::already_exists(format!(
                    "a VM named {name:?} already exists"
                )));
            }
            let cid = alloc::next_cid(all.iter().map(|v| v.runtime.vsock_cid));
            // The engine's address (`netns`) is learnt when the link is made.
            let lease = if spec.network && spec.netns.is_none() {
                Some(self.network.allocate(&alloc::used_addresses(&all))?)
            } else {
                None
            };
            // A VM that starts at once takes the spare VMM process, and
            // with it the id its directory was made for: after everything
            // that can refuse the creation, so a refusal never drops it.
            let spare = if making.start || making.restore.is_some() {
                self.spare_take(&spec.vmm, making.restore.as_ref().map(|r| r.dir.as_path()))
            } else {
                None
            };
            let id = match &spare {
                Some(s) => s.id.clone(),
                None => alloc::vm_id(kernel::rand_u32(), kernel::rand_u32()),
            };
            let dir = self.settings.vms_dir.join(&id);
            let guest_ip = lease.map(|l| alloc::guest_cidr(l.ip, l.prefix));
            let tap = (spec.network || spec.netns.is_some()).then(|| alloc::tap_name(&id));
            let mut runtime = alloc::creating_runtime(&dir, cid, guest_ip, tap);
            runtime.pooled = making.pooled;
            // Pinned: this VM's overlay sits on exactly this file.
            runtime.base_rootfs = Some(match &making.restore {
                Some(r) => r.base_rootfs.clone(),
                None => image.rootfs.clone(),
            });
            runtime.restore_from = making.restore.as_ref().map(|r| r.dir.display().to_string());
            let vm = VmRecord {
                id,
                name: name.to_string(),
                spec,
                runtime,
                created_at: banger_store::now(),
            };
            // Every creation ends with a synced write (its `stopped`, or a
            // start's `running`), which syncs this one too.
            let inserted = self.store.insert_vm_intent(&vm).map_err(store_err);
            if let Some(s) = spare {
                match &inserted {
                    Ok(()) => self.spare_handed_over(s, &dir),
                    Err(_) => self.spare_drop(s),
                }
            }
            inserted?;
            vm
        };
        tracing::info!(vm = %vm.name, id = %vm.id, image = %image.name, "vm allocated");

        let made = async {
            cancelled()?;
            op.stage("disks");
            let dir = Path::new(&vm.runtime.vm_dir);
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            // A restore's disks are the snapshot's, copied by its first
            // start while the VMM process starts (see `start_locked`).
            if making.restore.is_none() {
                let (overlay, work) = (
                    Path::new(&vm.runtime.overlay_path),
                    Path::new(&vm.runtime.work_disk_path),
                );
                let templates = self.settings.vms_dir.with_file_name("disk-templates");
                sys::make_ext4_from_template(&templates, overlay, OVERLAY_BYTES, "banger-overlay").await?;
                sys::make_ext4_from_template(&templates, work, vm.spec.work_disk_bytes, "banger-work")
                    .await?;
            }
            cancelled()?;
            Ok::<_, RpcError>(())
        }
        .await;
        if let Err(e) = made {
            self.discard(&vm).await;
            return Err(e);
        }
        let mut vm = vm;
        vm.runtime.state = VmState::Stopped;
        // A start follows at once (a restore always starts), and its end
        // is the write that must reach the disk.
        let saved = if making.start || making.restore.is_some() {
            self.save_intent(&vm)
        } else {
            self.save(&vm)
        };
        if let Err(e) = saved {
            self.discard(&vm).await;
            return Err(e);
        }
        if making.start {
            op.stage("boot");
            let lock = self.lock_for(&vm.id);
            let _g = lock.lock().await;
            let started = self.start_locked(vm).await;
            self.spare_refill();
            vm = started?;
        }
        op.stage("ready");
        Ok(vm)
    }

    /// Removes a VM that never finished creating: the spare process it
    /// took, directory and row.
    pub(super) async fn discard(&self, vm: &VmRecord) {
        self.spare_release(vm).await;
        if !vm.runtime.vm_dir.is_empty() {
            let _ = std::fs::remove_dir_all(&vm.runtime.vm_dir);
        }
        let _ = self.store.delete_vm(&vm.id);
    }
}
