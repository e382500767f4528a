//! The daemons' TOML configuration: one loader and one error shape for `quiesce-host` and
//! `quiesce-broker`, and the checks of what both configure — the hold limit and the per-call
//! `[timeouts]` — with each key's range ([`RANGES`], documented in the README).
//!
//! A configuration that cannot do what it says stops the daemon before it starts: every error
//! names the file, the key and the fix. Errors print their cause once (no `Caused by:` that
//! repeats the message).

use quiesce_proto::Timeouts;
use serde::de::DeserializeOwned;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// Why a configuration file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file could not be read.
    Read(String),
    /// Not TOML, an unknown key, a value of the wrong type (the message names the key and
    /// the line).
    Parse(String),
    /// A key's value cannot work.
    Invalid { key: String, reason: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.problem {
            Problem::Read(cause) => write!(f, "cannot read the configuration {path}: {cause}"),
            Problem::Parse(message) => write!(
                f,
                "the configuration {path} is not valid: {}",
                message.trim_end()
            ),
            Problem::Invalid { key, reason } => {
                write!(f, "the configuration {path} is not valid: {key}: {reason}")
            }
        }
    }
}

impl ConfigError {
    pub fn invalid(path: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            problem: Problem::Invalid {
                key: key.into(),
                reason: reason.into(),
            },
        }
    }
}

/// Reads and parses the configuration at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError {
        path: path.into(),
        problem: Problem::Read(cause.to_string()),
    })?;
    parse(&text, path)
}

/// Parses configuration text; `path` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|cause| ConfigError {
        path: path.into(),
        problem: Problem::Parse(cause.to_string()),
    })
}

/// A key with milliseconds, and the values it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub key: &'static str,
    pub ms: RangeInclusive<u64>,
    /// Why the bounds are there.
    pub why: &'static str,
}

const HOUR_MS: u64 = 3_600_000;

/// The range of every duration key both daemons share (`lease_ms` is the broker's: see
/// [`LEASE`]).
pub const RANGES: [Range; 7] = [
    Range {
        key: "hold_limit_ms",
        ms: 100..=600_000,
        why: "the longest any writer stays frozen: long enough to freeze and snapshot, never so long that applications stall for more than ten minutes",
    },
    Range {
        key: "timeouts.prepare_ms",
        ms: 1..=HOUR_MS,
        why: "a checkpoint or flush may be slow, but a deadline that never fires holds the set for ever",
    },
    Range {
        key: "timeouts.freeze_ms",
        ms: 1..=600_000,
        why: "must also be below hold_limit_ms, so that a writer that does not answer freeze is named before the hold limit releases everyone",
    },
    Range {
        key: "timeouts.thaw_ms",
        ms: 1..=HOUR_MS,
        why: "a thaw that does not answer is reported; the hold limit releases the writer anyway",
    },
    Range {
        key: "timeouts.post_snapshot_ms",
        ms: 1..=HOUR_MS,
        why: "work on the snapshot (a backup label) may be slow, not endless",
    },
    Range {
        key: "timeouts.abort_ms",
        ms: 1..=HOUR_MS,
        why: "an abort that does not answer is reported; the hold limit releases the writer anyway",
    },
    Range {
        key: "timeouts.provider_ms",
        ms: 1..=HOUR_MS,
        why: "the provider's take, finalize and delete each",
    },
];

/// The broker's `lease_ms`: each node's lease on a running set, renewed every third of it.
pub const LEASE: Range = Range {
    key: "lease_ms",
    ms: 30..=600_000,
    why: "renewed every third of it, so under 30 ms the renewals would be the whole traffic; it must also be below hold_limit_ms, or a node would not notice a vanished broker before its own watchdog does",
};

fn check_range(path: &Path, range: &Range, value: u64) -> Result<(), ConfigError> {
    if range.ms.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::invalid(
        path,
        range.key,
        format!(
            "{value} is out of range: it must be {} to {} ({})",
            range.ms.start(),
            range.ms.end(),
            range.why
        ),
    ))
}

