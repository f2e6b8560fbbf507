//! Generation 2 of the agent protocol: binary frames for a process's
//! streams, one connection per operation (vsock port [`STREAM_PORT`]).
//!
//! A frame is a kind byte, a big-endian `u32` length and that many bytes.
//! Control frames carry JSON; data frames carry raw bytes, never base64.
//! The host opens with [`Kind::Open`] (the request, with its op id); then
//! both sides send frames until the guest's [`Kind::Exit`] or
//! [`Kind::Error`].
//!
//! Flow control goes both ways, so neither side can wedge the other or
//! grow without bound. The host may have at most [`STDIN_WINDOW`] bytes of
//! stdin unconsumed: the agent gives credit back ([`Kind::Credit`]) as the
//! process takes the bytes, so a process that never reads its stdin stops
//! only the host's sender, never the connection (resize, signals and
//! output still flow). The agent may have at most [`OUTPUT_WINDOW`] bytes
//! of output unacknowledged ([`Kind::Ack`]): a slow client slows the
//! process's output, and the acknowledgements are the traffic towards the
//! guest that keeps a hybrid-vsock transport granting the guest credit.
//!
//! The same frames carry a client's input to the daemon after a
//! `vm.exec` request with `stream: true` (stdin, resize, signal).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The agent protocol generation this module is.
pub const GENERATION: u32 = 2;

/// The vsock port of the stream protocol.
pub const STREAM_PORT: u32 = 54;
/// The most one frame may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Unconsumed stdin the host may have in flight.
pub const STDIN_WINDOW: u32 = 512 * 1024;
/// Unacknowledged output the agent may have in flight.
pub const OUTPUT_WINDOW: u32 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    // host -> guest
    /// JSON [`Open`]: the first frame of a connection.
    Open = 0x01,
    /// Bytes for the process's stdin; an empty one closes it.
    Stdin = 0x02,
    /// `rows: u16, cols: u16`, big-endian: the terminal's new size.
    Resize = 0x03,
    /// `i32`, big-endian: a signal for the process's whole group.
    Signal = 0x04,
    /// `u32`: output bytes the host has passed on.
    Ack = 0x05,
    // guest -> host
    Stdout = 0x11,
    Stderr = 0x12,
    /// `u32`: stdin bytes the process has taken.
    Credit = 0x13,
    /// JSON `ExitStatus`: the last frame.
    Exit = 0x14,
    /// JSON `RpcError`: the last frame, the operation failed.
    Error = 0x15,
    /// Nothing: the agent is alive on a quiet stream.
    Heartbeat = 0x16,
    /// JSON [`Started`]: the process runs.
    Started = 0x17,
    /// A session's output: `seq: u64`, `stream: u8` (1 stdout, 2 stderr),
    /// then the bytes. `seq` numbers output by byte.
    Output = 0x18,
    /// JSON [`Attached`]: what a session stream starts from.
    Attached = 0x19,
    /// JSON [`SessionEnd`]: the last frame of a session stream.
    End = 0x1a,
}

impl Kind {
    pub fn from_byte(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => Open,
            0x02 => Stdin,
            0x03 => Resize,
            0x04 => Signal,
            0x05 => Ack,
            0x11 => Stdout,
            0x12 => Stderr,
            0x13 => Credit,
            0x14 => Exit,
            0x15 => Error,
            0x16 => Heartbeat,
            0x17 => Started,
            0x18 => Output,
            0x19 => Attached,
            0x1a => End,
            _ => return None,
        })
    }
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// What the host asks for: a process, with pipes or a terminal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Open {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The process reads stdin from the host; otherwise from /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// A terminal of this size instead of pipes (stderr goes to it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<WinSize>,
    /// Not a new process: a stream of an existing session (`argv` empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionOpen>,
    /// Run inside this guest directory as its root (see
    /// `methods::agent::ExecRequest::root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Run as this user (see `methods::agent::ExecRequest::user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<crate::methods::agent::User>,
}

/// What a session stream does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum SessionMode {
    /// Replay, then follow; with `input`, this stream owns the session's
    /// stdin and resizes (one owner at a time; `force` takes it over).
    /// The client's hang-up detaches, never stops the session.
    Attach { input: bool, force: bool },
    /// Replay; with `follow`, then follow until the session ends.
    Logs { follow: bool },
    /// The client's stdin frames to the session's stdin; with `eof`, its
    /// end closes the session's stdin.
    Send { eof: bool },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionOpen {
    pub id: String,
    #[serde(flatten)]
    pub mode: SessionMode,
    /// Replay from this byte of output (clamped to what the log holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    /// Replay only the last this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    pub first_seq: u64,
    pub next_seq: u64,
    /// Where the replay starts.
    pub from_seq: u64,
    pub tty: bool,
}

