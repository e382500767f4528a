//! The node flush: what this node still caches of a shared volume reaches the storage before the
//! snapshot — the Cluster Shared Volume writer of the seed.
//!
//! On a volume that nodes really share, each node has its own cache, and a snapshot taken by the
//! storage (a filer, an array, CephFS's `.snap`) holds only what reached the storage. Freezing
//! the applications stops new writes; it does not push out the pages their earlier writes left
//! in this node's kernel (data written through `mmap` above all). So every host that mounts a
//! volume (`[volumes.NAME] mount = …`) serves one built-in writer, `flush.NAME`, at the last
//! level, [`Level::Volume`]: the set freezes it once every writer of every node above it holds
//! still, and the broker takes the snapshot only when every node's flush answered. Its freeze is:
//!
//! - `syncfs` (the default): `syncfs(2)` of the mount, which writes back and waits for this
//!   node's dirty pages of that file system. On a FUSE mount (`ceph-fuse`) `syncfs` returns
//!   before the FUSE server has the pages (the kernel does not wait for a FUSE server's
//!   writeback), so the flush then waits until the mount's FUSE connection has no request
//!   waiting (fusectl's `waiting`): measured, that is when `ceph-fuse` holds every page, and a
//!   CephFS snapshot makes it flush them (README, "CephFS");
//! - `fifreeze`: the file system's own freeze (`FIFREEZE`, thawed by `FITHAW` at thaw, abort,
//!   or the worker's hold-limit watchdog) — GFS2, OCFS2, XFS, ext4 — which flushes and holds
//!   every writer of the file system on this node, the host's own included: refused at start on
//!   a file system the host writes to;
//! - `none`: nothing, only when the configuration asks; the record says so (`flush_mode`).
//!
//! Every operation on the mount runs on a thread of its own under the call's budget: a hung
//! mount (a FUSE server stopped, an NFS server gone) fails the freeze naming the node, the volume
//! and the mount, instead of holding the writer's worker; until that operation comes back, later
//! calls are refused at once.

use crate::worker::Backend;
use quiesce_proto::{
    CallFailure, Component, ComponentKind, Level, Reports, WriterCall, WriterMetadata,
};
use serde::Deserialize;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How a node flushes its cache of a volume inside the freeze (`[volumes.NAME] flush`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlushMode {
    #[default]
    Syncfs,
    Fifreeze,
    None,
}

impl FlushMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushMode::Syncfs => "syncfs",
            FlushMode::Fifreeze => "fifreeze",
            FlushMode::None => "none",
        }
    }
}

/// The id of the flush writer of `volume`.
pub fn writer_id(volume: &str) -> String {
    format!("flush.{volume}")
}

/// Where fusectl shows the FUSE connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";
/// `FUSE_SUPER_MAGIC`: the `statfs` type of every FUSE file system.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc_int);
#[allow(non_camel_case_types)]
type libc_int = std::ffi::c_int;

/// The built-in writer that flushes this node's cache of one volume.
pub struct VolumeFlush {
    node: String,
    volume: String,
    mount: PathBuf,
    mode: FlushMode,
    /// The mount's FUSE connection's `waiting` file, on a FUSE mount.
    fuse_waiting: Option<PathBuf>,
    /// Whether this writer froze the file system (`fifreeze`) and has not thawed it.
    frozen: bool,
    /// An operation on the mount that outlived its budget and has not come back yet.
    stuck: Arc<AtomicBool>,
}

impl VolumeFlush {
    /// Checks the mount and makes the writer; the error says what to fix.
    pub fn new(
        node: &str,
        volume: &str,
        mount: &Path,
        mode: FlushMode,
    ) -> Result<VolumeFlush, String> {
        let key = format!("[volumes.{volume}] mount");
        if !mount.is_absolute() {
            return Err(format!(
                "{key} = {:?} is not an absolute path: give this node's mount point of the volume",
                mount.display().to_string()
            ));
        }
        let is_dir = std::fs::metadata(mount).map(|m| m.is_dir());
        if !matches!(is_dir, Ok(true)) {
            return Err(format!(
                "{key} = {:?} is not a directory here ({}): mount the volume there first, or fix the path",
                mount.display().to_string(),
                is_dir.map_or_else(|e| e.to_string(), |_| "a file".into())
            ));
        }
        if !quiesce_provider::is_mount_point(mount).map_err(|e| format!("{key}: {e}"))? {
            return Err(format!(
                "{key} = {:?} is not a mount point: name the directory the volume is mounted on (a flush of the file system above it would flush nothing of the volume)",
                mount.display().to_string()
            ));
        }
        if mode == FlushMode::Fifreeze {
            // The host logs and talks to the bus while the freeze holds: never on a file
            // system it writes to (the rules of the command provider's fsfreeze).
            quiesce_provider::check_freezable(mount, &[Path::new("/var/log"), Path::new("/run")])
                .map_err(|e| format!("[volumes.{volume}] flush = \"fifreeze\": {e}"))?;
        }
        let fuse_waiting = match mode {
            FlushMode::Syncfs => fuse_connection(mount).map_err(|e| format!("{key}: {e}"))?,
            FlushMode::Fifreeze | FlushMode::None => None,
        };
        let flush = VolumeFlush {
            node: node.into(),
            volume: volume.into(),
            mount: mount.into(),
            mode,
            fuse_waiting,
            frozen: false,
            stuck: Arc::new(AtomicBool::new(false)),
        };
        if mode == FlushMode::Fifreeze {
            // A host that died while it held the freeze left the file system frozen: thaw it
            // (EINVAL when it was not frozen).
            let _ = flush.ioctl_thaw();
        }
        Ok(flush)
    }

