//! Cluster sets on a real CephFS (the test bed's Ceph cluster): every node has its own
//! `ceph-fuse` client, so its own cache, and the broker snapshots through a client of its own
//! with the `cephfs` provider (`mkdir .snap/SET`). The application on node1 stores its records
//! through a shared mapping and never syncs them (`app-writer --mmap`): acknowledged records
//! that sit dirty in node1's kernel. The backup is asked for on node2, which knows nothing of
//! node1's cache.
//!
//! The node flush (`[volumes.shared] mount`, `flush = "syncfs"`) is the protection; the same
//! set with `flush = "none"` is its negative control and must lose records.
//!
//! A cluster started with [`Options::cut_node1`] puts node1's host and its `ceph-fuse` client in
//! a network namespace of their own (the application and its bus stay in the test's: the bus is
//! a unix socket), so the test can cut node1's link mid-set; node2 then also serves the
//! `misbehave` plugin's `db` writer, whose freeze the test holds to put the cut mid-set.

use crate::support::*;
use quiesce_proto::{Outcome, Phase, SetRecord};
use quiesce_testbed::{CephCluster, CephMount, Netns};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The width of one record in `records.map` (`app-writer --mmap`).
const RECORD_BYTES: usize = 33;

/// Every writer's hold limit, the broker's and the hosts'.
const HOLD_LIMIT_MS: u64 = 20_000;
/// Each node's lease on a running set (the broker's default, said here because the test of a
/// node cut off counts on it being far below the hold limit).
const LEASE_MS: u64 = 5000;
/// How long a condition that depends on the cluster recovering from a cut may take on this
/// loaded machine: the lease, the heartbeat timeout, the host's reconnect backoff (up to 10 s)
/// and a ceph-fuse client finding its MDS and OSD again, with room to spare. A deadline about
/// whether it happens, not how fast.
const RECOVERY: Duration = Duration::from_secs(180);

/// How a cluster is started besides its node flush.
#[derive(Clone, Copy, Default)]
struct Options {
    /// node1's host and ceph-fuse client in a network namespace of their own (its link can be
    /// cut), the broker listening where that namespace reaches it; node2 with the misbehave
    /// plugin's `db` writer (see [`Db`]), to hold a set mid-freeze.
    cut_node1: bool,
}

/// The misbehave plugin's `db` writer (back-end level) of a node: its freeze hangs on `fifo`
/// while `control` says so.
struct Db {
    events: PathBuf,
    fifo: PathBuf,
    control: PathBuf,
}

