//! The I/O half of `quiesce_proto::SnapshotSet`, shared by the host (a set on one node) and the
//! broker (a set across the cluster).
//!
//! [`run`] carries out the machine's commands — writer calls through a [`Transport`], provider
//! calls on blocking threads — feeds back every answer the moment it arrives, and fires the
//! machine's timers. What differs between host and broker is only how a call reaches a writer
//! (a worker thread, or a `SetCommand` over a node's link) and what a lease is; the rest of the
//! loop, and its ordering rules, exist once:
//!
//! - every command the machine queued is carried out before the driver waits again, so the calls
//!   of one level go out together and the thaw goes out the instant the provider returns;
//! - a deadline that passed while an answer waited in the queue is fired before that answer is
//!   applied, so a late answer is late however the tasks were scheduled;
//! - answers that arrive together are applied together, then the commands they lead to go out:
//!   the loop turns once per burst, not once per writer;
//! - a provider call still running when the set ends is waited for in the background: if it
//!   yields a snapshot after all, the machine asks for its deletion and that is carried out too;
//! - time is tokio's clock ([`now`]): the real clock, except under `tokio::time::pause` in
//!   tests, where the driver's deadlines follow the virtual clock.

mod slot;

pub use slot::{Busy, RunningGuard, RunningSlot};

use quiesce_proto::{
    CallFailure, CallKind, Command, ProviderFailure, ProviderOp, Reports, SetId, SetRecord,
    SnapshotInfo, SnapshotSet, WriterCall, WriterRef,
};
use quiesce_provider::Provider;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the world tells a running set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A writer answered a call (never sent for `Complete`, whose answer nobody waits for).
    Reply {
        writer: WriterRef,
        kind: CallKind,
        result: Result<Reports, CallFailure>,
    },
    /// A writer is gone.
    WriterLost { writer: WriterRef, reason: String },
    /// Every writer of a node is gone for this set (its lease lapsed there: it released them).
    NodeLost { node: String, reason: String },
    /// The cluster's membership epoch is now this.
    Epoch(u64),
    /// The requester or the driver's owner gives up on the set.
    Abort(String),
}

/// Where a running set's inputs go.
pub type Inputs = mpsc::UnboundedSender<Input>;

/// A channel for a set's inputs; give the sender to whatever answers (the transport, watchers
/// of lost writers and of the epoch) and the receiver to [`run`].
pub fn inputs() -> (Inputs, mpsc::UnboundedReceiver<Input>) {
    mpsc::unbounded_channel()
}

/// How writer calls and leases reach the writers' nodes.
pub trait Transport: Send + 'static {
    /// Sends `call` to `writer`, to be answered by `deadline`. The answer must come back as an
    /// [`Input::Reply`] on `inputs` — except for `Complete`, whose answer is dropped. A call that
    /// cannot be sent is answered at once with an error (or the writer reported lost).
    fn call(
        &mut self,
        set: &SetId,
        writer: WriterRef,
        call: WriterCall,
        deadline: Instant,
        inputs: &Inputs,
    );

    /// Grants or renews (`Some`) or ends (`None`) `node`'s lease on the set.
    fn lease(&mut self, set: &SetId, node: &str, lease: Option<Duration>);

    /// Every command of a burst has been handed over: send what was held back to go together.
    /// A transport that sends at once has nothing to do.
    fn flush(&mut self, _inputs: &Inputs) {}
}

enum ProviderAnswer {
    Taken(Result<SnapshotInfo, ProviderFailure>),
    Finalized(Result<(), ProviderFailure>),
    Deleted(Result<(), ProviderFailure>),
}

