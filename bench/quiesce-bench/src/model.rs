//! `quiesce-bench model`: what a set of 10,000 or 100,000 nodes would take, predicted.
//!
//! The real `quiesce_proto::SnapshotSet` is driven in virtual time (a discrete-event
//! simulation: no clock is read but once for an origin, nothing is sent), with:
//!
//! - **the network**: each node's round trip drawn once from a log-normal distribution (p50 and
//!   p99 given) and one node, in the middle of the broker's order, a straggler at a fixed round
//!   trip; a call's command reaches its node half a round trip after it leaves the broker, its
//!   answer the broker the other half after the writer is done;
//! - **the writers**: each call's time on its writer drawn from another log-normal (p50, p99);
//!   a node's writers work in parallel (a worker thread each, as the host's);
//! - **the broker**: one core, busy `cpu_us_per_call / 2` for each command or lease message it
//!   sends and the same for each answer it reads, one after the other (the measured whole-set
//!   CPU per writer call, split evenly between sending and reading); an answer that arrives
//!   while the broker is busy waits.
//! - **the provider**: answers `provider_ms` after it is asked; the snapshot's finalizing costs
//!   nothing.
//!
//! Everything is deterministic for a seed. The window is counted as the record counts it: from
//! the first freeze leaving the broker to the last thaw (or abort) answer read. Beside the prediction it
//! runs the same set twice more, without the broker's CPU and without the straggler, so the
//! table says where the window goes.

use crate::scale;
use quiesce_proto::{
    CallKind, Command, Deadlines, Outcome, Reports, SetId, SetRequest, SnapshotInfo, SnapshotSet,
    WriterMetadata, WriterRef,
};
use serde::Serialize;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// What the model takes for given; printed next to its numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Assumptions {
    pub rtt_p50_ms: f64,
    pub rtt_p99_ms: f64,
    /// One node's round trip, whatever the distribution says.
    pub straggler_rtt_ms: f64,
    pub call_p50_ms: f64,
    pub call_p99_ms: f64,
    pub cpu_us_per_call: f64,
    /// Where `cpu_us_per_call` comes from.
    pub cpu_source: String,
    pub provider_ms: f64,
    pub writers_per_node: usize,
    pub seed: u64,
}

impl Assumptions {
    pub fn issue_19(cpu_us_per_call: f64, cpu_source: String) -> Assumptions {
        Assumptions {
            rtt_p50_ms: 0.5,
            rtt_p99_ms: 5.0,
            straggler_rtt_ms: 200.0,
            call_p50_ms: 0.5,
            call_p99_ms: 5.0,
            cpu_us_per_call,
            cpu_source,
            provider_ms: 0.0,
            writers_per_node: 8,
            seed: 19,
        }
    }
}

/// One size's prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub nodes: usize,
    pub writers: usize,
    /// `app-consistent`, `failed`, ... and, for a failed set, why.
    pub outcome: String,
    pub outcome_detail: String,
    pub window_ms: f64,
    /// The window minus the provider's time.
    pub coordination_ms: f64,
    /// The broker's CPU inside the window, and over the whole set.
    pub broker_cpu_in_window_ms: f64,
    pub broker_cpu_per_set_ms: f64,
    pub total_ms: f64,
    /// The same set with a broker that costs nothing: the network and the writers alone.
    pub window_without_broker_cpu_ms: f64,
    /// The same set without the straggler (its node at the distribution's draw).
    pub window_without_straggler_ms: f64,
    pub slowest_rtt_ms: f64,
    /// Issue 19's target: the slowest node's round trip + 100 ms.
    pub target_ms: f64,
    pub met: bool,
}

/// Draws from a log-normal distribution with the given median and 99th percentile.
struct LogNormal {
    mu: f64,
    sigma: f64,
}

