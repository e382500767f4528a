//! The LVM provider: a classic (copy-on-write) snapshot of one logical volume, mounted writable.
//!
//! Untested on a real LVM here (this machine has no device-mapper); built against the documented
//! command lines of lvcreate(8), lvchange(8), lvremove(8), lvs(8) and lvm(8)'s valid names. The
//! commands are built by pure functions below, unit-tested against those documented forms; the
//! runner around them is thin.
//!
//! | step | commands |
//! |---|---|
//! | take | `lvcreate --snapshot --size SIZE --name LV-quiesce-SET VG/LV`, `mkdir MOUNT_DIR/SET`, `mount [-o OPTIONS] /dev/VG/LV-quiesce-SET MOUNT_DIR/SET` |
//! | finalize | `mount -o remount,ro MOUNT_DIR/SET`, `lvchange --permission r VG/LV-quiesce-SET` |
//! | delete | `umount MOUNT_DIR/SET` (if mounted), `rmdir MOUNT_DIR/SET`, `lvremove --force VG/LV-quiesce-SET` |
//! | find | `lvs --noheadings --options lv_name VG`, looking for `LV-quiesce-SET` |
//!
//! lvcreate suspends the origin while it creates the snapshot, which freezes the file system on
//! it: no `fsfreeze` is needed. The mount happens in `take`, while writers are frozen, because
//! post-snapshot work needs a writable path; it adds a mount's time to the freeze window. XFS
//! refuses to mount a second file system with the same UUID: set `mount_options = "nouuid"`.
//! Give each volume its own `mount_dir`. The snapshot id recorded is `VG/LV-quiesce-SET`; delete
//! removes only a logical volume of that form (removing an origin would remove all its snapshots).

use crate::{check_set_id, mounts, require_tool, run_for_output};
use crate::{Provider, ProviderError, SnapshotInfo};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

const NAME: &str = "lvm";

/// A classic LVM snapshot `VG/LV-quiesce-SET` of one logical volume, mounted writable at
/// `mount_dir/SET` by `take`, made read-only by `finalize` (remount, `lvchange --permission r`).
/// Untested on a real LVM here; built against the documented CLI (the crate README lists the
/// commands).
#[derive(Debug, Clone)]
pub struct Lvm {
    volume_group: String,
    logical_volume: String,
    snapshot_size: String,
    mount_dir: PathBuf,
    mount_options: Option<String>,
}

