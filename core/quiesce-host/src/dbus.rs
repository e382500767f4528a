//! The host on D-Bus: `org.quiesce.Host1`, one `org.quiesce.Writer1` object per writer, and
//! application writers registered at run time (`org.quiesce.AppWriter1`).
//!
//! Authorisation is checked twice: the system bus policy (`dbus/org.quiesce.Host1.conf`) lets only
//! root and the `quiesce` group call the methods that freeze, thaw, register or start a set; and
//! the host itself asks the bus for the caller's uid and refuses everyone else, because a bus
//! may run a permissive policy. Reading metadata is open to all.
//!
//! `CreateSnapshot`, `ListSnapshots`, `ShowSnapshot` and `DeleteSnapshot` forward to the broker
//! ([`crate::set_requests`]) and may wait for a whole cluster set. They must not hold up other
//! calls, and do not: zbus runs each method call of an interface in a task of its own
//! (`spawn_tasks_for_methods`, on by default) under a *read* lock of the interface object, so
//! calls wait for one another only if a method takes `&mut self` (a write lock). Keep every
//! method of `HostIface` and `WriterIface` on `&self`, and hold no `std` mutex across an await.

use crate::host::{Host, SetError};
use crate::set_requests::{SetRequestError, SetRequests};
use crate::worker::{Backend, WriterHandle};
use futures_util::StreamExt;
use quiesce_dbus::{writer_path, AppWriterProxy, Error, SetRow, WriterRow, HOST_NAME, HOST_PATH};
use quiesce_proto::{CallFailure, Reports, SetRequest, WriterCall, WriterMetadata};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{fdo, Connection};

/// The Unix group whose members may drive the host (besides root).
pub const OPERATOR_GROUP: &str = "quiesce";

/// Serves the host on the bus at `address` (the system bus when `None`) and takes the name
/// `org.quiesce.Host1` last, once every object is in place. `set_requests` forwards the
/// cluster snapshot methods to the broker the host was started with (if any).
pub async fn serve(
    host: Arc<Host>,
    address: Option<&str>,
    set_requests: SetRequests,
) -> zbus::Result<Connection> {
    let builder = match address {
        Some(address) => zbus::connection::Builder::address(address)?,
        None => zbus::connection::Builder::system()?,
    };
    let apps = Arc::new(Mutex::new(BTreeMap::new()));
    let mut builder = builder.serve_at(HOST_PATH, fdo::ObjectManager)?.serve_at(
        HOST_PATH,
        HostIface {
            host: host.clone(),
            apps: apps.clone(),
            set_requests,
        },
    )?;
    let writers = host.writers();
    for w in &writers {
        builder = builder.serve_at(writer_path(w.id()), WriterIface::new(w.clone(), &host))?;
    }
    let connection = builder.name(HOST_NAME)?.build().await?;
    for w in &writers {
        watch_state(&connection, w.clone()).await?;
    }
    watch_vanishing_apps(&connection, host, apps).await?;
    Ok(connection)
}

/// Registered application writers: writer id → the application's unique bus name.
type Apps = Arc<Mutex<BTreeMap<String, String>>>;

/// Refuses callers that are neither root nor in the operator group.
async fn authorize(
    connection: &Connection,
    header: &Header<'_>,
    action: &str,
) -> Result<(), Error> {
    let sender = header
        .sender()
        .ok_or_else(|| Error::NotAuthorized("the call has no sender".into()))?;
    let uid = fdo::DBusProxy::new(connection)
        .await?
        .get_connection_unix_user(sender.clone().into())
        .await?;
    if uid == 0 || in_operator_group(uid) {
        return Ok(());
    }
    Err(Error::NotAuthorized(format!(
        "uid {uid} may not {action}: only root and members of the {OPERATOR_GROUP:?} group may freeze, thaw, register writers, start sets or delete snapshots; reading metadata and records is open to everyone"
    )))
}

