//! `banger vm session ...`: long-running processes in a VM that outlive
//! the command that started them; their output is captured while no one
//! watches, and any number of clients can follow it (one of them typing).

use crate::client_ops::{call_streaming, Input, Streamed, BROKEN_PIPE};
use crate::output::{escape, print};
use anyhow::{anyhow, bail, Result};
use banger_proto::methods::agent::{ExitStatus, StreamName};
use banger_proto::methods::daemon::{self as d, SessionOutput, SessionView};
use banger_proto::stream::{SessionEnd, SessionMode, WinSize};
use banger_proto::Client;
use base64::Engine;
use clap::Subcommand;
use std::io::Write;

/// Ctrl-\ : leaves an attach without touching the session.
const DETACH_KEY: u8 = 0x1c;

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// A signal by number (1-64) or name, with or without `SIG`.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal {n} is not 1-64"))
        };
    }
    let name = s.strip_prefix("SIG").unwrap_or(s).to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => return Err(format!("unknown signal {s:?}")),
    };
    Ok(n)
}

#[derive(Subcommand)]
pub enum SessionCmd {
    /// Start a session: CMD runs in the VM until it ends or is stopped,
    /// whoever is attached.
    Start {
        #[arg(add = crate::complete::vms())]
        vm: String,
        /// A name for it, unique in the VM (one is made up otherwise).
        #[arg(long)]
        name: Option<String>,
        /// Give it a terminal (of this terminal's size).
        #[arg(long)]
        tty: bool,
        #[arg(long)]
        cwd: Option<String>,
        /// Run chrooted into this guest directory (a container's tree), in
        /// a mount namespace of its own; `--cwd` is then inside it.
        #[arg(long)]
        root: Option<String>,
        /// Run as UID[:GID[:GROUP,...]] (numbers; the gid defaults to the uid).
        #[arg(long, value_parser = banger_proto::methods::agent::User::parse)]
        user: Option<banger_proto::methods::agent::User>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Bytes of output kept (older output is dropped); by default the
        /// daemon's `session_log_max_kib` (8 MiB).
        #[arg(long)]
        log_max: Option<u64>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The VM's sessions.
    List {
        #[arg(add = crate::complete::vms())]
        vm: String,
    },
    Show {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
    },
    /// Output kept so far; with -f, then follow until the session ends.
    Logs {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
        #[arg(short = 'f', long)]
        follow: bool,
        /// From this byte of output (see `show`: first_seq..next_seq).
        #[arg(long)]
        since: Option<u64>,
        /// Only the last this many bytes.
        #[arg(long)]
        tail: Option<u64>,
    },
    /// Replay (the last 64 KiB, or --since), then follow; typing goes to
    /// the session. Ctrl-\ detaches; the session goes on.
    Attach {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
        /// Watch only: any number of read-only attaches may follow.
        #[arg(long)]
        read_only: bool,
        /// Take the input over from whoever has it.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        since: Option<u64>,
        #[arg(long)]
        tail: Option<u64>,
    },
    /// This process's stdin to the session's stdin.
    Send {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
        /// Close the session's stdin afterwards.
        #[arg(long)]
        eof: bool,
    },
    /// Resize the session's terminal.
    Resize {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
        rows: u16,
        cols: u16,
    },
    /// SIGTERM to the session's whole process group, SIGKILL after the grace.
    Stop {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
        /// Seconds before SIGKILL.
        #[arg(long, default_value_t = 10)]
        grace: u64,
    },
    /// A signal for the session's whole process group (TERM, SIGHUP, 10…);
    /// the session decides what it does with it.
    Signal {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
        #[arg(value_parser = parse_signal)]
        signal: i32,
    },
    /// SIGKILL to the session's whole process group.
    Kill {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
    },
    /// Remove an ended session and its output.
    Rm {
        #[arg(add = crate::complete::vms())]
        vm: String,
        #[arg(add = crate::complete::sessions())]
        session: String,
    },
}

fn show_one(v: &SessionView) {
    println!("name:     {}", v.name);
    println!("id:       {}", v.id);
    println!("vm:       {}", v.vm);
    println!("command:  {}", escape(&v.argv.join(" ")));
    println!("state:    {}", v.state);
    if let Some(p) = v.pid {
        println!("pid:      {p}");
    }
    if let Some(c) = v.code {
        println!("exit:     {c}");
    }
    if let Some(s) = v.signal {
        println!("signal:   {s}");
    }
    println!("tty:      {}", v.tty);
    if v.input_attached == Some(true) {
        println!("input:    attached");
    }
    if let (Some(f), Some(n)) = (v.first_seq, v.next_seq) {
        println!("output:   bytes {f}..{n} kept");
    }
    println!("op:       {}", v.op_id);
}

fn show_list(l: &d::SessionViews) {
    println!(
        "{:<16} {:<9} {:>7} {:>5} {:>10}  COMMAND",
        "NAME", "STATE", "PID", "EXIT", "OUTPUT"
    );
    for v in &l.sessions {
        let exit = match (v.code, v.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(s)) => format!("sig{s}"),
            _ => "-".into(),
        };
        println!(
            "{:<16} {:<9} {:>7} {:>5} {:>10}  {}",
            v.name,
            v.state,
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            exit,
            v.next_seq.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            escape(&v.argv.join(" "))
        );
    }
}

