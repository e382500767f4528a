//! Snapshot sets across the cluster: the broker drives `quiesce_proto::SnapshotSet` over the
//! nodes' links, takes the snapshot with the volume's provider, and keeps every set in the
//! [`Catalog`].
//!
//! - **Identify**: the writers of live nodes with components on the volume, and the membership
//!   epoch, read together under the registry's lock.
//! - **Transport**: each of the machine's calls becomes one `SetCommand` on the writer's node's
//!   link, sent without waiting (the calls of a level go out together); each `CommandReply`
//!   comes back through [`crate::services`] to the set's inputs. Leases become `Lease` /
//!   `EndLease` messages.
//! - **Membership**: a node leaving, re-attaching, or a writer of the set going away mid-set is
//!   fed to the set as that writer lost (so the failure names the node and the writer), then as
//!   the new epoch.
//! - **Durability**: the set runs on a task of its own, so a requester that hangs up does not
//!   stop it halfway; its checkpoints go to the catalog as it moves; a broker that restarts finds
//!   the sets it abandoned, records them failed and deletes their snapshots ([`Sets::open`]).

use crate::broker::{Awaiting, Broker, Membership};
use crate::catalog::{Catalog, CatalogError};
use crate::config::Config;
use quiesce_driver::{Input, Inputs, Transport};
use quiesce_link::v1::{self, broker_message};
use quiesce_proto::{
    Deadlines, Requester, SetId, SetRecord, SetRequest, SnapshotInfo, SnapshotSet, WriterCall,
    WriterMetadata, WriterRef,
};
use quiesce_provider::Provider;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Why a set could not start. Nothing was frozen when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("a set takes exactly one volume, {0} were asked for; run one set per volume")]
    OneVolume(usize),
    #[error("the broker has no volume {volume:?} (it has: {known}); add [volumes.{volume}] to the broker's configuration")]
    UnknownVolume { volume: String, known: String },
    #[error(
        "set {running} is still running; the broker runs one set at a time — retry when it ends"
    )]
    Busy { running: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Why a kept snapshot could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("no set {0} in the catalog (`quiesce snapshot list` shows them)")]
    Unknown(String),
    #[error("set {0} is still running; delete its snapshot when it has ended")]
    Running(String),
    #[error("set {id} kept no snapshot (its outcome: {outcome})")]
    NoSnapshot { id: String, outcome: String },
    #[error(
        "set {id} was of volume {volume:?}, which the broker no longer has; delete {path} by hand"
    )]
    NoProvider {
        id: String,
        volume: String,
        path: String,
    },
    #[error("deleting the snapshot of set {id} failed: {reason}")]
    Provider { id: String, reason: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Why a lease could not be renewed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("no set {0} in the catalog (`quiesce snapshot list` shows them)")]
    Unknown(String),
    #[error("set {0} is still running; its lease starts when it ends")]
    Running(String),
    #[error("set {id} kept no snapshot (its outcome: {outcome})")]
    NoSnapshot { id: String, outcome: String },
    #[error("the snapshot of set {id} was deleted ({because}) at {unix_ms} ms since the Unix epoch: run a new set")]
    Deleted {
        id: String,
        because: &'static str,
        unix_ms: u64,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Why a running set was not cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error(
        "set {0} is not running (an ended set's record says how it ended: `quiesce snapshot show`)"
    )]
    NotRunning(String),
    #[error("{by} may not cancel set {id}: only its requester ({owner}) or root on a node may")]
    NotItsRequester {
        id: String,
        by: String,
        owner: String,
    },
}

/// A set admitted and running on its own task ([`Sets::start`]).
#[derive(Debug)]
pub struct Started {
    pub id: SetId,
    /// Each phase the set enters, in order; closed once the set ended.
    pub phases: tokio::sync::mpsc::UnboundedReceiver<quiesce_proto::Phase>,
    /// The set's record once it ended, whatever its outcome.
    pub record: tokio::task::JoinHandle<SetRecord>,
}

