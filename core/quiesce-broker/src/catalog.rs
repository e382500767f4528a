//! The catalog: every set the broker ran, in an embedded SQLite file that survives restarts.
//!
//! One row per set. When a set starts, its row holds the record the set would have if the broker
//! died at once (failed, every writer as identified); as the set moves on, a checkpoint updates
//! the row's phase and the snapshot the set holds, if any — small writes, whatever the number of
//! writers. When the set ends, the row holds its final record. A broker that starts and finds
//! rows still `running` therefore knows exactly which sets it abandoned, in which phase, and
//! which snapshots to clean up ([`Catalog::abandoned`]).
//!
//! Checkpoints are written by one writer thread in the order they are made, so a set's progress
//! never waits on the disk (nothing slow inside the freeze window); the final record is written
//! before `Create` answers. Reads use their own connection (WAL mode lets them run beside
//! writes).

use quiesce_proto::{Outcome, Phase, SetRecord, SnapshotInfo};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog {path}: {cause}; {}", advice(cause))]
    Sqlite {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("the catalog {path} was written by a newer broker (schema {found}, this broker knows {SCHEMA}); run the newer broker or use another catalog file")]
    Newer { path: PathBuf, found: i64 },
    #[error("the catalog {path}: the record of set {id} is not JSON.md's SetRecord: {cause}")]
    Corrupt {
        path: PathBuf,
        id: String,
        cause: serde_json::Error,
    },
    #[error("the catalog's writer thread stopped; the broker must restart")]
    WriterGone,
}

/// What to do about an SQLite error, for the operator.
fn advice(cause: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode as C;
    match cause.sqlite_error_code() {
        Some(C::DiskFull) => "the disk holding the catalog is full: free space on it (or move the catalog elsewhere: `catalog = PATH` in the broker's configuration), then try again",
        Some(C::DatabaseCorrupt | C::NotADatabase) => "the catalog file is damaged: stop the broker and move the file away; `sqlite3 FILE .recover | sqlite3 NEW` may save its records into a new file to use instead; with a new, empty catalog the old sets' snapshots stay on the volume and must be deleted by hand",
        Some(C::ReadOnly | C::CannotOpen | C::PermissionDenied) => "the broker cannot write the catalog file: check that its directory exists and that the broker's user may write it and the file",
        Some(C::DatabaseBusy | C::DatabaseLocked) => "another process holds the catalog file: is a second broker running with the same catalog?",
        Some(C::SystemIoFailure) => "the disk failed to read or write the catalog: check the kernel log and the disk",
        _ => "check the catalog file and its disk",
    }
}

/// The schema version, in SQLite's `user_version`.
const SCHEMA: i64 = 3;

/// One page of ended sets.
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<SetRecord>,
    /// Rows that could not be read, each with why and how to remove it.
    pub unreadable: Vec<String>,
    /// The id to ask the next page after; `None` on the last page.
    pub next: Option<String>,
}

/// A set found `running` in the catalog at start: the broker died during it.
#[derive(Debug, Clone)]
pub struct Abandoned {
    pub checkpoint: SetRecord,
    pub snapshot: Option<SnapshotInfo>,
    /// Until when (Unix ms) a provider operation the set started may still be running: a
    /// program the dead broker started may still take a snapshot until then.
    pub provider_until_unix_ms: Option<u64>,
}

enum Write {
    Checkpoint {
        id: String,
        phase: Phase,
        snapshot: Option<SnapshotInfo>,
        provider_until_unix_ms: u64,
    },
    Final {
        record: Box<SetRecord>,
        done: oneshot::Sender<Result<(), CatalogError>>,
    },
}

pub struct Catalog {
    path: PathBuf,
    reader: Mutex<Connection>,
    writes: mpsc::Sender<Write>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

fn open(path: &Path) -> Result<Connection, CatalogError> {
    let sqlite = |cause| CatalogError::Sqlite {
        path: path.into(),
        cause,
    };
    let conn = Connection::open(path).map_err(sqlite)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sqlite)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sqlite)?;
    // FULL: a set's final record is on disk when `Create` answers, even across a power cut.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    Ok(conn)
}

