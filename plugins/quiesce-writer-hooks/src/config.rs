//! The plugin's table, `[plugins.hooks]`: one hook directory, or several under `writers`.

use quiesce_sdk::{Config, Error, Level, WriterMetadata};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// One writer: a directory of hooks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookDir {
    /// The writer id (unique on the node).
    #[serde(default = "default_id")]
    pub id: String,
    /// The directory of hook executables.
    pub directory: PathBuf,
    /// The longest one hook may run; always also bounded by what is left of the call's budget.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The host volume the hooks quiesce; none: every volume (the writer joins every set).
    #[serde(default)]
    pub volume: Option<String>,
    /// The paths on `volume` the hooks protect, for the metadata (informational).
    #[serde(default)]
    pub paths: Vec<String>,
    /// How much of the end of each hook's stdout and of its stderr is kept.
    #[serde(default = "default_output_bytes")]
    pub output_bytes: usize,
}

fn default_id() -> String {
    "hooks".into()
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_output_bytes() -> usize {
    4096
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Several {
    writers: Vec<HookDir>,
}

/// Reads and checks the plugin's table.
pub fn parse(config: &Config) -> Result<Vec<HookDir>, Error> {
    let dirs = if config.table().contains_key("writers") {
        config
            .deserialize::<Several>()
            .map_err(|e| {
                e.context(
                    "with `writers`, every key goes into the `[[plugins.hooks.writers]]` tables",
                )
            })?
            .writers
    } else {
        vec![config.deserialize::<HookDir>()?]
    };
    if dirs.is_empty() {
        return Err(Error::invalid_config(
            "`writers` is empty: add a `[[plugins.hooks.writers]]` table per hook directory",
        ));
    }
    let mut ids = BTreeSet::new();
    for dir in &dirs {
        check(dir)?;
        if !ids.insert(dir.id.as_str()) {
            return Err(Error::invalid_config(format!(
                "two writers have the id {:?}: give each `[[plugins.hooks.writers]]` its own `id`",
                dir.id
            )));
        }
    }
    Ok(dirs)
}

fn check(dir: &HookDir) -> Result<(), Error> {
    let refuse = |what: String| Err(Error::invalid_config(format!("writer {}: {what}", dir.id)));
    if let Err(e) = WriterMetadata::new(&dir.id, "hooks", Level::System).validate() {
        return Err(Error::invalid_config(e.to_string()));
    }
    if !dir.directory.is_absolute() {
        return refuse(format!(
            "`directory` {} is not an absolute path: write it from the root",
            dir.directory.display()
        ));
    }
    if dir.timeout_ms == 0 {
        return refuse("`timeout_ms` is 0: leave it out for the default (30000)".into());
    }
    if dir.output_bytes == 0 || dir.output_bytes > 1 << 20 {
        return refuse(format!(
            "`output_bytes` is {}: keep between 1 and 1048576 bytes of each hook's output",
            dir.output_bytes
        ));
    }
    match &dir.volume {
        Some(v) if v.trim().is_empty() => {
            return refuse("`volume` is empty: name a host volume, or leave the key out".into())
        }
        None if !dir.paths.is_empty() => {
            return refuse("`paths` needs `volume`: say which volume the paths lie on".into())
        }
        _ => {}
    }
    if let Some(p) = dir.paths.iter().find(|p| !p.starts_with('/')) {
        return refuse(format!("path {p:?} in `paths` is not absolute"));
    }
    Ok(())
}
