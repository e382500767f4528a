//! The host as a Linux service: systemd's notification protocol without systemd (a test listens
//! on the `NOTIFY_SOCKET` datagram socket), SIGHUP, SIGTERM, `--check-config`, the log's flags.

use crate::dbus::start_host;
use crate::support::{self, plugin, plugin_dir, Bus, Child, Policy};
use quiesce_dbus::{HostProxy, HOST_NAME};
use quiesce_testbed::NotifySocket;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long anything here may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Writes a host configuration with the hello plugin on volume `demo` into `dir`.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let plugins = plugin_dir(dir, &[&plugin("hello-writer")]);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "node = \"node1\"\nplugin_dir = \"{}\"\n{extra}\n[plugins.hello]\nvolume = \"demo\"\n\
             [volumes.demo]\nprovider = \"dir-copy\"\nsource = \"{}\"\nsnapshots = \"{}\"\n",
            plugins.display(),
            data.display(),
            dir.join("snapshots").display()
        ),
    )
    .unwrap();
    config
}

fn wait_log(child: &Child, text: &str) -> String {
    quiesce_testbed::wait_until_or(
        &format!("{text:?} in the host's log"),
        DEADLINE,
        || {
            let log = child.log();
            log.contains(text).then_some(log)
        },
        || child.log(),
    )
}

/// `Type=notify` without systemd: READY=1 comes once, and only once the bus name is owned (the
/// name is owned when it arrives); STATUS= says the writers; WATCHDOG=1 follows at half the
/// WATCHDOG_USEC interval. Without WATCHDOG_USEC no WATCHDOG=1 comes; `--check-config` sends
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_once_the_bus_name_is_owned_then_the_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(Policy::Permissive);
    let config = write_config(tmp.path(), "");
    let notify = NotifySocket::bind(tmp.path());
    let connection = support::connect(&bus).await;
    let dbus = zbus::fdo::DBusProxy::new(&connection).await.unwrap();
    let name = zbus::names::BusName::try_from(HOST_NAME).unwrap();
    assert!(!dbus.name_has_owner(name.clone()).await.unwrap());
    let mut command = Command::new(env!("CARGO_BIN_EXE_quiesce-host"));
    command
        .arg("--config")
        .arg(&config)
        .args(["--bus", &bus.address])
        .env("NOTIFY_SOCKET", &notify.path)
        // 400 ms: WATCHDOG=1 every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null());
    let host = Child::spawn(command, tmp.path().join("host.stderr"));
    let ready = tokio::task::block_in_place(|| {
        notify.wait_for("READY=1", DEADLINE, |l| l == "READY=1", || host.log())
    });
    assert!(
        dbus.name_has_owner(name.clone()).await.unwrap(),
        "READY=1 came before the host owned {HOST_NAME}:\n{}",
        host.log()
    );
    assert!(
        ready
            .lines()
            .any(|l| l == format!("STATUS=serving {HOST_NAME}: 1 writer(s)")),
        "the status says the writers: {ready:?}"
    );
    let proxy = HostProxy::new(&connection).await.unwrap();
    assert_eq!(proxy.node().await.unwrap(), "node1");
    // The watchdog: two in a row (each within the deadline; a blocking read, no sleep).
    for _ in 0..2 {
        let message = tokio::task::block_in_place(|| {
            notify.wait_for("WATCHDOG=1", DEADLINE, |l| l == "WATCHDOG=1", || host.log())
        });
        assert!(!message.contains("READY=1"), "READY=1 came twice");
    }
    drop(host);

    // Without WATCHDOG_USEC: READY=1, and the host stops on SIGTERM with STOPPING=1 and no
    // WATCHDOG=1 at all.
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "");
    let notify = NotifySocket::bind(tmp.path());
    let mut command = Command::new(env!("CARGO_BIN_EXE_quiesce-host"));
    command
        .arg("--config")
        .arg(&config)
        .args(["--bus", &bus.address])
        .env("NOTIFY_SOCKET", &notify.path)
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null());
    let mut host = Child::spawn(command, tmp.path().join("host.stderr"));
    tokio::task::block_in_place(|| {
        notify.wait_for("READY=1", DEADLINE, |l| l == "READY=1", || host.log())
    });
    host.signal("TERM");
    let status = host.child.wait().unwrap();
    assert!(status.success(), "{status}:\n{}", host.log());
    let rest = notify.queued().join("");
    assert!(rest.contains("STOPPING=1"), "{rest:?}");
    assert!(!rest.contains("WATCHDOG=1"), "{rest:?}");

    // --check-config takes no bus name and says nothing to the service manager.
    let output = Command::new(env!("CARGO_BIN_EXE_quiesce-host"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .env("NOTIFY_SOCKET", &notify.path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(notify.queued(), Vec::<String>::new());
    assert!(!dbus.name_has_owner(name).await.unwrap());
}

/// `kill -HUP` killed the host without a word. Now SIGHUP re-reads the configuration, says in
/// one line whether it is valid and what changed (needing a restart), and the host serves on;
/// SIGTERM then shuts it down cleanly, logged.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_the_configuration_and_the_host_serves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(Policy::Permissive);
    let mut host = start_host(
        &bus,
        tmp.path(),
        &[&plugin("hello-writer")],
        "[plugins.hello]\nvolume = \"demo\"\n",
    )
    .await;
    let connection = support::connect(&bus).await;
    let proxy = HostProxy::new(&connection).await.unwrap();
    let config = tmp.path().join("host.toml");
    let original = std::fs::read_to_string(&config).unwrap();

    host.signal("HUP");
    wait_log(&host, "SIGHUP: re-read");
    assert!(
        host.log().contains(&format!(
            "SIGHUP: re-read {}: valid, unchanged",
            config.display()
        )),
        "{}",
        host.log()
    );
    assert_eq!(proxy.node().await.unwrap(), "node1", "still serving");
    assert_eq!(proxy.list_writers().await.unwrap().len(), 1);

    // A change: said to need a restart, by key.
    std::fs::write(&config, format!("hold_limit_ms = 4000\n{original}")).unwrap();
    host.signal("HUP");
    let log = wait_log(&host, "changed: hold_limit_ms;");
    assert!(
        log.contains("take effect only when the host restarts"),
        "{log}"
    );
    // A broken file: an error, and the host runs on with what it started with.
    std::fs::write(&config, format!("hold_limit_ms = 0\n{original}")).unwrap();
    host.signal("HUP");
    let log = wait_log(&host, "hold_limit_ms: 0 is out of range");
    assert!(
        log.contains("the host runs on with the configuration it started with"),
        "{log}"
    );
    assert_eq!(proxy.node().await.unwrap(), "node1", "still serving");
    assert_eq!(
        host.log().matches("SIGHUP").count(),
        3,
        "one line per SIGHUP:\n{}",
        host.log()
    );

    host.signal("TERM");
    let status = tokio::task::block_in_place(|| host.child.wait().unwrap());
    let log = host.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("shut down cleanly"), "{log}");
}

