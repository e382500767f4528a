//! The quiesce writer plugin for SQLite databases (plugin name `sqlite`). Configuration and
//! reports: `README.md`.
//!
//! # What each call does
//!
//! - **prepare**: finds the databases (paths and globs, expanded now), starts one holder thread
//!   per database with its own connection, and on WAL databases runs
//!   `PRAGMA wal_checkpoint(TRUNCATE)` — before any transaction: inside one it fails with
//!   `SQLITE_LOCKED`. Reports the journal mode and the checkpoint's (busy, log, checkpointed).
//! - **freeze**: `BEGIN IMMEDIATE` on every database at once, each on its holder thread, which
//!   keeps the transaction open until thaw. Reports when each lock was taken (UTC and this
//!   node's CLOCK_MONOTONIC), how long it waited, and the optional `report_query`'s value read
//!   inside the held transaction — exactly the state the snapshot holds.
//! - **thaw** / **abort**: `ROLLBACK` (nothing was written) and close the connections.
//!   Idempotent: with nothing held they do nothing.
//!
//! # Why `BEGIN IMMEDIATE` is enough, in both journal modes
//!
//! A snapshot of a database is consistent when no other connection is in the middle of
//! changing its files while the snapshot is taken: then the files hold exactly the committed
//! transactions (and SQLite's own crash recovery covers the rest, since an atomic snapshot is to
//! SQLite just like a power cut).
//!
//! - **WAL mode**: writers append to the `-wal` file under the WAL write lock; `BEGIN IMMEDIATE`
//!   takes that lock, so no other connection can append a frame or reset the WAL until thaw.
//!   Readers go on (they take no write lock). A checkpoint another connection runs meanwhile
//!   only copies frames that stay in the WAL into the database file, which is crash-safe by
//!   design: a restored copy reads those pages from the WAL. In WAL mode `IMMEDIATE` and
//!   `EXCLUSIVE` behave the same.
//! - **Rollback-journal modes** (DELETE, TRUNCATE, PERSIST): a connection changes the database
//!   file only while it holds the EXCLUSIVE lock (at commit, or when it spills its cache), and
//!   it can get EXCLUSIVE only after RESERVED and only once no other connection holds SHARED.
//!   `BEGIN IMMEDIATE` gives us SHARED + RESERVED: no other connection can get RESERVED (so no
//!   one can start writing) nor EXCLUSIVE (our SHARED blocks it, including the rollback of a
//!   hot journal, which SQLite never even attempts while someone holds RESERVED). And we only
//!   get RESERVED once any writer that held EXCLUSIVE has finished its commit or rollback. So
//!   from the lock until thaw, no process writes the database file or its journal. `BEGIN
//!   EXCLUSIVE` would additionally lock out *readers* for the whole freeze, for nothing: the
//!   snapshot needs still files, not idle readers. Hence IMMEDIATE in both modes.
//!
//! The plugin never opens a database file other than through SQLite: closing any descriptor of
//! a file drops every POSIX lock the process holds on it (that is how a lock can silently go
//! while the host believes it holds). Paths are only `stat`ed. Use the system libsqlite3 in the
//! host process (this crate does, as rusqlite without `bundled`): one SQLite per process knows
//! all its connections to a file and keeps their locks straight.
//!
//! WAL works only between processes of one machine (shared memory): configure a database on
//! the node whose processes use it.

mod clock;
mod config;
mod holder;

pub use config::DatabaseSet;

use holder::{Holder, Pending};
use quiesce_sdk::{log, Call, ComponentKind, Config, Error, Level, Writer, WriterMetadata};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Makes one writer per configured set of databases.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    Ok(config::parse(config)?
        .into_iter()
        .map(|set| Box::new(SqliteWriter::new(set)) as Box<dyn Writer>)
        .collect())
}

quiesce_sdk::export_plugin!(name: "sqlite", init: init);

/// A writer for one set of databases, frozen together.
///
/// One writer per *set* rather than per database: the databases of one application (a main
/// database and the ones it attaches, shards of one store) are only consistent with each other
/// when they are held at the same time, and their writer id then names the application in the
/// set's record. Databases of unrelated applications go in separate sets (`writers`), so that
/// one failing names its own writer.
pub struct SqliteWriter {
    set: DatabaseSet,
    session: Option<Session>,
}

/// The databases of the current snapshot set, each with its holder thread.
struct Session {
    set_id: String,
    holders: Vec<Holder>,
}

impl SqliteWriter {
    pub fn new(set: DatabaseSet) -> SqliteWriter {
        SqliteWriter { set, session: None }
    }

