//! The D-Bus contract of quiesce.
//!
//! Architecture Invariant: only this crate and `quiesce-host` know zbus. Names are versioned:
//! a breaking change to an interface adds `2` beside `1`, it never changes `1`.
//!
//! - `org.quiesce.Host1` — the bus name of the host daemon, and the interface of its root object
//!   `/org/quiesce/Host1` (which also serves `org.freedesktop.DBus.ObjectManager`).
//! - `org.quiesce.Writer1` — one object per writer at `/org/quiesce/Host1/writers/<id>`: its
//!   metadata and state as properties (`PropertiesChanged` on state changes).
//! - `org.quiesce.AppWriter1` — what an application exports to become a writer at run time; the
//!   host calls it back under the same deadlines as plugins.
//!
//! The introspection XML of each interface is checked in under `interfaces/`; a test compares it
//! with the live service.
//!
//! [`requester::HostClient`] is what a requester on the node (the `quiesce snapshot` command, a
//! backup tool written in Rust) uses to ask the local host, with every failure between it and the
//! host (no bus, no host on it, a bus policy refusal, an older host) put in words that say what to
//! do; it keeps zbus out of the requester's code.

pub mod requester;

pub use requester::{CallError, HostClient, SetEvent, SetSignals};
pub use zbus;

use zbus::zvariant::OwnedObjectPath;

pub const HOST_NAME: &str = "org.quiesce.Host1";
pub const HOST_PATH: &str = "/org/quiesce/Host1";
pub const HOST_INTERFACE: &str = "org.quiesce.Host1";
pub const WRITER_INTERFACE: &str = "org.quiesce.Writer1";
pub const APP_WRITER_INTERFACE: &str = "org.quiesce.AppWriter1";

/// The checked-in introspection XML of each interface.
pub const HOST_XML: &str = include_str!("../interfaces/org.quiesce.Host1.xml");
pub const WRITER_XML: &str = include_str!("../interfaces/org.quiesce.Writer1.xml");
pub const APP_WRITER_XML: &str = include_str!("../interfaces/org.quiesce.AppWriter1.xml");

/// The object path of a writer: ids may hold `-` and `.`, which D-Bus paths may not, so every
/// byte outside `[A-Za-z0-9]` is escaped as `_xx` (hex), the systemd convention.
pub fn writer_path(id: &str) -> OwnedObjectPath {
    let mut element = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() {
            element.push(b as char);
        } else {
            element.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(format!("{HOST_PATH}/writers/{element}"))
        .expect("an escaped writer id is a valid object path element")
}

/// The documented errors of `org.quiesce.Host1` and `org.quiesce.Writer1`, each named
/// `org.quiesce.Error.<Variant>`; the message says what failed and what to do.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.quiesce.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The caller is neither root nor in the `quiesce` group.
    NotAuthorized(String),
    /// No writer with that id on this node.
    UnknownWriter(String),
    /// A registering application's metadata was refused.
    InvalidMetadata(String),
    /// A writer with that id exists already.
    DuplicateWriter(String),
    /// No set with that id.
    UnknownSet(String),
    /// The volume is not configured on this node (`RunLocalSet`), or the broker has no such
    /// volume (`CreateSnapshot`).
    UnknownVolume(String),
    /// Another set is running on this node, or in the cluster (`CreateSnapshot`; a
    /// `DeleteSnapshot` of a set still running): retry later.
    Busy(String),
    /// A writer is still stuck in an abandoned call.
    WriterStuck(String),
    /// The request is malformed (for example a set with no volume).
    InvalidRequest(String),
    /// A writer call failed.
    CallFailed(String),
    /// A cluster snapshot request reached a host that was started without `--broker`: it cannot
    /// forward to the cluster.
    NoBroker(String),
    /// The host could not reach the broker (connection refused or timed out, TLS handshake
    /// refused, the broker unavailable or the link broken mid-call).
    BrokerUnreachable(String),
    /// The broker would not start the set or delete its snapshot for a reason `Busy` and
    /// `UnknownVolume` do not name (it kept no snapshot, its provider failed to delete it):
    /// nothing was frozen or deleted.
    SetRefused(String),
    /// The broker answered with an unexpected error (it refused this node's certificate for
    /// requests, does not serve snapshot sets, failed internally) or with an answer that is not
    /// a set record.
    BrokerFailed(String),
}

