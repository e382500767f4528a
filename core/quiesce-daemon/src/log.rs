//! The daemons' log: its filter and where it goes.
//!
//! The filter is `--log-level` if given, else `-v` (debug) / `-vv` (trace), else `RUST_LOG` if
//! set and not empty, else the daemon's default. A filter that does not parse, from the flag or
//! from `RUST_LOG`, is an error at start: a typo never silently logs nothing (or everything).
//! A filter is a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) and/or
//! `TARGET=LEVEL` directives, comma-separated (`info,quiesce_host=debug`); a bare word that is
//! not a level is refused (`EnvFilter` would take it as a target enabled at every level).
//!
//! Under systemd (`$JOURNAL_STREAM` names this process's stderr, and the journal's socket
//! `/run/systemd/journal/socket` exists) events go to the journal over its native protocol:
//! levels map to `PRIORITY` (error 3, warn 4, info 5, debug 6, trace 7), fields become
//! `QUIESCE_<FIELD>` (`QUIESCE_NODE`, `QUIESCE_SET`, `QUIESCE_WRITER`), `SYSLOG_IDENTIFIER` is
//! the program's name. Otherwise they go to stderr as plain text, with ANSI colour only when
//! stderr is a terminal.

use std::fmt;
use std::path::Path;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The journal's native protocol socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The log flags every daemon takes (flattened into its `clap` arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// What to log: a level (error, warn, info, debug, trace, off) or a filter as in RUST_LOG
    /// (`info,quiesce_host=debug`). Without it (and without -v): RUST_LOG, else info. A filter
    /// that does not parse stops the daemon at start.
    #[arg(long, value_name = "LEVEL|FILTER", global = true)]
    pub log_level: Option<String>,
    /// Log more: -v is debug, -vv trace (instead of RUST_LOG).
    #[arg(
        short = 'v',
        long = "verbose",
        action = clap::ArgAction::Count,
        global = true,
        conflicts_with = "log_level"
    )]
    pub verbose: u8,
}

/// Why the log could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{from} = {value:?} is not a log filter: {reason}; give a level (error, warn, info, debug, trace, off) or TARGET=LEVEL directives separated by commas (info,quiesce_host=debug)")]
    Filter {
        /// `--log-level` or `RUST_LOG`.
        from: &'static str,
        value: String,
        reason: String,
    },
    #[error("the log was already set up in this process")]
    AlreadySet,
}

/// Where the log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// The journal's native protocol.
    Journal,
    /// Plain text on stderr; `ansi`: coloured (stderr is a terminal).
    Stderr { ansi: bool },
}

impl fmt::Display for LogOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogOutput::Journal => write!(f, "the journal"),
            LogOutput::Stderr { .. } => write!(f, "stderr"),
        }
    }
}

const LEVELS: [&str; 12] = [
    "off", "error", "warn", "info", "debug", "trace", "0", "1", "2", "3", "4", "5",
];

/// The filter text the flags and `rust_log` (the value of `RUST_LOG`) ask for, with where it
/// came from; `default` when none does.
pub fn filter_text(
    args: &LogArgs,
    rust_log: Option<&str>,
    default: &str,
) -> (&'static str, String) {
    if let Some(level) = &args.log_level {
        return ("--log-level", level.clone());
    }
    match args.verbose {
        0 => {}
        1 => return ("-v", "debug".into()),
        _ => return ("-vv", "trace".into()),
    }
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(text) => ("RUST_LOG", text.to_string()),
        None => ("the default", default.to_string()),
    }
}

/// Parses a filter strictly (see the module's docs).
pub fn parse_filter(from: &'static str, text: &str) -> Result<EnvFilter, LogError> {
    let refuse = |reason: String| LogError::Filter {
        from,
        value: text.to_string(),
        reason,
    };
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(refuse("it is empty".into()));
    }
    for directive in &directives {
        if !directive.contains('=')
            && !directive.contains('[')
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(refuse(format!("{directive:?} is not a level")));
        }
    }
    EnvFilter::builder()
        .parse(text)
        .map_err(|e| refuse(e.to_string()))
}

/// Whether `$JOURNAL_STREAM` (`DEVICE:INODE`) names this process's stderr and the journal's
/// socket exists: systemd connected stderr to the journal, so the native protocol reaches it.
pub fn journal_wanted() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    stat.st_dev == dev && stat.st_ino == ino && Path::new(JOURNAL_SOCKET).exists()
}

/// Sets up the process's log: the filter from the flags, `RUST_LOG` or `default`; the journal
/// or stderr. Call it once, first thing after parsing the command line.
pub fn init(args: &LogArgs, default: &str) -> Result<LogOutput, LogError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (from, text) = filter_text(args, rust_log.as_deref(), default);
    let filter = parse_filter(from, &text)?;
    let registry = tracing_subscriber::registry().with(filter);
    if journal_wanted() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_field_prefix(Some("QUIESCE".into()));
                registry
                    .with(layer)
                    .try_init()
                    .map_err(|_| LogError::AlreadySet)?;
                return Ok(LogOutput::Journal);
            }
            Err(e) => eprintln!(
                "cannot log to the journal at {JOURNAL_SOCKET} ({e}): logging to stderr instead"
            ),
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .try_init()
        .map_err(|_| LogError::AlreadySet)?;
    Ok(LogOutput::Stderr { ansi })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_verbose_then_rust_log_then_the_default() {
        let args = |log_level: Option<&str>, verbose| LogArgs {
            log_level: log_level.map(str::to_string),
            verbose,
        };
        assert_eq!(
            filter_text(&args(Some("warn"), 0), Some("trace"), "info"),
            ("--log-level", "warn".into())
        );
        assert_eq!(
            filter_text(&args(None, 1), Some("trace"), "info"),
            ("-v", "debug".into())
        );
        assert_eq!(
            filter_text(&args(None, 3), None, "info"),
            ("-vv", "trace".into())
        );
        assert_eq!(
            filter_text(&args(None, 0), Some("warn,a=debug"), "info"),
            ("RUST_LOG", "warn,a=debug".into())
        );
        assert_eq!(
            filter_text(&args(None, 0), Some("  "), "info"),
            ("the default", "info".into())
        );
    }

    #[test]
    fn bad_filters_are_refused_naming_where_they_came_from() {
        for good in [
            "info",
            "DEBUG",
            "warn,quiesce_host=trace",
            "off",
            "a::b=info",
            "3",
        ] {
            assert!(parse_filter("RUST_LOG", good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("verbose", "\"verbose\" is not a level"),
            ("info,quiesce_host", "\"quiesce_host\" is not a level"),
            ("quiesce_host=loud", "is not a log filter"),
            ("", "it is empty"),
        ] {
            let e = parse_filter("--log-level", bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--log-level = {bad:?}")), "{e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
