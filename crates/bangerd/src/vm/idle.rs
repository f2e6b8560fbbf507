//! Stopping idle VMs: a VM whose idle limit is set (its own
//! `auto_stop_idle`, else the daemon's) is stopped once it has been idle
//! that long. Idle means: no exec, copy, workspace or session call in
//! flight, no guest session running, and the guest's CPU below a trickle
//! at every sample. Samples are the
//! agent's stats; a guest that does not answer counts as busy (it is not
//! stopped for being slow).

use super::{agent, VmService};
use crate::sync::Locked;
use banger_proto::methods::agent as a;
use banger_proto::OpId;
use banger_store::VmState;
use std::time::{Duration, Instant};

/// How often the watcher samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// CPU use (percent of the guest's CPU time) below which a sample is idle.
const IDLE_CPU_PERCENT: f64 = 5.0;

/// Counts a call that uses a VM; the VM is not idle while one is alive.
pub struct Busy<'a> {
    svc: &'a VmService,
    id: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut m = self.svc.busy.locked();
        if let Some(n) = m.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.id);
            }
        }
        // Activity just ended: the idle clock starts from now.
        self.svc.idle_since.locked().remove(&self.id);
    }
}

impl VmService {
    pub(crate) fn busy(&self, id: &str) -> Busy<'_> {
        *self.busy.locked().entry(id.to_string()).or_default() += 1;
        self.idle_since.locked().remove(id);
        Busy {
            svc: self,
            id: id.to_string(),
        }
    }

    /// Whether the guest runs a session (or cannot say: then it is taken
    /// as in use). An agent without sessions runs none.
    async fn runs_sessions(&self, uds: &std::path::Path, op: &OpId) -> bool {
        let list = tokio::time::timeout(
            Duration::from_secs(5),
            agent::call::<a::SessionListM>(uds, op, &banger_proto::methods::Empty {}, |_| ()),
        )
        .await;
        match list {
            Ok(Ok(l)) => l.sessions.iter().any(|s| s.state == a::SessionState::Running),
            Ok(Err(e)) if e.code == banger_proto::ErrorCode::UnknownMethod => false,
            _ => true,
        }
    }

    /// The idle limit of a VM: its own, else the daemon's; `None`: never.
    fn idle_limit(&self, own: Option<u64>) -> Option<Duration> {
        match own.unwrap_or(self.settings.auto_stop_idle_secs) {
            0 => None,
            s => Some(Duration::from_secs(s)),
        }
    }

    /// One pass of the watcher: samples every running VM that has a limit
    /// and stops those idle for longer than it.
    pub async fn stop_idle(&self) {
        let Ok(vms) = self.store.list_vms() else {
            return;
        };
        for vm in vms {
            let Some(limit) = self.idle_limit(vm.spec.auto_stop_idle_secs) else {
                continue;
            };
            // A pool VM waits for its taker, idle by design.
            if vm.runtime.state != VmState::Running
                || vm.runtime.pooled
                || self.busy.locked().contains_key(&vm.id)
            {
                self.idle_since.locked().remove(&vm.id);
                continue;
            }
            let Some(h) = self.cached(&vm.id) else {
                continue;
            };
            let op = OpId::mint();
            let sample = tokio::time::timeout(
                Duration::from_secs(5),
                agent::call::<a::Stats>(
                    &h.launched.vsock_uds,
                    &op,
                    &banger_proto::methods::Empty {},
                    |_| (),
                ),
            )
            .await;
            let idle = match sample {
                Ok(Ok(s)) if s.cpu_total_ticks > 0 => {
                    (s.cpu_busy_ticks.min(s.cpu_total_ticks) as f64 / s.cpu_total_ticks as f64) * 100.0
                        < IDLE_CPU_PERCENT
                }
                _ => false,
            };
            // A running session is use, however quiet: a server waiting
            // for requests, an agent waiting for its next task.
            let idle = idle && !self.runs_sessions(&h.launched.vsock_uds, &op).await;
            if !idle || self.busy.locked().contains_key(&vm.id) {
                self.idle_since.locked().remove(&vm.id);
                continue;
            }
            let since = *self
                .idle_since
                .locked()
                .entry(vm.id.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() < limit {
                continue;
            }
            self.idle_since.locked().remove(&vm.id);
            let name = vm.name.clone();
            banger_proto::opid::run_as(op.clone(), "idle stop", async {
                tracing::info!(vm = %name, idle_secs = limit.as_secs(), "stopping an idle VM");
                if let Err(e) = self.stop(&op, &name).await {
                    tracing::warn!(vm = %name, error = %e.message, "could not stop an idle VM");
                }
            })
            .await;
        }
    }
}
