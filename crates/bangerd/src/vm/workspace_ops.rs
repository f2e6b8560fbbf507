//! Workspaces in a running VM: pushing a host repository into the guest
//! (under the VM's lifecycle lock) and exporting the guest's changes.
//! What goes over the wire is `crate::workspace`'s business; this file
//! ties it to a VM.

use super::{agent, VmService};
use crate::kernel;
use crate::sys;
use crate::workspace;
use banger_proto::methods::agent as a;
use banger_proto::methods::daemon::{WorkspaceExport, WorkspacePrepare, WorkspaceReady};
use banger_proto::{Ctx, OpId, RpcError};
use std::path::Path;

impl VmService {
    pub async fn workspace_prepare(
        &self,
        op: &OpId,
        p: WorkspacePrepare,
    ) -> Result<WorkspaceReady, RpcError> {
        for r in p.branch.iter().chain(p.from.iter()) {
            workspace::validate_ref(r)?;
        }
        let (root, plan) = workspace::plan(&p.path, p.include_untracked).await?;
        let (_g, mut vm) = self.locked(&p.name).await?;
        let h = self.running_handles(&vm)?;
        let _busy = self.busy(&vm.id);
        let work = kernel::tempdir_in(Path::new(&vm.runtime.vm_dir), ".workspace")?;
        let result = async {
            let mut from_sha = None;
            let dotgit = match &plan.base_commit {
                Some(base) => {
                    if let Some(f) = &p.from {
                        let sha = sys::run(
                            "git",
                            [
                                "-C",
                                &plan.repo_root,
                                "rev-parse",
                                "--verify",
                                &format!("{f}^{{commit}}"),
                            ],
                            None,
                        )
                        .await
                        .map_err(|_| RpcError::not_found(format!("no commit {f:?} in {}", plan.repo_root)))?;
                        from_sha = Some(sha.trim().to_string());
                    }
                    Some(workspace::shallow_git(&root, &work, base, from_sha.as_deref()).await?)
                }
                None => None,
            };
            let sent = workspace::push(
                &h.launched.vsock_uds,
                op,
                &root,
                &plan.files,
                dotgit.as_deref(),
                workspace::GUEST_REPO,
            )
            .await?;
            if !sent.ok {
                return Err(RpcError::failed(format!(
                    "guest could not unpack the workspace: {}",
                    sent.error.unwrap_or_default()
                )));
            }
            self.guest_sh(
                &h.launched.vsock_uds,
                op,
                workspace::finish_script(p.branch.as_deref(), from_sha.as_deref()),
            )
            .await?;
            Ok(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        result?;
        vm.runtime.workspace = Some(workspace::GUEST_REPO.to_string());
        self.save(&vm)?;
        tracing::info!(vm = %vm.name, files = plan.files.len(), bytes = plan.bytes, "workspace prepared");
        Ok(WorkspaceReady {
            guest_path: workspace::GUEST_REPO.to_string(),
            files: plan.files.len(),
            bytes: plan.bytes,
            skipped_untracked: plan.skipped_untracked,
            base_commit: plan.base_commit,
        })
    }

    pub async fn workspace_export(&self, ctx: &Ctx, p: WorkspaceExport) -> Result<a::ExitStatus, RpcError> {
        if let Some(b) = &p.base_commit {
            workspace::validate_ref(b)?;
        }
        let vm = self.get(&p.name)?;
        let h = self.running_handles(&vm)?;
        let _busy = self.busy(&vm.id);
        if vm.runtime.workspace.is_none() {
            return Err(RpcError::bad_request(format!("VM {} has no workspace", vm.name)));
        }
        let req = a::ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                workspace::export_script(p.base_commit.as_deref()),
            ],
            ..Default::default()
        };
        let ctx2 = ctx.clone();
        agent::call::<a::Exec>(&h.launched.vsock_uds, &ctx.op_id, &req, move |ev| ctx2.emit(&ev)).await
    }
}
