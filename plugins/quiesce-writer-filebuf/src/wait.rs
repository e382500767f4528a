//! Deadlines, and why a wait for the application ended without an answer.

use quiesce_sdk::Call;
use std::time::{Duration, Instant};

/// Why an exchange with the application ended without an answer.
#[derive(Debug)]
pub enum Failure {
    /// The deadline passed.
    Timeout,
    /// The application closed the connection.
    Closed,
    /// The application's process is gone (signal variant).
    Gone,
    /// The application answered something that is not the protocol.
    Protocol(String),
    Io(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Closed => f.write_str("the connection was closed"),
            Failure::Gone => f.write_str("the process is gone"),
            Failure::Protocol(answer) => write!(f, "unexpected answer {answer:?}"),
            Failure::Io(e) => write!(f, "{e}"),
        }
    }
}

/// When the plugin gives up on the application during `call`: the call's deadline, minus a
/// margin (a tenth of the budget, at most 200 ms) so that the plugin's own, precise error reaches
/// the host before the host abandons the call; optionally capped by a configured timeout.
pub fn until(call: &Call, cap: Option<Duration>) -> Instant {
    let remaining = call.remaining();
    let margin = (remaining / 10).min(Duration::from_millis(200));
    let mut until = Instant::now() + (remaining - margin);
    if let Some(cap) = cap {
        until = until.min(Instant::now() + cap);
    }
    until
}

/// Milliseconds from `start` to `until`, for messages.
pub fn ms(start: Instant, until: Instant) -> u128 {
    until.saturating_duration_since(start).as_millis()
}
