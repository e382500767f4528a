//! Cluster snapshot sets: one broker and three hosts as separate processes over one real btrfs
//! file system on a loop device. Each host has its own private dbus-daemon, a plugin writer
//! (`db`, from the `misbehave` test plugin, told per test where to fail or hang) and the example
//! application writer (`app`) registered over D-Bus, writing numbered records into its own
//! directory of the shared volume. Requests go the way backup software sends them: `quiesce
//! snapshot create` against the local host's bus, which forwards to the broker.

use crate::support::*;
use quiesce_proto::{Outcome, Phase, SetRecord};
use quiesce_testbed::{BtrfsVolume, Netns};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The backup tools' tests, on this file's cluster.
#[path = "backup.rs"]
mod backup;

/// The metrics endpoints and the broker's gRPC health, on this file's cluster.
#[path = "metrics.rs"]
mod metrics;

/// Long calls: a set started and followed, and cancelled, on this file's cluster.
#[path = "long_calls.rs"]
mod long_calls;

/// Each node's lease on a running set: the broker renews it every third.
const LEASE_MS: u64 = 1500;
/// Far above the lease, so a writer released in time was released by its lease, not by the
/// hold-limit watchdog.
const HOLD_LIMIT_MS: u64 = 20_000;
/// The broker drops a silent node after this long.
const HEARTBEAT_MS: u64 = 1500;
/// The broker's deadline for one provider operation.
const PROVIDER_MS: u64 = 5000;

/// How a node is set up.
#[derive(Clone, Copy, Default)]
struct Spec {
    /// More keys for the `db` writer of the misbehave plugin (`fail_in = "freeze"`, ...).
    db: &'static str,
    /// Run the host in a network namespace of its own, to cut its link.
    netns: bool,
    /// `--metrics-listen 127.0.0.1:0` for the host, and for the broker when any node has it.
    metrics: bool,
}

struct Node {
    name: String,
    host: Child,
    app: Child,
    bus: Bus,
    /// The misbehave plugin's calls: `db <call>` before, `db <call>-done` after success.
    events: PathBuf,
    /// The app writer's `frozen <ns> <seq>` / `thawed <ns>` lines.
    app_events: PathBuf,
    records: PathBuf,
    fifo: PathBuf,
    netns: Option<Netns>,
}

/// Fields drop in order: the nodes' processes first, then the broker, then the volume.
struct Cluster {
    nodes: Vec<Node>,
    broker: Broker,
    certs: Certs,
    volume: BtrfsVolume,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(specs: &[Spec]) -> Cluster {
        Cluster::start_with(specs, HEARTBEAT_MS)
    }

    /// With another heartbeat timeout (a node silent for longer than the lease but shorter than
    /// this stays attached).
    fn start_with(specs: &[Spec], heartbeat_ms: u64) -> Cluster {
        Cluster::start_full(specs, heartbeat_ms, None, |volume, _| {
            format!(
                "provider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n",
                volume.data, volume.snapshots
            )
        })
    }

    /// With the broker's `[volumes.shared]` table made by `provider` (from the volume and the
    /// test's directory).
    /// The catalog lives in the test's directory unless `catalog` names another file.
    fn start_full(
        specs: &[Spec],
        heartbeat_ms: u64,
        catalog: Option<PathBuf>,
        provider: impl FnOnce(&BtrfsVolume, &Path) -> String,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let volume = BtrfsVolume::create(256);
        let names: Vec<String> = (1..=specs.len()).map(|i| format!("node{i}")).collect();
        let mut netns: Vec<Option<Netns>> =
            specs.iter().map(|s| s.netns.then(Netns::create)).collect();
        let mut broker_hosts = vec!["127.0.0.1".to_string()];
        broker_hosts.extend(netns.iter().flatten().map(|n| n.outside_ip.clone()));
        let certs = Certs::make_for(
            &dir.path().join("certs"),
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
            &broker_hosts.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "catalog = {:?}\nhold_limit_ms = {HOLD_LIMIT_MS}\nlease_ms = {LEASE_MS}\n\n[timeouts]\nfreeze_ms = 10000\nabort_ms = 5000\nprovider_ms = {PROVIDER_MS}\n\n[volumes.shared]\n{}",
                catalog.unwrap_or_else(|| dir.path().join("catalog.sqlite")),
                provider(&volume, dir.path()),
            ),
        )
        .unwrap();
        let listen = if netns.iter().any(Option::is_some) {
            "0.0.0.0:0"
        } else {
            "127.0.0.1:0"
        };
        let mut extra = vec!["--config".into(), config.display().to_string()];
        if specs.iter().any(|s| s.metrics) {
            extra.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        }
        let broker = Broker::start_with(dir.path(), &certs, heartbeat_ms, listen, extra);
        let nodes: Vec<Node> = specs
            .iter()
            .zip(&names)
            .zip(netns.iter_mut())
            .map(|((spec, name), netns)| {
                start_node(
                    dir.path(),
                    &volume,
                    &certs,
                    &broker,
                    name,
                    spec,
                    netns.take(),
                )
            })
            .collect();
        let cluster = Cluster {
            nodes,
            broker,
            certs,
            volume,
            _dir: dir,
        };
        cluster.wait_attached(specs.len());
        cluster
    }

    /// Waits until the broker knows every node with both its writers.
    fn wait_attached(&self, nodes: usize) {
        let admin = self.certs.flags("admin");
        wait_for(
            "every node attached with its two writers",
            || {
                let doc = cli_json(&self.broker, &admin, &["writers", "--volume", "shared"]);
                let count = doc["volumes"][0]["writers"].as_array().map_or(0, Vec::len);
                (count == 2 * nodes).then_some(())
            },
            || self.logs(),
        );
    }

    fn logs(&self) -> String {
        let mut text = format!("--- broker:\n{}", self.broker.process.log());
        for n in &self.nodes {
            text.push_str(&format!(
                "--- {} host:\n{}--- {} app:\n{}",
                n.name,
                n.host.log(),
                n.name,
                n.app.log()
            ));
        }
        text
    }

    /// `quiesce snapshot create --volume shared --json` on node `i`, started.
    fn spawn_create(&self, i: usize) -> std::process::Child {
        self.nodes[i]
            .cli(&["snapshot", "create", "--volume", "shared", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The same, to its end: (exit code, the record when one was printed, stderr).
    fn create(&self, i: usize) -> (i32, Option<SetRecord>, String) {
        finish(self.spawn_create(i))
    }
}

fn start_node(
    dir: &Path,
    volume: &BtrfsVolume,
    certs: &Certs,
    broker: &Broker,
    name: &str,
    spec: &Spec,
    netns: Option<Netns>,
) -> Node {
    let home = dir.join(name);
    let plugins = home.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let lib = plugin("quiesce-test-plugin");
    std::fs::copy(&lib, plugins.join(lib.file_name().unwrap())).unwrap();
    let fifo = home.join("hang.fifo");
    quiesce_testbed::run(Command::new("mkfifo").arg(&fifo));
    let events = home.join("db.events");
    let config = home.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "node = {name:?}\nplugin_dir = {:?}\nhold_limit_ms = {HOLD_LIMIT_MS}\n\n[plugins.misbehave]\nevents = {:?}\n\n[[plugins.misbehave.writers]]\nid = \"db\"\nvolume = \"shared\"\nhang_fifo = {:?}\n{}\n",
            plugins.display().to_string(),
            events,
            fifo,
            spec.db
        ),
    )
    .unwrap();
    let bus = Bus::start(Policy::Permissive);
    let url = match &netns {
        Some(ns) => format!("https://{}:{}", ns.outside_ip, broker.port()),
        None => format!("https://127.0.0.1:{}", broker.port()),
    };
    let mut command = match &netns {
        Some(ns) => ns.command(host_exe()),
        None => Command::new(host_exe()),
    };
    command
        .arg("--config")
        .arg(&config)
        .args(["--bus", &bus.address, "--broker", &url])
        .args(certs.flags(name))
        .args(if spec.metrics {
            &["--metrics-listen", "127.0.0.1:0"][..]
        } else {
            &[]
        })
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let host = Child::spawn(command, home.join("host.log"));
    wait_log(&host, "serving on D-Bus");

    let data = volume.data.join(name);
    let app_events = home.join("app.events");
    let mut command = Command::new(binary("quiesce-example-app-writer", "app-writer"));
    command
        .args(["--bus", &bus.address, "--id", "app", "--volume", "shared"])
        .arg("--data")
        .arg(&data)
        .arg("--events")
        .arg(&app_events)
        .stdout(Stdio::piped());
    let mut app = Child::spawn(command, home.join("app.log"));
    let mut line = String::new();
    BufReader::new(app.child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("registered "),
        "{name}: app-writer did not register: {line:?}\n{}",
        app.log()
    );
    let records = data.join("records.log");
    wait_for(
        &format!("{name}: the app writes records"),
        || (!read(&records).is_empty()).then_some(()),
        || app.log(),
    );
    Node {
        name: name.into(),
        host,
        app,
        bus,
        events,
        app_events,
        records,
        fifo,
        netns,
    }
}

