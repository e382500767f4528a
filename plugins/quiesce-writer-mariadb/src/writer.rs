//! The writer: what each call does.

use crate::layout::{self, Layout, Placement, ServerPaths, SnapshotRoot, OFF_VOLUME};
use crate::session::{first, Failure, Rows, Session, Target, ER_BACKUP_NOT_RUNNING};
use crate::{LockMethod, Settings};
use quiesce_sdk::{log, Call, ComponentKind, Error, Level, Writer, WriterMetadata};
use std::time::{Duration, Instant};

/// One MariaDB or MySQL server.
pub struct MariadbWriter {
    settings: Settings,
    target: Target,
    /// What init or the last prepare found, or why the server could not be asked.
    layout: Result<Layout, String>,
    /// The server's version, once known.
    server: Option<crate::Server>,
    /// The session of the running set (opened in prepare, closed at complete or abort).
    session: Option<Session>,
    /// How this set's freeze holds the server (chosen in prepare).
    lock: Lock,
    /// What the session holds.
    held: Option<Held>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    BackupStage,
    Ftwrl,
}

impl Lock {
    fn name(self) -> &'static str {
        match self {
            Lock::BackupStage => "backup_stage",
            Lock::Ftwrl => "ftwrl",
        }
    }
}

/// A lock the session holds.
struct Held {
    /// `BACKUP STAGE BLOCK_COMMIT`, `FLUSH TABLES WITH READ LOCK`: the last one that returned.
    what: &'static str,
    since: Instant,
    /// Whether the freeze finished (and reported a position) under it.
    frozen: bool,
    /// The positions the freeze reported, for messages.
    position: String,
}

/// InnoDB's log positions.
struct Lsns {
    current: u64,
    flushed: u64,
}

/// The stages of a MariaDB backup lock, in order.
const STAGES: [&str; 4] = [
    "BACKUP STAGE START",
    "BACKUP STAGE FLUSH",
    "BACKUP STAGE BLOCK_DDL",
    "BACKUP STAGE BLOCK_COMMIT",
];

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

impl MariadbWriter {
    /// The writer, with the layout asked from the server now (or why it could not be).
    pub fn new(settings: Settings) -> MariadbWriter {
        let target = settings.target();
        let mut writer = MariadbWriter {
            target,
            settings,
            layout: Err("not asked yet".into()),
            server: None,
            session: None,
            lock: Lock::BackupStage,
            held: None,
        };
        // Init has no call budget: the connect timeout plus a little for two small queries.
        let deadline = Instant::now()
            + Duration::from_millis(writer.settings.connect_timeout_ms)
            + Duration::from_secs(5);
        let found = SnapshotRoot::resolve(writer.settings.snapshot_root()).and_then(|root| {
            let mut session = Session::connect(&writer.target, remaining(deadline))?;
            writer.server = Some(session.server.clone());
            writer.identify(&mut session, &root, deadline)
        });
        match found {
            Ok(layout) => writer.layout = Ok(layout),
            Err(e) => {
                log::warn!(
                    "{}: cannot tell where the server's files are yet: {e}; the writer claims \
                     volume {} and its prepare fails until this is fixed",
                    writer.settings.id,
                    writer.settings.volume
                );
                writer.layout = Err(e.to_string());
            }
        }
        writer
    }

