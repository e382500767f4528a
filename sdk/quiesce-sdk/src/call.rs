//! What a writer method is given about the call it is serving.

use std::time::{Duration, Instant};

/// One call of the host into a writer: the snapshot set, the deadline, and the results to return.
#[derive(Debug, Clone)]
pub struct Call {
    set_id: String,
    deadline: Instant,
    reports: Vec<(String, String)>,
}

impl Call {
    /// A call for set `set_id` that may take `budget` from now. The SDK makes these from what the
    /// host sends; tests of a writer that bypass the harness can make their own.
    pub fn new(set_id: impl Into<String>, budget: Duration) -> Call {
        let now = Instant::now();
        Call {
            set_id: set_id.into(),
            // A budget too large to add (u64::MAX ms) means "no practical limit".
            deadline: now
                .checked_add(budget)
                .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600)),
            reports: Vec::new(),
        }
    }

    /// The id of the snapshot set this call belongs to.
    pub fn set_id(&self) -> &str {
        &self.set_id
    }

    /// When the host gives up on this call: return before it. Computed when the call entered the
    /// plugin from the budget the host gave it.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The time left until [`deadline`](Call::deadline), zero once it has passed. Pass it as the
    /// timeout of whatever the call waits for (a lock, a socket, a database statement).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Adds a result the host records with the call (e.g. the WAL position a freeze saw).
    /// Reporting a key again replaces its value.
    pub fn report(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        match self.reports.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.reports.push((key, value)),
        }
    }

    /// The results reported so far, in the order first reported.
    pub fn reports(&self) -> &[(String, String)] {
        &self.reports
    }

    pub(crate) fn into_reports(self) -> Vec<(String, String)> {
        self.reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_fixed_at_creation_and_remaining_counts_down_to_zero() {
        let before = Instant::now();
        let call = Call::new("set-1", Duration::from_secs(5));
        assert_eq!(call.set_id(), "set-1");
        assert!(call.deadline() >= before + Duration::from_secs(5));
        assert!(call.remaining() <= Duration::from_secs(5));

        let expired = Call::new("set-1", Duration::ZERO);
        assert_eq!(expired.remaining(), Duration::ZERO);

        // Must not overflow.
        let unlimited = Call::new("set-1", Duration::from_millis(u64::MAX));
        assert!(unlimited.remaining() > Duration::from_secs(3600));
    }

    #[test]
    fn reports_keep_order_and_replace_by_key() {
        let mut call = Call::new("s", Duration::from_secs(1));
        call.report("lsn", "0/1");
        call.report("label", "x");
        call.report("lsn", "0/2");
        assert_eq!(
            call.into_reports(),
            vec![("lsn".into(), "0/2".into()), ("label".into(), "x".into())]
        );
    }
}
