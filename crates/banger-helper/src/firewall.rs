//! banger's nftables rules: every guest confined to its own tap, VM-to-VM
//! traffic off unless both guests ask for it, nothing on the host reachable
//! from a guest but DNS on the bridge address, and outbound NAT only for
//! the guests that asked for it.
//!
//! Two tables, both named `banger`:
//!
//! - `bridge banger` sees frames on banger's bridges. Its `prerouting` base
//!   chain sends every frame that enters through a tap (`bgt*`) to `guests`,
//!   where each VM has two rules: ARP whose sender hardware and protocol
//!   addresses are its own, and IPv4 whose source MAC and address are its
//!   own. Whatever they do not accept (another source, IPv6, VLAN tags,
//!   any other ether type, and every frame of a tap without rules) is
//!   dropped. `forward` (port to port: guest to guest) is dropped unless
//!   both taps have a rule in `peers` and `peer_to`.
//! - `inet banger` sees the packets the host routes or receives. `input`
//!   drops everything that comes in on a banger bridge except replies to
//!   the host's own connections, DNS (udp/tcp 53) and ping to the bridge's
//!   own address. `forward` drops everything to or from a banger bridge
//!   except the NAT guests' traffic, accepted from `guest_fwd`;
//!   `postrouting` masquerades it. With `br_netfilter` (built into some
//!   kernels, loaded by Docker), frames bridged from guest to guest pass
//!   the inet hooks too, with the bridge as both input and output
//!   interface, just like a packet a guest routes through the host to
//!   another guest. The bridge family's `forward` chain, which runs first,
//!   marks the peer traffic it accepted, and inet `forward` lets only
//!   marked bridge-to-bridge traffic by; routing through the host to
//!   another guest is dropped.
//!
//! Why the bridge family and not netdev ingress chains per tap: a netdev
//! base chain is bound to one device, so it can only be made once the tap
//! exists and disappears (or, on older kernels, lingers unbound) when the
//! tap does, and a tap recreated under the same name comes back
//! unfiltered. The bridge family hooks once for every port: rules match the
//! tap by name, the catch-all drop makes a tap without rules fail closed,
//! and rules are found and removed by their comment like any other.
//! `prerouting` runs before the bridge learns the frame's source MAC, so a
//! spoofed frame cannot poison its forwarding table, and the bridge's own
//! `forward` hook is where guest-to-guest traffic can be told apart.
//!
//! Why packet marks: once a frame is passed up from the bridge, the IP
//! layer sees the bridge, not the tap, as its input interface. A mark bit,
//! set by a NAT guest's own tap rule, is what carries "came in on this
//! tap" to the inet `forward` and `postrouting` hooks, so NAT is decided
//! by the tap and not by a source address alone. Another bit carries
//! "bridged between peers" (see `forward` above). Each rule sets or tests
//! its one bit and leaves the rest of the mark to whoever else uses it.
//!
//! Every per-VM rule carries the comment `banger:<vm> tap=.. mac=.. ip=..
//! nat=.. peers=..`: a VM's rules are found and removed by the tag alone,
//! even after a crash, and the helper knows which tap, MAC and address each
//! VM holds without any state of its own.

use crate::error::NetError;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

pub const TABLE: &str = "banger";
/// The packet mark bit a NAT guest's tap rule sets, and the only thing the
/// inet rules accept NAT traffic by (with its source address).
pub const NAT_MARK: u32 = 0x1000_0000;
/// The bit the bridge's peer rule sets on guest-to-guest frames it let
/// through, for the inet `forward` hook (`br_netfilter`).
pub const PEER_MARK: u32 = 0x2000_0000;
/// Every tap banger manages starts with this; every bridge with `banger`.
const TAPS: &str = "bgt*";
const BRIDGES: &str = "banger*";
/// Base chains rebuilt (flushed and refilled) in every transaction; per-VM
/// rules never live in them.
const BASE_CHAINS: [(&str, &str); 4] = [
    ("bridge", "prerouting"),
    ("bridge", "forward"),
    ("inet", "input"),
    ("inet", "forward"),
];

