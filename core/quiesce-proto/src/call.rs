//! The one vocabulary of writer calls and their failures.
//!
//! Every crate that makes, carries or answers a writer call speaks these types: the state
//! machine, the driver, the host's worker threads, the broker link (`quiesce-link` converts them
//! to and from the wire, once), the D-Bus application writers and the SDK's test harness. Adding
//! a call or a failure kind here makes the compiler walk every consumer (ARCHITECTURE.md, "How to
//! add a writer call").

use crate::set::{OutcomeKind, Phase, SnapshotInfo};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which call: a [`WriterCall`] without its arguments.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum CallKind {
    Prepare,
    Freeze,
    Thaw,
    PostSnapshot,
    Abort,
    Complete,
}

impl CallKind {
    /// Every call, in protocol order.
    pub const ALL: [CallKind; 6] = [
        CallKind::Prepare,
        CallKind::Freeze,
        CallKind::Thaw,
        CallKind::PostSnapshot,
        CallKind::Abort,
        CallKind::Complete,
    ];

    /// The name in messages, records (`call_us` keys) and logs: `prepare`, `post-snapshot`, ...
    /// (its phase's name).
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The phase of a set this call belongs to.
    pub fn phase(self) -> Phase {
        match self {
            CallKind::Prepare => Phase::Prepare,
            CallKind::Freeze => Phase::Freeze,
            CallKind::Thaw => Phase::Thaw,
            CallKind::PostSnapshot => Phase::PostSnapshot,
            CallKind::Abort => Phase::Abort,
            CallKind::Complete => Phase::Complete,
        }
    }

    /// Calls that release a writer (or tell it the set is over): a host queues them even behind
    /// a call that hangs, so that a writer coming back from a hung freeze is still released.
    pub fn releases(self) -> bool {
        matches!(self, CallKind::Thaw | CallKind::Abort | CallKind::Complete)
    }
}

/// A call to one writer, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterCall {
    Prepare,
    Freeze,
    Thaw,
    /// Finish the writer's part on the snapshot at `snapshot.path` (writable unless the
    /// provider's snapshots are read-only from the start).
    PostSnapshot {
        snapshot: SnapshotInfo,
    },
    /// Forget the set: thaw if frozen, drop what prepare set up. Idempotent.
    Abort,
    /// The set ended with this outcome (a notification: its reply is not awaited).
    Complete {
        outcome: OutcomeKind,
    },
}

impl WriterCall {
    pub fn kind(&self) -> CallKind {
        match self {
            WriterCall::Prepare => CallKind::Prepare,
            WriterCall::Freeze => CallKind::Freeze,
            WriterCall::Thaw => CallKind::Thaw,
            WriterCall::PostSnapshot { .. } => CallKind::PostSnapshot,
            WriterCall::Abort => CallKind::Abort,
            WriterCall::Complete { .. } => CallKind::Complete,
        }
    }
}

/// How a writer call failed.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum FailureKind {
    /// The writer answered with an error.
    Error,
    /// The writer's code panicked; the panic was caught at its boundary.
    Panicked,
    /// The writer did not answer within the call's deadline; the call was abandoned.
    /// (Records written before this kind had its name say `timeout`.)
    #[serde(alias = "timeout")]
    TimedOut,
    /// The writer or its node went away (process exited, bus name vanished, link cut).
    Lost,
    /// The writer's plugin refused its configuration.
    RefusedConfig,
}

impl FailureKind {
    /// Every kind, for documentation and tests.
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Error,
        FailureKind::Panicked,
        FailureKind::TimedOut,
        FailureKind::Lost,
        FailureKind::RefusedConfig,
    ];

    /// Its name in JSON, messages and logs: `timed-out`, ...
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a writer call did not succeed: its kind, and a reason that names the writer and says
/// what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}")]
pub struct CallFailure {
    pub kind: FailureKind,
    pub reason: String,
}

impl CallFailure {
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> CallFailure {
        CallFailure {
            kind,
            reason: reason.into(),
        }
    }

    pub fn error(reason: impl Into<String>) -> CallFailure {
        CallFailure::new(FailureKind::Error, reason)
    }

    pub fn panicked(reason: impl Into<String>) -> CallFailure {
        CallFailure::new(FailureKind::Panicked, reason)
    }

    pub fn timed_out(reason: impl Into<String>) -> CallFailure {
        CallFailure::new(FailureKind::TimedOut, reason)
    }

    pub fn lost(reason: impl Into<String>) -> CallFailure {
        CallFailure::new(FailureKind::Lost, reason)
    }

    pub fn refused_config(reason: impl Into<String>) -> CallFailure {
        CallFailure::new(FailureKind::RefusedConfig, reason)
    }
}

/// Which provider operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderOp {
    /// Take the snapshot (inside the freeze window).
    Take,
    /// Make the snapshot read-only once post-snapshot is done.
    Finalize,
    /// Delete a snapshot the set will not keep.
    Delete,
}

impl ProviderOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderOp::Take => "take",
            ProviderOp::Finalize => "finalize",
            ProviderOp::Delete => "delete",
        }
    }
}

impl fmt::Display for ProviderOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a provider operation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ProviderFailure {
    pub op: ProviderOp,
    /// The provider's error, naming the volume and what to do.
    pub reason: String,
}

impl ProviderFailure {
    pub fn new(op: ProviderOp, reason: impl Into<String>) -> ProviderFailure {
        ProviderFailure {
            op,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_names_are_the_phase_names() {
        let names: Vec<&str> = CallKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "prepare",
                "freeze",
                "thaw",
                "post-snapshot",
                "abort",
                "complete"
            ]
        );
        for kind in CallKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
            assert_eq!(kind.as_str(), kind.phase().as_str());
            assert_eq!(kind.to_string(), kind.as_str());
        }
    }

    #[test]
    fn failure_kinds_serialize_as_their_names_and_read_the_old_timeout() {
        for kind in FailureKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
        }
        let old: FailureKind = serde_json::from_str("\"timeout\"").unwrap();
        assert_eq!(old, FailureKind::TimedOut);
    }
}