/// Runs `set` to its end and returns its record. `observe` is called after every change (for
/// checkpoints and progress), with the set and the instant.
pub async fn run<T: Transport>(
    mut set: SnapshotSet,
    mut transport: T,
    provider: Arc<dyn Provider>,
    (inputs, mut inbox): (Inputs, mpsc::UnboundedReceiver<Input>),
    mut observe: impl FnMut(&SnapshotSet, Instant),
) -> SetRecord {
    let id = set.id().clone();
    let (answers, mut provider_inbox) = mpsc::unbounded_channel();
    let mut provider_busy = 0usize;
    loop {
        while let Some(command) = set.poll_command() {
            provider_busy += carry_out(&id, command, &mut transport, &provider, &inputs, &answers);
        }
        transport.flush(&inputs);
        observe(&set, now());
        if set.is_ended() {
            break;
        }
        let wake = set.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(input) = inbox.recv() => {
                let now = now();
                set.handle_timeout(now);
                apply_input(&mut set, now, input);
                // Every answer that is already here goes in before the loop turns: a level of
                // hundreds of writers answers in a burst, and one turn per answer would poll the
                // whole set once per writer.
                while let Ok(input) = inbox.try_recv() {
                    apply_input(&mut set, now, input);
                }
            }
            Some(answer) = provider_inbox.recv() => {
                provider_busy -= 1;
                let now = now();
                set.handle_timeout(now);
                apply_answer(&mut set, now, answer);
            }
            () = sleep_until(wake) => set.handle_timeout(now()),
        }
    }
    let record = set.record().expect("an ended set has a record");
    if provider_busy > 0 {
        tracing::warn!(set = %id, "the set ended with a provider call still running; its result will be cleaned up when it returns");
        tokio::spawn(async move {
            while provider_busy > 0 {
                let Some(answer) = provider_inbox.recv().await else {
                    break;
                };
                provider_busy -= 1;
                apply_answer(&mut set, now(), answer);
                while let Some(command) = set.poll_command() {
                    provider_busy +=
                        carry_out(&id, command, &mut transport, &provider, &inputs, &answers);
                }
                transport.flush(&inputs);
            }
        });
    }
    record
}

/// The driver's clock: tokio's, as a `std` instant for the machine.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn apply_input(set: &mut SnapshotSet, now: Instant, input: Input) {
    match input {
        Input::Reply {
            writer,
            kind,
            result,
        } => set.handle_reply(now, &writer, kind, result),
        Input::WriterLost { writer, reason } => set.handle_writer_lost(now, &writer, reason),
        Input::NodeLost { node, reason } => set.handle_node_lost(now, &node, reason),
        Input::Epoch(epoch) => set.handle_epoch(now, epoch),
        Input::Abort(reason) => set.abort(now, reason),
    }
}

fn apply_answer(set: &mut SnapshotSet, now: Instant, answer: ProviderAnswer) {
    match answer {
        ProviderAnswer::Taken(result) => set.handle_snapshot_taken(now, result),
        ProviderAnswer::Finalized(result) => set.handle_finalized(now, result),
        ProviderAnswer::Deleted(result) => set.handle_deleted(now, result),
    }
}

async fn sleep_until(wake: Option<tokio::time::Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn failure(op: ProviderOp) -> impl FnOnce(quiesce_provider::ProviderError) -> ProviderFailure {
    move |e| ProviderFailure::new(op, e.to_string())
}

/// Carries out one command; returns how many provider calls it started (0 or 1).
fn carry_out(
    id: &SetId,
    command: Command,
    transport: &mut impl Transport,
    provider: &Arc<dyn Provider>,
    inputs: &Inputs,
    answers: &mpsc::UnboundedSender<ProviderAnswer>,
) -> usize {
    let on_blocking_thread = |job: Box<dyn FnOnce() -> ProviderAnswer + Send>| {
        let answers = answers.clone();
        tokio::task::spawn_blocking(move || {
            let _ = answers.send(job());
        });
        1
    };
    match command {
        Command::Call {
            writer,
            call,
            deadline,
        } => {
            transport.call(id, writer, call, deadline, inputs);
            0
        }
        Command::RenewLease { node, lease } => {
            transport.lease(id, &node, Some(lease));
            0
        }
        Command::EndLease { node } => {
            transport.lease(id, &node, None);
            0
        }
        Command::TakeSnapshot { .. } => {
            let (provider, set_id) = (provider.clone(), id.0.clone());
            on_blocking_thread(Box::new(move || {
                ProviderAnswer::Taken(provider.take(&set_id).map_err(failure(ProviderOp::Take)))
            }))
        }
        Command::FinalizeSnapshot { snapshot, .. } => {
            let provider = provider.clone();
            on_blocking_thread(Box::new(move || {
                ProviderAnswer::Finalized(
                    provider
                        .finalize(&snapshot)
                        .map_err(failure(ProviderOp::Finalize)),
                )
            }))
        }
        Command::DeleteSnapshot { snapshot, .. } => {
            let provider = provider.clone();
            on_blocking_thread(Box::new(move || {
                ProviderAnswer::Deleted(
                    provider
                        .delete(&snapshot)
                        .map_err(failure(ProviderOp::Delete)),
                )
            }))
        }
    }
}
