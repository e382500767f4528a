//! The broker as a Linux service: systemd's notification protocol without systemd (a test
//! listens on the `NOTIFY_SOCKET` datagram socket), a host's clean shutdown seen as one,
//! SIGHUP, SIGTERM and `serve --check-config`.

use crate::support::{broker_exe, nodes, wait_log, Broker, Certs, Host, HostTls};
use quiesce_testbed::NotifySocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// `Type=notify` for the broker: READY=1 once its listener is bound (with its address in
/// STATUS=), STATUS= following the nodes attached, WATCHDOG=1 at half WATCHDOG_USEC. And a host
/// stopped by SIGTERM was logged on the broker as "its link broke: h2 protocol error"; now the
/// host ends its stream and the broker logs a node that left cleanly.
#[test]
fn ready_status_watchdog_and_a_host_that_stops_leaves_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(tmp.path());
    let broker = Broker::start_env(
        tmp.path(),
        3000,
        vec![],
        vec![
            ("NOTIFY_SOCKET".into(), notify.path.clone().into()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
    );
    let log = || broker.process.log();
    // READY=1 comes with its status in one datagram, naming the bound address.
    let ready = notify.wait_for("READY=1", DEADLINE, |l| l == "READY=1", log);
    assert_eq!(
        ready,
        format!(
            "READY=1\nSTATUS=listening on {}: no node attached\n",
            broker.addr
        )
    );
    notify.wait_for("WATCHDOG=1", DEADLINE, |l| l == "WATCHDOG=1", log);

    let mut host = Host::start(
        tmp.path(),
        "n1",
        "w1",
        "shared",
        &[],
        &broker,
        HostTls::Insecure,
    );
    notify.wait_for(
        "STATUS= with n1",
        DEADLINE,
        |l| l.ends_with(": 1 node(s) attached: n1"),
        || format!("{}\n--- host:\n{}", log(), host.process.log()),
    );
    wait_log(&broker.process, "node attached");

    host.process.signal("TERM");
    let status = host.process.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", host.process.log());
    let log_text = wait_log(&broker.process, "node left");
    assert!(
        log_text.contains("node left: its host closed the link (the host shut down cleanly)"),
        "{log_text}"
    );
    assert!(!log_text.contains("link broke"), "{log_text}");
    let host_log = host.process.log();
    assert!(
        host_log.contains("the host closed its link to the broker"),
        "{host_log}"
    );
    notify.wait_for(
        "STATUS= with no node",
        DEADLINE,
        |l| l.ends_with(": no node attached"),
        log,
    );
}

/// Runs one set of `volume` on the (insecure) broker: the refusal's code, or `None` when the
/// set ran, whatever its outcome.
fn create_set(broker: &Broker, volume: &str) -> Option<tonic::Code> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = quiesce_link::connect(&broker.url, &quiesce_link::Security::Insecure)
            .await
            .unwrap();
        quiesce_link::v1::sets_client::SetsClient::new(channel)
            .create(quiesce_link::v1::CreateSetRequest {
                volumes: vec![volume.into()],
                ..Default::default()
            })
            .await
            .err()
            .map(|status| status.code())
    })
}

/// A broker configuration with the volume `shared` on dir-copy, its catalog in `dir`.
fn broker_config(dir: &Path, extra: &str) -> PathBuf {
    let source = dir.join("source");
    let snapshots = dir.join("snapshots");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::create_dir_all(&snapshots).unwrap();
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "catalog = {:?}\n{extra}\n[volumes.shared]\nprovider = \"dir-copy\"\nsource = {:?}\nsnapshots = {:?}\n",
            dir.join("catalog.sqlite").display().to_string(),
            source.display().to_string(),
            snapshots.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn check_config(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let output = Command::new(broker_exe())
        .args(["serve", "--check-config", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `serve --check-config` checks the TLS files and the configuration as the start does, prints
/// what the broker would serve and exits 0, or exits 1 naming the problem once; it listens on
/// nothing and opens no catalog.
#[test]
fn check_config_says_what_the_broker_would_serve_or_what_to_fix() {
    let help = Command::new(broker_exe())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--log-level <LEVEL|FILTER>",
        "-v, --verbose",
        "--check-config",
        "SIGHUP",
    ] {
        assert!(help.contains(flag), "{flag} in serve --help:\n{help}");
    }
    let bad = Command::new(broker_exe())
        .args(["serve", "--insecure", "--check-config"])
        .env("RUST_LOG", "quiesce_broker=chatty")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "quiesce-broker: RUST_LOG = \"quiesce_broker=chatty\" is not a log filter"
        ) && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("certs"), &["n1"]);
    let config = broker_config(tmp.path(), "");
    let flags = certs.flags("broker");
    let mut args: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_ref()).collect();
    args.extend(["--config".as_ref(), config.as_os_str()]);
    let (code, stdout, stderr) = check_config(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": the broker can start\n"), "{stdout}");
    assert!(stdout.contains("(mutual TLS as broker)"), "{stdout}");
    assert!(
        stdout.contains("volume shared: provider dir-copy"),
        "{stdout}"
    );
    assert!(!stdout.contains("listening on"), "{stdout}");
    assert!(
        !tmp.path().join("catalog.sqlite").exists(),
        "no catalog made"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no colour off a terminal: {stderr:?}"
    );

    let node_flags = [
        "--ca".to_string(),
        certs.ca().display().to_string(),
        "--cert".to_string(),
        certs.cert("n1").display().to_string(),
        "--key".to_string(),
        certs.key("n1").display().to_string(),
    ];
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "a node's certificate as the broker's",
            node_flags.to_vec(),
            "the broker needs the broker certificate",
        ),
        (
            "a catalog in a directory that does not exist",
            vec!["--insecure".into(), "--config".into(), {
                let dir = tmp.path().join("nocatalog");
                std::fs::create_dir_all(&dir).unwrap();
                let path = broker_config(&dir, "");
                let text = std::fs::read_to_string(&path).unwrap().replace(
                    "nocatalog/catalog.sqlite",
                    "nocatalog/missing/catalog.sqlite",
                );
                std::fs::write(&path, text).unwrap();
                path.display().to_string()
            }],
            "missing does not exist: create it",
        ),
        (
            "an unknown key",
            vec!["--insecure".into(), "--config".into(), {
                let dir = tmp.path().join("unknown");
                std::fs::create_dir_all(&dir).unwrap();
                broker_config(&dir, "hold_limit = 3").display().to_string()
            }],
            "unknown field `hold_limit`",
        ),
        (
            "a provider that cannot work",
            vec!["--insecure".into(), "--config".into(), {
                let dir = tmp.path().join("provider");
                std::fs::create_dir_all(&dir).unwrap();
                let path = broker_config(&dir, "");
                std::fs::remove_dir(dir.join("source")).unwrap();
                path.display().to_string()
            }],
            "is not a directory: create it",
        ),
    ];
    for (what, args, expect) in cases {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let (code, stdout, stderr) = check_config(&args);
        assert_eq!(code, Some(1), "{what}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{what}: {stdout}");
        assert!(stderr.contains(expect), "{what}: {stderr}");
        assert_eq!(
            stderr.matches(expect).count(),
            1,
            "{what}: said once: {stderr}"
        );
        assert!(!stderr.contains("Caused by"), "{what}: {stderr}");
    }
}

