//! A tiny real virtual machine for the tests of the QEMU writer: Debian's kernel, an initramfs
//! of busybox and the real `qemu-ga`, a virtio disk image with ext4 on the test's volume.
//!
//! What runs in the guest (its `/init`, [`INIT`]):
//!
//! - the virtio disk (`/dev/vda`, ext4, made on the host by [`make_ext4_image`]) is mounted on
//!   `/mnt`;
//! - `qemu-ga` serves the virtio-serial port `org.qemu.guest_agent.0`, supervised like Debian's
//!   systemd unit does it (`Restart=always`, `RestartSec=0`): when it dies it is started again at
//!   once, unless the test asked to hold the restart;
//! - a workload writes numbered records to two files: `durable` (each record appended, then
//!   `fsync`ed) and `buffered` (appended on a file descriptor kept open, never synced), then
//!   acknowledges the record with a line `ack N` on the port `quiesce.events` (a file on the
//!   host). An acknowledged record `N` is in both files as the guest sees them;
//! - commands from the test arrive on the port `quiesce.control` (see [`Guest::command`]).
//!
//! The guest keeps its buffered records in its page cache until something syncs them: periodic
//! writeback is off (`vm.dirty_writeback_centisecs = 0`). With the kernel's defaults they would
//! stay there up to 30 s (`dirty_expire_centisecs`) and then be written in bursts, which makes
//! "what a crash-consistent image misses" a matter of timing; switched off, it is every buffered
//! record since the last sync, which is what the negative control shows. A file-system freeze
//! (`FIFREEZE`, what `guest-fsfreeze-freeze` does) writes them all out.
//!
//! The kernel boots directly in 64-bit mode through its PVH entry point (the ELF `vmlinux`
//! extracted from Debian's `vmlinuz`): under TCG that skips decompressing 30 MB of xz in an
//! emulated CPU (about a minute on a loaded machine). KVM is used when it works; see
//! [`accelerator`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{require, run, target_dir, wait_until_or};

/// The guest's `/init`. `@MODULES@` is replaced by the kernel modules to load, in order.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
die() { echo "quiesce-guest: $*" > /dev/console; [ -n "$EV" ] && echo "error $*" >&4; poweroff -f; }
for m in @MODULES@; do insmod /lib/modules/$m || die "insmod $m failed"; done
# The modules probe their devices asynchronously: wait for the disk and the three ports.
i=0
while [ ! -b /dev/vda ] || [ "$(ls /sys/class/virtio-ports | wc -l)" -lt 3 ]; do
  i=$((i+1)); [ $i -gt 3000 ] && die "the virtio disk or ports did not appear"
  usleep 10000
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do ln -s /dev/${p##*/} /dev/virtio-ports/$(cat $p/name); done
exec 4>/dev/virtio-ports/quiesce.events
EV=1
say() { echo "$*" >&4; }
mount -t ext4 /dev/vda /mnt || die "mounting /dev/vda failed"
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
mkfifo /run/agent-gate
agent_loop() {
  while :; do
    qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log &
    pid=$!
    echo $pid > /run/agent.pid
    say "agent-started $pid"
    wait $pid
    say "agent-exited $?"
    if [ -e /run/agent-hold ]; then say agent-held; read go < /run/agent-gate; fi
  done
}
control_loop() {
  while read -r cmd; do
    case "$cmd" in
      kill-agent) kill -KILL $(cat /run/agent.pid) ;;
      kill-agent-hold) touch /run/agent-hold; kill -KILL $(cat /run/agent.pid) ;;
      release-agent) rm -f /run/agent-hold; echo go > /run/agent-gate ;;
      stop-agent) kill -STOP $(cat /run/agent.pid) ;;
      cont-agent) kill -CONT $(cat /run/agent.pid) ;;
      *) say "error unknown command $cmd"; continue ;;
    esac
    say "done $cmd"
  done < /dev/virtio-ports/quiesce.control
  say "error the control channel closed"
}
grep -q quiesce.agent=off /proc/cmdline || agent_loop &
control_loop &
exec 3>>/mnt/buffered
say ready
n=0
while :; do
  n=$((n+1))
  echo $n >> /mnt/durable
  sync -d /mnt/durable
  echo $n >&3
  say "ack $n"
  usleep 2000
