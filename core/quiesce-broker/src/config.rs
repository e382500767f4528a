//! The broker's TOML configuration (`quiesce-broker serve --config broker.toml`).
//!
//! ```toml
//! catalog = "/var/lib/quiesce/catalog.sqlite"   # every set, kept across restarts
//! hold_limit_ms = 10000     # longest any writer is held frozen in a set
//! lease_ms = 5000           # each node's lease on a running set, renewed every third of it
//! keep_records = "180d"     # optional: forget ended sets that keep no snapshot this long after
//!                           # they started (default: remember every set)
//!
//! [timeouts]                # per call, in milliseconds (as in the host's configuration)
//! freeze_ms = 5000
//!
//! [volumes.shared]          # a volume the broker snapshots, with its provider
//! provider = "btrfs"
//! subvolume = "/mnt/shared/data"
//! snapshots = "/mnt/shared/.snapshots"
//!
//! [retention.shared]        # optional: the broker deletes kept snapshots past these
//! max_kept = 14             # the newest 14 at most
//! max_age = "30d"           # none older than 30 days (humantime: "36h", "2w", "1d 12h")
//! ```
//!
//! Retention never deletes a snapshot still held by a requester's lease (a backup reading
//! it): that one goes when its lease lapses.
//!
//! The providers are those of `quiesce-provider` (btrfs, command, lvm, zfs, dir-copy); the
//! broker runs on a machine that reaches the shared volume (or the storage's API).

use quiesce_proto::{Deadlines, Timeouts};
use quiesce_provider::ProviderConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SQLite file of the catalog of sets.
    pub catalog: PathBuf,
    #[serde(default = "default_hold_limit")]
    pub hold_limit_ms: u64,
    #[serde(default = "default_lease")]
    pub lease_ms: u64,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub volumes: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub retention: BTreeMap<String, Retention>,
    /// How long the catalog remembers an ended set that keeps no snapshot (`None`: for ever).
    #[serde(default, deserialize_with = "duration")]
    pub keep_records: Option<Duration>,
}

/// How many kept snapshots of a volume the broker keeps, and for how long.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub max_kept: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub max_age: Option<Duration>,
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"30d\" or \"36h\": {e}"
        ))
    })
}

impl Retention {
    /// Which of a volume's kept snapshots (`kept`, oldest first) are past this retention at
    /// `now_unix_ms`: beyond the newest `max_kept`, or started longer than `max_age` ago.
    /// One held by a lease that has not lapsed is never among them (it still counts towards
    /// `max_kept`).
    pub fn past(&self, kept: &[&quiesce_proto::SetRecord], now_unix_ms: u64) -> Vec<String> {
        let oldest_allowed = self
            .max_age
            .map(|age| now_unix_ms.saturating_sub(age.as_millis() as u64));
        kept.iter()
            .rev()
            .enumerate()
            .filter(|(_, r)| {
                r.lease_until_unix_ms
                    .is_none_or(|until| until <= now_unix_ms)
            })
            .filter(|(newer, r)| {
                let too_many = self.max_kept.is_some_and(|max| *newer >= max);
                let too_old = match (oldest_allowed, r.started_unix_ms) {
                    (Some(oldest), Some(started)) => started < oldest,
                    _ => false,
                };
                too_many || too_old
            })
            .map(|(_, r)| r.id.0.clone())
            .collect()
    }
}

fn default_hold_limit() -> u64 {
    Deadlines::default().hold_limit.as_millis() as u64
}

fn default_lease() -> u64 {
    Deadlines::default().lease.as_millis() as u64
}

pub use quiesce_config::ConfigError;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = quiesce_config::load(path)?;
        config.check(path)?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = quiesce_config::parse(text, path)?;
        config.check(path)?;
        Ok(config)
    }

    /// What the configuration says must be able to work.
    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        quiesce_config::check_set_limits(path, self.hold_limit_ms, &self.timeouts)?;
        quiesce_config::check_lease(path, self.lease_ms, self.hold_limit_ms)?;
        if self.catalog.as_os_str().is_empty() {
            return Err(ConfigError::invalid(path, "catalog", "must name a file"));
        }
        for (volume, retention) in &self.retention {
            if !self.volumes.contains_key(volume) {
                return Err(ConfigError::invalid(
                    path,
                    format!("retention.{volume}"),
                    "names no volume of this broker: add [volumes.NAME] or fix the name",
                ));
            }
            if retention.max_kept == Some(0) {
                return Err(ConfigError::invalid(
                    path,
                    format!("retention.{volume}.max_kept"),
                    "0 would delete every snapshot as soon as it is taken: keep at least 1",
                ));
            }
        }
        Ok(())
    }

    /// The deadlines every set runs under.
    /// The keys (and tables) in which `other` differs from this configuration: what a SIGHUP
    /// found changed.
    pub fn changes(&self, other: &Config) -> Vec<String> {
        let mut changed: Vec<String> = [
            ("catalog", self.catalog != other.catalog),
            ("hold_limit_ms", self.hold_limit_ms != other.hold_limit_ms),
            ("lease_ms", self.lease_ms != other.lease_ms),
            ("keep_records", self.keep_records != other.keep_records),
            ("[timeouts]", self.timeouts != other.timeouts),
        ]
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(key, _)| key.to_string())
        .collect();
        changed.extend(quiesce_daemon::signals::table_changes(
            "volumes",
            &self.volumes,
            &other.volumes,
        ));
        changed.extend(quiesce_daemon::signals::table_changes(
            "retention",
            &self.retention,
            &other.retention,
        ));
        changed
    }

    pub fn deadlines(&self) -> Deadlines {
        self.timeouts.deadlines(
            Duration::from_millis(self.hold_limit_ms),
            Duration::from_millis(self.lease_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_volumes_and_deadlines() {
        let text = r#"
            catalog = "/tmp/c.sqlite"
            hold_limit_ms = 3000
            lease_ms = 1500
            keep_records = "180d"
            [timeouts]
            freeze_ms = 700
            [volumes.shared]
            provider = "btrfs"
            subvolume = "/mnt/s/data"
            snapshots = "/mnt/s/.snapshots"
        "#;
        let c = Config::parse(text, Path::new("b.toml")).unwrap();
        let d = c.deadlines();
        assert_eq!(d.hold_limit, Duration::from_millis(3000));
        assert_eq!(d.lease, Duration::from_millis(1500));
        assert_eq!(d.freeze, Duration::from_millis(700));
        assert_eq!(d.prepare, Deadlines::default().prepare);
        assert!(matches!(c.volumes["shared"], ProviderConfig::Btrfs { .. }));
        assert_eq!(c.keep_records, Some(Duration::from_secs(180 * 86400)));
    }

    #[test]
    fn refuses_what_cannot_work() {
        let e = Config::parse("hold_limit_ms = 5", Path::new("b.toml")).unwrap_err();
        assert!(e.to_string().contains("missing field `catalog`"), "{e}");
        let e = Config::parse("catalog = \"c\"\nlease_ms = 3", Path::new("b.toml")).unwrap_err();
        assert!(e.to_string().contains("lease_ms: 3 is out of range"), "{e}");
        let e = Config::parse("catalog = \"c\"\nbogus = 1", Path::new("b.toml")).unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = Config::parse(
            "catalog = \"c\"\nkeep_records = \"soon\"",
            Path::new("b.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"soon\" is not a duration"), "{e}");
    }
}
