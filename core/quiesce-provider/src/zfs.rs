//! The ZFS provider: `zfs snapshot DATASET@SET`, read at `MOUNTPOINT/.zfs/snapshot/SET`.
//!
//! Untested on a real ZFS here (this machine has no ZFS module); built against the documented
//! command lines of zfs-snapshot(8), zfs-destroy(8), zfs-list(8) and zfs-get(8). The commands
//! are built by pure functions below, unit-tested against those documented forms; the runner
//! around them is thin.
//!
//! | step | commands |
//! |---|---|
//! | take | `zfs get -H -o value mountpoint DATASET` (first, so a failure leaves nothing), `zfs snapshot DATASET@SET` |
//! | finalize | nothing: the snapshot is read-only already |
//! | delete | `zfs destroy DATASET@SET` (never `-r`/`-R`, and only a snapshot of this dataset) |
//! | find | `zfs list -H -o name -t snapshot -d 1 DATASET`, looking for `DATASET@SET` |
//!
//! **A ZFS snapshot is read-only from the moment it exists.** There is no writable phase: a
//! writer that needs post-snapshot work (its metadata says `needs_post_snapshot`, e.g. the
//! PostgreSQL writer's `backup_api` mode writing `backup_label`) fails at post-snapshot with
//! "Read-only file system", and the set fails and its snapshot is deleted — loudly, never a
//! snapshot that silently lacks the writer's part. Put such writers on a btrfs or LVM volume.
//! The path is empty when the dataset has no mount point of its own (`none`, `legacy`, or a
//! volume): the snapshot exists, but quiesce cannot say where to read it.

use crate::{check_set_id, require_tool, run_for_output, Provider, ProviderError, SnapshotInfo};
use std::ffi::{OsStr, OsString};

const NAME: &str = "zfs";
/// ZFS_MAX_DATASET_NAME_LEN is 256 with the terminating NUL.
const MAX_NAME_LEN: usize = 255;

/// `zfs snapshot DATASET@SET`, read at `MOUNTPOINT/.zfs/snapshot/SET`. **Read-only from the
/// start**: `finalize` has nothing to do, and a writer that needs post-snapshot writes fails
/// there, failing the set (its snapshot is deleted). Untested on a real ZFS here; built against
/// the documented CLI (the crate README lists the commands).
#[derive(Debug, Clone)]
pub struct Zfs {
    dataset: String,
}

/// Why `dataset` is no file system or volume name, if it is not: components of
/// `a-z A-Z 0-9 _ - : . space` separated by `/`, the pool's name starting with a letter.
fn dataset_problem(dataset: &str) -> Option<String> {
    if dataset.is_empty() {
        return Some("it is empty".into());
    }
    if dataset.len() > MAX_NAME_LEN {
        return Some(format!("it is longer than {MAX_NAME_LEN} characters"));
    }
    if dataset.split('/').any(str::is_empty) {
        return Some("it has an empty component (a leading, trailing or double `/`)".into());
    }
    if let Some(bad) = dataset
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_-:. /".contains(*c)))
    {
        return Some(format!(
            "{bad:?} is not allowed (a snapshot is named by the provider: give the dataset only)"
        ));
    }
    if !dataset.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Some("a pool name begins with a letter".into());
    }
    None
}

fn args(items: &[&OsStr]) -> Vec<OsString> {
    items.iter().map(|s| s.to_os_string()).collect()
}

fn snapshot_name(dataset: &str, set_id: &str) -> String {
    format!("{dataset}@{set_id}")
}

/// `zfs snapshot DATASET@SET`.
fn zfs_snapshot(snapshot: &str) -> Vec<OsString> {
    args(&["zfs".as_ref(), "snapshot".as_ref(), snapshot.as_ref()])
}

