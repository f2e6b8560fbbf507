//! `banger-vsock-bridge`: the host's end of a QEMU guest's agent channel
//! (see the crate's documentation). Started beside QEMU, one per VM.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "banger-vsock-bridge",
    version,
    about = "serves a guest's agent channel as hybrid vsock"
)]
struct Cli {
    /// QEMU's chardev socket of the guest's agent port.
    #[arg(long)]
    serial: PathBuf,
    /// The Unix socket to serve the guest's ports on.
    #[arg(long)]
    uds: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    banger_log::init("bridge", None, None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(banger_mux::bridge::run(&cli.serial, &cli.uds))?;
    Ok(())
}