/// Checks the hold limit and the per-call timeouts: each in its range.
pub fn check_set_limits(
    path: &Path,
    hold_limit_ms: u64,
    timeouts: &Timeouts,
) -> Result<(), ConfigError> {
    let values = [
        hold_limit_ms,
        timeouts.prepare_ms,
        timeouts.freeze_ms,
        timeouts.thaw_ms,
        timeouts.post_snapshot_ms,
        timeouts.abort_ms,
        timeouts.provider_ms,
    ];
    for (range, value) in RANGES.iter().zip(values) {
        check_range(path, range, value)?;
    }
    Ok(())
}

/// What the limits may not mean, said once at start. A freeze deadline at or past the hold
/// limit cannot fire: each freeze call is cut at the hold limit instead (the set machine's
/// rule), and a writer that has not answered by then is named as timed out there. That works,
/// so it is not refused; the warning says how the deadline is adjusted.
pub fn set_limit_warning(hold_limit_ms: u64, timeouts: &Timeouts) -> Option<String> {
    (timeouts.freeze_ms >= hold_limit_ms).then(|| {
        format!(
            "timeouts.freeze_ms = {} is not below hold_limit_ms = {hold_limit_ms}: every freeze call ends at the hold limit instead, and a writer that has not answered by then is named as timed out; lower freeze_ms to give writers a deadline of their own",
            timeouts.freeze_ms
        )
    })
}

/// Checks the broker's lease against its range and the hold limit.
pub fn check_lease(path: &Path, lease_ms: u64, hold_limit_ms: u64) -> Result<(), ConfigError> {
    check_range(path, &LEASE, lease_ms)?;
    if lease_ms >= hold_limit_ms {
        return Err(ConfigError::invalid(
            path,
            LEASE.key,
            format!(
                "{lease_ms} is not below hold_limit_ms ({hold_limit_ms}): a node whose broker vanished would hold its writers until the watchdog rather than until the lease; lower lease_ms"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_key_once() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)] // only parsed
        struct C {
            a: u64,
        }
        let e = parse::<C>("b = 1", Path::new("x.toml")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("the configuration x.toml is not valid: "),
            "{text}"
        );
        assert!(text.contains("unknown field `b`"), "{text}");
        assert!(
            std::error::Error::source(&e).is_none(),
            "the cause is in the message only"
        );
        let e = load::<C>(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(matches!(e.problem, Problem::Read(_)), "{e}");
    }

    #[test]
    fn limits_in_range_and_a_warning_for_a_freeze_deadline_past_the_hold_limit() {
        let p = Path::new("c.toml");
        let defaults = Timeouts::default();
        check_set_limits(p, 10_000, &defaults).unwrap();
        let e = check_set_limits(p, 9_223_372_036_854_775_807, &defaults).unwrap_err();
        assert!(
            e.to_string()
                .contains("hold_limit_ms: 9223372036854775807 is out of range"),
            "{e}"
        );
        let zero = Timeouts {
            freeze_ms: 0,
            ..Timeouts::default()
        };
        let e = check_set_limits(p, 10_000, &zero).unwrap_err();
        assert!(
            e.to_string()
                .contains("timeouts.freeze_ms: 0 is out of range"),
            "{e}"
        );
        let equal = Timeouts {
            freeze_ms: 10_000,
            ..Timeouts::default()
        };
        check_set_limits(p, 10_000, &equal).unwrap();
        let warning = set_limit_warning(10_000, &equal).expect("a warning");
        assert!(warning.contains("is not below hold_limit_ms"), "{warning}");
        assert_eq!(set_limit_warning(10_001, &equal), None);
        check_lease(p, 5_000, 10_000).unwrap();
        assert!(check_lease(p, 29, 10_000).is_err());
        assert!(check_lease(p, 10_000, 10_000).is_err());
    }
}
