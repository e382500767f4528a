//! Property / state-machine tests of [`SnapshotSet`], plus deterministic scenarios.
//!
//! The property tests build a random set of writers and a random "world" (how each writer and
//! the provider answer each call: on time, late, with an error, never, twice, or by vanishing;
//! plus a requester abort and a membership change at random instants), then drive the machine
//! with a simulated clock exactly as a driver would: poll every command, advance time to the
//! earliest of the next world event and `poll_timeout()`, fire timeouts when due. Every run is
//! bounded and must end. The invariants promised by the module docs of `machine.rs` are checked
//! on the observed command stream and on the final record.
//!
//! To see the trace of a failing case: `QUIESCE_PROP_TRACE=1 cargo test -p quiesce-proto`.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use quiesce_proto::{
    CallFailure, CallKind, Command, Deadlines, FailureKind, Level, Outcome, Phase, ProviderFailure,
    ProviderOp, Reports, SetId, SetRecord, SetRequest, SnapshotInfo, SnapshotSet, WriterCall,
    WriterMetadata, WriterRef, WriterState,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Upper bound on the events + timeouts of one run; a set still running after that is a bug.
const MAX_STEPS: usize = 10_000;
/// Upper bound on simulated time; every deadline in the generated worlds is well below a second.
const MAX_SIM_TIME: Duration = Duration::from_secs(60);
const EPOCH: u64 = 7;

// ---------------------------------------------------------------------------------------------
// The generated world
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct WriterSpec {
    node: usize,
    level: Level,
    post: bool,
}

/// One answer of the world to one call, interpreted against the run's fault rate.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// 0..100: below the fault rate, something goes wrong (see `writer_answer`).
    roll: u8,
    /// Delay of a slow answer, in ms (may exceed every deadline).
    delay: u16,
    /// Deliver the same answer again this many ms after the first one.
    dup: Option<u16>,
}

#[derive(Debug, Clone)]
struct World {
    writers: Vec<WriterSpec>,
    best_effort: bool,
    /// prepare, freeze, thaw, post_snapshot, abort, provider, hold_limit, lease (ms).
    deadlines: [u16; 8],
    /// Percentage of answers that go wrong (0 = a calm world).
    fault_pct: u8,
    /// Answers to writer calls, consumed in order; when exhausted, answers are fast and Ok.
    calls: Vec<Answer>,
    /// Answers to provider operations, consumed in order; when exhausted, fast and Ok.
    provider: Vec<Answer>,
    /// When the requester aborts (up to twice: aborting again changes nothing).
    aborts: Vec<u16>,
    /// When, and whether the epoch really changes (false: the same epoch is announced again).
    epoch_at: Option<(u16, bool)>,
    /// At equal instants, fire due timeouts before delivering due events (or the reverse).
    timeouts_first: bool,
    /// Instants at which `handle_timeout` is called although nothing is due.
    pokes: Vec<u16>,
    /// The driver itself stalls (paused, starved of CPU): from `at` for `len` ms it neither
    /// fires timeouts nor takes inputs, while the nodes' leases run on.
    stalls: Vec<(u16, u16)>,
}

enum WriterAnswer {
    Ok(u64),
    Err(u64),
    Silent,
    Lost(u64),
    /// Answers Ok, then goes away (e.g. while frozen).
    OkThenLost(u64, u64),
}

enum ProviderAnswer {
    Ok(u64),
    Err(u64),
    Silent,
}

impl World {
    fn stalls(&self) -> impl Iterator<Item = (Duration, Duration)> + '_ {
        self.stalls.iter().map(|&(a, l)| {
            let a = Duration::from_millis(a.into());
            (a, a + Duration::from_millis(l.into()))
        })
    }

    /// When the driver can act on something due at `t`: at once, or when the stall over `t`
    /// ends (stalls may follow one another).
    fn after_stalls(&self, mut t: Duration) -> Duration {
        while let Some((_, end)) = self.stalls().find(|&(a, b)| t >= a && t < b) {
            t = end;
        }
        t
    }

    /// Whether the driver stalled at some point between `from` and `to`.
    fn stalled_between(&self, from: Duration, to: Duration) -> bool {
        self.stalls().any(|(a, b)| a < to && b > from)
    }

    fn deadlines(&self) -> Deadlines {
        let d = self.deadlines.map(|x| Duration::from_millis(x.into()));
        Deadlines {
            prepare: d[0],
            freeze: d[1],
            thaw: d[2],
            post_snapshot: d[3],
            abort: d[4],
            provider: d[5],
            hold_limit: d[6],
            lease: d[7],
        }
    }

    fn writers(&self) -> Vec<(WriterRef, WriterMetadata)> {
        self.writers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let id = format!("w{i}");
                (
                    WriterRef::new(format!("n{}", w.node), id.clone()),
                    meta(&id, w.level, w.post),
                )
            })
            .collect()
    }

    fn writer_answer(&self, a: Option<Answer>) -> (WriterAnswer, Option<u64>) {
        let Some(a) = a else {
            return (WriterAnswer::Ok(1), None);
        };
        let f = self.fault_pct;
        let slow = u64::from(a.delay);
        let dup = a.dup.map(u64::from);
        let answer = if a.roll < f / 5 {
            WriterAnswer::Err(slow)
        } else if a.roll < f / 5 * 2 {
            WriterAnswer::Silent
        } else if a.roll < f / 5 * 3 {
            WriterAnswer::Lost(slow)
        } else if a.roll < f / 5 * 4 {
            return (WriterAnswer::OkThenLost(slow % 8, slow / 8), None);
        } else if a.roll < f {
            WriterAnswer::Ok(slow)
        } else {
            WriterAnswer::Ok(slow % 8)
        };
        (answer, dup)
    }

    fn provider_answer(&self, a: Option<Answer>) -> (ProviderAnswer, Option<u64>) {
        let Some(a) = a else {
            return (ProviderAnswer::Ok(1), None);
        };
        let f = self.fault_pct;
        let slow = u64::from(a.delay);
        let answer = if a.roll < f / 3 {
            ProviderAnswer::Err(slow)
        } else if a.roll < f / 3 * 2 {
            ProviderAnswer::Silent
        } else if a.roll < f {
            ProviderAnswer::Ok(slow)
        } else {
            ProviderAnswer::Ok(slow % 8)
        };
        (answer, a.dup.map(u64::from))
    }
}

