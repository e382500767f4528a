//! Snapshot providers: what takes the snapshot once every writer is frozen.
//!
//! A provider's calls are synchronous and may block (they run external tools); callers run them
//! on blocking threads under the set's provider deadline. Every snapshot is made writable first,
//! so writers can finish their part on it (post-snapshot), and then made read-only by
//! [`Provider::finalize`] — the btrfs way, which the others follow where the storage allows
//! (ZFS and CephFS snapshots are read-only from the start: see [`Zfs`], [`Cephfs`] and
//! [`Provider::writable_snapshot`]).
//!
//! | provider | what it does | module |
//! |---|---|---|
//! | `btrfs` | `btrfs subvolume snapshot` of one subvolume | [`Btrfs`] |
//! | `lvm` | `lvcreate --snapshot`, mounted under `mount_dir` | [`Lvm`] |
//! | `zfs` | `zfs snapshot DATASET@SET` | [`Zfs`] |
//! | `cephfs` | `mkdir DIRECTORY/.snap/SET` on the daemon's CephFS mount | [`Cephfs`] |
//! | `command` | a user's program (a SAN, a cloud snapshot, ...), optionally inside `fsfreeze` | [`CommandProvider`] |
//! | `dir-copy` | a plain copy, for demos and tests | [`DirCopy`] |
//!
//! A daemon calls [`ProviderConfig::check`] once at start: it refuses configurations that
//! cannot work or would deadlock (a command provider freezing the file system the daemon itself
//! writes to), with a message saying what to change.

mod btrfs;
mod cephfs;
pub mod command;
mod dir_copy;
mod freeze;
mod lvm;
mod mounts;
mod process;
mod zfs;

pub use btrfs::Btrfs;
pub use cephfs::Cephfs;
pub use command::CommandProvider;
pub use dir_copy::DirCopy;
pub use lvm::Lvm;
pub use quiesce_proto::SnapshotInfo;
pub use zfs::Zfs;

/// Whether `path` is a mount point (of the last file system mounted there).
pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    let canonical = path.canonicalize()?;
    Ok(mounts::is_mount_point(&mounts::read_mounts()?, &canonical))
}

/// Whether a process that writes to `own_paths` may freeze (`FIFREEZE`) the file system mounted
/// at `mount`: never the root file system, only a mount point, and none of `own_paths` on it.
/// The error says why not and what to do.
pub fn check_freezable(mount: &Path, own_paths: &[&Path]) -> Result<(), String> {
    freeze::refuse_unsafe_freeze("fifreeze", mount, own_paths).map_err(|e| match e {
        ProviderError::Refused { reason, .. } => reason,
        e => e.to_string(),
    })
}

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider}: {what} failed: {cause}")]
    Io {
        provider: &'static str,
        what: String,
        cause: std::io::Error,
    },
    #[error("{provider}: `{command}` failed ({status}): {stderr}")]
    Command {
        provider: &'static str,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{provider}: {reason}")]
    Refused {
        provider: &'static str,
        reason: String,
    },
    /// The hold limit of an `fsfreeze` passed before the snapshot was taken: the watchdog thawed
    /// the file system, and no snapshot was kept.
    #[error(
        "{provider}: the watchdog thawed {mount} after the hold limit of {hold_limit_ms} ms while \
         the snapshot was being taken, so no snapshot was kept{detail}; make the snapshot program \
         faster or raise hold_limit_ms"
    )]
    HoldLimit {
        provider: &'static str,
        mount: PathBuf,
        hold_limit_ms: u64,
        /// What else happened (the program's stderr, a failed thaw, a deleted snapshot), starting
        /// with "; " when not empty.
        detail: String,
    },
}

/// Takes, finalizes, deletes and finds snapshots of one volume.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// A short name for records, e.g. `btrfs`.
    fn name(&self) -> &'static str;
    /// Takes a writable snapshot named after `set_id`. Called while every writer is frozen, so it
    /// must do nothing but take the snapshot.
    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError>;
    /// Makes a snapshot read-only once post-snapshot work is done.
    fn finalize(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError>;
    /// Deletes a snapshot (a partial one after an abort, or one the user releases).
    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError>;
    /// The snapshot that a set with this id left behind, if any — also a partial one.
    ///
    /// A daemon that died while a set was running calls this after its restart to delete what
    /// the set left: it may have died between the provider taking the snapshot and recording it.
    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError>;
    /// Whether writers can write into a snapshot this provider took, until [`Provider::finalize`]
    /// (post-snapshot work: a backup label). False where snapshots are read-only from the start
    /// (ZFS, CephFS): there, a writer's post-snapshot writes fail with "Read-only file system".
    fn writable_snapshot(&self) -> bool {
        true
    }
}

