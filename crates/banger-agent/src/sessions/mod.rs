//! Guest sessions: long-running processes the agent owns, independent of
//! any connection. Each runs in a session (process group) of its own, its
//! output appended to a capped log on the guest's disk (`log`) by readers
//! that nothing can block, its status in `status.json` (written whole, then
//! renamed). Streams (`stream`) replay the log from a byte and follow it;
//! at most one of them owns the session's input at a time.
//!
//! After an agent or guest restart, a session recorded as running has no
//! process any more: it is `lost`, its log kept, its exit never made up.

mod log;
pub mod stream;

use banger_proto::methods::agent::{valid_session_id, SessionInfo, SessionList, SessionSpec, SessionState};
use banger_proto::stream::WinSize;
use banger_proto::RpcError;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Where sessions live in the guest.
pub const ROOT: &str = "/var/lib/banger-agent/sessions";
/// At most this many sessions running, and kept in all.
const MAX_RUNNING: usize = 32;
const MAX_KEPT: usize = 128;
/// Bounds of a session's log cap.
const MIN_LOG: u64 = 16 * 1024;
const MAX_LOG: u64 = 1 << 30;
const CHUNK: usize = 32 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Bytes for the session's stdin, and where to give the credit back.
pub struct Input {
    pub bytes: Vec<u8>,
    pub credit: mpsc::UnboundedSender<u32>,
}

/// Who owns a session's input: one stream at a time.
struct Owner {
    id: u64,
    /// Fired when another stream takes the input over.
    revoked: CancellationToken,
}

pub struct Session {
    pub id: String,
    dir: PathBuf,
    info: Mutex<SessionInfo>,
    log: Mutex<Option<log::Log>>,
    /// `(next_seq, running)`, for streams that follow.
    progress: watch::Sender<(u64, bool)>,
    /// To the process's stdin, while it runs; `None` bytes close it.
    stdin: Mutex<Option<mpsc::UnboundedSender<Option<Input>>>>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    owner: Mutex<Option<Owner>>,
}

impl Session {
    pub fn info(&self) -> SessionInfo {
        let mut i = self.info.lock().unwrap().clone();
        i.input_attached = self.owner.lock().unwrap().is_some();
        if let Some(l) = self.log.lock().unwrap().as_ref() {
            i.first_seq = l.first_seq();
            i.next_seq = l.next_seq();
        }
        i
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn progress(&self) -> watch::Receiver<(u64, bool)> {
        self.progress.subscribe()
    }

    pub fn running(&self) -> bool {
        self.info.lock().unwrap().state == SessionState::Running
    }

    /// Takes the input: refused while another stream holds it, unless
    /// `force`, which revokes that stream's. Returns the owner's id and
    /// the token fired if it is taken over in turn.
    pub fn take_input(&self, force: bool, id: u64) -> Result<CancellationToken, RpcError> {
        let mut o = self.owner.lock().unwrap();
        if let Some(cur) = o.as_ref() {
            if !force {
                return Err(RpcError::new(
                    banger_proto::ErrorCode::Conflict,
                    format!(
                        "session {} already has an input attached (attach --force takes it over, --read-only watches)",
                        self.id
                    ),
                ));
            }
            cur.revoked.cancel();
        }
        let revoked = CancellationToken::new();
        *o = Some(Owner {
            id,
            revoked: revoked.clone(),
        });
        Ok(revoked)
    }

    pub fn release_input(&self, id: u64) {
        let mut o = self.owner.lock().unwrap();
        if o.as_ref().is_some_and(|cur| cur.id == id) {
            *o = None;
        }
    }

    /// Queues bytes for the process's stdin (`None`: close it). False when
    /// the process no longer takes input.
    pub fn send_input(&self, input: Option<Input>) -> bool {
        match self.stdin.lock().unwrap().as_ref() {
            Some(tx) => tx.send(input).is_ok(),
            None => false,
        }
    }

    pub fn resize(&self, w: WinSize) {
        if let Some(m) = &self.master {
            crate::tty::set_size(std::os::fd::AsRawFd::as_raw_fd(m.get_ref()), w);
        }
    }

    fn pid(&self) -> Option<u32> {
        self.info.lock().unwrap().pid
    }

    fn append(&self, stream: u8, bytes: &[u8]) {
        let next = {
            let mut l = self.log.lock().unwrap();
            let Some(log) = l.as_mut() else { return };
            match log.append(stream, bytes) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(session = %self.id, error = %e, "session log write failed");
                    return;
                }
            }
        };
        self.progress.send_modify(|p| p.0 = next);
    }

    fn save(&self) {
        let info = self.info();
        if let Err(e) = write_status(&self.dir, &info) {
            tracing::warn!(session = %self.id, error = %e, "session status write failed");
        }
    }
}

