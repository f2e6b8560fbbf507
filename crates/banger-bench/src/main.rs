//! `banger-bench`: each benchmark measures banger and a baseline in the
//! same run, alternating them, and prints medians and their ratio.
//!
//!   banger-bench create-flat   VM create with a 1 GiB vs an 8 GiB image
//!   banger-bench run-vs-qemu   `vm run --rm -- true` vs a hand-made QEMU boot
//!   banger-bench guest-output  guest→host (`vm exec cat`) vs host→guest
//!                              (workspace copy) of the same file
//!   banger-bench chaos         random lifecycle commands while bangerd,
//!                              the helper, a VMM or the client is killed;
//!                              checks the invariants after each round
//!   banger-bench fc-start      `vm start` of a tiny guest vs configuring
//!                              firecracker by hand (needs --firecracker)
//!   banger-bench ctr-run       `ctr run --rm` through containerd and the
//!                              banger shim vs `banger vm run --rm` of the
//!                              same image (needs containerd and ctr)
//!   banger-bench warm-run      `vm run --rm -- true` taking a VM from the
//!                              warm pool, and from a snapshot, vs booting
//!   banger-bench qemu-restore  `vm restore` of a real guest vs QEMU's own
//!                              restore of the same snapshot by hand
//!   banger-bench fc-parallel   50 tiny guests started at once (VMs/s) vs
//!                              as many firecracker processes by hand
//!   banger-bench fc-restore    `vm snapshot` / `vm restore` of a tiny guest
//!                              vs Firecracker's snapshot API by hand
//!
//! Each bench lives in a module of its own (`boot`, `create_flat`, `ctr`,
//! `transfer`, `fc`, `fc_restore`, `qemu_restore`, `chaos`); this file holds the command
//! line, the `Bench` harness and the report.
//! It drives the release or debug binaries next to itself with a private
//! BANGER_HOME (default target/bench-home, kept so the image is built once).

mod boot;
mod chaos;
mod create_flat;
mod ctr;
mod fc;
mod fc_restore;
mod qemu_restore;
mod transfer;

use boot::{run_vs_qemu, warm_run};
use create_flat::create_flat;
use ctr::ctr_run;
use fc::{fc_parallel, fc_start};
use transfer::{copy_and_exec, exec_stream, guest_output, workspace_copy};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    /// Iterations per side.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    CreateFlat,
    RunVsQemu,
    WarmRun,
    QemuRestore,
    CtrRun,
    /// Workspace copy of a generated repo vs `git archive HEAD | ssh tar -x`.
    WorkspaceCopy {
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[arg(long, default_value_t = 200)]
        megabytes: usize,
        /// "text" (source-like, compressible, as real repositories are) or
        /// "random" (incompressible: the worst case).
        #[arg(long, default_value = "text")]
        content: String,
    },
    /// `vm cp` both ways against scp, and `vm exec -- true` against ssh.
    CopyExec {
        #[arg(long, default_value_t = 200)]
        megabytes: usize,
    },
    /// A command's output and input streamed through `vm exec` against the
    /// same over ssh: `vm exec -- cat /dev/zero | head -c N` and
    /// `head -c N /dev/zero | vm exec -i -- wc -c`.
    ExecStream {
        #[arg(long, default_value_t = 1024)]
        megabytes: usize,
    },
    /// Guest→host throughput (`vm exec -- cat FILE`) against host→guest
    /// (`vm workspace prepare` of a repo holding that file).
    GuestOutput {
        #[arg(long, default_value_t = 64)]
        megabytes: usize,
    },
    /// Kill -9 of bangerd, the helper, a VMM or the client at random
    /// moments of random lifecycle commands; invariants after each round.
    Chaos {
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Replays a run (printed at its start).
        #[arg(long)]
        seed: Option<u64>,
    },
    FcStart {
        #[arg(long, env = "BANGER_TEST_FIRECRACKER")]
        firecracker: PathBuf,
    },
    /// Many tiny Firecracker guests started at once (VMs per second)
    /// against as many firecracker processes configured by hand at once.
    FcParallel {
        #[arg(long, env = "BANGER_TEST_FIRECRACKER")]
        firecracker: PathBuf,
        #[arg(long, default_value_t = 50)]
        count: usize,
    },
    /// A tiny Firecracker guest snapshotted and restored through banger
    /// against Firecracker's snapshot API by hand.
    FcRestore {
        #[arg(long, env = "BANGER_TEST_FIRECRACKER")]
        firecracker: PathBuf,
    },
}

