//! The lab's own applications: they write numbered records into PostgreSQL or an SQLite
//! database, one transaction each, continuously, and log every acknowledged write with its
//! timing. `quiesce-lab pg-load` / `sqlite-load` run them.
//!
//! Log line, appended (one `write`) after the COMMIT returned: `<n> <start_unix_ns> <ack_unix_ns>`.
//! Numbers start at 1 and follow each other; a loader restarted on the same database goes on
//! from the highest record there.

use crate::acks::unix_ns;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// How a loader stops: only by being killed, or when a write fails (the error says which).
pub type LoadError = String;

fn ack_log(path: &Path) -> Result<std::fs::File, LoadError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open the ack log {}: {e}", path.display()))
}

/// Keeps one write per `interval` (a pace, not synchronisation: a blocked write simply delays
/// the next one).
struct Pace {
    next: Instant,
    interval: Duration,
}

impl Pace {
    fn new(interval: Duration) -> Pace {
        Pace {
            next: Instant::now(),
            interval,
        }
    }

    fn wait(&mut self) {
        let now = Instant::now();
        if now < self.next {
            std::thread::sleep(self.next - now);
        }
        self.next = Instant::now().max(self.next) + self.interval;
    }
}

/// Writes records into `records(n, at, payload)` of PostgreSQL at `socket_dir`:`port`, forever.
pub fn postgres(
    socket_dir: &Path,
    port: u16,
    log: &Path,
    interval: Duration,
) -> Result<(), LoadError> {
    let mut client = postgres::Config::new()
        .host_path(socket_dir)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .application_name("quiesce-lab pg-load")
        .connect(postgres::NoTls)
        .map_err(|e| {
            format!(
                "cannot connect to PostgreSQL at {}: {e}",
                socket_dir.display()
            )
        })?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS records (n bigint PRIMARY KEY, \
             at timestamptz NOT NULL DEFAULT now(), payload text NOT NULL)",
        )
        .map_err(|e| format!("cannot create the table records: {e}"))?;
    let mut n: i64 = client
        .query_one("SELECT coalesce(max(n), 0) FROM records", &[])
        .map_err(|e| format!("cannot read the last record: {e}"))?
        .get(0);
    let insert = client
        .prepare("INSERT INTO records (n, payload) VALUES ($1, $2)")
        .map_err(|e| format!("cannot prepare the insert: {e}"))?;
    let mut log_file = ack_log(log)?;
    let mut pace = Pace::new(interval);
    loop {
        pace.wait();
        n += 1;
        let start = unix_ns();
        // Autocommit: its own transaction, durable when it returns (synchronous_commit = on).
        client
            .execute(
                &insert,
                &[&n, &format!("record {n} written by quiesce-lab")],
            )
            .map_err(|e| format!("inserting record {n}: {e}"))?;
        let line = format!("{n} {start} {}\n", unix_ns());
        log_file
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot append to {}: {e}", log.display()))?;
    }
}

/// Writes records into `records(n, payload)` of the SQLite database `db` (made with journal
/// mode `mode` if new), forever.
pub fn sqlite(db: &Path, mode: &str, log: &Path, interval: Duration) -> Result<(), LoadError> {
    let what = |e: rusqlite::Error| format!("{}: {e}", db.display());
    let connection = rusqlite::Connection::open(db).map_err(what)?;
    // Writers wait (the quiesce writer holds the write lock while frozen); long enough that
    // only a real failure ends the loader.
    connection
        .busy_timeout(Duration::from_secs(600))
        .map_err(what)?;
    let got: String = connection
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .map_err(what)?;
    if !got.eq_ignore_ascii_case(mode) {
        return Err(format!(
            "{}: journal mode {got}, wanted {mode}",
            db.display()
        ));
    }
    connection
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS records (n INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
        )
        .map_err(what)?;
    let mut n: i64 = connection
        .query_row("SELECT coalesce(max(n), 0) FROM records", [], |r| r.get(0))
        .map_err(what)?;
    let mut insert = connection
        .prepare("INSERT INTO records (n, payload) VALUES (?1, ?2)")
        .map_err(what)?;
    let mut log_file = ack_log(log)?;
    let mut pace = Pace::new(interval);
    loop {
        pace.wait();
        n += 1;
        let start = unix_ns();
        insert
            .execute(rusqlite::params![
                n,
                format!("record {n} written by quiesce-lab")
            ])
            .map_err(|e| format!("{}: inserting record {n}: {e}", db.display()))?;
        let line = format!("{n} {start} {}\n", unix_ns());
        log_file
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot append to {}: {e}", log.display()))?;
    }
}