    /// The databases the configuration names now: literal paths (which must exist) and glob
    /// matches (regular files, without SQLite's `-wal`, `-shm` and `-journal` companions),
    /// resolved to canonical paths, sorted, each once. Only `stat`s and directory reads: no
    /// database file is opened here.
    fn resolve(&self) -> Result<Vec<PathBuf>, Error> {
        let mut found = Vec::new();
        for pattern in &self.set.databases {
            if config::is_literal(pattern) {
                let path = Path::new(pattern);
                match std::fs::metadata(path) {
                    Ok(m) if m.is_file() => found.push(canonical(path)),
                    Ok(_) => {
                        return Err(Error::new(format!(
                            "database {pattern} is not a regular file: fix `databases`"
                        )))
                    }
                    Err(e) => {
                        return Err(Error::new(format!(
                            "database {pattern}: {e}: fix `databases`, or use a glob pattern if \
                             the database may legitimately be absent"
                        )))
                    }
                }
                continue;
            }
            let matches = glob::glob(pattern)
                .map_err(|e| Error::invalid_config(format!("database pattern {pattern:?}: {e}")))?;
            for entry in matches {
                let path = entry.map_err(|e| {
                    Error::new(format!(
                        "expanding {pattern}: {e}: make the directory readable"
                    ))
                })?;
                if is_companion(&path) || !path.is_file() {
                    continue;
                }
                found.push(canonical(&path));
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Starts a holder thread per database.
    fn start_session(&self, call: &Call) -> Result<Session, Error> {
        let databases = self.resolve()?;
        if databases.is_empty() {
            log::warn!(
                "{}: no database matches {:?}: nothing to hold in set {}",
                self.set.id,
                self.set.databases,
                call.set_id()
            );
        }
        let mut holders = Vec::with_capacity(databases.len());
        for path in &databases {
            let holder = Holder::spawn(path).map_err(|e| self.error(path, &e))?;
            holders.push(holder);
        }
        Ok(Session {
            set_id: call.set_id().to_string(),
            holders,
        })
    }

    /// How long a call may wait for a lock: the configured cap, bounded by the call's deadline
    /// less a margin to answer (and, at freeze, to let go of the databases already locked).
    fn busy_timeout(&self, call: &Call) -> Duration {
        let left = call.remaining();
        let margin = (left / 10).min(Duration::from_millis(250));
        Duration::from_millis(self.set.busy_timeout_ms).min(left.saturating_sub(margin))
    }

    fn error(&self, database: &Path, message: &str) -> Error {
        Error::new(format!("database {}: {message}", database.display()))
    }

    /// Waits for one answer per holder; the errors, joined, if any failed.
    fn gather<T>(
        &self,
        holders: &[Holder],
        pending: Vec<Pending<T>>,
        deadline: Instant,
    ) -> (Vec<(PathBuf, T)>, Vec<String>) {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (holder, pending) in holders.iter().zip(pending) {
            match pending.wait(deadline) {
                Ok(value) => done.push((holder.path().to_path_buf(), value)),
                Err(e) => failed.push(format!("database {}: {e}", holder.path().display())),
            }
        }
        (done, failed)
    }

    /// Rolls back and closes everything the session holds.
    fn end_session(&mut self, call: &mut Call) -> Result<(), Error> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if session.set_id != call.set_id() {
            log::info!(
                "{}: releasing the databases held for set {} (now {})",
                self.set.id,
                session.set_id,
                call.set_id()
            );
        }
        let pending = session.holders.iter().map(Holder::release).collect();
        let (released, mut failed) = self.gather(&session.holders, pending, call.deadline());
        for (path, r) in &released {
            if let Some(held) = r.held {
                call.report(
                    format!("{}:held_ms", path.display()),
                    held.as_millis().to_string(),
                );
            }
        }
        // Close every connection, and wait for it: once this returns, the plugin has nothing
        // open on the databases. Even a release that did not answer in time ends with the
        // connection closed — and the lock gone — once its thread is through its queue.
        for holder in session.holders {
            let path = holder.path().display().to_string();
            if let Err(e) = holder.close(call.deadline()) {
                failed.push(format!("database {path}: {e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::new(failed.join("; ")))
        }
    }
}

impl Writer for SqliteWriter {
    fn metadata(&self) -> WriterMetadata {
        let mut metadata = WriterMetadata::new(
            &self.set.id,
            format!("SQLite databases ({})", self.set.databases.join(", ")),
            Level::BackEnd,
        );
        metadata.vendor_version = format!("SQLite {}", rusqlite::version());
        // The hold is one lock per database; a few milliseconds unless a writer is committing.
        metadata.expected_freeze_ms = 50;
        let databases = self.resolve().unwrap_or_default();
        if databases.is_empty() {
            // Declare the volume all the same: a writer without components would be taken to
            // concern every volume.
            return metadata.with_component(
                "databases",
                ComponentKind::Database,
                &self.set.volume,
                self.set.databases.iter(),
            );
        }
        for path in databases {
            let path = path.display().to_string();
            metadata = metadata
                .with_component(
                    format!("database:{path}"),
                    ComponentKind::Database,
                    &self.set.volume,
                    [path.clone()],
                )
                .with_component(
                    format!("log:{path}-wal"),
                    ComponentKind::Log,
                    &self.set.volume,
                    [format!("{path}-wal")],
                );
        }
        metadata
    }

    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        // Anything left from an earlier set (it was never thawed nor aborted) goes first.
        self.end_session(call)?;
        let session = self.start_session(call)?;
        let busy = self.busy_timeout(call);
        let pending = session
            .holders
            .iter()
            .map(|h| h.prepare(busy, true))
            .collect();
        let (prepared, failed) = self.gather(&session.holders, pending, call.deadline());
        if !failed.is_empty() {
            return Err(Error::new(failed.join("; ")));
        }
        call.report("databases", names(&session.holders));
        for (path, p) in prepared {
            let key = |k: &str| format!("{}:{k}", path.display());
            call.report(key("journal_mode"), p.journal_mode.clone());
            if let Some((busy, log, checkpointed)) = p.checkpoint {
                call.report(key("checkpoint.busy"), busy.to_string());
                call.report(key("checkpoint.log"), log.to_string());
                call.report(key("checkpoint.checkpointed"), checkpointed.to_string());
                if busy != 0 {
                    log::warn!(
                        "{}: the checkpoint of {} could not finish (busy): its WAL stays as \
                         long as it is ({log} frames), which is fine for the snapshot",
                        self.set.id,
                        path.display()
                    );
                }
            }
        }
        self.session = Some(session);
        Ok(())
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        if self.session.is_none() {
            log::info!(
                "{}: freeze without prepare in set {}: opening the databases now",
                self.set.id,
                call.set_id()
            );
            self.session = Some(self.start_session(call)?);
        }
        let busy = self.busy_timeout(call);
        if busy.is_zero() {
            // Nothing has been locked: the session stays for thaw or abort to close.
            return Err(Error::new(
                "no time is left in the freeze call's budget to wait for the write locks; raise \
                 [timeouts] freeze_ms in the host's configuration",
            ));
        }
        let query = self.set.report_query.clone();
        let session = self.session.as_ref().expect("set just above");
        // All databases at once: the freeze lasts as long as the slowest lock, not their sum.
        let pending = session
            .holders
            .iter()
            .map(|h| h.lock(busy, query.clone()))
            .collect();
        let (locked, failed) = self.gather(&session.holders, pending, call.deadline());
        if !failed.is_empty() {
            // Let go of the databases that did lock (a release queues behind a lock still
            // waiting), and close them all.
            let released = match self.end_session(call) {
                Ok(()) => "nothing stays locked".to_string(),
                Err(e) => format!("letting go of the others: {e}"),
            };
            return Err(Error::new(format!("{}; {released}", failed.join("; "))));
        }
        call.report("frozen", names(&session.holders));
        for (path, l) in locked {
            let key = |k: &str| format!("{}:{k}", path.display());
            call.report(key("lock_taken_at"), clock::utc(l.taken_at));
            call.report(
                key("lock_taken_monotonic_ns"),
                l.taken_monotonic_ns.to_string(),
            );
            call.report(key("lock_wait_ms"), l.waited.as_millis().to_string());
            if let Some(value) = l.query_value {
                call.report(key("report_query"), value);
            }
            if l.already_held {
                log::warn!(
                    "{}: {} was still locked from an earlier freeze; it stays locked",
                    self.set.id,
                    path.display()
                );
            }
        }
        Ok(())
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        self.end_session(call)
    }

    fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
        self.end_session(call)
    }
}

fn names(holders: &[Holder]) -> String {
    holders
        .iter()
        .map(|h| h.path().display().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// SQLite's own files next to a database, which a glob like `/srv/app/*` also matches.
fn is_companion(path: &Path) -> bool {
    let name = path.to_string_lossy();
    ["-wal", "-shm", "-journal"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// The path with symbolic links resolved (so one database named twice is held once); the path
/// as given if that fails.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
