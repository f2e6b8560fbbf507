//! Starting, stopping, killing and removing sessions, and settling the
//! catalog with the agent. An intent row (`starting`) is written before
//! the agent is asked and settled from its answer; rows whose outcome was
//! lost (a daemon killed mid-call, an agent or a guest restarted) are
//! settled whenever the VM's sessions are read: running, exited with the
//! agent's code, or lost; an exit code is never made up.

use super::{store_err, view, SessionService};
use crate::vm::agent;
use banger_proto::methods::agent::{self as a, SessionInfo};
use banger_proto::methods::daemon::{SessionStart, SessionView, SessionViews};
use banger_proto::methods::Empty;
use banger_proto::{ErrorCode, OpId, RpcError};
use banger_store::{SessionRecord, VmRecord};
use std::collections::HashMap;

const MIN_LOG: u64 = 16 * 1024;
const MAX_LOG: u64 = 1 << 30;

fn session_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into an 8-byte buffer we own.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    format!("{:016x}", u64::from_ne_bytes(b))
}

/// An answer that came from the agent itself: the call reached it, so its
/// outcome is known (as opposed to a transport failure).
fn refused_by_agent(e: &RpcError) -> bool {
    !matches!(
        e.code,
        ErrorCode::OperationFailed | ErrorCode::NotRunning | ErrorCode::Cancelled
    )
}

impl SessionService {
    pub async fn start(&self, op: &OpId, p: SessionStart) -> Result<SessionView, RpcError> {
        if p.argv.is_empty() {
            return Err(RpcError::bad_request("nothing to run: argv is empty"));
        }
        if let Some(n) = &p.name {
            crate::vm::names::validate(n).map_err(RpcError::bad_request)?;
        }
        let log_max = p.log_max.unwrap_or(self.default_log_max);
        if !(MIN_LOG..=MAX_LOG).contains(&log_max) {
            return Err(RpcError::bad_request(format!(
                "a session log of {log_max} bytes is outside {MIN_LOG}..={MAX_LOG}"
            )));
        }
        if p.tty.is_some_and(|w| w.rows == 0 || w.cols == 0) {
            return Err(RpcError::bad_request("a terminal needs rows and columns"));
        }
        let vm = self.vms.record(&p.vm)?;
        let uds = self.agent(&vm)?;
        if let Some(u) = &p.user {
            u.validate().map_err(RpcError::bad_request)?;
        }
        if p.root.is_some() && !self.vms.agent_has(&vm, a::FEATURE_ROOT, op).await {
            return Err(crate::vm::exec::too_old_for_root(&vm.name));
        }
        if p.user.is_some() && !self.vms.agent_has(&vm, a::FEATURE_USER, op).await {
            return Err(crate::vm::exec::too_old_for_user(&vm.name));
        }
        let _busy = self.vms.busy(&vm.id);
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let id = session_id();
        let row = SessionRecord {
            id: id.clone(),
            vm_id: vm.id.clone(),
            name: p.name.clone().unwrap_or_else(|| format!("s-{}", &id[..6])),
            argv: p.argv.clone(),
            tty: p.tty.is_some(),
            state: "starting".into(),
            code: None,
            signal: None,
            boot_id: None,
            op_id: op.to_string(),
            created_at: banger_store::now(),
        };
        self.store.insert_session(&row).map_err(store_err)?;
        let spec = a::SessionSpec {
            id,
            argv: p.argv,
            env: p.env,
            cwd: p.cwd.or_else(|| vm.runtime.workspace.clone()),
            tty: p.tty,
            log_max,
            root: p.root,
            user: p.user,
        };
        match agent::call::<a::SessionStartM>(&uds, op, &spec, |_| ()).await {
            Ok(info) => {
                let row = self.settle_row(row, Some(&info))?;
                tracing::info!(vm = %vm.name, session = %row.name, id = %row.id, "session started");
                Ok(view(&vm, &row, Some(&info)))
            }
            Err(e) if refused_by_agent(&e) => {
                // The agent made nothing: the intent goes.
                let _ = self.store.delete_session(&row.id);
                Err(match e.code {
                    ErrorCode::UnknownMethod => RpcError::failed(format!(
                        "the agent in VM {} is too old for sessions; restart the VM to update it",
                        vm.name
                    )),
                    _ => e,
                })
            }
            // Whether it started is not known: the row stays `starting`
            // and the next read of the VM's sessions settles it.
            Err(e) => Err(e),
        }
    }

