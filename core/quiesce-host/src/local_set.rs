//! Drives one snapshot set through the protocol state machine, with real writers and a provider.
//!
//! This is the I/O half of `quiesce_proto::SnapshotSet`: it carries out the machine's commands
//! (every call to writers of one level at once, each on its writer's own thread; the provider on
//! a blocking thread), feeds back every answer the moment it arrives, and fires the machine's
//! timers. The thaw is sent the instant the provider returns: nothing else sits in between.

use crate::worker::{CallError, Op, WriterHandle};
use quiesce_proto::machine::CallKind;
use quiesce_proto::{
    Command, Deadlines, Reports, SetId, SetRecord, SetRequest, SnapshotInfo, SnapshotSet,
    WriterCall, WriterRef,
};
use quiesce_provider::Provider;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

enum Event {
    Reply {
        writer: WriterRef,
        kind: CallKind,
        result: Result<Reports, CallError>,
    },
    Taken(Result<SnapshotInfo, String>),
    Finalized(Result<(), String>),
    Deleted(Result<(), String>),
}

/// Runs one set over `writers` of node `node` and returns its record. A writer id arriving on
/// `lost` is a writer that went away mid-set.
pub async fn run(
    id: SetId,
    node: &str,
    request: SetRequest,
    writers: &[Arc<WriterHandle>],
    deadlines: Deadlines,
    provider: Arc<dyn Provider>,
    mut lost: mpsc::UnboundedReceiver<(String, String)>,
) -> SetRecord {
    let by_ref: BTreeMap<WriterRef, Arc<WriterHandle>> = writers
        .iter()
        .map(|w| (WriterRef::new(node, w.id()), w.clone()))
        .collect();
    let participants = by_ref
        .iter()
        .map(|(r, w)| (r.clone(), w.metadata.clone()))
        .collect();
    let (events, mut inbox) = mpsc::unbounded_channel();
    let mut set = SnapshotSet::new(
        id.clone(),
        request,
        0,
        participants,
        deadlines,
        Instant::now(),
    );
    tracing::info!(set = %id, writers = writers.len(), "snapshot set started");
    let mut provider_busy = 0usize;
    loop {
        while let Some(command) = set.poll_command() {
            provider_busy += dispatch(&id, command, &by_ref, &provider, &events);
        }
        if set.is_ended() {
            break;
        }
        let wake = set.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(event) = inbox.recv() => {
                provider_busy -= usize::from(event.is_provider_answer());
                // A deadline that passed while this event waited is fired first, so a late
                // answer is treated as late however the tasks were scheduled.
                let now = Instant::now();
                set.handle_timeout(now);
                apply(&mut set, now, event);
            }
            Some((writer, reason)) = lost.recv() => {
                set.handle_writer_lost(Instant::now(), &WriterRef::new(node, writer), reason);
            }
            () = sleep_until(wake) => set.handle_timeout(Instant::now()),
        }
    }
    let record = set.record().expect("an ended set has a record");
    tracing::info!(set = %id, outcome = %record.outcome, "snapshot set ended");
    if provider_busy > 0 {
        // The set gave up on a provider call that is still running. If it yields a snapshot
        // after all, the machine asks for its deletion: keep listening until it is done.
        tokio::spawn(async move {
            while provider_busy > 0 {
                let Some(event) = inbox.recv().await else {
                    break;
                };
                provider_busy -= usize::from(event.is_provider_answer());
                apply(&mut set, Instant::now(), event);
                while let Some(command) = set.poll_command() {
                    provider_busy += dispatch(&id, command, &by_ref, &provider, &events);
                }
            }
        });
    }
    record
}

impl Event {
    fn is_provider_answer(&self) -> bool {
        !matches!(self, Event::Reply { .. })
    }
}

fn apply(set: &mut SnapshotSet, now: Instant, event: Event) {
    match event {
        Event::Reply {
            writer,
            kind,
            result,
        } => set.handle_reply(now, &writer, kind, result.map_err(|e| e.to_string())),
        Event::Taken(result) => set.handle_snapshot_taken(now, result),
        Event::Finalized(result) => set.handle_finalized(now, result),
        Event::Deleted(result) => set.handle_deleted(now, result),
    }
}

async fn sleep_until(wake: Option<tokio::time::Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Carries out one command; returns how many provider calls it started (0 or 1).
fn dispatch(
    id: &SetId,
    command: Command,
    writers: &BTreeMap<WriterRef, Arc<WriterHandle>>,
    provider: &Arc<dyn Provider>,
    events: &mpsc::UnboundedSender<Event>,
) -> usize {
    match command {
        Command::Call {
            writer,
            call,
            deadline,
        } => {
            let Some(handle) = writers.get(&writer) else {
                return 0;
            };
            let kind = call.kind();
            let op = match call {
                WriterCall::Prepare => Op::Prepare,
                WriterCall::Freeze => Op::Freeze,
                WriterCall::Thaw => Op::Thaw,
                WriterCall::PostSnapshot { snapshot } => Op::PostSnapshot {
                    snapshot_path: snapshot.path,
                },
                WriterCall::Abort => Op::Abort,
                WriterCall::Complete { outcome } => Op::Complete {
                    outcome: outcome.label().to_string(),
                },
            };
            let budget = deadline.saturating_duration_since(Instant::now());
            // Queued now, in command order; only the wait for the answer runs on a task.
            let pending = handle.start_call(op, &id.0, budget);
            let (events, set_id) = (events.clone(), id.0.clone());
            tokio::spawn(async move {
                let result = pending.answer().await;
                if kind == CallKind::Complete {
                    if let Err(e) = result {
                        tracing::warn!(set = %set_id, "completion notice failed: {e}");
                    }
                    return;
                }
                let _ = events.send(Event::Reply {
                    writer,
                    kind,
                    result,
                });
            });
            0
        }
        Command::TakeSnapshot { .. } => {
            let (provider, events, set_id) = (provider.clone(), events.clone(), id.0.clone());
            tokio::task::spawn_blocking(move || {
                let result = provider.take(&set_id).map_err(|e| e.to_string());
                let _ = events.send(Event::Taken(result));
            });
            1
        }
        Command::FinalizeSnapshot { snapshot, .. } => {
            let (provider, events) = (provider.clone(), events.clone());
            tokio::task::spawn_blocking(move || {
                let result = provider.finalize(&snapshot).map_err(|e| e.to_string());
                let _ = events.send(Event::Finalized(result));
            });
            1
        }
        Command::DeleteSnapshot { snapshot, .. } => {
            let (provider, events) = (provider.clone(), events.clone());
            tokio::task::spawn_blocking(move || {
                let result = provider.delete(&snapshot).map_err(|e| e.to_string());
                let _ = events.send(Event::Deleted(result));
            });
            1
        }
        // Leases guard nodes against a remote driver that vanishes. In a local set the driver is
        // this process, and each writer's worker enforces the hold limit on its own.
        Command::RenewLease { .. } | Command::EndLease { .. } => 0,
    }
}
