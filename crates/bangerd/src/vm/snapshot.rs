//! Snapshots: a running VM's memory, device state and disks saved (`vm
//! snapshot`), and new VMs restored from them (`vm restore`). Firecracker
//! writes its snapshot files; QEMU migrates the VM into one file.
//!
//! A snapshot's files are written into `<snapshots>/<id>.tmp`, renamed
//! into place, and only then given a row: a crash leaves nothing, or a
//! directory without a row, which `sweep_snapshots` removes at start-up.
//! A restore is an ordinary create whose disks are then replaced by the
//! snapshot's copies and whose first start loads the snapshot instead of
//! booting; if that start fails, the VM goes.

use super::{alloc, names, VmService};
use crate::image::store_err;
use crate::ops::OpHandle;
use crate::sync::Locked;
use crate::sys::{self, io};
use banger_proto::methods::daemon::{SnapshotInfo, VmInfo, VmRestore, VmSnapshot};
use banger_proto::{OpId, RpcError};
use banger_store::{SnapshotRecord, VmRecord, VmSpec, VmState};
use banger_vmm::VmmKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A snapshot directory's files.
const STATE: &str = "state";
const MEMORY: &str = "memory";
const OVERLAY: &str = "overlay.ext4";
const WORK: &str = "work.ext4";
/// The files a snapshot of a `kind` VM holds.
fn files(kind: VmmKind) -> &'static [&'static str] {
    match kind {
        VmmKind::Firecracker => &[STATE, MEMORY, OVERLAY, WORK],
        // QEMU's migration stream holds the memory too.
        VmmKind::Qemu => &[STATE, OVERLAY, WORK],
    }
}

/// Why a VM of `spec` on `kind` cannot be snapshotted, if it cannot.
pub(super) fn refusal(spec: &VmSpec, kind: VmmKind) -> Option<&'static str> {
    if spec.netns.is_some() {
        return Some(
            "lives in a container engine's network namespace, whose address a restored VM could not take",
        );
    }
    // A restored QEMU guest is given its own MAC and address by the agent;
    // Firecracker's guests here are not agents, so that cannot be shown for
    // them, and they are kept off the network.
    if kind == VmmKind::Firecracker && spec.network {
        return Some(
            "has a network: a Firecracker VM restored from it would wear its address and MAC, \
             so Firecracker snapshots are taken of VMs made with --no-network",
        );
    }
    None
}

/// A snapshot's copies of a VM's overlay and work disks.
pub(super) fn disks(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(OVERLAY), dir.join(WORK))
}

/// What a jailed Firecracker writes a snapshot to, inside its jail (apart
/// from the names a restore copies a snapshot in under).
const JAIL_STATE: &str = "snapshot-out-state";
const JAIL_MEMORY: &str = "snapshot-out-mem";