    /// Asks the server where its files are, and places them.
    fn identify(
        &self,
        session: &mut Session,
        root: &SnapshotRoot,
        deadline: Instant,
    ) -> Result<Layout, Error> {
        // SHOW VARIABLES lists only the variables this server has (MySQL has no Aria, older
        // servers no log_bin_basename), where a SELECT of a missing one would fail.
        let rows = session
            .query(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('datadir', 'log_bin', \
                 'log_bin_basename', 'innodb_log_group_home_dir', 'innodb_undo_directory', \
                 'innodb_data_home_dir', 'innodb_data_file_path', 'aria_log_dir_path')",
                remaining(deadline),
            )
            .map_err(|f| f.into_error(&self.target, "asking where the server's files are"))?;
        let var = |name: &str| -> Option<String> {
            rows.iter()
                .find(|r| r.first().cloned().flatten().as_deref() == Some(name))
                .and_then(|r| r.get(1).cloned().flatten())
        };
        let datadir = var("datadir").ok_or_else(|| {
            Error::new(format!(
                "{} did not say its datadir; is it a MariaDB or MySQL server?",
                self.target.describe()
            ))
        })?;
        let log_bin = var("log_bin").is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1");
        let paths = ServerPaths {
            datadir,
            log_bin_basename: var("log_bin_basename").filter(|_| log_bin),
            innodb_log_group_home_dir: var("innodb_log_group_home_dir"),
            innodb_undo_directory: var("innodb_undo_directory"),
            innodb_data_home_dir: var("innodb_data_home_dir"),
            innodb_data_file_path: var("innodb_data_file_path"),
            aria_log_dir_path: var("aria_log_dir_path"),
        };
        let layout = layout::discover(&paths, root)?;
        if let Some(expected) = &self.settings.datadir {
            let expected_real = expected.canonicalize().unwrap_or_else(|_| expected.clone());
            if expected_real != layout.data().real {
                return Err(Error::new(format!(
                    "{} has its data directory at {}, not at {} as `datadir` says: the writer \
                     is pointed at another server than the one configured; fix `socket`/`host` \
                     or `datadir`. Nothing was frozen.",
                    self.target.describe(),
                    layout.data().real.display(),
                    expected.display()
                )));
            }
        }
        Ok(layout)
    }

    fn session(&mut self) -> Result<&mut Session, Error> {
        match self.session.as_mut() {
            Some(s) => Ok(s),
            None => Err(Error::new(format!(
                "no session with {}: prepare did not succeed in this set",
                self.target.describe()
            ))),
        }
    }

    fn query(&mut self, sql: &str, budget: Duration) -> Result<Rows, Failure> {
        match self.session.as_mut() {
            Some(s) => s.query(sql, budget),
            None => Err(Failure::Lost("no session (prepare did not succeed)".into())),
        }
    }

    /// Ends what the session holds, within `budget`: `Ok(true)` when the lock was released by
    /// the statement, `Ok(false)` when nothing was held, `Err` (what happened) when the session
    /// was gone — then the server ended the lock with the session, at a moment nobody saw.
    fn unlock(&mut self, budget: Duration) -> Result<bool, Failure> {
        let Some(held) = &self.held else {
            return Ok(false);
        };
        let sql = if held.what.starts_with("BACKUP STAGE") {
            "BACKUP STAGE END"
        } else {
            "UNLOCK TABLES"
        };
        let result = self.query(sql, budget);
        match result {
            Ok(_) => {
                self.held = None;
                Ok(true)
            }
            Err(f) if f.code() == Some(ER_BACKUP_NOT_RUNNING) => {
                // The session is ours but holds no backup: it was ended under us.
                self.held = None;
                Err(Failure::Lost(
                    "the session says no backup stage is running (ERROR 4146)".into(),
                ))
            }
            Err(f) => {
                // Lost, or it cannot be ended on this session: closing the session ends it
                // server-side.
                self.held = None;
                self.session = None;
                Err(f)
            }
        }
    }

    /// Ends whatever an earlier call left (a lock, a session): idempotent. Says what it did.
    fn release(&mut self, budget: Duration) -> Option<String> {
        let held = self.held.as_ref().map(|h| h.what);
        let note = match self.unlock(budget) {
            Ok(true) => Some(format!("{} ended", held.unwrap_or("the lock"))),
            Ok(false) => None,
            Err(f) if f.is_lost() => Some(format!(
                "the session holding {} was already gone ({}); the server released it then",
                held.unwrap_or("the lock"),
                match f {
                    Failure::Lost(why) => why,
                    _ => String::new(),
                }
            )),
            Err(f) => Some(format!(
                "{} could not be ended on its session ({}); the session was closed, which \
                 ends it",
                held.unwrap_or("the lock"),
                f.into_error(&self.target, "ending the lock")
            )),
        };
        // Closing the session ends anything still running on it, server-side.
        self.session = None;
        note
    }

