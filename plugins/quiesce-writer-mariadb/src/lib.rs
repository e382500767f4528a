//! The MariaDB writer plugin (`mariadb`): makes snapshots of a volume holding a MariaDB (or
//! MySQL) server's files consistent for it, and says which binlog position, GTID and InnoDB LSN
//! the snapshot holds. See README.md for the configuration.
//!
//! - **prepare**: one session for the set (on a thread of its own, so that every wait keeps to
//!   the call's deadline whatever the server does); asks the server where its files are and
//!   **refuses** (before anything freezes) when the data directory, the binlog, the InnoDB
//!   redo/undo/system files, the Aria log or a table's `DATA DIRECTORY` lies off the snapshotted
//!   volume; checks the account may read the binlog position; `FLUSH LOCAL TABLES`, so that the
//!   freeze has little left to flush. `LOCAL`: a plain `FLUSH TABLES` is written to the binlog,
//!   which gives it a GTID of its own and moves the position a freeze reports.
//! - **freeze**: on MariaDB 10.4+ `BACKUP STAGE START`, `FLUSH`, `BLOCK_DDL`, `BLOCK_COMMIT` (on
//!   MySQL and older servers `FLUSH TABLES WITH READ LOCK`) on that session, held until thaw; then
//!   the binlog file and position, `@@gtid_binlog_pos` / `@@gtid_current_pos` and the InnoDB LSN,
//!   reported; `FLUSH LOCAL ENGINE LOGS`; and with `innodb_flush_log_at_trx_commit = 0` (InnoDB
//!   writes its log about once a second, and FLUSH ENGINE LOGS does not write it) a wait until
//!   the log is flushed up to that LSN, so that every commit it covers is in the files.
//! - **thaw**: `BACKUP STAGE END` / `UNLOCK TABLES`, idempotent. A session found gone at thaw
//!   (server restarted, session killed) **fails** the call: the server released the lock when
//!   the session ended, maybe before the snapshot.
//! - **abort**: releases whatever prepare and freeze set up, in any state; idempotent.

mod layout;
mod session;
mod writer;

use quiesce_sdk::{Config, Error, Level, Writer, WriterMetadata};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use session::Server;
pub use writer::MariadbWriter;

/// One server: a `[plugins.mariadb]` table, or one of its `[[plugins.mariadb.writers]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The writer's id on this node.
    #[serde(default = "default_id")]
    pub id: String,
    /// The server's Unix socket. The default when neither `socket` nor `host` is given.
    pub socket: Option<PathBuf>,
    /// A host name or address to connect to over TCP instead (no TLS).
    pub host: Option<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// A file holding the account's password (its first line), read at each connection.
    pub password_file: Option<PathBuf>,
    /// The data directory, as a check: prepare refuses when the server reports another one (the
    /// writer is pointed at the wrong server).
    pub datadir: Option<PathBuf>,
    /// The name of the volume the server's files live on, as the host's `[volumes.<name>]`.
    pub volume: String,
    /// Where that volume is mounted on this node.
    pub volume_path: PathBuf,
    /// The subvolume the provider snapshots (the btrfs provider's `subvolume`), when that is not
    /// the whole volume: only what lies under it is in a snapshot.
    pub subvolume: Option<PathBuf>,
    /// How the freeze holds the server.
    #[serde(default)]
    pub lock: LockMethod,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// An upper bound on every statement; each is bounded by its call's budget anyway.
    pub statement_timeout_ms: Option<u64>,
}

/// How the freeze holds the server still.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMethod {
    /// `backup_stage` on MariaDB 10.4 and later, else `ftwrl`.
    #[default]
    Auto,
    /// `BACKUP STAGE START` … `BLOCK_COMMIT` (MariaDB 10.4+).
    BackupStage,
    /// `FLUSH TABLES WITH READ LOCK` (any server).
    Ftwrl,
}

fn default_id() -> String {
    "mariadb".into()
}
fn default_port() -> u16 {
    3306
}
fn default_user() -> String {
    "root".into()
}
fn default_connect_timeout_ms() -> u64 {
    5000
}

/// Where Debian's (and most distributions') server listens.
pub const DEFAULT_SOCKET: &str = "/run/mysqld/mysqld.sock";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Several {
    writers: Vec<Settings>,
}

/// Reads and checks the plugin's table: one server, or several under `writers`.
pub fn parse(config: &Config) -> Result<Vec<Settings>, Error> {
    let all = if config.table().contains_key("writers") {
        config
            .deserialize::<Several>()
            .map_err(|e| {
                e.context(
                    "with `writers`, every key goes into the `[[plugins.mariadb.writers]]` tables",
                )
            })?
            .writers
    } else {
        vec![config.deserialize::<Settings>()?]
    };
    if all.is_empty() {
        return Err(Error::invalid_config(
            "`writers` is empty: add a `[[plugins.mariadb.writers]]` table per server",
        ));
    }
    let mut ids = BTreeSet::new();
    for settings in &all {
        settings.validate()?;
        if !ids.insert(settings.id.as_str()) {
            return Err(Error::invalid_config(format!(
                "two writers have the id {:?}: give each `[[plugins.mariadb.writers]]` its own `id`",
                settings.id
            )));
        }
    }
    Ok(all)
}