impl From<zbus::fdo::Error> for Error {
    fn from(e: zbus::fdo::Error) -> Self {
        Error::ZBus(zbus::Error::from(e))
    }
}

impl From<zbus::names::Error> for Error {
    fn from(e: zbus::names::Error) -> Self {
        Error::ZBus(zbus::Error::from(e))
    }
}

/// One row of `ListWriters`: id, name, level, state, object path.
pub type WriterRow = (String, String, String, String, OwnedObjectPath);

/// One row of `ListSets`: id, outcome label, snapshot path (empty when none was kept).
pub type SetRow = (String, String, String);

#[zbus::proxy(
    interface = "org.quiesce.Host1",
    default_service = "org.quiesce.Host1",
    default_path = "/org/quiesce/Host1",
    gen_blocking = false
)]
pub trait Host {
    /// The writers of this node.
    fn list_writers(&self) -> zbus::Result<Vec<WriterRow>>;
    /// Runs a snapshot set of `volume` on this node; returns (set id, outcome, snapshot path).
    fn run_local_set(
        &self,
        volume: &str,
        best_effort: bool,
    ) -> zbus::Result<(String, String, String)>;
    fn list_sets(&self) -> zbus::Result<Vec<SetRow>>;
    /// The full record of a set, as JSON (`core/quiesce-proto/JSON.md`).
    fn show_set(&self, id: &str) -> zbus::Result<String>;
    /// Registers the `org.quiesce.AppWriter1` object the caller exports at `object`.
    fn register_writer(
        &self,
        object: &zbus::zvariant::ObjectPath<'_>,
    ) -> zbus::Result<OwnedObjectPath>;
    fn unregister_writer(&self, id: &str) -> zbus::Result<()>;
    /// Runs one snapshot set of `volumes` across the cluster (forwarded to the broker) and
    /// returns its record as JSON (`SetRecord`, `core/quiesce-proto/JSON.md`) once it ended,
    /// whatever its outcome: a failed set is an answer, not an error.
    fn create_snapshot(&self, volumes: &[&str], best_effort: bool) -> Result<String, Error>;
    fn create_snapshot_leased(
        &self,
        volumes: &[&str],
        best_effort: bool,
        lease_ms: u64,
        timeout_ms: u64,
    ) -> Result<String, Error>;
    /// Starts one cluster set and returns its id at once; `PhaseChanged` and `SetEnded` follow.
    fn start_snapshot(
        &self,
        volumes: &[&str],
        best_effort: bool,
        lease_ms: u64,
        timeout_ms: u64,
    ) -> Result<String, Error>;
    /// Aborts a running cluster set (everyone thawed, nothing kept).
    fn cancel_snapshot(&self, id: &str) -> Result<(), Error>;
    fn renew_snapshot(&self, id: &str, lease_ms: u64) -> Result<String, Error>;
    /// The cluster's set records as JSON, oldest first.
    fn list_snapshots(&self) -> Result<Vec<String>, Error>;
    /// The record of one cluster set as JSON.
    fn show_snapshot(&self, id: &str) -> Result<String, Error>;