    fn refusal(&self, layout: &Layout, root: &SnapshotRoot) -> Option<Error> {
        let off: Vec<String> = layout
            .off_snapshot()
            .map(|p| format!("{p} {}", layout::why_off(p, root)))
            .collect();
        if off.is_empty() {
            return None;
        }
        Some(Error::new(format!(
            "refusing to snapshot volume {} for {}: {}; a snapshot of {} would not hold it, so \
             a copy could not be restored consistently. Move it onto the volume. \
             Nothing was frozen.",
            self.settings.volume,
            self.target.describe(),
            off.join("; "),
            root.configured.display()
        )))
    }

    fn choose_lock(&self, server: &crate::Server) -> Result<Lock, Error> {
        match self.settings.lock {
            LockMethod::Auto if server.has_backup_stage() => Ok(Lock::BackupStage),
            LockMethod::Auto | LockMethod::Ftwrl => Ok(Lock::Ftwrl),
            LockMethod::BackupStage if server.has_backup_stage() => Ok(Lock::BackupStage),
            LockMethod::BackupStage => Err(Error::new(format!(
                "lock = \"backup_stage\" needs MariaDB 10.4 or later, but {} is {}; set lock = \
                 \"auto\" or \"ftwrl\". Nothing was frozen.",
                self.target.describe(),
                server.name()
            ))),
        }
    }

    /// Reads the binlog file and position, GTIDs and InnoDB LSN under the lock, and reports them.
    fn report_position(&mut self, call: &mut Call) -> Result<(String, Option<u64>), Error> {
        let server = self.session()?.server.clone();
        let target = self.target.clone();
        let mut position = Vec::new();
        let logging = self.layout.as_ref().is_ok_and(|l| l.binlog);
        if logging {
            let rows = self
                .query(server.binlog_status(), call.remaining())
                .map_err(|f| f.into_error(&target, server.binlog_status()))?;
            let (file, pos) = (first(&rows, 0), first(&rows, 1));
            match (file, pos) {
                (Some(file), Some(pos)) => {
                    call.report("binlog_file", file.clone());
                    call.report("binlog_position", pos.clone());
                    position.push(format!("binlog {file}:{pos}"));
                }
                _ => call.report("binlog_file", "none (binary logging is off)"),
            }
        } else {
            call.report("binlog_file", "none (binary logging is off)");
        }
        if server.mariadb {
            let rows = self
                .query(
                    "SELECT @@GLOBAL.gtid_binlog_pos, @@GLOBAL.gtid_current_pos",
                    call.remaining(),
                )
                .map_err(|f| f.into_error(&target, "reading the GTID positions"))?;
            let binlog = first(&rows, 0).unwrap_or_default();
            let current = first(&rows, 1).unwrap_or_default();
            position.push(format!("GTID {binlog}"));
            call.report("gtid_binlog_pos", binlog);
            call.report("gtid_current_pos", current);
        } else {
            match self.query("SELECT @@GLOBAL.gtid_executed", call.remaining()) {
                Ok(rows) => {
                    let executed = first(&rows, 0).unwrap_or_default();
                    position.push(format!("GTID {executed}"));
                    call.report("gtid_executed", executed);
                }
                Err(f) if f.is_lost() => {
                    return Err(f.into_error(&target, "reading @@gtid_executed"))
                }
                Err(f) => call.report("gtid_executed", format!("unavailable: {f:?}")),
            }
        }
        let lsn = self.innodb_lsns(&server, call.remaining());
        let current = match lsn {
            Ok(Some(lsn)) => {
                position.push(format!("InnoDB LSN {}", lsn.current));
                call.report("innodb_lsn", lsn.current.to_string());
                Some(lsn.current)
            }
            Ok(None) => {
                call.report("innodb_lsn", "unavailable (no InnoDB?)");
                None
            }
            Err(f) if f.is_lost() => return Err(f.into_error(&target, "reading the InnoDB LSN")),
            // Not fatal: the lock holds all the same; the report says why it is missing.
            Err(f) => {
                call.report(
                    "innodb_lsn",
                    format!(
                        "unavailable: {}",
                        f.into_error(&target, "reading the InnoDB LSN")
                    ),
                );
                None
            }
        };
        Ok((position.join(", "), current))
    }

