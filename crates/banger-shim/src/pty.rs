//! A terminal for an exec asked with one. The exec is a `banger vm exec -t`
//! whose stdio is the slave side of a pty the shim holds: the shim relays
//! containerd's FIFOs through the master and sets the master's size for
//! `ResizePty`, and the CLI follows its terminal's size into the guest as
//! it would for a user at a real terminal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A fresh pty, the master blocking (it is read on a thread of its own).
pub fn open(rows: u16, cols: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    let ws = winsize(rows, cols);
    // SAFETY: out-parameters are valid; name and termios may be null.
    if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty just gave us these descriptors.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [m.as_raw_fd(), s.as_raw_fd()] {
        // SAFETY: plain fcntl on descriptors we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sets the terminal's size; the kernel tells its foreground process
/// group (the CLI) with SIGWINCH.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = winsize(rows, cols);
    // SAFETY: a valid winsize for TIOCSWINSZ on a descriptor we own.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// In the child between fork and exec: a session of its own with the pty
/// (its stdin) as the controlling terminal, so it gets SIGWINCH.
///
/// # Safety
/// Only between fork and exec, in the child.
pub unsafe fn take_as_terminal() -> std::io::Result<()> {
    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies what the terminal shows into containerd's output FIFO until the
/// terminal ends (EIO once the last slave descriptor is closed).
pub fn relay_out(master: File, out: Option<File>) {
    std::thread::spawn(move || {
        let (mut master, mut out) = (master, out);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(o) = out.as_mut() {
                        if o.write_all(&buf[..n]).is_err() {
                            out = None;
                        }
                    }
                }
            }
        }
    });
}
