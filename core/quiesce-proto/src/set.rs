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
    /// Its name in JSON, messages and logs: `post-snapshot`, ...
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Where one writer stands in the set.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::VariantArray,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
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

impl WriterState {
    /// Its name in JSON, messages and logs: `post-snapshotting`, ...
    pub fn as_str(self) -> &'static str {
        self.into()
    }
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

    /// Its name in JSON, messages and logs: `app-consistent`, ...
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The kind named `label` (as [`OutcomeKind::as_str`] writes it).
    pub fn from_label(label: &str) -> Option<OutcomeKind> {
        OutcomeKind::ALL.into_iter().find(|k| k.as_str() == label)
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

/// Why a kept snapshot was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deletion {
    /// `quiesce snapshot delete` (or `DeleteSnapshot`, `prune`).
    Requested,
    /// Its requester's lease lapsed: the requester died or stopped renewing.
    LeaseLapsed,
    /// The broker's retention for the volume (`max_kept`, `max_age`).
    Retention,
}

impl Deletion {
    pub fn as_str(self) -> &'static str {
        match self {
            Deletion::Requested => "requested",
            Deletion::LeaseLapsed => "lease-lapsed",
            Deletion::Retention => "retention",
        }
    }
}

/// Who asked the broker for a set. A request through a host (`Host1.CreateSnapshot`, `quiesce
/// snapshot create`) names the node whose host forwarded it (from that host's certificate) and
/// the uid of the D-Bus caller there (as that host saw it); a requester with a client
/// certificate talking to the broker directly is named by its certificate. Every field may be
/// absent: a broker without TLS knows no names, an older host sends no uid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// As a log line or a reason names a requester: `node n1, uid 0`, `client backup`.
impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = vec![];
        if let Some(node) = &self.node {
            parts.push(format!("node {node}"));
        }
        if let Some(uid) = self.uid {
            parts.push(format!("uid {uid}"));
        }
        if let Some(client) = &self.client {
            parts.push(format!("client {client}"));
        }
        if parts.is_empty() {
            f.write_str("an unnamed requester")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
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
    /// Why the kept snapshot was deleted, once it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_because: Option<Deletion>,
    /// When the set started, in milliseconds since the Unix epoch (absent in the records of
    /// older brokers and of sets run by one host alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<u64>,
    /// Until when the kept snapshot is held by its requester's lease, in milliseconds since the
    /// Unix epoch: the broker deletes it then unless the requester renews the lease. Absent: kept
    /// until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until_unix_ms: Option<u64>,
    /// Who asked for the set (absent in the records of older brokers and of local sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<Requester>,
    /// How many writers this copy of the record leaves out (a reply too large otherwise:
    /// see [`SetRecord::compact`]); 0, and absent, in a whole record.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub writers_omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SetRecord {
    /// The record as JSON, no larger than about `budget` bytes: when the whole record is
    /// larger, it keeps every writer that failed or was left out, then as many of the others
    /// (in the record's order) as fit, and counts the rest in `writers_omitted`. The writers
    /// kept stay in the record's order. Whatever else the record says is kept whole.
    pub fn compact(&self, budget: usize) -> SetRecord {
        let whole = json_len(self);
        if whole <= budget || self.writers.is_empty() {
            return self.clone();
        }
        let bare = SetRecord {
            writers: Vec::new(),
            ..self.clone()
        };
        // `,` between writers, and room for the `writers_omitted` field.
        let mut room = budget.saturating_sub(json_len(&bare) + 32);
        let sizes: Vec<usize> = self.writers.iter().map(|w| json_len(w) + 1).collect();
        let mut keep = vec![false; self.writers.len()];
        let notable = |w: &WriterResult| w.failure.is_some() || w.excluded;
        for pass_notable in [true, false] {
            for (i, w) in self.writers.iter().enumerate() {
                if keep[i] || notable(w) != pass_notable {
                    continue;
                }
                // The failures are kept whatever their size: they are why a set failed.
                if sizes[i] <= room || pass_notable {
                    keep[i] = true;
                    room = room.saturating_sub(sizes[i]);
                }
            }
        }
        let writers: Vec<WriterResult> = self
            .writers
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(w, _)| w.clone())
            .collect();
        SetRecord {
            writers_omitted: (self.writers.len() - writers.len()) as u64,
            writers,
            ..bare
        }
    }
}

fn json_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("records always serialize");
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_states_and_outcomes_are_named_as_json_names_them() {
        use strum::VariantArray;
        let phases = [
            Phase::Identify,
            Phase::Prepare,
            Phase::Freeze,
            Phase::Snapshot,
            Phase::Thaw,
            Phase::PostSnapshot,
            Phase::Finalize,
            Phase::Abort,
            Phase::Complete,
        ];
        for phase in phases {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str());
            assert_eq!(phase.to_string(), phase.as_str());
        }
        assert_eq!(Phase::PostSnapshot.as_str(), "post-snapshot");
        for state in WriterState::VARIANTS {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(WriterState::PostSnapshotting.as_str(), "post-snapshotting");
        for kind in OutcomeKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
            assert_eq!(OutcomeKind::from_label(kind.as_str()), Some(kind));
        }
    }
    use crate::metadata::Level;

    fn record(writers: usize, failed_at: usize) -> SetRecord {
        SetRecord {
            id: SetId("set-1".into()),
            request: SetRequest {
                volumes: vec!["v".into()],
                best_effort: false,
            },
            epoch: 1,
            outcome: Outcome::AppConsistent,
            writers: (0..writers)
                .map(|i| WriterResult {
                    writer: WriterRef::new(format!("n{i}"), "w"),
                    metadata: WriterMetadata::new("w", "a writer", Level::BackEnd),
                    state: WriterState::Done,
                    failure: (i == failed_at).then(|| WriterFailure {
                        phase: Phase::Freeze,
                        kind: FailureKind::Error,
                        reason: "no".into(),
                    }),
                    excluded: false,
                    reports: Reports::new(),
                    call_us: BTreeMap::new(),
                })
                .collect(),
            snapshot: None,
            phases: vec![],
            freeze_window_ms: None,
            provider_ms: None,
            cleanup_error: None,
            total_ms: 0,
            deleted_unix_ms: None,
            deleted_because: None,
            started_unix_ms: None,
            lease_until_unix_ms: None,
            requester: None,
            writers_omitted: 0,
        }
    }

    #[test]
    fn a_large_record_keeps_its_failures_and_counts_what_it_leaves_out() {
        let whole = record(10_000, 9_999);
        let small = whole.compact(64 * 1024);
        let size = serde_json::to_string(&small).unwrap().len();
        assert!(size <= 64 * 1024, "{size}");
        assert!(small.writers.len() < 10_000);
        assert_eq!(small.writers.len() as u64 + small.writers_omitted, 10_000);
        assert!(
            small.writers.iter().any(|w| w.failure.is_some()),
            "the failure is kept"
        );
        // In the record's order: the first writers, then the failing last one.
        assert_eq!(small.writers[0].writer.node, "n0");
        assert_eq!(small.writers.last().unwrap().writer.node, "n9999");
        // A record that fits is left whole, and says nothing of omissions.
        let fits = record(3, 99);
        assert_eq!(fits.compact(64 * 1024), fits);
        assert!(!serde_json::to_string(&fits)
            .unwrap()
            .contains("writers_omitted"));
    }
}