fn level() -> impl Strategy<Value = Level> {
    prop_oneof![
        Just(Level::FrontEnd),
        Just(Level::BackEnd),
        Just(Level::System),
        Just(Level::Volume)
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    (0u8..100, 0u16..300, prop::option::weighted(0.15, 0u16..120))
        .prop_map(|(roll, delay, dup)| Answer { roll, delay, dup })
}

fn world() -> impl Strategy<Value = World> {
    let writers = prop::collection::vec(
        (0usize..3, level(), any::<bool>()).prop_map(|(node, level, post)| WriterSpec {
            node,
            level,
            post,
        }),
        0..=6,
    );
    let deadlines = [
        10u16..200,
        10u16..200,
        10u16..200,
        10u16..200,
        10u16..200,
        10u16..200,
        // Sometimes shorter than the freeze deadline, or than the whole freeze + snapshot.
        5u16..300,
        30u16..600,
    ];
    (
        writers,
        prop::bool::weighted(0.35),
        deadlines,
        prop_oneof![2 => Just(0u8), 3 => 1u8..=40],
        prop::collection::vec(answer(), 0..40),
        prop::collection::vec(answer(), 0..4),
        prop::option::weighted(0.15, prop::collection::vec(0u16..300, 1..=2))
            .prop_map(Option::unwrap_or_default),
        prop::option::weighted(0.12, (0u16..300, any::<bool>())),
        any::<bool>(),
        prop::collection::vec(0u16..400, 0..4),
        prop::option::weighted(0.25, prop::collection::vec((0u16..300, 1u16..700), 1..=2))
            .prop_map(Option::unwrap_or_default),
    )
        .prop_map(
            |(
                writers,
                best_effort,
                deadlines,
                fault_pct,
                calls,
                provider,
                aborts,
                epoch_at,
                timeouts_first,
                pokes,
                stalls,
            )| World {
                writers,
                best_effort,
                deadlines,
                fault_pct,
                calls,
                provider,
                aborts,
                epoch_at,
                timeouts_first,
                pokes,
                stalls,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Take,
    Finalize,
    Delete,
}

#[derive(Debug, Clone)]
enum Ev {
    Reply {
        writer: WriterRef,
        kind: CallKind,
        result: Result<Reports, CallFailure>,
        call: Option<usize>,
    },
    Lost(WriterRef),
    Provider {
        op: Op,
        ok: bool,
        rec: usize,
    },
    Abort,
    Epoch(u64),
    Poke,
    /// The world checks a node's lease (at the instant it would lapse without a renewal).
    LeaseCheck(String),
    /// A node tells the driver that its lease lapsed and it released its writers.
    NodeLost(String),
}

/// What the test saw, in order: commands polled and inputs fed to the machine.
#[derive(Debug, Clone)]
enum Obs {
    Cmd(Command),
    Reply {
        writer: WriterRef,
        kind: CallKind,
        ok: bool,
    },
    Lost(WriterRef),
    NodeLost(String),
    Provider {
        op: Op,
        ok: bool,
    },
    Abort,
    Epoch {
        changed: bool,
    },
    Timeout,
}

/// A call sent to a writer (or an operation asked of the provider) and whether it was answered
/// Ok by its deadline, before the set ended, before any timeout at or past its deadline fired.
#[derive(Debug, Clone)]
struct CallRec {
    writer: Option<WriterRef>,
    op: Option<Op>,
    deadline: Duration,
    /// How many times `handle_timeout` had been called when the call was sent.
    timeouts_before: usize,
    ok_in_time: bool,
}

struct Sim<'w> {
    world: &'w World,
    dups: bool,
    base: Instant,
    now: Duration,
    set: SnapshotSet,
    events: BTreeMap<(Duration, u64), Ev>,
    seq: u64,
    log: Vec<(Duration, Obs)>,
    calls: Vec<CallRec>,
    next_call: usize,
    next_provider: usize,
    last_timeout: Option<Duration>,
    timeouts: usize,
    end_idx: Option<usize>,
    /// Each node's lease: until when it holds (from the last renewal it received); `None` once
    /// the driver ended it.
    lease_until: BTreeMap<String, Option<Duration>>,
    /// When a node's lease lapsed: from then on it has released its writers, remembers the
    /// set as lost and answers every call of it with that failure.
    lapsed: BTreeMap<String, Duration>,
}

struct Run {
    base: Instant,
    log: Vec<(Duration, Obs)>,
    /// Log entries before this index happened up to and including the end of the set.
    end_idx: usize,
    ended_at: Duration,
    calls: Vec<CallRec>,
    /// The record right when the set ended, and after everything in flight was delivered.
    record_at_end: SetRecord,
    record: SetRecord,
    /// When each node's lease lapsed, if it did.
    lapsed: BTreeMap<String, Duration>,
}

fn snap() -> SnapshotInfo {
    SnapshotInfo {
        id: "snap-1".into(),
        path: "/snapshots/snap-1".into(),
        provider: "sim".into(),
    }
}

impl Sim<'_> {
    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        let at = self.now + Duration::from_millis(delay);
        self.events.insert((at, self.seq), ev);
    }

    fn schedule_with_dup(&mut self, delay: u64, dup: Option<u64>, ev: Ev) {
        if let (Some(extra), true) = (dup, self.dups) {
            self.schedule(delay, ev.clone());
            self.schedule(delay + extra, ev);
        } else {
            self.schedule(delay, ev);
        }
    }

    fn ended(&self) -> bool {
        self.end_idx.is_some()
    }

    fn drain(&mut self) {
        while let Some(cmd) = self.set.poll_command() {
            self.log.push((self.now, Obs::Cmd(cmd.clone())));
            self.react(cmd);
        }
        if self.set.is_ended() && self.end_idx.is_none() {
            self.end_idx = Some(self.log.len());
        }
    }

    /// The world's answer to one command.
    fn react(&mut self, cmd: Command) {
        match cmd {
            Command::Call {
                writer,
                call,
                deadline,
            } => {
                let kind = call.kind();
                if kind == CallKind::Complete {
                    // A notification: its reply is not awaited. Send one anyway (ignored).
                    self.schedule(
                        1,
                        Ev::Reply {
                            writer,
                            kind,
                            result: Ok(Reports::new()),
                            call: None,
                        },
                    );
                    return;
                }
                let rec = self.calls.len();
                self.calls.push(CallRec {
                    writer: Some(writer.clone()),
                    op: None,
                    deadline: self.offset(deadline),
                    timeouts_before: self.timeouts,
                    ok_in_time: false,
                });
                if self.node_lapsed(&writer.node) {
                    // The node let its writers go when its lease lapsed: it says so for every
                    // call of the set, a thaw included, and never pretends to have held.
                    let failure = CallFailure::lost("the node's lease on the set lapsed");
                    self.schedule(
                        1,
                        Ev::Reply {
                            writer,
                            kind,
                            result: Err(failure),
                            call: Some(rec),
                        },
                    );
                    return;
                }
                let a = self.world.calls.get(self.next_call).copied();
                self.next_call += 1;
                let (answer, dup) = self.world.writer_answer(a);
                let reply = |result| Ev::Reply {
                    writer: writer.clone(),
                    kind,
                    result,
                    call: Some(rec),
                };
                match answer {
                    WriterAnswer::Ok(d) => {
                        let reports = Reports::from([(format!("{kind:?}"), format!("{d}ms"))]);
                        self.schedule_with_dup(d, dup, reply(Ok(reports)));
                    }
                    WriterAnswer::Err(d) => {
                        let err =
                            CallFailure::error(format!("{kind:?} refused by the simulated writer"));
                        self.schedule_with_dup(d, dup, reply(Err(err)));
                    }
                    WriterAnswer::Silent => {}
                    WriterAnswer::Lost(d) => {
                        self.schedule_with_dup(d, dup, Ev::Lost(writer.clone()));
                    }
                    WriterAnswer::OkThenLost(d, after) => {
                        self.schedule(d, reply(Ok(Reports::new())));
                        self.schedule(d + after, Ev::Lost(writer.clone()));
                    }
                }
            }
            Command::TakeSnapshot { deadline } => self.provider_op(Op::Take, deadline),
            Command::FinalizeSnapshot { snapshot, deadline } => {
                assert_eq!(snapshot, snap());
                self.provider_op(Op::Finalize, deadline)
            }
            Command::DeleteSnapshot { snapshot, deadline } => {
                assert_eq!(snapshot, snap());
                self.provider_op(Op::Delete, deadline)
            }
            Command::RenewLease { node, lease } => {
                if self.node_lapsed(&node) {
                    // A lapsed lease is never re-created by a late renewal.
                    return;
                }
                self.lease_until
                    .insert(node.clone(), Some(self.now + lease));
                let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                self.schedule(ms + 1, Ev::LeaseCheck(node));
            }
            Command::EndLease { node } => {
                if !self.node_lapsed(&node) {
                    self.lease_until.insert(node, None);
                }
            }
        }
    }

    /// Whether `node`'s lease has lapsed by now (noting when it did, and telling the driver).
    fn node_lapsed(&mut self, node: &str) -> bool {
        if self.lapsed.contains_key(node) {
            return true;
        }
        match self.lease_until.get(node) {
            Some(Some(until)) if *until < self.now => {
                self.lapsed.insert(node.to_string(), *until);
                self.schedule(0, Ev::NodeLost(node.to_string()));
                true
            }
            _ => false,
        }
    }

    fn provider_op(&mut self, op: Op, deadline: Instant) {
        let rec = self.calls.len();
        self.calls.push(CallRec {
            writer: None,
            op: Some(op),
            deadline: self.offset(deadline),
            timeouts_before: self.timeouts,
            ok_in_time: false,
        });
        let a = self.world.provider.get(self.next_provider).copied();
        self.next_provider += 1;
        let (answer, dup) = self.world.provider_answer(a);
        match answer {
            ProviderAnswer::Ok(d) => {
                self.schedule_with_dup(d, dup, Ev::Provider { op, ok: true, rec })
            }
            ProviderAnswer::Err(d) => {
                self.schedule_with_dup(d, dup, Ev::Provider { op, ok: false, rec })
            }
            ProviderAnswer::Silent => {}
        }
    }

    fn mark_answer(&mut self, rec: usize, ok: bool) {
        let CallRec {
            deadline,
            timeouts_before,
            ..
        } = self.calls[rec];
        // Timed out: `handle_timeout` ran at or past the deadline after the call was sent.
        let timed_out =
            self.timeouts > timeouts_before && self.last_timeout.is_some_and(|t| t >= deadline);
        if ok && !self.ended() && self.now <= deadline && !timed_out {
            self.calls[rec].ok_in_time = true;
        }
    }

    fn apply(&mut self, ev: Ev) {
        let now = self.instant();
        match ev {
            Ev::Reply {
                writer,
                kind,
                result,
                call,
            } => {
                let ok = result.is_ok();
                if let Some(rec) = call {
                    self.mark_answer(rec, ok);
                }
                self.log.push((
                    self.now,
                    Obs::Reply {
                        writer: writer.clone(),
                        kind,
                        ok,
                    },
                ));
                self.set.handle_reply(now, &writer, kind, result);
            }
            Ev::Lost(writer) => {
                self.log.push((self.now, Obs::Lost(writer.clone())));
                self.set
                    .handle_writer_lost(now, &writer, "the simulated node went away".into());
            }
            Ev::Provider { op, ok, rec } => {
                self.mark_answer(rec, ok);
                self.log.push((self.now, Obs::Provider { op, ok }));
                let err = || {
                    let op = match op {
                        Op::Take => ProviderOp::Take,
                        Op::Finalize => ProviderOp::Finalize,
                        Op::Delete => ProviderOp::Delete,
                    };
                    ProviderFailure::new(op, format!("{op} failed in the simulated provider"))
                };
                match op {
                    Op::Take => self
                        .set
                        .handle_snapshot_taken(now, if ok { Ok(snap()) } else { Err(err()) }),
                    Op::Finalize => self
                        .set
                        .handle_finalized(now, if ok { Ok(()) } else { Err(err()) }),
                    Op::Delete => self
                        .set
                        .handle_deleted(now, if ok { Ok(()) } else { Err(err()) }),
                }
            }
            Ev::Abort => {
                self.log.push((self.now, Obs::Abort));
                self.set.abort(now, "the requester gave up".into());
            }
            Ev::Epoch(epoch) => {
                self.log.push((
                    self.now,
                    Obs::Epoch {
                        changed: epoch != EPOCH,
                    },
                ));
                self.set.handle_epoch(now, epoch);
            }
            Ev::LeaseCheck(node) => {
                self.node_lapsed(&node);
            }
            Ev::NodeLost(node) => {
                self.log.push((self.now, Obs::NodeLost(node.clone())));
                self.set
                    .handle_node_lost(now, &node, "its lease on the set lapsed".into());
            }
            Ev::Poke => {
                // A spurious timeout, and inputs about a writer the set does not know.
                self.log.push((self.now, Obs::Timeout));
                self.fire_timeout();
                let stranger = WriterRef::new("n9", "stranger");
                self.set
                    .handle_reply(now, &stranger, CallKind::Freeze, Ok(Reports::new()));
                self.set.handle_writer_lost(now, &stranger, "gone".into());
            }
        }
    }

    fn fire_timeout(&mut self) {
        self.last_timeout = Some(self.now);
        self.timeouts += 1;
        self.set.handle_timeout(self.instant());
    }
}

