//! Asynchronous operations, keyed by the op id of the call that began them.

use banger_proto::methods::daemon::OperationInfo;
use banger_proto::{OpId, RpcError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct Op {
    kind: String,
    subject: String,
    started: Instant,
    stages: Vec<(String, Instant)>,
    done: bool,
    error: Option<RpcError>,
}

/// Registry of operations; finished ones stay listed until the daemon exits.
#[derive(Default)]
pub struct Operations {
    ops: Mutex<BTreeMap<OpId, Op>>,
}

impl Operations {
    pub fn begin(self: &Arc<Self>, op_id: &OpId, kind: &str, subject: &str) -> OpHandle {
        let now = Instant::now();
        self.lock().insert(
            op_id.clone(),
            Op {
                kind: kind.into(),
                subject: subject.into(),
                started: now,
                stages: vec![("queued".into(), now)],
                done: false,
                error: None,
            },
        );
        OpHandle {
            ops: self.clone(),
            id: op_id.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<OpId, Op>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &OpId) -> Option<OperationInfo> {
        self.lock().get(id).map(|o| info(id, o))
    }

    /// Each stage of an operation with the time it began, relative to the start.
    pub fn stages(&self, id: &OpId) -> Vec<(String, u64)> {
        self.lock()
            .get(id)
            .map(|o| {
                o.stages
                    .iter()
                    .map(|(n, t)| (n.clone(), t.duration_since(o.started).as_millis() as u64))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn list(&self) -> Vec<OperationInfo> {
        self.lock().iter().map(|(id, o)| info(id, o)).collect()
    }
}

fn info(id: &OpId, o: &Op) -> OperationInfo {
    OperationInfo {
        op_id: id.to_string(),
        kind: o.kind.clone(),
        subject: o.subject.clone(),
        stage: o.stages.last().map(|s| s.0.clone()).unwrap_or_default(),
        done: o.done,
        elapsed_ms: o.started.elapsed().as_millis() as u64,
        error: o.error.clone(),
    }
}

/// The running side of one operation.
pub struct OpHandle {
    ops: Arc<Operations>,
    id: OpId,
}

impl OpHandle {
    pub fn id(&self) -> &OpId {
        &self.id
    }

    pub fn stage(&self, name: &str) {
        if let Some(o) = self.ops.lock().get_mut(&self.id) {
            tracing::info!(
                stage = name,
                elapsed_ms = o.started.elapsed().as_millis() as u64,
                "operation stage"
            );
            o.stages.push((name.into(), Instant::now()));
        }
    }

    pub fn finish(self, result: Result<(), RpcError>) {
        if let Some(o) = self.ops.lock().get_mut(&self.id) {
            o.done = true;
            o.error = result.err().map(|e| e.with_op_id(&self.id));
            o.stages.push((
                if o.error.is_some() { "failed" } else { "done" }.into(),
                Instant::now(),
            ));
        }
    }
}
