//! The shim process containerd starts: a keeper of containerd's
//! connections around the task server, which it runs as its child.
//!
//! containerd reads the end of its connection to a shim as the shim's
//! death and gives its tasks up, although their VMs run on in bangerd. So
//! the process that holds the connection does as little as can fail: it
//! listens on the address containerd was given, relays each connection to
//! the task server (`relay`), and restarts the server if it dies by a
//! signal or an error. The restarted server rebuilds its tasks from the
//! records the last one kept (`record`) and from bangerd.
//!
//! The keeper is also the subreaper of the server's children: when the
//! server dies, the `banger` commands it ran (an exec, a task's output
//! relay) become the keeper's, and the keeper writes down how each ended
//! for the next server to read.
//!
//! The two guard each other (`ctl`): the keeper hands the server a copy
//! of containerd's listener and of every connection, so if the keeper is
//! the one killed, containerd still sees no hang-up, and the server
//! (`guard_keeper`) starts a new keeper that takes the connections over,
//! with the requests the last one had left unanswered (`relay`). Only both
//! dying at once ends the shim for containerd, as with any shim.

use crate::ctl::{self, Msg};
use crate::relay;
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Set in the task server's environment: serve, do not keep.
pub const WORKER_ENV: &str = "BANGER_SHIM_WORKER";
/// The directory of task records and exit notes (see `record`).
pub const STATE_ENV: &str = "BANGER_SHIM_STATE";
/// Where each shim's records live: a directory per shim address.
const STATE_ROOT: &str = "/run/banger-shim";
/// More restarts than this in `RESTART_WINDOW` and the keeper gives up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Whether this invocation is the one that serves (containerd's `start`
/// runs it with no action and a `-socket`), as opposed to `start` or
/// `delete`.
pub fn is_serve_invocation(args: &[std::ffi::OsString]) -> bool {
    std::env::var_os(WORKER_ENV).is_none()
        && containerd_shim::parse(&args[1..]).is_ok_and(|f| f.action.is_empty() && !f.socket.is_empty())
}

/// The state directory of the shim serving `socket`.
pub fn state_dir(socket: &Path) -> PathBuf {
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new(STATE_ROOT).join(name)
}

/// The socket file of a shim address (`unix://PATH`, or a bare path).
pub fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.strip_prefix("unix://").unwrap_or(address))
}

/// Appends a line to containerd's log FIFO for this shim, if it is there.
fn logger() -> Arc<dyn Fn(String) + Send + Sync> {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok();
    let fifo = std::sync::Mutex::new(fifo);
    Arc::new(move |line: String| {
        if let Some(f) = fifo.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = writeln!(
                f,
                "level=info msg=\"banger shim keeper: {line}\" pid={}",
                std::process::id()
            );
        }
    })
}

/// Runs the keeper; returns the process's exit code.
pub fn run(args: Vec<std::ffi::OsString>) -> i32 {
    match keep(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("containerd-shim-banger-v2 keeper: {e}");
            1
        }
    }
}

/// What containerd reaches the shim through, as the keeper holds it: the
/// listener, each connection by id, and the channel to the current task
/// server, which is sent a copy of each.
struct Held {
    listener: OwnedFd,
    conns: Mutex<HashMap<u64, OwnedFd>>,
    ctl: Mutex<Arc<OwnedFd>>,
}

impl Held {
    fn ctl(&self) -> Arc<OwnedFd> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Gives a new server copies of everything held and makes it the
    /// current one, under the connections' lock, so a connection accepted
    /// meanwhile reaches it either here or from `add`.
    fn sync(&self, ctl: Arc<OwnedFd>) -> std::io::Result<()> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        ctl::hand_over(&ctl, &self.listener, conns.iter())?;
        *self.ctl.lock().unwrap_or_else(|p| p.into_inner()) = ctl;
        Ok(())
    }

    /// Holds a copy of a new connection and gives the server one.
    fn add(&self, id: u64, copy: OwnedFd) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let _ = ctl::send(&self.ctl(), Msg::Conn(id), Some(copy.as_raw_fd()));
        conns.insert(id, copy);
    }
}

