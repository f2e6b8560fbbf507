//! The root helper: every privileged effect banger needs, behind a narrow,
//! validated API. It trusts nothing the daemon sends: each name, address and
//! path is checked here, whatever the daemon already checked.

pub mod error;
pub mod firewall;
pub mod net;
pub mod netns;
pub mod podnet;
pub mod service;
pub mod validate;

pub use service::{router, PrivService};
