//! The systemd notification protocol (`sd_notify(3)`), which needs no systemd: each message is
//! a datagram on the socket `$NOTIFY_SOCKET` names; with no `$NOTIFY_SOCKET` every call here
//! does nothing. A daemon sends [`ready`] once it serves (for `Type=notify` units), [`status`]
//! when what it serves changes, [`stopping`] when it shuts down, and runs [`watchdog`] when the
//! unit sets `WatchdogSec=`.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState<'_>]) {
    // A service manager that went away must not stop the daemon: said once per message.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("telling the service manager ($NOTIFY_SOCKET) {states:?} failed: {e}");
    }
}

/// `READY=1` with a `STATUS=` line: the daemon serves.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=`: one line on what the daemon serves (`systemctl status` shows it).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1` with a `STATUS=` line: the daemon shuts down.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The watchdog interval the service manager asks for: `$WATCHDOG_USEC`, unless
/// `$WATCHDOG_PID` names another process (`sd_watchdog_enabled(3)`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// When the service manager asks for a watchdog: a task on the current tokio runtime sending
/// `WATCHDOG=1` every half of the interval, so that a runtime that stops running tasks stops
/// it too (and the service manager restarts the daemon). `None` when no watchdog is asked for.
pub fn watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let every = (interval / 2).max(Duration::from_millis(1));
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "the service manager's watchdog is on: WATCHDOG=1 every {} ms",
        every.as_millis()
    );
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
