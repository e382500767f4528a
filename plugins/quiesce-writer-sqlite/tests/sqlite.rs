//! The SQLite writer against real databases that another process (Python's sqlite3, in
//! `tests/sqlite_app.py`) uses during the test: through the real host on a real btrfs volume,
//! and in-process through the SDK's harness.

use quiesce_host::{Config, Host};
use quiesce_proto::WriterCall;
use quiesce_proto::{Outcome, Phase, Reports, SetRecord, SetRequest};
use quiesce_sdk::harness::{FailureKind, Plugin};
use quiesce_sdk::{Call, ComponentKind};
use quiesce_testbed::wait_until;
use quiesce_testbed::{host_config, plugin, BtrfsVolume};
use rusqlite::Connection;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// The query every test configures as `report_query`: the last record the frozen database holds.
const LAST_RECORD: &str = "SELECT coalesce(max(n), 0) FROM records";

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// A run of `tests/sqlite_app.py`: another process using the databases.
struct App {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl App {
    fn start(args: &[&str]) -> App {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sqlite_app.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting python3");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        App {
            stdin: child.stdin.take(),
            child,
            lines,
            what: args.join(" "),
        }
    }

    /// Waits at most `timeout` for the app's next line, which must start with `prefix`.
    fn expect(&self, prefix: &str, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) if line.starts_with(prefix) => line,
            Ok(line) => panic!("sqlite_app {}: said {line:?}, not {prefix:?}", self.what),
            Err(_) => panic!("sqlite_app {}: no {prefix:?} within {timeout:?}", self.what),
        }
    }

    /// Asserts that the app says nothing for `window`: a bounded wait on an event that must
    /// not happen.
    fn silent_for(&self, window: Duration, why: &str) {
        if let Ok(line) = self.lines.recv_timeout(window) {
            panic!("sqlite_app {}: said {line:?} while {why}", self.what);
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    fn create(db: &Path, mode: &str) {
        let app = App::start(&["create", &db.display().to_string(), mode]);
        app.expect("created", Duration::from_secs(20));
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python interpreter itself, found once: `python3` may be a shim (pyenv) that takes half
/// a second to start the real one.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        quiesce_testbed::require("python3", "python3");
        let out = quiesce_testbed::run(
            Command::new("python3").args(["-c", "import sys, sqlite3; print(sys.executable)"]),
        );
        PathBuf::from(out.trim())
    })
}

fn start_host(dir: &Path, volume: &BtrfsVolume, body: &str) -> Host {
    let text = host_config(dir, volume, &[&plugin("quiesce-writer-sqlite")], body);
    let host = Host::start(Config::parse(&text, &dir.join("host.toml")).unwrap());
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    host
}

fn shared() -> SetRequest {
    SetRequest {
        volumes: vec!["shared".into()],
        best_effort: false,
    }
}

/// The report key of `key` for database `db` (the plugin reports canonical paths).
fn key(db: &Path, key: &str) -> String {
    format!("{}:{key}", std::fs::canonicalize(db).unwrap().display())
}

fn report<'a>(reports: &'a Reports, db: &Path, name: &str) -> &'a str {
    let k = key(db, name);
    reports
        .get(&k)
        .unwrap_or_else(|| panic!("no report {k}: {reports:#?}"))
}

fn writer_reports<'a>(record: &'a SetRecord, id: &str) -> &'a Reports {
    &record
        .writers
        .iter()
        .find(|w| w.writer.writer == id)
        .unwrap_or_else(|| panic!("writer {id} is not in the set: {record:#?}"))
        .reports
}

/// What a copy of a database holds.
#[derive(Debug)]
struct Contents {
    integrity: String,
    count: i64,
    min: Option<i64>,
    max: Option<i64>,
}