    /// Writes what the agent says of `row` (or that it knows nothing of
    /// it) when that differs from the row; returns the row as it is now.
    fn settle_row(
        &self,
        mut row: SessionRecord,
        live: Option<&SessionInfo>,
    ) -> Result<SessionRecord, RpcError> {
        let (state, code, signal, boot) = match live {
            Some(i) => (
                i.state.as_str().to_string(),
                i.code,
                i.signal,
                Some(i.boot_id.clone()),
            ),
            // Asked, and unknown to the agent: whatever it was, it is gone.
            None if matches!(row.state.as_str(), "starting" | "running") => {
                ("lost".to_string(), None, None, None)
            }
            None => return Ok(row),
        };
        if row.state != state
            || row.code != code
            || row.signal != signal
            || (boot.is_some() && row.boot_id != boot)
        {
            self.store
                .settle_session(&row.id, &state, code, signal, boot.as_deref())
                .map_err(store_err)?;
            if row.state != state {
                tracing::info!(session = %row.name, id = %row.id, from = %row.state, to = %state, "session settled");
            }
            row.state = state;
            row.code = code;
            row.signal = signal;
            row.boot_id = boot.or(row.boot_id);
        }
        Ok(row)
    }

    /// The VM's rows, settled: with the agent's list when the VM runs
    /// (rows it does not know are lost), all unfinished ones lost when it
    /// does not; as they are when the agent cannot be asked now.
    pub(super) async fn settled(
        &self,
        op: &OpId,
        vm: &VmRecord,
    ) -> Result<Vec<(SessionRecord, Option<SessionInfo>)>, RpcError> {
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let rows = self.store.list_sessions(&vm.id).map_err(store_err)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let live: Option<HashMap<String, SessionInfo>> = match self.vms.agent_socket(vm) {
            None => Some(HashMap::new()),
            Some(uds) => {
                let call = agent::call::<a::SessionListM>(&uds, op, &Empty {}, |_| ());
                match tokio::time::timeout(std::time::Duration::from_secs(10), call).await {
                    Ok(Ok(list)) => Some(list.sessions.into_iter().map(|s| (s.id.clone(), s)).collect()),
                    Ok(Err(e)) if e.code == ErrorCode::UnknownMethod => Some(HashMap::new()),
                    Ok(Err(e)) => {
                        tracing::warn!(vm = %vm.name, error = %e.message, "could not list the guest's sessions");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(vm = %vm.name, "the guest's sessions did not come within 10s");
                        None
                    }
                }
            }
        };
        let Some(mut live) = live else {
            return Ok(rows.into_iter().map(|r| (r, None)).collect());
        };
        rows.into_iter()
            .map(|r| {
                let info = live.remove(&r.id);
                Ok((self.settle_row(r, info.as_ref())?, info))
            })
            .collect()
    }

    pub async fn list(&self, op: &OpId, vm: &str) -> Result<SessionViews, RpcError> {
        let vm = self.vms.record(vm)?;
        let sessions = self
            .settled(op, &vm)
            .await?
            .iter()
            .map(|(r, i)| view(&vm, r, i.as_ref()))
            .collect();
        Ok(SessionViews { sessions })
    }

    pub async fn show(&self, op: &OpId, vm: &str, name: &str) -> Result<SessionView, RpcError> {
        let (vm, _) = self.find(vm, name)?;
        self.settled(op, &vm)
            .await?
            .iter()
            .find(|(r, _)| r.name == name)
            .map(|(r, i)| view(&vm, r, i.as_ref()))
            .ok_or_else(|| RpcError::not_found(format!("VM {} has no session {name:?}", vm.name)))
    }