fn keep(args: Vec<std::ffi::OsString>) -> std::io::Result<i32> {
    let flags = containerd_shim::parse(&args[1..])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let public = socket_path(&flags.socket);
    let mut private = public.clone().into_os_string();
    private.push(".server");
    let private = PathBuf::from(private);
    let state = state_dir(&public);
    std::fs::create_dir_all(state.join("exited"))?;
    std::fs::create_dir_all(state.join("pending"))?;
    let log = logger();

    // A keeper started by a task server whose keeper died adopts what that
    // server held; a first keeper binds containerd's address.
    let adopting = ctl::from_env();
    let mut adopted_conns = Vec::new();
    let listener = match &adopting {
        Some(c) => {
            let mut listener = None;
            while let Some((msg, fd)) = ctl::recv(c)? {
                match (msg, fd) {
                    (Msg::Listener, Some(fd)) => listener = Some(UnixListener::from(fd)),
                    (Msg::Conn(id), Some(fd)) => adopted_conns.push((id, fd)),
                    (Msg::Synced, _) => break,
                    _ => {}
                }
            }
            listener.ok_or_else(|| std::io::Error::other("the task server sent no listener"))?
        }
        None => match bind(&public)? {
            Some(l) => l,
            None => {
                // Another keeper serves this address (a second container of
                // the same group raced this one): containerd uses that one.
                signal_started();
                return Ok(0);
            }
        },
    };
    // SAFETY: plain prctl; the orphans of a server we start become ours.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let serve_args: Vec<std::ffi::OsString> = args[1..]
        .iter()
        .map(|a| {
            if *a == *flags.socket {
                format!("unix://{}", private.display()).into()
            } else {
                a.clone()
            }
        })
        .collect();
    let spawn_server = |first: bool| -> std::io::Result<(u32, OwnedFd)> {
        let _ = std::fs::remove_file(&private);
        let mut c = Command::new(std::env::current_exe()?);
        c.args(&serve_args)
            .env(WORKER_ENV, "1")
            .env(STATE_ENV, &state)
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        // The first server tells `start` it is up by closing the stdout
        // `start` reads; a restarted one has no one waiting.
        if !first {
            c.stdout(Stdio::null());
        }
        let (child, mine) = ctl::spawn_partner(c)?;
        Ok((child.id(), mine))
    };

    let (server, ctl_end) = match adopting {
        Some(c) => (None, c),
        None => {
            let (pid, c) = spawn_server(true)?;
            (Some(pid), c)
        }
    };
    let held = Arc::new(Held {
        listener: listener.as_fd().try_clone_to_owned()?,
        conns: Mutex::new(
            adopted_conns
                .iter()
                .map(|(id, fd)| Ok((*id, fd.try_clone()?)))
                .collect::<std::io::Result<_>>()?,
        ),
        ctl: Mutex::new(Arc::new(ctl_end)),
    });
    let mut server = server;
    match server {
        Some(pid) => {
            held.sync(held.ctl())?;
            signal_started();
            log(format!("task server {pid} started behind {}", public.display()));
        }
        None => log(format!(
            "took over {} connections after the last keeper",
            adopted_conns.len()
        )),
    }

    let ctx = Arc::new(relay::Ctx {
        server: private.clone(),
        pending: state.join("pending"),
        log: log.clone(),
        on_close: {
            let held = held.clone();
            Arc::new(move |id| {
                held.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                let _ = ctl::send(&held.ctl(), Msg::Closed(id), None);
            })
        },
    });
    for (id, fd) in adopted_conns {
        if let Err(e) = relay::spawn(id, UnixStream::from(fd), ctx.clone(), true) {
            log(format!("taking over connection {id}: {e}"));
        }
    }
    {
        let (held, ctx, log) = (held.clone(), ctx.clone(), log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let id = conn_id();
                match conn.as_fd().try_clone_to_owned() {
                    Ok(copy) => held.add(id, copy),
                    Err(e) => log(format!("keeping a copy of a connection: {e}")),
                }
                if let Err(e) = relay::spawn(id, conn, ctx.clone(), false) {
                    log(format!("relaying a connection: {e}"));
                }
            }
        });
    }

    // Children's ends: the server's status for the loop below; any other
    // child is an orphan of a dead server, whose end the next one reads.
    let statuses: Arc<(Mutex<HashMap<u32, u32>>, Condvar)> = Arc::default();
    {
        let (statuses, state) = (statuses.clone(), state.clone());
        std::thread::spawn(move || loop {
            let mut status = 0;
            // SAFETY: waits for any child; status is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid < 0 {
                // No child yet (an adopting keeper): look again later.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status) as u32
            } else {
                128 + libc::WTERMSIG(status) as u32
            };
            let _ = std::fs::write(state.join("exited").join(pid.to_string()), code.to_string());
            statuses
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pid as u32, code);
            statuses.1.notify_all();
        });
    }

    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        // The server's channel ends when it dies, or it says goodbye first.
        let ctl = held.ctl();
        let bye = loop {
            match ctl::recv(&ctl) {
                Ok(Some((Msg::Bye, _))) => break true,
                Ok(Some(_)) => continue,
                _ => break false,
            }
        };
        if bye {
            // containerd's Shutdown: every task is gone.
            cleanup(&public, &private, &state);
            return Ok(0);
        }
        let code = server.and_then(|pid| {
            let (lock, cvar) = &*statuses;
            let (map, _) = cvar
                .wait_timeout_while(
                    lock.lock().unwrap_or_else(|p| p.into_inner()),
                    Duration::from_secs(2),
                    |m| !m.contains_key(&pid),
                )
                .unwrap_or_else(|p| p.into_inner());
            map.get(&pid).copied()
        });
        if code == Some(0) {
            // It ended by itself (another shim served the address).
            cleanup(&public, &private, &state);
            return Ok(0);
        }
        let now = Instant::now();
        restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if restarts.len() >= MAX_RESTARTS {
            log(format!(
                "task server died {MAX_RESTARTS} times in a minute; giving up"
            ));
            cleanup(&public, &private, &state);
            return Ok(1);
        }
        restarts.push(now);
        let (pid, c) = spawn_server(false)?;
        held.sync(Arc::new(c))?;
        server = Some(pid);
        log(format!(
            "task server ended ({}); restarted as {pid}",
            code.map(|c| format!("status {c}"))
                .unwrap_or_else(|| "not our child".into())
        ));
    }
}