done
"#;

/// The modules the guest loads (and, before them, what they depend on).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    // ext4 asks the crypto API for crc32c at mount time (a soft dependency modules.dep omits).
    "crc32c_generic",
    "ext4",
];

/// The kernel and initramfs a guest boots, built once and cached under the target directory.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel as an ELF `vmlinux` (booted through its PVH entry point).
    pub kernel: PathBuf,
    /// An uncompressed cpio archive.
    pub initramfs: PathBuf,
    /// How long building took, when this process built it (`None`: reused from the cache).
    pub built_in: Option<Duration>,
}

/// The guest image, built on first use and reused from `<target>/quiesce-guest/<key>/` by later
/// runs; the key covers the kernel, busybox, qemu-ga and [`INIT`], so a change of any rebuilds.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(build_guest_image)
}

fn build_guest_image() -> GuestImage {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("xz", "xz-utils");
    let busybox = Path::new("/bin/busybox");
    let agent = Path::new("/usr/sbin/qemu-ga");
    assert!(
        busybox.is_file() && is_static(busybox),
        "a static /bin/busybox is missing: install the Debian package busybox-static (scripts/setup does)"
    );
    assert!(
        agent.is_file(),
        "/usr/sbin/qemu-ga is missing: install the Debian package qemu-guest-agent (scripts/setup does)"
    );
    let (vmlinuz, release) = kernel();
    let modules_dir = Path::new("/lib/modules").join(&release);
    let order = module_order(&modules_dir, MODULES);
    let names: Vec<String> = order
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let init = INIT.replace("@MODULES@", &names.join(" "));

    let mut key = Fnv::new();
    key.add(init.as_bytes());
    for file in [&vmlinuz, busybox, agent] {
        key.add(file.to_string_lossy().as_bytes());
        let m = std::fs::metadata(file).unwrap();
        key.add(&m.len().to_le_bytes());
        key.add(&m.mtime().to_le_bytes());
    }
    let dir = target_dir()
        .join("quiesce-guest")
        .join(format!("{release}-{:016x}", key.0));
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        built_in: None,
    };
    if image.kernel.is_file() && image.initramfs.is_file() {
        return image;
    }
    let started = Instant::now();
    // Built beside, then renamed into place: a concurrent test process never sees half a build.
    let parent = dir.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap();
    let work = tempfile::tempdir_in(parent).unwrap();
    extract_vmlinux(&vmlinuz, &work.path().join("vmlinux"));

    let mut cpio = Cpio::default();
    for d in [
        "bin", "dev", "etc", "lib", "mnt", "proc", "run", "sys", "tmp", "usr", "usr/sbin",
    ] {
        cpio.dir(d);
    }
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap());
    cpio.file("usr/sbin/qemu-ga", 0o755, &std::fs::read(agent).unwrap());
    for lib in shared_libraries(agent) {
        let inside = lib.strip_prefix("/").unwrap();
        let mut path = PathBuf::new();
        for part in inside.parent().unwrap().components() {
            path.push(part);
            cpio.dir(&path.to_string_lossy());
        }
        // The real file behind the loader's path (symlinks followed).
        cpio.file(
            &inside.to_string_lossy(),
            0o755,
            &std::fs::read(&lib).unwrap(),
        );
    }
    cpio.dir("lib/modules");
    for (module, name) in order.iter().zip(&names) {
        cpio.file(
            &format!("lib/modules/{name}"),
            0o644,
            &std::fs::read(module).unwrap(),
        );
    }
    std::fs::write(work.path().join("initramfs.cpio"), cpio.finish()).unwrap();
    let work = work.keep();
    match std::fs::rename(&work, &dir) {
        Ok(()) => {}
        // Another process finished the same build first: use its copy.
        Err(_) if image.kernel.is_file() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Err(e) => panic!("moving the guest image into {}: {e}", dir.display()),
    }
    GuestImage {
        built_in: Some(started.elapsed()),
        ..image
    }
}

