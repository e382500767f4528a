//! The quiesce node daemon's core: configuration, plugin loading, writer workers and local sets.
//!
//! Architecture Invariant: the host never calls a writer from the tokio runtime — every writer
//! call runs on that writer's own thread ([`worker`]) under a deadline, and the hold-limit
//! watchdog lives in that thread, so a writer is thawed even if every caller is gone.

pub mod broker_link;
pub mod config;
pub mod dbus;
pub mod host;
pub mod local_set;
pub mod metrics;
pub mod plugins;
pub mod remote_sets;
pub mod set_requests;
pub mod volume_flush;
pub mod worker;

pub use config::Config;
pub use host::{AddWriterError, Host, SetError};
