//! Envelopes and framing: newline-delimited JSON with a hard size cap.
//!
//! Newline framing keeps the protocol debuggable with `socat`; the cap keeps
//! a hostile or broken peer from making us buffer without bound.

use crate::error::RpcError;
use crate::opid::OpId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The request envelope `{version, method, params, op_id?}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub method: String,
    #[serde(default)]
    pub params: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
}

/// What a server writes back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// Progress or output emitted while the call runs.
    Event { event: Value },
    /// The successful end of the call.
    Result {
        result: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        op_id: Option<String>,
    },
    /// The failed end of the call.
    Error { error: RpcError },
    /// Nothing to say yet, but the server is alive and the transport moves:
    /// sent by servers that promise a heartbeat (the guest agent), so that a
    /// client can tell a long, quiet call from a stalled one.
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame larger than {MAX_FRAME_BYTES} bytes")]
    TooLarge,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes a request envelope. On failure the op id to stamp on the error
/// is the peer's, when the frame was at least an object carrying a valid
/// one, else a fresh one.
pub fn decode_request(bytes: &[u8]) -> Result<(OpId, Request), (OpId, RpcError)> {
    let req: Request = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(e) => {
            let op = serde_json::from_slice::<Value>(bytes)
                .ok()
                .and_then(|v| v.get("op_id").and_then(|o| o.as_str()).map(str::to_owned));
            return Err((
                OpId::adopt_or_mint(op.as_deref()),
                RpcError::bad_request(format!("malformed request: {e}")),
            ));
        }
    };
    let op = OpId::adopt_or_mint(req.op_id.as_deref());
    Ok((op, req))
}

/// Reads one newline-terminated frame. `Ok(None)` is a clean end of stream.
pub async fn read_frame<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        if let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            if buf.len() + pos > MAX_FRAME_BYTES {
                return Err(FrameError::TooLarge);
            }
            buf.extend_from_slice(&chunk[..pos]);
            r.consume(pos + 1);
            return Ok(Some(buf));
        }
        let n = chunk.len();
        if buf.len() + n > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge);
        }
        buf.extend_from_slice(chunk);
        r.consume(n);
    }
}

/// Reads and decodes one frame as `T`.
pub async fn read_json<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncBufRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    match read_frame(r).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| FrameError::Malformed(e.to_string())),
    }
}

/// Encodes `v` as one frame and flushes it.
pub async fn write_json<W, T>(w: &mut W, v: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut bytes = serde_json::to_vec(v).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge);
    }
    bytes.push(b'\n');
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn oversize_frame_is_refused_not_buffered() {
        let big = vec![b'a'; MAX_FRAME_BYTES + 10];
        let mut r = BufReader::new(&big[..]);
        assert!(matches!(read_frame(&mut r).await, Err(FrameError::TooLarge)));
    }

    #[tokio::test]
    async fn frames_split_on_newlines() {
        let data = b"{\"a\":1}\n{\"b\":2}\n";
        let mut r = BufReader::with_capacity(3, &data[..]);
        assert_eq!(read_frame(&mut r).await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(read_frame(&mut r).await.unwrap().unwrap(), b"{\"b\":2}");
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut r = BufReader::new(&b"{\"a\""[..]);
        assert!(matches!(read_frame(&mut r).await, Err(FrameError::Truncated)));
    }
}
