//! Paths and configuration, shared by the CLI (to find and start the daemon)
//! and the daemon.
//!
//! Precedence: environment variable > `config.toml` > built-in default.

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub mod install;
pub mod units;
pub use install::InstallManifest;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The optional `config.toml` in the state directory. Every field defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub log_level: Option<String>,
    pub helper_socket: Option<PathBuf>,
    pub bridge: Option<String>,
    pub bridge_address: Option<String>,
    pub vmm: Option<String>,
    pub firecracker: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub default_vcpus: Option<u32>,
    pub default_memory_mib: Option<u32>,
    pub default_work_disk_mib: Option<u64>,
    pub dns_listen: Option<String>,
    pub console_log_max_kib: Option<u64>,
    pub jailer: Option<PathBuf>,
    pub jailer_uid_base: Option<u32>,
    pub auto_stop_idle: Option<String>,
    pub session_log_max_kib: Option<u64>,
    pub catalog: Option<String>,
    /// `warm_pool = { image = "default", size = 2 }`.
    pub warm_pool: Option<WarmPoolFile>,
    pub snapshot_max_gib: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmPoolFile {
    pub image: Option<String>,
    pub size: Option<u32>,
}

/// VMs the daemon keeps booted and unclaimed, so that a `vm create` or
/// `vm run` whose spec is the pool's takes one instead of booting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPool {
    pub image: String,
    /// 0: no pool.
    pub size: u32,
}

/// The largest pool kept (each member holds a booted VM's memory).
pub const MAX_WARM_POOL: u32 = 16;

#[derive(Debug, Clone)]
pub struct Config {
    /// Durable state: database, images, kernels, VM directories, logs.
    pub state_dir: PathBuf,
    /// Sockets and pid files; mode 0700.
    pub runtime_dir: PathBuf,
    pub helper_socket: PathBuf,
    pub log_level: Option<String>,
    pub bridge: String,
    pub bridge_address: String,
    pub vmm: String,
    pub firecracker: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub default_work_disk_mib: u64,
    /// UDP address of the `.vm` DNS server; empty disables it.
    pub dns_listen: String,
    /// Disk a VM's console log may use (KiB); older output is dropped.
    pub console_log_max_kib: u64,
    /// Firecracker's jailer: when set, every Firecracker VM runs under it.
    pub jailer: Option<PathBuf>,
    /// A jailed VM runs as uid and gid `jailer_uid_base + its vsock CID`.
    pub jailer_uid_base: u32,
    /// Stop a VM idle this long (no exec, copy or workspace call, no CPU
    /// use); 0: never. A VM's own setting wins.
    pub auto_stop_idle_secs: u64,
    /// Output a guest session keeps (KiB) unless its start says otherwise.
    pub session_log_max_kib: u64,
    /// The system installation this binary belongs to (`banger system
    /// install`), unless `BANGER_HOME` asks for a private setup: its
    /// services are used and no daemon or helper is ever started.
    pub installed: Option<InstallManifest>,
    /// Where `image pull NAME` / `kernel pull NAME` look NAME up: a
    /// catalog file (absolute path) or an https URL.
    pub catalog: Option<String>,
    pub warm_pool: WarmPool,
    /// Disk all snapshots together may use; past it the least recently
    /// used are removed (never the one just taken). 0: no limit.
    pub snapshot_max_gib: u64,
}

/// The longest idle limit accepted (30 days).
pub const MAX_IDLE_SECS: u64 = 30 * 24 * 3600;

/// A duration as people write it: `90s`, `30m`, `2h`, `1d`, or seconds;
/// `0` (or `off`) is none.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s == "off" {
        return Ok(0);
    }
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 2h)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?} is not a duration (e.g. 90s, 30m, 2h)")),
    };
    match n.checked_mul(mult) {
        Some(v) if v <= MAX_IDLE_SECS => Ok(v),
        _ => Err(format!("{s:?} is longer than 30 days")),
    }
}

pub use banger_proto::names::DEFAULT_HELPER_SOCKET;

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

