//! The plugin's table, `[plugins.sqlite]`: one set of databases, or several under `writers`.

use quiesce_sdk::{Config, Error, Level, WriterMetadata};
use serde::Deserialize;
use std::collections::BTreeSet;

/// One writer: a set of databases frozen together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSet {
    /// The writer id (unique on the node).
    #[serde(default = "default_id")]
    pub id: String,
    /// The host's name of the volume the databases lie on (`[volumes.<name>]`).
    pub volume: String,
    /// Absolute paths or glob patterns (`/srv/app/*.db`) of the database files.
    pub databases: Vec<String>,
    /// The longest a call waits for a lock of one database; always also bounded by the call's
    /// own deadline.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// A read-only query run inside the held write transaction at freeze, whose first column is
    /// reported per database (e.g. `SELECT max(id) FROM orders`: the last order the snapshot
    /// holds).
    #[serde(default)]
    pub report_query: Option<String>,
}

fn default_id() -> String {
    "sqlite".into()
}

fn default_busy_timeout_ms() -> u64 {
    5000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Several {
    writers: Vec<DatabaseSet>,
}

/// Reads and checks the plugin's table.
pub fn parse(config: &Config) -> Result<Vec<DatabaseSet>, Error> {
    let sets =
        if config.table().contains_key("writers") {
            config.deserialize::<Several>().map_err(|e| {
            e.context("with `writers`, every key goes into the `[[plugins.sqlite.writers]]` tables")
        })?
        .writers
        } else {
            vec![config.deserialize::<DatabaseSet>()?]
        };
    if sets.is_empty() {
        return Err(Error::invalid_config(
            "`writers` is empty: add a `[[plugins.sqlite.writers]]` table per set of databases",
        ));
    }
    let mut ids = BTreeSet::new();
    for set in &sets {
        check(set)?;
        if !ids.insert(set.id.as_str()) {
            return Err(Error::invalid_config(format!(
                "two writers have the id {:?}: give each `[[plugins.sqlite.writers]]` its own `id`",
                set.id
            )));
        }
    }
    Ok(sets)
}

fn check(set: &DatabaseSet) -> Result<(), Error> {
    let refuse = |what: String| Err(Error::invalid_config(format!("writer {}: {what}", set.id)));
    // The protocol's own rules for ids; checked here so that init, not the host, refuses them.
    if let Err(e) = WriterMetadata::new(&set.id, "SQLite", Level::BackEnd).validate() {
        return Err(Error::invalid_config(e.to_string()));
    }
    if set.volume.trim().is_empty() {
        return refuse("`volume` is empty: name the host volume the databases lie on".into());
    }
    if set.databases.is_empty() {
        return refuse("`databases` is empty: list database paths or glob patterns".into());
    }
    for pattern in &set.databases {
        if !pattern.starts_with('/') {
            return refuse(format!(
                "database {pattern:?} is not an absolute path: write it from the root (`/srv/app/*.db`)"
            ));
        }
        if let Err(e) = glob::Pattern::new(pattern) {
            return refuse(format!(
                "database pattern {pattern:?} is not a valid glob: {e}"
            ));
        }
    }
    if set.busy_timeout_ms == 0 {
        return refuse(
            "`busy_timeout_ms` is 0: a lock held by a committing application must be waited for; \
             leave it out for the default (5000)"
                .into(),
        );
    }
    if matches!(&set.report_query, Some(q) if q.trim().is_empty()) {
        return refuse("`report_query` is empty: give a query or leave the key out".into());
    }
    Ok(())
}

/// Whether `pattern` has no glob metacharacters (a plain path).
pub fn is_literal(pattern: &str) -> bool {
    glob::Pattern::escape(pattern) == pattern
}
