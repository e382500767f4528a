//! The application's own work — numbered records, buffered in memory and flushed to
//! `records.log` in batches — and the hold a freeze puts on it.
//!
//! One thread (`Records::run`) makes the records, about one per `interval`, and appends them to an
//! in-memory buffer. The buffer goes to `records.log` only every `flush_records` records or
//! `flush_after`, whichever comes first: until then those records exist nowhere but in memory,
//! and a crash-consistent snapshot of the file would miss them. A flush writes the batch, fsyncs
//! the file and only then **acknowledges** the batch: it appends the number of each record, one
//! per line, to the ack log. A record is acknowledged when, and only when, it is durable.
//!
//! A freeze (from a control connection or a signal) adds a *holder*: while any holder is there,
//! the loop makes no record (the writes of the application's clients are held), and the freeze
//! flushes what is buffered, fsyncs, and answers with the last record — every record up to it is
//! in `records.log`, none after it is, and nothing is written to the file until the last holder
//! lets go (thaw, a closed control connection, or the hold limit).
//!
//! Locks: `sink` (the files) is always taken before `state`, never the other way round.

use anyhow::{bail, Context};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The file the records go to, inside the data directory.
pub const RECORDS_FILE: &str = "records.log";

/// Who holds writes: a control connection (1, 2, ...) or the signal interface.
pub type Holder = u64;

/// The holder of a freeze requested by signal.
pub const SIGNAL_HOLDER: Holder = 0;

/// Prints one diagnostic line on stderr.
pub fn log(message: &str) {
    eprintln!("buffering-app: {message}");
}

/// How the application paces and batches its writes.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// One record per `interval`.
    pub interval: Duration,
    /// Flush once this many records are buffered...
    pub flush_records: u64,
    /// ...or once the oldest buffered record is this old.
    pub flush_after: Duration,
    /// Resume writes on our own after being held this long.
    pub hold_limit: Duration,
}

#[derive(Default)]
struct State {
    /// The last record made (buffered or written); 0: none yet.
    made: u64,
    /// Records made but not yet written to `records.log`.
    buffer: Vec<u8>,
    buffered: u64,
    oldest_buffered: Option<Instant>,
    /// The last record written and fsynced.
    durable: u64,
    /// Who holds writes now; empty: nobody.
    holders: BTreeSet<Holder>,
    /// Since when writes have been held.
    held_since: Option<Instant>,
    shutdown: bool,
    /// Why the application stopped writing, if it failed.
    failed: Option<String>,
}

struct Sink {
    records: File,
    ack_log: Option<File>,
    /// The last record appended to the ack log.
    acked: u64,
    /// Write `<n> <unix_ns>` (the moment of the acknowledgement) instead of `<n>`.
    ack_times: bool,
}

