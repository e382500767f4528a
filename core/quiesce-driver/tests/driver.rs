//! The driver loop in-process: a transport that answers as each test says, a provider in memory,
//! and (where no provider call is involved) tokio's paused clock, so that deadlines are exact and
//! the tests take no real time.
//!
//! What is checked is what both daemons rely on: calls of a level leave in one burst, an answer
//! that arrives at its deadline is late, every frozen writer is released when the set fails or is
//! aborted, and a snapshot that comes back after the set gave up on it is deleted.

use quiesce_driver::{Input, Inputs, Transport};
use quiesce_proto::{
    CallFailure, CallKind, Deadlines, FailureKind, Level, Outcome, Phase, Reports, SetId,
    SetRequest, SnapshotInfo, SnapshotSet, WriterCall, WriterMetadata, WriterRef,
};
use quiesce_provider::{Provider, ProviderError};
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// What the transport saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Call(String, CallKind),
    Lease(String, bool),
    Flush,
}

/// How one writer answers one call: after a delay, with a result.
type Script = BTreeMap<(String, CallKind), (Duration, Result<Reports, CallFailure>)>;

#[derive(Clone)]
struct Scripted {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Script>,
}

impl Scripted {
    fn new(script: Script) -> Scripted {
        Scripted {
            seen: Arc::default(),
            script: Arc::new(script),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn calls(&self) -> Vec<(String, CallKind)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Call(w, k) => Some((w, k)),
                _ => None,
            })
            .collect()
    }
}

impl Transport for Scripted {
    fn call(
        &mut self,
        _set: &SetId,
        writer: WriterRef,
        call: WriterCall,
        _deadline: Instant,
        inputs: &Inputs,
    ) {
        let kind = call.kind();
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Call(writer.writer.clone(), kind));
        if kind == CallKind::Complete {
            return;
        }
        let (delay, result) = self
            .script
            .get(&(writer.writer.clone(), kind))
            .cloned()
            .unwrap_or((Duration::ZERO, Ok(Reports::new())));
        let inputs = inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = inputs.send(Input::Reply {
                writer,
                kind,
                result,
            });
        });
    }

    fn lease(&mut self, _set: &SetId, node: &str, lease: Option<Duration>) {
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Lease(node.into(), lease.is_some()));
    }

    fn flush(&mut self, _inputs: &Inputs) {
        self.seen.lock().unwrap().push(Seen::Flush);
    }
}

/// A provider in memory; `take` waits for the test's permission when a gate is given.
#[derive(Debug, Default)]
struct Memory {
    gate: Option<Mutex<mpsc::Receiver<()>>>,
    deleted: Mutex<Vec<String>>,
    finalized: Mutex<Vec<String>>,
    /// Told of each deletion, when given.
    on_delete: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Provider for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        if let Some(gate) = &self.gate {
            gate.lock().unwrap().recv().unwrap();
        }
        Ok(SnapshotInfo {
            id: set_id.into(),
            path: format!("/memory/{set_id}"),
            provider: "memory".into(),
        })
    }
    fn finalize(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        self.finalized.lock().unwrap().push(snapshot.id.clone());
        Ok(())
    }
    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        self.deleted.lock().unwrap().push(snapshot.id.clone());
        if let Some(tell) = &self.on_delete {
            let _ = tell.send(snapshot.id.clone());
        }
        Ok(())
    }
    fn find(&self, _set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        Ok(None)
    }
}

fn writers(specs: &[(&str, &str, Level)]) -> Vec<(WriterRef, WriterMetadata)> {
    specs
        .iter()
        .map(|(node, id, level)| {
            (
                WriterRef::new(*node, *id),
                WriterMetadata::new(*id, format!("writer {id}"), *level),
            )
        })
        .collect()
}

fn set(writers: Vec<(WriterRef, WriterMetadata)>, deadlines: Deadlines) -> SnapshotSet {
    SnapshotSet::new(
        SetId("set-1".into()),
        SetRequest {
            volumes: vec!["v".into()],
            best_effort: false,
        },
        1,
        writers,
        deadlines,
        quiesce_driver::now(),
    )
}

