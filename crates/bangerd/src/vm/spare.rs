//! A Firecracker process started ahead of need: the next new Firecracker
//! VM that starts at once (a restore, a pool fill, a `vm run`) takes it,
//! and only configures it, instead of waiting the 1.5-2.5 ms a fresh
//! process takes to open its API socket. On a restore of a tiny guest that
//! is a sixth of the whole.
//!
//! A VMM process is marked as its VM directory's for good (see
//! `banger_vmm::process`), so a spare is started in the directory of the VM
//! that will take it: `vms/<id>`, an id chosen ahead, which that VM then
//! gets. Until it is taken no record names the id, and the directory holds
//! a `spare` file. Reconcile kills what runs in such a directory and
//! removes it (a daemon killed with a spare waiting); a daemon that stops
//! does the same with its own.
//!
//! Taken by a creation, the process is the VM's: between the record and
//! the launch it is remembered here (`taken`), and every way a creation or
//! a start can fail before the launch kills it (`spare_release`). After
//! the launch, it is the VM's VMM like any other.
//!
//! A spare also holds copies of the disks of the snapshot the last
//! restore came from, made while nothing waited on them: a restore from
//! that same snapshot (the common case: many sandboxes from one base, the
//! warm pool's refills) then has its disks in place, and skips the 1 ms
//! copy its start would make. Any other VM that takes the spare has them
//! removed first.
//!
//! Only for Firecracker without a jailer (a jail is made for its VM), and
//! only when Firecracker is the daemon's back-end: one idle process, about
//! 3 MB of memory.

use super::{alloc, VmService};
use crate::kernel;
use crate::sync::Locked;
use banger_store::VmRecord;
use banger_vmm::{process, VmmKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The file that marks a directory as a spare's, not yet a VM's.
pub(super) const SPARE_FILE: &str = "spare";

/// A Firecracker waiting in `vms/<id>`.
pub(super) struct Spare {
    pub id: String,
    pub pid: u32,
    /// The snapshot (its directory) whose disks are in place, as the
    /// disks of the VM that takes it.
    pub disks_of: Option<PathBuf>,
}

/// What a VM's launch takes over from the spare it was made with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Handed {
    pub pid: u32,
    /// Its disks are already its snapshot's: the restore's first launch
    /// copies nothing.
    pub disks_filled: bool,
}

#[derive(Default)]
pub(super) struct Spares {
    ready: Mutex<Option<Spare>>,
    /// Spares taken by a creation, until its launch takes the process:
    /// by VM id.
    taken: Mutex<HashMap<String, Handed>>,
    /// The snapshot the last restore came from: the next spare holds
    /// copies of its disks.
    restored_from: Mutex<Option<PathBuf>>,
    /// Wakes the keeper: a spare was taken, or found gone.
    kick: tokio::sync::Notify,
}

impl VmService {
    /// Whether a spare is kept: Firecracker is the back-end, without a
    /// jailer, and installed.
    pub fn spare_wanted(&self) -> bool {
        self.settings.jail.is_none()
            && matches!(self.resolve_vmm(), Ok(VmmKind::Firecracker))
            && self.firecracker_binary().is_some()
    }

