//! The Debian packages, as an administrator gets them: `scripts/package` builds them with
//! cargo-deb (one release build), `dpkg --root` installs them into a throwaway root with their
//! maintainer scripts run chrootless (`DPKG_ROOT` set: the scripts make the group and the
//! catalog's directory inside the root and touch nothing of this machine), and the test checks
//! what landed where, verifies the installed units with `systemd-analyze verify --root`, starts
//! the installed broker, removes the packages (the broker is stopped, the files are gone, the
//! conffiles stay) and purges them (the conffiles go too). A second test installs them into
//! another throwaway root and runs the installed daemons from their units' `ExecStart=` lines
//! as systemd would — in the root (chroot), with a real system bus, `$NOTIFY_SOCKET`,
//! `$WATCHDOG_USEC` and a real journald — and sees READY=1 with STATUS=, WATCHDOG=1, the log in
//! the journal, and STOPPING=1 and a clean exit after SIGTERM. The packages are built once per
//! test process ([`debs`]).

use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

const PLUGINS: [&str; 6] = ["filebuf", "hooks", "mariadb", "postgres", "qemu", "sqlite"];
const PACKAGES: [&str; 3] = ["quiesce-host", "quiesce-broker", "quiesce"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace directory")
}

/// Runs a command; its stdout, or an error with everything it printed.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    Ok(stdout.into_owned())
}

/// Fails loudly when a tool the test needs is missing, saying where it comes from.
fn require(program: &str, args: &[&str], how: &str) {
    let found = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "the packaging test needs `{program} {}`: {how}",
        args.join(" ")
    );
}

/// dpkg on the throwaway root: maintainer scripts run outside a chroot with DPKG_ROOT set
/// (the root holds no shell), dependencies not checked (the root holds no libc either).
fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--force-not-root",
        ])
        .args(["--force-bad-path", "--no-triggers"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

fn is_elf(path: &Path, dynamic_library: bool) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // e_type at offset 16, little-endian on the machines we build for: 3 = ET_DYN.
    Ok(bytes.starts_with(b"\x7fELF") && (!dynamic_library || bytes.get(16) == Some(&3)))
}

fn executable(path: &Path) -> Result<()> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode();
    ensure!(
        mode & 0o111 == 0o111,
        "{} has mode {mode:o}",
        path.display()
    );
    ensure!(
        is_elf(path, false)?,
        "{} is not an ELF file",
        path.display()
    );
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{} is missing", path.display()))
}

