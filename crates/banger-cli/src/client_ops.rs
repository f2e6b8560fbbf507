//! Client-side steps that several commands share: following a create or a
//! mutating verb to its end, streaming an exec, and the ssh command line
//! for a guest. Commands build on these and never on each other.

use crate::args::{check_name, CreateArgs};
use crate::output::Progress;
use anyhow::{anyhow, bail, Result};
use banger_proto::methods::agent::{ExecOutput, ExecRequest, ExitStatus, StreamName};
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::Client;
use base64::Engine;
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Begins a create and follows it to the end, showing its stages.
pub async fn create(c: &Client, a: &CreateArgs, start: bool) -> Result<d::VmInfo> {
    if let Some(n) = &a.name {
        check_name(n)?;
    }
    let begun = c
        .call::<d::VmCreateBegin>(
            &d::VmCreate {
                name: a.name.clone().unwrap_or_default(),
                image: a.image.clone(),
                vcpus: a.vcpus,
                memory_mib: a.memory,
                work_disk_mib: a.disk_size,
                start,
                nat: a.nat,
                peers: a.peers,
                no_network: a.no_network,
                netns: a.netns.clone(),
                auto_stop_idle_secs: a.auto_stop_idle,
            },
            None,
        )
        .await?;
    let progress = Progress::new(&format!("creating {} ({})", begun.name, begun.op_id));
    let op = d::OpRef {
        op_id: begun.op_id.clone(),
    };
    let mut cancelled = false;
    // Polled quickly at first (a create without a boot is done in
    // milliseconds), then every 100 ms.
    let mut pause = Duration::from_millis(2);
    loop {
        // Ctrl-C asks the daemon to cancel (it cleans up what it made) and
        // keeps following the operation to its end.
        if !cancelled {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    cancelled = true;
                    eprintln!("cancelling {} ...", begun.op_id);
                    let _ = c.call::<d::VmCreateCancel>(&op, None).await;
                }
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
        let st = match c.call::<d::VmCreateStatusM>(&op, None).await {
            Ok(st) => st,
            Err(e) if e.code() == Some(banger_proto::ErrorCode::NotFound) || e.is_unreachable() => {
                progress.finish();
                bail!(
                    "the daemon restarted while creating {} ({}): the operation is gone; \
                     a restarted daemon removes an unfinished creation and tears down an unfinished start. \
                     See `banger vm show {}`",
                    begun.name,
                    begun.op_id,
                    begun.name
                );
            }
            Err(e) => return Err(e.into()),
        };
        progress.stage(&st.op.stage, st.op.elapsed_ms);
        if st.op.done {
            progress.finish();
            if let Some(e) = st.op.error {
                return Err(banger_proto::ClientError::Rpc(e).into());
            }
            return st
                .vm
                .ok_or_else(|| anyhow::anyhow!("the VM vanished after creation ({})", begun.op_id));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// How `vm exec` connects the command to this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecIo {
    /// This process's stdin goes to the command, streamed (any size).
    pub stdin: bool,
    /// The command gets a terminal (raw mode here, the size followed).
    pub tty: bool,
}

/// Where in the guest `vm exec`'s command runs.
#[derive(Debug, Clone, Default)]
pub struct Place {
    /// Its working directory (inside `root` when that is given).
    pub cwd: Option<String>,
    /// A guest directory it runs chrooted into, as a container's tree.
    pub root: Option<String>,
    /// Who it runs as (root when absent).
    pub user: Option<banger_proto::methods::agent::User>,
}

/// Writes a piece of the command's output here. Err when our stdout is
/// closed (`| head`): the exec ends as a program killed by SIGPIPE would.
pub fn write_output(ev: ExecOutput) -> std::io::Result<()> {
    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&ev.data_b64) {
        match ev.stream {
            StreamName::Stdout => std::io::stdout()
                .write_all(&bytes)
                .and_then(|_| std::io::stdout().flush())?,
            StreamName::Stderr => {
                let _ = std::io::stderr().write_all(&bytes);
            }
        }
    }
    Ok(())
}

/// The shell's code for a program whose reader went away (128 + SIGPIPE).
pub const BROKEN_PIPE: i32 = 141;

/// Runs `cmd` in `name`, streaming output; returns the shell-style code.
pub async fn exec(c: &Client, name: &str, cmd: Vec<String>, io: ExecIo, at: Place) -> Result<i32> {
    if io.stdin || io.tty {
        return exec_streaming(c, name, cmd, io, at).await;
    }
    let req = d::VmExec {
        name: name.to_string(),
        exec: ExecRequest {
            argv: cmd,
            env: vec![],
            cwd: at.cwd,
            stdin_b64: None,
            root: at.root,
            user: at.user,
        },
        stream_input: false,
        tty: None,
    };
    let st: ExitStatus = c
        .call_with_events::<d::VmExecM>(&req, None, |ev| {
            if write_output(ev).is_err() {
                // Leaving closes the connection: the daemon cancels the
                // call and the guest command's group is ended.
                std::process::exit(BROKEN_PIPE);
            }
        })
        .await?;
    Ok(st.shell_code())
}

/// What a streaming call sends after its request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Input {
    /// This process's stdin, as stream frames (an empty one at its end).
    pub stdin: bool,
    /// Raw mode on this terminal, and its size as it changes.
    pub tty: bool,
    /// A byte that ends the call from here instead of being sent (the
    /// detach key of `session attach`).
    pub detach_key: Option<u8>,
}