fn default_state_dir() -> PathBuf {
    if let Some(p) = env_path("XDG_DATA_HOME") {
        return p.join("banger");
    }
    match env_path("HOME") {
        Some(h) => h.join(".local/share/banger"),
        None => PathBuf::from(format!("/var/lib/banger-{}", uid())),
    }
}

fn default_runtime_dir() -> PathBuf {
    if let Some(p) = env_path("XDG_RUNTIME_DIR") {
        return p.join("banger");
    }
    if uid() == 0 {
        return PathBuf::from("/run/banger");
    }
    PathBuf::from(format!("/tmp/banger-{}", uid()))
}

impl Config {
    /// Loads from the environment and `<state_dir>/config.toml`.
    pub fn load() -> Result<Self, ConfigError> {
        let installed = match env_path("BANGER_HOME") {
            Some(_) => None,
            None => InstallManifest::current(),
        };
        let state_dir = env_path("BANGER_HOME")
            .or_else(|| installed.as_ref().map(|m| m.state_dir.clone()))
            .unwrap_or_else(default_state_dir);
        let file = state_dir.join("config.toml");
        let fc = match std::fs::read_to_string(&file) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: file.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileConfig::default(),
            // Another user of an installation cannot read its owner's
            // state; the daemon's socket refuses them with the reason.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && installed.is_some() => {
                FileConfig::default()
            }
            Err(source) => return Err(ConfigError::Read { path: file, source }),
        };
        let mut cfg = Self::from_parts(state_dir, fc)?;
        if let Some(m) = &installed {
            if env_path("BANGER_RUNTIME_DIR").is_none() {
                cfg.runtime_dir = m.runtime_dir.clone();
            }
            if env_path("BANGER_HELPER_SOCKET").is_none() {
                cfg.helper_socket = m.helper_socket.clone();
            }
        }
        cfg.installed = installed;
        Ok(cfg)
    }

    pub fn from_parts(state_dir: PathBuf, fc: FileConfig) -> Result<Self, ConfigError> {
        let vmm = std::env::var("BANGER_VMM")
            .ok()
            .filter(|s| !s.is_empty())
            .or(fc.vmm)
            .unwrap_or_else(|| "auto".into());
        if !["auto", "qemu", "firecracker"].contains(&vmm.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "vmm must be auto, qemu or firecracker, not {vmm:?}"
            )));
        }
        Ok(Config {
            runtime_dir: env_path("BANGER_RUNTIME_DIR").unwrap_or_else(default_runtime_dir),
            helper_socket: env_path("BANGER_HELPER_SOCKET")
                .or(fc.helper_socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_HELPER_SOCKET)),
            log_level: fc.log_level,
            bridge: std::env::var("BANGER_BRIDGE")
                .ok()
                .or(fc.bridge)
                .unwrap_or_else(|| "banger0".into()),
            bridge_address: fc.bridge_address.unwrap_or_else(|| "172.30.0.1/24".into()),
            vmm,
            firecracker: env_path("BANGER_FIRECRACKER").or(fc.firecracker),
            qemu: env_path("BANGER_QEMU").or(fc.qemu),
            default_vcpus: fc.default_vcpus.unwrap_or(2),
            default_memory_mib: fc.default_memory_mib.unwrap_or(1024),
            default_work_disk_mib: fc.default_work_disk_mib.unwrap_or(8192),
            dns_listen: std::env::var("BANGER_DNS_LISTEN")
                .ok()
                .or(fc.dns_listen)
                .unwrap_or_else(|| "127.0.0.1:10053".into()),
            console_log_max_kib: std::env::var("BANGER_CONSOLE_LOG_MAX_KIB")
                .ok()
                .and_then(|v| v.parse().ok())
                .or(fc.console_log_max_kib)
                .unwrap_or(16 * 1024)
                .max(64),
            jailer: env_path("BANGER_JAILER").or(fc.jailer),
            session_log_max_kib: std::env::var("BANGER_SESSION_LOG_MAX_KIB")
                .ok()
                .and_then(|v| v.parse().ok())
                .or(fc.session_log_max_kib)
                .unwrap_or(8 * 1024)
                .clamp(16, 1024 * 1024),
            auto_stop_idle_secs: match std::env::var("BANGER_AUTO_STOP_IDLE").ok().or(fc.auto_stop_idle) {
                Some(s) => parse_duration(&s).map_err(ConfigError::Invalid)?,
                None => 0,
            },
            jailer_uid_base: {
                let base = fc.jailer_uid_base.unwrap_or(200_000);
                // Clear of system and ordinary users, with room for every CID.
                if !(100_000..=u32::MAX - (1 << 24)).contains(&base) {
                    return Err(ConfigError::Invalid(format!(
                        "jailer_uid_base must be between 100000 and {}, not {base}",
                        u32::MAX - (1 << 24)
                    )));
                }
                base
            },
            state_dir,
            installed: None,
            catalog: std::env::var("BANGER_CATALOG")
                .ok()
                .filter(|s| !s.is_empty())
                .or(fc.catalog),
            warm_pool: {
                let file = fc.warm_pool.unwrap_or_default();
                let size = match std::env::var("BANGER_WARM_POOL").ok().filter(|s| !s.is_empty()) {
                    Some(s) => s.parse().map_err(|_| {
                        ConfigError::Invalid(format!("BANGER_WARM_POOL must be a number of VMs, not {s:?}"))
                    })?,
                    None => file.size.unwrap_or(0),
                };
                if size > MAX_WARM_POOL {
                    return Err(ConfigError::Invalid(format!(
                        "warm_pool size {size} is above {MAX_WARM_POOL}"
                    )));
                }
                WarmPool {
                    image: file.image.unwrap_or_else(|| "default".into()),
                    size,
                }
            },
            snapshot_max_gib: match std::env::var("BANGER_SNAPSHOT_MAX_GIB")
                .ok()
                .filter(|s| !s.is_empty())
            {
                Some(s) => s.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "BANGER_SNAPSHOT_MAX_GIB must be a number of GiB, not {s:?}"
                    ))
                })?,
                None => fc.snapshot_max_gib.unwrap_or(20),
            },
        })
    }

    pub fn daemon_socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }

    pub fn daemon_pid_file(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.pid")
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    pub fn kernels_dir(&self) -> PathBuf {
        self.state_dir.join("kernels")
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }
}

