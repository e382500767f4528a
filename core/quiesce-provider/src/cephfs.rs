//! The CephFS provider: `mkdir DIRECTORY/.snap/SET` on this daemon's own CephFS mount.
//!
//! | step | what it does |
//! |---|---|
//! | take | `mkdir DIRECTORY/.snap/SET` (one MDS request; the MDS makes every client flush what it caches of the directory's files) |
//! | finalize | nothing: the snapshot is read-only already |
//! | delete | `rmdir DIRECTORY/.snap/SET` (gone already is success) |
//! | find | whether `DIRECTORY/.snap/SET` exists |
//!
//! **A CephFS snapshot is read-only from the moment it exists** ([`Provider::writable_snapshot`]
//! is false): a writer that needs post-snapshot writes fails there with "Read-only file system".
//!
//! A CephFS snapshot holds what the file system's clients hold, not what a node's kernel still
//! caches: data written through `mmap` and not synced is not in it. Each node must flush its
//! own mount first (the node flush of a set); the provider cannot do it for them.
//!
//! Snapshots need the MDS capability `s` (`ceph fs authorize FS client.NAME PATH rws`) and
//! `allow_new_snaps` on the file system. [`crate::ProviderConfig::check`] proves both at daemon
//! start by making and removing a probe snapshot, so that a missing capability fails the start
//! with the command to run, not the first set.

use crate::{check_set_id, mounts, Provider, ProviderError, SnapshotInfo};
use std::io;
use std::path::{Path, PathBuf};

const NAME: &str = "cephfs";
/// `CEPH_SUPER_MAGIC`: the kernel client's `statfs` type.
const CEPH_SUPER_MAGIC: i128 = 0x00c3_6400;
/// `FUSE_SUPER_MAGIC`: what `ceph-fuse` mounts report.
const FUSE_SUPER_MAGIC: i128 = 0x6573_5546;
/// The snapshot directory's name unless `client_snapdir` says otherwise.
pub const DEFAULT_SNAPDIR: &str = ".snap";
/// CephFS's limit on a snapshot's name (a file name).
const MAX_NAME_LEN: usize = 255;

/// Snapshots of one directory (and everything under it) of a CephFS, taken through the
/// daemon's own mount (the kernel client or `ceph-fuse`). **Read-only from the start.**
#[derive(Debug, Clone)]
pub struct Cephfs {
    directory: PathBuf,
    snapdir: String,
}

impl Cephfs {
    /// `directory`: the snapshotted directory on a CephFS mount; `snapdir`: the client's
    /// `client_snapdir` (default `.snap`).
    pub fn new(directory: PathBuf, snapdir: Option<String>) -> Self {
        Cephfs {
            directory,
            snapdir: snapdir.unwrap_or_else(|| DEFAULT_SNAPDIR.into()),
        }
    }

    fn snapshot_path(&self, set_id: &str) -> Result<PathBuf, ProviderError> {
        check_snapshot_name(set_id)?;
        Ok(self.directory.join(&self.snapdir).join(set_id))
    }

    fn info(&self, set_id: &str, path: &Path) -> SnapshotInfo {
        SnapshotInfo {
            id: set_id.to_string(),
            path: path.to_string_lossy().into_owned(),
            provider: NAME.into(),
        }
    }
}

/// A set id that CephFS takes as a snapshot name: a safe file name (see [`check_set_id`]) that
/// does not begin with `_` (CephFS shows a parent directory's snapshots as `_NAME_INODE` and
/// refuses such names).
fn check_snapshot_name(set_id: &str) -> Result<(), ProviderError> {
    check_set_id(NAME, set_id)?;
    if set_id.starts_with('_') || set_id.len() > MAX_NAME_LEN {
        return Err(ProviderError::Refused {
            provider: NAME,
            reason: format!(
                "set id {set_id:?} cannot name a CephFS snapshot (names beginning with `_` are \
                 reserved; at most {MAX_NAME_LEN} bytes)"
            ),
        });
    }
    Ok(())
}

impl Provider for Cephfs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        let path = self.snapshot_path(set_id)?;
        make_snapshot(&self.directory, &path).map_err(|cause| match cause.kind() {
            io::ErrorKind::AlreadyExists => ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "{} exists already (left by an earlier set with this id?): rmdir it, or use \
                     another set id",
                    path.display()
                ),
            },
            _ => cause_of_refusal(&self.directory, &path, cause),
        })?;
        Ok(self.info(set_id, &path))
    }

    fn finalize(&self, _snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        // Read-only from the start: nothing to do.
        Ok(())
    }

    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        let path = self.snapshot_path(&snapshot.id)?;
        // Only ever the snapshot this provider would have made for that id: a record's path
        // is data, and rmdir of anything else must not follow from it.
        if Path::new(&snapshot.path) != path {
            return Err(ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "snapshot {:?} at {} is not one of {}: refusing to remove it",
                    snapshot.id,
                    snapshot.path,
                    self.directory.join(&self.snapdir).display()
                ),
            });
        }
        match std::fs::remove_dir(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(cause) => Err(ProviderError::Io {
                provider: NAME,
                what: format!("removing the snapshot {} (rmdir)", path.display()),
                cause,
            }),
        }
    }

    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        let path = self.snapshot_path(set_id)?;
        // `mkdir` in `.snap` makes the whole snapshot at once: there is no partial one.
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(Some(self.info(set_id, &path))),
            Ok(_) => Err(ProviderError::Refused {
                provider: NAME,
                reason: format!("{} is not a snapshot directory", path.display()),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(cause) => Err(ProviderError::Io {
                provider: NAME,
                what: format!("looking for the snapshot {}", path.display()),
                cause,
            }),
        }
    }

    fn writable_snapshot(&self) -> bool {
        false
    }
}