struct Bench {
    bin: PathBuf,
    home: PathBuf,
    env: Vec<(String, String)>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// [`report`] for sides that alternate run by run: each pair saw the
/// same machine, so the median of the pairs' ratios is also given, the
/// figure a burst of load on a shared host moves least.
fn report_paired(name: &str, a_name: &str, a: Vec<Duration>, b_name: &str, b: Vec<Duration>) {
    let mut pairs: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
        .collect();
    report(name, a_name, a, b_name, b);
    pairs.sort_by(f64::total_cmp);
    if let Some(m) = pairs.get(pairs.len() / 2) {
        println!("  median of the {} paired ratios = {m:.3}", pairs.len());
    }
}

fn report(name: &str, a_name: &str, a: Vec<Duration>, b_name: &str, b: Vec<Duration>) {
    let (ma, mb) = (median(a.clone()), median(b.clone()));
    println!("{name}");
    println!(
        "  {a_name:<40} median {:>9.1} ms  (runs: {:?})",
        ms(ma),
        a.iter()
            .map(|d| (ms(*d) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!(
        "  {b_name:<40} median {:>9.1} ms  (runs: {:?})",
        ms(mb),
        b.iter()
            .map(|d| (ms(*d) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    println!(
        "  ratio {a_name} / {b_name} = {:.3}   difference = {:+.1} ms",
        ma.as_secs_f64() / mb.as_secs_f64(),
        ms(ma) - ms(mb)
    );
}

impl Bench {
    fn banger(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin.join("banger"))
            .env("BANGER_HOME", &self.home)
            .env("BANGER_RUNTIME_DIR", self.home.join("run"))
            .env("BANGER_HELPER_SOCKET", self.home.join("helper.sock"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("banger {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn timed(&self, args: &[&str]) -> Result<Duration> {
        let t = Instant::now();
        self.banger(args)?;
        Ok(t.elapsed())
    }

    fn default_image(&self) -> Result<Value> {
        eprintln!("(building or reusing the default image)");
        Ok(serde_json::from_str(
            &self.banger(&["image", "build", "--json"])?,
        )?)
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = std::env::current_exe()?.parent().unwrap().to_path_buf();
    let home = cli.home.unwrap_or_else(|| bin.join("../bench-home"));
    std::fs::create_dir_all(&home)?;
    let home = home.canonicalize()?;
    let mut b = Bench {
        bin,
        home,
        env: vec![],
    };
    match cli.cmd {
        Cmd::CreateFlat => create_flat(&b, cli.runs)?,
        Cmd::RunVsQemu => run_vs_qemu(&b, cli.runs).await?,
        Cmd::WarmRun => warm_run(&mut b, cli.runs)?,
        Cmd::QemuRestore => qemu_restore::qemu_restore(&b, cli.runs).await?,
        Cmd::CtrRun => ctr_run(&b, cli.runs)?,
        Cmd::WorkspaceCopy {
            files,
            megabytes,
            content,
        } => workspace_copy(&b, cli.runs, files, megabytes, content == "random").await?,
        Cmd::Chaos { rounds, seed } => {
            chaos::run(&b.bin, &b.home, rounds, seed)?;
            return Ok(());
        }
        Cmd::GuestOutput { megabytes } => guest_output(&b, cli.runs, megabytes)?,
        Cmd::CopyExec { megabytes } => copy_and_exec(&b, cli.runs, megabytes)?,
        Cmd::ExecStream { megabytes } => exec_stream(&b, cli.runs, megabytes)?,
        Cmd::FcStart { firecracker } => {
            b.env = vec![
                ("BANGER_VMM".into(), "firecracker".into()),
                ("BANGER_FIRECRACKER".into(), firecracker.display().to_string()),
            ];
            // A daemon started with another back-end would not see these settings.
            let _ = b.banger(&["daemon", "stop"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fc_start(&b, cli.runs, &firecracker).await?
        }
        Cmd::FcRestore { firecracker } => {
            b.env = vec![
                ("BANGER_VMM".into(), "firecracker".into()),
                ("BANGER_FIRECRACKER".into(), firecracker.display().to_string()),
            ];
            let _ = b.banger(&["daemon", "stop"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fc_restore::fc_restore(&b, cli.runs, &firecracker).await?
        }
        Cmd::FcParallel { firecracker, count } => {
            b.env = vec![
                ("BANGER_VMM".into(), "firecracker".into()),
                ("BANGER_FIRECRACKER".into(), firecracker.display().to_string()),
            ];
            let _ = b.banger(&["daemon", "stop"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            fc_parallel(&b, count, &firecracker).await?
        }
    }
    let _ = b.banger(&["daemon", "stop"]);
    Ok(())
}
