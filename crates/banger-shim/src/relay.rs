//! One containerd connection, relayed frame by frame to the task server.
//!
//! containerd treats the end of its ttrpc connection as the shim's death:
//! it runs `shim delete`, reports the task exited and forgets it. The
//! keeper holds that connection, so a task server that crashes or is
//! killed costs containerd nothing but a short wait: the relay reconnects
//! to the restarted server and sends it again every request still
//! unanswered whose repetition is harmless (a `Wait` blocked on a task,
//! `State`, ...). Any other unanswered request (a `Kill`, a `Start`) gets
//! an `UNAVAILABLE` answer rather than being run twice or never.
//!
//! The relay reads whole ttrpc frames (a 10-byte header: length, stream
//! id, type, flags) so that a server dying mid-answer never leaves half a
//! frame on containerd's side.
//!
//! Every unanswered request is also written to `pending/<conn>-<stream>`
//! before it is forwarded (and removed once answered), so a keeper that
//! itself died and was restarted by the server (see `keeper`) picks each
//! connection up where the last one left it, with the same rule.

use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::{self, Code, Request, Response};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HEADER: usize = 10;
const REQUEST: u8 = 1;
const RESPONSE: u8 = 2;
/// ttrpc's own limit on a message.
const MAX_FRAME: usize = 4 << 20;
/// How long a restarted server may take to listen again.
const RECONNECT: Duration = Duration::from_secs(30);

/// Requests that may safely reach a server twice: reads, and `Wait`.
const REPLAYABLE: &[&str] = &["Wait", "State", "Pids", "Stats", "Connect"];

struct Frame {
    stream: u32,
    kind: u8,
    bytes: Vec<u8>,
}

fn read_frame(r: &mut impl Read) -> std::io::Result<Frame> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a ttrpc frame of {len} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(HEADER + len);
    bytes.extend_from_slice(&h);
    bytes.resize(HEADER + len, 0);
    r.read_exact(&mut bytes[HEADER..])?;
    Ok(Frame {
        stream: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        kind: h[8],
        bytes,
    })
}

/// An `UNAVAILABLE` answer to stream `stream`.
fn unavailable(stream: u32, method: &str) -> Vec<u8> {
    let status = ttrpc::get_status(
        Code::UNAVAILABLE,
        format!("the shim's task server restarted while handling {method}; try again"),
    );
    let payload = Response {
        status: MessageField::some(status),
        ..Default::default()
    }
    .write_to_bytes()
    .unwrap_or_default();
    let mut f = Vec::with_capacity(HEADER + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(&[RESPONSE, 0]);
    f.extend_from_slice(&payload);
    f
}

struct Pending {
    method: String,
    frame: Vec<u8>,
}

/// What every relay of one keeper shares.
pub struct Ctx {
    /// The task server's socket.
    pub server: PathBuf,
    /// Where unanswered requests are written down.
    pub pending: PathBuf,
    pub log: Arc<dyn Fn(String) + Send + Sync>,
    /// Called once containerd has closed connection `id`.
    pub on_close: Arc<dyn Fn(u64) + Send + Sync>,
}

struct Shared {
    id: u64,
    down: Mutex<UnixStream>,
    /// The server's end, replaced on reconnect; its lock also orders a
    /// request's recording against a replay.
    up: Mutex<Option<UnixStream>>,
    pending: Mutex<BTreeMap<u32, Pending>>,
    ctx: Arc<Ctx>,
}

impl Shared {
    fn note(&self, stream: u32) -> PathBuf {
        self.ctx.pending.join(format!("{}-{stream}", self.id))
    }
}

fn method_of(frame: &[u8]) -> String {
    Request::parse_from_bytes(frame.get(HEADER..).unwrap_or_default())
        .map(|r| r.method)
        .unwrap_or_default()
}

/// Relays connection `id` from containerd to the task server until
/// containerd hangs up or the server cannot be reached again. `adopted`:
/// a connection a previous keeper relayed, whose unanswered requests are
/// read back and replayed or refused.
pub fn spawn(id: u64, down: UnixStream, ctx: Arc<Ctx>, adopted: bool) -> std::io::Result<()> {
    let down_reader = down.try_clone()?;
    let mut pending = BTreeMap::new();
    if adopted {
        let prefix = format!("{id}-");
        for e in std::fs::read_dir(&ctx.pending).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stream) = name.strip_prefix(&prefix).and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Ok(frame) = std::fs::read(e.path()) {
                pending.insert(
                    stream,
                    Pending {
                        method: method_of(&frame),
                        frame,
                    },
                );
            }
        }
    }
    let s = Arc::new(Shared {
        id,
        down: Mutex::new(down),
        up: Mutex::new(None),
        pending: Mutex::new(pending),
        ctx,
    });
    let first = connect(&s.ctx.server)?;
    let writer = first.try_clone()?;
    {
        let mut slot = s.up.lock().unwrap_or_else(|p| p.into_inner());
        resend(&s, &writer);
        *slot = Some(writer);
    }
    {
        let s = s.clone();
        std::thread::spawn(move || requests(s, down_reader));
    }
    std::thread::spawn(move || answers(s, first));
    Ok(())
}

