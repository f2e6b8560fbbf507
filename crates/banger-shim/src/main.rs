//! `containerd-shim-banger-v2`: containerd's runtime v2 ("shim") API on
//! banger, so `ctr run --runtime io.containerd.banger.v2`, a Kubernetes
//! RuntimeClass or Nomad's containerd driver place a container as a
//! banger microVM.
//!
//! The shim owns no VM state: each task is a VM in bangerd (named from the
//! containerd namespace and task id), its process a guest session, an
//! exec a `vm exec`. It drives bangerd through the `banger` command line
//! beside it, handing each call an op id that its own log line for the
//! task names too.

mod banger;
mod ctl;
mod keeper;
mod layers;
mod pty;
mod record;
mod relay;
mod rootfs;
mod service;
mod spec;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if keeper::is_serve_invocation(&args) {
        // containerd's connections go to a keeper that survives the task
        // server (see `keeper`); the server is its child.
        std::process::exit(keeper::run(args));
    }
    if let Some(c) = ctl::from_env() {
        // A task server: it guards its keeper as its keeper guards it.
        keeper::guard_keeper(c, args);
    }
    containerd_shim::run::<service::Shim>("io.containerd.banger.v2", Some(service::config()))
}