/// The default limit of one invocation of a command provider's program.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(60_000);
/// The default hold limit of a command provider's `fsfreeze` (as long as VSS holds writes).
pub const DEFAULT_FSFREEZE_HOLD_LIMIT: Duration = Duration::from_millis(10_000);

/// A volume's provider as written in a host's configuration (`[volumes.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// A btrfs subvolume, snapshotted atomically into `snapshots/<set-id>`.
    Btrfs {
        subvolume: PathBuf,
        snapshots: PathBuf,
    },
    /// A plain recursive copy of `source` into `snapshots/<set-id>`: for demos and tests on any
    /// file system. It is only consistent because every writer is frozen while it runs.
    DirCopy { source: PathBuf, snapshots: PathBuf },
    /// A user's program, invoked as `PROGRAM [ARGS...] take|finalize|delete|find` (the
    /// interface is documented on [`CommandProvider`] and in the crate's README).
    Command {
        program: PathBuf,
        /// Extra leading arguments, before the operation.
        #[serde(default)]
        args: Vec<String>,
        /// A mount point to `fsfreeze --freeze` around `take` (thawed after, always).
        #[serde(default)]
        fsfreeze: Option<PathBuf>,
        /// Limit of each invocation of the program; past it its process group is killed.
        /// Default 60000.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Longest the file system stays frozen; past it a watchdog thaws it and `take` fails.
        /// Default 10000; only with `fsfreeze`.
        #[serde(default)]
        hold_limit_ms: Option<u64>,
    },
    /// A classic LVM snapshot of `volume_group/logical_volume`, mounted writable at
    /// `mount_dir/<set-id>`.
    Lvm {
        volume_group: String,
        logical_volume: String,
        /// Copy-on-write space for the snapshot, as `lvcreate --size` takes it: `1G`, `500M`.
        snapshot_size: String,
        mount_dir: PathBuf,
        /// `mount -o` options for the snapshot (XFS needs `nouuid`).
        #[serde(default)]
        mount_options: Option<String>,
    },
    /// A ZFS snapshot `dataset@<set-id>` (read-only from the start).
    Zfs { dataset: String },
    /// A CephFS snapshot `directory/.snap/<set-id>` (read-only from the start), taken through
    /// this daemon's own mount of the file system (kernel client or ceph-fuse). The client
    /// needs the `s` capability (`ceph fs authorize FS client.NAME PATH rws`).
    Cephfs {
        /// The snapshotted directory, on a CephFS mount; everything below it is in the snapshot.
        directory: PathBuf,
        /// The client's `client_snapdir`, when not `.snap`.
        #[serde(default)]
        snapdir: Option<String>,
    },
}

impl ProviderConfig {
    pub fn build(&self) -> Box<dyn Provider> {
        match self {
            ProviderConfig::Btrfs {
                subvolume,
                snapshots,
            } => Box::new(Btrfs::new(subvolume.clone(), snapshots.clone())),
            ProviderConfig::DirCopy { source, snapshots } => {
                Box::new(DirCopy::new(source.clone(), snapshots.clone()))
            }
            ProviderConfig::Command {
                program,
                args,
                fsfreeze,
                timeout_ms,
                hold_limit_ms,
            } => {
                let mut provider = CommandProvider::new(program.clone(), args.clone())
                    .with_timeout(
                        timeout_ms.map_or(DEFAULT_COMMAND_TIMEOUT, Duration::from_millis),
                    );
                if let Some(mount) = fsfreeze {
                    provider = provider.with_fsfreeze(
                        mount.clone(),
                        hold_limit_ms.map_or(DEFAULT_FSFREEZE_HOLD_LIMIT, Duration::from_millis),
                    );
                }
                Box::new(provider)
            }
            ProviderConfig::Lvm {
                volume_group,
                logical_volume,
                snapshot_size,
                mount_dir,
                mount_options,
            } => Box::new(Lvm::new(
                volume_group.clone(),
                logical_volume.clone(),
                snapshot_size.clone(),
                mount_dir.clone(),
                mount_options.clone(),
            )),
            ProviderConfig::Zfs { dataset } => Box::new(Zfs::new(dataset.clone())),
            ProviderConfig::Cephfs { directory, snapdir } => {
                Box::new(Cephfs::new(directory.clone(), snapdir.clone()))
            }
        }
    }

