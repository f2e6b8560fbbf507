//! The composition root: builds services and maps RPC methods onto them.
//! No logic lives here.

use crate::helper_client::HelperClient;
use crate::network::NetworkService;
use crate::ops::Operations;
use banger_config::Config;
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::{Router, RpcError};
use banger_store::Store;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct App {
    pub cfg: Config,
    pub store: Arc<Store>,
    pub ops: Arc<Operations>,
    pub network: Arc<NetworkService>,
    pub shutdown: CancellationToken,
    started: Instant,
}

impl App {
    pub fn new(cfg: Config, store: Store, shutdown: CancellationToken) -> Arc<Self> {
        let helper = HelperClient::new(cfg.helper_socket.clone());
        let network = Arc::new(NetworkService::new(
            helper,
            cfg.bridge.clone(),
            cfg.bridge_address.clone(),
        ));
        Arc::new(App {
            store: Arc::new(store),
            ops: Arc::new(Operations::default()),
            network,
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
        }
    }
}

/// Clones `$app` into an async handler body.
macro_rules! with {
    ($app:ident, |$ctx:pat_param, $p:pat_param| $body:expr) => {{
        let $app = $app.clone();
        move |$ctx, $p| {
            let $app = $app.clone();
            async move { $body }
        }
    }};
}

pub fn router(app: &Arc<App>) -> Router {
    Router::new("daemon")
        .method::<d::Ping, _, _>(with!(app, |_, _| Ok(app.info())))
        .method::<d::Shutdown, _, _>(with!(app, |_, _| {
            tracing::info!("shutdown requested");
            // Answer first, then stop accepting.
            let token = app.shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                token.cancel();
            });
            Ok::<_, RpcError>(Empty {})
        }))
        .method::<d::OperationsList, _, _>(with!(app, |_, _| Ok(app.ops.list())))
        .method::<d::NetworkEnsure, _, _>(with!(app, |ctx, _| app.network.ensure(&ctx.op_id).await))
}