/// Strings that lvm(8) reserves inside LV names.
const RESERVED_IN_LV_NAMES: [&str; 14] = [
    "_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
    "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];
/// LVM's name buffer is 128 bytes with its terminating NUL.
const MAX_NAME_LEN: usize = 127;

/// Why `name` is no valid VG or LV name (lvm(8), VALID NAMES), if it is not.
fn name_problem(name: &str, is_lv: bool) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!("it is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c)))
    {
        return Some(format!("{bad:?} is not one of a-z A-Z 0-9 + _ . -"));
    }
    if name.starts_with('-') {
        return Some("it begins with a hyphen".into());
    }
    if matches!(name, "." | "..") || (is_lv && matches!(name, "snapshot" | "pvmove")) {
        return Some("it is a name LVM reserves".into());
    }
    if is_lv {
        if let Some(r) = RESERVED_IN_LV_NAMES.iter().find(|r| name.contains(*r)) {
            return Some(format!("it contains {r:?}, which LVM reserves"));
        }
    }
    None
}

/// Whether `size` is an `lvcreate --size` value: a number with an optional unit
/// (`bBsSkKmMgGtTpPeE`; megabytes without one).
fn is_size(size: &str) -> bool {
    let number = size
        .strip_suffix(|c: char| "bBsSkKmMgGtTpPeE".contains(c))
        .unwrap_or(size);
    let mut parts = number.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let fraction = parts.next();
    !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// The snapshot LV of a set: named after its origin too, so that two volumes of one VG in one
/// set do not collide.
fn snapshot_lv(logical_volume: &str, set_id: &str) -> String {
    format!("{logical_volume}-quiesce-{set_id}")
}

fn args(items: &[&OsStr]) -> Vec<OsString> {
    items.iter().map(|s| s.to_os_string()).collect()
}

/// `lvcreate --snapshot --size SIZE --name SNAPSHOT VG/LV` — writable (lvcreate's default
/// permission is rw).
fn lvcreate_snapshot(vg: &str, lv: &str, size: &str, snapshot: &str) -> Vec<OsString> {
    let origin = format!("{vg}/{lv}");
    args(&[
        "lvcreate".as_ref(),
        "--snapshot".as_ref(),
        "--size".as_ref(),
        size.as_ref(),
        "--name".as_ref(),
        snapshot.as_ref(),
        origin.as_ref(),
    ])
}

/// `mount [-o OPTIONS] /dev/VG/SNAPSHOT TARGET` — the /dev/VG/LV link is the documented name.
fn mount_snapshot(vg: &str, snapshot: &str, options: Option<&str>, target: &Path) -> Vec<OsString> {
    let device = format!("/dev/{vg}/{snapshot}");
    let mut argv = args(&["mount".as_ref()]);
    if let Some(options) = options.filter(|o| !o.is_empty()) {
        argv.extend(args(&["-o".as_ref(), options.as_ref()]));
    }
    argv.extend(args(&[device.as_ref(), target.as_os_str()]));
    argv
}

/// `mount -o remount,ro TARGET`: the file system first, so that nothing writes to a device
/// that is about to become read-only.
fn remount_read_only(target: &Path) -> Vec<OsString> {
    args(&[
        "mount".as_ref(),
        "-o".as_ref(),
        "remount,ro".as_ref(),
        target.as_os_str(),
    ])
}

/// `lvchange --permission r VG/SNAPSHOT`.
fn lvchange_read_only(vg: &str, snapshot: &str) -> Vec<OsString> {
    let lv = format!("{vg}/{snapshot}");
    args(&[
        "lvchange".as_ref(),
        "--permission".as_ref(),
        "r".as_ref(),
        lv.as_ref(),
    ])
}

fn umount(target: &Path) -> Vec<OsString> {
    args(&["umount".as_ref(), target.as_os_str()])
}

/// `lvremove --force VG/SNAPSHOT`: `--force` removes an active LV without asking (there is no
/// one to answer a prompt).
fn lvremove(vg: &str, snapshot: &str) -> Vec<OsString> {
    let lv = format!("{vg}/{snapshot}");
    args(&["lvremove".as_ref(), "--force".as_ref(), lv.as_ref()])
}

/// `lvs --noheadings --options lv_name VG`: one LV name a line, indented.
fn lvs_names(vg: &str) -> Vec<OsString> {
    args(&[
        "lvs".as_ref(),
        "--noheadings".as_ref(),
        "--options".as_ref(),
        "lv_name".as_ref(),
        vg.as_ref(),
    ])
}

fn parse_lv_names(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Runs an argv built above.
fn exec(argv: &[OsString]) -> Result<String, ProviderError> {
    let (program, rest) = argv.split_first().expect("every argv names its program");
    let rest: Vec<&OsStr> = rest.iter().map(OsString::as_os_str).collect();
    run_for_output(NAME, &program.to_string_lossy(), &rest)
}

impl Lvm {
    pub fn new(
        volume_group: String,
        logical_volume: String,
        snapshot_size: String,
        mount_dir: PathBuf,
        mount_options: Option<String>,
    ) -> Self {
        Lvm {
            volume_group,
            logical_volume,
            snapshot_size,
            mount_dir,
            mount_options,
        }
    }

    /// The snapshot LV and mount point of a set, refused when the set id would make a bad name.
    fn names(&self, set_id: &str) -> Result<(String, PathBuf), ProviderError> {
        check_set_id(NAME, set_id)?;
        let snapshot = snapshot_lv(&self.logical_volume, set_id);
        if let Some(problem) = name_problem(&snapshot, true) {
            return Err(ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "the snapshot of set {set_id:?} would be named {snapshot:?}, and {problem}; \
                     use a shorter logical volume or set id"
                ),
            });
        }
        Ok((snapshot, self.mount_dir.join(set_id)))
    }

    /// The set id of a recorded snapshot id `VG/LV-quiesce-SET`, refusing any other LV: delete
    /// must never reach the origin or an LV it did not make.
    fn set_of(&self, snapshot: &SnapshotInfo) -> Result<String, ProviderError> {
        let prefix = format!(
            "{}/{}",
            self.volume_group,
            snapshot_lv(&self.logical_volume, "")
        );
        match snapshot.id.strip_prefix(&prefix) {
            Some(set_id) if check_set_id(NAME, set_id).is_ok() => Ok(set_id.to_string()),
            _ => Err(ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "snapshot id {:?} is not of the form {prefix}SET-ID, so this volume did not \
                     make it: it is left alone",
                    snapshot.id
                ),
            }),
        }
    }

    fn info(&self, snapshot: &str, target: &Path) -> SnapshotInfo {
        SnapshotInfo {
            id: format!("{}/{snapshot}", self.volume_group),
            path: target.to_string_lossy().into_owned(),
            provider: NAME.into(),
        }
    }

    fn is_mounted(target: &Path) -> Result<bool, ProviderError> {
        let mounts = mounts::read_mounts().map_err(|cause| ProviderError::Io {
            provider: NAME,
            what: "reading /proc/self/mountinfo".into(),
            cause,
        })?;
        Ok(mounts::is_mount_point(&mounts, target))
    }
}

