//! The writer: what each call does in each mode.

use crate::layout::{self, Layout, Placement, SnapshotRoot, Tablespace, OFF_VOLUME};
use crate::session::{Session, Target};
use crate::{Mode, Settings};
use postgres::error::SqlState;
use quiesce_sdk::{log, Call, ComponentKind, Error, Level, Writer, WriterMetadata};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// One PostgreSQL cluster.
pub struct PostgresWriter {
    settings: Settings,
    target: Target,
    /// What init or the last prepare found, or why the server could not be asked.
    layout: Result<Layout, String>,
    /// `server_version`, once known.
    version: String,
    /// The session of the running set (opened in prepare, closed at complete or abort).
    session: Option<Session>,
    /// The snapshotted tree, as resolved in prepare.
    root: Option<SnapshotRoot>,
    backup: Backup,
}

/// Where the backup API stands (backup_api mode).
enum Backup {
    Idle,
    /// `pg_backup_start` returned on the held session.
    Started,
    /// `pg_backup_stop` returned these; post-snapshot writes them.
    Stopped {
        labelfile: String,
        spcmapfile: String,
    },
}

impl PostgresWriter {
    /// The writer, with the layout asked from the server now (or why it could not be).
    pub fn new(settings: Settings) -> PostgresWriter {
        let target = settings.target();
        let mut writer = PostgresWriter {
            target,
            settings,
            layout: Err("not asked yet".into()),
            version: String::new(),
            session: None,
            root: None,
            backup: Backup::Idle,
        };
        // Init has no call budget: the connect timeout plus a little for two small queries.
        let deadline = Instant::now()
            + Duration::from_millis(writer.settings.connect_timeout_ms)
            + Duration::from_secs(5);
        let found = SnapshotRoot::resolve(writer.settings.snapshot_root()).and_then(|root| {
            let mut session = Session::connect(&writer.target, remaining(deadline))?;
            writer.identify(&mut session, &root, deadline)
        });
        match found {
            Ok(layout) => writer.layout = Ok(layout),
            Err(e) => {
                log::warn!(
                    "{}: cannot tell where the cluster's files are yet: {e}; the writer claims \
                     volume {} and its prepare fails until this is fixed",
                    writer.settings.id,
                    writer.settings.volume
                );
                writer.layout = Err(e.to_string());
            }
        }
        writer
    }

    /// Asks the server for its data directory and tablespaces, and places them (and pg_wal).
    fn identify(
        &mut self,
        session: &mut Session,
        root: &SnapshotRoot,
        deadline: Instant,
    ) -> Result<Layout, Error> {
        let target = self.target.clone();
        let rows = session
            .query(
                "SELECT current_setting('data_directory'), current_setting('server_version')",
                &[],
                remaining(deadline),
            )
            .map_err(|f| f.into_error(&target, "asking for the data directory"))?;
        let data_directory: String = rows[0].get(0);
        self.version = rows[0].get(1);
        let rows = session
            .query(
                "SELECT spcname::text, pg_tablespace_location(oid) FROM pg_tablespace \
                 WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY spcname",
                &[],
                remaining(deadline),
            )
            .map_err(|f| f.into_error(&target, "listing the tablespaces"))?;
        let tablespaces: Vec<Tablespace> = rows
            .iter()
            .map(|r| Tablespace {
                name: r.get(0),
                location: r.get(1),
            })
            .collect();
        layout::discover(&data_directory, &tablespaces, root)
    }

    /// Ends whatever an earlier set left (a backup in progress, a session): idempotent.
    fn release(&mut self, budget: Duration) -> Option<String> {
        let mut note = None;
        if let (Backup::Started, Some(session)) = (&self.backup, self.session.as_mut()) {
            // Not waiting for the archive: this backup is being thrown away.
            note = Some(
                match session.query(
                    "SELECT lsn::text FROM pg_backup_stop(wait_for_archive => false)",
                    &[],
                    budget,
                ) {
                    Ok(_) => "the backup was stopped".to_string(),
                    Err(f) if f.code() == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) => {
                        "no backup was in progress".to_string()
                    }
                    Err(f) if f.is_lost() => {
                        "the session was gone (the server ended its backup with it)".to_string()
                    }
                    Err(f) => {
                        let e = f.into_error(&self.target, "pg_backup_stop");
                        log::warn!("{e}; closing the session ends the backup anyway");
                        "the session was closed, which ends the backup".to_string()
                    }
                },
            );
        }
        self.backup = Backup::Idle;
        // Closing the session ends a non-exclusive backup still running on it, server-side.
        self.session = None;
        note
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

