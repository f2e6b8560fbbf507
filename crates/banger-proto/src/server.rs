//! Server plumbing shared by the daemon and the helper: a typed method
//! router, per-request op ids and spans, peer checks, and request-scoped
//! cancellation when the client goes away.

use crate::error::{ErrorCode, RpcError};
use crate::frame::{read_frame, write_json, Frame, PROTOCOL_VERSION};
use crate::methods::Method;
use crate::opid::{self, OpId};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a connected client may take to send its request.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest method name that reaches a log line: a peer cannot flood the
/// log through the one field it controls.
const MAX_LOGGED_METHOD: usize = 64;
/// How long a refused connection's unread request is drained (see `refuse`).
const REFUSED_DRAIN_TIME: Duration = Duration::from_millis(200);
/// How many refused connections are drained at once.
const REFUSED_DRAINING: usize = 16;

/// A method name as it may appear in a log line: printable, short.
fn loggable_method(m: &str) -> String {
    let mut out: String = m
        .chars()
        .take(MAX_LOGGED_METHOD)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '?'
            }
        })
        .collect();
    if m.chars().count() > MAX_LOGGED_METHOD {
        out.push_str("...");
    }
    out
}

/// Builds a handler that clones the shared state `$state` (an `Arc`) into
/// each call's future: `handler!(svc, |ctx, params| svc.run(params).await)`.
#[macro_export]
macro_rules! handler {
    ($state:ident, |$ctx:pat_param, $p:pat_param| $body:expr) => {{
        let $state = $state.clone();
        move |$ctx, $p| {
            let $state = $state.clone();
            async move { $body }
        }
    }};
}

/// What a handler knows about the call it serves.
#[derive(Clone)]
pub struct Ctx {
    pub op_id: OpId,
    /// Cancelled when the client disconnects before the call finished.
    pub cancel: CancellationToken,
    /// The peer's uid as read with SO_PEERCRED.
    pub peer_uid: u32,
    events: mpsc::UnboundedSender<(Value, bool)>,
    fd: Arc<std::sync::Mutex<Option<std::os::fd::OwnedFd>>>,
    /// Events sent with [`Ctx::emit_flow`] not written to the client yet
    /// may not exceed [`FLOW_EVENTS`].
    flow: Arc<tokio::sync::Semaphore>,
    /// What the client sends after its request, for methods registered
    /// with [`Router::method_with_input`].
    input: Arc<std::sync::Mutex<Option<mpsc::Receiver<Vec<u8>>>>>,
}

/// How often a client whose input is held back is checked for a hang-up.
const HANG_UP_CHECK: Duration = Duration::from_millis(250);

/// Whether the peer of a stream socket has closed its end (seen even with
/// unread data before that end).
fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Events in flight per call for [`Ctx::emit_flow`].
const FLOW_EVENTS: usize = 32;
/// Chunks of client input buffered per call before the server stops
/// reading the socket (and the client's writes block).
const INPUT_CHUNKS: usize = 8;

impl Ctx {
    /// Attaches a file descriptor to the successful result (Unix sockets only).
    pub fn attach_fd(&self, fd: std::os::fd::OwnedFd) {
        *self.fd.lock().unwrap() = Some(fd);
    }

    /// Streams one event to the client ahead of the result.
    pub fn emit<E: Serialize>(&self, event: &E) {
        if let Ok(v) = serde_json::to_value(event) {
            let _ = self.events.send((v, false));
        }
    }

    /// Like [`Ctx::emit`], but waits while [`FLOW_EVENTS`] events are
    /// still unwritten: a slow client slows the producer instead of
    /// growing the server's memory.
    pub async fn emit_flow<E: Serialize>(&self, event: &E) {
        let Ok(v) = serde_json::to_value(event) else {
            return;
        };
        if let Ok(p) = self.flow.acquire().await {
            p.forget();
            if self.events.send((v, true)).is_err() {
                self.flow.add_permits(1);
            }
        }
    }

