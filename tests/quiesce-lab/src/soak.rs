//! Cycles of faults and backups, and the summary.
//!
//! One **cycle** is:
//!
//! 1. a **fault set**: `quiesce snapshot create` on a node while one fault is injected in the
//!    middle of the set, at a phase chosen at random (prepare, freeze, thaw or post-snapshot).
//!    The set is held at that phase by the node's `probe` writer (told through its control file
//!    to hang there), the fault is injected, the probe is let go. Faults: `kill -9` of a host;
//!    `kill -9` of the broker and its restart; a node's link cut (`ip link set … down`) and
//!    restored; a writer that hangs (the probe itself, past its deadline); a plugin that panics
//!    (the probe, in that call); the app writer exiting; and two stalls that outlast the lease
//!    but not the hold limit, the faults that once made a set lie: the broker paused (SIGSTOP,
//!    then SIGCONT) and a node gone silent (every packet in and out of it dropped, its link up).
//!    Then the cluster is brought back (the
//!    host restarted, the link restored, the app writer started again) and checked: the set
//!    failed, naming the node and the writer the fault concerns (the broker's restart records
//!    "the broker stopped during the set"); it kept no snapshot and no partial snapshot is left
//!    on the volume; every application writes again, and none went longer without an
//!    acknowledged write than the hold limit + 1 s (from its own ack log). After a stall the set
//!    may also end app-consistent (a stall in prepare, or after every writer was released, breaks
//!    no hold); then its snapshot is copied off the volume and verified as a backup is;
//! 2. a **backup**: `examples/restic-backup.sh` on node2, as written. The set must be
//!    app-consistent with every writer of the cluster; the backup is restored from restic and
//!    verified (`verify`): no acknowledged write lost, no record past the freeze point its
//!    writer reported; the snapshot was released.

use crate::acks::{unix_ns, Gap};
use crate::lab::{wait_probe_call, App, Lab, Settings, VolumeKind, APP_NODE, NODES, PG_NODE};
use crate::verify::freeze_points;
use quiesce_proto::{CallKind, Outcome, Phase, SetRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

/// The faults, each injected in the middle of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    HostKill,
    BrokerKill,
    LinkCut,
    WriterHang,
    PluginPanic,
    AppWriterExit,
    BrokerPause,
    NodeSilent,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::HostKill,
        Fault::BrokerKill,
        Fault::LinkCut,
        Fault::WriterHang,
        Fault::PluginPanic,
        Fault::AppWriterExit,
        Fault::BrokerPause,
        Fault::NodeSilent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::HostKill => "host kill -9",
            Fault::BrokerKill => "broker kill -9 + restart",
            Fault::LinkCut => "link cut + restored",
            Fault::WriterHang => "writer hangs",
            Fault::PluginPanic => "plugin panics",
            Fault::AppWriterExit => "app writer exits",
            Fault::BrokerPause => "broker paused",
            Fault::NodeSilent => "node silent",
        }
    }

    /// A stall: the set may outlive it, and may then even be app-consistent (verified).
    pub fn is_stall(self) -> bool {
        matches!(self, Fault::BrokerPause | Fault::NodeSilent)
    }
}

/// The writer calls during which a fault is injected (the probe writer holds the set there).
pub const HELD_CALLS: [CallKind; 4] = [
    CallKind::Prepare,
    CallKind::Freeze,
    CallKind::Thaw,
    CallKind::PostSnapshot,
];

/// One fault: what, on which node, during which call.
#[derive(Debug, Clone, Copy)]
pub struct Injection {
    pub fault: Fault,
    pub node: usize,
    pub call: CallKind,
    /// The node whose probe writer holds the set at `call` while the fault is injected: `node`,
    /// except for a cut of node1's link, which cuts the broker (in node1's namespace) off from
    /// node2 and node3 — the set is held on one of those, so that it waits for the cut side.
    pub held: usize,
}

impl fmt::Display for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fault {
            // The broker runs in node1's namespace; the node is where the set was held.
            Fault::BrokerKill | Fault::BrokerPause => write!(
                f,
                "{} during {} (held on {})",
                self.fault.name(),
                self.call.phase(),
                NODES[self.held]
            ),
            _ if self.held != self.node => write!(
                f,
                "{} on {} during {} (held on {})",
                self.fault.name(),
                NODES[self.node],
                self.call.phase(),
                NODES[self.held]
            ),
            _ => write!(
                f,
                "{} on {} during {}",
                self.fault.name(),
                NODES[self.node],
                self.call.phase()
            ),
        }
    }
}