impl Node {
    fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(cli_exe());
        command
            .args(args)
            .args(["--bus", &self.bus.address])
            .env_remove("QUIESCE_BROKER");
        command
    }

    /// `quiesce ARGS --json` through this node's host, parsed; fails the test if it fails.
    fn cli_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let output = self.cli(args).arg("--json").output().unwrap();
        assert!(
            output.status.success(),
            "{}: quiesce {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: quiesce {args:?} printed no JSON ({e}): {}",
                self.name,
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// The misbehave writer's calls so far.
    fn calls(&self) -> Vec<String> {
        read(&self.events)
            .lines()
            .filter_map(|l| l.strip_prefix("db ").map(str::to_string))
            .collect()
    }

    fn called(&self, call: &str) -> bool {
        self.calls().iter().any(|c| c == call)
    }

    /// The app writer's freezes `(ns, last record)` and thaws `ns`.
    fn app_holds(&self) -> (Vec<(u128, u64)>, Vec<u128>) {
        app_holds(&self.app_events)
    }

    /// Whether the app writer is frozen now.
    fn app_frozen(&self) -> bool {
        app_frozen(&self.app_events)
    }

    /// Lets the misbehave writer's hanging call return.
    fn release_hang(&self) {
        assert!(
            quiesce_testbed::release_fifo(&self.fifo, DEADLINE),
            "no writer was hanging on {}",
            self.fifo.display()
        );
    }
}

