//! The PostgreSQL writer plugin (`postgres`): makes snapshots of a volume holding a PostgreSQL
//! cluster consistent for it. See README.md for the configuration.
//!
//! Two modes:
//!
//! - **`snapshot`** (default): an atomic snapshot of one volume holding the data directory,
//!   `pg_wal` and every tablespace is crash-safe — PostgreSQL replays its WAL on start. Prepare
//!   asks the server where those are and **refuses** (before anything freezes) when any of them
//!   lies off the snapshotted volume, then runs `CHECKPOINT` when more than `checkpoint_after_wal_mb` of WAL would need replay; freeze records
//!   `pg_current_wal_flush_lsn()` (`wal_flush_lsn`): every commit up to it is in the snapshot.
//! - **`backup_api`**: `pg_backup_start(label, fast => true)` in prepare on one session held open
//!   through the set, `pg_backup_stop(wait_for_archive => true)` at thaw, and its `labelfile` /
//!   `spcmapfile` written byte for byte into the snapshot as `backup_label` / `tablespace_map` in
//!   post-snapshot. A restore needs the archived WAL.
//!
//! A lost connection fails the call, and so the set. Every statement keeps to the call's budget.

mod layout;
mod session;
mod writer;

use quiesce_sdk::{Config, Error, Writer};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

pub use writer::PostgresWriter;

/// The plugin's table, `[plugins.postgres]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The writer's id on this node.
    #[serde(default = "default_id")]
    pub id: String,
    /// A Unix-socket directory (starts with `/`) or a host name / address.
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    pub password: Option<String>,
    #[serde(default = "default_dbname")]
    pub dbname: String,
    /// The name of the volume the cluster lives on, as the host's `[volumes.<name>]`.
    pub volume: String,
    /// Where that volume is mounted on this node.
    pub volume_path: PathBuf,
    /// The subvolume the provider snapshots (the btrfs provider's `subvolume`), when that is not
    /// the whole volume: only what lies under it is in a snapshot, and a snapshot's root is it.
    pub subvolume: Option<PathBuf>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// An upper bound on every statement; each is bounded by its call's budget anyway.
    pub statement_timeout_ms: Option<u64>,
    /// Snapshot mode: prepare runs `CHECKPOINT` only when more WAL than this (in MiB) was written
    /// since the last checkpoint began — the replay a restore of the snapshot would need. An
    /// immediate checkpoint flushes every dirty buffer and makes the next write of each page log
    /// a full image, which applications feel; below the threshold the replay is short anyway.
    /// 0: a checkpoint at every set.
    #[serde(default = "default_checkpoint_after_wal_mb")]
    pub checkpoint_after_wal_mb: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Snapshot,
    BackupApi,
}

fn default_id() -> String {
    "postgres".into()
}
fn default_host() -> String {
    "/var/run/postgresql".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_dbname() -> String {
    "postgres".into()
}
fn default_connect_timeout_ms() -> u64 {
    5000
}
fn default_checkpoint_after_wal_mb() -> u64 {
    256
}

impl Settings {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let refuse = |m: String| Err(Error::invalid_config(m));
        if self.volume.trim().is_empty() {
            return refuse("`volume` is empty: name the volume the cluster lives on".into());
        }
        if !self.volume_path.is_absolute() {
            return refuse(format!(
                "`volume_path` {} is not an absolute path: give where volume {} is mounted",
                self.volume_path.display(),
                self.volume
            ));
        }
        if let Some(sub) = &self.subvolume {
            if !sub.is_absolute() || !sub.starts_with(&self.volume_path) {
                return refuse(format!(
                    "`subvolume` {} must be an absolute path under `volume_path` {}",
                    sub.display(),
                    self.volume_path.display()
                ));
            }
        }
        if self.connect_timeout_ms == 0 || self.statement_timeout_ms == Some(0) {
            return refuse(
                "`connect_timeout_ms` and `statement_timeout_ms` must be more than 0".into(),
            );
        }
        if self.port == 0 {
            return refuse("`port` must not be 0".into());
        }
        Ok(())
    }

    /// What a snapshot of the volume holds: the subvolume, or else the whole volume.
    pub fn snapshot_root(&self) -> &std::path::Path {
        self.subvolume.as_deref().unwrap_or(&self.volume_path)
    }

    fn target(&self) -> session::Target {
        session::Target {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            password: self.password.clone(),
            dbname: self.dbname.clone(),
            application_name: format!("quiesce-writer {}", self.id),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            statement_timeout: self.statement_timeout_ms.map(Duration::from_millis),
        }
    }
}

/// Makes the writer from the plugin's configuration, asking the server where its files are.
///
/// An unreachable server does not fail init (the host would then run sets of the volume without
/// this writer): the writer claims its volume and its prepare fails, naming the problem, until
/// the server answers.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    let settings: Settings = config.deserialize()?;
    settings.validate()?;
    Ok(vec![Box::new(PostgresWriter::new(settings))])
}

quiesce_sdk::export_plugin!(name: "postgres", init: init);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, Error> {
        let s: Settings = Config::from_toml(text)?.deserialize()?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn defaults_and_modes() {
        let s = parse("volume = \"shared\"\nvolume_path = \"/mnt/shared\"").unwrap();
        assert_eq!(s.id, "postgres");
        assert_eq!(s.host, "/var/run/postgresql");
        assert_eq!(
            (s.port, s.user.as_str(), s.dbname.as_str()),
            (5432, "postgres", "postgres")
        );
        assert_eq!(s.mode, Mode::Snapshot);
        assert_eq!(s.snapshot_root(), std::path::Path::new("/mnt/shared"));
        let s = parse(
            "volume = \"shared\"\nvolume_path = \"/mnt/shared\"\nsubvolume = \"/mnt/shared/data\"\nmode = \"backup_api\"",
        )
        .unwrap();
        assert_eq!(s.mode, Mode::BackupApi);
        assert_eq!(s.snapshot_root(), std::path::Path::new("/mnt/shared/data"));
    }

    #[test]
    fn bad_configurations_are_refused_naming_the_key() {
        let cases = [
            ("volume_path = \"/mnt/shared\"", "missing field `volume`"),
            ("volume = \"s\"\nvolume_path = \"mnt\"", "`volume_path`"),
            (
                "volume = \"s\"\nvolume_path = \"/mnt/s\"\nsubvolume = \"/elsewhere\"",
                "`subvolume`",
            ),
            (
                "volume = \"s\"\nvolume_path = \"/mnt/s\"\nmode = \"exclusive\"",
                "unknown variant `exclusive`",
            ),
            (
                "volume = \"s\"\nvolume_path = \"/mnt/s\"\nprot = 1",
                "unknown field `prot`",
            ),
            (
                "volume = \"s\"\nvolume_path = \"/mnt/s\"\nconnect_timeout_ms = 0",
                "more than 0",
            ),
        ];
        for (text, needle) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.is_invalid_config(), "{text}: {error}");
            assert!(error.message().contains(needle), "{text}: {error}");
        }
    }
}
