//! The host on a real private `dbus-daemon`: the real `quiesce-host` process, the reference
//! `app-writer` application, zbus proxies, and busctl / dbus-send as outside clients.

use crate::support::{self, binary, client, plugin, plugin_dir, Bus, Child, Policy};
use futures_util::StreamExt;
use quiesce_dbus::{writer_path, HostProxy, WriterProxy, HOST_NAME};
use quiesce_proto::{Outcome, SetRecord};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;

/// Writes a host config into `dir` and starts `quiesce-host` on `bus`; returns when the host owns
/// its bus name.
pub async fn start_host(bus: &Bus, dir: &Path, plugins: &[&Path], extra: &str) -> Child {
    start_host_with_args(bus, dir, plugins, extra, &[]).await
}

/// [`start_host`] with more command-line arguments (`--broker ...`).
pub async fn start_host_with_args(
    bus: &Bus,
    dir: &Path,
    plugins: &[&Path],
    extra: &str,
    args: &[&str],
) -> Child {
    let plugin_dir = plugin_dir(dir, plugins);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "node = \"node1\"\nplugin_dir = \"{}\"\n{extra}\n\
             [volumes.demo]\nprovider = \"dir-copy\"\nsource = \"{}\"\nsnapshots = \"{}\"\n",
            plugin_dir.display(),
            data.display(),
            dir.join("snapshots").display()
        ),
    )
    .unwrap();
    let connection = support::connect(bus).await;
    let dbus = zbus::fdo::DBusProxy::new(&connection).await.unwrap();
    let mut owners = dbus.receive_name_owner_changed().await.unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_quiesce-host"));
    command
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--bus", &bus.address])
        .args(args)
        .env("RUST_LOG", "info");
    let host = Child::spawn(command, dir.join("host.stderr"));
    let name = HOST_NAME.try_into().unwrap();
    if !dbus.name_has_owner(name).await.unwrap() {
        let appeared = async {
            while let Some(change) = owners.next().await {
                if change.args().unwrap().name() == HOST_NAME {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), appeared)
            .await
            .is_err()
        {
            panic!("the host did not take its bus name:\n{}", host.log());
        }
    }
    host
}

/// Starts the reference application writer; returns when it is registered.
fn start_app(bus: &Bus, dir: &Path, id: &str) -> (Child, PathBuf, PathBuf) {
    let exe = binary("quiesce-example-app-writer", "app-writer");
    let data = dir.join("data");
    let events = dir.join(format!("{id}.events"));
    let mut command = Command::new(exe);
    command
        .args(["--bus", &bus.address, "--id", id, "--volume", "demo"])
        .args(["--data".as_ref(), data.as_os_str()])
        .args(["--events".as_ref(), events.as_os_str()])
        .stdout(Stdio::piped());
    let mut app = Child::spawn(command, dir.join(format!("{id}.stderr")));
    let stdout = app.child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("registered "),
        "app-writer did not register: {line:?}\n{}",
        app.log()
    );
    assert_eq!(
        line.trim_end().trim_start_matches("registered "),
        writer_path(id).as_str()
    );
    (app, data.join("records.log"), events)
}

async fn host_proxy(connection: &zbus::Connection) -> HostProxy<'static> {
    HostProxy::new(connection).await.unwrap()
}

/// Records of app-writer: `(seq, unix_ns)`.
fn records(path: &Path) -> Vec<(u64, u128)> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a record is cut short in {}",
        path.display()
    );
    text.lines()
        .map(|l| {
            let mut parts = l.split_whitespace();
            let seq = parts.next().unwrap().parse().unwrap();
            let ns = parts.next().unwrap().parse().unwrap();
            (seq, ns)
        })
        .collect()
}