    fn refusal(&self, layout: &Layout, root: &SnapshotRoot) -> Option<Error> {
        let off: Vec<String> = layout
            .off_snapshot()
            .map(|p| format!("{p} {}", layout::why_off(p, root)))
            .collect();
        if off.is_empty() {
            return None;
        }
        Some(Error::new(format!(
            "refusing to snapshot volume {} for {}: {}; a snapshot of {} would not \
             hold it, so the copy could not be restored. Move it onto the volume, or set \
             mode = \"backup_api\" (with WAL archiving). Nothing was frozen.",
            self.settings.volume,
            self.target.describe(),
            off.join("; "),
            root.configured.display()
        )))
    }

    /// `CHECKPOINT`, unless the WAL since the last checkpoint's redo point is under
    /// `checkpoint_after_wal_mb` (then a restore replays little anyway). Reports what it did.
    fn checkpoint_if_worth_it(&mut self, call: &mut Call) -> Result<(), Error> {
        let target = self.target.clone();
        let threshold = self.settings.checkpoint_after_wal_mb;
        if threshold > 0 {
            let since = self.session()?.query(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), redo_lsn)::bigint FROM pg_control_checkpoint()",
                &[],
                call.remaining(),
            );
            match since.map(|rows| rows.first().map(|r| r.get::<_, i64>(0))) {
                Ok(Some(bytes)) if (bytes as u64) < threshold << 20 => {
                    call.report(
                        "checkpoint",
                        format!(
                            "skipped: {:.1} MiB of WAL since the last checkpoint (under checkpoint_after_wal_mb = {threshold})",
                            bytes as f64 / 1048576.0
                        ),
                    );
                    return Ok(());
                }
                Ok(_) => {}
                // Not allowed to read the control data (a role without pg_monitor): checkpoint.
                Err(f) => log::info!(
                    "{}: {}; checkpointing at every set",
                    self.settings.id,
                    f.into_error(&target, "reading the last checkpoint")
                ),
            }
        }
        self.session()?
            .query("CHECKPOINT", &[], call.remaining())
            .map_err(|f| f.into_error(&target, "CHECKPOINT"))?;
        call.report("checkpoint", "done");
        Ok(())
    }

    fn prepare_backup(
        &mut self,
        call: &mut Call,
        layout: &Layout,
        root: &SnapshotRoot,
    ) -> Result<(), Error> {
        let data = layout.data();
        if data.placement != Placement::InSnapshot {
            return Err(Error::new(format!(
                "{data} {}: no snapshot of volume {} can back up this cluster, even \
                 with the backup API; point the writer at the volume that holds the data \
                 directory",
                layout::why_off(data, root),
                self.settings.volume
            )));
        }
        let target = self.target.clone();
        let session = self.session()?;
        let rows = session
            .query(
                "SELECT current_setting('archive_mode'), current_setting('archive_command'), \
                 current_setting('archive_library')",
                &[],
                call.remaining(),
            )
            .map_err(|f| f.into_error(&target, "checking WAL archiving"))?;
        let (mode, command, library): (String, String, String) =
            (rows[0].get(0), rows[0].get(1), rows[0].get(2));
        if mode == "off" || (command.is_empty() && library.is_empty()) {
            return Err(Error::new(format!(
                "mode = \"backup_api\" needs WAL archiving, but {} has archive_mode = \
                 {mode:?}, archive_command = {command:?}, archive_library = {library:?}: a \
                 restore of the snapshot needs the WAL from the backup's start to its end. Set \
                 archive_mode = on and an archive_command (restart needed), or use mode = \
                 \"snapshot\". Nothing was frozen.",
                target.describe()
            )));
        }
        let off: Vec<String> = layout
            .off_snapshot()
            .map(|p| format!("{p} {}", layout::why_off(p, root)))
            .collect();
        if !off.is_empty() {
            // pg_wal comes from the archive; a tablespace elsewhere must be copied by whatever
            // snapshots its volume during the set (the backup runs from prepare to thaw).
            log::warn!(
                "{}: not in the snapshot of volume {}: {}; a restore needs these from \
                 elsewhere (WAL from the archive; tablespaces from a copy taken during this set)",
                self.settings.id,
                self.settings.volume,
                off.join("; ")
            );
            call.report("off_snapshot", off.join("; "));
        }
        let label = format!("quiesce {} {}", self.settings.id, call.set_id());
        let rows = self
            .session()?
            .query(
                "SELECT pg_backup_start($1, fast => true)::text",
                &[&label],
                call.remaining(),
            )
            .map_err(|f| f.into_error(&target, "pg_backup_start"))?;
        self.backup = Backup::Started;
        let lsn: String = rows[0].get(0);
        call.report("backup_start_lsn", lsn);
        call.report("backup_label_name", label);
        Ok(())
    }

    fn thaw_backup(&mut self, call: &mut Call) -> Result<(), Error> {
        if !matches!(self.backup, Backup::Started) {
            return Ok(()); // never started, or already stopped: thaw is idempotent
        }
        let target = self.target.clone();
        let result = self.session()?.query(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(wait_for_archive => true)",
            &[],
            call.remaining(),
        );
        let rows = match result {
            Ok(rows) => rows,
            Err(f) => {
                if f.is_lost() {
                    self.backup = Backup::Idle;
                    self.session = None;
                }
                return Err(f.into_error(
                    &target,
                    "pg_backup_stop (the snapshot has no backup label and cannot be restored)",
                ));
            }
        };
        let (lsn, labelfile, spcmapfile): (String, String, Option<String>) =
            (rows[0].get(0), rows[0].get(1), rows[0].get(2));
        let spcmapfile = spcmapfile.unwrap_or_default();
        call.report("backup_stop_lsn", lsn);
        call.report("backup_label", labelfile.clone());
        call.report("tablespace_map", spcmapfile.clone());
        self.backup = Backup::Stopped {
            labelfile,
            spcmapfile,
        };
        Ok(())
    }

    fn write_labels(&mut self, call: &mut Call, snapshot: &Path) -> Result<(), Error> {
        let Backup::Stopped {
            labelfile,
            spcmapfile,
        } = &self.backup
        else {
            return Err(Error::new(
                "pg_backup_stop has not returned in this set, so there is no \
                 backup label to write; the snapshot cannot be restored",
            ));
        };
        let (Some(root), Ok(layout)) = (&self.root, &self.layout) else {
            return Err(Error::new("prepare did not succeed in this set"));
        };
        let data = layout::in_snapshot(root, snapshot, &layout.data().real).ok_or_else(|| {
            Error::new(format!(
                "the data directory {} is not under {}",
                layout.data().real.display(),
                root.real.display()
            ))
        })?;
        if !data.join("PG_VERSION").is_file() {
            return Err(Error::new(format!(
                "{} holds no data directory (no PG_VERSION): the snapshot {} \
                 does not start at {}; set `subvolume` to the path the provider snapshots",
                data.display(),
                snapshot.display(),
                root.configured.display()
            )));
        }
        write_new(&data.join("backup_label"), labelfile.as_bytes())?;
        call.report(
            "backup_label_file",
            data.join("backup_label").display().to_string(),
        );
        if !spcmapfile.is_empty() {
            write_new(&data.join("tablespace_map"), spcmapfile.as_bytes())?;
            call.report(
                "tablespace_map_file",
                data.join("tablespace_map").display().to_string(),
            );
        }
        std::fs::File::open(&data)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::new(format!("syncing {}: {e}", data.display())))?;
        Ok(())
    }
}

