//! The warm pool: VMs of one spec (the configured image with the daemon's
//! defaults) booted ahead of demand, so that a `vm create` or `vm run` of
//! that spec takes a running VM instead of booting one.
//!
//! A pool VM is an ordinary VM in the store, flagged `pooled` (shown as
//! state `pooled`), named `pool-…`. Reconcile treats it like any other: a
//! daemon killed with SIGKILL adopts the pool VMs whose VMM still runs
//! and tears down the rest, which the keeper then deletes and replaces.
//! A claim renames the VM to the name its taker asked for, clears the
//! flag in the same write, and gives the guest the taker's identity: its
//! hostname, fresh entropy and clock, the ssh pin under the new name. The
//! guest keeps the address and MAC it booted with, as any new VM would
//! get its own. Refilling happens in the background after each claim.
//!
//! Ready pool VMs wait paused (no CPU spent on a waiting guest's timers);
//! a claim resumes one.
//!
//! The first pool VM of a spec is booted; a snapshot of it, taken once it
//! is ready, becomes the pool's base (`pool-base-<key>`, the key naming
//! the spec and the image file), and later pool VMs are restored from it:
//! a fraction of a boot, each with its own identity (see `snapshot`). A
//! base that no longer restores is removed, and the next VM boots again.
//! Firecracker VMs with a network cannot be snapshotted: their pool boots.

