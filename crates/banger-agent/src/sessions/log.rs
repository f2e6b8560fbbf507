//! A session's output log on the guest's disk: records of
//! `seq: u64 | stream: u8 | len: u32 | bytes` in up to [`SEGMENTS`] files
//! `log.<n>`, the oldest dropped when a new one starts, so the log never
//! holds much more than its cap. `seq` numbers output by byte and keeps
//! growing across rotation, so a reader's position stays meaningful.
//!
//! Readers read the files, never the writer's memory: any number of them,
//! each at its own pace, and none can slow the process that writes. A
//! record cut short at the end (being written, or by a crash) is not
//! there yet; the next open of the log drops it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Files a log is kept in; the cap is split between them.
pub const SEGMENTS: usize = 4;
const HEADER: usize = 13;
/// The smallest segment: a tiny cap still keeps whole records.
const MIN_SEGMENT: u64 = 4096;

struct Segment {
    n: u64,
    first_seq: u64,
    bytes: u64,
}

pub struct Log {
    dir: PathBuf,
    seg_max: u64,
    segments: VecDeque<Segment>,
    current: File,
    next_seq: u64,
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("log.{n}"))
}

/// The segment numbers in `dir`, oldest first.
fn segment_numbers(dir: &Path) -> Vec<u64> {
    let mut ns: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("log.")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ns.sort_unstable();
    ns
}

/// One record: (seq, stream, bytes).
pub type Record = (u64, u8, Vec<u8>);

/// The whole records of one segment file, and where the last whole one
/// ended (a torn tail is left out).
fn read_segment(path: &Path) -> std::io::Result<(Vec<Record>, u64)> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while data.len() - at >= HEADER {
        let seq = u64::from_be_bytes(data[at..at + 8].try_into().unwrap_or_default());
        let stream = data[at + 8];
        let len = u32::from_be_bytes(data[at + 9..at + 13].try_into().unwrap_or_default()) as usize;
        if data.len() - at - HEADER < len {
            break;
        }
        out.push((seq, stream, data[at + HEADER..at + HEADER + len].to_vec()));
        at += HEADER + len;
    }
    Ok((out, at as u64))
}

impl Log {
    /// Opens the log in `dir` (made if missing), continuing after its last
    /// whole record.
    pub fn open(dir: &Path, log_max: u64) -> std::io::Result<Log> {
        std::fs::create_dir_all(dir)?;
        let seg_max = (log_max / SEGMENTS as u64).max(MIN_SEGMENT);
        let mut segments = VecDeque::new();
        let mut next_seq = 0;
        for n in segment_numbers(dir) {
            let path = seg_path(dir, n);
            let (records, whole) = read_segment(&path)?;
            if std::fs::metadata(&path)?.len() != whole {
                OpenOptions::new().write(true).open(&path)?.set_len(whole)?;
            }
            let first_seq = records.first().map(|r| r.0).unwrap_or(next_seq);
            if let Some((seq, _, b)) = records.last() {
                next_seq = seq + b.len() as u64;
            }
            segments.push_back(Segment {
                n,
                first_seq,
                bytes: whole,
            });
        }
        if segments.is_empty() {
            segments.push_back(Segment {
                n: 0,
                first_seq: 0,
                bytes: 0,
            });
        }
        let last = segments.back().map(|s| s.n).unwrap_or(0);
        let current = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(dir, last))?;
        Ok(Log {
            dir: dir.to_path_buf(),
            seg_max,
            segments,
            current,
            next_seq,
        })
    }

    pub fn first_seq(&self) -> u64 {
        self.segments
            .front()
            .map(|s| s.first_seq)
            .unwrap_or(self.next_seq)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends output as records no larger than a segment; returns the
    /// new `next_seq`. Segments never outgrow their share of the cap, so
    /// the log's files never hold more than the cap.
    pub fn append(&mut self, stream: u8, bytes: &[u8]) -> std::io::Result<u64> {
        let most = (self.seg_max as usize).saturating_sub(HEADER).max(1);
        for piece in bytes.chunks(most) {
            self.append_record(stream, piece)?;
        }
        Ok(self.next_seq)
    }

    fn append_record(&mut self, stream: u8, bytes: &[u8]) -> std::io::Result<u64> {
        let size = (HEADER + bytes.len()) as u64;
        if self
            .segments
            .back()
            .is_some_and(|s| s.bytes > 0 && s.bytes + size > self.seg_max)
        {
            let n = self.segments.back().map(|s| s.n + 1).unwrap_or(0);
            self.current = OpenOptions::new()
                .create(true)
                .append(true)
                .open(seg_path(&self.dir, n))?;
            self.segments.push_back(Segment {
                n,
                first_seq: self.next_seq,
                bytes: 0,
            });
            while self.segments.len() > SEGMENTS {
                if let Some(old) = self.segments.pop_front() {
                    let _ = std::fs::remove_file(seg_path(&self.dir, old.n));
                }
            }
        }
        let mut rec = Vec::with_capacity(HEADER + bytes.len());
        rec.extend_from_slice(&self.next_seq.to_be_bytes());
        rec.push(stream);
        rec.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        rec.extend_from_slice(bytes);
        self.current.write_all(&rec)?;
        if let Some(s) = self.segments.back_mut() {
            s.bytes += rec.len() as u64;
        }
        self.next_seq += bytes.len() as u64;
        Ok(self.next_seq)
    }
}

