//! What every quiesce daemon (`quiesce-host`, `quiesce-broker`) does at the OS boundary, once:
//!
//! - [`log`]: the log's level (`--log-level`, `-v`, `RUST_LOG`; a bad filter is an error at
//!   start) and where it goes (the journal's native protocol under systemd, plain text on
//!   stderr otherwise, coloured only on a terminal);
//! - [`notify`]: the systemd notification protocol (`READY=1`, `STATUS=`, `STOPPING=1`, and
//!   `WATCHDOG=1` from the tokio runtime, so a wedged runtime stops it), without systemd: it is
//!   a datagram on `$NOTIFY_SOCKET`, and nothing at all when that is unset;
//! - [`metrics`]: `--metrics-listen ADDR`, a Prometheus endpoint (`GET /metrics`) on the
//!   daemon's runtime, off by default; an address that cannot be bound is an error at start;
//! - [`signals`]: SIGHUP (re-read the configuration, never die), SIGTERM and SIGINT (shut down
//!   cleanly).
//!
//! Architecture Invariant: nothing here knows a daemon's configuration, D-Bus or the link; the
//! daemons decide what READY means, what a SIGHUP re-reads and which metrics they keep.

pub mod log;
pub mod metrics;
pub mod notify;
pub mod signals;

pub use log::{LogArgs, LogError, LogOutput};
pub use metrics::MetricsArgs;
pub use signals::{Signal, Signals};
