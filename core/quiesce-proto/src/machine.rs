//! The state machine of one snapshot set, sans I/O.
//!
//! The driver (the host for a local set, the broker for a cluster set) creates a [`SnapshotSet`]
//! with the writers it identified, then loops:
//!
//! 1. send every [`Command`] from [`SnapshotSet::poll_command`];
//! 2. wait for a reply, a provider result, a lost writer, or the instant of
//!    [`SnapshotSet::poll_timeout`], and feed it in with the matching `handle_*` call;
//! 3. stop when [`SnapshotSet::is_ended`] and the command queue is empty.
//!
//! Guarantees (checked by the property tests in `tests/machine_props.rs`):
//! - every writer that was sent `Freeze` is sent `Thaw` or `Abort` before the set ends, unless it
//!   was lost (then its own host thaws it: hold limit and lease);
//! - no writer goes longer than the hold limit between its `Freeze` and its `Thaw`/`Abort`;
//! - a set never ends `app-consistent` when any writer failed, timed out or was lost;
//! - `Abort` is never sent once post-snapshot began;
//! - each writer is sent `Abort` at most once, and late or repeated replies change nothing;
//! - **proof of hold**: a set ends `app-consistent` (or `crash-consistent`) only if every writer
//!   it keeps answered its thaw — which a node answers only for a writer it held frozen for the
//!   set from its freeze until that thaw — and the leases were renewed in time across the
//!   whole hold: when the driver itself stalls longer than the lease while a writer is held
//!   (its nodes may have let their writers go), the set fails;
//! - thaw runs in reverse level order **within each node**; no node waits for another's thaw;
//! - every writer whose freeze did not answer when the hold limit released everyone is named.

use crate::call::{CallFailure, CallKind, FailureKind, ProviderFailure, ProviderOp, WriterCall};
use crate::metadata::{Level, WriterMetadata};
use crate::set::{
    Outcome, Phase, PhaseTiming, Reports, SetId, SetRecord, SetRequest, SnapshotInfo,
    WriterFailure, WriterRef, WriterResult, WriterState,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Per-phase deadlines, the hold limit and the lease. All are inputs: the machine reads no clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// How long one writer may take to prepare (a checkpoint, a flush).
    pub prepare: Duration,
    /// How long one writer may take to freeze; never later than the hold limit allows.
    pub freeze: Duration,
    pub thaw: Duration,
    pub post_snapshot: Duration,
    pub abort: Duration,
    /// How long the provider may take for one operation (take, finalize, delete).
    pub provider: Duration,
    /// The longest any writer is held frozen: from its `Freeze` to its `Thaw` or `Abort`.
    pub hold_limit: Duration,
    /// The lease each node holds for the set; renewed every third of it (at least every
    /// millisecond) while the set runs.
    pub lease: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            prepare: Duration::from_secs(60),
            freeze: Duration::from_secs(5),
            thaw: Duration::from_secs(10),
            post_snapshot: Duration::from_secs(60),
            abort: Duration::from_secs(10),
            provider: Duration::from_secs(60),
            hold_limit: Duration::from_secs(10),
            lease: Duration::from_secs(5),
        }
    }
}

/// The per-call timeouts as daemons' configurations write them (`[timeouts]`, milliseconds);
/// any left out take the default of [`Deadlines`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub prepare_ms: u64,
    pub freeze_ms: u64,
    pub thaw_ms: u64,
    pub post_snapshot_ms: u64,
    pub abort_ms: u64,
    pub provider_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        let d = Deadlines::default();
        Timeouts {
            prepare_ms: ms(d.prepare),
            freeze_ms: ms(d.freeze),
            thaw_ms: ms(d.thaw),
            post_snapshot_ms: ms(d.post_snapshot),
            abort_ms: ms(d.abort),
            provider_ms: ms(d.provider),
        }
    }
}

