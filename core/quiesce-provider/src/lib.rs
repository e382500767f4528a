//! Snapshot providers: what takes the snapshot once every writer is frozen.
//!
//! A provider's calls are synchronous and may block (they run external tools); callers run them
//! on blocking threads under the set's provider deadline. Every snapshot is made writable first,
//! so writers can finish their part on it (post-snapshot), and then made read-only by
//! [`Provider::finalize`] — the btrfs way, which the others follow.

mod btrfs;
mod dir_copy;

pub use btrfs::Btrfs;
pub use dir_copy::DirCopy;
pub use quiesce_proto::SnapshotInfo;

use serde::Deserialize;
use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider}: {what} failed: {cause}")]
    Io {
        provider: &'static str,
        what: String,
        #[source]
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
}

/// Takes, finalizes and deletes snapshots of one volume.
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
}

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
        }
    }
}

/// Runs an external tool, turning a non-zero exit into an error that quotes its stderr.
fn run(
    provider: &'static str,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<(), ProviderError> {
    let command = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|cause| ProviderError::Io {
            provider,
            what: format!("running `{command}` (is it installed?)"),
            cause,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ProviderError::Command {
            provider,
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The snapshot directory for a set; set ids are checked so they cannot escape `snapshots`.
fn snapshot_path(
    provider: &'static str,
    snapshots: &std::path::Path,
    set_id: &str,
) -> Result<PathBuf, ProviderError> {
    if !quiesce_proto::metadata::is_valid_id(set_id) {
        return Err(ProviderError::Refused {
            provider,
            reason: format!("set id {set_id:?} is not a safe file name"),
        });
    }
    Ok(snapshots.join(set_id))
}