/// What dpkg says of a package in the root: "install ok installed", "deinstall ok
/// config-files", or `None` when it knows nothing of it.
fn status(root: &Path, package: &str) -> Option<String> {
    let out = dpkg(root)
        .args(["-s", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Status: ").map(str::to_string))
}

/// What the package put into the root, path by path.
fn landed(root: &Path) -> Result<()> {
    for binary in ["quiesce-host", "quiesce-broker", "quiesce"] {
        let path = root.join("usr/bin").join(binary);
        executable(&path)?;
        let version = run(Command::new(&path).arg("--version"))?;
        ensure!(version.contains("0.1.0"), "{binary} --version: {version}");
    }
    let plugin_dir = root.join("usr/lib/quiesce/plugins");
    for plugin in PLUGINS {
        let path = plugin_dir.join(format!("libquiesce_writer_{plugin}.so"));
        ensure!(
            is_elf(&path, true)?,
            "{} is not an ELF shared library",
            path.display()
        );
        // What the host looks for in a plugin: abi_stable's root-module loader
        // (`_1as_0lib_1header_0root_bmodule_bloader`).
        let symbols = run(Command::new("nm").args(["-D", "--defined-only"]).arg(&path))?;
        ensure!(
            symbols.contains("root_bmodule_bloader"),
            "{} exports no abi_stable root module:\n{symbols}",
            path.display()
        );
    }
    let found = std::fs::read_dir(&plugin_dir)?.count();
    ensure!(
        found == PLUGINS.len(),
        "{found} files in {}",
        plugin_dir.display()
    );

    let config = read(&root.join("etc/quiesce/host.toml"))?;
    ensure!(
        config.contains("plugin_dir = \"/usr/lib/quiesce/plugins\""),
        "host.toml: {config}"
    );
    let broker = read(&root.join("etc/quiesce/broker.toml"))?;
    ensure!(
        broker.contains("catalog = \"/var/lib/quiesce/catalog.sqlite\""),
        "broker.toml: {broker}"
    );
    // Conffiles, registered as such.
    for (package, files) in [
        (
            "quiesce-host",
            &["/etc/quiesce/host.toml", "/etc/default/quiesce-host"][..],
        ),
        (
            "quiesce-broker",
            &["/etc/quiesce/broker.toml", "/etc/default/quiesce-broker"][..],
        ),
    ] {
        let listed = read(&root.join(format!("var/lib/dpkg/info/{package}.conffiles")))?;
        for file in files {
            ensure!(
                listed.lines().any(|l| l.trim() == *file),
                "{package}.conffiles lacks {file}: {listed}"
            );
        }
    }

    let policy = read(&root.join("usr/share/dbus-1/system.d/org.quiesce.Host1.conf"))?;
    ensure!(
        policy == read(&workspace().join("dbus/org.quiesce.Host1.conf"))?,
        "the installed bus policy differs from dbus/org.quiesce.Host1.conf"
    );
    let activation =
        read(&root.join("usr/share/dbus-1/system-services/org.quiesce.Host1.service"))?;
    for line in [
        "Name=org.quiesce.Host1",
        "SystemdService=quiesce-host.service",
    ] {
        ensure!(
            activation.lines().any(|l| l == line),
            "activation file: {activation}"
        );
    }
    for (unit, lines) in [
        (
            "quiesce-host.service",
            &[
                "Type=notify",
                "NotifyAccess=main",
                "WatchdogSec=30s",
                "Restart=on-failure",
                "ExecReload=/bin/kill -HUP $MAINPID",
            ][..],
        ),
        (
            "quiesce-broker.service",
            &[
                "Type=notify",
                "NotifyAccess=main",
                "WatchdogSec=30s",
                "StateDirectory=quiesce",
                "StateDirectoryMode=0750",
            ][..],
        ),
    ] {
        let text = read(&root.join("usr/lib/systemd/system").join(unit))?;
        for line in lines {
            ensure!(text.lines().any(|l| l == *line), "{unit} lacks {line}");
        }
    }
    // What the maintainer scripts made inside the root.
    let group = read(&root.join("etc/group"))?;
    ensure!(
        group.lines().any(|l| l.starts_with("quiesce:")),
        "postinst made no quiesce group: {group}"
    );
    let state = std::fs::metadata(root.join("var/lib/quiesce"))
        .context("postinst made no /var/lib/quiesce")?;
    ensure!(
        state.is_dir() && state.permissions().mode() & 0o777 == 0o750,
        "/var/lib/quiesce has mode {:o}",
        state.permissions().mode()
    );

    let man = root.join("usr/share/man/man1");
    for page in [
        "quiesce.1.gz",
        "quiesce-snapshot.1.gz",
        "quiesce-snapshot-create.1.gz",
    ] {
        let bytes = std::fs::read(man.join(page)).with_context(|| format!("man page {page}"))?;
        ensure!(bytes.starts_with(b"\x1f\x8b"), "{page} is not gzipped");
    }
    for (completion, volume) in [
        ("usr/share/bash-completion/completions/quiesce", "--volume"),
        ("usr/share/zsh/vendor-completions/_quiesce", "--volume"),
        (
            "usr/share/fish/vendor_completions.d/quiesce.fish",
            "-l volume",
        ),
    ] {
        let text = read(&root.join(completion))?;
        ensure!(
            text.contains("snapshot") && text.contains(volume),
            "{completion} does not complete `quiesce snapshot create --volume`"
        );
    }
    Ok(())
}

/// `systemd-analyze verify` of the installed units, inside the root: it needs the units they
/// depend on (this machine's, copied into the root's /lib) and the commands they run.
fn verify_units(root: &Path) -> Result<()> {
    let units = root.join("lib/systemd/system");
    std::fs::create_dir_all(&units)?;
    run(Command::new("cp")
        .args(["-a", "--no-clobber", "/lib/systemd/system/."])
        .arg(&units))?;
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/kill", root.join("bin/kill"))?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args(["quiesce-host.service", "quiesce-broker.service"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify of the installed units ({}):\n{stderr}",
        out.status
    );
    Ok(())
}

/// The installed broker, started as a demo (no certificates): running until its package is
/// removed.
fn start_broker(root: &Path) -> Result<std::process::Child> {
    let mut child = Command::new(root.join("usr/bin/quiesce-broker"))
        .args(["serve", "--insecure", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the installed quiesce-broker")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .context("reading the broker's first line")?;
    if !line.starts_with("listening on ") {
        let _ = child.kill();
        bail!("the installed broker printed {line:?} instead of `listening on ADDR`");
    }
    Ok(child)
}

/// The .debs `scripts/package` built, once per test process (the release build is the slow
/// part): into `$CARGO_TARGET_TMPDIR/quiesce-packaging/debs`, emptied first. Every test that
/// needs them fails with the same message when the build did. `QUIESCE_PACKAGING_DEBS=DIR`
/// takes the .debs already in DIR instead (a rerun while working on the tests; CI never sets it).
fn debs() -> Result<&'static [PathBuf]> {
    static DEBS: OnceLock<Result<Vec<PathBuf>, String>> = OnceLock::new();
    let built = DEBS.get_or_init(|| build_debs().map_err(|e| format!("{e:#}")));
    match built {
        Ok(files) => Ok(files),
        Err(e) => bail!("building the packages: {e}"),
    }
}

fn build_debs() -> Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    require(
        &cargo,
        &["deb", "--version"],
        "install cargo-deb (scripts/setup does: cargo install --locked cargo-deb)",
    );
    for tool in ["dpkg", "dpkg-deb", "systemd-analyze", "nm"] {
        require(
            tool,
            &["--version"],
            "install it (scripts/setup: dpkg, systemd, binutils)",
        );
    }
    let debs = match std::env::var_os("QUIESCE_PACKAGING_DEBS") {
        Some(dir) => {
            eprintln!("QUIESCE_PACKAGING_DEBS: the .debs in {dir:?}, not built");
            PathBuf::from(dir)
        }
        None => {
            let debs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quiesce-packaging/debs");
            if debs.exists() {
                std::fs::remove_dir_all(&debs)?;
            }
            let started = Instant::now();
            run(Command::new(workspace().join("scripts/package"))
                .arg(&debs)
                .env("CARGO", &cargo))?;
            eprintln!("scripts/package: {:.0?}", started.elapsed());
            debs
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&debs)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for package in PACKAGES {
        let prefix = format!("{package}_");
        ensure!(
            files.iter().any(|f| f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))),
            "no {package}_*.deb in {files:?}"
        );
    }
    ensure!(files.len() == PACKAGES.len(), "packages built: {files:?}");
    Ok(files)
}