use super::spec::{self, Defaults};
use super::VmService;
use crate::image::store_err;
use crate::sync::Locked;
use banger_proto::methods::daemon::{PoolDrained, PoolStatus, VmCreate};
use banger_proto::methods::daemon::{VmRestore, VmSnapshot};
use banger_proto::{opid, OpId, RpcError};
use banger_store::{VmRecord, VmSpec, VmState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The name of every pool base snapshot starts so.
const POOL_BASE: &str = "pool-base-";

/// Whether snapshot `name` is a pool's base.
pub(super) fn is_pool_base(name: &str) -> bool {
    name.starts_with(POOL_BASE)
}

/// How long `pool fill --wait` waits for a full pool.
const FILL_WAIT: Duration = Duration::from_secs(600);

impl VmService {
    /// The spec every pool VM has; `None` without a pool.
    pub(super) fn pool_spec(&self) -> Option<VmSpec> {
        let pool = &self.settings.warm_pool;
        if pool.size == 0 {
            return None;
        }
        let defaults = Defaults {
            vcpus: self.settings.default_vcpus,
            memory_mib: self.settings.default_memory_mib,
            work_disk_mib: self.settings.default_work_disk_mib,
        };
        let p = VmCreate {
            image: Some(pool.image.clone()),
            start: true,
            ..Default::default()
        };
        let vmm = self.resolve_vmm().ok()?;
        spec::validate(&p, "pool".into(), &defaults, vmm)
            .ok()
            .map(|r| r.spec)
    }

    fn pool_members(&self) -> Result<Vec<VmRecord>, RpcError> {
        Ok(self
            .store
            .list_vms()
            .map_err(store_err)?
            .into_iter()
            .filter(|v| v.runtime.pooled)
            .collect())
    }

    /// Takes a ready pool VM of `spec` for `name`, or `None` (no pool, none
    /// ready, or another spec): the caller then makes one.
    pub(super) async fn claim_pooled(&self, op: &OpId, name: &str, spec: &VmSpec) -> Option<VmRecord> {
        let pool = self.pool_spec()?;
        if pool != *spec {
            tracing::debug!(?pool, asked = ?spec, "not the warm pool's spec");
            return None;
        }
        let usable = |vm: &VmRecord| {
            vm.runtime.pooled && vm.runtime.state == VmState::Running && vm.spec == *spec && self.is_alive(vm)
        };
        // A free member is taken at once. One whose boot is finishing (its
        // ssh set-up still holds its lock) is waited for, briefly: far
        // sooner done than a boot of our own.
        let (vm, old, _busy) = 'take: {
            let finishing = {
                let _g = self.create_lock.lock().await;
                let members: Vec<VmRecord> = self
                    .pool_members()
                    .ok()?
                    .into_iter()
                    .filter(|v| usable(v))
                    .collect();
                for vm in &members {
                    let Ok(busy) = self.lock_for(&vm.id).try_lock_owned() else {
                        continue;
                    };
                    let (vm, old) = self.rename_pooled(vm.clone(), name)?;
                    break 'take (vm, old, busy);
                }
                members.into_iter().next()
            };
            let Some(vm) = finishing else {
                tracing::info!("no warm pool VM ready; booting one");
                return None;
            };
            let busy = tokio::time::timeout(Duration::from_secs(10), self.lock_for(&vm.id).lock_owned())
                .await
                .ok()?;
            let _g = self.create_lock.lock().await;
            let vm = self.store.get_vm(&vm.id).ok()??;
            if !usable(&vm) {
                return None;
            }
            let (vm, old) = self.rename_pooled(vm, name)?;
            (vm, old, busy)
        };
        // The creation lock is free again; the VM's own is still held.
        tracing::info!(vm = %vm.name, id = %vm.id, from = %old, "took a VM from the warm pool");
        crate::ops::stage("pool");
        self.become_the_takers(&vm, &old, op).await;
        self.pool_kick.notify_one();
        Some(vm)
    }

    /// Gives a pool VM its taker's name and clears its flag, in one write.
    fn rename_pooled(&self, vm: VmRecord, name: &str) -> Option<(VmRecord, String)> {
        let old = vm.name.clone();
        let mut vm = vm;
        vm.name = name.to_string();
        vm.runtime.pooled = false;
        match self.store.rename_vm(&vm.id, name, &vm.runtime) {
            Ok(()) => Some((vm, old)),
            Err(e) => {
                tracing::warn!(vm = %old, error = %e, "could not claim a pool VM");
                None
            }
        }
    }

    /// A claimed guest made its taker's, in one agent call: its hostname,
    /// fresh entropy and clock; and the ssh pin moved to its new name (its
    /// host key and banger's authorised key are the ones it booted with).
    async fn become_the_takers(&self, vm: &VmRecord, old: &str, op: &OpId) {
        let Some(h) = self.cached(&vm.id) else { return };
        // It waited paused: its vCPUs run again before anything reaches it.
        if let Some(kind) = banger_vmm::VmmKind::parse(&vm.spec.vmm) {
            if let Err(e) = banger_vmm::pause::set_paused(kind, &h.launched.api_socket, false).await {
                tracing::warn!(vm = %vm.name, error = %e, "could not resume the claimed VM");
            }
        }
        self.pool_frozen.locked().remove(&vm.id);
        // No network identity: a pool VM booted with its own.
        let _ = self
            .seed_as(vm, &h.launched.vsock_uds, None, op, Some(&vm.name), None)
            .await;
        match self.ssh.rename(old, &vm.name) {
            Ok(true) => {}
            Ok(false) if vm.runtime.guest_ip.is_some() => {
                // Its boot could not pin it: try once more under the new name.
                if let Err(e) = self.ssh_setup(vm, &h.launched.vsock_uds, op, false).await {
                    tracing::warn!(vm = %vm.name, error = %e.message, "ssh set-up of the claimed VM failed");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(vm = %vm.name, error = %e, "could not move the claimed VM's ssh pin"),
        }
    }

    /// Brings the pool to its size: pool VMs that cannot serve (stopped by
    /// a crash, failed, or of a spec the configuration no longer asks for)
    /// are deleted, and new ones made and booted, one at a time.
    pub async fn pool_tend(self: &Arc<Self>) {
        if self.pool_paused.load(Ordering::Relaxed) {
            return;
        }
        let Some(spec) = self.pool_spec() else { return };
        let Ok(members) = self.pool_members() else { return };
        let mut live = 0;
        for vm in members {
            let making = matches!(vm.runtime.state, VmState::Creating | VmState::Starting);
            if making || (vm.runtime.state == VmState::Running && vm.spec == spec) {
                live += 1;
                continue;
            }
            if vm.runtime.state == VmState::Deleting {
                continue;
            }
            let op = OpId::mint();
            opid::run_as(op.clone(), "pool.discard", async {
                tracing::info!(vm = %vm.name, state = vm.runtime.state.as_str(), "discarding a pool VM that cannot serve");
                let _ = self.kill(&op, &vm.name).await;
                if let Err(e) = self.delete(&op, &vm.name).await {
                    tracing::warn!(vm = %vm.name, error = %e.message, "could not discard a pool VM");
                }
            })
            .await;
        }
        self.freeze_ready().await;
        for _ in live..self.settings.warm_pool.size {
            if self.pool_paused.load(Ordering::Relaxed) {
                return;
            }
            let name = format!("pool-{:06x}", crate::kernel::rand_u32() & 0xff_ffff);
            let op = OpId::mint();
            let handle = self.ops.begin(&op, "pool.fill", &name);
            let base = self.pool_base(&spec);
            let from = base
                .as_ref()
                .and_then(|b| self.store.get_snapshot(b).ok().flatten());
            let (svc, h, spec, snapshot) = (
                self.clone(),
                handle.clone(),
                spec.clone(),
                from.as_ref().map(|s| s.name.clone()),
            );
            let made = opid::run_as(op.clone(), "pool.fill", async move {
                handle
                    .run(async move {
                        if let Some(snapshot) = snapshot {
                            let p = VmRestore { name, snapshot };
                            return svc.restore_as(&h, p, true).await.map(|v| v.name);
                        }
                        let cancel = CancellationToken::new();
                        let making = super::create::Making {
                            start: true,
                            pooled: true,
                            restore: None,
                        };
                        svc.create(&h, &name, spec, making, &cancel).await.map(|v| v.name)
                    })
                    .await
            })
            .await;
            match made {
                Ok(vm) => {
                    tracing::info!(vm = %vm, op_id = %op, restored = from.is_some(), "pool VM ready");
                    // Not once drained: the drain removed the bases.
                    let drained = self.pool_paused.load(Ordering::Relaxed);
                    if let (None, Some(base), false) = (&from, &base, drained) {
                        opid::run_as(op.clone(), "pool.base", self.make_pool_base(&op, &vm, base)).await;
                    }
                    self.pool_base_failures.store(0, Ordering::Relaxed);
                    self.freeze_ready().await;
                }
                Err(e) => {
                    tracing::warn!(op_id = %op, error = %e.message, "could not make a pool VM");
                    if let Some(s) = &from {
                        // A base that does not restore (its image file gone,
                        // say) is dropped, the next VM then boots and makes
                        // another; one failure may be the host's (memory,
                        // addresses), so it takes two in a row.
                        if self.pool_base_failures.fetch_add(1, Ordering::Relaxed) >= 1 {
                            tracing::warn!(snapshot = %s.name, "removing the pool's base snapshot");
                            let _ = self.snapshot_rm(&s.name);
                            self.pool_base_failures.store(0, Ordering::Relaxed);
                        }
                    }
                    // The next pass tries again: a failing image must not spin.
                    return;
                }
            }
        }
    }

    /// The name of the base snapshot for pool VMs of `spec`, made from the
    /// image file as it is now; `None` where such a VM cannot be
    /// snapshotted.
    fn pool_base(&self, spec: &VmSpec) -> Option<String> {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::MetadataExt;
        let kind = banger_vmm::VmmKind::parse(&spec.vmm)?;
        if super::snapshot::refusal(spec, kind).is_some() {
            return None;
        }
        let image = self.images.get(&spec.image).ok()?;
        let meta = std::fs::metadata(&image.rootfs).ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            serde_json::to_string(spec).ok()?,
            &image.rootfs,
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.len(),
        )
            .hash(&mut h);
        Some(format!("{POOL_BASE}{:08x}", h.finish() as u32))
    }

    /// Snapshots pool VM `vm` as the pool's base `name`, replacing older
    /// bases; a failure leaves the pool booting its VMs.
    async fn make_pool_base(&self, op: &OpId, vm: &str, name: &str) {
        self.drop_pool_bases(Some(name));
        let p = VmSnapshot {
            name: vm.to_string(),
            snapshot: Some(name.to_string()),
        };
        match self.take_snapshot(op, p, true).await {
            Ok(s) => {
                tracing::info!(snapshot = %s.name, bytes = s.size_bytes, "the warm pool's base snapshot")
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "could not snapshot a pool VM; the pool boots its VMs")
            }
        }
    }

    /// Removes the pool's base snapshots but `keep`.
    fn drop_pool_bases(&self, keep: Option<&str>) {
        let Ok(all) = self.store.list_snapshots() else {
            return;
        };
        for s in all {
            if is_pool_base(&s.name) && Some(s.name.as_str()) != keep {
                let _ = self.snapshot_rm(&s.name);
            }
        }
    }

    /// Pauses the ready pool VMs not paused yet: a waiting guest still
    /// spends CPU on its timers (5-8 % of a core under QEMU's emulation).
    /// A claim resumes it (and sets its clock). After a daemon restart the
    /// set is empty and pausing again is harmless.
    async fn freeze_ready(&self) {
        let Ok(members) = self.pool_members() else { return };
        for vm in members {
            if vm.runtime.state != VmState::Running || self.pool_frozen.locked().contains(&vm.id) {
                continue;
            }
            let Ok(_busy) = self.lock_for(&vm.id).try_lock_owned() else {
                continue;
            };
            // Taken between the listing and the lock: the taker's now.
            if !self
                .store
                .get_vm(&vm.id)
                .ok()
                .flatten()
                .is_some_and(|v| v.runtime.pooled)
            {
                continue;
            }
            let (Some(h), Some(kind)) = (self.cached(&vm.id), banger_vmm::VmmKind::parse(&vm.spec.vmm))
            else {
                continue;
            };
            match banger_vmm::pause::set_paused(kind, &h.launched.api_socket, true).await {
                Ok(()) => {
                    tracing::info!(vm = %vm.name, "pool VM paused until it is taken");
                    self.pool_frozen.locked().insert(vm.id.clone());
                }
                Err(e) => tracing::warn!(vm = %vm.name, error = %e, "could not pause a pool VM"),
            }
        }
    }

    /// Keeps the pool full for as long as the daemon runs: a pass at once,
    /// after every claim and every few seconds.
    pub async fn pool_keeper(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.pool_tend().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.pool_kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    pub fn pool_status(&self) -> Result<PoolStatus, RpcError> {
        let mut ready = Vec::new();
        let mut starting = Vec::new();
        for vm in self.pool_members()? {
            // Ready once its boot has let go of it (ssh set-up included).
            let free = self.lock_for(&vm.id).try_lock().is_ok();
            match vm.runtime.state {
                VmState::Running if self.is_alive(&vm) && free => ready.push(vm.name),
                VmState::Running | VmState::Creating | VmState::Starting => starting.push(vm.name),
                _ => {}
            }
        }
        Ok(PoolStatus {
            image: self.settings.warm_pool.image.clone(),
            size: self.settings.warm_pool.size,
            ready,
            starting,
            paused: self.pool_paused.load(Ordering::Relaxed),
        })
    }

    /// Resumes refilling; with `wait`, answers once the pool is full.
    pub async fn pool_fill(&self, wait: bool) -> Result<PoolStatus, RpcError> {
        self.pool_paused.store(false, Ordering::Relaxed);
        self.pool_kick.notify_one();
        let deadline = tokio::time::Instant::now() + FILL_WAIT;
        loop {
            let s = self.pool_status()?;
            if !wait || s.ready.len() as u32 >= s.size {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RpcError::failed(format!(
                    "the pool has {} of {} VMs ready after {} s; see the daemon's log",
                    s.ready.len(),
                    s.size,
                    FILL_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes every pool VM and the pool's base snapshot, and stops
    /// refilling until `pool_fill`.
    pub async fn pool_drain(&self, op: &OpId) -> Result<PoolDrained, RpcError> {
        self.pool_paused.store(true, Ordering::Relaxed);
        let mut removed = Vec::new();
        for vm in self.pool_members()? {
            // One being made finishes first; the next drain takes it.
            if matches!(vm.runtime.state, VmState::Creating) {
                continue;
            }
            let _ = self.kill(op, &vm.name).await;
            self.delete(op, &vm.name).await?;
            removed.push(vm.name);
        }
        self.drop_pool_bases(None);
        Ok(PoolDrained { removed })
    }
}
