//! The host's TOML configuration.
//!
//! ```toml
//! node = "node1"                        # default: the machine's host name
//! plugin_dir = "/usr/lib/quiesce/plugins"
//! hold_limit_ms = 10000                 # longest a writer stays frozen; then the host thaws it
//!
//! [timeouts]                            # per call, in milliseconds
//! prepare_ms = 60000
//! freeze_ms = 5000                      # below hold_limit_ms, or it ends at the hold limit
//! thaw_ms = 10000
//! post_snapshot_ms = 60000
//! abort_ms = 10000
//! provider_ms = 60000
//!
//! [volumes.shared]                      # a volume this node mounts, or can snapshot, or both
//! mount = "/mnt/shared"                 # this node's mount of it: flushed in every set
//! flush = "syncfs"                      # or "fifreeze" (GFS2, OCFS2, XFS, ext4), or "none"
//! provider = "btrfs"                    # for local sets (`--once`, RunLocalSet): or "dir-copy", …
//! subvolume = "/mnt/shared/data"
//! snapshots = "/mnt/shared/.snapshots"
//!
//! [plugins.hello]                       # handed as a table to the plugin named "hello"
//! volume = "shared"
//! ```

use crate::volume_flush::FlushMode;
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
    pub volumes: BTreeMap<String, VolumeConfig>,
    /// Per-plugin configuration tables, by plugin name.
    #[serde(default)]
    pub plugins: BTreeMap<String, toml::Table>,
    /// How long one plugin's init may take before it is skipped.
    #[serde(default = "default_plugin_init")]
    pub plugin_init_ms: u64,
    /// How many calls to application writers the host has out at once: keep it below the bus's
    /// `max_replies_per_connection` (128 in dbus-daemon's defaults).
    #[serde(default = "default_app_calls")]
    pub app_calls_in_flight: usize,
}

/// One `[volumes.NAME]` table: this node's mount of the volume (flushed inside every set's
/// freeze) and the provider of the host's own local sets, each optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct VolumeConfig {
    /// Where this node mounts the volume; its flush writer `flush.NAME` serves sets of it.
    pub mount: Option<PathBuf>,
    pub flush: FlushMode,
    /// How this host snapshots the volume itself (`--once`, `RunLocalSet`).
    pub provider: Option<ProviderConfig>,
}

impl TryFrom<toml::Table> for VolumeConfig {
    type Error = String;

    fn try_from(mut table: toml::Table) -> Result<Self, String> {
        let mount = match table.remove("mount") {
            None => None,
            Some(toml::Value::String(s)) => Some(PathBuf::from(s)),
            Some(v) => return Err(format!("mount = {v} must be a path (a string)")),
        };
        let flush_given = table.contains_key("flush");
        let flush = match table.remove("flush") {
            None => FlushMode::default(),
            Some(v) => FlushMode::deserialize(v.clone()).map_err(|_| {
                format!("flush = {v}: must be \"syncfs\" (the default), \"fifreeze\" or \"none\"")
            })?,
        };
        if mount.is_none() && flush_given {
            return Err("flush is set but mount is not: give this node's mount point of the volume (mount = \"/mnt/…\")".into());
        }
        let provider = if table.is_empty() {
            None
        } else if !table.contains_key("provider") {
            let keys: Vec<&String> = table.keys().collect();
            return Err(format!(
                "unknown key(s) {keys:?}: a volume table takes mount, flush, and a provider's keys after provider = \"…\""
            ));
        } else {
            Some(ProviderConfig::deserialize(table).map_err(|e| e.to_string())?)
        };
        if mount.is_none() && provider.is_none() {
            return Err("the table is empty: give mount (this node's mount point of the volume), or a provider, or both".into());
        }
        if flush == FlushMode::Fifreeze && provider.is_some() {
            return Err("flush = \"fifreeze\" with a provider: the host's own snapshot would wait on the frozen file system; a FIFREEZE flush is for the nodes of a cluster file system whose snapshot the broker's provider takes (drop provider here, or use flush = \"syncfs\")".into());
        }
        Ok(VolumeConfig {
            mount,
            flush,
            provider,
        })
    }
}

fn default_app_calls() -> usize {
    64
}

