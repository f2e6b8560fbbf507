//! `vm exec`: a command in a running guest. Over the agent's stream port
//! (protocol generation 2) when the agent speaks it: stdin of any size
//! from the client, a terminal, signals, binary output paced by the
//! client. A generation-1 agent still runs plain commands (JSON exec).

use super::{agent, VmService};
use crate::sync::Locked;
use banger_proto::methods::agent as a;
use banger_proto::methods::daemon::VmExec;
use banger_proto::{Ctx, RpcError};
use banger_store::VmRecord;

/// A root asked of an agent that would ignore it and run the command in
/// the guest's own root.
pub fn too_old_for_root(vm: &str) -> RpcError {
    RpcError::failed(format!(
        "the agent in VM {vm} is too old to run a command inside a root; restart the VM to update it"
    ))
}

/// A user asked of an agent that would ignore it and run the command as
/// root.
pub fn too_old_for_user(vm: &str) -> RpcError {
    RpcError::failed(format!(
        "the agent in VM {vm} is too old to run a command as another user; restart the VM to update it"
    ))
}

impl VmService {
    pub async fn exec(&self, ctx: &Ctx, p: VmExec) -> Result<a::ExitStatus, RpcError> {
        if p.exec.argv.is_empty() {
            return Err(RpcError::bad_request("nothing to run: argv is empty"));
        }
        if let Some(u) = &p.exec.user {
            u.validate().map_err(RpcError::bad_request)?;
        }
        if let Some(w) = p.tty {
            if w.rows == 0 || w.cols == 0 {
                return Err(RpcError::bad_request(format!(
                    "terminal size {}x{} has a zero side",
                    w.rows, w.cols
                )));
            }
        }
        let vm = self.get(&p.name)?;
        let h = self.running_handles(&vm)?;
        let _busy = self.busy(&vm.id);
        let mut req = p.exec;
        if req.cwd.is_none() {
            req.cwd = vm.runtime.workspace.clone();
        }
        let uds = h.launched.vsock_uds.clone();
        if req.root.is_some() && !self.agent_has(&vm, a::FEATURE_ROOT, &ctx.op_id).await {
            return Err(too_old_for_root(&vm.name));
        }
        if req.user.is_some() && !self.agent_has(&vm, a::FEATURE_USER, &ctx.op_id).await {
            return Err(too_old_for_user(&vm.name));
        }
        if self.agent_has(&vm, a::FEATURE_EXEC_STREAM, &ctx.op_id).await {
            let open = banger_proto::stream::Open {
                op_id: Some(ctx.op_id.to_string()),
                argv: req.argv,
                env: req.env,
                cwd: req.cwd,
                stdin: p.stream_input || req.stdin_b64.is_some(),
                tty: p.tty,
                session: None,
                root: req.root,
                user: req.user,
            };
            return agent::exec_stream(&uds, ctx, open, req.stdin_b64, p.stream_input).await;
        }
        if p.stream_input || p.tty.is_some() {
            return Err(RpcError::failed(format!(
                "the agent in VM {} is too old for streamed stdin or a terminal; restart the VM to update it",
                vm.name
            )));
        }
        let ctx2 = ctx.clone();
        agent::call::<a::Exec>(&uds, &ctx.op_id, &req, move |ev| ctx2.emit(&ev)).await
    }

    /// Whether the VM's agent names `feature` in its `agent.info`, asked
    /// once per VMM process (an agent without `agent.info` names none).
    pub async fn agent_has(&self, vm: &VmRecord, feature: &str, op: &banger_proto::OpId) -> bool {
        let Ok(h) = self.running_handles(vm) else {
            return false;
        };
        let (pid, uds) = (h.launched.pid, h.launched.vsock_uds.clone());
        if let Some((p, features)) = self.agent_features.locked().get(&vm.id) {
            if *p == pid {
                return features.iter().any(|f| f == feature);
            }
        }
        let features = match agent::call::<a::Info>(&uds, op, &banger_proto::methods::Empty {}, |_| ()).await
        {
            Ok(info) => info.features,
            Err(e) if e.code == banger_proto::ErrorCode::UnknownMethod => Vec::new(),
            // Unreachable now: ask again next time.
            Err(_) => return false,
        };
        let yes = features.iter().any(|f| f == feature);
        self.agent_features
            .locked()
            .insert(vm.id.clone(), (pid, features));
        yes
    }
}