impl Provider for Lvm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        let (snapshot, target) = self.names(set_id)?;
        exec(&lvcreate_snapshot(
            &self.volume_group,
            &self.logical_volume,
            &self.snapshot_size,
            &snapshot,
        ))?;
        let mounted = std::fs::create_dir_all(&target)
            .map_err(|cause| ProviderError::Io {
                provider: NAME,
                what: format!("creating mount point {}", target.display()),
                cause,
            })
            .and_then(|()| {
                exec(&mount_snapshot(
                    &self.volume_group,
                    &snapshot,
                    self.mount_options.as_deref(),
                    &target,
                ))
            });
        if let Err(e) = mounted {
            // An unmounted snapshot is of no use to the set, which will fail: leave nothing.
            let _ = std::fs::remove_dir(&target);
            let removed = exec(&lvremove(&self.volume_group, &snapshot)).map_or_else(
                |e| format!("removing it failed too: {e}"),
                |_| "it was removed".into(),
            );
            return Err(ProviderError::Refused {
                provider: NAME,
                reason: format!(
                    "the snapshot {}/{snapshot} was created but could not be mounted ({e}); {removed}",
                    self.volume_group
                ),
            });
        }
        Ok(self.info(&snapshot, &target))
    }

    fn finalize(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        let set_id = self.set_of(snapshot)?;
        let (lv, target) = self.names(&set_id)?;
        exec(&remount_read_only(&target))?;
        exec(&lvchange_read_only(&self.volume_group, &lv)).map(drop)
    }

    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        let set_id = self.set_of(snapshot)?;
        let (lv, target) = self.names(&set_id)?;
        if Self::is_mounted(&target)? {
            exec(&umount(&target))?;
        }
        match std::fs::remove_dir(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ProviderError::Io {
                    provider: NAME,
                    what: format!("removing mount point {}", target.display()),
                    cause: e,
                })
            }
            _ => {}
        }
        exec(&lvremove(&self.volume_group, &lv)).map(drop)
    }

    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        let (lv, target) = self.names(set_id)?;
        let listed = exec(&lvs_names(&self.volume_group))?;
        Ok(parse_lv_names(&listed)
            .contains(&lv.as_str())
            .then(|| self.info(&lv, &target)))
    }
}

