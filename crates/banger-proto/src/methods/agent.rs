//! The guest agent's API, spoken over vsock (port [`AGENT_PORT`]).

use super::{method, Empty};
use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;

/// How often the agent sends a heartbeat on a call that is otherwise quiet.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the host waits for any frame from the agent before it gives a
/// call up: many heartbeats, so a guest busy under software emulation is
/// not mistaken for a stalled one.
pub const IDLE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The host port the agent connects to once it listens, to say so: the
/// host learns the guest is ready without polling it during boot.
pub const READY_PORT: u32 = 1052;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentHealth {
    pub version: String,
    pub hostname: String,
    pub uptime_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Bytes fed to the command's stdin, then closed (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Run inside this guest directory as its root (a container's tree):
    /// in a mount namespace of its own with /proc, /sys and /dev mounted
    /// under it; `cwd` is then a path inside it. Needs [`FEATURE_ROOT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Run as this user instead of root. Needs [`FEATURE_USER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// A chunk of a command's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecOutput {
    pub stream: StreamName,
    /// Raw bytes, base64: output need not be UTF-8.
    pub data_b64: String,
}

/// How a command ended: an exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal number.
    /// A guest reports these numbers; they are not trusted to be sane: a
    /// code outside 0-255 (what a process can really exit with) or a
    /// signal outside 1-64 becomes 255, never a wrapped value that could
    /// read as success.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) if (0..=255).contains(&c) => c,
            (None, Some(s)) if (1..=64).contains(&s) => 128 + s,
            _ => 255,
        }
    }
}

/// What the host gives a guest as it comes up (and after a resume, when
/// its clock stood still, or when a warm-pool VM is given to its taker):
/// the host's time and fresh entropy, and the name the guest now has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seed {
    /// The host's `CLOCK_REALTIME`, nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
    /// Bytes from the host's `getrandom`, base64; at most [`MAX_SEED_BYTES`].
    pub entropy_b64: String,
    /// The guest's hostname (a DNS label), set and written to /etc/hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The guest's network identity, applied to `eth0`: a guest restored
    /// from a snapshot still wears the source's MAC and address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<SeedNet>,
}

impl Seed {
    /// The host's clock now and 64 bytes of its entropy, with the name and
    /// network identity given: made at the moment it is sent, so the clock
    /// is fresh.
    pub fn from_host(hostname: Option<String>, net: Option<SeedNet>) -> Seed {
        use base64::Engine;
        let mut entropy = [0u8; 64];
        // SAFETY: getrandom into a buffer we own, of that length.
        let got = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Seed {
            unix_nanos,
            entropy_b64: base64::engine::general_purpose::STANDARD.encode(&entropy[..got.max(0) as usize]),
            hostname,
            net,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeedNet {
    /// `aa:bb:cc:dd:ee:ff`, a unicast address.
    pub mac: String,
    /// `a.b.c.d/prefix`.
    pub address: String,
    /// The default route's gateway.
    pub gateway: String,
}

/// The most entropy one [`Seed`] carries (the agent refuses more).
pub const MAX_SEED_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seeded {
    /// How far the guest's clock was moved (host minus guest), ms.
    pub clock_step_ms: i64,
    /// Bytes credited to the guest's entropy pool.
    pub entropy_bytes: u32,
}

method!(
    /// Sets the guest's clock from the host's and credits host entropy to
    /// its pool.
    SeedGuest = "agent.seed", Seed => Seeded
);

/// What must differ between clones of one snapshot and is known before
/// the VM runs: written by the daemon for the channel bridge of a QEMU VM
/// being restored, which adds the clock and entropy when it gives the
/// seed in the channel's handshake (a round trip fewer than
/// [`SeedGuest`] on a stream of its own).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeedPlan {
    /// The operation the seed belongs to, for the agent's log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<SeedNet>,
}

/// The seed as the handshake carries it (one line of JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandshakeSeed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    pub seed: Seed,
}

/// The agent's answer to a [`HandshakeSeed`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SeedAnswer {
    Seeded(Seeded),
    Failed(String),
}
method!(
    /// Liveness of the agent.
    Health = "agent.health", Empty => AgentHealth
);

/// What an agent speaks, so a host can talk to a guest whose agent is
/// older than itself: an agent without `agent.info` speaks generation 1
/// only (JSON exec on [`AGENT_PORT`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub version: String,
    /// The highest protocol generation it speaks.
    pub protocol: u32,
    /// What it offers beyond generation 1, e.g. [`FEATURE_EXEC_STREAM`].
    #[serde(default)]
    pub features: Vec<String>,
}

/// Exec over the stream port ([`crate::stream`]): stdin of any size,
/// terminals, signals.
pub const FEATURE_EXEC_STREAM: &str = "exec.stream";

/// The agent runs processes inside a directory as their root (`root` on
/// exec, stream and session requests). An agent without it would ignore
/// the field and run the process in the guest's own root, so the daemon
/// refuses `root` unless the agent names this.
pub const FEATURE_ROOT: &str = "root";