/// Creates `dir` (and parents) and sets its mode.
pub fn ensure_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// One effective setting and where it came from.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    /// `default`, `file` (config.toml) or `env:NAME`.
    pub source: String,
}

fn shown<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "(none)".into())
}

impl Config {
    /// The path of the configuration file this configuration reads.
    pub fn file(&self) -> PathBuf {
        self.state_dir.join("config.toml")
    }

    /// Every setting with its effective value and its source: the
    /// environment wins over the file, the file over the default.
    pub fn settings(&self) -> Vec<Setting> {
        let table: toml::Table = std::fs::read_to_string(self.file())
            .ok()
            .and_then(|t| toml::from_str(&t).ok())
            .unwrap_or_default();
        let source = |key: &str, env: Option<&str>| -> String {
            if let Some(e) = env {
                if std::env::var_os(e).is_some_and(|v| !v.is_empty()) {
                    return format!("env:{e}");
                }
            }
            if table.contains_key(key) {
                "file".into()
            } else {
                "default".into()
            }
        };
        let p = |p: &Path| p.display().to_string();
        let rows: Vec<(&'static str, Option<&'static str>, String)> = vec![
            ("state_dir", Some("BANGER_HOME"), p(&self.state_dir)),
            ("runtime_dir", Some("BANGER_RUNTIME_DIR"), p(&self.runtime_dir)),
            (
                "helper_socket",
                Some("BANGER_HELPER_SOCKET"),
                p(&self.helper_socket),
            ),
            ("log_level", None, shown(&self.log_level)),
            ("bridge", Some("BANGER_BRIDGE"), self.bridge.clone()),
            ("bridge_address", None, self.bridge_address.clone()),
            ("vmm", Some("BANGER_VMM"), self.vmm.clone()),
            (
                "firecracker",
                Some("BANGER_FIRECRACKER"),
                shown(&self.firecracker.as_ref().map(|x| p(x))),
            ),
            (
                "qemu",
                Some("BANGER_QEMU"),
                shown(&self.qemu.as_ref().map(|x| p(x))),
            ),
            ("default_vcpus", None, self.default_vcpus.to_string()),
            ("default_memory_mib", None, self.default_memory_mib.to_string()),
            (
                "default_work_disk_mib",
                None,
                self.default_work_disk_mib.to_string(),
            ),
            ("dns_listen", Some("BANGER_DNS_LISTEN"), self.dns_listen.clone()),
            (
                "console_log_max_kib",
                Some("BANGER_CONSOLE_LOG_MAX_KIB"),
                self.console_log_max_kib.to_string(),
            ),
            (
                "jailer",
                Some("BANGER_JAILER"),
                shown(&self.jailer.as_ref().map(|x| p(x))),
            ),
            ("jailer_uid_base", None, self.jailer_uid_base.to_string()),
            (
                "auto_stop_idle",
                Some("BANGER_AUTO_STOP_IDLE"),
                format!("{}s", self.auto_stop_idle_secs),
            ),
            (
                "session_log_max_kib",
                Some("BANGER_SESSION_LOG_MAX_KIB"),
                self.session_log_max_kib.to_string(),
            ),
            ("catalog", Some("BANGER_CATALOG"), shown(&self.catalog)),
            (
                "warm_pool",
                Some("BANGER_WARM_POOL"),
                format!("{} × {}", self.warm_pool.size, self.warm_pool.image),
            ),
            (
                "snapshot_max_gib",
                Some("BANGER_SNAPSHOT_MAX_GIB"),
                self.snapshot_max_gib.to_string(),
            ),
        ];
        let from_env =
            |env: Option<&str>| env.is_some_and(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty()));
        rows.into_iter()
            .map(|(key, env, value)| Setting {
                key,
                value,
                // The state directory holds the file, so it never comes from it.
                source: if let Some(m) = self.installed.as_ref().filter(|_| {
                    !from_env(env) && ["state_dir", "runtime_dir", "helper_socket"].contains(&key)
                }) {
                    format!("install:{}", m.path().display())
                } else if key == "state_dir" || key == "runtime_dir" {
                    match env.filter(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty())) {
                        Some(e) => format!("env:{e}"),
                        None => "default".into(),
                    }
                } else {
                    source(key, env)
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn every_file_key_is_shown_with_its_source() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "default_vcpus = 3\nbridge_address = \"10.9.0.1/24\"\n",
        )
        .unwrap();
        let fc: FileConfig =
            toml::from_str(&std::fs::read_to_string(dir.path().join("config.toml")).unwrap()).unwrap();
        let cfg = Config::from_parts(dir.path().to_path_buf(), fc).unwrap();
        let s = cfg.settings();
        let get = |k: &str| s.iter().find(|x| x.key == k).cloned().unwrap();
        assert_eq!(
            (
                get("default_vcpus").value.as_str(),
                get("default_vcpus").source.as_str()
            ),
            ("3", "file")
        );
        assert_eq!(get("bridge_address").value, "10.9.0.1/24");
        assert_eq!(get("default_memory_mib").source, "default");
        // Every key a file may hold is listed (the file's own fields).
        let keys: Vec<&str> = s.iter().map(|x| x.key).collect();
        for k in [
            "helper_socket",
            "log_level",
            "bridge",
            "bridge_address",
            "vmm",
            "firecracker",
            "qemu",
            "default_vcpus",
            "default_memory_mib",
            "default_work_disk_mib",
            "dns_listen",
            "console_log_max_kib",
            "jailer",
            "jailer_uid_base",
            "auto_stop_idle",
            "session_log_max_kib",
            "catalog",
            "warm_pool",
            "snapshot_max_gib",
        ] {
            assert!(keys.contains(&k), "{k} is not shown");
        }
    }
}