/// A throwaway root (an empty dpkg database) at `root` with the packages installed.
fn install(root: &Path, files: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(root.join("var/lib/dpkg/info"))?;
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates"))?;
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    run(dpkg(root).arg("--install").args(files))?;
    Ok(())
}

#[test]
fn packages_build_install_into_a_throwaway_root_and_go_away() -> Result<()> {
    let started = Instant::now();
    let files = debs()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    install(&root, files)?;
    for package in PACKAGES {
        assert_eq!(
            status(&root, package).as_deref(),
            Some("install ok installed"),
            "{package}"
        );
    }
    landed(&root)?;
    verify_units(&root)?;

    // Removing the package stops the daemon run from its binary.
    let mut broker = start_broker(&root)?;
    run(dpkg(&root).arg("--remove").args(PACKAGES))?;
    let stopped = broker.try_wait()?;
    if stopped.is_none() {
        let _ = broker.kill();
        let _ = broker.wait();
        bail!("removing quiesce-broker left the installed broker running");
    }
    for gone in [
        "usr/bin/quiesce-host",
        "usr/bin/quiesce-broker",
        "usr/bin/quiesce",
        "usr/lib/quiesce/plugins/libquiesce_writer_sqlite.so",
        "usr/lib/systemd/system/quiesce-host.service",
        "usr/lib/systemd/system/quiesce-broker.service",
        "usr/share/dbus-1/system.d/org.quiesce.Host1.conf",
        "usr/share/dbus-1/system-services/org.quiesce.Host1.service",
        "usr/share/man/man1/quiesce.1.gz",
        "usr/share/bash-completion/completions/quiesce",
    ] {
        ensure!(!root.join(gone).exists(), "{gone} is left after remove");
    }
    for kept in ["etc/quiesce/host.toml", "etc/quiesce/broker.toml"] {
        ensure!(
            root.join(kept).exists(),
            "remove deleted the conffile {kept}"
        );
    }
    for package in ["quiesce-host", "quiesce-broker"] {
        assert_eq!(
            status(&root, package).as_deref(),
            Some("deinstall ok config-files"),
            "{package}"
        );
    }
    run(dpkg(&root).arg("--purge").args(PACKAGES))?;
    for package in PACKAGES {
        assert_eq!(status(&root, package), None, "{package} after purge");
    }
    for gone in [
        "etc/quiesce/host.toml",
        "etc/quiesce/broker.toml",
        "etc/default/quiesce-host",
    ] {
        ensure!(!root.join(gone).exists(), "{gone} is left after purge");
    }
    eprintln!("the whole test: {:.0?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The installed daemons run from their units, as systemd would run them, without systemd.
//
// How: the packages go into a fresh throwaway root; the dynamic libraries the installed ELF
// files need (`ldd`: libc, libm, libgcc_s, libsqlite3 and the loader) are copied into it at
// their paths, and each daemon runs *inside the root* with `chroot ROOT ARGV...` — ARGV being
// the unit's `ExecStart=` exactly as systemd expands it (quiesce_packaging::exec_command: the
// `EnvironmentFile=`'s variables, `$VAR` split into words), so every absolute path in the unit
// and in the installed configuration (`/etc/quiesce/...`, `plugin_dir = "/usr/lib/quiesce/
// plugins"`, the catalog in `/var/lib/quiesce`) means the installed file, unchanged. What the
// manager would provide is provided at the paths systemd uses, inside the root:
//   - a system bus: a real `dbus-daemon` listening on ROOT/run/dbus/system_bus_socket (the
//     host's default system bus address inside the root), with Debian's system-bus defaults and
//     the policy files the package installed (ROOT/usr/share/dbus-1/system.d);
//   - `$NOTIFY_SOCKET=/run/systemd/notify`: a datagram socket the test binds at
//     ROOT/run/systemd/notify;
//   - the watchdog: `$WATCHDOG_USEC` from `WatchdogSec=`, `$WATCHDOG_PID` the main process's
//     pid (a `sh` sets it to `$$` and `exec`s chroot, which `exec`s the daemon: one pid);
//   - the journal: a real `systemd-journald` (this machine's) in a private mount namespace
//     with ROOT/run bind-mounted over /run, so its sockets are ROOT/run/systemd/journal/* and
//     its (volatile) journal ROOT/run/log/journal; the daemon's stderr is a stream connected
//     to its `stdout` socket with the header systemd writes, and `$JOURNAL_STREAM` is that
//     socket's `DEVICE:INODE` — what `StandardError=journal` (the default) does;
//   - a clean environment otherwise (`PATH` as systemd sets it, `INVOCATION_ID`, and
//     `STATE_DIRECTORY` for `StateDirectory=`); the working directory `/`;
//   - /proc: each daemon runs in a private mount namespace (`unshare --mount`) with a proc
//     file system mounted at ROOT/proc, gone when it exits (the host reads its node name,
//     the default, from /proc/sys/kernel/hostname).
// Not reproduced: the unit's sandboxing (ProtectSystem=, PrivateTmp=, CapabilityBoundingSet=,
// ...; `systemd-analyze verify` checks those settings parse), the uid switch (none: the units
// run as root), cgroups.

use quiesce_packaging::{environment_file, exec_command, timespan_usec, Unit};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

/// One journal entry, as `journalctl --output=json` prints it.
type Entry = serde_json::Map<String, serde_json::Value>;

/// systemd's `PATH` for system services.
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";

/// A process the test started, killed (SIGKILL) if it is still running when dropped.
struct Running {
    child: std::process::Child,
    what: &'static str,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) -> Result<()> {
        run(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string()))?;
        Ok(())
    }

    /// Its exit status, waiting at most `timeout`.
    fn wait_for_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let what = format!("{} exiting", self.what);
        poll(&what, timeout, || Ok(self.child.try_wait()?))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `condition` (the test bed's [`quiesce_testbed::poll_until`]) until it gives a value,
/// fails, or `timeout` passes.
fn poll<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    quiesce_testbed::poll_until(timeout, || condition().transpose())
        .unwrap_or_else(|| Err(anyhow::anyhow!("{what}: not within {timeout:?}")))
}

/// Copies the dynamic libraries every installed ELF file needs into the root, at their paths.
fn copy_libraries(root: &Path) -> Result<()> {
    let mut elves = vec![
        root.join("usr/bin/quiesce-host"),
        root.join("usr/bin/quiesce-broker"),
    ];
    for entry in std::fs::read_dir(root.join("usr/lib/quiesce/plugins"))? {
        elves.push(entry?.path());
    }
    for elf in elves {
        let listed = run(Command::new("ldd").arg(&elf))?;
        for line in listed.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            let Some(path) = path.filter(|p| p.starts_with('/')) else {
                continue;
            };
            let inside = root.join(path.trim_start_matches('/'));
            if !inside.exists() {
                std::fs::create_dir_all(inside.parent().expect("a library's directory"))?;
                std::fs::copy(path, &inside)
                    .with_context(|| format!("copying {path} into the root"))?;
            }
        }
    }
    Ok(())
}