    /// Checks, once at daemon start, what can be checked cheaply, and refuses what cannot work:
    ///
    /// - `btrfs`: the subvolume exists and is a subvolume; `snapshots` is a directory on the
    ///   same btrfs file system;
    /// - `dir-copy`: `source` is a directory;
    /// - `command`: the program exists and is executable; with `fsfreeze`, the mount point is a
    ///   mount point other than `/`, and none of `own_paths` lies on the file system it freezes;
    /// - `lvm`, `zfs`: names and sizes are well-formed and the tools are installed;
    /// - `cephfs`: `directory` is a directory on a CephFS mount (mountinfo type `ceph` or
    ///   `fuse.ceph-fuse`) that answers `statfs`, and a probe snapshot is made and removed there,
    ///   so that a client without the `s` capability (or a file system without
    ///   `allow_new_snaps`) fails the start, saying what to run.
    ///
    /// `own_paths` are the files and directories the daemon itself writes (its catalog, its state
    /// directory, its logs); one that does not exist yet is checked through its nearest existing
    /// ancestor. A daemon that freezes a file system it writes to deadlocks on its own write.
    pub fn check(&self, own_paths: &[&Path]) -> Result<(), ProviderError> {
        match self {
            ProviderConfig::Btrfs {
                subvolume,
                snapshots,
            } => btrfs::check(subvolume, snapshots),
            ProviderConfig::DirCopy { source, .. } => dir_copy::check(source),
            ProviderConfig::Command {
                program,
                fsfreeze,
                timeout_ms,
                hold_limit_ms,
                ..
            } => command::check(
                program,
                fsfreeze.as_deref(),
                *timeout_ms,
                *hold_limit_ms,
                own_paths,
            ),
            ProviderConfig::Lvm {
                volume_group,
                logical_volume,
                snapshot_size,
                mount_dir,
                ..
            } => lvm::check(volume_group, logical_volume, snapshot_size, mount_dir),
            ProviderConfig::Zfs { dataset } => zfs::check(dataset),
            ProviderConfig::Cephfs { directory, snapdir } => {
                cephfs::check(directory, snapdir.as_deref())
            }
        }
    }
}

/// Runs an external tool, turning a non-zero exit into an error that quotes its stderr.
fn run(
    provider: &'static str,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<(), ProviderError> {
    run_for_output(provider, program, args).map(drop)
}

/// [`run`], returning the tool's stdout.
fn run_for_output(
    provider: &'static str,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<String, ProviderError> {
    let command = command_line(program, args);
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|cause| ProviderError::Io {
            provider,
            what: format!("running `{command}` (is it installed?)"),
            cause,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(ProviderError::Command {
            provider,
            command,
            status: output.status.to_string(),
            stderr: process::last_bytes(&output.stderr, process::STDERR_KEPT),
        })
    }
}