/// Waits until the app has written a record after `after_ns` (it writes about one a millisecond).
async fn wait_for_record_after(path: &Path, after_ns: u128) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let wait = async {
        loop {
            tick.tick().await;
            if records(path).last().is_some_and(|r| r.1 > after_ns) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the application resumed writing after the thaw");
}

fn event_ns(events: &Path, kind: &str) -> Vec<(u128, Option<u64>)> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == kind).then(|| {
                let ns = parts.next().unwrap().parse().unwrap();
                (ns, parts.next().map(|s| s.parse().unwrap()))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_interfaces_match_the_checked_in_introspection_xml() {
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host(
        &bus,
        tmp.path(),
        &[&plugin("hello-writer")],
        "[plugins.hello]\nvolume = \"demo\"\n",
    )
    .await;
    let (_app, _, _) = start_app(&bus, tmp.path(), "app");
    let connection = support::connect(&bus).await;

    let host_xml = introspect(&connection, HOST_NAME, quiesce_dbus::HOST_PATH).await;
    // Well-formed for a strict parser (expat, dbus-python), not only for zbus.
    // D-Bus introspection starts with its DOCTYPE; the parser reads it and fetches nothing.
    let strict = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(&host_xml, strict)
        .unwrap_or_else(|e| panic!("the live Host1 introspection is not well-formed XML: {e}"));
    check_interface(&host_xml, "org.quiesce.Host1", "org.quiesce.Host1.xml");
    let writer_xml = introspect(&connection, HOST_NAME, writer_path("hello").as_str()).await;
    check_interface(
        &writer_xml,
        "org.quiesce.Writer1",
        "org.quiesce.Writer1.xml",
    );
    assert!(host_xml.contains("org.freedesktop.DBus.ObjectManager"));

    // The reference application serves exactly the documented AppWriter1; the writer's origin
    // names its bus name and object.
    let app = WriterProxy::builder(&connection)
        .path(writer_path("app"))
        .unwrap()
        .build()
        .await
        .unwrap();
    let origin = app.origin().await.unwrap();
    let (name, object) = origin
        .strip_prefix("application ")
        .and_then(|rest| rest.split_once(" at "))
        .unwrap_or_else(|| panic!("origin {origin:?}"));
    let app_xml = introspect(&connection, name, object).await;
    check_interface(
        &app_xml,
        "org.quiesce.AppWriter1",
        "org.quiesce.AppWriter1.xml",
    );
}

async fn introspect(connection: &zbus::Connection, dest: &str, path: &str) -> String {
    zbus::fdo::IntrospectableProxy::builder(connection)
        .destination(dest.to_string())
        .unwrap()
        .path(path.to_string())
        .unwrap()
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap_or_default()
}

/// Compares one `<interface>` element of live introspection with the checked-in file (ignoring
/// indentation). `QUIESCE_BLESS=1` rewrites the file from the live service instead.
fn check_interface(xml: &str, name: &str, file: &str) {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("{name} is not in the live introspection:\n{xml}"));
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    // Doc comments and indentation are documentation, not interface.
    let normalize = |s: &str| {
        let mut rest = s.to_string();
        while let Some(open) = rest.find("<!--") {
            let close = open + rest[open..].find("-->").expect("a closed comment") + 3;
            rest.replace_range(open..close, "");
        }
        rest.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let live = normalize(&xml[start..end]);
    let path = support::workspace_root()
        .join("core/quiesce-dbus/interfaces")
        .join(file);
    if std::env::var_os("QUIESCE_BLESS").is_some() {
        std::fs::write(&path, format!("  {}\n", &xml[start..end])).unwrap();
    }
    let checked_in = normalize(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(
        live,
        checked_in,
        "{name} differs from {}: update it (QUIESCE_BLESS=1) if the change is intended",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_writer_registers_and_really_holds_its_writes_while_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host(&bus, tmp.path(), &[], "").await;
    let (_app, records_log, events) = start_app(&bus, tmp.path(), "app");
    wait_for_record_after(&records_log, 0).await;
    let connection = support::connect(&bus).await;
    let host = host_proxy(&connection).await;

    let (id, outcome, snapshot) = host.run_local_set("demo", false).await.unwrap();
    assert_eq!(outcome, "app-consistent");
    let frozen = event_ns(&events, "frozen");
    let thawed = event_ns(&events, "thawed");
    assert_eq!((frozen.len(), thawed.len()), (1, 1), "one freeze, one thaw");
    let ((frozen_ns, last_seq), (thawed_ns, _)) = (frozen[0], thawed[0]);
    let last_seq = last_seq.expect("the freeze event names the last record");
    assert!(frozen_ns <= thawed_ns);

    wait_for_record_after(&records_log, thawed_ns).await;
    let live = records(&records_log);
    let during: Vec<_> = live
        .iter()
        .filter(|r| r.1 > frozen_ns && r.1 < thawed_ns)
        .collect();
    assert!(
        during.is_empty(),
        "records written while frozen: {during:?}"
    );
    let next = live.iter().find(|r| r.0 == last_seq + 1).unwrap();
    assert!(
        next.1 >= thawed_ns,
        "record {} came before the thaw",
        next.0
    );

    // The snapshot holds exactly the records acknowledged before the freeze, none cut short.
    let snap = records(&Path::new(&snapshot).join("records.log"));
    assert_eq!(snap.last().unwrap().0, last_seq);
    assert_eq!(snap[..], live[..snap.len()]);
    let label = std::fs::read_to_string(Path::new(&snapshot).join("app-writer.label")).unwrap();
    assert!(
        label.contains(&id),
        "post-snapshot wrote its label: {label:?}"
    );

    // The record, through the API and through busctl as an outside client.
    let record: SetRecord = serde_json::from_str(&host.show_set(&id).await.unwrap()).unwrap();
    assert_eq!(record.outcome, Outcome::AppConsistent);
    assert_eq!(
        host.list_sets().await.unwrap(),
        vec![(id.clone(), "app-consistent".into(), snapshot.clone())]
    );
    support::require("busctl", "systemd");
    let address = format!("--address={}", bus.address);
    let (ok, out, err) = client(
        None,
        "busctl",
        &[
            &address,
            "call",
            HOST_NAME,
            "/org/quiesce/Host1",
            "org.quiesce.Host1",
            "ListWriters",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("\"app\" \"Example record writer\" \"front-end\""),
        "{out}"
    );
    let path = writer_path("app");
    let (ok, out, err) = client(
        None,
        "busctl",
        &[
            &address,
            "get-property",
            HOST_NAME,
            path.as_str(),
            "org.quiesce.Writer1",
            "State",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "s \"idle\"");

    // Unregistering drops the writer and its object; the application may register again.
    host.unregister_writer("app").await.unwrap();
    assert!(host.list_writers().await.unwrap().is_empty());
    let (ok, _, err) = client(
        None,
        "busctl",
        &[
            &address,
            "get-property",
            HOST_NAME,
            path.as_str(),
            "org.quiesce.Writer1",
            "State",
        ],
    );
    assert!(!ok && err.contains("Unknown object"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_writer_killed_mid_freeze_fails_the_set_naming_it_and_the_others_are_released() {
    let tmp = tempfile::tempdir().unwrap();
    let gate = tmp.path().join("gate");
    support::mkfifo(&gate);
    let log = tmp.path().join("plugin.events");
    // "gate" (back-end) is frozen after the app (front-end) and holds the set in freeze until
    // the test opens the FIFO: the window in which the app is killed.
    let config = format!(
        "hold_limit_ms = 5000\n[timeouts]\nfreeze_ms = 4000\nabort_ms = 2000\n\
         [plugins.misbehave]\nevents = \"{}\"\n\
         [[plugins.misbehave.writers]]\nid = \"gate\"\nlevel = \"back-end\"\nvolume = \"demo\"\nhang_in = \"freeze\"\nhang_fifo = \"{}\"\n\
         [[plugins.misbehave.writers]]\nid = \"steady\"\nlevel = \"system\"\nvolume = \"demo\"\n",
        log.display(),
        gate.display()
    );
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host(&bus, tmp.path(), &[&plugin("quiesce-test-plugin")], &config).await;
    let (mut app, _, _) = start_app(&bus, tmp.path(), "app");
    let connection = support::connect(&bus).await;
    let host = host_proxy(&connection).await;
    let app_writer = WriterProxy::builder(&connection)
        .path(writer_path("app"))
        .unwrap()
        .build()
        .await
        .unwrap();
    let mut app_state = app_writer.receive_state_changed().await;
    let objects = zbus::fdo::ObjectManagerProxy::builder(&connection)
        .destination(HOST_NAME)
        .unwrap()
        .path(quiesce_dbus::HOST_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    let mut removed = objects.receive_interfaces_removed().await.unwrap();

    let set = tokio::spawn({
        let host = host.clone();
        async move { host.run_local_set("demo", false).await }
    });
    let frozen = async {
        while let Some(change) = app_state.next().await {
            if change.get().await.unwrap() == "frozen" {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), frozen)
        .await
        .expect("the app writer froze");
    // The gate's freeze has begun (the app's answer alone does not say the next level was
    // called): the set is held in freeze when the app dies.
    quiesce_testbed::wait_until("the gate's freeze called", Duration::from_secs(30), || {
        support::events(&log)
            .contains(&"gate freeze".to_string())
            .then_some(())
    });
    app.kill();
    let gone = async {
        while let Some(signal) = removed.next().await {
            if signal.args().unwrap().object_path().as_str() == writer_path("app").as_str() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("the host dropped the app writer");
    // Let the gate's freeze return; the abort queued behind it releases it.
    support::release_fifo(&gate);

    let (_id, outcome, snapshot) = set.await.unwrap().unwrap();
    assert!(
        outcome.starts_with("failed in freeze: writer app on node node1: lost:"),
        "{outcome}"
    );
    assert!(outcome.contains("vanished"), "{outcome}");
    assert_eq!(snapshot, "");
    assert!(
        std::fs::read_dir(tmp.path().join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
    // Every other writer was released: aborted after it froze, nobody left frozen.
    for id in ["gate", "steady"] {
        let w = WriterProxy::builder(&connection)
            .path(writer_path(id))
            .unwrap()
            .build()
            .await
            .unwrap();
        let mut states = w.receive_state_changed().await;
        let released = async {
            loop {
                let now = w.state().await.unwrap();
                if now == "idle" {
                    return;
                }
                states.next().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(6), released)
            .await
            .unwrap_or_else(|_| panic!("{id} was released"));
    }
    let ev = support::events(&log);
    assert!(
        support::position(&ev, "gate freeze-done") < support::position(&ev, "gate abort-done"),
        "{ev:#?}"
    );
    assert!(
        !ev.iter().any(|e| e.starts_with("steady freeze")),
        "steady (system level) never froze: {ev:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_under_another_uid_are_refused_for_freeze_and_register_and_may_read() {
    support::require_root();
    support::require("dbus-send", "dbus-bin");
    support::require("busctl", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let log = tmp.path().join("plugin.events");
    let config = format!(
        "[plugins.misbehave]\nevents = \"{}\"\n[[plugins.misbehave.writers]]\nid = \"w\"\nlevel = \"back-end\"\nvolume = \"demo\"\n",
        log.display()
    );

    // A permissive bus: the host's own uid check is what refuses.
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host(&bus, tmp.path(), &[&plugin("quiesce-test-plugin")], &config).await;
    let bus_arg = format!("--bus={}", bus.address);
    let send = |uid: Option<u32>, member: &str, args: &[&str], path: &str, iface: &str| {
        let dest = format!("--dest={HOST_NAME}");
        let method = format!("{iface}.{member}");
        let mut all = vec![
            bus_arg.as_str(),
            "--print-reply",
            dest.as_str(),
            path,
            method.as_str(),
        ];
        all.extend_from_slice(args);
        client(uid, "dbus-send", &all)
    };
    let host_call = |uid, member, args: &[&str]| {
        send(uid, member, args, "/org/quiesce/Host1", "org.quiesce.Host1")
    };
    let writer = writer_path("w");
    let writer_call = |uid, member| send(uid, member, &[], writer.as_str(), "org.quiesce.Writer1");

    for (what, (ok, _, err)) in [
        (
            "RunLocalSet",
            host_call(
                Some(NOBODY),
                "RunLocalSet",
                &["string:demo", "boolean:false"],
            ),
        ),
        (
            "RegisterWriter",
            host_call(Some(NOBODY), "RegisterWriter", &["objpath:/x"]),
        ),
        (
            "CreateSnapshot",
            host_call(
                Some(NOBODY),
                "CreateSnapshot",
                &["array:string:demo", "boolean:false"],
            ),
        ),
        (
            "CreateSnapshotLeased",
            host_call(
                Some(NOBODY),
                "CreateSnapshotLeased",
                &[
                    "array:string:demo",
                    "boolean:false",
                    "uint64:1000",
                    "uint64:0",
                ],
            ),
        ),
        (
            "StartSnapshot",
            host_call(
                Some(NOBODY),
                "StartSnapshot",
                &[
                    "array:string:demo",
                    "boolean:false",
                    "uint64:1000",
                    "uint64:0",
                ],
            ),
        ),
        (
            "CancelSnapshot",
            host_call(Some(NOBODY), "CancelSnapshot", &["string:set-1"]),
        ),
        (
            "DeleteSnapshot",
            host_call(Some(NOBODY), "DeleteSnapshot", &["string:set-1"]),
        ),
        (
            "RenewSnapshot",
            host_call(
                Some(NOBODY),
                "RenewSnapshot",
                &["string:set-1", "uint64:1000"],
            ),
        ),
        ("Freeze", writer_call(Some(NOBODY), "Freeze")),
        ("Thaw", writer_call(Some(NOBODY), "Thaw")),
    ] {
        assert!(!ok, "{what} was allowed for uid {NOBODY}");
        assert!(
            err.contains("org.quiesce.Error.NotAuthorized"),
            "{what}: {err}"
        );
        assert!(err.contains("uid 65534 may not"), "{what}: {err}");
    }
    // The CLI exits EX_NOPERM for it, for a script to branch on.
    assert_eq!(cli_as_nobody(&bus.address), Some(77));
    assert!(
        support::events(&log).is_empty(),
        "no writer was called: {:?}",
        support::events(&log)
    );
    let (ok, out, err) = host_call(Some(NOBODY), "ListWriters", &[]);
    assert!(ok && out.contains("\"w\""), "{out}{err}");
    // Reading the cluster's sets is open to all: past the uid check, this host (started
    // without --broker) says what it lacks.
    for (member, args) in [
        ("ListSnapshots", &[][..]),
        ("ShowSnapshot", &["string:set-1"][..]),
    ] {
        let (ok, _, err) = host_call(Some(NOBODY), member, args);
        assert!(
            !ok && err.contains("org.quiesce.Error.NoBroker"),
            "{member}: {err}"
        );
    }
    let address = format!("--address={}", bus.address);
    let (ok, out, err) = client(
        Some(NOBODY),
        "busctl",
        &[
            &address,
            "get-property",
            HOST_NAME,
            writer.as_str(),
            "org.quiesce.Writer1",
            "Level",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "s \"back-end\"");
    // Root may.
    let (ok, out, err) = host_call(None, "RunLocalSet", &["string:demo", "boolean:false"]);
    assert!(ok && out.contains("app-consistent"), "{out}{err}");

    // The project's system-bus policy refuses at the bus already, and still lets anyone read.
    let bus = Bus::start(Policy::System);
    let tmp2 = tempfile::tempdir().unwrap();
    let _host2 = start_host(&bus, tmp2.path(), &[], "").await;
    let bus_arg = format!("--bus={}", bus.address);
    let dest = format!("--dest={HOST_NAME}");
    let (ok, _, err) = client(
        Some(NOBODY),
        "dbus-send",
        &[
            &bus_arg,
            "--print-reply",
            &dest,
            "/org/quiesce/Host1",
            "org.quiesce.Host1.RunLocalSet",
            "string:demo",
            "boolean:false",
        ],
    );
    assert!(
        !ok && err.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{err}"
    );
    // Refused by the bus's policy: EX_NOPERM too.
    assert_eq!(cli_as_nobody(&bus.address), Some(77));
    let (ok, out, err) = client(
        Some(NOBODY),
        "dbus-send",
        &[
            &bus_arg,
            "--print-reply",
            &dest,
            "/org/quiesce/Host1",
            "org.quiesce.Host1.ListSets",
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = client(
        None,
        "dbus-send",
        &[
            &bus_arg,
            "--print-reply",
            &dest,
            "/org/quiesce/Host1",
            "org.quiesce.Host1.RunLocalSet",
            "string:demo",
            "boolean:false",
        ],
    );
    assert!(ok && out.contains("app-consistent"), "{out}{err}");
}

/// `quiesce snapshot create --volume demo` as uid nobody: its exit status.
fn cli_as_nobody(bus: &str) -> Option<i32> {
    Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
        ])
        .arg(binary("quiesce-cli", "quiesce"))
        .args(["snapshot", "create", "--volume", "demo", "--bus", bus])
        .env_remove("QUIESCE_BUS")
        .status()
        .expect("running quiesce under setpriv")
        .code()
}

/// An object that claims to be an application writer but serves broken metadata.
struct BadApp(String);

#[zbus::interface(name = "org.quiesce.AppWriter1")]
impl BadApp {
    #[zbus(property)]
    fn metadata(&self) -> String {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_calls_get_the_documented_errors_and_change_nothing() {
    support::require("dbus-send", "dbus-bin");
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host(
        &bus,
        tmp.path(),
        &[&plugin("hello-writer")],
        "[plugins.hello]\nvolume = \"demo\"\n",
    )
    .await;
    let connection = support::connect(&bus).await;
    let host = host_proxy(&connection).await;
    let writers_before = host.list_writers().await.unwrap();

    let bus_arg = format!("--bus={}", bus.address);
    let dest = format!("--dest={HOST_NAME}");
    let call = |member: &str, args: &[&str]| {
        let method = format!("org.quiesce.Host1.{member}");
        let mut all = vec![
            bus_arg.as_str(),
            "--print-reply",
            dest.as_str(),
            "/org/quiesce/Host1",
            method.as_str(),
        ];
        all.extend_from_slice(args);
        let (ok, _, err) = client(None, "dbus-send", &all);
        assert!(!ok, "{member} {args:?} succeeded");
        err
    };
    // zbus refuses a wrong signature before the host sees the call.
    let e = call("RunLocalSet", &["string:demo"]);
    assert!(
        e.contains("org.freedesktop.zbus.Error: Signature mismatch: got `s`, expected `(sb)`"),
        "{e}"
    );
    let e = call("RunLocalSet", &["int32:7", "boolean:false"]);
    assert!(e.contains("Signature mismatch"), "{e}");
    let e = call("RunLocalSet", &["string:nope", "boolean:false"]);
    assert!(
        e.contains("org.quiesce.Error.UnknownVolume")
            && e.contains("add it, with its provider, under [volumes.nope]"),
        "{e}"
    );
    let e = call("RunLocalSet", &["string:", "boolean:false"]);
    assert!(e.contains("org.quiesce.Error.InvalidRequest"), "{e}");
    let e = call("ShowSet", &["string:"]);
    assert!(e.contains("org.quiesce.Error.InvalidRequest"), "{e}");
    // A long unknown name is not echoed whole.
    let long = format!("string:{}", "v".repeat(100_000));
    let e = call("RunLocalSet", &[&long, "boolean:false"]);
    assert!(
        e.contains("org.quiesce.Error.UnknownVolume") && e.len() < 2_000,
        "{} bytes",
        e.len()
    );
    let e = call("ShowSet", &["string:set-nope"]);
    assert!(e.contains("org.quiesce.Error.UnknownSet"), "{e}");
    let e = call("UnregisterWriter", &["string:nope"]);
    assert!(e.contains("org.quiesce.Error.UnknownWriter"), "{e}");
    let e = call("UnregisterWriter", &["string:hello"]);
    assert!(
        e.contains("org.quiesce.Error.UnknownWriter") && e.contains("plugin writer"),
        "{e}"
    );

    // Metadata that is not JSON, JSON that is not valid metadata, a taken id; no such object.
    for (path, metadata, expect) in [
        ("/bad/json", "{not json", "not writer metadata JSON"),
        (
            "/bad/id",
            r#"{"id":"no spaces allowed","name":"x","level":"system"}"#,
            "is invalid",
        ),
        (
            "/bad/dup",
            r#"{"id":"hello","name":"Impostor","level":"system"}"#,
            "already taken",
        ),
    ] {
        connection
            .object_server()
            .at(path, BadApp(metadata.into()))
            .await
            .unwrap();
        let err = host
            .register_writer(&path.try_into().unwrap())
            .await
            .expect_err(path)
            .to_string();
        assert!(err.contains(expect), "{path}: {err}");
    }
    let err = host
        .register_writer(&"/nothing/here".try_into().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("org.quiesce.Error.InvalidMetadata") && err.contains("export that interface"),
        "{err}"
    );
    assert_eq!(
        host.list_writers().await.unwrap(),
        writers_before,
        "nothing changed"
    );
    assert!(host.list_sets().await.unwrap().is_empty(), "no set ran");
}

/// The `quiesce` command, run with `args`: (exit status, stdout, stderr).
fn quiesce_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let output = Command::new(binary("quiesce-cli", "quiesce"))
        .args(args)
        // Whatever the machine running the tests has set must not decide where it goes.
        .env_remove("QUIESCE_BUS")
        .env_remove("QUIESCE_BROKER")
        .envs(env.iter().copied())
        .output()
        .expect("running quiesce");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_snapshot_requests_to_a_host_without_broker_name_the_missing_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host(&bus, tmp.path(), &[], "").await;
    let connection = support::connect(&bus).await;
    let host = host_proxy(&connection).await;

    let no_broker = |what: &str, result: Result<String, quiesce_dbus::Error>| match result {
        Err(quiesce_dbus::Error::NoBroker(message)) => {
            assert!(
                message.contains("started without --broker")
                    && message.contains("--broker https://BROKER:PORT"),
                "{what}: {message}"
            )
        }
        other => panic!("{what}: expected NoBroker, got {other:?}"),
    };
    no_broker(
        "CreateSnapshot",
        host.create_snapshot(&["demo"], false).await,
    );
    no_broker("ShowSnapshot", host.show_snapshot("set-1").await);
    no_broker("DeleteSnapshot", host.delete_snapshot("set-1").await);
    match host.list_snapshots().await {
        Err(quiesce_dbus::Error::NoBroker(_)) => {}
        other => panic!("ListSnapshots: expected NoBroker, got {other:?}"),
    }

    // The command a backup tool runs: status 1, the host's message on stderr, nothing on
    // stdout (so a script never mistakes it for a record).
    let (status, out, err) = quiesce_cli(
        &[
            "snapshot",
            "create",
            "--volume",
            "demo",
            "--bus",
            &bus.address,
        ],
        &[],
    );
    assert_eq!(status, Some(78), "EX_CONFIG: {out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with("quiesce: this host was started without --broker")
            && err.contains("(org.quiesce.Error.NoBroker)"),
        "{err}"
    );
    let (status, out, err) = quiesce_cli(
        &["snapshot", "list", "--json"],
        &[("QUIESCE_BUS", &bus.address)],
    );
    assert_eq!(status, Some(78), "{out}{err}");
    assert!(err.contains("NoBroker"), "{out}{err}");
    // With --json, the failure is a document on stdout too: one parser for a script.
    let doc: serde_json::Value = serde_json::from_str(&out).expect("a JSON error document");
    assert_eq!(doc["error"]["exit_status"], 78, "{doc}");
    assert_eq!(doc["error"]["kind"], "config", "{doc}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("NoBroker"),
        "{doc}"
    );
    // A command-line mistake is EX_USAGE, not clap's usual 2 (2 means "the set ran and failed").
    let (status, _, err) = quiesce_cli(&["snapshot", "create", "--bus", &bus.address], &[]);
    assert_eq!(status, Some(64), "{err}");
    assert!(err.contains("--volume"), "{err}");
    // Broker flags belong to `writers`/`nodes`: typed on `snapshot`, they are a misunderstanding.
    let (status, _, err) = quiesce_cli(
        &[
            "snapshot",
            "list",
            "--bus",
            &bus.address,
            "--broker",
            "https://b:7645",
        ],
        &[],
    );
    assert_eq!(status, Some(64), "{err}");
    assert!(err.contains("drop --broker"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_on_a_closed_port_is_reported_unreachable_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let bus = Bus::start(Policy::Permissive);
    let _host = start_host_with_args(
        &bus,
        tmp.path(),
        &[&plugin("hello-writer")],
        "[plugins.hello]\nvolume = \"demo\"\n",
        &["--broker", &url, "--insecure"],
    )
    .await;
    let connection = support::connect(&bus).await;
    let host = host_proxy(&connection).await;

    let started = std::time::Instant::now();
    let (created, writers) =
        tokio::join!(host.create_snapshot(&["demo"], false), host.list_writers());
    assert!(
        started.elapsed() < quiesce_link::tls::CONNECT_TIMEOUT,
        "a refused connection took {:?}",
        started.elapsed()
    );
    assert_eq!(writers.unwrap().len(), 1);
    match created {
        Err(quiesce_dbus::Error::BrokerUnreachable(message)) => assert!(
            message.contains(&format!("cannot reach the broker at {url}"))
                && message.contains("is quiesce-broker running"),
            "{message}"
        ),
        other => panic!("expected BrokerUnreachable, got {other:?}"),
    }
    match host.list_snapshots().await {
        Err(quiesce_dbus::Error::BrokerUnreachable(_)) => {}
        other => panic!("ListSnapshots: expected BrokerUnreachable, got {other:?}"),
    }

    let (status, out, err) = quiesce_cli(
        &["snapshot", "show", "set-1", "--json", "--bus", &bus.address],
        &[],
    );
    assert_eq!(status, Some(69), "EX_UNAVAILABLE: {out}{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("a JSON error document");
    assert_eq!(doc["error"]["kind"], "unavailable", "{doc}");
    assert!(
        err.contains(&url) && err.contains("(org.quiesce.Error.BrokerUnreachable)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_never_answers_holds_up_neither_other_calls_nor_the_request_for_long() {
    support::require("openssl", "openssl");
    let tmp = tempfile::tempdir().unwrap();
    // A node certificate that loads (the handshake never gets far enough to check it).
    let (cert, key) = (tmp.path().join("node1.pem"), tmp.path().join("node1.key"));
    quiesce_testbed::run(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=node1/OU=node", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    // Listening, never accepting: the kernel completes the TCP handshake, then nothing answers
    // the TLS ClientHello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", silent.local_addr().unwrap());
    let bus = Bus::start(Policy::Permissive);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let host_process = start_host_with_args(
        &bus,
        tmp.path(),
        &[&plugin("hello-writer")],
        "[plugins.hello]\nvolume = \"demo\"\n",
        &["--broker", &url, "--ca", cert, "--cert", cert, "--key", key],
    )
    .await;
    let connection = support::connect(&bus).await;
    let host = host_proxy(&connection).await;

    let started = std::time::Instant::now();
    let create = tokio::spawn({
        let host = host.clone();
        async move { host.create_snapshot(&["demo"], false).await }
    });
    // The host logs the request before it connects: from then on it waits on the broker.
    quiesce_testbed::wait_until_or(
        "the host forwarded the request",
        Duration::from_secs(10),
        || {
            host_process
                .log()
                .contains("forwarding a snapshot set request to the broker")
                .then_some(())
        },
        || host_process.log(),
    );
    let writers = tokio::time::timeout(Duration::from_secs(2), host.list_writers())
        .await
        .expect("ListWriters answered while CreateSnapshot waited on the broker")
        .unwrap();
    assert_eq!(writers.len(), 1);
    assert!(
        !create.is_finished(),
        "CreateSnapshot was still waiting on the silent broker"
    );

    let bound = quiesce_link::tls::CONNECT_TIMEOUT;
    let created = tokio::time::timeout(bound + Duration::from_secs(5), create)
        .await
        .expect("CreateSnapshot gave up on the silent broker")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= bound && waited < bound + Duration::from_secs(5),
        "CreateSnapshot answered after {waited:?}, expected just past {bound:?}"
    );
    match created {
        Err(quiesce_dbus::Error::BrokerUnreachable(message)) => assert!(
            message.contains(&url)
                && message.contains(&format!(
                    "no TLS or HTTP/2 answer within {} ms",
                    bound.as_millis()
                )),
            "{message}"
        ),
        other => panic!("expected BrokerUnreachable, got {other:?}"),
    }
    drop(silent);
}

/// A host of an older release: `org.quiesce.Host1` with `CreateSnapshot` only, as before
/// leases.
struct OlderHost;

#[zbus::interface(name = "org.quiesce.Host1")]
impl OlderHost {
    async fn create_snapshot(&self, _volumes: Vec<String>, _best_effort: bool) -> String {
        unreachable!("this release's requester asks for CreateSnapshotLeased")
    }
}

/// A requester newer than its host exits EX_SOFTWARE (70) and says to install the same release,
/// apart from an unreachable host (69): a script must not retry what retrying cannot mend.
#[tokio::test(flavor = "multi_thread")]
async fn a_requester_newer_than_its_host_exits_with_the_release_mismatch() {
    let bus = Bus::start(Policy::Permissive);
    let _older = zbus::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .serve_at(quiesce_dbus::HOST_PATH, OlderHost)
        .unwrap()
        .name(HOST_NAME)
        .unwrap()
        .build()
        .await
        .unwrap();
    let (status, out, err) = quiesce_cli(
        &[
            "snapshot",
            "create",
            "--volume",
            "demo",
            "--bus",
            &bus.address,
        ],
        &[],
    );
    assert_eq!(status, Some(70), "EX_SOFTWARE: {out}{err}");
    assert!(
        err.contains("does not know StartSnapshot")
            && err.contains("install the same quiesce release"),
        "{err}"
    );
}
