//! The quiesce protocol core.
//!
//! Everything here is plain data and pure logic: no I/O, no clock, no threads. Time comes in as
//! `now: Instant` arguments and leaves as deadlines to arm; messages come in as `handle_*` calls and
//! leave as [`Command`]s polled with [`SnapshotSet::poll_command`]. The host (one node) and the
//! broker (the cluster) both drive the same machine, and the property tests drive it through
//! millions of interleavings without a single real process.
//!
//! The JSON form of every type here is stable and documented in `JSON.md` beside this crate:
//! it is what crosses the plugin ABI (writer metadata), D-Bus and the broker link.

pub mod call;
pub mod machine;
pub mod metadata;
pub mod set;

#[cfg(test)]
mod json_doc;

pub use call::{CallFailure, CallKind, FailureKind, ProviderFailure, ProviderOp, WriterCall};
pub use machine::{Command, Deadlines, SnapshotSet, Timeouts};
pub use metadata::{
    cut, is_valid_node_name, limits, Component, ComponentKind, Level, MetadataError,
    WriterMetadata, NODE_NAME_RULE,
};
pub use set::{
    Deletion, Outcome, OutcomeKind, Phase, PhaseTiming, Reports, Requester, SetId, SetRecord,
    SetRequest, SnapshotInfo, WriterFailure, WriterRef, WriterResult, WriterState,
};