/// The records `(seq, ns)` of an app writer's log.
fn records(path: &Path) -> Vec<(u64, u128)> {
    let text = read(path);
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a record is cut short in {}",
        path.display()
    );
    text.lines()
        .map(|l| {
            let mut parts = l.split_whitespace();
            (
                parts.next().unwrap().parse().unwrap(),
                parts.next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

fn failed(record: &SetRecord) -> (Phase, Option<(String, String)>, String) {
    match &record.outcome {
        Outcome::Failed {
            phase,
            writer,
            reason,
        } => (
            *phase,
            writer.as_ref().map(|w| (w.node.clone(), w.writer.clone())),
            reason.clone(),
        ),
        other => panic!("the set did not fail: {other}"),
    }
}

#[test]
fn a_snapshot_asked_for_on_node3_is_app_consistent_read_only_and_holds_what_every_writer_flushed() {
    let cluster = Cluster::start(&[Spec::default(); 3]);
    let admin = cluster.certs.flags("admin");
    let writers = cli_json(&cluster.broker, &admin, &["writers", "--volume", "shared"]);
    assert_eq!(
        writers["volumes"][0]["broker_provider"], "btrfs",
        "{writers:#}"
    );
    let (code, record, stderr) = cluster.create(2);
    let record =
        record.unwrap_or_else(|| panic!("no record ({code}): {stderr}\n{}", cluster.logs()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(record.outcome, Outcome::AppConsistent, "{}", cluster.logs());
    let writers: BTreeSet<(String, String)> = record
        .writers
        .iter()
        .map(|w| (w.writer.node.clone(), w.writer.writer.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = ["node1", "node2", "node3"]
        .iter()
        .flat_map(|n| [(n.to_string(), "app".into()), (n.to_string(), "db".into())])
        .collect();
    assert_eq!(writers, expected, "every writer of every node took part");
    assert!(record.writers.iter().all(|w| w.failure.is_none()));
    assert!(record.freeze_window_ms.is_some() && record.provider_ms.is_some());

    let snapshot = record
        .snapshot
        .clone()
        .expect("an app-consistent set keeps its snapshot");
    let path = PathBuf::from(&snapshot.path);
    assert_eq!(snapshot.provider, "btrfs");
    assert!(
        BtrfsVolume::is_read_only(&path),
        "{} is read-only",
        path.display()
    );

    for node in &cluster.nodes {
        // Each application's records in the snapshot end exactly at the record it reported when
        // it froze, none cut short, and match what it wrote.
        let (frozen, thawed) = node.app_holds();
        assert_eq!(
            (frozen.len(), thawed.len()),
            (1, 1),
            "{}: one freeze, one thaw",
            node.name
        );
        let last = frozen[0].1;
        let snapped = records(&path.join(&node.name).join("records.log"));
        assert_eq!(snapped.last().map(|r| r.0), Some(last), "{}", node.name);
        let live = records(&node.records);
        assert_eq!(snapped[..], live[..snapped.len()], "{}", node.name);
        // The plugin writer was frozen and thawed.
        let calls = node.calls();
        assert!(
            calls.contains(&"freeze-done".into()) && calls.contains(&"thaw-done".into()),
            "{}: {calls:?}",
            node.name
        );
    }

    // Post-snapshot ran on the writable snapshot before it was made read-only (the app writers
    // write their label at the snapshot's root, so the last one's is there).
    let label = read(&path.join("app-writer.label"));
    assert!(
        label.contains(&record.id.0),
        "post-snapshot label {label:?}"
    );

    // The catalog, asked through other nodes' hosts.
    let shown: SetRecord = cluster.nodes[0].cli_json(&["snapshot", "show", &record.id.0]);
    assert_eq!(shown, record);
    let listed: Vec<SetRecord> = cluster.nodes[1].cli_json(&["snapshot", "list"]);
    assert_eq!(listed, vec![record.clone()]);
    let deleted: SetRecord = cluster.nodes[0].cli_json(&["snapshot", "delete", &record.id.0]);
    assert!(deleted.deleted_unix_ms.is_some());
    assert!(!path.exists(), "the snapshot is gone");
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
}

/// The writer panics (under `RUST_BACKTRACE=1` when the suite runs so): the record says
/// `panicked`, in the requester's answer and in `quiesce snapshot show --json` on another node.
#[test]
fn a_writer_panicking_in_freeze_on_node2_aborts_the_set_everywhere_and_leaves_no_snapshot() {
    let cluster = Cluster::start(&[
        Spec::default(),
        Spec {
            db: "panic_in = \"freeze\"",
            ..Spec::default()
        },
        Spec::default(),
    ]);
    let (code, record, stderr) = cluster.create(2);
    let record = record.unwrap_or_else(|| panic!("no record ({code}): {stderr}"));
    assert_eq!(code, 2, "a failed set exits 2");
    let (phase, writer, reason) = failed(&record);
    assert_eq!(phase, Phase::Freeze);
    assert_eq!(writer, Some(("node2".into(), "db".into())));
    assert!(reason.contains("told to panic in freeze"), "{reason}");
    let shown: SetRecord = cluster.nodes[0].cli_json(&["snapshot", "show", &record.id.0]);
    let db = shown
        .writers
        .iter()
        .find(|w| w.writer.node == "node2" && w.writer.writer == "db")
        .unwrap();
    assert_eq!(
        db.failure.as_ref().map(|f| f.kind),
        Some(quiesce_proto::FailureKind::Panicked),
        "{shown:#?}"
    );
    for node in &cluster.nodes {
        assert!(
            !node.app_frozen(),
            "{}: the app writer is released",
            node.name
        );
        let calls = node.calls();
        if calls.contains(&"freeze-done".into()) {
            assert!(
                calls.contains(&"abort-done".into()),
                "{}: frozen, so aborted: {calls:?}",
                node.name
            );
        }
    }
    assert_eq!(
        cluster.volume.snapshot_list(),
        Vec::<PathBuf>::new(),
        "no snapshot remains"
    );
}

/// Waits until every node's writers that froze in the set are released, and returns when.
fn wait_released(cluster: &Cluster, nodes: &[usize], what: &str) {
    wait_for(
        what,
        || {
            nodes
                .iter()
                .all(|&i| {
                    let n = &cluster.nodes[i];
                    !n.app_frozen() && (!n.called("freeze-done") || n.called("abort-done"))
                })
                .then_some(())
        },
        || cluster.logs(),
    );
}

/// Asserts that each app writer of `nodes` was held no longer than the lease (plus one second
/// for scheduling) after `fault_ns`.
fn assert_released_within_the_lease(cluster: &Cluster, nodes: &[usize], fault_ns: u128) {
    for &i in nodes {
        let node = &cluster.nodes[i];
        let (frozen, thawed) = node.app_holds();
        let (frozen_ns, _) = *frozen.last().unwrap();
        let thawed_ns = *thawed.last().unwrap();
        assert!(
            thawed_ns > fault_ns,
            "{}: released after the fault",
            node.name
        );
        let after_fault_ms = (thawed_ns - fault_ns) / 1_000_000;
        assert!(
            after_fault_ms <= (LEASE_MS + 1000) as u128,
            "{}: released {after_fault_ms} ms after the fault; the lease is {LEASE_MS} ms",
            node.name
        );
        assert!(
            (thawed_ns - frozen_ns) / 1_000_000 < HOLD_LIMIT_MS as u128,
            "{}: released by its lease, before the hold limit",
            node.name
        );
        let calls = node.calls();
        if calls.contains(&"freeze-done".into()) {
            assert!(
                calls.contains(&"abort".into()) && !calls.contains(&"thaw".into()),
                "{}: the lease aborted the plugin writer (not the watchdog's thaw): {calls:?}",
                node.name
            );
        }
    }
}

#[test]
fn the_broker_killed_mid_freeze_leaves_no_writer_frozen_past_the_lease_and_its_restart_records_the_set_failed(
) {
    let hang = Spec {
        db: "hang_in = \"freeze\"",
        ..Spec::default()
    };
    let mut cluster = Cluster::start(&[Spec::default(), hang, Spec::default()]);
    let create = cluster.spawn_create(2);
    // Mid-freeze: every app writer frozen, node1's and node3's db frozen, node2's db hanging.
    wait_for(
        "the set to be mid-freeze",
        || {
            let n = &cluster.nodes;
            (n.iter().all(Node::app_frozen)
                && n[0].called("freeze-done")
                && n[2].called("freeze-done")
                && n[1].called("freeze"))
            .then_some(())
        },
        || cluster.logs(),
    );
    let killed_ns = now_ns();
    cluster.broker.process.kill();
    wait_released(
        &cluster,
        &[0, 1, 2],
        "every frozen writer released after the broker died",
    );
    assert_released_within_the_lease(&cluster, &[0, 1, 2], killed_ns);
    // The writer that hung in freeze gets its abort as soon as it returns.
    cluster.nodes[1].release_hang();
    wait_for(
        "node2's db aborted once its freeze returned",
        || cluster.nodes[1].called("abort-done").then_some(()),
        || cluster.logs(),
    );
    let (code, _, stderr) = finish(create);
    assert_eq!(
        code, 69,
        "EX_UNAVAILABLE: the request could not be answered: {stderr}"
    );
    // The documented error for a broker gone mid-call, not a failure of the broker.
    assert!(
        stderr.contains("BrokerUnreachable") || stderr.contains("cannot reach the broker"),
        "{stderr}"
    );

    cluster.broker.start_again();
    let listed: Vec<SetRecord> = cluster.nodes[0].cli_json(&["snapshot", "list"]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (phase, writer, reason) = failed(&listed[0]);
    assert_eq!(phase, Phase::Freeze);
    assert_eq!(writer, None);
    assert!(
        reason.contains("the broker stopped during the set"),
        "{reason}"
    );
    assert!(listed[0].snapshot.is_none());
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
}

#[test]
fn a_node_cut_off_mid_freeze_releases_its_writers_at_the_lease_and_the_set_fails_naming_it() {
    let cluster = Cluster::start(&[
        Spec {
            db: "hang_in = \"freeze\"",
            ..Spec::default()
        },
        Spec {
            netns: true,
            ..Spec::default()
        },
        Spec::default(),
    ]);
    let create = cluster.spawn_create(2);
    wait_for(
        "node2 frozen while node1's db hangs in freeze",
        || {
            let n = &cluster.nodes;
            (n[1].app_frozen() && n[1].called("freeze-done") && n[0].called("freeze")).then_some(())
        },
        || cluster.logs(),
    );
    let cut_ns = now_ns();
    cluster.nodes[1].netns.as_ref().unwrap().cut();
    wait_released(
        &cluster,
        &[1],
        "node2's writers released after its link was cut",
    );
    assert_released_within_the_lease(&cluster, &[1], cut_ns);

    cluster.nodes[0].release_hang();
    let (code, record, stderr) = finish(create);
    let record = record.unwrap_or_else(|| panic!("no record ({code}): {stderr}"));
    assert_eq!(code, 2);
    let (_, writer, reason) = failed(&record);
    let (node, _) = writer.expect("the failure names a writer");
    assert_eq!(node, "node2");
    assert!(reason.contains("node node2 left the cluster"), "{reason}");
    wait_released(&cluster, &[0, 2], "the other nodes' writers released");
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());

    // The node comes back when its link does.
    cluster.nodes[1].netns.as_ref().unwrap().restore();
    cluster.wait_attached(3);
}

#[test]
fn a_broker_killed_after_taking_the_snapshot_deletes_it_when_it_restarts() {
    let mut cluster = Cluster::start(&[Spec {
        db: "needs_post_snapshot = true\nhang_in = \"post-snapshot\"",
        ..Spec::default()
    }]);
    let create = cluster.spawn_create(0);
    wait_for(
        "the set to hang in post-snapshot",
        || cluster.nodes[0].called("post-snapshot").then_some(()),
        || cluster.logs(),
    );
    assert_eq!(
        cluster.volume.snapshot_list().len(),
        1,
        "the snapshot was taken"
    );
    cluster.broker.process.kill();
    let (code, _, _) = finish(create);
    assert_eq!(code, 69, "EX_UNAVAILABLE: the broker went away mid-set");
    cluster.broker.start_again();
    let listed: Vec<SetRecord> = cluster.nodes[0].cli_json(&["snapshot", "list"]);
    let (phase, _, reason) = failed(&listed[0]);
    // The record's phase is the catalog's last checkpoint, written off the critical path: a
    // kill right after post-snapshot began may find thaw's the last one written.
    assert!(
        matches!(phase, Phase::Thaw | Phase::PostSnapshot),
        "failed in {phase}"
    );
    assert!(reason.contains("deleted its snapshot"), "{reason}");
    assert_eq!(
        cluster.volume.snapshot_list(),
        Vec::<PathBuf>::new(),
        "the restarted broker deleted the abandoned snapshot"
    );
    cluster.nodes[0].release_hang();
    wait_for(
        "the hung writer aborted (its lease lapsed) once it returned",
        || cluster.nodes[0].called("abort-done").then_some(()),
        || cluster.logs(),
    );
}

/// Issue 12, first finding: a stall longer than the lease but shorter than the hold limit
/// during the freeze. The broker SIGSTOPped mid-freeze: every node's lease lapses and it
/// releases its writers on its own; when the broker goes on, its late thaws must not be taken
/// as proof that the writers stayed frozen. The set fails and keeps no snapshot (before the
/// fix it ended app-consistent with records written after the freeze point in the snapshot).
/// The pause also outlasts the heartbeat timeout: the nodes' heartbeats sent meanwhile wait
/// unread, and a broker that runs again must not drop the nodes for its own stall ("no
/// heartbeat"); the hosts, which heard nothing from it, reconnect on their own.
#[test]
fn a_broker_paused_longer_than_the_lease_mid_freeze_never_records_the_set_app_consistent() {
    let hang = Spec {
        db: "hang_in = \"freeze\"",
        ..Spec::default()
    };
    let cluster = Cluster::start(&[Spec::default(), hang, Spec::default()]);
    let create = cluster.spawn_create(2);
    wait_for(
        "the set to be mid-freeze",
        || {
            let n = &cluster.nodes;
            (n.iter().all(Node::app_frozen)
                && n[0].called("freeze-done")
                && n[2].called("freeze-done")
                && n[1].called("freeze"))
            .then_some(())
        },
        || cluster.logs(),
    );
    let paused_ns = now_ns();
    cluster.broker.process.signal("STOP");
    wait_released(
        &cluster,
        &[0, 2],
        "node1's and node3's writers released by their leases while the broker is paused",
    );
    assert_released_within_the_lease(&cluster, &[0, 2], paused_ns);
    // Paused for twice the heartbeat timeout in all: the length of the fault, not a wait for
    // anything.
    let paused_for = Duration::from_nanos((now_ns() - paused_ns) as u64);
    std::thread::sleep((2 * Duration::from_millis(HEARTBEAT_MS)).saturating_sub(paused_for));
    cluster.broker.process.signal("CONT");
    cluster.nodes[1].release_hang();
    let (code, record, stderr) = finish(create);
    let record =
        record.unwrap_or_else(|| panic!("no record ({code}): {stderr}\n{}", cluster.logs()));
    assert_eq!(code, 2, "a failed set exits 2: {}", cluster.logs());
    let (_, _, reason) = failed(&record);
    assert!(
        reason.contains("not renewed") || reason.contains("lease on set"),
        "the failure says the leases lapsed: {reason}"
    );
    assert!(
        !reason.contains("left the cluster"),
        "the broker's own stall is not blamed on a node: {reason}"
    );
    let log = cluster.broker.process.log();
    assert!(
        !log.contains("no heartbeat for"),
        "the broker dropped nodes for heartbeats it did not read while paused:\n{log}"
    );
    assert!(record.snapshot.is_none());
    wait_released(&cluster, &[0, 1, 2], "every writer released");
    assert_eq!(
        cluster.volume.snapshot_list(),
        Vec::<PathBuf>::new(),
        "no snapshot is kept"
    );
}

/// The same finding from the node's side: all of node2's packets dropped for longer than the
/// lease (its link stays up: shorter than the heartbeat timeout, so it never leaves the
/// cluster). Node2's lease lapses and it releases its writers; the broker's thaw reaches it
/// late, and node2 answers it `lost` instead of "thawed". The set fails naming node2.
#[test]
fn a_node_silent_longer_than_the_lease_answers_its_late_thaw_lost_and_the_set_fails_naming_it() {
    let cluster = Cluster::start_with(
        &[
            Spec {
                db: "hang_in = \"freeze\"",
                ..Spec::default()
            },
            Spec {
                netns: true,
                ..Spec::default()
            },
            Spec::default(),
        ],
        8 * LEASE_MS,
    );
    let create = cluster.spawn_create(2);
    wait_for(
        "node2 frozen while node1's db hangs in freeze",
        || {
            let n = &cluster.nodes;
            (n[1].app_frozen() && n[1].called("freeze-done") && n[0].called("freeze")).then_some(())
        },
        || cluster.logs(),
    );
    let netns = cluster.nodes[1].netns.as_ref().unwrap();
    let silent_ns = now_ns();
    netns.drop_packets();
    wait_released(
        &cluster,
        &[1],
        "node2's writers released by its lease while its packets are dropped",
    );
    assert_released_within_the_lease(&cluster, &[1], silent_ns);
    netns.pass_packets();
    cluster.nodes[0].release_hang();
    let (code, record, stderr) = finish(create);
    let record =
        record.unwrap_or_else(|| panic!("no record ({code}): {stderr}\n{}", cluster.logs()));
    assert_eq!(code, 2, "{}", cluster.logs());
    let (_, writer, reason) = failed(&record);
    let (node, _) = writer.expect("the failure names node2's writer");
    assert_eq!(node, "node2", "{reason}");
    assert!(reason.contains("lease on set"), "{reason}");
    let node2_db = record
        .writers
        .iter()
        .find(|w| w.writer.node == "node2" && w.writer.writer == "db")
        .unwrap();
    assert_eq!(
        node2_db.failure.as_ref().map(|f| f.kind),
        Some(quiesce_proto::FailureKind::Lost)
    );
    assert!(record.snapshot.is_none());
    let shown: SetRecord = cluster.nodes[2].cli_json(&["snapshot", "show", &record.id.0]);
    assert_eq!(
        shown
            .writers
            .iter()
            .find(|w| w.writer == node2_db.writer)
            .and_then(|w| w.failure.as_ref())
            .map(|f| f.kind),
        Some(quiesce_proto::FailureKind::Lost),
        "quiesce snapshot show --json says lost too: {shown:#?}"
    );
    wait_released(&cluster, &[0, 1, 2], "every writer released");
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
    // node2 never left: the link held through the silence.
    let listed: Vec<SetRecord> = cluster.nodes[1].cli_json(&["snapshot", "list"]);
    assert_eq!(listed.len(), 1);
}

/// Issue 12, sixth finding: thaw has no barrier across nodes. Node2's plugin writer hangs in
/// thaw; the other nodes' front-end writers are thawed as soon as their own back end is, without
/// waiting for node2 (before, every front end waited for node2 until the hold limit).
#[test]
fn a_node_slow_to_thaw_holds_no_other_node_frozen() {
    let cluster = Cluster::start(&[
        Spec::default(),
        Spec {
            db: "hang_in = \"thaw\"",
            ..Spec::default()
        },
        Spec::default(),
    ]);
    let create = cluster.spawn_create(2);
    wait_for(
        "node2's db to hang in thaw",
        || cluster.nodes[1].called("thaw").then_some(()),
        || cluster.logs(),
    );
    // Node1's and node3's app writers (front end) are released while node2 still hangs (before,
    // they waited until node2's thaw answered or timed out, and then the set failed).
    wait_for(
        "node1's and node3's app writers thawed",
        || (!cluster.nodes[0].app_frozen() && !cluster.nodes[2].app_frozen()).then_some(()),
        || cluster.logs(),
    );
    assert!(
        cluster.nodes[1].app_frozen() && !cluster.nodes[1].called("thaw-done"),
        "node2 still hangs in thaw, its front end waiting for its own back end"
    );
    cluster.nodes[1].release_hang();
    let (code, record, stderr) = finish(create);
    let record = record.unwrap_or_else(|| panic!("no record ({code}): {stderr}"));
    assert_eq!(record.outcome, Outcome::AppConsistent, "{}", cluster.logs());
    assert_eq!(code, 0);
}

/// Issue 12, third finding: the broker `kill -9`ed while a `command` provider's `take` runs,
/// outside systemd (nothing kills the provider's process group). The program dies with the
/// broker (PR_SET_PDEATHSIG), but what it started lives on — here a subshell that creates the
/// snapshot two seconds later. The restarted broker records the set failed at once, waits out
/// the provider's deadline, then finds the orphan's snapshot and deletes it (before, it found
/// nothing at start, and the snapshot stayed on disk, unrecorded).
#[test]
fn a_provider_orphaned_by_a_killed_broker_leaves_no_snapshot_behind() {
    let mut script = None;
    let mut cluster = Cluster::start_full(&[Spec::default()], HEARTBEAT_MS, None, |volume, dir| {
        let program = dir.join("provider.sh");
        let snapshots = volume.snapshots.join("command");
        std::fs::create_dir_all(&snapshots).unwrap();
        std::fs::write(
            &program,
            format!(
                r#"#!/bin/bash
set -eu
snaps={snaps:?}
case "$1" in
  take)
    # A child the program leaves behind: it outlives the program, and makes the snapshot.
    ( sleep 2; mkdir -p "$snaps/$QUIESCE_SET_ID"; touch {made:?} ) &
    touch {started:?}
    wait
    echo "{{\"id\": \"$QUIESCE_SET_ID\", \"path\": \"$snaps/$QUIESCE_SET_ID\"}}" ;;
  find)
    if [ -d "$snaps/$QUIESCE_SET_ID" ]; then
      echo "{{\"id\": \"$QUIESCE_SET_ID\", \"path\": \"$snaps/$QUIESCE_SET_ID\"}}"
    fi ;;
  delete) rm -rf "$QUIESCE_SNAPSHOT_PATH" ;;
  finalize) ;;
esac
"#,
                snaps = snapshots,
                started = dir.join("take.started"),
                made = dir.join("take.made"),
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        script = Some((dir.to_path_buf(), snapshots));
        format!("provider = \"command\"\nprogram = {program:?}\ntimeout_ms = 4000\n")
    });
    let (dir, snapshots) = script.unwrap();
    let create = cluster.spawn_create(0);
    wait_for(
        "the provider's take to start",
        || dir.join("take.started").exists().then_some(()),
        || cluster.logs(),
    );
    cluster.broker.process.kill();
    let (code, _, _) = finish(create);
    assert_eq!(code, 69, "EX_UNAVAILABLE: the broker went away mid-set");
    cluster.broker.start_again();
    let listed: Vec<SetRecord> = cluster.nodes[0].cli_json(&["snapshot", "list"]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0].id.0.clone();
    let (phase, _, _) = failed(&listed[0]);
    assert_eq!(phase, Phase::Snapshot);
    assert!(
        listed[0]
            .cleanup_error
            .as_deref()
            .is_some_and(|e| e.contains("pending")),
        "{:?}",
        listed[0].cleanup_error
    );
    // The orphan makes its snapshot after the restart...
    wait_for(
        "the orphaned child to make its snapshot",
        || dir.join("take.made").exists().then_some(()),
        || cluster.logs(),
    );
    // ...and the broker deletes it once the provider's deadline has passed.
    wait_for(
        "the restarted broker to clean up after the provider's deadline",
        || {
            let shown: SetRecord = cluster.nodes[0].cli_json(&["snapshot", "show", &id]);
            shown.cleanup_error.is_none().then_some(shown)
        },
        || cluster.logs(),
    );
    assert!(
        !snapshots.join(&id).exists(),
        "the orphan's snapshot is deleted"
    );
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        quiesce_testbed::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&at),
        );
        Tmpfs(at)
    }

    /// Fills what is left of it; returns the filler file.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0xa5u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", self.0.display()),
            }
        }
        // Single bytes, for the last partial block.
        while file.write(&[0]).is_ok_and(|n| n == 1) {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Issue 12, second finding: the catalog's disk fills up during a set. The set cannot write its
/// final record, so it does not answer success: it answers failed, saying why and what to do,
/// and its snapshot is deleted (before, the requester got app-consistent and a path, the
/// catalog still said "running", and the restarted broker deleted that snapshot unannounced).
#[test]
fn a_set_whose_record_cannot_be_written_answers_failed_and_keeps_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(dir.path().join("catalogfs"), "4m");
    let catalog = fs.0.join("catalog.sqlite");
    let mut cluster = Cluster::start_full(
        &[Spec {
            db: "hang_in = \"freeze\"",
            ..Spec::default()
        }],
        HEARTBEAT_MS,
        Some(catalog),
        |volume, _| {
            format!(
                "provider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n",
                volume.data, volume.snapshots
            )
        },
    );
    let create = cluster.spawn_create(0);
    wait_for(
        "the set mid-freeze",
        || cluster.nodes[0].called("freeze").then_some(()),
        || cluster.logs(),
    );
    let filler = fs.fill();
    cluster.nodes[0].release_hang();
    let (code, record, stderr) = finish(create);
    let record =
        record.unwrap_or_else(|| panic!("no record ({code}): {stderr}\n{}", cluster.logs()));
    assert_eq!(code, 2, "a set without its record is not a success");
    let (phase, _, reason) = failed(&record);
    assert_eq!(phase, Phase::Complete);
    assert!(
        reason.contains("could not be written to the catalog")
            && reason.contains("disk holding the catalog is full"),
        "{reason}"
    );
    assert!(record.snapshot.is_none());
    assert_eq!(
        cluster.volume.snapshot_list(),
        Vec::<PathBuf>::new(),
        "the snapshot nobody could record is deleted"
    );
    // Space again; a restarted broker has the set on record as failed, and no snapshot.
    std::fs::remove_file(filler).unwrap();
    cluster.broker.process.kill();
    cluster.broker.start_again();
    let listed: Vec<SetRecord> = cluster.nodes[0].cli_json(&["snapshot", "list"]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].outcome.is_failed());
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
}