/// A real dbus-daemon as the root's system bus.
fn start_system_bus(root: &Path) -> Result<Running> {
    let socket = root.join("run/dbus/system_bus_socket");
    std::fs::create_dir_all(socket.parent().expect("run/dbus"))?;
    let config = root.join("run/dbus/test-system.conf");
    std::fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
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
  <includedir>{}</includedir>
</busconfig>
"#,
            socket.display(),
            root.join("usr/share/dbus-1/system.d").display()
        ),
    )?;
    let child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--nosyslog", "--nopidfile"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dbus-daemon (package dbus-daemon)")?;
    let bus = Running {
        child,
        what: "dbus-daemon",
    };
    poll("the system bus's socket", Duration::from_secs(10), || {
        Ok(UnixStream::connect(&socket).ok())
    })?;
    Ok(bus)
}

/// A real systemd-journald in a private mount namespace whose /run is ROOT/run.
fn start_journald(root: &Path) -> Result<Running> {
    let journald = Path::new("/lib/systemd/systemd-journald");
    ensure!(
        journald.exists(),
        "{} is missing: install the systemd package",
        journald.display()
    );
    let run_dir = root.join("run");
    std::fs::create_dir_all(run_dir.join("systemd/journald.conf.d"))?;
    std::fs::create_dir_all(run_dir.join("log/journal"))?;
    // A drop-in in the root's /run (read after this machine's /etc/systemd/journald.conf):
    // keep the journal in ROOT/run/log/journal, read and forward nothing of this machine.
    std::fs::write(
        run_dir.join("systemd/journald.conf.d/quiesce-test.conf"),
        "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToKMsg=no\n\
         ForwardToConsole=no\nForwardToWall=no\nAudit=no\n",
    )?;
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-euc"])
        .arg(r#"mount --bind "$1" /run; exec "$2""#)
        .arg("sh")
        .arg(&run_dir)
        .arg(journald)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting systemd-journald under unshare (util-linux)")?;
    let journald = Running {
        child,
        what: "systemd-journald",
    };
    let stdout = run_dir.join("systemd/journal/stdout");
    poll("journald's stdout socket", Duration::from_secs(10), || {
        Ok(UnixStream::connect(&stdout).ok())
    })?;
    Ok(journald)
}

/// The journal entries of process `pid`, as journalctl reads them from the root's journal.
fn journal_entries(root: &Path, pid: u32) -> Result<Vec<Entry>> {
    let out = run(Command::new("journalctl")
        .arg("--directory")
        .arg(root.join("run/log/journal"))
        .args(["--output=json", "--no-pager", "--all"])
        .arg(format!("_PID={pid}")))?;
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("journalctl printed {l:?}")))
        .collect()
}

