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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `cmd` in `name`, streaming output; returns the shell-style code.
pub async fn exec(c: &Client, name: &str, cmd: Vec<String>, stdin: bool, cwd: Option<String>) -> Result<i32> {
    let stdin_b64 = if stdin {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        Some(base64::engine::general_purpose::STANDARD.encode(buf))
    } else {
        None
    };
    let req = d::VmExec {
        name: name.to_string(),
        exec: ExecRequest {
            argv: cmd,
            env: vec![],
            cwd,
            stdin_b64,
        },
    };
    let st: ExitStatus = c
        .call_with_events::<d::VmExecM>(&req, None, |ev: ExecOutput| {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&ev.data_b64) {
                let _ = match ev.stream {
                    StreamName::Stdout => std::io::stdout()
                        .write_all(&bytes)
                        .and_then(|_| std::io::stdout().flush()),
                    StreamName::Stderr => std::io::stderr().write_all(&bytes),
                };
            }
        })
        .await?;
    Ok(st.shell_code())
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
