//! Where a cluster keeps its files, and whether the snapshot of the volume holds them.
//!
//! The server says where its data directory and tablespaces are; `pg_wal` is read from the file
//! system (it may be a symlink to another disk). A path is *in the snapshot* when, resolved, it
//! lies under the tree the provider snapshots (the btrfs subvolume, or the volume's path) **and**
//! on the same file system as that tree's root: btrfs does not take nested subvolumes or other
//! mounts into a snapshot, and those show up as another device number.

use quiesce_sdk::{ComponentKind, Error};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The volume name given to components that lie off the snapshotted volume (their metadata
/// must name some volume; this one matches no configured volume).
pub const OFF_VOLUME: &str = "(off-volume)";

/// One place a cluster keeps files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The component name: `data`, `wal`, `tablespace:<name>`.
    pub name: String,
    pub kind: ComponentKind,
    /// The path as the server (or the `pg_wal` symlink) gives it.
    pub path: PathBuf,
    /// The resolved path (symlinks followed).
    pub real: PathBuf,
    /// Whether the snapshot holds it, and if not why.
    pub placement: Placement,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    InSnapshot,
    /// Not under the snapshotted tree.
    Outside,
    /// Under it, but on another file system or a nested subvolume (device numbers differ).
    OtherFileSystem {
        device: u64,
        root_device: u64,
    },
}

/// The files of one cluster, as found at init or prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `data`, `wal`, then the tablespaces by name.
    pub parts: Vec<Part>,
}

impl Layout {
    pub fn data(&self) -> &Part {
        &self.parts[0]
    }

    /// The parts the snapshot would miss.
    pub fn off_snapshot(&self) -> impl Iterator<Item = &Part> {
        self.parts
            .iter()
            .filter(|p| p.placement != Placement::InSnapshot)
    }
}

/// What the snapshot of the volume holds: the tree under `root`, on `root`'s file system.
#[derive(Debug, Clone)]
pub struct SnapshotRoot {
    /// As configured (for messages).
    pub configured: PathBuf,
    /// Resolved.
    pub real: PathBuf,
    pub device: u64,
}

impl SnapshotRoot {
    pub fn resolve(configured: &Path) -> Result<SnapshotRoot, Error> {
        let real = configured.canonicalize().map_err(|e| {
            Error::new(format!(
                "cannot resolve the snapshotted path {}: {e}; check `subvolume` / `volume_path` \
                 in the plugin's configuration",
                configured.display()
            ))
        })?;
        let device = std::fs::metadata(&real)
            .map_err(|e| Error::new(format!("cannot stat {}: {e}", real.display())))?
            .dev();
        Ok(SnapshotRoot {
            configured: configured.to_path_buf(),
            real,
            device,
        })
    }

    fn place(&self, real: &Path) -> Result<Placement, Error> {
        if !real.starts_with(&self.real) {
            return Ok(Placement::Outside);
        }
        let device = std::fs::metadata(real)
            .map_err(|e| Error::new(format!("cannot stat {}: {e}", real.display())))?
            .dev();
        Ok(if device == self.device {
            Placement::InSnapshot
        } else {
            Placement::OtherFileSystem {
                device,
                root_device: self.device,
            }
        })
    }
}

/// A tablespace as the server lists it.
#[derive(Debug, Clone)]
pub struct Tablespace {
    pub name: String,
    /// `pg_tablespace_location`: absolute, or relative to the data directory for an in-place
    /// tablespace (`allow_in_place_tablespaces`).
    pub location: String,
}

/// Finds the parts of a cluster on this node's file system and places them against `root`.
pub fn discover(
    data_directory: &str,
    tablespaces: &[Tablespace],
    root: &SnapshotRoot,
) -> Result<Layout, Error> {
    let data = PathBuf::from(data_directory);
    let resolve = |what: &str, path: &Path| {
        path.canonicalize().map_err(|e| {
            Error::new(format!(
                "cannot resolve the {what} {} on this node: {e}; the writer must run on the \
                 node where this PostgreSQL server runs, with read access to its data directory \
                 (run the host as root)",
                path.display()
            ))
        })
    };
    let mut parts = Vec::new();
    let data_real = resolve("data directory", &data)?;
    parts.push(Part {
        name: "data".into(),
        kind: ComponentKind::Database,
        placement: root.place(&data_real)?,
        path: data.clone(),
        real: data_real.clone(),
    });
    // pg_wal: a directory, or a symlink to one elsewhere (initdb --waldir).
    let wal = data.join("pg_wal");
    let wal_path = match std::fs::read_link(&wal) {
        Ok(target) if target.is_absolute() => target,
        Ok(target) => data.join(target),
        Err(_) => wal.clone(),
    };
    let wal_real = resolve("WAL directory", &wal_path)?;
    parts.push(Part {
        name: "wal".into(),
        kind: ComponentKind::Log,
        placement: root.place(&wal_real)?,
        path: wal_path,
        real: wal_real,
    });
    let mut tablespaces = tablespaces.to_vec();
    tablespaces.sort_by(|a, b| a.name.cmp(&b.name));
    for t in tablespaces {
        let location = Path::new(&t.location);
        let path = if location.is_absolute() {
            location.to_path_buf()
        } else {
            data.join(location)
        };
        let real = resolve(&format!("location of tablespace {:?}", t.name), &path)?;
        parts.push(Part {
            name: format!("tablespace:{}", t.name),
            kind: ComponentKind::Tablespace,
            placement: root.place(&real)?,
            path,
            real,
        });
    }
    Ok(Layout { parts })
}