/// A stream to journald's `stdout` socket with the header systemd writes for a service's
/// stderr (`StandardError=journal`), and its `DEVICE:INODE` for `$JOURNAL_STREAM`.
fn journal_stream(root: &Path, identifier: &str, unit: &str) -> Result<(std::fs::File, String)> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let mut stream = UnixStream::connect(root.join("run/systemd/journal/stdout"))?;
    // identifier, unit id, priority (info), level prefix, forward to syslog, kmsg, console.
    write!(stream, "{identifier}\n{unit}\n6\n1\n0\n0\n0\n")?;
    stream.shutdown(std::net::Shutdown::Read)?;
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(stream));
    let meta = file.metadata()?;
    Ok((file, format!("{}:{}", meta.dev(), meta.ino())))
}

/// The messages a daemon sent to `$NOTIFY_SOCKET`, one `Vec` of `KEY=VALUE` lines per datagram.
struct Notifications {
    socket: UnixDatagram,
    got: Vec<Vec<String>>,
}

impl Notifications {
    fn bind(path: &Path) -> Result<Notifications> {
        std::fs::create_dir_all(path.parent().expect("run/systemd"))?;
        let _ = std::fs::remove_file(path);
        Ok(Notifications {
            socket: UnixDatagram::bind(path)?,
            got: vec![],
        })
    }

