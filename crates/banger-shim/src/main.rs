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
mod pty;
mod rootfs;
mod service;
mod spec;

fn main() {
    containerd_shim::run::<service::Shim>("io.containerd.banger.v2", Some(service::config()))
}