fn is_static(binary: &Path) -> bool {
    // ldd says "not a dynamic executable" (and fails) for a static binary.
    Command::new("ldd")
        .arg(binary)
        .output()
        .map(|o| !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("statically"))
        .unwrap_or(false)
}

/// The newest installed kernel that has its modules: `(vmlinuz, release)`.
fn kernel() -> (PathBuf, String) {
    let mut kernels: Vec<(PathBuf, String)> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let release = path
                .file_name()?
                .to_str()?
                .strip_prefix("vmlinuz-")?
                .to_string();
            Path::new("/lib/modules")
                .join(&release)
                .join("modules.dep")
                .is_file()
                .then_some((path, release))
        })
        .collect();
    kernels.sort_by(|a, b| a.1.cmp(&b.1));
    kernels.pop().unwrap_or_else(|| {
        panic!(
            "no kernel to boot a guest: /boot/vmlinuz-* with /lib/modules/<release> is missing; \
             install the Debian package linux-image-amd64 (scripts/setup does)"
        )
    })
}

/// The modules `wanted` and their dependencies from `modules.dep`, each after what it needs.
fn module_order(modules_dir: &Path, wanted: &[&str]) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(modules_dir.join("modules.dep")).unwrap();
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in text.lines() {
        let Some((module, needs)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(module);
        deps.insert(
            name,
            (
                module.to_string(),
                needs.split_whitespace().map(module_name).collect(),
            ),
        );
    }
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        done: &mut Vec<String>,
        out: &mut Vec<String>,
    ) {
        if done.iter().any(|d| d == name) {
            return;
        }
        done.push(name.to_string());
        let (path, needs) = deps
            .get(name)
            .unwrap_or_else(|| panic!("kernel module {name} is not in modules.dep"));
        // modules.dep lists what a module needs with the most basic last: load from the end.
        for need in needs.iter().rev() {
            visit(need, deps, done, out);
        }
        out.push(path.clone());
    }
    let (mut done, mut out) = (Vec::new(), Vec::new());
    for name in wanted {
        visit(name, &deps, &mut done, &mut out);
    }
    out.into_iter()
        .map(|p| {
            let path = modules_dir.join(p);
            assert!(
                path.extension().is_some_and(|e| e == "ko"),
                "{}: compressed kernel modules are not supported by this test bed",
                path.display()
            );
            path
        })
        .collect()
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file).replace('-', "_")
}

/// The shared libraries `binary` loads, its loader included, as `ldd` lists them.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let text = run(Command::new("ldd").arg(binary));
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect();
    libs.dedup();
    libs
}

/// Writes the ELF kernel inside a bzImage (its xz payload, as the kernel's
/// `scripts/extract-vmlinux` finds it).
fn extract_vmlinux(vmlinuz: &Path, out: &Path) {
    let image = std::fs::read(vmlinuz).unwrap();
    let magic = b"\xfd7zXZ\x00";
    let at = image
        .windows(magic.len())
        .position(|w| w == magic)
        .unwrap_or_else(|| {
            panic!(
                "{}: no xz payload found; this test bed extracts Debian's xz-compressed kernels",
                vmlinuz.display()
            )
        });
    let mut xz = Command::new("xz")
        .args(["--single-stream", "-dc"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = xz.stdin.take().unwrap();
    let payload = image[at..].to_vec();
    let feeder = std::thread::spawn(move || {
        // xz stops reading after the first stream: the trailing bytes may meet a closed pipe.
        let _ = stdin.write_all(&payload);
    });
    let status = xz.wait().unwrap();
    feeder.join().unwrap();
    assert!(
        status.success(),
        "xz failed to extract {}",
        vmlinuz.display()
    );
    let head = std::fs::read(out).unwrap();
    assert!(
        head.starts_with(b"\x7fELF"),
        "{}: the extracted kernel is not an ELF file",
        vmlinuz.display()
    );
}

/// A newc cpio archive (what the kernel unpacks as its initramfs), built in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    names: Vec<String>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            body.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_string());
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100000 | perm, body);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// FNV-1a: a cache key that stays the same across Rust releases (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }

    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

/// The accelerator guests run under: `QUIESCE_GUEST_ACCEL` (`kvm` or `tcg`) when set; else KVM
/// when `/dev/kvm` opens and is not the `kvm_pvm` module, else TCG (software emulation).
///
/// `kvm_pvm` (the KVM of a pagetable-based nested hypervisor, as on the machines these tests
/// were written on) runs only guests built for it: Debian's kernel hangs there in its real-mode
/// setup, and through its PVH entry point it boots more slowly than under TCG (over 5 minutes).
pub fn accelerator() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| match std::env::var("QUIESCE_GUEST_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok("tcg") => "tcg",
        Ok(other) => panic!("QUIESCE_GUEST_ACCEL={other:?}: use kvm or tcg"),
        Err(_) => {
            let kvm = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if kvm && !Path::new("/sys/module/kvm_pvm").exists() {
                "kvm"
            } else {
                "tcg"
            }
        }
    })
}