    /// Stop (SIGTERM, then SIGKILL after `grace_ms`) or kill (SIGKILL):
    /// the whole process group either way.
    pub async fn stop(
        &self,
        op: &OpId,
        vm: &str,
        name: &str,
        grace_ms: Option<u64>,
        kill: bool,
    ) -> Result<SessionView, RpcError> {
        let (vm, row) = self.find(vm, name)?;
        let uds = self.agent(&vm)?;
        let _busy = self.vms.busy(&vm.id);
        let info = if kill {
            let p = a::SessionStop {
                id: row.id.clone(),
                grace_ms: 0,
            };
            agent::call::<a::SessionStopM>(&uds, op, &p, |_| ()).await?
        } else {
            let p = a::SessionStop {
                id: row.id.clone(),
                grace_ms: grace_ms.unwrap_or(10_000).min(600_000),
            };
            agent::call::<a::SessionStopM>(&uds, op, &p, |_| ()).await?
        };
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().await;
        let row = self.settle_row(row, Some(&info))?;
        tracing::info!(vm = %vm.name, session = %row.name, state = %row.state, kill, "session stopped");
        Ok(view(&vm, &row, Some(&info)))
    }

    /// A signal for the session's process group, as the caller chose it.
    pub async fn signal(
        &self,
        op: &OpId,
        vm: &str,
        name: &str,
        signal: i32,
    ) -> Result<SessionView, RpcError> {
        if !(1..=64).contains(&signal) {
            return Err(RpcError::bad_request(format!("signal {signal} is not 1-64")));
        }
        let (vm, row) = self.find(vm, name)?;
        let uds = self.agent(&vm)?;
        let _busy = self.vms.busy(&vm.id);
        let p = a::SessionSignal {
            id: row.id.clone(),
            signal,
        };
        let info = agent::call::<a::SessionSignalM>(&uds, op, &p, |_| ()).await?;
        tracing::info!(vm = %vm.name, session = %row.name, signal, "session signalled");
        Ok(view(&vm, &row, Some(&info)))
    }

    pub async fn resize(
        &self,
        op: &OpId,
        vm: &str,
        name: &str,
        size: banger_proto::stream::WinSize,
    ) -> Result<SessionView, RpcError> {
        if size.rows == 0 || size.cols == 0 {
            return Err(RpcError::bad_request("a terminal needs rows and columns"));
        }
        let (vm, row) = self.find(vm, name)?;
        let uds = self.agent(&vm)?;
        let p = a::SessionResize {
            id: row.id.clone(),
            size,
        };
        let info = agent::call::<a::SessionResizeM>(&uds, op, &p, |_| ()).await?;
        Ok(view(&vm, &row, Some(&info)))
    }

    /// Removes an ended session: its log in the guest, then its row.
    pub async fn remove(&self, op: &OpId, vm: &str, name: &str) -> Result<Empty, RpcError> {
        let (vm, _) = self.find(vm, name)?;
        let uds = self.agent(&vm)?;
        let settled = self.settled(op, &vm).await?;
        let Some((row, _)) = settled.into_iter().find(|(r, _)| r.name == name) else {
            return Err(RpcError::not_found(format!(
                "VM {} has no session {name:?}",
                vm.name
            )));
        };
        if matches!(row.state.as_str(), "running" | "starting") {
            return Err(RpcError::new(
                ErrorCode::Conflict,
                format!("session {name} is {}; stop it first", row.state),
            ));
        }
        match agent::call::<a::SessionRemoveM>(&uds, op, &a::SessionRef { id: row.id.clone() }, |_| ()).await
        {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(e),
        }
        self.store.delete_session(&row.id).map_err(store_err)?;
        tracing::info!(vm = %vm.name, session = %name, "session removed");
        Ok(Empty {})
    }
}
