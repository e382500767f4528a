use crate::{run, snapshot_path, Provider, ProviderError, SnapshotInfo};
use std::ffi::OsStr;
use std::path::PathBuf;

/// Snapshots one btrfs subvolume with `btrfs subvolume snapshot` (atomic, flushes the
/// subvolume's dirty data itself, needs no fsfreeze). Nested subvolumes are not included.
#[derive(Debug, Clone)]
pub struct Btrfs {
    subvolume: PathBuf,
    snapshots: PathBuf,
}

impl Btrfs {
    pub fn new(subvolume: PathBuf, snapshots: PathBuf) -> Self {
        Btrfs {
            subvolume,
            snapshots,
        }
    }
}

impl Provider for Btrfs {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        let target = snapshot_path("btrfs", &self.snapshots, set_id)?;
        // Writable: writers may still write their part (a backup label) in post-snapshot.
        run(
            "btrfs",
            "btrfs",
            &[
                OsStr::new("subvolume"),
                OsStr::new("snapshot"),
                self.subvolume.as_os_str(),
                target.as_os_str(),
            ],
        )?;
        Ok(SnapshotInfo {
            id: set_id.to_string(),
            path: target.to_string_lossy().into_owned(),
            provider: "btrfs".into(),
        })
    }

    fn finalize(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        run(
            "btrfs",
            "btrfs",
            &[
                OsStr::new("property"),
                OsStr::new("set"),
                OsStr::new("-ts"),
                OsStr::new(&snapshot.path),
                OsStr::new("ro"),
                OsStr::new("true"),
            ],
        )
    }

    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        run(
            "btrfs",
            "btrfs",
            &[
                OsStr::new("subvolume"),
                OsStr::new("delete"),
                OsStr::new(&snapshot.path),
            ],
        )
    }
}