    fn list_snapshots_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<String>, String, Vec<String>), Error>;

    fn show_snapshot_writers(
        &self,
        id: &str,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<String>, u64), Error>;
    /// Deletes the snapshot a cluster set kept; returns the record after the deletion.
    fn delete_snapshot(&self, id: &str) -> Result<String, Error>;
    #[zbus(property)]
    fn node(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn set_ended(&self, id: &str, outcome: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn phase_changed(&self, id: &str, phase: &str) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.quiesce.Writer1",
    default_service = "org.quiesce.Host1",
    gen_blocking = false
)]
pub trait Writer {
    /// Freezes the writer outside any set (for diagnosis); the hold limit still thaws it.
    fn freeze(&self) -> zbus::Result<()>;
    fn thaw(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn level(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn instance(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn vendor_version(&self) -> zbus::Result<String>;
    /// (name, kind, volume, paths) of each component.
    #[zbus(property)]
    fn components(&self) -> zbus::Result<Vec<(String, String, String, Vec<String>)>>;
    #[zbus(property)]
    fn expected_freeze_ms(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn needs_post_snapshot(&self) -> zbus::Result<bool>;
    /// `plugin NAME (PATH)` or `application BUS-NAME at OBJECT`.
    #[zbus(property)]
    fn origin(&self) -> zbus::Result<String>;
    /// `idle`, `prepared`, `frozen`, `thawed` or `failed`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// The full metadata as JSON (`core/quiesce-proto/JSON.md`).
    #[zbus(property)]
    fn metadata(&self) -> zbus::Result<String>;
}

/// The interface an application exports to be a writer. Each call gets the set id and the
/// call's budget in milliseconds, and returns key/value reports; an error reply fails the call.
/// Thaw and Abort must be idempotent.
#[zbus::proxy(interface = "org.quiesce.AppWriter1", gen_blocking = false)]
pub trait AppWriter {
    fn prepare(
        &self,
        set_id: &str,
        budget_ms: u64,
    ) -> zbus::Result<std::collections::HashMap<String, String>>;
    fn freeze(
        &self,
        set_id: &str,
        budget_ms: u64,
    ) -> zbus::Result<std::collections::HashMap<String, String>>;
    fn thaw(
        &self,
        set_id: &str,
        budget_ms: u64,
    ) -> zbus::Result<std::collections::HashMap<String, String>>;
    fn post_snapshot(
        &self,
        set_id: &str,
        budget_ms: u64,
        snapshot_path: &str,
    ) -> zbus::Result<std::collections::HashMap<String, String>>;
    fn abort(
        &self,
        set_id: &str,
        budget_ms: u64,
    ) -> zbus::Result<std::collections::HashMap<String, String>>;
    fn complete(
        &self,
        set_id: &str,
        budget_ms: u64,
        outcome: &str,
    ) -> zbus::Result<std::collections::HashMap<String, String>>;
    /// The writer's metadata as JSON (`core/quiesce-proto/JSON.md`).
    #[zbus(property)]
    fn metadata(&self) -> zbus::Result<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_introspection_is_well_formed_xml() {
        // A strict parser, as expat and dbus-python are: `--` inside a comment (a doc comment
        // naming a command-line flag) made the file unreadable to them.
        for (name, xml) in [
            ("Host1", crate::HOST_XML),
            ("Writer1", crate::WRITER_XML),
            ("AppWriter1", crate::APP_WRITER_XML),
        ] {
            let doc = format!("<node>{xml}</node>");
            roxmltree::Document::parse(&doc)
                .unwrap_or_else(|e| panic!("org.quiesce.{name}.xml is not well-formed: {e}"));
        }
        let bad = "<node><!-- see --broker --><interface name=\"x\"/></node>";
        assert!(
            roxmltree::Document::parse(bad).is_err(),
            "the parser is strict"
        );
    }

    #[test]
    fn writer_paths_escape_what_d_bus_forbids() {
        assert_eq!(
            writer_path("pg-main.5432").as_str(),
            "/org/quiesce/Host1/writers/pg_2dmain_2e5432"
        );
        assert_eq!(
            writer_path("hello").as_str(),
            "/org/quiesce/Host1/writers/hello"
        );
    }
}
