//! `vm exec` over the agent's stream protocol, on a real guest: stdin of
//! any size streamed in constant memory, a terminal with its size, exit
//! codes and signals passed through, a command that never reads its stdin
//! does not wedge the call, and a client that goes away takes the guest
//! command's whole process group with it.

use banger_tests::{wait_for, Env};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    v
}

/// Runs `banger args` with `input` on its stdin; (code, stdout, stderr).
fn with_stdin(env: &Env, args: &[&str], input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = env
        .cmd("banger")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let data = input.to_vec();
    // A writer of its own: the command's output must be read meanwhile.
    let feeder = std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn stdin_of_any_size_reaches_the_command_intact() {
    let env = Env::with_image();
    env.create_small("xs", &[]);
    // 50 MiB: seventy times what one JSON frame could carry.
    let data = random_bytes(50 << 20);
    let want = format!("{:x}", Sha256::digest(&data));
    let (code, out, err) = with_stdin(&env, &["vm", "exec", "-i", "xs", "--", "sha256sum"], &data);
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.split_whitespace().next(), Some(want.as_str()), "{out}");

    // A command that never reads its stdin is not wedged by 8 MiB offered
    // to it: it runs to its end, its output arrives, its code is passed.
    let (code, out, err) = with_stdin(
        &env,
        &[
            "vm",
            "exec",
            "-i",
            "xs",
            "--",
            "sh",
            "-c",
            "echo begun; sleep 1; echo ended; exit 3",
        ],
        &random_bytes(8 << 20),
    );
    assert_eq!(code, 3, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "begun\nended\n");

    // Output of any size comes back whole; a signal is 128 + its number.
    let out = env
        .cmd("banger")
        .args([
            "vm",
            "exec",
            "xs",
            "--",
            "sh",
            "-c",
            "head -c 30000000 /dev/zero; echo err >&2; kill -TERM $$",
        ])
        .output()
        .unwrap();
    assert_eq!(out.stdout.len(), 30_000_000);
    assert!(out.stdout.iter().all(|b| *b == 0));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(143));
}

/// A pseudo-terminal for the CLI, of a known size: (master, slave).
fn pty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out-parameters; name and termios may be null.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty just gave us these.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

#[test]
fn a_terminal_has_the_clients_size_and_passes_the_exit_code() {
    let env = Env::with_image();
    env.create_small("xt", &[]);
    let (master, slave) = pty(33, 97);
    let mut child = env
        .cmd("banger")
        .args([
            "vm",
            "exec",
            "-t",
            "xt",
            "--",
            "sh",
            "-c",
            "tty; stty size; exit 7",
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut m = std::fs::File::from(master);
    // Read on a thread: the master ends (EIO) once the CLI is gone.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match m.read(&mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    });
    let code = wait_for("the terminal exec to end", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    });
    assert_eq!(code.code(), Some(7));
    let seen = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(seen.contains("/dev/pts/"), "no terminal in the guest: {seen:?}");
    assert!(
        seen.contains("33 97"),
        "the guest terminal's size is not the client's: {seen:?}"
    );
}

#[test]
fn a_client_that_goes_away_ends_the_guest_command() {
    let env = Env::with_image();
    env.create_small("xh", &[]);
    for with_input in [false, true] {
        let mut args = vec!["vm", "exec"];
        if with_input {
            args.push("-i");
        }
        args.extend(["xh", "--", "sh", "-c", "sleep 300 & sleep 301; echo never"]);
        let mut cli = env.cmd("banger");
        cli.args(&args).stdout(Stdio::null()).stderr(Stdio::null());
        if with_input {
            // Endless input the command never reads: the daemon is held
            // back by credit when the client goes.
            cli.stdin(std::fs::File::open("/dev/zero").unwrap());
        }
        let mut cli = cli.spawn().unwrap();
        let running = || {
            env.banger_ok(&["vm", "exec", "xh", "--", "sh", "-c", "pgrep -c -x sleep || true"])
                .trim()
                .to_string()
        };
        wait_for("the guest command to run", Duration::from_secs(30), || {
            (running() == "2").then_some(())
        });
        cli.kill().unwrap();
        let _ = cli.wait();
        wait_for(
            &format!("the guest command's group to end (stdin streamed: {with_input})"),
            Duration::from_secs(15),
            || (running() == "0").then_some(()),
        );
    }
}
