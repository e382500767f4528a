//! A requester's side of `org.quiesce.Host1`: reach the host on this node and ask it for
//! snapshot sets across the cluster.
//!
//! The host forwards these requests to the broker with its own node certificate, so a requester
//! needs no certificate: only the right to call the host (root or the `quiesce` group for
//! creating and deleting, anyone for reading, as the bus policy and the host both check).
//!
//! Every failure comes back as a [`CallError`] whose message says what to do. The host's own
//! refusals ([`CallError::Host`]) keep their documented `org.quiesce.Error.*` name; failures
//! before the host is reached (no bus, no host on it, a bus policy refusal, a host of an older
//! release) get a variant of their own.

use crate::{Error, HostProxy};
use zbus::proxy::CacheProperties;

/// Why a call to the host gave no answer from it, or which documented error it answered.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The host refused with one of its documented errors (never [`Error::ZBus`]).
    #[error("{} ({})", host_message(.0), zbus::DBusError::name(.0))]
    Host(Error),
    #[error("cannot connect to {bus}: {cause}; is the D-Bus daemon running there? Point --bus (or QUIESCE_BUS) at the bus quiesce-host serves on")]
    NoBus { bus: String, cause: String },
    #[error("no quiesce-host serves {name} on {bus}: start it (quiesce-host --config /etc/quiesce/host.toml), or point --bus (or QUIESCE_BUS) at the bus it serves on", name = crate::HOST_NAME)]
    NoHost { bus: String },
    #[error("{bus} refused the call to {method} ({cause}): its policy (/usr/share/dbus-1/system.d/org.quiesce.Host1.conf) lets only root and members of the quiesce group start or delete sets; run as one of them, or install the policy of this release")]
    Denied {
        bus: String,
        method: &'static str,
        cause: String,
    },
    #[error("the quiesce-host on {bus} does not know {method} ({cause}): it is older than this requester; install the same quiesce release on the host and restart it")]
    OldHost {
        bus: String,
        method: &'static str,
        cause: String,
    },
    #[error("calling {method} on the quiesce-host on {bus} failed: {cause}; check the host's log (journalctl -u quiesce-host)")]
    Bus {
        bus: String,
        method: &'static str,
        cause: String,
    },
}

fn host_message(error: &Error) -> &str {
    zbus::DBusError::description(error).unwrap_or("no description")
}

/// A connection to the host on this node (`org.quiesce.Host1`).
pub struct HostClient {
    proxy: HostProxy<'static>,
    bus: String,
}

impl HostClient {
    /// Connects to the bus at `address`, or to the system bus when `None` (which follows
    /// `DBUS_SYSTEM_BUS_ADDRESS` when it is set). Whether a host serves there shows at the
    /// first call ([`CallError::NoHost`]).
    pub async fn connect(address: Option<&str>) -> Result<HostClient, CallError> {
        let bus = describe_bus(address);
        let no_bus = |cause: zbus::Error| CallError::NoBus {
            bus: bus.clone(),
            cause: cause.to_string(),
        };
        let builder = match address {
            Some(address) => zbus::connection::Builder::address(address).map_err(no_bus)?,
            None => zbus::connection::Builder::system().map_err(no_bus)?,
        };
        let connection = builder.build().await.map_err(no_bus)?;
        // Nothing here reads properties: caching them would only add calls (and match rules)
        // a restrictive bus policy might refuse.
        let proxy = HostProxy::builder(&connection)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(no_bus)?;
        Ok(HostClient { proxy, bus })
    }

    /// The bus this client talks to, as messages name it.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// `CreateSnapshot`: runs one set of `volumes` across the cluster and returns its record as
    /// JSON once it ended, whatever its outcome.
    pub async fn create_snapshot(
        &self,
        volumes: &[String],
        best_effort: bool,
    ) -> Result<String, CallError> {
        let volumes: Vec<&str> = volumes.iter().map(String::as_str).collect();
        self.proxy
            .create_snapshot(&volumes, best_effort)
            .await
            .map_err(|e| self.call_error("CreateSnapshot", e))
    }