/// `zfs destroy DATASET@SET` — the snapshot form only; no recursion flag, ever.
fn zfs_destroy(snapshot: &str) -> Vec<OsString> {
    assert!(
        snapshot.contains('@'),
        "zfs destroy is only given snapshots"
    );
    args(&["zfs".as_ref(), "destroy".as_ref(), snapshot.as_ref()])
}

/// `zfs get -H -o value mountpoint DATASET`: the bare value, no header (`-H`).
fn zfs_get_mountpoint(dataset: &str) -> Vec<OsString> {
    args(&[
        "zfs".as_ref(),
        "get".as_ref(),
        "-H".as_ref(),
        "-o".as_ref(),
        "value".as_ref(),
        "mountpoint".as_ref(),
        dataset.as_ref(),
    ])
}

/// `zfs list -H -o name -t snapshot -d 1 DATASET`: the dataset's own snapshots (depth 1), one
/// name a line. An empty list is not an error, where naming a missing snapshot would be.
fn zfs_list_snapshots(dataset: &str) -> Vec<OsString> {
    args(&[
        "zfs".as_ref(),
        "list".as_ref(),
        "-H".as_ref(),
        "-o".as_ref(),
        "name".as_ref(),
        "-t".as_ref(),
        "snapshot".as_ref(),
        "-d".as_ref(),
        "1".as_ref(),
        dataset.as_ref(),
    ])
}

/// Where a snapshot of a dataset mounted at `mountpoint` (as `zfs get` printed it) is read:
/// `MOUNTPOINT/.zfs/snapshot/SET`, or `""` for `none`, `legacy` and `-` (a volume).
fn snapshot_path(mountpoint: &str, set_id: &str) -> String {
    let mountpoint = mountpoint.trim();
    if mountpoint.starts_with('/') {
        format!(
            "{}/.zfs/snapshot/{set_id}",
            mountpoint.trim_end_matches('/')
        )
    } else {
        String::new()
    }
}

fn exec(argv: &[OsString]) -> Result<String, ProviderError> {
    let (program, rest) = argv.split_first().expect("every argv names its program");
    let rest: Vec<&OsStr> = rest.iter().map(OsString::as_os_str).collect();
    run_for_output(NAME, &program.to_string_lossy(), &rest)
}

impl Zfs {
    pub fn new(dataset: String) -> Self {
        Zfs { dataset }
    }

    fn snapshot_of(&self, set_id: &str) -> Result<String, ProviderError> {
        check_set_id(NAME, set_id)?;
        let name = snapshot_name(&self.dataset, set_id);
        if name.len() > MAX_NAME_LEN {
            return Err(ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "the snapshot {name:?} would be longer than {MAX_NAME_LEN} characters"
                ),
            });
        }
        Ok(name)
    }

    fn path(&self, set_id: &str) -> Result<String, ProviderError> {
        let mountpoint = exec(&zfs_get_mountpoint(&self.dataset))?;
        Ok(snapshot_path(&mountpoint, set_id))
    }
}

impl Provider for Zfs {
    fn name(&self) -> &'static str {
        NAME
    }

    fn writable_snapshot(&self) -> bool {
        false
    }

    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        let snapshot = self.snapshot_of(set_id)?;
        let path = self.path(set_id)?;
        exec(&zfs_snapshot(&snapshot))?;
        Ok(SnapshotInfo {
            id: snapshot,
            path,
            provider: NAME.into(),
        })
    }

    /// Nothing to do: a ZFS snapshot is read-only from the start.
    fn finalize(&self, _snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        Ok(())
    }

    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        // Only `DATASET@SET` of this very dataset: `zfs destroy` given a dataset name destroys
        // the dataset.
        let ours = snapshot
            .id
            .strip_prefix(&format!("{}@", self.dataset))
            .is_some_and(|set_id| check_set_id(NAME, set_id).is_ok());
        if !ours {
            return Err(ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "snapshot id {:?} is not a snapshot {}@SET-ID of this volume's dataset: it is \
                     left alone",
                    snapshot.id, self.dataset
                ),
            });
        }
        exec(&zfs_destroy(&snapshot.id)).map(drop)
    }

    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        let snapshot = self.snapshot_of(set_id)?;
        let listed = exec(&zfs_list_snapshots(&self.dataset))?;
        if !listed.lines().any(|l| l.trim() == snapshot) {
            return Ok(None);
        }
        Ok(Some(SnapshotInfo {
            id: snapshot,
            path: self.path(set_id)?,
            provider: NAME.into(),
        }))
    }
}