/// splitmix64: a seeded, reproducible choice of nodes and phases.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The plan: every fault once in each round (of `Fault::ALL.len()`), in a random order, each on a random node
/// (the app writer's exit: on node3, where it runs) during a random call.
pub fn plan(cycles: usize, seed: u64) -> Vec<Injection> {
    let mut rng = Rng::new(seed);
    let mut plan = Vec::with_capacity(cycles);
    while plan.len() < cycles {
        let mut round = Fault::ALL.to_vec();
        for i in (1..round.len()).rev() {
            round.swap(i, rng.below(i + 1));
        }
        for fault in round {
            let node = match fault {
                Fault::AppWriterExit => APP_NODE,
                _ => rng.below(NODES.len()),
            };
            let call = HELD_CALLS[rng.below(HELD_CALLS.len())];
            let held = match (fault, node) {
                (Fault::LinkCut | Fault::NodeSilent, PG_NODE) => 1 + rng.below(2),
                _ => node,
            };
            plan.push(Injection {
                fault,
                node,
                call,
                held,
            });
        }
    }
    plan.truncate(cycles);
    plan
}

/// The longest freeze seen: an application's longest time without an acknowledged write
/// during a set.
#[derive(Debug, Clone, Default)]
pub struct Freeze {
    pub ms: u64,
    pub app: String,
    pub during: String,
}

/// What a soak found.
#[derive(Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub cycles_planned: usize,
    pub cycles_done: usize,
    /// Sets by outcome: `app-consistent`, `failed (fault injected)`, `failed (unexpected)`, …
    pub outcomes: BTreeMap<String, u64>,
    /// Faults injected, by fault and call.
    pub faults: BTreeMap<Fault, BTreeMap<CallKind, u64>>,
    pub restores: u64,
    /// Snapshots of sets that outlived a stall app-consistent, copied and verified.
    pub copies_verified: u64,
    /// Acknowledged records found in restores, by application (summed over restores).
    pub records_verified: BTreeMap<String, u64>,
    pub records_lost: u64,
    /// Records in a copy past the freeze point their writer reported (must be 0).
    pub records_past_freeze: u64,
    pub longest_freeze: Freeze,
    /// The limit the lab holds every application to: the hold limit + 1 s.
    pub frozen_limit_ms: u64,
    pub frozen_beyond_limit: u64,
    pub partial_snapshots_left: u64,
    /// The longest freeze window a successful set recorded (first freeze sent to last release).
    pub longest_freeze_window_ms: u64,
    /// On CephFS: the longest a node's storage took to answer again after its link came back
    /// (left out of its applications' gaps, with the cut itself).
    pub storage_back: Duration,
    pub violations: Vec<String>,
    pub elapsed: Duration,
    /// Why the soak stopped before its end, if it did.
    pub stopped: Option<String>,
}

impl Summary {
    fn violation(&mut self, cycle: usize, what: String) {
        eprintln!("quiesce-lab: cycle {cycle}: VIOLATION: {what}");
        self.violations.push(format!("cycle {cycle}: {what}"));
    }

    fn outcome(&mut self, what: &str) {
        *self.outcomes.entry(what.into()).or_default() += 1;
    }

    /// Everything a run must show: ran to its end, nothing lost, nobody frozen too long, no
    /// snapshot left behind, no violation.
    pub fn is_clean(&self) -> bool {
        self.stopped.is_none()
            && self.cycles_done == self.cycles_planned
            && self.records_lost == 0
            && self.records_past_freeze == 0
            && self.frozen_beyond_limit == 0
            && self.partial_snapshots_left == 0
            && self.violations.is_empty()
    }

    pub fn records_verified_total(&self) -> u64 {
        self.records_verified.values().sum()
    }

