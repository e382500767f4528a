//! The application's own work — numbered records appended to `records.log` — and the hold that
//! a freeze puts on it.
//!
//! One thread (`Records::run`) writes the records. It writes each record while holding the state
//! mutex, so whoever takes that mutex finds no record half-written. A freeze sets `hold` and waits
//! for the loop to acknowledge: the loop, at its next record boundary, parks (`paused`), notes the
//! last record and the `frozen` event, and writes nothing until the hold is released by a thaw,
//! an abort, shutdown, or its own hold limit.
//!
//! Records go to the file by `write()` (the default) or, with `--mmap`, into a shared mapping of
//! `records.map`: fixed-width records at `(seq - 1) * RECORD_BYTES`, never synced by the
//! application — durability left to the kernel, as LMDB's `MDB_WRITEMAP | MDB_NOSYNC` or a
//! memory-mapped cache leaves it. Such pages sit dirty in this node's kernel until writeback:
//! the data a shared volume's snapshot misses unless the node flushes its cache.

use anyhow::{bail, Context};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default pace of the writing loop: at most one record per millisecond.
pub const PACE: Duration = Duration::from_millis(1);

/// The file the records go to, inside the data directory.
pub const RECORDS_FILE: &str = "records.log";
/// The file the records go to in `--mmap` mode.
pub const MAP_FILE: &str = "records.map";
/// The width of one record in `records.map`: `{seq:>12} {unix_ns:>19}\n`.
pub const RECORD_BYTES: usize = 33;

/// Where the records go.
enum Sink {
    /// Appended by `write()`, one per record.
    Append(File),
    /// Stored into a shared mapping of `records.map`.
    Map(memmap2::MmapMut),
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Prints one diagnostic line on stderr.
pub fn log(message: &str) {
    eprintln!("app-writer: {message}");
}

/// The optional events file: one line per event, each written with one `write()` on an
/// unbuffered file opened for appending.
pub struct Events(File);

impl Events {
    pub fn open(path: &Path) -> anyhow::Result<Events> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the events file {}", path.display()))?;
        Ok(Events(file))
    }

    pub fn line(&self, line: &str) {
        if let Err(e) = (&self.0).write_all(format!("{line}\n").as_bytes()) {
            log(&format!(
                "cannot write event {line:?} to the events file: {e}"
            ));
        }
    }
}

#[derive(Default)]
struct State {
    /// The last record fully written (0: none yet).
    last_seq: u64,
    /// Writes are requested held (Freeze); cleared by Thaw, Abort or the hold limit.
    hold: bool,
    /// Bumped each time `hold` goes from false to true: one epoch per hold.
    epoch: u64,
    /// The epoch the writing loop last acknowledged by parking.
    parked_epoch: u64,
    /// The writing loop is parked at a record boundary and writes nothing.
    paused: bool,
    /// `last_seq` when the loop parked.
    seq_at_freeze: u64,
    shutdown: bool,
    /// Why the writing loop stopped, if it stopped on an error.
    failed: Option<String>,
}

pub struct Records {
    state: Mutex<State>,
    changed: Condvar,
    sink: Mutex<Sink>,
    events: Option<Events>,
    hold_limit: Duration,
    /// At most one record per `pace`.
    pace: Duration,
}

