//! Which mount a path lies on, and which file system that is — from `/proc/self/mountinfo`.
//!
//! `st_dev` alone does not tell whether two paths share a file system: every btrfs subvolume
//! has a `st_dev` of its own, while a freeze (FIFREEZE) acts on the whole file system. The
//! `major:minor` field of mountinfo is the file system's own device, the same for every mount
//! and every subvolume of it.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// The file system's device (`major:minor`), shared by all mounts of one file system.
    pub device: (u32, u32),
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The file system's own options (the last field): a CephFS kernel mount's `name=CLIENT`
    /// and `fs=NAME` (or `mds_namespace=NAME`) are there.
    pub super_options: String,
}

/// Parses `/proc/self/mountinfo` (proc(5)): `ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS`. Lines that do not parse are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            let fs_type = unescape(fields.get(separator + 1)?);
            let super_options = fields
                .get(separator + 3)
                .map(|o| unescape(o))
                .unwrap_or_default();
            Some(Mount {
                device: (major.parse().ok()?, minor.parse().ok()?),
                mount_point,
                fs_type,
                super_options,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|b| (b'0'..=b'7').contains(b))
                .then(|| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok())
                .flatten()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn read_mounts() -> io::Result<Vec<Mount>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t))
}

/// The mount that `path` (absolute, symlinks resolved) lies on: the one with the longest mount
/// point above it; of two on the same mount point, the later one (it is mounted over the other).
pub(crate) fn containing<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .fold(None, |best: Option<&Mount>, m| match best {
            Some(b) if b.mount_point.components().count() > m.mount_point.components().count() => {
                Some(b)
            }
            _ => Some(m),
        })
}

/// `path` itself if it exists, else its nearest existing ancestor; absolute, symlinks resolved.
/// A file the daemon will create lands on the file system of that ancestor.
pub(crate) fn nearest_existing(path: &Path) -> io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    for candidate in absolute.ancestors() {
        match candidate.canonicalize() {
            Ok(found) => return Ok(found),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no part of {} exists", path.display()),
    ))
}

pub(crate) fn is_mount_point(mounts: &[Mount], canonical: &Path) -> bool {
    mounts.iter().any(|m| m.mount_point == canonical)
}

/// Whether two existing, canonical paths lie on one file system: the same `st_dev`, or mounts
/// of the same file system (two subvolumes of one btrfs have different `st_dev`s).
pub(crate) fn same_file_system(mounts: &[Mount], a: &Path, b: &Path) -> io::Result<bool> {
    if std::fs::metadata(a)?.dev() == std::fs::metadata(b)?.dev() {
        return Ok(true);
    }
    Ok(match (containing(mounts, a), containing(mounts, b)) {
        (Some(ma), Some(mb)) => ma.device == mb.device,
        _ => false,
    })
}

/// Whether `path` is the root of a btrfs subvolume: a directory on btrfs whose inode is 256
/// (`BTRFS_FIRST_FREE_OBJECTID`, the root directory of every subvolume — the test btrfs-progs
/// itself uses).
pub(crate) fn is_btrfs_subvolume(path: &Path) -> io::Result<bool> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() || meta.ino() != 256 {
        return Ok(false);
    }
    let canonical = path.canonicalize()?;
    let mounts = read_mounts()?;
    Ok(containing(&mounts, &canonical).is_some_and(|m| m.fs_type == "btrfs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
43 22 0:39 / /tmp/vol/mnt rw,relatime shared:30 - btrfs /dev/loop0 rw,subvolid=5,subvol=/
44 22 0:39 /data /srv/data rw,relatime - btrfs /dev/loop0 rw,subvolid=256,subvol=/data
45 22 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw
46 43 0:51 / /tmp/vol/mnt/inner rw - tmpfs tmpfs rw
47 22 0:52 / /srv/data rw - tmpfs over rw
";

    #[test]
    fn parses_devices_mount_points_and_types() {
        let mounts = parse_mountinfo(SAMPLE);
        assert_eq!(mounts.len(), 6);
        assert_eq!(
            mounts[1],
            Mount {
                device: (0, 39),
                mount_point: "/tmp/vol/mnt".into(),
                fs_type: "btrfs".into(),
                super_options: "rw,subvolid=5,subvol=/".into(),
            }
        );
        assert_eq!(mounts[3].mount_point, Path::new("/mnt/with space"));
        // Optional fields (`shared:30`) are skipped up to the separator.
        assert_eq!(mounts[0].fs_type, "ext4");
    }

    #[test]
    fn a_path_lies_on_the_deepest_mount_above_it() {
        let mounts = parse_mountinfo(SAMPLE);
        let on = |p: &str| containing(&mounts, Path::new(p)).unwrap().device;
        assert_eq!(on("/etc/passwd"), (0, 21));
        assert_eq!(on("/tmp/vol/mnt/x/y"), (0, 39));
        assert_eq!(on("/tmp/vol/mnt/inner/z"), (0, 51));
        // Components, not strings: /tmp/vol/mntx is not under /tmp/vol/mnt.
        assert_eq!(on("/tmp/vol/mntx"), (0, 21));
        // Two mounts on one point: the later one is on top.
        assert_eq!(on("/srv/data/f"), (0, 52));
        assert!(is_mount_point(&mounts, Path::new("/mnt/with space")));
        assert!(!is_mount_point(&mounts, Path::new("/mnt")));
    }

    #[test]
    fn a_missing_path_is_judged_by_its_nearest_existing_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let found = nearest_existing(&tmp.path().join("not/yet/catalog.db")).unwrap();
        assert_eq!(found, tmp.path().canonicalize().unwrap());
    }

    #[test]
    fn unescape_leaves_other_backslashes() {
        assert_eq!(unescape(r"a\040b\134c\x"), "a b\\c\\x");
    }
}
