//! The one set a host or a broker runs at a time, and its admission.

use crate::Inputs;
use quiesce_proto::SetId;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where the running set is registered: its id, and where to tell it what happens to it (a
/// writer lost, an abort). Shared by the host's local sets and the broker's cluster sets.
#[derive(Debug, Default)]
pub struct RunningSlot(Mutex<Option<(SetId, Inputs)>>);

/// Another set holds the slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("set {running} is still running")]
pub struct Busy {
    pub running: SetId,
}

impl RunningSlot {
    pub fn new() -> Arc<RunningSlot> {
        Arc::new(RunningSlot::default())
    }

    fn lock(&self) -> MutexGuard<'_, Option<(SetId, Inputs)>> {
        // A panic elsewhere while holding the lock leaves valid data: an Option.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits set `id` if no other set runs. The slot is released when the guard is dropped —
    /// however the set ends, a panic in it included.
    pub fn claim(self: &Arc<Self>, id: SetId, inputs: Inputs) -> Result<RunningGuard, Busy> {
        let mut running = self.lock();
        if let Some((running, _)) = running.as_ref() {
            return Err(Busy {
                running: running.clone(),
            });
        }
        *running = Some((id.clone(), inputs));
        Ok(RunningGuard {
            slot: self.clone(),
            id,
        })
    }

    /// The running set, if any.
    pub fn current(&self) -> Option<(SetId, Inputs)> {
        self.lock().clone()
    }
}

/// Holds the slot for one set; dropping it frees the slot.
#[derive(Debug)]
pub struct RunningGuard {
    slot: Arc<RunningSlot>,
    id: SetId,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut running = self.slot.lock();
        if running.as_ref().is_some_and(|(id, _)| *id == self.id) {
            *running = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_set_at_a_time_and_the_slot_is_freed_however_the_set_ends() {
        let slot = RunningSlot::new();
        let (inputs, _inbox) = crate::inputs();
        let first = slot.claim(SetId("a".into()), inputs.clone()).unwrap();
        assert_eq!(
            slot.claim(SetId("b".into()), inputs.clone()).unwrap_err(),
            Busy {
                running: SetId("a".into())
            }
        );
        drop(first);
        assert!(slot.current().is_none());

        // A set that panics frees the slot as it unwinds.
        let (slot2, inputs2) = (slot.clone(), inputs.clone());
        let panicked = std::thread::spawn(move || {
            let _guard = slot2.claim(SetId("c".into()), inputs2).unwrap();
            panic!("a bug in the set");
        })
        .join();
        assert!(panicked.is_err());
        assert!(
            slot.current().is_none(),
            "a panicking set left the slot taken"
        );
        slot.claim(SetId("d".into()), inputs).unwrap();
    }
}
