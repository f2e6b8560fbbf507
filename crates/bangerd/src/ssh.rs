//! SSH into guests with the system OpenSSH client: a managed ed25519 key
//! (made on first use, never deleted by banger) and banger's own
//! known_hosts, where each VM's host key is pinned on first start. The key
//! is read over vsock, a channel only the host can use, so the pin is
//! trustworthy; a later change fails in ssh as a possible MITM.

use crate::error::SysError;
use crate::sync::Locked;
use crate::sys;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct SshService {
    dir: PathBuf,
    /// Serialises known_hosts rewrites.
    lock: Mutex<()>,
}

impl SshService {
    pub fn new(dir: PathBuf) -> Self {
        SshService {
            dir,
            lock: Mutex::new(()),
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// The public key, generating the pair on first use.
    pub async fn public_key(&self) -> Result<String, SysError> {
        let key = self.key_path();
        if !key.exists() {
            banger_config::ensure_private_dir(&self.dir, 0o700)
                .map_err(sys::io("creating the ssh directory"))?;
            keygen(&key, "banger").await?;
        }
        std::fs::read_to_string(key.with_extension("pub"))
            .map(|s| s.trim().to_string())
            .map_err(sys::io("reading the public key"))
    }

    /// A new Ed25519 host key pair for a guest: (private key file text,
    /// public key line). Made here, natively, in milliseconds: the same in a
    /// guest just restored under emulation takes most of a second.
    pub async fn new_host_key(&self) -> Result<(String, String), SysError> {
        banger_config::ensure_private_dir(&self.dir, 0o700).map_err(sys::io("creating the ssh directory"))?;
        let tmp = self.dir.join(format!(
            "host-key-{}-{:08x}",
            std::process::id(),
            crate::kernel::rand_u32()
        ));
        let made = keygen(&tmp, "").await;
        let read =
            |p: &std::path::Path| std::fs::read_to_string(p).map_err(sys::io("reading a new host key"));
        let pair = made.and_then(|_| Ok((read(&tmp)?, read(&tmp.with_extension("pub"))?.trim().to_string())));
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(tmp.with_extension("pub"));
        pair
    }

    /// Pins `host_key` ("ssh-ed25519 AAAA...") for the VM's names unless a
    /// pin exists: first use wins.
    pub fn pin(&self, name: &str, ip: Option<&str>, host_key: &str) -> Result<(), SysError> {
        let _g = self.lock.locked();
        let path = self.known_hosts();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let alias = format!("{name}.vm");
        if text.lines().any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|h| h.split(',').any(|x| x == alias))
        }) {
            return Ok(());
        }
        let hosts = match ip {
            Some(ip) => format!("{alias},{ip}"),
            None => alias,
        };
        let mut out = text;
        out.push_str(&format!("{hosts} {host_key}\n"));
        write_atomic(&path, &out)
    }

    /// Moves the VM's pins from `old` to `new` (a warm-pool VM given to its
    /// taker keeps its host key); false when `old` had none.
    pub fn rename(&self, old: &str, new: &str) -> Result<bool, SysError> {
        let _g = self.lock.locked();
        let path = self.known_hosts();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(false);
        };
        let (old, new) = (format!("{old}.vm"), format!("{new}.vm"));
        let mut moved = false;
        let out: String = text
            .lines()
            .map(|l| {
                let (hosts, rest) = l.split_once(' ').unwrap_or((l, ""));
                if hosts.split(',').any(|h| h == old) {
                    moved = true;
                    let hosts: Vec<&str> = hosts
                        .split(',')
                        .map(|h| if h == old { new.as_str() } else { h })
                        .collect();
                    format!("{} {rest}\n", hosts.join(","))
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        if moved {
            write_atomic(&path, &out)?;
        }
        Ok(moved)
    }

    /// Removes every pin of the VM (by name and by address).
    pub fn forget(&self, name: &str, ip: Option<&str>) -> Result<(), SysError> {
        let _g = self.lock.locked();
        let path = self.known_hosts();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let alias = format!("{name}.vm");
        let kept: String = text
            .lines()
            .filter(|l| {
                let hosts = l.split_whitespace().next().unwrap_or_default();
                !hosts.split(',').any(|h| h == alias || Some(h) == ip)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, &kept)
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<(), SysError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(sys::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(sys::io(format!("writing {}", path.display())))
}

/// A new Ed25519 key pair without passphrase at `path` (and `path.pub`).
async fn keygen(path: &std::path::Path, comment: &str) -> Result<(), SysError> {
    sys::run(
        "ssh-keygen",
        [
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            path.to_str().unwrap(),
        ],
        None,
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pin_wins_and_forget_removes_name_and_address() {
        let dir = std::env::temp_dir().join(format!("banger-ssh-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = SshService::new(dir.clone());
        s.pin("dev", Some("172.30.0.2"), "ssh-ed25519 AAAAfirst").unwrap();
        s.pin("dev", Some("172.30.0.2"), "ssh-ed25519 AAAAsecond")
            .unwrap();
        s.pin("other", Some("172.30.0.3"), "ssh-ed25519 AAAAother")
            .unwrap();
        let text = std::fs::read_to_string(s.known_hosts()).unwrap();
        assert!(
            text.contains("AAAAfirst") && !text.contains("AAAAsecond"),
            "{text}"
        );
        s.forget("dev", Some("172.30.0.2")).unwrap();
        let text = std::fs::read_to_string(s.known_hosts()).unwrap();
        assert!(!text.contains("dev.vm") && text.contains("other.vm"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rename_moves_the_pin_and_keeps_the_key() {
        let dir = std::env::temp_dir().join(format!("banger-ssh-rename-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = SshService::new(dir.clone());
        s.pin("pool-1", Some("172.30.0.9"), "ssh-ed25519 AAAApool")
            .unwrap();
        s.pin("poolside", Some("172.30.0.8"), "ssh-ed25519 AAAAside")
            .unwrap();
        assert!(s.rename("pool-1", "w1").unwrap());
        assert!(!s.rename("pool-1", "w2").unwrap());
        let text = std::fs::read_to_string(s.known_hosts()).unwrap();
        assert!(text.contains("w1.vm,172.30.0.9 ssh-ed25519 AAAApool"), "{text}");
        assert!(
            !text.contains("pool-1.vm") && text.contains("poolside.vm"),
            "{text}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