/// [`crate::ProviderConfig::check`] for LVM: names and size well-formed, `mount_dir` a
/// directory, the tools installed.
pub(crate) fn check(
    volume_group: &str,
    logical_volume: &str,
    snapshot_size: &str,
    mount_dir: &Path,
) -> Result<(), ProviderError> {
    let refuse = |reason: String| {
        Err(ProviderError::Refused {
            provider: NAME,
            reason,
        })
    };
    if let Some(problem) = name_problem(volume_group, false) {
        return refuse(format!(
            "volume_group = {volume_group:?} is no VG name: {problem}"
        ));
    }
    if let Some(problem) = name_problem(logical_volume, true) {
        return refuse(format!(
            "logical_volume = {logical_volume:?} is no LV name: {problem}"
        ));
    }
    if !is_size(snapshot_size) {
        return refuse(format!(
            "snapshot_size = {snapshot_size:?} is not a size lvcreate takes: write a number and \
             a unit, like \"1G\" or \"500M\""
        ));
    }
    if !mount_dir.is_dir() {
        return refuse(format!(
            "mount_dir = {:?} is not a directory: create it (snapshots are mounted in it as \
             mount_dir/<set-id>)",
            mount_dir.display().to_string()
        ));
    }
    for tool in ["lvcreate", "lvchange", "lvremove", "lvs"] {
        require_tool(NAME, tool, "lvm2")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn the_commands_are_the_documented_ones() {
        // lvcreate(8): `lvcreate --size 100M --snapshot --name snap /dev/vg00/lvol1`, or VG/LV.
        assert_eq!(
            strings(lvcreate_snapshot("vg0", "data", "1G", "data-quiesce-s1")),
            [
                "lvcreate",
                "--snapshot",
                "--size",
                "1G",
                "--name",
                "data-quiesce-s1",
                "vg0/data"
            ]
        );
        assert_eq!(
            strings(mount_snapshot(
                "vg0",
                "data-quiesce-s1",
                Some("nouuid"),
                Path::new("/m/s1")
            )),
            ["mount", "-o", "nouuid", "/dev/vg0/data-quiesce-s1", "/m/s1"]
        );
        assert_eq!(
            strings(mount_snapshot(
                "vg0",
                "data-quiesce-s1",
                None,
                Path::new("/m/s1")
            )),
            ["mount", "/dev/vg0/data-quiesce-s1", "/m/s1"]
        );
        assert_eq!(
            strings(remount_read_only(Path::new("/m/s1"))),
            ["mount", "-o", "remount,ro", "/m/s1"]
        );
        // lvchange(8): -p|--permission rw|r.
        assert_eq!(
            strings(lvchange_read_only("vg0", "data-quiesce-s1")),
            ["lvchange", "--permission", "r", "vg0/data-quiesce-s1"]
        );
        assert_eq!(strings(umount(Path::new("/m/s1"))), ["umount", "/m/s1"]);
        // lvremove(8): `lvremove -f vg00/lvol1` removes an active LV without confirmation.
        assert_eq!(
            strings(lvremove("vg0", "data-quiesce-s1")),
            ["lvremove", "--force", "vg0/data-quiesce-s1"]
        );
        assert_eq!(
            strings(lvs_names("vg0")),
            ["lvs", "--noheadings", "--options", "lv_name", "vg0"]
        );
    }

    #[test]
    fn lvs_output_is_one_indented_name_a_line() {
        let out = "  data\n  data-quiesce-s1\n  swap\n";
        assert_eq!(parse_lv_names(out), ["data", "data-quiesce-s1", "swap"]);
    }

    #[test]
    fn names_follow_lvm_rules() {
        assert_eq!(name_problem("data+1_a.b-c", true), None);
        assert!(name_problem("-data", true).unwrap().contains("hyphen"));
        assert!(name_problem("da/ta", true).unwrap().contains("'/'"));
        assert!(name_problem("pvmove", true).unwrap().contains("reserves"));
        assert!(name_problem("x_rimage_1", true)
            .unwrap()
            .contains("_rimage"));
        assert!(name_problem(&"a".repeat(128), true)
            .unwrap()
            .contains("127"));
        let lvm = Lvm::new("vg0".into(), "data".into(), "1G".into(), "/m".into(), None);
        // A set id can bring in a reserved string: refused before any command runs.
        let err = lvm.names("s_tmeta").unwrap_err().to_string();
        assert!(err.contains("_tmeta"), "{err}");
    }

    #[test]
    fn sizes_are_numbers_with_an_optional_unit() {
        for ok in ["1G", "500M", "100", "1.5g", "2T"] {
            assert!(is_size(ok), "{ok}");
        }
        for bad in ["", "G", "1GB", "-1G", "1.G", "20%ORIGIN", "1 G"] {
            assert!(!is_size(bad), "{bad}");
        }
    }

    #[test]
    fn delete_touches_only_snapshots_this_volume_made() {
        let lvm = Lvm::new("vg0".into(), "data".into(), "1G".into(), "/m".into(), None);
        let ours = SnapshotInfo {
            id: "vg0/data-quiesce-s1".into(),
            path: "/m/s1".into(),
            provider: "lvm".into(),
        };
        assert_eq!(lvm.set_of(&ours).unwrap(), "s1");
        for id in [
            "vg0/data",
            "vg1/data-quiesce-s1",
            "vg0/data-quiesce-",
            "vg0/data-quiesce-../x",
        ] {
            let other = SnapshotInfo {
                id: id.into(),
                ..ours.clone()
            };
            let err = lvm.set_of(&other).unwrap_err().to_string();
            assert!(err.contains("left alone"), "{id}: {err}");
        }
        assert_eq!(lvm.info("data-quiesce-s1", Path::new("/m/s1")), ours);
    }
}
