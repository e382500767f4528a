//! Cluster sets on a real CephFS (the test bed's Ceph cluster): every node has its own
//! `ceph-fuse` client, so its own cache, and the broker snapshots through a client of its own
//! with the `cephfs` provider (`mkdir .snap/SET`). The application on node1 stores its records
//! through a shared mapping and never syncs them (`app-writer --mmap`): acknowledged records
//! that sit dirty in node1's kernel. The backup is asked for on node2, which knows nothing of
//! node1's cache.
//!
//! The node flush (`[volumes.shared] mount`, `flush = "syncfs"`) is the protection; the same
//! set with `flush = "none"` is its negative control and must lose records.

use crate::support::*;
use quiesce_proto::{Outcome, SetRecord};
use quiesce_testbed::{CephCluster, CephMount};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The width of one record in `records.map` (`app-writer --mmap`).
const RECORD_BYTES: usize = 33;

/// Fields drop in order: processes before the mounts they use.
struct Node {
    app: Option<Child>,
    host: Child,
    bus: Bus,
    mount: CephMount,
    app_events: PathBuf,
}

struct Cluster {
    nodes: Vec<Node>,
    broker: Broker,
    broker_mount: CephMount,
    certs: Certs,
    /// The volume's directory, relative to the root of the file system.
    volume_dir: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A broker and two nodes on the shared Ceph cluster; node1 runs the mmap application.
    fn start(tag: &str, flush: &str) -> Cluster {
        let ceph = CephCluster::shared();
        let dir = tempfile::tempdir().unwrap();
        let names = ["node1", "node2"];
        let certs = Certs::make(&dir.path().join("certs"), &names);
        let volume_dir = format!("volume-{tag}-{}", std::process::id());
        let broker_mount = ceph.mount(
            None,
            &ceph.client_key(&format!("{tag}-broker"), "rws"),
            &ceph.mountpoint(&format!("{tag}-broker")),
        );
        std::fs::create_dir(broker_mount.mountpoint.join(&volume_dir)).unwrap();
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "catalog = {:?}\nhold_limit_ms = 20000\n\n[volumes.shared]\nprovider = \"cephfs\"\ndirectory = {:?}\n",
                dir.path().join("catalog.sqlite"),
                broker_mount.mountpoint.join(&volume_dir),
            ),
        )
        .unwrap();
        let broker = Broker::start_with(
            dir.path(),
            &certs,
            3000,
            "127.0.0.1:0",
            vec!["--config".into(), config.display().to_string()],
        );
        let nodes = names
            .iter()
            .map(|name| {
                let mount = ceph.mount(
                    None,
                    &ceph.client_key(&format!("{tag}-{name}"), "rw"),
                    &ceph.mountpoint(&format!("{tag}-{name}")),
                );
                start_node(dir.path(), &certs, &broker, name, mount, flush)
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            broker,
            broker_mount,
            certs,
            volume_dir,
            _dir: dir,
        };
        cluster.start_app(0);
        let admin = cluster.certs.flags("admin");
        wait_for(
            "both nodes attached: the app and two node flushes",
            || {
                let doc = cli_json(&cluster.broker, &admin, &["writers", "--volume", "shared"]);
                let count = doc["volumes"][0]["writers"].as_array().map_or(0, Vec::len);
                (count == 3).then_some(())
            },
            || cluster.logs(),
        );
        cluster
    }

    /// The mmap application on node `i`, writing into its own directory of the volume.
    fn start_app(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let data = node.mount.mountpoint.join(&self.volume_dir).join("app");
        let mut command = Command::new(binary("quiesce-example-app-writer", "app-writer"));
        command
            .args([
                "--bus",
                &node.bus.address,
                "--id",
                "app",
                "--volume",
                "shared",
            ])
            .args(["--mmap", "--mmap-records", "200000"])
            .arg("--data")
            .arg(&data)
            .arg("--events")
            .arg(&node.app_events)
            .stdout(Stdio::piped());
        let mut app = Child::spawn(command, node.app_events.with_extension("log"));
        let mut line = String::new();
        BufReader::new(app.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("registered "),
            "app-writer did not register: {line:?}\n{}",
            app.log()
        );
        node.app = Some(app);
    }

    fn logs(&self) -> String {
        let mut text = format!("--- broker:\n{}", self.broker.process.log());
        for n in &self.nodes {
            text.push_str(&format!("--- host:\n{}", n.host.log()));
            if let Some(app) = &n.app {
                text.push_str(&format!("--- app:\n{}", app.log()));
            }
        }
        text
    }

    /// `quiesce snapshot create --volume shared --json` through node `i`'s host.
    fn create(&self, i: usize) -> (i32, Option<SetRecord>, String) {
        let output = Command::new(cli_exe())
            .args(["snapshot", "create", "--volume", "shared", "--json"])
            .args(["--bus", &self.nodes[i].bus.address])
            .env_remove("QUIESCE_BROKER")
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            serde_json::from_slice(&output.stdout).ok(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The last record node `i`'s application acknowledged at its last freeze.
    fn acknowledged(&self, i: usize) -> u64 {
        let text = std::fs::read_to_string(&self.nodes[i].app_events).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("frozen "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("the app was never frozen: {text}"))
    }

    /// The application's `records.map` as the snapshot holds it, read through the broker's
    /// own client (`snapshot.path` is on the broker's mount).
    fn snapshot_records(&self, record: &SetRecord) -> Vec<u8> {
        let snapshot = record.snapshot.as_ref().expect("a kept snapshot");
        assert!(
            Path::new(&snapshot.path).starts_with(&self.broker_mount.mountpoint),
            "{snapshot:?}"
        );
        std::fs::read(Path::new(&snapshot.path).join("app/records.map")).unwrap()
    }
}

fn start_node(
    dir: &Path,
    certs: &Certs,
    broker: &Broker,
    name: &str,
    mount: CephMount,
    flush: &str,
) -> Node {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let config = home.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "node = {name:?}\nhold_limit_ms = 20000\n\n[volumes.shared]\nmount = {:?}\nflush = {flush:?}\n",
            mount.mountpoint
        ),
    )
    .unwrap();
    let bus = Bus::start(Policy::Permissive);
    let mut command = Command::new(host_exe());
    command
        .arg("--config")
        .arg(&config)
        .args(["--bus", &bus.address, "--broker", &broker.url])
        .args(certs.flags(name))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let host = Child::spawn(command, home.join("host.log"));
    wait_log(&host, "serving on D-Bus");
    Node {
        app: None,
        host,
        bus,
        mount,
        app_events: home.join("app.events"),
    }
}

