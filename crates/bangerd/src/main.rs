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
    let log_file = (!cli.foreground).then(|| cfg.log_dir().join("bangerd.log"));
    banger_log::init("daemon", cfg.log_level.as_deref(), log_file.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    let res = rt.block_on(bangerd::daemon::run(cfg));
    if let Err(e) = &res {
        tracing::error!(error = format!("{e:#}"), "bangerd failed");
    }
    res
}