    pub fn metadata(&self) -> WriterMetadata {
        let mut metadata = WriterMetadata::new(
            writer_id(&self.volume),
            format!("node flush of volume {}", self.volume),
            Level::Volume,
        );
        metadata.instance = self.mount.display().to_string();
        metadata.components = vec![Component {
            name: "mount".into(),
            kind: ComponentKind::Files,
            volume: self.volume.clone(),
            paths: vec![self.mount.display().to_string()],
        }];
        metadata
    }

    fn what(&self) -> String {
        format!(
            "node {}: flush of volume {} ({} of {})",
            self.node,
            self.volume,
            self.mode.as_str(),
            self.mount.display()
        )
    }

    /// Runs `op` on the mount on a thread of its own, for no longer than `budget`.
    fn on_mount<T: Send + 'static>(
        &self,
        budget: Duration,
        op: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, CallFailure> {
        if self.stuck.load(Ordering::SeqCst) {
            return Err(CallFailure::error(format!(
                "{}: an earlier operation on the mount has not come back (a hung mount?): check the mount (`stat {}`), and restart the host once it answers",
                self.what(),
                self.mount.display()
            )));
        }
        let (done, answer) = mpsc::channel();
        let stuck = self.stuck.clone();
        stuck.store(true, Ordering::SeqCst);
        std::thread::Builder::new()
            .name(format!("flush {}", self.volume))
            .spawn(move || {
                let result = op();
                stuck.store(false, Ordering::SeqCst);
                let _ = done.send(result);
            })
            .map_err(|e| CallFailure::error(format!("{}: starting a thread: {e}", self.what())))?;
        match answer.recv_timeout(budget) {
            Ok(result) => result.map_err(|e| CallFailure::error(format!("{}: {e}", self.what()))),
            Err(_) => Err(CallFailure::timed_out(format!(
                "{}: did not finish within {} ms: the mount may be hung (its server unreachable); no snapshot may count on this node's data",
                self.what(),
                budget.as_millis()
            ))),
        }
    }

    fn freeze(&mut self, budget: Duration) -> Result<Reports, CallFailure> {
        let started = Instant::now();
        let mut reports = Reports::new();
        reports.insert("flush_mode".into(), self.mode.as_str().into());
        reports.insert("flush_mount".into(), self.mount.display().to_string());
        let mount = self.mount.clone();
        match self.mode {
            FlushMode::None => {
                // Still a check that the mount answers: a node whose mount is gone has no
                // data of its applications on the volume at all.
                self.on_mount(budget, move || {
                    std::fs::metadata(&mount)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })?;
                reports.insert(
                    "flush".into(),
                    "none (configured): what this node caches of the volume may be missing from the snapshot".into(),
                );
            }
            FlushMode::Syncfs => {
                let waiting = self.fuse_waiting.clone();
                let deadline = started + budget;
                let drained = self.on_mount(budget, move || {
                    let dir = std::fs::File::open(&mount).map_err(|e| format!("open: {e}"))?;
                    nix::unistd::syncfs(dir.as_fd()).map_err(|e| format!("syncfs: {e}"))?;
                    match waiting {
                        Some(waiting) => drain(&waiting, deadline).map(Some),
                        None => Ok(None),
                    }
                })?;
                if let Some(polls) = drained {
                    reports.insert("flush_fuse_polls".into(), polls.to_string());
                }
            }
            FlushMode::Fifreeze => {
                let dir = std::fs::File::open(&self.mount)
                    .map_err(|e| CallFailure::error(format!("{}: open: {e}", self.what())))?;
                self.on_mount(budget, move || {
                    let mut arg: libc_int = 0;
                    // SAFETY: FIFREEZE takes an int argument it ignores; `dir` is an open
                    // descriptor of the mount point for the whole call.
                    unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }
                        .map(drop)
                        .map_err(|e| match e {
                            nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY => format!(
                                "FIFREEZE: {e}: this file system has no freeze; use flush = \"syncfs\""
                            ),
                            nix::errno::Errno::EBUSY => format!(
                                "FIFREEZE: {e}: it is frozen already (by fsfreeze or another host): thaw it with `fsfreeze --unfreeze {}`",
                                mount.display()
                            ),
                            e => format!("FIFREEZE: {e}"),
                        })
                })?;
                self.frozen = true;
            }
        }
        reports.insert("flush_ms".into(), started.elapsed().as_millis().to_string());
        Ok(reports)
    }

    fn ioctl_thaw(&self) -> Result<(), String> {
        let dir = std::fs::File::open(&self.mount).map_err(|e| format!("open: {e}"))?;
        let mut arg: libc_int = 0;
        // SAFETY: as for FIFREEZE.
        unsafe { fithaw(dir.as_raw_fd(), &mut arg) }
            .map(drop)
            .map_err(|e| format!("FITHAW: {e}"))
    }

    fn thaw(&mut self) -> Result<Reports, CallFailure> {
        if !self.frozen {
            return Ok(Reports::new());
        }
        // Never on a thread that may be left behind: the thaw is what must happen.
        self.ioctl_thaw().map_err(|e| {
            CallFailure::error(format!(
                "{}: {e}: run `fsfreeze --unfreeze {}` now",
                self.what(),
                self.mount.display()
            ))
        })?;
        self.frozen = false;
        Ok(Reports::new())
    }
}

