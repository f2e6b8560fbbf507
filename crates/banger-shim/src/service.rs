//! The shim's two halves: the `Shim` containerd starts and stops, and the
//! task service it serves over ttrpc.
//!
//! A task is a VM (`ct-<hash of namespace/id>`), made and booted at
//! Create; its process is the guest session `main`, started at Start,
//! whose output a `banger vm session logs -f` copies into containerd's
//! FIFOs and whose stdin a `banger vm session send --eof` feeds. An exec
//! is a `banger vm exec` with the FIFOs as its stdio. Exits are seen by a
//! watcher thread per process and published as TaskExit, in the order
//! containerd wants: create, start, exit, delete.
//!
//! `placement` decides where a task runs (its own VM, or a tree in its
//! pod's), `process` runs and watches its processes, `recovery` writes
//! the tasks down and takes them over after a restart (see `keeper`).

use crate::banger;
use crate::record::{Records, Status, Stdio3};
use crate::rootfs;
use crate::spec::{self, Process};

mod placement;
mod process;
mod recovery;

use containerd_shim::api;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult};
use process::session_exit;
use std::collections::HashMap;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The session that is the process of a task with a VM of its own.
const MAIN: &str = "main";
/// The bundle file that names the task's VM (read by `delete` after a crash).
const VM_FILE: &str = "banger-vm";
/// The bundle file of a pod's later container: its session in the pod's
/// VM (which `delete` after a crash ends, leaving the VM to the pod).
const SESSION_FILE: &str = "banger-session";
/// Where a pod's later containers' trees go in the pod's VM (the work disk).
const GUEST_TREES: &str = "/root/.containers";

pub fn config() -> containerd_shim::Config {
    containerd_shim::Config {
        // The shim waits for its own children (the banger commands it
        // runs); a reaper taking every child would steal their statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

fn err(e: impl std::fmt::Display) -> containerd_shim::protos::ttrpc::Error {
    containerd_shim::protos::ttrpc::Error::RpcStatus(containerd_shim::protos::ttrpc::get_status(
        containerd_shim::protos::ttrpc::Code::UNKNOWN,
        e.to_string(),
    ))
}

fn not_found(what: &str) -> containerd_shim::protos::ttrpc::Error {
    containerd_shim::protos::ttrpc::Error::RpcStatus(containerd_shim::protos::ttrpc::get_status(
        containerd_shim::protos::ttrpc::Code::NOT_FOUND,
        format!("{what} not found"),
    ))
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

/// A pod container's name in its pod's VM (session and tree): a session
/// id, the same for the same container.
pub fn member_key(id: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(id.as_bytes());
    let hex: String = h.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("c-{hex}")
}

/// The VM's name for a task: a DNS label, the same for the same task.
pub fn vm_name(namespace: &str, id: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let hex: String = h.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("ct-{hex}")
}

struct Proc {
    process: Process,
    io: Stdio3,
    status: Status,
    /// The VMM's pid for the task, the `banger vm exec`'s for an exec.
    pid: u32,
    exit: Option<(u32, Timestamp)>,
    /// What relays this process's I/O (and, for an exec, runs it).
    child: Option<Arc<Mutex<Child>>>,
    /// Set by `CloseIO`: the stdin relay ends.
    stdin_closed: Arc<AtomicBool>,
    /// An exec's terminal (its master), which `ResizePty` resizes.
    pty: Option<Arc<std::os::fd::OwnedFd>>,
    /// The host command whose end is this process's (see `record`).
    relay_pid: Option<u32>,
}

struct TaskState {
    id: String,
    bundle: String,
    vm: String,
    /// The guest session that is the task's process.
    session: String,
    /// The guest directory it runs chrooted into (a pod's later container).
    root: Option<String>,
    /// Whether the VM is the task's (deleted with it) or its pod's.
    owns_vm: bool,
    main: Proc,
    execs: HashMap<String, Proc>,
}

#[derive(Clone)]
pub struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    publisher: Option<Arc<RemotePublisher>>,
    tasks: Arc<(Mutex<HashMap<String, TaskState>>, Condvar)>,
    /// Where the tasks are written down for a restarted server.
    records: Option<Records>,
}

pub struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: String,
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd starts `start` in the bundle: a pod's containers all
        // go to the shim of its sandbox.
        let grouping = std::fs::read_to_string("config.json")
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|spec| spec::grouping(&spec, &opts.id))
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        // containerd reads it back to reconnect after a restart.
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// After the shim died: the task's VM goes; the exit is a kill's.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        };
        let vm = std::fs::read_to_string(bundle.join(VM_FILE))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| vm_name(&self.namespace, &self.id));
        if let Ok(session) = std::fs::read_to_string(bundle.join(SESSION_FILE)) {
            // A pod's later container: its process goes, the pod's VM stays.
            let session = session.trim();
            let _ = banger::run(&self.id, "session kill", &["vm", "session", "kill", &vm, session]);
            let _ = banger::run(&self.id, "session rm", &["vm", "session", "rm", &vm, session]);
        } else {
            let _ = banger::run(&self.id, "vm delete", &["vm", "kill", &vm]);
            let _ = banger::run(&self.id, "vm delete", &["vm", "delete", &vm]);
        }
        // The dead shim's records, unless a live one still serves them.
        if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
            let socket = crate::keeper::socket_path(address.trim());
            if std::os::unix::net::UnixStream::connect(&socket).is_err() {
                let _ = std::fs::remove_dir_all(crate::keeper::state_dir(&socket));
            }
        }
        let mut r = DeleteResponse::new();
        r.exit_status = 137;
        r.exited_at = MessageField::some(now());
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
        crate::keeper::farewell();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let svc = Service {
            exit: self.exit.clone(),
            namespace: self.namespace.clone(),
            publisher: Some(Arc::new(publisher)),
            tasks: Arc::new((Mutex::new(HashMap::new()), Condvar::new())),
            records: Records::from_env(),
        };
        svc.restore();
        svc
    }
}