/// The output from byte `from` on, at most about `max` bytes of it, read
/// from the files (the first record may be cut to start at `from`).
pub fn read_from(dir: &Path, from: u64, max: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let mut got = 0usize;
    for n in segment_numbers(dir) {
        let path = seg_path(dir, n);
        // A segment rotated away meanwhile is simply gone.
        let Ok((records, _)) = read_segment(&path) else {
            continue;
        };
        if records.last().is_none_or(|(s, _, b)| s + b.len() as u64 <= from) {
            continue;
        }
        for (seq, stream, bytes) in records {
            let end = seq + bytes.len() as u64;
            if end <= from {
                continue;
            }
            let skip = from.saturating_sub(seq) as usize;
            let piece = bytes[skip..].to_vec();
            got += piece.len();
            out.push((seq + skip as u64, stream, piece));
            if got >= max {
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    /// Cuts `by` bytes off the end of a segment, as a crash mid-write would.
    fn tear(p: &Path, by: u64) {
        let mut f = OpenOptions::new().write(true).open(p).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - by).unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
    }

    #[test]
    fn a_log_rotates_within_its_cap_and_keeps_numbering() {
        let d = tempfile::tempdir().unwrap();
        let mut log = Log::open(d.path(), 64 * 1024).unwrap();
        let chunk = vec![b'x'; 1000];
        for _ in 0..1000 {
            log.append(1, &chunk).unwrap();
        }
        assert_eq!(log.next_seq(), 1_000_000);
        let on_disk: u64 = segment_numbers(d.path())
            .iter()
            .map(|n| std::fs::metadata(seg_path(d.path(), *n)).unwrap().len())
            .sum();
        assert!(on_disk <= 64 * 1024, "{on_disk} bytes kept");
        assert!(log.first_seq() > 940_000, "{}", log.first_seq());
        // Reading from before what is kept starts at the oldest kept byte.
        let recs = read_from(d.path(), 0, usize::MAX);
        assert_eq!(recs.first().unwrap().0, log.first_seq());
        // From the middle of a record: cut to start there.
        let recs = read_from(d.path(), 999_500, usize::MAX);
        assert_eq!(recs[0].0, 999_500);
        assert_eq!(recs[0].2.len(), 500);
        // A write larger than a segment is split, and the cap still holds.
        log.append(2, &vec![b'y'; 100_000]).unwrap();
        let on_disk: u64 = segment_numbers(d.path())
            .iter()
            .map(|n| std::fs::metadata(seg_path(d.path(), *n)).unwrap().len())
            .sum();
        assert!(on_disk <= 64 * 1024, "{on_disk} bytes kept after a large write");
        assert_eq!(log.next_seq(), 1_100_000);
    }

    #[test]
    fn a_torn_record_is_not_read_and_is_dropped_on_open() {
        let d = tempfile::tempdir().unwrap();
        let mut log = Log::open(d.path(), 1 << 20).unwrap();
        log.append(1, b"hello ").unwrap();
        log.append(2, b"world").unwrap();
        drop(log);
        tear(&seg_path(d.path(), 0), 2);
        let recs = read_from(d.path(), 0, usize::MAX);
        assert_eq!(recs, vec![(0, 1, b"hello ".to_vec())]);
        let mut log = Log::open(d.path(), 1 << 20).unwrap();
        assert_eq!(log.next_seq(), 6);
        log.append(1, b"again").unwrap();
        let recs = read_from(d.path(), 0, usize::MAX);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1], (6, 1, b"again".to_vec()));
    }
}