impl Backend for VolumeFlush {
    fn call(
        &mut self,
        call: &WriterCall,
        _set_id: &str,
        budget: Duration,
    ) -> Result<Reports, CallFailure> {
        match call {
            WriterCall::Prepare => {
                let mount = self.mount.clone();
                self.on_mount(budget, move || {
                    std::fs::metadata(&mount)
                        .map(drop)
                        .map_err(|e| format!("the mount does not answer: {e}"))
                })?;
                Ok(Reports::new())
            }
            WriterCall::Freeze => self.freeze(budget),
            WriterCall::Thaw | WriterCall::Abort => self.thaw(),
            WriterCall::PostSnapshot { .. } | WriterCall::Complete { .. } => Ok(Reports::new()),
        }
    }
}

/// Waits until the FUSE connection has no request waiting; returns how many times it looked.
fn drain(waiting: &Path, deadline: Instant) -> Result<u64, String> {
    let mut polls = 0;
    loop {
        polls += 1;
        let text = std::fs::read_to_string(waiting)
            .map_err(|e| format!("reading {}: {e}", waiting.display()))?;
        let count: u64 = text
            .trim()
            .parse()
            .map_err(|e| format!("reading {}: {text:?}: {e}", waiting.display()))?;
        if count == 0 {
            return Ok(polls);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the FUSE server still had {count} request(s) waiting at the deadline ({}): it is not taking this node's pages",
                waiting.display()
            ));
        }
        // The FUSE server answers writeback requests in microseconds to milliseconds.
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The `waiting` file of the mount's FUSE connection, when the mount is a FUSE file system;
/// mounts fusectl where it belongs if nothing did.
fn fuse_connection(mount: &Path) -> Result<Option<PathBuf>, String> {
    use std::os::unix::fs::MetadataExt;
    let statfs = nix::sys::statfs::statfs(mount).map_err(|e| format!("statfs: {e}"))?;
    if statfs.filesystem_type().0 as i64 != FUSE_SUPER_MAGIC {
        return Ok(None);
    }
    let dev = std::fs::metadata(mount)
        .map_err(|e| format!("stat: {e}"))?
        .dev();
    // The connection is named by the kernel's device number of the superblock.
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let connection = Path::new(FUSECTL).join(((major << 20) | minor).to_string());
    if !connection.exists() {
        // fusectl is not mounted (systemd mounts it on most machines): mount it. If that
        // fails, the check below says what is missing.
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let waiting = connection.join("waiting");
    if !waiting.exists() {
        return Err(format!(
            "the mount is a FUSE file system, and its FUSE connection is not in {FUSECTL} ({} is missing): mount fusectl there (`mount -t fusectl none {FUSECTL}`)",
            waiting.display()
        ));
    }
    Ok(Some(waiting))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_that_is_not_a_mount_point_is_refused_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = VolumeFlush::new("n1", "shared", dir.path(), FlushMode::Syncfs)
            .err()
            .unwrap();
        assert!(err.contains("is not a mount point"), "{err}");
        let err = VolumeFlush::new("n1", "shared", Path::new("relative"), FlushMode::Syncfs)
            .err()
            .unwrap();
        assert!(err.contains("not an absolute path"), "{err}");
    }

    #[test]
    fn fifreeze_of_the_root_file_system_is_refused() {
        let err = VolumeFlush::new("n1", "shared", Path::new("/"), FlushMode::Fifreeze)
            .err()
            .unwrap();
        assert!(err.contains("root file system"), "{err}");
    }

    #[test]
    fn syncfs_flush_reports_its_mode_and_time() {
        // The root file system is a mount point here, and syncfs of it is harmless.
        let mut flush =
            VolumeFlush::new("n1", "shared", Path::new("/"), FlushMode::Syncfs).unwrap();
        let reports = flush
            .call(&WriterCall::Freeze, "s1", Duration::from_secs(30))
            .unwrap();
        assert_eq!(reports["flush_mode"], "syncfs");
        assert!(reports.contains_key("flush_ms"), "{reports:?}");
        assert_eq!(flush.metadata().level, Level::Volume);
        assert_eq!(flush.metadata().id, "flush.shared");
    }
}