impl Records {
    /// Creates (truncates) `dir/records.log`: a run numbers its records from 1.
    pub fn create(
        dir: &Path,
        events: Option<Events>,
        hold_limit: Duration,
    ) -> anyhow::Result<Records> {
        let path = dir.join(RECORDS_FILE);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self::with_sink(Sink::Append(file), events, hold_limit))
    }

    /// Creates (truncates) `dir/records.map` with room for `capacity` records and maps it
    /// shared. The descriptor is closed before any record is stored: closing a file's
    /// descriptor makes some file systems (FUSE) write its dirty pages back, which would hide
    /// what this mode is for.
    pub fn create_mapped(
        dir: &Path,
        capacity: u64,
        events: Option<Events>,
        hold_limit: Duration,
    ) -> anyhow::Result<Records> {
        let path = dir.join(MAP_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.set_len(capacity * RECORD_BYTES as u64)
            .with_context(|| format!("cannot size {}", path.display()))?;
        // SAFETY: the file is this process's own (created and truncated just now); nothing
        // else resizes it while it is mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        drop(file);
        Ok(Self::with_sink(Sink::Map(map), events, hold_limit))
    }

    fn with_sink(sink: Sink, events: Option<Events>, hold_limit: Duration) -> Records {
        Records {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            sink: Mutex::new(sink),
            events,
            hold_limit,
            pace: PACE,
        }
    }

    /// Writes at most one record per `pace` instead of [`PACE`].
    pub fn with_pace(mut self, pace: Duration) -> Records {
        self.pace = pace;
        self
    }

    fn store(&self, seq: u64) -> anyhow::Result<()> {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *sink {
            Sink::Append(file) => {
                let record = format!("{seq} {}\n", unix_ns());
                file.write_all(record.as_bytes())
                    .with_context(|| format!("cannot write record {seq} to {RECORDS_FILE}"))
            }
            Sink::Map(map) => {
                let record = format!("{seq:>12} {:>19}\n", unix_ns());
                let at = (seq as usize - 1) * RECORD_BYTES;
                let Some(slot) = map.get_mut(at..at + RECORD_BYTES) else {
                    bail!("{MAP_FILE} is full at record {seq}: start again with a larger --mmap-records");
                };
                slot.copy_from_slice(record.as_bytes());
                Ok(())
            }
        }
    }

    pub fn event(&self, line: &str) {
        if let Some(events) = &self.events {
            events.line(line);
        }
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

    /// The writing loop; returns on shutdown, or with an error when a record cannot be written.
    pub fn run(&self) -> anyhow::Result<()> {
        let mut next = Instant::now();
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return Ok(());
            }
            if st.hold {
                st = self.park(st);
                next = Instant::now();
                continue;
            }
            let now = Instant::now();
            if now < next {
                // Pacing, not synchronisation: a freeze or shutdown wakes this wait at once.
                st = self.wait_until(st, next);
                continue;
            }
            let seq = st.last_seq + 1;
            // Written under the state lock, in one write() on an unbuffered file (or one store
            // into the mapping): a freeze that takes the lock finds the record either wholly
            // there or not begun.
            if let Err(e) = self.store(seq) {
                let why = format!("{e:#}");
                st.failed = Some(why.clone());
                self.changed.notify_all();
                bail!(why);
            }
            st.last_seq = seq;
            self.changed.notify_all();
            next += self.pace;
            if next <= now {
                next = now + self.pace; // fell behind: keep the pace, do not burst
            }
        }
    }

    /// Parks the loop at a record boundary until the hold of the current epoch ends.
    fn park<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let epoch = st.epoch;
        st.paused = true;
        st.parked_epoch = epoch;
        st.seq_at_freeze = st.last_seq;
        self.event(&format!("frozen {} {}", unix_ns(), st.last_seq));
        self.changed.notify_all();
        let limit = Instant::now() + self.hold_limit;
        while !st.shutdown && st.hold && st.epoch == epoch {
            if Instant::now() >= limit {
                log(&format!(
                    "writes held for {} ms without a thaw: resuming on my own",
                    self.hold_limit.as_millis()
                ));
                st.hold = false;
                break;
            }
            st = self.wait_until(st, limit);
        }
        // A thaw followed at once by a new freeze (another epoch) also ends this hold: the loop
        // reports the thaw and parks again for the new one, which gets its own `frozen` event.
        st.paused = false;
        if !st.shutdown {
            self.event(&format!("thawed {}", unix_ns()));
        }
        self.changed.notify_all();
        st
    }

    /// Freeze: holds writes and waits (at most `within`) until the loop is parked at a record
    /// boundary. Returns the last record written before the hold. Idempotent: while already
    /// held, it returns the same record. No fsync: the snapshot captures what is written to the
    /// file system (FACTS: a btrfs snapshot flushes the subvolume's dirty data itself), and an
    /// fsync here would only hold every writer longer; prepare fsyncs what came before.
    pub fn hold(&self, within: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + within;
        let mut st = self.lock();
        if !st.hold {
            st.hold = true;
            st.epoch += 1;
            self.changed.notify_all();
        }
        let epoch = st.epoch;
        loop {
            if let Some(why) = &st.failed {
                bail!("the writing loop has stopped: {why}");
            }
            if st.shutdown {
                bail!("the application is shutting down");
            }
            if !st.hold || st.epoch != epoch {
                bail!("writes were released (thaw, abort or hold limit) before they were held");
            }
            if st.paused && st.parked_epoch == epoch {
                break;
            }
            if Instant::now() >= deadline {
                st.hold = false;
                self.changed.notify_all();
                bail!(
                    "the writing loop did not stop at a record boundary within {} ms; writes released",
                    within.as_millis()
                );
            }
            st = self.wait_until(st, deadline);
        }
        Ok(st.seq_at_freeze)
    }

    /// Thaw or abort: releases the hold, if any, and waits (at most `within`) until the loop has
    /// resumed. Idempotent. Returns whether writes were held.
    pub fn release(&self, within: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + within;
        let mut st = self.lock();
        let was_held = st.hold || st.paused;
        if st.hold {
            st.hold = false;
            self.changed.notify_all();
        }
        while st.paused && !st.hold && !st.shutdown && st.failed.is_none() {
            if Instant::now() >= deadline {
                bail!(
                    "writes released, but the writing loop has not resumed within {} ms",
                    within.as_millis()
                );
            }
            st = self.wait_until(st, deadline);
        }
        Ok(was_held)
    }

    /// Prepare: fsyncs `records.log`. The mapping is never synced (see the module's doc).
    pub fn sync(&self) -> anyhow::Result<()> {
        if let Some(why) = &self.lock().failed {
            bail!("the writing loop has stopped: {why}");
        }
        match &*self.sink.lock().unwrap_or_else(PoisonError::into_inner) {
            Sink::Append(file) => file
                .sync_all()
                .with_context(|| format!("cannot fsync {RECORDS_FILE}")),
            Sink::Map(_) => Ok(()),
        }
    }

    /// Stops the writing loop (and any call waiting on it).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn records(dir: &Path, hold_limit: Duration) -> Arc<Records> {
        let events = Events::open(&dir.join("events")).unwrap();
        Arc::new(Records::create(dir, Some(events), hold_limit).unwrap())
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) until the loop has written `n` records: it signals each one.
    fn wait_for_records(r: &Records, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = r.lock();
        while st.last_seq < n {
            assert!(
                Instant::now() < deadline,
                "the loop wrote no {n} records in 10 s"
            );
            st = r.wait_until(st, deadline);
        }
    }

    #[test]
    fn freeze_holds_writes_at_a_record_boundary_until_thaw() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = records(dir, Duration::from_secs(30));
        let looper = std::thread::spawn({
            let r = r.clone();
            move || r.run()
        });
        wait_for_records(&r, 5);
        let seq = r.hold(Duration::from_secs(5)).unwrap();
        assert!(seq >= 5);
        // While held, the file ends exactly at the reported record, and a second freeze agrees.
        let held = lines(&dir.join(RECORDS_FILE));
        assert_eq!(held.len() as u64, seq);
        assert!(held.last().unwrap().starts_with(&format!("{seq} ")));
        assert_eq!(r.hold(Duration::from_secs(5)).unwrap(), seq);
        assert_eq!(r.lock().last_seq, seq);
        assert!(r.release(Duration::from_secs(5)).unwrap());
        assert!(
            !r.release(Duration::from_secs(5)).unwrap(),
            "thaw is idempotent"
        );
        wait_for_records(&r, seq + 3);
        r.shutdown();
        looper.join().unwrap().unwrap();
        let all = lines(&dir.join(RECORDS_FILE));
        for (i, line) in all.iter().enumerate() {
            assert!(
                line.starts_with(&format!("{} ", i + 1)),
                "record {} is {line:?}",
                i + 1
            );
        }
        let events = lines(&dir.join("events"));
        assert!(events[0].starts_with("frozen ") && events[0].ends_with(&format!(" {seq}")));
        assert!(events[1].starts_with("thawed "));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn mapped_records_sit_at_fixed_offsets_and_a_full_map_stops_the_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = Arc::new(Records::create_mapped(dir, 20, None, Duration::from_secs(30)).unwrap());
        let looper = std::thread::spawn({
            let r = r.clone();
            move || r.run()
        });
        let err = looper.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("is full at record 21"), "{err}");
        let map = std::fs::read(dir.join(MAP_FILE)).unwrap();
        assert_eq!(map.len(), 20 * RECORD_BYTES);
        for (i, record) in map.chunks(RECORD_BYTES).enumerate() {
            let text = std::str::from_utf8(record).unwrap();
            let seq: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(seq, i as u64 + 1, "{text:?}");
            assert!(text.ends_with('\n'));
        }
        assert!(r.sync().is_err(), "the stopped loop's error is reported");
    }

    #[test]
    fn the_hold_limit_resumes_writes_on_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let r = records(dir, Duration::from_millis(50));
        let looper = std::thread::spawn({
            let r = r.clone();
            move || r.run()
        });
        let seq = r.hold(Duration::from_secs(5)).unwrap();
        wait_for_records(&r, seq + 1);
        r.shutdown();
        looper.join().unwrap().unwrap();
        let events = lines(&dir.join("events"));
        assert!(events[0].starts_with("frozen "));
        assert!(events[1].starts_with("thawed "));
    }
}