/// How a streaming call ended.
pub enum Streamed {
    /// The daemon's result.
    Done(serde_json::Value),
    /// Our stdout was closed (`| head`).
    BrokenPipe,
    /// The detach key was pressed.
    Detached,
}

/// A call whose client sends stream frames after its request (stdin,
/// resizes), as `vm exec -i/-t` and session attach and send do, while the
/// daemon's events come back to `on_event` (an error there, a closed
/// stdout, ends the call). The daemon reads the frames only as fast as
/// the guest takes them, so input of any size flows in constant memory.
pub async fn call_streaming<M: banger_proto::Method>(
    c: &Client,
    params: &M::Params,
    input: Input,
    mut on_event: impl FnMut(serde_json::Value) -> std::io::Result<()>,
) -> Result<Streamed> {
    use banger_proto::frame::{read_json, write_json, Frame, Request};
    use banger_proto::stream::{self, Kind};
    let sock = tokio::net::UnixStream::connect(c.path())
        .await
        .map_err(|e| anyhow!("connecting to bangerd at {}: {e}", c.path().display()))?;
    let (rd, mut wr) = sock.into_split();
    // Listening for resizes before the request goes, and sending the size
    // once more after it (below): a resize between the size the request
    // carries and a handler installed later would be lost for good.
    let winch = if input.tty {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
    } else {
        None
    };
    let envelope = Request {
        version: banger_proto::PROTOCOL_VERSION,
        method: M::NAME.to_string(),
        params: serde_json::to_value(params)?,
        op_id: banger_proto::opid::current().map(|o| o.to_string()),
    };
    write_json(&mut wr, &envelope).await?;
    // Raw mode only once the request is out; restored when this returns.
    let _raw = if input.tty {
        crate::term::RawMode::enable()
    } else {
        None
    };
    let (detached_tx, mut detached) = tokio::sync::oneshot::channel::<()>();
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; stream::MAX_PAYLOAD];
        let mut open = input.stdin;
        let mut winch = winch;
        if winch.is_some() {
            if let Some(w) = crate::term::size() {
                if stream::write(&mut wr, &stream::Frame::resize(w)).await.is_err() {
                    return;
                }
            }
        }
        let mut detached_tx = Some(detached_tx);
        loop {
            let frame = tokio::select! {
                n = stdin.read(&mut buf), if open => match n {
                    Ok(n) if n > 0 => {
                        let mut chunk = &buf[..n];
                        let key = input.detach_key.and_then(|k| chunk.iter().position(|b| *b == k));
                        if let Some(at) = key {
                            chunk = &chunk[..at];
                            if !chunk.is_empty() {
                                let _ = stream::write(&mut wr, &stream::Frame::new(Kind::Stdin, chunk.to_vec())).await;
                            }
                            if let Some(tx) = detached_tx.take() {
                                let _ = tx.send(());
                            }
                            return;
                        }
                        stream::Frame::new(Kind::Stdin, chunk.to_vec())
                    }
                    _ => {
                        open = false;
                        stream::Frame::new(Kind::Stdin, Vec::new())
                    }
                },
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    match crate::term::size() {
                        Some(w) => stream::Frame::resize(w),
                        None => continue,
                    }
                }
                else => std::future::pending().await,
            };
            if stream::write(&mut wr, &frame).await.is_err() {
                return;
            }
        }
    });
    let mut rd = tokio::io::BufReader::new(rd);
    // The feeder may end without detaching (stdin done, daemon gone); a
    // finished oneshot must not be polled again.
    let mut may_detach = true;
    let outcome = loop {
        let next = tokio::select! {
            f = read_json::<_, Frame>(&mut rd) => f,
            d = &mut detached, if may_detach => match d {
                Ok(()) => break Ok(Streamed::Detached),
                Err(_) => {
                    may_detach = false;
                    continue;
                }
            },
        };
        match next {
            Ok(Some(Frame::Event { event })) => {
                if on_event(event).is_err() {
                    break Ok(Streamed::BrokenPipe);
                }
            }
            Ok(Some(Frame::Heartbeat)) => {}
            Ok(Some(Frame::Result { result, .. })) => break Ok(Streamed::Done(result)),
            Ok(Some(Frame::Error { error })) => break Err(banger_proto::ClientError::Rpc(error).into()),
            Ok(None) => break Err(anyhow!("bangerd closed the connection before the call ended")),
            Err(e) => break Err(anyhow!("reading from bangerd: {e}")),
        }
    };
    feeder.abort();
    outcome
}