/// Writes a file that must not exist yet, and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|e| Error::new(format!("writing {}: {e}", path.display())))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

impl Writer for PostgresWriter {
    fn metadata(&self) -> WriterMetadata {
        let s = &self.settings;
        let version = if self.version.is_empty() {
            String::new()
        } else {
            format!("PostgreSQL {}", self.version)
        };
        let name = if version.is_empty() {
            "PostgreSQL".to_string()
        } else {
            version.clone()
        };
        let mut metadata = WriterMetadata::new(&s.id, name, Level::BackEnd);
        metadata.vendor_version = version;
        metadata.expected_freeze_ms = 100;
        match &self.layout {
            Ok(layout) => {
                metadata.instance =
                    format!("{}:{} ({})", s.host, s.port, layout.data().real.display());
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
                metadata.instance = format!("{}:{}", s.host, s.port);
                metadata = metadata.with_component(
                    "data",
                    ComponentKind::Database,
                    &s.volume,
                    [s.snapshot_root().display().to_string()],
                );
            }
        }
        if s.mode == Mode::BackupApi {
            metadata = metadata.with_post_snapshot();
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
        let layout = self.identify(&mut session, &root, deadline)?;
        self.layout = Ok(layout.clone());
        self.session = Some(session);
        self.root = Some(root.clone());
        call.report("data_directory", layout.data().real.display().to_string());
        match self.settings.mode {
            Mode::Snapshot => {
                if let Some(refusal) = self.refusal(&layout, &root) {
                    self.session = None;
                    return Err(refusal);
                }
                self.checkpoint_if_worth_it(call)
            }
            Mode::BackupApi => self.prepare_backup(call, &layout, &root),
        }
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        let target = self.target.clone();
        let result = self.session()?.query(
            "SELECT pg_current_wal_flush_lsn()::text",
            &[],
            call.remaining(),
        );
        match result {
            Ok(rows) => {
                let lsn: String = rows[0].get(0);
                call.report("wal_flush_lsn", lsn);
                Ok(())
            }
            Err(f) => {
                let what = match (f.is_lost(), &self.backup) {
                    (true, Backup::Started) => {
                        "the session held since prepare is gone, and with it the \
                         backup pg_backup_start began"
                    }
                    (true, _) => "the session opened in prepare is gone",
                    _ => "pg_current_wal_flush_lsn()",
                };
                if f.is_lost() {
                    self.backup = Backup::Idle;
                    self.session = None;
                }
                Err(f.into_error(&target, what))
            }
        }
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        match self.settings.mode {
            // Nothing is held in this mode: the server went on writing all along, and the
            // snapshot is a crash-consistent image holding every commit up to wal_flush_lsn.
            Mode::Snapshot => Ok(()),
            Mode::BackupApi => self.thaw_backup(call),
        }
    }

    fn post_snapshot(&mut self, call: &mut Call, snapshot: &Path) -> Result<(), Error> {
        match self.settings.mode {
            Mode::Snapshot => Ok(()),
            Mode::BackupApi => self.write_labels(call, snapshot),
        }
    }

    fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
        if let Some(note) = self.release(call.remaining()) {
            call.report("backup_aborted", note);
        }
        Ok(())
    }

