//! The applications' own logs of acknowledged writes (their write-latency logs): one line per
//! write, `<n> … <ack_unix_ns>` — the record's number first, the moment the application was
//! told it is durable last. They are what the lab measures freezes and losses against.
//!
//! The mmap application's log is its data file itself, read through its own node's mount
//! (which holds the dirty pages): fixed-width records in a file sized in advance, so its
//! unwritten tail is zeros, and the log ends at the first zero byte.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Nanoseconds since the Unix epoch (the clock every process of the lab shares).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The longest time an application went without an acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gap {
    pub ms: u64,
    /// When the gap ended (the acknowledgement that closed it).
    pub ended_ns: u64,
}

/// One application's ack log, read as it grows.
#[derive(Debug)]
pub struct AckLog {
    /// Which application (for messages): `postgres`, `sqlite wal.db`, ...
    pub app: String,
    /// The node the application runs on.
    pub node: usize,
    /// Where its records are in the volume's tree (a restored copy's), for the applications
    /// whose records are a file: `buffer/records.log`, `app/run-1/records.log`, ...
    pub records: Option<PathBuf>,
    pub path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// `(n, ack_unix_ns)` of every complete line so far, in the order written.
    entries: Vec<(u64, u64)>,
    /// Whether the application still runs (a finished one's log no longer grows).
    pub live: bool,
}

impl AckLog {
    pub fn new(app: &str, node: usize, path: &Path) -> AckLog {
        AckLog {
            app: app.into(),
            node,
            records: None,
            path: path.into(),
            offset: 0,
            partial: Vec::new(),
            entries: Vec::new(),
            live: true,
        }
    }

    /// The same log, saying where the application's records are in the volume's tree.
    pub fn with_records(mut self, records: &Path) -> AckLog {
        self.records = Some(records.into());
        self
    }

