//! Shell completion. clap's engine completes commands and flags; live
//! names (VMs, images, kernels, sessions) come from the daemon, if it
//! runs: asked with a short deadline, never started for a completion.
//!
//! The shell asks this binary each time (`COMPLETE=bash banger -- …`), so
//! a completion is never stale; `banger completions SHELL` prints the
//! few lines that register it.

use banger_config::Config;
use banger_proto::methods::{daemon as d, Empty};
use banger_proto::Client;
use clap_complete::{ArgValueCandidates, CompletionCandidate};
use std::time::Duration;

/// How long a completion may wait for the daemon.
const DEADLINE: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy)]
enum Live {
    Vms,
    Images,
    Kernels,
    Sessions,
}

async fn ask(c: &Client, what: Live) -> Option<Vec<(String, String)>> {
    let e = Empty {};
    Some(match what {
        Live::Vms => c
            .call::<d::VmList>(&e, None)
            .await
            .ok()?
            .into_iter()
            .map(|v| (v.name, format!("{} VM", v.state)))
            .collect(),
        Live::Images => c
            .call::<d::ImageList>(&e, None)
            .await
            .ok()?
            .into_iter()
            .map(|i| (i.name, format!("image, {} MiB", i.size_bytes >> 20)))
            .collect(),
        Live::Kernels => c
            .call::<d::KernelList>(&e, None)
            .await
            .ok()?
            .into_iter()
            .map(|k| (k.version, "kernel".to_string()))
            .collect(),
        // Session names of every VM (the shell does not tell which VM the
        // line names); each shown with its VM.
        Live::Sessions => {
            let mut out = Vec::new();
            for v in c.call::<d::VmList>(&e, None).await.ok()? {
                let r = d::VmRef { name: v.name.clone() };
                if let Ok(s) = c.call::<d::VmSessionListM>(&r, None).await {
                    out.extend(
                        s.sessions
                            .into_iter()
                            .map(|s| (s.name, format!("{} session in {}", s.state, v.name))),
                    );
                }
            }
            out
        }
    })
}

fn live(what: Live) -> Vec<CompletionCandidate> {
    let Ok(cfg) = Config::load() else {
        return Vec::new();
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return Vec::new();
    };
    let found = rt.block_on(async {
        let c = Client::new(cfg.daemon_socket());
        tokio::time::timeout(DEADLINE, ask(&c, what)).await.ok().flatten()
    });
    found
        .unwrap_or_default()
        .into_iter()
        .map(|(name, help)| CompletionCandidate::new(name).help(Some(help.into())))
        .collect()
}

pub fn vms() -> ArgValueCandidates {
    ArgValueCandidates::new(|| live(Live::Vms))
}

pub fn images() -> ArgValueCandidates {
    ArgValueCandidates::new(|| live(Live::Images))
}

pub fn kernels() -> ArgValueCandidates {
    ArgValueCandidates::new(|| live(Live::Kernels))
}

pub fn sessions() -> ArgValueCandidates {
    ArgValueCandidates::new(|| live(Live::Sessions))
}

/// The lines that make `shell` ask this binary for completions.
pub fn registration(shell: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let shells = clap_complete::env::Shells::builtins();
    let Some(s) = shells.completer(shell) else {
        anyhow::bail!(
            "no completions for {shell:?}; one of: {}",
            shells.names().collect::<Vec<_>>().join(", ")
        );
    };
    let exe = std::env::current_exe()?.display().to_string();
    s.write_registration("COMPLETE", "banger", "banger", &exe, out)?;
    Ok(())
}
