//! A task's processes on the host side: the guest session that is its
//! process, with relays for its output (into containerd's FIFOs) and its
//! stdin, and a watcher for its end; an exec as a `banger vm exec` with
//! those FIFOs (or a pty the shim holds) as its stdio.

use super::placement::Target;
use super::{err, not_found, Service};
use crate::banger;
use crate::record::{Status, Stdio3};
use crate::spec::Process;
use containerd_shim::TtrpcResult;
use std::fs::OpenOptions;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Opens containerd's output FIFO for writing (its reader is open already).
fn open_out(path: &str) -> std::io::Result<Stdio> {
    if path.is_empty() {
        return Ok(Stdio::null());
    }
    Ok(OpenOptions::new().write(true).open(path)?.into())
}

/// A pipe fed from containerd's stdin FIFO, for a child's stdin.
fn stdin_pipe(path: &str, closed: Arc<AtomicBool>) -> std::io::Result<Stdio> {
    let (rd, wr) = std::io::pipe()?;
    feed_stdin(path, closed, wr)?;
    Ok(rd.into())
}

/// Copies containerd's stdin FIFO into `to` on a thread of its own. The
/// FIFO is opened without waiting for the client (which may open its end
/// late, or never) and polled: data is copied, the client closing its end
/// (or `CloseIO`, which sets `closed`) ends the copy and drops `to`.
fn feed_stdin(
    path: &str,
    closed: Arc<AtomicBool>,
    to: impl std::io::Write + Send + 'static,
) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut fifo = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut wr = to;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while !closed.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: fifo.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 200) };
            if n <= 0 {
                continue;
            }
            if pfd.revents & libc::POLLIN != 0 {
                match fifo.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if wr.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            } else if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                // The client had its end open and closed it.
                break;
            }
        }
    });
    Ok(())
}

