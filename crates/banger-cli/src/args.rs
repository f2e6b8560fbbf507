//! The argument structs of `vm create` and `vm run` (which embeds
//! `CreateArgs`), and the local check of a VM name. The bottom of the CLI:
//! it depends on no other module here.

use anyhow::Result;
use clap::Args;

#[derive(Args, Clone)]
pub struct CreateArgs {
    /// VM name (a DNS label); generated when omitted.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, add = crate::complete::images())]
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
    /// Put the VM's link in this container engine's network namespace
    /// (one CNI set up, under /run/netns): the guest takes the address,
    /// gateway and MAC the engine gave it.
    #[arg(long, conflicts_with_all = ["no_network", "nat", "peers"])]
    pub netns: Option<String>,
    /// Give the VM outbound network access (NAT).
    #[arg(long)]
    pub nat: bool,
    /// Let the VM exchange traffic with other VMs created with --peers
    /// (VMs cannot reach each other otherwise).
    #[arg(long)]
    pub peers: bool,
    /// Stop the VM after this long idle (no exec, copy or workspace call,
    /// no CPU use): 90s, 30m, 2h; 0 never (default: auto_stop_idle in the
    /// configuration).
    #[arg(long, value_parser = banger_config::parse_duration)]
    pub auto_stop_idle: Option<u64>,
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
    /// Start from this snapshot (`banger vm snapshot`) instead of booting:
    /// the VM is restored with its own name, entropy and clock, and keeps
    /// the snapshot's image, size and network settings.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "vcpus", "memory", "disk_size", "no_network", "netns", "nat", "peers"])]
    pub snapshot: Option<String>,
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

/// DNS-label check, done here too so a typo fails before the daemon is asked.
pub fn check_name(name: &str) -> Result<()> {
    banger_proto::names::validate_vm_name(name).map_err(anyhow::Error::msg)
}
