//! `vm exec`: a command in a running guest. Over the agent's stream port
//! (protocol generation 2) when the agent speaks it: stdin of any size
//! from the client, a terminal, signals, binary output paced by the
//! client. A generation-1 agent still runs plain commands (JSON exec).

use super::{agent, VmService};
use crate::sync::Locked;
use banger_proto::methods::agent as a;
use banger_proto::methods::daemon::VmExec;
use banger_proto::{Ctx, RpcError};

impl VmService {
    pub async fn exec(&self, ctx: &Ctx, p: VmExec) -> Result<a::ExitStatus, RpcError> {
        if p.exec.argv.is_empty() {
            return Err(RpcError::bad_request("nothing to run: argv is empty"));
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
        if self.agent_streams(&vm.id, h.launched.pid, &uds, ctx).await {
            let open = banger_proto::stream::Open {
                op_id: Some(ctx.op_id.to_string()),
                argv: req.argv,
                env: req.env,
                cwd: req.cwd,
                stdin: p.stream_input || req.stdin_b64.is_some(),
                tty: p.tty,
                session: None,
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

    /// Whether the VM's agent speaks the stream protocol, asked once per
    /// VMM process (`agent.info`; an agent without it does not).
    async fn agent_streams(&self, vm: &str, pid: u32, uds: &std::path::Path, ctx: &Ctx) -> bool {
        if let Some((p, yes)) = self.agent_streams.locked().get(vm) {
            if *p == pid {
                return *yes;
            }
        }
        let yes =
            match agent::call::<a::Info>(uds, &ctx.op_id, &banger_proto::methods::Empty {}, |_| ()).await {
                Ok(info) => info.features.iter().any(|f| f == a::FEATURE_EXEC_STREAM),
                Err(e) if e.code == banger_proto::ErrorCode::UnknownMethod => false,
                // Unreachable now: ask again next time.
                Err(_) => return false,
            };
        self.agent_streams.locked().insert(vm.to_string(), (pid, yes));
        yes
    }
}