/// The agent runs processes as a given uid, gid and groups (`user` on
/// exec, stream and session requests); refused for an agent without it,
/// which would run them as root.
pub const FEATURE_USER: &str = "user";

/// Numeric credentials for a guest process, as an OCI spec gives them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (at most [`MAX_GROUPS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
}

pub const MAX_GROUPS: usize = 64;

impl User {
    /// `UID[:GID[:GROUP,…]]` as the command line takes it: numbers, the
    /// gid defaulting to the uid, then supplementary groups.
    pub fn parse(s: &str) -> Result<User, String> {
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("user {s:?}: expected UID[:GID[:GROUP,...]] as numbers"))
        };
        let mut parts = s.splitn(3, ':');
        let uid = num(parts.next().unwrap_or_default())?;
        let gid = parts.next().map(num).transpose()?.unwrap_or(uid);
        let groups = match parts.next() {
            Some(g) if !g.is_empty() => g.split(',').map(num).collect::<Result<Vec<_>, _>>()?,
            _ => vec![],
        };
        let u = User { uid, gid, groups };
        u.validate()?;
        Ok(u)
    }

    /// The `UID:GID[:GROUP,…]` form [`User::parse`] reads.
    pub fn to_arg(&self) -> String {
        let mut s = format!("{}:{}", self.uid, self.gid);
        if !self.groups.is_empty() {
            let g: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            s.push(':');
            s.push_str(&g.join(","));
        }
        s
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.groups.len() > MAX_GROUPS {
            return Err(format!(
                "{} supplementary groups; at most {MAX_GROUPS}",
                self.groups.len()
            ));
        }
        Ok(())
    }
}

method!(
    /// The agent's version, protocol generation and features.
    Info = "agent.info", Empty => AgentInfo
);
method!(
    /// Runs a command, streaming its output.
    Exec = "agent.exec", ExecRequest => ExitStatus, event ExecOutput
);
method!(
    /// Flushes the guest's filesystems.
    Sync = "agent.sync", Empty => Empty
);
method!(
    /// Syncs and powers the guest off right after answering.
    Poweroff = "agent.poweroff", Empty => Empty
);

/// A transport of a guest socket.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SocketProto {
    Tcp,
    Udp,
}

impl SocketProto {
    pub fn as_str(self) -> &'static str {
        match self {
            SocketProto::Tcp => "tcp",
            SocketProto::Udp => "udp",
        }
    }
}

/// A socket that listens in the guest: a TCP socket in LISTEN, or a bound,
/// unconnected UDP socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListeningSocket {
    pub proto: SocketProto,
    /// The local address, as text (`0.0.0.0`, `::`, `127.0.0.1`, ...).
    pub address: String,
    pub port: u16,
    /// The owning process, when the agent could see one holding the socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

/// The most sockets one [`GuestPorts`] lists (the agent stops there, the
/// host refuses to read more).
pub const MAX_PORTS: usize = 4096;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestPorts {
    pub sockets: Vec<ListeningSocket>,
    /// More sockets listened than [`MAX_PORTS`]; the rest were left out.
    #[serde(default)]
    pub truncated: bool,
}

/// One filesystem's size, from `statvfs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskFigures {
    pub path: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// What the guest's kernel says it uses. Raw figures: the host checks and
/// derives what it prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestStats {
    /// CPUs the kernel sees.
    pub vcpus: u32,
    /// Jiffies spent busy (not idle, not waiting on I/O), summed over all
    /// CPUs, during the sample.
    pub cpu_busy_ticks: u64,
    /// All jiffies summed over all CPUs during the sample.
    pub cpu_total_ticks: u64,
    pub sample_ms: u64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub disks: Vec<DiskFigures>,
    /// The interface counted, when the guest has one (`eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_interface: Option<String>,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: f64,
    pub load: [f64; 3],
}

method!(
    /// Sockets listening in the guest, with their owners.
    Ports = "agent.ports", Empty => GuestPorts
);
method!(
    /// CPU, memory, disk, network and load figures of the guest.
    Stats = "agent.stats", Empty => GuestStats
);

/// The vsock port for bulk transfers: a [`BulkHeader`] line, then the
/// payload as chunks (a big-endian u32 length, then that many bytes) ended
/// by a zero-length chunk, then one [`BulkResult`] line back. Chunked
/// because hybrid vsock proxies do not carry a half-close. Kept off the RPC
/// port because a workspace can be far larger than an RPC frame.
pub const BULK_PORT: u32 = 53;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkHeader {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    /// What to do: "untar" (unpack into `dest`), "place" (unpack one
    /// entry, `name`, aside and move it into place at `dest`), or "tar"
    /// (the guest sends `dest` back as an archive, chunked the same way,
    /// before its result line).
    pub op: String,
    /// Absolute guest path: the directory to unpack into ("untar"), where
    /// the entry goes ("place": into it if it is a directory, else as it),
    /// or what to send ("tar").
    pub dest: String,
    /// "place": the archive's one top-level entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkResult {
    pub ok: bool,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Line encoding of the bulk port's header and result: the only place
/// their JSON shape is known.
pub trait Line: Serialize + for<'de> Deserialize<'de> {
    fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("bulk lines serialise");
        v.push(b'\n');
        v
    }

    fn from_line(line: &str) -> Result<Self, String> {
        serde_json::from_str(line.trim_end()).map_err(|e| e.to_string())
    }
}