/// In the task server: holds copies of what its keeper holds, and if the
/// keeper dies, starts a new one that takes them over (`keep` adopting).
/// `args` are the server's own; the keeper's are the same but for the
/// socket, containerd's address rather than the server's.
pub fn guard_keeper(ctl: OwnedFd, args: Vec<std::ffi::OsString>) {
    let keeper_args: Vec<std::ffi::OsString> = args[1..]
        .iter()
        .map(|a| match a.to_str().and_then(|s| s.strip_suffix(".server")) {
            Some(public) => public.into(),
            None => a.clone(),
        })
        .collect();
    std::thread::spawn(move || {
        let mut ctl = Arc::new(ctl);
        set_partner(ctl.clone());
        let mut listener: Option<OwnedFd> = None;
        let mut conns: HashMap<u64, OwnedFd> = HashMap::new();
        let mut restarts: Vec<Instant> = Vec::new();
        loop {
            while let Ok(Some((msg, fd))) = ctl::recv(&ctl) {
                match (msg, fd) {
                    (Msg::Listener, Some(fd)) => listener = Some(fd),
                    (Msg::Conn(id), Some(fd)) => {
                        conns.insert(id, fd);
                    }
                    (Msg::Closed(id), _) => {
                        conns.remove(&id);
                    }
                    _ => {}
                }
            }
            if EXITING.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
            let Some(l) = listener.as_ref().filter(|_| restarts.len() < MAX_RESTARTS) else {
                // Nothing to hand over, or the keeper keeps dying: let go,
                // so containerd sees the end and cleans up.
                log::warn!("the shim's keeper died and is not restarted");
                return;
            };
            restarts.push(now);
            match restart_keeper(&keeper_args, l, &conns) {
                Ok(c) => {
                    log::warn!("the shim's keeper died; started a new one");
                    ctl = Arc::new(c);
                    set_partner(ctl.clone());
                }
                Err(e) => {
                    log::error!("restarting the shim's keeper: {e}");
                    return;
                }
            }
        }
    });
}

fn restart_keeper(
    args: &[std::ffi::OsString],
    listener: &OwnedFd,
    conns: &HashMap<u64, OwnedFd>,
) -> std::io::Result<OwnedFd> {
    let mut c = Command::new(std::env::current_exe()?);
    c.args(args)
        .env_remove(WORKER_ENV)
        .env_remove(STATE_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (mut child, mine) = ctl::spawn_partner(c)?;
    std::thread::spawn(move || child.wait());
    ctl::hand_over(&mine, listener, conns)?;
    Ok(mine)
}

/// A connection's id, unique among a shim's (random, as the keeper that
/// made it may not be the one that relays it later).
fn conn_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a buffer we own, of that length.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_ne_bytes(b)
}

static EXITING: AtomicBool = AtomicBool::new(false);
static PARTNER: Mutex<Option<Arc<OwnedFd>>> = Mutex::new(None);

fn set_partner(c: Arc<OwnedFd>) {
    *PARTNER.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
}

/// In the task server, as it ends cleanly (containerd's Shutdown): its
/// keeper ends too, rather than restarting it.
pub fn farewell() {
    EXITING.store(true, Ordering::SeqCst);
    if let Some(c) = PARTNER.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = ctl::send(c, Msg::Bye, None);
    }
}

/// Binds containerd's address; `None` if a live shim already serves it.
fn bind(public: &Path) -> std::io::Result<Option<UnixListener>> {
    if let Some(dir) = public.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match UnixListener::bind(public) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(public).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(public)?;
            UnixListener::bind(public).map(Some)
        }
        Err(e) => Err(e),
    }
}

/// `start` waits for its child's stdout to close.
fn signal_started() {
    // SAFETY: replaces fd 1 with a copy of fd 2 (as containerd-shim does).
    unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) };
}

fn cleanup(public: &Path, private: &Path, state: &Path) {
    let _ = std::fs::remove_file(public);
    let _ = std::fs::remove_file(private);
    let _ = std::fs::remove_dir_all(state);
}