/// Makes a sparse disk image of `size_mb` with an empty ext4 file system.
pub fn make_ext4_image(path: &Path, size_mb: u64) {
    require("mkfs.ext4", "e2fsprogs");
    std::fs::File::create(path)
        .unwrap()
        .set_len(size_mb << 20)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path));
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// The VM's name (`-name guest=`), also the stem of its socket files.
    pub name: String,
    pub uuid: String,
    /// Its disk image (raw, ext4), attached as a virtio disk with `cache=none`.
    pub disk: PathBuf,
    /// Where `<name>.agent.sock` and `<name>.qmp.sock` are made.
    pub socket_dir: PathBuf,
    /// Whether `qemu-ga` runs in the guest (the agent's channel exists either way).
    pub agent: bool,
}

impl GuestSpec {
    pub fn new(name: &str, uuid: &str, disk: &Path, socket_dir: &Path) -> GuestSpec {
        GuestSpec {
            name: name.into(),
            uuid: uuid.into(),
            disk: disk.into(),
            socket_dir: socket_dir.into(),
            agent: true,
        }
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.socket_dir.join(format!("{}.agent.sock", self.name))
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.socket_dir.join(format!("{}.qmp.sock", self.name))
    }
}

/// A running guest; QEMU is killed (or the libvirt domain destroyed) when it is dropped.
pub struct Guest {
    pub spec: GuestSpec,
    runner: Runner,
    /// From starting QEMU to the guest's `ready` (its disk mounted, the workload starting).
    pub boot_time: Duration,
    pub accel: &'static str,
    events: PathBuf,
    console: PathBuf,
    control: UnixStream,
    seen: Mutex<Events>,
    _dir: tempfile::TempDir,
}

/// What runs the guest.
enum Runner {
    /// QEMU, a child of the test.
    Qemu(crate::Child),
    /// A transient libvirt domain of this name (its QEMU is libvirtd's child).
    Libvirt { uri: String, pid: u32 },
}

#[derive(Default)]
struct Events {
    offset: u64,
    partial: String,
    last_ack: u64,
    /// Every line that is not an `ack`, in order.
    lines: Vec<String>,
}

