//! Test support shared by the integration tests of quiesce's crates: real components, no mocks.
//!
//! - [`BtrfsVolume`]: a real btrfs file system on a loop device, with a data subvolume and a
//!   snapshot directory, unmounted when dropped;
//! - [`plugin`] / [`binary`]: build a workspace package and return its `.so` / executable;
//! - [`host_config`]: a host configuration over a volume and plugins;
//! - [`require`] / [`require_root`]: fail loudly, naming the package, when something is missing;
//! - [`Bus`]: a private `dbus-daemon` with a permissive or the project's system-bus policy;
//! - [`Child`]: a process killed when the test ends; [`wait_until`]: wait on a condition;
//! - [`Netns`]: a network namespace whose link to the test can be cut and restored;
//! - [`postgres`]: PostgreSQL's binaries and tools run as the `postgres` user;
//! - [`ceph`]: a real Ceph cluster (mon, mgr, OSD, MDS, CephFS) and `ceph-fuse` mounts, also
//!   from network namespaces;
//! - [`mariadb`]: private MariaDB servers (install, start, stop, restored copies, checks);
//! - [`guest`]: a tiny real virtual machine (Debian's kernel, busybox, the real `qemu-ga`) whose
//!   workload acknowledges records written to its virtio disk.
//!
//! It deliberately depends on no quiesce crate, so any crate's tests can use it.

pub mod ceph;
pub mod guest;
pub mod mariadb;
mod netns;
mod notify;
pub mod postgres;

pub use ceph::{CephClient, CephCluster, CephMount};
pub use netns::{drop_packets, pass_packets, Netns};
pub use notify::NotifySocket;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the test bed lives two levels below the workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Fails loudly when a tool is missing (CI installs them all: `scripts/setup`).
pub fn require(tool: &str, debian_package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install the Debian package {debian_package} (scripts/setup does)"
    );
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (loop devices, mounts, other uids); CI runs as root"
    );
}

/// Waits until `condition` returns `Some`, failing with `what` after `timeout`.
///
/// The condition is the synchronisation; the short pause between two polls only keeps the
/// waiting from spinning. Use it for conditions nothing can notify (a file's content, another
/// process's state).
pub fn wait_until<T>(what: &str, timeout: Duration, condition: impl FnMut() -> Option<T>) -> T {
    wait_until_or(what, timeout, condition, String::new)
}

/// [`wait_until`], adding `context()` (a log, say) to the failure message.
pub fn wait_until_or<T>(
    what: &str,
    timeout: Duration,
    condition: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    poll_until(timeout, condition)
        .unwrap_or_else(|| panic!("{what}: not within {timeout:?}\n{}", context()))
}