/// A synthetic ended record of `writers` writers (one failed, when `failed`).
fn synthetic_record(id: &str, writers: usize, failed: bool) -> SetRecord {
    use quiesce_proto::{
        ComponentKind, Level, SetId, SetRequest, WriterMetadata, WriterRef, WriterResult,
        WriterState,
    };
    SetRecord {
        id: SetId(id.into()),
        request: SetRequest {
            volumes: vec!["shared".into()],
            best_effort: false,
        },
        epoch: 3,
        outcome: Outcome::AppConsistent,
        writers: (0..writers)
            .map(|i| {
                let w = format!("w{}", i % 8);
                WriterResult {
                    writer: WriterRef::new(format!("node{}", i / 8), &w),
                    metadata: WriterMetadata::new(&w, "a database", Level::BackEnd).with_component(
                        "data",
                        ComponentKind::Database,
                        "shared",
                        [format!("/srv/db/{i}")],
                    ),
                    state: WriterState::Thawed,
                    failure: (failed && i == writers - 1).then(|| quiesce_proto::WriterFailure {
                        phase: Phase::PostSnapshot,
                        kind: quiesce_proto::FailureKind::Error,
                        reason: "the last one failed".into(),
                    }),
                    excluded: false,
                    reports: [("lsn".to_string(), format!("0/{i:08X}"))].into(),
                    call_us: [("freeze".to_string(), 1000u64)].into(),
                }
            })
            .collect(),
        snapshot: None,
        phases: vec![],
        freeze_window_ms: Some(10),
        provider_ms: Some(5),
        cleanup_error: None,
        total_ms: 100,
        deleted_unix_ms: None,
        deleted_because: None,
        started_unix_ms: None,
        lease_until_unix_ms: None,
        requester: None,
        writers_omitted: 0,
    }
}

