//! The error half of the protocol: a code a program can branch on, a message a
//! person can read, and the op id that ties it to the logs.

use crate::opid::OpId;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadVersion,
    UnknownMethod,
    BadRequest,
    NotFound,
    AlreadyExists,
    NotRunning,
    Unauthorized,
    OperationFailed,
    Cancelled,
    /// The target is in a state that forbids the call (a running session
    /// removed, an input already owned).
    Conflict,
    /// A code this build does not know, sent by a newer peer.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotRunning => "not_running",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::OperationFailed => "operation_failed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it crosses the wire. Its display form ends with `(op-…)` when
/// an op id is set, so whoever prints it shows the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<OpId>,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            op_id: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AlreadyExists, message)
    }

    pub fn not_running(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotRunning, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::OperationFailed, message)
    }

    /// Stamps `op` unless an id is already present (an error relayed from the
    /// helper keeps the id it was minted with, which is the same one anyway).
    pub fn with_op_id(mut self, op: &OpId) -> Self {
        if self.op_id.is_none() {
            self.op_id = Some(op.clone());
        }
        self
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op_id {
            Some(op) => write!(f, "{} ({})", self.message, op),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for RpcError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_appends_op_id() {
        let e = RpcError::not_found("no such vm \"x\"").with_op_id(&OpId::parse("op-12ab").unwrap());
        assert_eq!(e.to_string(), "no such vm \"x\" (op-12ab)");
        assert_eq!(RpcError::not_found("plain").to_string(), "plain");
    }

    #[test]
    fn op_id_omitted_when_empty_and_unknown_codes_survive() {
        let json = serde_json::to_string(&RpcError::failed("boom")).unwrap();
        assert!(!json.contains("op_id"), "{json}");
        let e: RpcError = serde_json::from_str(r#"{"code":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Unknown);
    }
}