/// Copies the database at `db` (and its `-wal`, if there is one) into a directory of its own
/// and reads it there, as a restore would.
fn restore(db: &Path, scratch: &Path) -> Contents {
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let copy = dir.path().join("restored.db");
    std::fs::copy(db, &copy).unwrap();
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    if wal.exists() {
        std::fs::copy(&wal, dir.path().join("restored.db-wal")).unwrap();
    }
    let c = Connection::open(&copy).unwrap();
    let integrity: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let (count, min, max) = c
        .query_row("SELECT count(*), min(n), max(n) FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    Contents {
        integrity,
        count,
        min,
        max,
    }
}

/// The acknowledgements the app logged: (record, CLOCK_MONOTONIC ns after its commit returned).
/// A last line still being written is left out.
fn acks(log: &Path) -> Vec<(i64, u128)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            let (n, t) = l.split_once(' ').expect("<n> <ns>");
            (n.parse().unwrap(), t.parse().unwrap())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Through the host, on btrfs, with another process writing
// ---------------------------------------------------------------------------------------------

/// The restore test. While two applications commit numbered records as fast as they can (one
/// database in WAL mode, one in rollback-journal mode), the host takes 20 btrfs snapshots. Each
/// snapshot's databases are copied and checked:
///
/// 1. `PRAGMA integrity_check` is `ok`;
/// 2. the copy holds exactly records 1..=M, where M is what the plugin read (`report_query`)
///    inside its held write transaction at freeze: no gap, nothing past it — the snapshot is the
///    database as it stood when the lock was taken;
/// 3. **zero records lost**: every record the application acknowledged (its commit had
///    returned) before the lock was taken is in the copy. "Before" is decided on one clock with
///    no skew, this node's CLOCK_MONOTONIC: the app logs the clock after each commit returns,
///    the plugin reports it right after `BEGIN IMMEDIATE` returns. An ack stamped earlier than
///    the lock belongs to a commit that returned before the lock was held — no commit can happen
///    while it is — so the commit must be in the snapshot. (The check waits until the app has
///    logged an ack stamped after the lock, so that no earlier ack is still unwritten.)
/// 4. in rollback-journal (DELETE) mode the snapshot holds no `-journal`: no write transaction
///    was open in any process when it was taken.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_snapshots_under_continuous_writes_lose_no_acknowledged_record() {
    let volume = BtrfsVolume::create(512);
    let dir = tempfile::tempdir().unwrap();
    let app_dir = volume.data.join("app");
    let legacy_dir = volume.data.join("legacy");
    std::fs::create_dir_all(&app_dir).unwrap();
    std::fs::create_dir_all(&legacy_dir).unwrap();
    let orders = app_dir.join("orders.db");
    let ledger = legacy_dir.join("ledger.db");
    let (orders_acks, ledger_acks) = (
        dir.path().join("orders.acks"),
        dir.path().join("ledger.acks"),
    );
    let apps = [
        App::start(&[
            "run",
            &orders.display().to_string(),
            "wal",
            &orders_acks.display().to_string(),
        ]),
        App::start(&[
            "run",
            &ledger.display().to_string(),
            "delete",
            &ledger_acks.display().to_string(),
        ]),
    ];
    for app in &apps {
        app.expect("ready", Duration::from_secs(20));
    }

    let body = format!(
        r#"
[[plugins.sqlite.writers]]
id = "orders"
volume = "shared"
databases = ["{app}/*.db"]
report_query = "{LAST_RECORD}"

[[plugins.sqlite.writers]]
id = "ledger"
volume = "shared"
databases = ["{ledger}"]
report_query = "{LAST_RECORD}"
"#,
        app = app_dir.display(),
        ledger = ledger.display(),
    );
    let host = start_host(dir.path(), &volume, &body);
    assert_eq!(host.writers().len(), 2);

    let databases = [
        ("orders", &orders, &orders_acks, "wal"),
        ("ledger", &ledger, &ledger_acks, "delete"),
    ];
    let (mut snapshots, mut rows_checked, mut acked_before_freeze, mut lost) =
        (0, 0i64, 0usize, 0usize);
    let mut first_last = Vec::new();
    let mut waits = Vec::new();
    let started = Instant::now();
    for round in 0..20 {
        let record = host.run_local_set(shared()).await.unwrap();
        assert_eq!(
            record.outcome,
            Outcome::AppConsistent,
            "round {round}: {record:#?}"
        );
        let snapshot = PathBuf::from(&record.snapshot.as_ref().unwrap().path);
        snapshots += 1;
        for (id, db, ack_log, mode) in databases {
            let reports = writer_reports(&record, id);
            assert_eq!(report(reports, db, "journal_mode"), mode);
            if mode == "wal" {
                report(reports, db, "checkpoint.busy");
                report(reports, db, "checkpoint.checkpointed");
            }
            report(reports, db, "lock_taken_at");
            let wait: u64 = report(reports, db, "lock_wait_ms").parse().unwrap();
            waits.push((id, wait));
            report(reports, db, "held_ms");
            let m: i64 = report(reports, db, "report_query").parse().unwrap();
            let locked_at: u128 = report(reports, db, "lock_taken_monotonic_ns")
                .parse()
                .unwrap();

            let in_snapshot = snapshot.join(db.strip_prefix(&volume.data).unwrap());
            if mode == "delete" {
                let journal = PathBuf::from(format!("{}-journal", in_snapshot.display()));
                assert!(
                    !journal.exists(),
                    "round {round}: {id}: a journal is in the snapshot"
                );
            }
            let contents = restore(&in_snapshot, volume.scratch());
            assert_eq!(contents.integrity, "ok", "round {round}: {id}");
            // 2. exactly 1..=M.
            assert_eq!(
                (contents.count, contents.max),
                (m, (m > 0).then_some(m)),
                "round {round}: {id}: the snapshot is not the database as frozen: {contents:?}"
            );
            assert!(
                m == 0 || contents.min == Some(1),
                "round {round}: {id}: {contents:?}"
            );
            rows_checked += m;

            // 3. every ack stamped before the lock is in the snapshot.
            let acks = wait_until("an ack after the thaw", Duration::from_secs(20), || {
                let acks = acks(ack_log);
                acks.last().is_some_and(|a| a.1 > locked_at).then_some(acks)
            });
            let before: Vec<i64> = acks
                .iter()
                .filter(|a| a.1 < locked_at)
                .map(|a| a.0)
                .collect();
            assert!(
                !before.is_empty(),
                "round {round}: {id}: nothing acknowledged before the freeze"
            );
            let missing = before.iter().filter(|n| **n > m).count();
            assert_eq!(missing, 0, "round {round}: {id}: acknowledged before the freeze but not in the snapshot (M = {m}, last ack before = {:?})", before.last());
            acked_before_freeze += before.len();
            lost += missing;
            if round == 0 || round == 19 {
                first_last.push((id, m));
            }
        }
    }
    let elapsed = started.elapsed();
    // The applications kept writing throughout: the last snapshot holds more than the first.
    for id in ["orders", "ledger"] {
        let ms: Vec<i64> = first_last
            .iter()
            .filter(|x| x.0 == id)
            .map(|x| x.1)
            .collect();
        assert!(
            ms[1] > ms[0],
            "{id}: no progress between the first and last snapshot: {ms:?}"
        );
    }
    let longest: Vec<(&str, u64)> = ["orders", "ledger"]
        .iter()
        .map(|id| {
            (
                *id,
                waits
                    .iter()
                    .filter(|w| w.0 == *id)
                    .map(|w| w.1)
                    .max()
                    .unwrap(),
            )
        })
        .collect();
    eprintln!(
        "restore test: {snapshots} snapshots in {elapsed:?}, {rows_checked} rows checked, \
         {acked_before_freeze} records acknowledged before a freeze checked, {lost} lost; \
         first/last M: {first_last:?}; longest waits for a lock (ms): {longest:?}"
    );
    assert_eq!(lost, 0);
    drop(apps);
}

