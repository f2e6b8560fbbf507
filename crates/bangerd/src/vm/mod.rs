//! The VM service: create, start, stop, delete, exec, reconcile.
//!
//! This file holds the service's state and the helpers every operation
//! shares (lifecycle locks, record access, the liveness check). Each
//! operation lives in a file of its own, as an `impl VmService` block:
//!
//! - `spec`, `alloc`, `state`: pure rules (request validation, identity
//!   allocation, state guards), unit-tested, independent of the service;
//! - `create`: asynchronous creation and its status and cancellation;
//! - `vmm`: which VMM, and what it is launched with;
//! - `boot`: starting a VM and waiting for its guest;
//! - `stop`, `delete`, `teardown`: the way down, and the cleanup they share;
//! - `reconcile`: start-up adoption and the dead-VMM watcher;
//! - `guest`, `workspace_ops`: calls into a running guest;
//! - `query`: read-only views (info, list, logs, DNS);
//! - `observe`: read-only views from inside a guest (ports, stats), with
//!   the agent's reply checked as hostile input;
//! - `console`: the console log's budget and its tail;
//! - `spare`: a Firecracker process started ahead of the next start.
//!
//! Locking: a per-VM async mutex is held for a whole lifecycle operation, so
//! operations on one VM are serialised while different VMs proceed in
//! parallel; `create_lock` serialises only name and CID allocation.

pub mod agent;
pub mod alloc;
pub mod handles;
pub mod names;
pub mod spec;
pub mod state;

mod boot;
mod console;
mod copy_ops;
mod create;
mod delete;
pub mod exec;
mod guest;
mod idle;
pub use idle::SAMPLE_EVERY as IDLE_SAMPLE_EVERY;
mod observe;
mod pool;
mod query;
mod reconcile;
mod resize;
mod snapshot;
mod spare;
mod stop;
mod teardown;
mod vmm;
mod workspace_ops;

use crate::image::{store_err, ImageService};
use crate::network::NetworkService;
use crate::ops::Operations;
use crate::ssh::SshService;
use crate::sync::Locked;
use banger_proto::{OpId, RpcError};
use banger_store::{Store, VmRecord};
use banger_vmm::process;
use handles::VmHandles;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub struct Settings {
    pub vms_dir: PathBuf,
    pub vmm: String,
    pub qemu: Option<PathBuf>,
    pub firecracker: Option<PathBuf>,
    /// Firecracker runs under this jailer when set.
    pub jail: Option<banger_vmm::jailer::JailConfig>,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub default_work_disk_mib: u64,
    /// Disk a VM's console log may use; older output is dropped.
    pub console_log_max_bytes: u64,
    pub agent_binary: PathBuf,
    pub busybox: PathBuf,
    /// Stop VMs idle this long unless they say otherwise; 0: never.
    pub auto_stop_idle_secs: u64,
    /// VMs kept booted for creates of the pool's spec.
    pub warm_pool: banger_config::WarmPool,
    pub snapshots_dir: PathBuf,
    /// Disk all snapshots may use together; 0: no limit.
    pub snapshot_max_bytes: u64,
}

pub struct VmService {
    settings: Settings,
    store: Arc<Store>,
    images: Arc<ImageService>,
    ops: Arc<Operations>,
    network: Arc<NetworkService>,
    ssh: Arc<SshService>,
    /// What is true now: handles of running VMs by VM id.
    handles: Mutex<HashMap<String, VmHandles>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    create_lock: tokio::sync::Mutex<()>,
    cancels: Mutex<HashMap<OpId, CancellationToken>>,
    /// Per VM id: fired by `kill` to cut short whatever waits on the guest
    /// under the lifecycle lock (a graceful stop, a boot), so that `kill`
    /// works at once whatever the guest does.
    interrupts: Mutex<HashMap<String, CancellationToken>>,
    /// VM ids whose network teardown failed (helper unreachable): retried
    /// by the watcher until it succeeds.
    unclean: Mutex<std::collections::HashSet<String>>,
    /// Calls in flight per VM id (exec, copy, workspace): not idle.
    busy: Mutex<HashMap<String, usize>>,
    /// Since when each running VM has been seen idle.
    idle_since: Mutex<HashMap<String, std::time::Instant>>,
    /// Per VM id: the VMM pid its agent was asked about, and the
    /// features that agent names (`agent.info`).
    agent_features: Mutex<HashMap<String, (u32, Vec<String>)>>,
    /// Wakes the warm pool's keeper (a VM was taken, or a fill asked).
    pool_kick: tokio::sync::Notify,
    /// `pool drain` stopped refilling until `pool fill`.
    pool_paused: std::sync::atomic::AtomicBool,
    /// Restores from the pool's base that failed in a row.
    pool_base_failures: std::sync::atomic::AtomicU32,
    /// Pool VMs whose vCPUs this daemon paused while they wait.
    pool_frozen: Mutex<std::collections::HashSet<String>>,
    /// A Firecracker started ahead of the next VM's start.
    spares: spare::Spares,
}