    /// The InnoDB log sequence number now, and how far the log is flushed to disk: status
    /// variables on MariaDB, else `SHOW ENGINE INNODB STATUS` (which needs PROCESS).
    fn innodb_lsns(
        &mut self,
        server: &crate::Server,
        budget: Duration,
    ) -> Result<Option<Lsns>, Failure> {
        let number = |v: Option<String>| v.and_then(|v| v.trim().parse::<u64>().ok());
        if server.mariadb {
            let rows = self.query(
                "SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_lsn_current', 'Innodb_lsn_flushed')",
                budget,
            )?;
            let get = |name: &str| {
                number(
                    rows.iter()
                        .find(|r| r.first().cloned().flatten().as_deref() == Some(name))
                        .and_then(|r| r.get(1).cloned().flatten()),
                )
            };
            if let (Some(current), Some(flushed)) =
                (get("Innodb_lsn_current"), get("Innodb_lsn_flushed"))
            {
                return Ok(Some(Lsns { current, flushed }));
            }
        }
        // "Log sequence number N" and "Log flushed up to N" in the LOG section.
        let rows = self.query("SHOW ENGINE INNODB STATUS", budget)?;
        let status = first(&rows, 2).unwrap_or_default();
        let find = |label: &str| {
            number(
                status
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(label))
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_string),
            )
        };
        Ok(find("Log sequence number")
            .zip(find("Log flushed up to"))
            .map(|(current, flushed)| Lsns { current, flushed }))
    }

    /// With `innodb_flush_log_at_trx_commit = 0` InnoDB writes its log about once a second, not
    /// at commit, and `FLUSH ENGINE LOGS` does not write it either (checked on MariaDB 10.11):
    /// committed transactions may sit in the log buffer, out of any snapshot. With commits
    /// blocked, wait until the log is flushed up to the LSN read under the lock (at most
    /// `innodb_flush_log_at_timeout`), within the call's budget. Other settings write the log
    /// at commit: nothing to wait for.
    fn wait_for_innodb_log(&mut self, call: &mut Call, lsn: u64) -> Result<(), Error> {
        let target = self.target.clone();
        let setting = match self.query(
            "SELECT @@GLOBAL.innodb_flush_log_at_trx_commit, @@GLOBAL.innodb_flush_log_at_timeout",
            call.remaining(),
        ) {
            Ok(rows) => (first(&rows, 0), first(&rows, 1)),
            Err(f) if f.is_lost() => {
                return Err(f.into_error(&target, "reading innodb_flush_log_at_trx_commit"))
            }
            // No InnoDB: nothing to wait for.
            Err(_) => return Ok(()),
        };
        let (Some(mode), timeout) = setting else {
            return Ok(());
        };
        call.report("innodb_flush_log_at_trx_commit", mode.clone());
        if mode.trim() != "0" {
            return Ok(());
        }
        let server = self.session()?.server.clone();
        let start = Instant::now();
        loop {
            let lsns = self
                .innodb_lsns(&server, call.remaining())
                .map_err(|f| f.into_error(&target, "reading how far the InnoDB log is flushed"))?;
            match lsns {
                Some(l) if l.flushed >= lsn => break,
                Some(_) => {}
                None => {
                    return Err(Error::new(format!(
                        "innodb_flush_log_at_trx_commit = 0 on {}, and the writer cannot tell                          how far the InnoDB log is flushed, so the snapshot could miss commits;                          set it to 1 or 2 (or grant PROCESS on MySQL)",
                        target.describe()
                    )))
                }
            }
            // InnoDB flushes on its own timer; nothing can be waited on but its progress.
            let pause = Duration::from_millis(10);
            if call.remaining() <= pause * 2 {
                return Err(Error::new(format!(
                    "innodb_flush_log_at_trx_commit = 0 on {}: the InnoDB log was not flushed up                      to LSN {lsn} (the last commit before the lock) within the freeze's budget                      (waited {} ms; innodb_flush_log_at_timeout = {} s); raise the freeze                      timeout above innodb_flush_log_at_timeout, or set                      innodb_flush_log_at_trx_commit to 1 or 2",
                    target.describe(),
                    start.elapsed().as_millis(),
                    timeout.unwrap_or_else(|| "?".into())
                )));
            }
            std::thread::sleep(pause);
        }
        call.report("innodb_log_wait_ms", ms(start.elapsed()));
        Ok(())
    }

    /// Takes the lock on the held session. On failure, what was taken is released again.
    fn lock(&mut self, call: &mut Call) -> Result<(), Error> {
        let target = self.target.clone();
        let mut timings = Vec::new();
        let statements: &[&'static str] = match self.lock {
            Lock::BackupStage => &STAGES,
            Lock::Ftwrl => &["FLUSH TABLES WITH READ LOCK"],
        };
        for &sql in statements {
            let start = Instant::now();
            let budget = call.remaining();
            let result = self.query(sql, budget);
            if let Err(f) = result {
                // Lost, or given up on (no answer in time: then killed).
                let gone = f.is_lost() || self.session.as_ref().is_none_or(Session::is_lost);
                let error = f.into_error(
                    &target,
                    &format!(
                        "{sql} (after {} ms of a {} ms budget{})",
                        start.elapsed().as_millis(),
                        budget.as_millis(),
                        if timings.is_empty() {
                            String::new()
                        } else {
                            format!("; {} done", timings.join(", "))
                        }
                    ),
                );
                let hint = if sql.starts_with("BACKUP STAGE") && !gone {
                    " — BACKUP STAGE FLUSH waits for LOCK TABLES … WRITE on non-transactional \
                     tables, BLOCK_DDL for statements writing them and for DDL, BLOCK_COMMIT for \
                     commits in progress, any stage for another session's BACKUP STAGE"
                } else {
                    ""
                };
                let note = self.release(call.remaining());
                return Err(Error::new(format!(
                    "{error}{hint}. {}",
                    match note {
                        Some(n) => format!("Released: {n}; nothing is held."),
                        None if gone => "The session was closed (and killed, if it did not \
                                         answer): the server ends whatever it held with it; \
                                         nothing is held."
                            .into(),
                        None => "Nothing is held.".into(),
                    }
                )));
            }
            timings.push(format!(
                "{} {}",
                sql.trim_start_matches("BACKUP STAGE "),
                ms(start.elapsed())
            ));
            self.held = Some(Held {
                what: sql,
                since: self.held.as_ref().map_or(start, |h| h.since),
                frozen: false,
                position: String::new(),
            });
        }
        call.report("lock_ms", timings.join(", "));
        Ok(())
    }
}