/// The acknowledged records (1..=`acknowledged`) that `map` lacks or holds wrong.
fn missing(map: &[u8], acknowledged: u64) -> Vec<u64> {
    (1..=acknowledged)
        .filter(|&seq| {
            let at = (seq as usize - 1) * RECORD_BYTES;
            let stored = map
                .get(at..at + RECORD_BYTES)
                .and_then(|r| std::str::from_utf8(r).ok())
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok());
            stored != Some(seq)
        })
        .collect()
}

/// One set of the cluster with node flush `flush`: (acknowledged, missing, the record).
fn one_set(tag: &str, flush: &str) -> (u64, Vec<u64>, SetRecord) {
    let cluster = Cluster::start(tag, flush);
    let data = cluster.nodes[0]
        .mount
        .mountpoint
        .join(&cluster.volume_dir)
        .join("app/records.map");
    // Read through node1's own mount, which holds the pages: the records are being stored.
    wait_for(
        "node1's application to store its first records",
        || {
            let map = std::fs::read(&data).ok()?;
            missing(&map, 100).is_empty().then_some(())
        },
        || cluster.logs(),
    );
    let (code, record, stderr) = cluster.create(1);
    let record =
        record.unwrap_or_else(|| panic!("no record (exit {code}): {stderr}\n{}", cluster.logs()));
    assert_eq!(code, 0, "{stderr}\n{record:#?}");
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
    let acknowledged = cluster.acknowledged(0);
    let map = cluster.snapshot_records(&record);
    (acknowledged, missing(&map, acknowledged), record)
}

#[test]
fn a_cephfs_snapshot_holds_every_mmap_record_a_node_acknowledged_only_with_the_node_flush() {
    // The negative control: no flush, and the records node1 acknowledged at its freeze are
    // not all in the snapshot (they were in node1's kernel, not in any Ceph client).
    let (acknowledged, lost, record) = one_set("noflush", "none");
    eprintln!(
        "flush = none: {} of {acknowledged} acknowledged records missing from the snapshot",
        lost.len()
    );
    assert!(
        !lost.is_empty(),
        "without the node flush every one of {acknowledged} mmap records reached the snapshot: the test cannot tell the flush works\n{record:#?}"
    );
    let flush = flush_writer(&record, "node1");
    assert_eq!(flush.reports["flush_mode"], "none", "the record says so");

    // The protection: the same set with the node flush.
    let (acknowledged, lost, record) = one_set("flush", "syncfs");
    assert!(
        lost.is_empty(),
        "with the node flush, {} of {acknowledged} acknowledged records are missing from the snapshot: {:?}…\n{record:#?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    for node in ["node1", "node2"] {
        let flush = flush_writer(&record, node);
        assert_eq!(flush.reports["flush_mode"], "syncfs");
        assert!(
            flush.call_us.contains_key("freeze"),
            "the flush's time is in the record: {flush:#?}"
        );
    }
    eprintln!(
        "flush = syncfs: all {acknowledged} acknowledged records in the snapshot; flush on node1 {} µs, freeze window {:?} ms",
        flush_writer(&record, "node1").call_us["freeze"],
        record.freeze_window_ms
    );
}

fn flush_writer<'a>(record: &'a SetRecord, node: &str) -> &'a quiesce_proto::WriterResult {
    record
        .writers
        .iter()
        .find(|w| w.writer.node == node && w.writer.writer == "flush.shared")
        .unwrap_or_else(|| panic!("no flush.shared of {node} in {record:#?}"))
}
