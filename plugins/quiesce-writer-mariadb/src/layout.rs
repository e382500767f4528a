//! Where a server keeps its files, and whether the snapshot of the volume holds them.
//!
//! The server says where its data directory, binlog, InnoDB redo log, undo tablespaces, system
//! tablespace and Aria log are (relative paths are relative to the data directory, where the
//! server runs). Tables and databases can live elsewhere too: InnoDB's `DATA DIRECTORY` leaves an
//! `.isl` file holding the path in the database's directory, MyISAM's `DATA DIRECTORY` /
//! `INDEX DIRECTORY` a symbolic link, and a database directory itself can be a symbolic link;
//! those are found by reading the data directory (two levels, no privilege needed).
//!
//! A path is *in the snapshot* when, resolved, it lies under the tree the provider snapshots (the
//! btrfs subvolume, or the volume's path) **and** on the same file system as that tree's root:
//! btrfs does not take nested subvolumes or other mounts into a snapshot, and those show up as
//! another device number. Only parts not already inside the data directory (on its file system)
//! are listed apart from it.

use quiesce_sdk::{ComponentKind, Error};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The volume name given to components that lie off the snapshotted volume (their metadata
/// must name some volume; this one matches no configured volume).
pub const OFF_VOLUME: &str = "(off-volume)";

/// One place a server keeps files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The component name: `data`, `binlog`, `innodb-redo-log`, `table:<db>/<file>`, ...
    pub name: String,
    pub kind: ComponentKind,
    /// What it is, in words: `the binlog directory`.
    pub what: String,
    /// The path as the server (or the link) gives it.
    pub path: PathBuf,
    /// Resolved (symlinks followed).
    pub real: PathBuf,
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

/// The files of one server, as found at init or prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `data` first.
    pub parts: Vec<Part>,
    /// Whether binary logging is on.
    pub binlog: bool,
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

fn device(path: &Path) -> Result<u64, Error> {
    Ok(std::fs::metadata(path)
        .map_err(|e| Error::new(format!("cannot stat {}: {e}", path.display())))?
        .dev())
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
        let device = device(&real)?;
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
        let device = device(real)?;
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

/// The server's variables that say where its files are (absent or empty: the default, inside
/// the data directory).
#[derive(Debug, Clone, Default)]
pub struct ServerPaths {
    pub datadir: String,
    /// `@@log_bin_basename` when binary logging is on.
    pub log_bin_basename: Option<String>,
    pub innodb_log_group_home_dir: Option<String>,
    pub innodb_undo_directory: Option<String>,
    pub innodb_data_home_dir: Option<String>,
    pub innodb_data_file_path: Option<String>,
    pub aria_log_dir_path: Option<String>,
}

fn resolve(what: &str, path: &Path) -> Result<PathBuf, Error> {
    path.canonicalize().map_err(|e| {
        Error::new(format!(
            "cannot resolve {what} {} on this node: {e}; the writer must run on the node where \
             this server runs, with read access to its data directory (run the host as root)",
            path.display()
        ))
    })
}

/// Finds the parts of a server on this node's file system and places them against `root`.
pub fn discover(paths: &ServerPaths, root: &SnapshotRoot) -> Result<Layout, Error> {
    let data = PathBuf::from(&paths.datadir);
    let data_real = resolve("the data directory", &data)?;
    let data_device = device(&data_real)?;
    let mut layout = Layout {
        parts: vec![Part {
            name: "data".into(),
            kind: ComponentKind::Database,
            what: "the data directory".into(),
            placement: root.place(&data_real)?,
            path: data.clone(),
            real: data_real.clone(),
        }],
        binlog: paths.log_bin_basename.is_some(),
    };
    // Relative to the data directory, as the server (which runs there) reads them.
    let at = |value: &str| {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            data.join(p)
        }
    };
    let mut add = |name: String, kind: ComponentKind, what: String, path: PathBuf| {
        let real = resolve(&what, &path)?;
        // Inside the data directory and on its file system: the data directory covers it.
        if real.starts_with(&data_real) && device(&real)? == data_device {
            return Ok::<(), Error>(());
        }
        if layout.parts.iter().any(|p| p.real == real) {
            return Ok(());
        }
        layout.parts.push(Part {
            placement: root.place(&real)?,
            name,
            kind,
            what,
            path,
            real,
        });
        Ok(())
    };
    let set = |v: &Option<String>| {
        v.as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    if let Some(base) = set(&paths.log_bin_basename) {
        let dir = at(&base)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data.clone());
        add(
            "binlog".into(),
            ComponentKind::Log,
            "the binlog directory".into(),
            dir,
        )?;
    }
    if let Some(dir) = set(&paths.innodb_log_group_home_dir) {
        add(
            "innodb-redo-log".into(),
            ComponentKind::Log,
            "the InnoDB redo log directory (innodb_log_group_home_dir)".into(),
            at(&dir),
        )?;
    }
    if let Some(dir) = set(&paths.innodb_undo_directory) {
        add(
            "innodb-undo".into(),
            ComponentKind::Tablespace,
            "the InnoDB undo tablespace directory (innodb_undo_directory)".into(),
            at(&dir),
        )?;
    }
    // The system tablespace: each file of innodb_data_file_path (`ibdata1:12M:autoextend;...`),
    // under innodb_data_home_dir (empty: the paths are as written, absolute or in datadir).
    let home = set(&paths.innodb_data_home_dir)
        .map(|h| at(&h))
        .unwrap_or_else(|| data.clone());
    if let Some(files) = set(&paths.innodb_data_file_path) {
        for spec in files.split(';').filter(|s| !s.trim().is_empty()) {
            let file = spec.split(':').next().unwrap_or(spec).trim();
            let path = if Path::new(file).is_absolute() {
                PathBuf::from(file)
            } else {
                home.join(file)
            };
            add(
                format!("innodb-system:{file}"),
                ComponentKind::Tablespace,
                format!("the InnoDB system tablespace file {file}"),
                path,
            )?;
        }
    }
    if let Some(dir) = set(&paths.aria_log_dir_path) {
        add(
            "aria-log".into(),
            ComponentKind::Log,
            "the Aria log directory (aria_log_dir_path)".into(),
            at(&dir),
        )?;
    }
    for (name, kind, what, path) in elsewhere(&data, &data_real)? {
        // Gone since it was listed (a table dropped meanwhile), or a dangling link: nothing
        // of the server's is there to snapshot.
        if !path.exists() {
            continue;
        }
        add(name, kind, what, path)?;
    }
    Ok(layout)
}

type Found = (String, ComponentKind, String, PathBuf);

/// Database directories and table files of the data directory that live elsewhere: symbolic
/// links, and InnoDB `.isl` files (which hold the path of the table's `.ibd`).
fn elsewhere(data: &Path, data_real: &Path) -> Result<Vec<Found>, Error> {
    let read = |dir: &Path| {
        std::fs::read_dir(dir).map_err(|e| {
            Error::new(format!(
                "cannot list {}: {e}; the host must be able to read the data directory",
                dir.display()
            ))
        })
    };
    let mut found = Vec::new();
    let mut entries: Vec<_> = read(data_real)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = data.join(&name);
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let is_dir = path.is_dir();
        if kind.is_symlink() {
            found.push((
                if is_dir {
                    format!("database:{name}")
                } else {
                    format!("file:{name}")
                },
                ComponentKind::Database,
                if is_dir {
                    format!("database {name:?} (a symbolic link)")
                } else {
                    format!("the file {name} (a symbolic link)")
                },
                path.clone(),
            ));
        }
        if !is_dir {
            continue;
        }
        let mut files: Vec<_> = match std::fs::read_dir(&path) {
            Ok(files) => files.filter_map(Result::ok).collect(),
            // A database dropped since the data directory was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => read(&path)?.filter_map(Result::ok).collect(),
        };
        files.sort_by_key(|e| e.file_name());
        for file in files {
            let file_name = file.file_name().to_string_lossy().into_owned();
            let file_path = path.join(&file_name);
            let table = format!("{name}/{file_name}");
            if file.file_type().is_ok_and(|t| t.is_symlink()) {
                found.push((
                    format!("table:{table}"),
                    ComponentKind::Database,
                    format!("the table file {table} (DATA/INDEX DIRECTORY)"),
                    file_path,
                ));
            } else if file_name.ends_with(".isl") {
                let text = match std::fs::read_to_string(&file_path) {
                    Ok(text) => text,
                    // The table was dropped since its directory was listed.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(Error::new(format!(
                            "cannot read {}: {e}",
                            file_path.display()
                        )))
                    }
                };
                let target = text.trim();
                if target.is_empty() {
                    continue;
                }
                let target = if Path::new(target).is_absolute() {
                    PathBuf::from(target)
                } else {
                    data.join(target)
                };
                let stem = file_name.trim_end_matches(".isl");
                found.push((
                    format!("table:{name}/{stem}"),
                    ComponentKind::Tablespace,
                    format!("the InnoDB table {name}/{stem} (DATA DIRECTORY)"),
                    target,
                ));
            }
        }
    }
    Ok(found)
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.what, self.path.display())?;
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

    fn paths(data: &Path) -> ServerPaths {
        ServerPaths {
            datadir: format!("{}/", data.display()),
            log_bin_basename: Some(data.join("binlog").display().to_string()),
            innodb_log_group_home_dir: Some("./".into()),
            innodb_undo_directory: Some("./".into()),
            innodb_data_home_dir: None,
            innodb_data_file_path: Some("ibdata1:12M:autoextend".into()),
            aria_log_dir_path: Some(data.display().to_string()),
        }
    }

    fn datadir(volume: &Path) -> PathBuf {
        let data = volume.join("mysql-data");
        std::fs::create_dir_all(data.join("mysql")).unwrap();
        std::fs::create_dir_all(data.join("shop")).unwrap();
        std::fs::write(data.join("ibdata1"), "").unwrap();
        data
    }

    #[test]
    fn everything_in_the_data_directory_is_one_component() {
        let tmp = tempfile::tempdir().unwrap();
        let data = datadir(tmp.path());
        let root = SnapshotRoot::resolve(tmp.path()).unwrap();
        let layout = discover(&paths(&data), &root).unwrap();
        assert_eq!(layout.parts.len(), 1, "{layout:#?}");
        assert_eq!(layout.data().placement, Placement::InSnapshot);
        assert_eq!(layout.off_snapshot().count(), 0);
    }

    #[test]
    fn logs_tables_and_databases_elsewhere_are_found_and_placed() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("volume");
        let far = tmp.path().join("far");
        let data = datadir(&volume);
        for d in ["binlogs", "redo", "tables/shop", "db2"] {
            std::fs::create_dir_all(far.join(d)).unwrap();
        }
        std::fs::create_dir_all(volume.join("undo")).unwrap();
        std::fs::write(far.join("tables/shop/orders.ibd"), "").unwrap();
        std::fs::write(far.join("tables/shop/big.MYD"), "").unwrap();
        std::fs::write(
            data.join("shop/orders.isl"),
            format!("{}\n", far.join("tables/shop/orders.ibd").display()),
        )
        .unwrap();
        std::os::unix::fs::symlink(far.join("tables/shop/big.MYD"), data.join("shop/big.MYD"))
            .unwrap();
        std::os::unix::fs::symlink(far.join("db2"), data.join("db2")).unwrap();
        let mut p = paths(&data);
        p.log_bin_basename = Some(far.join("binlogs/mariadb-bin").display().to_string());
        p.innodb_log_group_home_dir = Some(far.join("redo").display().to_string());
        p.innodb_undo_directory = Some("../undo".into());
        let root = SnapshotRoot::resolve(&volume).unwrap();
        let layout = discover(&p, &root).unwrap();
        let names: Vec<(&str, bool)> = layout
            .parts
            .iter()
            .map(|p| (p.name.as_str(), p.placement == Placement::InSnapshot))
            .collect();
        assert_eq!(
            names,
            [
                ("data", true),
                ("binlog", false),
                ("innodb-redo-log", false),
                ("innodb-undo", true),
                ("database:db2", false),
                ("table:shop/big.MYD", false),
                ("table:shop/orders", false),
            ],
            "{layout:#?}"
        );
        let orders = layout
            .parts
            .iter()
            .find(|p| p.name == "table:shop/orders")
            .unwrap();
        assert!(orders.to_string().contains("DATA DIRECTORY"), "{orders}");
        assert!(why_off(orders, &root).contains("is not under"));
        let db2 = layout
            .parts
            .iter()
            .find(|p| p.name == "database:db2")
            .unwrap();
        assert_eq!(db2.real, far.join("db2").canonicalize().unwrap());
    }

    #[test]
    fn a_missing_data_directory_says_where_the_writer_must_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SnapshotRoot::resolve(tmp.path()).unwrap();
        let p = ServerPaths {
            datadir: "/nonexistent/mysql".into(),
            ..Default::default()
        };
        let error = discover(&p, &root).unwrap_err();
        assert!(error.message().contains("must run on the node"), "{error}");
    }
}