fn make_snapshot(directory: &Path, path: &Path) -> io::Result<()> {
    // A missing directory would otherwise read as a missing `.snap`.
    std::fs::metadata(directory)?;
    std::fs::create_dir(path)
}

/// What a failed `mkdir .snap/NAME` means, said with what to do.
fn cause_of_refusal(directory: &Path, path: &Path, cause: io::Error) -> ProviderError {
    let refused = |reason: String| ProviderError::Refused {
        provider: NAME,
        reason,
    };
    match cause.raw_os_error() {
        // The MDS answers EACCES when the client's capability lacks `s`.
        Some(nix::libc::EACCES) => refused(format!(
            "taking the snapshot {} was refused (Permission denied): the CephFS client of this \
             mount may not take snapshots. Give it the `s` capability: {} (for an existing client, \
             add `s` to its mds capability with `ceph auth caps`); or the daemon's user may not \
             write to {}",
            path.display(),
            authorize_command(directory),
            directory.display()
        )),
        // And EPERM when the file system does not allow new snapshots.
        Some(nix::libc::EPERM) => refused(format!(
            "taking the snapshot {} was refused (Operation not permitted): the file system does \
             not allow new snapshots; run `ceph fs set {} allow_new_snaps true`",
            path.display(),
            fs_name(directory).unwrap_or_else(|| "FS".into())
        )),
        Some(nix::libc::ENOENT) => refused(format!(
            "{} does not exist, or {} is not its snapshot directory (is `client_snapdir` set to \
             another name? then set `snapdir` to it)",
            directory.display(),
            path.parent().unwrap_or(path).display()
        )),
        Some(nix::libc::EROFS) => refused(format!(
            "{} is mounted read-only, or lies inside a snapshot: snapshots are taken of a \
             writable mount's directory",
            directory.display()
        )),
        _ => ProviderError::Io {
            provider: NAME,
            what: format!("taking the snapshot {} (mkdir)", path.display()),
            cause,
        },
    }
}

/// The mount `directory` lies on, from mountinfo.
fn mount_of(directory: &Path) -> Option<mounts::Mount> {
    let canonical = directory.canonicalize().ok()?;
    let all = mounts::read_mounts().ok()?;
    mounts::containing(&all, &canonical).cloned()
}

