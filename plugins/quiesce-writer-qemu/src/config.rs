//! The plugin's table, `[plugins.qemu]`.

use quiesce_sdk::{Config, Error, Level, WriterMetadata};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where the guests' sockets are: `<vm>.agent.sock` (the guest agent's chardev) and
    /// `<vm>.qmp.sock` (QEMU's monitor) for each VM.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: PathBuf,
    /// Also the running domains of this libvirt connection (`qemu:///system`), through `virsh`.
    #[serde(default)]
    pub libvirt_uri: Option<String>,
    /// The host volumes guests' disks may lie on; a guest gets a writer when one of its disk
    /// images does.
    pub volumes: Vec<Volume>,
    /// Writer ids are this followed by the VM's name.
    #[serde(default = "default_id_prefix")]
    pub id_prefix: String,
    /// The freeze level of every writer of the plugin.
    #[serde(default = "default_level")]
    pub level: Level,
    /// The longest init waits for one VM's QMP socket (its name, UUID and disks).
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
    /// After a thaw that did not reach the guest, how often the writer tries again in the
    /// background (each try waits at most twice this, at least 2 s, for the agent).
    #[serde(default = "default_thaw_retry_ms")]
    pub thaw_retry_ms: u64,
    /// What a set does about a guest on the volume that started after the host loaded the
    /// plugin (the host cannot add writers of a running plugin): `fail` the set naming it, or
    /// `ignore` it (its disks are then only crash-consistent in the snapshot).
    #[serde(default)]
    pub new_guests: NewGuests,
}

/// One host volume, as the host's `[volumes.<name>]` names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    /// The tree a snapshot of the volume holds (the btrfs provider's `subvolume`, or the
    /// volume's mount point).
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewGuests {
    #[default]
    Fail,
    Ignore,
}

fn default_socket_dir() -> PathBuf {
    "/run/quiesce-qemu".into()
}
fn default_id_prefix() -> String {
    "qemu-".into()
}
fn default_level() -> Level {
    Level::System
}
fn default_query_timeout_ms() -> u64 {
    5000
}
fn default_thaw_retry_ms() -> u64 {
    1000
}

impl Settings {
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }

    pub fn thaw_retry(&self) -> Duration {
        Duration::from_millis(self.thaw_retry_ms)
    }
}

/// Reads and checks the plugin's table.
pub fn parse(config: &Config) -> Result<Settings, Error> {
    let settings: Settings = config.deserialize()?;
    let refuse = |m: String| Err(Error::invalid_config(m));
    if !settings.socket_dir.is_absolute() {
        return refuse(format!(
            "`socket_dir` {} is not an absolute path",
            settings.socket_dir.display()
        ));
    }
    if settings
        .libvirt_uri
        .as_deref()
        .is_some_and(|u| u.trim().is_empty())
    {
        return refuse(
            "`libvirt_uri` is empty: give a URI such as qemu:///system, or leave it out".into(),
        );
    }
    if settings.volumes.is_empty() {
        return refuse(
            "`volumes` is empty: add a `[[plugins.qemu.volumes]]` table (name, path) for each \
             host volume that holds guests' disks"
                .into(),
        );
    }
    let mut names = BTreeSet::new();
    for v in &settings.volumes {
        if v.name.trim().is_empty() {
            return refuse(
                "a volume's `name` is empty: name it as the host's [volumes.<name>]".into(),
            );
        }
        if !v.path.is_absolute() {
            return refuse(format!(
                "volume {}: `path` {} is not an absolute path",
                v.name,
                v.path.display()
            ));
        }
        if !names.insert(v.name.as_str()) {
            return refuse(format!("volume {} is listed twice", v.name));
        }
    }
    // The prefix must make valid ids with a name after it.
    if let Err(e) =
        WriterMetadata::new(format!("{}x", settings.id_prefix), "x", Level::System).validate()
    {
        return refuse(format!("`id_prefix` {:?}: {e}", settings.id_prefix));
    }
    if settings.query_timeout_ms == 0 || settings.thaw_retry_ms == 0 {
        return refuse("`query_timeout_ms` and `thaw_retry_ms` must be more than 0".into());
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Settings, Error> {
        parse(&Config::from_toml(text).unwrap())
    }

    #[test]
    fn defaults_and_refusals() {
        let s = parse_text("[[volumes]]\nname = \"shared\"\npath = \"/srv/vms\"").unwrap();
        assert_eq!(s.socket_dir, PathBuf::from("/run/quiesce-qemu"));
        assert_eq!(s.level, Level::System);
        assert_eq!(s.new_guests, NewGuests::Fail);
        assert_eq!(s.id_prefix, "qemu-");

        for (text, needle) in [
            ("volumes = []", "`volumes` is empty"),
            ("[[volumes]]\nname = \"a\"\npath = \"rel\"", "not an absolute path"),
            (
                "[[volumes]]\nname = \"a\"\npath = \"/a\"\n[[volumes]]\nname = \"a\"\npath = \"/b\"",
                "listed twice",
            ),
            (
                "id_prefix = \"a b\"\n[[volumes]]\nname = \"a\"\npath = \"/a\"",
                "`id_prefix`",
            ),
            ("socket = 1", "unknown field `socket`"),
            (
                "libvirt_uri = \" \"\n[[volumes]]\nname = \"a\"\npath = \"/a\"",
                "`libvirt_uri` is empty",
            ),
            (
                "new_guests = \"maybe\"\n[[volumes]]\nname = \"a\"\npath = \"/a\"",
                "unknown variant",
            ),
        ] {
            let e = parse_text(text).unwrap_err();
            assert!(e.is_invalid_config() && e.message().contains(needle), "{needle}: {e}");
        }
    }
}