/// A write from another process attempted during the freeze waits; a read does not. The
/// snapshot taken during the freeze lacks the write; it lands after thaw. Both journal modes,
/// held by one writer.
#[tokio::test(flavor = "multi_thread")]
async fn the_write_lock_holds_until_the_snapshot_and_the_write_lands_after_thaw() {
    let volume = BtrfsVolume::create(256);
    let dir = tempfile::tempdir().unwrap();
    let wal = volume.data.join("wal.db");
    let journal = volume.data.join("journal.db");
    App::create(&wal, "wal");
    App::create(&journal, "delete");
    let body = format!(
        "[plugins.sqlite]\nid = \"app\"\nvolume = \"shared\"\ndatabases = [\"{}\", \"{}\"]\n",
        wal.display(),
        journal.display()
    );
    let host = start_host(dir.path(), &volume, &body);
    let writer = host.writer("app").unwrap();
    let budget = Duration::from_secs(10);
    writer
        .call(WriterCall::Prepare, "by-hand", budget)
        .await
        .unwrap();
    let frozen = writer
        .call(WriterCall::Freeze, "by-hand", budget)
        .await
        .unwrap();
    for db in [&wal, &journal] {
        report(&frozen, db, "lock_taken_at");
    }

    const MARK: &str = "1000000";
    let apps: Vec<App> = [&wal, &journal]
        .iter()
        .map(|db| App::start(&["once", &db.display().to_string(), MARK]))
        .collect();
    for app in &apps {
        // Readers go on...
        assert_eq!(app.expect("read ", Duration::from_secs(20)), "read 0");
        app.expect("writing", Duration::from_secs(20));
    }
    // ... writers wait.
    for app in &apps {
        app.silent_for(Duration::from_millis(400), "the database is frozen");
    }
    // The test stands in for the provider: a btrfs snapshot while frozen.
    let snapshot = volume.snapshots.join("by-hand");
    quiesce_testbed::run(
        Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(&volume.data)
            .arg(&snapshot),
    );
    // Still waiting after the snapshot, until thaw.
    for app in &apps {
        app.silent_for(Duration::from_millis(50), "the database is frozen");
    }
    let thawed = writer
        .call(WriterCall::Thaw, "by-hand", budget)
        .await
        .unwrap();
    for db in [&wal, &journal] {
        report(&thawed, db, "held_ms");
    }
    for app in &apps {
        app.expect("committed", Duration::from_secs(20));
    }
    for db in [&wal, &journal] {
        let in_snapshot = snapshot.join(db.file_name().unwrap());
        let contents = restore(&in_snapshot, volume.scratch());
        assert_eq!(
            (contents.integrity.as_str(), contents.count),
            ("ok", 0),
            "{}",
            db.display()
        );
        // The live database has it.
        let live = Connection::open(db).unwrap();
        let n: i64 = live
            .query_row("SELECT n FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n.to_string(), MARK);
    }
    // Thaw again: nothing happens.
    assert_eq!(
        writer
            .call(WriterCall::Thaw, "by-hand", budget)
            .await
            .unwrap(),
        Reports::new()
    );
}

/// A write transaction that outlasts the freeze's deadline: the freeze gives up within its
/// budget with a clear error naming the database (the busy timeout is bounded by the call's
/// deadline, whatever `busy_timeout_ms` says), the set fails, nothing stays locked, and the next
/// set goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_write_transaction_fails_the_freeze_within_its_deadline() {
    let volume = BtrfsVolume::create(256);
    let dir = tempfile::tempdir().unwrap();
    let db = volume.data.join("busy.db");
    App::create(&db, "wal");
    let body = format!(
        "[timeouts]\nfreeze_ms = 800\n[plugins.sqlite]\nvolume = \"shared\"\n\
         databases = [\"{}\"]\nbusy_timeout_ms = 1000\n",
        db.display()
    );
    let host = start_host(dir.path(), &volume, &body);
    let mut holder = App::start(&["hold", &db.display().to_string()]);
    holder.expect("holding", Duration::from_secs(20));

    let started = Instant::now();
    let record = host.run_local_set(shared()).await.unwrap();
    let elapsed = started.elapsed();
    let Outcome::Failed {
        phase,
        writer,
        reason,
    } = &record.outcome
    else {
        panic!("the set must fail: {record:#?}");
    };
    assert_eq!(*phase, Phase::Freeze, "{record:#?}");
    assert_eq!(writer.as_ref().unwrap().writer, "sqlite");
    assert!(
        reason.contains(&db.display().to_string()) || reason.contains("busy.db"),
        "{reason}"
    );
    assert!(
        reason.contains("still locked by another connection"),
        "{reason}"
    );
    // It answered (an error, not a timeout of the call)...
    let failure = record.writers[0].failure.as_ref().unwrap();
    assert_eq!(
        failure.kind,
        quiesce_proto::FailureKind::Error,
        "{failure:?}"
    );
    // ... and the prepare's checkpoint could not finish either: reported, not fatal.
    assert_eq!(
        report(&record.writers[0].reports, &db, "checkpoint.busy"),
        "1"
    );
    assert!(record.snapshot.is_none());
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // The app's transaction was never disturbed and commits; nothing of ours stays locked.
    holder.say("go");
    holder.expect("released", Duration::from_secs(20));
    let record = host.run_local_set(shared()).await.unwrap();
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
}