fn in_operator_group(uid: u32) -> bool {
    use nix::unistd::{Group, Uid, User};
    let (Ok(Some(user)), Ok(Some(group))) = (
        User::from_uid(Uid::from_raw(uid)),
        Group::from_name(OPERATOR_GROUP),
    ) else {
        return false;
    };
    user.gid == group.gid || group.mem.iter().any(|m| m == &user.name)
}

fn set_error(e: SetError) -> Error {
    let message = e.to_string();
    match e {
        SetError::UnknownVolume { .. } => Error::UnknownVolume(message),
        SetError::OneVolume { .. } => Error::InvalidRequest(message),
        SetError::Busy { .. } => Error::Busy(message),
        SetError::WriterStuck { .. } => Error::WriterStuck(message),
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
        SetRequestError::UnknownSet { .. } => Error::UnknownSet(message),
        SetRequestError::Failed { .. } => Error::BrokerFailed(message),
    }
}

struct HostIface {
    host: Arc<Host>,
    apps: Apps,
    set_requests: SetRequests,
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
        let record = self.host.set(&id).ok_or_else(|| {
            Error::UnknownSet(format!(
                "no set {id:?} on this node; ListSets shows the known ones"
            ))
        })?;
        serde_json::to_string_pretty(&record).map_err(|e| Error::CallFailed(e.to_string()))
    }

    /// Runs one snapshot set of `volumes` across the cluster, through the broker this host was
    /// started with (`--broker`), and returns its record as JSON (SetRecord,
    /// `core/quiesce-proto/JSON.md`) once it ended. A failed set is an answer, not an error:
    /// read its `outcome`.
    async fn create_snapshot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        volumes: Vec<String>,
        best_effort: bool,
    ) -> Result<String, Error> {
        authorize(connection, &header, "start a snapshot set").await?;
        self.set_requests
            .create(volumes, best_effort)
            .await
            .map_err(set_request_error)
    }

    /// The cluster's snapshot sets as JSON records (SetRecord), oldest first.
    async fn list_snapshots(&self) -> Result<Vec<String>, Error> {
        self.set_requests.list().await.map_err(set_request_error)
    }

    /// The record of one cluster snapshot set as JSON (SetRecord).
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
        let owner = header
            .sender()
            .ok_or_else(|| Error::InvalidRequest("the call has no sender".into()))?
            .to_string();
        let app = AppWriterProxy::builder(connection)
            .destination(owner.clone())?
            .path(object.clone())?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let json = tokio::time::timeout(Duration::from_secs(5), app.metadata())
            .await
            .map_err(|_| {
                Error::InvalidMetadata(format!(
                    "{owner} did not answer for the Metadata property of {} at {} within 5 s",
                    quiesce_dbus::APP_WRITER_INTERFACE,
                    object.as_str()
                ))
            })?
            .map_err(|e| {
                Error::InvalidMetadata(format!(
                    "reading the Metadata property of {} at {} from {owner}: {e}; export that interface before registering",
                    quiesce_dbus::APP_WRITER_INTERFACE,
                    object.as_str()
                ))
            })?;
        let metadata: WriterMetadata = serde_json::from_str(&json).map_err(|e| {
            Error::InvalidMetadata(format!(
                "the Metadata property is not writer metadata JSON ({e}); see core/quiesce-proto/JSON.md"
            ))
        })?;
        metadata
            .validate()
            .map_err(|e| Error::InvalidMetadata(e.to_string()))?;
        let id = metadata.id.clone();
        let origin = format!("application {owner} at {}", object.as_str());
        let backend = AppBackend {
            connection: connection.clone(),
            owner: owner.clone(),
            object,
            runtime: tokio::runtime::Handle::current(),
        };
        let handle = self
            .host
            .add_writer(metadata, origin, Box::new(backend))
            .map_err(|e| Error::DuplicateWriter(e.to_string()))?;
        self.apps.lock().unwrap().insert(id.clone(), owner.clone());
        let path = writer_path(&id);
        connection
            .object_server()
            .at(path.clone(), WriterIface::new(handle.clone(), &self.host))
            .await?;
        watch_state(connection, handle).await?;
        // The application may have exited while we read its metadata: check once more now that
        // the vanishing watcher would see it.
        let dbus = fdo::DBusProxy::new(connection).await?;
        if !dbus.name_has_owner(owner.as_str().try_into()?).await? {
            drop_app(
                connection,
                &self.host,
                &self.apps,
                &id,
                "it left the bus while registering",
            )
            .await;
            return Err(Error::InvalidRequest(format!(
                "{owner} left the bus while registering"
            )));
        }
        tracing::info!(writer = %id, owner = %owner, "application writer registered");
        Ok(path)
    }

    /// Unregisters an application writer.
    async fn unregister_writer(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        id: String,
    ) -> Result<(), Error> {
        authorize(connection, &header, "unregister a writer").await?;
        if !self.apps.lock().unwrap().contains_key(&id) {
            return Err(Error::UnknownWriter(if self.host.writer(&id).is_some() {
                format!("writer {id:?} is a plugin writer: remove its plugin and restart the host instead")
            } else {
                format!("no application writer {id:?} on this node; ListWriters shows the writers")
            }));
        }
        drop_app(
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

    /// A set ended on this node: (set id, outcome label).
    #[zbus(signal)]
    async fn set_ended(emitter: &SignalEmitter<'_>, id: &str, outcome: &str) -> zbus::Result<()>;
}

/// Removes an application writer everywhere: its object, the host's list, a running set.
async fn drop_app(connection: &Connection, host: &Host, apps: &Apps, id: &str, reason: &str) {
    apps.lock().unwrap().remove(id);
    host.writer_lost(id, reason);
    let _ = connection
        .object_server()
        .remove::<WriterIface, _>(writer_path(id))
        .await;
    tracing::warn!(writer = id, "application writer dropped: {reason}");
}

/// Drops the writers of applications whose bus name vanishes.
async fn watch_vanishing_apps(
    connection: &Connection,
    host: Arc<Host>,
    apps: Apps,
) -> zbus::Result<()> {
    let dbus = fdo::DBusProxy::new(connection).await?;
    let mut changes = dbus.receive_name_owner_changed().await?;
    let connection = connection.clone();
    tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            let Ok(args) = change.args() else { continue };
            if args.new_owner().is_some() {
                continue;
            }
            let name = args.name().to_string();
            let gone: Vec<String> = apps
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, owner)| **owner == name)
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                let reason = format!("its application's bus name {name} vanished");
                drop_app(&connection, &host, &apps, &id, &reason).await;
            }
        }
    });
    Ok(())
}

