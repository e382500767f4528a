//! Application writers: registered over `Host1.RegisterWriter`, called back over D-Bus on
//! `org.quiesce.AppWriter1` from their worker threads, and dropped when their bus name vanishes.

use super::writer1::{self, WriterIface};
use crate::host::Host;
use crate::worker::Backend;
use futures_util::StreamExt;
use quiesce_dbus::{writer_path, AppWriterProxy, Error};
use quiesce_proto::{CallFailure, Reports, WriterCall, WriterMetadata};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zbus::message::Header;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{fdo, Connection};

/// The registered application writers, and the calls to them in flight.
pub(super) type Apps = Arc<AppWriters>;

// How many calls to application writers the host has out at once (`app_calls_in_flight`,
// README "Limits"): a bus answers a connection's calls only up to `max_replies_per_connection`
// pending replies (128 in dbus-daemon's default configuration) and refuses the rest with
// `LimitsExceeded`; a set of hundreds of application writers would otherwise reach it at its
// first freeze.

#[derive(Debug)]
pub(super) struct AppWriters {
    /// Writer id → the application's unique bus name.
    owners: Mutex<BTreeMap<String, String>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl AppWriters {
    pub(super) fn new(in_flight: usize) -> Apps {
        Arc::new(AppWriters {
            owners: Mutex::new(BTreeMap::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(in_flight)),
            limit: in_flight,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}

/// How long a registering application has to answer for its metadata. Only its own
/// `RegisterWriter` call waits meanwhile (calls are served concurrently), so this bounds a
/// hostile caller with room for a slow one on a loaded machine; it stays below libdbus's
/// default call timeout of 25 s, so that a caller using it still gets the host's answer.
const METADATA_WAIT: Duration = Duration::from_secs(20);

/// Registers the `org.quiesce.AppWriter1` object the caller exports at `object`: reads and
/// checks its metadata, adds the writer to the host and serves its `Writer1` object.
pub(super) async fn register(
    connection: &Connection,
    header: &Header<'_>,
    host: &Arc<Host>,
    apps: &Apps,
    object: OwnedObjectPath,
) -> Result<OwnedObjectPath, Error> {
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
    let json = tokio::time::timeout(METADATA_WAIT, app.metadata())
            .await
            .map_err(|_| {
                Error::InvalidMetadata(format!(
                    "{owner} did not answer for the Metadata property of {} at {} within {} s",
                    quiesce_dbus::APP_WRITER_INTERFACE,
                    object.as_str(),
                    METADATA_WAIT.as_secs()
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
        in_flight: apps.in_flight.clone(),
        limit: apps.limit,
    };
    let handle = host
        .add_writer(metadata, origin, Box::new(backend))
        .map_err(|e| match e {
            crate::host::AddWriterError::Duplicate { .. } => Error::DuplicateWriter(e.to_string()),
            crate::host::AddWriterError::TooMany { .. } => Error::InvalidRequest(e.to_string()),
        })?;
    apps.lock().insert(id.clone(), owner.clone());
    let path = writer_path(&id);
    connection
        .object_server()
        .at(path.clone(), WriterIface::new(handle.clone(), host))
        .await?;
    writer1::watch_state(connection, handle).await?;
    // The application may have exited while we read its metadata: check once more now that
    // the vanishing watcher would see it.
    let dbus = fdo::DBusProxy::new(connection).await?;
    if !dbus.name_has_owner(owner.as_str().try_into()?).await? {
        drop_app(
            connection,
            host,
            apps,
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

/// Removes an application writer everywhere: its object, the host's list, a running set.
pub(super) async fn drop_app(
    connection: &Connection,
    host: &Host,
    apps: &Apps,
    id: &str,
    reason: &str,
) {
    apps.lock().remove(id);
    host.writer_lost(id, reason);
    let _ = connection
        .object_server()
        .remove::<WriterIface, _>(writer_path(id))
        .await;
    tracing::warn!(writer = id, "application writer dropped: {reason}");
}

/// Drops the writers of applications whose bus name vanishes.
pub(super) async fn watch_vanishing(
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

/// An application's writer, called back over D-Bus from its worker thread.
struct AppBackend {
    connection: Connection,
    owner: String,
    object: OwnedObjectPath,
    runtime: tokio::runtime::Handle,
    in_flight: Arc<tokio::sync::Semaphore>,
    limit: usize,
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

/// Whether the bus refused a call for its limits (too many pending replies).
fn limits_exceeded(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.DBus.Error.LimitsExceeded")
        || matches!(e, zbus::Error::FDO(f) if matches!(**f, fdo::Error::LimitsExceeded(_)))
}

impl Backend for AppBackend {
    fn call(
        &mut self,
        call: &WriterCall,
        set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        let budget_ms = budget.as_millis().try_into().unwrap_or(u64::MAX);
        let releases = call.kind().releases();
        // The worker thread is not a runtime thread, so it may block on the host's runtime.
        let answer = self.runtime.block_on(async {
            tokio::time::timeout(budget, async {
                loop {
                    // A turn among the calls in flight, within the call's budget.
                    let _turn = self.in_flight.acquire().await;
                    match self.call_app(call, set_id, budget_ms).await {
                        // A bus configured tighter than APP_CALLS_IN_FLIGHT refused it: a call
                        // that releases a writer is tried again (a freeze must not be left
                        // without its thaw or abort); others fail, saying why.
                        Err(e) if releases && limits_exceeded(&e) => {
                            drop(_turn);
                            tokio::task::yield_now().await;
                        }
                        other => return other,
                    }
                }
            })
            .await
        });
        match answer {
            Ok(Ok(reports)) => Ok(reports),
            Ok(Err(e)) if limits_exceeded(&e) => Err(CallFailure::error(format!(
                "the bus refused the call to {} ({e}): the bus's limit of pending replies per connection (max_replies_per_connection) is below the {} calls this host keeps in flight to applications: lower app_calls_in_flight in the host's configuration, or raise the bus's limit",
                self.owner, self.limit
            ))),
            Ok(Err(e)) => Err(CallFailure::error(format!("{} answered: {e}", self.owner))),
            Err(_) => Err(CallFailure::timed_out(format!(
                "{} did not answer {} within {budget_ms} ms",
                self.owner,
                call.kind()
            ))),
        }
    }
}