// ---------------------------------------------------------------------------------------------
// In-process, through the SDK's harness and by direct calls
// ---------------------------------------------------------------------------------------------

fn make_db(path: &Path, mode: &str, rows: i64) {
    let c = Connection::open(path).unwrap();
    let got: String = c
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, mode);
    c.execute_batch("CREATE TABLE records (n INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        .unwrap();
    for n in 1..=rows {
        c.execute("INSERT INTO records VALUES (?1, 'x')", [n])
            .unwrap();
    }
}

/// Tries a write without waiting for locks (rusqlite's default busy timeout is 5 s): Ok, or the
/// error (busy while frozen).
fn try_write(db: &Path, n: i64) -> Result<(), rusqlite::Error> {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::ZERO).unwrap();
    c.execute("INSERT INTO records VALUES (?1, 'y')", [n])
        .map(drop)
}

fn count(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap()
}

fn config(dir: &Path, extra: &str) -> String {
    format!(
        "volume = \"shared\"\ndatabases = [\"{}/*.db\"]\nreport_query = \"{LAST_RECORD}\"\n{extra}",
        dir.display()
    )
}

#[test]
fn the_configuration_is_checked_at_init() {
    let plugin = Plugin::new("sqlite", quiesce_writer_sqlite::init);
    for (config, expected) in [
        ("databases = [\"/a.db\"]", "missing field `volume`"),
        ("volume = \"v\"\ndatabases = []", "`databases` is empty"),
        ("volume = \"v\"\ndatabases = [\"a.db\"]", "not an absolute path"),
        ("volume = \"v\"\ndatabases = [\"/srv/[a.db\"]", "not a valid glob"),
        ("volume = \"v\"\ndatabases = [\"/a.db\"]\nbusy_timeout_ms = 0", "`busy_timeout_ms` is 0"),
        ("volume = \"v\"\ndatabases = [\"/a.db\"]\nid = \"no spaces\"", "is invalid"),
        ("volume = \"v\"\ndatabases = [\"/a.db\"]\ndatabse = 1", "unknown field `databse`"),
        ("writers = []", "`writers` is empty"),
        (
            "[[writers]]\nvolume = \"v\"\ndatabases = [\"/a.db\"]\n[[writers]]\nvolume = \"v\"\ndatabases = [\"/b.db\"]",
            "two writers have the id \"sqlite\"",
        ),
    ] {
        let error = plugin.init(config).unwrap_err();
        assert_eq!(error.kind, FailureKind::RefusedConfig, "{config}: {error}");
        assert!(error.reason.contains(expected), "{config}: {error}");
    }
    let writers = plugin
        .init("[[writers]]\nid = \"a\"\nvolume = \"v\"\ndatabases = [\"/a.db\"]\n[[writers]]\nid = \"b\"\nvolume = \"v\"\ndatabases = [\"/b/*.db\"]")
        .unwrap();
    assert_eq!(writers.len(), 2);
}

