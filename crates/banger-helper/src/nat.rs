//! Outbound NAT in banger's own nftables table (`inet banger`). Every rule
//! carries the comment `banger:<vm>`, so a VM's rules are found and
//! removed by that tag alone, even after a crash.

use crate::error::NetError;
use std::net::Ipv4Addr;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

pub const TABLE: &str = "banger";

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

/// Rules as (chain, handle, tag) from `nft -j list table`.
async fn rules() -> Result<Vec<(String, u64, String)>, NetError> {
    let text = match nft(&["-j", "list", "table", "inet", TABLE], None).await {
        Ok(t) => t,
        // No table yet: no rules.
        Err(_) => return Ok(vec![]),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| NetError::Os {
        what: "parsing nft output".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let r = &item["rule"];
        if let (Some(chain), Some(handle), Some(comment)) =
            (r["chain"].as_str(), r["handle"].as_u64(), r["comment"].as_str())
        {
            if let Some(tag) = comment.strip_prefix("banger:") {
                out.push((chain.to_string(), handle, tag.to_string()));
            }
        }
    }
    Ok(out)
}

/// Adds the masquerade and forward rules of one guest. Idempotent: the
/// VM's old rules are replaced.
pub async fn add(vm: &str, ip: Ipv4Addr, bridge: &str) -> Result<(), NetError> {
    remove(vm).await?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| NetError::Os {
        what: "enabling IPv4 forwarding".into(),
        source,
    })?;
    // Inputs are validated by the service: an IPv4 address, a banger
    // bridge name, a short hex tag. nft reads the script from stdin; no
    // shell is involved.
    let script = format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add chain inet {TABLE} forward {{ type filter hook forward priority 0 ; }}\n\
         add rule inet {TABLE} postrouting ip saddr {ip} oifname != \"{bridge}\" masquerade comment \"banger:{vm}\"\n\
         add rule inet {TABLE} forward iifname \"{bridge}\" ip saddr {ip} accept comment \"banger:{vm}\"\n\
         add rule inet {TABLE} forward oifname \"{bridge}\" ip daddr {ip} ct state established,related accept comment \"banger:{vm}\"\n"
    );
    nft(&["-f", "-"], Some(&script)).await?;
    Ok(())
}

/// Removes every rule tagged for `vm`; true if there were any.
pub async fn remove(vm: &str) -> Result<bool, NetError> {
    let mine: Vec<_> = rules().await?.into_iter().filter(|(_, _, t)| t == vm).collect();
    for (chain, handle, _) in &mine {
        nft(
            &[
                "delete",
                "rule",
                "inet",
                TABLE,
                chain,
                "handle",
                &handle.to_string(),
            ],
            None,
        )
        .await?;
    }
    Ok(!mine.is_empty())
}

pub async fn list() -> Result<Vec<String>, NetError> {
    let mut tags: Vec<String> = rules().await?.into_iter().map(|(_, _, t)| t).collect();
    tags.sort();
    tags.dedup();
    Ok(tags)
}