/// One guest's rules, from values the service has validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub vm: String,
    pub tap: String,
    pub bridge: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub nat: bool,
    pub peers: bool,
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Guest {
    /// The comment on each of this guest's rules: its tag, and what it
    /// holds.
    pub fn comment(&self) -> String {
        format!(
            "banger:{} tap={} mac={} ip={} nat={} peers={}",
            self.vm,
            self.tap,
            mac_string(&self.mac),
            self.ip,
            u8::from(self.nat),
            u8::from(self.peers)
        )
    }

    /// The rules as (family, chain, rule), without the comment.
    pub fn rules(&self) -> Vec<(&'static str, &'static str, String)> {
        let (tap, bridge, ip) = (&self.tap, &self.bridge, self.ip);
        let mac = mac_string(&self.mac);
        let mark = if self.nat {
            format!("meta mark set meta mark | {NAT_MARK:#010x} ")
        } else {
            String::new()
        };
        let mut r = vec![
            (
                "bridge",
                "guests",
                format!(
                    "iifname \"{tap}\" ether saddr {mac} arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
                     arp saddr ether {mac} arp saddr ip {ip} accept"
                ),
            ),
            (
                "bridge",
                "guests",
                format!("iifname \"{tap}\" ether saddr {mac} ip saddr {ip} {mark}accept"),
            ),
        ];
        if self.peers {
            r.push(("bridge", "peers", format!("iifname \"{tap}\" jump peer_to")));
            r.push((
                "bridge",
                "peer_to",
                format!("oifname \"{tap}\" meta mark set meta mark | {PEER_MARK:#010x} accept"),
            ));
        }
        if self.nat {
            let marked = format!("meta mark & {NAT_MARK:#010x} == {NAT_MARK:#010x}");
            r.push((
                "inet",
                "guest_fwd",
                format!("iifname \"{bridge}\" oifname != \"{BRIDGES}\" {marked} ip saddr {ip} accept"),
            ));
            r.push((
                "inet",
                "guest_fwd",
                format!("oifname \"{bridge}\" ip daddr {ip} ct state established,related accept"),
            ));
            r.push((
                "inet",
                "postrouting",
                format!("oifname != \"{BRIDGES}\" {marked} ip saddr {ip} masquerade"),
            ));
        }
        r
    }
}

/// The tables, chains and the rules that hold for every guest. Safe to
/// repeat: the base chains are flushed and refilled within the same
/// transaction, so no packet ever sees them empty.
pub fn base_script() -> String {
    format!(
        "add table bridge {TABLE}\n\
         add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority -200 ; policy accept ; }}\n\
         add chain bridge {TABLE} forward {{ type filter hook forward priority -200 ; policy accept ; }}\n\
         add chain bridge {TABLE} guests\n\
         add chain bridge {TABLE} peers\n\
         add chain bridge {TABLE} peer_to\n\
         flush chain bridge {TABLE} prerouting\n\
         flush chain bridge {TABLE} forward\n\
         add rule bridge {TABLE} prerouting iifname \"{TAPS}\" jump guests\n\
         add rule bridge {TABLE} prerouting iifname \"{TAPS}\" drop\n\
         add rule bridge {TABLE} forward iifname \"{TAPS}\" oifname \"{TAPS}\" jump peers\n\
         add rule bridge {TABLE} forward iifname \"{TAPS}\" oifname \"{TAPS}\" drop\n\
         add table inet {TABLE}\n\
         add chain inet {TABLE} input {{ type filter hook input priority 0 ; policy accept ; }}\n\
         add chain inet {TABLE} forward {{ type filter hook forward priority 0 ; policy accept ; }}\n\
         add chain inet {TABLE} postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain inet {TABLE} guest_fwd\n\
         flush chain inet {TABLE} input\n\
         flush chain inet {TABLE} forward\n\
         add rule inet {TABLE} input iifname \"{BRIDGES}\" ct state established,related accept\n\
         add rule inet {TABLE} input iifname \"{BRIDGES}\" icmp type echo-request fib daddr . iif type local accept\n\
         add rule inet {TABLE} input iifname \"{BRIDGES}\" meta l4proto {{ tcp, udp }} th dport 53 fib daddr . iif type local accept\n\
         add rule inet {TABLE} input iifname \"{BRIDGES}\" drop\n\
         add rule inet {TABLE} forward iifname \"{BRIDGES}\" oifname \"{BRIDGES}\" meta mark & {PEER_MARK:#010x} == {PEER_MARK:#010x} accept\n\
         add rule inet {TABLE} forward iifname \"{BRIDGES}\" jump guest_fwd\n\
         add rule inet {TABLE} forward oifname \"{BRIDGES}\" jump guest_fwd\n\
         add rule inet {TABLE} forward iifname \"{BRIDGES}\" drop\n\
         add rule inet {TABLE} forward oifname \"{BRIDGES}\" drop\n"
    )
}

