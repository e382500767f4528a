//! Writer calls and their failures on the wire: the one place that converts between
//! `quiesce_proto`'s vocabulary ([`WriterCall`], [`CallFailure`]) and the generated messages.
//!
//! The broker turns each of the machine's calls into a `SetCommand` with [`call_to_wire`]; the
//! host reads it back with [`call_from_wire`], and answers failures with [`failure_to_wire`],
//! which the broker reads with [`failure_from_wire`]. A kind or a call added to `quiesce_proto`
//! fails to compile here until the wire can carry it.

use crate::v1::{self, set_command};
use quiesce_proto::{CallFailure, FailureKind, OutcomeKind, SnapshotInfo, WriterCall};

/// The wire form of a call. `hold_limit_ms` is the set's hold limit, sent with a freeze for
/// the record (the host's own hold limit is what its watchdog enforces).
pub fn call_to_wire(call: &WriterCall, hold_limit_ms: u32) -> set_command::Call {
    match call {
        WriterCall::Prepare => set_command::Call::Prepare(v1::Prepare {}),
        WriterCall::Freeze => set_command::Call::Freeze(v1::Freeze { hold_limit_ms }),
        WriterCall::Thaw => set_command::Call::Thaw(v1::Thaw {}),
        WriterCall::PostSnapshot { snapshot } => {
            set_command::Call::PostSnapshot(v1::PostSnapshot {
                snapshot_json: serde_json::to_string(snapshot)
                    .expect("snapshot info always serializes"),
            })
        }
        WriterCall::Abort => set_command::Call::Abort(v1::Abort {}),
        WriterCall::Complete { outcome } => set_command::Call::Complete(v1::Complete {
            outcome: outcome.as_str().into(),
        }),
    }
}

/// A call read from the wire; an error says what the broker sent that this host cannot read.
pub fn call_from_wire(call: set_command::Call) -> Result<WriterCall, String> {
    Ok(match call {
        set_command::Call::Prepare(_) => WriterCall::Prepare,
        set_command::Call::Freeze(_) => WriterCall::Freeze,
        set_command::Call::Thaw(_) => WriterCall::Thaw,
        set_command::Call::PostSnapshot(p) => WriterCall::PostSnapshot {
            snapshot: serde_json::from_str::<SnapshotInfo>(&p.snapshot_json).map_err(|e| {
                format!("the broker sent a snapshot that is not JSON.md's SnapshotInfo: {e}")
            })?,
        },
        set_command::Call::Abort(_) => WriterCall::Abort,
        set_command::Call::Complete(c) => WriterCall::Complete {
            outcome: OutcomeKind::from_label(&c.outcome).ok_or_else(|| {
                format!(
                    "the broker sent the outcome {:?}, which this host does not know (a newer broker?)",
                    c.outcome
                )
            })?,
        },
    })
}

fn kind_to_wire(kind: FailureKind) -> v1::FailureKind {
    match kind {
        FailureKind::Error => v1::FailureKind::Error,
        FailureKind::Panicked => v1::FailureKind::Panicked,
        FailureKind::TimedOut => v1::FailureKind::TimedOut,
        FailureKind::Lost => v1::FailureKind::Lost,
        FailureKind::RefusedConfig => v1::FailureKind::RefusedConfig,
    }
}

fn kind_from_wire(kind: v1::FailureKind) -> FailureKind {
    match kind {
        // A host that does not say is taken at its word that the call failed.
        v1::FailureKind::Unspecified | v1::FailureKind::Error => FailureKind::Error,
        v1::FailureKind::Panicked => FailureKind::Panicked,
        v1::FailureKind::TimedOut => FailureKind::TimedOut,
        v1::FailureKind::Lost => FailureKind::Lost,
        v1::FailureKind::RefusedConfig => FailureKind::RefusedConfig,
    }
}

/// A failure as a `CallFailed`.
pub fn failure_to_wire(failure: &CallFailure) -> v1::CallFailed {
    v1::CallFailed {
        reason: failure.reason.clone(),
        reports: Default::default(),
        failure_kind: kind_to_wire(failure.kind).into(),
    }
}

/// A `CallFailed` as a failure. An unknown kind number (a newer host) reads as an error.
pub fn failure_from_wire(failed: v1::CallFailed) -> CallFailure {
    let kind = v1::FailureKind::try_from(failed.failure_kind).unwrap_or(v1::FailureKind::Error);
    CallFailure::new(kind_from_wire(kind), failed.reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiesce_proto::CallKind;

    #[test]
    fn every_call_crosses_the_wire_and_back_unchanged() {
        let snapshot = SnapshotInfo {
            id: "s1".into(),
            path: "/snap/s1".into(),
            provider: "btrfs".into(),
        };
        let calls = CallKind::ALL.map(|kind| match kind {
            CallKind::Prepare => WriterCall::Prepare,
            CallKind::Freeze => WriterCall::Freeze,
            CallKind::Thaw => WriterCall::Thaw,
            CallKind::PostSnapshot => WriterCall::PostSnapshot {
                snapshot: snapshot.clone(),
            },
            CallKind::Abort => WriterCall::Abort,
            CallKind::Complete => WriterCall::Complete {
                outcome: OutcomeKind::CrashConsistent,
            },
        });
        for call in calls {
            assert_eq!(call_from_wire(call_to_wire(&call, 1000)).unwrap(), call);
        }
        for outcome in OutcomeKind::ALL {
            let call = WriterCall::Complete { outcome };
            assert_eq!(call_from_wire(call_to_wire(&call, 0)).unwrap(), call);
        }
    }

    #[test]
    fn every_failure_kind_crosses_the_wire_and_back_unchanged() {
        for kind in FailureKind::ALL {
            let failure = CallFailure::new(kind, "writer w: it broke");
            assert_eq!(failure_from_wire(failure_to_wire(&failure)), failure);
        }
        let unknown = v1::CallFailed {
            reason: "x".into(),
            reports: Default::default(),
            failure_kind: 99,
        };
        assert_eq!(failure_from_wire(unknown).kind, FailureKind::Error);
    }

    #[test]
    fn an_unknown_outcome_label_is_refused_with_the_label() {
        let call = set_command::Call::Complete(v1::Complete {
            outcome: "half-consistent".into(),
        });
        let error = call_from_wire(call).unwrap_err();
        assert!(error.contains("\"half-consistent\""), "{error}");
    }
}
