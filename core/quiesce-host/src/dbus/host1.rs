//! `org.quiesce.Host1`: the node's writers and sets, application writers registering, and the
//! cluster snapshot requests forwarded to the broker.

use super::app_writers::{self, Apps};
use super::authorize;
use crate::host::{Host, SetError};
use crate::set_requests::{SetRequestError, SetRequests};
use quiesce_dbus::{writer_path, Error, SetRow, WriterRow};
use quiesce_proto::SetRequest;
use std::sync::Arc;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

fn set_error(e: SetError) -> Error {
    let message = e.to_string();
    match e {
        SetError::UnknownVolume { .. } => Error::UnknownVolume(message),
        SetError::OneVolume { .. } => Error::InvalidRequest(message),
        SetError::Busy { .. } => Error::Busy(message),
        SetError::WriterStuck { .. } => Error::WriterStuck(message),
        SetError::WriterHeld { .. } => Error::Busy(message),
    }
}

fn set_request_error(e: SetRequestError) -> Error {
    let message = e.to_string();
    // The requester gets the message too, but a backup tool may not show it: the operator
    // should find what is wrong between host and broker in the host's log.
    if matches!(
        e,
        SetRequestError::Unreachable { .. } | SetRequestError::Failed { .. }
    ) {
        tracing::warn!("a snapshot request got no answer from the broker: {message}");
    }
    match e {
        SetRequestError::NoBroker => Error::NoBroker(message),
        SetRequestError::InvalidRequest(_) => Error::InvalidRequest(message),
        SetRequestError::Unreachable { .. } => Error::BrokerUnreachable(message),
        SetRequestError::Refused { .. } => Error::SetRefused(message),
        SetRequestError::Busy { .. } => Error::Busy(message),
        SetRequestError::UnknownVolume { .. } => Error::UnknownVolume(message),
        SetRequestError::UnknownSet { .. } => Error::UnknownSet(message),
        SetRequestError::Failed { .. } => Error::BrokerFailed(message),
        SetRequestError::NotItsRequester { .. } => Error::NotAuthorized(message),
    }
}

pub(super) struct HostIface {
    host: Arc<Host>,
    apps: Apps,
    set_requests: SetRequests,
}

impl HostIface {
    pub(super) fn new(host: Arc<Host>, apps: Apps, set_requests: SetRequests) -> Self {
        HostIface {
            host,
            apps,
            set_requests,
        }
    }
}

#[zbus::interface(name = "org.quiesce.Host1")]
impl HostIface {
    /// The writers of this node: (id, name, level, state, object path).
    async fn list_writers(&self) -> Vec<WriterRow> {
        self.host
            .writers()
            .iter()
            .map(|w| {
                (
                    w.id().to_string(),
                    w.metadata.name.clone(),
                    w.metadata.level.as_str().to_string(),
                    w.status().state.as_str().to_string(),
                    writer_path(w.id()),
                )
            })
            .collect()
    }

    /// Runs a snapshot set of `volume` on this node: (set id, outcome, snapshot path or "").
    async fn run_local_set(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        volume: String,
        best_effort: bool,
    ) -> Result<(String, String, String), Error> {
        authorize(connection, &header, "start a snapshot set").await?;
        if volume.is_empty() {
            return Err(Error::InvalidRequest(
                "no volume given: name one of the volumes configured on this node".into(),
            ));
        }
        let request = SetRequest {
            volumes: vec![volume],
            best_effort,
        };
        let record = self.host.run_local_set(request).await.map_err(set_error)?;
        let outcome = record.outcome.to_string();
        Self::set_ended(&emitter, &record.id.0, record.outcome.label()).await?;
        let path = record.snapshot.map(|s| s.path).unwrap_or_default();
        Ok((record.id.0, outcome, path))
    }

    /// The sets this node ran: (id, outcome label, snapshot path or "").
    async fn list_sets(&self) -> Vec<SetRow> {
        self.host
            .history()
            .into_iter()
            .map(|r| {
                let path = r.snapshot.map(|s| s.path).unwrap_or_default();
                (r.id.0, r.outcome.label().to_string(), path)
            })
            .collect()
    }

