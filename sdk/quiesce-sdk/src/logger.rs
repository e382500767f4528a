//! Forwards the plugin's `log` records to the host.
//!
//! A cdylib has its own copy of the `log` crate's statics, so the logger installed here serves
//! exactly one plugin. In-process (the harness, a plugin's own tests) it is the process's logger,
//! unless the program installed another one first; then records go there instead.

use abi_stable::std_types::RStr;
use quiesce_abi::{HostServices, LogLevel};
use std::sync::{Once, RwLock};

/// Where records go: the host's callback, and the plugin name that prefixes each target so the
/// host can tell plugins apart (the callback carries no other identity).
#[derive(Clone, Copy)]
struct Sink {
    plugin: &'static str,
    log: extern "C" fn(LogLevel, RStr<'_>, RStr<'_>),
}

// Replaced by every init: the host may call init more than once, and the last services win.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);
static INSTALL: Once = Once::new();

struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        // The host filters: it knows its configured level, the plugin does not.
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // Copied out so that the lock is not held while the host's callback runs.
        let sink = *SINK.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sink) = sink {
            forward(&sink, record);
        }
    }

    fn flush(&self) {}
}

fn forward(sink: &Sink, record: &log::Record<'_>) {
    let level = match record.level() {
        log::Level::Error => LogLevel::Error,
        log::Level::Warn => LogLevel::Warn,
        log::Level::Info => LogLevel::Info,
        log::Level::Debug => LogLevel::Debug,
        log::Level::Trace => LogLevel::Trace,
    };
    let target = format!("{}:{}", sink.plugin, record.target());
    let message = record.args().to_string();
    (sink.log)(level, target.as_str().into(), message.as_str().into());
}

/// Sends this plugin's log records to `host` from now on.
pub(crate) fn install(plugin: &'static str, host: HostServices) {
    *SINK
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Sink {
        plugin,
        log: host.log,
    });
    INSTALL.call_once(|| {
        // Fails only if a logger is already set: in-process use where the program chose its
        // own logger, which then keeps receiving the records.
        if log::set_logger(&HostLogger).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    // The installed logger is process-wide and other tests install theirs concurrently, so this
    // tests the forwarding itself; tests/plugins.rs checks the installed path through a .so.
    static SEEN: Mutex<Vec<(LogLevel, String, String)>> = Mutex::new(Vec::new());

    extern "C" fn capture(level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        SEEN.lock()
            .unwrap()
            .push((level, target.to_string(), message.to_string()));
    }

    #[test]
    fn records_reach_the_host_with_the_plugin_in_the_target() {
        let sink = Sink {
            plugin: "hello",
            log: capture,
        };
        forward(
            &sink,
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("hello_writer")
                .args(format_args!("frozen for set {}", 7))
                .build(),
        );
        assert_eq!(
            SEEN.lock().unwrap().as_slice(),
            [(
                LogLevel::Warn,
                "hello:hello_writer".to_string(),
                "frozen for set 7".to_string()
            )]
        );
    }
}