/// Fields drop in order: processes before the mounts they use, the mount before the network
/// namespace its client's traffic goes through (its unmount flushes through it).
struct Node {
    name: String,
    app: Option<Child>,
    host: Child,
    bus: Bus,
    mount: CephMount,
    app_events: PathBuf,
    db: Option<Db>,
    netns: Option<Netns>,
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
        Cluster::start_with(tag, flush, Options::default())
    }

    /// The same, with `options`.
    fn start_with(tag: &str, flush: &str, options: Options) -> Cluster {
        let ceph = CephCluster::shared();
        let dir = tempfile::tempdir().unwrap();
        let names = ["node1", "node2"];
        let mut netns = options.cut_node1.then(Netns::create);
        // Inside its namespace node1 reaches the broker at the namespace's gateway, which the
        // broker's certificate must name too.
        let certs = match &netns {
            Some(ns) => Certs::make_for(
                &dir.path().join("certs"),
                &names,
                &["127.0.0.1", &ns.outside_ip],
            ),
            None => Certs::make(&dir.path().join("certs"), &names),
        };
        let volume_dir = format!("volume-{tag}-{}", std::process::id());
        let broker_mount = ceph.mount(
            None,
            &ceph.client_key(&format!("{tag}-broker"), "rws"),
            &ceph.mountpoint(&format!("{tag}-broker")),
        );
        std::fs::create_dir(broker_mount.mountpoint.join(&volume_dir)).unwrap();
        // A set held mid-freeze (the cut) must not fail at the freeze deadline (5 s by
        // default) before the broker notices the node gone: a deadline just below the hold limit.
        let held = if options.cut_node1 {
            format!(
                "lease_ms = {LEASE_MS}\n\n[timeouts]\nfreeze_ms = {}\n",
                HOLD_LIMIT_MS - 1000
            )
        } else {
            String::new()
        };
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "catalog = {:?}\nhold_limit_ms = {HOLD_LIMIT_MS}\n{held}\n[volumes.shared]\nprovider = \"cephfs\"\ndirectory = {:?}\n",
                dir.path().join("catalog.sqlite"),
                broker_mount.mountpoint.join(&volume_dir),
            ),
        )
        .unwrap();
        let listen = if netns.is_some() {
            "0.0.0.0:0"
        } else {
            "127.0.0.1:0"
        };
        let broker = Broker::start_with(
            dir.path(),
            &certs,
            3000,
            listen,
            vec!["--config".into(), config.display().to_string()],
        );
        let nodes = names
            .iter()
            .map(|name| {
                let place = Place {
                    netns: if *name == "node1" { netns.take() } else { None },
                    db: options.cut_node1 && *name == "node2",
                };
                // From node1's namespace when it has one: cutting its link cuts its Ceph
                // client off too, with whatever it caches.
                let mount = ceph.mount(
                    place.netns.as_ref(),
                    &ceph.client_key(&format!("{tag}-{name}"), "rw"),
                    &ceph.mountpoint(&format!("{tag}-{name}")),
                );
                start_node(dir.path(), &certs, &broker, name, mount, flush, place)
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
        wait_for(
            "both nodes attached: the app and two node flushes (and node2's db)",
            || cluster.attached().then_some(()),
            || cluster.logs(),
        );
        cluster
    }

    /// Whether the broker knows every writer of both nodes.
    fn attached(&self) -> bool {
        let admin = self.certs.flags("admin");
        let doc = cli_json(&self.broker, &admin, &["writers", "--volume", "shared"]);
        let count = doc["volumes"][0]["writers"].as_array().map_or(0, Vec::len);
        let dbs = self.nodes.iter().filter(|n| n.db.is_some()).count();
        count == 3 + dbs
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
            text.push_str(&format!("--- {} host:\n{}", n.name, n.host.log()));
            if let Some(app) = &n.app {
                text.push_str(&format!(
                    "--- {} app:\n{}--- {} app events:\n{}",
                    n.name,
                    app.log(),
                    n.name,
                    read(&n.app_events)
                ));
            }
            if let Some(db) = &n.db {
                text.push_str(&format!("--- {} db events:\n{}", n.name, read(&db.events)));
            }
        }
        text
    }

    /// `quiesce snapshot create --volume shared --json` through node `i`'s host, started.
    fn spawn_create(&self, i: usize) -> std::process::Child {
        Command::new(cli_exe())
            .args(["snapshot", "create", "--volume", "shared", "--json"])
            .args(["--bus", &self.nodes[i].bus.address])
            .env_remove("QUIESCE_BROKER")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The same, to its end: (exit code, the record when one was printed, stderr).
    fn create(&self, i: usize) -> (i32, Option<SetRecord>, String) {
        finish(self.spawn_create(i))
    }

    /// A set through node `i`'s host that must end app-consistent (exit 0): its record.
    fn create_app_consistent(&self, i: usize) -> SetRecord {
        let (code, record, stderr) = self.create(i);
        let record =
            record.unwrap_or_else(|| panic!("no record (exit {code}): {stderr}\n{}", self.logs()));
        assert_eq!(code, 0, "{stderr}\n{record:#?}");
        assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
        record
    }

    /// Waits until node1's application has stored its first records, read through node1's own
    /// mount, which holds the pages.
    fn wait_for_records(&self) {
        let data = self.nodes[0]
            .mount
            .mountpoint
            .join(&self.volume_dir)
            .join("app/records.map");
        wait_for(
            "node1's application to store its first records",
            || {
                let map = std::fs::read(&data).ok()?;
                missing(&map, 100).is_empty().then_some(())
            },
            || self.logs(),
        );
    }

    /// The entries of the volume directory's `.snap`, read through the broker's mount: the
    /// volume's CephFS snapshots.
    fn snapshots(&self) -> Vec<String> {
        let snapdir = self
            .broker_mount
            .mountpoint
            .join(&self.volume_dir)
            .join(".snap");
        let mut names: Vec<String> = std::fs::read_dir(&snapdir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", snapdir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
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

/// Where a node runs and what more it serves.
struct Place {
    /// The host in this network namespace (its mount is made from it already).
    netns: Option<Netns>,
    /// With the misbehave plugin's `db` writer.
    db: bool,
}

fn start_node(
    dir: &Path,
    certs: &Certs,
    broker: &Broker,
    name: &str,
    mount: CephMount,
    flush: &str,
    place: Place,
) -> Node {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let mut plugin_dir = String::new();
    let mut plugins = String::new();
    let db = place.db.then(|| {
        let dir = home.join("plugins");
        std::fs::create_dir_all(&dir).unwrap();
        let lib = plugin("quiesce-test-plugin");
        std::fs::copy(&lib, dir.join(lib.file_name().unwrap())).unwrap();
        let db = Db {
            events: home.join("db.events"),
            fifo: home.join("hang.fifo"),
            control: home.join("db.control"),
        };
        quiesce_testbed::run(Command::new("mkfifo").arg(&db.fifo));
        plugin_dir = format!("plugin_dir = {:?}\n", dir.display().to_string());
        plugins = format!(
            "\n[plugins.misbehave]\nevents = {:?}\n\n[[plugins.misbehave.writers]]\nid = \"db\"\nvolume = \"shared\"\nhang_fifo = {:?}\ncontrol = {:?}\n",
            db.events, db.fifo, db.control
        );
        db
    });
    let config = home.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "node = {name:?}\n{plugin_dir}hold_limit_ms = {HOLD_LIMIT_MS}\n\n[volumes.shared]\nmount = {:?}\nflush = {flush:?}\n{plugins}",
            mount.mountpoint
        ),
    )
    .unwrap();
    let bus = Bus::start(Policy::Permissive);
    // From a namespace, the broker is at the namespace's gateway (the veth's outside end).
    let (mut command, url) = match &place.netns {
        Some(ns) => (
            ns.command(host_exe()),
            format!("https://{}:{}", ns.outside_ip, broker.port()),
        ),
        None => (Command::new(host_exe()), broker.url.clone()),
    };
    command
        .arg("--config")
        .arg(&config)
        .args(["--bus", &bus.address, "--broker", &url])
        .args(certs.flags(name))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let host = Child::spawn(command, home.join("host.log"));
    wait_log(&host, "serving on D-Bus");
    Node {
        name: name.into(),
        app: None,
        host,
        bus,
        mount,
        app_events: home.join("app.events"),
        db,
        netns: place.netns,
    }
}

impl Node {
    /// The app writer's freezes `(ns, last record)` and thaws `ns`.
    fn app_holds(&self) -> (Vec<(u128, u64)>, Vec<u128>) {
        app_holds(&self.app_events)
    }

    /// Whether the app writer is frozen now.
    fn app_frozen(&self) -> bool {
        app_frozen(&self.app_events)
    }

    fn db(&self) -> &Db {
        self.db
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no db writer", self.name))
    }
}

impl Db {
    /// Whether the writer's `call` has started.
    fn called(&self, call: &str) -> bool {
        read(&self.events)
            .lines()
            .any(|l| l.strip_prefix("db ") == Some(call))
    }

    /// From the next call on, freeze hangs on the FIFO (the control file, replaced whole).
    fn hang_in_freeze(&self) {
        let next = self.control.with_extension("next");
        std::fs::write(&next, "hang_in = \"freeze\"\n").unwrap();
        std::fs::rename(&next, &self.control).unwrap();
    }

    /// Ends the fault: later calls follow the configuration (no hang), and the freeze hanging
    /// now returns.
    fn release(&self) {
        std::fs::remove_file(&self.control).unwrap();
        assert!(
            quiesce_testbed::release_fifo(&self.fifo, DEADLINE),
            "the db writer's hanging freeze never opened its FIFO"
        );
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
    cluster.wait_for_records();
    let record = cluster.create_app_consistent(1);
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

/// A node unreachable mid-set on CephFS: node1's link (its host's and its ceph-fuse client's)
/// is cut while the set is held in freeze — node1's application frozen, node2's `db` hanging in
/// its freeze, node1's node flush not yet called, so what node1 acknowledged sits in its kernel
/// and its client, reachable by nothing. A snapshot taken now would lack node1's data: the set
/// must fail naming node1 and keep no snapshot, node1 must not hold its application frozen past
/// its lease, and once the link is back node1 re-attaches and the next set holds every record
/// node1 acknowledged (nothing was lost, the cluster recovered).
#[test]
fn a_node_cut_off_mid_set_on_cephfs_fails_the_set_naming_it_keeps_no_snapshot_and_loses_nothing() {
    let cluster = Cluster::start_with("cut", "syncfs", Options { cut_node1: true });
    let admin = cluster.certs.flags("admin");
    let (node1, node2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let netns = node1.netns.as_ref().unwrap();
    cluster.wait_for_records();

    node2.db().hang_in_freeze();
    let create = cluster.spawn_create(1);
    // Levels freeze in order across nodes: node2's db (back end) is called once every front
    // end, node1's application included, holds; node1's flush (volume level) comes after it.
    wait_for(
        "node1's app frozen while node2's db hangs in freeze",
        || (node1.app_frozen() && node2.db().called("freeze")).then_some(()),
        || cluster.logs(),
    );
    let cut_ns = now_ns();
    netns.cut();

    // node1 releases its application itself, at its lease: no broker can reach it.
    let (frozen_ns, held_at, thawed_ns) = quiesce_testbed::wait_until_or(
        "node1's app released after its link was cut",
        RECOVERY,
        || {
            let (frozen, thawed) = node1.app_holds();
            let thawed_ns = *thawed.last()?;
            let (frozen_ns, seq) = *frozen.last()?;
            (frozen.len() == thawed.len() && thawed_ns > cut_ns)
                .then_some((frozen_ns, seq, thawed_ns))
        },
        || cluster.logs(),
    );
    assert!(
        (thawed_ns - frozen_ns) / 1_000_000 < HOLD_LIMIT_MS as u128,
        "node1's app released by its lease ({LEASE_MS} ms), before the hold limit ({HOLD_LIMIT_MS} ms): held {} ms, {} ms after the cut",
        (thawed_ns - frozen_ns) / 1_000_000,
        (thawed_ns - cut_ns) / 1_000_000
    );
    eprintln!(
        "node1's app released {} ms after the cut (lease {LEASE_MS} ms)",
        (thawed_ns - cut_ns) / 1_000_000
    );
    // The broker has dropped node1 before the held freeze returns: the set cannot go on past
    // it with node1's data left out.
    wait_nodes(&cluster.broker, &admin, &["node2"], &[]);
    node2.db().release();

    let (code, record, stderr) = finish(create);
    let record =
        record.unwrap_or_else(|| panic!("no record (exit {code}): {stderr}\n{}", cluster.logs()));
    eprintln!("the set of the cut: exit {code}, {}", record.outcome);
    assert_ne!(code, 0, "{stderr}\n{record:#?}");
    let Outcome::Failed {
        phase,
        writer,
        reason,
    } = &record.outcome
    else {
        panic!("the set did not fail: {record:#?}");
    };
    assert_eq!(*phase, Phase::Freeze, "{record:#?}");
    assert!(
        writer.as_ref().is_some_and(|w| w.node == "node1") || reason.contains("node1"),
        "the failure names node1: {record:#?}"
    );
    assert!(
        !flush_writer(&record, "node1")
            .call_us
            .contains_key("freeze"),
        "node1's flush never ran (its data was unflushed when the link was cut): {record:#?}"
    );
    assert!(record.snapshot.is_none(), "{record:#?}");
    let snapshots = cluster.snapshots();
    assert!(
        !snapshots.contains(&record.id.0) && snapshots.is_empty(),
        "no CephFS snapshot is kept: .snap holds {snapshots:?}"
    );

    // The link comes back: node1 attaches again with its writers, and its client finds the
    // Ceph cluster again.
    netns.restore();
    quiesce_testbed::wait_until_or(
        "node1 attached again with its writers",
        RECOVERY,
        || cluster.attached().then_some(()),
        || cluster.logs(),
    );
    let record = cluster.create_app_consistent(1);
    let acknowledged = cluster.acknowledged(0);
    assert!(
        acknowledged > held_at,
        "node1's app wrote on once released (frozen at record {held_at} in the cut set, at {acknowledged} now)"
    );
    let lost = missing(&cluster.snapshot_records(&record), acknowledged);
    assert!(
        lost.is_empty(),
        "after the cut, {} of {acknowledged} records node1 acknowledged are missing from the snapshot: {:?}…\n{record:#?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        cluster.snapshots(),
        vec![record.id.0.clone()],
        "the one snapshot kept is the second set's"
    );
    eprintln!("after the link came back: all {acknowledged} acknowledged records in the snapshot");
}
