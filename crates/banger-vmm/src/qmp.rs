//! A QMP client: one connection, capabilities negotiated, commands with
//! arguments, the events QEMU interleaves skipped.

use crate::VmmError;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub struct Qmp {
    sock: String,
    lines: Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Qmp {
    /// Connects and negotiates, within 5 s: a QEMU that accepts but never
    /// greets (stopped, say) is an error, not a hang.
    pub async fn connect(sock: &Path) -> Result<Self, VmmError> {
        tokio::time::timeout(Duration::from_secs(5), Self::connect_now(sock))
            .await
            .map_err(|_| VmmError::Failed(format!("no QMP greeting on {} within 5 s", sock.display())))?
    }

    async fn connect_now(sock: &Path) -> Result<Self, VmmError> {
        let name = sock.display().to_string();
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| VmmError::io(format!("QMP connect on {name}"), e))?;
        let (rd, wr) = stream.into_split();
        let mut q = Qmp {
            sock: name,
            lines: BufReader::new(rd).lines(),
            wr,
        };
        // The greeting, then capabilities negotiation.
        q.lines
            .next_line()
            .await
            .map_err(|e| VmmError::io(format!("QMP greeting on {}", q.sock), e))?;
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    /// Runs `command`; its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.wr
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .map_err(|e| VmmError::io(format!("QMP {command} on {}", self.sock), e))?;
        loop {
            let v = self.message(command).await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(VmmError::Failed(format!("QMP {command}: {err}")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// The next message QEMU sends (an answer or an event), read while
    /// waiting for `during`.
    async fn message(&mut self, during: &str) -> Result<Value, VmmError> {
        let Some(line) = self
            .lines
            .next_line()
            .await
            .map_err(|e| VmmError::io(format!("QMP {during} on {}", self.sock), e))?
        else {
            return Err(VmmError::Failed(format!("QMP closed during {during}")));
        };
        serde_json::from_str(&line).map_err(|e| VmmError::Failed(format!("QMP sent {line:?}: {e}")))
    }

    /// Asks for `MIGRATION` events, so that [`Self::wait_migration`] hears
    /// the end at once instead of polling QEMU's main loop (which is also
    /// the one moving the migration).
    pub async fn migration_events(&mut self) -> Result<(), VmmError> {
        self.execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({
                "capabilities": [{ "capability": "events", "state": true }]
            })),
        )
        .await
        .map(drop)
    }

    /// Lifts the migration's bandwidth limit (128 MiB/s by default): a
    /// snapshot goes to a local file, and the VM waits paused meanwhile.
    pub async fn unthrottle(&mut self) -> Result<(), VmmError> {
        self.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
        )
        .await
        .map(drop)
    }

    /// The next event named `name`, skipping others.
    async fn next_event(&mut self, name: &str) -> Result<Value, VmmError> {
        loop {
            let v = self.message(name).await?;
            if v.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(v);
            }
        }
    }

    /// Waits until the migration completed, failed, or `within` passed:
    /// woken by its `MIGRATION` events (see [`Self::migration_events`]),
    /// and asking `query-migrate` for the truth each time and every 100 ms.
    pub async fn wait_migration(&mut self, within: Duration) -> Result<(), VmmError> {
        let end = Instant::now() + within;
        loop {
            let v = self.execute("query-migrate", None).await?;
            match v.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                s @ ("failed" | "cancelled") => {
                    let why = v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(VmmError::Failed(format!("QEMU's migration {s}: {why}")));
                }
                _ if Instant::now() >= end => {
                    return Err(VmmError::Failed(format!(
                        "QEMU's migration did not finish within {within:?}"
                    )))
                }
                _ => {
                    let wait = end
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100));
                    let _ = tokio::time::timeout(wait, self.next_event("MIGRATION")).await;
                }
            }
        }
    }
}
