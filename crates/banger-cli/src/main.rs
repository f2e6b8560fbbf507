//! `banger`: the command line. It talks only to the daemon.

// Imports run one way: `args` and `output` at the bottom, `client_ops` on
// them, the command modules (`vm`, `run`, `ssh`, `image`) on those and
// never on each other, and this file, which routes, on all.
mod args;
mod client_ops;
mod complete;
mod cp;
mod daemon;
mod image;
mod man;
mod output;
mod patch_check;
mod run;
mod session;
mod ssh;
mod system;
mod term;
mod vm;

use anyhow::Result;
use banger_config::Config;
use banger_proto::methods::{daemon as d, Empty};
use banger_proto::ClientError;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "banger",
    version,
    about = "One-command development sandboxes on microVMs"
)]
struct Cli {
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that the daemon answers (starting it if needed).
    Ping,
    /// Manage the daemon.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Host networking.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// The warm pool: VMs kept booted so that `vm create`/`vm run` of the
    /// pool's spec (`warm_pool = { image = "default", size = 2 }` in the
    /// configuration) take one instead of booting.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Saved VMs (`vm snapshot`) to restore new VMs from (`vm restore`).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Root filesystem images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Guest kernels.
    #[command(subcommand)]
    Kernel(image::KernelCmd),
    /// Add (or remove) an Include in ~/.ssh/config so `ssh NAME.vm` works.
    SshConfig {
        #[arg(long, conflicts_with = "uninstall")]
        install: bool,
        #[arg(long)]
        uninstall: bool,
        /// The ssh config file to edit (default ~/.ssh/config).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Print the lines that register completions with a shell (bash, zsh,
    /// fish, elvish, powershell): commands, flags, and live VM, image,
    /// kernel and session names from the daemon. E.g. in ~/.bashrc:
    /// `source <(banger completions bash)`.
    Completions { shell: String },
    /// Write man pages (banger.1 and one per subcommand) into a directory,
    /// or banger(1) alone to stdout.
    Man {
        #[arg(short = 'o', long)]
        dir: Option<std::path::PathBuf>,
    },
    /// This build: version, commit, build date, protocol generations.
    Version,
    /// banger's configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Check what this host can do for banger: KVM, back-ends, tools, the
    /// helper, disk, the database, the default image and kernel. Read-only;
    /// exit status 1 on any FAIL.
    Doctor,
    /// banger as system services for one user (install, uninstall, status,
    /// restart).
    #[command(subcommand)]
    System(system::SystemCmd),
}

/// `banger vm ...`, in the order help lists them; each goes to the module
/// that owns it.
#[derive(Subcommand)]
enum VmCmd {
    // create, start, stop, restart, kill, delete, prune, list, show, logs, exec, ports, stats
    #[command(flatten)]
    Machine(vm::MachineCmd),
    /// Create a VM, copy a git workspace in, run a command, print the result.
    Run(args::RunArgs),
    /// Open an SSH session (or run a command) with the system ssh client.
    Ssh {
        #[arg(add = complete::vms())]
        name: String,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// ProxyCommand for `ssh NAME.vm` (see `banger ssh-config`).
    #[command(hide = true)]
    SshProxy { host: String, port: u16 },
    /// Workspaces in a running VM.
    #[command(subcommand)]
    Workspace(vm::WorkspaceCmd),
    /// Copy a file or directory between the host and a running VM; the VM
    /// side is NAME:PATH (relative paths start at /root). Modes and
    /// symlinks are kept; into a directory if the destination is one.
    Cp { src: String, dst: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Every effective setting and where it came from (default, the
    /// config file, or the environment).
    Show,
}

/// What `banger version` prints.
#[derive(serde::Serialize)]
struct VersionInfo {
    version: &'static str,
    commit: &'static str,
    build_date: &'static str,
    /// The request/response protocol of CLI, daemon, helper and agent.
    rpc_protocol: u32,
    /// The agent's stream protocol generation (exec, sessions).
    agent_protocol: u32,
}

#[derive(Subcommand)]
enum DaemonCmd {
    /// Show whether the daemon runs.
    Status,
    /// Stop the daemon (running VMs keep running).
    Stop,
    /// List asynchronous operations.
    Operations,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Every snapshot, least recently used first, with its size on disk.
    List,
    Show {
        name: String,
    },
    /// Remove a snapshot (VMs restored from it run on).
    Rm {
        name: String,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// The pool's size, and its VMs ready and starting.
    Status,
    /// Refill the pool (and resume refilling after a drain).
    Fill {
        /// Return once every pool VM is ready.
        #[arg(long)]
        wait: bool,
    },
    /// Delete the pool's VMs and stop refilling until `pool fill`.
    Drain,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Make sure the bridge exists (through the root helper).
    Ensure,
}

/// A reader that went away (`banger vm list | head`) makes the next print
/// panic (Rust ignores SIGPIPE, so a write fails with EPIPE instead of
/// ending the process): end quietly with the shell's code for SIGPIPE, as
/// any Unix filter does, and leave real panics to the default hook.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("Broken pipe") || msg.contains("BrokenPipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    quiet_broken_pipe();
    // A shell asking for completions (COMPLETE=… banger -- …) is answered
    // here, and the process exits.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // One op id for the whole command: every call it makes (and so every
    // log line in the daemon, the helper and the guest) carries it. A
    // program driving banger (the containerd shim) may hand its own in
    // BANGER_OP_ID, so its log lines and ours share it.
    let op = banger_proto::OpId::adopt_or_mint(std::env::var("BANGER_OP_ID").ok().as_deref());
    let code = match rt.block_on(banger_proto::opid::scope(op, run(cli))) {
        Ok(code) => code,
        // A reader that went away ends us the way it ends any filter.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            141
        }
        Err(e) => {
            report(&e);
            1
        }
    };
    std::process::exit(code);
}

/// Prints an error with its op id; for a daemon error also its code.
/// Error text can carry input (a path, a name) or guest output: it is
/// escaped so it cannot drive the terminal.
fn report(e: &anyhow::Error) {
    match e.downcast_ref::<ClientError>().and_then(ClientError::rpc) {
        Some(rpc) => eprintln!(
            "error: {}\n  code: {}",
            output::escape(&rpc.to_string()),
            rpc.code
        ),
        None => eprintln!("error: {}", output::escape(&format!("{e:#}"))),
    }
}

use output::print;

async fn run(cli: Cli) -> Result<i32> {
    let cfg = Config::load()?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Completions { shell } => complete::registration(&shell, &mut std::io::stdout())?,
        Cmd::Man { dir } => match dir {
            Some(dir) => {
                let n = man::write_all(Cli::command(), &dir)?;
                println!("wrote {n} man pages to {}", dir.display());
            }
            None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?,
        },
        Cmd::Ping => {
            let c = daemon::connect(&cfg).await?;
            let info = c.call::<d::Ping>(&Empty {}, None).await?;
            print(json, &info, |i| {
                println!("pong: bangerd {} (pid {})", i.version, i.pid)
            });
        }
        Cmd::Daemon(DaemonCmd::Status) => match daemon::running(&cfg).await {
            Some(c) => {
                let info = c.call::<d::Ping>(&Empty {}, None).await?;
                print(json, &info, |i| {
                    println!(
                        "bangerd {} running, pid {}, up {} s",
                        i.version,
                        i.pid,
                        i.uptime_ms / 1000
                    );
                    println!("socket: {}\nstate:  {}", i.socket, i.state_dir);
                });
            }
            None => {
                if json {
                    println!("{{\"running\": false}}");
                } else {
                    println!("bangerd is not running");
                }
                return Ok(3);
            }
        },
        Cmd::Daemon(DaemonCmd::Stop) => match daemon::running(&cfg).await {
            Some(c) => {
                c.call::<d::Shutdown>(&Empty {}, None).await?;
                // Return once it is gone, so a command right after this
                // one never reaches the stopping daemon.
                daemon::wait_gone(&cfg).await?;
                println!("bangerd stopped");
            }
            None => println!("bangerd is not running"),
        },
        Cmd::Daemon(DaemonCmd::Operations) => {
            let c = daemon::connect(&cfg).await?;
            let ops = c.call::<d::OperationsList>(&Empty {}, None).await?;
            print(json, &ops, |ops| {
                for o in ops {
                    let state = if o.done {
                        if o.error.is_some() {
                            "failed"
                        } else {
                            "done"
                        }
                    } else {
                        "running"
                    };
                    println!(
                        "{}  {:<12} {:<16} {:<10} {:<14} {} ms",
                        o.op_id, o.kind, o.subject, state, o.stage, o.elapsed_ms
                    );
                }
            });
        }
        Cmd::Vm(cmd) => {
            let c = daemon::connect(&cfg).await?;
            return match cmd {
                VmCmd::Machine(cmd) => vm::run(&c, cmd, json).await,
                VmCmd::Run(r) => run::run(&c, r).await,
                VmCmd::Ssh { name, cmd } => ssh::ssh(&c, &name, &cmd).await,
                VmCmd::SshProxy { host, port } => ssh::proxy(&c, &host, port).await,
                VmCmd::Workspace(cmd) => vm::workspace(&c, cmd, json).await,
                VmCmd::Cp { src, dst } => cp::cp(&c, &src, &dst, json).await,
            };
        }
        Cmd::Image(cmd) => return image::run_image(&daemon::connect(&cfg).await?, cmd, json).await,
        Cmd::Kernel(cmd) => return image::run_kernel(&daemon::connect(&cfg).await?, cmd, json).await,
        Cmd::SshConfig {
            install,
            uninstall,
            file,
        } => {
            if uninstall {
                return ssh::uninstall(file);
            }
            if !install {
                anyhow::bail!("pass --install or --uninstall");
            }
            return ssh::install(&daemon::connect(&cfg).await?, file, &cfg.state_dir).await;
        }
        Cmd::Version => {
            let v = VersionInfo {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("BANGER_COMMIT"),
                build_date: env!("BANGER_BUILD_DATE"),
                rpc_protocol: banger_proto::PROTOCOL_VERSION,
                agent_protocol: banger_proto::stream::GENERATION,
            };
            print(json, &v, |v| {
                println!(
                    "banger {} (commit {}, built {})",
                    v.version, v.commit, v.build_date
                );
                println!(
                    "protocols: rpc {}, agent streams generation {}",
                    v.rpc_protocol, v.agent_protocol
                );
            });
        }
        Cmd::Config(ConfigCmd::Show) => {
            let s = cfg.settings();
            print(json, &s, |s| {
                println!("# {}", cfg.file().display());
                for x in s {
                    println!("{:<22} {:<48} {}", x.key, output::escape(&x.value), x.source);
                }
            });
        }
        Cmd::Doctor => {
            // The daemon's binary holds the checks (it may read the
            // database; the CLI never does), run read-only, never as a
            // daemon.
            let mut cmd = std::process::Command::new(daemon::sibling("bangerd"));
            cmd.arg("doctor");
            if json {
                cmd.arg("--json");
            }
            let st = cmd
                .status()
                .map_err(|e| anyhow::anyhow!("running bangerd doctor: {e}"))?;
            return Ok(st.code().unwrap_or(1));
        }
        Cmd::System(cmd) => return system::run(cmd, json).await,
        Cmd::Pool(cmd) => {
            let c = daemon::connect(&cfg).await?;
            let show = |s: &d::PoolStatus| {
                println!(
                    "pool of {} × {}{}: {} ready, {} starting",
                    s.size,
                    s.image,
                    if s.paused {
                        " (drained; `pool fill` resumes)"
                    } else {
                        ""
                    },
                    s.ready.len(),
                    s.starting.len()
                );
                for n in &s.ready {
                    println!("  {n} ready");
                }
                for n in &s.starting {
                    println!("  {n} starting");
                }
            };
            match cmd {
                PoolCmd::Status => print(json, &c.call::<d::PoolStatusM>(&Empty {}, None).await?, show),
                PoolCmd::Fill { wait } => print(
                    json,
                    &c.call::<d::PoolFillM>(&d::PoolFill { wait }, None).await?,
                    show,
                ),
                PoolCmd::Drain => {
                    let r = c.call::<d::PoolDrainM>(&Empty {}, None).await?;
                    print(json, &r, |r| println!("removed {} pool VMs", r.removed.len()));
                }
            }
        }
        Cmd::Snapshot(cmd) => {
            let c = daemon::connect(&cfg).await?;
            let line = |s: &d::SnapshotInfo| {
                println!(
                    "{:<24} {:<16} {:>4} vCPU {:>6} MiB  {:>8.1} MiB on disk  used {}",
                    s.name,
                    s.vm,
                    s.vcpus,
                    s.memory_mib,
                    s.size_bytes as f64 / (1 << 20) as f64,
                    s.last_used_at
                )
            };
            match cmd {
                SnapshotCmd::List => {
                    let all = c.call::<d::SnapshotListM>(&Empty {}, None).await?;
                    print(json, &all, |all| all.iter().for_each(line));
                }
                SnapshotCmd::Show { name } => {
                    let s = c.call::<d::SnapshotShowM>(&d::SnapshotRef { name }, None).await?;
                    print(json, &s, line);
                }
                SnapshotCmd::Rm { name } => {
                    c.call::<d::SnapshotRmM>(&d::SnapshotRef { name }, None).await?;
                }
            }
        }
        Cmd::Network(NetworkCmd::Ensure) => {
            let c = daemon::connect(&cfg).await?;
            let st = c.call::<d::NetworkEnsure>(&Empty {}, None).await?;
            print(json, &st, |s| {
                println!("bridge {} ready (helper {})", s.bridge, s.helper_version)
            });
        }
    }
    Ok(0)
}