    /// Reads the lines written since the last call (a line still being written waits), up to
    /// the first zero byte (a mapped file's unwritten tail).
    pub fn refresh(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut bytes = Vec::new();
        loop {
            let Ok(chunk) = reader.fill_buf() else {
                return;
            };
            if chunk.is_empty() {
                break;
            }
            if let Some(zero) = chunk.iter().position(|&b| b == 0) {
                bytes.extend_from_slice(&chunk[..zero]);
                break;
            }
            bytes.extend_from_slice(chunk);
            let n = chunk.len();
            reader.consume(n);
        }
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in String::from_utf8_lossy(&complete).lines() {
            let mut words = line.split_whitespace();
            let n = words.next().and_then(|w| w.parse().ok());
            let at = words.last().and_then(|w| w.parse().ok());
            match (n, at) {
                (Some(n), Some(at)) => self.entries.push((n, at)),
                _ => panic!(
                    "{}: a line of {} is not `<n> … <ack_unix_ns>`: {line:?}",
                    self.app,
                    self.path.display()
                ),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last acknowledgement read.
    pub fn last(&self) -> Option<(u64, u64)> {
        self.entries.last().copied()
    }

    /// The records acknowledged strictly before `bound_ns`: their numbers, in order.
    pub fn acked_before(&self, bound_ns: u64) -> &[(u64, u64)] {
        let end = self.entries.partition_point(|&(_, at)| at < bound_ns);
        &self.entries[..end]
    }

    /// The longest gap between two consecutive acknowledgements that overlaps
    /// `[from_ns, to_ns]`, and, when the log's last acknowledgement is before `to_ns`, the time
    /// from it to `to_ns` (an application that has not written since).
    pub fn longest_gap(&self, from_ns: u64, to_ns: u64) -> Gap {
        self.gap_overlapping(from_ns, to_ns, false)
    }

    /// The longest time without an acknowledged write within `[from_ns, to_ns]` only: a gap
    /// that began before `from_ns` counts from `from_ns`, one that ends after `to_ns` until
    /// `to_ns`.
    pub fn longest_gap_within(&self, from_ns: u64, to_ns: u64) -> Gap {
        self.gap_overlapping(from_ns, to_ns, true)
    }

    /// The longest gap overlapping `[from_ns, to_ns]`, whole or (`clip`) only its part inside.
    fn gap_overlapping(&self, from_ns: u64, to_ns: u64, clip: bool) -> Gap {
        let (low, high) = if clip {
            (from_ns, to_ns)
        } else {
            (0, u64::MAX)
        };
        let start = self
            .entries
            .partition_point(|&(_, at)| at < from_ns)
            .saturating_sub(1);
        let mut longest = Gap::default();
        let mut previous: Option<u64> = None;
        for &(_, at) in &self.entries[start..] {
            if let Some(p) = previous {
                if p > to_ns {
                    break;
                }
                let ms = at.min(high).saturating_sub(p.max(low)) / 1_000_000;
                if ms > longest.ms {
                    longest = Gap { ms, ended_ns: at };
                }
            }
            previous = Some(at);
        }
        if let (true, Some(p)) = (self.live, previous) {
            if p < to_ns {
                let ms = (to_ns - p.max(low)) / 1_000_000;
                if ms > longest.ms {
                    longest = Gap {
                        ms,
                        ended_ns: to_ns,
                    };
                }
            }
        }
        longest
    }

    /// The longest gap in the whole log (after its first acknowledgement).
    pub fn longest_gap_ever(&self) -> Gap {
        let mut longest = Gap::default();
        for pair in self.entries.windows(2) {
            let ms = pair[1].1.saturating_sub(pair[0].1) / 1_000_000;
            if ms > longest.ms {
                longest = Gap {
                    ms,
                    ended_ns: pair[1].1,
                };
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_complete_lines_as_they_come_and_measures_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let ms = 1_000_000;
        std::fs::write(
            &path,
            format!("1 5 {}\n2 6 {}\n3 7 {}", 10 * ms, 20 * ms, 500 * ms),
        )
        .unwrap();
        let mut log = AckLog::new("app", 0, &path);
        log.refresh();
        assert_eq!(log.len(), 2, "the third line is not complete yet");
        std::fs::write(
            &path,
            format!(
                "1 5 {}\n2 6 {}\n3 7 {}\n4 {}\n",
                10 * ms,
                20 * ms,
                500 * ms,
                510 * ms
            ),
        )
        .unwrap();
        log.refresh();
        assert_eq!(log.last(), Some((4, 510 * ms)));
        assert_eq!(log.acked_before(500 * ms).len(), 2);
        assert_eq!(log.acked_before(501 * ms).last(), Some(&(3, 500 * ms)));
        assert_eq!(log.longest_gap(0, 600 * ms).ms, 480);
        // Within a window only: the 20..500 gap counts from 300 (and until 400).
        assert_eq!(log.longest_gap_within(300 * ms, 510 * ms).ms, 200);
        assert_eq!(log.longest_gap_within(300 * ms, 400 * ms).ms, 100);
        assert_eq!(
            log.longest_gap(505 * ms, 600 * ms).ms,
            90,
            "the open end counts"
        );
        log.live = false;
        assert_eq!(
            log.longest_gap(0, 600 * ms),
            Gap {
                ms: 480,
                ended_ns: 500 * ms
            }
        );
        assert_eq!(log.longest_gap(505 * ms, 600 * ms).ms, 10);
        assert_eq!(log.longest_gap_ever().ms, 480);
    }

    #[test]
    fn a_mapped_log_ends_at_its_first_zero_byte_and_grows_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.map");
        let record = |n: u64| format!("{n:>12} {:>19}\n", n * 1_000_000);
        let mut map = vec![0u8; 33 * 4];
        map[..33].copy_from_slice(record(1).as_bytes());
        map[33..50].copy_from_slice(&record(2).as_bytes()[..17]);
        std::fs::write(&path, &map).unwrap();
        let mut log = AckLog::new("mmap", 0, &path);
        log.refresh();
        assert_eq!(log.last(), Some((1, 1_000_000)), "record 2 is half stored");
        map[33..66].copy_from_slice(record(2).as_bytes());
        std::fs::write(&path, &map).unwrap();
        log.refresh();
        assert_eq!((log.len(), log.last()), (2, Some((2, 2_000_000))));
    }
}