/// Drives one world to the end of its set (and past it, delivering whatever is still in flight).
fn simulate(world: &World, base: Instant, dups: bool) -> Result<Run, TestCaseError> {
    let set = SnapshotSet::new(
        SetId("set-prop".into()),
        SetRequest {
            volumes: vec!["vol".into()],
            best_effort: world.best_effort,
        },
        EPOCH,
        world.writers(),
        world.deadlines(),
        base,
    );
    let mut sim = Sim {
        world,
        dups,
        base,
        now: Duration::ZERO,
        set,
        events: BTreeMap::new(),
        seq: 0,
        log: Vec::new(),
        calls: Vec::new(),
        next_call: 0,
        next_provider: 0,
        last_timeout: None,
        timeouts: 0,
        end_idx: None,
        lease_until: BTreeMap::new(),
        lapsed: BTreeMap::new(),
    };
    for &t in &world.aborts {
        sim.schedule(t.into(), Ev::Abort);
    }
    if let Some((t, changed)) = world.epoch_at {
        sim.schedule(t.into(), Ev::Epoch(if changed { EPOCH + 1 } else { EPOCH }));
    }
    for &t in &world.pokes {
        sim.schedule(t.into(), Ev::Poke);
    }
    sim.drain();

    let mut steps = 0;
    while !sim.set.is_ended() {
        steps += 1;
        prop_assert!(
            steps <= MAX_STEPS,
            "the set did not end within {MAX_STEPS} steps (phase {:?}, t = {:?})",
            sim.set.phase(),
            sim.now
        );
        prop_assert!(
            sim.now <= MAX_SIM_TIME,
            "the set is still running after {:?} of simulated time (phase {:?})",
            sim.now,
            sim.set.phase()
        );
        let timeout = sim.set.poll_timeout().map(|t| sim.offset(t));
        let next_event = sim.events.keys().next().map(|k| k.0);
        let next = match (timeout, next_event) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(TestCaseError::fail(format!(
                    "the set is stuck in {:?}: no deadline to wait for and nothing in flight",
                    sim.set.phase()
                )))
            }
        };
        // While the driver stalls, nothing reaches it and no timer fires: it next runs when
        // the stall ends, with everything that came due meanwhile.
        // Like the real driver, it then fires what came due before taking what waited.
        // Stalls may overlap or follow one another: the driver runs once it is in none.
        let resume = world.after_stalls(next);
        let stalled = resume > next;
        sim.now = sim.now.max(resume);
        let timeout_due = timeout.is_some_and(|t| t <= sim.now);
        let event_due = next_event.is_some_and(|t| t <= sim.now);
        if timeout_due && (world.timeouts_first || !event_due || stalled) {
            sim.log.push((sim.now, Obs::Timeout));
            sim.fire_timeout();
            sim.drain();
            // With no zero deadline, whatever `handle_timeout` starts lies in the future.
            let strict = world.deadlines.iter().all(|&d| d > 0);
            if strict && !sim.set.is_ended() {
                let again = sim.set.poll_timeout().map(|t| sim.offset(t));
                prop_assert!(
                    again.is_none_or(|t| t > sim.now),
                    "handle_timeout({:?}) left a deadline due: {again:?}",
                    sim.now
                );
            }
        } else {
            let (_, ev) = sim.events.pop_first().expect("an event is due");
            sim.apply(ev);
            sim.drain();
        }
    }
    let ended_at = sim.now;
    let record_at_end = sim.set.record();
    prop_assert!(record_at_end.is_some(), "an ended set has a record");

    // After the end: deliver whatever is still in flight (late and duplicated answers).
    while let Some(((at, _), ev)) = sim.events.pop_first() {
        steps += 1;
        prop_assert!(
            steps <= 2 * MAX_STEPS,
            "the world keeps talking after the end"
        );
        sim.now = sim.now.max(at);
        sim.apply(ev);
        sim.drain();
        prop_assert!(sim.set.poll_timeout().is_none(), "a deadline after the end");
    }

    let record = sim.set.record();
    prop_assert!(record.is_some(), "an ended set keeps its record");
    Ok(Run {
        base,
        log: sim.log,
        end_idx: sim.end_idx.expect("ended"),
        ended_at,
        calls: sim.calls,
        record_at_end: record_at_end.expect("checked"),
        record: record.expect("checked"),
        lapsed: sim.lapsed,
    })
}

// ---------------------------------------------------------------------------------------------
// The invariants
// ---------------------------------------------------------------------------------------------

/// What happened to one writer, by log index.
#[derive(Debug, Default)]
struct Seen {
    prepare: Vec<usize>,
    freeze: Vec<usize>,
    thaw: Vec<usize>,
    post: Vec<usize>,
    abort: Vec<usize>,
    complete: Vec<(usize, quiesce_proto::OutcomeKind)>,
    freeze_ok: Option<usize>,
    thaw_ok: Option<usize>,
    post_ok: Option<usize>,
    /// First `handle_writer_lost` before the end.
    lost: Option<usize>,
    /// Lost before the end, or a call not answered Ok in time.
    faulty: bool,
}

fn level_rank(l: Level) -> usize {
    Level::FREEZE_ORDER.iter().position(|&x| x == l).unwrap()
}

