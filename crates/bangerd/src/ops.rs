//! Operations: every mutating verb runs as one, in a task of its own, keyed
//! by the op id of the call that began it and by its kind.
//!
//! Why a task of its own: a request's future is dropped when its client
//! hangs up. A lifecycle verb cut in half that way (tap and VMM made, record
//! not yet written) leaves the record lying about reality. An operation
//! runs to its end, or to its own rollback, whoever is still listening;
//! a hang-up only detaches the client. A panic ends the operation with an
//! error instead of leaving it "running" for ever.

use crate::sync::Locked;
use banger_proto::methods::daemon::OperationInfo;
use banger_proto::{opid, OpId, RpcError};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Finished operations kept for `daemon operations` (oldest dropped first).
const KEEP_FINISHED: usize = 256;

type Key = (OpId, String);

struct Op {
    subject: String,
    started: Instant,
    stages: Vec<(String, Instant)>,
    done: bool,
    error: Option<RpcError>,
    seq: u64,
}

/// Registry of operations; the newest finished ones stay listed.
#[derive(Default)]
pub struct Operations {
    ops: Mutex<(BTreeMap<Key, Op>, u64)>,
}

tokio::task_local! {
    static CURRENT: OpHandle;
}

/// Records a stage of the operation this task runs, if any (a verb called
/// outside an operation, e.g. by reconcile, reports nowhere).
pub fn stage(name: &str) {
    let _ = CURRENT.try_with(|op| op.stage(name));
}

impl Operations {
    /// Registers an operation; run it with [`OpHandle::run`].
    pub fn begin(self: &Arc<Self>, op_id: &OpId, kind: &str, subject: &str) -> OpHandle {
        let now = Instant::now();
        let mut g = self.lock();
        g.1 += 1;
        let seq = g.1;
        g.0.insert(
            (op_id.clone(), kind.to_string()),
            Op {
                subject: subject.into(),
                started: now,
                stages: vec![("queued".into(), now)],
                done: false,
                error: None,
                seq,
            },
        );
        OpHandle {
            ops: self.clone(),
            key: (op_id.clone(), kind.to_string()),
        }
    }

    /// Runs `fut` as operation `kind` on `subject` under the current op id:
    /// see [`OpHandle::run`].
    pub fn run<T, F>(
        self: &Arc<Self>,
        op_id: &OpId,
        kind: &str,
        subject: &str,
        fut: F,
    ) -> impl Future<Output = Result<T, RpcError>>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, RpcError>> + Send + 'static,
    {
        self.begin(op_id, kind, subject).run(fut)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeMap<Key, Op>, u64)> {
        // The registry holds plain data; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still good to use.
        self.ops.locked()
    }

    /// The operation `kind` begun by `id`.
    pub fn get(&self, id: &OpId, kind: &str) -> Option<OperationInfo> {
        let key = (id.clone(), kind.to_string());
        self.lock().0.get(&key).map(|o| info(&key, o))
    }