#[test]
fn metadata_lists_each_database_and_its_wal_on_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    make_db(&dir_path.join("a.db"), "wal", 1);
    make_db(&dir_path.join("b.db"), "delete", 1);
    std::fs::write(dir_path.join("notes.txt"), "not a database").unwrap();
    let writers = Plugin::new("sqlite", quiesce_writer_sqlite::init)
        .init(&config(&dir_path, "id = \"app\""))
        .unwrap();
    let metadata = writers[0].metadata().unwrap();
    assert_eq!(metadata.id, "app");
    assert!(
        metadata.vendor_version.starts_with("SQLite 3."),
        "{metadata:?}"
    );
    let got: Vec<(ComponentKind, String, Vec<String>)> = metadata
        .components
        .iter()
        .map(|c| {
            assert_eq!(c.volume, "shared");
            (c.kind, c.name.clone(), c.paths.clone())
        })
        .collect();
    let path = |f: &str| dir_path.join(f).display().to_string();
    assert_eq!(
        got,
        vec![
            (
                ComponentKind::Database,
                format!("database:{}", path("a.db")),
                vec![path("a.db")]
            ),
            (
                ComponentKind::Log,
                format!("log:{}", path("a.db-wal")),
                vec![path("a.db-wal")]
            ),
            (
                ComponentKind::Database,
                format!("database:{}", path("b.db")),
                vec![path("b.db")]
            ),
            (
                ComponentKind::Log,
                format!("log:{}", path("b.db-wal")),
                vec![path("b.db-wal")]
            ),
        ]
    );

    // A pattern that matches nothing still declares the volume (no components would mean
    // "every volume").
    let empty = tempfile::tempdir().unwrap();
    let writers = Plugin::new("sqlite", quiesce_writer_sqlite::init)
        .init(&config(empty.path(), ""))
        .unwrap();
    let metadata = writers[0].metadata().unwrap();
    assert_eq!(metadata.components.len(), 1);
    assert_eq!(metadata.components[0].volume, "shared");
    assert_eq!(
        metadata.components[0].paths,
        vec![format!("{}/*.db", empty.path().display())]
    );
}