impl Settings {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let refuse = |m: String| Err(Error::invalid_config(format!("writer {}: {m}", self.id)));
        if let Err(e) = WriterMetadata::new(&self.id, "MariaDB", Level::BackEnd).validate() {
            return Err(Error::invalid_config(e.to_string()));
        }
        if self.volume.trim().is_empty() {
            return refuse("`volume` is empty: name the volume the server's files live on".into());
        }
        let absolute = |key: &str, path: &Path| {
            if path.is_absolute() {
                Ok(())
            } else {
                refuse(format!(
                    "`{key}` {} is not an absolute path: write it from the root",
                    path.display()
                ))
            }
        };
        absolute("volume_path", &self.volume_path)?;
        if let Some(sub) = &self.subvolume {
            if !sub.is_absolute() || !sub.starts_with(&self.volume_path) {
                return refuse(format!(
                    "`subvolume` {} must be an absolute path under `volume_path` {}",
                    sub.display(),
                    self.volume_path.display()
                ));
            }
        }
        for (key, path) in [
            ("socket", &self.socket),
            ("password_file", &self.password_file),
            ("datadir", &self.datadir),
        ] {
            if let Some(path) = path {
                absolute(key, path)?;
            }
        }
        if self.socket.is_some() && self.host.is_some() {
            return refuse(
                "both `socket` and `host` are set: give the Unix socket, or the host and port \
                 to reach over TCP, not both"
                    .into(),
            );
        }
        if matches!(&self.host, Some(h) if h.trim().is_empty()) {
            return refuse("`host` is empty: give a host name or address, or leave it out".into());
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
    pub fn snapshot_root(&self) -> &Path {
        self.subvolume.as_deref().unwrap_or(&self.volume_path)
    }

    fn target(&self) -> session::Target {
        let endpoint = match &self.host {
            Some(host) => session::Endpoint::Tcp {
                host: host.clone(),
                port: self.port,
            },
            None => session::Endpoint::Socket(
                self.socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            ),
        };
        session::Target {
            endpoint,
            user: self.user.clone(),
            password_file: self.password_file.clone(),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            statement_timeout: self.statement_timeout_ms.map(Duration::from_millis),
        }
    }
}

/// Makes one writer per configured server.
///
/// An unreachable server does not fail init (the host would then run sets of the volume without
/// this writer): the writer claims its volume and its prepare fails, naming the problem, until
/// the server answers.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    Ok(parse(config)?
        .into_iter()
        .map(|settings| Box::new(MariadbWriter::new(settings)) as Box<dyn Writer>)
        .collect())
}

quiesce_sdk::export_plugin!(name: "mariadb", init: init);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Vec<Settings>, Error> {
        parse(&Config::from_toml(text)?)
    }

    #[test]
    fn defaults_one_server_and_several() {
        let s = parse_text("volume = \"shared\"\nvolume_path = \"/mnt/shared\"").unwrap();
        assert_eq!(s.len(), 1);
        let s = &s[0];
        assert_eq!(
            (s.id.as_str(), s.user.as_str(), s.port),
            ("mariadb", "root", 3306)
        );
        assert_eq!(s.lock, LockMethod::Auto);
        assert_eq!(s.snapshot_root(), Path::new("/mnt/shared"));
        assert_eq!(
            s.target().describe(),
            "the server at socket /run/mysqld/mysqld.sock (user root)"
        );

        let several = parse_text(
            "[[writers]]\nid = \"a\"\nvolume = \"v\"\nvolume_path = \"/mnt/v\"\nsubvolume = \"/mnt/v/data\"\nlock = \"ftwrl\"\n\
             [[writers]]\nid = \"b\"\nhost = \"db1\"\nport = 3307\nuser = \"quiesce\"\npassword_file = \"/etc/quiesce/pw\"\nvolume = \"v\"\nvolume_path = \"/mnt/v\"\n",
        )
        .unwrap();
        assert_eq!(several.len(), 2);
        assert_eq!(several[0].lock, LockMethod::Ftwrl);
        assert_eq!(several[0].snapshot_root(), Path::new("/mnt/v/data"));
        assert_eq!(
            several[1].target().describe(),
            "the server at db1:3307 (user quiesce)"
        );
    }

    #[test]
    fn bad_configurations_are_refused_naming_the_key() {
        let base = "volume = \"s\"\nvolume_path = \"/mnt/s\"\n";
        let cases = [
            (
                "volume_path = \"/mnt/shared\"".to_string(),
                "missing field `volume`",
            ),
            (
                "volume = \"s\"\nvolume_path = \"mnt\"".into(),
                "`volume_path`",
            ),
            (format!("{base}subvolume = \"/elsewhere\""), "`subvolume`"),
            (
                format!("{base}lock = \"exclusive\""),
                "unknown variant `exclusive`",
            ),
            (format!("{base}prot = 1"), "unknown field `prot`"),
            (format!("{base}connect_timeout_ms = 0"), "more than 0"),
            (format!("{base}socket = \"/s\"\nhost = \"h\""), "not both"),
            (format!("{base}socket = \"mysqld.sock\""), "`socket`"),
            (format!("{base}password_file = \"pw\""), "`password_file`"),
            (format!("{base}id = \"a b\""), "a b"),
            ("writers = []".into(), "`writers` is empty"),
            (
                format!("[[writers]]\n{base}[[writers]]\n{base}"),
                "two writers have the id \"mariadb\"",
            ),
        ];
        for (text, needle) in cases {
            let error = parse_text(&text).unwrap_err();
            assert!(error.is_invalid_config(), "{text}: {error}");
            assert!(error.message().contains(needle), "{text}: {error}");
        }
    }
}
