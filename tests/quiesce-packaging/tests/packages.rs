//! The Debian packages, as an administrator gets them: `scripts/package` builds them with
//! cargo-deb (one release build), `dpkg --root` installs them into a throwaway root with their
//! maintainer scripts run chrootless (`DPKG_ROOT` set: the scripts make the group and the
//! catalog's directory inside the root and touch nothing of this machine), and the test checks
//! what landed where, verifies the installed units with `systemd-analyze verify --root`, starts
//! the installed broker, removes the packages (the broker is stopped, the files are gone, the
//! conffiles stay) and purges them (the conffiles go too).

use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

#[test]
fn packages_build_install_into_a_throwaway_root_and_go_away() -> Result<()> {
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
    let dir = tempfile::tempdir()?;
    let (debs, root) = (dir.path().join("debs"), dir.path().join("root"));

    let started = Instant::now();
    run(Command::new(workspace().join("scripts/package"))
        .arg(&debs)
        .env("CARGO", &cargo))?;
    eprintln!("scripts/package: {:.0?}", started.elapsed());
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

    // An empty dpkg database makes the throwaway root.
    std::fs::create_dir_all(root.join("var/lib/dpkg/info"))?;
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates"))?;
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    run(dpkg(&root).arg("--install").args(&files))?;
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