fn deadlines() -> Deadlines {
    Deadlines {
        freeze: Duration::from_millis(500),
        hold_limit: Duration::from_secs(2),
        lease: Duration::from_secs(1),
        ..Deadlines::default()
    }
}

#[tokio::test]
async fn a_set_goes_through_in_protocol_order_and_each_level_leaves_in_one_burst() {
    let transport = Scripted::new(Script::new());
    let provider = Arc::new(Memory::default());
    let set = set(
        writers(&[
            ("n1", "app", Level::FrontEnd),
            ("n1", "db1", Level::BackEnd),
            ("n3", "db2", Level::BackEnd),
        ]),
        deadlines(),
    );
    let record = quiesce_driver::run(
        set,
        transport.clone(),
        provider.clone(),
        quiesce_driver::inputs(),
        |_, _| {},
    )
    .await;
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    assert_eq!(provider.finalized.lock().unwrap().as_slice(), ["set-1"]);
    assert!(provider.deleted.lock().unwrap().is_empty());

    // Both back-end freezes are handed over before the transport is flushed once: they leave
    // together, after the front-end writer answered its own freeze.
    let seen = transport.seen();
    let at = |wanted: Seen| seen.iter().position(|s| *s == wanted).unwrap();
    let db1 = at(Seen::Call("db1".into(), CallKind::Freeze));
    let db2 = at(Seen::Call("db2".into(), CallKind::Freeze));
    let app = at(Seen::Call("app".into(), CallKind::Freeze));
    assert!(app < db1.min(db2));
    assert!(
        !seen[db1.min(db2)..db1.max(db2)].contains(&Seen::Flush),
        "a level's calls were flushed apart: {seen:?}"
    );
    // Thaw in reverse level order within a node (n1: its back end before its front end; no
    // node waits for another's), then the end: complete to everyone, leases ended.
    let thaw_db = at(Seen::Call("db1".into(), CallKind::Thaw));
    let thaw_app = at(Seen::Call("app".into(), CallKind::Thaw));
    assert!(thaw_db < thaw_app, "{seen:?}");
    for node in ["n1", "n3"] {
        assert!(seen.contains(&Seen::Lease(node.into(), true)));
        assert!(seen.contains(&Seen::Lease(node.into(), false)));
    }
    assert_eq!(
        transport
            .calls()
            .iter()
            .filter(|(_, k)| *k == CallKind::Complete)
            .count(),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_arrives_at_its_deadline_is_late() {
    // db answers freeze exactly at the freeze deadline: the deadline is due when the answer is
    // applied, so it fires first — however the tasks happened to be scheduled.
    let script = Script::from([(
        ("db".into(), CallKind::Freeze),
        (Duration::from_millis(500), Ok(Reports::new())),
    )]);
    let transport = Scripted::new(script);
    let started = tokio::time::Instant::now();
    let record = quiesce_driver::run(
        set(writers(&[("n1", "db", Level::BackEnd)]), deadlines()),
        transport.clone(),
        Arc::new(Memory::default()),
        quiesce_driver::inputs(),
        |_, _| {},
    )
    .await;
    let db = &record.writers[0];
    let failure = db.failure.as_ref().expect("db failed");
    assert_eq!(
        (failure.phase, failure.kind),
        (Phase::Freeze, FailureKind::TimedOut)
    );
    assert!(record.outcome.is_failed());
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "virtual time"
    );
    // The frozen writer was released: the abort went out after the freeze.
    let calls = transport.calls();
    assert!(calls.contains(&("db".into(), CallKind::Abort)), "{calls:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failure_keeps_its_kind_and_every_frozen_writer_is_aborted() {
    let script = Script::from([(
        ("db".into(), CallKind::Freeze),
        (
            Duration::from_millis(3),
            Err(CallFailure::panicked("writer db: panicked in freeze: boom")),
        ),
    )]);
    let transport = Scripted::new(script);
    let record = quiesce_driver::run(
        set(
            writers(&[("n1", "app", Level::FrontEnd), ("n2", "db", Level::BackEnd)]),
            deadlines(),
        ),
        transport.clone(),
        Arc::new(Memory::default()),
        quiesce_driver::inputs(),
        |_, _| {},
    )
    .await;
    match &record.outcome {
        Outcome::Failed { phase, writer, .. } => {
            assert_eq!(*phase, Phase::Freeze);
            assert_eq!(writer.as_ref().unwrap().writer, "db");
        }
        other => panic!("{other:?}"),
    }
    let db = record
        .writers
        .iter()
        .find(|w| w.writer.writer == "db")
        .unwrap();
    assert_eq!(db.failure.as_ref().unwrap().kind, FailureKind::Panicked);
    let calls = transport.calls();
    for w in ["app", "db"] {
        assert!(
            calls.contains(&(w.into(), CallKind::Abort)),
            "{w}: {calls:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_writer_fails_the_set_naming_it_and_everyone_else_is_released() {
    // n3 leaves while db is slow to freeze; app, frozen already, and db are aborted.
    let script = Script::from([(
        ("db".into(), CallKind::Freeze),
        (Duration::from_millis(400), Ok(Reports::new())),
    )]);
    let transport = Scripted::new(script);
    let (inputs, inbox) = quiesce_driver::inputs();
    let abort = inputs.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = abort.send(Input::WriterLost {
            writer: WriterRef::new("n3", "gone"),
            reason: "node n3 left the cluster mid-set".into(),
        });
    });
    let record = quiesce_driver::run(
        set(
            writers(&[
                ("n1", "app", Level::FrontEnd),
                ("n2", "db", Level::BackEnd),
                ("n3", "gone", Level::BackEnd),
            ]),
            deadlines(),
        ),
        transport.clone(),
        Arc::new(Memory::default()),
        (inputs, inbox),
        |_, _| {},
    )
    .await;
    let gone = record
        .writers
        .iter()
        .find(|w| w.writer.writer == "gone")
        .unwrap();
    assert_eq!(gone.failure.as_ref().unwrap().kind, FailureKind::Lost);
    assert!(
        record.outcome.to_string().contains("node n3 left"),
        "{}",
        record.outcome
    );
    let calls = transport.calls();
    for w in ["app", "db"] {
        assert!(
            calls.contains(&(w.into(), CallKind::Abort)),
            "{w}: {calls:?}"
        );
    }
    assert!(
        !calls.contains(&("gone".into(), CallKind::Abort)),
        "a lost writer is not called"
    );
}

#[tokio::test]
async fn a_snapshot_that_comes_back_after_the_set_gave_up_on_it_is_deleted() {
    // Real time: the provider runs on a blocking thread, which tokio's paused clock does not wait
    // for. The provider deadline is short; the provider returns only when the test says so.
    let (open, gate) = mpsc::channel();
    let (on_delete, mut deletions) = tokio::sync::mpsc::unbounded_channel();
    let provider = Arc::new(Memory {
        gate: Some(Mutex::new(gate)),
        on_delete: Some(on_delete),
        ..Memory::default()
    });
    let transport = Scripted::new(Script::new());
    let record = quiesce_driver::run(
        set(
            writers(&[("n1", "db", Level::BackEnd)]),
            Deadlines {
                provider: Duration::from_millis(50),
                ..deadlines()
            },
        ),
        transport.clone(),
        provider.clone(),
        quiesce_driver::inputs(),
        |_, _| {},
    )
    .await;
    match &record.outcome {
        Outcome::Failed { phase, reason, .. } => {
            assert_eq!(*phase, Phase::Snapshot);
            assert!(reason.contains("did not take the snapshot"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(transport.calls().contains(&("db".into(), CallKind::Abort)));
    // The provider finishes after all: the driver, still listening in the background, deletes
    // what it made.
    open.send(()).unwrap();
    let deleted = tokio::time::timeout(Duration::from_secs(30), deletions.recv())
        .await
        .expect("the late snapshot was deleted");
    assert_eq!(deleted.as_deref(), Some("set-1"));
}
