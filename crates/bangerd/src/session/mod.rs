//! Guest sessions on the host: the controller. The agent owns a session's
//! process and its output (see `banger-agent`'s `sessions`); the daemon
//! keeps the catalog in SQLite (`guest_sessions`) and settles it from what
//! the agent says. Split by job: this file (the service, name resolution,
//! views), `lifecycle` (start, stop, kill, remove, settling after a crash
//! or a restart), `attach` (attach, logs, send) and `stream` (relaying a
//! session stream between the agent and a client).

mod attach;
mod lifecycle;
mod stream;

use crate::sync::Locked;
use crate::vm::VmService;
use banger_proto::methods::agent::SessionInfo;
use banger_proto::methods::daemon::SessionView;
use banger_proto::RpcError;
use banger_store::{SessionRecord, Store, VmRecord};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct SessionService {
    store: Arc<Store>,
    vms: Arc<VmService>,
    /// Per VM id: held while a VM's rows are written or settled, so a
    /// list never settles a row a start is still writing.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Output a session keeps unless its start says otherwise (bytes).
    default_log_max: u64,
}

fn store_err(e: banger_store::StoreError) -> RpcError {
    match e {
        banger_store::StoreError::AlreadyExists(what) => {
            RpcError::already_exists(format!("{what} already exists in this VM"))
        }
        other => RpcError::failed(other.to_string()),
    }
}

/// A row as shown, with the agent's live figures when there are any.
fn view(vm: &VmRecord, r: &SessionRecord, live: Option<&SessionInfo>) -> SessionView {
    SessionView {
        name: r.name.clone(),
        id: r.id.clone(),
        vm: vm.name.clone(),
        argv: r.argv.clone(),
        tty: r.tty,
        state: r.state.clone(),
        pid: live.and_then(|i| i.pid).filter(|_| r.state == "running"),
        code: r.code,
        signal: r.signal,
        first_seq: live.map(|i| i.first_seq),
        next_seq: live.map(|i| i.next_seq),
        input_attached: live.map(|i| i.input_attached),
        op_id: r.op_id.clone(),
        created_at: r.created_at.clone(),
    }
}

impl SessionService {
    pub fn new(store: Arc<Store>, vms: Arc<VmService>, default_log_max: u64) -> Self {
        SessionService {
            store,
            vms,
            locks: Mutex::new(HashMap::new()),
            default_log_max,
        }
    }

    fn lock_for(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.locked().entry(vm_id.to_string()).or_default().clone()
    }

    /// The VM and its session named `name`.
    fn find(&self, vm: &str, name: &str) -> Result<(VmRecord, SessionRecord), RpcError> {
        let vm = self.vms.record(vm)?;
        let row = self
            .store
            .list_sessions(&vm.id)
            .map_err(store_err)?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| RpcError::not_found(format!("VM {} has no session {name:?}", vm.name)))?;
        Ok((vm, row))
    }

    /// The socket of a running VM's agent, or `not_running`.
    fn agent(&self, vm: &VmRecord) -> Result<std::path::PathBuf, RpcError> {
        self.vms.agent_socket(vm).ok_or_else(|| {
            RpcError::not_running(format!(
                "VM {} is not running (start it with `banger vm start {}`)",
                vm.name, vm.name
            ))
        })
    }
}