impl Catalog {
    /// The SQLite file this catalog is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating if needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CatalogError::Sqlite {
                path: path.into(),
                cause: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let writer = open(path)?;
        let sqlite = |cause| CatalogError::Sqlite {
            path: path.into(),
            cause,
        };
        let version: i64 = writer
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sqlite)?;
        if version > SCHEMA {
            return Err(CatalogError::Newer {
                path: path.into(),
                found: version,
            });
        }
        writer
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS sets (
                    id TEXT PRIMARY KEY,
                    started_unix_ms INTEGER NOT NULL,
                    state TEXT NOT NULL CHECK (state IN ('running', 'ended')),
                    record_json TEXT NOT NULL,
                    phase TEXT,
                    snapshot_json TEXT,
                    provider_until_unix_ms INTEGER,
                    kept INTEGER NOT NULL DEFAULT 0,
                    lease_until_unix_ms INTEGER
                );",
            )
            .map_err(sqlite)?;
        if version == 1 {
            // Schema 2 adds when a set's provider operation may still be running.
            writer
                .execute_batch("ALTER TABLE sets ADD COLUMN provider_until_unix_ms INTEGER;")
                .map_err(sqlite)?;
        }
        if (1..3).contains(&version) {
            // Schema 3 adds which sets still keep a snapshot, and until when their lease holds
            // it: the reaper and retention read only those rows.
            writer
                .execute_batch(
                    "ALTER TABLE sets ADD COLUMN kept INTEGER NOT NULL DEFAULT 0;
                     ALTER TABLE sets ADD COLUMN lease_until_unix_ms INTEGER;",
                )
                .map_err(sqlite)?;
            backfill_kept(&writer, path)?;
        }
        // Pages of ended sets in start order, without a scan of the whole table per page.
        writer
            .execute_batch(
                "CREATE INDEX IF NOT EXISTS sets_by_start ON sets (state, started_unix_ms, id);
                 CREATE INDEX IF NOT EXISTS sets_kept ON sets (kept, started_unix_ms, id);",
            )
            .map_err(sqlite)?;
        writer
            .pragma_update(None, "user_version", SCHEMA)
            .map_err(sqlite)?;
        let reader = open(path)?;
        let (writes, inbox) = mpsc::channel();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("catalog-writer".into())
            .spawn(move || write_loop(writer, &thread_path, inbox))
            .map_err(|e| CatalogError::Sqlite {
                path: path.into(),
                cause: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Catalog {
            path: path.into(),
            reader: Mutex::new(reader),
            writes,
        })
    }

    fn sqlite(&self, cause: rusqlite::Error) -> CatalogError {
        CatalogError::Sqlite {
            path: self.path.clone(),
            cause,
        }
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a set that starts, synchronously (before anything is frozen).
    pub fn start(&self, checkpoint: &SetRecord, started_unix_ms: u64) -> Result<(), CatalogError> {
        self.reader()
            .execute(
                "INSERT INTO sets (id, started_unix_ms, state, record_json) VALUES (?1, ?2, 'running', ?3)",
                params![checkpoint.id.0, started_unix_ms as i64, json(checkpoint)],
            )
            .map_err(|e| self.sqlite(e))?;
        Ok(())
    }

    /// Queues a running set's new checkpoint (its phase, the snapshot it holds, until when a
    /// provider operation it started may run); it does not wait for the disk.
    pub fn checkpoint(
        &self,
        id: &str,
        phase: Phase,
        snapshot: Option<SnapshotInfo>,
        provider_until_unix_ms: u64,
    ) {
        let write = Write::Checkpoint {
            id: id.to_string(),
            phase,
            snapshot,
            provider_until_unix_ms,
        };
        if self.writes.send(write).is_err() {
            tracing::error!("the catalog's writer thread stopped; checkpoints are lost");
        }
    }

    /// Writes a set's final record (after every checkpoint queued before it) and waits for it.
    pub async fn finish(&self, record: SetRecord) -> Result<(), CatalogError> {
        let (done, wait) = oneshot::channel();
        self.writes
            .send(Write::Final {
                record: Box::new(record),
                done,
            })
            .map_err(|_| CatalogError::WriterGone)?;
        wait.await.map_err(|_| CatalogError::WriterGone)?
    }

    /// Replaces an ended set's record (a deleted snapshot, a recovered set), synchronously.
    pub fn update(&self, record: &SetRecord) -> Result<(), CatalogError> {
        write_final(&self.reader(), &self.path, record)
    }

    /// Forgets the ended sets that keep no snapshot and started before `before_unix_ms`:
    /// how many. A set still running, or whose snapshot is still kept, is never forgotten.
    pub fn forget(&self, before_unix_ms: u64) -> Result<usize, CatalogError> {
        self.reader()
            .execute(
                "DELETE FROM sets WHERE state = 'ended' AND kept = 0 AND started_unix_ms < ?1",
                params![i64::try_from(before_unix_ms).unwrap_or(i64::MAX)],
            )
            .map_err(|e| self.sqlite(e))
    }

    /// The sets that were running when the broker last stopped.
    pub fn abandoned(&self) -> Result<Vec<Abandoned>, CatalogError> {
        let conn = self.reader();
        let mut statement = conn
            .prepare("SELECT id, record_json, snapshot_json, phase, provider_until_unix_ms FROM sets WHERE state = 'running' ORDER BY started_unix_ms")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .map_err(|e| self.sqlite(e))?;
        let mut abandoned = vec![];
        for row in rows {
            let (id, record, snapshot, phase, provider_until) = row.map_err(|e| self.sqlite(e))?;
            let mut checkpoint = self.parse(&id, &record)?;
            // The phase it had reached: the start record says where it began.
            let reached: Option<Phase> =
                phase.and_then(|p| serde_json::from_value(serde_json::Value::String(p)).ok());
            if let (Some(reached), Outcome::Failed { phase, .. }) =
                (reached, &mut checkpoint.outcome)
            {
                *phase = reached;
            }
            abandoned.push(Abandoned {
                provider_until_unix_ms: provider_until.and_then(|t| u64::try_from(t).ok()),
                checkpoint,
                snapshot: match snapshot {
                    Some(s) => {
                        Some(
                            serde_json::from_str(&s).map_err(|cause| CatalogError::Corrupt {
                                path: self.path.clone(),
                                id: id.clone(),
                                cause,
                            })?,
                        )
                    }
                    None => None,
                },
            });
        }
        Ok(abandoned)
    }

    fn parse(&self, id: &str, json: &str) -> Result<SetRecord, CatalogError> {
        serde_json::from_str(json).map_err(|cause| CatalogError::Corrupt {
            path: self.path.clone(),
            id: id.into(),
            cause,
        })
    }

    /// Every ended set, oldest first.
    pub fn list(&self) -> Result<Vec<SetRecord>, CatalogError> {
        Ok(self.page(None, usize::MAX)?.records)
    }

    /// Up to `limit` ended sets after the set `after` (by start, then id), oldest first. A row
    /// that does not read as a record is skipped and reported, not fatal to the page.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Result<Page, CatalogError> {
        let conn = self.reader();
        let (after_started, after_id) = match after {
            Some(id) => {
                let started: Option<i64> = conn
                    .query_row(
                        "SELECT started_unix_ms FROM sets WHERE id = ?1",
                        [id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(|e| self.sqlite(e))?;
                (started.unwrap_or(i64::MIN), id.to_string())
            }
            None => (i64::MIN, String::new()),
        };
        let mut statement = conn
            .prepare(
                "SELECT id, record_json FROM sets WHERE state = 'ended' AND (started_unix_ms, id) > (?1, ?2) \
                 ORDER BY started_unix_ms, id LIMIT ?3",
            )
            .map_err(|e| self.sqlite(e))?;
        // One more than asked: whether there is a next page.
        let want = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = statement
            .query_map(params![after_started, after_id, want], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.sqlite(e))?;
        let mut page = Page::default();
        let mut last = None;
        for (n, row) in rows.enumerate() {
            let (id, json) = row.map_err(|e| self.sqlite(e))?;
            if n == limit {
                page.next = last.take();
                break;
            }
            match self.parse(&id, &json) {
                Ok(record) => page.records.push(record),
                Err(e) => {
                    tracing::error!("{e}");
                    page.unreadable.push(format!(
                        "{e}; the set's snapshot, if it kept one, is still on the volume; remove the row with `sqlite3 {} \"DELETE FROM sets WHERE id = '{id}'\"`",
                        self.path.display()
                    ));
                }
            }
            last = Some(id);
        }
        Ok(page)
    }

    /// The ended sets whose snapshot is still kept, oldest first: few (what retention and
    /// leases leave), whatever the size of the catalog.
    pub fn kept(&self) -> Result<Vec<SetRecord>, CatalogError> {
        let conn = self.reader();
        let mut statement = conn
            .prepare("SELECT id, record_json FROM sets WHERE kept = 1 AND state = 'ended' ORDER BY started_unix_ms, id")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.sqlite(e))?;
        let mut kept = vec![];
        for row in rows {
            let (id, json) = row.map_err(|e| self.sqlite(e))?;
            kept.push(self.parse(&id, &json)?);
        }
        Ok(kept)
    }

    /// The ids of the kept snapshots whose lease lapsed at `now_unix_ms` or before.
    pub fn lapsed(&self, now_unix_ms: u64) -> Result<Vec<String>, CatalogError> {
        let conn = self.reader();
        let mut statement = conn
            .prepare("SELECT id FROM sets WHERE kept = 1 AND state = 'ended' AND lease_until_unix_ms <= ?1 ORDER BY lease_until_unix_ms")
            .map_err(|e| self.sqlite(e))?;
        let ids = statement
            .query_map([i64::try_from(now_unix_ms).unwrap_or(i64::MAX)], |r| {
                r.get(0)
            })
            .map_err(|e| self.sqlite(e))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| self.sqlite(e))?;
        Ok(ids)
    }

    /// One set: its record and whether it is still running.
    pub fn get(&self, id: &str) -> Result<Option<(SetRecord, bool)>, CatalogError> {
        let row = self
            .reader()
            .query_row(
                "SELECT record_json, state FROM sets WHERE id = ?1",
                [id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(|e| self.sqlite(e))?;
        row.map(|(json, state)| Ok((self.parse(id, &json)?, state == "running")))
            .transpose()
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records always serialize to JSON")
}

/// Whether a record still keeps its snapshot, and until when its lease holds it.
fn kept_columns(record: &SetRecord) -> (bool, Option<i64>) {
    let kept = record.snapshot.is_some() && record.deleted_unix_ms.is_none();
    let lease = record
        .lease_until_unix_ms
        .filter(|_| kept)
        .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
    (kept, lease)
}

/// Schema 3's columns for the rows of an older catalog.
fn backfill_kept(conn: &Connection, path: &Path) -> Result<(), CatalogError> {
    let sqlite = |cause| CatalogError::Sqlite {
        path: path.into(),
        cause,
    };
    let rows: Vec<(String, String)> = conn
        .prepare("SELECT id, record_json FROM sets WHERE state = 'ended'")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(sqlite)?;
    for (id, json) in rows {
        // A row that does not read is reported by every listing; it keeps nothing here.
        let Ok(record) = serde_json::from_str::<SetRecord>(&json) else {
            continue;
        };
        let (kept, lease) = kept_columns(&record);
        conn.execute(
            "UPDATE sets SET kept = ?2, lease_until_unix_ms = ?3 WHERE id = ?1",
            params![id, kept, lease],
        )
        .map_err(sqlite)?;
    }
    Ok(())
}

fn write_final(conn: &Connection, path: &Path, record: &SetRecord) -> Result<(), CatalogError> {
    let (kept, lease) = kept_columns(record);
    conn.execute(
        "UPDATE sets SET state = 'ended', record_json = ?2, snapshot_json = NULL, kept = ?3, lease_until_unix_ms = ?4 WHERE id = ?1",
        params![record.id.0, json(record), kept, lease],
    )
    .map(drop)
    .map_err(|cause| CatalogError::Sqlite {
        path: path.into(),
        cause,
    })
}

fn write_loop(conn: Connection, path: &Path, inbox: mpsc::Receiver<Write>) {
    for write in inbox {
        match write {
            Write::Checkpoint {
                id,
                phase,
                snapshot,
                provider_until_unix_ms,
            } => {
                let result = conn.execute(
                    "UPDATE sets SET phase = ?2, snapshot_json = ?3, provider_until_unix_ms = ?4 WHERE id = ?1 AND state = 'running'",
                    params![
                        id,
                        phase.as_str(),
                        snapshot.as_ref().map(json),
                        i64::try_from(provider_until_unix_ms).unwrap_or(i64::MAX)
                    ],
                );
                if let Err(e) = result {
                    tracing::error!(set = %id, "catalog {}: checkpoint not written: {e}", path.display());
                }
            }
            Write::Final { record, done } => {
                let _ = done.send(write_final(&conn, path, &record));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiesce_proto::{Deadlines, SetId, SetRequest, SnapshotSet};
    use std::time::Instant;

    fn running_set(id: &str) -> SnapshotSet {
        SnapshotSet::new(
            SetId(id.into()),
            SetRequest {
                volumes: vec!["shared".into()],
                best_effort: false,
            },
            7,
            vec![],
            Deadlines::default(),
            Instant::now(),
        )
    }

    fn snapshot(id: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            path: format!("/snap/{id}"),
            provider: "btrfs".into(),
        }
    }

    #[tokio::test]
    async fn a_set_running_when_the_broker_stops_is_found_again_with_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let catalog = Catalog::open(&path).unwrap();
            let set = running_set("set-1");
            let now = Instant::now();
            catalog
                .start(&set.record_if_abandoned(now, "gone".into()), 1)
                .unwrap();
            catalog.checkpoint("set-1", Phase::Snapshot, Some(snapshot("set-1")), 77);
            // A second set that ends: it must not come back as abandoned.
            let other = running_set("set-2");
            catalog
                .start(&other.record_if_abandoned(now, "gone".into()), 2)
                .unwrap();
            let mut ended = other.record_if_abandoned(now, "gone".into());
            ended.outcome = Outcome::AppConsistent;
            ended.snapshot = Some(snapshot("set-2"));
            catalog.finish(ended.clone()).await.unwrap();
            assert_eq!(catalog.list().unwrap(), vec![ended.clone()]);
            assert_eq!(catalog.get("set-2").unwrap(), Some((ended, false)));
            assert!(catalog.get("set-1").unwrap().unwrap().1, "still running");
            assert_eq!(catalog.get("nope").unwrap(), None);
        }
        // The broker "restarts": a new catalog on the same file.
        let catalog = Catalog::open(&path).unwrap();
        let abandoned = catalog.abandoned().unwrap();
        assert_eq!(abandoned.len(), 1);
        assert_eq!(abandoned[0].checkpoint.id.0, "set-1");
        assert_eq!(abandoned[0].snapshot, Some(snapshot("set-1")));
        assert_eq!(abandoned[0].provider_until_unix_ms, Some(77));
        assert!(matches!(
            &abandoned[0].checkpoint.outcome,
            Outcome::Failed { reason, phase: Phase::Snapshot, .. } if reason == "gone"
        ));
        catalog.update(&abandoned[0].checkpoint).unwrap();
        assert!(catalog.abandoned().unwrap().is_empty());
        assert_eq!(catalog.list().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn forget_drops_only_old_ended_sets_that_keep_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.sqlite")).unwrap();
        let now = Instant::now();
        // (id, started, snapshot kept, deleted since)
        for (id, started, snapshot_kept, deleted) in [
            ("old-failed", 1, false, false),
            ("old-kept", 2, true, false),
            ("old-deleted", 3, true, true),
            ("new-failed", 1000, false, false),
        ] {
            let set = running_set(id);
            catalog
                .start(&set.record_if_abandoned(now, "gone".into()), started)
                .unwrap();
            let mut ended = set.record_if_abandoned(now, "gone".into());
            if snapshot_kept {
                ended.outcome = Outcome::AppConsistent;
                ended.snapshot = Some(snapshot(id));
            }
            if deleted {
                ended.deleted_unix_ms = Some(started + 1);
            }
            catalog.finish(ended).await.unwrap();
        }
        let running = running_set("old-running");
        catalog
            .start(&running.record_if_abandoned(now, "gone".into()), 4)
            .unwrap();

        assert_eq!(catalog.forget(500).unwrap(), 2);
        let left: Vec<String> = catalog
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.id.0)
            .collect();
        assert_eq!(left, ["old-kept", "new-failed"]);
        assert!(
            catalog.get("old-running").unwrap().unwrap().1,
            "a running set stays"
        );
        assert_eq!(catalog.forget(500).unwrap(), 0, "nothing more to forget");
    }

    #[test]
    fn a_catalog_of_a_newer_broker_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 9)
            .unwrap();
        let e = Catalog::open(&path).unwrap_err();
        assert!(e.to_string().contains("newer broker (schema 9"), "{e}");
    }
}
