//! `banger vm ...` on the machines themselves: lifecycle, exec, the
//! read-only views, and workspaces. `run` and `ssh` have modules of their
//! own; `main` routes each subcommand to its module.

use crate::args::{check_name, CreateArgs};
use crate::client_ops::{create, exec, follow, ExecIo, Place};
use crate::output::{bytes, escape, print, untracked_notice};
use anyhow::{bail, Result};
use banger_proto::methods::agent::{ExecOutput, StreamName};
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::Client;
use base64::Engine;
use clap::Subcommand;
use std::io::Write;

/// The verbs on one VM or on all of them. `main` flattens these into
/// `banger vm`, ahead of `run`, `ssh` and `workspace`.
#[derive(Subcommand)]
pub enum MachineCmd {
    /// Create a VM (and wait until it is ready).
    Create {
        #[command(flatten)]
        args: CreateArgs,
        /// Leave it stopped.
        #[arg(long)]
        no_start: bool,
    },
    /// Start a stopped VM.
    Start {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Stop a VM gracefully (sync, power off; killed after a deadline).
    Stop {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Stop then start a VM.
    Restart {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Kill a VM's VMM at once.
    Kill {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Delete a VM and everything it owns.
    Delete {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Delete every VM that is not running.
    Prune,
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Print a VM's serial console log.
    Logs {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Change a stopped VM's resources (the work disk grows, never shrinks).
    Set {
        #[arg(add = crate::complete::vms())]
        name: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Work disk size in MiB.
        #[arg(long)]
        disk_size: Option<u64>,
    },
    /// Run a command in a running VM.
    Exec {
        #[arg(add = crate::complete::vms())]
        name: String,
        /// Pass this process's stdin to the command (streamed: any size).
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Give the command a terminal (raw mode here; the window size
        /// follows this terminal's). Ctrl-C goes to the command.
        #[arg(short = 't', long)]
        tty: bool,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Run chrooted into this guest directory (a container's tree), in
        /// a mount namespace of its own with /proc, /sys and /dev; `--cwd`
        /// is then inside it.
        #[arg(long)]
        root: Option<String>,
        /// Run as UID[:GID[:GROUP,...]] (numbers; the gid defaults to the uid).
        #[arg(long, value_parser = banger_proto::methods::agent::User::parse)]
        user: Option<banger_proto::methods::agent::User>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Long-running processes in a VM that outlive the command that
    /// started them: start, list, show, logs, attach, send, stop, kill, rm.
    Session {
        #[command(subcommand)]
        cmd: crate::session::SessionCmd,
    },
    /// List the TCP and UDP ports listening in a running VM.
    Ports {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Show a running VM's CPU, memory, disk, network and uptime.
    Stats {
        #[arg(add = crate::complete::vms())]
        name: String,
    },
    /// Save a running VM (memory, device state, disks) as a snapshot to
    /// restore new VMs from; the VM is paused for the copy, then runs on.
    /// Firecracker VMs made with --no-network.
    Snapshot {
        #[arg(add = crate::complete::vms())]
        name: String,
        /// The snapshot's name (made up from the VM's otherwise).
        #[arg(long = "name", id = "snapshot_name")]
        snapshot: Option<String>,
    },
    /// A new VM from a snapshot: its own name, CID and disks, the guest
    /// resumed where the snapshot left it and re-seeded (hostname,
    /// entropy, clock).
    Restore {
        snapshot: String,
        /// The new VM's name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
pub enum WorkspaceCmd {
    /// Copy a git work tree into a running VM.
    Prepare {
        #[arg(add = crate::complete::vms())]
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
        #[arg(add = crate::complete::vms())]
        name: String,
        #[arg(long)]
        base_commit: Option<String>,
        /// Write the patch here instead of stdout.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
        /// Write it even if it creates symlinks (listed on stderr either way).
        #[arg(long)]
        allow_symlinks: bool,
    },
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
    println!(
        "dir:      {} ({:.1} MiB on disk)",
        v.vm_dir,
        v.disk_bytes as f64 / (1 << 20) as f64
    );
    if let Some(e) = &v.last_error {
        println!("error:    {}", e.lines().next().unwrap_or_default());
    }
}

/// Ports as a table. Process names come from the guest: escaped.
fn show_ports(p: &d::VmPorts) {
    println!(
        "{:<5} {:<24} {:>5}  {:<22} {:<5} ADDRESS",
        "PROTO", "BIND", "PORT", "PROCESS", "HTTP"
    );
    for port in &p.ports {
        let process = match (&port.process, port.pid) {
            (Some(n), Some(pid)) => format!("{} ({pid})", escape(n)),
            (Some(n), None) => escape(n),
            (None, Some(pid)) => format!("({pid})"),
            (None, None) => "-".into(),
        };
        let http = match port.http {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let address = match (&port.address, port.reachable) {
            (Some(a), _) => escape(a),
            (None, false) => "(inside the guest only)".into(),
            (None, true) => "-".into(),
        };
        println!(
            "{:<5} {:<24} {:>5}  {:<22} {:<5} {address}",
            port.proto.as_str(),
            port.bind,
            port.port,
            process,
            http
        );
    }
    if p.truncated {
        println!("(more sockets listen than are listed)");
    }
    if !p.http_checked {
        println!(
            "(the VM has no network: ports are not reachable from the host and were not checked for HTTP)"
        );
    }
}

fn show_stats(s: &d::VmStats) {
    println!("cpu:      {:.1}% of {} vCPU", s.cpu_percent, s.vcpus);
    let used = s.memory_total_bytes.saturating_sub(s.memory_available_bytes);
    println!(
        "memory:   {} used of {} ({} available)",
        bytes(used),
        bytes(s.memory_total_bytes),
        bytes(s.memory_available_bytes)
    );
    for d in &s.disks {
        println!(
            "disk:     {} used of {} on {}",
            bytes(d.used_bytes),
            bytes(d.total_bytes),
            escape(&d.path)
        );
    }
    match &s.net_interface {
        Some(i) => println!(
            "network:  {} received, {} sent on {}",
            bytes(s.net_rx_bytes),
            bytes(s.net_tx_bytes),
            escape(i)
        ),
        None => println!("network:  none"),
    }
    let u = s.uptime_secs;
    println!("uptime:   {}h {:02}m {:02}s", u / 3600, u / 60 % 60, u % 60);
    println!("load:     {:.2} {:.2} {:.2}", s.load[0], s.load[1], s.load[2]);
}

pub async fn run(c: &Client, cmd: MachineCmd, json: bool) -> Result<i32> {
    let vm_ref = |name: &str| -> Result<d::VmRef> {
        check_name(name)?;
        Ok(d::VmRef {
            name: name.to_string(),
        })
    };
    match cmd {
        MachineCmd::Create { args, no_start } => {
            let v = create(c, &args, !no_start).await?;
            print(json, &v, show_vm);
        }
        MachineCmd::Start { name } => {
            let v = follow(c, "vm start", &name, c.call::<d::VmStart>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        MachineCmd::Stop { name } => {
            let v = follow(c, "vm stop", &name, c.call::<d::VmStop>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        MachineCmd::Restart { name } => {
            let v = follow(
                c,
                "vm restart",
                &name,
                c.call::<d::VmRestart>(&vm_ref(&name)?, None),
            )
            .await?;
            print(json, &v, show_vm)
        }
        MachineCmd::Kill { name } => {
            let v = follow(c, "vm kill", &name, c.call::<d::VmKill>(&vm_ref(&name)?, None)).await?;
            print(json, &v, show_vm)
        }
        MachineCmd::Delete { name } => {
            follow(
                c,
                "vm delete",
                &name,
                c.call::<d::VmDelete>(&vm_ref(&name)?, None),
            )
            .await?;
            if !json {
                println!("deleted {name}");
            }
        }
        MachineCmd::Prune => {
            let p = follow(c, "vm prune", "", c.call::<d::VmPrune>(&Empty {}, None)).await?;
            print(json, &p, |p| {
                for n in &p.deleted {
                    println!("deleted {n}");
                }
            });
        }
        MachineCmd::List => {
            let vms = c.call::<d::VmList>(&Empty {}, None).await?;
            print(json, &vms, |vms| {
                println!(
                    "{:<24} {:<9} {:<12} {:<8} {:>5} {:>7} {:>9}",
                    "NAME", "STATE", "VMM", "PID", "VCPU", "MEM", "DISK"
                );
                for v in vms {
                    let pid = v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<24} {:<9} {:<12} {:<8} {:>5} {:>6}M {:>8.1}M",
                        v.name,
                        v.state,
                        v.vmm,
                        pid,
                        v.vcpus,
                        v.memory_mib,
                        v.disk_bytes as f64 / (1 << 20) as f64
                    );
                }
            });
        }
        MachineCmd::Show { name } => print(json, &c.call::<d::VmShow>(&vm_ref(&name)?, None).await?, show_vm),
        MachineCmd::Set {
            name,
            vcpus,
            memory,
            disk_size,
        } => {
            check_name(&name)?;
            let req = d::VmSet {
                name,
                vcpus,
                memory_mib: memory,
                work_disk_mib: disk_size,
            };
            print(json, &c.call::<d::VmSetM>(&req, None).await?, show_vm);
        }
        MachineCmd::Logs { name } => {
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
        MachineCmd::Exec {
            name,
            stdin,
            tty,
            cwd,
            root,
            user,
            cmd,
        } => {
            check_name(&name)?;
            return exec(c, &name, cmd, ExecIo { stdin, tty }, Place { cwd, root, user }).await;
        }
        MachineCmd::Session { cmd } => return crate::session::run(c, cmd, json).await,
        MachineCmd::Ports { name } => {
            let p = c.call::<d::VmPortsM>(&vm_ref(&name)?, None).await?;
            print(json, &p, show_ports);
        }
        MachineCmd::Stats { name } => {
            let s = c.call::<d::VmStatsM>(&vm_ref(&name)?, None).await?;
            print(json, &s, show_stats);
        }
        MachineCmd::Snapshot { name, snapshot } => {
            check_name(&name)?;
            let s = c
                .call::<d::VmSnapshotM>(&d::VmSnapshot { name, snapshot }, None)
                .await?;
            print(json, &s, |s| println!("{}", s.name));
        }
        MachineCmd::Restore { snapshot, name } => {
            check_name(&name)?;
            let v = follow(
                c,
                "vm restore",
                &name,
                c.call::<d::VmRestoreM>(
                    &d::VmRestore {
                        name: name.clone(),
                        snapshot,
                    },
                    None,
                ),
            )
            .await?;
            print(json, &v, show_vm)
        }
    }
    Ok(0)
}

/// `banger vm workspace ...`.
pub async fn workspace(c: &Client, cmd: WorkspaceCmd, json: bool) -> Result<i32> {
    match cmd {
        WorkspaceCmd::Prepare {
            name,
            path,
            include_untracked,
            branch,
            from,
        } => {
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
                c,
                "vm workspace prepare",
                &name,
                c.call::<d::VmWorkspacePrepare>(&req, None),
            )
            .await?;
            untracked_notice(&w.skipped_untracked);
            print(json, &w, |w| {
                println!(
                    "copied {} files ({} KiB) to {}",
                    w.files,
                    w.bytes / 1024,
                    w.guest_path
                )
            });
        }
        WorkspaceCmd::Export {
            name,
            base_commit,
            output,
            allow_symlinks,
        } => {
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
            // The guest is untrusted: say what the patch would do that
            // reaches beyond ordinary file edits, before anything is written.
            let risks = crate::patch_check::scan(&patch);
            for p in &risks.executables {
                eprintln!("note: the patch makes {} executable", crate::output::escape(p));
            }
            for p in &risks.symlinks {
                eprintln!(
                    "warning: the patch creates a symlink {}",
                    crate::output::escape(p)
                );
            }
            if !risks.bad_paths.is_empty() {
                bail!(
                    "the patch touches paths no workspace patch should: {}",
                    crate::output::escape(&risks.bad_paths.join(", "))
                );
            }
            if !risks.symlinks.is_empty() && !allow_symlinks {
                bail!("not writing a patch that creates symlinks; check them and pass --allow-symlinks");
            }
            match output {
                Some(f) => std::fs::write(&f, &patch)?,
                None => std::io::stdout().write_all(&patch)?,
            }
        }
    }
    Ok(0)
}