/// Whether `by` may cancel a set `owner` asked for: its own requester (the same node and uid,
/// or the same client), or root on a node. A set whose requester is unknown (a broker without
/// TLS, a host that sent no uid) may be cancelled by anyone who may start one.
fn may_cancel(owner: Option<&Requester>, by: Option<&Requester>) -> bool {
    match (owner, by) {
        (_, Some(by)) if by.uid == Some(0) && by.client.is_none() => true,
        (Some(owner), Some(by)) => owner == by,
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// The sets of a broker.
pub struct Sets {
    broker: Arc<Broker>,
    /// What SIGHUP re-reads ([`Sets::reload`]); each set takes its own at its start.
    settings: std::sync::RwLock<Arc<Settings>>,
    catalog: Arc<Catalog>,
    running: Arc<quiesce_driver::RunningSlot>,
    /// Who asked for the running set, for [`Sets::cancel`].
    running_requester: std::sync::Mutex<Option<(SetId, Option<Requester>)>>,
    counter: AtomicU64,
    /// Held across each read-modify-write of a kept snapshot's record (delete, renew, reap):
    /// a renewal never lands between the reaper's read and its deletion.
    keeping: std::sync::Mutex<()>,
}

/// The part of the broker's configuration a running broker can change: deadlines, volumes'
/// providers, retention. A set started keeps the deadlines and the provider it started with.
struct Settings {
    deadlines: Deadlines,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    retention: BTreeMap<String, crate::config::Retention>,
    keep_records: Option<Duration>,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        Settings {
            deadlines: config.deadlines(),
            providers: config
                .volumes
                .iter()
                .map(|(name, p)| (name.clone(), Arc::from(p.build())))
                .collect(),
            retention: config.retention.clone(),
            keep_records: config.keep_records,
        }
    }
}

impl std::fmt::Debug for Sets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sets")
            .field("volumes", &self.settings().providers.keys())
            .field("catalog", &self.catalog)
            .finish_non_exhaustive()
    }
}

/// How often the broker deletes the snapshots whose lease lapsed or that are past their
/// volume's retention: a lease is kept to within this much.
pub const REAP_EVERY: Duration = Duration::from_secs(1);

