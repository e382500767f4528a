//! `org.quiesce.AppWriter1`: what the application exports so that the host can quiesce it.
//! The contract is `core/quiesce-dbus/interfaces/org.quiesce.AppWriter1.xml`.

use crate::records::{log, Records};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use zbus::fdo;

/// The name of the label file PostSnapshot writes into the snapshot.
pub const LABEL_FILE: &str = "app-writer.label";

/// The wait used when the host gives no budget (0).
const DEFAULT_BUDGET: Duration = Duration::from_secs(10);

type Reports = HashMap<String, String>;

pub struct AppWriter {
    id: String,
    records: Arc<Records>,
    metadata: String,
    /// The set of the last successful freeze, and the last record before it.
    last_freeze: Mutex<Option<(String, u64)>>,
}

impl AppWriter {
    pub fn new(id: String, records: Arc<Records>, metadata: String) -> AppWriter {
        AppWriter {
            id,
            records,
            metadata,
            last_freeze: Mutex::new(None),
        }
    }
}

fn budget(budget_ms: u64) -> Duration {
    if budget_ms == 0 {
        DEFAULT_BUDGET
    } else {
        Duration::from_millis(budget_ms)
    }
}

impl AppWriter {
    /// The error reply `org.freedesktop.DBus.Error.Failed`, naming the writer, call and set.
    fn fail(&self, call: &str, set_id: &str, why: impl std::fmt::Display) -> fdo::Error {
        let message = format!("writer {}: {call} of set {set_id} failed: {why}", self.id);
        log(&message);
        fdo::Error::Failed(message)
    }

    /// Runs blocking work (waiting on the writing loop, fsync) off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        call: &'static str,
        set_id: &str,
        work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> fdo::Result<T> {
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.fail(call, set_id, format!("{e:#}"))),
            Err(e) => Err(self.fail(call, set_id, e)),
        }
    }
}

/// Writes the label; `None` when the snapshot is read-only (ZFS, CephFS: the label is a
/// convenience, not what the snapshot's consistency rests on).
fn write_label(snapshot: &Path, set_id: &str, seq: u64) -> anyhow::Result<Option<PathBuf>> {
    use anyhow::Context;
    use std::io::Write;
    let path = snapshot.join(LABEL_FILE);
    let mut file = match std::fs::File::create(&path) {
        Err(e) if e.raw_os_error() == Some(30) => return Ok(None), // EROFS
        created => created.with_context(|| format!("cannot create {}", path.display()))?,
    };
    file.write_all(format!("set {set_id}\nlast_record {seq}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(path))
}

#[zbus::interface(name = "org.quiesce.AppWriter1", introspection_docs = false)]
impl AppWriter {
    /// Slow work before the freeze: fsync the records written so far.
    async fn prepare(&self, set_id: &str, budget_ms: u64) -> fdo::Result<Reports> {
        log(&format!("prepare {set_id} (budget {budget_ms} ms)"));
        let records = self.records.clone();
        self.blocking("prepare", set_id, move || records.sync())
            .await?;
        Ok(Reports::new())
    }

    /// Holds writes at a record boundary, fsyncs, reports the last record. Idempotent.
    async fn freeze(&self, set_id: &str, budget_ms: u64) -> fdo::Result<Reports> {
        let records = self.records.clone();
        let within = budget(budget_ms);
        let seq = self
            .blocking("freeze", set_id, move || records.hold(within))
            .await?;
        *self
            .last_freeze
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((set_id.to_owned(), seq));
        log(&format!("frozen for {set_id} after record {seq}"));
        Ok(Reports::from([("last_record".to_owned(), seq.to_string())]))
    }

    /// Resumes writes. Idempotent.
    async fn thaw(&self, set_id: &str, budget_ms: u64) -> fdo::Result<Reports> {
        let records = self.records.clone();
        let within = budget(budget_ms);
        if self
            .blocking("thaw", set_id, move || records.release(within))
            .await?
        {
            log(&format!("thawed for {set_id}"));
        }
        Ok(Reports::new())
    }

    /// Writes `app-writer.label` (set id, last record at freeze) into the writable snapshot.
    async fn post_snapshot(
        &self,
        set_id: &str,
        budget_ms: u64,
        snapshot_path: &str,
    ) -> fdo::Result<Reports> {
        let _ = budget_ms;
        let frozen = self
            .last_freeze
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let seq = match frozen {
            Some((set, seq)) if set == set_id => seq,
            other => {
                let why = format!(
                    "this writer was not frozen for that set (last freeze: {}); no label written",
                    other.map_or("none".to_owned(), |(set, _)| set)
                );
                return Err(self.fail("post-snapshot", set_id, why));
            }
        };
        let snapshot = PathBuf::from(snapshot_path);
        let set = set_id.to_owned();
        let label = self
            .blocking("post-snapshot", set_id, move || {
                write_label(&snapshot, &set, seq)
            })
            .await?;
        let label = match label {
            Some(label) => {
                log(&format!(
                    "post-snapshot {set_id}: wrote {}",
                    label.display()
                ));
                label.display().to_string()
            }
            None => {
                log(&format!(
                    "post-snapshot {set_id}: the snapshot is read-only: no label written"
                ));
                "not written: the snapshot is read-only".to_owned()
            }
        };
        Ok(Reports::from([
            ("label".to_owned(), label),
            ("last_record".to_owned(), seq.to_string()),
        ]))
    }

    /// Abort = thaw. Idempotent.
    async fn abort(&self, set_id: &str, budget_ms: u64) -> fdo::Result<Reports> {
        let records = self.records.clone();
        let within = budget(budget_ms);
        let was_held = self
            .blocking("abort", set_id, move || records.release(within))
            .await?;
        log(&format!(
            "abort {set_id}{}",
            if was_held { ": writes resumed" } else { "" }
        ));
        Ok(Reports::new())
    }

    /// The set ended; nothing to do but say so.
    async fn complete(&self, set_id: &str, budget_ms: u64, outcome: &str) -> fdo::Result<Reports> {
        let _ = budget_ms;
        log(&format!("set {set_id} complete: {outcome}"));
        Ok(Reports::new())
    }

    /// The writer's metadata, as the JSON of `quiesce_proto::WriterMetadata`.
    #[zbus(property)]
    async fn metadata(&self) -> String {
        self.metadata.clone()
    }
}
