//! The signals a daemon answers: SIGHUP (re-read the configuration; the default action, dying,
//! is replaced as soon as [`Signals::new`] returns) and SIGTERM / SIGINT (shut down cleanly).

use std::fmt;
use tokio::signal::unix::{signal, SignalKind};

/// A signal the daemon received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the configuration; never a reason to exit.
    Hangup,
    /// SIGTERM (the service manager's stop) or SIGINT (Ctrl-C).
    Terminate(&'static str),
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::Hangup => write!(f, "SIGHUP"),
            Signal::Terminate(name) => write!(f, "{name}"),
        }
    }
}

/// The daemon's handlers of SIGHUP, SIGTERM and SIGINT. Make it before serving anything: from
/// then on none of them kills the process.
pub struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.hangup.recv() => Signal::Hangup,
            Some(()) = self.terminate.recv() => Signal::Terminate("SIGTERM"),
            Some(()) = self.interrupt.recv() => Signal::Terminate("SIGINT"),
        }
    }
}

/// `[PREFIX.NAME]` for each table added, removed or changed between `a` and `b`.
pub fn table_changes<T: PartialEq>(
    prefix: &str,
    a: &std::collections::BTreeMap<String, T>,
    b: &std::collections::BTreeMap<String, T>,
) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter(|name| a.get(*name) != b.get(*name))
        .map(|name| format!("[{prefix}.{name}]"))
        .collect()
}
