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

use crate::relay;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
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

fn socket_path(address: &str) -> PathBuf {
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

fn keep(args: Vec<std::ffi::OsString>) -> std::io::Result<i32> {
    let flags = containerd_shim::parse(&args[1..])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let public = socket_path(&flags.socket);
    let mut private = public.clone().into_os_string();
    private.push(".server");
    let private = PathBuf::from(private);
    let state = state_dir(&public);
    std::fs::create_dir_all(state.join("exited"))?;
    let log = logger();

    let Some(listener) = bind(&public)? else {
        // Another keeper serves this address (a second container of the
        // same group raced this one): containerd uses that one.
        signal_started();
        return Ok(0);
    };
    // SAFETY: plain prctl; the orphans of the server become ours to reap.
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
    let spawn_server = |first: bool| -> std::io::Result<u32> {
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
        Ok(c.spawn()?.id())
    };
    let mut server = spawn_server(true)?;
    signal_started();
    log(format!(
        "task server {server} started behind {}",
        public.display()
    ));

    {
        let (private, log) = (private.clone(), log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = relay::spawn(conn, private.clone(), log.clone()) {
                    log(format!("relaying a connection: {e}"));
                }
            }
        });
    }

    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waits for any child; status is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status) as u32
        } else {
            128 + libc::WTERMSIG(status) as u32
        };
        if pid as u32 != server {
            // An orphan of a dead server: the next server reads its end.
            let _ = std::fs::write(state.join("exited").join(pid.to_string()), code.to_string());
            continue;
        }
        if libc::WIFEXITED(status) && code == 0 {
            // containerd's Shutdown: every task is gone.
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
        server = spawn_server(false)?;
        log(format!("task server ended with {code}; restarted as {server}"));
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