fn default_plugin_init() -> u64 {
    crate::plugins::DEFAULT_INIT_TIMEOUT.as_millis() as u64
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
        if !(1..=4096).contains(&self.app_calls_in_flight) {
            return Err(ConfigError::invalid(
                path,
                "app_calls_in_flight",
                format!(
                    "{} is out of range: it must be 1 to 4096, and below the bus's max_replies_per_connection",
                    self.app_calls_in_flight
                ),
            ));
        }
        if !(100..=600_000).contains(&self.plugin_init_ms) {
            return Err(ConfigError::invalid(
                path,
                "plugin_init_ms",
                format!(
                    "{} is out of range: it must be 100 to 600000 (a plugin's init that takes longer is skipped)",
                    self.plugin_init_ms
                ),
            ));
        }
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

    /// The keys (and tables) in which `other` differs from this configuration, in file order:
    /// what a SIGHUP found changed.
    pub fn changes(&self, other: &Config) -> Vec<String> {
        let mut changed = vec![];
        let mut key = |name: &str, differs: bool| {
            if differs {
                changed.push(name.to_string());
            }
        };
        key("node", self.node != other.node);
        key("plugin_dir", self.plugin_dir != other.plugin_dir);
        key("hold_limit_ms", self.hold_limit_ms != other.hold_limit_ms);
        key(
            "plugin_init_ms",
            self.plugin_init_ms != other.plugin_init_ms,
        );
        key(
            "app_calls_in_flight",
            self.app_calls_in_flight != other.app_calls_in_flight,
        );
        key("[timeouts]", self.timeouts != other.timeouts);
        changed.extend(quiesce_daemon::signals::table_changes(
            "volumes",
            &self.volumes,
            &other.volumes,
        ));
        changed.extend(quiesce_daemon::signals::table_changes(
            "plugins",
            &self.plugins,
            &other.plugins,
        ));
        changed
    }

    /// The deadlines every set on this node runs under.
    pub fn deadlines(&self) -> Deadlines {
        // Local sets need no lease: the driver is this process.
        self.timeouts
            .deadlines(self.hold_limit(), Deadlines::default().lease)
    }

    pub fn plugin_init_timeout(&self) -> Duration {
        Duration::from_millis(self.plugin_init_ms)
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
        assert!(matches!(
            c.volumes["shared"].provider,
            Some(ProviderConfig::Btrfs { .. })
        ));
        assert_eq!(c.volumes["shared"].mount, None);
        assert_eq!(c.plugins["hello"]["volume"].as_str(), Some("shared"));
    }

    #[test]
    fn a_volume_table_takes_a_mount_a_flush_and_a_provider() {
        let parse = |body: &str| {
            Config::parse(&format!("[volumes.shared]\n{body}"), Path::new("c.toml"))
                .map(|c| c.volumes["shared"].clone())
                .map_err(|e| e.to_string())
        };
        let v = parse("mount = \"/mnt/shared\"").unwrap();
        assert_eq!(v.mount.as_deref(), Some(Path::new("/mnt/shared")));
        assert_eq!((v.flush, v.provider), (FlushMode::Syncfs, None));
        let v = parse("mount = \"/m\"\nflush = \"none\"").unwrap();
        assert_eq!(v.flush, FlushMode::None);
        for (body, says) in [
            ("flush = \"sync\"\nmount = \"/m\"", "must be \"syncfs\""),
            ("", "the table is empty"),
            ("mnt = \"/m\"", "unknown key(s) [\"mnt\"]"),
            ("mount = 3", "must be a path"),
            (
                "mount = \"/m\"\nflush = \"fifreeze\"\nprovider = \"dir-copy\"\nsource = \"/a\"\nsnapshots = \"/b\"",
                "would wait on the frozen file system",
            ),
        ] {
            let err = parse(body).unwrap_err();
            assert!(err.contains(says), "{body:?}: {err}");
        }
    }

    #[test]
    fn changes_name_each_key_and_table_that_differs() {
        let parse = |text: &str| Config::parse(text, Path::new("c.toml")).unwrap();
        let a = parse("node = \"n1\"\n[volumes.a]\nmount = \"/a\"\n[plugins.p]\nx = 1\n");
        assert_eq!(a.changes(&a.clone()), Vec::<String>::new());
        let b = parse(
            "node = \"n1\"\nhold_limit_ms = 3000\n[timeouts]\nfreeze_ms = 900\n[volumes.b]\nmount = \"/b\"\n[plugins.p]\nx = 2\n",
        );
        assert_eq!(
            a.changes(&b),
            [
                "hold_limit_ms",
                "[timeouts]",
                "[volumes.a]",
                "[volumes.b]",
                "[plugins.p]"
            ]
        );
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