/// Waits for a child that `Kill` and `Delete` may also reach (so it is
/// shared behind a lock, polled rather than waited on while holding it).
fn wait_shared(child: &Mutex<Child>) -> Option<std::process::ExitStatus> {
    loop {
        match child.lock().unwrap_or_else(|p| p.into_inner()).try_wait() {
            Ok(Some(st)) => return Some(st),
            Err(_) => return None,
            Ok(None) => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A guest session's exit as a shell would report it.
pub(super) fn session_exit(task: &str, vm: &str, session: &str) -> u32 {
    for _ in 0..100 {
        if let Ok(v) = banger::json(
            task,
            "session show",
            &["vm", "session", "show", vm, session, "--json"],
        ) {
            if v["state"] == "exited" || v["state"] == "lost" {
                if let Some(c) = v["code"].as_i64() {
                    return c as u32;
                }
                if let Some(s) = v["signal"].as_i64() {
                    return 128 + s as u32;
                }
                return 255;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    255
}

impl Service {
    /// Starts the task's process as the guest session `main`, with relays
    /// for its output and input and a watcher for its end.
    pub(super) fn start_main(&self, id: &str, at: &Target, p: &Process, io: &Stdio3) -> TtrpcResult<()> {
        let (vm, session) = (at.vm.as_str(), at.session.as_str());
        let mut args: Vec<String> = vec!["vm".into(), "session".into(), "start".into(), vm.into()];
        args.extend(["--name".into(), session.into()]);
        if let Some(r) = &at.root {
            args.extend(["--root".into(), r.clone()]);
        }
        if p.terminal {
            args.push("--tty".into());
        }
        if let Some(c) = &p.cwd {
            args.extend(["--cwd".into(), c.clone()]);
        }
        if let Some(u) = &p.user {
            args.extend(["--user".into(), u.to_arg()]);
        }
        for (k, v) in &p.env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        args.push("--".into());
        args.extend(p.args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        banger::run(id, "session start", &argv).map_err(err)?;
        // Output from the first byte, into containerd's FIFOs.
        let (mut c, _) = banger::command(id, "session logs", &["vm", "session", "logs", "-f", vm, session]);
        c.stdout(open_out(&io.stdout).map_err(err)?)
            .stderr(open_out(&io.stderr).map_err(err)?);
        let follower = c.spawn().map_err(err)?;
        let follower_pid = follower.id();
        let follower = Arc::new(Mutex::new(follower));
        if !io.stdin.is_empty() {
            let closed = self.with(id, |t| Ok(t.main.stdin_closed.clone()))?;
            let (mut c, _) = banger::command(
                id,
                "session send",
                &["vm", "session", "send", "--eof", vm, session],
            );
            c.stdin(stdin_pipe(&io.stdin, closed).map_err(err)?);
            let mut sender = c.spawn().map_err(err)?;
            std::thread::spawn(move || sender.wait());
        }
        self.with(id, |t| {
            t.main.status = Status::Running;
            t.main.child = Some(follower.clone());
            t.main.relay_pid = Some(follower_pid);
            Ok(())
        })?;
        self.save(id);
        let (svc, id, at) = (self.clone(), id.to_string(), at.clone());
        std::thread::spawn(move || {
            // The follower ends when the session does.
            wait_shared(&follower);
            let code = session_exit(&id, &at.vm, &at.session);
            svc.exited(&id, "", code);
            // A stopped container has no processes: its own VM stops with
            // its process (Delete removes it), so a stopped task or pod
            // holds no memory or CPU while the engine keeps it around.
            if at.owns_vm {
                let _ = banger::run(&id, "vm kill", &["vm", "kill", &at.vm]);
            }
        });
        Ok(())
    }

    /// Runs an exec as `banger vm exec` with containerd's FIFOs as stdio.
    pub(super) fn start_exec(
        &self,
        id: &str,
        exec_id: &str,
        at: &Target,
        p: &Process,
        io: &Stdio3,
    ) -> TtrpcResult<u32> {
        let mut args: Vec<String> = vec!["vm".into(), "exec".into(), at.vm.clone()];
        if let Some(r) = &at.root {
            args.extend(["--root".into(), r.clone()]);
        }
        if !io.stdin.is_empty() {
            args.push("-i".into());
        }
        if p.terminal {
            args.push("-t".into());
        }
        if let Some(c) = &p.cwd {
            args.extend(["--cwd".into(), c.clone()]);
        }
        if let Some(u) = &p.user {
            args.extend(["--user".into(), u.to_arg()]);
        }
        args.push("--".into());
        if !p.env.is_empty() {
            args.push("env".into());
            args.extend(p.env.iter().map(|(k, v)| format!("{k}={v}")));
        }
        args.extend(p.args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut c, _) = banger::command(id, "vm exec", &argv);
        let closed = self.with(id, |t| {
            Ok(t.execs
                .get(exec_id)
                .ok_or_else(|| not_found(exec_id))?
                .stdin_closed
                .clone())
        })?;
        let mut pty = None;
        if p.terminal {
            // The CLI's terminal is a pty the shim holds: its output and
            // input go through the master, and ResizePty sizes it.
            let (master, slave) = crate::pty::open(24, 80).map_err(err)?;
            let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(err);
            c.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: only setsid and an ioctl between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut c, || crate::pty::take_as_terminal());
            }
            let out = if io.stdout.is_empty() {
                None
            } else {
                Some(OpenOptions::new().write(true).open(&io.stdout).map_err(err)?)
            };
            crate::pty::relay_out(std::fs::File::from(dup(&master)?), out);
            if !io.stdin.is_empty() {
                feed_stdin(&io.stdin, closed, std::fs::File::from(dup(&master)?)).map_err(err)?;
            }
            pty = Some(Arc::new(master));
        } else {
            c.stdout(open_out(&io.stdout).map_err(err)?)
                .stderr(open_out(&io.stderr).map_err(err)?);
            if !io.stdin.is_empty() {
                c.stdin(stdin_pipe(&io.stdin, closed).map_err(err)?);
            }
        }
        let child = c.spawn().map_err(err)?;
        // The command's copies of the slave go, so the master sees the end.
        drop(c);
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        self.with(id, |t| {
            let e = t.execs.get_mut(exec_id).ok_or_else(|| not_found(exec_id))?;
            e.status = Status::Running;
            e.pid = pid;
            e.child = Some(child.clone());
            e.relay_pid = Some(pid);
            e.pty = pty;
            Ok(())
        })?;
        self.save(id);
        let (svc, id, exec_id) = (self.clone(), id.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let status = wait_shared(&child);
            use std::os::unix::process::ExitStatusExt;
            let code = match status {
                Some(st) => st
                    .code()
                    .map(|c| c as u32)
                    .unwrap_or_else(|| 128 + st.signal().unwrap_or(9) as u32),
                None => 255,
            };
            svc.exited(&id, &exec_id, code);
        });
        Ok(pid)
    }
}