fn check(world: &World, run: &Run) -> Result<(), TestCaseError> {
    let d = world.deadlines();
    let writers = world.writers();
    let index: BTreeMap<WriterRef, usize> = writers
        .iter()
        .enumerate()
        .map(|(i, (w, _))| (w.clone(), i))
        .collect();
    let mut seen: Vec<Seen> = writers.iter().map(|_| Seen::default()).collect();
    let at = |i: usize| run.log[i].0;
    let end = run.end_idx;
    let record = &run.record;
    let outcome = &record.outcome;

    let mut take_cmd = Vec::new();
    let mut finalize_cmd = Vec::new();
    let mut delete_cmd = Vec::new();
    let mut take_ok = None;
    let mut finalize_ok = None;
    let mut first_post_cmd: Option<usize> = None;
    let mut aborted_before_end = false;
    let mut epoch_changed_before_end = false;
    let mut end_leases = Vec::new();
    let mut snapshot_taken = false;

    let mut renewals: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut first_freeze: Option<Duration> = None;
    for (i, (t, obs)) in run.log.iter().enumerate() {
        // Every deadline is the configured one, from the instant the command was polled; a
        // Freeze deadline never lies past the hold limit.
        let deadline = match obs {
            Obs::Cmd(
                Command::Call { deadline, .. }
                | Command::TakeSnapshot { deadline }
                | Command::FinalizeSnapshot { deadline, .. }
                | Command::DeleteSnapshot { deadline, .. },
            ) => Some(deadline.saturating_duration_since(run.base)),
            _ => None,
        };
        let want = match obs {
            Obs::Cmd(Command::Call { call, .. }) => match call {
                WriterCall::Prepare => Some(*t + d.prepare),
                WriterCall::Freeze => {
                    let first = *first_freeze.get_or_insert(*t);
                    Some((*t + d.freeze).min(first + d.hold_limit))
                }
                WriterCall::Thaw => Some(*t + d.thaw),
                WriterCall::PostSnapshot { .. } => Some(*t + d.post_snapshot),
                WriterCall::Abort => Some(*t + d.abort),
                WriterCall::Complete { .. } => None,
            },
            Obs::Cmd(
                Command::TakeSnapshot { .. }
                | Command::FinalizeSnapshot { .. }
                | Command::DeleteSnapshot { .. },
            ) => Some(*t + d.provider),
            _ => None,
        };
        if want.is_some() {
            prop_assert_eq!(deadline, want, "deadline of {:?} polled at {:?}", obs, t);
        }
        match obs {
            Obs::Cmd(Command::Call { writer, call, .. }) => {
                let s = &mut seen[index[writer]];
                prop_assert!(
                    i < end,
                    "a call after the end of the set: {call:?} to {writer}"
                );
                prop_assert!(
                    s.lost.is_none(),
                    "{call:?} sent to {writer} after it was reported lost"
                );
                match call {
                    WriterCall::Prepare => s.prepare.push(i),
                    WriterCall::Freeze => s.freeze.push(i),
                    WriterCall::Thaw => s.thaw.push(i),
                    WriterCall::PostSnapshot { snapshot } => {
                        prop_assert_eq!(snapshot, &snap());
                        s.post.push(i);
                        first_post_cmd.get_or_insert(i);
                    }
                    WriterCall::Abort => {
                        prop_assert!(
                            first_post_cmd.is_none(),
                            "Abort sent to {} after post-snapshot began",
                            writer
                        );
                        s.abort.push(i);
                    }
                    WriterCall::Complete { outcome } => s.complete.push((i, *outcome)),
                }
            }
            Obs::Cmd(Command::TakeSnapshot { .. }) => {
                prop_assert!(i < end, "TakeSnapshot after the end");
                take_cmd.push(i);
            }
            Obs::Cmd(Command::FinalizeSnapshot { .. }) => {
                prop_assert!(i < end, "FinalizeSnapshot after the end");
                finalize_cmd.push(i);
            }
            Obs::Cmd(Command::DeleteSnapshot { .. }) => delete_cmd.push(i),
            Obs::Cmd(Command::RenewLease { node, lease }) => {
                prop_assert!(i < end, "RenewLease for {node} after the end");
                prop_assert_eq!(*lease, d.lease);
                renewals.entry(node.clone()).or_default().push(*t);
            }
            Obs::Cmd(Command::EndLease { node }) => {
                prop_assert!(i < end, "EndLease for {node} after the end");
                end_leases.push(node.clone());
            }
            Obs::Reply { writer, kind, ok } => {
                let s = &mut seen[index[writer]];
                if *ok && i < end {
                    let slot = match kind {
                        CallKind::Freeze => &mut s.freeze_ok,
                        CallKind::Thaw => &mut s.thaw_ok,
                        CallKind::PostSnapshot => &mut s.post_ok,
                        _ => continue,
                    };
                    slot.get_or_insert(i);
                }
            }
            Obs::Lost(writer) => {
                if i < end {
                    seen[index[writer]].lost.get_or_insert(i);
                }
            }
            Obs::NodeLost(node) => {
                if i < end {
                    for (w, _) in writers.iter().filter(|(w, _)| &w.node == node) {
                        seen[index[w]].lost.get_or_insert(i);
                    }
                }
            }
            Obs::Provider { op, ok } => {
                if *op == Op::Take && *ok {
                    snapshot_taken = true;
                }
                if *ok && i < end {
                    match op {
                        Op::Take => {
                            take_ok.get_or_insert(i);
                        }
                        Op::Finalize => {
                            finalize_ok.get_or_insert(i);
                        }
                        Op::Delete => {}
                    }
                }
            }
            Obs::Abort => aborted_before_end |= i < end,
            Obs::Epoch { changed } => epoch_changed_before_end |= *changed && i < end,
            Obs::Timeout => {}
        }
    }

    let mut provider_fault = false;
    for c in &run.calls {
        if c.ok_in_time {
            continue;
        }
        match (&c.writer, c.op) {
            (Some(w), _) => seen[index[w]].faulty = true,
            (None, Some(Op::Take | Op::Finalize)) => provider_fault = true,
            (None, _) => {}
        }
    }
    for s in &mut seen {
        s.faulty |= s.lost.is_some();
    }
    let any_faulty = seen.iter().any(|s| s.faulty);

    // -- per writer: at most once; released within the hold limit; told the end ---------------
    for (w, s) in writers.iter().map(|x| &x.0).zip(&seen) {
        prop_assert!(
            s.prepare.len() <= 1,
            "{w}: Prepare sent {} times",
            s.prepare.len()
        );
        prop_assert!(
            s.freeze.len() <= 1,
            "{w}: Freeze sent {} times",
            s.freeze.len()
        );
        prop_assert!(s.thaw.len() <= 1, "{w}: Thaw sent {} times", s.thaw.len());
        prop_assert!(
            s.post.len() <= 1,
            "{w}: PostSnapshot sent {} times",
            s.post.len()
        );
        prop_assert!(
            s.abort.len() <= 1,
            "{w}: Abort sent {} times",
            s.abort.len()
        );
        prop_assert!(
            s.complete.len() <= 1,
            "{w}: Complete sent {} times",
            s.complete.len()
        );
        if let Some(&f) = s.freeze.first() {
            let release = s.thaw.iter().chain(&s.abort).min().copied();
            let until = match (release, s.lost) {
                (Some(r), Some(l)) => r.min(l),
                (Some(r), None) => r,
                (None, Some(l)) => l,
                (None, None) => {
                    return Err(TestCaseError::fail(format!(
                        "{w} was sent Freeze at {:?} and never Thaw or Abort",
                        at(f)
                    )))
                }
            };
            let held = at(until) - at(f);
            // A driver that stalls over the hold limit releases the writer when it runs again
            // (meanwhile the node's own watchdog and lease do).
            let allowed = world.after_stalls(at(f) + d.hold_limit) - at(f);
            prop_assert!(
                held <= allowed,
                "{w} held {held:?} (Freeze at {:?}), past the hold limit {:?}",
                at(f),
                d.hold_limit
            );
        }
        let touched = !(s.prepare.is_empty() && s.freeze.is_empty());
        if touched && s.lost.is_none() {
            prop_assert_eq!(s.complete.len(), 1, "{} is not told the end", w);
            let (i, told) = &s.complete[0];
            prop_assert_eq!(*told, outcome.kind(), "{} is told another outcome", w);
            prop_assert!(*i < end);
        }
    }

    // -- leases ---------------------------------------------------------------------------------
    let live_nodes: BTreeSet<String> = writers
        .iter()
        .zip(&seen)
        .filter(|(_, s)| s.lost.is_none())
        .map(|((w, _), _)| w.node.clone())
        .collect();
    let ended_nodes: BTreeSet<String> = end_leases.iter().cloned().collect();
    prop_assert_eq!(
        end_leases.len(),
        ended_nodes.len(),
        "EndLease twice for a node"
    );
    prop_assert!(
        live_nodes.is_subset(&ended_nodes),
        "nodes {live_nodes:?} not all released: {ended_nodes:?}"
    );

    // A node whose lease lapses thaws its writers on its own: while the set runs, every node
    // with a writer still there holds an unexpired lease, from the start to the end. (Leases
    // are renewed at most every millisecond: one under 3 ms cannot be kept.)
    for node in live_nodes
        .iter()
        .filter(|_| d.lease >= Duration::from_millis(3))
    {
        let times = renewals.get(node).cloned().unwrap_or_default();
        prop_assert_eq!(
            times.first().copied(),
            Some(Duration::ZERO),
            "{} leased late",
            node
        );
        let mut prev = Duration::ZERO;
        for &t in times.iter().skip(1).chain([&run.ended_at]) {
            prop_assert!(
                t - prev < d.lease || world.stalled_between(prev, t),
                "the lease of {node} lapsed between {prev:?} and {t:?}"
            );
            prev = t;
        }
    }

    // -- proof of hold ------------------------------------------------------------------------
    // A set that keeps its snapshot kept writers that were held from their freeze until the
    // snapshot was taken: no node it keeps a writer of had let its writers go (lease lapsed
    // during a stall of the driver, or anything else) before the provider answered.
    if !outcome.is_failed() {
        let taken = at(take_ok.expect("a kept snapshot was taken"));
        for r in &record.writers {
            if r.excluded || r.failure.is_some() {
                continue;
            }
            if let Some(&lapsed) = run.lapsed.get(&r.writer.node) {
                prop_assert!(
                    lapsed >= taken,
                    "{} kept although its node's lease lapsed at {lapsed:?}, before the snapshot was taken at {taken:?}: {outcome:?}",
                    r.writer
                );
            }
        }
    }

    // -- the record -------------------------------------------------------------------------------
    // Nothing delivered after the end changes it, except the note about a late snapshot.
    let late_snapshot = run.log[end..].iter().any(|(_, o)| {
        matches!(
            o,
            Obs::Provider {
                op: Op::Take,
                ok: true
            }
        )
    });
    let mut at_end = run.record_at_end.clone();
    if late_snapshot {
        at_end.cleanup_error = record.cleanup_error.clone();
    }
    prop_assert_eq!(&at_end, record, "the record changed after the end");
    prop_assert_eq!(record.writers.len(), writers.len());
    for ((w, m), r) in writers.iter().zip(&record.writers) {
        prop_assert_eq!(&r.writer, w);
        prop_assert_eq!(&r.metadata, m);
        prop_assert_eq!(
            r.failure.is_some(),
            r.state == WriterState::Failed,
            "{} failure {:?} in state {:?}",
            w,
            &r.failure,
            r.state
        );
        if let Some(f) = &r.failure {
            prop_assert!(!f.reason.trim().is_empty(), "{w} failed without a reason");
        }
        prop_assert!(
            !r.excluded || r.failure.is_some(),
            "{w} excluded without a failure"
        );
    }
    let mut last_start = 0;
    for p in &record.phases {
        prop_assert!(
            p.start_ms <= p.end_ms && p.end_ms <= record.total_ms,
            "{p:?}"
        );
        prop_assert!(
            p.start_ms >= last_start,
            "phases out of order: {:?}",
            record.phases
        );
        last_start = p.start_ms;
    }
    prop_assert_eq!(
        record.phases.first().map(|p| p.phase),
        Some(Phase::Identify)
    );
    prop_assert_eq!(record.phases.last().map(|p| p.phase), Some(Phase::Complete));
    prop_assert_eq!(record.epoch, EPOCH);

    // -- snapshots: kept or deleted, never both ---------------------------------------------------
    prop_assert!(take_cmd.len() <= 1, "TakeSnapshot sent twice");
    prop_assert!(finalize_cmd.len() <= 1, "FinalizeSnapshot sent twice");
    prop_assert!(
        delete_cmd.len() <= 1,
        "DeleteSnapshot sent {} times",
        delete_cmd.len()
    );
    let kept = !outcome.is_failed() && record.snapshot.is_some();
    if snapshot_taken {
        prop_assert!(
            kept == delete_cmd.is_empty(),
            "snapshot taken: kept = {kept}, deletions = {}",
            delete_cmd.len()
        );
    } else {
        prop_assert!(
            delete_cmd.is_empty(),
            "deleted a snapshot that was never taken"
        );
        prop_assert!(record.snapshot.is_none());
    }
    if !outcome.is_failed() {
        prop_assert_eq!(record.snapshot.as_ref(), Some(&snap()));
        prop_assert!(finalize_ok.is_some(), "kept a snapshot that is not final");
    }

    // -- freeze window (sanity) -------------------------------------------------------------------
    // The window ends at the last answer (or timeout) of a Thaw or Abort. Every writer is sent
    // Thaw or Abort by the hold limit; a Thaw may time out (its deadline) and be followed by an
    // Abort (its own deadline), whose answer then ends the window. So the bound is the hold
    // limit plus both deadlines: `hold_limit + thaw` alone is wrong (found by this test).
    // A stall of the driver adds its length.
    if let Some(window) = record.freeze_window_ms {
        let stalled: Duration = world.stalls().map(|(a, b)| b - a).sum();
        let bound = d.hold_limit + d.thaw + d.abort + stalled;
        prop_assert!(
            Duration::from_millis(window) <= bound,
            "freeze window {window} ms > {bound:?}"
        );
    }
    prop_assert_eq!(
        Duration::from_millis(record.total_ms),
        Duration::from_millis(run.ended_at.as_millis() as u64)
    );

    // -- the outcome ------------------------------------------------------------------------------
    if !world.best_effort {
        prop_assert!(
            record.writers.iter().all(|w| !w.excluded),
            "a writer excluded without best effort"
        );
    }
    if aborted_before_end || epoch_changed_before_end || provider_fault {
        prop_assert!(
            outcome.is_failed(),
            "abort {aborted_before_end}, epoch change {epoch_changed_before_end}, provider fault {provider_fault}, yet {outcome}"
        );
    }
    if any_faulty && !world.best_effort {
        prop_assert!(outcome.is_failed(), "a writer failed, yet {outcome}");
    }
    match outcome {
        Outcome::AppConsistent => {
            prop_assert!(!any_faulty, "app-consistent although a writer failed");
            for (((w, m), s), r) in writers.iter().zip(&seen).zip(&record.writers) {
                prop_assert_eq!(&r.writer, w);
                prop_assert!(r.failure.is_none() && !r.excluded, "{}: {:?}", w, r);
                let want = if m.needs_post_snapshot {
                    WriterState::Done
                } else {
                    WriterState::Thawed
                };
                prop_assert_eq!(r.state, want, "{} ends in {:?}", w, r.state);
                prop_assert!(
                    s.prepare.len() == 1 && s.freeze.len() == 1 && s.thaw.len() == 1,
                    "{w}: prepare/freeze/thaw not all sent"
                );
                prop_assert!(s.abort.is_empty(), "{w} aborted in an app-consistent set");
                prop_assert_eq!(s.post.len(), usize::from(m.needs_post_snapshot));
            }
            prop_assert!(delete_cmd.is_empty());
            prop_assert!(
                record.cleanup_error.is_none(),
                "cleanup error in an app-consistent set: {:?}",
                record.cleanup_error
            );
            let take = *take_cmd.first().expect("a snapshot was taken");
            let take_ok = take_ok.expect("a snapshot was taken");
            let thaws_ok = seen.iter().filter_map(|s| s.thaw_ok).max();
            let posts_ok = seen.iter().filter_map(|s| s.post_ok).max();
            let finalize = *finalize_cmd.first().expect("finalized");
            let hold_end = first_freeze.map(|f| f + d.hold_limit);
            for ((w, m), s) in writers.iter().zip(&seen) {
                let rank = level_rank(m.level);
                let freeze = s.freeze[0];
                let thaw = s.thaw[0];
                prop_assert!(
                    take > s.freeze_ok.expect("frozen"),
                    "snapshot before {w} froze"
                );
                prop_assert!(thaw > take_ok, "{w} thawed before the snapshot was taken");
                if let Some(&p) = s.post.first() {
                    prop_assert!(p > thaws_ok.unwrap(), "post-snapshot before every thaw");
                }
                for ((v, n), t) in writers.iter().zip(&seen) {
                    if level_rank(n.level) < rank {
                        prop_assert!(
                            freeze > t.freeze_ok.unwrap(),
                            "{w} ({}) sent Freeze before {v} ({}) was frozen",
                            m.level,
                            n.level
                        );
                    }
                    // Reverse order within a node (nodes do not wait for one another),
                    // unless the hold limit thawed everyone at once.
                    let forced = hold_end.is_some_and(|h| at(thaw) >= h);
                    if level_rank(n.level) > rank && !forced && v.node == w.node {
                        prop_assert!(
                            thaw > t.thaw_ok.unwrap(),
                            "{w} ({}) sent Thaw before {v} ({}) was thawed",
                            m.level,
                            n.level
                        );
                    }
                }
            }
            if let Some(p) = posts_ok {
                prop_assert!(finalize > p, "finalized before post-snapshot was done");
            }
            for s in &seen {
                if let Some((c, _)) = s.complete.first() {
                    prop_assert!(*c > finalize_ok.unwrap(), "Complete before finalize");
                }
            }
        }
        Outcome::CrashConsistent { excluded } => {
            prop_assert!(world.best_effort, "crash-consistent without best effort");
            prop_assert!(!excluded.is_empty(), "crash-consistent names nobody");
            let excluded: BTreeSet<&WriterRef> = excluded.iter().collect();
            let faulty: BTreeSet<&WriterRef> = writers
                .iter()
                .zip(&seen)
                .filter(|(_, s)| s.faulty)
                .map(|((w, _), _)| w)
                .collect();
            prop_assert_eq!(excluded, faulty, "left out = those that failed");
            prop_assert!(delete_cmd.is_empty());
        }
        Outcome::Failed {
            phase: _,
            writer,
            reason,
        } => {
            prop_assert!(!reason.trim().is_empty(), "a failure without a reason");
            prop_assert!(record.snapshot.is_none());
            if let Some(w) = writer {
                prop_assert!(index.contains_key(w), "failure names an unknown {w}");
                prop_assert!(
                    seen[index[w]].faulty,
                    "failure blames {w}, which did not fail"
                );
            }
            // Never a failure out of nowhere.
            let hold_reached =
                first_freeze.is_some_and(|f| take_ok.is_none_or(|t| at(t) >= f + d.hold_limit));
            prop_assert!(
                any_faulty
                    || provider_fault
                    || aborted_before_end
                    || epoch_changed_before_end
                    || hold_reached,
                "failed with no cause: {outcome}"
            );
        }
    }
    Ok(())
}