/// Runs `quiesce-host --check-config` (and `extra` arguments) on `body`, with `PLUGIN_DIR`,
/// `DATA` and `SNAPS` filled in: exit code, stdout, stderr.
fn check_config(
    tmp: &Path,
    body: &str,
    plugins: &[&Path],
    extra: &[&str],
) -> (Option<i32>, String, String) {
    let dir = plugin_dir(tmp, plugins);
    std::fs::create_dir_all(tmp.join("data")).unwrap();
    let config = tmp.join("host.toml");
    let text = body
        .replace("PLUGIN_DIR", &dir.display().to_string())
        .replace("DATA", &tmp.join("data").display().to_string())
        .replace("SNAPS", &tmp.join("snaps").display().to_string());
    std::fs::write(&config, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_quiesce-host"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const DEMO: &str =
    "[volumes.demo]\nprovider = \"dir-copy\"\nsource = \"DATA\"\nsnapshots = \"SNAPS\"\n";

/// There was no way to check a configuration without starting the daemon. `--check-config`
/// loads the plugins and checks providers and mounts as the start does, prints what the host
/// would serve and exits 0; each broken configuration exits 1, naming the problem once; a
/// volume nothing covers is a warning.
#[test]
fn check_config_says_what_the_host_would_serve_or_what_to_fix() {
    let hello = plugin("hello-writer");
    let tmp = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check_config(
        tmp.path(),
        &format!("node = \"n1\"\nplugin_dir = \"PLUGIN_DIR\"\n[plugins.hello]\nvolume = \"demo\"\n{DEMO}"),
        &[&hello],
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(": the host can start\nnode n1\n"),
        "{stdout}"
    );
    assert!(stdout.contains("plugin hello "), "{stdout}");
    assert!(stdout.contains("writer hello ("), "{stdout}");
    assert!(stdout.contains("volumes demo"), "{stdout}");
    assert!(
        stdout.contains("volume demo: no mount here, provider dir-copy"),
        "{stdout}"
    );
    assert!(!stderr.contains("serving on D-Bus"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour off a terminal: {stderr:?}"
    );

    let cases: [(&str, String, &str); 5] = [
        (
            "a plugin_dir that does not exist",
            format!("plugin_dir = \"/nonexistent/plugins\"\n{DEMO}"),
            "plugin_dir = \"/nonexistent/plugins\" does not exist",
        ),
        (
            "a table for a plugin that is not there",
            format!("plugin_dir = \"PLUGIN_DIR\"\n[plugins.helo]\nvolume = \"demo\"\n{DEMO}"),
            "[plugins.helo] configures a plugin that is not in plugin_dir (loaded: hello)",
        ),
        (
            "a configured plugin that fails to load",
            format!("plugin_dir = \"PLUGIN_DIR\"\n[plugins.hello]\nvolumee = \"demo\"\n{DEMO}"),
            "its configuration [plugins.hello] was refused",
        ),
        (
            "a provider that cannot work",
            "[volumes.demo]\nprovider = \"dir-copy\"\nsource = \"/nonexistent/source\"\nsnapshots = \"SNAPS\"\n".to_string(),
            "[volumes.demo]",
        ),
        (
            "not TOML",
            "node = \n".to_string(),
            "is not valid",
        ),
    ];
    for (what, body, expect) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = check_config(
            tmp.path(),
            &format!("node = \"n1\"\n{body}"),
            &[&hello],
            &[],
        );
        assert_eq!(code, Some(1), "{what}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{what}: nothing served: {stdout}");
        assert!(stderr.contains(expect), "{what}: {stderr}");
        assert_eq!(
            stderr.matches(expect).count(),
            1,
            "{what}: said once: {stderr}"
        );
        assert!(!stderr.contains("Caused by"), "{what}: {stderr}");
    }

    // A volume no writer covers: a warning, and the host can start.
    let tmp = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check_config(
        tmp.path(),
        &format!("node = \"n1\"\nplugin_dir = \"PLUGIN_DIR\"\n[plugins.hello]\nvolume = \"demo\"\n{DEMO}[volumes.other]\nmount = \"/\"\nflush = \"none\"\n"),
        &[&hello],
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("[volumes.other]: no plugin writer has components on it"),
        "{stderr}"
    );
    assert!(
        stdout.contains("volume other: mount / (flush none)"),
        "{stdout}"
    );
}

/// The log's level was set only by an undocumented RUST_LOG, and a bad value was silently
/// ignored. `--log-level` and `-v` are in --help; a bad filter, from the flag or RUST_LOG,
/// stops the host at start with one line; RUST_LOG still works without a flag.
#[test]
fn the_log_level_comes_from_the_flags_or_rust_log_and_a_bad_one_is_an_error() {
    let help = Command::new(env!("CARGO_BIN_EXE_quiesce-host"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--log-level <LEVEL|FILTER>",
        "-v, --verbose",
        "--check-config",
        "SIGHUP",
    ] {
        assert!(help.contains(flag), "{flag} in --help:\n{help}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let body = format!("node = \"n1\"\n{DEMO}");
    let run = |args: &[&str], rust_log: Option<&str>| {
        std::fs::create_dir_all(tmp.path().join("data")).unwrap();
        let config = tmp.path().join("host.toml");
        std::fs::write(
            &config,
            body.replace("DATA", &tmp.path().join("data").display().to_string())
                .replace("SNAPS", &tmp.path().join("snaps").display().to_string()),
        )
        .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_quiesce-host"));
        command
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .args(args);
        match rust_log {
            Some(v) => command.env("RUST_LOG", v),
            None => command.env_remove("RUST_LOG"),
        };
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--log-level", "loud"], None);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().collect::<Vec<_>>(),
        ["quiesce-host: --log-level = \"loud\" is not a log filter: \"loud\" is not a level; give a level (error, warn, info, debug, trace, off) or TARGET=LEVEL directives separated by commas (info,quiesce_host=debug)"]
    );
    let (code, stderr) = run(&[], Some("info,quiesce_host=loud"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr
            .starts_with("quiesce-host: RUST_LOG = \"info,quiesce_host=loud\" is not a log filter"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // Without a flag, RUST_LOG says what is logged; a flag overrides it.
    // (The configuration draws one warning: no writer covers its volume.)
    let (code, stderr) = run(&[], Some("error"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("WARN") && !stderr.contains("INFO"),
        "{stderr}"
    );
    let (code, stderr) = run(&["-v"], Some("error"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("WARN"), "{stderr}");
    let (code, stderr) = run(&["--log-level", "error"], Some("trace"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("WARN") && !stderr.contains("DEBUG") && !stderr.contains("TRACE"),
        "{stderr}"
    );
    let (code, stderr) = run(&[], None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("WARN"), "the default is info: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour off a terminal: {stderr:?}"
    );
}

/// Removes the journal socket this test made (and its directories), however the test ends.
struct MadeJournal(Vec<PathBuf>);

impl Drop for MadeJournal {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
        }
    }
}

/// Under systemd (`JOURNAL_STREAM` names the daemon's stderr, the journal's socket exists) the
/// log goes to the journal over its native protocol, levels as PRIORITY, fields prefixed
/// QUIESCE_, and nothing to stderr; with `JOURNAL_STREAM` naming another file (a child whose
/// stderr was redirected) it stays on stderr. The test plays journald: it binds the socket
/// itself when no journald runs here.
#[test]
fn under_systemd_the_log_goes_to_the_journal_with_priorities_and_fields() {
    support::require_root();
    let socket_path = Path::new(quiesce_daemon::log::JOURNAL_SOCKET);
    if socket_path.exists() {
        eprintln!(
            "skipped: {} exists (a journald runs here); this test plays journald itself",
            socket_path.display()
        );
        return;
    }
    let mut made = vec![];
    for dir in ["/run/systemd", "/run/systemd/journal"] {
        if !Path::new(dir).exists() {
            std::fs::create_dir(dir).unwrap();
            made.push(PathBuf::from(dir));
        }
    }
    let journal = UnixDatagram::bind(socket_path).unwrap();
    made.push(socket_path.to_path_buf());
    made.reverse();
    let _made = MadeJournal(made);

    let tmp = tempfile::tempdir().unwrap();
    // A volume no writer covers: one warning.
    let config = write_config(
        tmp.path(),
        "[volumes.other]\nmount = \"/\"\nflush = \"none\"\n",
    );
    let run = |stream_of: &Path, stderr: &Path| {
        let file = std::fs::File::create(stderr).unwrap();
        std::fs::File::create(stream_of).unwrap();
        let meta = std::fs::metadata(stream_of).unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_quiesce-host"))
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .env(
                "JOURNAL_STREAM",
                format!(
                    "{}:{}",
                    std::os::unix::fs::MetadataExt::dev(&meta),
                    std::os::unix::fs::MetadataExt::ino(&meta)
                ),
            )
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{}",
            std::fs::read_to_string(stderr).unwrap()
        );
        std::fs::read_to_string(stderr).unwrap()
    };
    let stderr_file = tmp.path().join("stderr");
    let stderr = run(&stderr_file, &stderr_file);
    assert_eq!(stderr, "", "nothing on stderr: it went to the journal");
    journal.set_nonblocking(true).unwrap();
    let mut entries = vec![];
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = journal.recv(&mut buf) {
        entries.push(journal_fields(&buf[..n]));
    }
    let field = |entry: &Vec<(String, String)>, key: &str| {
        entry.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    let loaded = entries
        .iter()
        .find(|e| field(e, "MESSAGE").as_deref() == Some("plugin loaded"))
        .unwrap_or_else(|| panic!("no \"plugin loaded\" entry in {entries:#?}"));
    for (key, value) in [
        ("PRIORITY", "5"),
        ("QUIESCE_PLUGIN", "hello"),
        ("SYSLOG_IDENTIFIER", "quiesce-host"),
    ] {
        assert_eq!(field(loaded, key).as_deref(), Some(value), "{loaded:?}");
    }
    assert!(
        entries
            .iter()
            .any(|e| field(e, "PRIORITY").as_deref() == Some("4")
                && field(e, "MESSAGE")
                    .is_some_and(|m| m.contains("no plugin writer has components"))),
        "the warning at PRIORITY 4: {entries:#?}"
    );

    // JOURNAL_STREAM naming another file: stderr, as plain text.
    let stderr = run(&tmp.path().join("other"), &tmp.path().join("stderr2"));
    assert!(
        stderr.contains("INFO") && stderr.contains("plugin loaded"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

/// The fields of one entry of the journal's native protocol: `KEY=VALUE\n`, or `KEY\n`, the
/// value's length (64-bit little-endian), the value and `\n`.
fn journal_fields(mut data: &[u8]) -> Vec<(String, String)> {
    let mut fields = vec![];
    while !data.is_empty() {
        let end = data.iter().position(|b| *b == b'\n' || *b == b'=').unwrap();
        let key = String::from_utf8_lossy(&data[..end]).into_owned();
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let stop = rest.iter().position(|b| *b == b'\n').unwrap();
            fields.push((key, String::from_utf8_lossy(&rest[..stop]).into_owned()));
            data = &rest[stop + 1..];
        } else {
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = &rest[8..8 + len];
            fields.push((key, String::from_utf8_lossy(value).into_owned()));
            data = &rest[8 + len + 1..];
        }
    }
    fields
}
