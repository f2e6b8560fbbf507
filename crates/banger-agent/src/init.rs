//! PID 1 in the guest. The initramfs has already assembled the root
//! filesystem and mounted /proc, /sys, /dev, /run and /root; what is left
//! is the hostname, what a distribution's init would set up (`system`),
//! the services (the agent and sshd, both restarted when they exit), and
//! reaping.

use anyhow::Result;
use std::process::Command;
use std::time::Duration;

fn cmdline_value(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

/// Flushes and powers the machine off. Never returns. Under a VMM without
/// ACPI power-off (Firecracker) the guest resets instead, which ends the
/// VMM just the same (`banger.halt=reboot`).
pub fn poweroff() -> ! {
    let how = if cmdline_value("banger.halt").as_deref() == Some("reboot") {
        libc::RB_AUTOBOOT
    } else {
        libc::RB_POWER_OFF
    };
    // SAFETY: sync and reboot are plain syscalls; we are root in the guest.
    unsafe {
        libc::sync();
        libc::reboot(how);
    }
    std::process::exit(0)
}

/// Restart pacing for a service that keeps exiting: quick at first,
/// then at most every 10 s, so a service that cannot start neither spins
/// nor floods the console.
struct Backoff {
    delay: Duration,
    started: std::time::Instant,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            delay: Duration::from_millis(200),
            started: std::time::Instant::now(),
        }
    }

    /// Sleeps before a restart; a service that ran for a while starts over
    /// with the short delay.
    fn pause(&mut self) {
        if self.started.elapsed() > Duration::from_secs(30) {
            self.delay = Duration::from_millis(200);
        }
        std::thread::sleep(self.delay);
        self.delay = (self.delay * 2).min(Duration::from_secs(10));
        self.started = std::time::Instant::now();
    }
}

/// The initramfs ships the libc the agent was built with beside it, and
/// starts the agent through that loader (`ld.so --library-path ...`), so
/// the agent runs on an image with another libc or none. Re-executing
/// itself must go the same way.
fn self_command() -> std::io::Result<Command> {
    const LIB_DIR: &str = "/run/banger/lib";
    const AGENT: &str = "/run/banger/banger-agent";
    let exe = std::env::current_exe()?;
    if exe.file_name() == Some("ld.so".as_ref()) {
        let mut c = Command::new(&exe);
        c.args(["--library-path", LIB_DIR, AGENT]);
        Ok(c)
    } else {
        Ok(Command::new(exe))
    }
}

pub fn run() -> Result<()> {
    let hostname = cmdline_value("banger.hostname");
    if let Some(name) = &hostname {
        // SAFETY: pointer and length of a live buffer.
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    }
    crate::system::prepare(hostname.as_deref());
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    std::env::set_var("HOME", "/root");
    // sshd before the agent: once the host can reach the agent, the host
    // key it will pin exists.
    let mut sshd_pid = match start_sshd() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("banger-agent: sshd not started: {e}");
            None
        }
    };
    let mut sshd_backoff = Backoff::new();
    let mut agent = self_command()?.arg("serve").spawn()?;
    let mut agent_pid = agent.id() as i32;
    let mut agent_backoff = Backoff::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if pid == agent_pid {
            // The agent must always be there for the host: restart it.
            eprintln!("banger-agent exited ({status}); restarting");
            agent_backoff.pause();
            agent = self_command()?.arg("serve").spawn()?;
            agent_pid = agent.id() as i32;
        } else if Some(pid) == sshd_pid {
            eprintln!("banger-agent: sshd exited ({status}); restarting");
            sshd_backoff.pause();
            sshd_pid = start_sshd().unwrap_or_else(|e| {
                eprintln!("banger-agent: sshd not restarted: {e}");
                None
            });
        }
    }
}

/// The hardened drop-in: keys only, root by key only.
const SSHD_DROP_IN: &str = "# Written by banger at boot.
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PermitEmptyPasswords no
X11Forwarding no
UseDNS no
";

/// Makes this VM's own host key on first boot (images ship none, so no two
/// VMs share one) and starts sshd in the foreground as our child; returns
/// its pid (none for an image without sshd).
fn start_sshd() -> std::io::Result<Option<i32>> {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        return Ok(None);
    }
    let key = "/etc/ssh/ssh_host_ed25519_key";
    if !std::path::Path::new(key).exists() {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f", key])
            .status()?;
        if !st.success() {
            return Err(std::io::Error::other("ssh-keygen failed"));
        }
    }
    std::fs::create_dir_all("/etc/ssh/sshd_config.d")?;
    std::fs::write("/etc/ssh/sshd_config.d/banger.conf", SSHD_DROP_IN)?;
    std::fs::create_dir_all("/run/sshd")?;
    let child = Command::new("/usr/sbin/sshd").args(["-D", "-e"]).spawn()?;
    Ok(Some(child.id() as i32))
}
