//! Runs one snapshot set on this node alone: the writers' worker threads are the transport.
//!
//! The loop itself is `quiesce_driver::run`, shared with the broker; here is only how a call
//! reaches a writer (queued on its thread in command order, the answer awaited on a task).

use crate::worker::WriterHandle;
use quiesce_driver::{Input, Inputs, Transport};
use quiesce_proto::{
    CallKind, Deadlines, SetId, SetRecord, SetRequest, SnapshotSet, WriterCall, WriterRef,
};
use quiesce_provider::Provider;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

struct WorkerTransport {
    writers: BTreeMap<WriterRef, Arc<WriterHandle>>,
}

impl Transport for WorkerTransport {
    fn call(
        &mut self,
        set: &SetId,
        writer: WriterRef,
        call: WriterCall,
        deadline: Instant,
        inputs: &Inputs,
    ) {
        let Some(handle) = self.writers.get(&writer) else {
            return;
        };
        let kind = call.kind();
        let budget = deadline.saturating_duration_since(Instant::now());
        // Queued now, in command order; only the wait for the answer runs on a task.
        let pending = handle.start_call(call, &set.0, budget);
        let (inputs, set_id) = (inputs.clone(), set.0.clone());
        tokio::spawn(async move {
            let result = pending.answer().await;
            if kind == CallKind::Complete {
                if let Err(e) = result {
                    tracing::warn!(set = %set_id, "completion notice failed: {e}");
                }
                return;
            }
            let _ = inputs.send(Input::Reply {
                writer,
                kind,
                result,
            });
        });
    }

    // Leases guard nodes against a remote driver that vanishes. In a local set the driver is this
    // process, and each writer's worker enforces the hold limit on its own.
    fn lease(&mut self, _set: &SetId, _node: &str, _lease: Option<Duration>) {}
}

/// Runs one set over `writers` of node `node` and returns its record. `inputs` also carries
/// writers lost mid-set (see `Host::writer_lost`).
pub async fn run(
    id: SetId,
    node: &str,
    request: SetRequest,
    writers: &[Arc<WriterHandle>],
    deadlines: Deadlines,
    provider: Arc<dyn Provider>,
    inputs: (Inputs, mpsc::UnboundedReceiver<Input>),
) -> SetRecord {
    let by_ref: BTreeMap<WriterRef, Arc<WriterHandle>> = writers
        .iter()
        .map(|w| (WriterRef::new(node, w.id()), w.clone()))
        .collect();
    let participants = by_ref
        .iter()
        .map(|(r, w)| (r.clone(), w.metadata.clone()))
        .collect();
    let set = SnapshotSet::new(
        id.clone(),
        request,
        0,
        participants,
        deadlines,
        Instant::now(),
    );
    tracing::info!(set = %id, writers = writers.len(), "snapshot set started");
    let transport = WorkerTransport { writers: by_ref };
    let record = quiesce_driver::run(set, transport, provider, inputs, |_, _| {}).await;
    tracing::info!(set = %id, outcome = %record.outcome, "snapshot set ended");
    record
}