/// `status.json`, written whole to a temporary file, synced, renamed.
fn write_status(dir: &Path, info: &SessionInfo) -> std::io::Result<()> {
    let tmp = dir.join("status.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec(info).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("status.json"))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub struct Sessions {
    root: PathBuf,
    boot_id: String,
    map: Mutex<HashMap<String, Arc<Session>>>,
    next_owner: std::sync::atomic::AtomicU64,
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::bad_request(msg)
}

impl Sessions {
    /// Loads the sessions kept in `root`; those recorded as running are
    /// lost (their processes were another agent's, or another boot's).
    pub fn load(root: &Path) -> Arc<Sessions> {
        let boot_id = boot_id();
        let mut map = HashMap::new();
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join("status.json")) else {
                continue;
            };
            let Ok(mut info) = serde_json::from_slice::<SessionInfo>(&bytes) else {
                continue;
            };
            if !valid_session_id(&info.id)
                || dir.file_name().and_then(|n| n.to_str()) != Some(info.id.as_str())
            {
                continue;
            }
            if info.state == SessionState::Running {
                info.state = SessionState::Lost;
                info.pid = None;
                let _ = write_status(&dir, &info);
                tracing::info!(session = %info.id, "session lost: its process did not survive the agent");
            }
            let log = log::Log::open(&dir, info.log_max).ok();
            let next = log.as_ref().map(|l| l.next_seq()).unwrap_or(0);
            let (progress, _) = watch::channel((next, false));
            let s = Session {
                id: info.id.clone(),
                dir: dir.clone(),
                info: Mutex::new(info),
                log: Mutex::new(log),
                progress,
                stdin: Mutex::new(None),
                master: None,
                owner: Mutex::new(None),
            };
            map.insert(s.id.clone(), Arc::new(s));
        }
        Arc::new(Sessions {
            root: root.to_path_buf(),
            boot_id,
            map: Mutex::new(map),
            next_owner: Default::default(),
        })
    }

    pub fn owner_id(&self) -> u64 {
        self.next_owner.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    pub fn get(&self, id: &str) -> Result<Arc<Session>, RpcError> {
        self.map
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| RpcError::not_found(format!("no session {id} in this guest")))
    }

    pub fn list(&self) -> SessionList {
        let mut sessions: Vec<SessionInfo> = self.map.lock().unwrap().values().map(|s| s.info()).collect();
        sessions.sort_by(|a, b| a.started_ms.cmp(&b.started_ms).then(a.id.cmp(&b.id)));
        SessionList {
            boot_id: self.boot_id.clone(),
            sessions,
        }
    }

    /// Starts a session; the same id again gives the session as it is.
    pub async fn start(self: &Arc<Self>, spec: SessionSpec) -> Result<SessionInfo, RpcError> {
        if !valid_session_id(&spec.id) {
            return Err(bad(format!("session id {:?} must be 1-64 of [a-z0-9-]", spec.id)));
        }
        if let Ok(s) = self.get(&spec.id) {
            return Ok(s.info());
        }
        let Some((prog, args)) = spec.argv.split_first() else {
            return Err(bad("argv is empty"));
        };
        if !(MIN_LOG..=MAX_LOG).contains(&spec.log_max) {
            return Err(bad(format!(
                "log_max {} is outside {MIN_LOG}..={MAX_LOG} bytes",
                spec.log_max
            )));
        }
        if let Some(w) = spec.tty {
            if w.rows == 0 || w.cols == 0 {
                return Err(bad("a terminal needs rows and columns"));
            }
        }
        {
            let m = self.map.lock().unwrap();
            if m.len() >= MAX_KEPT {
                return Err(RpcError::failed(format!(
                    "{MAX_KEPT} sessions are kept already; remove ended ones first"
                )));
            }
            if m.values().filter(|s| s.running()).count() >= MAX_RUNNING {
                return Err(RpcError::failed(format!(
                    "{MAX_RUNNING} sessions are running already"
                )));
            }
        }

        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args).envs(spec.env.iter().map(|(k, v)| (k, v)));
        let pty = match spec.tty {
            Some(size) => Some(
                crate::tty::open_pty(size)
                    .map_err(|e| RpcError::failed(format!("opening a terminal: {e}")))?,
            ),
            None => None,
        };
        match &pty {
            Some((_, slave)) => {
                let dup = || {
                    slave
                        .try_clone()
                        .map(Stdio::from)
                        .map_err(|e| RpcError::failed(format!("terminal: {e}")))
                };
                cmd.stdin(dup()?).stdout(dup()?).stderr(dup()?);
            }
            None => {
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        let with_tty = pty.is_some();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // After setsid and the terminal: the root is entered last.
        crate::rootdir::place(
            &mut cmd,
            spec.root.as_deref(),
            spec.cwd.as_deref(),
            spec.user.as_ref(),
        )?;
        let dir = self.root.join(&spec.id);
        let log = log::Log::open(&dir, spec.log_max)
            .map_err(|e| RpcError::failed(format!("session log in {}: {e}", dir.display())))?;
        let mut child = cmd
            .spawn()
            .map_err(|e| RpcError::failed(format!("cannot run {prog:?}: {e}")))?;
        drop(cmd);
        let pid = child.id();
        let master = match pty {
            Some((m, slave)) => {
                drop(slave);
                // SAFETY: a fresh pty master, owned by the AsyncFd from now on.
                Some(Arc::new(
                    unsafe { AsyncFd::register(m) }
                        .map_err(|e| RpcError::failed(format!("terminal: {e}")))?,
                ))
            }
            None => None,
        };
        let info = SessionInfo {
            id: spec.id.clone(),
            argv: spec.argv.clone(),
            tty: with_tty,
            state: SessionState::Running,
            pid,
            code: None,
            signal: None,
            started_ms: now_ms(),
            ended_ms: None,
            first_seq: log.first_seq(),
            next_seq: log.next_seq(),
            log_max: spec.log_max,
            boot_id: self.boot_id.clone(),
            input_attached: false,
        };
        let (progress, _) = watch::channel((log.next_seq(), true));
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let s = Arc::new(Session {
            id: spec.id.clone(),
            dir,
            info: Mutex::new(info),
            log: Mutex::new(Some(log)),
            progress,
            stdin: Mutex::new(Some(stdin_tx)),
            master: master.clone(),
            owner: Mutex::new(None),
        });
        s.save();
        let mut readers = Vec::new();
        match &master {
            Some(m) => {
                readers.push(tokio::spawn(record(
                    s.clone(),
                    crate::tty::TtyReader(m.clone()),
                    1,
                )));
                tokio::spawn(feed(crate::tty::TtyWriter(m.clone()), stdin_rx, Some(0x04)));
            }
            None => {
                if let Some(o) = child.stdout.take() {
                    readers.push(tokio::spawn(record(s.clone(), o, 1)));
                }
                if let Some(e) = child.stderr.take() {
                    readers.push(tokio::spawn(record(s.clone(), e, 2)));
                }
                if let Some(i) = child.stdin.take() {
                    tokio::spawn(feed(i, stdin_rx, None));
                }
            }
        }
        tracing::info!(session = %spec.id, pid = ?pid, tty = with_tty, "session started");
        self.map.lock().unwrap().insert(spec.id.clone(), s.clone());
        let sess = s.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Output still in the pipes belongs to the session; a reader
            // held open by a leftover of the group is not waited for long.
            for r in readers {
                let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
            }
            *sess.stdin.lock().unwrap() = None;
            {
                let mut i = sess.info.lock().unwrap();
                i.state = SessionState::Exited;
                i.ended_ms = Some(now_ms());
                if let Ok(st) = status {
                    i.code = st.code();
                    i.signal = st.signal();
                }
            }
            sess.save();
            let i = sess.info();
            tracing::info!(session = %sess.id, code = ?i.code, signal = ?i.signal, "session exited");
            sess.progress.send_modify(|p| p.1 = false);
        });
        Ok(s.info())
    }

    pub fn signal(&self, id: &str, sig: i32) -> Result<SessionInfo, RpcError> {
        if !(1..=64).contains(&sig) {
            return Err(bad(format!("signal {sig} is out of range")));
        }
        let s = self.get(id)?;
        if s.running() {
            if let Some(pid) = s.pid() {
                crate::stream::kill_group(pid, sig);
            }
        }
        Ok(s.info())
    }

    /// SIGTERM to the group, SIGKILL after `grace`; answers once the
    /// session has ended (or after a bounded wait for a group that will
    /// not die).
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<SessionInfo, RpcError> {
        let s = self.get(id)?;
        let Some(pid) = s.pid().filter(|_| s.running()) else {
            return Ok(s.info());
        };
        let mut p = s.progress();
        crate::stream::kill_group(pid, libc::SIGTERM);
        let ended = |p: &mut watch::Receiver<(u64, bool)>, d: Duration| {
            let mut p = p.clone();
            async move { tokio::time::timeout(d, p.wait_for(|v| !v.1)).await.is_ok() }
        };
        if !ended(&mut p, grace).await {
            crate::stream::kill_group(pid, libc::SIGKILL);
            ended(&mut p, Duration::from_secs(10)).await;
        }
        // Whatever of the group outlived its leader goes too.
        crate::stream::kill_group(pid, libc::SIGKILL);
        Ok(s.info())
    }

    pub fn remove(&self, id: &str) -> Result<(), RpcError> {
        let s = self.get(id)?;
        if s.running() {
            return Err(RpcError::new(
                banger_proto::ErrorCode::Conflict,
                format!("session {id} is running; stop it first"),
            ));
        }
        self.map.lock().unwrap().remove(id);
        let _ = std::fs::remove_dir_all(s.dir());
        Ok(())
    }
}

/// Appends everything `r` yields to the session's log.
async fn record<R: AsyncRead + Unpin>(s: Arc<Session>, mut r: R, stream: u8) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => s.append(stream, &buf[..n]),
        }
    }
}

/// Writes queued input to the process, giving credit back per chunk.
async fn feed<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Option<Input>>,
    eof_byte: Option<u8>,
) {
    while let Some(item) = rx.recv().await {
        match item {
            Some(i) => {
                let n = i.bytes.len() as u32;
                let ok = w.write_all(&i.bytes).await.is_ok();
                let _ = i.credit.send(n);
                if !ok {
                    // Stdin closed by the process: later input is dropped
                    // (and credited by the stream).
                    while let Some(Some(i)) = rx.recv().await {
                        let _ = i.credit.send(i.bytes.len() as u32);
                    }
                    return;
                }
            }
            None => match eof_byte {
                Some(b) => {
                    let _ = w.write_all(&[b]).await;
                }
                None => return,
            },
        }
    }
}
