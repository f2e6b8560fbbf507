//! The daemon. `app` is the composition root: it builds each service and
//! wires the RPC router; services own their state and locks and never see
//! the wire format.

pub mod app;
pub mod bundle;
pub mod copy;
pub mod daemon;
pub mod dns;
pub mod doctor;
pub mod error;
pub mod helper_client;
pub mod image;
pub mod initramfs;
pub mod kernel;
pub mod network;
pub mod ops;
pub mod recipe;
pub mod remote;
pub mod session;
pub mod ssh;
pub mod sync;
pub mod sys;
pub mod vm;
pub mod workspace;
