//! Operation ids: one identifier per RPC, carried across every process.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An operation id such as `op-3fa91c0d2e`.
///
/// Minted at dispatch (or adopted from the request envelope when the caller
/// already has one), logged on every line, stamped on every error.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct OpId(String);

impl OpId {
    /// Mints a fresh random id.
    pub fn mint() -> Self {
        let n: u64 = rand::random();
        OpId(format!("op-{:010x}", n & 0xff_ffff_ffff))
    }

    /// Accepts an id from a peer if it is well formed. A peer is not trusted to
    /// put arbitrary text into our logs, so anything odd is rejected and the
    /// caller mints a fresh one instead.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.starts_with("op-")
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ok.then(|| OpId(s.to_string()))
    }

    /// Adopts the peer's id when valid, otherwise mints one.
    pub fn adopt_or_mint(s: Option<&str>) -> Self {
        s.and_then(Self::parse).unwrap_or_else(Self::mint)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

tokio::task_local! {
    static CURRENT: OpId;
}

/// Runs `fut` with `op` as the task's current op id (see [`current`]).
pub async fn scope<F: std::future::Future>(op: OpId, fut: F) -> F::Output {
    CURRENT.scope(op, fut).await
}

/// The op id of the RPC this task is serving, if any.
pub fn current() -> Option<OpId> {
    CURRENT.try_with(|o| o.clone()).ok()
}

/// Spawns `fut` as a task that keeps the spawner's op id (for helper and
/// agent calls, through [`current`]) and its tracing span (for log lines).
/// Use it instead of a bare `tokio::spawn` for any work done on behalf of
/// an operation: a task-local does not travel into a new task by itself.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    let span = tracing::Span::current();
    match current() {
        Some(op) => tokio::spawn(CURRENT.scope(op, fut).instrument(span)),
        None => tokio::spawn(fut.instrument(span)),
    }
}

/// Runs `fut` as background work under an op id of its own: a fresh id,
/// scoped as the current one and on a span named `what`, so every log line
/// and every helper call it makes carries that one id.
pub async fn run_as<F: std::future::Future>(op: OpId, what: &'static str, fut: F) -> F::Output {
    use tracing::Instrument;
    let span = tracing::info_span!("background", op_id = %op, method = what);
    CURRENT.scope(op, fut).instrument(span).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_parse_and_differ() {
        let a = OpId::mint();
        let b = OpId::mint();
        assert!(OpId::parse(a.as_str()).is_some());
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn spawned_tasks_keep_the_op_id_of_their_spawner() {
        let op = OpId::mint();
        let inner = scope(op.clone(), async { spawn(async { current() }).await.unwrap() }).await;
        assert_eq!(inner, Some(op));
        // A bare spawn loses it: the reason `spawn` exists.
        let lost = scope(OpId::mint(), async {
            tokio::spawn(async { current() }).await.unwrap()
        })
        .await;
        assert_eq!(lost, None);
    }

    #[test]
    fn hostile_ids_are_replaced() {
        assert!(OpId::parse("op-abc\n{\"x\":1}").is_none());
        assert!(OpId::parse("").is_none());
        assert!(OpId::parse(&format!("op-{}", "a".repeat(80))).is_none());
        let adopted = OpId::adopt_or_mint(Some("op-123abc"));
        assert_eq!(adopted.as_str(), "op-123abc");
        let minted = OpId::adopt_or_mint(Some("DROP TABLE"));
        assert_ne!(minted.as_str(), "DROP TABLE");
    }
}
