//! The PostgreSQL writer against real servers on a real btrfs volume, driven by the real host.
//!
//! Each test starts its own PostgreSQL (initdb on the test volume, its own port and socket
//! directory, run as the `postgres` user), loads the built plugin into a `quiesce_host::Host`
//! and runs snapshot sets on the volume. Restores start PostgreSQL on copies of the snapshots,
//! on other ports, and check every record acknowledged before the set is there.

use postgres::NoTls;
use quiesce_host::worker::Backend;
use quiesce_host::{Config, Host};
use quiesce_proto::{CallFailure, WriterCall};
use quiesce_proto::{
    ComponentKind, Level, Outcome, Phase, Reports, SetRecord, SetRequest, WriterMetadata,
    WriterState,
};
use quiesce_testbed::{self as testbed, wait_until, wait_until_or, BtrfsVolume};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// PostgreSQL servers

use quiesce_testbed::postgres::{as_postgres, chown_postgres, free_port, pg_bin};

/// A directory the `postgres` user owns.
fn postgres_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chown_postgres(path);
    path.to_path_buf()
}

/// One PostgreSQL server, stopped (immediately) when dropped.
struct Server {
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    log: PathBuf,
    running: bool,
}

impl Server {
    /// initdb into `data` (created, owned by postgres), with `conf` appended to
    /// postgresql.conf. `scratch` holds the socket directory and the log.
    fn initdb(data: &Path, scratch: &Path, conf: &str) -> Server {
        let _ = pg_bin();
        postgres_dir(data);
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).unwrap();
        testbed::run(as_postgres("initdb").arg("-D").arg(data).args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
            // Small segments: copies of the cluster stay small.
            "--wal-segsize=1",
        ]));
        let settings = format!(
            "\n# quiesce tests\nlisten_addresses = ''\nshared_buffers = 16MB\nmax_connections = 20\n\
             fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nmin_wal_size = 4MB\n\
             max_wal_size = 64MB\n{conf}\n"
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&settings);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        Server::on(data, scratch)
    }

    /// A server over an existing data directory (a restored copy), not started.
    fn on(data: &Path, scratch: &Path) -> Server {
        // Unique per server: live and restored copies share the scratch directory.
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let name = format!("server{}", SERVERS.fetch_add(1, Ordering::Relaxed));
        let socket_dir = postgres_dir(&scratch.join(format!("sock-{name}")));
        let logs = postgres_dir(&scratch.join("logs"));
        Server {
            data: data.to_path_buf(),
            socket_dir,
            port: free_port(),
            log: logs.join(format!("{name}.log")),
            running: false,
        }
    }

    /// Starts and waits until it accepts connections; `options` are extra `-c name=value`.
    fn start(&mut self, options: &[String]) {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        testbed::postgres::start(
            as_postgres("pg_ctl"),
            &self.data,
            &self.log,
            self.port,
            &self.socket_dir,
            &options,
        );
        self.running = true;
    }

    fn stop(&mut self, mode: &str) {
        if self.running {
            self.running = false;
            let _ = as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-m", mode, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn client(&self) -> postgres::Client {
        postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.data.display()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `pg_amcheck --all` (heap and B-tree indexes, every database): clean or panic.
    fn amcheck(&self) {
        let output = Command::new(pg_bin().join("pg_amcheck"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(["--all", "--install-missing", "--heapallindexed"])
            .output()
            .unwrap();
        assert!(
            output.status.success() && output.stdout.is_empty(),
            "pg_amcheck on {} found problems ({}):\n{}{}",
            self.data.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

// ---------------------------------------------------------------------------------------------
// The application: a separate process committing numbered records

fn committer_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            testbed::run(
                Command::new(cargo)
                    .current_dir(testbed::workspace_root())
                    .args(["build", "--quiet", "-p", "quiesce-writer-postgres"])
                    .args(["--example", "committer"]),
            );
            let exe = testbed::target_dir().join("debug/examples/committer");
            assert!(exe.is_file(), "{} was not built", exe.display());
            exe
        })
        .clone()
}

/// How many records the ack log `acks` acknowledges: it reads `1\n2\n...`, each line appended
/// after its COMMIT returned; a last line without its newline is not an acknowledgement yet.
fn acknowledged(acks: &Path) -> i64 {
    let text = std::fs::read_to_string(acks).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut count = 0i64;
    for line in complete.lines() {
        count += 1;
        assert_eq!(line, count.to_string(), "the ack log is not 1, 2, 3, ...");
    }
    count
}

/// The committer process, killed when dropped.
struct Committer {
    child: Child,
    acks: PathBuf,
}

impl Committer {
    fn start(server: &Server, acks: &Path) -> Committer {
        let child = Command::new(committer_binary())
            .arg(&server.socket_dir)
            .arg(server.port.to_string())
            .arg(acks)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let committer = Committer {
            child,
            acks: acks.to_path_buf(),
        };
        // Wait until records are being acknowledged.
        wait_until(
            "the committer acknowledging records",
            Duration::from_secs(30),
            || (committer.acknowledged() >= 10).then_some(()),
        );
        committer
    }

    fn acknowledged(&self) -> i64 {
        acknowledged(&self.acks)
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the committer exited ({status}): {err}");
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The host

fn plugin() -> PathBuf {
    testbed::plugin("quiesce-writer-postgres")
}

/// A host on `volume` (as volume `shared`) with the postgres plugin for `server`.
fn host(dir: &Path, volume: &BtrfsVolume, server: &Server, plugin_keys: &str) -> Host {
    let body = format!(
        "hold_limit_ms = 20000\n[plugins.postgres]\nid = \"pg\"\nhost = \"{sock}\"\nport = {port}\n\
         volume = \"shared\"\nvolume_path = \"{mount}\"\nsubvolume = \"{data}\"\n{plugin_keys}\n",
        sock = server.socket_dir.display(),
        port = server.port,
        mount = volume.mount.display(),
        data = volume.data.display(),
    );
    let text = testbed::host_config(dir, volume, &[&plugin()], &body);
    let host = Host::start(Config::parse(&text, &dir.join("host.toml")).unwrap());
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    assert_eq!(
        host.writers().len(),
        1,
        "the postgres plugin makes one writer"
    );
    host
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run_set(rt: &tokio::runtime::Runtime, host: &Host) -> SetRecord {
    rt.block_on(host.run_local_set(SetRequest {
        volumes: vec!["shared".into()],
        best_effort: false,
    }))
    .unwrap()
}

fn pg_result(record: &SetRecord) -> &quiesce_proto::WriterResult {
    record
        .writers
        .iter()
        .find(|w| w.writer.writer == "pg")
        .expect("the postgres writer took part in the set")
}

/// A scratch directory others (postgres) can traverse.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Restores

/// Copies `snapshot` (a snapshot of the volume's data subvolume) to `dest` with `cp -a`,
/// removes `postmaster.pid` and points the tablespace links (and `tablespace_map`, if any) at
/// the copy's own tablespace directories instead of the live ones.
fn copy_snapshot(snapshot: &Path, dest: &Path, volume: &BtrfsVolume) -> PathBuf {
    testbed::run(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(snapshot)
            .arg(dest),
    );
    let data = dest.join("pgdata");
    std::fs::remove_file(data.join("postmaster.pid")).unwrap();
    for entry in std::fs::read_dir(data.join("pg_tblspc")).unwrap() {
        let link = entry.unwrap().path();
        let target = std::fs::read_link(&link).unwrap();
        let relative = target
            .strip_prefix(&volume.data)
            .unwrap_or_else(|_| panic!("tablespace link {} points off the volume", link.display()));
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(dest.join(relative), &link).unwrap();
    }
    let map = data.join("tablespace_map");
    if map.exists() {
        let text = std::fs::read_to_string(&map).unwrap();
        let live = volume.data.display().to_string();
        std::fs::write(&map, text.replace(&live, &dest.display().to_string())).unwrap();
    }
    chown_postgres(dest);
    data
}

/// The setting restored copies run with: see its use.
const THROWAWAY: &str = "fsync=off";

/// What a restored copy holds.
#[derive(Debug)]
struct Restored {
    count: i64,
    min: i64,
    max: i64,
    /// How many of the records 1..=acked are there.
    acked_present: i64,
}

fn check_records(server: &Server, acked: i64) -> Restored {
    let mut client = server.client();
    let row = client
        .query_one(
            "SELECT count(*), coalesce(min(n), 0), coalesce(max(n), 0), \
             count(*) FILTER (WHERE n <= $1) FROM records",
            &[&acked],
        )
        .unwrap();
    let restored = Restored {
        count: row.get(0),
        min: row.get(1),
        max: row.get(2),
        acked_present: row.get(3),
    };
    // Every record acknowledged before the set is there; the copy ends at some commit after
    // them, with no gap (a commit is never visible without every earlier one).
    assert_eq!(restored.acked_present, acked, "records lost: {restored:?}");
    assert!(restored.max >= acked, "{restored:?}");
    assert_eq!(
        restored.count, restored.max,
        "a gap in 1..=max: {restored:?}"
    );
    assert!(restored.count == 0 || restored.min == 1, "{restored:?}");
    restored
}

/// Makes the `records` table (in `tablespace`, if given) and the amcheck extension.
fn create_schema(server: &Server, tablespace: Option<&str>) {
    let mut client = server.client();
    let ts = tablespace.map_or(String::new(), |t| format!(" TABLESPACE {t}"));
    client
        .batch_execute(&format!(
            "CREATE EXTENSION amcheck; \
             CREATE TABLE records (n bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now()){ts};"
        ))
        .unwrap();
}

fn create_tablespace(server: &Server, name: &str, dir: &Path) {
    postgres_dir(dir);
    server
        .client()
        .batch_execute(&format!(
            "CREATE TABLESPACE {name} LOCATION '{}'",
            dir.display()
        ))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The restore test of issue 5: ≥ 20 snapshots under a committing process, every one restored
/// and checked; zero acknowledged records lost.
#[test]
fn snapshots_under_load_restore_with_every_acknowledged_record() {
    const SNAPSHOTS: usize = 20;
    let started = Instant::now();
    let volume = BtrfsVolume::create(1024);
    let tmp = scratch();
    let mut live = Server::initdb(&volume.data.join("pgdata"), tmp.path(), "");
    live.start(&[]);
    // The records live in a tablespace on the volume (outside the data directory), so that
    // the test also shows a tablespace being snapshotted with the rest, atomically.
    create_tablespace(&live, "near", &volume.data.join("ts"));
    create_schema(&live, Some("near"));
    let host = host(tmp.path(), &volume, &live, "");
    let metadata = &host.writers()[0].metadata;
    let components: Vec<(&str, ComponentKind, &str)> = metadata
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.kind, c.volume.as_str()))
        .collect();
    assert_eq!(
        components,
        [
            ("data", ComponentKind::Database, "shared"),
            ("wal", ComponentKind::Log, "shared"),
            ("tablespace:near", ComponentKind::Tablespace, "shared"),
        ],
        "{metadata:#?}"
    );
    assert_eq!(metadata.level, Level::BackEnd);
    assert!(!metadata.needs_post_snapshot);

    let mut committer = Committer::start(&live, &tmp.path().join("acks"));
    // A front-end writer reads the ack log in its freeze: front-end freezes come before the
    // back-end ones (postgres), so every record acknowledged then was committed before the
    // postgres writer's freeze and before the snapshot.
    let at_freeze = Arc::new(AtomicI64::new(-1));
    let (seen, acks) = (at_freeze.clone(), committer.acks.clone());
    add_meddler(&host, &volume, move || {
        seen.store(acknowledged(&acks), Ordering::SeqCst);
        Ok(())
    });
    let rt = runtime();
    let restores = volume.mount.join("restores");
    std::fs::create_dir_all(&restores).unwrap();
    let (mut verified, mut beyond, mut last_acked) = (0i64, 0i64, 0i64);
    let mut grew = 0;
    let (mut set_time, mut restore_time) = (Duration::ZERO, Duration::ZERO);
    let mut steps = [Duration::ZERO; 4];
    for i in 0..SNAPSHOTS {
        committer.assert_alive();
        // Every record acknowledged now was committed before the set began, so before the
        // freeze: all of them must be in the snapshot.
        let acked = committer.acknowledged();
        grew += usize::from(acked > last_acked);
        last_acked = acked;
        let t = Instant::now();
        let record = run_set(&rt, &host);
        set_time += t.elapsed();
        assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
        let acked_at_freeze = at_freeze.swap(-1, Ordering::SeqCst);
        assert!(acked_at_freeze >= acked, "{acked_at_freeze} < {acked}");
        let pg = pg_result(&record);
        // Thawed is its last state: this mode has no post-snapshot work.
        assert_eq!(pg.state, WriterState::Thawed, "{pg:#?}");
        let lsn = pg
            .reports
            .get("wal_flush_lsn")
            .unwrap_or_else(|| panic!("no wal_flush_lsn reported: {pg:#?}"))
            .clone();
        assert!(lsn.contains('/'), "{lsn}");
        // Done, or skipped under the default threshold of WAL: either way the restore below
        // must hold every acknowledged record.
        let checkpoint = pg.reports.get("checkpoint").map(String::as_str);
        assert!(
            checkpoint == Some("done") || checkpoint.is_some_and(|c| c.starts_with("skipped: ")),
            "{checkpoint:?}"
        );
        let snapshot = PathBuf::from(&record.snapshot.as_ref().unwrap().path);
        assert!(BtrfsVolume::is_read_only(&snapshot));

        let t = Instant::now();
        let dest = restores.join(format!("r{i}"));
        let data = copy_snapshot(&snapshot, &dest, &volume);
        steps[0] += t.elapsed();
        let mut copy = Server::on(&data, tmp.path());
        // The copy is thrown away after the checks: it need not be durable itself (fsync=off
        // spares it syncing the whole data directory before recovery). What the test checks
        // rests on the live server's fsync = on.
        copy.start(&[THROWAWAY.into()]);
        steps[1] += t.elapsed();
        let restored = check_records(&copy, acked_at_freeze);
        // The copy's WAL reaches at least the position reported at freeze.
        let reached: bool = copy
            .client()
            .query_one(
                &format!("SELECT pg_current_wal_lsn() >= '{lsn}'::pg_lsn"),
                &[],
            )
            .unwrap()
            .get(0);
        assert!(reached, "the restored copy ends before wal_flush_lsn {lsn}");
        // A crash image: the copy went through crash recovery.
        assert!(
            copy.log_text().contains("database system was interrupted"),
            "the copy did not start from a crash image:\n{}",
            copy.log_text()
        );
        steps[2] += t.elapsed();
        copy.amcheck();
        steps[3] += t.elapsed();
        copy.stop("immediate");
        std::fs::remove_dir_all(&dest).unwrap();
        restore_time += t.elapsed();
        verified += acked_at_freeze;
        beyond += restored.max - acked_at_freeze;
        eprintln!(
            "snapshot {i}: {acked} acknowledged before the set, {acked_at_freeze} before the \
             freeze, all present; copy holds 1..={} (wal_flush_lsn {lsn})",
            restored.max
        );
    }
    eprintln!("restore steps (cumulative: copy, start, check, amcheck): {steps:?}");
    committer.assert_alive();
    assert!(
        grew >= SNAPSHOTS - 1,
        "the committer must make progress between snapshots ({grew} of {SNAPSHOTS})"
    );
    eprintln!(
        "{SNAPSHOTS} snapshots restored: {verified} records acknowledged before the freeze \
         checked in total (last snapshot: {last_acked} before its set), 0 lost; {beyond} \
         records committed after the freeze also present; sets {set_time:?}, restores {restore_time:?}, whole test {:?}",
        started.elapsed()
    );
}

/// Default mode: a tablespace off the volume is refused at prepare, naming it; nothing froze.
#[test]
fn prepare_checkpoints_only_when_enough_wal_was_written_since_the_last_checkpoint() {
    let volume = BtrfsVolume::create(512);
    let tmp = scratch();
    let mut live = Server::initdb(&volume.data.join("pgdata"), tmp.path(), "");
    live.start(&[]);
    let host = host(tmp.path(), &volume, &live, "checkpoint_after_wal_mb = 1");
    let rt = runtime();
    let checkpoint = |record: &SetRecord| -> String {
        assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
        pg_result(record).reports["checkpoint"].clone()
    };
    let mut client = live.client();
    client.batch_execute("CHECKPOINT").unwrap();
    let quiet = checkpoint(&run_set(&rt, &host));
    assert!(
        quiet.starts_with("skipped: ") && quiet.contains("under checkpoint_after_wal_mb = 1"),
        "{quiet}"
    );
    // About 4 MiB of WAL: over the threshold, so the next set checkpoints.
    client
        .batch_execute(
            "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
        )
        .unwrap();
    assert_eq!(checkpoint(&run_set(&rt, &host)), "done");
    let after = checkpoint(&run_set(&rt, &host));
    assert!(after.starts_with("skipped: "), "{after}");
}

#[test]
fn a_tablespace_off_the_volume_is_refused_before_anything_freezes() {
    let volume = BtrfsVolume::create(256);
    let tmp = scratch();
    let mut live = Server::initdb(&volume.data.join("pgdata"), tmp.path(), "");
    live.start(&[]);
    // The host starts while everything is on the volume; the tablespace comes later, so the
    // refusal also shows that prepare asks the server again.
    let host = host(tmp.path(), &volume, &live, "");
    let far = tmp.path().join("far-tablespace");
    create_tablespace(&live, "far", &far);
    let rt = runtime();

    let record = run_set(&rt, &host);
    let Outcome::Failed {
        phase,
        writer,
        reason,
    } = &record.outcome
    else {
        panic!("the set must fail: {record:#?}");
    };
    assert_eq!(*phase, Phase::Prepare, "{record:#?}");
    assert_eq!(writer.as_ref().unwrap().writer, "pg");
    let far_real = far.canonicalize().unwrap().display().to_string();
    for needle in [
        "tablespace \"far\"",
        far_real.as_str(),
        "backup_api",
        "Nothing was frozen",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in: {reason}");
    }
    let pg = pg_result(&record);
    assert_eq!(pg.state, WriterState::Failed, "{pg:#?}");
    assert_eq!(pg.failure.as_ref().unwrap().phase, Phase::Prepare);
    assert!(!pg.reports.contains_key("wal_flush_lsn"), "{pg:#?}");
    // Nothing froze: no freeze phase, no freeze window, no snapshot left.
    assert!(
        record.phases.iter().all(|p| p.phase != Phase::Freeze),
        "{:#?}",
        record.phases
    );
    assert_eq!(record.freeze_window_ms, None);
    assert!(record.snapshot.is_none());
    assert!(
        volume.snapshot_list().is_empty(),
        "{:?}",
        volume.snapshot_list()
    );
    eprintln!("refused: {reason}");

    // Under the subvolume's path but in a nested subvolume, which a btrfs snapshot leaves out:
    // refused too (a path-prefix check alone would let it through).
    live.client().batch_execute("DROP TABLESPACE far").unwrap();
    let nested = volume.data.join("nested");
    testbed::run(
        Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&nested),
    );
    create_tablespace(&live, "nested", &nested.join("ts"));
    let record = run_set(&rt, &host);
    let Outcome::Failed { phase, reason, .. } = &record.outcome else {
        panic!("the set must fail: {record:#?}");
    };
    assert_eq!(*phase, Phase::Prepare, "{record:#?}");
    assert!(
        reason.contains("tablespace \"nested\"") && reason.contains("nested subvolume"),
        "{reason}"
    );
    assert!(volume.snapshot_list().is_empty());

    // Without it the same writer goes through.
    live.client()
        .batch_execute("DROP TABLESPACE nested")
        .unwrap();
    let record = run_set(&rt, &host);
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
}

/// A front-end writer whose freeze runs `action` (front-end freezes before back-end: so the
/// postgres writer is prepared, not yet frozen, when it runs).
struct Meddler {
    action: Box<dyn FnMut() -> Result<(), String> + Send>,
}

impl Backend for Meddler {
    fn call(
        &mut self,
        call: &WriterCall,
        _set: &str,
        _budget: Duration,
    ) -> Result<Reports, CallFailure> {
        if *call == WriterCall::Freeze {
            (self.action)().map_err(CallFailure::error)?;
        }
        Ok(Reports::new())
    }
}

fn add_meddler(
    host: &Host,
    volume: &BtrfsVolume,
    action: impl FnMut() -> Result<(), String> + Send + 'static,
) {
    let metadata = WriterMetadata::new(
        "meddler",
        "Test writer acting between prepare and freeze",
        Level::FrontEnd,
    )
    .with_component(
        "files",
        ComponentKind::Files,
        "shared",
        [volume.data.display().to_string()],
    );
    host.add_writer(
        metadata,
        "test".into(),
        Box::new(Meddler {
            action: Box::new(action),
        }),
    )
    .unwrap();
}

/// Terminates the postgres writer's session from another session.
fn terminate_writer_session(socket_dir: &Path, port: u16) -> Result<(), String> {
    let mut client = postgres::Config::new()
        .host_path(socket_dir)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(NoTls)
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity \
             WHERE application_name = 'quiesce-writer pg'",
            &[],
        )
        .map_err(|e| e.to_string())?;
    let n: i64 = row.get(0);
    if n == 1 {
        Ok(())
    } else {
        Err(format!("{n} writer sessions terminated, expected 1"))
    }
}

/// A lost connection between prepare and freeze fails the set with a clear error: a terminated
/// session, then a stopped server.
#[test]
fn a_lost_connection_fails_the_set() {
    let volume = BtrfsVolume::create(256);
    let tmp = scratch();
    let mut live = Server::initdb(&volume.data.join("pgdata"), tmp.path(), "");
    live.start(&[]);
    let host = host(tmp.path(), &volume, &live, "");
    let (socket_dir, port, data) = (live.socket_dir.clone(), live.port, live.data.clone());
    let step = Arc::new(AtomicUsize::new(0));
    let seen = step.clone();
    add_meddler(&host, &volume, move || {
        match seen.fetch_add(1, Ordering::SeqCst) {
            0 => terminate_writer_session(&socket_dir, port),
            1 => {
                let output = as_postgres("pg_ctl")
                    .arg("-D")
                    .arg(&data)
                    .args(["-w", "-m", "immediate", "stop"])
                    .output()
                    .map_err(|e| e.to_string())?;
                output
                    .status
                    .success()
                    .then_some(())
                    .ok_or_else(|| String::from_utf8_lossy(&output.stderr).into_owned())
            }
            _ => Ok(()),
        }
    });
    let rt = runtime();

    for what in ["terminated session", "stopped server"] {
        let record = run_set(&rt, &host);
        let Outcome::Failed {
            phase,
            writer,
            reason,
        } = &record.outcome
        else {
            panic!("{what}: the set must fail: {record:#?}");
        };
        assert_eq!(*phase, Phase::Freeze, "{what}: {record:#?}");
        assert_eq!(writer.as_ref().unwrap().writer, "pg", "{what}: {record:#?}");
        assert!(
            reason.contains("lost the connection")
                && reason.contains("session opened in prepare is gone"),
            "{what}: {reason}"
        );
        assert!(record.snapshot.is_none());
        assert_eq!(pg_result(&record).state, WriterState::Failed);
        eprintln!("{what}: {reason}");
    }
    live.running = false; // stopped by the meddler
                          // With the server down, the next set fails at prepare, saying it cannot connect.
    let record = run_set(&rt, &host);
    let Outcome::Failed { phase, reason, .. } = &record.outcome else {
        panic!("{record:#?}");
    };
    assert_eq!(*phase, Phase::Prepare);
    assert!(reason.contains("cannot connect"), "{reason}");
    assert!(volume.snapshot_list().is_empty());
}

/// backup_api mode with WAL archiving: an aborted set stops its backup; a set under load leaves
/// backup_label and tablespace_map in the snapshot exactly as pg_backup_stop returned them, and
/// the snapshot plus the archive restores to a consistent cluster with every acknowledged record.
#[test]
fn backup_api_mode_labels_the_snapshot_and_restores_from_the_archive() {
    let volume = BtrfsVolume::create(512);
    let tmp = scratch();
    let archive = postgres_dir(&tmp.path().join("archive"));
    let conf = format!(
        "archive_mode = on\narchive_command = 'test ! -f {a}/%f && cp %p {a}/.%f.part && mv {a}/.%f.part {a}/%f'\n",
        a = archive.display()
    );
    let mut live = Server::initdb(&volume.data.join("pgdata"), tmp.path(), &conf);
    live.start(&[]);
    create_tablespace(&live, "near", &volume.data.join("ts"));
    create_schema(&live, Some("near"));
    let host = host(tmp.path(), &volume, &live, "mode = \"backup_api\"");
    assert!(host.writers()[0].metadata.needs_post_snapshot);
    let fail_freeze = Arc::new(AtomicBool::new(true));
    let fail = fail_freeze.clone();
    add_meddler(&host, &volume, move || {
        if fail.swap(false, Ordering::SeqCst) {
            Err("failing on purpose".into())
        } else {
            Ok(())
        }
    });
    let rt = runtime();

    // 1. A set that fails after prepare: the writer's abort stops the backup it started.
    let record = run_set(&rt, &host);
    assert!(record.outcome.is_failed(), "{record:#?}");
    let pg = pg_result(&record);
    assert!(pg.reports.contains_key("backup_start_lsn"), "{pg:#?}");
    assert_eq!(
        pg.reports.get("backup_aborted").map(String::as_str),
        Some("the backup was stopped"),
        "{pg:#?}"
    );

    // 2. A set under load.
    let started = Instant::now();
    let committer = Committer::start(&live, &tmp.path().join("acks"));
    let acked = committer.acknowledged();
    let record = run_set(&rt, &host);
    eprintln!(
        "backup_api set: {} ms ({:?} since the committer started)",
        record.total_ms,
        started.elapsed()
    );
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let pg = pg_result(&record);
    let report = |key: &str| {
        pg.reports
            .get(key)
            .unwrap_or_else(|| panic!("no {key} reported: {pg:#?}"))
            .clone()
    };
    let (label, map) = (report("backup_label"), report("tablespace_map"));
    let lsn = report("wal_flush_lsn");
    assert!(
        label.contains("START WAL LOCATION") && label.contains(&record.id.0),
        "{label}"
    );
    assert!(
        !map.is_empty(),
        "a tablespace exists, so tablespace_map is not empty"
    );
    let snapshot = PathBuf::from(&record.snapshot.as_ref().unwrap().path);
    let in_snapshot = snapshot.join("pgdata");
    assert_eq!(
        std::fs::read(in_snapshot.join("backup_label")).unwrap(),
        label.as_bytes()
    );
    assert_eq!(
        std::fs::read(in_snapshot.join("tablespace_map")).unwrap(),
        map.as_bytes()
    );
    assert_eq!(
        report("backup_label_file"),
        in_snapshot.join("backup_label").display().to_string()
    );
    // The live data directory has no label (a non-exclusive backup).
    assert!(!live.data.join("backup_label").exists());

    // 3. Restore: the snapshot plus the archived WAL.
    let dest = volume.mount.join("restore");
    let data = copy_snapshot(&snapshot, &dest, &volume);
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    chown_postgres(&data);
    let mut copy = Server::on(&data, tmp.path());
    copy.start(&[
        THROWAWAY.into(),
        "archive_mode=off".into(),
        format!("restore_command='cp {}/%f %p'", archive.display()),
    ]);
    // pg_ctl -w returns once the copy is consistent (a hot standby); wait (a condition, with a
    // deadline) until archive recovery has ended and the copy is promoted.
    wait_until_or(
        "the end of recovery",
        Duration::from_secs(60),
        || {
            let recovering: bool = copy
                .client()
                .query_one("SELECT pg_is_in_recovery()", &[])
                .unwrap()
                .get(0);
            (!recovering).then_some(())
        },
        || copy.log_text(),
    );
    eprintln!(
        "restored from the archive {:?} after the set began",
        started.elapsed()
    );
    let log = copy.log_text();
    for needle in [
        "starting backup recovery",
        "from archive",
        "consistent recovery state reached",
        "archive recovery complete",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} not in the restore's log:\n{log}"
        );
    }
    let restored = check_records(&copy, acked);
    let reached: bool = copy
        .client()
        .query_one(
            &format!("SELECT pg_current_wal_lsn() >= '{lsn}'::pg_lsn"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(reached);
    copy.amcheck();
    eprintln!(
        "backup_api: {acked} acknowledged before the set, all present; restored 1..={}; label:\n{label}",
        restored.max
    );
    drop(committer);
}