    /// Each stage of an operation with the time it began, relative to the start.
    pub fn stages(&self, id: &OpId, kind: &str) -> Vec<(String, u64)> {
        self.lock()
            .0
            .get(&(id.clone(), kind.to_string()))
            .map(|o| {
                o.stages
                    .iter()
                    .map(|(n, t)| (n.clone(), t.duration_since(o.started).as_millis() as u64))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every known operation, oldest first.
    pub fn list(&self) -> Vec<OperationInfo> {
        let g = self.lock();
        let mut all: Vec<_> = g.0.iter().collect();
        all.sort_by_key(|(_, o)| o.seq);
        all.into_iter().map(|(k, o)| info(k, o)).collect()
    }

    fn prune_finished(map: &mut BTreeMap<Key, Op>) {
        let mut finished: Vec<(u64, Key)> = map
            .iter()
            .filter(|(_, o)| o.done)
            .map(|(k, o)| (o.seq, k.clone()))
            .collect();
        let excess = finished.len().saturating_sub(KEEP_FINISHED);
        finished.sort();
        for (_, k) in finished.into_iter().take(excess) {
            map.remove(&k);
        }
    }
}

fn info((id, kind): &Key, o: &Op) -> OperationInfo {
    OperationInfo {
        op_id: id.to_string(),
        kind: kind.clone(),
        subject: o.subject.clone(),
        stage: o.stages.last().map(|s| s.0.clone()).unwrap_or_default(),
        done: o.done,
        elapsed_ms: o.started.elapsed().as_millis() as u64,
        error: o.error.clone(),
    }
}

/// The running side of one operation.
#[derive(Clone)]
pub struct OpHandle {
    ops: Arc<Operations>,
    key: Key,
}

impl OpHandle {
    pub fn id(&self) -> &OpId {
        &self.key.0
    }

    pub fn stage(&self, name: &str) {
        if let Some(o) = self.ops.lock().0.get_mut(&self.key) {
            tracing::info!(
                stage = name,
                elapsed_ms = o.started.elapsed().as_millis() as u64,
                "operation stage"
            );
            o.stages.push((name.into(), Instant::now()));
        }
    }

    fn finish(&self, result: Result<(), RpcError>) {
        let mut g = self.ops.lock();
        if let Some(o) = g.0.get_mut(&self.key) {
            o.done = true;
            o.error = result.err().map(|e| e.with_op_id(&self.key.0));
            o.stages.push((
                if o.error.is_some() { "failed" } else { "done" }.into(),
                Instant::now(),
            ));
        }
        Operations::prune_finished(&mut g.0);
    }

    /// Starts `fut` at once in a task of its own (keeping the current op id
    /// and span) and returns a future of its result. Dropping that future
    /// only detaches: the operation still runs to its end and is recorded
    /// as done or failed, including when it panics.
    pub fn run<T, F>(self, fut: F) -> impl Future<Output = Result<T, RpcError>>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, RpcError>> + Send + 'static,
    {
        let kind = self.key.1.clone();
        let work = opid::spawn(CURRENT.scope(self.clone(), fut));
        let supervised = opid::spawn(async move {
            let res = match work.await {
                Ok(r) => r,
                Err(e) => {
                    let why = if e.is_panic() { "panicked" } else { "was aborted" };
                    tracing::error!(kind = %kind, "operation {why}");
                    Err(RpcError::failed(format!(
                        "{kind} {why} inside the daemon (a bug; see bangerd.log)"
                    )))
                }
            };
            if let Err(e) = &res {
                tracing::warn!(kind = %kind, error = %e.message, "operation failed");
            }
            self.finish(res.as_ref().map(|_| ()).map_err(Clone::clone));
            res
        });
        async move {
            supervised
                .await
                .unwrap_or_else(|e| Err(RpcError::failed(format!("operation task lost: {e}"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_detached_operation_still_finishes() {
        let ops = Arc::new(Operations::default());
        let id = OpId::mint();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let fut = ops.run(&id, "vm.start", "a", async move {
            stage("boot");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(());
            Ok(())
        });
        drop(fut); // the client hung up
        rx.await.expect("the operation ran to its end");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let info = ops.get(&id, "vm.start").unwrap();
        assert!(info.done && info.error.is_none(), "{info:?}");
        let stages: Vec<String> = ops.stages(&id, "vm.start").into_iter().map(|s| s.0).collect();
        assert_eq!(stages, ["queued", "boot", "done"]);
    }

    #[tokio::test]
    async fn a_panicking_operation_ends_with_an_error() {
        let ops = Arc::new(Operations::default());
        let id = OpId::mint();
        let res: Result<(), RpcError> = ops
            .run(&id, "vm.stop", "a", async {
                if true {
                    panic!("boom");
                }
                Ok(())
            })
            .await;
        assert!(res.unwrap_err().message.contains("panicked"));
        let info = ops.get(&id, "vm.stop").unwrap();
        assert!(info.done && info.error.is_some());
    }

    #[tokio::test]
    async fn one_op_id_may_carry_several_kinds_and_old_ones_are_dropped() {
        let ops = Arc::new(Operations::default());
        let id = OpId::mint();
        ops.run(&id, "vm.create", "a", async { Ok(()) }).await.unwrap();
        ops.run(&id, "vm.delete", "a", async { Ok(()) }).await.unwrap();
        assert!(ops.get(&id, "vm.create").is_some() && ops.get(&id, "vm.delete").is_some());
        for _ in 0..KEEP_FINISHED + 10 {
            ops.run(&OpId::mint(), "vm.start", "b", async { Ok(()) })
                .await
                .unwrap();
        }
        assert_eq!(ops.list().len(), KEEP_FINISHED);
        assert!(ops.get(&id, "vm.create").is_none(), "the oldest went first");
    }
}
