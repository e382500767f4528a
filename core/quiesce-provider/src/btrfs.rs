use crate::{mounts, run, snapshot_path, Provider, ProviderError, SnapshotInfo};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Snapshots one btrfs subvolume (atomic, flushes the subvolume's dirty data itself, needs no
/// fsfreeze). Nested subvolumes are not included. The snapshot is taken with the ioctl that
/// `btrfs subvolume snapshot` uses, called directly: it runs while every writer is frozen, and
/// starting the `btrfs` program would add its own start-up to that window. Finalizing and
/// deleting, outside the window, run the `btrfs` command.
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
        // Into an existing directory, `btrfs subvolume snapshot` would put the snapshot inside
        // it (as `cp` does) and succeed, and the path returned would not be the snapshot.
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(ProviderError::Refused {
                provider: "btrfs",
                reason: format!(
                    "{} exists already (left by an earlier set with this id?): delete it, or \
                     use another set id",
                    target.display()
                ),
            });
        }
        // Writable: writers may still write their part (a backup label) in post-snapshot.
        snapshot_ioctl(&self.subvolume, &target)?;
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

    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        let target = snapshot_path("btrfs", &self.snapshots, set_id)?;
        // `btrfs subvolume snapshot` makes the subvolume appear at once, complete: there is no
        // partial btrfs snapshot, only none or one.
        match mounts::is_btrfs_subvolume(&target) {
            Ok(true) => Ok(Some(SnapshotInfo {
                id: set_id.to_string(),
                path: target.to_string_lossy().into_owned(),
                provider: "btrfs".into(),
            })),
            Ok(false) => Err(ProviderError::Refused {
                provider: "btrfs",
                reason: format!(
                    "{} exists but is not a btrfs subvolume, so quiesce did not make it; move it \
                     out of {}",
                    target.display(),
                    self.snapshots.display()
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(cause) => Err(ProviderError::Io {
                provider: "btrfs",
                what: format!("inspecting {}", target.display()),
                cause,
            }),
        }
    }
}

/// [`crate::ProviderConfig::check`] for btrfs: the subvolume is one, and `snapshots` is a
/// directory on the same btrfs file system (a snapshot cannot cross file systems).
pub(crate) fn check(subvolume: &Path, snapshots: &Path) -> Result<(), ProviderError> {
    let refuse = |reason: String| {
        Err(ProviderError::Refused {
            provider: "btrfs",
            reason,
        })
    };
    match mounts::is_btrfs_subvolume(subvolume) {
        Ok(true) => {}
        Ok(false) => {
            return refuse(format!(
                "subvolume = {:?} is not a btrfs subvolume (a plain directory, or not on btrfs): \
                 point it at a subvolume, or make one with `btrfs subvolume create`",
                subvolume.display().to_string()
            ))
        }
        Err(e) => {
            return refuse(format!(
                "subvolume = {:?} cannot be inspected ({e}): create it with `btrfs subvolume \
                 create`, or fix the path",
                subvolume.display().to_string()
            ))
        }
    }
    if !snapshots.is_dir() {
        return refuse(format!(
            "snapshots = {:?} is not a directory: create it on the subvolume's file system",
            snapshots.display().to_string()
        ));
    }
    let same = mounts::read_mounts().and_then(|m| {
        mounts::same_file_system(&m, &subvolume.canonicalize()?, &snapshots.canonicalize()?)
    });
    match same {
        Ok(true) => Ok(()),
        Ok(false) => refuse(format!(
            "snapshots = {:?} is on another file system than subvolume = {:?}; a btrfs snapshot \
             stays on its file system: choose a directory on the same one",
            snapshots.display().to_string(),
            subvolume.display().to_string()
        )),
        Err(cause) => Err(ProviderError::Io {
            provider: "btrfs",
            what: format!(
                "comparing the file systems of {} and {}",
                subvolume.display(),
                snapshots.display()
            ),
            cause,
        }),
    }
}

/// `BTRFS_IOC_SNAP_CREATE_V2`'s argument (`struct btrfs_ioctl_vol_args_v2`, linux/btrfs.h):
/// 4096 bytes, the name last.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

// _IOW(BTRFS_IOCTL_MAGIC 0x94, 23, struct btrfs_ioctl_vol_args_v2)
nix::ioctl_write_ptr!(snap_create_v2, 0x94, 23, VolArgsV2);

/// A writable snapshot of `subvolume` at `target` (whose parent must exist), as `btrfs
/// subvolume snapshot SUBVOLUME TARGET` makes it.
fn snapshot_ioctl(subvolume: &Path, target: &Path) -> Result<(), ProviderError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: String| {
        move |cause: std::io::Error| ProviderError::Io {
            provider: "btrfs",
            what,
            cause,
        }
    };
    let open_dir = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY)
            .open(path)
            .map_err(io(format!("opening {}", path.display())))
    };
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(ProviderError::Refused {
            provider: "btrfs",
            reason: format!("{} names no snapshot inside a directory", target.display()),
        });
    };
    let name = name.as_bytes();
    let mut args = VolArgsV2 {
        fd: 0,
        transid: 0,
        flags: 0,
        unused: [0; 4],
        name: [0; 4040],
    };
    if name.len() >= args.name.len() {
        return Err(ProviderError::Refused {
            provider: "btrfs",
            reason: format!("the snapshot name {:?} is too long", target.display()),
        });
    }
    args.name[..name.len()].copy_from_slice(name);
    let source = open_dir(subvolume)?;
    let destination = open_dir(parent)?;
    args.fd = source.as_raw_fd().into();
    // SAFETY: both descriptors are open directories for the duration of the call, and `args` is
    // the kernel's `btrfs_ioctl_vol_args_v2` (repr(C), 4096 bytes) with a NUL-terminated name.
    unsafe { snap_create_v2(destination.as_raw_fd(), &args) }.map_err(|errno| {
        ProviderError::Io {
            provider: "btrfs",
            what: format!(
                "snapshotting {} to {} (BTRFS_IOC_SNAP_CREATE_V2; is {} a btrfs subvolume?)",
                subvolume.display(),
                target.display(),
                subvolume.display()
            ),
            cause: std::io::Error::from_raw_os_error(errno as i32),
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod layout_tests {
    #[test]
    fn the_ioctl_argument_has_the_kernel_s_size() {
        assert_eq!(std::mem::size_of::<super::VolArgsV2>(), 4096);
    }
}
