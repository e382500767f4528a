//! The record of one snapshot set: identity, request, per-writer results, outcome.

use crate::call::FailureKind;
use crate::metadata::WriterMetadata;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Identifies a snapshot set across the cluster, e.g. `set-20261127T195500Z-3f2a`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SetId(pub String);

impl fmt::Display for SetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One writer somewhere in the cluster: the node it runs on and its id there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WriterRef {
    pub node: String,
    pub writer: String,
}

impl WriterRef {
    pub fn new(node: impl Into<String>, writer: impl Into<String>) -> Self {
        WriterRef {
            node: node.into(),
            writer: writer.into(),
        }
    }
}

impl fmt::Display for WriterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writer {} on node {}", self.writer, self.node)
    }
}

/// What a requester asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRequest {
    /// The volumes to snapshot (names from the configuration).
    pub volumes: Vec<String>,
    /// When true, a writer that fails in prepare or freeze is left out and the set goes on; the
    /// outcome is then `crash-consistent` for that writer's data. Never the default.
    #[serde(default)]
    pub best_effort: bool,
}

/// Free-form results a writer reports for a call, e.g. `wal_flush_lsn = 0/3000148`.
pub type Reports = BTreeMap<String, String>;

/// The steps of the protocol, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Identify,
    Prepare,
    Freeze,
    Snapshot,
    Thaw,
    PostSnapshot,
    Finalize,
    Abort,
    Complete,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Identify => "identify",
            Phase::Prepare => "prepare",
            Phase::Freeze => "freeze",
            Phase::Snapshot => "snapshot",
            Phase::Thaw => "thaw",
            Phase::PostSnapshot => "post-snapshot",
            Phase::Finalize => "finalize",
            Phase::Abort => "abort",
            Phase::Complete => "complete",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one writer stands in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriterState {
    Idle,
    Preparing,
    Prepared,
    Freezing,
    Frozen,
    Thawing,
    Thawed,
    PostSnapshotting,
    Done,
    Aborting,
    Aborted,
    /// The writer failed a call, timed out or was lost; see its `failure`.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterFailure {
    pub phase: Phase,
    pub kind: FailureKind,
    pub reason: String,
}

/// The result for one writer, as recorded when the set ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterResult {
    pub writer: WriterRef,
    pub metadata: WriterMetadata,
    /// The last state the set saw the writer in.
    pub state: WriterState,
    /// The first failure of the writer, if any.
    pub failure: Option<WriterFailure>,
    /// Whether the writer was left out of the snapshot (best effort only).
    pub excluded: bool,
    /// What the writer reported, by key (later calls overwrite earlier keys).
    pub reports: Reports,
    /// How long each answered call took, from sent to answered, in microseconds, by call
    /// (`prepare`, `freeze`, `thaw`, `post-snapshot`, `abort`): where a set's time went.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub call_us: BTreeMap<String, u64>,
}

/// What the provider made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The provider's handle for the snapshot, e.g. a btrfs subvolume id or an LVM LV name.
    pub id: String,
    /// Where the snapshot can be read.
    pub path: String,
    /// Which provider took it, e.g. `btrfs`.
    pub provider: String,
}

/// The explicit outcome of a set. There is no silent fallback: `crash-consistent` only happens
/// when the requester asked for best effort, and says which writers were left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    AppConsistent,
    CrashConsistent {
        excluded: Vec<WriterRef>,
    },
    Failed {
        phase: Phase,
        /// The writer that caused the failure, when one did.
        writer: Option<WriterRef>,
        reason: String,
    },
}

/// Which outcome, without its details: what a writer's `complete` is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    AppConsistent,
    CrashConsistent,
    Failed,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 3] = [
        OutcomeKind::AppConsistent,
        OutcomeKind::CrashConsistent,
        OutcomeKind::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::AppConsistent => "app-consistent",
            OutcomeKind::CrashConsistent => "crash-consistent",
            OutcomeKind::Failed => "failed",
        }
    }

    /// The kind named `label` (as [`OutcomeKind::as_str`] writes it).
    pub fn from_label(label: &str) -> Option<OutcomeKind> {
        OutcomeKind::ALL.into_iter().find(|k| k.as_str() == label)
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::AppConsistent => OutcomeKind::AppConsistent,
            Outcome::CrashConsistent { .. } => OutcomeKind::CrashConsistent,
            Outcome::Failed { .. } => OutcomeKind::Failed,
        }
    }

    pub fn label(&self) -> &'static str {
        self.kind().as_str()
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::AppConsistent => f.write_str("app-consistent"),
            Outcome::CrashConsistent { excluded } => {
                write!(f, "crash-consistent (left out: ")?;
                for (i, w) in excluded.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{w}")?;
                }
                f.write_str(")")
            }
            Outcome::Failed {
                phase,
                writer,
                reason,
            } => match writer {
                Some(w) => write!(f, "failed in {phase}: {w}: {reason}"),
                None => write!(f, "failed in {phase}: {reason}"),
            },
        }
    }
}

/// When a phase ran, in milliseconds since the set started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Everything recorded about a finished set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRecord {
    pub id: SetId,
    pub request: SetRequest,
    /// The membership epoch the set was started under.
    pub epoch: u64,
    pub outcome: Outcome,
    pub writers: Vec<WriterResult>,
    /// The snapshot, when the set kept one (never for a failed set).
    pub snapshot: Option<SnapshotInfo>,
    pub phases: Vec<PhaseTiming>,
    /// From the first freeze sent to the last writer thawed or aborted, in milliseconds.
    pub freeze_window_ms: Option<u64>,
    /// How long the provider took to take the snapshot, in milliseconds.
    pub provider_ms: Option<u64>,
    /// A cleanup that did not work (a partial snapshot that could not be deleted): what to do.
    pub cleanup_error: Option<String>,
    pub total_ms: u64,
    /// When the kept snapshot was deleted on request (`quiesce snapshot delete`), in
    /// milliseconds since the Unix epoch; absent while it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_unix_ms: Option<u64>,
}
