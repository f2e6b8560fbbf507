//! The record `banger system install` leaves beside the binaries it
//! installs. A CLI that finds it uses the installed services (their
//! sockets and state directory) and never starts a daemon of its own.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file's name, in the installed private binary directory
/// (`<prefix>/lib/banger`).
pub const MANIFEST_NAME: &str = "install.toml";

/// Name of the root helper's systemd unit.
pub const HELPER_UNIT: &str = "banger-helper.service";
/// Name of the daemon's systemd unit.
pub const DAEMON_UNIT: &str = "bangerd.service";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallManifest {
    /// The banger version that wrote it.
    pub version: String,
    /// The one user whose daemon this is.
    pub owner: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub prefix: PathBuf,
    /// Private binaries: bangerd, banger-helper, banger-agent and the
    /// helpers the daemon runs (banger-vsock-bridge).
    pub libexec_dir: PathBuf,
    /// The daemon's state: database, images, kernels, VMs, logs.
    pub state_dir: PathBuf,
    /// The daemon's socket directory (mode 0700, the owner's).
    pub runtime_dir: PathBuf,
    pub helper_socket: PathBuf,
    /// Where the systemd units were written.
    pub unit_dir: PathBuf,
}

impl InstallManifest {
    /// `<libexec_dir>/install.toml`.
    pub fn path(&self) -> PathBuf {
        self.libexec_dir.join(MANIFEST_NAME)
    }

    /// The manifest of the installation `exe` belongs to, if it is an
    /// installed binary: `<prefix>/bin/banger` reads
    /// `<prefix>/lib/banger/install.toml`; binaries in the private
    /// directory read the one beside them.
    pub fn for_exe(exe: &Path) -> Option<(PathBuf, InstallManifest)> {
        let dir = exe.parent()?;
        [
            dir.join(MANIFEST_NAME),
            dir.join("../lib/banger").join(MANIFEST_NAME),
        ]
        .into_iter()
        .find_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let m = toml::from_str(&text).ok()?;
            Some((p, m))
        })
    }

    /// The manifest of the running executable's installation.
    pub fn current() -> Option<InstallManifest> {
        let exe = std::env::current_exe().ok()?;
        Self::for_exe(&exe).map(|(_, m)| m)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_installed_cli_and_daemon_find_the_same_manifest() {
        let d = tempfile::tempdir().unwrap();
        let lib = d.path().join("lib/banger");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        let m = InstallManifest {
            version: "0".into(),
            owner: "alice".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            prefix: d.path().into(),
            libexec_dir: lib.clone(),
            state_dir: "/var/lib/banger".into(),
            runtime_dir: "/run/banger".into(),
            helper_socket: "/run/banger-helper/helper.sock".into(),
            unit_dir: "/etc/systemd/system".into(),
        };
        std::fs::write(m.path(), m.to_toml()).unwrap();
        let from_cli = InstallManifest::for_exe(&d.path().join("bin/banger")).unwrap().1;
        let from_daemon = InstallManifest::for_exe(&lib.join("bangerd")).unwrap().1;
        assert_eq!(from_cli, m);
        assert_eq!(from_daemon, m);
        // A build tree has none.
        assert!(InstallManifest::for_exe(&d.path().join("elsewhere/banger")).is_none());
    }
}