impl Line for BulkHeader {}
impl Line for BulkResult {}

/// Largest chunk either side sends or accepts on the bulk port.
pub const BULK_CHUNK: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_reads_and_writes_uid_gid_and_groups() {
        assert_eq!(
            User::parse("1000").unwrap(),
            User {
                uid: 1000,
                gid: 1000,
                groups: vec![]
            }
        );
        let u = User::parse("1:2:3,4").unwrap();
        assert_eq!(
            u,
            User {
                uid: 1,
                gid: 2,
                groups: vec![3, 4]
            }
        );
        assert_eq!(User::parse(&u.to_arg()).unwrap(), u);
        assert!(User::parse("root").is_err());
        assert!(User::parse("1:x").is_err());
        assert!(User::parse("-1").is_err());
        let many: Vec<String> = (0..=MAX_GROUPS).map(|g| g.to_string()).collect();
        assert!(User::parse(&format!("1:1:{}", many.join(","))).is_err());
    }

    #[test]
    fn absurd_exit_statuses_never_read_as_success() {
        let st = |code, signal| ExitStatus { code, signal }.shell_code();
        assert_eq!(st(Some(0), None), 0);
        assert_eq!(st(Some(7), None), 7);
        assert_eq!(st(None, Some(15)), 143);
        assert_eq!(st(Some(i32::MIN), None), 255);
        assert_eq!(st(Some(256), None), 255);
        assert_eq!(st(Some(-1), None), 255);
        assert_eq!(st(None, Some(i32::MAX)), 255);
        assert_eq!(st(None, Some(-128)), 255);
        assert_eq!(st(None, None), 255);
    }
}

/// Guest sessions (`agent.session.*` and session streams): long-running
/// processes the agent owns, with their output in a capped log on the
/// guest's disk.
pub const FEATURE_SESSIONS: &str = "sessions";

/// The longest session id.
pub const MAX_SESSION_ID: usize = 64;

/// Whether `id` can name a session (it names a directory in the guest).
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A session to start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionSpec {
    pub id: String,
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// A terminal of this size instead of pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::stream::WinSize>,
    /// The most output kept, in bytes (older output is dropped).
    pub log_max: u64,
    /// Run inside this guest directory as its root (a container's tree):
    /// in a mount namespace of its own with /proc, /sys and /dev mounted
    /// under it; `cwd` is then a path inside it. Needs [`FEATURE_ROOT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Run as this user instead of root. Needs [`FEATURE_USER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Running,
    /// Ended: `code` or `signal` says how.
    Exited,
    /// Its process was lost (the agent or the guest restarted while it
    /// ran): how it ended is not known and never made up.
    Lost,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Exited => "exited",
            SessionState::Lost => "lost",
        }
    }
}

/// A session as the agent knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub argv: Vec<String>,
    pub tty: bool,
    pub state: SessionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The oldest output still in the log.
    pub first_seq: u64,
    /// Where the next output will be: output is numbered by byte.
    pub next_seq: u64,
    pub log_max: u64,
    /// The guest boot the session was started in.
    pub boot_id: String,
    /// A stream owns the session's input now.
    #[serde(default)]
    pub input_attached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionList {
    /// The guest's current boot.
    pub boot_id: String,
    pub sessions: Vec<SessionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRef {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionSignal {
    pub id: String,
    pub signal: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStop {
    pub id: String,
    /// SIGTERM to the group, then SIGKILL after this long.
    pub grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionResize {
    pub id: String,
    pub size: crate::stream::WinSize,
}

method!(
    /// Starts a session; idempotent by id (the same id gives the session
    /// as it is).
    SessionStartM = "agent.session.start", SessionSpec => SessionInfo
);
method!(
    /// Every session the agent has (running, ended or lost).
    SessionListM = "agent.session.list", Empty => SessionList
);
method!(
    /// A signal for the session's whole process group.
    SessionSignalM = "agent.session.signal", SessionSignal => SessionInfo
);
method!(
    /// SIGTERM to the group, SIGKILL after the grace; answers once the
    /// group is gone.
    SessionStopM = "agent.session.stop", SessionStop => SessionInfo
);
method!(
    /// Removes an ended session and its log.
    SessionRemoveM = "agent.session.remove", SessionRef => Empty
);
method!(
    /// Resizes a session's terminal.
    SessionResizeM = "agent.session.resize", SessionResize => SessionInfo
);