/// Commands (with the instant they were polled), the inputs being ignored.
fn commands(run: &Run) -> Vec<(Duration, Command)> {
    run.log
        .iter()
        .filter_map(|(t, o)| match o {
            Obs::Cmd(c) => Some((*t, c.clone())),
            _ => None,
        })
        .collect()
}

fn has_dups(world: &World) -> bool {
    world
        .calls
        .iter()
        .chain(&world.provider)
        .any(|a| a.dup.is_some())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every promise of the machine, in every world.
    #[test]
    fn the_machine_keeps_its_promises(world in world()) {
        let run = simulate(&world, Instant::now(), true)?;
        let checked = check(&world, &run);
        if checked.is_err() && std::env::var_os("QUIESCE_PROP_TRACE").is_some() {
            for (t, o) in &run.log {
                eprintln!("{t:?} {o:?}");
            }
        }
        checked?;
    }

    /// Answers delivered twice change nothing: the same commands at the same instants and the
    /// same record as in the world where each answer arrives once.
    #[test]
    fn duplicated_answers_change_nothing(world in world()) {
        prop_assume!(has_dups(&world));
        let base = Instant::now();
        let twice = simulate(&world, base, true)?;
        let once = simulate(&world, base, false)?;
        prop_assert_eq!(commands(&twice), commands(&once));
        prop_assert_eq!(&twice.record, &once.record);
    }

    /// Deadlines of a few milliseconds or none at all (a bad configuration): every call times
    /// out at once or nearly, and still every promise holds and every set ends.
    #[test]
    fn tiny_and_zero_deadlines_keep_the_promises(mut world in world(), tiny in prop::array::uniform8(0u16..6)) {
        world.deadlines = tiny;
        let run = simulate(&world, Instant::now(), true)?;
        let checked = check(&world, &run);
        if checked.is_err() && std::env::var_os("QUIESCE_PROP_TRACE").is_some() {
            for (t, o) in &run.log {
                eprintln!("{t:?} {o:?}");
            }
        }
        checked?;
    }

    /// Liveness: when every answer is quick and right and the hold limit leaves room for the
    /// freeze and the snapshot, the set ends app-consistent.
    #[test]
    fn a_calm_world_gets_an_app_consistent_snapshot(mut world in world()) {
        world.fault_pct = 0;
        world.aborts.clear();
        world.epoch_at = None;
        world.stalls.clear();
        // Four levels (front-end, back-end, system, volume) of at most 7 ms each and 7 ms
        // for the provider: 35 ms from the first freeze to the snapshot.
        world.deadlines[6] = world.deadlines[6].max(36);
        let run = simulate(&world, Instant::now(), true)?;
        check(&world, &run)?;
        prop_assert_eq!(&run.record.outcome, &Outcome::AppConsistent);
    }
}

