//! `banger vm run`: the one command. Bad combinations and bad workspaces
//! are refused before any VM exists.

use crate::args::{check_name, RunArgs};
use crate::client_ops::{create, exec, ssh_command, ExecIo, Place};
use crate::output::untracked_notice;
use anyhow::{bail, Result};
use banger_proto::methods::daemon as d;
use banger_proto::Client;
use std::time::Duration;

/// How long `--rm` may take to delete the VM, whatever happens to the command.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(60);

pub async fn run(c: &Client, r: RunArgs) -> Result<i32> {
    if r.detach && r.rm {
        bail!("-d/--detach and --rm cannot be combined: a detached VM outlives this command");
    }
    if r.detach && !r.cmd.is_empty() {
        bail!("-d/--detach runs no command: drop the command or drop -d");
    }
    if let Some(n) = &r.create.name {
        check_name(n)?;
    }
    let plan = match &r.path {
        Some(p) => {
            let path = std::path::absolute(p)?.display().to_string();
            let plan = c
                .call::<d::WorkspacePlanM>(
                    &d::WorkspacePlanParams {
                        path,
                        include_untracked: r.include_untracked,
                    },
                    None,
                )
                .await?;
            untracked_notice(&plan.skipped_untracked);
            if !plan.bootstrap_files.is_empty() && !r.create.nat && !r.no_bootstrap && !r.dry_run {
                bail!(
                    "this workspace has {}: the tooling bootstrap needs network access. Pass --nat, or --no-bootstrap to skip it",
                    plan.bootstrap_files.join(" and ")
                );
            }
            Some(plan)
        }
        None => None,
    };
    if r.dry_run {
        match &plan {
            Some(p) => {
                for f in &p.files {
                    println!("{f}");
                }
                eprintln!(
                    "{} files, {} KiB; nothing was created (--dry-run)",
                    p.files.len(),
                    p.bytes / 1024
                );
            }
            None => eprintln!("no workspace given; nothing to copy (--dry-run)"),
        }
        return Ok(0);
    }

    let v = match &r.snapshot {
        Some(snapshot) => {
            // An empty name: the daemon generates one.
            let name = r.create.name.clone().unwrap_or_default();
            let restore = d::VmRestore {
                name: name.clone(),
                snapshot: snapshot.clone(),
            };
            crate::client_ops::follow(c, "vm restore", &name, c.call::<d::VmRestoreM>(&restore, None)).await?
        }
        None => create(c, &r.create, true).await?,
    };
    eprintln!(
        "spec: {} vCPU, {} MiB memory, {} MiB work disk, vmm {}{}{}",
        v.vcpus,
        v.memory_mib,
        v.work_disk_bytes >> 20,
        v.vmm,
        if r.create.nat { ", nat" } else { "" },
        if r.create.peers { ", peers" } else { "" }
    );
    let outcome = session(c, &r, &v, plan.as_ref()).await;
    if r.rm {
        // Its own deadline, and immune to a second Ctrl-C cutting it short.
        let name = v.name.clone();
        let target = d::VmRef { name: name.clone() };
        let del = c.call::<d::VmDelete>(&target, None);
        match tokio::time::timeout(CLEANUP_DEADLINE, del).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("warning: could not delete {name}: {e}"),
            Err(_) => eprintln!(
                "warning: deleting {name} took over {}s; check `banger vm list`",
                CLEANUP_DEADLINE.as_secs()
            ),
        }
    } else if !r.detach {
        eprintln!(
            "VM {} is still running: `banger vm stop {}` or `banger vm delete {}`",
            v.name, v.name, v.name
        );
    }
    outcome
}

async fn session(c: &Client, r: &RunArgs, v: &d::VmInfo, plan: Option<&d::WorkspacePlan>) -> Result<i32> {
    if let Some(p) = plan {
        let w = c
            .call::<d::VmWorkspacePrepare>(
                &d::WorkspacePrepare {
                    name: v.name.clone(),
                    path: p.repo_root.clone(),
                    include_untracked: r.include_untracked,
                    branch: r.branch.clone(),
                    from: r.from.clone(),
                },
                None,
            )
            .await?;
        eprintln!(
            "workspace: {} files ({} KiB) in {}",
            w.files,
            w.bytes / 1024,
            w.guest_path
        );
        if !p.bootstrap_files.is_empty() && !r.no_bootstrap {
            let script = "mkdir -p /root/.cache/banger; (command -v mise >/dev/null && mise install || echo 'mise is not installed in this image; skipped') > /root/.cache/banger/bootstrap.log 2>&1 || true";
            let _ = exec(
                c,
                &v.name,
                vec!["sh".into(), "-c".into(), script.into()],
                ExecIo::default(),
                Place::default(),
            )
            .await;
        }
    }
    if r.detach {
        eprintln!("VM {} is ready", v.name);
        return Ok(0);
    }
    if r.cmd.is_empty() {
        // Interactive: a login shell over ssh, in the workspace if any.
        let shell = match plan {
            Some(_) => vec!["cd /root/repo && exec $SHELL -l".to_string()],
            None => vec![],
        };
        let mut ssh = ssh_command(c, &v.name, &shell, true).await?;
        let st = tokio::task::spawn_blocking(move || ssh.status()).await??;
        return Ok(st.code().unwrap_or(255));
    }
    tokio::select! {
        code = exec(c, &v.name, r.cmd.clone(), ExecIo::default(), Place::default()) => code,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            Ok(130)
        }
    }
}