impl Service {
    fn emit<E: Event + 'static>(&self, ev: E) {
        if let Some(p) = &self.publisher {
            let topic = ev.topic();
            if let Err(e) = p.publish(Context::default(), &topic, &self.namespace, Box::new(ev)) {
                log::warn!("publishing {topic}: {e}");
            }
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut TaskState) -> TtrpcResult<T>) -> TtrpcResult<T> {
        let mut tasks = self.tasks.0.lock().unwrap_or_else(|p| p.into_inner());
        let t = tasks
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("task {id}")))?;
        f(t)
    }

    /// The state directory's cache of container images.
    fn cache() -> PathBuf {
        let home = banger::json("-", "config show", &["config", "show", "--json"])
            .ok()
            .and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|s| s["key"] == "state_dir")?
                    .get("value")?
                    .as_str()
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/banger"));
        home.join("containerd/images")
    }

    /// Records a process's end, wakes every Wait, publishes TaskExit.
    fn exited(&self, id: &str, exec_id: &str, code: u32) {
        let ev = {
            let mut tasks = self.tasks.0.lock().unwrap_or_else(|p| p.into_inner());
            let Some(t) = tasks.get_mut(id) else { return };
            let p = if exec_id.is_empty() {
                &mut t.main
            } else {
                match t.execs.get_mut(exec_id) {
                    Some(p) => p,
                    None => return,
                }
            };
            if p.exit.is_some() {
                return;
            }
            let at = now();
            p.status = Status::Stopped;
            p.exit = Some((code, at.clone()));
            TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() {
                    id.to_string()
                } else {
                    exec_id.to_string()
                },
                pid: p.pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }
        };
        self.tasks.1.notify_all();
        self.save(id);
        log::info!("task={id} exec={exec_id} exited with {code}");
        self.emit(ev);
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        let spec_text = std::fs::read_to_string(Path::new(&req.bundle).join("config.json")).map_err(err)?;
        let spec: serde_json::Value = serde_json::from_str(&spec_text).map_err(err)?;
        let process = spec::process(&spec["process"]);
        let mounts: Vec<rootfs::Mount> = req
            .rootfs
            .iter()
            .map(|m| rootfs::Mount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let layers = rootfs::layers(&mounts).map_err(err)?;
        let bundle = Path::new(&req.bundle);
        let placed = match spec::role(&spec) {
            spec::Role::Member { sandbox } => self.place_member(&id, &sandbox, &spec, &layers, bundle)?,
            spec::Role::Alone | spec::Role::Sandbox => self.boot_vm(&id, &spec, &layers, bundle)?,
        };
        let pid = placed.pid;
        let io = Stdio3 {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.tasks.0.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            TaskState {
                id: id.clone(),
                bundle: req.bundle.clone(),
                vm: placed.vm,
                session: placed.session,
                root: placed.root,
                owns_vm: placed.owns_vm,
                main: Proc {
                    process,
                    io: io.clone(),
                    status: Status::Created,
                    pid,
                    exit: None,
                    child: None,
                    stdin_closed: Arc::default(),
                    pty: None,
                    relay_pid: None,
                },
                execs: HashMap::new(),
            },
        );
        self.save(&id);
        self.emit(TaskCreate {
            container_id: id,
            bundle: req.bundle,
            rootfs: req.rootfs,
            io: MessageField::some(TaskIO {
                stdin: io.stdin,
                stdout: io.stdout,
                stderr: io.stderr,
                terminal: io.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let id = req.id.clone();
        let (at, proc_, pid) = self.with(&id, |t| {
            let p = if req.exec_id.is_empty() {
                &t.main
            } else {
                t.execs.get(&req.exec_id).ok_or_else(|| not_found(&req.exec_id))?
            };
            Ok((t.target(), (p.process.clone(), p.io.clone()), p.pid))
        })?;
        let (process, io) = proc_;
        if req.exec_id.is_empty() {
            self.start_main(&id, &at, &process, &io)?;
            self.emit(TaskStart {
                container_id: id,
                pid,
                ..Default::default()
            });
            Ok(api::StartResponse {
                pid,
                ..Default::default()
            })
        } else {
            let pid = self.start_exec(&id, &req.exec_id, &at, &process, &io)?;
            self.emit(TaskExecStarted {
                container_id: id,
                exec_id: req.exec_id,
                pid,
                ..Default::default()
            });
            Ok(api::StartResponse {
                pid,
                ..Default::default()
            })
        }
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        self.with(&req.id, |t| {
            let p = if req.exec_id.is_empty() {
                &t.main
            } else {
                t.execs.get(&req.exec_id).ok_or_else(|| not_found(&req.exec_id))?
            };
            let status = match p.status {
                Status::Created => api::Status::CREATED,
                Status::Running => api::Status::RUNNING,
                Status::Stopped => api::Status::STOPPED,
            };
            let mut r = api::StateResponse {
                id: t.id.clone(),
                bundle: t.bundle.clone(),
                pid: p.pid,
                stdin: p.io.stdin.clone(),
                stdout: p.io.stdout.clone(),
                stderr: p.io.stderr.clone(),
                terminal: p.io.terminal,
                exec_id: req.exec_id.clone(),
                ..Default::default()
            };
            r.status = status.into();
            if let Some((code, at)) = &p.exit {
                r.exit_status = *code;
                r.exited_at = MessageField::some(at.clone());
            }
            Ok(r)
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (lock, cvar) = &*self.tasks;
        let mut tasks = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let t = tasks.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            let p = if req.exec_id.is_empty() {
                &t.main
            } else {
                t.execs.get(&req.exec_id).ok_or_else(|| not_found(&req.exec_id))?
            };
            if let Some((code, at)) = &p.exit {
                return Ok(api::WaitResponse {
                    exit_status: *code,
                    exited_at: MessageField::some(at.clone()),
                    ..Default::default()
                });
            }
            tasks = cvar.wait(tasks).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (at, child, relay, running) = self.with(&req.id, |t| {
            let p = if req.exec_id.is_empty() {
                &t.main
            } else {
                t.execs.get(&req.exec_id).ok_or_else(|| not_found(&req.exec_id))?
            };
            Ok((
                t.target(),
                p.child.clone(),
                p.relay_pid,
                p.status == Status::Running,
            ))
        })?;
        if !running {
            return Err(not_found(&format!("a running process in {}", req.id)));
        }
        if req.exec_id.is_empty() {
            // SIGKILL kills the session's whole group at once; any other
            // signal goes to its group as it is (a CRI stop sends the
            // stop signal, then SIGKILL after its timeout).
            let signal = req.signal.to_string();
            let args: Vec<&str> = if req.signal == 9 {
                vec!["vm", "session", "kill", &at.vm, &at.session]
            } else {
                vec!["vm", "session", "signal", &at.vm, &at.session, &signal]
            };
            banger::run(&req.id, "session kill", &args).map_err(err)?;
            if req.all {
                let execs = self.with(&req.id, |t| {
                    Ok(t.execs
                        .values()
                        .filter(|p| p.status == Status::Running)
                        .map(|p| (p.child.clone(), p.relay_pid))
                        .collect::<Vec<_>>())
                })?;
                for (c, relay) in execs {
                    match c {
                        Some(c) => {
                            let _ = c.lock().unwrap_or_else(|p| p.into_inner()).kill();
                        }
                        None => recovery::kill_orphan(relay),
                    }
                }
            }
        } else if let Some(c) = child {
            // The exec's `banger vm exec` hangs up, and the daemon kills the
            // guest process with it.
            let _ = c.lock().unwrap_or_else(|p| p.into_inner()).kill();
        } else {
            recovery::kill_orphan(relay);
        }
        Ok(api::Empty::default())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let p = self.with(&req.id, |t| {
                t.execs
                    .remove(&req.exec_id)
                    .ok_or_else(|| not_found(&req.exec_id))
            })?;
            self.save(&req.id);
            let (code, at) = p.exit.unwrap_or((137, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        let t = self
            .tasks
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        self.save(&req.id);
        for p in t.execs.values().chain([&t.main]) {
            match &p.child {
                Some(c) => {
                    let _ = c.lock().unwrap_or_else(|p| p.into_inner()).kill();
                }
                None if p.status == Status::Running => recovery::kill_orphan(p.relay_pid),
                None => {}
            }
        }
        if t.owns_vm {
            let _ = banger::run(&t.id, "vm kill", &["vm", "kill", &t.vm]);
            banger::run(&t.id, "vm delete", &["vm", "delete", &t.vm]).map_err(err)?;
        } else {
            // A pod's later container: its process goes, the pod's VM stays.
            let _ = banger::run(
                &t.id,
                "session kill",
                &["vm", "session", "kill", &t.vm, &t.session],
            );
            let _ = banger::run(&t.id, "session rm", &["vm", "session", "rm", &t.vm, &t.session]);
        }
        let (code, at) = t.main.exit.clone().unwrap_or((137, now()));
        self.emit(TaskDelete {
            container_id: t.id.clone(),
            pid: t.main.pid,
            exit_status: code,
            exited_at: MessageField::some(at.clone()),
            id: t.id.clone(),
            ..Default::default()
        });
        Ok(api::DeleteResponse {
            pid: t.main.pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec: serde_json::Value = req
            .spec
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(err)?
            .unwrap_or_default();
        let process = spec::process(&spec);
        if process.args.is_empty() {
            return Err(err("the exec has no args"));
        }
        self.with(&req.id, |t| {
            if t.execs.contains_key(&req.exec_id) {
                return Err(err(format!("exec {} exists", req.exec_id)));
            }
            t.execs.insert(
                req.exec_id.clone(),
                Proc {
                    process,
                    io: Stdio3 {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                    },
                    status: Status::Created,
                    pid: 0,
                    exit: None,
                    child: None,
                    stdin_closed: Arc::default(),
                    pty: None,
                    relay_pid: None,
                },
            );
            Ok(())
        })?;
        self.save(&req.id);
        self.emit(TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        });
        Ok(api::Empty::default())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            let pty = self.with(&req.id, |t| {
                Ok(t.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&req.exec_id))?
                    .pty
                    .clone())
            })?;
            if let Some(m) = pty {
                crate::pty::resize(&m, req.height as u16, req.width as u16).map_err(err)?;
            }
        } else {
            let at = self.with(&req.id, |t| Ok(t.target()))?;
            let (rows, cols) = (req.height.to_string(), req.width.to_string());
            banger::run(
                &req.id,
                "session resize",
                &["vm", "session", "resize", &at.vm, &at.session, &rows, &cols],
            )
            .map_err(err)?;
        }
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.with(&req.id, |t| {
                let p = if req.exec_id.is_empty() {
                    &t.main
                } else {
                    t.execs.get(&req.exec_id).ok_or_else(|| not_found(&req.exec_id))?
                };
                p.stdin_closed.store(true, Ordering::Relaxed);
                Ok(())
            })?;
        }
        Ok(api::Empty::default())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pid = self.with(&req.id, |t| Ok(t.main.pid))?;
        let mut info = containerd_shim::protos::api::ProcessInfo::new();
        info.pid = pid;
        Ok(api::PidsResponse {
            processes: vec![info],
            ..Default::default()
        })
    }

    /// The VM's figures (`vm stats`) as cgroup v2 metrics: memory in use
    /// and its limit (the guest's own view), and the network counters.
    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics::{MemoryStat, Metrics, NetworkStat};
        let vm = self.with(&req.id, |t| Ok(t.vm.clone()))?;
        let s = banger::json(&req.id, "vm stats", &["vm", "stats", &vm, "--json"]).map_err(err)?;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let mut m = Metrics::new();
        let mut mem = MemoryStat::new();
        mem.usage = n("memory_total_bytes").saturating_sub(n("memory_available_bytes"));
        mem.usage_limit = n("memory_total_bytes");
        m.memory = MessageField::some(mem);
        let mut net = NetworkStat::new();
        net.name = s["net_interface"].as_str().unwrap_or("eth0").to_string();
        net.rx_bytes = n("net_rx_bytes");
        net.tx_bytes = n("net_tx_bytes");
        m.network.push(net);
        let any = containerd_shim::util::convert_to_any(Box::new(m)).map_err(err)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let pid = self.with(&req.id, |t| Ok(t.main.pid)).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.tasks.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_task_has_a_stable_dns_label_for_a_vm() {
        let a = super::vm_name("default", "t1");
        assert_eq!(a, super::vm_name("default", "t1"));
        assert_ne!(a, super::vm_name("k8s.io", "t1"));
        assert!(
            a.len() <= 63
                && a.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