    /// The full record of a set as JSON (the documented form of `quiesce_proto::SetRecord`).
    async fn show_set(&self, id: String) -> Result<String, Error> {
        if id.trim().is_empty() {
            return Err(Error::InvalidRequest(
                "no set id given: pass one of the ids ListSets shows".into(),
            ));
        }
        let record = self.host.set(&id).ok_or_else(|| {
            Error::UnknownSet(format!(
                "no set {:?} on this node; ListSets shows the known ones",
                quiesce_proto::cut(&id, 80)
            ))
        })?;
        serde_json::to_string_pretty(&record).map_err(|e| Error::CallFailed(e.to_string()))
    }

    /// Runs one snapshot set of `volumes` across the cluster, through the broker this host was
    /// started with (its broker option), and returns its record as JSON (SetRecord,
    /// `core/quiesce-proto/JSON.md`) once it ended. A failed set is an answer, not an error:
    /// read its `outcome`.
    async fn create_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        volumes: Vec<String>,
        best_effort: bool,
    ) -> Result<String, Error> {
        // The broker records who asked: this node (from its certificate) and the caller's uid.
        let uid = authorize(connection, &header, "start a snapshot set").await?;
        self.set_requests
            .create(volumes, best_effort, 0, 0, Some(uid))
            .await
            .map_err(set_request_error)
    }

    /// As `CreateSnapshot`, the snapshot held by the caller's lease: the broker deletes it
    /// `lease_ms` after the set ended unless `RenewSnapshot` renews it or it is deleted first
    /// (0: kept until deleted, as `CreateSnapshot`). A requester that dies leaks nothing. A set
    /// still running `timeout_ms` after it started is aborted (everyone thawed, nothing kept)
    /// and fails saying so (0: no timeout).
    async fn create_snapshot_leased(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        volumes: Vec<String>,
        best_effort: bool,
        lease_ms: u64,
        timeout_ms: u64,
    ) -> Result<String, Error> {
        let uid = authorize(connection, &header, "start a snapshot set").await?;
        self.set_requests
            .create(volumes, best_effort, lease_ms, timeout_ms, Some(uid))
            .await
            .map_err(set_request_error)
    }

    /// Starts one snapshot set of `volumes` across the cluster, as `CreateSnapshotLeased` runs
    /// one, and returns its id at once, as soon as the broker admitted it (refusals are errors,
    /// as for `CreateSnapshot`). The set's progress comes as `PhaseChanged(id, phase)` signals
    /// and its end as `SetEnded(id, outcome)`; `ShowSnapshot(id)` then has its record, and
    /// `CancelSnapshot(id)` aborts it meanwhile. Subscribe to the signals before calling.
    async fn start_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        volumes: Vec<String>,
        best_effort: bool,
        lease_ms: u64,
        timeout_ms: u64,
    ) -> Result<String, Error> {
        // The emitter's connection is the one the call came on.
        let uid = authorize(emitter.connection(), &header, "start a snapshot set").await?;
        let (id, mut progress) = self
            .set_requests
            .start(volumes, best_effort, lease_ms, timeout_ms, Some(uid))
            .await
            .map_err(set_request_error)?;
        let emitter = emitter.into_owned();
        let set = id.clone();
        tokio::spawn(async move {
            // Signals go to whoever listens; a failed emission (the bus gone) is no reason to
            // stop reading: the broker's stream is the set's only account here.
            loop {
                match progress.next().await {
                    Ok(crate::set_requests::Progress::Phase(phase)) => {
                        let _ = Self::phase_changed(&emitter, &set, &phase).await;
                    }
                    Ok(crate::set_requests::Progress::Ended(json)) => {
                        let outcome = serde_json::from_str::<quiesce_proto::SetRecord>(&json)
                            .map(|r| r.outcome.label().to_string())
                            .unwrap_or_else(|_| "unknown".into());
                        let _ = Self::set_ended(&emitter, &set, &outcome).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(set = %set, "lost the progress of a started set: {e}");
                        let _ = Self::set_ended(&emitter, &set, "unknown").await;
                        return;
                    }
                }
            }
        });
        Ok(id)
    }

    /// Cancels the running cluster set `id`: every writer thawed, no snapshot kept, the set
    /// failed saying who cancelled it (its `SetEnded` follows). Allowed to the set's requester
    /// (the same uid on the node that asked) and to root; `UnknownSet` for a set not running.
    async fn cancel_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        id: String,
    ) -> Result<(), Error> {
        let uid = authorize(connection, &header, "cancel a snapshot set").await?;
        self.set_requests
            .cancel(id, uid)
            .await
            .map_err(set_request_error)
    }

    /// Renews the lease on the snapshot set `id` kept: held `lease_ms` from now (0: until
    /// deleted); returns the set's record.
    async fn renew_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        id: String,
        lease_ms: u64,
    ) -> Result<String, Error> {
        authorize(connection, &header, "renew a snapshot's lease").await?;
        self.set_requests
            .renew(id, lease_ms)
            .await
            .map_err(set_request_error)
    }

    /// The cluster's snapshot sets as JSON records (SetRecord), oldest first.
    async fn list_snapshots(&self) -> Result<Vec<String>, Error> {
        self.set_requests.list().await.map_err(set_request_error)
    }

    /// One page of the cluster's snapshot sets, oldest first, after the set `after` (empty:
    /// from the first), at most `limit` (0: 100): (records as JSON, where the next page starts
    /// or "" on the last, catalog rows that could not be read with how to remove them).
    async fn list_snapshots_page(
        &self,
        after: String,
        limit: u32,
    ) -> Result<(Vec<String>, String, Vec<String>), Error> {
        let page = self
            .set_requests
            .list_page(after, limit)
            .await
            .map_err(set_request_error)?;
        Ok((page.records, page.next, page.unreadable))
    }

    /// The writers of a set's record (WriterResult JSON) from `offset`, at most `limit` (0: a
    /// page), and how many it has: for a record that came compacted (`writers_omitted`).
    async fn show_snapshot_writers(
        &self,
        id: String,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<String>, u64), Error> {
        self.set_requests
            .show_writers(id, offset, limit)
            .await
            .map_err(set_request_error)
    }

    /// The record of one cluster snapshot set as JSON (SetRecord). For a set started through
    /// this host (`StartSnapshot`) whose final record the broker could not write to its
    /// catalog, the record the broker ended it with.
    async fn show_snapshot(&self, id: String) -> Result<String, Error> {
        self.set_requests.show(id).await.map_err(set_request_error)
    }

    /// Deletes the snapshot a cluster set kept; returns the set's record after the deletion
    /// (it stays in the catalog, marked deleted).
    async fn delete_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        id: String,
    ) -> Result<String, Error> {
        authorize(connection, &header, "delete a snapshot").await?;
        self.set_requests
            .delete(id)
            .await
            .map_err(set_request_error)
    }

    /// Registers the `org.quiesce.AppWriter1` object the caller exports at `object`; returns the
    /// writer's object path. The writer is dropped when the caller's bus name vanishes.
    async fn register_writer(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        object: OwnedObjectPath,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(connection, &header, "register a writer").await?;
        app_writers::register(connection, &header, &self.host, &self.apps, object).await
    }

    /// Unregisters an application writer.
    async fn unregister_writer(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        id: String,
    ) -> Result<(), Error> {
        authorize(connection, &header, "unregister a writer").await?;
        if !self.apps.contains(&id) {
            return Err(Error::UnknownWriter(if self.host.writer(&id).is_some() {
                format!("writer {id:?} is a plugin writer: remove its plugin and restart the host instead")
            } else {
                format!("no application writer {id:?} on this node; ListWriters shows the writers")
            }));
        }
        app_writers::drop_app(
            connection,
            &self.host,
            &self.apps,
            &id,
            "the application unregistered it",
        )
        .await;
        Ok(())
    }

    #[zbus(property)]
    async fn node(&self) -> String {
        self.host.node().to_string()
    }

    /// A set ended: one this node ran (`RunLocalSet`), or a cluster set started through it
    /// (`StartSnapshot`): (set id, outcome label; `unknown` when the broker stopped telling).
    #[zbus(signal)]
    async fn set_ended(emitter: &SignalEmitter<'_>, id: &str, outcome: &str) -> zbus::Result<()>;

    /// A cluster set started through this node (`StartSnapshot`) entered a phase: (set id,
    /// phase as JSON.md spells it).
    #[zbus(signal)]
    async fn phase_changed(emitter: &SignalEmitter<'_>, id: &str, phase: &str) -> zbus::Result<()>;
}
