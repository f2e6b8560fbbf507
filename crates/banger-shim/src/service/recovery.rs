//! The task server's records (see `record`): written on every change of
//! a task's processes, read back by a server the keeper restarted.

use super::{session_exit, Proc, Service, TaskState};
use crate::record::{ProcRecord, Status, TaskRecord};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use std::collections::HashMap;
use std::sync::Arc;

fn proc_record(p: &Proc) -> ProcRecord {
    ProcRecord {
        process: p.process.clone(),
        io: p.io.clone(),
        status: p.status,
        pid: p.pid,
        exit: p.exit.as_ref().map(|(c, at)| (*c, at.seconds, at.nanos)),
        relay_pid: p.relay_pid,
    }
}

fn proc_from(r: ProcRecord) -> Proc {
    Proc {
        process: r.process,
        io: r.io,
        status: r.status,
        pid: r.pid,
        exit: r.exit.map(|(c, s, n)| {
            let mut t = Timestamp::new();
            t.seconds = s;
            t.nanos = n;
            (c, t)
        }),
        child: None,
        stdin_closed: Arc::default(),
        pty: None,
        relay_pid: r.relay_pid,
    }
}

impl TaskState {
    fn record(&self) -> TaskRecord {
        TaskRecord {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            vm: self.vm.clone(),
            session: self.session.clone(),
            root: self.root.clone(),
            owns_vm: self.owns_vm,
            main: proc_record(&self.main),
            execs: self
                .execs
                .iter()
                .map(|(k, p)| (k.clone(), proc_record(p)))
                .collect(),
        }
    }
}

impl Service {
    /// Writes task `id` down (or removes its record if it is gone).
    pub(super) fn save(&self, id: &str) {
        let Some(records) = &self.records else { return };
        let rec = self
            .tasks
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(TaskState::record);
        match rec {
            Some(r) => {
                if let Err(e) = records.save(&r) {
                    log::warn!("task={id} recording its state: {e}");
                }
            }
            None => records.remove(id),
        }
    }

    /// Takes over the tasks of a server that died: each running process
    /// is followed to its end through its relay, an orphan now.
    pub(super) fn restore(&self) {
        let Some(records) = self.records.clone() else {
            return;
        };
        let recs = records.load();
        if recs.is_empty() {
            return;
        }
        let mut running = Vec::new();
        {
            let mut tasks = self.tasks.0.lock().unwrap_or_else(|p| p.into_inner());
            for r in recs {
                let t = TaskState {
                    id: r.id.clone(),
                    bundle: r.bundle,
                    vm: r.vm,
                    session: r.session,
                    root: r.root,
                    owns_vm: r.owns_vm,
                    main: proc_from(r.main),
                    execs: r
                        .execs
                        .into_iter()
                        .map(|(k, p)| (k, proc_from(p)))
                        .collect::<HashMap<_, _>>(),
                };
                for (exec_id, p) in std::iter::once((String::new(), &t.main))
                    .chain(t.execs.iter().map(|(k, p)| (k.clone(), p)))
                {
                    if p.status == Status::Running {
                        running.push((t.id.clone(), exec_id, p.relay_pid, t.target()));
                    }
                }
                log::info!("task={} taken over from the last task server", t.id);
                tasks.insert(r.id, t);
            }
        }
        for (id, exec_id, relay, at) in running {
            let (svc, records) = (self.clone(), records.clone());
            std::thread::spawn(move || {
                let relayed = relay.and_then(|pid| records.wait_orphan(pid));
                let code = if exec_id.is_empty() {
                    // The session's own account of its end.
                    session_exit(&id, &at.vm, &at.session)
                } else {
                    relayed.unwrap_or(255)
                };
                svc.exited(&id, &exec_id, code);
                if exec_id.is_empty() && at.owns_vm {
                    let _ = crate::banger::run(&id, "vm kill", &["vm", "kill", &at.vm]);
                }
            });
        }
    }
}

/// A process a restarted server took over has no child handle: its relay
/// (an orphan the keeper reaps) is killed by pid.
pub(super) fn kill_orphan(pid: Option<u32>) {
    if let Some(pid) = pid.filter(|p| *p > 1) {
        // SAFETY: plain kill(2) of the exec's relay, an orphan we reap.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}