async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().map_err(|source| NetError::Os {
        what: "running nft".into(),
        source,
    })?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .await
            .map_err(|source| NetError::Os {
                what: "feeding nft".into(),
                source,
            })?;
    }
    let out = child.wait_with_output().await.map_err(|source| NetError::Os {
        what: "waiting for nft".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::Os {
            what: format!("nft {}", args.join(" ")),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One of banger's tagged rules.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tagged {
    family: String,
    chain: String,
    handle: u64,
    comment: String,
}

impl Tagged {
    fn tag(&self) -> &str {
        tag_of(&self.comment).unwrap_or_default()
    }
}

fn tag_of(comment: &str) -> Option<&str> {
    comment.strip_prefix("banger:")?.split(' ').next()
}

/// What a VM's rules hold, read back from their comments. Rules written
/// before the comment named them have only the tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    pub vm: String,
    pub tap: Option<String>,
    pub mac: Option<String>,
    pub ip: Option<String>,
}

pub fn claim_of(comment: &str) -> Option<Claim> {
    let vm = tag_of(comment)?.to_string();
    let mut c = Claim {
        vm,
        ..Default::default()
    };
    for field in comment.split(' ').skip(1) {
        match field.split_once('=') {
            Some(("tap", v)) => c.tap = Some(v.to_string()),
            Some(("mac", v)) => c.mac = Some(v.to_string()),
            Some(("ip", v)) => c.ip = Some(v.to_string()),
            _ => {}
        }
    }
    Some(c)
}

/// Every tagged rule of banger's tables.
async fn rules() -> Result<Vec<Tagged>, NetError> {
    let mut out = Vec::new();
    for family in ["bridge", "inet"] {
        let text = match nft(&["-j", "list", "table", family, TABLE], None).await {
            Ok(t) => t,
            // No table yet: no rules.
            Err(NetError::Os { source, .. })
                if source.kind() == std::io::ErrorKind::Other
                    && source.to_string().contains("No such file or directory") =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| NetError::Os {
            what: "parsing nft output".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for item in v["nftables"].as_array().into_iter().flatten() {
            let r = &item["rule"];
            if let (Some(chain), Some(handle), Some(comment)) =
                (r["chain"].as_str(), r["handle"].as_u64(), r["comment"].as_str())
            {
                if tag_of(comment).is_some() {
                    out.push(Tagged {
                        family: family.to_string(),
                        chain: chain.to_string(),
                        handle,
                        comment: comment.to_string(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Deletes `stale` in the script, except rules of the base chains, which
/// the script flushes anyway (deleting a flushed rule would fail it).
fn delete_lines(script: &mut String, stale: &[Tagged]) {
    for r in stale {
        if !BASE_CHAINS.contains(&(r.family.as_str(), r.chain.as_str())) {
            let _ = writeln!(
                script,
                "delete rule {} {TABLE} {} handle {}",
                r.family, r.chain, r.handle
            );
        }
    }
}

/// Installs one guest's rules, replacing whatever rules its tag had, in
/// one transaction. False when exactly these rules were there already.
pub async fn allow(g: &Guest) -> Result<bool, NetError> {
    let comment = g.comment();
    let wanted = g.rules();
    let mine: Vec<Tagged> = rules().await?.into_iter().filter(|r| r.tag() == g.vm).collect();
    if mine.len() == wanted.len() && mine.iter().all(|r| r.comment == comment) {
        return Ok(false);
    }
    if g.nat {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| NetError::Os {
            what: "enabling IPv4 forwarding".into(),
            source,
        })?;
    }
    // Every value was validated by the service (names of [a-z0-9-], a MAC,
    // an IPv4 address, a hex tag); nft reads the script from stdin and no
    // shell is involved.
    let mut script = base_script();
    delete_lines(&mut script, &mine);
    for (family, chain, rule) in wanted {
        let _ = writeln!(
            script,
            "add rule {family} {TABLE} {chain} {rule} comment \"{comment}\""
        );
    }
    nft(&["-f", "-"], Some(&script)).await?;
    Ok(true)
}

/// Removes every rule tagged for `vm`, in one transaction; true if there
/// were any.
pub async fn revoke(vm: &str) -> Result<bool, NetError> {
    let mine: Vec<Tagged> = rules().await?.into_iter().filter(|r| r.tag() == vm).collect();
    if mine.is_empty() {
        return Ok(false);
    }
    let mut script = String::new();
    delete_lines(&mut script, &mine);
    if !script.is_empty() {
        nft(&["-f", "-"], Some(&script)).await?;
    }
    // Rules of an older layout in a base chain go with a rebuild of the
    // base chains.
    if mine
        .iter()
        .any(|r| BASE_CHAINS.contains(&(r.family.as_str(), r.chain.as_str())))
    {
        nft(&["-f", "-"], Some(&base_script())).await?;
    }
    Ok(true)
}

/// What each VM with rules holds, one claim per VM.
pub async fn claims() -> Result<Vec<Claim>, NetError> {
    let mut out: Vec<Claim> = Vec::new();
    for r in rules().await? {
        let Some(c) = claim_of(&r.comment) else {
            continue;
        };
        match out.iter_mut().find(|o| o.vm == c.vm) {
            Some(o) => {
                o.tap = o.tap.take().or(c.tap);
                o.mac = o.mac.take().or(c.mac);
                o.ip = o.ip.take().or(c.ip);
            }
            None => out.push(c),
        }
    }
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(nat: bool, peers: bool) -> Guest {
        Guest {
            vm: "0123abcd4567ef89".into(),
            tap: "bgt0123abcd".into(),
            bridge: "banger0".into(),
            mac: [0x52, 0x54, 0, 0x01, 0x23, 0xab],
            ip: Ipv4Addr::new(172, 30, 0, 2),
            nat,
            peers,
        }
    }

    #[test]
    fn a_guest_without_nat_gets_no_mark_and_no_nat() {
        let rules = guest(false, false).rules();
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|(f, c, _)| *f == "bridge" && *c == "guests"));
        assert!(rules.iter().all(|(_, _, r)| !r.contains("mark")), "{rules:?}");
        let ip_rule = &rules[1].2;
        assert!(
            ip_rule.contains("iifname \"bgt0123abcd\"")
                && ip_rule.contains("ether saddr 52:54:00:01:23:ab")
                && ip_rule.contains("ip saddr 172.30.0.2"),
            "{ip_rule}"
        );
        let arp = &rules[0].2;
        assert!(
            arp.contains("arp saddr ether 52:54:00:01:23:ab") && arp.contains("arp saddr ip 172.30.0.2"),
            "{arp}"
        );
    }

    #[test]
    fn nat_is_keyed_on_the_mark_the_tap_sets() {
        let rules = guest(true, false).rules();
        let mark = format!("{NAT_MARK:#010x}");
        assert!(rules[1].2.contains(&format!("meta mark set meta mark | {mark}")));
        let nat: Vec<_> = rules.iter().filter(|(f, _, _)| *f == "inet").collect();
        assert_eq!(nat.len(), 3);
        let masq = nat.iter().find(|(_, c, _)| *c == "postrouting").unwrap();
        assert!(
            masq.2.contains(&format!("meta mark & {mark} == {mark}"))
                && masq.2.contains("ip saddr 172.30.0.2")
        );
        let out = nat.iter().find(|(_, _, r)| r.starts_with("iifname")).unwrap();
        assert!(
            out.2.contains(&format!("meta mark & {mark} == {mark}")),
            "{}",
            out.2
        );
    }

    #[test]
    fn peers_need_a_rule_on_each_side() {
        let rules = guest(false, true).rules();
        assert!(rules.contains(&("bridge", "peers", "iifname \"bgt0123abcd\" jump peer_to".into())));
        assert!(rules.contains(&(
            "bridge",
            "peer_to",
            format!("oifname \"bgt0123abcd\" meta mark set meta mark | {PEER_MARK:#010x} accept")
        )));
    }

    #[test]
    fn comments_carry_the_tag_and_the_claim() {
        let g = guest(true, false);
        let c = g.comment();
        assert!(c.len() <= 127, "nft caps comments at 128 bytes: {c}");
        assert_eq!(tag_of(&c), Some("0123abcd4567ef89"));
        assert_eq!(
            claim_of(&c).unwrap(),
            Claim {
                vm: g.vm.clone(),
                tap: Some(g.tap.clone()),
                mac: Some("52:54:00:01:23:ab".into()),
                ip: Some("172.30.0.2".into()),
            }
        );
        // Rules of the older layout carry the tag alone.
        assert_eq!(claim_of("banger:ab12").unwrap().vm, "ab12");
        assert!(claim_of("someone else's").is_none());
    }

    #[test]
    fn base_chains_end_in_drops_for_banger_ports() {
        let s = base_script();
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} missing"));
        assert!(pos("prerouting iifname \"bgt*\" jump guests") < pos("prerouting iifname \"bgt*\" drop"));
        assert!(pos("input iifname \"banger*\" ct state") < pos("input iifname \"banger*\" drop"));
        assert!(s.contains("flush chain bridge banger prerouting"));
        assert!(
            !s.contains("flush chain inet banger postrouting"),
            "per-VM rules live there"
        );
    }
}