/// `vm exec -i` / `-t`: stdin (and the terminal's size) streamed.
async fn exec_streaming(c: &Client, name: &str, cmd: Vec<String>, io: ExecIo, at: Place) -> Result<i32> {
    use banger_proto::stream::WinSize;
    let size = io
        .tty
        .then(|| crate::term::size().unwrap_or(WinSize { rows: 24, cols: 80 }));
    let mut env = vec![];
    if io.tty {
        env.push((
            "TERM".to_string(),
            std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
        ));
    }
    let req = d::VmExec {
        name: name.to_string(),
        exec: ExecRequest {
            argv: cmd,
            env,
            cwd: at.cwd,
            stdin_b64: None,
            root: at.root,
            user: at.user,
        },
        stream_input: true,
        tty: size,
    };
    let input = Input {
        stdin: io.stdin || io.tty,
        tty: io.tty,
        detach_key: None,
    };
    let done = call_streaming::<d::VmExecM>(c, &req, input, |event| {
        match serde_json::from_value::<ExecOutput>(event) {
            Ok(ev) => write_output(ev),
            Err(_) => Ok(()),
        }
    })
    .await?;
    match done {
        Streamed::Done(v) => serde_json::from_value::<ExitStatus>(v)
            .map(|st| st.shell_code())
            .map_err(|e| anyhow!("bad answer from bangerd: {e}")),
        Streamed::BrokenPipe => Ok(BROKEN_PIPE),
        Streamed::Detached => Ok(0),
    }
}

/// Waits for a mutating verb. Ctrl-C only detaches: the daemon runs the
/// operation to its end whoever listens, so say so and how to follow it.
/// A daemon that goes away mid-operation finishes or undoes it when it
/// comes back; say that too instead of a bare I/O error.
pub async fn follow<T>(
    c: &Client,
    what: &str,
    name: &str,
    call: impl std::future::Future<Output = Result<T, banger_proto::ClientError>>,
) -> Result<T> {
    let op = banger_proto::opid::current()
        .map(|o| o.to_string())
        .unwrap_or_default();
    // On a terminal, the operation's stages as it goes (polled from the
    // daemon's operation registry; scripts get only the result).
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr())
        .then(|| Progress::new(&format!("{what} {name} ({op})")));
    tokio::pin!(call);
    let outcome = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tokio::signal::ctrl_c() => {
                if let Some(p) = &progress {
                    p.finish();
                }
                eprintln!(
                    "interrupted: {what} {name} keeps going in the daemon as {op}; \
                     follow it with `banger daemon operations`"
                );
                std::process::exit(130);
            }
            _ = tokio::time::sleep(Duration::from_millis(250)), if progress.is_some() => {
                if let (Some(p), Ok(ops)) = (&progress, c.call::<d::OperationsList>(&Empty {}, None).await) {
                    if let Some(o) = ops.iter().rev().find(|o| o.op_id == op && !o.done) {
                        p.stage(&o.stage, o.elapsed_ms);
                    }
                }
            }
        }
    };
    if let Some(p) = &progress {
        p.finish();
    }
    match outcome {
        Err(banger_proto::ClientError::NoAnswer { .. }) | Err(banger_proto::ClientError::Frame { .. }) => {
            bail!(
                "the daemon went away during {what} {name} ({op}); when it restarts it finishes or undoes \
             the operation: see `banger vm show {name}`"
            )
        }
        r => Ok(r?),
    }
}

/// The guest's address as the daemon records it; the VM must be running.
pub async fn guest_ip(c: &Client, name: &str) -> Result<Ipv4Addr> {
    let v = c
        .call::<d::VmShow>(
            &d::VmRef {
                name: name.to_string(),
            },
            None,
        )
        .await?;
    if v.state != "running" {
        bail!("VM {name} is {}: start it with `banger vm start {name}`", v.state);
    }
    v.guest_ip
        .as_deref()
        .and_then(|g| g.split('/').next()?.parse().ok())
        .ok_or_else(|| anyhow!("VM {name} has no network address (created with --no-network?)"))
}

/// The ssh command line for a VM: banger's key and pinned host keys.
pub async fn ssh_command(c: &Client, name: &str, cmd: &[String], tty: bool) -> Result<std::process::Command> {
    let info = c.call::<d::SshInfoM>(&Empty {}, None).await?;
    let ip = guest_ip(c, name).await?;
    let mut ssh = std::process::Command::new("ssh");
    ssh.args(["-i", &info.key, "-o", "IdentitiesOnly=yes"])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", info.known_hosts),
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .args(["-o", &format!("HostKeyAlias={name}.vm")]);
    if tty {
        ssh.arg("-t");
    }
    ssh.arg(format!("{}@{ip}", info.user)).args(cmd);
    Ok(ssh)
}