/// Writes a piece of session output where it belongs.
fn write_session_output(event: serde_json::Value) -> std::io::Result<()> {
    let Ok(ev) = serde_json::from_value::<SessionOutput>(event) else {
        return Ok(());
    };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&ev.data_b64) else {
        return Ok(());
    };
    match ev.stream {
        StreamName::Stdout => {
            let mut o = std::io::stdout();
            o.write_all(&bytes)?;
            o.flush()
        }
        StreamName::Stderr => {
            let _ = std::io::stderr().write_all(&bytes);
            Ok(())
        }
    }
}

fn reference(vm: &str, session: &str) -> d::SessionRef {
    d::SessionRef {
        vm: vm.to_string(),
        session: session.to_string(),
    }
}

/// The shell's code for how a session ended.
fn code_of(v: &SessionView) -> i32 {
    ExitStatus {
        code: v.code,
        signal: v.signal,
    }
    .shell_code()
}

pub async fn run(c: &Client, cmd: SessionCmd, json: bool) -> Result<i32> {
    match cmd {
        SessionCmd::Start {
            vm,
            name,
            tty,
            cwd,
            root,
            user,
            env,
            log_max,
            cmd,
        } => {
            let tty = tty.then(|| crate::term::size().unwrap_or(WinSize { rows: 24, cols: 80 }));
            let mut env = env;
            if tty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
                env.push((
                    "TERM".into(),
                    std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
                ));
            }
            let v = c
                .call::<d::VmSessionStartM>(
                    &d::SessionStart {
                        vm,
                        name,
                        argv: cmd,
                        env,
                        cwd,
                        tty,
                        log_max,
                        root,
                        user,
                    },
                    None,
                )
                .await?;
            print(json, &v, |v| println!("{}", v.name));
        }
        SessionCmd::List { vm } => {
            let l = c.call::<d::VmSessionListM>(&d::VmRef { name: vm }, None).await?;
            print(json, &l, show_list);
        }
        SessionCmd::Show { vm, session } => {
            let v = c
                .call::<d::VmSessionShowM>(&reference(&vm, &session), None)
                .await?;
            print(json, &v, show_one);
        }
        SessionCmd::Stop { vm, session, grace } => {
            let p = d::SessionStopReq {
                vm,
                session,
                grace_ms: Some(grace.saturating_mul(1000)),
            };
            let v = c.call::<d::VmSessionStopM>(&p, None).await?;
            print(json, &v, |v| println!("{} {}", v.name, v.state));
        }
        SessionCmd::Signal { vm, session, signal } => {
            let p = d::SessionSignalReq { vm, session, signal };
            let v = c.call::<d::VmSessionSignalM>(&p, None).await?;
            print(json, &v, |v| println!("{} {}", v.name, v.state));
        }
        SessionCmd::Kill { vm, session } => {
            let v = c
                .call::<d::VmSessionKillM>(&reference(&vm, &session), None)
                .await?;
            print(json, &v, |v| println!("{} {}", v.name, v.state));
        }
        SessionCmd::Rm { vm, session } => {
            c.call::<d::VmSessionRmM>(&reference(&vm, &session), None).await?;
            if !json {
                println!("removed session {session}");
            }
        }
        SessionCmd::Resize {
            vm,
            session,
            rows,
            cols,
        } => {
            let p = d::SessionResizeReq {
                vm,
                session,
                size: WinSize { rows, cols },
            };
            c.call::<d::VmSessionResizeM>(&p, None).await?;
        }
        SessionCmd::Logs {
            vm,
            session,
            follow,
            since,
            tail,
        } => {
            let p = d::SessionStreamReq {
                vm,
                session,
                mode: SessionMode::Logs { follow },
                from_seq: since,
                tail,
            };
            return match call_streaming::<d::VmSessionStreamM>(c, &p, Input::default(), write_session_output)
                .await?
            {
                Streamed::BrokenPipe => Ok(BROKEN_PIPE),
                _ => Ok(0),
            };
        }
        SessionCmd::Send { vm, session, eof } => {
            let p = d::SessionStreamReq {
                vm,
                session,
                mode: SessionMode::Send { eof },
                from_seq: None,
                tail: None,
            };
            let input = Input {
                stdin: true,
                ..Default::default()
            };
            if let Streamed::Done(v) = call_streaming::<d::VmSessionStreamM>(c, &p, input, |_| Ok(())).await?
            {
                let end: SessionEnd = serde_json::from_value(v)?;
                if end.reason != "sent" {
                    bail!("the session stopped taking input ({})", end.reason);
                }
            }
        }
        SessionCmd::Attach {
            vm,
            session,
            read_only,
            force,
            since,
            tail,
        } => {
            let v = c
                .call::<d::VmSessionShowM>(&reference(&vm, &session), None)
                .await?;
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
            let typing = !read_only && v.state == "running";
            let p = d::SessionStreamReq {
                vm: vm.clone(),
                session: session.clone(),
                mode: SessionMode::Attach { input: typing, force },
                from_seq: since,
                tail: if since.is_none() {
                    Some(tail.unwrap_or(64 * 1024))
                } else {
                    tail
                },
            };
            let input = Input {
                stdin: typing,
                tty: typing && v.tty && terminal,
                detach_key: (typing && terminal).then_some(DETACH_KEY),
            };
            if typing && terminal {
                eprintln!("[attached to {session}; Ctrl-\\ detaches]\r");
            }
            let done = call_streaming::<d::VmSessionStreamM>(c, &p, input, write_session_output).await?;
            return match done {
                Streamed::BrokenPipe => Ok(BROKEN_PIPE),
                Streamed::Detached => {
                    eprintln!("\r\n[detached from {session}; it goes on]");
                    Ok(0)
                }
                Streamed::Done(end) => {
                    let end: SessionEnd = serde_json::from_value(end)?;
                    match end.reason.as_str() {
                        "exited" => {
                            let v = c
                                .call::<d::VmSessionShowM>(&reference(&vm, &session), None)
                                .await?;
                            Ok(code_of(&v))
                        }
                        "taken over" => {
                            eprintln!("[{session}: another attach took the input over]");
                            Ok(0)
                        }
                        other => Err(anyhow!("the stream ended: {other}")),
                    }
                }
            };
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_signal;

    #[test]
    fn signals_by_number_or_name() {
        assert_eq!(parse_signal("15"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("TERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("SIGhup"), Ok(libc::SIGHUP));
        for bad in ["0", "65", "-9", "BOGUS", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }
}
