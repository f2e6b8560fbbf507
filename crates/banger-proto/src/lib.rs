//! The wire protocol shared by every banger process.
//!
//! This is the only crate that knows JSON shapes. Everything else talks in
//! typed [`Method`] params and outputs: the daemon's services and the helper's
//! privileged operations never see a `serde_json::Value`.
//!
//! One request per connection: the client writes a single [`Request`] frame,
//! the server answers with zero or more [`Frame::Event`] frames followed by
//! exactly one [`Frame::Result`] or [`Frame::Error`].

pub mod client;
pub mod error;
pub mod fdpass;
pub mod frame;
pub mod methods;
pub mod names;
pub mod opid;
pub mod server;
pub mod stream;

pub use client::{Client, ClientError};
pub use error::{ErrorCode, RpcError};
pub use frame::{Frame, Request, MAX_FRAME_BYTES, PROTOCOL_VERSION};
pub use methods::Method;
pub use opid::OpId;
pub use server::{Ctx, Router};
