//! `quiesce_daemon::log` against a real `systemd-journald`, read back with `journalctl`.
//!
//! The journal's socket path is fixed (`/run/systemd/journal/socket`, in tracing-journald too),
//! so the test runs journald and a child "daemon" (this test binary again, running
//! [`child_daemon`]) in private mount namespaces whose `/run` is a directory of the test: this
//! machine's /run and journal are not touched, and the journal the child writes lands in that
//! directory (`Storage=volatile` in a drop-in there). The child's stderr is a stream to
//! journald's `stdout` socket opened with the header systemd writes for a service, and
//! `$JOURNAL_STREAM` names it — what `StandardError=journal` does — so `log::init` chooses the
//! journal as it would under systemd. Needs root (mount namespaces), the `systemd` package
//! (systemd-journald, journalctl) and util-linux (`unshare`): missing, the test fails saying so.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD: &str = "QUIESCE_DAEMON_JOURNAL_CHILD";

/// The child: sets up the log as a daemon does and logs at every level, inside a set's and a
/// writer's spans as the daemons do, and one line with the fields directly. Does nothing unless
/// run as the child.
#[test]
fn child_daemon() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let output = quiesce_daemon::log::init(&quiesce_daemon::LogArgs::default(), "trace").unwrap();
    assert_eq!(output, quiesce_daemon::LogOutput::Journal);
    let set = tracing::info_span!("set", set = "set-n1-1", node = "n1");
    let _set = set.enter();
    let writer = tracing::info_span!("call", writer = "pg-main");
    let _writer = writer.enter();
    tracing::error!("probe error");
    tracing::warn!("probe warn");
    tracing::info!("probe info");
    tracing::debug!("probe debug");
    tracing::trace!("probe trace");
    drop(_writer);
    drop(_set);
    tracing::info!(
        set = "set-n1-2",
        node = "n1",
        writer = "sqlite",
        "probe fields"
    );
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `unshare --mount` with `run` bind-mounted over /run, then `program args...`.
fn in_namespace(run: &Path, program: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-euc"])
        .arg(r#"mount --bind "$1" /run; shift; exec "$@""#)
        .arg("sh")
        .arg(run)
        .arg(program);
    c
}

#[test]
fn under_systemd_the_log_reaches_a_real_journald_with_priorities_and_fields() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    assert_eq!(uid.trim(), "0", "this test needs root (mount namespaces)");
    let journald = Path::new("/lib/systemd/systemd-journald");
    assert!(
        journald.exists(),
        "{} is missing: install the systemd package",
        journald.display()
    );
    for (tool, package) in [("unshare", "util-linux"), ("journalctl", "systemd")] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "{tool} is missing: install {package}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("systemd/journald.conf.d")).unwrap();
    std::fs::create_dir_all(run.join("log/journal")).unwrap();
    std::fs::write(
        run.join("systemd/journald.conf.d/quiesce-test.conf"),
        "[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToKMsg=no\n\
         ForwardToConsole=no\nForwardToWall=no\nAudit=no\nMaxLevelStore=debug\n",
    )
    .unwrap();
    let _journald = Killed(
        in_namespace(&run, journald)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting systemd-journald under unshare"),
    );
    let stdout_socket = run.join("systemd/journal/stdout");
    quiesce_testbed::wait_until("journald's sockets", Duration::from_secs(10), || {
        UnixStream::connect(&stdout_socket).ok()
    });

    // The child's stderr, as systemd connects a service's: identifier, unit, priority (info),
    // level prefix, forward to syslog, kmsg, console.
    let mut stream = UnixStream::connect(&stdout_socket).unwrap();
    write!(
        stream,
        "quiesce-test\nquiesce-test.service\n6\n1\n0\n0\n0\n"
    )
    .unwrap();
    stream.shutdown(std::net::Shutdown::Read).unwrap();
    let stderr = std::fs::File::from(std::os::fd::OwnedFd::from(stream));
    let meta = stderr.metadata().unwrap();
    let child = in_namespace(&run, &std::env::current_exe().unwrap())
        .args(["--exact", "child_daemon", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "the child failed: {}",
        String::from_utf8_lossy(&child.stdout)
    );

    let field =
        |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let entries = quiesce_testbed::wait_until(
        "the probe entries in the journal",
        Duration::from_secs(10),
        || {
            let out = Command::new("journalctl")
                .arg("--directory")
                .arg(run.join("log/journal"))
                .args(["--output=json", "--no-pager", "--all"])
                .output()
                .ok()?;
            let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                // The child's entries (journald logs its own start, too).
                .filter(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("probe ")))
                .collect();
            let done = entries
                .iter()
                .any(|e| field(e, "MESSAGE").as_deref() == Some("probe fields"));
            done.then_some(entries)
        },
    );
    let entry = |message: &str| {
        entries
            .iter()
            .find(|e| field(e, "MESSAGE").as_deref() == Some(message))
            .unwrap_or_else(|| panic!("no {message:?} in the journal: {entries:#?}"))
    };
    // Levels as PRIORITY (trace is stored as 7, debug 6, ...): error 3, warn 4, info 5.
    for (message, priority) in [
        ("probe error", "3"),
        ("probe warn", "4"),
        ("probe info", "5"),
        ("probe debug", "6"),
        ("probe trace", "7"),
    ] {
        let e = entry(message);
        assert_eq!(field(e, "PRIORITY").as_deref(), Some(priority), "{e:#}");
        // Through the native protocol, with the spans' fields, prefixed.
        for (key, value) in [
            ("_TRANSPORT", "journal"),
            ("QUIESCE_SET", "set-n1-1"),
            ("QUIESCE_NODE", "n1"),
            ("QUIESCE_WRITER", "pg-main"),
        ] {
            assert_eq!(field(e, key).as_deref(), Some(value), "{key} of {e:#}");
        }
    }
    let e = entry("probe fields");
    for (key, value) in [
        ("QUIESCE_SET", "set-n1-2"),
        ("QUIESCE_NODE", "n1"),
        ("QUIESCE_WRITER", "sqlite"),
        ("PRIORITY", "5"),
    ] {
        assert_eq!(field(e, key).as_deref(), Some(value), "{key} of {e:#}");
    }
    // Nothing fell back to the stream (plain text on stderr would be _TRANSPORT=stdout).
    assert!(
        entries
            .iter()
            .all(|e| field(e, "_TRANSPORT").as_deref() == Some("journal")),
        "{entries:#?}"
    );
}