/// An option of a kernel CephFS mount (`name=`, `fs=`, `mds_namespace=`).
fn option(mount: &mounts::Mount, key: &str) -> Option<String> {
    mount
        .super_options
        .split(',')
        .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

fn fs_name(directory: &Path) -> Option<String> {
    let mount = mount_of(directory)?;
    option(&mount, "fs").or_else(|| option(&mount, "mds_namespace"))
}

/// `ceph fs authorize FS client.NAME PATH rws`, filled in with what this mount tells (a kernel
/// mount names its client and file system; `ceph-fuse` does not: placeholders then).
fn authorize_command(directory: &Path) -> String {
    let mount = mount_of(directory);
    let client = mount
        .as_ref()
        .and_then(|m| option(m, "name"))
        .unwrap_or_else(|| "NAME".into());
    let fs = fs_name(directory).unwrap_or_else(|| "FS".into());
    // The directory's path inside the file system, for a mount of its root.
    let path = mount
        .as_ref()
        .and_then(|m| {
            let relative = directory.canonicalize().ok()?;
            let relative = relative.strip_prefix(&m.mount_point).ok()?.to_path_buf();
            Some(format!("/{}", relative.display()))
        })
        .unwrap_or_else(|| "/".into());
    format!("`ceph fs authorize {fs} client.{client} {path} rws`")
}

/// [`crate::ProviderConfig::check`] for CephFS: `directory` is an absolute directory on a
/// CephFS mount that answers, and a probe snapshot can be made and removed there (the client
/// has `s`, the file system allows snapshots).
pub(crate) fn check(directory: &Path, snapdir: Option<&str>) -> Result<(), ProviderError> {
    let refuse = |reason: String| {
        Err(ProviderError::Refused {
            provider: NAME,
            reason,
        })
    };
    if !directory.is_absolute() {
        return refuse(format!(
            "directory = {:?} is not an absolute path",
            directory.display().to_string()
        ));
    }
    if let Some(snapdir) = snapdir {
        if snapdir.is_empty() || snapdir.contains('/') || snapdir == "." || snapdir == ".." {
            return refuse(format!(
                "snapdir = {snapdir:?} is not a directory name (CephFS's `client_snapdir`)"
            ));
        }
    }
    match std::fs::metadata(directory) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return refuse(format!(
                "directory = {:?} is not a directory",
                directory.display().to_string()
            ))
        }
        Err(e) => {
            return refuse(format!(
                "directory = {:?} cannot be read ({e}): mount CephFS and create it",
                directory.display().to_string()
            ))
        }
    }
    let Some(mount) = mount_of(directory) else {
        return refuse(format!(
            "no mount found for {} in /proc/self/mountinfo",
            directory.display()
        ));
    };
    let expected_magic = match mount.fs_type.as_str() {
        "ceph" => CEPH_SUPER_MAGIC,
        "fuse.ceph-fuse" => FUSE_SUPER_MAGIC,
        other => {
            return refuse(format!(
                "directory = {:?} is on a {other} file system (mounted at {}), not on CephFS: \
                 point it at a directory of a CephFS mount (`mount -t ceph` or `ceph-fuse`)",
                directory.display().to_string(),
                mount.mount_point.display()
            ))
        }
    };
    // statfs goes to the client itself: a ceph-fuse that died leaves a mount that answers
    // "Transport endpoint is not connected".
    match nix::sys::statfs::statfs(directory) {
        // `fs_type_t` is signed or unsigned, of 32 or 64 bits, by architecture.
        Ok(stat) if i128::from(stat.filesystem_type().0) == expected_magic => {}
        Ok(stat) => {
            return refuse(format!(
                "{} reports file system type {:#x} to statfs, not CephFS's ({expected_magic:#x})",
                directory.display(),
                stat.filesystem_type().0
            ))
        }
        Err(errno) => {
            return refuse(format!(
                "the CephFS mount at {} does not answer ({}): is its client (ceph-fuse) running? \
                 remount it",
                mount.mount_point.display(),
                errno.desc()
            ))
        }
    }
    // The proof: a probe snapshot, made and removed. Its name is no set id's (set ids are
    // not given by the broker in this form), and it lives for milliseconds.
    let provider = Cephfs::new(directory.to_path_buf(), snapdir.map(str::to_string));
    let probe_name = format!(
        "quiesce-check-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let probe = provider.take(&probe_name).map_err(|e| match e {
        ProviderError::Refused { reason, .. } => ProviderError::Refused {
            provider: NAME,
            reason: format!("at start, checking that snapshots can be taken: {reason}"),
        },
        other => other,
    })?;
    provider.delete(&probe).map_err(|e| ProviderError::Refused {
        provider: NAME,
        reason: format!(
            "the probe snapshot {} was made but cannot be removed ({e}): remove it with rmdir",
            probe.path
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ids_that_cephfs_reserves_are_refused() {
        let provider = Cephfs::new("/mnt/cephfs/shared".into(), None);
        assert_eq!(
            provider.snapshot_path("set-1").unwrap(),
            Path::new("/mnt/cephfs/shared/.snap/set-1")
        );
        for id in ["_set", "..", "a/b", ""] {
            assert!(provider.snapshot_path(id).is_err(), "{id:?}");
        }
        let other = Cephfs::new("/c/d".into(), Some(".snapshots".into()));
        assert_eq!(
            other.snapshot_path("s").unwrap(),
            Path::new("/c/d/.snapshots/s")
        );
    }

    #[test]
    fn delete_refuses_a_path_that_is_not_its_snapshot() {
        let provider = Cephfs::new("/mnt/cephfs/shared".into(), None);
        let err = provider
            .delete(&SnapshotInfo {
                id: "set-1".into(),
                path: "/mnt/cephfs/shared/important".into(),
                provider: "cephfs".into(),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to remove it"), "{err}");
    }

    #[test]
    fn kernel_mount_options_name_the_client_and_file_system() {
        let mounts = mounts::parse_mountinfo(
            "50 22 0:60 / /mnt/cephfs rw,relatime - ceph 10.0.0.1:6789:/ \
             rw,name=backup,secret=<hidden>,fs=cephfs,acl\n\
             51 22 0:61 / /mnt/fuse rw,nosuid - fuse.ceph-fuse ceph-fuse \
             rw,user_id=0,group_id=0,allow_other\n",
        );
        assert_eq!(option(&mounts[0], "name").as_deref(), Some("backup"));
        assert_eq!(option(&mounts[0], "fs").as_deref(), Some("cephfs"));
        assert_eq!(mounts[1].fs_type, "fuse.ceph-fuse");
        assert_eq!(option(&mounts[1], "name"), None);
    }
}