    /// Receives until a datagram has the line `line` (or one starting with it, for
    /// `STATUS=`), within `timeout`; returns that datagram.
    fn until(
        &mut self,
        daemon: &mut Running,
        line: &str,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let what = daemon.what;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(found) = self
                .got
                .iter()
                .find(|d| d.iter().any(|l| l.starts_with(line)))
            {
                return Ok(found.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "{what}: no {line:?} on $NOTIFY_SOCKET within {timeout:?}; got {:?}",
                self.got
            );
            if line != "STOPPING=1" {
                if let Some(status) = daemon.child.try_wait()? {
                    bail!(
                        "{what} exited ({status}) before {line:?}; it sent {:?}",
                        self.got
                    );
                }
            }
            self.socket
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => self.got.push(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string)
                        .collect(),
                ),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What systemd would run for `unit` (in ROOT/usr/lib/systemd/system): its `ExecStart=`,
/// expanded with its `Environment=` and `EnvironmentFile=` (read from the root), and the
/// environment the manager adds; with the unit's settings the test checks against.
struct Service {
    unit: Unit,
    name: &'static str,
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

fn service(root: &Path, name: &'static str) -> Result<Service> {
    let unit = Unit::parse(&read(&root.join("usr/lib/systemd/system").join(name))?)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    ensure!(
        unit.value("Service", "Type") == Some("notify"),
        "{name}: Type="
    );
    ensure!(
        unit.value("Service", "NotifyAccess") == Some("main"),
        "{name}: NotifyAccess="
    );
    let mut env: Vec<(String, String)> = vec![("PATH".into(), SERVICE_PATH.into())];
    for assignment in unit.values("Service", "Environment") {
        // The shipped units use none; this reads the simple KEY=VALUE form only.
        let (key, value) = assignment
            .split_once('=')
            .with_context(|| format!("{name}: Environment={assignment}"))?;
        env.push((key.into(), value.into()));
    }
    for file in unit.values("Service", "EnvironmentFile") {
        let (optional, path) = match file.strip_prefix('-') {
            Some(path) => (true, path),
            None => (false, file),
        };
        let inside = root.join(path.trim_start_matches('/'));
        match std::fs::read_to_string(&inside) {
            Ok(text) => {
                env.extend(environment_file(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?)
            }
            Err(_) if optional => {}
            Err(e) => bail!("{name}: EnvironmentFile={path}: {e}"),
        }
    }
    if let Some(dirs) = unit.value("Service", "StateDirectory") {
        let paths: Vec<String> = dirs
            .split_whitespace()
            .map(|d| format!("/var/lib/{d}"))
            .collect();
        for p in &paths {
            // systemd makes them at each start, with StateDirectoryMode= (0755 by default).
            let mode = unit
                .value("Service", "StateDirectoryMode")
                .map_or(Ok(0o755), |m| u32::from_str_radix(m, 8))?;
            let inside = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(&inside)?;
            std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(mode))?;
        }
        env.push(("STATE_DIRECTORY".into(), paths.join(":")));
    }
    let lookup = |key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let values = unit.values("Service", "ExecStart");
    ensure!(values.len() == 1, "{name}: ExecStart= {values:?}");
    let command =
        exec_command(values[0], name, &lookup).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    ensure!(!command.ignore_failure, "{name}: ExecStart=- ");
    Ok(Service {
        unit,
        name,
        argv: command.argv,
        env,
    })
}

impl Service {
    fn timeout(&self, key: &str, default: &str) -> Result<Duration> {
        let text = self.unit.value("Service", key).unwrap_or(default);
        Ok(Duration::from_micros(timespan_usec(text).map_err(|e| {
            anyhow::anyhow!("{}: {key}={text}: {e}", self.name)
        })?))
    }

    /// Starts the command inside the root, as described at the top of this part.
    fn start(&self, root: &Path, stderr: std::fs::File, journal_stream: &str) -> Result<Running> {
        // unshare, sh, chroot and the daemon are one process (each `exec`s the next): the pid
        // the test waits for and signals is the daemon's, as systemd's main PID would be.
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-euc"])
            .arg(
                r#"mount -t proc proc "$1/proc"; WATCHDOG_PID=$$ SYSTEMD_EXEC_PID=$$ exec chroot "$@""#,
            )
            .arg("sh")
            .arg(root)
            .args(&self.argv)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NOTIFY_SOCKET", "/run/systemd/notify")
            .env(
                "INVOCATION_ID",
                format!("{:032x}", std::process::id() as u128 * 7919),
            )
            .env("JOURNAL_STREAM", journal_stream)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(watchdog) = self.unit.value("Service", "WatchdogSec") {
            let usec = timespan_usec(watchdog).map_err(|e| anyhow::anyhow!("WatchdogSec: {e}"))?;
            command.env("WATCHDOG_USEC", usec.to_string());
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {:?} in {}", self.argv, root.display()))?;
        Ok(Running {
            child,
            what: self.name,
        })
    }
}

/// One daemon's life under the test's manager: READY=1 with STATUS=, WATCHDOG=1 when the unit
/// sets WatchdogSec=, its log in the journal, then SIGTERM: STOPPING=1 and exit status 0
/// within TimeoutStopSec=. Returns the READY=1 datagram and the daemon's journal entries.
fn run_service(root: &Path, service: &Service, binary: &str) -> Result<(Vec<String>, Vec<Entry>)> {
    ensure!(
        service.argv[0] == format!("/usr/bin/{binary}"),
        "{}: ExecStart= runs {:?}",
        service.name,
        service.argv
    );
    let mut notify = Notifications::bind(&root.join("run/systemd/notify"))?;
    let (stderr, stream) = journal_stream(root, binary, service.name)?;
    let mut daemon = service.start(root, stderr, &stream)?;
    let pid = daemon.pid();
    let start_timeout = service.timeout("TimeoutStartSec", "90s")?;
    let log = |e: anyhow::Error| {
        let messages: Vec<String> = journal_entries(root, pid)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| field(e, "MESSAGE").map(str::to_string))
            .collect();
        anyhow::anyhow!("{e:#}\nits journal: {messages:#?}")
    };
    let ready = notify
        .until(&mut daemon, "READY=1", start_timeout)
        .map_err(log)?;
    ensure!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.len() > "STATUS=".len()),
        "{}: READY=1 came without a STATUS= line: {ready:?}",
        service.name
    );
    if service.unit.value("Service", "WatchdogSec").is_some() {
        // The first WATCHDOG=1 goes out at once (then every half of WatchdogSec=).
        notify
            .until(&mut daemon, "WATCHDOG=1", Duration::from_secs(10))
            .map_err(log)?;
    }
    // Its log, in the journal, through the native protocol (`_TRANSPORT=journal`).
    let entries = poll(
        &format!("{}'s \"started\" entry in the journal", service.name),
        Duration::from_secs(10),
        || {
            let entries = journal_entries(root, pid)?;
            let started = entries.iter().any(|e| {
                e.get("MESSAGE")
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| m.contains("started") || m.contains("listening"))
            });
            Ok(started.then_some(entries))
        },
    )?;
    let stop_timeout = service.timeout("TimeoutStopSec", "90s")?;
    daemon.signal("TERM")?;
    notify
        .until(&mut daemon, "STOPPING=1", stop_timeout)
        .map_err(log)?;
    let status = daemon.wait_for_exit(stop_timeout)?;
    ensure!(
        status.success(),
        "{} exited with {status} after SIGTERM; its journal: {:#?}",
        service.name,
        journal_entries(root, pid)?
    );
    eprintln!("{}: {:?} ... {:?}", service.name, ready, notify.got.last());
    Ok((ready, entries))
}