/// How a session stream ended: `exited` (the session ended and its log
/// is drained), `end of log` (logs without follow), `detached` (taken
/// over by another input owner), `sent` (send finished).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionEnd {
    pub reason: String,
    pub next_seq: u64,
    #[serde(default)]
    pub bytes_sent: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("malformed {kind:?} frame: {why}")]
    Malformed { kind: Kind, why: String },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, payload: impl Into<Vec<u8>>) -> Frame {
        Frame {
            kind,
            payload: payload.into(),
        }
    }

    pub fn json<T: Serialize>(kind: Kind, v: &T) -> Frame {
        Frame::new(kind, serde_json::to_vec(v).unwrap_or_default())
    }

    pub fn u32(kind: Kind, n: u32) -> Frame {
        Frame::new(kind, n.to_be_bytes())
    }

    /// A piece of session output.
    pub fn output(seq: u64, stream: u8, bytes: &[u8]) -> Frame {
        let mut p = Vec::with_capacity(9 + bytes.len());
        p.extend_from_slice(&seq.to_be_bytes());
        p.push(stream);
        p.extend_from_slice(bytes);
        Frame::new(Kind::Output, p)
    }

    /// `(seq, stream, bytes)` of an [`Kind::Output`] frame.
    pub fn parse_output(&self) -> Result<(u64, u8, &[u8]), StreamError> {
        if self.payload.len() < 9 {
            return Err(self.malformed("shorter than its header"));
        }
        let seq = u64::from_be_bytes(self.payload[..8].try_into().unwrap_or_default());
        let stream = self.payload[8];
        if !(1..=2).contains(&stream) {
            return Err(self.malformed(format!("stream {stream}")));
        }
        Ok((seq, stream, &self.payload[9..]))
    }

    pub fn resize(w: WinSize) -> Frame {
        let mut p = w.rows.to_be_bytes().to_vec();
        p.extend_from_slice(&w.cols.to_be_bytes());
        Frame::new(Kind::Resize, p)
    }

    pub fn signal(sig: i32) -> Frame {
        Frame::new(Kind::Signal, sig.to_be_bytes())
    }

    fn malformed(&self, why: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            kind: self.kind,
            why: why.into(),
        }
    }

    pub fn parse_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, StreamError> {
        serde_json::from_slice(&self.payload).map_err(|e| self.malformed(e.to_string()))
    }

    pub fn parse_u32(&self) -> Result<u32, StreamError> {
        let b: [u8; 4] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| self.malformed("expected 4 bytes"))?;
        Ok(u32::from_be_bytes(b))
    }

    pub fn parse_signal(&self) -> Result<i32, StreamError> {
        let n = self.parse_u32()? as i32;
        if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(self.malformed(format!("signal {n} is out of range")))
        }
    }

    pub fn parse_resize(&self) -> Result<WinSize, StreamError> {
        let b: [u8; 4] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| self.malformed("expected 4 bytes"))?;
        Ok(WinSize {
            rows: u16::from_be_bytes([b[0], b[1]]),
            cols: u16::from_be_bytes([b[2], b[3]]),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.payload.len());
        out.push(self.kind as u8);
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Reads one frame; `None` at a clean end of stream (between frames).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, StreamError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..]).await?;
    let kind = Kind::from_byte(head[0]).ok_or(StreamError::UnknownKind(head[0]))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(StreamError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { kind, payload }))
}

/// Writes one frame (data longer than [`MAX_PAYLOAD`] must be split first).
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), StreamError> {
    if f.payload.len() > MAX_PAYLOAD {
        return Err(StreamError::TooLarge(f.payload.len()));
    }
    w.write_all(&f.encode()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let frames = [
            Frame::new(Kind::Stdin, b"hello".to_vec()),
            Frame::new(Kind::Stdin, Vec::new()),
            Frame::resize(WinSize { rows: 33, cols: 97 }),
            Frame::signal(15),
            Frame::u32(Kind::Ack, 65536),
            Frame::json(
                Kind::Open,
                &Open {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
            ),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write(&mut wire, f).await.unwrap();
        }
        let mut r = wire.as_slice();
        for f in &frames {
            assert_eq!(read(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert!(read(&mut r).await.unwrap().is_none());
        assert_eq!(
            Frame::resize(WinSize { rows: 33, cols: 97 })
                .parse_resize()
                .unwrap(),
            WinSize { rows: 33, cols: 97 }
        );
        assert!(Frame::signal(0).parse_signal().is_err());
        assert!(Frame::signal(65).parse_signal().is_err());

        let mut r: &[u8] = &[0x7f, 0, 0, 0, 0];
        assert!(matches!(read(&mut r).await, Err(StreamError::UnknownKind(0x7f))));
        let big = ((MAX_PAYLOAD + 1) as u32).to_be_bytes();
        let mut r: &[u8] = &[0x02, big[0], big[1], big[2], big[3]];
        assert!(matches!(read(&mut r).await, Err(StreamError::TooLarge(_))));
        // Cut inside a frame: an error, not a clean end.
        let mut r: &[u8] = &[0x02, 0, 0, 0, 9, b'x'];
        assert!(read(&mut r).await.is_err());
    }
}
