//! Man pages generated from the clap definitions, so they never drift from
//! `--help`: `banger.1`, and `banger-vm-run.1` and so on for every
//! subcommand.

use anyhow::{Context, Result};
use std::path::Path;

/// Writes the pages of `cmd` and all its subcommands into `dir`; returns
/// how many.
pub fn write_all(cmd: clap::Command, dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    write(&cmd, "banger", dir)
}

fn write(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let page = cmd.clone().display_name(name.to_string());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    let mut n = 1;
    // clap's generated `help` subcommands get no page of their own.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        n += write(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