impl Guest {
    /// Boots a guest and waits until it is ready (its agent started, if it has one).
    pub fn boot(spec: GuestSpec) -> Guest {
        let image = guest_image();
        let accel = accelerator();
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events");
        let console = dir.path().join("console");
        let control_path = dir.path().join("control.sock");
        // QEMU connects to the test's listener at start: the guest's control port is connected
        // from its first read on (a port with nothing behind it reads end-of-file).
        let listener = UnixListener::bind(&control_path).unwrap();
        std::fs::create_dir_all(&spec.socket_dir).unwrap();
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-accel", accel, "-m", "192", "-smp", "1"])
            .args(["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .arg("-append")
            .arg(cmdline(spec.agent))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-name")
            .arg(format!("guest={}", spec.name))
            .arg("-uuid")
            .arg(&spec.uuid)
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=disk0,cache=none,aio=threads",
                spec.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk0"])
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                spec.agent_socket().display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .arg("-chardev")
            .arg(format!("file,id=events,path={}", events.display()))
            .args([
                "-device",
                "virtserialport,chardev=events,name=quiesce.events",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=control,path={}", control_path.display()))
            .args([
                "-device",
                "virtserialport,chardev=control,name=quiesce.control",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                spec.qmp_socket().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let started = Instant::now();
        let mut qemu = crate::Child::spawn(command, dir.path().join("qemu.stderr"));
        listener.set_nonblocking(true).unwrap();
        let stderr = qemu.stderr.clone();
        let control = wait_until_or(
            "QEMU connecting to the guest's control socket",
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = qemu.child.try_wait() {
                    panic!("QEMU exited ({status}): {}", qemu.log());
                }
                listener.accept().ok().map(|(s, _)| s)
            },
            || std::fs::read_to_string(&stderr).unwrap_or_default(),
        );
        control.set_nonblocking(false).unwrap();
        let guest = Guest {
            spec,
            runner: Runner::Qemu(qemu),
            boot_time: Duration::ZERO,
            accel,
            events,
            console,
            control,
            seen: Mutex::new(Events::default()),
            _dir: dir,
        };
        guest.ready(started)
    }

    fn ready(mut self, started: Instant) -> Guest {
        // Generous: under TCG on a loaded machine a boot takes seconds, sometimes tens.
        self.wait_for("ready", Duration::from_secs(180));
        self.boot_time = started.elapsed();
        if self.spec.agent {
            self.wait_for("agent-started", Duration::from_secs(60));
        }
        self
    }

    /// Boots the guest as a transient libvirt domain of `uri` (see [`libvirtd`]): the same
    /// kernel, initramfs and channels, the agent's channel left to libvirt (its socket is
    /// libvirt's; `spec.socket_dir` is not used).
    pub fn boot_libvirt(spec: GuestSpec, uri: &str) -> Guest {
        let image = guest_image();
        let accel = accelerator();
        let dir = tempfile::tempdir().unwrap();
        // libvirt runs QEMU as its own user (libvirt-qemu): it must reach these files.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let events = dir.path().join("events");
        let console = dir.path().join("console");
        let control_path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&control_path).unwrap();
        std::fs::set_permissions(
            &control_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let xml = format!(
            r#"<domain type='{kind}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='threads'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='file'>
      <source path='{events}'/>
      <target type='virtio' name='quiesce.events'/>
    </channel>
    <channel type='unix'>
      <source mode='connect' path='{control}'/>
      <target type='virtio' name='quiesce.control'/>
    </channel>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
            kind = if accel == "kvm" { "kvm" } else { "qemu" },
            name = spec.name,
            uuid = spec.uuid,
            kernel = image.kernel.display(),
            initrd = image.initramfs.display(),
            cmdline = cmdline(spec.agent),
            disk = spec.disk.display(),
            events = events.display(),
            control = control_path.display(),
            console = console.display(),
        );
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        let started = Instant::now();
        run(Command::new("virsh")
            .args(["-q", "-c", uri, "create"])
            .arg(&file));
        let pid_file = format!("/run/libvirt/qemu/{}.pid", spec.name);
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{pid_file}: {e}"))
            .trim()
            .parse()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let control = wait_until_or(
            "libvirt's QEMU connecting to the guest's control socket",
            Duration::from_secs(30),
            || listener.accept().ok().map(|(s, _)| s),
            || libvirt_log(&spec.name),
        );
        control.set_nonblocking(false).unwrap();
        let guest = Guest {
            spec,
            runner: Runner::Libvirt {
                uri: uri.to_string(),
                pid,
            },
            boot_time: Duration::ZERO,
            accel,
            events,
            console,
            control,
            seen: Mutex::new(Events::default()),
            _dir: dir,
        };
        guest.ready(started)
    }

    fn pid(&self) -> u32 {
        match &self.runner {
            Runner::Qemu(child) => child.pid(),
            Runner::Libvirt { pid, .. } => *pid,
        }
    }

    /// Reads what the guest wrote on its events port since the last look.
    fn poll(&self) {
        let mut seen = self.seen.lock().unwrap();
        let Ok(mut file) = std::fs::File::open(&self.events) else {
            return;
        };
        use std::io::Seek;
        if file.seek(std::io::SeekFrom::Start(seen.offset)).is_err() {
            return;
        }
        let mut text = String::new();
        let Ok(n) = file.read_to_string(&mut text) else {
            return;
        };
        seen.offset += n as u64;
        let mut all = std::mem::take(&mut seen.partial);
        all.push_str(&text);
        let complete = all.rfind('\n').map_or(0, |i| i + 1);
        seen.partial = all[complete..].to_string();
        for line in all[..complete].lines() {
            if let Some(n) = line.strip_prefix("ack ") {
                let n: u64 = n
                    .parse()
                    .unwrap_or_else(|_| panic!("bad ack line {line:?}"));
                assert_eq!(
                    n,
                    seen.last_ack + 1,
                    "the guest's acks are not 1, 2, 3, ..."
                );
                seen.last_ack = n;
            } else {
                seen.lines.push(line.to_string());
            }
        }
    }

    /// The last record the guest acknowledged.
    pub fn acked(&self) -> u64 {
        self.poll();
        self.seen.lock().unwrap().last_ack
    }

    /// The guest's event lines (not acks) so far.
    pub fn events(&self) -> Vec<String> {
        self.poll();
        self.seen.lock().unwrap().lines.clone()
    }

    /// How many event lines start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.events()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// The serial console (kernel messages, the init's errors) and QEMU's stderr.
    pub fn diagnostics(&self) -> String {
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let tail: String = console
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let qemu = match &self.runner {
            Runner::Qemu(child) => child.log(),
            Runner::Libvirt { .. } => libvirt_log(&self.spec.name),
        };
        format!(
            "guest {}: events {:?}\nconsole (end): {tail}\nQEMU: {qemu}",
            self.spec.name,
            self.events(),
        )
    }

    /// Waits until `n` event lines start with `prefix` (the guest must stay up).
    pub fn wait_for_count(&self, prefix: &str, n: usize, timeout: Duration) {
        let what = format!("guest {}: {n} events {prefix:?}", self.spec.name);
        let diagnostics = || self.diagnostics();
        wait_until_or(
            &what,
            timeout,
            || {
                self.assert_running();
                (self.count(prefix) >= n).then_some(())
            },
            diagnostics,
        );
    }

    fn assert_running(&self) {
        // An exited QEMU is a zombie until reaped (or gone): `/proc/<pid>/stat` says which.
        let running = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(
            running,
            "QEMU of guest {} exited: {}",
            self.spec.name,
            self.diagnostics()
        );
        if let Some(line) = self.events().iter().find(|l| l.starts_with("error ")) {
            panic!("guest {}: {line}\n{}", self.spec.name, self.diagnostics());
        }
    }

    fn wait_for(&self, prefix: &str, timeout: Duration) {
        let n = self.count(prefix).max(1);
        self.wait_for_count(prefix, n, timeout);
    }

    /// Waits until the guest acknowledges a record after `n`.
    pub fn wait_acked_beyond(&self, n: u64, timeout: Duration) -> u64 {
        let what = format!("guest {}: a record acknowledged after {n}", self.spec.name);
        wait_until_or(
            &what,
            timeout,
            || {
                self.assert_running();
                let acked = self.acked();
                (acked > n).then_some(acked)
            },
            || self.diagnostics(),
        )
    }

    /// Whether the guest acknowledges nothing after `n` for all of `window` (a measurement of
    /// absence: it can only be shown over some time). Returns the last ack seen.
    pub fn acks_stay_at(&self, n: u64, window: Duration) -> Result<(), u64> {
        let end = Instant::now() + window;
        while Instant::now() < end {
            let acked = self.acked();
            if acked != n {
                return Err(acked);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sends a command to the guest's init and waits for its `done <command>`:
    /// `kill-agent` (SIGKILL; restarted at once), `kill-agent-hold` (SIGKILL; restarted at
    /// `release-agent`), `release-agent`, `stop-agent` (SIGSTOP), `cont-agent` (SIGCONT).
    pub fn command(&self, command: &str) {
        let done = format!("done {command}");
        let before = self.count(&done);
        (&self.control)
            .write_all(format!("{command}\n").as_bytes())
            .unwrap();
        self.wait_for_count(&done, before + 1, Duration::from_secs(60));
    }

    /// One command to the guest agent, as a client of its socket (independent of the code under
    /// test): `{"execute": <command>}` after a `guest-sync-delimited`; the reply line.
    pub fn agent(&self, command: &str, timeout: Duration) -> Result<String, String> {
        match &self.runner {
            Runner::Qemu(_) => agent_command(&self.spec.agent_socket(), command, timeout),
            // libvirt holds the agent's socket: through it.
            Runner::Libvirt { uri, .. } => {
                let output = Command::new("virsh")
                    .args(["-q", "-c", uri, "qemu-agent-command", &self.spec.name])
                    .arg(format!("{{\"execute\":\"{command}\"}}"))
                    .args(["--timeout", &timeout.as_secs().max(1).to_string()])
                    .output()
                    .map_err(|e| e.to_string())?;
                if output.status.success() {
                    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
                } else {
                    Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
                }
            }
        }
    }

    /// `guest-fsfreeze-status` as the guest agent answers it (`thawed`, `frozen`), retried until
    /// `timeout` (the agent serves one client at a time: the writer may be connected).
    pub fn fsfreeze_status(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.agent("guest-fsfreeze-status", left.min(Duration::from_secs(10))) {
                Ok(reply) => {
                    return reply
                        .split('"')
                        .nth(3)
                        .unwrap_or_else(|| panic!("unexpected reply {reply}"))
                        .to_string()
                }
                Err(e) if Instant::now() >= deadline => panic!(
                    "guest {}: guest-fsfreeze-status: {e}\n{}",
                    self.spec.name,
                    self.diagnostics()
                ),
                Err(_) => {}
            }
        }
    }

    /// Stops the VM at once (QEMU killed, as a crash or `virsh destroy` would).
    pub fn kill(&mut self) {
        match &mut self.runner {
            Runner::Qemu(child) => child.kill(),
            Runner::Libvirt { uri, .. } => {
                let _ = Command::new("virsh")
                    .args(["-q", "-c", uri, "destroy", &self.spec.name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// A minimal guest-agent client: 0xFF and `guest-sync-delimited` with an id, skip to the
/// sentinel and the matching reply, then one command; its reply line.
pub fn agent_command(socket: &Path, command: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_000_000)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    // 0xFF first: the agent drops any partial input a previous client left.
    let mut sync = vec![0xff];
    sync.extend_from_slice(
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
            .as_bytes(),
    );
    writer.write_all(&sync).map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream);
    let expected = format!("{{\"return\": {id}}}");
    loop {
        reader
            .get_ref()
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("waiting for the sync reply: {e}"))?;
        if line.is_empty() {
            return Err("the agent socket closed".into());
        }
        if let Some(at) = line.iter().rposition(|b| *b == 0xff) {
            if String::from_utf8_lossy(&line[at + 1..]).trim() == expected {
                break;
            }
        }
    }
    writer
        .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    reader
        .get_ref()
        .set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("waiting for the reply to {command}: {e}"))?;
    Ok(line.trim().to_string())
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cmdline(agent: bool) -> String {
    format!(
        "console=ttyS0 panic=-1 quiet lpj=4000000 tsc=reliable no_timer_check mitigations=off \
         cryptomgr.notests 8250.nr_uarts=1 quiesce.agent={}",
        if agent { "on" } else { "off" }
    )
}

/// The end of libvirt's log of domain `name` (QEMU's command line and stderr).
fn libvirt_log(name: &str) -> String {
    let text =
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap_or_default();
    text.lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running libvirtd for `qemu:///system`: the one already running, or one started here
/// (with `virtlogd`, which it needs for QEMU's logs) and left running. Debian installs the
/// daemon without starting it when there is no systemd. Returns the URI.
pub fn libvirtd() -> &'static str {
    static STARTED: OnceLock<()> = OnceLock::new();
    const URI: &str = "qemu:///system";
    STARTED.get_or_init(|| {
        require("virsh", "libvirt-clients");
        require("libvirtd", "libvirt-daemon");
        let answers = || {
            Command::new("virsh")
                .args(["-q", "-c", URI, "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if answers() {
            return;
        }
        for daemon in ["virtlogd", "libvirtd"] {
            // `-d`: as a daemon; a second instance refuses to start, which is fine.
            let _ = Command::new(daemon)
                .arg("-d")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        wait_until_or(
            "libvirtd answering on qemu:///system",
            Duration::from_secs(60),
            || answers().then_some(()),
            || "started with `virtlogd -d` and `libvirtd -d`".into(),
        );
    });
    URI
}

/// The records a file on the guest's disk holds: `1\n2\n...`; a last line without its newline
/// is not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records(pub Vec<u64>);

impl Records {
    fn parse(text: &str) -> Records {
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        Records(
            complete
                .lines()
                .map(|l| {
                    l.parse()
                        .unwrap_or_else(|_| panic!("a record that is not a number: {l:?}"))
                })
                .collect(),
        )
    }

    /// The highest record, 0 for none.
    pub fn max(&self) -> u64 {
        self.0.iter().copied().max().unwrap_or(0)
    }

    /// Whether the records are exactly 1..=max (no gap, no duplicate).
    pub fn contiguous(&self) -> bool {
        self.0.iter().copied().eq(1..=self.max())
    }
}

/// What a disk image holds, as a user restoring it would find it.
#[derive(Debug, Clone)]
pub struct ImageState {
    /// The ext4 journal must be replayed before the file system is consistent.
    pub needs_recovery: bool,
    /// `e2fsck -fn` found nothing to fix (exit 0), and its output.
    pub fsck_clean: bool,
    pub fsck_output: String,
    /// Mounting it read-only from a read-only device (no journal replay possible) worked.
    pub mounts_read_only: bool,
    pub durable: Records,
    pub buffered: Records,
}

/// Attaches `image` read-only (a read-only loop device) and reads it. When the file system
/// cannot be mounted as it is (it needs journal recovery), it is read with `noload` — the
/// journal ignored, which may show an older state: use [`inspect_recovered`] for what a user
/// would get after recovery.
pub fn inspect_image(image: &Path) -> ImageState {
    let device = LoopDevice::attach(image);
    let dumpe2fs = run(Command::new("dumpe2fs").arg("-h").arg(&device.0));
    let needs_recovery = dumpe2fs
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "needs_recovery"));
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&device.0)
        .output()
        .unwrap();
    let mount = tempfile::tempdir().unwrap();
    let mounts_read_only = Command::new("mount")
        .args(["-t", "ext4", "-o", "ro"])
        .arg(&device.0)
        .arg(mount.path())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if !mounts_read_only {
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "ro,noload"])
            .arg(&device.0)
            .arg(mount.path()));
    }
    let read = |name: &str| {
        Records::parse(&std::fs::read_to_string(mount.path().join(name)).unwrap_or_default())
    };
    let (durable, buffered) = (read("durable"), read("buffered"));
    run(Command::new("umount").arg(mount.path()));
    ImageState {
        needs_recovery,
        fsck_clean: fsck.status.success(),
        fsck_output: format!(
            "{}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        ),
        mounts_read_only,
        durable,
        buffered,
    }
}

/// A copy of `image` in `scratch` after journal recovery (`e2fsck -fy`, as a restore would do),
/// then read as [`inspect_image`] does.
pub fn inspect_recovered(image: &Path, scratch: &Path) -> ImageState {
    let copy = scratch.join(format!(
        "recovered-{}.img",
        image.file_stem().unwrap().to_string_lossy()
    ));
    run(Command::new("cp")
        .arg("--reflink=auto")
        .arg(image)
        .arg(&copy));
    let status = Command::new("e2fsck")
        .arg("-fy")
        .arg(&copy)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    // 0: clean, 1: errors fixed (the journal replayed counts as that).
    assert!(
        matches!(status.code(), Some(0) | Some(1)),
        "e2fsck -fy {} could not repair it: {status}",
        copy.display()
    );
    let state = inspect_image(&copy);
    std::fs::remove_file(&copy).unwrap();
    state
}

/// A read-only loop device, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(image: &Path) -> LoopDevice {
        let device = run(Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(image));
        LoopDevice(device.trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