/// Issue 12, fourth finding, at ten times today's failure points: `quiesce snapshot list` died
/// for good past 4 MiB of records (about 1,500 sets of a 4-writer cluster, or 5 sets of 256
/// nodes × 8 writers). Here a catalog of 15,000 four-writer sets (about 40 MiB), sets of 2,048
/// writers and one of 20,480 writers (ten times the 256 × 8 cluster), plus one unreadable row: `list` pages through all of them (the big
/// records compacted, every one of their failures kept), skips and reports the bad row, and
/// `show --json` gives the 20,480 writers whole, page by page.
#[test]
fn thousands_of_records_and_records_of_thousands_of_writers_list_and_show_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("big.sqlite");
    drop(quiesce_broker::catalog::Catalog::open(&catalog).unwrap());
    let conn = rusqlite::Connection::open(&catalog).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    let mut insert = conn
        .prepare("INSERT INTO sets (id, started_unix_ms, state, record_json) VALUES (?1, ?2, 'ended', ?3)")
        .unwrap();
    let mut n = 0i64;
    let mut add = |record: &SetRecord| {
        n += 1;
        insert
            .execute(rusqlite::params![
                record.id.0,
                n,
                serde_json::to_string(record).unwrap()
            ])
            .unwrap();
    };
    for i in 0..15_000 {
        add(&synthetic_record(&format!("set-small-{i:05}"), 4, false));
    }
    for i in 0..2 {
        add(&synthetic_record(&format!("set-wide-{i:02}"), 2_048, true));
    }
    add(&synthetic_record("set-widest", 20_480, true));
    insert
        .execute(rusqlite::params!["set-garbled", n + 1, "{not a record"])
        .unwrap();
    drop(insert);
    conn.execute_batch("COMMIT").unwrap();
    drop(conn);

    let cluster = Cluster::start_full(
        &[Spec::default()],
        HEARTBEAT_MS,
        Some(catalog),
        |volume, _| {
            format!(
                "provider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n",
                volume.data, volume.snapshots
            )
        },
    );
    let output = cluster.nodes[0]
        .cli(&["snapshot", "list", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped a catalog row") && stderr.contains("set-garbled"),
        "the unreadable row is reported: {stderr}"
    );
    let listed: Vec<SetRecord> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed.len(), 15_003);
    assert_eq!(listed[0].id.0, "set-small-00000");
    assert_eq!(listed[15_000].id.0, "set-wide-00");
    assert_eq!(listed[15_000].writers.len(), 2_048, "under 1 MiB: whole");
    let widest = &listed[15_002];
    assert_eq!(widest.id.0, "set-widest");
    assert!(
        widest.writers_omitted > 0,
        "a 20,480-writer record comes compacted"
    );
    assert_eq!(widest.writers.len() as u64 + widest.writers_omitted, 20_480);
    assert!(
        widest.writers.iter().any(|w| w.failure.is_some()),
        "its failure is kept"
    );

    let whole: SetRecord = cluster.nodes[0].cli_json(&["snapshot", "show", "set-widest"]);
    assert_eq!(whole.writers.len(), 20_480);
    assert_eq!(whole.writers_omitted, 0);
    assert_eq!(whole, synthetic_record("set-widest", 20_480, true));
    // Without --json: the table, the failure, and how many more there are.
    let output = cluster.nodes[0]
        .cli(&["snapshot", "show", "set-widest"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        text.contains("the last one failed") && text.contains("more writers"),
        "{text}"
    );
}