fn connect(server: &PathBuf) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + RECONNECT;
    loop {
        match UnixStream::connect(server) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// containerd → server. A request is recorded as pending (in memory and
/// on disk) before it is written, under the server lock, so a reconnect
/// either sees it (and replays or answers it) or it goes to the new
/// server.
fn requests(s: Arc<Shared>, mut down: UnixStream) {
    while let Ok(f) = read_frame(&mut down) {
        let mut up = s.up.lock().unwrap_or_else(|p| p.into_inner());
        if f.kind == REQUEST {
            let _ = std::fs::write(s.note(f.stream), &f.bytes);
            s.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(
                f.stream,
                Pending {
                    method: method_of(&f.bytes),
                    frame: f.bytes.clone(),
                },
            );
        }
        // A failed write is the server gone: the answer side reconnects
        // and deals with what is pending.
        if let Some(u) = up.as_mut() {
            let _ = u.write_all(&f.bytes);
        }
    }
    // containerd hung up: so does the server's side, which ends `answers`.
    if let Some(u) = s.up.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = u.shutdown(std::net::Shutdown::Both);
    }
    for stream in std::mem::take(&mut *s.pending.lock().unwrap_or_else(|p| p.into_inner())).into_keys() {
        let _ = std::fs::remove_file(s.note(stream));
    }
    (s.ctx.on_close)(s.id);
}

/// After a reconnect (or an adoption): what is pending and may run twice
/// goes to the server again; the rest is answered `UNAVAILABLE`.
fn resend(s: &Shared, writer: &UnixStream) {
    let mut pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
    if pending.is_empty() {
        return;
    }
    let mut replayed = Vec::new();
    let mut refused = Vec::new();
    for (stream, p) in pending.iter() {
        if REPLAYABLE.contains(&p.method.as_str()) {
            replayed.push(p.method.clone());
            let _ = (&*writer).write_all(&p.frame);
        } else {
            refused.push((*stream, p.method.clone()));
        }
    }
    for (stream, method) in &refused {
        pending.remove(stream);
        let _ = s
            .down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&unavailable(*stream, method));
        let _ = std::fs::remove_file(s.note(*stream));
    }
    (s.ctx.log)(format!(
        "connection {}: replayed {replayed:?}, refused {:?}",
        s.id,
        refused.iter().map(|(_, m)| m).collect::<Vec<_>>()
    ));
}

/// server → containerd, reconnecting when the server goes. An answer is
/// written to containerd before its request's note is removed.
fn answers(s: Arc<Shared>, mut up: UnixStream) {
    loop {
        while let Ok(f) = read_frame(&mut up) {
            if s.down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(&f.bytes)
                .is_err()
            {
                return;
            }
            if f.kind == RESPONSE {
                s.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&f.stream);
                let _ = std::fs::remove_file(s.note(f.stream));
            }
        }
        // The server went. If containerd went first there is nothing to do.
        let mut slot = s.up.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            return;
        }
        let Ok(new) = connect(&s.ctx.server) else {
            (s.ctx.log)(format!("task server unreachable at {}", s.ctx.server.display()));
            let _ = s
                .down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown(std::net::Shutdown::Both);
            return;
        };
        let Ok(writer) = new.try_clone() else { return };
        resend(&s, &writer);
        *slot = Some(writer);
        drop(slot);
        up = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_answer_is_a_ttrpc_response_frame_for_its_stream() {
        let f = unavailable(7, "Kill");
        let frame = read_frame(&mut &f[..]).unwrap();
        assert_eq!((frame.stream, frame.kind), (7, RESPONSE));
        let r = Response::parse_from_bytes(&frame.bytes[HEADER..]).unwrap();
        assert_eq!(r.status.code.value(), Code::UNAVAILABLE as i32);
        assert!(r.status.message.contains("Kill"));
    }

    #[test]
    fn an_oversized_frame_is_refused_not_allocated() {
        let mut h = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, REQUEST, 0];
        h.extend_from_slice(&[0; 16]);
        assert!(read_frame(&mut &h[..]).is_err());
    }
}