impl VmService {
    fn snapshot_info(&self, s: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm: s.source_vm.clone(),
            image: s.spec.image.clone(),
            vmm: s.vmm.clone(),
            vcpus: s.spec.vcpus,
            memory_mib: s.spec.memory_mib,
            size_bytes: s.size_bytes,
            created_at: s.created_at.clone(),
            last_used_at: s.last_used_at.clone(),
            op_id: s.op_id.clone(),
        }
    }

    fn snapshot_record(&self, name: &str) -> Result<SnapshotRecord, RpcError> {
        self.store
            .get_snapshot(name)
            .map_err(store_err)?
            .ok_or_else(|| RpcError::not_found(format!("no snapshot named {name:?}")))
    }

    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>, RpcError> {
        Ok(self
            .store
            .list_snapshots()
            .map_err(store_err)?
            .iter()
            .map(|s| self.snapshot_info(s))
            .collect())
    }

    pub fn snapshot_show(&self, name: &str) -> Result<SnapshotInfo, RpcError> {
        Ok(self.snapshot_info(&self.snapshot_record(name)?))
    }

    /// Removes a snapshot: its row first (a crash then leaves only a
    /// directory, which the sweep removes). VMs restored from it run on:
    /// they have their own disks, and their memory file stays mapped.
    pub fn snapshot_rm(&self, name: &str) -> Result<(), RpcError> {
        let s = self.snapshot_record(name)?;
        self.store.delete_snapshot(&s.id).map_err(store_err)?;
        self.remove_snapshot_dir(Path::new(&s.dir));
        tracing::info!(snapshot = %s.name, "snapshot removed");
        Ok(())
    }

    fn remove_snapshot_dir(&self, dir: &Path) {
        // The spare's copies of its disks go with it.
        self.spare_forget_snapshot(dir);
        // Only ever a directory banger made for a snapshot.
        if dir.parent() == Some(self.settings.snapshots_dir.as_path()) {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a snapshot's files");
                }
            }
        }
    }

    /// At start-up: removes what a crash left (unfinished snapshots,
    /// directories without a row) and rows whose files are gone.
    pub(super) fn sweep_snapshots(&self) {
        let Ok(rows) = self.store.list_snapshots() else {
            return;
        };
        for s in &rows {
            if !Path::new(&s.dir).join(STATE).is_file() {
                tracing::warn!(snapshot = %s.name, "snapshot files are gone; forgetting it");
                let _ = self.store.delete_snapshot(&s.id);
            }
        }
        for e in std::fs::read_dir(&self.settings.snapshots_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if !rows.iter().any(|s| Path::new(&s.dir) == p) {
                tracing::info!(dir = %p.display(), "removing an unfinished snapshot");
                self.remove_snapshot_dir(&p);
            }
        }
    }

    /// Keeps all snapshots within `snapshot_max_gib`: the least recently
    /// used go first, never `keep` (the one just taken).
    fn enforce_snapshot_budget(&self, keep: &str) {
        let max = self.settings.snapshot_max_bytes;
        if max == 0 {
            return;
        }
        let Ok(all) = self.store.list_snapshots() else {
            return;
        };
        // The pool's base is the pool's to replace: it neither counts
        // against the budget nor is evicted by it (a refill would evict the
        // user's snapshots to make room for it, or the other way round).
        let users = all.iter().filter(|s| !super::pool::is_pool_base(&s.name));
        let mut total: u64 = users.clone().map(|s| s.size_bytes).sum();
        for s in users.filter(|s| s.id != keep) {
            if total <= max {
                break;
            }
            tracing::info!(snapshot = %s.name, bytes = s.size_bytes, "snapshot budget exceeded; removing the least recently used");
            if self.store.delete_snapshot(&s.id).is_ok() {
                self.remove_snapshot_dir(Path::new(&s.dir));
                total = total.saturating_sub(s.size_bytes);
            }
        }
    }

    /// Saves running VM `p.name`: paused, its memory and state written by
    /// the VMM, its writable disks copied, then resumed.
    pub async fn snapshot(&self, op: &OpId, p: VmSnapshot) -> Result<SnapshotInfo, RpcError> {
        self.take_snapshot(op, p, false).await
    }

    /// [`Self::snapshot`], of a warm-pool VM too when `of_pool` (the pool's
    /// base snapshot).
    pub(super) async fn take_snapshot(
        &self,
        op: &OpId,
        p: VmSnapshot,
        of_pool: bool,
    ) -> Result<SnapshotInfo, RpcError> {
        let snap_name = match p.snapshot {
            Some(n) => n,
            None => format!("{}-{:06x}", p.name, crate::kernel::rand_u32() & 0xff_ffff),
        };
        names::validate(&snap_name).map_err(RpcError::bad_request)?;
        if self.store.get_snapshot(&snap_name).map_err(store_err)?.is_some() {
            return Err(RpcError::already_exists(format!(
                "a snapshot named {snap_name:?} already exists"
            )));
        }
        let (_g, vm) = self.locked(&p.name).await?;
        let kind = VmmKind::parse(&vm.spec.vmm)
            .ok_or_else(|| RpcError::failed(format!("VM {} has an unknown VMM {}", vm.name, vm.spec.vmm)))?;
        if vm.runtime.pooled && !of_pool {
            return Err(RpcError::bad_request(format!(
                "VM {} is the warm pool's",
                vm.name
            )));
        }
        if let Some(why) = refusal(&vm.spec, kind) {
            return Err(RpcError::bad_request(format!("VM {} {why}", vm.name)));
        }
        if vm.runtime.state != VmState::Running {
            return Err(RpcError::not_running(format!("VM {} is not running", vm.name)));
        }
        let h = self.running_handles(&vm)?;
        // Firecracker resets every vsock connection of the VM when it
        // takes a snapshot: an exec or copy in flight would be cut. (QEMU's
        // channel is untouched by a save: the VM only pauses.)
        let in_flight = self.busy.locked().get(&vm.id).copied().unwrap_or(0);
        if in_flight > 0 && kind == VmmKind::Firecracker {
            return Err(RpcError::bad_request(format!(
                "VM {} has {in_flight} exec, copy or workspace call(s) in flight, which a snapshot \
                 would cut (Firecracker resets the VM's vsock connections); try again when they end",
                vm.name
            )));
        }
        let id = alloc::vm_id(crate::kernel::rand_u32(), crate::kernel::rand_u32());
        let root = &self.settings.snapshots_dir;
        std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        let tmp = root.join(format!("{id}.tmp"));
        std::fs::create_dir(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let api = h.launched.api_socket.clone();
        let made = self.write_snapshot(&vm, kind, &api, &tmp).await;
        // The VM runs on whatever happened.
        if let Err(e) = banger_vmm::pause::set_paused(kind, &api, false).await {
            tracing::warn!(vm = %vm.name, error = %e, "could not resume the VM after its snapshot");
        }
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = root.join(&id);
        std::fs::rename(&tmp, &dir).map_err(io(format!("finishing {}", dir.display())))?;
        let now = banger_store::now();
        let rec = SnapshotRecord {
            id: id.clone(),
            name: snap_name,
            source_vm: vm.name.clone(),
            vmm: vm.spec.vmm.clone(),
            spec: vm.spec.clone(),
            base_rootfs: vm.runtime.base_rootfs.clone().unwrap_or_default(),
            dir: dir.display().to_string(),
            size_bytes: sys::used_bytes(&dir),
            op_id: op.to_string(),
            created_at: now.clone(),
            last_used_at: now,
        };
        if let Err(e) = self.store.insert_snapshot(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(store_err(e));
        }
        tracing::info!(vm = %vm.name, snapshot = %rec.name, bytes = rec.size_bytes, "snapshot taken");
        if !of_pool {
            self.enforce_snapshot_budget(&id);
        }
        Ok(self.snapshot_info(&rec))
    }

    /// Pauses the VM and fills `tmp` with its snapshot; leaves it paused.
    async fn write_snapshot(
        &self,
        vm: &VmRecord,
        kind: VmmKind,
        api: &Path,
        tmp: &Path,
    ) -> Result<(), RpcError> {
        let failed = |e: banger_vmm::VmmError| RpcError::failed(format!("snapshot of VM {}: {e}", vm.name));
        if kind == VmmKind::Qemu {
            crate::ops::stage("save");
            banger_vmm::pause::snapshot_qemu(api, &tmp.join(STATE))
                .await
                .map_err(failed)?;
            return self.finish_snapshot(vm, kind, tmp);
        }
        // Firecracker writes where it can: inside its jail, or straight here.
        let jail_root = match &self.settings.jail {
            Some(_) => {
                let fc = self
                    .firecracker_binary()
                    .unwrap_or_else(|| PathBuf::from("firecracker"));
                Some(
                    banger_vmm::jailer::layout(Path::new(&vm.runtime.vm_dir), &fc)
                        .map_err(failed)?
                        .root,
                )
            }
            None => None,
        };
        let (state_in, mem_in) = match &jail_root {
            Some(root) => {
                for f in [JAIL_STATE, JAIL_MEMORY] {
                    let _ = std::fs::remove_file(root.join(f));
                }
                (Path::new("/").join(JAIL_STATE), Path::new("/").join(JAIL_MEMORY))
            }
            None => (tmp.join(STATE), tmp.join(MEMORY)),
        };
        crate::ops::stage("save");
        banger_vmm::pause::snapshot_firecracker(api, &state_in, &mem_in)
            .await
            .map_err(failed)?;
        if let Some(root) = &jail_root {
            // Moved out of the jail and made root's: guest memory is secret.
            for (from, to) in [(JAIL_STATE, STATE), (JAIL_MEMORY, MEMORY)] {
                let (src, dst) = (root.join(from), tmp.join(to));
                std::fs::rename(&src, &dst).map_err(io(format!("moving {}", src.display())))?;
                std::os::unix::fs::chown(&dst, Some(0), Some(0))
                    .map_err(io(format!("owning {}", dst.display())))?;
            }
        }
        self.finish_snapshot(vm, kind, tmp)
    }

    /// Copies the paused VM's writable disks beside its saved state and
    /// makes every file private.
    fn finish_snapshot(&self, vm: &VmRecord, kind: VmmKind, tmp: &Path) -> Result<(), RpcError> {
        for (src, name) in [
            (&vm.runtime.overlay_path, OVERLAY),
            (&vm.runtime.work_disk_path, WORK),
        ] {
            let (src, dst) = (PathBuf::from(src), tmp.join(name));
            crate::ops::stage("disks");
            tokio::task::block_in_place(|| sys::sparse_copy(&src, &dst))
                .map_err(io(format!("copying {}", src.display())))?;
        }
        use std::os::unix::fs::PermissionsExt;
        for f in files(kind) {
            let _ = std::fs::set_permissions(tmp.join(f), std::fs::Permissions::from_mode(0o600));
        }
        Ok(())
    }

    /// A new VM `p.name` from snapshot `p.snapshot`.
    pub async fn restore(self: &Arc<Self>, op: &OpHandle, p: VmRestore) -> Result<VmInfo, RpcError> {
        self.restore_as(op, p, false).await
    }

    /// [`Self::restore`], as a warm-pool VM when `pooled`.
    pub(super) async fn restore_as(
        self: &Arc<Self>,
        op: &OpHandle,
        mut p: VmRestore,
        pooled: bool,
    ) -> Result<VmInfo, RpcError> {
        if p.name.is_empty() {
            p.name = names::generate();
        }
        names::validate(&p.name).map_err(RpcError::bad_request)?;
        let snap = self.snapshot_record(&p.snapshot)?;
        let kind = VmmKind::parse(&snap.vmm).ok_or_else(|| {
            RpcError::failed(format!("snapshot {} has an unknown VMM {}", snap.name, snap.vmm))
        })?;
        self.check_vmm(kind)?;
        let dir = PathBuf::from(&snap.dir);
        for f in files(kind) {
            if !dir.join(f).is_file() {
                return Err(RpcError::not_found(format!(
                    "snapshot {} is missing its file {f}",
                    snap.name
                )));
            }
        }
        let cancel = tokio_util::sync::CancellationToken::new();
        let making = super::create::Making {
            restore: Some(super::create::FromSnapshot {
                dir: dir.clone(),
                base_rootfs: snap.base_rootfs.clone(),
            }),
            pooled,
            ..Default::default()
        };
        let vm = self
            .create(op, &p.name, snap.spec.clone(), making, &cancel)
            .await?;
        op.stage("restore");
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let started = self.start_locked(vm.clone()).await;
        self.spare_refill();
        match started {
            Ok(vm) => {
                // Off the answer's path: it only orders the budget's
                // evictions, and a lost one is harmless.
                let (store, id) = (self.store.clone(), snap.id.clone());
                drop(tokio::task::spawn_blocking(move || {
                    store.touch_snapshot(&id, &banger_store::now())
                }));
                tracing::info!(vm = %vm.name, snapshot = %snap.name, "vm restored");
                Ok(self.info(&vm))
            }
            Err(e) => {
                // A restore that did not come up leaves no VM behind.
                let mut gone = self.get(&vm.name).unwrap_or(vm);
                gone.runtime.state = VmState::Deleting;
                let _ = self.save(&gone);
                if let Err(d) = self.finish_delete(&gone).await {
                    tracing::warn!(vm = %gone.name, error = %d.message, "could not remove a VM whose restore failed");
                }
                Err(e)
            }
        }
    }
}