/// Emits `PropertiesChanged` for `State` whenever the writer's state changes.
async fn watch_state(connection: &Connection, handle: Arc<WriterHandle>) -> zbus::Result<()> {
    let path = writer_path(handle.id());
    let iface = connection
        .object_server()
        .interface::<_, WriterIface>(path)
        .await?;
    let mut status = handle.subscribe();
    tokio::spawn(async move {
        let mut last = status.borrow().state;
        while status.changed().await.is_ok() {
            let state = status.borrow().state;
            if state != last {
                last = state;
                let emitter = iface.signal_emitter();
                if iface.get().await.state_changed(emitter).await.is_err() {
                    break; // the object is gone
                }
            }
        }
    });
    Ok(())
}

struct WriterIface {
    handle: Arc<WriterHandle>,
    freeze_budget: Duration,
    thaw_budget: Duration,
}

impl WriterIface {
    fn new(handle: Arc<WriterHandle>, host: &Host) -> Self {
        let deadlines = host.config().deadlines();
        WriterIface {
            handle,
            freeze_budget: deadlines.freeze,
            thaw_budget: deadlines.thaw,
        }
    }
}

#[zbus::interface(name = "org.quiesce.Writer1")]
impl WriterIface {
    /// Freezes the writer outside any set, for diagnosis. The hold limit still thaws it.
    async fn freeze(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        authorize(connection, &header, "freeze a writer").await?;
        self.handle
            .call(WriterCall::Freeze, "manual", self.freeze_budget)
            .await
            .map(drop)
            .map_err(|e| Error::CallFailed(e.to_string()))
    }

