//! Every RPC as a type: its wire name, its params and its output.
//!
//! Adding a method means adding a line here; the server's router and the
//! client are generic over [`Method`], so neither side handles raw JSON.

use serde::{de::DeserializeOwned, Serialize};

pub mod agent;
pub mod daemon;
pub mod helper;

/// One RPC method.
pub trait Method {
    /// The wire name, e.g. `"vm.create.begin"`.
    const NAME: &'static str;
    type Params: Serialize + DeserializeOwned + Send + Sync + 'static;
    type Output: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the call may stream before its result (`()` when nothing).
    type Event: Serialize + DeserializeOwned + Send + Sync + 'static;
}

/// Params or output of a method that has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Empty {}

macro_rules! method {
    ($(#[$doc:meta])* $ty:ident = $name:literal, $params:ty => $out:ty $(, event $ev:ty)?) => {
        $(#[$doc])*
        pub struct $ty;
        impl $crate::methods::Method for $ty {
            const NAME: &'static str = $name;
            type Params = $params;
            type Output = $out;
            type Event = method!(@event $($ev)?);
        }
    };
    (@event) => { () };
    (@event $ev:ty) => { $ev };
}
pub(crate) use method;