/// `quiesce ARGS` on node `i`, to its end: (exit code, stdout, stderr).
fn run_cli(node: &Node, args: &[&str]) -> (i32, String, String) {
    let output = node.cli(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `quiesce snapshot create --volume shared --json ARGS` on `node`: the record of a set that
/// kept a snapshot.
fn create_kept(node: &Node, args: &[&str]) -> SetRecord {
    let mut all = vec!["snapshot", "create", "--volume", "shared", "--json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_cli(node, &all);
    assert_eq!(code, 0, "quiesce {all:?}: {stderr}");
    let record: SetRecord = serde_json::from_str(&stdout).unwrap();
    assert!(record.snapshot.is_some(), "{record:?}");
    record
}

fn show(node: &Node, id: &SetRecord) -> SetRecord {
    node.cli_json(&["snapshot", "show", &id.id.0])
}

fn snapshot_exists(record: &SetRecord) -> bool {
    Path::new(&record.snapshot.as_ref().unwrap().path).exists()
}

/// Issue 16: a requester's lease. A backup that dies (or forgets) leaks no snapshot: the broker
/// deletes it when its lease lapses. The negative controls: a snapshot taken `--keep`, and a
/// leased one renewed `--keep` before its lease lapsed, stay.
#[test]
fn a_leased_snapshot_is_deleted_when_its_lease_lapses_and_a_kept_or_renewed_one_stays() {
    let cluster = Cluster::start(&[Spec::default()]);
    let node = &cluster.nodes[0];
    let kept = create_kept(node, &["--keep"]);
    assert_eq!(kept.lease_until_unix_ms, None, "--keep: held until deleted");
    let renewed = create_kept(node, &["--lease", "4s"]);
    let until = renewed
        .lease_until_unix_ms
        .expect("a leased record says until when");
    let started = renewed
        .started_unix_ms
        .expect("a record says when it started");
    assert!(until > started, "{renewed:?}");
    let renewed_now: SetRecord = node.cli_json(&["snapshot", "renew", &renewed.id.0, "--keep"]);
    assert_eq!(renewed_now.lease_until_unix_ms, None);
    let shortened = create_kept(node, &["--keep"]);
    let _: SetRecord = node.cli_json(&["snapshot", "renew", &shortened.id.0, "--lease", "1s"]);
    // Taken after `renewed`, on the same lease: when its lease has lapsed, so had `renewed`'s
    // first one, and the reaper, which deletes every lapsed lease in one pass, deleted neither
    // or both had the renewal not held.
    let lapsing = create_kept(node, &["--lease", "4s"]);

    let deleted = wait_for(
        "the broker to delete the snapshot whose lease lapsed",
        || {
            let record = show(node, &lapsing);
            record.deleted_unix_ms.is_some().then_some(record)
        },
        || cluster.logs(),
    );
    assert_eq!(
        deleted.deleted_because,
        Some(quiesce_proto::Deletion::LeaseLapsed)
    );
    assert!(deleted.deleted_unix_ms.unwrap() >= lapsing.lease_until_unix_ms.unwrap());
    assert!(
        !snapshot_exists(&deleted),
        "the snapshot is gone from the volume"
    );
    let shortened = show(node, &shortened);
    assert_eq!(
        shortened.deleted_because,
        Some(quiesce_proto::Deletion::LeaseLapsed),
        "a renewal shortens a lease too: {shortened:?}"
    );
    for record in [&kept, &renewed] {
        let record = show(node, record);
        assert_eq!(record.deleted_unix_ms, None, "{record:?}");
        assert!(snapshot_exists(&record), "{record:?}");
    }
    assert_eq!(
        cluster.volume.snapshot_list().len(),
        2,
        "exactly the kept and the renewed snapshot remain"
    );

    // A deleted snapshot's lease cannot be renewed; deleting it again is not an error.
    let (code, _, stderr) = run_cli(node, &["snapshot", "renew", &lapsing.id.0]);
    assert_eq!(code, 1, "refused: {stderr}");
    assert!(
        stderr.contains("lease-lapsed"),
        "the reason is given: {stderr}"
    );
    let (code, _, stderr) = run_cli(node, &["snapshot", "delete", &lapsing.id.0]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = run_cli(node, &["snapshot", "list"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("(lease-lapsed)") && stdout.contains("until deleted"),
        "the list says how each snapshot is held: {stdout}"
    );
}

/// Issue 16: a backup tool killed (SIGKILL) while its set runs never renews nor deletes; the
/// snapshot its set keeps goes when the lease lapses. A second request while the set runs is
/// refused busy (75); an unknown volume or set is 66.
#[test]
fn a_requester_killed_mid_set_leaks_no_snapshot_and_refusals_exit_with_their_own_status() {
    let cluster = Cluster::start(&[Spec {
        db: "hang_in = \"freeze\"",
        ..Spec::default()
    }]);
    let node = &cluster.nodes[0];
    let mut create = node
        .cli(&["snapshot", "create", "--volume", "shared", "--lease", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the set to hang in freeze",
        || node.called("freeze").then_some(()),
        || cluster.logs(),
    );
    let (code, _, stderr) = run_cli(node, &["snapshot", "create", "--volume", "shared"]);
    assert_eq!(code, 75, "EX_TEMPFAIL while a set runs: {stderr}");
    create.kill().unwrap();
    create.wait().unwrap();
    node.release_hang();

    let record = wait_for(
        "the set to end and its snapshot's lease to lapse",
        || {
            let listed: Vec<SetRecord> = node.cli_json(&["snapshot", "list"]);
            listed
                .into_iter()
                .next()
                .filter(|r| r.deleted_unix_ms.is_some())
        },
        || cluster.logs(),
    );
    assert_eq!(record.outcome, Outcome::AppConsistent, "{record:?}");
    assert_eq!(
        record.deleted_because,
        Some(quiesce_proto::Deletion::LeaseLapsed)
    );
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());

    let (code, _, stderr) = run_cli(node, &["snapshot", "create", "--volume", "nowhere"]);
    assert_eq!(code, 66, "EX_NOINPUT for an unknown volume: {stderr}");
    let (code, _, stderr) = run_cli(node, &["snapshot", "show", "set-that-never-was"]);
    assert_eq!(code, 66, "EX_NOINPUT for an unknown set: {stderr}");
}

/// Issue 16: a best-effort set that went on without a failed writer is not a success a script
/// may mistake for app-consistent: it exits 3.
#[test]
fn a_best_effort_set_without_a_failed_writer_exits_crash_consistent() {
    let cluster = Cluster::start(&[Spec {
        db: "fail_in = \"freeze\"",
        ..Spec::default()
    }]);
    let node = &cluster.nodes[0];
    let (code, stdout, stderr) = run_cli(
        node,
        &[
            "snapshot",
            "create",
            "--volume",
            "shared",
            "--best-effort",
            "--keep",
            "--json",
        ],
    );
    assert_eq!(code, 3, "{stderr}");
    let record: SetRecord = serde_json::from_str(&stdout).unwrap();
    assert!(
        matches!(record.outcome, Outcome::CrashConsistent { .. }),
        "{record:?}"
    );
    assert!(snapshot_exists(&record));
    // The negative control: without --best-effort the same writer fails the set (2).
    let (code, _, stderr) = run_cli(
        node,
        &["snapshot", "create", "--volume", "shared", "--json"],
    );
    assert_eq!(code, 2, "{stderr}");
}

/// Issue 16: retention, the broker's and `quiesce snapshot prune`'s. Neither deletes a snapshot
/// a lease still holds; each deletes exactly what it says.
#[test]
fn retention_and_prune_keep_what_they_say_and_never_delete_a_held_snapshot() {
    let cluster = Cluster::start_full(&[Spec::default()], HEARTBEAT_MS, None, |volume, _| {
        format!(
            "provider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n\n[retention.shared]\nmax_kept = 3\n",
            volume.data, volume.snapshots
        )
    });
    let node = &cluster.nodes[0];
    let held_old = create_kept(node, &["--lease", "1h"]);
    let kept: Vec<SetRecord> = (0..4).map(|_| create_kept(node, &["--keep"])).collect();
    let held_new = create_kept(node, &["--lease", "1h"]);
    // Six kept, at most three: of those beyond the newest three, the unheld go and the held
    // one stays; the newest, held, counts among the three.
    let expected_gone = [kept[0].id.clone(), kept[1].id.clone()];
    wait_for(
        "retention to delete the two snapshots beyond the newest three that no lease holds",
        || (cluster.volume.snapshot_list().len() == 4).then_some(()),
        || cluster.logs(),
    );
    for record in kept.iter().chain([&held_old, &held_new]) {
        let now = show(node, record);
        let gone = expected_gone.contains(&record.id);
        assert_eq!(now.deleted_unix_ms.is_some(), gone, "{now:?}");
        if gone {
            assert_eq!(
                now.deleted_because,
                Some(quiesce_proto::Deletion::Retention)
            );
        }
        assert_eq!(snapshot_exists(&now), !gone);
    }

    // prune: keep the newest one; the older held snapshot stays whatever the rule.
    let (code, _, stderr) = run_cli(node, &["snapshot", "prune", "--volume", "shared"]);
    assert_eq!(code, 64, "no rule is a usage error: {stderr}");
    let plan: serde_json::Value = node.cli_json(&[
        "snapshot",
        "prune",
        "--volume",
        "shared",
        "--keep-last",
        "1",
        "--dry-run",
    ]);
    let ids = |key: &str| -> Vec<String> {
        plan[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids("kept"), vec![held_new.id.0.clone()]);
    assert_eq!(ids("held"), vec![held_old.id.0.clone()]);
    assert_eq!(
        ids("deleted"),
        vec![kept[2].id.0.clone(), kept[3].id.0.clone()]
    );
    assert_eq!(
        cluster.volume.snapshot_list().len(),
        4,
        "a dry run deletes nothing"
    );
    let done: serde_json::Value = node.cli_json(&[
        "snapshot",
        "prune",
        "--volume",
        "shared",
        "--keep-last",
        "1",
    ]);
    assert_eq!(done["deleted"], plan["deleted"]);
    assert_eq!(cluster.volume.snapshot_list().len(), 2);
    for (record, exists) in [
        (&kept[2], false),
        (&kept[3], false),
        (&held_old, true),
        (&held_new, true),
    ] {
        assert_eq!(
            snapshot_exists(&show(node, record)),
            exists,
            "{}",
            record.id.0
        );
    }
}

/// Issue 16: `create --timeout` gives up on a set that outlasts the requester's patience: a
/// writer hangs in freeze (its freeze deadline 10 s away), the set is aborted at the timeout,
/// fails saying so, exits 2 and keeps no snapshot. The control, the same set without
/// `--timeout`, fails only at the writer's own deadline, for it.
#[test]
fn create_with_a_timeout_aborts_a_set_that_outlasts_it_and_keeps_no_snapshot() {
    let cluster = Cluster::start(&[Spec {
        db: "hang_in = \"freeze\"",
        ..Spec::default()
    }]);
    let node = &cluster.nodes[0];
    let create = |options: &[&str]| {
        let output = node
            .cli(&["snapshot", "create", "--volume", "shared", "--json"])
            .args(options)
            .output()
            .unwrap();
        let record: SetRecord = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "no record ({e}): {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        // The hung freeze call ends at its deadline; let the plugin's thread go too.
        node.release_hang();
        (output.status.code(), record)
    };

    let (code, record) = create(&["--timeout", "1s"]);
    assert_eq!(code, Some(2), "a failed set: {record:?}");
    let (_, _, reason) = failed(&record);
    assert!(
        reason.contains("requester's timeout (1s)"),
        "the set failed for the timeout: {record:?}"
    );
    assert_eq!(record.snapshot, None);
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());

    let (code, control) = create(&[]);
    assert_eq!(code, Some(2), "{control:?}");
    let (_, writer, reason) = failed(&control);
    assert!(
        !reason.contains("timeout ("),
        "without --timeout, the writer's own deadline failed it: {control:?}"
    );
    assert_eq!(
        writer.map(|(_, w)| w),
        Some("db".to_string()),
        "{control:?}"
    );
}
