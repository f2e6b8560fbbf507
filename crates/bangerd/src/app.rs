//! The composition root: builds services and maps RPC methods onto them.
//! No logic lives here.

use crate::helper_client::HelperClient;
use crate::image::ImageService;
use crate::kernel::KernelService;
use crate::network::NetworkService;
use crate::ops::Operations;
use crate::sync::Locked;
use crate::vm::{Settings, VmService};
use banger_config::Config;
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::{handler, Router, RpcError};
use banger_store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct App {
    pub cfg: Config,
    pub store: Arc<Store>,
    pub ops: Arc<Operations>,
    pub network: Arc<NetworkService>,
    pub kernels: Arc<KernelService>,
    pub images: Arc<ImageService>,
    pub vms: Arc<VmService>,
    pub sessions: Arc<crate::session::SessionService>,
    pub ssh: Arc<crate::ssh::SshService>,
    pub shutdown: CancellationToken,
    /// Bound address of the DNS server, once it listens.
    pub dns_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    started: Instant,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .or_else(|| banger_vmm::which(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

impl App {
    /// A pull request's source, with the configured catalog unless the
    /// request names one.
    fn pull_from<'a>(&'a self, p: &'a d::ImagePull) -> crate::image::PullFrom<'a> {
        crate::image::PullFrom {
            src: &p.src,
            sha256: p.sha256.as_deref(),
            catalog: p.catalog.as_deref().or(self.cfg.catalog.as_deref()),
        }
    }

    pub fn new(cfg: Config, store: Store, shutdown: CancellationToken) -> Arc<Self> {
        let store = Arc::new(store);
        let helper = HelperClient::new(cfg.helper_socket.clone());
        let network = Arc::new(NetworkService::new(
            helper,
            cfg.bridge.clone(),
            cfg.bridge_address.clone(),
        ));
        let ops = Arc::new(Operations::default());
        let ssh = Arc::new(crate::ssh::SshService::new(cfg.state_dir.join("ssh")));
        let kernels = Arc::new(KernelService::new(cfg.kernels_dir()));
        let images = Arc::new(ImageService::new(
            cfg.images_dir(),
            store.clone(),
            kernels.clone(),
        ));
        let settings = Settings {
            vms_dir: cfg.vms_dir(),
            vmm: cfg.vmm.clone(),
            qemu: cfg.qemu.clone(),
            firecracker: cfg.firecracker.clone(),
            jail: cfg.jailer.clone().map(|binary| banger_vmm::jailer::JailConfig {
                binary,
                uid_base: cfg.jailer_uid_base,
            }),
            default_vcpus: cfg.default_vcpus,
            default_memory_mib: cfg.default_memory_mib,
            default_work_disk_mib: cfg.default_work_disk_mib,
            console_log_max_bytes: cfg.console_log_max_kib << 10,
            agent_binary: sibling("banger-agent"),
            auto_stop_idle_secs: cfg.auto_stop_idle_secs,
            warm_pool: cfg.warm_pool.clone(),
            snapshots_dir: cfg.snapshots_dir(),
            snapshot_max_bytes: cfg.snapshot_max_gib << 30,
            busybox: std::env::var_os("BANGER_BUSYBOX")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/bin/busybox".into()),
        };
        let vms = Arc::new(VmService::new(
            settings,
            store.clone(),
            images.clone(),
            ops.clone(),
            network.clone(),
            ssh.clone(),
        ));
        let sessions = Arc::new(crate::session::SessionService::new(
            store.clone(),
            vms.clone(),
            cfg.session_log_max_kib << 10,
        ));
        Arc::new(App {
            sessions,
            store,
            dns_addr: Default::default(),
            ssh,
            ops,
            network,
            kernels,
            images,
            vms,
            shutdown,
            started: Instant::now(),
            cfg,
        })
    }

    fn info(&self) -> d::DaemonInfo {
        d::DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            socket: self.cfg.daemon_socket().display().to_string(),
            state_dir: self.cfg.state_dir.display().to_string(),
            dns: self.dns_addr.locked().map(|a| a.to_string()),
        }
    }
}

/// A progress callback that streams stages to the caller as events.
fn progress(ctx: &banger_proto::Ctx) -> impl Fn(&str) + Sync + '_ {
    let started = Instant::now();
    move |s: &str| {
        tracing::info!(stage = s, "progress");
        ctx.emit(&d::Progress {
            stage: s.to_string(),
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// A mutating verb on one VM, run as an operation (see `ops`): a client
/// hang-up only detaches it. The body gets the VM service, the call's op
/// id and the params.
macro_rules! vm_operation {
    ($app:ident, $kind:literal, |$vms:ident, $op:ident, $p:ident| $body:expr) => {
        handler!($app, |ctx, $p| {
            let ($vms, $op) = ($app.vms.clone(), ctx.op_id.clone());
            let subject = $p.name.clone();
            $app.ops
                .run(&ctx.op_id, $kind, &subject, async move { $body })
                .await
        })
    };
}

/// What `image export` and `kernel export` report of the bundle written.
fn bundle_info(path: &str, m: &crate::bundle::Manifest) -> d::BundleInfo {
    d::BundleInfo {
        path: path.to_string(),
        name: m.name.clone(),
        kernel_version: m.kernel_version.clone(),
        members: m.members.len(),
        bytes: m.members.iter().map(|x| x.size).sum(),
    }
}

pub fn router(app: &Arc<App>) -> Router {
    Router::new("daemon")
        .method::<d::Ping, _, _>(handler!(app, |_, _| Ok(app.info())))
        .method::<d::Shutdown, _, _>(handler!(app, |_, _| {
            tracing::info!("shutdown requested");
            // Answer first, then stop accepting.
            let token = app.shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                token.cancel();
            });
            Ok::<_, RpcError>(Empty {})
        }))
        .method::<d::OperationsList, _, _>(handler!(app, |_, _| Ok(app.ops.list())))
        .method::<d::NetworkEnsure, _, _>(handler!(app, |ctx, _| app
            .network
            .ensure(&ctx.op_id)
            .await
            .map_err(RpcError::from)))
        // VMs
        .method::<d::VmCreateBegin, _, _>(handler!(app, |ctx, p| app.vms.create_begin(&ctx, p)))
        .method::<d::VmCreateStatusM, _, _>(handler!(app, |_, p| app.vms.create_status(&p.op_id)))
        .method::<d::VmCreateCancel, _, _>(handler!(app, |_, p| app.vms.create_cancel(&p.op_id)))
        // Grows a disk with e2fsck and resize2fs under the VM's lock: a
        // hang-up must not release the lock while they still run.
        .method::<d::VmSetM, _, _>(vm_operation!(app, "vm.set", |vms, _op, p| vms.set(p).await))
        .method::<d::VmSnapshotM, _, _>(vm_operation!(app, "vm.snapshot", |vms, op, p| vms
            .snapshot(&op, p)
            .await))
        .method::<d::VmRestoreM, _, _>(handler!(app, |ctx, p| {
            // A create: run as an operation of its own, which a hang-up
            // only detaches.
            let vms = app.vms.clone();
            let handle = app.ops.begin(&ctx.op_id, "vm.restore", &p.name);
            let h = handle.clone();
            handle.run(async move { vms.restore(&h, p).await }).await
        }))
        .method::<d::SnapshotListM, _, _>(handler!(app, |_, _| app.vms.snapshot_list()))
        .method::<d::SnapshotShowM, _, _>(handler!(app, |_, p| app.vms.snapshot_show(&p.name)))
        .method::<d::SnapshotRmM, _, _>(handler!(app, |_, p| app
            .vms
            .snapshot_rm(&p.name)
            .map(|_| Empty {})))
        .method::<d::PoolStatusM, _, _>(handler!(app, |_, _| app.vms.pool_status()))
        .method::<d::PoolFillM, _, _>(handler!(app, |_, p| app.vms.pool_fill(p.wait).await))
        // Deletes VMs: a hang-up must not leave one half deleted.
        .method::<d::PoolDrainM, _, _>(handler!(app, |ctx, _| {
            let (vms, op) = (app.vms.clone(), ctx.op_id.clone());
            app.ops
                .run(&ctx.op_id, "pool.drain", "warm pool", async move {
                    vms.pool_drain(&op).await
                })
                .await
        }))
        .method::<d::VmStart, _, _>(vm_operation!(app, "vm.start", |vms, _op, p| vms
            .start(&p.name)
            .await))
        .method::<d::VmStop, _, _>(vm_operation!(app, "vm.stop", |vms, op, p| vms
            .stop(&op, &p.name)
            .await))
        .method::<d::VmRestart, _, _>(vm_operation!(app, "vm.restart", |vms, op, p| vms
            .restart(&op, &p.name)
            .await))
        .method::<d::VmKill, _, _>(vm_operation!(app, "vm.kill", |vms, op, p| vms
            .kill(&op, &p.name)
            .await))
        .method::<d::VmDelete, _, _>(vm_operation!(app, "vm.delete", |vms, op, p| vms
            .delete(&op, &p.name)
            .await
            .map(|_| Empty {})))
        .method::<d::VmPrune, _, _>(handler!(app, |ctx, _| {
            let (vms, op) = (app.vms.clone(), ctx.op_id.clone());
            app.ops
                .run(&ctx.op_id, "vm.prune", "stopped VMs", async move {
                    vms.prune(&op).await.map(|deleted| d::Pruned { deleted })
                })
                .await
        }))
        .method::<d::VmList, _, _>(handler!(app, |_, _| app.vms.list()))
        .method::<d::VmShow, _, _>(handler!(app, |_, p| app.vms.show(&p.name)))
        .method::<d::VmLogsM, _, _>(handler!(app, |_, p| app
            .vms
            .logs(&p.name, p.tail_bytes)
            .map(|(serial, path)| d::VmLogs { serial, path })))
        .method_with_input::<d::VmExecM, _, _>(handler!(app, |ctx, p| app.vms.exec(&ctx, p).await))
        // guest sessions
        .method::<d::VmSessionStartM, _, _>(handler!(app, |ctx, p| app.sessions.start(&ctx.op_id, p).await))
        .method::<d::VmSessionListM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .list(&ctx.op_id, &p.name)
            .await))
        .method::<d::VmSessionShowM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .show(&ctx.op_id, &p.vm, &p.session)
            .await))
        .method::<d::VmSessionStopM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .stop(&ctx.op_id, &p.vm, &p.session, p.grace_ms, false)
            .await))
        .method::<d::VmSessionKillM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .stop(&ctx.op_id, &p.vm, &p.session, None, true)
            .await))
        .method::<d::VmSessionSignalM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .signal(&ctx.op_id, &p.vm, &p.session, p.signal)
            .await))
        .method::<d::VmSessionRmM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .remove(&ctx.op_id, &p.vm, &p.session)
            .await))
        .method::<d::VmSessionResizeM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .resize(&ctx.op_id, &p.vm, &p.session, p.size)
            .await))
        .method_with_input::<d::VmSessionStreamM, _, _>(handler!(app, |ctx, p| app
            .sessions
            .stream(&ctx, p)
            .await))
        .method::<d::VmPortsM, _, _>(handler!(app, |ctx, p| app.vms.ports(&ctx, &p.name).await))
        .method::<d::VmStatsM, _, _>(handler!(app, |ctx, p| app.vms.stats(&ctx, &p.name).await))
        .method::<d::SshInfoM, _, _>(handler!(app, |_, _| {
            app.ssh.public_key().await?;
            Ok::<_, RpcError>(d::SshInfo {
                key: app.ssh.key_path().display().to_string(),
                known_hosts: app.ssh.known_hosts().display().to_string(),
                user: "root".into(),
            })
        }))
        // workspaces
        .method::<d::WorkspacePlanM, _, _>(|_, p| async move {
            crate::workspace::plan(&p.path, p.include_untracked)
                .await
                .map(|(_, plan)| plan)
                .map_err(RpcError::from)
        })
        .method::<d::VmWorkspacePrepare, _, _>(vm_operation!(app, "vm.workspace.prepare", |vms, op, p| vms
            .workspace_prepare(&op, p)
            .await))
        .method::<d::VmCopyM, _, _>(handler!(app, |ctx, p| app
            .vms
            .copy(&ctx.op_id, p, &progress(&ctx))
            .await))
        .method::<d::VmWorkspaceExport, _, _>(handler!(app, |ctx, p| app.vms.workspace_export(&ctx, p).await))
        // images and kernels
        .method::<d::ImageBuildM, _, _>(handler!(app, |ctx, p| {
            let name = if p.name.is_empty() {
                crate::image::DEFAULT_IMAGE.to_string()
            } else {
                p.name
            };
            // The default image's recipe is banger's; any other name is
            // built from what was asked (base packages only if nothing).
            let custom = !p.packages.is_empty() || p.suite.is_some() || p.size_mib.is_some();
            let recipe = if name == crate::image::DEFAULT_IMAGE && !custom {
                crate::recipe::Recipe::default_image()
            } else {
                crate::recipe::Recipe::custom(p.suite.as_deref(), &p.packages, p.size_mib)
                    .map_err(|e| RpcError::from(crate::error::ImageError::InvalidRecipe(e)))?
            };
            app.images
                .build(&name, &recipe, p.force, &progress(&ctx))
                .await
                .map(|r| crate::image::info(&r))
                .map_err(RpcError::from)
        }))
        .method::<d::ImageImportM, _, _>(handler!(app, |ctx, p| app
            .images
            .import(&p.name, &p.from, p.force, p.kernel.as_deref(), &progress(&ctx))
            .await
            .map(|r| crate::image::info(&r))
            .map_err(RpcError::from)))
        .method::<d::ImageList, _, _>(handler!(app, |_, _| app.images.list().map_err(RpcError::from)))
        .method::<d::ImageShow, _, _>(handler!(app, |_, p| app
            .images
            .get(&p.name)
            .map(|r| crate::image::info(&r))
            .map_err(RpcError::from)))
        .method::<d::ImageDelete, _, _>(handler!(app, |_, p| app
            .images
            .delete(&p.name)
            .map(|_| Empty {})
            .map_err(RpcError::from)))
        .method::<d::ImageExportM, _, _>(handler!(app, |_, p| app
            .images
            .export(&p.name, &p.path)
            .await
            .map(|m| bundle_info(&p.path, &m))
            .map_err(RpcError::from)))
        .method::<d::KernelExportM, _, _>(handler!(app, |_, p| app
            .images
            .export_kernel(&p.name, &p.path)
            .await
            .map(|m| bundle_info(&p.path, &m))
            .map_err(RpcError::from)))
        .method::<d::KernelPullM, _, _>(handler!(app, |_, p| {
            let version = app
                .images
                .pull_kernel(&app.pull_from(&p))
                .await
                .map_err(RpcError::from)?;
            app.kernels.get(&version).map_err(RpcError::from)
        }))
        .method::<d::ImagePullM, _, _>(handler!(app, |_, p| app
            .images
            .pull(&app.pull_from(&p), p.name.as_deref())
            .await
            .map(|r| crate::image::info(&r))
            .map_err(RpcError::from)))
        .method::<d::ImageRegisterM, _, _>(handler!(app, |_, p| app
            .images
            .register(&p.name, &p.rootfs, &p.kernel)
            .map(|r| crate::image::info(&r))
            .map_err(RpcError::from)))
        .method::<d::KernelFetch, _, _>(handler!(app, |ctx, _| app
            .kernels
            .fetch(&progress(&ctx))
            .await
            .map_err(RpcError::from)))
        .method::<d::KernelList, _, _>(handler!(app, |_, _| Ok(app.kernels.list())))
        .method::<d::KernelShow, _, _>(handler!(app, |_, p| app
            .kernels
            .get(&p.name)
            .map_err(RpcError::from)))
        .method::<d::KernelRm, _, _>(handler!(app, |_, p| app
            .kernels
            .remove(&p.name)
            .map(|_| Empty {})
            .map_err(RpcError::from)))
}
