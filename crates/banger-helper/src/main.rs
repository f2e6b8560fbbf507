//! `banger-helper`: the root helper process.

use anyhow::{Context, Result};
use banger_helper::{net::LinuxNet, router, PrivService};
use banger_proto::Client;
use clap::{Parser, Subcommand};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Default socket of the system-wide helper.
use banger_proto::names::DEFAULT_HELPER_SOCKET as DEFAULT_SOCKET;

#[derive(Parser)]
#[command(name = "banger-helper", version, about = "banger's root helper")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the priv.* API.
    Serve {
        #[arg(long, env = "BANGER_HELPER_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The unprivileged uid allowed to call the helper besides root.
        #[arg(long, env = "BANGER_OWNER_UID")]
        owner_uid: u32,
        /// Append JSON logs here instead of stderr.
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Send one request and print the answer (diagnostics).
    #[command(hide = true)]
    Call {
        #[arg(long, env = "BANGER_HELPER_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        method: String,
        #[arg(default_value = "{}")]
        params: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Serve {
            socket,
            owner_uid,
            log_file,
        } => rt.block_on(serve(socket, owner_uid, log_file)),
        Cmd::Call {
            socket,
            method,
            params,
        } => rt.block_on(call(socket, method, params)),
    }
}

async fn serve(socket: PathBuf, owner_uid: u32, log_file: Option<PathBuf>) -> Result<()> {
    banger_log::init("helper", None, log_file.as_deref())?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Two gates: only root and the owner can connect (socket 0600, owned
    // by the owner), and the peer check (SO_PEERCRED) at accept refuses
    // anyone else even if the socket is opened up.
    let _ = std::fs::remove_file(&socket);
    let listener =
        tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(&socket, Some(owner_uid), None)
        .with_context(|| format!("giving {} to uid {owner_uid}", socket.display()))?;
    let net = LinuxNet::new()?;
    let router = Arc::new(router(Arc::new(PrivService::new(net)), owner_uid));
    let shutdown = CancellationToken::new();
    banger_proto::server::cancel_on_signals(shutdown.clone());
    tracing::info!(socket = %socket.display(), owner_uid, pid = std::process::id(), "helper listening");
    router.serve(listener, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("helper stopped");
    Ok(())
}

/// A raw call for diagnostics: prints the result or the error (with op id).
async fn call(socket: PathBuf, method: String, params: String) -> Result<()> {
    let params: serde_json::Value = serde_json::from_str(&params).context("params must be JSON")?;
    let out = banger_proto::client::raw_call(&Client::new(socket), &method, params).await;
    match out {
        Ok(v) => {
            println!("{v}");
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(rpc) = e.rpc() {
                eprintln!("code: {}", rpc.code);
            }
            std::process::exit(1)
        }
    }
}
