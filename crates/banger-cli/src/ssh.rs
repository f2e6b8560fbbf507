//! `banger vm ssh`, the ProxyCommand behind `ssh NAME.vm`, and the
//! `Include` block that `banger ssh-config` manages in the user's
//! ~/.ssh/config. The system OpenSSH client does the work, so the user's
//! own settings and habits apply.

use crate::args::check_name;
use crate::client_ops::{guest_ip, ssh_command};
use anyhow::{anyhow, Context, Result};
use banger_proto::methods::daemon as d;
use banger_proto::methods::Empty;
use banger_proto::Client;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

const BEGIN: &str = "# >>> banger (managed by `banger ssh-config`) >>>";
const END: &str = "# <<< banger <<<";

/// `banger vm ssh NAME [-- CMD]`: replaces this process with ssh.
pub async fn ssh(c: &Client, name: &str, cmd: &[String]) -> Result<i32> {
    check_name(name)?;
    let err = ssh_command(c, name, cmd, false).await?.exec();
    Err(anyhow!("running ssh: {err}"))
}

/// Resolves `name.vm` through banger's DNS server.
async fn resolve(dns: &str, host: &str) -> Result<Ipv4Addr> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut q = Message::query();
    q.metadata.recursion_desired = false;
    q.queries
        .push(Query::query(Name::from_ascii(format!("{host}."))?, RecordType::A));
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    sock.send_to(&q.to_vec()?, dns)
        .await
        .with_context(|| format!("querying {dns}"))?;
    let mut buf = vec![0u8; 1500];
    let n = tokio::time::timeout(std::time::Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .map_err(|_| anyhow!("no answer from banger's DNS server at {dns}"))??;
    let resp = Message::from_vec(&buf[..n])?;
    resp.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .ok_or_else(|| anyhow!("{host} does not resolve: is the VM running?"))
}

/// The ProxyCommand: resolve `host` through banger's DNS server, then
/// carry the SSH stream over TCP between stdin/stdout and the guest.
pub async fn proxy(c: &Client, host: &str, port: u16) -> Result<i32> {
    let name = host.strip_suffix(".vm").unwrap_or(host);
    check_name(name)?;
    let info = c.call::<d::Ping>(&Empty {}, None).await?;
    let ip = match &info.dns {
        Some(dns) => resolve(dns, &format!("{name}.vm")).await?,
        None => guest_ip(c, name).await?,
    };
    let stream = tokio::net::TcpStream::connect((ip, port))
        .await
        .with_context(|| format!("connecting to {ip}:{port}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let up = async {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut wr).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut rd, &mut stdout).await;
    };
    // The session is over when the guest closes its side.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
    }
    Ok(0)
}

fn default_user_config() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set; pass --file"))?;
    Ok(PathBuf::from(home).join(".ssh/config"))
}

fn strip_block(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in text.lines() {
        if l == BEGIN {
            inside = true;
        } else if l == END && inside {
            inside = false;
        } else if !inside {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The user's ssh config, or "" when there is none yet. Any other failure
/// to read it stops the command: a config banger could not read is never
/// rewritten (that would replace it with banger's block alone).
fn read_config(file: &Path) -> Result<String> {
    match std::fs::read(file) {
        Ok(b) => {
            String::from_utf8(b).map_err(|_| anyhow!("{} is not UTF-8 text; not touching it", file.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(anyhow!("cannot read {}: {e}; not touching it", file.display())),
    }
}

/// Replaces the config atomically (a crash leaves the old or the new file,
/// never a truncated one), keeping it private.
fn replace_config(file: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = file.with_extension("banger-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

/// Writes banger's `Host *.vm` config and includes it from `file`.
pub async fn install(c: &Client, file: Option<PathBuf>, state_dir: &Path) -> Result<i32> {
    let info = c.call::<d::SshInfoM>(&Empty {}, None).await?;
    let exe = std::env::current_exe()?;
    // A daemon found through overridden paths must be found again by the
    // ProxyCommand, whatever environment ssh runs it in.
    let mut env_prefix = String::new();
    for var in ["BANGER_HOME", "BANGER_RUNTIME_DIR"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() && !v.contains(char::is_whitespace) {
                env_prefix.push_str(&format!("{var}={v} "));
            }
        }
    }
    if !env_prefix.is_empty() {
        env_prefix.insert_str(0, "env ");
    }
    let ours = state_dir.join("ssh/config");
    std::fs::create_dir_all(ours.parent().unwrap())?;
    std::fs::write(
        &ours,
        format!(
            "# Written by banger; `banger ssh-config --uninstall` removes the Include.\n\
             Host *.vm\n  User {}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n  ProxyCommand {env_prefix}{} vm ssh-proxy %h %p\n",
            info.user,
            info.key,
            info.known_hosts,
            exe.display()
        ),
    )?;
    let file = match file {
        Some(f) => f,
        None => default_user_config()?,
    };
    if let Some(dir) = file.parent() {
        if !dir.exists() {
            banger_config::ensure_private_dir(dir, 0o700)?;
        }
    }
    let text = read_config(&file)?;
    // At the top: an Include inside a Host block would only apply there.
    let new = format!(
        "{BEGIN}\nInclude {}\n{END}\n{}",
        ours.display(),
        strip_block(&text)
    );
    replace_config(&file, &new)?;
    println!(
        "`ssh NAME.vm` now works: {} includes {}",
        file.display(),
        ours.display()
    );
    Ok(0)
}

pub fn uninstall(file: Option<PathBuf>) -> Result<i32> {
    let file = match file {
        Some(f) => f,
        None => default_user_config()?,
    };
    let text = read_config(&file)?;
    replace_config(&file, &strip_block(&text))?;
    println!("removed banger's block from {}", file.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_config_is_never_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, b"Host a\n  User \xff\n").unwrap();
        assert!(uninstall(Some(file.clone())).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"Host a\n  User \xff\n");
        // A directory where the file should be: refused, left alone.
        let d = dir.path().join("cfgdir");
        std::fs::create_dir(&d).unwrap();
        assert!(uninstall(Some(d.clone())).is_err());
        assert!(d.is_dir());
        // No config yet: created.
        let fresh = dir.path().join("fresh");
        uninstall(Some(fresh.clone())).unwrap();
        assert!(fresh.exists());
    }

    #[test]
    fn the_block_is_removed_and_the_rest_kept() {
        let text = format!("{BEGIN}\nInclude /x\n{END}\nHost a\n  User me\n");
        assert_eq!(strip_block(&text), "Host a\n  User me\n");
        assert_eq!(strip_block("Host a\n"), "Host a\n");
    }
}