    pub fn faults_total(&self) -> u64 {
        self.faults.values().flat_map(|m| m.values()).sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs();
        writeln!(
            f,
            "quiesce-lab soak: {} of {} cycles, seed {}, {}m{:02}s{}",
            self.cycles_done,
            self.cycles_planned,
            self.seed,
            secs / 60,
            secs % 60,
            if self.is_clean() {
                ""
            } else {
                " — NOT CLEAN"
            }
        )?;
        let sets: u64 = self.outcomes.values().sum();
        let by: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "  sets:                  {sets} ({})", by.join(", "))?;
        writeln!(f, "  faults injected:       {}", self.faults_total())?;
        for (fault, calls) in &self.faults {
            let by: Vec<String> = calls
                .iter()
                .map(|(c, n)| format!("{} {n}", c.phase()))
                .collect();
            writeln!(
                f,
                "    {:<26} {} ({})",
                fault.name(),
                calls.values().sum::<u64>(),
                by.join(", ")
            )?;
        }
        writeln!(
            f,
            "  restores verified:     {} (from restic); {} snapshot copies of sets app-consistent after a stall",
            self.restores, self.copies_verified
        )?;
        let by: Vec<String> = self
            .records_verified
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            f,
            "  records verified:      {} ({})",
            self.records_verified_total(),
            by.join(", ")
        )?;
        writeln!(f, "  records lost:          {}", self.records_lost)?;
        writeln!(
            f,
            "  past freeze point:     {} (records in a copy written after their writer's reported freeze)",
            self.records_past_freeze
        )?;
        writeln!(
            f,
            "  longest freeze seen:   {} ms ({}, {}); limit {} ms (hold limit + 1 s)",
            self.longest_freeze.ms,
            self.longest_freeze.app,
            self.longest_freeze.during,
            self.frozen_limit_ms
        )?;
        writeln!(f, "  frozen beyond limit:   {}", self.frozen_beyond_limit)?;
        writeln!(
            f,
            "  longest freeze window: {} ms (of a successful set, as the broker recorded it)",
            self.longest_freeze_window_ms
        )?;
        writeln!(
            f,
            "  partial snapshots left: {}",
            self.partial_snapshots_left
        )?;
        if !self.storage_back.is_zero() {
            writeln!(
                f,
                "  storage back after a cut: {} ms at most (after its link came back, or its packets flowed again)",
                self.storage_back.as_millis()
            )?;
        }
        writeln!(f, "  violations:            {}", self.violations.len())?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "    {v}")?;
        }
        if let Some(why) = &self.stopped {
            writeln!(f, "  stopped early:         {why}")?;
        }
        Ok(())
    }
}

/// Runs `cycles` cycles (see the module docs) on a new lab; `progress` gets one line per
/// cycle. When `stop()` turns true, the soak ends after the cycle under way (the summary says
/// so) and the lab is taken down as usual.
pub fn soak(
    settings: Settings,
    cycles: usize,
    seed: u64,
    mut progress: impl FnMut(&str),
    stop: impl Fn() -> bool,
) -> Summary {
    let started = Instant::now();
    let mut summary = Summary {
        seed,
        cycles_planned: cycles,
        frozen_limit_ms: settings.frozen_limit_ms(),
        ..Summary::default()
    };
    let plan = plan(cycles, seed);
    progress(&format!(
        "quiesce-lab: starting the cluster (seed {seed}, {cycles} cycles)"
    ));
    let lab = std::panic::catch_unwind(|| Lab::start(settings));
    let mut lab = match lab {
        Ok(lab) => lab,
        Err(e) => {
            summary.stopped = Some(format!("the lab did not start: {}", panic_text(&e)));
            summary.elapsed = started.elapsed();
            return summary;
        }
    };
    progress(&format!(
        "quiesce-lab: cluster up in {:.1} s (lab directory {})",
        started.elapsed().as_secs_f64(),
        lab.dir.path().display()
    ));
    for (i, injection) in plan.into_iter().enumerate() {
        let cycle = i + 1;
        if stop() {
            summary.stopped = Some(format!("asked to stop before cycle {cycle}"));
            break;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let t = Instant::now();
            let fault = lab.fault_set(cycle, injection, &mut summary);
            let backup = lab.backup(cycle, &mut summary);
            progress(&format!(
                "cycle {cycle}/{cycles} ({:.1} s): {injection}: {fault}; {backup}",
                t.elapsed().as_secs_f64()
            ));
        }));
        if let Err(e) = result {
            summary.stopped = Some(format!("cycle {cycle}: {}", panic_text(&e)));
            break;
        }
        summary.cycles_done = cycle;
    }
    summary.elapsed = started.elapsed();
    summary
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// A failed set's phase, writer (node, writer) and reason.
type Failure = (Phase, Option<(String, String)>, String);