/// [`wait_until`] for callers that record a condition that does not come true instead of
/// failing (the lab's soak): `None` when `condition` did not return `Some` within `timeout`.
pub fn poll_until<T>(timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lets a test writer hanging on `fifo` (the misbehave plugin's `hang_fifo`) go on: opening the
/// FIFO for writing returns its blocked open for reading (it only opens it: nothing is written).
/// The open is non-blocking — it fails with ENXIO while no reader has the FIFO open — and tried
/// until `timeout`: false when no writer was hanging on it by then. (A blocking open would hang
/// the test for ever on a writer that never reached its hang.)
pub fn release_fifo(fifo: &Path, timeout: Duration) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    poll_until(timeout, || {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(fifo)
        {
            Ok(_) => Some(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => None,
            Err(e) => panic!("opening {}: {e}", fifo.display()),
        }
    })
    .is_some()
}

/// A child process with its stderr in a file, killed (SIGKILL, as a crash) when dropped, however
/// the test ends.
#[derive(Debug)]
pub struct Child {
    pub child: std::process::Child,
    pub stderr: PathBuf,
}

impl Child {
    pub fn spawn(mut command: Command, stderr: PathBuf) -> Child {
        let file = std::fs::File::create(&stderr).unwrap();
        let child = command
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Child { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command, failing with its output when it fails.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One cargo build at a time; a failed build is easier to read alone.
static BUILD: Mutex<()> = Mutex::new(());

fn build(package: &str) {
    build_with(package, &[]);
}

/// `cargo build -p package <more>`, once per process.
fn build_with(package: &str, more: &[&str]) {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let mut done = built.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{package} {}", more.join(" "));
    if done.contains(&key) {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", package])
        .args(more);
    // Cargo gives a test process the variables of its own package (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...). Build scripts that track them (ring's does) would see them
    // change and rebuild, and the next ordinary build would rebuild them back: leave them out.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if is_package_variable(name) {
            command.env_remove(name);
        }
    }
    run(&mut command);
    done.push(key);
}

/// A variable cargo sets for the package it runs (not one that configures cargo).
fn is_package_variable(name: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_BIN_",
        "CARGO_CRATE_",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || [
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .contains(&name)
}

/// Builds a workspace plugin package and returns its shared library.
pub fn plugin(package: &str) -> PathBuf {
    build(package);
    let lib = target_dir()
        .join("debug")
        .join(format!("lib{}.so", package.replace('-', "_")));
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

/// Builds the example `name` of a workspace package and returns its executable.
pub fn example(package: &str, name: &str) -> PathBuf {
    build_with(package, &["--example", name]);
    let exe = target_dir().join("debug/examples").join(name);
    assert!(exe.is_file(), "{} was not built", exe.display());
    exe
}

/// Builds a workspace binary package and returns the executable `name`.
pub fn binary(package: &str, name: &str) -> PathBuf {
    build(package);
    let exe = target_dir().join("debug").join(name);
    assert!(exe.is_file(), "{} was not built", exe.display());
    exe
}

/// A real btrfs file system on a loop device: `data` is a subvolume (what gets snapshotted),
/// `snapshots` the directory snapshots go to. Unmounted (and the loop device freed) on drop.
#[derive(Debug)]
pub struct BtrfsVolume {
    pub mount: PathBuf,
    pub data: PathBuf,
    pub snapshots: PathBuf,
    dir: tempfile::TempDir,
}

impl BtrfsVolume {
    /// Makes a sparse image of `size_mb` (btrfs needs at least 114), formats and mounts it.
    pub fn create(size_mb: u64) -> BtrfsVolume {
        require_root();
        require("mkfs.btrfs", "btrfs-progs");
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("volume.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mb.max(128) << 20)
            .unwrap();
        run(Command::new("mkfs.btrfs").arg("-q").arg(&image));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&image)
            .arg(&mount));
        let data = mount.join("data");
        run(Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(&data));
        let snapshots = mount.join(".snapshots");
        std::fs::create_dir(&snapshots).unwrap();
        // Open to other users too (databases run as their own user).
        for p in [dir.path(), &mount, &data] {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        BtrfsVolume {
            mount,
            data,
            snapshots,
            dir,
        }
    }

    /// The snapshots on the volume now (subvolumes under `snapshots`).
    pub fn snapshot_list(&self) -> Vec<PathBuf> {
        let mut list: Vec<PathBuf> = std::fs::read_dir(&self.snapshots)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        list.sort();
        list
    }

    /// Whether a path on the volume is read-only (a finalized snapshot).
    pub fn is_read_only(path: &Path) -> bool {
        run(Command::new("btrfs")
            .args(["property", "get", "-ts"])
            .arg(path)
            .arg("ro"))
        .trim()
            == "ro=true"
    }

    /// The directory holding the image, for other scratch files of the test.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for BtrfsVolume {
    fn drop(&mut self) {
        // Lazy: a process of the test may still hold a file open; the loop device goes with it.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Which policy a private bus runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Everything allowed: the host's own uid check is all that stands in the way.
    Permissive,
    /// Debian's system-bus defaults plus the project's `dbus/org.quiesce.Host1.conf`.
    System,
}

/// A private `dbus-daemon`, stopped when dropped.
pub struct Bus {
    pub address: String,
    pid: i32,
    _dir: tempfile::TempDir,
}

impl Bus {
    pub fn start(policy: Policy) -> Bus {
        require("dbus-daemon", "dbus-daemon");
        let dir = tempfile::tempdir().unwrap();
        // Other uids must reach the socket.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("bus");
        let rules = match policy {
            Policy::Permissive => r#"
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>"#
                .to_string(),
            Policy::System => format!(
                r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <include>{}</include>"#,
                crate::workspace_root()
                    .join("dbus/org.quiesce.Host1.conf")
                    .display()
            ),
        };
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>quiesce-test</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>{rules}
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let output = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--fork", "--print-address=1", "--print-pid=1", "--nosyslog"])
            .output()
            .expect("running dbus-daemon");
        assert!(
            output.status.success(),
            "dbus-daemon failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let mut lines = stdout.lines();
        let address = lines
            .next()
            .expect("dbus-daemon printed its address")
            .to_string();
        let pid = lines
            .next()
            .expect("dbus-daemon printed its pid")
            .trim()
            .parse()
            .unwrap();
        Bus {
            address,
            pid,
            _dir: dir,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

/// A host configuration (TOML text) for node `node`: the plugins copied into a plugin directory
/// under `dir`, the btrfs `volume` as the volume `shared`, then `body` (plugin tables,
/// `hold_limit_ms`, `[timeouts]`, ...) appended as given.
pub fn host_config(dir: &Path, volume: &BtrfsVolume, plugins: &[&Path], body: &str) -> String {
    let plugin_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    for lib in plugins {
        std::fs::copy(lib, plugin_dir.join(lib.file_name().unwrap())).unwrap();
    }
    // Top-level keys of `body` must come before any table: split them off.
    let (top, tables): (Vec<&str>, Vec<&str>) = {
        let at = body
            .lines()
            .position(|l| l.trim_start().starts_with('['))
            .unwrap_or(body.lines().count());
        let lines: Vec<&str> = body.lines().collect();
        (lines[..at].to_vec(), lines[at..].to_vec())
    };
    format!(
        "node = \"node1\"\nplugin_dir = {plugin_dir:?}\n{}\n\n[volumes.shared]\nprovider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n\n{}\n",
        top.join("\n"),
        volume.data,
        volume.snapshots,
        tables.join("\n"),
        plugin_dir = plugin_dir.display().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_config_keeps_top_level_keys_before_tables() {
        let body = "hold_limit_ms = 500\n[plugins.x]\na = 1\n";
        let top = "hold_limit_ms = 500";
        let dir = tempfile::tempdir().unwrap();
        let fake = BtrfsVolume {
            mount: "/m".into(),
            data: "/m/data".into(),
            snapshots: "/m/.snapshots".into(),
            dir: tempfile::tempdir().unwrap(),
        };
        let text = host_config(dir.path(), &fake, &[], body);
        std::mem::forget(fake); // nothing mounted
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["hold_limit_ms"].as_integer(), Some(500));
        assert_eq!(parsed["plugins"]["x"]["a"].as_integer(), Some(1));
        assert_eq!(
            parsed["volumes"]["shared"]["provider"].as_str(),
            Some("btrfs")
        );
        assert!(text.contains(top));
    }

    #[test]
    fn a_btrfs_volume_snapshots_and_cleans_up() {
        let volume = BtrfsVolume::create(256);
        std::fs::write(volume.data.join("f"), "x").unwrap();
        let snap = volume.snapshots.join("s1");
        run(Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(&volume.data)
            .arg(&snap));
        assert!(BtrfsVolume::is_read_only(&snap));
        assert_eq!(volume.snapshot_list(), vec![snap.clone()]);
        assert_eq!(std::fs::read_to_string(snap.join("f")).unwrap(), "x");
        let mount = volume.mount.clone();
        drop(volume);
        assert!(
            !mount.exists()
                || std::fs::read_dir(&mount)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(true)
        );
    }
}