/// [`crate::ProviderConfig::check`] for ZFS: the dataset name is well-formed and `zfs` installed.
pub(crate) fn check(dataset: &str) -> Result<(), ProviderError> {
    if let Some(problem) = dataset_problem(dataset) {
        return Err(ProviderError::Refused {
            provider: NAME,
            reason: format!(
                "dataset = {dataset:?} is no ZFS dataset name: {problem}; write it as zpool \
                 list / zfs list show it, like \"tank/data\""
            ),
        });
    }
    require_tool(NAME, "zfs", "zfsutils-linux")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn the_commands_are_the_documented_ones() {
        // zfs-snapshot(8): `zfs snapshot filesystem@snapname`.
        assert_eq!(
            strings(zfs_snapshot("tank/data@s1")),
            ["zfs", "snapshot", "tank/data@s1"]
        );
        // zfs-destroy(8): `zfs destroy filesystem|volume@snap`.
        assert_eq!(
            strings(zfs_destroy("tank/data@s1")),
            ["zfs", "destroy", "tank/data@s1"]
        );
        assert_eq!(
            strings(zfs_get_mountpoint("tank/data")),
            ["zfs", "get", "-H", "-o", "value", "mountpoint", "tank/data"]
        );
        // zfs-list(8): [-r|-d depth] [-H] [-o property] [-t type] [filesystem|volume|snapshot].
        assert_eq!(
            strings(zfs_list_snapshots("tank/data")),
            [
                "zfs",
                "list",
                "-H",
                "-o",
                "name",
                "-t",
                "snapshot",
                "-d",
                "1",
                "tank/data"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "only given snapshots")]
    fn destroy_is_never_built_for_a_dataset() {
        zfs_destroy("tank/data");
    }

    #[test]
    fn snapshots_are_read_under_the_mount_point_s_zfs_directory() {
        assert_eq!(
            snapshot_path("/tank/data\n", "s1"),
            "/tank/data/.zfs/snapshot/s1"
        );
        assert_eq!(snapshot_path("/", "s1"), "/.zfs/snapshot/s1");
        for unmountable in ["none", "legacy", "-"] {
            assert_eq!(snapshot_path(unmountable, "s1"), "", "{unmountable}");
        }
    }

    #[test]
    fn dataset_names_follow_zfs_rules() {
        assert_eq!(dataset_problem("tank/data-1/a_b.c:d e"), None);
        assert!(dataset_problem("tank/data@snap").unwrap().contains("'@'"));
        assert!(dataset_problem("/tank")
            .unwrap()
            .contains("empty component"));
        assert!(dataset_problem("tank//x")
            .unwrap()
            .contains("empty component"));
        assert!(dataset_problem("1tank")
            .unwrap()
            .contains("begins with a letter"));
        assert!(check("tank/x#b")
            .unwrap_err()
            .to_string()
            .contains("no ZFS dataset name"));
    }

    #[test]
    fn delete_touches_only_snapshots_of_this_dataset() {
        let zfs = Zfs::new("tank/data".into());
        for id in [
            "tank/data",
            "tank/other@s1",
            "tank/data@",
            "tank/data@s1/../x",
            "tank/data/child@s1",
        ] {
            let err = zfs
                .delete(&SnapshotInfo {
                    id: id.into(),
                    path: String::new(),
                    provider: "zfs".into(),
                })
                .unwrap_err()
                .to_string();
            assert!(err.contains("left alone"), "{id}: {err}");
        }
    }
}