impl LogNormal {
    fn new(p50: f64, p99: f64) -> LogNormal {
        // The standard normal's 99th percentile.
        const Z99: f64 = 2.326_347_874;
        LogNormal {
            mu: p50.ln(),
            sigma: (p99 / p50).ln() / Z99,
        }
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> f64 {
        // Box-Muller: two uniforms, one standard normal.
        let (u1, u2) = (1.0 - rng.f64(), rng.f64());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (self.mu + self.sigma * z).exp()
    }
}

/// Something that happens at a virtual instant (nanoseconds from the origin); `seq` orders
/// what happens at the same instant as it was scheduled.
#[derive(Debug, PartialEq, Eq)]
struct Event {
    at: u64,
    seq: u64,
    what: What,
}

#[derive(Debug, PartialEq, Eq)]
enum What {
    Answer(WriterRef, CallKind),
    Taken,
    Finalized,
    Deleted,
}

impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The earliest first out of a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Run {
    outcome: Outcome,
    window_ns: u64,
    cpu_in_window_ns: u64,
    cpu_ns: u64,
    total_ns: u64,
}

fn ns(ms: f64) -> u64 {
    (ms * 1e6).round() as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The node index of a writer of the model (`n{i}`).
fn node_index(writer: &WriterRef) -> usize {
    writer.node[1..]
        .parse()
        .expect("the model names its nodes n0, n1, ...")
}

/// One set over `nodes` nodes.
fn simulate(nodes: usize, a: &Assumptions, cpu_us_per_call: f64, straggler: bool) -> Run {
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let rtt_dist = LogNormal::new(a.rtt_p50_ms, a.rtt_p99_ms);
    let call_dist = LogNormal::new(a.call_p50_ms, a.call_p99_ms);
    let mut rtt: Vec<u64> = (0..nodes).map(|_| ns(rtt_dist.draw(&mut rng))).collect();
    if straggler && nodes > 0 {
        rtt[nodes / 2] = ns(a.straggler_rtt_ms);
    }
    let writers: Vec<(WriterRef, WriterMetadata)> = (0..nodes)
        .flat_map(|n| {
            (0..a.writers_per_node).map(move |i| {
                (
                    WriterRef::new(format!("n{n}"), format!("mem{i}")),
                    scale::metadata(i, "bench"),
                )
            })
        })
        .collect();
    // The origin of virtual time: the one clock reading, so that the machine gets `Instant`s.
    let origin = Instant::now();
    let at = |t: u64| origin + Duration::from_nanos(t);
    let half = ns(cpu_us_per_call / 2000.0);
    let request = SetRequest {
        volumes: vec!["bench".into()],
        best_effort: false,
    };
    let mut set = SnapshotSet::new(
        SetId("model".into()),
        request,
        1,
        writers,
        Deadlines::default(),
        at(0),
    );
    let mut events = BinaryHeap::new();
    let mut seq = 0u64;
    let mut schedule = |events: &mut BinaryHeap<Event>, at: u64, what: What| {
        seq += 1;
        events.push(Event { at, seq, what });
    };
    let (mut now, mut busy_until, mut cpu) = (0u64, 0u64, 0u64);
    let mut first_freeze: Option<(u64, u64)> = None;
    let mut last_release: Option<(u64, u64)> = None;
    loop {
        while let Some(command) = set.poll_command() {
            // Every message the broker sends to a node costs it, one after the other.
            if matches!(
                command,
                Command::Call { .. } | Command::RenewLease { .. } | Command::EndLease { .. }
            ) {
                busy_until = busy_until.max(now) + half;
                cpu += half;
            }
            match command {
                Command::Call { writer, call, .. } => {
                    let kind = call.kind();
                    if kind == CallKind::Freeze && first_freeze.is_none() {
                        first_freeze = Some((busy_until, cpu));
                    }
                    if kind != CallKind::Complete {
                        let answered =
                            busy_until + rtt[node_index(&writer)] + ns(call_dist.draw(&mut rng));
                        schedule(&mut events, answered, What::Answer(writer, kind));
                    }
                }
                Command::TakeSnapshot { .. } => {
                    schedule(&mut events, busy_until + ns(a.provider_ms), What::Taken)
                }
                Command::FinalizeSnapshot { .. } => {
                    schedule(&mut events, busy_until, What::Finalized)
                }
                Command::DeleteSnapshot { .. } => schedule(&mut events, busy_until, What::Deleted),
                Command::RenewLease { .. } | Command::EndLease { .. } => {}
            }
        }
        if set.is_ended() {
            break;
        }
        let timeout = set.poll_timeout();
        let next = events.peek().map(|e| e.at);
        match (timeout, next) {
            (Some(t), n) if n.is_none_or(|n| at(n) > t) => {
                now = now.max(t.saturating_duration_since(origin).as_nanos() as u64);
                set.handle_timeout(at(now));
                continue;
            }
            (_, None) => break,
            _ => {}
        }
        let event = events.pop().expect("peeked");
        now = event.at.max(busy_until);
        match event.what {
            What::Answer(writer, kind) => {
                // Reading an answer costs the broker too.
                now += half;
                cpu += half;
                busy_until = now;
                set.handle_reply(at(now), &writer, kind, Ok(Reports::new()));
                // The window ends, as the record's, at the last writer thawed or aborted.
                if matches!(kind, CallKind::Thaw | CallKind::Abort) && first_freeze.is_some() {
                    last_release = Some((now, cpu));
                }
            }
            What::Taken => set.handle_snapshot_taken(
                at(now),
                Ok(SnapshotInfo {
                    id: "model".into(),
                    path: "/model".into(),
                    provider: "model".into(),
                }),
            ),
            What::Finalized => set.handle_finalized(at(now), Ok(())),
            What::Deleted => set.handle_deleted(at(now), Ok(())),
        }
    }
    let record = set.record().expect("an ended set has a record");
    let (window_ns, cpu_in_window_ns) = match (first_freeze, last_release) {
        (Some((t0, c0)), Some((t1, c1))) => (t1.saturating_sub(t0), c1.saturating_sub(c0)),
        _ => (0, 0),
    };
    Run {
        outcome: record.outcome,
        window_ns,
        cpu_in_window_ns,
        cpu_ns: cpu,
        total_ns: now,
    }
}

/// The prediction for `nodes` nodes, with the two counterfactual runs.
pub fn predict(nodes: usize, a: &Assumptions) -> Prediction {
    let full = simulate(nodes, a, a.cpu_us_per_call, true);
    let free = simulate(nodes, a, 0.0, true);
    let even = simulate(nodes, a, a.cpu_us_per_call, false);
    let target_ms = a.straggler_rtt_ms + 100.0;
    let window_ms = ms(full.window_ns);
    Prediction {
        nodes,
        writers: nodes * a.writers_per_node,
        met: !full.outcome.is_failed() && window_ms <= target_ms,
        outcome: full.outcome.label().to_string(),
        outcome_detail: full.outcome.to_string(),
        window_ms,
        coordination_ms: window_ms - a.provider_ms,
        broker_cpu_in_window_ms: ms(full.cpu_in_window_ns),
        broker_cpu_per_set_ms: ms(full.cpu_ns),
        total_ms: ms(full.total_ns),
        window_without_broker_cpu_ms: ms(free.window_ns),
        window_without_straggler_ms: ms(even.window_ns),
        slowest_rtt_ms: a.straggler_rtt_ms,
        target_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assumptions(cpu: f64) -> Assumptions {
        Assumptions::issue_19(cpu, "test".into())
    }

    #[test]
    fn the_same_seed_predicts_the_same_window() {
        let a = assumptions(10.0);
        let (x, y) = (predict(50, &a), predict(50, &a));
        assert_eq!(x.window_ms, y.window_ms);
        assert_eq!(x.broker_cpu_per_set_ms, y.broker_cpu_per_set_ms);
        assert!(x.outcome == "app-consistent", "{}", x.outcome);
    }

    #[test]
    fn a_free_broker_and_equal_nodes_leave_the_round_trips_of_the_levels() {
        // Every node at exactly 1 ms, every call instant: three freeze levels one after the
        // other, then each node's three thaws one after the other: six round trips.
        let a = Assumptions {
            rtt_p50_ms: 1.0,
            rtt_p99_ms: 1.0 + 1e-12,
            straggler_rtt_ms: 1.0,
            call_p50_ms: 1e-9,
            call_p99_ms: 2e-9,
            ..assumptions(0.0)
        };
        let p = predict(20, &a);
        assert!((p.window_ms - 6.0).abs() < 0.01, "{p:?}");
    }

    #[test]
    fn the_broker_cpu_counts_once_per_message_sent_and_read() {
        // 10 nodes x 8 writers: prepare, freeze, thaw answered and complete sent: 7 halves of
        // a call each, and a lease grant and end per node.
        let p = predict(10, &assumptions(2.0));
        let expected_ms = (80.0 * 7.0 + 20.0) * 1.0 / 1000.0;
        assert!(
            (p.broker_cpu_per_set_ms - expected_ms).abs() < 1e-6,
            "{p:?}"
        );
    }
}