    /// The bytes the client sends after its request (once; `None` for a
    /// method registered without input). Its end is the client's hang-up.
    pub fn take_input(&self) -> Option<impl tokio::io::AsyncRead + Send + Unpin + 'static> {
        let rx = self.input.lock().unwrap().take()?;
        Some(Input {
            rx,
            chunk: Vec::new(),
            at: 0,
        })
    }

    /// A context for work not tied to a connection (start-up, background
    /// tasks): events go nowhere.
    pub fn detached(op_id: OpId) -> Self {
        let (tx, _rx) = mpsc::unbounded_channel();
        Ctx {
            op_id,
            cancel: CancellationToken::new(),
            // SAFETY: getuid has no preconditions and cannot fail.
            peer_uid: unsafe { libc::getuid() },
            events: tx,
            fd: Default::default(),
            flow: Arc::new(tokio::sync::Semaphore::new(FLOW_EVENTS)),
            input: Default::default(),
        }
    }
}

/// The client's input as a reader over the chunks the server forwards.
struct Input {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl tokio::io::AsyncRead for Input {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while self.at >= self.chunk.len() {
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(c) => (self.chunk, self.at) = (c, 0),
                // End of input: the client hung up.
                None => return std::task::Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(self.chunk.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.chunk[at..at + n]);
        self.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;
type Handler = Arc<dyn Fn(Ctx, Value) -> Result<BoxFut, RpcError> + Send + Sync>;
/// A handler, and whether it takes the client's input after the request.
type Authorizer = Arc<dyn Fn(u32) -> bool + Send + Sync>;
/// A decoded call ready to run: its context, future, event stream and,
/// for a method that takes input, where the client's further bytes go.
type Prepared = (
    Ctx,
    BoxFut,
    mpsc::UnboundedReceiver<(Value, bool)>,
    Option<mpsc::Sender<Vec<u8>>>,
);

/// Maps method names to typed handlers.
pub struct Router {
    label: &'static str,
    handlers: HashMap<&'static str, (Handler, bool)>,
    authorize: Option<Authorizer>,
    heartbeat: Option<Duration>,
    /// At most this many open connections per peer uid.
    per_uid: Option<usize>,
    open: Arc<std::sync::Mutex<HashMap<u32, usize>>>,
    /// Refused connections being drained right now (see `refuse`).
    draining: Arc<tokio::sync::Semaphore>,
}

/// One open connection counted against its uid; uncounted when dropped.
struct Slot {
    open: Arc<std::sync::Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

impl Router {
    /// `label` prefixes the per-call log line: `"<label> rpc completed"`.
    pub fn new(label: &'static str) -> Self {
        Router {
            label,
            handlers: HashMap::new(),
            authorize: None,
            heartbeat: None,
            per_uid: None,
            open: Default::default(),
            draining: Arc::new(tokio::sync::Semaphore::new(REFUSED_DRAINING)),
        }
    }

    /// Refuses a connection when its uid already has `n` open: no single
    /// caller can take every descriptor the server has.
    pub fn max_connections_per_uid(mut self, n: usize) -> Self {
        self.per_uid = Some(n);
        self
    }

    /// Sends a [`Frame::Heartbeat`] whenever a call has written nothing for
    /// `every`, so its client can put a deadline on silence.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = Some(every);
        self
    }

    /// Only peers whose uid passes `f` are served; others get `unauthorized`.
    pub fn authorize(mut self, f: impl Fn(u32) -> bool + Send + Sync + 'static) -> Self {
        self.authorize = Some(Arc::new(f));
        self
    }

