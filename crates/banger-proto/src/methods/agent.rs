//! The guest agent's API, spoken over vsock (port [`AGENT_PORT`]).

use super::{method, Empty};
use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentHealth {
    pub version: String,
    pub hostname: String,
    pub uptime_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Bytes fed to the command's stdin, then closed (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// A chunk of a command's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecOutput {
    pub stream: StreamName,
    /// Raw bytes, base64: output need not be UTF-8.
    pub data_b64: String,
}

/// How a command ended: an exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

method!(
    /// Liveness of the agent.
    Health = "agent.health", Empty => AgentHealth
);
method!(
    /// Runs a command, streaming its output.
    Exec = "agent.exec", ExecRequest => ExitStatus, event ExecOutput
);
method!(
    /// Flushes the guest's filesystems.
    Sync = "agent.sync", Empty => Empty
);
method!(
    /// Syncs and powers the guest off right after answering.
    Poweroff = "agent.poweroff", Empty => Empty
);
