//! One thread per database, owning its connection: the transaction that holds the database
//! still lives there from freeze until thaw.
//!
//! A rusqlite `Connection` is `Send` but not `Sync`, and the host calls a writer's methods from
//! its worker thread, one call at a time; the transaction must outlive the freeze call. So each
//! database gets a holder thread that owns the connection for the whole set and serves requests
//! in order from a channel. Order is what makes a late release safe: a release sent after a
//! lock request that is still waiting runs right after it. When the writer drops the holder
//! (thaw, abort, a failed freeze), the channel closes; the thread finishes what is queued and
//! closes the connection, which rolls back whatever is still open — no lock can outlive it.

use crate::clock;
use rusqlite::config::DbConfig;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// What prepare learnt about a database.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub journal_mode: String,
    /// `PRAGMA wal_checkpoint(TRUNCATE)`: (busy, log, checkpointed), for WAL databases.
    pub checkpoint: Option<(i64, i64, i64)>,
}

/// The write lock, as freeze took it.
#[derive(Debug, Clone)]
pub struct Locked {
    /// How long `BEGIN IMMEDIATE` waited for the lock.
    pub waited: Duration,
    /// When the lock was held (taken right after `BEGIN IMMEDIATE` returned).
    pub taken_at: SystemTime,
    /// The same moment on this node's CLOCK_MONOTONIC, in nanoseconds.
    pub taken_monotonic_ns: u128,
    /// The first column of the report query, run inside the held transaction.
    pub query_value: Option<String>,
    /// The lock was already held from an earlier freeze (nothing was done).
    pub already_held: bool,
}

/// What a release did.
#[derive(Debug, Clone)]
pub struct Released {
    /// How long the lock was held; `None` if nothing was held.
    pub held: Option<Duration>,
}

type Reply<T> = mpsc::Sender<Result<T, String>>;

enum Request {
    Prepare {
        busy: Duration,
        checkpoint: bool,
        reply: Reply<Prepared>,
    },
    Lock {
        busy: Duration,
        query: Option<String>,
        reply: Reply<Locked>,
    },
    Release {
        reply: Reply<Released>,
    },
}

/// The handle of a holder thread. Dropping it lets the thread finish its queue and close the
/// connection.
pub struct Holder {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    /// Disconnected when the thread has closed the connection and ended.
    closed: mpsc::Receiver<()>,
}

/// An answer to wait for.
pub struct Pending<T> {
    answer: mpsc::Receiver<Result<T, String>>,
}

impl<T> Pending<T> {
    /// Waits for the answer until `deadline`.
    pub fn wait(self, deadline: Instant) -> Result<T, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.answer.recv_timeout(left) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(
                "no answer within the call's deadline: the database's thread is still busy; \
                 it releases the database as soon as it is done"
                    .into(),
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the database's thread has stopped (a bug: see the host's log)".into())
            }
        }
    }
}

impl Holder {
    /// Starts the thread of the database at `path`; the connection is opened there.
    pub fn spawn(path: &Path) -> Result<Holder, String> {
        let (requests, inbox) = mpsc::channel();
        let (ended, closed) = mpsc::channel::<()>();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name(format!("sqlite-hold:{name}"))
            .spawn(move || {
                serve(&thread_path, inbox);
                drop(ended);
            })
            .map_err(|e| format!("cannot start a thread for it: {e}"))?;
        Ok(Holder {
            path: path.to_path_buf(),
            requests,
            closed,
        })
    }

