//! Attach, logs and send: a stream of one session, from the agent to the
//! client (and, with input, back). A stream never stops its session: the
//! client's hang-up closes the agent connection, which only detaches.

use super::SessionService;
use banger_proto::methods::daemon::SessionStreamReq;
use banger_proto::stream::{Open, SessionEnd, SessionMode, SessionOpen};
use banger_proto::{Ctx, RpcError};

impl SessionService {
    pub async fn stream(&self, ctx: &Ctx, p: SessionStreamReq) -> Result<SessionEnd, RpcError> {
        let (vm, row) = self.find(&p.vm, &p.session)?;
        let uds = self.agent(&vm)?;
        // Someone watching or typing: the VM is in use.
        let _busy = self.vms.busy(&vm.id);
        let input = matches!(
            p.mode,
            SessionMode::Attach { input: true, .. } | SessionMode::Send { .. }
        );
        let open = Open {
            op_id: Some(ctx.op_id.to_string()),
            session: Some(SessionOpen {
                id: row.id.clone(),
                mode: p.mode,
                from_seq: p.from_seq,
                tail: p.tail,
            }),
            ..Default::default()
        };
        tracing::info!(vm = %vm.name, session = %row.name, mode = ?p.mode, "session stream");
        super::stream::relay(&uds, ctx, open, input).await
    }
}