fn failure(record: &SetRecord) -> Option<Failure> {
    match &record.outcome {
        Outcome::Failed {
            phase,
            writer,
            reason,
        } => Some((
            *phase,
            writer.as_ref().map(|w| (w.node.clone(), w.writer.clone())),
            reason.clone(),
        )),
        _ => None,
    }
}

impl Lab {
    /// Part 1 of a cycle: a set with `injection`; the cluster brought back and checked.
    /// Returns a line for the progress report.
    pub fn fault_set(&mut self, cycle: usize, injection: Injection, s: &mut Summary) -> String {
        let Injection {
            fault,
            node,
            call,
            held,
        } = injection;
        let requester = if fault == Fault::HostKill && node == 0 {
            1
        } else {
            0
        };
        let known: BTreeSet<String> = self
            .list_sets(requester)
            .unwrap_or_else(|e| panic!("listing the sets on {}: {e}", NODES[requester]))
            .into_iter()
            .map(|r| r.id.0)
            .collect();
        let offset = std::fs::read_to_string(self.probe_events(held))
            .map(|t| t.len())
            .unwrap_or(0);
        let key = match fault {
            Fault::PluginPanic => "panic_in",
            // The writer that hangs, or a pause: the set waits at that call while the fault
            // is injected.
            _ => "hang_in",
        };
        self.order_probe(held, Some(&format!("{key} = \"{}\"\n", call.as_str())));
        let t0 = unix_ns();
        let mut create = self.spawn_create(requester);
        let reached = wait_probe_call(
            self.probe_events(held),
            offset,
            call.as_str(),
            &mut create,
            Duration::from_secs(60),
        );
        self.order_probe(held, None);
        if !reached {
            s.violation(
                cycle,
                format!(
                    "{injection}: the set never reached {} on {}\n{}",
                    call.phase(),
                    NODES[held],
                    self.logs()
                ),
            );
        }
        *s.faults.entry(fault).or_default().entry(call).or_default() += 1;
        let release = Duration::from_secs(10);
        let mut cut_ns = 0;
        match fault {
            Fault::HostKill => self.kill_host(node),
            Fault::BrokerKill => {
                self.kill_broker();
                self.start_broker();
            }
            Fault::LinkCut => {
                cut_ns = unix_ns();
                self.cut_link(node);
            }
            Fault::AppWriterExit => self.stop_app(App::Writer),
            Fault::BrokerPause => self.pause_broker(),
            Fault::NodeSilent => {
                cut_ns = unix_ns();
                self.silence_node(node);
            }
            Fault::WriterHang | Fault::PluginPanic => {}
        }
        if fault.is_stall() {
            // The stall's length is the fault itself, not a wait for anything.
            std::thread::sleep(self.settings.stall());
            match fault {
                Fault::BrokerPause => self.resume_broker(),
                _ => self.unsilence_node(node),
            }
        }
        if (matches!(
            fault,
            Fault::BrokerKill | Fault::LinkCut | Fault::AppWriterExit
        ) || fault.is_stall())
            && reached
            && !self.release_probe(held, release)
        {
            s.violation(
                cycle,
                format!("{injection}: the paused probe writer was not waiting to be let go"),
            );
        }
        let finished = self.finish(create, "quiesce snapshot create");
        if fault == Fault::WriterHang && reached && !self.release_probe(held, release) {
            s.violation(
                cycle,
                format!("{injection}: the hanging writer was not waiting any more"),
            );
        }
        // Bring the cluster back.
        match fault {
            Fault::HostKill => {
                self.start_host(node);
                for app in App::ALL.into_iter().filter(|a| a.node() == node) {
                    // Its registration died with the host: the application starts again.
                    self.stop_app(app);
                    self.start_app(app);
                }
            }
            Fault::LinkCut => self.restore_link(node),
            Fault::AppWriterExit => self.start_app(App::Writer),
            _ => {}
        }
        // On CephFS a node cut off — its link down, or every packet of it dropped — is cut off
        // its storage too: its applications cannot write until its ceph-fuse client has
        // reached the cluster again (TCP resends on its own backoff). That outage is no hold,
        // and is left out of their gaps; from the moment the node's storage answers they must
        // write again within the limit like any other.
        let cut_off = matches!(fault, Fault::LinkCut | Fault::NodeSilent);
        let outage = if cut_off && self.settings.volume == VolumeKind::Cephfs {
            match self.wait_storage(node, Duration::from_secs(60)) {
                Ok(took) => s.storage_back = s.storage_back.max(took),
                Err(e) => s.violation(cycle, format!("{injection}: {e}")),
            }
            Some((node, cut_ns, unix_ns()))
        } else {
            None
        };
        self.wait_healthy();
        let recovered = unix_ns();

        // The set's record: as printed, else from the catalog (the requester lost its answer
        // when the broker died).
        let record: Option<SetRecord> = serde_json::from_str(&finished.stdout).ok().or_else(|| {
            self.list_sets(requester)
                .ok()?
                .into_iter()
                .rfind(|r| !known.contains(&r.id.0))
        });
        let verdict = match &record {
            None => {
                s.violation(
                    cycle,
                    format!(
                        "{injection}: no record of the set (create exited {}: {})",
                        finished.code, finished.stderr
                    ),
                );
                "no record".to_string()
            }
            Some(record) if fault.is_stall() && record.outcome == Outcome::AppConsistent => {
                self.verify_set_after_stall(cycle, injection, record, t0, s)
            }
            Some(record) => self.judge_fault_set(cycle, injection, record, s),
        };

        let left = self.snapshots();
        if !left.is_empty() {
            s.partial_snapshots_left += left.len() as u64;
            s.violation(
                cycle,
                format!("{injection}: snapshots left on the volume: {left:?}"),
            );
        }
        self.check_writing(
            cycle,
            &format!("cycle {cycle}: {injection}"),
            t0,
            recovered,
            outage,
            s,
        );
        verdict
    }

