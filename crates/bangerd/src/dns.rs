//! A small authoritative DNS server for `<name>.vm`, answering from the
//! daemon's own view of which VMs run (so it is always current, and right
//! again as soon as reconcile has run after a restart).

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// The zone banger answers for.
pub const ZONE: &str = "vm";
const TTL: u32 = 5;

/// Looks a VM name up: `Some(ip)` when it runs and has an address.
pub type Lookup = Arc<dyn Fn(&str) -> Option<Ipv4Addr> + Send + Sync>;

/// Builds the answer to one query packet; `None` for packets that are not
/// a parseable query (they get no answer, as a resolver would expect).
pub fn answer(packet: &[u8], lookup: &Lookup) -> Option<Vec<u8>> {
    let req = Message::from_vec(packet).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.queries = req.queries.clone();
    let mut code = ResponseCode::NoError;
    for q in &req.queries {
        let name = q.name().to_ascii().to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        let Some(vm) = name.strip_suffix(&format!(".{ZONE}")) else {
            code = ResponseCode::Refused;
            continue;
        };
        match lookup(vm) {
            Some(ip) => {
                if q.query_type() == RecordType::A || q.query_type() == RecordType::ANY {
                    resp.answers
                        .push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
                }
            }
            None => code = ResponseCode::NXDomain,
        }
    }
    resp.metadata.response_code = code;
    resp.to_vec().ok()
}

/// Binds `addr`; returns the socket and the address it really got.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let sock = UdpSocket::bind(addr).await?;
    let local = sock.local_addr()?;
    tracing::info!(addr = %local, "DNS for .{ZONE} listening");
    Ok((sock, local))
}

/// Serves queries on `sock` until `stop`.
pub async fn serve(sock: UdpSocket, lookup: Lookup, stop: CancellationToken) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1500];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = sock.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "dns recv");
                        continue;
                    }
                };
                if let Some(out) = answer(&buf[..n], &lookup) {
                    let _ = sock.send_to(&out, peer).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn ask(name: &str, lookup: &Lookup) -> Message {
        let mut m = Message::query();
        m.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        Message::from_vec(&answer(&m.to_vec().unwrap(), lookup).unwrap()).unwrap()
    }

    #[test]
    fn answers_running_vms_only() {
        let lookup: Lookup = Arc::new(|n: &str| (n == "dev").then(|| Ipv4Addr::new(172, 30, 0, 2)));
        let r = ask("dev.vm.", &lookup);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(172, 30, 0, 2))));
        assert_eq!(
            ask("DEV.VM.", &lookup).answers.len(),
            1,
            "names are case-insensitive"
        );
        assert_eq!(
            ask("gone.vm.", &lookup).metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask("example.com.", &lookup).metadata.response_code,
            ResponseCode::Refused
        );
        assert!(answer(b"garbage", &lookup).is_none());
    }
}