    /// `CreateSnapshotLeased`: as [`HostClient::create_snapshot`], the snapshot held by this
    /// requester's lease of `lease` from the set's end (`None`: kept until deleted); a set
    /// still running `timeout` after it started aborted (`None`: no timeout).
    pub async fn create_snapshot_leased(
        &self,
        volumes: &[String],
        best_effort: bool,
        lease: Option<std::time::Duration>,
        timeout: Option<std::time::Duration>,
    ) -> Result<String, CallError> {
        let volumes: Vec<&str> = volumes.iter().map(String::as_str).collect();
        self.proxy
            .create_snapshot_leased(
                &volumes,
                best_effort,
                millis_or_zero(lease),
                millis_or_zero(timeout),
            )
            .await
            .map_err(|e| self.call_error("CreateSnapshotLeased", e))
    }

    /// `StartSnapshot`: starts one set of `volumes` across the cluster and returns its id at
    /// once. Subscribe with [`HostClient::set_signals`] first: its progress comes as signals.
    pub async fn start_snapshot(
        &self,
        volumes: &[String],
        best_effort: bool,
        lease: Option<std::time::Duration>,
        timeout: Option<std::time::Duration>,
    ) -> Result<String, CallError> {
        let volumes: Vec<&str> = volumes.iter().map(String::as_str).collect();
        self.proxy
            .start_snapshot(
                &volumes,
                best_effort,
                millis_or_zero(lease),
                millis_or_zero(timeout),
            )
            .await
            .map_err(|e| self.call_error("StartSnapshot", e))
    }

    /// `CancelSnapshot`: aborts the running set `id` (everyone thawed, nothing kept).
    pub async fn cancel_snapshot(&self, id: &str) -> Result<(), CallError> {
        self.proxy
            .cancel_snapshot(id)
            .await
            .map_err(|e| self.call_error("CancelSnapshot", e))
    }

    /// The host's `PhaseChanged` and `SetEnded` signals from now on, in the order it sent them.
    pub async fn set_signals(&self) -> Result<SetSignals, CallError> {
        let failed = |e: zbus::Error| CallError::Bus {
            bus: self.bus.clone(),
            method: "AddMatch",
            cause: e.to_string(),
        };
        // One rule for both signals: one queue keeps their order (a phase never after the end).
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .path(crate::HOST_PATH)
            .map_err(failed)?
            .interface(crate::HOST_INTERFACE)
            .map_err(failed)?
            .build();
        let messages =
            zbus::MessageStream::for_match_rule(rule, self.proxy.inner().connection(), None)
                .await
                .map_err(failed)?;
        Ok(SetSignals { messages })
    }

    /// `RenewSnapshot`: holds set `id`'s snapshot `lease` from now (`None`: until deleted).
    pub async fn renew_snapshot(
        &self,
        id: &str,
        lease: Option<std::time::Duration>,
    ) -> Result<String, CallError> {
        self.proxy
            .renew_snapshot(id, millis_or_zero(lease))
            .await
            .map_err(|e| self.call_error("RenewSnapshot", e))
    }

    /// `ListSnapshots`: every set record of the cluster as JSON, oldest first.
    pub async fn list_snapshots(&self) -> Result<Vec<String>, CallError> {
        self.proxy
            .list_snapshots()
            .await
            .map_err(|e| self.call_error("ListSnapshots", e))
    }