    /// Lets the thread finish its queue and close the connection; waits for that until
    /// `deadline`. An error if it is not done by then (it still closes, later).
    pub fn close(self, deadline: Instant) -> Result<(), String> {
        drop(self.requests);
        let left = deadline.saturating_duration_since(Instant::now());
        match self.closed.recv_timeout(left) {
            Err(mpsc::RecvTimeoutError::Disconnected) | Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(
                "its connection was not closed within the call's deadline: the database's \
                 thread is still busy; it closes the connection as soon as it is done"
                    .into(),
            ),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `PRAGMA journal_mode` and, if `checkpoint` and the database is in WAL mode,
    /// `PRAGMA wal_checkpoint(TRUNCATE)`, waiting at most `busy` for locks.
    pub fn prepare(&self, busy: Duration, checkpoint: bool) -> Pending<Prepared> {
        self.send(|reply| Request::Prepare {
            busy,
            checkpoint,
            reply,
        })
    }

    /// Takes the write lock (`BEGIN IMMEDIATE`), waiting at most `busy`, then runs `query`.
    pub fn lock(&self, busy: Duration, query: Option<String>) -> Pending<Locked> {
        self.send(|reply| Request::Lock { busy, query, reply })
    }

    /// Rolls back the held transaction, if any.
    pub fn release(&self) -> Pending<Released> {
        self.send(|reply| Request::Release { reply })
    }

    fn send<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Pending<T> {
        let (reply, answer) = mpsc::channel();
        // If the thread is gone, the reply sender is dropped with the request and the wait
        // reports it.
        let _ = self.requests.send(request(reply));
        Pending { answer }
    }
}

/// The holder thread: opens the connection, then serves requests until the handle is dropped.
fn serve(path: &Path, inbox: mpsc::Receiver<Request>) {
    // READ_WRITE without CREATE: a wrong path must fail, never create an empty database.
    // NO_MUTEX: the connection never leaves this thread. No URI flag: the path is a path.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)
        .and_then(|c| {
            c.busy_handler(Some(retry_until_deadline))?;
            // The last connection of a WAL database to close checkpoints it and deletes the WAL,
            // under an EXCLUSIVE lock: not ours to do. The plugin's only write to a database is
            // the checkpoint in prepare.
            c.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
            Ok(c)
        })
        .map_err(|e| {
            format!(
                "cannot open it (read-write) through SQLite: {e}; check the path and permissions"
            )
        });
    let mut held_since: Option<Instant> = None;
    for request in inbox {
        match request {
            Request::Prepare {
                busy,
                checkpoint,
                reply,
            } => {
                let result = connection
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|c| prepare(c, busy, checkpoint));
                let _ = reply.send(result);
            }
            Request::Lock { busy, query, reply } => {
                let result = connection.as_ref().map_err(Clone::clone).and_then(|c| {
                    let locked = lock(c, busy, query.as_deref())?;
                    if !locked.already_held {
                        held_since = Some(Instant::now());
                    }
                    Ok(locked)
                });
                let _ = reply.send(result);
            }
            Request::Release { reply } => {
                let result = match &connection {
                    // Never opened: nothing can be held.
                    Err(_) => Ok(Released { held: None }),
                    Ok(c) => release(c).map(|was_held| Released {
                        held: was_held.then(|| held_since.map(|s| s.elapsed())).flatten(),
                    }),
                };
                if result.is_ok() {
                    held_since = None;
                }
                let _ = reply.send(result);
            }
        }
    }
    // The handle is gone: the connection closes, rolling back anything still open.
    drop(connection);
}

thread_local! {
    /// Until when the busy handler of this thread's connection retries.
    static BUSY_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// How long the busy handler sleeps between tries.
const RETRY_EVERY: Duration = Duration::from_micros(250);

/// The connection's busy handler: retry every 250 µs until the deadline [`wait_for_locks`]
/// set.
///
/// Not SQLite's own busy timeout: that one backs off to a try every 100 ms, and an application
/// that commits back to back (a rollback-journal writer releases its lock for a few
/// microseconds between transactions) starves it — the lock is free only between tries. Tries
/// every 250 µs find one of those gaps within milliseconds; each try is a few `fcntl` calls.
fn retry_until_deadline(_tries: i32) -> bool {
    let Some(until) = BUSY_UNTIL.with(Cell::get) else {
        return false;
    };
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    std::thread::sleep(left.min(RETRY_EVERY));
    true
}

/// Lets the statements that follow wait up to `busy` for locks held by other connections.
fn wait_for_locks(busy: Duration) {
    BUSY_UNTIL.with(|u| u.set(Instant::now().checked_add(busy)));
}

fn prepare(c: &Connection, busy: Duration, checkpoint: bool) -> Result<Prepared, String> {
    wait_for_locks(busy);
    // Reading the journal mode reads the header: this is also where "file is not a database"
    // shows up.
    let journal_mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| describe(&e, "reading its journal mode", busy))?;
    let journal_mode = journal_mode.to_ascii_lowercase();
    let checkpoint = if checkpoint && journal_mode == "wal" {
        // TRUNCATE: copy the whole WAL into the database, wait (busy handler) for readers to
        // move on, then truncate the WAL: the snapshot's WAL is as short as it can be. A
        // checkpoint that could not finish in time reports busy = 1; that is not an error (the
        // snapshot is as consistent, its WAL only longer).
        let row = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(|e| describe(&e, "running PRAGMA wal_checkpoint(TRUNCATE)", busy))?;
        Some(row)
    } else {
        None
    };
    Ok(Prepared {
        journal_mode,
        checkpoint,
    })
}

fn lock(c: &Connection, busy: Duration, query: Option<&str>) -> Result<Locked, String> {
    if !c.is_autocommit() {
        // A freeze without a thaw in between: the lock taken then still holds.
        return Ok(Locked {
            waited: Duration::ZERO,
            taken_at: SystemTime::now(),
            taken_monotonic_ns: clock::monotonic_ns(),
            query_value: None,
            already_held: true,
        });
    }
    if busy.is_zero() {
        return Err(
            "no time is left in the freeze call's budget to wait for the write lock; raise \
             [timeouts] freeze_ms in the host's configuration"
                .into(),
        );
    }
    wait_for_locks(busy);
    let started = Instant::now();
    c.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| describe(&e, "taking the write lock (BEGIN IMMEDIATE)", busy))?;
    let taken_monotonic_ns = clock::monotonic_ns();
    let taken_at = SystemTime::now();
    let waited = started.elapsed();
    let query_value = match query {
        None => None,
        Some(q) => match run_report_query(c, q) {
            Ok(v) => Some(v),
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                return Err(e);
            }
        },
    };
    Ok(Locked {
        waited,
        taken_at,
        taken_monotonic_ns,
        query_value,
        already_held: false,
    })
}

