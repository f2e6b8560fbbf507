//! `banger-vsock-bridge`: the host's end of a QEMU guest's agent channel
//! (see the crate's documentation). Started beside QEMU, one per VM.

use anyhow::Context;
use banger_proto::methods::agent as a;
use clap::Parser;
use std::path::{Path, PathBuf};

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
    /// A seed plan (JSON) for the guest's first session: the guest of a
    /// restored VM gets it, with the clock and fresh entropy, in the
    /// channel's handshake.
    #[arg(long, requires = "seeded")]
    seed: Option<PathBuf>,
    /// Where the agent's answer to the seed is written, before any client
    /// is served.
    #[arg(long, requires = "seed")]
    seeded: Option<PathBuf>,
}

fn read_plan(path: &Path) -> anyhow::Result<a::SeedPlan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The seed of `plan`, made at the moment it is sent: the host's clock
/// then, and 64 bytes of its entropy.
fn make_seed(plan: &a::SeedPlan) -> String {
    let seed = a::HandshakeSeed {
        op_id: plan.op_id.clone(),
        seed: a::Seed::from_host(plan.hostname.clone(), plan.net.clone()),
    };
    serde_json::to_string(&seed).expect("serialisable")
}

/// Writes the agent's answer (nothing when there was none) so that it is
/// whole or absent.
fn record(path: &Path, answer: Option<String>) {
    let Some(answer) = answer else { return };
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, answer).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not record the seed's answer");
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    banger_log::init("bridge", None, None)?;
    // Without a usable plan the guest is still served: the daemon then
    // seeds it over a stream, as it does an agent that knows no seeds.
    let seeding = match (&cli.seed, cli.seeded) {
        (Some(path), Some(seeded)) => match read_plan(path) {
            Ok(plan) => Some(banger_mux::bridge::Seeding {
                make: Box::new(move || make_seed(&plan)),
                answered: Box::new(move |answer| record(&seeded, answer)),
            }),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no seed for the handshake");
                None
            }
        },
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(banger_mux::bridge::run(&cli.serial, &cli.uds, seeding))?;
    Ok(())
}