impl Timeouts {
    /// The deadlines of a set under these timeouts, a hold limit and a lease.
    pub fn deadlines(&self, hold_limit: Duration, lease: Duration) -> Deadlines {
        let d = Duration::from_millis;
        Deadlines {
            prepare: d(self.prepare_ms),
            freeze: d(self.freeze_ms),
            thaw: d(self.thaw_ms),
            post_snapshot: d(self.post_snapshot_ms),
            abort: d(self.abort_ms),
            provider: d(self.provider_ms),
            hold_limit,
            lease,
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Call a writer; answer with [`SnapshotSet::handle_reply`] (not for `Complete`).
    Call {
        writer: WriterRef,
        call: WriterCall,
        deadline: Instant,
    },
    /// Take the snapshot now; answer with [`SnapshotSet::handle_snapshot_taken`].
    TakeSnapshot { deadline: Instant },
    /// Make the snapshot read-only; answer with [`SnapshotSet::handle_finalized`].
    FinalizeSnapshot {
        snapshot: SnapshotInfo,
        deadline: Instant,
    },
    /// Delete a snapshot the set will not keep; answer with [`SnapshotSet::handle_deleted`].
    DeleteSnapshot {
        snapshot: SnapshotInfo,
        deadline: Instant,
    },
    /// Grant (or renew) the node's lease on the set for `lease` from now. A node whose lease
    /// lapses thaws and aborts its writers on its own.
    RenewLease { node: String, lease: Duration },
    /// The set is over for this node: drop its lease.
    EndLease { node: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preparing,
    Freezing {
        level: usize,
    },
    Snapshotting,
    /// Each node thaws its writers in reverse level order on its own.
    Thawing,
    PostSnapshot,
    Finalizing,
    /// A failure happened: waiting for aborts, the provider, and the deletion of any snapshot.
    Failing,
    Ended,
}

#[derive(Debug)]
struct Participant {
    writer: WriterRef,
    metadata: WriterMetadata,
    state: WriterState,
    failure: Option<WriterFailure>,
    excluded: bool,
    lost: bool,
    reports: Reports,
    pending: Option<(CallKind, Instant)>,
    /// When the pending call was sent.
    sent_at: Instant,
    /// How long each answered call took, by call, in microseconds.
    call_us: BTreeMap<String, u64>,
    /// Received any call: it may hold state for the set and must hear of its end.
    touched: bool,
    freeze_sent: bool,
    thaw_sent: bool,
    abort_sent: bool,
}

impl Participant {
    /// Taking part in the coming phases: not failed, not left out, not lost.
    fn active(&self) -> bool {
        !self.excluded && !self.lost && self.failure.is_none()
    }

    fn released(&self) -> bool {
        self.thaw_sent || self.abort_sent || self.lost
    }
}

/// One snapshot set in progress. See the module docs for how to drive it.
#[derive(Debug)]
pub struct SnapshotSet {
    id: SetId,
    request: SetRequest,
    epoch: u64,
    deadlines: Deadlines,
    started: Instant,
    stage: Stage,
    participants: Vec<Participant>,
    /// Where each writer is in `participants`: a reply finds its writer at once.
    by_writer: HashMap<WriterRef, usize>,
    /// The deadlines of the calls outstanding, counted: the next one is known without walking
    /// every writer at each turn of the driver.
    pending_deadlines: BTreeMap<Instant, usize>,
    /// Writers sent `Freeze` and not yet released (thaw or abort sent, or lost).
    unreleased: usize,
    /// The participant last answered or lost: the search for a writer still pending starts
    /// there. Replies come in any order; starting next to the last one finds a pending writer
    /// after a short walk, where starting at the front walked past every writer answered so far
    /// — once per reply, quadratic in the writers of a level.
    cursor: usize,
    /// Levels that have writers, in freeze order.
    levels: Vec<Level>,
    queue: VecDeque<Command>,
    provider_pending: Option<(ProviderOp, Instant)>,
    provider_started: Option<Instant>,
    provider_ms: Option<u64>,
    snapshot: Option<SnapshotInfo>,
    snapshot_deleted: bool,
    failure: Option<Outcome>,
    outcome: Option<Outcome>,
    first_freeze: Option<Instant>,
    last_release: Option<Instant>,
    next_lease_renewal: Option<Instant>,
    /// When the leases were last renewed: a driver that renews later than a lease after it
    /// while writers are held cannot show that they stayed held.
    last_lease_renewal: Option<Instant>,
    /// Participants by node (indices), for thawing each node on its own.
    by_node: BTreeMap<String, Vec<usize>>,
    /// Nodes whose thaw may move on (a thaw answered, a writer failed or was lost there).
    thaw_nodes: BTreeSet<String>,
    phases: Vec<PhaseTiming>,
    cleanup_error: Option<String>,
    ended_at: Option<Instant>,
}

impl SnapshotSet {
    /// Starts a set with the writers the driver identified (the Identify step is the driver's:
    /// see [`WriterMetadata::touches_any`]). Commands for the Prepare step are queued at once.
    pub fn new(
        id: SetId,
        request: SetRequest,
        epoch: u64,
        writers: Vec<(WriterRef, WriterMetadata)>,
        deadlines: Deadlines,
        now: Instant,
    ) -> Self {
        let participants: Vec<Participant> = writers
            .into_iter()
            .map(|(writer, metadata)| Participant {
                writer,
                metadata,
                state: WriterState::Idle,
                failure: None,
                excluded: false,
                lost: false,
                reports: Reports::new(),
                pending: None,
                sent_at: now,
                call_us: BTreeMap::new(),
                touched: false,
                freeze_sent: false,
                thaw_sent: false,
                abort_sent: false,
            })
            .collect();
        let present: BTreeSet<Level> = participants.iter().map(|p| p.metadata.level).collect();
        let mut set = SnapshotSet {
            id,
            request,
            epoch,
            deadlines,
            started: now,
            stage: Stage::Preparing,
            participants,
            levels: present.into_iter().collect(),
            by_writer: HashMap::new(),
            pending_deadlines: BTreeMap::new(),
            unreleased: 0,
            cursor: 0,
            queue: VecDeque::new(),
            provider_pending: None,
            provider_started: None,
            provider_ms: None,
            snapshot: None,
            snapshot_deleted: false,
            failure: None,
            outcome: None,
            first_freeze: None,
            last_release: None,
            next_lease_renewal: None,
            last_lease_renewal: None,
            by_node: BTreeMap::new(),
            thaw_nodes: BTreeSet::new(),
            phases: Vec::new(),
            cleanup_error: None,
            ended_at: None,
        };
        for (i, p) in set.participants.iter().enumerate() {
            // The first of a writer named twice, as a search from the front would find.
            set.by_writer.entry(p.writer.clone()).or_insert(i);
            set.by_node
                .entry(p.writer.node.clone())
                .or_default()
                .push(i);
        }
        set.phases.push(PhaseTiming {
            phase: Phase::Identify,
            start_ms: 0,
            end_ms: 0,
        });
        set.renew_leases(now);
        set.enter_phase(now, Phase::Prepare);
        for i in 0..set.participants.len() {
            set.send(i, WriterCall::Prepare, now, now + deadlines.prepare);
        }
        set.advance(now);
        set
    }

    pub fn id(&self) -> &SetId {
        &self.id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next command to carry out, if any.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.queue.pop_front()
    }

    /// The next instant at which [`SnapshotSet::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stage == Stage::Ended {
            return None;
        }
        debug_assert_eq!(
            self.pending_deadlines.values().sum::<usize>(),
            self.participants
                .iter()
                .filter(|p| p.pending.is_some())
                .count()
        );
        let writer_deadlines = self.pending_deadlines.keys().next().copied();
        let provider = self.provider_pending.map(|x| x.1);
        writer_deadlines
            .into_iter()
            .chain(provider)
            .chain(self.hold_deadline())
            .chain(self.next_lease_renewal)
            .min()
    }

    pub fn is_ended(&self) -> bool {
        self.stage == Stage::Ended
    }

    /// The outcome, once the set has ended.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// The current state of each writer, for display.
    pub fn writer_states(&self) -> impl Iterator<Item = (&WriterRef, WriterState)> {
        self.participants.iter().map(|p| (&p.writer, p.state))
    }

    /// The snapshot the provider took, while the set still holds it (not yet deleted). A durable
    /// driver records it as soon as it appears, to clean it up after a crash.
    pub fn snapshot(&self) -> Option<&SnapshotInfo> {
        self.snapshot.as_ref().filter(|_| !self.snapshot_deleted)
    }

    /// The current phase, for display.
    pub fn phase(&self) -> Phase {
        match self.stage {
            Stage::Preparing => Phase::Prepare,
            Stage::Freezing { .. } => Phase::Freeze,
            Stage::Snapshotting => Phase::Snapshot,
            Stage::Thawing => Phase::Thaw,
            Stage::PostSnapshot => Phase::PostSnapshot,
            Stage::Finalizing => Phase::Finalize,
            Stage::Failing => Phase::Abort,
            Stage::Ended => Phase::Complete,
        }
    }

    /// The full record, once the set has ended.
    pub fn record(&self) -> Option<SetRecord> {
        let outcome = self.outcome.clone()?;
        Some(self.build_record(outcome, self.ended_at.unwrap_or(self.started)))
    }

    /// What the record would be if the driver died now: the set failed in its current phase
    /// for `reason`, every writer as last seen. A durable driver (the broker) keeps this as a
    /// checkpoint, so that after a crash the set is on record as failed, not forgotten.
    pub fn record_if_abandoned(&self, now: Instant, reason: String) -> SetRecord {
        if let Some(record) = self.record() {
            return record;
        }
        let outcome = Outcome::Failed {
            phase: self.phase(),
            writer: None,
            reason,
        };
        self.build_record(outcome, now)
    }

    fn build_record(&self, outcome: Outcome, ended: Instant) -> SetRecord {
        SetRecord {
            id: self.id.clone(),
            request: self.request.clone(),
            epoch: self.epoch,
            snapshot: if outcome.is_failed() {
                None
            } else {
                self.snapshot.clone()
            },
            outcome,
            writers: self
                .participants
                .iter()
                .map(|p| WriterResult {
                    writer: p.writer.clone(),
                    metadata: p.metadata.clone(),
                    state: p.state,
                    failure: p.failure.clone(),
                    excluded: p.excluded,
                    reports: p.reports.clone(),
                    call_us: p.call_us.clone(),
                })
                .collect(),
            phases: self.phases.clone(),
            freeze_window_ms: match (self.first_freeze, self.last_release) {
                (Some(a), Some(b)) => Some(ms(b.saturating_duration_since(a))),
                _ => None,
            },
            provider_ms: self.provider_ms,
            cleanup_error: self.cleanup_error.clone(),
            total_ms: ms(ended.saturating_duration_since(self.started)),
            deleted_unix_ms: None,
            deleted_because: None,
            started_unix_ms: None,
            lease_until_unix_ms: None,
            requester: None,
            writers_omitted: 0,
        }
    }

    /// A writer answered `kind`. Replies to calls the machine no longer waits for (late,
    /// duplicated, superseded by an abort) are ignored.
    pub fn handle_reply(
        &mut self,
        now: Instant,
        writer: &WriterRef,
        kind: CallKind,
        result: Result<Reports, CallFailure>,
    ) {
        self.check_leases(now);
        let Some(i) = self.index(writer) else { return };
        match self.participants[i].pending {
            Some((pending, _)) if pending == kind => {}
            _ => return,
        }
        self.set_pending(i, None);
        let took = now.saturating_duration_since(self.participants[i].sent_at);
        self.participants[i].call_us.insert(
            kind.as_str().to_string(),
            took.as_micros().try_into().unwrap_or(u64::MAX),
        );
        if matches!(kind, CallKind::Thaw | CallKind::Abort) && self.participants[i].freeze_sent {
            self.last_release = Some(now);
        }
        match result {
            Ok(reports) => {
                let p = &mut self.participants[i];
                p.reports.extend(reports);
                if p.failure.is_none() {
                    p.state = match kind {
                        CallKind::Prepare => WriterState::Prepared,
                        CallKind::Freeze => WriterState::Frozen,
                        CallKind::Thaw => WriterState::Thawed,
                        CallKind::PostSnapshot => WriterState::Done,
                        CallKind::Abort => WriterState::Aborted,
                        CallKind::Complete => p.state,
                    };
                }
            }
            Err(failure) => self.writer_failed(now, i, kind, failure),
        }
        self.advance(now);
    }

    /// A writer (or its whole node) is gone: no call reaches it any more.
    pub fn handle_writer_lost(&mut self, now: Instant, writer: &WriterRef, reason: String) {
        if let Some(i) = self.index(writer) {
            self.lose(now, i, reason);
        }
        // After: a writer that is gone is not aborted by the failure this may cause.
        self.check_leases(now);
        self.advance(now);
    }

    /// Every writer of `node` is gone for this set: the node left, or its lease on the set
    /// lapsed there (it released its writers on its own and says so).
    pub fn handle_node_lost(&mut self, now: Instant, node: &str, reason: String) {
        let indices = self.by_node.get(node).cloned().unwrap_or_default();
        // All of them gone first: the failure the first one causes aborts none of the others.
        let gone: Vec<(usize, CallKind)> = indices
            .into_iter()
            .filter_map(|i| self.mark_lost(i).map(|k| (i, k)))
            .collect();
        for (i, kind) in gone {
            self.writer_failed(now, i, kind, CallFailure::lost(reason.clone()));
        }
        self.check_leases(now);
        self.advance(now);
    }

    fn lose(&mut self, now: Instant, i: usize, reason: String) {
        if let Some(kind) = self.mark_lost(i) {
            self.writer_failed(now, i, kind, CallFailure::lost(reason));
        }
    }

    /// Marks a writer lost; the call it was lost in, unless it was lost already or the set
    /// is over.
    fn mark_lost(&mut self, i: usize) -> Option<CallKind> {
        if self.participants[i].lost || self.stage == Stage::Ended {
            return None;
        }
        let kind = self.participants[i]
            .pending
            .map(|x| x.0)
            .unwrap_or_else(|| self.current_call_kind());
        self.update_release(i, |p| p.lost = true);
        self.set_pending(i, None);
        Some(kind)
    }

    /// Fails the set when the leases went unrenewed for longer than a lease while a writer was
    /// held: the driver stalled (paused, starved of CPU), so a node may have released its
    /// writers on its own before the snapshot was cut. Its thaw would tell, but a set must not
    /// depend on hearing from a node that may be gone.
    fn check_leases(&mut self, now: Instant) {
        if self.stage == Stage::Ended || self.unreleased == 0 {
            return;
        }
        let Some(last) = self.last_lease_renewal else {
            return;
        };
        let gap = now.saturating_duration_since(last);
        if gap > self.deadlines.lease {
            let phase = self.phase();
            self.fail(
                now,
                phase,
                None,
                format!(
                    "the nodes' leases were not renewed for {} ms, longer than the lease of {} ms, while writers were held (the driver stalled: paused or starved of CPU); a node may have released its writers before the snapshot, so the set cannot be app-consistent",
                    ms(gap),
                    ms(self.deadlines.lease)
                ),
            );
        }
    }

    /// The provider answered `TakeSnapshot`.
    pub fn handle_snapshot_taken(
        &mut self,
        now: Instant,
        result: Result<SnapshotInfo, ProviderFailure>,
    ) {
        self.check_leases(now);
        if self.provider_pending.map(|x| x.0) != Some(ProviderOp::Take) {
            // A repeat of an answer already handled (the driver delivered it twice): the
            // snapshot is already kept, or already being deleted. Without this check a
            // repeated answer after an app-consistent end deleted the kept snapshot.
            if result.as_ref().ok() == self.snapshot.as_ref() {
                return;
            }
            // Too late: the set gave up on the provider. Whatever it made must go.
            if let Ok(snapshot) = result {
                self.cleanup_error = Some(format!(
                    "the provider returned snapshot {} after its deadline; it is being deleted",
                    snapshot.id
                ));
                if self.stage == Stage::Ended {
                    self.queue.push_back(Command::DeleteSnapshot {
                        snapshot: snapshot.clone(),
                        deadline: now + self.deadlines.provider,
                    });
                    // Remember it, so that a repeat of this answer is recognised above (the
                    // record of a failed set shows no snapshot).
                    if self.snapshot.is_none() {
                        self.snapshot = Some(snapshot);
                    }
                } else {
                    self.snapshot = Some(snapshot);
                }
            }
            self.advance(now);
            return;
        }
        self.provider_pending = None;
        self.provider_ms = self
            .provider_started
            .map(|t| ms(now.saturating_duration_since(t)));
        match result {
            Ok(snapshot) => {
                self.snapshot = Some(snapshot);
                if self.stage == Stage::Snapshotting {
                    self.enter_phase(now, Phase::Thaw);
                    self.stage = Stage::Thawing;
                    self.thaw_nodes = self.by_node.keys().cloned().collect();
                }
            }
            Err(failure) => self.fail(now, Phase::Snapshot, None, failure.reason),
        }
        self.advance(now);
    }

    /// The provider answered `FinalizeSnapshot`.
    pub fn handle_finalized(&mut self, now: Instant, result: Result<(), ProviderFailure>) {
        self.check_leases(now);
        if self.provider_pending.map(|x| x.0) != Some(ProviderOp::Finalize) {
            return;
        }
        self.provider_pending = None;
        if self.failure.is_some() {
            // The set already failed while the provider was finalizing (a requester abort, an
            // epoch change, a writer lost): it must end failed and the snapshot must go, even
            // when finalizing worked. `advance` (stage Failing) deletes it and ends the set.
            // Finishing here instead ended such a set app- or crash-consistent.
        } else if let Err(failure) = result {
            self.fail(now, Phase::Finalize, None, failure.reason);
        } else {
            self.finish(now);
        }
        self.advance(now);
    }

    /// The provider answered `DeleteSnapshot`.
    pub fn handle_deleted(&mut self, now: Instant, result: Result<(), ProviderFailure>) {
        self.check_leases(now);
        if self.provider_pending.map(|x| x.0) != Some(ProviderOp::Delete) {
            return;
        }
        self.provider_pending = None;
        self.snapshot_deleted = true;
        if let Err(failure) = result {
            let id = self.snapshot.as_ref().map(|s| s.id.as_str()).unwrap_or("?");
            self.cleanup_error = Some(format!(
                "the partial snapshot {id} could not be deleted ({failure}): delete it by hand"
            ));
        }
        self.advance(now);
    }

    /// The cluster's membership epoch changed (a node or writer joined or left): the set can
    /// no longer promise to cover every writer, so it fails.
    pub fn handle_epoch(&mut self, now: Instant, epoch: u64) {
        self.check_leases(now);
        if epoch == self.epoch || self.stage == Stage::Ended {
            return;
        }
        let phase = self.phase();
        self.fail(
            now,
            phase,
            None,
            format!(
                "membership changed during the set (epoch {} -> {epoch}): a node or writer joined or left; start a new set",
                self.epoch
            ),
        );
        self.advance(now);
    }

    /// The requester (or the driver) gives up on the set.
    pub fn abort(&mut self, now: Instant, reason: String) {
        if self.stage == Stage::Ended {
            return;
        }
        self.check_leases(now);
        let phase = self.phase();
        self.fail(now, phase, None, reason);
        self.advance(now);
    }

    /// Fires every deadline that is due at `now`. Safe to call at any time.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stage == Stage::Ended {
            return;
        }
        // Before renewing: a renewal now does not make up for the gap behind it.
        self.check_leases(now);
        if self.next_lease_renewal.is_some_and(|t| t <= now) {
            self.renew_leases(now);
        }
        if self.hold_deadline().is_some_and(|t| t <= now) {
            self.hold_limit_reached(now);
        }
        let writer_due = self
            .pending_deadlines
            .first_key_value()
            .is_some_and(|(t, _)| *t <= now);
        // Walk the writers only when one of their deadlines is due.
        if writer_due {
            for i in 0..self.participants.len() {
                if let Some((kind, deadline)) = self.participants[i].pending {
                    if deadline <= now {
                        self.set_pending(i, None);
                        if matches!(kind, CallKind::Thaw | CallKind::Abort)
                            && self.participants[i].freeze_sent
                        {
                            self.last_release = Some(now);
                        }
                        let failure = CallFailure::timed_out(format!(
                            "no answer to {kind} within its deadline"
                        ));
                        self.writer_failed(now, i, kind, failure);
                    }
                }
            }
        }
        if let Some((op, deadline)) = self.provider_pending {
            if deadline <= now {
                self.provider_pending = None;
                match op {
                    ProviderOp::Take => self.fail(
                        now,
                        Phase::Snapshot,
                        None,
                        "the provider did not take the snapshot within its deadline".into(),
                    ),
                    ProviderOp::Finalize => self.fail(
                        now,
                        Phase::Finalize,
                        None,
                        "the provider did not make the snapshot read-only within its deadline"
                            .into(),
                    ),
                    ProviderOp::Delete => {
                        self.snapshot_deleted = true;
                        let id = self.snapshot.as_ref().map(|s| s.id.as_str()).unwrap_or("?");
                        self.cleanup_error = Some(format!(
                            "deleting the partial snapshot {id} did not finish in time: check and delete it by hand"
                        ));
                    }
                }
            }
        }
        self.advance(now);
    }

    // ---- internals ----

    /// Sets a participant's outstanding call, keeping `pending_deadlines` in step.
    fn set_pending(&mut self, i: usize, pending: Option<(CallKind, Instant)>) {
        if let Some((CallKind::Thaw, _)) = self.participants[i].pending {
            // A thaw answered, timed out or lost: that node's next level may go.
            self.thaw_nodes
                .insert(self.participants[i].writer.node.clone());
        }
        if let Some((_, old)) = self.participants[i].pending {
            if let Some(n) = self.pending_deadlines.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.pending_deadlines.remove(&old);
                }
            }
        }
        if let Some((_, new)) = pending {
            *self.pending_deadlines.entry(new).or_default() += 1;
        }
        self.participants[i].pending = pending;
    }

    /// Applies `change` to a participant, keeping `unreleased` in step.
    fn update_release(&mut self, i: usize, change: impl FnOnce(&mut Participant)) {
        let p = &mut self.participants[i];
        let was = p.freeze_sent && !p.released();
        change(p);
        let is = p.freeze_sent && !p.released();
        match (was, is) {
            (false, true) => self.unreleased += 1,
            (true, false) => self.unreleased -= 1,
            _ => {}
        }
    }

    fn index(&mut self, writer: &WriterRef) -> Option<usize> {
        let i = *self.by_writer.get(writer)?;
        self.cursor = i;
        Some(i)
    }

    fn current_call_kind(&self) -> CallKind {
        match self.stage {
            Stage::Preparing => CallKind::Prepare,
            Stage::Freezing { .. } | Stage::Snapshotting => CallKind::Freeze,
            Stage::Thawing => CallKind::Thaw,
            Stage::PostSnapshot | Stage::Finalizing => CallKind::PostSnapshot,
            Stage::Failing | Stage::Ended => CallKind::Abort,
        }
    }

    /// The instant the earliest-frozen writer reaches the hold limit, while any writer that was
    /// sent `Freeze` is still unreleased.
    fn hold_deadline(&self) -> Option<Instant> {
        let first = self.first_freeze?;
        debug_assert_eq!(
            self.unreleased,
            self.participants
                .iter()
                .filter(|p| p.freeze_sent && !p.released())
                .count()
        );
        (self.unreleased > 0).then_some(first + self.deadlines.hold_limit)
    }

    fn hold_limit_reached(&mut self, now: Instant) {
        let limit = ms(self.deadlines.hold_limit);
        match self.stage {
            Stage::Thawing => {
                // The snapshot is taken: thaw everyone still frozen now, order no longer matters.
                for i in 0..self.participants.len() {
                    let p = &self.participants[i];
                    if p.freeze_sent && !p.released() {
                        self.send(i, WriterCall::Thaw, now, now + self.deadlines.thaw);
                    }
                }
            }
            _ => {
                let phase = self.phase();
                // Writers whose freeze is still out are why the snapshot was not taken in time:
                // name them, whatever the deadlines' sizes (a freeze deadline as long as the
                // hold limit never fires first).
                let late: Vec<usize> = (0..self.participants.len())
                    .filter(|&i| {
                        self.participants[i].pending.map(|x| x.0) == Some(CallKind::Freeze)
                    })
                    .collect();
                for &i in &late {
                    self.set_pending(i, None);
                    let p = &mut self.participants[i];
                    p.state = WriterState::Failed;
                    p.failure.get_or_insert(WriterFailure {
                        phase: Phase::Freeze,
                        kind: FailureKind::TimedOut,
                        reason: format!(
                            "no answer to freeze before the hold limit of {limit} ms released every writer"
                        ),
                    });
                }
                let culprit = late.first().map(|&i| self.participants[i].writer.clone());
                let reason = match &culprit {
                    Some(_) => format!(
                        "no answer to freeze before the hold limit of {limit} ms; every writer was released"
                    ),
                    None => format!(
                        "the hold limit of {limit} ms was reached before the snapshot was taken; every writer was released"
                    ),
                };
                self.fail(now, phase, culprit, reason);
            }
        }
    }

    fn send(&mut self, i: usize, call: WriterCall, now: Instant, deadline: Instant) {
        let kind = call.kind();
        if self.participants[i].lost {
            return;
        }
        self.update_release(i, |p| match kind {
            CallKind::Freeze => p.freeze_sent = true,
            CallKind::Thaw => p.thaw_sent = true,
            CallKind::Abort => p.abort_sent = true,
            _ => {}
        });
        if kind != CallKind::Complete {
            self.set_pending(i, Some((kind, deadline)));
        }
        let p = &mut self.participants[i];
        p.touched = true;
        match kind {
            CallKind::Prepare => p.state = WriterState::Preparing,
            CallKind::Freeze => p.state = WriterState::Freezing,
            CallKind::Thaw => p.state = WriterState::Thawing,
            CallKind::PostSnapshot => p.state = WriterState::PostSnapshotting,
            CallKind::Abort => {
                if p.failure.is_none() {
                    p.state = WriterState::Aborting;
                }
            }
            CallKind::Complete => {}
        }
        if kind != CallKind::Complete {
            p.sent_at = now;
        }
        self.queue.push_back(Command::Call {
            writer: p.writer.clone(),
            call,
            deadline,
        });
    }

    fn send_abort(&mut self, i: usize, now: Instant) {
        let p = &self.participants[i];
        if p.touched && !p.lost && !p.abort_sent {
            self.send(i, WriterCall::Abort, now, now + self.deadlines.abort);
        }
    }

    /// Records a writer's failure and decides: leave it out (best effort, before the snapshot is
    /// final) or fail the whole set.
    fn writer_failed(&mut self, now: Instant, i: usize, kind: CallKind, failure: CallFailure) {
        let phase = kind.phase();
        // Whatever a writer or a node sent, a record keeps a bounded reason.
        let failure = CallFailure {
            reason: crate::metadata::cut(&failure.reason, crate::metadata::limits::REASON_BYTES),
            ..failure
        };
        {
            let p = &mut self.participants[i];
            if p.failure.is_none() {
                p.failure = Some(WriterFailure {
                    phase,
                    kind: failure.kind,
                    reason: failure.reason.clone(),
                });
            }
            p.state = WriterState::Failed;
        }
        if matches!(kind, CallKind::Abort | CallKind::Complete) || self.failure.is_some() {
            // Already ending: the failure is on the record, nothing more to decide.
            return;
        }
        if self.stage == Stage::Ended {
            return;
        }
        let writer = self.participants[i].writer.clone();
        if self.request.best_effort {
            self.participants[i].excluded = true;
            if !matches!(kind, CallKind::PostSnapshot) {
                self.send_abort(i, now);
            }
        } else {
            let what = match failure.kind {
                FailureKind::Lost => format!("lost: {}", failure.reason),
                FailureKind::Error
                | FailureKind::Panicked
                | FailureKind::TimedOut
                | FailureKind::RefusedConfig => failure.reason,
            };
            self.fail(now, phase, Some(writer), what);
        }
    }

    /// Fails the set: abort every writer (before post-snapshot only), then delete any snapshot.
    fn fail(&mut self, now: Instant, phase: Phase, writer: Option<WriterRef>, reason: String) {
        if self.failure.is_some() || self.stage == Stage::Ended {
            return;
        }
        self.failure = Some(Outcome::Failed {
            phase,
            writer,
            reason,
        });
        let post_snapshot_began = matches!(self.stage, Stage::PostSnapshot | Stage::Finalizing);
        self.stage = Stage::Failing;
        self.enter_phase(now, Phase::Abort);
        if !post_snapshot_began {
            for i in 0..self.participants.len() {
                self.send_abort(i, now);
            }
        }
    }

    /// Moves the set forward as far as the replies received allow.
    fn advance(&mut self, now: Instant) {
        loop {
            let before = self.stage;
            self.step(now);
            if self.stage == before {
                break;
            }
        }
    }

    fn writers_pending(&self) -> bool {
        self.participants.iter().any(|p| p.pending.is_some())
    }

    /// Active writers at `level` (or all levels) with a call still outstanding.
    fn active_pending(&self, level: Option<Level>) -> bool {
        let n = self.participants.len();
        let start = self.cursor.min(n);
        (start..n).chain(0..start).any(|i| {
            let p = &self.participants[i];
            p.active() && p.pending.is_some() && level.is_none_or(|l| p.metadata.level == l)
        })
    }

    fn step(&mut self, now: Instant) {
        match self.stage {
            Stage::Preparing => {
                if !self.active_pending(None) {
                    self.enter_phase(now, Phase::Freeze);
                    self.stage = Stage::Freezing { level: 0 };
                    self.send_freeze(0, now);
                }
            }
            Stage::Freezing { level } => {
                let lvl = self.levels.get(level).copied();
                if lvl.is_some() && self.active_pending(lvl) {
                    return;
                }
                if level + 1 < self.levels.len() {
                    self.stage = Stage::Freezing { level: level + 1 };
                    self.send_freeze(level + 1, now);
                } else {
                    self.enter_phase(now, Phase::Snapshot);
                    self.stage = Stage::Snapshotting;
                    self.provider_started = Some(now);
                    let deadline = now + self.deadlines.provider;
                    self.provider_pending = Some((ProviderOp::Take, deadline));
                    self.queue.push_back(Command::TakeSnapshot { deadline });
                }
            }
            Stage::Snapshotting => {}
            Stage::Thawing => {
                for node in std::mem::take(&mut self.thaw_nodes) {
                    self.thaw_node(&node, now);
                }
                // Every thaw sent (no writer held any more) and answered.
                if self.unreleased == 0 && !self.active_pending(None) {
                    self.enter_phase(now, Phase::PostSnapshot);
                    self.stage = Stage::PostSnapshot;
                    let snapshot = self.snapshot.clone().expect("thawing follows a snapshot");
                    for i in 0..self.participants.len() {
                        let p = &self.participants[i];
                        if p.active() && p.metadata.needs_post_snapshot {
                            let call = WriterCall::PostSnapshot {
                                snapshot: snapshot.clone(),
                            };
                            self.send(i, call, now, now + self.deadlines.post_snapshot);
                        }
                    }
                }
            }
            Stage::PostSnapshot => {
                if !self.active_pending(None) {
                    self.enter_phase(now, Phase::Finalize);
                    self.stage = Stage::Finalizing;
                    let deadline = now + self.deadlines.provider;
                    self.provider_pending = Some((ProviderOp::Finalize, deadline));
                    let snapshot = self.snapshot.clone().expect("finalize follows a snapshot");
                    self.queue
                        .push_back(Command::FinalizeSnapshot { snapshot, deadline });
                }
            }
            Stage::Finalizing => {}
            Stage::Failing => {
                if self.writers_pending() || self.provider_pending.is_some() {
                    return;
                }
                if let (Some(snapshot), false) = (self.snapshot.clone(), self.snapshot_deleted) {
                    let deadline = now + self.deadlines.provider;
                    self.provider_pending = Some((ProviderOp::Delete, deadline));
                    self.queue
                        .push_back(Command::DeleteSnapshot { snapshot, deadline });
                    return;
                }
                let outcome = self.failure.clone().expect("failing has a failure");
                self.end(now, outcome);
            }
            Stage::Ended => {}
        }
    }

    /// Thaws `node`'s highest level still held, unless a thaw of a higher level is still out
    /// there: reverse level order within the node, and no wait for any other node.
    fn thaw_node(&mut self, node: &str, now: Instant) {
        let Some(indices) = self.by_node.get(node).cloned() else {
            return;
        };
        let (mut held, mut thawing) = (None, None);
        for &i in &indices {
            let p = &self.participants[i];
            if !p.active() {
                continue;
            }
            let level = p.metadata.level;
            if p.freeze_sent && !p.released() {
                held = held.max(Some(level));
            }
            if p.pending.map(|x| x.0) == Some(CallKind::Thaw) {
                thawing = thawing.max(Some(level));
            }
        }
        let Some(level) = held else {
            return;
        };
        if thawing.is_some_and(|t| t > level) {
            return;
        }
        for i in indices {
            let p = &self.participants[i];
            if p.active() && p.metadata.level == level && p.freeze_sent && !p.released() {
                self.send(i, WriterCall::Thaw, now, now + self.deadlines.thaw);
            }
        }
    }

    fn send_freeze(&mut self, level: usize, now: Instant) {
        let Some(&lvl) = self.levels.get(level) else {
            return;
        };
        let first = *self.first_freeze.get_or_insert(now);
        let deadline = (now + self.deadlines.freeze).min(first + self.deadlines.hold_limit);
        for i in 0..self.participants.len() {
            let p = &self.participants[i];
            if p.active() && p.metadata.level == lvl {
                self.send(i, WriterCall::Freeze, now, deadline);
            }
        }
    }

    /// Finalize succeeded: the set ends with its snapshot.
    fn finish(&mut self, now: Instant) {
        let excluded: Vec<WriterRef> = self
            .participants
            .iter()
            .filter(|p| p.excluded || p.failure.is_some())
            .map(|p| p.writer.clone())
            .collect();
        let outcome = if excluded.is_empty() {
            Outcome::AppConsistent
        } else {
            Outcome::CrashConsistent { excluded }
        };
        self.end(now, outcome);
    }

    fn end(&mut self, now: Instant, outcome: Outcome) {
        self.enter_phase(now, Phase::Complete);
        self.close_phase(now);
        self.stage = Stage::Ended;
        self.ended_at = Some(now);
        self.next_lease_renewal = None;
        // The set waits for nothing any more. A set may end with calls still out (the abort of
        // a writer left out under best effort); without this, their late replies were still
        // taken after the end (no timeout fires after it) and changed the record.
        for p in &mut self.participants {
            p.pending = None;
        }
        self.pending_deadlines.clear();
        for i in 0..self.participants.len() {
            if self.participants[i].touched && !self.participants[i].lost {
                let call = WriterCall::Complete {
                    outcome: outcome.kind(),
                };
                self.send(i, call, now, now + self.deadlines.abort);
            }
        }
        for node in self.nodes() {
            self.queue.push_back(Command::EndLease { node });
        }
        self.outcome = Some(outcome);
    }

    fn nodes(&self) -> BTreeSet<String> {
        self.participants
            .iter()
            .filter(|p| !p.lost)
            .map(|p| p.writer.node.clone())
            .collect()
    }

    fn renew_leases(&mut self, now: Instant) {
        self.last_lease_renewal = Some(now);
        for node in self.nodes() {
            self.queue.push_back(Command::RenewLease {
                node,
                lease: self.deadlines.lease,
            });
        }
        // At least 1 ms apart: with a lease under 3 ns (a zero lease from a bad configuration)
        // the renewal was due again at once, forever, and the driver spun without the set ever
        // moving on.
        let every = (self.deadlines.lease / 3).max(Duration::from_millis(1));
        self.next_lease_renewal = Some(now + every);
    }

    fn enter_phase(&mut self, now: Instant, phase: Phase) {
        self.close_phase(now);
        let at = ms(now.saturating_duration_since(self.started));
        self.phases.push(PhaseTiming {
            phase,
            start_ms: at,
            end_ms: at,
        });
    }

    fn close_phase(&mut self, now: Instant) {
        let at = ms(now.saturating_duration_since(self.started));
        if let Some(last) = self.phases.last_mut() {
            last.end_ms = at;
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}