/// What a restarted broker wrote down about a set it had abandoned.
const ABANDONED: &str = "the broker stopped during the set (it was killed or crashed); the restarted broker recorded the set as failed and deleted its snapshot, if it had one";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Sets {
    /// Opens the catalog and cleans up after the sets a previous run abandoned: each is recorded
    /// as failed, and its snapshot (recorded, or found by the provider under the set's name) is
    /// deleted. Blocking: it may run provider commands.
    pub fn open(broker: Arc<Broker>, config: &Config) -> Result<Arc<Sets>, CatalogError> {
        let settings = Settings::of(config);
        let providers = &settings.providers;
        let catalog = Arc::new(Catalog::open(&config.catalog)?);
        for volume in providers.keys() {
            broker.metrics().volume(volume);
        }
        for abandoned in catalog.abandoned()? {
            let mut record = abandoned.checkpoint;
            let id = record.id.0.clone();
            record.snapshot = None;
            let volume = record.request.volumes.first().cloned().unwrap_or_default();
            let Some(provider) = providers.get(&volume).cloned() else {
                record.cleanup_error = Some(format!("the broker has no volume {volume:?} any more: check its snapshots for {id} by hand"));
                catalog.update(&record)?;
                continue;
            };
            let wait = abandoned
                .provider_until_unix_ms
                .map(|until| Duration::from_millis(until.saturating_sub(unix_ms())))
                .unwrap_or_default();
            if wait.is_zero() {
                let record = clean_up_abandoned(provider.as_ref(), record, abandoned.snapshot);
                catalog.update(&record)?;
                continue;
            }
            // The dead broker's provider program may still be running and take its snapshot
            // after this start: the set is on record as failed now, and what it left is looked
            // for (and deleted) once the provider's deadline has passed.
            record.cleanup_error = Some(format!(
                "pending: a provider operation of this set may still be running; the broker looks for what the set left and deletes it {} ms after its restart (the provider's deadline)",
                wait.as_millis()
            ));
            catalog.update(&record)?;
            tracing::warn!(set = %id, wait_ms = wait.as_millis() as u64, "a set the broker abandoned may still have a provider operation running: cleaning up after its deadline");
            let (catalog, snapshot) = (catalog.clone(), abandoned.snapshot);
            std::thread::Builder::new()
                .name(format!("cleanup-{id}"))
                .spawn(move || {
                    // A timer, not a synchronisation: the provider's deadline is the bound.
                    std::thread::sleep(wait);
                    record.cleanup_error = None;
                    let record = clean_up_abandoned(provider.as_ref(), record, snapshot);
                    if let Err(e) = catalog.update(&record) {
                        tracing::error!(set = %record.id, "recording the cleanup of an abandoned set: {e}");
                    }
                })
                .map_err(|e| CatalogError::Sqlite {
                    path: config.catalog.clone(),
                    cause: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
                })?;
        }
        Ok(Arc::new(Sets {
            broker,
            settings: std::sync::RwLock::new(Arc::new(settings)),
            catalog,
            running: quiesce_driver::RunningSlot::new(),
            running_requester: std::sync::Mutex::new(None),
            counter: AtomicU64::new(0),
            keeping: std::sync::Mutex::new(()),
        }))
    }

    /// Runs one set across the cluster and returns its record, whatever its outcome: as
    /// [`Sets::start`], waiting for the end. Dropping this future does not stop the set.
    pub async fn create(
        self: &Arc<Self>,
        request: SetRequest,
        lease: Option<Duration>,
        timeout: Option<Duration>,
        requester: Option<Requester>,
    ) -> Result<SetRecord, CreateError> {
        let started = self.start(request, lease, timeout, requester)?;
        Ok(started.record.await.expect("a set's task does not panic"))
    }

    /// Admits one set across the cluster and starts it on a task of its own, which runs it to
    /// its end whatever the caller does. `lease`: the requester's lease on the snapshot kept,
    /// from the set's end (`None`: kept until deleted). `timeout`: the requester's patience; a
    /// set still running that long after it started is aborted (everyone thawed, nothing kept)
    /// and fails saying so. `requester`: who asked, as the record says.
    pub fn start(
        self: &Arc<Self>,
        request: SetRequest,
        lease: Option<Duration>,
        timeout: Option<Duration>,
        requester: Option<Requester>,
    ) -> Result<Started, CreateError> {
        let [volume] = request.volumes.as_slice() else {
            return Err(CreateError::OneVolume(request.volumes.len()));
        };
        let volume = volume.clone();
        let settings = self.settings();
        let deadlines = settings.deadlines;
        let provider =
            settings
                .providers
                .get(&volume)
                .cloned()
                .ok_or_else(|| CreateError::UnknownVolume {
                    volume: volume.clone(),
                    known: settings
                        .providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        // Subscribed before the registry is read: no change after the read can be missed.
        let membership = self.broker.subscribe_membership();
        let lapses = self.broker.subscribe_lapses();
        let (epoch, participants) = {
            let registry = self.broker.registry();
            let writers = registry
                .writers_by_volume(std::slice::from_ref(&volume))
                .into_iter()
                .flat_map(|v| v.writers)
                .map(|(node, w, _)| (WriterRef::new(node, &w.metadata.id), w.metadata))
                .collect::<Vec<(WriterRef, WriterMetadata)>>();
            (registry.epoch(), writers)
        };
        let started = unix_ms();
        let id = SetId(format!(
            "set-{started}-{}",
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let (inputs, inbox) = quiesce_driver::inputs();
        // Released when the set's task ends, a panic in it included.
        let running = self
            .running
            .claim(id.clone(), inputs.clone())
            .map_err(|busy| CreateError::Busy {
                running: busy.running.0,
            })?;
        let now = Instant::now();
        let set = SnapshotSet::new(
            id.clone(),
            request,
            epoch,
            participants.clone(),
            deadlines,
            now,
        );
        let mut start_record = set.record_if_abandoned(now, ABANDONED.into());
        start_record.started_unix_ms = Some(started);
        start_record.requester = requester.clone();
        if let Err(e) = self.catalog.start(&start_record, started) {
            return Err(e.into());
        }
        *self
            .running_requester
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((id.clone(), requester.clone()));
        tracing::info!(set = %id, epoch, writers = participants.len(), volume = %volume, requester = %requester.as_ref().map_or("-".to_string(), Requester::to_string), "cluster set started");
        let (phases, phases_out) = tokio::sync::mpsc::unbounded_channel();
        let sets = self.clone();
        let set_id = id.clone();
        let task = tokio::spawn(async move {
            let id = set_id;
            let follower = tokio::spawn(follow_membership(
                membership,
                epoch,
                participants.into_iter().map(|(w, _)| w).collect(),
                inputs.clone(),
            ));
            let lapse_follower = tokio::spawn(follow_lapses(lapses, id.clone(), inputs.clone()));
            let patience = timeout.map(|timeout| {
                let inputs = inputs.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = inputs.send(Input::Abort(format!(
                        "the requester's timeout ({}) ran out before the set ended",
                        humantime::format_duration(timeout)
                    )));
                })
            });
            let transport = LinkTransport {
                broker: sets.broker.clone(),
                epoch,
                hold_limit_ms: millis(deadlines.hold_limit),
                sent: Vec::new(),
                held: BTreeMap::new(),
            };
            let mut last: Option<(quiesce_proto::Phase, Option<SnapshotInfo>)> = None;
            let record =
                quiesce_driver::run(set, transport, provider, (inputs, inbox), |set, _now| {
                    let now_at = (set.phase(), set.snapshot().cloned());
                    if !set.is_ended() && last.as_ref().map(|l| l.0) != Some(now_at.0) {
                        // A requester that stopped following is no reason to stop the set.
                        let _ = phases.send(now_at.0);
                    }
                    if !set.is_ended() && last.as_ref() != Some(&now_at) {
                        // A provider operation started in this phase ends by its deadline: a
                        // restarted broker waits that long before it looks for what the set
                        // left (the program may outlive this broker). Other phases run none.
                        use quiesce_proto::Phase;
                        let provider_runs =
                            matches!(now_at.0, Phase::Snapshot | Phase::Finalize | Phase::Abort);
                        let until = if provider_runs {
                            unix_ms() + deadlines.provider.as_millis() as u64
                        } else {
                            0
                        };
                        sets.catalog
                            .checkpoint(&set.id().0, now_at.0, now_at.1.clone(), until);
                        last = Some(now_at);
                    }
                })
                .await;
            follower.abort();
            lapse_follower.abort();
            if let Some(patience) = patience {
                patience.abort();
            }
            let mut record = record;
            record.started_unix_ms = Some(started);
            record.requester = requester;
            if record.snapshot.is_some() {
                record.lease_until_unix_ms =
                    lease.map(|lease| unix_ms().saturating_add(lease.as_millis() as u64));
            }
            let record = sets.record_or_undo(record, &volume).await;
            // Every writer is thawed or aborted by now: the metrics never touch the window.
            sets.broker.metrics().set_ended(&volume, &record);
            drop(running);
            tracing::info!(set = %record.id, outcome = %record.outcome, freeze_window_ms = ?record.freeze_window_ms, provider_ms = ?record.provider_ms, "cluster set ended");
            record
        });
        Ok(Started {
            id,
            phases: phases_out,
            record: task,
        })
    }

    /// The settings in force now.
    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a re-read configuration (SIGHUP) to the sets started from now on: deadlines,
    /// volumes added or changed, retention, `keep_records`. A running set keeps what it started
    /// with. A volume gone from the file is kept until the broker restarts — its kept
    /// snapshots must stay deletable — and so is the catalog's path; both are returned, to be
    /// named as needing a restart.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut settings = Settings::of(config);
        let current = self.settings();
        let mut kept = vec![];
        for (volume, provider) in &current.providers {
            if !settings.providers.contains_key(volume) {
                settings.providers.insert(volume.clone(), provider.clone());
                kept.push(format!("[volumes.{volume}] removed"));
            }
        }
        for volume in settings.providers.keys() {
            self.broker.metrics().volume(volume);
        }
        if config.catalog != self.catalog.path() {
            kept.push("catalog".into());
        }
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        kept
    }

    /// Aborts the running set `id` for `by`: every writer thawed, no snapshot kept, the set
    /// failed saying who cancelled it. Returns once the set was told; it ends on its own task.
    pub fn cancel(&self, id: &str, by: Option<Requester>) -> Result<(), CancelError> {
        let not_running = || CancelError::NotRunning(id.to_string());
        let (running, inputs) = self.running.current().ok_or_else(not_running)?;
        if running.0 != id {
            return Err(not_running());
        }
        let owner = self
            .running_requester
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|(of, _)| *of == running)
            .and_then(|(_, owner)| owner);
        let name = |r: Option<&Requester>| {
            r.map_or("an unnamed requester".to_string(), Requester::to_string)
        };
        if !may_cancel(owner.as_ref(), by.as_ref()) {
            return Err(CancelError::NotItsRequester {
                id: id.to_string(),
                by: name(by.as_ref()),
                owner: name(owner.as_ref()),
            });
        }
        tracing::warn!(set = %id, by = %name(by.as_ref()), "the set was cancelled: aborting it");
        inputs
            .send(Input::Abort(format!("cancelled by {}", name(by.as_ref()))))
            .map_err(|_| not_running())
    }

    /// Writes a set's final record. The catalog is part of the outcome: a set whose record
    /// cannot be written does not answer success — a snapshot the catalog does not know of would
    /// never be listed, pruned or cleaned up, and a restarted broker would delete it without a
    /// word. Its snapshot is deleted, and the answer says why.
    async fn record_or_undo(self: &Arc<Self>, record: SetRecord, volume: &str) -> SetRecord {
        let error = match self.catalog.finish(record.clone()).await {
            Ok(()) => return record,
            Err(e) => e,
        };
        tracing::error!(set = %record.id, "the set's final record could not be written: {error}");
        let mut failed = record.clone();
        failed.outcome = quiesce_proto::Outcome::Failed {
            phase: quiesce_proto::Phase::Complete,
            writer: None,
            reason: format!(
                "the set's final record could not be written to the catalog ({error}); a snapshot the catalog does not know of would never be cleaned up, so it was deleted"
            ),
        };
        failed.snapshot = None;
        if let (Some(snapshot), Some(provider)) = (
            record.snapshot.clone(),
            self.settings().providers.get(volume).cloned(),
        ) {
            let deleted = tokio::task::spawn_blocking(move || provider.delete(&snapshot))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            if let Err(e) = deleted {
                failed.cleanup_error = Some(format!(
                    "the snapshot {} could not be deleted ({e}): delete it by hand",
                    record.snapshot.as_ref().map_or("?", |s| s.path.as_str())
                ));
            }
        }
        // Once more: the disk may have room for the shorter story. If not, the row stays
        // `running`, and a restarted broker records the set failed (its snapshot is gone).
        if let Err(e) = self.catalog.finish(failed.clone()).await {
            tracing::error!(set = %record.id, "the failed record could not be written either: {e}");
        }
        failed
    }

    /// Aborts the running set, if any, and waits (at most `patience`) for it to end: a broker
    /// that stops on purpose releases every writer first.
    pub async fn shutdown(&self, patience: Duration) {
        let Some((id, inputs)) = self.running.current() else {
            return;
        };
        tracing::warn!(set = %id, "the broker is stopping: aborting the running set");
        let _ = inputs.send(Input::Abort("the broker is stopping".into()));
        // The set's inbox closes when it ends.
        if tokio::time::timeout(patience, inputs.closed())
            .await
            .is_err()
        {
            tracing::error!(set = %id, "the set did not end within {} ms of its abort; its nodes' leases will release its writers", patience.as_millis());
        }
    }

    /// Every ended set, oldest first.
    pub fn list(&self) -> Result<Vec<SetRecord>, CatalogError> {
        self.catalog.list()
    }

    /// Up to `limit` ended sets after the set `after`, oldest first.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::catalog::Page, CatalogError> {
        self.catalog.page(after, limit)
    }

    /// One set, running or ended.
    pub fn show(&self, id: &str) -> Result<Option<(SetRecord, bool)>, CatalogError> {
        self.catalog.get(id)
    }

    /// Deletes the snapshot an ended set kept; the record stays, marked deleted. Blocking.
    pub fn delete(&self, id: &str) -> Result<SetRecord, DeleteError> {
        let _keeping = self.keeping();
        self.delete_because(id, quiesce_proto::Deletion::Requested)
    }

    fn keeping(&self) -> std::sync::MutexGuard<'_, ()> {
        self.keeping.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renews the requester's lease on set `id`'s snapshot: kept `lease` from now (`None`:
    /// until deleted). Blocking.
    pub fn renew(&self, id: &str, lease: Option<Duration>) -> Result<SetRecord, RenewError> {
        let _keeping = self.keeping();
        let (mut record, running) = self
            .catalog
            .get(id)?
            .ok_or_else(|| RenewError::Unknown(id.into()))?;
        if running {
            return Err(RenewError::Running(id.into()));
        }
        if record.snapshot.is_none() {
            return Err(RenewError::NoSnapshot {
                id: id.into(),
                outcome: record.outcome.to_string(),
            });
        }
        if let Some(unix_ms) = record.deleted_unix_ms {
            return Err(RenewError::Deleted {
                id: id.into(),
                because: record.deleted_because.map_or("on request", |d| d.as_str()),
                unix_ms,
            });
        }
        record.lease_until_unix_ms =
            lease.map(|lease| unix_ms().saturating_add(lease.as_millis() as u64));
        self.catalog.update(&record)?;
        Ok(record)
    }

    /// Deletes what must go now: snapshots whose requester's lease lapsed, then those past the
    /// volume's retention (`max_kept`, `max_age`; a snapshot still held by a lease is never
    /// deleted by retention); then forgets the records past `keep_records`. Blocking; the
    /// broker calls it every [`REAP_EVERY`].
    pub fn reap(&self) {
        let _keeping = self.keeping();
        let now = unix_ms();
        self.forget_records(now);
        let lapsed = match self.catalog.lapsed(now) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!("reading the leases on kept snapshots: {e}");
                return;
            }
        };
        for id in lapsed {
            match self.delete_because(&id, quiesce_proto::Deletion::LeaseLapsed) {
                Ok(_) => {
                    tracing::info!(set = %id, "its requester's lease lapsed: snapshot deleted")
                }
                Err(e) => {
                    tracing::error!(set = %id, "its requester's lease lapsed, but its snapshot could not be deleted: {e}")
                }
            }
        }
        let settings = self.settings();
        if settings.retention.is_empty() {
            return;
        }
        let kept = match self.catalog.kept() {
            Ok(kept) => kept,
            Err(e) => {
                tracing::error!("reading the kept snapshots for retention: {e}");
                return;
            }
        };
        for (volume, retention) in &settings.retention {
            let of_volume: Vec<&SetRecord> = kept
                .iter()
                .filter(|r| r.request.volumes.first() == Some(volume))
                .collect();
            for id in retention.past(&of_volume, now) {
                match self.delete_because(&id, quiesce_proto::Deletion::Retention) {
                    Ok(_) => {
                        tracing::info!(set = %id, volume = %volume, "past the volume's retention: snapshot deleted")
                    }
                    Err(e) => {
                        tracing::error!(set = %id, volume = %volume, "past the volume's retention, but its snapshot could not be deleted: {e}")
                    }
                }
            }
        }
    }

    /// Forgets the ended sets past `keep_records` that keep no snapshot (those that do are
    /// forgotten once retention or their lease deletes it, and that much later than it started).
    fn forget_records(&self, now: u64) {
        let Some(keep) = self.settings().keep_records else {
            return;
        };
        let before = now.saturating_sub(keep.as_millis() as u64);
        match self.catalog.forget(before) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                forgotten = n,
                "forgot ended sets older than keep_records ({})",
                humantime::format_duration(keep)
            ),
            Err(e) => tracing::error!("forgetting ended sets past keep_records: {e}"),
        }
    }

    /// Runs [`Sets::reap`] every [`REAP_EVERY`] until dropped.
    pub async fn reap_forever(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(REAP_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let sets = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || sets.reap()).await {
                tracing::error!("the reaper of leases and retention failed: {e}");
            }
        }
    }

    fn delete_because(
        &self,
        id: &str,
        because: quiesce_proto::Deletion,
    ) -> Result<SetRecord, DeleteError> {
        let (mut record, running) = self
            .catalog
            .get(id)?
            .ok_or_else(|| DeleteError::Unknown(id.into()))?;
        if running {
            return Err(DeleteError::Running(id.into()));
        }
        let Some(snapshot) = record.snapshot.clone() else {
            return Err(DeleteError::NoSnapshot {
                id: id.into(),
                outcome: record.outcome.to_string(),
            });
        };
        if record.deleted_unix_ms.is_some() {
            // Idempotent, like `rm -f`: the record says when it went.
            return Ok(record);
        }
        let volume = record.request.volumes.first().cloned().unwrap_or_default();
        let settings = self.settings();
        let provider = settings
            .providers
            .get(&volume)
            .ok_or_else(|| DeleteError::NoProvider {
                id: id.into(),
                volume: volume.clone(),
                path: snapshot.path.clone(),
            })?;
        provider
            .delete(&snapshot)
            .map_err(|e| DeleteError::Provider {
                id: id.into(),
                reason: e.to_string(),
            })?;
        record.deleted_unix_ms = Some(unix_ms());
        record.deleted_because = Some(because);
        self.catalog.update(&record)?;
        tracing::info!(set = id, snapshot = %snapshot.path, because = because.as_str(), "snapshot deleted");
        Ok(record)
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// The machine's calls as set commands on the nodes' links.
struct LinkTransport {
    broker: Arc<Broker>,
    epoch: u64,
    hold_limit_ms: u32,
    /// Every command sent, to stop waiting for their replies when the set is over.
    sent: Vec<u64>,
    /// What the current burst sends each node, in order; consecutive commands to a node go in
    /// one message.
    held: BTreeMap<String, Vec<Held>>,
}

enum Held {
    /// A command, and its writer when a reply is awaited.
    Command(v1::SetCommand, Option<WriterRef>),
    Lease(broker_message::Body),
}

impl LinkTransport {
    /// Sends `commands` to `node` in one message; when it cannot be sent, their writers are lost.
    fn send_commands(
        &self,
        node: &str,
        commands: Vec<(v1::SetCommand, Option<WriterRef>)>,
        inputs: &Inputs,
    ) {
        if commands.is_empty() {
            return;
        }
        let (wire, writers): (Vec<v1::SetCommand>, Vec<Option<WriterRef>>) =
            commands.into_iter().unzip();
        let ids: Vec<u64> = wire.iter().map(|c| c.command_id).collect();
        let body = match <[v1::SetCommand; 1]>::try_from(wire) {
            Ok([one]) => broker_message::Body::Command(one),
            Err(many) => broker_message::Body::Commands(v1::SetCommands { commands: many }),
        };
        if self.broker.send_to(node, body) {
            return;
        }
        self.broker.forget_commands(&ids);
        let reason = format!(
            "node {node} cannot be reached: it is not attached to the broker, or it stopped reading its link"
        );
        for writer in writers.into_iter().flatten() {
            let _ = inputs.send(Input::WriterLost {
                writer,
                reason: reason.clone(),
            });
        }
    }
}

impl Transport for LinkTransport {
    fn call(
        &mut self,
        set: &SetId,
        writer: WriterRef,
        call: WriterCall,
        deadline: Instant,
        inputs: &Inputs,
    ) {
        let kind = call.kind();
        let budget_ms = millis(deadline.saturating_duration_since(Instant::now()));
        let wire = quiesce_link::calls::call_to_wire(&call, self.hold_limit_ms);
        let wants_reply = kind != quiesce_proto::CallKind::Complete;
        let awaiting = wants_reply.then(|| Awaiting {
            writer: writer.clone(),
            kind,
            inputs: inputs.clone(),
        });
        let command_id = self.broker.new_command(awaiting);
        self.sent.push(command_id);
        let command = v1::SetCommand {
            command_id,
            set_id: set.0.clone(),
            epoch: self.epoch,
            writer: writer.writer.clone(),
            budget_ms,
            call: Some(wire),
        };
        let node = writer.node.clone();
        self.held
            .entry(node)
            .or_default()
            .push(Held::Command(command, wants_reply.then_some(writer)));
    }

    fn flush(&mut self, inputs: &Inputs) {
        for (node, items) in std::mem::take(&mut self.held) {
            let mut commands = vec![];
            for item in items {
                match item {
                    Held::Command(command, writer) => commands.push((command, writer)),
                    Held::Lease(body) => {
                        // In order: the commands before it first.
                        self.send_commands(&node, std::mem::take(&mut commands), inputs);
                        // A node that cannot be reached is covered by its lease lapsing there.
                        if !self.broker.send_to(&node, body) {
                            tracing::warn!(node, "could not send the node its lease message");
                        }
                    }
                }
            }
            self.send_commands(&node, commands, inputs);
        }
    }

    fn lease(&mut self, set: &SetId, node: &str, lease: Option<Duration>) {
        let message = match lease {
            Some(lease) => broker_message::Body::Lease(v1::Lease {
                set_id: set.0.clone(),
                lease_ms: millis(lease),
            }),
            None => broker_message::Body::EndLease(v1::EndLease {
                set_id: set.0.clone(),
            }),
        };
        self.held
            .entry(node.to_string())
            .or_default()
            .push(Held::Lease(message));
    }
}

impl Drop for LinkTransport {
    fn drop(&mut self) {
        self.broker.forget_commands(&self.sent);
    }
}

/// Deletes what an abandoned set left (the snapshot it recorded, or what the provider finds
/// for it) and returns its record, saying what could not be cleaned up.
fn clean_up_abandoned(
    provider: &dyn Provider,
    mut record: SetRecord,
    recorded: Option<SnapshotInfo>,
) -> SetRecord {
    let id = record.id.0.clone();
    let snapshot = match recorded {
        Some(s) => Ok(Some(s)),
        None => provider.find(&id).map_err(|e| e.to_string()),
    };
    let cleaned = snapshot.and_then(|s| match s {
        Some(s) => provider
            .delete(&s)
            .map(|()| Some(s))
            .map_err(|e| e.to_string()),
        None => Ok(None),
    });
    match cleaned {
        Ok(Some(s)) => {
            tracing::warn!(set = %id, snapshot = %s.path, "deleted the snapshot of an abandoned set")
        }
        Ok(None) => {}
        Err(e) => {
            record.cleanup_error = Some(format!("the snapshot of this abandoned set could not be cleaned up ({e}): check the volume's snapshots and delete it by hand"));
        }
    }
    tracing::warn!(set = %id, outcome = %record.outcome, "a set the broker abandoned when it stopped is recorded as failed");
    record
}

/// Feeds a running set the nodes that report their lease on it lapsed: they let its writers
/// go, so the set fails naming them (and their late thaws are answered `lost` anyway).
async fn follow_lapses(
    mut lapses: broadcast::Receiver<(String, String, String)>,
    set: SetId,
    inputs: Inputs,
) {
    loop {
        match lapses.recv().await {
            Ok((node, id, reason)) if id == set.0 => {
                if inputs.send(Input::NodeLost { node, reason }).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let _ = inputs.send(Input::Abort(format!(
                    "the broker missed {n} lease reports of nodes during the set; start a new set"
                )));
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Feeds membership changes to a running set: first the set's writers that the change takes
/// away (so the failure names them), then the new epoch.
async fn follow_membership(
    mut changes: broadcast::Receiver<Membership>,
    epoch: u64,
    writers: Vec<WriterRef>,
    inputs: Inputs,
) {
    fn on<'a>(writers: &'a [WriterRef], node: &'a str) -> impl Iterator<Item = &'a WriterRef> {
        writers.iter().filter(move |w| w.node == node)
    }
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let _ = inputs.send(Input::Abort(format!(
                    "the broker missed {n} membership changes during the set; start a new set"
                )));
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if change.epoch() <= epoch {
            continue;
        }
        let lost: Vec<(WriterRef, String)> = match &change {
            Membership::Left { node, why, .. } => on(&writers, node)
                .map(|w| (w.clone(), format!("node {node} left the cluster mid-set: {why}")))
                .collect(),
            Membership::Joined {
                node,
                replaced: true,
                ..
            } => on(&writers, node)
                .map(|w| {
                    (
                        w.clone(),
                        format!("node {node} attached again mid-set (its host restarted or reconnected): its writers' state is unknown"),
                    )
                })
                .collect(),
            Membership::Joined { .. } => vec![],
            Membership::WritersChanged { node, removed, .. } => {
                let removed: BTreeSet<&str> = removed.iter().map(String::as_str).collect();
                on(&writers, node)
                    .filter(|w| removed.contains(w.writer.as_str()))
                    .map(|w| {
                        (
                            w.clone(),
                            format!("node {node} removed the writer mid-set (its application unregistered it or exited)"),
                        )
                    })
                    .collect()
            }
        };
        for (writer, reason) in lost {
            let _ = inputs.send(Input::WriterLost { writer, reason });
        }
        if inputs.send(Input::Epoch(change.epoch())).is_err() {
            return;
        }
    }
}
