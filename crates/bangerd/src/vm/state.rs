//! The rules about [`VmState`]: which operations a state admits, and what
//! reconcile does with a VM it finds in each state after a restart.
//!
//! Pure, so the rules are tested without a VM. Liveness is not a state:
//! whether the VMM runs is `VmService::is_alive`, passed in where a rule
//! needs it.
//!
//! A VM in `Creating` belongs to its create task (or, after a crash, to
//! reconcile, which discards it). `start`, `stop`, `kill` and `delete`
//! check the guards under the VM's lifecycle lock. `Starting`, `Stopping`
//! and `Deleting` are intents, written before any side effect, so that a
//! daemon killed at any line leaves a record that says what to finish or
//! undo.

use banger_store::VmState;

/// What reconcile does, at daemon start, with a VM recorded in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Creation was interrupted: tear down and remove directory and row.
    Discard,
    /// Recorded as up: adopt it if the VMM lives, else clean up and mark stopped.
    AdoptOrCleanUp,
    /// A start or a stop was cut short: tear everything down (undoing the
    /// start, finishing the stop) and mark the VM stopped.
    TearDown,
    /// A deletion was cut short: finish it.
    FinishDelete,
    /// Recorded as down: make sure nothing runs for it.
    EnsureNothingRuns,
}

pub trait Lifecycle: Copy {
    /// Whether `start` may boot a VM in this state.
    fn can_start(self) -> bool;
    /// Whether `stop`/`kill` may act on a VM in this state.
    fn can_stop(self) -> bool;
    /// Whether `delete` may remove a VM in this state.
    fn can_delete(self) -> bool;
    /// Whether `prune` deletes the VM: not running and deletable.
    fn prunable(self, alive: bool) -> bool;
    /// Whether `<name>.vm` resolves: only for a VM recorded as running.
    fn serves_dns(self) -> bool;
    /// What reconcile does with a VM recorded in this state.
    fn recovery(self) -> Recovery;
}

impl Lifecycle for VmState {
    fn can_start(self) -> bool {
        !matches!(self, VmState::Creating | VmState::Deleting)
    }

    fn can_stop(self) -> bool {
        !matches!(self, VmState::Creating | VmState::Deleting)
    }

    fn can_delete(self) -> bool {
        self != VmState::Creating
    }

    fn prunable(self, alive: bool) -> bool {
        !alive && self.can_delete()
    }

    fn serves_dns(self) -> bool {
        self == VmState::Running
    }

    fn recovery(self) -> Recovery {
        match self {
            VmState::Creating => Recovery::Discard,
            VmState::Running => Recovery::AdoptOrCleanUp,
            VmState::Starting | VmState::Stopping => Recovery::TearDown,
            VmState::Deleting => Recovery::FinishDelete,
            VmState::Stopped | VmState::Failed => Recovery::EnsureNothingRuns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [VmState; 7] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Failed,
        VmState::Deleting,
    ];

    #[test]
    fn a_creating_vm_belongs_to_its_create_task() {
        let s = VmState::Creating;
        assert!(!s.can_start());
        assert!(!s.can_stop());
        assert!(!s.can_delete());
        assert!(!s.prunable(false));
        for s in ALL
            .into_iter()
            .filter(|s| !matches!(s, VmState::Creating | VmState::Deleting))
        {
            assert!(s.can_start() && s.can_stop() && s.can_delete(), "{s:?}");
        }
        // A VM being deleted cannot be brought back up; deleting it again
        // finishes the job.
        assert!(!VmState::Deleting.can_start() && !VmState::Deleting.can_stop());
        assert!(VmState::Deleting.can_delete());
    }

    #[test]
    fn prune_spares_live_and_creating_vms() {
        for s in ALL {
            assert!(!s.prunable(true), "{s:?} alive");
        }
        assert!(VmState::Stopped.prunable(false));
        assert!(VmState::Failed.prunable(false));
        // Recorded as running but the VMM is gone: prune removes it.
        assert!(VmState::Running.prunable(false));
    }

    #[test]
    fn only_running_vms_resolve() {
        let serving: Vec<_> = ALL.into_iter().filter(|s| s.serves_dns()).collect();
        assert_eq!(serving, [VmState::Running]);
    }

    #[test]
    fn reconcile_recovers_each_state() {
        assert_eq!(VmState::Creating.recovery(), Recovery::Discard);
        assert_eq!(VmState::Running.recovery(), Recovery::AdoptOrCleanUp);
        // An interrupted start is undone, never adopted half-made; an
        // interrupted stop is finished.
        for s in [VmState::Starting, VmState::Stopping] {
            assert_eq!(s.recovery(), Recovery::TearDown, "{s:?}");
        }
        assert_eq!(VmState::Deleting.recovery(), Recovery::FinishDelete);
        for s in [VmState::Stopped, VmState::Failed] {
            assert_eq!(s.recovery(), Recovery::EnsureNothingRuns, "{s:?}");
        }
    }
}
