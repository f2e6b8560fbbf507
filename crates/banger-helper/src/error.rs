//! The error of every privileged network effect. It sits below `net` (the
//! `NetOps` trait and its Linux implementation) and `firewall` (the
//! nftables rules `net` calls into), so that both use it.

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("{what}: {source}")]
    Os { what: String, source: std::io::Error },
    #[error("no link named {0:?}")]
    NoLink(String),
}