    fn complete(&mut self, call: &mut Call, outcome: &str) -> Result<(), Error> {
        if let Some(note) = self.release(call.remaining()) {
            log::warn!(
                "{}: set {} ended ({outcome}) with a backup still open: {note}",
                self.settings.id,
                call.set_id()
            );
        }
        self.root = None;
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
            "id = \"pg\"\nhost = \"{}\"\nport = 1\nconnect_timeout_ms = 500\nvolume = \"shared\"\nvolume_path = \"{}\"",
            tmp.path().join("no-socket-here").display(),
            tmp.path().display()
        );
        let mut writers = Plugin::new("postgres", crate::init).init(&config).unwrap();
        let run = writers[0].run(|_| Ok(()));
        let metadata = run.metadata.as_ref().unwrap();
        assert_eq!(metadata.components.len(), 1);
        assert_eq!(metadata.components[0].volume, "shared");
        assert_eq!(metadata.components[0].kind, ComponentKind::Database);
        assert!(!metadata.needs_post_snapshot);
        let (step, error) = run.error().unwrap();
        assert_eq!(step, Phase::Prepare);
        assert!(
            error.reason.contains("cannot connect to PostgreSQL at"),
            "{error}"
        );
        assert_eq!(
            run.steps(),
            [Phase::Prepare, Phase::Abort, Phase::Complete],
            "{run:#?}"
        );
    }

    #[test]
    fn backup_api_mode_asks_for_post_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let config = format!(
            "host = \"{}\"\nport = 1\nconnect_timeout_ms = 200\nvolume = \"shared\"\nvolume_path = \"{}\"\nmode = \"backup_api\"",
            tmp.path().join("none").display(),
            tmp.path().display()
        );
        let writers = Plugin::new("postgres", crate::init).init(&config).unwrap();
        let run_metadata = writers[0].metadata().unwrap();
        assert!(run_metadata.needs_post_snapshot);
        assert_eq!(run_metadata.level, quiesce_sdk::Level::BackEnd);
    }
}