/// A command line for messages: the program and its arguments, separated by spaces.
fn command_line<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> String {
    std::iter::once(program.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// Refuses a set id that is not a safe single file name (it becomes a directory, an LV or a
/// ZFS snapshot name).
fn check_set_id(provider: &'static str, set_id: &str) -> Result<(), ProviderError> {
    // `is_valid_id` admits dots, so `.` and `..` pass it: they would name the snapshot
    // directory itself or its parent.
    if !quiesce_proto::metadata::is_valid_id(set_id) || set_id == "." || set_id == ".." {
        return Err(ProviderError::Refused {
            provider,
            reason: format!("set id {set_id:?} is not a safe file name"),
        });
    }
    Ok(())
}

/// The snapshot directory for a set; set ids are checked so they cannot escape `snapshots`.
fn snapshot_path(
    provider: &'static str,
    snapshots: &Path,
    set_id: &str,
) -> Result<PathBuf, ProviderError> {
    check_set_id(provider, set_id)?;
    Ok(snapshots.join(set_id))
}

/// Whether an executable named `tool` is on `PATH`.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| is_executable_file(&d.join(tool))))
        .unwrap_or(false)
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Refuses when `tool` is missing, naming the package that brings it.
fn require_tool(provider: &'static str, tool: &str, package: &str) -> Result<(), ProviderError> {
    if on_path(tool) {
        Ok(())
    } else {
        Err(ProviderError::Refused {
            provider,
            reason: format!("`{tool}` is not on PATH: install the package {package}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProviderConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn every_provider_parses_from_its_documented_keys() {
        assert_eq!(
            parse("provider = \"command\"\nprogram = \"/usr/local/bin/san-snap\"\n").unwrap(),
            ProviderConfig::Command {
                program: "/usr/local/bin/san-snap".into(),
                args: vec![],
                fsfreeze: None,
                timeout_ms: None,
                hold_limit_ms: None,
            }
        );
        assert_eq!(
            parse(
                "provider = \"command\"\nprogram = \"/bin/snap\"\nargs = [\"--pool\", \"p1\"]\n\
                 fsfreeze = \"/srv\"\ntimeout_ms = 5000\nhold_limit_ms = 2000\n"
            )
            .unwrap(),
            ProviderConfig::Command {
                program: "/bin/snap".into(),
                args: vec!["--pool".into(), "p1".into()],
                fsfreeze: Some("/srv".into()),
                timeout_ms: Some(5000),
                hold_limit_ms: Some(2000),
            }
        );
        assert_eq!(
            parse(
                "provider = \"lvm\"\nvolume_group = \"vg0\"\nlogical_volume = \"data\"\n\
                 snapshot_size = \"1G\"\nmount_dir = \"/run/quiesce/snapshots\"\n\
                 mount_options = \"nouuid\"\n"
            )
            .unwrap(),
            ProviderConfig::Lvm {
                volume_group: "vg0".into(),
                logical_volume: "data".into(),
                snapshot_size: "1G".into(),
                mount_dir: "/run/quiesce/snapshots".into(),
                mount_options: Some("nouuid".into()),
            }
        );
        assert_eq!(
            parse("provider = \"zfs\"\ndataset = \"tank/data\"\n").unwrap(),
            ProviderConfig::Zfs {
                dataset: "tank/data".into()
            }
        );
        assert_eq!(
            parse("provider = \"cephfs\"\ndirectory = \"/mnt/cephfs/shared\"\n").unwrap(),
            ProviderConfig::Cephfs {
                directory: "/mnt/cephfs/shared".into(),
                snapdir: None,
            }
        );
        assert_eq!(
            parse("provider = \"cephfs\"\ndirectory = \"/c\"\nsnapdir = \".snapshots\"\n").unwrap(),
            ProviderConfig::Cephfs {
                directory: "/c".into(),
                snapdir: Some(".snapshots".into()),
            }
        );
    }

    #[test]
    fn only_providers_with_read_only_snapshots_say_so() {
        let cephfs = ProviderConfig::Cephfs {
            directory: "/c".into(),
            snapdir: None,
        };
        assert!(!cephfs.build().writable_snapshot());
        let zfs = ProviderConfig::Zfs {
            dataset: "tank".into(),
        };
        assert!(!zfs.build().writable_snapshot());
        let btrfs = ProviderConfig::Btrfs {
            subvolume: "/a".into(),
            snapshots: "/b".into(),
        };
        assert!(btrfs.build().writable_snapshot());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("provider = \"command\"\nprogram = \"/bin/x\"\ntimeout = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `timeout`"), "{err}");
        let err = parse("provider = \"zfs\"\ndataset = \"tank\"\nrecursive = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `recursive`"), "{err}");
    }

    #[test]
    fn dot_and_dot_dot_are_no_set_ids() {
        for id in [".", "..", "../x", "a/b", ""] {
            let err = snapshot_path("btrfs", Path::new("/snaps"), id).unwrap_err();
            assert!(
                err.to_string().contains("not a safe file name"),
                "{id}: {err}"
            );
        }
        assert_eq!(
            snapshot_path("btrfs", Path::new("/snaps"), "set-1.a_b").unwrap(),
            Path::new("/snaps/set-1.a_b")
        );
    }
}
