//! The real `app-writer` binary on a private `dbus-daemon`, against a stand-in host that owns
//! `org.quiesce.Host1` and answers `RegisterWriter` (calling the application back for its
//! metadata, as the host does). The test then drives the application's writer calls itself.

use quiesce_dbus::{AppWriterProxy, APP_WRITER_XML, HOST_NAME, HOST_PATH};
use quiesce_proto::WriterMetadata;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use zbus::fdo;
use zbus::message::Header;
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

const APP: &str = env!("CARGO_BIN_EXE_app-writer");

/// A private bus: `dbus-daemon` in the foreground, killed on drop.
struct Bus {
    daemon: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let socket = dir.join("bus");
        let mut daemon = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start dbus-daemon: install the dbus-daemon package");
        // The daemon prints its address once it listens.
        let mut address = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut address)
            .unwrap();
        assert!(!address.trim().is_empty(), "dbus-daemon printed no address");
        Bus {
            daemon,
            address: address.trim().to_owned(),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// What the stand-in host learnt from one RegisterWriter: the caller's unique name, its
/// object, and the metadata read back from it.
type Registration = (String, OwnedObjectPath, WriterMetadata);

struct StandInHost {
    registered: Arc<Mutex<Vec<Registration>>>,
}

#[zbus::interface(name = "org.quiesce.Host1")]
impl StandInHost {
    async fn register_writer(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &zbus::Connection,
        object: OwnedObjectPath,
    ) -> fdo::Result<OwnedObjectPath> {
        let sender = header
            .sender()
            .expect("a bus message has a sender")
            .to_string();
        // Called back while RegisterWriter is in flight: the application must serve first.
        let app = AppWriterProxy::builder(connection)
            .destination(sender.clone())?
            .path(object.clone())?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let json = app.metadata().await?;
        let metadata: WriterMetadata = serde_json::from_str(&json)
            .map_err(|e| fdo::Error::InvalidArgs(format!("metadata {json}: {e}")))?;
        metadata
            .validate()
            .map_err(|e| fdo::Error::InvalidArgs(e.to_string()))?;
        let path = quiesce_dbus::writer_path(&metadata.id);
        self.registered
            .lock()
            .unwrap()
            .push((sender, object, metadata));
        Ok(path)
    }
}

/// The `<interface>` element of `xml` for `name`, with whitespace between tags removed.
fn interface_element(xml: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("no interface {name} in {xml}"));
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    xml[start..end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .concat()
}

fn records(dir: &Path) -> Vec<(u64, u128)> {
    std::fs::read_to_string(dir.join("records.log"))
        .unwrap()
        .lines()
        .map(|line| {
            let (seq, ns) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad record {line:?}"));
            (seq.parse().unwrap(), ns.parse().unwrap())
        })
        .collect()
}

#[test]
fn app_writer_registers_serves_the_contract_and_holds_writes_while_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let bus = Bus::start(tmp.path());
    let data = tmp.path().join("data");
    let events = tmp.path().join("events");

    // No host on the bus: registration fails with the D-Bus error, exit status 1.
    let out = Command::new(APP)
        .args(["--bus", &bus.address, "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.ServiceUnknown")
            && stderr.contains("registering"),
        "{stderr}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let registered = Arc::new(Mutex::new(Vec::new()));
    let host = rt.block_on(async {
        zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .serve_at(
                HOST_PATH,
                StandInHost {
                    registered: registered.clone(),
                },
            )
            .unwrap()
            .name(HOST_NAME)
            .unwrap()
            .build()
            .await
            .unwrap()
    });

    let mut app = Command::new(APP)
        .args([
            "--bus",
            &bus.address,
            "--id",
            "app-1",
            "--volume",
            "shared",
            "--data",
        ])
        .arg(&data)
        .arg("--events")
        .arg(&events)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(app.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "registered /org/quiesce/Host1/writers/app_2d1\n");

    let (sender, object, metadata) = registered.lock().unwrap()[0].clone();
    assert_eq!(object.as_str(), "/com/example/AppWriter");
    let data = std::fs::canonicalize(&data).unwrap();
    assert_eq!(
        serde_json::to_value(&metadata).unwrap(),
        serde_json::json!({
            "id": "app-1", "name": "Example record writer", "instance": "", "vendor_version": "",
            "level": "front-end",
            "components": [{"name": "records", "kind": "files", "volume": "shared",
                            "paths": [data.to_str().unwrap()]}],
            "expected_freeze_ms": 5, "needs_post_snapshot": true
        })
    );

    let snapshot = tmp.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    let frozen_at = rt.block_on(async {
        let introspectable = fdo::IntrospectableProxy::builder(&host)
            .destination(sender.clone())
            .unwrap()
            .path(object.clone())
            .unwrap()
            .build()
            .await
            .unwrap();
        let live = introspectable.introspect().await.unwrap();
        let name = quiesce_dbus::APP_WRITER_INTERFACE;
        assert_eq!(
            interface_element(&live, name),
            interface_element(APP_WRITER_XML, name)
        );

        let app = AppWriterProxy::builder(&host)
            .destination(sender.clone())
            .unwrap()
            .path(object.clone())
            .unwrap()
            .build()
            .await
            .unwrap();
        assert!(app.prepare("s1", 1000).await.unwrap().is_empty());
        let reports = app.freeze("s1", 1000).await.unwrap();
        let seq: u64 = reports["last_record"].parse().unwrap();
        // Held at a record boundary: the file ends with the reported record, and stays so over
        // further calls (an idempotent freeze reports the same record).
        let held = records(&data);
        assert_eq!(held.len() as u64, seq);
        assert_eq!(app.freeze("s1", 1000).await.unwrap(), reports);
        assert!(app.prepare("s1", 1000).await.is_ok());
        assert_eq!(records(&data), held);
        assert!(app.thaw("s1", 1000).await.unwrap().is_empty());
        assert!(app.thaw("s1", 1000).await.is_ok(), "thaw is idempotent");

        let label = app
            .post_snapshot("s1", 1000, snapshot.to_str().unwrap())
            .await
            .unwrap();
        assert_eq!(label["last_record"], seq.to_string());
        assert_eq!(
            std::fs::read_to_string(snapshot.join("app-writer.label")).unwrap(),
            format!("set s1\nlast_record {seq}\n")
        );
        let refused = app
            .post_snapshot("other", 1000, snapshot.to_str().unwrap())
            .await;
        assert!(
            refused.is_err(),
            "post-snapshot of a set never frozen: {refused:?}"
        );
        assert!(app.complete("s1", 1000, "app-consistent").await.is_ok());

        // A second set, aborted; abort is idempotent and also fine when not frozen.
        app.freeze("s2", 1000).await.unwrap();
        assert!(app.abort("s2", 1000).await.is_ok());
        assert!(app.abort("s2", 1000).await.is_ok());
        seq
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(app.wait().unwrap().success(), "SIGTERM is a clean exit");

    // Records are numbered from 1 with no gap, and none was written inside a frozen window.
    let all = records(&data);
    for (i, (seq, _)) in all.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
    }
    let events = std::fs::read_to_string(&events).unwrap();
    let events: Vec<Vec<&str>> = events.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(
        events[0],
        ["registered", "/org/quiesce/Host1/writers/app_2d1"]
    );
    let kinds: Vec<&str> = events.iter().map(|e| e[0]).collect();
    assert_eq!(
        kinds,
        ["registered", "frozen", "thawed", "frozen", "thawed"]
    );
    assert_eq!(events[1][2], frozen_at.to_string());
    for pair in [&events[1..3], &events[3..5]] {
        let frozen: u128 = pair[0][1].parse().unwrap();
        let thawed: u128 = pair[1][1].parse().unwrap();
        let last: u64 = pair[0][2].parse().unwrap();
        for (seq, ns) in &all {
            assert!(
                (*seq <= last && *ns <= frozen) || (*seq > last && *ns >= thawed),
                "record {seq} at {ns} lies in the frozen window {frozen}..{thawed} after record {last}"
            );
        }
    }
}