/// The generated worlds really reach every corner the invariants talk about (a property test
/// that never sees a hold limit or a late snapshot proves little).
#[test]
fn the_generated_worlds_cover_every_path() {
    let mut runner = TestRunner::deterministic();
    let strategy = world();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..2048 {
        let world = strategy.new_tree(&mut runner).unwrap().current();
        let run = simulate(&world, Instant::now(), true).unwrap();
        let mut count = |k: &str| *counts.entry(k.to_string()).or_default() += 1;
        match &run.record.outcome {
            Outcome::AppConsistent => count("app-consistent"),
            Outcome::CrashConsistent { .. } => count("crash-consistent"),
            Outcome::Failed { phase, reason, .. } => {
                count(&format!("failed in {phase}"));
                if reason.contains("hold limit") {
                    count("failed: hold limit");
                }
                if reason.contains("membership") {
                    count("failed: epoch");
                }
                if reason.contains("requester") {
                    count("failed: requester abort");
                }
            }
        }
        let cmds = commands(&run);
        if cmds
            .iter()
            .any(|(_, c)| matches!(c, Command::DeleteSnapshot { .. }))
        {
            count("snapshot deleted");
        }
        if run.log[run.end_idx..]
            .iter()
            .any(|(_, o)| matches!(o, Obs::Cmd(Command::DeleteSnapshot { .. })))
        {
            count("late snapshot deleted after the end");
        }
        if run.log.iter().any(|(_, o)| matches!(o, Obs::Lost(_))) {
            count("writer lost");
        }
        if run.record.outcome == Outcome::AppConsistent {
            let hold = world.deadlines().hold_limit;
            let first = cmds.iter().find_map(|(t, c)| match c {
                Command::Call {
                    call: WriterCall::Freeze,
                    ..
                } => Some(*t),
                _ => None,
            });
            if cmds.iter().any(|(t, c)| {
                matches!(
                    c,
                    Command::Call {
                        call: WriterCall::Thaw,
                        ..
                    }
                ) && first.is_some_and(|f| *t >= f + hold)
            }) {
                count("hold limit forced an early thaw");
            }
        }
        if run.record.cleanup_error.is_some() {
            count("cleanup error");
        }
    }
    eprintln!("{counts:#?}");
    for key in [
        "app-consistent",
        "crash-consistent",
        "failed in prepare",
        "failed in freeze",
        "failed in snapshot",
        "failed in thaw",
        "failed in post-snapshot",
        "failed in finalize",
        "failed: hold limit",
        "failed: epoch",
        "failed: requester abort",
        "snapshot deleted",
        "late snapshot deleted after the end",
        "writer lost",
        "hold limit forced an early thaw",
    ] {
        let n = counts.get(key).copied().unwrap_or(0);
        assert!(n >= 3, "only {n} generated runs reach {key:?}: {counts:#?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic scenarios
// ---------------------------------------------------------------------------------------------

fn meta(id: &str, level: Level, post: bool) -> WriterMetadata {
    WriterMetadata {
        id: id.into(),
        name: format!("writer {id}"),
        instance: String::new(),
        vendor_version: String::new(),
        level,
        components: vec![],
        expected_freeze_ms: 0,
        needs_post_snapshot: post,
    }
}

fn describe(cmd: &Command) -> String {
    match cmd {
        Command::Call { writer, call, .. } => {
            let who = format!("{}/{}", writer.node, writer.writer);
            match call {
                WriterCall::Prepare => format!("prepare {who}"),
                WriterCall::Freeze => format!("freeze {who}"),
                WriterCall::Thaw => format!("thaw {who}"),
                WriterCall::PostSnapshot { snapshot } => {
                    format!("post-snapshot {who} {}", snapshot.path)
                }
                WriterCall::Abort => format!("abort {who}"),
                WriterCall::Complete { outcome } => format!("complete {who} {}", outcome),
            }
        }
        Command::TakeSnapshot { .. } => "take-snapshot".into(),
        Command::FinalizeSnapshot { snapshot, .. } => format!("finalize {}", snapshot.id),
        Command::DeleteSnapshot { snapshot, .. } => format!("delete {}", snapshot.id),
        Command::RenewLease { node, .. } => format!("renew-lease {node}"),
        Command::EndLease { node } => format!("end-lease {node}"),
    }
}

/// A hand-driven set: three writers on two nodes, listed out of level order on purpose.
struct Scenario {
    set: SnapshotSet,
    base: Instant,
    app: WriterRef,
    db: WriterRef,
    fs: WriterRef,
    /// Every command polled so far, with the instant it was polled at.
    log: Vec<(u64, Command)>,
}

impl Scenario {
    fn new(best_effort: bool, deadlines: Deadlines) -> (Scenario, Vec<String>) {
        let base = Instant::now();
        let app = WriterRef::new("n1", "app");
        let db = WriterRef::new("n2", "db");
        let fs = WriterRef::new("n1", "fs");
        let writers = vec![
            (fs.clone(), meta("fs", Level::System, false)),
            (db.clone(), meta("db", Level::BackEnd, true)),
            (app.clone(), meta("app", Level::FrontEnd, false)),
        ];
        let set = SnapshotSet::new(
            SetId("set-1".into()),
            SetRequest {
                volumes: vec!["shared".into()],
                best_effort,
            },
            EPOCH,
            writers,
            deadlines,
            base,
        );
        let mut s = Scenario {
            set,
            base,
            app,
            db,
            fs,
            log: Vec::new(),
        };
        let first = s.cmds(0);
        (s, first)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn cmds(&mut self, ms: u64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(c) = self.set.poll_command() {
            out.push(describe(&c));
            self.log.push((ms, c));
        }
        out
    }

    fn ok(&mut self, ms: u64, w: &WriterRef, kind: CallKind) -> Vec<String> {
        self.reply(ms, w, kind, Ok(Reports::new()))
    }

    fn reply(
        &mut self,
        ms: u64,
        w: &WriterRef,
        kind: CallKind,
        result: Result<Reports, CallFailure>,
    ) -> Vec<String> {
        let w = w.clone();
        self.set.handle_reply(self.at(ms), &w, kind, result);
        self.cmds(ms)
    }

    fn taken(&mut self, ms: u64, result: Result<SnapshotInfo, ProviderFailure>) -> Vec<String> {
        self.set.handle_snapshot_taken(self.at(ms), result);
        self.cmds(ms)
    }

    fn finalized(&mut self, ms: u64) -> Vec<String> {
        self.set.handle_finalized(self.at(ms), Ok(()));
        self.cmds(ms)
    }

    fn deleted(&mut self, ms: u64) -> Vec<String> {
        self.set.handle_deleted(self.at(ms), Ok(()));
        self.cmds(ms)
    }

    fn timeout(&mut self, ms: u64) -> Vec<String> {
        self.set.handle_timeout(self.at(ms));
        self.cmds(ms)
    }

    fn timeout_ms(&self) -> Option<u64> {
        self.set
            .poll_timeout()
            .map(|t| t.duration_since(self.base).as_millis() as u64)
    }

    /// Prepares all three writers (at 1..3 ms).
    fn prepare_all(&mut self) -> Vec<String> {
        let (app, db, fs) = (self.app.clone(), self.db.clone(), self.fs.clone());
        assert_eq!(self.ok(1, &fs, CallKind::Prepare), Vec::<String>::new());
        assert_eq!(self.ok(2, &app, CallKind::Prepare), Vec::<String>::new());
        self.ok(3, &db, CallKind::Prepare)
    }

    /// Prepares and freezes all three writers (freezes at 3, 4, 5 ms; snapshot asked at 6 ms).
    fn freeze_all(&mut self) {
        let (app, db, fs) = (self.app.clone(), self.db.clone(), self.fs.clone());
        assert_eq!(self.prepare_all(), ["freeze n1/app"]);
        assert_eq!(self.ok(4, &app, CallKind::Freeze), ["freeze n2/db"]);
        assert_eq!(self.ok(5, &db, CallKind::Freeze), ["freeze n1/fs"]);
        assert_eq!(self.ok(6, &fs, CallKind::Freeze), ["take-snapshot"]);
    }

    fn record(&self) -> SetRecord {
        assert!(self.set.is_ended());
        self.set.record().expect("ended")
    }
}

fn failed(phase: Phase, writer: Option<&WriterRef>, reason: &str) -> Outcome {
    Outcome::Failed {
        phase,
        writer: writer.cloned(),
        reason: reason.into(),
    }
}

#[test]
fn happy_path_runs_every_step_in_order() {
    let (mut s, first) = Scenario::new(false, Deadlines::default());
    assert_eq!(
        first,
        [
            "renew-lease n1",
            "renew-lease n2",
            "prepare n1/fs",
            "prepare n2/db",
            "prepare n1/app"
        ]
    );
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    assert_eq!(s.prepare_all(), ["freeze n1/app"]);
    assert_eq!(s.ok(4, &app, CallKind::Freeze), ["freeze n2/db"]);
    let lsn = Reports::from([("wal_flush_lsn".to_string(), "0/3000148".to_string())]);
    assert_eq!(
        s.reply(5, &db, CallKind::Freeze, Ok(lsn.clone())),
        ["freeze n1/fs"]
    );
    assert_eq!(s.ok(6, &fs, CallKind::Freeze), ["take-snapshot"]);
    // Each node thaws on its own, in reverse level order: n1's system writer first, then its
    // front end; n2's back end at once, without waiting for n1.
    assert_eq!(s.taken(20, Ok(snap())), ["thaw n1/fs", "thaw n2/db"]);
    assert_eq!(s.ok(21, &fs, CallKind::Thaw), ["thaw n1/app"]);
    assert_eq!(s.ok(22, &db, CallKind::Thaw), Vec::<String>::new());
    assert_eq!(
        s.ok(23, &app, CallKind::Thaw),
        ["post-snapshot n2/db /snapshots/snap-1"]
    );
    assert_eq!(s.ok(30, &db, CallKind::PostSnapshot), ["finalize snap-1"]);
    assert_eq!(
        s.finalized(31),
        [
            "complete n1/fs app-consistent",
            "complete n2/db app-consistent",
            "complete n1/app app-consistent",
            "end-lease n1",
            "end-lease n2"
        ]
    );
    assert!(s.set.poll_timeout().is_none());
    let r = s.record();
    assert_eq!(r.outcome, Outcome::AppConsistent);
    assert_eq!(r.snapshot, Some(snap()));
    assert_eq!(r.epoch, EPOCH);
    let states: Vec<WriterState> = r.writers.iter().map(|w| w.state).collect();
    assert_eq!(
        states,
        [WriterState::Thawed, WriterState::Done, WriterState::Thawed]
    );
    assert_eq!(r.writers[1].reports, lsn);
    assert_eq!(r.freeze_window_ms, Some(23 - 3));
    assert_eq!(r.provider_ms, Some(20 - 6));
    assert_eq!(r.total_ms, 31);
    assert_eq!(r.cleanup_error, None);
    let phases: Vec<Phase> = r.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Identify,
            Phase::Prepare,
            Phase::Freeze,
            Phase::Snapshot,
            Phase::Thaw,
            Phase::PostSnapshot,
            Phase::Finalize,
            Phase::Complete
        ]
    );
    // Deadlines are the ones configured, from the instant of the call.
    let d = Deadlines::default();
    for (ms, c) in &s.log {
        let sent = s.at(*ms);
        match c {
            Command::Call {
                call: WriterCall::Prepare,
                deadline,
                ..
            } => assert_eq!(*deadline, sent + d.prepare),
            Command::Call {
                call: WriterCall::Thaw,
                deadline,
                ..
            } => assert_eq!(*deadline, sent + d.thaw),
            Command::TakeSnapshot { deadline } => assert_eq!(*deadline, sent + d.provider),
            _ => {}
        }
    }
}

#[test]
fn a_failed_freeze_aborts_every_writer_and_deletes_nothing() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    assert_eq!(s.prepare_all(), ["freeze n1/app"]);
    assert_eq!(s.ok(4, &app, CallKind::Freeze), ["freeze n2/db"]);
    let err = Err(CallFailure::error("CHECKPOINT failed: disk full"));
    assert_eq!(
        s.reply(5, &db, CallKind::Freeze, err),
        ["abort n1/fs", "abort n2/db", "abort n1/app"]
    );
    assert_eq!(s.ok(6, &app, CallKind::Abort), Vec::<String>::new());
    assert_eq!(s.ok(7, &fs, CallKind::Abort), Vec::<String>::new());
    // A late freeze reply is ignored.
    assert_eq!(s.ok(8, &db, CallKind::Freeze), Vec::<String>::new());
    assert_eq!(
        s.ok(9, &db, CallKind::Abort),
        [
            "complete n1/fs failed",
            "complete n2/db failed",
            "complete n1/app failed",
            "end-lease n1",
            "end-lease n2"
        ]
    );
    let r = s.record();
    assert_eq!(
        r.outcome,
        failed(Phase::Freeze, Some(&db), "CHECKPOINT failed: disk full")
    );
    assert_eq!(r.snapshot, None);
    assert!(s.log.iter().all(|(_, c)| !matches!(
        c,
        Command::TakeSnapshot { .. } | Command::DeleteSnapshot { .. }
    )));
    let db_result = &r.writers[1];
    assert_eq!(db_result.state, WriterState::Failed);
    let failure = db_result.failure.as_ref().unwrap();
    assert_eq!(failure.phase, Phase::Freeze);
    assert_eq!(failure.kind, FailureKind::Error);
    assert_eq!(r.writers[2].state, WriterState::Aborted);
}

#[test]
fn a_provider_failure_aborts_every_writer() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    assert_eq!(
        s.taken(
            10,
            Err(ProviderFailure::new(
                ProviderOp::Take,
                "btrfs: no space left"
            ))
        ),
        ["abort n1/fs", "abort n2/db", "abort n1/app"]
    );
    s.ok(11, &fs, CallKind::Abort);
    s.ok(12, &db, CallKind::Abort);
    assert_eq!(
        s.ok(13, &app, CallKind::Abort),
        [
            "complete n1/fs failed",
            "complete n2/db failed",
            "complete n1/app failed",
            "end-lease n1",
            "end-lease n2"
        ]
    );
    let r = s.record();
    assert_eq!(
        r.outcome,
        failed(Phase::Snapshot, None, "btrfs: no space left")
    );
    assert_eq!(r.freeze_window_ms, Some(13 - 3));
    assert!(!s
        .log
        .iter()
        .any(|(_, c)| matches!(c, Command::DeleteSnapshot { .. })));
}