    /// The fault set must have failed, naming the node and writer the fault concerns.
    fn judge_fault_set(
        &mut self,
        cycle: usize,
        injection: Injection,
        record: &SetRecord,
        s: &mut Summary,
    ) -> String {
        let Injection {
            fault, node, call, ..
        } = injection;
        let Some((phase, writer, reason)) = failure(record) else {
            s.outcome(&record.outcome.to_string());
            s.violation(
                cycle,
                format!(
                    "{injection}: set {} ended {}, not failed",
                    record.id.0, record.outcome
                ),
            );
            // Released all the same, so that the cycles after it start clean.
            let _ = self
                .cli(
                    crate::lab::SQLITE_NODE,
                    &["snapshot", "delete", &record.id.0],
                )
                .output();
            return format!("set {} {}", record.id.0, record.outcome);
        };
        s.outcome("failed (fault injected)");
        if record.snapshot.is_some() {
            s.violation(
                cycle,
                format!("{injection}: failed set {} kept a snapshot", record.id.0),
            );
        }
        let named = writer
            .as_ref()
            .map_or("no writer".to_string(), |(n, w)| format!("{n}/{w}"));
        let node_is = |n: usize| writer.as_ref().is_some_and(|(wn, _)| wn == NODES[n]);
        let probe = writer == Some((NODES[node].to_string(), "probe".to_string()));
        let ok = match fault {
            Fault::HostKill => node_is(node),
            // The broker lives in node1's namespace: cutting node1 cuts it off from the others.
            Fault::LinkCut if node == PG_NODE => node_is(1) || node_is(2),
            Fault::LinkCut => node_is(node),
            Fault::WriterHang => probe && phase == call.phase() && reason.contains("no answer"),
            Fault::PluginPanic => probe && phase == call.phase() && reason.contains("panic"),
            Fault::AppWriterExit => {
                writer == Some((NODES[APP_NODE].to_string(), "app".to_string()))
            }
            Fault::BrokerKill => reason.contains("the broker stopped during the set"),
            // A stall may fail the set in whatever way it explains (a lease lapsed, a node
            // missed its heartbeats, the driver's own gap): what it must not do is end
            // app-consistent over a hold that did not hold, which the copy's check catches.
            Fault::BrokerPause | Fault::NodeSilent => true,
        };
        if !ok {
            s.violation(
                cycle,
                format!(
                    "{injection}: set {} failed in {phase} naming {named} ({reason}): not what the fault concerns",
                    record.id.0
                ),
            );
        }
        format!("failed in {phase}, {named}: {reason}")
    }