/// In both journal modes: while frozen, a write (from another connection, with no busy
/// timeout) is refused as busy and a read goes on; after the set, the write goes through.
#[test]
fn a_set_holds_the_write_lock_and_lets_readers_read() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal.db");
    let journal = dir.path().join("journal.db");
    make_db(&wal, "wal", 3);
    make_db(&journal, "delete", 5);
    let mut writers = Plugin::new("sqlite", quiesce_writer_sqlite::init)
        .init(&config(dir.path(), ""))
        .unwrap();
    let run = writers[0].run(|_snapshot| {
        for db in [&wal, &journal] {
            let error = try_write(db, 100).unwrap_err();
            assert_eq!(
                error.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy),
                "{}: {error}",
                db.display()
            );
            assert!(count(db) > 0, "readers go on");
        }
        Ok(())
    });
    assert!(run.is_app_consistent(), "{run:#?}");
    let prepared = |db: &Path, k: &str| run.report(Phase::Prepare, &key(db, k)).map(str::to_string);
    assert_eq!(prepared(&wal, "journal_mode").as_deref(), Some("wal"));
    assert_eq!(prepared(&wal, "checkpoint.busy").as_deref(), Some("0"));
    assert_eq!(
        prepared(&journal, "journal_mode").as_deref(),
        Some("delete")
    );
    assert_eq!(
        prepared(&journal, "checkpoint.busy"),
        None,
        "no checkpoint in rollback mode"
    );
    assert_eq!(
        run.report(Phase::Freeze, &key(&wal, "report_query")),
        Some("3")
    );
    assert_eq!(
        run.report(Phase::Freeze, &key(&journal, "report_query")),
        Some("5")
    );
    let taken = run
        .report(Phase::Freeze, &key(&wal, "lock_taken_at"))
        .unwrap();
    assert!(taken.ends_with('Z') && taken.len() == 24, "{taken}");
    assert!(run.report(Phase::Thaw, &key(&wal, "held_ms")).is_some());
    for db in [&wal, &journal] {
        try_write(db, 100).unwrap();
    }

    // An aborted set lets go as well; a second abort does nothing.
    let aborted = writers[0].run_failing_after(Phase::Freeze);
    assert_eq!(
        aborted.steps(),
        [Phase::Prepare, Phase::Freeze, Phase::Abort, Phase::Complete]
    );
    for db in [&wal, &journal] {
        try_write(db, 101).unwrap();
    }
    assert_eq!(writers[0].abort(), Ok(vec![]));
}