    /// Keeps a spare ready until `stop`: one at once, and a new one
    /// whenever it is taken; then stops it. Runs after reconcile, which
    /// removed the spare a killed daemon left. A fill under way is never
    /// cut short: its process would be left running.
    pub async fn spare_keeper(self: Arc<Self>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            banger_proto::opid::run_as(banger_proto::OpId::mint(), "vm.spare", self.spare_fill()).await;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.spares.kick.notified() => {}
            }
        }
        banger_proto::opid::run_as(banger_proto::OpId::mint(), "vm.spare", self.spare_discard()).await;
    }

    /// Starts a spare unless one is ready.
    async fn spare_fill(&self) {
        if self.spares.ready.locked().is_some() {
            return;
        }
        let id = alloc::vm_id(kernel::rand_u32(), kernel::rand_u32());
        let dir = self.settings.vms_dir.join(&id);
        let from = self.spares.restored_from.locked().clone();
        let made = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(SPARE_FILE), b""));
        // The disks are copied while Firecracker starts.
        let copying = match (&made, from.clone()) {
            (Ok(()), Some(snap)) => {
                let disks = vm_disks(&dir);
                Some(tokio::task::spawn_blocking(move || copy_disks(&snap, &disks)))
            }
            _ => None,
        };
        let started = match made {
            Ok(()) => match banger_vmm::firecracker::Firecracker::detect(self.firecracker_binary(), None) {
                Ok(fc) => fc.prestart(&dir).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(banger_vmm::VmmError::io(format!("creating {}", dir.display()), e)),
        };
        let copied = match copying {
            // Not if the snapshot was removed meanwhile.
            Some(c) => match c.await {
                Ok(Ok(())) => *self.spares.restored_from.locked() == from,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "the spare holds no disks");
                    false
                }
                Err(_) => false,
            },
            None => false,
        };
        match started {
            Ok(pid) => {
                if !copied {
                    remove_disks(&dir);
                }
                let disks_of = from.filter(|_| copied);
                tracing::info!(pid, dir = %dir.display(), disks_of = ?disks_of, "spare Firecracker ready");
                *self.spares.ready.locked() = Some(Spare { id, pid, disks_of });
            }
            // Tried again at the next take, not in a loop.
            Err(e) => {
                tracing::warn!(error = %e, "could not start a spare Firecracker");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    /// The ready spare, for a new VM of back-end `vmm` that starts at once,
    /// restored from the snapshot in `restore` if any; the keeper starts
    /// the next one when told by [`Self::spare_refill`].
    pub(super) fn spare_take(&self, vmm: &str, restore: Option<&Path>) -> Option<Spare> {
        if vmm != VmmKind::Firecracker.as_str() || self.settings.jail.is_some() {
            return None;
        }
        if let Some(r) = restore {
            *self.spares.restored_from.locked() = Some(r.to_path_buf());
        }
        let mut spare = self.spares.ready.locked().take()?;
        let dir = self.settings.vms_dir.join(&spare.id);
        if process::alive(spare.pid, &dir.display().to_string()) {
            // Disks of another snapshot, or for a VM that makes its own.
            if spare.disks_of.is_some() && spare.disks_of.as_deref() != restore {
                remove_disks(&dir);
                spare.disks_of = None;
            }
            return Some(spare);
        }
        tracing::warn!(pid = spare.pid, "the spare Firecracker had exited");
        let _ = std::fs::remove_dir_all(&dir);
        None
    }

    /// Records that VM `vm` (the spare's id, its record written) owns the
    /// spare's process, and drops the directory's spare mark.
    pub(super) fn spare_handed_over(&self, spare: Spare, vm_dir: &Path) {
        let handed = Handed {
            pid: spare.pid,
            disks_filled: spare.disks_of.is_some(),
        };
        self.spares.taken.locked().insert(spare.id, handed);
        let _ = std::fs::remove_file(vm_dir.join(SPARE_FILE));
    }

    /// Drops the spare's copies of the disks of the snapshot in `snap`,
    /// which is being removed: its space is given back with it.
    pub(super) fn spare_forget_snapshot(&self, snap: &Path) {
        {
            let mut from = self.spares.restored_from.locked();
            if from.as_deref() == Some(snap) {
                *from = None;
            }
        }
        let mut ready = self.spares.ready.locked();
        if let Some(s) = ready.as_mut().filter(|s| s.disks_of.as_deref() == Some(snap)) {
            remove_disks(&self.settings.vms_dir.join(&s.id));
            s.disks_of = None;
        }
    }

    /// Stops a spare that a creation took but could not record, and asks
    /// for a new one. Never put back: the keeper may be making the next
    /// one already, and the ready slot is its alone to fill.
    pub(super) fn spare_drop(&self, spare: Spare) {
        let dir = self.settings.vms_dir.join(&spare.id);
        process::kill_now(spare.pid, &dir.display().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        self.spare_refill();
    }

    /// What VM `id` took from its spare, for its launch.
    pub(super) fn spare_for_launch(&self, id: &str) -> Option<Handed> {
        self.spares.taken.locked().remove(id)
    }

    /// Kills the spare process `vm` took, if its launch never got it.
    pub(super) async fn spare_release(&self, vm: &VmRecord) {
        let taken = self.spares.taken.locked().remove(&vm.id);
        if let Some(h) = taken {
            process::kill(h.pid, &vm.runtime.vm_dir).await;
            self.spare_refill();
        }
    }

    /// Asks the keeper for a new spare, once the start that took one is
    /// over (so the new process does not compete with that guest for the
    /// CPU).
    pub(super) fn spare_refill(&self) {
        self.spares.kick.notify_one();
    }

    /// Stops the ready spare and removes its directory (daemon shutdown).
    async fn spare_discard(&self) {
        let spare = self.spares.ready.locked().take();
        if let Some(s) = spare {
            let dir = self.settings.vms_dir.join(&s.id);
            process::kill(s.pid, &dir.display().to_string()).await;
            let _ = std::fs::remove_dir_all(&dir);
            tracing::info!(pid = s.pid, "spare Firecracker stopped");
        }
    }
}

/// Is `dir` a spare's directory, taken by no VM?
pub(super) fn is_spare_dir(dir: &Path) -> bool {
    dir.join(SPARE_FILE).is_file()
}

/// Kills whatever runs for the spare directory `dir` and removes it.
pub(super) async fn remove_spare_dir(dir: PathBuf) {
    let marker = dir.display().to_string();
    for pid in process::find_by_marker(&marker) {
        process::kill(pid, &marker).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The disks of a VM whose directory is `dir`, where its record puts them.
fn vm_disks(dir: &Path) -> (PathBuf, PathBuf) {
    let rt = alloc::creating_runtime(dir, 0, None, None);
    (PathBuf::from(rt.overlay_path), PathBuf::from(rt.work_disk_path))
}

/// Copies the disks of the snapshot in `snap` to `disks`, as a restore's
/// first start does.
pub(super) fn copy_disks(snap: &Path, (overlay, work): &(PathBuf, PathBuf)) -> std::io::Result<()> {
    let (from_overlay, from_work) = super::snapshot::disks(snap);
    crate::sys::sparse_copy_over(&from_overlay, overlay)?;
    crate::sys::sparse_copy_over(&from_work, work)
}

/// Removes the disks a spare holds (a creation makes its own, or copies
/// another snapshot's).
fn remove_disks(dir: &Path) {
    let (overlay, work) = vm_disks(dir);
    let _ = std::fs::remove_file(overlay);
    let _ = std::fs::remove_file(work);
}