#[test]
fn the_hold_limit_aborts_everyone_on_time_and_the_late_snapshot_is_deleted() {
    let deadlines = Deadlines {
        hold_limit: Duration::from_millis(100),
        freeze: Duration::from_secs(1),
        provider: Duration::from_secs(10),
        ..Deadlines::default()
    };
    let (mut s, _) = Scenario::new(false, deadlines);
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    // The first freeze went out at 3 ms: every writer must be released by 103 ms.
    assert_eq!(s.timeout_ms(), Some(103));
    assert_eq!(s.timeout(102), Vec::<String>::new());
    assert_eq!(
        s.timeout(103),
        ["abort n1/fs", "abort n2/db", "abort n1/app"]
    );
    for (ms, c) in &s.log {
        if let Command::Call {
            call: WriterCall::Abort,
            deadline,
            ..
        } = c
        {
            assert_eq!(*ms, 103);
            assert_eq!(*deadline, s.at(103) + deadlines.abort);
        }
    }
    s.ok(104, &fs, CallKind::Abort);
    s.ok(105, &db, CallKind::Abort);
    // Everyone is released; the set still waits for the provider.
    assert_eq!(s.ok(106, &app, CallKind::Abort), Vec::<String>::new());
    assert!(!s.set.is_ended());
    assert_eq!(s.taken(500, Ok(snap())), ["delete snap-1"]);
    assert_eq!(
        s.deleted(510),
        [
            "complete n1/fs failed",
            "complete n2/db failed",
            "complete n1/app failed",
            "end-lease n1",
            "end-lease n2"
        ]
    );
    let r = s.record();
    match &r.outcome {
        Outcome::Failed {
            phase: Phase::Snapshot,
            writer: None,
            reason,
        } => assert!(reason.contains("hold limit of 100 ms"), "{reason}"),
        other => panic!("{other}"),
    }
    assert_eq!(r.snapshot, None);
    assert_eq!(r.freeze_window_ms, Some(106 - 3));
}

#[test]
fn a_snapshot_that_arrives_after_the_end_is_deleted() {
    let deadlines = Deadlines {
        provider: Duration::from_millis(50),
        ..Deadlines::default()
    };
    let (mut s, _) = Scenario::new(false, deadlines);
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    assert_eq!(
        s.timeout(56),
        ["abort n1/fs", "abort n2/db", "abort n1/app"]
    );
    s.ok(57, &fs, CallKind::Abort);
    s.ok(57, &db, CallKind::Abort);
    s.ok(57, &app, CallKind::Abort);
    assert!(s.set.is_ended());
    assert_eq!(s.taken(80, Ok(snap())), ["delete snap-1"]);
    // The same answer again deletes nothing more.
    assert_eq!(s.taken(81, Ok(snap())), Vec::<String>::new());
    let r = s.record();
    assert!(r.cleanup_error.unwrap().contains("snap-1"));
}

#[test]
fn the_hold_limit_after_the_snapshot_thaws_every_level_at_once() {
    let deadlines = Deadlines {
        hold_limit: Duration::from_millis(100),
        ..Deadlines::default()
    };
    let (mut s, _) = Scenario::new(false, deadlines);
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    assert_eq!(s.taken(90, Ok(snap())), ["thaw n1/fs", "thaw n2/db"]);
    // fs is slow to thaw; at 103 ms app, on the same node, may wait no longer.
    assert_eq!(s.timeout(103), ["thaw n1/app"]);
    assert_eq!(s.ok(104, &app, CallKind::Thaw), Vec::<String>::new());
    assert_eq!(s.ok(105, &db, CallKind::Thaw), Vec::<String>::new());
    assert_eq!(
        s.ok(106, &fs, CallKind::Thaw),
        ["post-snapshot n2/db /snapshots/snap-1"]
    );
    assert_eq!(s.ok(107, &db, CallKind::PostSnapshot), ["finalize snap-1"]);
    s.finalized(108);
    assert_eq!(s.record().outcome, Outcome::AppConsistent);
}

#[test]
fn best_effort_leaves_out_a_writer_that_fails_prepare() {
    let (mut s, _) = Scenario::new(true, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    let err = Err(CallFailure::error("cannot connect to the database"));
    assert_eq!(s.reply(1, &db, CallKind::Prepare, err), ["abort n2/db"]);
    assert_eq!(s.ok(2, &fs, CallKind::Prepare), Vec::<String>::new());
    assert_eq!(s.ok(3, &app, CallKind::Prepare), ["freeze n1/app"]);
    assert_eq!(s.ok(4, &db, CallKind::Abort), Vec::<String>::new());
    // No back-end writer is left: the system level follows at once.
    assert_eq!(s.ok(5, &app, CallKind::Freeze), ["freeze n1/fs"]);
    assert_eq!(s.ok(6, &fs, CallKind::Freeze), ["take-snapshot"]);
    assert_eq!(s.taken(7, Ok(snap())), ["thaw n1/fs"]);
    assert_eq!(s.ok(8, &fs, CallKind::Thaw), ["thaw n1/app"]);
    // db needed post-snapshot work, but it is left out.
    assert_eq!(s.ok(9, &app, CallKind::Thaw), ["finalize snap-1"]);
    assert_eq!(
        s.finalized(10),
        [
            "complete n1/fs crash-consistent",
            "complete n2/db crash-consistent",
            "complete n1/app crash-consistent",
            "end-lease n1",
            "end-lease n2"
        ]
    );
    let r = s.record();
    assert_eq!(
        r.outcome,
        Outcome::CrashConsistent {
            excluded: vec![db.clone()]
        }
    );
    assert_eq!(r.snapshot, Some(snap()));
    assert!(r.writers[1].excluded);
    assert_eq!(r.writers[1].failure.as_ref().unwrap().phase, Phase::Prepare);
    assert!(!r.writers[0].excluded && !r.writers[2].excluded);
    assert!(r.outcome.to_string().contains("writer db on node n2"));
}

#[test]
fn a_post_snapshot_failure_deletes_the_snapshot_without_abort() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    s.taken(10, Ok(snap()));
    s.ok(11, &fs, CallKind::Thaw);
    s.ok(12, &db, CallKind::Thaw);
    assert_eq!(
        s.ok(13, &app, CallKind::Thaw),
        ["post-snapshot n2/db /snapshots/snap-1"]
    );
    let err = Err(CallFailure::error("cannot write backup_label"));
    assert_eq!(
        s.reply(14, &db, CallKind::PostSnapshot, err),
        ["delete snap-1"]
    );
    assert_eq!(
        s.deleted(15),
        [
            "complete n1/fs failed",
            "complete n2/db failed",
            "complete n1/app failed",
            "end-lease n1",
            "end-lease n2"
        ]
    );
    let r = s.record();
    assert_eq!(
        r.outcome,
        failed(Phase::PostSnapshot, Some(&db), "cannot write backup_label")
    );
    assert_eq!(r.snapshot, None);
    assert!(!s.log.iter().any(|(_, c)| matches!(
        c,
        Command::Call {
            call: WriterCall::Abort,
            ..
        }
    )));
}

#[test]
fn an_answer_after_the_end_changes_nothing() {
    // Best effort: db is left out in freeze and its abort is still out when the set ends.
    let (mut s, _) = Scenario::new(true, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    assert_eq!(s.prepare_all(), ["freeze n1/app"]);
    assert_eq!(s.ok(4, &app, CallKind::Freeze), ["freeze n2/db"]);
    assert_eq!(
        s.reply(5, &db, CallKind::Freeze, Err(CallFailure::error("no"))),
        ["abort n2/db", "freeze n1/fs"]
    );
    assert_eq!(s.ok(6, &fs, CallKind::Freeze), ["take-snapshot"]);
    s.taken(7, Ok(snap()));
    s.ok(8, &fs, CallKind::Thaw);
    assert_eq!(s.ok(9, &app, CallKind::Thaw), ["finalize snap-1"]);
    s.finalized(10);
    let at_end = s.record();
    assert_eq!(
        at_end.outcome,
        Outcome::CrashConsistent {
            excluded: vec![db.clone()]
        }
    );
    // Long after its deadline, and after the end, db answers its abort; more inputs follow.
    let late = Reports::from([("late".to_string(), "yes".to_string())]);
    assert_eq!(
        s.reply(60_000, &db, CallKind::Abort, Ok(late)),
        Vec::<String>::new()
    );
    s.set.handle_writer_lost(s.at(60_001), &app, "gone".into());
    s.set.abort(s.at(60_002), "too late".into());
    s.set.handle_epoch(s.at(60_003), EPOCH + 1);
    s.set.handle_timeout(s.at(60_004));
    assert_eq!(s.cmds(60_004), Vec::<String>::new());
    assert_eq!(s.record(), at_end);
    assert_eq!(at_end.freeze_window_ms, Some(9 - 3));
}

#[test]
fn a_membership_change_fails_the_set() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    assert_eq!(s.prepare_all(), ["freeze n1/app"]);
    assert_eq!(s.ok(4, &app, CallKind::Freeze), ["freeze n2/db"]);
    // The same epoch announced again changes nothing.
    s.set.handle_epoch(s.at(5), EPOCH);
    assert_eq!(s.cmds(5), Vec::<String>::new());
    s.set.handle_epoch(s.at(6), EPOCH + 1);
    assert_eq!(s.cmds(6), ["abort n1/fs", "abort n2/db", "abort n1/app"]);
    s.ok(7, &fs, CallKind::Abort);
    s.ok(8, &db, CallKind::Abort);
    let last = s.ok(9, &app, CallKind::Abort);
    assert_eq!(last.last().map(String::as_str), Some("end-lease n2"));
    let r = s.record();
    match &r.outcome {
        Outcome::Failed {
            phase: Phase::Freeze,
            writer: None,
            reason,
        } => assert!(reason.contains("epoch 7 -> 8"), "{reason}"),
        other => panic!("{other}"),
    }
    assert!(!s
        .log
        .iter()
        .any(|(_, c)| matches!(c, Command::TakeSnapshot { .. })));
}

#[test]
fn a_lost_writer_fails_the_set_and_is_not_called_again() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    s.set
        .handle_writer_lost(s.at(7), &db, "node n2 unreachable".into());
    assert_eq!(s.cmds(7), ["abort n1/fs", "abort n1/app"]);
    s.ok(8, &fs, CallKind::Abort);
    s.ok(9, &app, CallKind::Abort);
    assert_eq!(s.taken(10, Ok(snap())), ["delete snap-1"]);
    assert_eq!(
        s.deleted(11),
        [
            "complete n1/fs failed",
            "complete n1/app failed",
            "end-lease n1"
        ]
    );
    let r = s.record();
    assert_eq!(
        r.outcome,
        failed(Phase::Freeze, Some(&db), "lost: node n2 unreachable")
    );
}

