use crate::{snapshot_path, Provider, ProviderError, SnapshotInfo};
use std::fs;
use std::path::{Path, PathBuf};

/// Copies a directory tree. Not atomic by itself: it is consistent only because every writer is
/// frozen while it runs. For demos and tests on file systems without snapshots.
#[derive(Debug, Clone)]
pub struct DirCopy {
    source: PathBuf,
    snapshots: PathBuf,
}

impl DirCopy {
    pub fn new(source: PathBuf, snapshots: PathBuf) -> Self {
        DirCopy { source, snapshots }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ProviderError {
    move |cause| ProviderError::Io {
        provider: "dir-copy",
        what,
        cause,
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), ProviderError> {
    fs::create_dir(to).map_err(io(format!("creating {}", to.display())))?;
    for entry in fs::read_dir(from).map_err(io(format!("reading {}", from.display())))? {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let kind = entry
            .file_type()
            .map_err(io(format!("inspecting {}", entry.path().display())))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)
                .map_err(io(format!("copying {}", entry.path().display())))?;
        } else if kind.is_symlink() {
            let link = fs::read_link(entry.path())
                .map_err(io(format!("reading link {}", entry.path().display())))?;
            std::os::unix::fs::symlink(link, &target)
                .map_err(io(format!("creating link {}", target.display())))?;
        }
        // Sockets, FIFOs and devices are not data: they are left out of the copy.
    }
    Ok(())
}

fn set_read_only(path: &Path) -> Result<(), ProviderError> {
    let meta = fs::symlink_metadata(path).map_err(io(format!("inspecting {}", path.display())))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io(format!("reading {}", path.display())))? {
            let entry = entry.map_err(io(format!("reading {}", path.display())))?;
            set_read_only(&entry.path())?;
        }
    }
    let mut perms = meta.permissions();
    perms.set_readonly(true);
    fs::set_permissions(path, perms).map_err(io(format!("making {} read-only", path.display())))
}

fn set_writable(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut perms = meta.permissions();
    #[allow(clippy::permissions_set_readonly_false)] // only to delete our own copy
    perms.set_readonly(false);
    fs::set_permissions(path, perms)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            set_writable(&entry?.path())?;
        }
    }
    Ok(())
}

impl Provider for DirCopy {
    fn name(&self) -> &'static str {
        "dir-copy"
    }

    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        let target = snapshot_path("dir-copy", &self.snapshots, set_id)?;
        fs::create_dir_all(&self.snapshots)
            .map_err(io(format!("creating {}", self.snapshots.display())))?;
        if let Err(e) = copy_tree(&self.source, &target) {
            // A partial copy is no snapshot: leave nothing behind.
            let _ = fs::remove_dir_all(&target);
            return Err(e);
        }
        Ok(SnapshotInfo {
            id: set_id.to_string(),
            path: target.to_string_lossy().into_owned(),
            provider: "dir-copy".into(),
        })
    }

    fn finalize(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        set_read_only(Path::new(&snapshot.path))
    }

    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        let path = Path::new(&snapshot.path);
        set_writable(path)
            .and_then(|()| fs::remove_dir_all(path))
            .map_err(io(format!("deleting {}", path.display())))
    }

    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        let target = snapshot_path("dir-copy", &self.snapshots, set_id)?;
        // Also a partial copy: the daemon may have died in the middle of one.
        match fs::symlink_metadata(&target) {
            Ok(_) => Ok(Some(SnapshotInfo {
                id: set_id.to_string(),
                path: target.to_string_lossy().into_owned(),
                provider: "dir-copy".into(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("inspecting {}", target.display()))(e)),
        }
    }
}

/// [`crate::ProviderConfig::check`] for dir-copy: the source is a directory.
pub(crate) fn check(source: &Path) -> Result<(), ProviderError> {
    if source.is_dir() {
        Ok(())
    } else {
        Err(ProviderError::Refused {
            provider: "dir-copy",
            reason: format!(
                "source = {:?} is not a directory: create it, or fix `source`",
                source.display().to_string()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_finalizes_and_deletes() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("data");
        fs::create_dir_all(source.join("sub")).unwrap();
        fs::write(source.join("a.txt"), "alpha").unwrap();
        fs::write(source.join("sub/b.txt"), "beta").unwrap();
        let provider = DirCopy::new(source.clone(), tmp.path().join("snaps"));

        let snap = provider.take("set-1").unwrap();
        fs::write(source.join("a.txt"), "changed after the snapshot").unwrap();
        let copy = Path::new(&snap.path);
        assert_eq!(fs::read_to_string(copy.join("a.txt")).unwrap(), "alpha");
        assert_eq!(fs::read_to_string(copy.join("sub/b.txt")).unwrap(), "beta");

        provider.finalize(&snap).unwrap();
        assert!(fs::metadata(copy.join("a.txt"))
            .unwrap()
            .permissions()
            .readonly());

        assert_eq!(provider.find("set-1").unwrap(), Some(snap.clone()));
        provider.delete(&snap).unwrap();
        assert!(!copy.exists());
        assert_eq!(provider.find("set-1").unwrap(), None);
    }

    #[test]
    fn find_reports_a_partial_copy_so_that_it_gets_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let provider = DirCopy::new(tmp.path().join("data"), tmp.path().join("snaps"));
        // What a daemon that died in the middle of a copy leaves.
        fs::create_dir_all(tmp.path().join("snaps/set-9/half")).unwrap();
        let found = provider.find("set-9").unwrap().unwrap();
        assert_eq!(Path::new(&found.path), tmp.path().join("snaps/set-9"));
        provider.delete(&found).unwrap();
        assert_eq!(provider.find("set-9").unwrap(), None);
    }

    #[test]
    fn check_wants_an_existing_source_directory() {
        let tmp = tempfile::tempdir().unwrap();
        check(tmp.path()).unwrap();
        let err = check(&tmp.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("is not a directory: create it"), "{err}");
    }

    #[test]
    fn refuses_set_ids_that_escape_the_snapshot_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let provider = DirCopy::new(tmp.path().into(), tmp.path().join("snaps"));
        let err = provider.take("../escape").unwrap_err().to_string();
        assert!(err.contains("not a safe file name"), "{err}");
    }
}