impl VmService {
    pub fn new(
        settings: Settings,
        store: Arc<Store>,
        images: Arc<ImageService>,
        ops: Arc<Operations>,
        network: Arc<NetworkService>,
        ssh: Arc<SshService>,
    ) -> Self {
        VmService {
            network,
            ssh,
            settings,
            store,
            images,
            ops,
            handles: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            cancels: Mutex::new(HashMap::new()),
            interrupts: Mutex::new(HashMap::new()),
            unclean: Mutex::new(Default::default()),
            busy: Mutex::new(HashMap::new()),
            idle_since: Mutex::new(HashMap::new()),
            agent_features: Mutex::new(HashMap::new()),
            pool_kick: tokio::sync::Notify::new(),
            pool_paused: Default::default(),
            pool_base_failures: Default::default(),
            pool_frozen: Mutex::new(Default::default()),
            spares: Default::default(),
        }
    }

    /// The token `kill` fires for this VM; a fresh one once fired.
    fn interrupt_token(&self, id: &str) -> CancellationToken {
        let mut m = self.interrupts.locked();
        let t = m.entry(id.to_string()).or_default();
        if t.is_cancelled() {
            *t = CancellationToken::new();
        }
        t.clone()
    }

    /// Cuts short the guest waits of whatever holds this VM's lock.
    fn interrupt(&self, id: &str) {
        if let Some(t) = self.interrupts.locked().get(id) {
            t.cancel();
        }
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.locked().entry(id.to_string()).or_default().clone()
    }

    /// Takes the VM's lifecycle lock and re-reads the record under it (an
    /// operation that held the lock before may have changed it).
    async fn locked(&self, name: &str) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRecord), RpcError> {
        let vm = self.get(name)?;
        let guard = self.lock_for(&vm.id).lock_owned().await;
        Ok((guard, self.get(name)?))
    }

    fn get(&self, name: &str) -> Result<VmRecord, RpcError> {
        names::validate(name).map_err(RpcError::bad_request)?;
        self.store
            .get_vm(name)
            .map_err(store_err)?
            .ok_or_else(|| RpcError::not_found(format!("no VM named {name:?}")))
    }

    fn save(&self, vm: &VmRecord) -> Result<(), RpcError> {
        self.store
            .update_vm_runtime(&vm.id, &vm.runtime)
            .map_err(store_err)
    }

    /// Saves a state that the same operation settles moments later with
    /// [`Self::save`]: it must outlive a killed daemon, not a power loss
    /// (see `Store::update_vm_runtime_intent`). One disk sync fewer on a
    /// start's path.
    fn save_intent(&self, vm: &VmRecord) -> Result<(), RpcError> {
        self.store
            .update_vm_runtime_intent(&vm.id, &vm.runtime)
            .map_err(store_err)
    }

    /// Saves the state that ends a start (`running`), synced right after
    /// the answer instead of before it (see
    /// `Store::update_vm_runtime_sync_soon`): a power loss ends every VM,
    /// so a `running` only matters to a daemon that outlives it.
    fn save_sync_soon(&self, vm: &VmRecord) -> Result<(), RpcError> {
        self.store
            .update_vm_runtime_sync_soon(&vm.id, &vm.runtime)
            .map_err(store_err)
    }

    fn cached(&self, id: &str) -> Option<VmHandles> {
        self.handles.locked().get(id).cloned()
    }

    /// The one answer to "is this VM alive": its VMM process, checked
    /// against the VM directory in its command line.
    pub fn is_alive(&self, vm: &VmRecord) -> bool {
        self.cached(&vm.id)
            .is_some_and(|h| process::alive(h.launched.pid, &vm.runtime.vm_dir))
    }
}

/// The op id of the call being served, or a fresh one for background work.
fn current_op() -> OpId {
    banger_proto::opid::current().unwrap_or_else(OpId::mint)
}
