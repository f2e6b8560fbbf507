//! `bangerd`: the unprivileged daemon.

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bangerd",
    version,
    about = "banger's daemon (started by the banger CLI on demand)"
)]
struct Cli {
    /// Log to stderr instead of the log file.
    #[arg(long)]
    foreground: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Check what this host can do for banger (read-only); exit status 1
    /// on any FAIL. `banger doctor` runs this.
    Doctor {
        #[arg(long)]
        json: bool,
    },
}

/// A failure at start ends with one plain line on stderr (which the CLI
/// that started the daemon shows the user), never a backtrace.
fn main() {
    if let Err(e) = run() {
        eprintln!("bangerd: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let cfg = banger_config::Config::load()?;
    if let Some(Cmd::Doctor { json }) = cli.cmd {
        let report = bangerd::doctor::run(&cfg);
        std::process::exit(bangerd::doctor::print(&report, json));
    }
    let log_file = (!cli.foreground).then(|| cfg.log_dir().join("bangerd.log"));
    banger_log::init("daemon", cfg.log_level.as_deref(), log_file.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    let res = rt.block_on(bangerd::daemon::run(cfg));
    if let Err(e) = &res {
        tracing::error!(error = format!("{e:#}"), "bangerd failed");
    }
    res
}