    /// A set that outlived a stall and ended app-consistent: its snapshot, copied off the volume
    /// (a copy PostgreSQL may recover on) and then deleted, must verify as a backup does — every
    /// acknowledged write there, nothing past a reported freeze point.
    fn verify_set_after_stall(
        &mut self,
        cycle: usize,
        injection: Injection,
        record: &SetRecord,
        t0: u64,
        s: &mut Summary,
    ) -> String {
        s.outcome("app-consistent (after a stall, verified)");
        let id = &record.id.0;
        let (Some(snapshot), Some(snapshot_phase)) = (
            &record.snapshot,
            record.phases.iter().find(|p| p.phase == Phase::Snapshot),
        ) else {
            s.violation(
                cycle,
                format!(
                    "{injection}: app-consistent set {id} has no snapshot or no snapshot phase"
                ),
            );
            return format!("set {id} app-consistent without a snapshot");
        };
        let copy = self.backup_path(&format!("copy-{cycle}"));
        quiesce_testbed::run(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&snapshot.path)
                .arg(&copy),
        );
        let deleted = self
            .cli(crate::lab::SQLITE_NODE, &["snapshot", "delete", id])
            .output()
            .unwrap();
        if !deleted.status.success() {
            s.violation(
                cycle,
                format!(
                    "{injection}: quiesce snapshot delete {id}: {}",
                    String::from_utf8_lossy(&deleted.stderr)
                ),
            );
        }
        let bound = t0 + snapshot_phase.start_ms * 1_000_000;
        let points = freeze_points(&record.writers, &self.app_runs());
        let v = self.verify_restore(&copy, bound, &points);
        let _ = std::fs::remove_dir_all(&copy);
        s.copies_verified += 1;
        s.records_lost += v.lost;
        s.records_past_freeze += v.past_freeze;
        for p in &v.problems {
            s.violation(cycle, format!("{injection}: set {id}: {p}"));
        }
        format!(
            "set {id} app-consistent, its snapshot verified: {} acknowledged records present, {} lost, {} past a freeze point",
            v.records(),
            v.lost,
            v.past_freeze
        )
    }

    /// Every application writes again, and none went longer than the limit without an
    /// acknowledged write between `from_ns` and `to_ns`.
    fn check_writing(
        &mut self,
        cycle: usize,
        during: &str,
        from_ns: u64,
        to_ns: u64,
        outage: Option<(usize, u64, u64)>,
        s: &mut Summary,
    ) {
        let limit = Duration::from_millis(self.settings.frozen_limit_ms());
        if let Err(e) = self.wait_writing(to_ns, limit) {
            s.frozen_beyond_limit += 1;
            s.violation(cycle, format!("{during}: {e}"));
        }
        let check_to = to_ns.min(unix_ns());
        for log in &self.acks {
            let Gap { ms, .. } = match outage {
                // The node's storage was unreachable from `cut` to `back`: before and after.
                Some((node, cut, back)) if log.node == node => {
                    let before = log.longest_gap_within(from_ns, cut);
                    let after = log.longest_gap_within(back, check_to);
                    if before.ms >= after.ms {
                        before
                    } else {
                        after
                    }
                }
                _ => log.longest_gap(from_ns, check_to),
            };
            if ms > s.longest_freeze.ms {
                s.longest_freeze = Freeze {
                    ms,
                    app: log.app.clone(),
                    during: during.into(),
                };
            }
            if ms > self.settings.frozen_limit_ms() {
                s.frozen_beyond_limit += 1;
                s.violation(
                    cycle,
                    format!(
                        "{during}: {} went {ms} ms without an acknowledged write (limit {} ms)",
                        log.app,
                        self.settings.frozen_limit_ms()
                    ),
                );
            }
        }
    }

    /// Part 2 of a cycle: the restic recipe on node2; the backup restored and verified.
    pub fn backup(&mut self, cycle: usize, s: &mut Summary) -> String {
        self.check_apps_alive()
            .unwrap_or_else(|e| panic!("an application of the lab died: {e}"));
        let t0 = unix_ns();
        let out = self.run_backup();
        let id = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("backed up set "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string);
        let (0, Some(id)) = (out.code, id) else {
            s.outcome("failed (unexpected)");
            s.violation(
                cycle,
                format!(
                    "the backup failed (exit {}): {}{}\n{}",
                    out.code,
                    out.stdout,
                    out.stderr,
                    self.logs()
                ),
            );
            return "backup FAILED".into();
        };
        let shown = self
            .cli(
                crate::lab::SQLITE_NODE,
                &["snapshot", "show", &id, "--json"],
            )
            .output()
            .unwrap();
        let record: SetRecord = serde_json::from_slice(&shown.stdout).unwrap_or_else(|e| {
            panic!(
                "quiesce snapshot show {id}: {e}: {}",
                String::from_utf8_lossy(&shown.stderr)
            )
        });
        s.outcome(&record.outcome.to_string());
        if record.outcome != Outcome::AppConsistent {
            s.violation(
                cycle,
                format!(
                    "backup set {id} ended {}, not app-consistent",
                    record.outcome
                ),
            );
        }
        let writers: BTreeSet<(String, String)> = record
            .writers
            .iter()
            .map(|w| (w.writer.node.clone(), w.writer.writer.clone()))
            .collect();
        if writers != self.settings.expected_writers()
            || record.writers.iter().any(|w| w.failure.is_some())
        {
            s.violation(
                cycle,
                format!("backup set {id}: not every writer of the cluster took part cleanly: {writers:?}"),
            );
        }
        if record.deleted_unix_ms.is_none() || !self.snapshots().is_empty() {
            s.partial_snapshots_left += self.snapshots().len() as u64;
            s.violation(
                cycle,
                format!(
                    "backup set {id}: the snapshot was not released: {:?}",
                    self.snapshots()
                ),
            );
        }
        if let Some(w) = record.freeze_window_ms {
            s.longest_freeze_window_ms = s.longest_freeze_window_ms.max(w);
        }
        let set_end = t0 + record.total_ms * 1_000_000;
        self.check_writing(
            cycle,
            &format!("cycle {cycle}: backup set"),
            t0,
            set_end,
            None,
            s,
        );

        // Everything acknowledged before this moment was in the snapshot: the set started after
        // t0, and its snapshot phase began snapshot.start_ms after that.
        let Some(snapshot_phase) = record.phases.iter().find(|p| p.phase == Phase::Snapshot) else {
            s.violation(
                cycle,
                format!("backup set {id}: no snapshot phase on record"),
            );
            return "no snapshot phase".into();
        };
        let bound = t0 + snapshot_phase.start_ms * 1_000_000;
        let target = self.backup_path(&format!("restore-{cycle}"));
        if let Err(e) = self.restore_backup(&id, &target) {
            s.violation(cycle, e);
            return "restore FAILED".into();
        }
        let runs = self.app_runs();
        let points = freeze_points(&record.writers, &runs);
        let apps = ["buffering-app", "sqlite wal.db", "sqlite journal.db"];
        for app in apps.into_iter().chain(runs.iter().map(|(_, r)| r.as_str())) {
            if !points.contains_key(app) {
                s.violation(
                    cycle,
                    format!("backup set {id}: the writer of {app} reported no freeze point"),
                );
            }
        }
        let v = self.verify_restore(&target, bound, &points);
        let _ = std::fs::remove_dir_all(&target);
        s.restores += 1;
        s.records_lost += v.lost;
        s.records_past_freeze += v.past_freeze;
        for (app, n) in &v.verified {
            // One entry for all the runs of an application.
            let app = app.split(" run ").next().unwrap_or(app);
            *s.records_verified.entry(app.to_string()).or_default() += n;
        }
        for p in &v.problems {
            s.violation(cycle, format!("backup set {id}: {p}"));
        }
        format!(
            "backup {id} {}, restored from restic: {} acknowledged records present, {} lost",
            record.outcome,
            v.records(),
            v.lost
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_holds_every_fault_once() {
        let n = Fault::ALL.len();
        let plan = plan(2 * n + 1, 7);
        assert_eq!(plan.len(), 2 * n + 1);
        for round in plan.chunks(n).filter(|r| r.len() == n) {
            let faults: BTreeSet<Fault> = round.iter().map(|i| i.fault).collect();
            assert_eq!(faults.len(), n);
        }
        assert!(plan
            .iter()
            .filter(|i| i.fault == Fault::AppWriterExit)
            .all(|i| i.node == APP_NODE));
        let again = super::plan(2 * n + 1, 7);
        assert!(plan
            .iter()
            .zip(&again)
            .all(|(a, b)| (a.fault, a.node, a.call) == (b.fault, b.node, b.call)));
    }
}