    /// Registers the handler of method `M`.
    pub fn method<M, F, Fut>(self, f: F) -> Self
    where
        M: Method,
        F: Fn(Ctx, M::Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Output, RpcError>> + Send + 'static,
    {
        self.register::<M, F, Fut>(f, false)
    }

    /// Registers the handler of method `M`, which reads what the client
    /// sends after its request through [`Ctx::take_input`] (anything else
    /// ignores it). Reading is paced by the handler: a client that sends
    /// faster than the handler takes blocks on its writes.
    pub fn method_with_input<M, F, Fut>(self, f: F) -> Self
    where
        M: Method,
        F: Fn(Ctx, M::Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Output, RpcError>> + Send + 'static,
    {
        self.register::<M, F, Fut>(f, true)
    }

    fn register<M, F, Fut>(mut self, f: F, input: bool) -> Self
    where
        M: Method,
        F: Fn(Ctx, M::Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Output, RpcError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let h: Handler = Arc::new(move |ctx, params| {
            let params: M::Params = decode_params(params)?;
            let fut = f(ctx, params);
            Ok(Box::pin(async move {
                let out = fut.await?;
                serde_json::to_value(out).map_err(|e| RpcError::failed(format!("encoding result: {e}")))
            }))
        });
        self.handlers.insert(M::NAME, (h, input));
        self
    }

    pub fn methods(&self) -> impl Iterator<Item = &&'static str> {
        self.handlers.keys()
    }

    /// Accepts connections until `shutdown` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let router = self.clone();
                        tokio::spawn(async move { router.serve_connection(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Serves the single request of one connection.
    pub async fn serve_connection(&self, stream: UnixStream) {
        let peer_uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
                return;
            }
        };
        // A caller who may not use the socket is refused before a single
        // byte is read: it can neither hold the server's memory with a
        // half-sent frame nor a connection for the read timeout.
        if let Some(auth) = &self.authorize {
            if !auth(peer_uid) {
                let e = RpcError::new(
                    ErrorCode::Unauthorized,
                    format!("uid {peer_uid} may not use this socket"),
                );
                self.refuse(stream, peer_uid, e).await;
                return;
            }
        }
        let _slot = match self.take_slot(peer_uid) {
            Ok(s) => s,
            Err(limit) => {
                let e = RpcError::failed(format!(
                    "uid {peer_uid} already has {limit} open connections to this socket; try again"
                ));
                self.refuse(stream, peer_uid, e).await;
                return;
            }
        };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&stream);
        self.serve_one(stream, peer_uid, Some(raw)).await
    }

    /// Counts a connection against its uid, or says the limit it hit.
    fn take_slot(&self, uid: u32) -> Result<Option<Slot>, usize> {
        let Some(limit) = self.per_uid else {
            return Ok(None);
        };
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_default();
        if *n >= limit {
            return Err(limit);
        }
        *n += 1;
        Ok(Some(Slot {
            open: self.open.clone(),
            uid,
        }))
    }

    /// Answers one error frame without reading the request, and closes.
    async fn refuse(&self, mut stream: UnixStream, peer_uid: u32, e: RpcError) {
        let op = OpId::mint();
        let label = self.label;
        let e = e.with_op_id(&op);
        // Entered only for the log line: a guard held across the awaits
        // below would leave this span current on whatever task the worker
        // thread runs next, which then parents its own spans on it after
        // it closed (tracing-subscriber panics on that, taking the server
        // down under a flood of refused peers).
        tracing::info_span!("rpc", op_id = %op, method = "", peer_uid).in_scope(
            || tracing::warn!(duration_ms = 0u64, code = %e.code, error = %e.message, "{label} rpc failed"),
        );
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            write_json(&mut stream, &Frame::Error { error: e }),
        )
        .await;
        // The peer's request is still unread in the socket, and closing on
        // unread data makes the kernel reset the connection: the peer would
        // lose the answer. So it is read, at most one frame's worth and for
        // a short while, and thrown away (never parsed, never logged). Only
        // a few connections at a time: under a flood, descriptors go back
        // at once and the flood gets resets.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(_drain) = self.draining.clone().try_acquire_owned() else {
            return;
        };
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(REFUSED_DRAIN_TIME, async {
            let mut buf = [0u8; 4096];
            let mut left = crate::frame::MAX_FRAME_BYTES + buf.len();
            while left > 0 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// Serves the single request of any byte stream (e.g. vsock), whose
    /// peer the caller has already identified as `peer_uid`.
    pub async fn serve_stream<S>(&self, stream: S, peer_uid: u32)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
    {
        self.serve_one(stream, peer_uid, None).await
    }

    /// `raw` is the socket itself when descriptors can be passed over it.
    async fn serve_one<S>(&self, stream: S, peer_uid: u32, raw: Option<std::os::fd::RawFd>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
    {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = BufReader::new(rd);
        let started = Instant::now();

        let (op, method, call) = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(&mut rd)).await {
            Ok(Ok(None)) => return,
            Err(_) => (
                OpId::mint(),
                String::new(),
                Err(RpcError::bad_request("timed out waiting for the request")),
            ),
            Ok(Err(e)) => (
                OpId::mint(),
                String::new(),
                Err(RpcError::bad_request(e.to_string())),
            ),
            Ok(Ok(Some(bytes))) => self.prepare(&bytes, peer_uid),
        };

        let fd_slot = call.as_ref().map(|p| p.0.fd.clone()).unwrap_or_default();
        let method = loggable_method(&method);
        let span = tracing::info_span!("rpc", op_id = %op, method = %method, peer_uid);
        let label = self.label;
        async {
            let outcome = match call {
                Err(e) => Some(Err(e)),
                Ok(fut_ctx) => run_call(fut_ctx, self.heartbeat, &mut rd, &mut wr, raw).await,
            };
            let duration_ms = started.elapsed().as_millis() as u64;
            let frame = match outcome {
                None => {
                    tracing::warn!(
                        duration_ms,
                        "{label} rpc failed: client disconnected, request cancelled"
                    );
                    return;
                }
                Some(Ok(result)) => {
                    tracing::info!(duration_ms, "{label} rpc completed");
                    Frame::Result {
                        result,
                        op_id: Some(op.to_string()),
                    }
                }
                Some(Err(e)) => {
                    let e = e.with_op_id(&op);
                    tracing::warn!(duration_ms, code = %e.code, error = %e.message, "{label} rpc failed");
                    Frame::Error { error: e }
                }
            };
            let fd = fd_slot.lock().unwrap().take();
            let sent = match (fd, raw, &frame) {
                (Some(fd), Some(sock), Frame::Result { .. }) => {
                    let mut line = serde_json::to_vec(&frame).unwrap_or_default();
                    line.push(b'\n');
                    crate::fdpass::send_with_fd(sock, &line, &fd)
                        .await
                        .map_err(|e| e.to_string())
                }
                _ => write_json(&mut wr, &frame).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "could not write the response");
            }
        }
        .instrument(span)
        .await
    }

    /// Decodes the envelope and looks the handler up. Every early failure is
    /// returned with the op id it will be stamped with.
    fn prepare(&self, bytes: &[u8], peer_uid: u32) -> (OpId, String, Result<Prepared, RpcError>) {
        let (op, req) = match crate::frame::decode_request(bytes) {
            Ok(r) => r,
            Err((op, e)) => return (op, String::new(), Err(e)),
        };
        let method = req.method.clone();
        if let Some(auth) = &self.authorize {
            if !auth(peer_uid) {
                return (
                    op,
                    method,
                    Err(RpcError::new(
                        ErrorCode::Unauthorized,
                        format!("uid {peer_uid} may not use this socket"),
                    )),
                );
            }
        }
        if req.version != PROTOCOL_VERSION {
            return (
                op,
                method,
                Err(RpcError::new(
                    ErrorCode::BadVersion,
                    format!(
                        "protocol version {} is not supported (this side speaks {PROTOCOL_VERSION})",
                        req.version
                    ),
                )),
            );
        }
        let Some((handler, takes_input)) = self.handlers.get(req.method.as_str()) else {
            return (
                op,
                method.clone(),
                Err(RpcError::new(
                    ErrorCode::UnknownMethod,
                    format!("unknown method {method:?}"),
                )),
            );
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (input_tx, input_rx) = match takes_input {
            true => {
                let (t, r) = mpsc::channel(INPUT_CHUNKS);
                (Some(t), Some(r))
            }
            false => (None, None),
        };
        let ctx = Ctx {
            op_id: op.clone(),
            cancel: CancellationToken::new(),
            peer_uid,
            events: tx,
            fd: Default::default(),
            flow: Arc::new(tokio::sync::Semaphore::new(FLOW_EVENTS)),
            input: Arc::new(std::sync::Mutex::new(input_rx)),
        };
        let fut = handler(ctx.clone(), req.params).map(|f| (ctx, f, rx, input_tx));
        (op, method, fut)
    }
}

/// Cancels `token` on SIGTERM or SIGINT: how a server is asked to stop.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        token.cancel();
    });
}

/// Decodes a request's params as a method's typed params: what every
/// handler receives, so nothing else in a service ever sees raw JSON.
pub fn decode_params<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, RpcError> {
    // A method without params accepts a missing or null `params`. Every
    // method's params are an object: serde would also fill a struct from
    // an array (`[]` for one whose fields all have defaults), which no
    // client means.
    let v = match v {
        Value::Null => Value::Object(Default::default()),
        Value::Object(_) => v,
        other => {
            return Err(RpcError::bad_request(format!(
                "invalid params: expected an object, not {}",
                match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    _ => "a boolean",
                }
            )))
        }
    };
    serde_json::from_value(v).map_err(|e| RpcError::bad_request(format!("invalid params: {e}")))
}

/// Runs the handler while forwarding its events and watching for the client
/// to hang up. `None` means the client left and the call was cancelled.
async fn run_call<R, W>(
    (ctx, fut, mut events, input): Prepared,
    heartbeat: Option<Duration>,
    rd: &mut BufReader<R>,
    wr: &mut W,
    raw: Option<std::os::fd::RawFd>,
) -> Option<Result<Value, RpcError>>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let cancel = ctx.cancel.clone();
    let flow = ctx.flow.clone();
    let fut = opid::scope(ctx.op_id.clone(), fut);
    drop(ctx);
    tokio::pin!(fut);
    let hung_up = async {
        // After the request only end-of-stream matters, unless the method
        // takes input: then the bytes go to it, as fast as it takes them.
        let mut input = input;
        loop {
            match rd.fill_buf().await {
                Ok([]) | Err(_) => return,
                Ok(b) => {
                    let chunk = b.to_vec();
                    rd.consume(chunk.len());
                    let Some(tx) = input.clone() else { continue };
                    // While the handler holds back (its input is full), the
                    // socket is not read, so a hang-up is looked for on it
                    // directly: a client that is gone must still cancel.
                    let send = tx.send(chunk);
                    tokio::pin!(send);
                    let taken = loop {
                        tokio::select! {
                            r = &mut send => break r.is_ok(),
                            _ = tokio::time::sleep(HANG_UP_CHECK) => {
                                if raw.is_some_and(peer_gone) {
                                    return;
                                }
                            }
                        }
                    };
                    if !taken {
                        // The handler is done with its input.
                        input = None;
                    }
                }
            }
        }
    };
    tokio::pin!(hung_up);
    // Without a heartbeat the timer never fires.
    let every = heartbeat.unwrap_or(Duration::from_secs(86400 * 365));
    let beat = tokio::time::sleep(every);
    tokio::pin!(beat);
    loop {
        tokio::select! {
            res = &mut fut => {
                while let Ok((ev, _)) = events.try_recv() {
                    if write_json(wr, &Frame::Event { event: ev }).await.is_err() {
                        break;
                    }
                }
                return Some(res);
            }
            Some((ev, flowed)) = events.recv() => {
                if write_json(wr, &Frame::Event { event: ev }).await.is_err() {
                    cancel.cancel();
                    return None;
                }
                if flowed {
                    flow.add_permits(1);
                }
                beat.as_mut().reset(tokio::time::Instant::now() + every);
            }
            _ = &mut beat => {
                if write_json(wr, &Frame::Heartbeat).await.is_err() {
                    cancel.cancel();
                    return None;
                }
                beat.as_mut().reset(tokio::time::Instant::now() + every);
            }
            _ = &mut hung_up => {
                cancel.cancel();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_method_names_are_cut_and_cleaned_before_logging() {
        assert_eq!(loggable_method("vm.create.begin"), "vm.create.begin");
        assert_eq!(loggable_method("a\nb\u{1b}[31m"), "a?b??31m");
        let long = "x".repeat(1 << 20);
        assert_eq!(loggable_method(&long).len(), MAX_LOGGED_METHOD + 3);
    }

    /// An unauthorized peer is answered without the server reading its
    /// request: a peer that never sends one gets the refusal at once.
    #[tokio::test]
    async fn unauthorized_peers_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let router = Arc::new(Router::new("test").authorize(|_| false));
        let stop = CancellationToken::new();
        tokio::spawn(router.serve(listener, stop.clone()));
        let stream = UnixStream::connect(&sock).await.unwrap();
        let mut rd = BufReader::new(stream);
        let frame = tokio::time::timeout(
            Duration::from_secs(2),
            crate::frame::read_json::<_, Frame>(&mut rd),
        )
        .await
        .expect("refused at once, without waiting for a request")
        .unwrap()
        .unwrap();
        match frame {
            Frame::Error { error } => {
                assert_eq!(error.code, ErrorCode::Unauthorized);
                assert!(error.op_id.is_some());
            }
            other => panic!("{other:?}"),
        }
        stop.cancel();
    }
    use crate::client::{Client, ClientError};
    use crate::methods::agent::Sync as Slow;
    use crate::methods::Empty;

    /// A router whose only method answers after `delay`, served on one end
    /// of a socket pair; returns the other end.
    fn serve_slow(delay: Duration, heartbeat: Option<Duration>) -> UnixStream {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut router = Router::new("test").method::<Slow, _, _>(move |_, _| async move {
            tokio::time::sleep(delay).await;
            Ok(Empty {})
        });
        if let Some(every) = heartbeat {
            router = router.heartbeat(every);
        }
        let theirs = UnixStream::from_std(theirs).unwrap();
        tokio::spawn(async move { router.serve_stream(theirs, 0).await });
        UnixStream::from_std(ours).unwrap()
    }

    #[tokio::test]
    async fn heartbeats_keep_a_quiet_call_alive_past_the_idle_deadline() {
        let stream = serve_slow(Duration::from_millis(600), Some(Duration::from_millis(50)));
        let client = Client::new("pair").with_idle_timeout(Duration::from_millis(200));
        let out = client.call_on::<Slow, _>(stream, &Empty {}, None, |_| {}).await;
        assert!(out.is_ok(), "{out:?}");
    }

    /// A peer that answers with another call's op id is not believed.
    #[tokio::test]
    async fn an_answer_for_another_op_id_is_refused() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (ours, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut r = BufReader::new(theirs);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            r.get_mut()
                .write_all(b"{\"type\":\"result\",\"result\":{},\"op_id\":\"op-someoneelse\"}\n")
                .await
                .unwrap();
        });
        let op = OpId::mint();
        let out = Client::new("pair")
            .call_on::<Slow, _>(ours, &Empty {}, Some(&op), |_| {})
            .await;
        assert!(matches!(out, Err(ClientError::Decode { .. })), "{out:?}");
    }

