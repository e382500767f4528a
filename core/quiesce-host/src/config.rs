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
        if !quiesce_proto::is_valid_node_name(&self.node) {
            return Err(ConfigError::invalid(
                path,
                "node",
                format!(
                    "{:?} is not a valid node name: {}",
                    self.node,
                    quiesce_proto::NODE_NAME_RULE
                ),
            ));
        }
        Ok(())
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
        assert!(
            err.to_string().contains("hold_limit_ms: 0 is out of range"),
            "{err}"
        );
        let err = Config::parse("node = \"-n1\"", Path::new("c.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("node: \"-n1\" is not a valid node name"),
            "{err}"
        );
    }
}
