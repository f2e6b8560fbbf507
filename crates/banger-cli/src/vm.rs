//! `banger vm ...`: lifecycle, exec and run.

use crate::output::{print, Progress};
use anyhow::{bail, Result};
use banger_proto::methods::agent::{ExecOutput, ExecRequest, ExitStatus, StreamName};
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::Client;
use base64::Engine;
use clap::{Args, Subcommand};
use std::io::Write;
use std::time::Duration;

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM (and wait until it is ready).
    Create {
        #[command(flatten)]
        args: CreateArgs,
        /// Leave it stopped.
        #[arg(long)]
        no_start: bool,
    },
    /// Start a stopped VM.
    Start { name: String },
    /// Stop a VM gracefully (sync, power off; killed after a deadline).
    Stop { name: String },
    /// Stop then start a VM.
    Restart { name: String },
    /// Kill a VM's VMM at once.
    Kill { name: String },
    /// Delete a VM and everything it owns.
    Delete { name: String },
    /// Delete every VM that is not running.
    Prune,
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Print a VM's serial console log.
    Logs { name: String },
    /// Run a command in a running VM.
    Exec {
        name: String,
        /// Pass this process's stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Create a VM, copy a git workspace in, run a command, print the result.
    Run(RunArgs),
    /// Open an SSH session (or run a command) with the system ssh client.
    Ssh {
        name: String,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// ProxyCommand for `ssh NAME.vm` (see `banger ssh-config`).
    #[command(hide = true)]
    SshProxy { host: String, port: u16 },
    /// Workspaces in a running VM.
    #[command(subcommand)]
    Workspace(WorkspaceCmd),
}

#[derive(Args)]
pub struct RunArgs {
    /// A git work tree to copy to /root/repo in the guest.
    pub path: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub create: CreateArgs,
    /// Delete the VM when the command or session ends.
    #[arg(long)]
    pub rm: bool,
    /// Prepare the VM and exit, leaving it running.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Also copy untracked files that git does not ignore.
    #[arg(long)]
    pub include_untracked: bool,
    /// Create this branch in the guest repository.
    #[arg(long)]
    pub branch: Option<String>,
    /// Start --branch from this commit instead of HEAD.
    #[arg(long, requires = "branch")]
    pub from: Option<String>,
    /// Print the files that would be copied; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the tooling bootstrap (.mise.toml / .tool-versions).
    #[arg(long)]
    pub no_bootstrap: bool,
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

#[derive(Subcommand)]
pub enum WorkspaceCmd {
    /// Copy a git work tree into a running VM.
    Prepare {
        name: String,
        path: std::path::PathBuf,
        #[arg(long)]
        include_untracked: bool,
        #[arg(long)]
        branch: Option<String>,
        #[arg(long, requires = "branch")]
        from: Option<String>,
    },
    /// Print a binary patch of the guest workspace against its base commit.
    Export {
        name: String,
        #[arg(long)]
        base_commit: Option<String>,
        /// Write the patch here instead of stdout.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct CreateArgs {
    /// VM name (a DNS label); generated when omitted.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long, visible_alias = "vcpu")]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    /// Work disk (/root) size in MiB.
    #[arg(long)]
    pub disk_size: Option<u64>,
    /// No network interface: reach the guest over vsock only.
    #[arg(long)]
    pub no_network: bool,
    /// Give the VM outbound network access (NAT).
    #[arg(long)]
    pub nat: bool,
}

/// DNS-label check, done here too so a typo fails before the daemon is asked.
pub fn check_name(name: &str) -> Result<()> {
    banger_proto::names::validate_vm_name(name).map_err(anyhow::Error::msg)
}

fn show_vm(v: &d::VmInfo) {
    println!("name:     {}", v.name);
    println!("id:       {}", v.id);
    println!("state:    {}", v.state);
    println!("vmm:      {}", v.vmm);
    println!("image:    {}", v.image);
    println!(
        "spec:     {} vCPU, {} MiB, work disk {} MiB",
        v.vcpus,
        v.memory_mib,
        v.work_disk_bytes >> 20
    );
    if let Some(pid) = v.pid {
        println!("pid:      {pid}");
    }
    println!("vsock:    cid {}", v.vsock_cid);
    println!("dir:      {}", v.vm_dir);
    if let Some(e) = &v.last_error {
        println!("error:    {}", e.lines().next().unwrap_or_default());
    }
}

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
                no_network: a.no_network,
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
    what: &str,
    name: &str,
    call: impl std::future::Future<Output = Result<T, banger_proto::ClientError>>,
) -> Result<T> {
    let op = banger_proto::opid::current()
        .map(|o| o.to_string())
        .unwrap_or_default();
    tokio::select! {
        r = call => match r {
            Err(banger_proto::ClientError::NoAnswer { .. }) | Err(banger_proto::ClientError::Frame { .. }) => bail!(
                "the daemon went away during {what} {name} ({op}); when it restarts it finishes or undoes \
                 the operation: see `banger vm show {name}`"
            ),
            r => Ok(r?),
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "interrupted: {what} {name} keeps going in the daemon as {op}; \
                 follow it with `banger daemon operations`"
            );
            std::process::exit(130);
        }
    }
}

pub async fn run(c: &Client, cmd: VmCmd, json: bool) -> Result<i32> {
    let vm_ref = |name: &str| -> Result<d::VmRef> {
        check_name(name)?;
        Ok(d::VmRef {
            name: name.to_string(),
        })
    };
    match cmd {
        VmCmd::Create { args, no_start } => {
            let v = create(c, &args, !no_start).await?;
            print(json, &v, show_vm);
        }
        VmCmd::Start { name } => {
            let v = follow("vm start", &name, c.call::<d::VmStart>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        VmCmd::Stop { name } => {
            let v = follow("vm stop", &name, c.call::<d::VmStop>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        VmCmd::Restart { name } => {
            let v = follow("vm restart", &name, c.call::<d::VmRestart>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        VmCmd::Kill { name } => {
            let v = follow("vm kill", &name, c.call::<d::VmKill>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        VmCmd::Delete { name } => {
            follow("vm delete", &name, c.call::<d::VmDelete>(&vm_ref(&name)?, None)).await?;
            if !json {
                println!("deleted {name}");
            }
        }
        VmCmd::Prune => {
            let p = follow("vm prune", "", c.call::<d::VmPrune>(&Empty {}, None)).await?;
            print(json, &p, |p| {
                for n in &p.deleted {
                    println!("deleted {n}");
                }
            });
        }
        VmCmd::List => {
            let vms = c.call::<d::VmList>(&Empty {}, None).await?;
            print(json, &vms, |vms| {
                println!(
                    "{:<24} {:<9} {:<12} {:<8} {:>5} {:>7}",
                    "NAME", "STATE", "VMM", "PID", "VCPU", "MEM"
                );
                for v in vms {
                    let pid = v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<24} {:<9} {:<12} {:<8} {:>5} {:>6}M",
                        v.name, v.state, v.vmm, pid, v.vcpus, v.memory_mib
                    );
                }
            });
        }
        VmCmd::Show { name } => print(json, &c.call::<d::VmShow>(&vm_ref(&name)?, None).await?, show_vm),
        VmCmd::Logs { name } => {
            check_name(&name)?;
            let l = c
                .call::<d::VmLogsM>(
                    &d::VmLogsParams {
                        name,
                        tail_bytes: None,
                    },
                    None,
                )
                .await?;
            print(json, &l, |l| print!("{}", l.serial));
        }
        VmCmd::Exec {
            name,
            stdin,
            cwd,
            cmd,
        } => {
            check_name(&name)?;
            return exec(c, &name, cmd, stdin, cwd).await;
        }
        VmCmd::Run(r) => return crate::run::run(c, r).await,
        VmCmd::Ssh { name, cmd } => {
            check_name(&name)?;
            return crate::ssh::ssh(c, &name, &cmd).await;
        }
        VmCmd::SshProxy { host, port } => return crate::ssh::proxy(c, &host, port).await,
        VmCmd::Workspace(WorkspaceCmd::Prepare {
            name,
            path,
            include_untracked,
            branch,
            from,
        }) => {
            check_name(&name)?;
            let path = std::path::absolute(&path)?.display().to_string();
            let req = d::WorkspacePrepare {
                name: name.clone(),
                path,
                include_untracked,
                branch,
                from,
            };
            let w = follow(
                "vm workspace prepare",
                &name,
                c.call::<d::VmWorkspacePrepare>(&req, None),
            )
            .await?;
            crate::run::untracked_notice(&w.skipped_untracked);
            print(json, &w, |w| {
                println!(
                    "copied {} files ({} KiB) to {}",
                    w.files,
                    w.bytes / 1024,
                    w.guest_path
                )
            });
        }
        VmCmd::Workspace(WorkspaceCmd::Export {
            name,
            base_commit,
            output,
        }) => {
            check_name(&name)?;
            let mut patch = Vec::new();
            let st = c
                .call_with_events::<d::VmWorkspaceExport>(
                    &d::WorkspaceExport { name, base_commit },
                    None,
                    |ev: ExecOutput| {
                        if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(&ev.data_b64) {
                            match ev.stream {
                                StreamName::Stdout => patch.extend(b),
                                StreamName::Stderr => {
                                    let _ = std::io::stderr().write_all(&b);
                                }
                            }
                        }
                    },
                )
                .await?;
            if st.shell_code() != 0 {
                bail!("export failed in the guest (exit {})", st.shell_code());
            }
            match output {
                Some(f) => std::fs::write(&f, &patch)?,
                None => std::io::stdout().write_all(&patch)?,
            }
        }
    }
    Ok(0)
}