/// SIGHUP never stops the broker: it re-reads --config, applies a volume added (a set of it
/// runs where it was unknown before) and says in one line what it applied; a volume removed
/// stays served until a restart, said so; an invalid file changes nothing. SIGTERM shuts it
/// down cleanly, logged.
#[test]
fn sighup_rereads_the_configuration_and_the_broker_serves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let config = broker_config(tmp.path(), "");
    let mut broker = Broker::start_env(
        tmp.path(),
        3000,
        vec!["--config".into(), config.display().to_string()],
        vec![],
    );
    let auth = ["--insecure".to_string()];
    broker.process.signal("HUP");
    let log = wait_log(&broker.process, "SIGHUP: re-read");
    assert!(
        log.contains("valid, unchanged; the broker runs on"),
        "{log}"
    );
    assert_eq!(
        nodes(&broker, &auth).0,
        Vec::<String>::new(),
        "still serving"
    );

    // A volume added (and the lease changed) is applied: a set of it starts, where before the
    // broker knew no such volume.
    let unknown = |volume: &str| create_set(&broker, volume) == Some(tonic::Code::NotFound);
    assert!(unknown("more"), "no volume `more` yet");
    let text = std::fs::read_to_string(&config).unwrap();
    let more = tmp.path().join("more");
    std::fs::create_dir_all(more.join("source")).unwrap();
    std::fs::create_dir_all(more.join("snapshots")).unwrap();
    let with_more = format!(
        "lease_ms = 2000\n{text}\n[volumes.more]\nprovider = \"dir-copy\"\nsource = {:?}\nsnapshots = {:?}\n",
        more.join("source").display().to_string(),
        more.join("snapshots").display().to_string()
    );
    std::fs::write(&config, &with_more).unwrap();
    broker.process.signal("HUP");
    let log = wait_log(
        &broker.process,
        "applied lease_ms, [volumes.more] to the sets started from now on",
    );
    assert!(
        !log.contains("restart"),
        "nothing waits for a restart: {log}"
    );
    assert!(!unknown("more"), "the volume added is served: {log}");

    // A volume removed stays until a restart (its kept snapshots must stay deletable), and
    // the log says so.
    let without_shared = with_more.replace("[volumes.shared]", "[volumes.unused]");
    std::fs::write(&config, &without_shared).unwrap();
    broker.process.signal("HUP");
    let log = wait_log(
        &broker.process,
        "[volumes.shared] removed take effect only when the broker restarts",
    );
    assert!(log.contains("applied [volumes.unused]"), "{log}");
    assert!(!unknown("shared"), "still served until a restart: {log}");

    // An invalid file changes nothing: the control.
    std::fs::write(&config, "catalog = 3\n").unwrap();
    broker.process.signal("HUP");
    let log = wait_log(&broker.process, "nothing changed");
    assert!(!unknown("more") && !unknown("unused"), "{log}");
    assert_eq!(log.matches("SIGHUP").count(), 4, "one line each: {log}");
    assert_eq!(
        nodes(&broker, &auth).0,
        Vec::<String>::new(),
        "still serving"
    );

    broker.process.signal("TERM");
    let status = broker.process.child.wait().unwrap();
    let log = broker.process.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("shut down cleanly"), "{log}");
}