/// By direct calls: a freeze without prepare opens the databases itself; thaw and abort are
/// idempotent; a second freeze keeps the lock.
#[test]
fn freeze_without_prepare_and_repeated_releases() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, "wal", 1);
    let config = quiesce_sdk::Config::from_toml(&config(dir.path(), "")).unwrap();
    let mut writer = quiesce_writer_sqlite::init(&config).unwrap().remove(0);
    let call = || Call::new("direct", Duration::from_secs(10));
    writer.freeze(&mut call()).unwrap();
    assert!(try_write(&db, 2).is_err());
    let mut again = call();
    writer.freeze(&mut again).unwrap();
    assert!(try_write(&db, 2).is_err());
    writer.thaw(&mut call()).unwrap();
    try_write(&db, 2).unwrap();
    writer.thaw(&mut call()).unwrap();
    writer.abort(&mut call()).unwrap();
    // An exhausted budget fails the freeze at once, saying why.
    let error = writer
        .freeze(&mut Call::new("direct", Duration::ZERO))
        .unwrap_err();
    assert!(error.message().contains("no time is left"), "{error}");
    try_write(&db, 3).unwrap();
}

#[test]
fn a_report_query_that_writes_is_refused_and_nothing_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db, "wal", 1);
    let mut writers = Plugin::new("sqlite", quiesce_writer_sqlite::init)
        .init(&format!(
            "volume = \"v\"\ndatabases = [\"{}\"]\nreport_query = \"DELETE FROM records\"",
            db.display()
        ))
        .unwrap();
    let run = writers[0].run(|_| panic!("no snapshot after a failed freeze"));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Freeze);
    assert!(
        error.reason.contains("must be a read-only query"),
        "{error}"
    );
    assert!(error.reason.contains("nothing stays locked"), "{error}");
    try_write(&db, 2).unwrap();
    assert_eq!(count(&db), 2);
}

#[test]
fn a_missing_database_or_a_file_that_is_no_database_fails_prepare_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let plugin = Plugin::new("sqlite", quiesce_writer_sqlite::init);
    let mut writers = plugin
        .init(&format!(
            "volume = \"v\"\ndatabases = [\"{}\"]",
            missing.display()
        ))
        .unwrap();
    let run = writers[0].run(|_| Ok(()));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Prepare);
    assert!(
        error.reason.contains("missing.db") && error.reason.contains("fix `databases`"),
        "{error}"
    );
    assert!(!missing.exists(), "the plugin must never create a database");

    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
    let mut writers = plugin
        .init(&format!(
            "volume = \"v\"\ndatabases = [\"{}\"]",
            junk.display()
        ))
        .unwrap();
    let run = writers[0].run(|_| Ok(()));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Prepare);
    assert!(
        error.reason.contains("junk.db") && error.reason.contains("not an SQLite database"),
        "{error}"
    );
}