fn run_report_query(c: &Connection, query: &str) -> Result<String, String> {
    let what = |e: rusqlite::Error| format!("the report_query {query:?} failed: {e}");
    let mut statement = c.prepare(query).map_err(what)?;
    if !statement.readonly() {
        return Err(format!(
            "the report_query {query:?} would write: it runs while the database is frozen, \
             so it must be a read-only query (SELECT ...)"
        ));
    }
    let value: Option<Value> = statement
        .query_row([], |r| r.get(0))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(what)?;
    Ok(match value {
        None => "(no row)".into(),
        Some(Value::Null) => "NULL".into(),
        Some(Value::Integer(i)) => i.to_string(),
        Some(Value::Real(f)) => f.to_string(),
        Some(Value::Text(t)) => t,
        Some(Value::Blob(b)) => format!("({} bytes of blob)", b.len()),
    })
}

/// Rolls back the held transaction; true if there was one.
fn release(c: &Connection) -> Result<bool, String> {
    if c.is_autocommit() {
        return Ok(false);
    }
    c.execute_batch("ROLLBACK")
        .map_err(|e| format!("ROLLBACK failed: {e}; the lock goes when the connection closes"))?;
    Ok(true)
}

/// An error message that says what a busy database means.
fn describe(e: &rusqlite::Error, doing: &str, busy: Duration) -> String {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => format!(
            "{doing}: still locked by another connection after {} ms (busy timeout, bounded by \
             the call's deadline): an application holds a long write transaction, or uses \
             `PRAGMA locking_mode=EXCLUSIVE`; retry, or raise `busy_timeout_ms` and the host's \
             [timeouts]",
            busy.as_millis()
        ),
        Some(ErrorCode::NotADatabase) => {
            format!("{doing}: {e}: the file is not an SQLite database; fix `databases`")
        }
        _ => format!("{doing}: {e}"),
    }
}
