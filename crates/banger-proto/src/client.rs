//! A typed client for one-request-per-connection RPC over a Unix socket.

use crate::error::{ErrorCode, RpcError};
use crate::frame::{read_json, write_json, Frame, FrameError, Request, PROTOCOL_VERSION};
use crate::methods::Method;
use crate::opid::{self, OpId};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    /// The server answered with an error: code, message and op id.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("talking to {path}: {source}")]
    Frame { path: PathBuf, source: FrameError },
    #[error("{path} closed the connection without an answer")]
    NoAnswer { path: PathBuf },
    #[error("unexpected answer from {path}: {detail}")]
    Decode { path: PathBuf, detail: String },
    /// Nothing, not even a heartbeat, arrived for the idle deadline.
    #[error("{path} sent nothing for {secs} s (not even a heartbeat); giving up")]
    Idle { path: PathBuf, secs: u64 },
}

impl ClientError {
    /// The server's error, when the call reached it.
    pub fn rpc(&self) -> Option<&RpcError> {
        match self {
            ClientError::Rpc(e) => Some(e),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        self.rpc().map(|e| e.code)
    }

    pub fn op_id(&self) -> Option<&OpId> {
        self.rpc().and_then(|e| e.op_id.as_ref())
    }

    /// True when nothing listens on the socket (daemon not started).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    idle_timeout: Option<Duration>,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            idle_timeout: None,
        }
    }

    /// Fails a call when no frame at all arrives for `d`. Only meaningful
    /// against a server that sends heartbeats more often than that.
    pub fn with_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = Some(d);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `M`. The op id is `op`, else the current task's, else none (the
    /// server mints one).
    pub async fn call<M: Method>(
        &self,
        params: &M::Params,
        op: Option<&OpId>,
    ) -> Result<M::Output, ClientError> {
        self.call_with_events::<M>(params, op, |_| {}).await
    }

    /// Calls `M`, handing each streamed event to `on_event` as it arrives.
    pub async fn call_with_events<M: Method>(
        &self,
        params: &M::Params,
        op: Option<&OpId>,
        mut on_event: impl FnMut(M::Event) + Send,
    ) -> Result<M::Output, ClientError> {
        let params = serde_json::to_value(params).map_err(|e| self.decode(e))?;
        let result = self
            .call_value(M::NAME, params, op, |v| {
                if let Ok(ev) = serde_json::from_value(v) {
                    on_event(ev);
                }
            })
            .await?;
        serde_json::from_value(result).map_err(|e| self.decode(e))
    }

    async fn call_value(
        &self,
        method: &str,
        params: serde_json::Value,
        op: Option<&OpId>,
        mut on_event: impl FnMut(serde_json::Value) + Send,
    ) -> Result<serde_json::Value, ClientError> {
        let op = op.cloned().or_else(opid::current);
        let req = Request {
            version: PROTOCOL_VERSION,
            method: method.to_string(),
            params,
            op_id: op.map(|o| o.to_string()),
        };
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        self.exchange(stream, &req, &mut on_event).await
    }

    /// Runs one request over an already connected stream (used for vsock,
    /// where a handshake precedes the protocol).
    pub async fn call_on<M: Method, S>(
        &self,
        stream: S,
        params: &M::Params,
        op: Option<&OpId>,
        mut on_event: impl FnMut(M::Event) + Send,
    ) -> Result<M::Output, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let req = Request {
            version: PROTOCOL_VERSION,
            method: M::NAME.to_string(),
            params: serde_json::to_value(params).map_err(|e| self.decode(e))?,
            op_id: op.cloned().or_else(opid::current).map(|o| o.to_string()),
        };
        let result = self
            .exchange(stream, &req, &mut |v| {
                if let Ok(ev) = serde_json::from_value(v) {
                    on_event(ev);
                }
            })
            .await?;
        serde_json::from_value(result).map_err(|e| self.decode(e))
    }

    async fn exchange<S>(
        &self,
        stream: S,
        req: &Request,
        on_event: &mut (dyn FnMut(serde_json::Value) + Send),
    ) -> Result<serde_json::Value, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = BufReader::new(rd);
        if let Err(e) = write_json(&mut wr, req).await {
            // A server may refuse and close before reading (an unauthorized
            // caller): its answer is still there to read.
            return match read_json::<_, Frame>(&mut rd).await {
                Ok(Some(Frame::Error { error })) => Err(ClientError::Rpc(error)),
                _ => Err(self.frame(e)),
            };
        }
        loop {
            let next = read_json(&mut rd);
            let frame: Option<Frame> = match self.idle_timeout {
                None => next.await,
                Some(d) => tokio::time::timeout(d, next)
                    .await
                    .map_err(|_| ClientError::Idle {
                        path: self.path.clone(),
                        secs: d.as_secs(),
                    })?,
            }
            .map_err(|e| self.frame(e))?;
            match frame {
                None => {
                    return Err(ClientError::NoAnswer {
                        path: self.path.clone(),
                    })
                }
                Some(Frame::Heartbeat) => {}
                Some(Frame::Event { event }) => on_event(event),
                Some(Frame::Result { result, op_id }) => {
                    self.check_answer(req.op_id.as_deref(), op_id.as_deref())?;
                    return Ok(result);
                }
                Some(Frame::Error { error }) => return Err(ClientError::Rpc(error)),
            }
        }
    }

    /// Calls `M` and takes the file descriptor the server attached to its
    /// result (see `Ctx::attach_fd`).
    pub async fn call_with_fd<M: Method>(
        &self,
        params: &M::Params,
        op: Option<&OpId>,
    ) -> Result<(M::Output, Option<std::os::fd::OwnedFd>), ClientError> {
        use tokio::io::AsyncWriteExt;
        let req = Request {
            version: PROTOCOL_VERSION,
            method: M::NAME.to_string(),
            params: serde_json::to_value(params).map_err(|e| self.decode(e))?,
            op_id: op.cloned().or_else(opid::current).map(|o| o.to_string()),
        };
        let mut stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let mut line = serde_json::to_vec(&req).map_err(|e| self.decode(e))?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| self.frame(e.into()))?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let mut buf = Vec::new();
        let mut fds = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let frame: Frame = serde_json::from_slice(&buf[..pos]).map_err(|e| self.decode(e))?;
                buf.drain(..=pos);
                match frame {
                    Frame::Event { .. } | Frame::Heartbeat => {}
                    Frame::Result { result, op_id } => {
                        self.check_answer(req.op_id.as_deref(), op_id.as_deref())?;
                        let out = serde_json::from_value(result).map_err(|e| self.decode(e))?;
                        return Ok((out, fds.pop()));
                    }
                    Frame::Error { error } => return Err(ClientError::Rpc(error)),
                }
            }
            if buf.len() > crate::MAX_FRAME_BYTES {
                return Err(self.frame(FrameError::TooLarge));
            }
            stream.readable().await.map_err(|e| self.frame(e.into()))?;
            match stream.try_io(tokio::io::Interest::READABLE, || {
                crate::fdpass::recv_with_fds(raw, &mut chunk, &mut fds)
            }) {
                Ok(0) => {
                    return Err(ClientError::NoAnswer {
                        path: self.path.clone(),
                    })
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.frame(e.into())),
            }
        }
    }

    /// An answer to another call (a confused or hostile peer) is not this
    /// call's answer.
    fn check_answer(&self, sent: Option<&str>, got: Option<&str>) -> Result<(), ClientError> {
        match (sent, got) {
            (Some(sent), Some(got)) if sent != got => Err(ClientError::Decode {
                path: self.path.clone(),
                detail: format!("answer for {got} to a call made as {sent}"),
            }),
            _ => Ok(()),
        }
    }

    fn frame(&self, source: FrameError) -> ClientError {
        ClientError::Frame {
            path: self.path.clone(),
            source,
        }
    }

    fn decode(&self, e: serde_json::Error) -> ClientError {
        ClientError::Decode {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }
}

/// An untyped call by method name, for diagnostic tools at a binary's edge.
pub async fn raw_call(
    client: &Client,
    method: &str,
    params: serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    client.call_value(method, params, None, |_| {}).await
}