    /// A uid with its quota of open connections gets a clear refusal at
    /// once for the next one; a slot frees when a connection ends.
    #[tokio::test]
    async fn connections_per_uid_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let router = Arc::new(Router::new("test").max_connections_per_uid(2));
        let stop = CancellationToken::new();
        tokio::spawn(router.serve(listener, stop.clone()));
        // Two idle connections hold the quota (their requests never come).
        let a = UnixStream::connect(&sock).await.unwrap();
        let _b = UnixStream::connect(&sock).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = UnixStream::connect(&sock).await.unwrap();
        let mut rd = BufReader::new(third);
        let frame = tokio::time::timeout(
            Duration::from_secs(2),
            crate::frame::read_json::<_, Frame>(&mut rd),
        )
        .await
        .expect("refused at once")
        .unwrap()
        .unwrap();
        match frame {
            Frame::Error { error } => assert!(error.message.contains("open connections"), "{error:?}"),
            other => panic!("{other:?}"),
        }
        // One ends: a new one is served (it gets a real answer, not the cap).
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let out = Client::new(&sock).call::<Slow>(&Empty {}, None).await;
        let err = out.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownMethod), "{err}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_silent_server_fails_the_call_at_the_idle_deadline() {
        let stream = serve_slow(Duration::from_secs(30), None);
        let client = Client::new("pair").with_idle_timeout(Duration::from_millis(200));
        let started = Instant::now();
        let out = client.call_on::<Slow, _>(stream, &Empty {}, None, |_| {}).await;
        assert!(matches!(out, Err(ClientError::Idle { .. })), "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