impl MariadbWriter {
    /// A freeze that cannot finish: release what it took, and say so.
    fn fail_frozen(&mut self, call: &mut Call, error: Error) -> Error {
        let note = self.release(call.remaining());
        Error::new(format!(
            "{error}. {}",
            note.map_or("Nothing is held.".into(), |n| format!(
                "Released: {n}; nothing is held."
            ))
        ))
    }
}

impl Writer for MariadbWriter {
    fn metadata(&self) -> WriterMetadata {
        let s = &self.settings;
        let name = self
            .server
            .as_ref()
            .map_or_else(|| "MariaDB".to_string(), |v| v.name());
        let mut metadata = WriterMetadata::new(&s.id, &name, Level::BackEnd);
        metadata.vendor_version = self
            .server
            .as_ref()
            .map(|v| v.version.clone())
            .unwrap_or_default();
        metadata.expected_freeze_ms = 100;
        let at = self.target.describe();
        let at = at.trim_start_matches("the server at ");
        match &self.layout {
            Ok(layout) => {
                metadata.instance = format!("{at} ({})", layout.data().real.display());
                for part in &layout.parts {
                    let volume = if part.placement == Placement::InSnapshot {
                        s.volume.as_str()
                    } else {
                        OFF_VOLUME
                    };
                    metadata = metadata.with_component(
                        &part.name,
                        part.kind,
                        volume,
                        [part.real.display().to_string()],
                    );
                }
            }
            Err(_) => {
                // Unknown yet: claim the volume, so that its sets include this writer and its
                // prepare says what is wrong rather than the set silently going without it.
                metadata.instance = at.to_string();
                metadata = metadata.with_component(
                    "data",
                    ComponentKind::Database,
                    &s.volume,
                    [s.datadir
                        .as_deref()
                        .unwrap_or(s.snapshot_root())
                        .display()
                        .to_string()],
                );
            }
        }
        metadata
    }

    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        if let Some(note) = self.release(call.remaining()) {
            log::info!(
                "{}: an earlier set was still open: {note}",
                self.settings.id
            );
        }
        let deadline = call.deadline();
        let root = SnapshotRoot::resolve(self.settings.snapshot_root())?;
        let mut session = Session::connect(&self.target, call.remaining())?;
        let server = session.server.clone();
        self.server = Some(server.clone());
        let layout = self.identify(&mut session, &root, deadline)?;
        self.layout = Ok(layout.clone());
        call.report("data_directory", layout.data().real.display().to_string());
        call.report("server_version", server.name());
        if let Some(refusal) = self.refusal(&layout, &root) {
            return Err(refusal);
        }
        self.lock = self.choose_lock(&server)?;
        call.report("lock", self.lock.name());
        self.session = Some(session);
        let target = self.target.clone();
        // Check now, before anything freezes, that the account may read the position the
        // freeze reports.
        if layout.binlog {
            self.query(server.binlog_status(), call.remaining())
                .map_err(|f| {
                    let e = f.into_error(&target, server.binlog_status());
                    Error::new(format!(
                        "{e}; the account needs {} to report the binlog position. Nothing was \
                         frozen.",
                        server.binlog_privilege()
                    ))
                })?;
        }
        // The slow part of a freeze's flush, done before it: close and flush every table not in
        // use. LOCAL: not written to the binlog (a plain FLUSH TABLES is, with a GTID of its
        // own).
        let start = Instant::now();
        self.query("FLUSH LOCAL TABLES", call.remaining())
            .map_err(|f| {
                let e = f.into_error(&target, "FLUSH LOCAL TABLES (needs RELOAD)");
                Error::new(format!("{e}. Nothing was frozen."))
            })?;
        call.report("flush_tables_ms", ms(start.elapsed()));
        Ok(())
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        let start = Instant::now();
        if self.held.is_some() {
            // A second freeze in one set: keep what is held, report again.
            log::warn!("{}: freeze called while already frozen", self.settings.id);
        } else {
            self.session()?;
            self.lock(call)?;
        }
        let (position, lsn) = match self.report_position(call) {
            Ok(p) => p,
            Err(e) => return Err(self.fail_frozen(call, e)),
        };
        // The logs of engines that keep their own (Aria, MyRocks; InnoDB's outstanding redo),
        // written (and with InnoDB's innodb_flush_log_at_trx_commit = 1, synced). LOCAL: not
        // written to the binlog.
        if let Err(f) = self.query("FLUSH LOCAL ENGINE LOGS", call.remaining()) {
            let e = f.into_error(&self.target, "FLUSH LOCAL ENGINE LOGS");
            return Err(self.fail_frozen(call, e));
        }
        if let Some(lsn) = lsn {
            if let Err(e) = self.wait_for_innodb_log(call, lsn) {
                return Err(self.fail_frozen(call, e));
            }
        }
        if let Some(held) = self.held.as_mut() {
            held.frozen = true;
            held.position = position;
        }
        call.report("freeze_ms", ms(start.elapsed()));
        call.report("session", self.session()?.id.to_string());
        Ok(())
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        let Some(held) = &self.held else {
            return Ok(()); // nothing held: thaw is idempotent
        };
        let (what, since, frozen, position) =
            (held.what, held.since, held.frozen, held.position.clone());
        match self.unlock(call.remaining()) {
            Ok(_) => {
                call.report("held_ms", ms(since.elapsed()));
                Ok(())
            }
            Err(f) => {
                self.session = None;
                let reported = if frozen {
                    format!(" ({position})")
                } else {
                    String::new()
                };
                let server = self.target.describe();
                Err(Error::new(match f {
                    Failure::Lost(cause) => format!(
                        "the freeze's hold on {server} was lost: the session holding {what} \
                         since the freeze is gone or no longer holds it ({cause}). The server \
                         released the lock when that happened, maybe before the snapshot was \
                         taken, so the snapshot may hold commits after the position the freeze \
                         reported{reported} and is not consistent with it. Check the server \
                         (restarted? session killed? wait_timeout?) and run the set again."
                    ),
                    // The session was there, but whether it held all along cannot be told.
                    other => format!(
                        "{}; the session was closed (killed if it did not answer), which ends \
                         the lock. Whether it held through the snapshot cannot be told, so the \
                         snapshot is not known to match the position the freeze \
                         reported{reported}: run the set again.",
                        other.into_error(&self.target, &format!("ending {what} at thaw"))
                    ),
                }))
            }
        }
    }

    fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
        if let Some(note) = self.release(call.remaining()) {
            call.report("released", note);
        }
        Ok(())
    }

    fn complete(&mut self, call: &mut Call, outcome: &str) -> Result<(), Error> {
        if let Some(note) = self.release(call.remaining()) {
            log::warn!(
                "{}: set {} ended ({outcome}) with a lock still held: {note}",
                self.settings.id,
                call.set_id()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use quiesce_sdk::harness::{Phase, Plugin};
    use quiesce_sdk::ComponentKind;

    #[test]
    fn an_unreachable_server_still_claims_the_volume_and_prepare_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let config = format!(
            "id = \"db\"\nsocket = \"{}\"\nconnect_timeout_ms = 500\nvolume = \"shared\"\nvolume_path = \"{}\"",
            tmp.path().join("no-socket-here").display(),
            tmp.path().display()
        );
        let mut writers = Plugin::new("mariadb", crate::init).init(&config).unwrap();
        let run = writers[0].run(|_| Ok(()));
        let metadata = run.metadata.as_ref().unwrap();
        assert_eq!(metadata.components.len(), 1);
        assert_eq!(metadata.components[0].volume, "shared");
        assert_eq!(metadata.components[0].kind, ComponentKind::Database);
        assert_eq!(metadata.level, quiesce_sdk::Level::BackEnd);
        assert!(!metadata.needs_post_snapshot);
        let (step, error) = run.error().unwrap();
        assert_eq!(step, Phase::Prepare);
        assert!(
            error
                .reason
                .contains("cannot connect to the server at socket"),
            "{error}"
        );
        assert_eq!(
            run.steps(),
            [Phase::Prepare, Phase::Abort, Phase::Complete],
            "{run:#?}"
        );
        // Abort again: idempotent with nothing held.
        writers[0].abort().unwrap();
    }
}