    /// `ListSnapshotsPage`: one page of set records as JSON, where the next starts ("" on the
    /// last), and the catalog rows the broker could not read.
    pub async fn list_snapshots_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<String>, String, Vec<String>), CallError> {
        self.proxy
            .list_snapshots_page(after, limit)
            .await
            .map_err(|e| self.call_error("ListSnapshotsPage", e))
    }

    /// `ShowSnapshotWriters`: a page of a set's writers (WriterResult JSON) and their total.
    pub async fn show_snapshot_writers(
        &self,
        id: &str,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<String>, u64), CallError> {
        self.proxy
            .show_snapshot_writers(id, offset, limit)
            .await
            .map_err(|e| self.call_error("ShowSnapshotWriters", e))
    }

    /// `ShowSnapshot`: the record of one set as JSON.
    pub async fn show_snapshot(&self, id: &str) -> Result<String, CallError> {
        self.proxy
            .show_snapshot(id)
            .await
            .map_err(|e| self.call_error("ShowSnapshot", e))
    }

    /// `DeleteSnapshot`: deletes the snapshot a set kept; returns the record after deletion.
    pub async fn delete_snapshot(&self, id: &str) -> Result<String, CallError> {
        self.proxy
            .delete_snapshot(id)
            .await
            .map_err(|e| self.call_error("DeleteSnapshot", e))
    }

    /// Tells the host's documented errors from failures on the way to it.
    fn call_error(&self, method: &'static str, error: Error) -> CallError {
        let Error::ZBus(error) = error else {
            return CallError::Host(error);
        };
        let (name, cause) = match &error {
            zbus::Error::MethodError(name, description, _) => (
                name.as_str().to_string(),
                description.clone().unwrap_or_else(|| name.to_string()),
            ),
            zbus::Error::FDO(e) => (zbus::DBusError::name(e.as_ref()).to_string(), e.to_string()),
            other => (String::new(), other.to_string()),
        };
        let bus = self.bus.clone();
        match name.as_str() {
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => CallError::NoHost { bus },
            "org.freedesktop.DBus.Error.AccessDenied" => CallError::Denied { bus, method, cause },
            "org.freedesktop.DBus.Error.UnknownMethod"
            | "org.freedesktop.DBus.Error.UnknownInterface"
            | "org.freedesktop.DBus.Error.UnknownObject" => {
                CallError::OldHost { bus, method, cause }
            }
            _ => CallError::Bus { bus, method, cause },
        }
    }
}

/// What a started set did, as the host's signals tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetEvent {
    /// `PhaseChanged`: it entered this phase (as JSON.md spells phases).
    Phase(String),
    /// `SetEnded`: it ended with this outcome label (`unknown` when the host lost track).
    Ended(String),
}

/// The host's set signals ([`HostClient::set_signals`]).
pub struct SetSignals {
    messages: zbus::MessageStream,
}

impl SetSignals {
    /// The next event of set `id` (other sets' signals are passed over); `None` once the bus
    /// connection closed.
    pub async fn next_of(&mut self, id: &str) -> Option<SetEvent> {
        use futures_util::StreamExt;
        while let Some(message) = self.messages.next().await {
            let Ok(message) = message else { continue };
            let header = message.header();
            let member = header.member().map(|m| m.as_str().to_string());
            let Ok((of, what)) = message.body().deserialize::<(String, String)>() else {
                continue;
            };
            if of != id {
                continue;
            }
            match member.as_deref() {
                Some("PhaseChanged") => return Some(SetEvent::Phase(what)),
                Some("SetEnded") => return Some(SetEvent::Ended(what)),
                _ => {}
            }
        }
        None
    }
}

/// A duration as the host's D-Bus methods take it: milliseconds, at least 1 (0 means none).
fn millis_or_zero(duration: Option<std::time::Duration>) -> u64 {
    duration.map_or(0, |d| (d.as_millis() as u64).max(1))
}

fn describe_bus(address: Option<&str>) -> String {
    match address {
        Some(address) => format!("the bus at {address}"),
        None => match std::env::var("DBUS_SYSTEM_BUS_ADDRESS") {
            Ok(address) => format!("the system bus at {address} (DBUS_SYSTEM_BUS_ADDRESS)"),
            Err(_) => "the system bus".to_string(),
        },
    }
}