pub struct Records {
    state: Mutex<State>,
    changed: Condvar,
    sink: Mutex<Sink>,
    pace: Pace,
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Records {
    /// Creates (truncates) `dir/records.log` and the ack log: a run numbers its records from 1.
    pub fn create(dir: &Path, ack_log: Option<&Path>, pace: Pace) -> anyhow::Result<Records> {
        let path = dir.join(RECORDS_FILE);
        let records =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let ack_log = ack_log
            .map(|p| {
                OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(p)
                    .with_context(|| format!("cannot create the ack log {}", p.display()))
            })
            .transpose()?;
        Ok(Records {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            sink: Mutex::new(Sink {
                records,
                ack_log,
                acked: 0,
                ack_times: false,
            }),
            pace,
        })
    }

    /// Ack log lines become `<n> <unix_ns>`: each acknowledgement with its time.
    pub fn with_ack_times(self, ack_times: bool) -> Records {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ack_times = ack_times;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_until<'a>(&self, st: MutexGuard<'a, State>, until: Instant) -> MutexGuard<'a, State> {
        let timeout = until.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(st, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// The writing loop: makes records, flushes batches, keeps the hold limit. Returns on
    /// shutdown (after a last flush), or with an error when a batch cannot be written.
    pub fn run(&self) -> anyhow::Result<()> {
        let mut next = Instant::now();
        loop {
            let mut st = self.lock();
            if st.shutdown {
                drop(st);
                return self.flush().map(|_| ());
            }
            let now = Instant::now();
            if let Some(since) = st.held_since {
                let limit = since + self.pace.hold_limit;
                if now >= limit {
                    log(&format!(
                        "writes held for {} ms without a thaw: resuming on my own",
                        self.pace.hold_limit.as_millis()
                    ));
                    st.holders.clear();
                    st.held_since = None;
                    self.changed.notify_all();
                    next = now;
                } else {
                    // Held: no record is made until a thaw, a dropped connection or the limit.
                    drop(self.wait_until(st, limit));
                }
                continue;
            }
            if now < next {
                // Pacing, not synchronisation: a freeze or shutdown wakes this wait at once.
                drop(self.wait_until(st, next));
                continue;
            }
            st.made += 1;
            let seq = st.made;
            let line = format!("{seq} {} buffered-record\n", unix_ns());
            st.buffer.extend_from_slice(line.as_bytes());
            st.buffered += 1;
            let oldest = *st.oldest_buffered.get_or_insert(now);
            let due = st.buffered >= self.pace.flush_records
                || now.duration_since(oldest) >= self.pace.flush_after;
            drop(st);
            self.changed.notify_all();
            next += self.pace.interval;
            if next <= now {
                next = now + self.pace.interval; // fell behind: keep the pace, do not burst
            }
            if due {
                self.flush()?;
            }
        }
    }

    /// Writes whatever is buffered to `records.log`, fsyncs it, then acknowledges it in the ack
    /// log. Returns the last durable record. A failure stops the application's writes for good.
    pub fn flush(&self) -> anyhow::Result<u64> {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        let (batch, last) = {
            let mut st = self.lock();
            if let Some(why) = &st.failed {
                bail!("writes have stopped: {why}");
            }
            st.buffered = 0;
            st.oldest_buffered = None;
            (std::mem::take(&mut st.buffer), st.made)
        };
        if !batch.is_empty() {
            let written = (&sink.records)
                .write_all(&batch)
                .and_then(|()| sink.records.sync_all());
            if let Err(e) = written {
                let why = format!("cannot write records up to {last} to {RECORDS_FILE}: {e}");
                let mut st = self.lock();
                st.failed = Some(why.clone());
                self.changed.notify_all();
                bail!(why);
            }
        }
        self.lock().durable = last;
        if last > sink.acked {
            // Acknowledged: durable in records.log. One write() per batch, so a reader sees whole
            // lines (appending to a file opened without O_APPEND by one writer only).
            let at = if sink.ack_times {
                format!(" {}", unix_ns())
            } else {
                String::new()
            };
            let lines: String = (sink.acked + 1..=last)
                .map(|n| format!("{n}{at}\n"))
                .collect();
            if let Some(ack_log) = &sink.ack_log {
                if let Err(e) = (&*ack_log).write_all(lines.as_bytes()) {
                    log(&format!("cannot append to the ack log: {e}"));
                }
            }
            sink.acked = last;
        }
        Ok(last)
    }

    /// Freeze for `holder`: holds writes, flushes and fsyncs everything made so far, and returns
    /// the last record — all records up to it are durable in `records.log`, and no other record
    /// is written there until the hold ends. Idempotent: a holder freezing again gets the same
    /// record.
    pub fn freeze(&self, holder: Holder) -> anyhow::Result<u64> {
        {
            let mut st = self.lock();
            if let Some(why) = &st.failed {
                bail!("writes have stopped: {why}");
            }
            if st.shutdown {
                bail!("the application is shutting down");
            }
            st.holders.insert(holder);
            st.held_since.get_or_insert_with(Instant::now);
            self.changed.notify_all();
        }
        // From here the loop makes no record; a flush it started before is finished first (the
        // sink lock), then ours writes the rest.
        let durable = match self.flush() {
            Ok(durable) => durable,
            Err(e) => {
                self.thaw(holder);
                return Err(e);
            }
        };
        let st = self.lock();
        if !st.holders.contains(&holder) {
            bail!(
                "the hold limit of {} ms passed while flushing; writes resumed",
                self.pace.hold_limit.as_millis()
            );
        }
        if st.made != durable {
            bail!(
                "internal error: record {} was made while writes were held (durable: {durable})",
                st.made
            );
        }
        Ok(durable)
    }

    /// Thaw for `holder`: drops its hold; writes resume when no holder is left. Idempotent.
    /// Returns whether `holder` held writes.
    pub fn thaw(&self, holder: Holder) -> bool {
        let mut st = self.lock();
        let was = st.holders.remove(&holder);
        if st.holders.is_empty() {
            st.held_since = None;
        }
        self.changed.notify_all();
        was
    }

    /// Stops the loop; it flushes what is buffered and returns.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.holders.clear();
        st.held_since = None;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pace(hold_limit: Duration) -> Pace {
        Pace {
            interval: Duration::from_millis(1),
            flush_records: 20,
            flush_after: Duration::from_millis(30),
            hold_limit,
        }
    }

    fn numbers(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    /// Waits (bounded) until at least `n` records were made: the loop signals each one.
    fn wait_for_made(r: &Records, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = r.lock();
        while st.made < n {
            assert!(Instant::now() < deadline, "no {n} records in 10 s");
            st = r.wait_until(st, deadline);
        }
    }

    #[test]
    fn freeze_flushes_everything_and_holds_until_the_last_holder_thaws() {
        let tmp = tempfile::tempdir().unwrap();
        let acks = tmp.path().join("acks");
        let r = Arc::new(
            Records::create(tmp.path(), Some(&acks), pace(Duration::from_secs(30))).unwrap(),
        );
        let looper = std::thread::spawn({
            let r = r.clone();
            move || r.run()
        });
        wait_for_made(&r, 7);
        let last = r.freeze(1).unwrap();
        assert!(last >= 7);
        let file = tmp.path().join(RECORDS_FILE);
        assert_eq!(numbers(&file), (1..=last).collect::<Vec<_>>());
        assert_eq!(numbers(&acks), (1..=last).collect::<Vec<_>>());
        assert_eq!(r.freeze(1).unwrap(), last, "freeze is idempotent");
        assert_eq!(r.freeze(2).unwrap(), last, "a second holder");
        assert!(r.thaw(1));
        assert!(!r.thaw(1), "thaw is idempotent");
        assert_eq!(r.lock().made, last, "still held by holder 2");
        assert!(r.thaw(2));
        wait_for_made(&r, last + 5);
        r.shutdown();
        looper.join().unwrap().unwrap();
        let all = numbers(&file);
        assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
        assert_eq!(
            numbers(&acks),
            all,
            "everything is acknowledged after shutdown"
        );
    }

    #[test]
    fn the_hold_limit_resumes_writes_on_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let r =
            Arc::new(Records::create(tmp.path(), None, pace(Duration::from_millis(50))).unwrap());
        let looper = std::thread::spawn({
            let r = r.clone();
            move || r.run()
        });
        let started = Instant::now();
        let last = r.freeze(SIGNAL_HOLDER).unwrap();
        wait_for_made(&r, last + 1);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(!r.thaw(SIGNAL_HOLDER), "the limit already dropped the hold");
        r.shutdown();
        looper.join().unwrap().unwrap();
    }
}