#[test]
fn a_requester_abort_during_finalize_fails_the_set_and_deletes_the_snapshot() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    s.taken(10, Ok(snap()));
    s.ok(11, &fs, CallKind::Thaw);
    s.ok(12, &db, CallKind::Thaw);
    s.ok(13, &app, CallKind::Thaw);
    assert_eq!(s.ok(14, &db, CallKind::PostSnapshot), ["finalize snap-1"]);
    s.set.abort(s.at(15), "the backup was cancelled".into());
    // Post-snapshot began: no Abort to anyone; the provider is still finalizing.
    assert_eq!(s.cmds(15), Vec::<String>::new());
    assert_eq!(s.finalized(16), ["delete snap-1"]);
    s.deleted(17);
    let r = s.record();
    assert_eq!(
        r.outcome,
        failed(Phase::Finalize, None, "the backup was cancelled")
    );
    assert_eq!(r.snapshot, None);
}

#[test]
fn a_repeated_provider_answer_after_the_end_deletes_nothing() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    s.taken(10, Ok(snap()));
    // The same answer delivered twice while thawing changes nothing.
    assert_eq!(s.taken(10, Ok(snap())), Vec::<String>::new());
    s.ok(11, &fs, CallKind::Thaw);
    s.ok(12, &db, CallKind::Thaw);
    s.ok(13, &app, CallKind::Thaw);
    s.ok(14, &db, CallKind::PostSnapshot);
    s.finalized(15);
    assert_eq!(s.taken(16, Ok(snap())), Vec::<String>::new());
    assert_eq!(s.finalized(17), Vec::<String>::new());
    let r = s.record();
    assert_eq!(r.outcome, Outcome::AppConsistent);
    assert_eq!(r.snapshot, Some(snap()));
    assert_eq!(r.cleanup_error, None);
}

#[test]
fn an_empty_set_still_takes_the_snapshot() {
    let base = Instant::now();
    let mut set = SnapshotSet::new(
        SetId("set-empty".into()),
        SetRequest {
            volumes: vec!["shared".into()],
            best_effort: false,
        },
        EPOCH,
        vec![],
        Deadlines::default(),
        base,
    );
    let take = set.poll_command();
    assert!(
        matches!(take, Some(Command::TakeSnapshot { .. })),
        "{take:?}"
    );
    set.handle_snapshot_taken(base, Ok(snap()));
    assert!(matches!(
        set.poll_command(),
        Some(Command::FinalizeSnapshot { .. })
    ));
    set.handle_finalized(base, Ok(()));
    assert_eq!(set.poll_command(), None);
    let r = set.record().unwrap();
    assert_eq!(r.outcome, Outcome::AppConsistent);
    assert_eq!(r.freeze_window_ms, None);
}

// ---------------------------------------------------------------------------------------------
// Proof of hold
// ---------------------------------------------------------------------------------------------

fn lease_of(ms: u64) -> Deadlines {
    Deadlines {
        lease: Duration::from_millis(ms),
        ..Deadlines::default()
    }
}

/// The driver stalled (the broker SIGSTOPped, or starved of CPU) for longer than the lease
/// while every writer was frozen: its nodes may have let their writers go. Even when every
/// node then answers as if nothing happened (a node of an older release, or one whose lapse
/// notice was lost), the set fails and its snapshot is deleted.
#[test]
fn a_stall_of_the_driver_longer_than_the_lease_fails_the_set_whatever_the_nodes_answer() {
    let (mut s, _) = Scenario::new(false, lease_of(300));
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    // The last renewal went out at 200 ms (every 100 ms); nothing runs until 700 ms, when the
    // provider's answer is taken.
    s.timeout(100);
    s.timeout(200);
    let after = s.taken(700, Ok(snap()));
    assert!(after.contains(&"abort n2/db".to_string()), "{after:?}");
    for w in [&app, &db, &fs] {
        s.ok(701, w, CallKind::Abort);
    }
    assert_eq!(s.cmds(701), Vec::<String>::new());
    let deleted = s.deleted(702);
    assert!(deleted.contains(&"end-lease n1".to_string()), "{deleted:?}");
    let r = s.record();
    match &r.outcome {
        Outcome::Failed { reason, .. } => {
            assert!(reason.contains("not renewed for 500 ms"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.snapshot, None);
    assert!(s
        .log
        .iter()
        .any(|(_, c)| matches!(c, Command::DeleteSnapshot { .. })));
}

/// The same stall a little shorter than the lease changes nothing: the nodes held.
#[test]
fn a_stall_shorter_than_the_lease_changes_nothing() {
    let (mut s, _) = Scenario::new(false, lease_of(300));
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    s.timeout(100);
    assert_eq!(s.taken(390, Ok(snap())), ["thaw n1/fs", "thaw n2/db"]);
    s.ok(391, &fs, CallKind::Thaw);
    s.ok(391, &db, CallKind::Thaw);
    s.ok(392, &app, CallKind::Thaw);
    s.ok(393, &db, CallKind::PostSnapshot);
    s.finalized(394);
    assert_eq!(s.record().outcome, Outcome::AppConsistent);
}

/// A node whose lease lapsed released its writers and answers the late thaw with "lost": the
/// set fails naming it, and the snapshot (taken after the writers were let go) is deleted.
#[test]
fn a_thaw_answered_lost_by_a_node_whose_lease_lapsed_fails_the_set() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    let (app, db, fs) = (s.app.clone(), s.db.clone(), s.fs.clone());
    s.freeze_all();
    s.taken(20, Ok(snap()));
    s.ok(21, &fs, CallKind::Thaw);
    let lost = Err(CallFailure::lost(
        "node n2: the lease on set set-1 lapsed at 15 ms: its writers were released before this thaw",
    ));
    let after = s.reply(22, &db, CallKind::Thaw, lost);
    assert!(after.contains(&"abort n1/app".to_string()), "{after:?}");
    s.ok(23, &app, CallKind::Thaw);
    for w in [&app, &db, &fs] {
        s.ok(24, w, CallKind::Abort);
    }
    s.deleted(25);
    let r = s.record();
    assert_eq!(
        r.outcome,
        failed(
            Phase::Thaw,
            Some(&db),
            "lost: node n2: the lease on set set-1 lapsed at 15 ms: its writers were released before this thaw"
        )
    );
    assert_eq!(r.snapshot, None);
    let db_result = r.writers.iter().find(|w| w.writer == db).unwrap();
    assert_eq!(db_result.failure.as_ref().unwrap().kind, FailureKind::Lost);
}

/// A node reports its lease lapsed: all its writers are lost at once, none of them is called
/// again, and everyone else is aborted.
#[test]
fn a_node_lost_loses_all_its_writers_and_aborts_the_others() {
    let (mut s, _) = Scenario::new(false, Deadlines::default());
    s.freeze_all();
    s.set
        .handle_node_lost(s.at(10), "n1", "its lease on the set lapsed".into());
    assert_eq!(s.cmds(10), ["abort n2/db"]);
    let r = s.set.record_if_abandoned(s.at(10), String::new());
    for w in r.writers.iter().filter(|w| w.writer.node == "n1") {
        assert_eq!(w.failure.as_ref().unwrap().kind, FailureKind::Lost);
    }
}

/// With the freeze deadline as long as the hold limit (the old defaults), a writer that never
/// answers freeze is still named: the hold limit releases everyone and blames it.
#[test]
fn a_freeze_that_never_answers_is_named_whatever_the_deadlines() {
    let deadlines = Deadlines {
        freeze: Duration::from_millis(100),
        hold_limit: Duration::from_millis(100),
        ..Deadlines::default()
    };
    let (mut s, _) = Scenario::new(false, deadlines);
    let (app, db) = (s.app.clone(), s.db.clone());
    assert_eq!(s.prepare_all(), ["freeze n1/app"]);
    assert_eq!(s.ok(4, &app, CallKind::Freeze), ["freeze n2/db"]);
    // db never answers; the hold limit (100 ms after the first freeze, at 3 ms) comes with its
    // freeze deadline, and fires first.
    let at_limit = s.timeout(103);
    assert!(
        at_limit.contains(&"abort n2/db".to_string()),
        "{at_limit:?}"
    );
    for w in [&app, &db, &s.fs.clone()] {
        s.ok(104, w, CallKind::Abort);
    }
    let r = s.record();
    match &r.outcome {
        Outcome::Failed { writer, reason, .. } => {
            assert_eq!(writer.as_ref(), Some(&db), "{reason}");
            assert!(reason.contains("no answer to freeze"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let db_result = r.writers.iter().find(|w| w.writer == db).unwrap();
    let failure = db_result.failure.as_ref().unwrap();
    assert_eq!(
        (failure.phase, failure.kind),
        (Phase::Freeze, FailureKind::TimedOut)
    );
}

/// Overlapping stalls of the driver: it runs again only when it is in none. (The simulation
/// once woke it at the end of the first stall that held the next instant, inside another one,
/// so the world with a duplicated answer — woken from a different instant — acted 1 ms later
/// than the world without, and `duplicated_answers_change_nothing` failed on its own model.)
#[test]
fn overlapping_stalls_end_when_the_last_one_ends() {
    let a = |roll, delay, dup| Answer { roll, delay, dup };
    let w = |_| WriterSpec {
        node: 0,
        level: Level::FrontEnd,
        post: false,
    };
    let world = World {
        writers: vec![w(0), w(1), w(2)],
        best_effort: false,
        deadlines: [103, 10, 10, 10, 10, 49, 56, 159],
        fault_pct: 11,
        calls: vec![
            a(8, 0, None),
            a(8, 102, Some(26)),
            a(8, 0, None),
            a(11, 39, None),
            a(11, 0, None),
            a(11, 0, None),
        ],
        provider: vec![a(0, 49, None)],
        aborts: vec![],
        epoch_at: None,
        timeouts_first: false,
        pokes: vec![],
        stalls: vec![(129, 30), (110, 50)],
    };
    let base = Instant::now();
    let twice = simulate(&world, base, true).unwrap();
    let once = simulate(&world, base, false).unwrap();
    assert_eq!(commands(&twice), commands(&once));
    // Nothing runs inside [110 ms, 160 ms): the hold limit (due at 158 ms) fires at 160 ms.
    assert!(commands(&once)
        .iter()
        .all(|(t, _)| *t < Duration::from_millis(110) || *t >= Duration::from_millis(160)));
}
