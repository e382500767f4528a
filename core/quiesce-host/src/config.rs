//! The host's TOML configuration.
//!
//! ```toml
//! node = "node1"                        # default: the machine's host name
//! plugin_dir = "/usr/lib/quiesce/plugins"
//! hold_limit_ms = 10000                 # longest a writer stays frozen; then the host thaws it
//!
//! [timeouts]                            # per call, in milliseconds
//! prepare_ms = 60000
//! freeze_ms = 10000
//! thaw_ms = 10000
//! post_snapshot_ms = 60000
//! abort_ms = 10000
//! provider_ms = 60000
//!
//! [volumes.shared]                      # a volume this node can snapshot
//! provider = "btrfs"                    # or "dir-copy"
//! subvolume = "/mnt/shared/data"
//! snapshots = "/mnt/shared/.snapshots"
//!
//! [plugins.hello]                       # handed as a table to the plugin named "hello"
//! volume = "shared"
//! ```

use quiesce_proto::{Deadlines, Timeouts};
use quiesce_provider::ProviderConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name in the cluster; defaults to the host name.
    #[serde(default = "default_node")]
    pub node: String,
    /// Every `*.so` file here is loaded as a plugin.
    pub plugin_dir: Option<PathBuf>,
    #[serde(default = "default_hold_limit")]
    pub hold_limit_ms: u64,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub volumes: BTreeMap<String, ProviderConfig>,
    /// Per-plugin configuration tables, by plugin name.
    #[serde(default)]
    pub plugins: BTreeMap<String, toml::Table>,
}

fn default_hold_limit() -> u64 {
    Deadlines::default().hold_limit.as_millis() as u64
}

fn default_node() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {cause}")]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("the configuration {path} is not valid: {cause}")]
    Parse {
        path: PathBuf,
        #[source]
        cause: toml::de::Error,
    },
    #[error("the configuration {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.into(),
            cause,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|cause| ConfigError::Parse {
            path: path.into(),
            cause,
        })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.into(),
            reason,
        };
        if config.hold_limit_ms == 0 {
            return Err(invalid("hold_limit_ms must be more than 0".into()));
        }
        if !quiesce_proto::metadata::is_valid_id(&config.node) {
            return Err(invalid(format!(
                "node {:?} is not a valid node name: use letters, digits, '-', '_' or '.'",
                config.node
            )));
        }
        Ok(config)
    }

    /// The deadlines every set on this node runs under.
    pub fn deadlines(&self) -> Deadlines {
        // Local sets need no lease: the driver is this process.
        self.timeouts
            .deadlines(self.hold_limit(), Deadlines::default().lease)
    }

    pub fn hold_limit(&self) -> Duration {
        Duration::from_millis(self.hold_limit_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let text = r#"
            node = "n1"
            plugin_dir = "/plugins"
            hold_limit_ms = 2500
            [timeouts]
            freeze_ms = 700
            [volumes.shared]
            provider = "btrfs"
            subvolume = "/mnt/s/data"
            snapshots = "/mnt/s/.snapshots"
            [plugins.hello]
            volume = "shared"
        "#;
        let c = Config::parse(text, Path::new("test.toml")).unwrap();
        assert_eq!(c.node, "n1");
        let d = c.deadlines();
        assert_eq!(d.hold_limit, Duration::from_millis(2500));
        assert_eq!(d.freeze, Duration::from_millis(700));
        assert_eq!(d.prepare, Deadlines::default().prepare);
        assert!(matches!(c.volumes["shared"], ProviderConfig::Btrfs { .. }));
        assert_eq!(c.plugins["hello"]["volume"].as_str(), Some("shared"));
    }

    #[test]
    fn refuses_unknown_keys_and_zero_hold_limit() {
        let err = Config::parse("hold_limit = 3", Path::new("c.toml")).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `hold_limit`"),
            "{err}"
        );
        let err = Config::parse("hold_limit_ms = 0", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("more than 0"), "{err}");
    }
}