    async fn thaw(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        authorize(connection, &header, "thaw a writer").await?;
        self.handle
            .call(WriterCall::Thaw, "manual", self.thaw_budget)
            .await
            .map(drop)
            .map_err(|e| Error::CallFailed(e.to_string()))
    }

    #[zbus(property)]
    async fn id(&self) -> String {
        self.handle.id().to_string()
    }

    #[zbus(property)]
    async fn name(&self) -> String {
        self.handle.metadata.name.clone()
    }

    #[zbus(property)]
    async fn level(&self) -> String {
        self.handle.metadata.level.as_str().to_string()
    }

    #[zbus(property)]
    async fn instance(&self) -> String {
        self.handle.metadata.instance.clone()
    }

    #[zbus(property)]
    async fn vendor_version(&self) -> String {
        self.handle.metadata.vendor_version.clone()
    }

    /// (name, kind, volume, paths) of each component.
    #[zbus(property)]
    async fn components(&self) -> Vec<(String, String, String, Vec<String>)> {
        self.handle
            .metadata
            .components
            .iter()
            .map(|c| {
                let kind = serde_json::to_value(c.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                (c.name.clone(), kind, c.volume.clone(), c.paths.clone())
            })
            .collect()
    }

    #[zbus(property)]
    async fn expected_freeze_ms(&self) -> u64 {
        self.handle.metadata.expected_freeze_ms
    }

    #[zbus(property)]
    async fn needs_post_snapshot(&self) -> bool {
        self.handle.metadata.needs_post_snapshot
    }

    /// Where the writer comes from: `plugin NAME (PATH)` or `application BUS-NAME at OBJECT`.
    #[zbus(property)]
    async fn origin(&self) -> String {
        self.handle.origin.clone()
    }

    /// `idle`, `prepared`, `frozen`, `thawed` or `failed`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.handle.status().state.as_str().to_string()
    }

    /// The full metadata as JSON.
    #[zbus(property)]
    async fn metadata(&self) -> String {
        serde_json::to_string(&self.handle.metadata).unwrap_or_default()
    }
}

/// An application's writer, called back over D-Bus from its worker thread.
struct AppBackend {
    connection: Connection,
    owner: String,
    object: OwnedObjectPath,
    runtime: tokio::runtime::Handle,
}

impl AppBackend {
    async fn call_app(
        &self,
        call: &WriterCall,
        set_id: &str,
        budget_ms: u64,
    ) -> zbus::Result<Reports> {
        let path: ObjectPath<'_> = self.object.as_ref();
        let app = AppWriterProxy::builder(&self.connection)
            .destination(self.owner.as_str())?
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let reports = match call {
            WriterCall::Prepare => app.prepare(set_id, budget_ms).await?,
            WriterCall::Freeze => app.freeze(set_id, budget_ms).await?,
            WriterCall::Thaw => app.thaw(set_id, budget_ms).await?,
            WriterCall::PostSnapshot { snapshot } => {
                app.post_snapshot(set_id, budget_ms, &snapshot.path).await?
            }
            WriterCall::Abort => app.abort(set_id, budget_ms).await?,
            WriterCall::Complete { outcome } => {
                app.complete(set_id, budget_ms, outcome.as_str()).await?
            }
        };
        Ok(reports.into_iter().collect())
    }
}

impl Backend for AppBackend {
    fn call(
        &mut self,
        call: &WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let budget_ms = budget.as_millis().try_into().unwrap_or(u64::MAX);
        // The worker thread is not a runtime thread, so it may block on the host's runtime.
        let answer = self.runtime.block_on(async {
            tokio::time::timeout(budget, self.call_app(call, set_id, budget_ms)).await
        });
        match answer {
            Ok(Ok(reports)) => Ok(reports),
            Ok(Err(e)) => Err(CallFailure::error(format!("{} answered: {e}", self.owner))),
            Err(_) => Err(CallFailure::timed_out(format!(
                "{} did not answer {} within {budget_ms} ms",
                self.owner,
                call.kind()
            ))),
        }
    }
}