fn field<'a>(entry: &'a Entry, key: &str) -> Option<&'a str> {
    entry.get(key).and_then(|v| v.as_str())
}

#[test]
fn installed_daemons_start_from_their_units_and_tell_the_manager_and_the_journal() -> Result<()> {
    let started = Instant::now();
    let files = debs()?;
    for (tool, package) in [
        ("chroot", "coreutils"),
        ("unshare", "util-linux"),
        ("ldd", "libc-bin"),
        ("dbus-daemon", "dbus-daemon"),
        ("journalctl", "systemd"),
    ] {
        require(
            tool,
            &["--version"],
            &format!("install the {package} package"),
        );
    }
    // chroot, mount namespaces and journald need root; say so instead of failing obscurely.
    let uid = run(Command::new("id").arg("-u"))?;
    ensure!(
        uid.trim() == "0",
        "this test runs the daemons in a chroot: run it as root"
    );

    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    install(&root, files)?;
    copy_libraries(&root)?;
    // What base-files makes on every Debian system: the bus's well-known address
    // (/var/run/dbus/system_bus_socket) is under it.
    std::os::unix::fs::symlink("/run", root.join("var/run"))?;
    std::fs::create_dir_all(root.join("proc"))?;
    let _journald = start_journald(&root)?;
    let _bus = start_system_bus(&root)?;

    // The host: the unit and the installed configuration as they are.
    let host = service(&root, "quiesce-host.service")?;
    ensure!(
        host.argv
            == [
                "/usr/bin/quiesce-host",
                "--config",
                "/etc/quiesce/host.toml"
            ],
        "quiesce-host.service's ExecStart= with QUIESCE_HOST_ARGS=\"\": {:?}",
        host.argv
    );
    let (ready, entries) = run_service(&root, &host, "quiesce-host")?;
    ensure!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=serving org.quiesce.Host1")),
        "quiesce-host's READY=1: {ready:?}"
    );
    let host_started = entries
        .iter()
        .find(|e| field(e, "MESSAGE") == Some("host started"))
        .with_context(|| format!("no \"host started\" in the journal: {entries:#?}"))?;
    for (key, value) in [
        ("PRIORITY", "5"),
        ("SYSLOG_IDENTIFIER", "quiesce-host"),
        ("_TRANSPORT", "journal"),
    ] {
        ensure!(
            field(host_started, key) == Some(value),
            "\"host started\" has {key}={:?}, not {value:?}: {host_started:#?}",
            field(host_started, key)
        );
    }

    // The broker: certificates where the unit looks for them (as broker.toml's comment says to
    // make them), and the administrator's QUIESCE_BROKER_ARGS in the EnvironmentFile=: a
    // loopback port the kernel picks, so that the test binds nothing this machine may use.
    run(Command::new(root.join("usr/bin/quiesce-broker"))
        .args(["certs", "--out"])
        .arg(root.join("etc/quiesce/pki"))
        .args(["--broker-name", "broker", "--broker-host", "127.0.0.1"])
        .args(["--nodes", "node1", "--clients", "admin"]))?;
    std::fs::write(
        root.join("etc/default/quiesce-broker"),
        "# the test's\nQUIESCE_BROKER_ARGS=\"--listen 127.0.0.1:0\"\n",
    )?;
    // The node's name: host.toml sets none, so it is this machine's host name.
    let hostname = read(Path::new("/proc/sys/kernel/hostname"))?;
    ensure!(
        field(host_started, "QUIESCE_NODE") == Some(hostname.trim()),
        "\"host started\" has QUIESCE_NODE={:?}, not the host name {:?}: {host_started:#?}",
        field(host_started, "QUIESCE_NODE"),
        hostname.trim()
    );
    let broker = service(&root, "quiesce-broker.service")?;
    ensure!(
        broker
            .argv
            .ends_with(&["--listen".to_string(), "127.0.0.1:0".to_string()])
            && broker.argv[1] == "serve",
        "quiesce-broker.service's ExecStart=: {:?}",
        broker.argv
    );
    let (ready, entries) = run_service(&root, &broker, "quiesce-broker")?;
    ensure!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=listening on 127.0.0.1:")
                && l.ends_with("no node attached")),
        "quiesce-broker's READY=1: {ready:?}"
    );
    ensure!(
        entries
            .iter()
            .all(|e| field(e, "SYSLOG_IDENTIFIER") == Some("quiesce-broker")),
        "{entries:#?}"
    );
    ensure!(
        root.join("var/lib/quiesce/catalog.sqlite").exists(),
        "the broker made no catalog in the root's /var/lib/quiesce"
    );
    eprintln!("the whole test: {:.0?}", started.elapsed());
    Ok(())
}