/// Where the snapshot mounted at `snapshot` holds `real` (a path in the snapshotted tree).
pub fn in_snapshot(root: &SnapshotRoot, snapshot: &Path, real: &Path) -> Option<PathBuf> {
    real.strip_prefix(&root.real)
        .ok()
        .map(|relative| snapshot.join(relative))
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ComponentKind::Database => "the data directory".to_string(),
            ComponentKind::Log => "the WAL directory (pg_wal)".to_string(),
            _ => format!(
                "tablespace {:?}",
                self.name.trim_start_matches("tablespace:")
            ),
        };
        write!(f, "{what} at {}", self.path.display())?;
        if self.real != self.path {
            write!(f, " (really {})", self.real.display())?;
        }
        Ok(())
    }
}

/// Why `part` is not in the snapshot, in words.
pub fn why_off(part: &Part, root: &SnapshotRoot) -> String {
    match &part.placement {
        Placement::InSnapshot => "is in the snapshot".into(),
        Placement::Outside => format!("is not under {}", root.configured.display()),
        Placement::OtherFileSystem {
            device,
            root_device,
        } => format!(
            "is under {} but on another file system or a nested subvolume (device {device:#x}, \
             not {root_device:#x}), which a snapshot does not include",
            root.configured.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(dir: &Path) -> SnapshotRoot {
        SnapshotRoot::resolve(dir).unwrap()
    }

    #[test]
    fn finds_data_wal_and_tablespaces_and_places_them() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("volume");
        let data = volume.join("pgdata");
        let outside = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(outside.join("wal")).unwrap();
        std::fs::create_dir_all(outside.join("ts")).unwrap();
        std::fs::create_dir_all(volume.join("ts_in")).unwrap();
        std::os::unix::fs::symlink(outside.join("wal"), data.join("pg_wal")).unwrap();
        let root = root(&volume);
        let layout = discover(
            data.to_str().unwrap(),
            &[
                Tablespace {
                    name: "zfar".into(),
                    location: outside.join("ts").to_string_lossy().into(),
                },
                Tablespace {
                    name: "near".into(),
                    location: volume.join("ts_in").to_string_lossy().into(),
                },
            ],
            &root,
        )
        .unwrap();
        let names: Vec<&str> = layout.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["data", "wal", "tablespace:near", "tablespace:zfar"]);
        assert_eq!(layout.parts[0].placement, Placement::InSnapshot);
        assert_eq!(layout.parts[1].placement, Placement::Outside);
        assert_eq!(
            layout.parts[1].real,
            outside.join("wal").canonicalize().unwrap()
        );
        assert_eq!(layout.parts[2].placement, Placement::InSnapshot);
        assert_eq!(layout.parts[3].placement, Placement::Outside);
        let off: Vec<&str> = layout.off_snapshot().map(|p| p.name.as_str()).collect();
        assert_eq!(off, ["wal", "tablespace:zfar"]);
        assert!(why_off(&layout.parts[3], &root).contains("is not under"));
        assert!(layout.parts[1].to_string().contains("pg_wal"));
    }

    #[test]
    fn a_symlink_into_the_volume_from_outside_is_resolved() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir_all(volume.join("real-data/pg_wal")).unwrap();
        let link = tmp.path().join("pgdata-link");
        std::os::unix::fs::symlink(volume.join("real-data"), &link).unwrap();
        let root = root(&volume);
        let layout = discover(link.to_str().unwrap(), &[], &root).unwrap();
        assert_eq!(layout.data().placement, Placement::InSnapshot);
        let snap = Path::new("/snaps/set-1");
        assert_eq!(
            in_snapshot(&root, snap, &layout.data().real).unwrap(),
            snap.join("real-data")
        );
    }

    #[test]
    fn a_missing_path_says_where_the_writer_must_run() {
        let tmp = tempfile::tempdir().unwrap();
        let error = discover("/nonexistent/pgdata", &[], &root(tmp.path())).unwrap_err();
        assert!(error.message().contains("must run on the node"), "{error}");
    }
}
