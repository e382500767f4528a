//! The cluster: three nodes in network namespaces on a bridge, a broker in node1's namespace,
//! a host with its own dbus-daemon on every node, one shared volume, and the applications
//! writing to it under load. The volume ([`VolumeKind`]) is a CephFS directory of a Ceph
//! cluster of the lab's own (memstore OSD), mounted with `ceph-fuse` by the broker and by each
//! node from its own namespace, every application writing through its own node's mount and
//! every host flushing its mount in the freeze (`flush = "syncfs"`); or one btrfs on a loop
//! device mounted once and shared by all:
//!
//! | node | applications | writers |
//! |---|---|---|
//! | node1 | PostgreSQL (server in node1's namespace, data directory on the volume), `pg-load` | `pg` (postgres plugin), `probe` |
//! | node2 | two `sqlite-load` processes (a WAL and a rollback-journal database), the mmap application (`app-writer --mmap`) | `sqlite` (sqlite plugin), `mmap`, `probe` |
//! | node3 | `buffering-app`, `app-writer` (registers over D-Bus) | `buffer` (filebuf plugin), `app`, `probe` |
//!
//! The mmap application stores its records through a shared mapping and never syncs them: what
//! it acknowledged sits dirty in node2's kernel, which on CephFS no other node's client and no
//! snapshot sees unless node2 flushes its mount in the freeze.
//!
//! `probe` is the misbehave test plugin's writer on every node: its events file shows which
//! call each node is in, and its control file makes it hang (a pause, or the fault itself),
//! panic or fail in the middle of a set, without restarting the host.

use crate::acks::{unix_ns, AckLog};
use crate::net::Network;
use quiesce_proto::SetRecord;
use quiesce_testbed::ceph::{CephOptions, ObjectStore};
use quiesce_testbed::{
    binary, plugin, require, run, wait_until_or, BtrfsVolume, Bus, CephCluster, CephMount, Child,
    Policy,
};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// node1: PostgreSQL, and the broker in its namespace.
pub const PG_NODE: usize = 0;
/// node2: the SQLite applications, the mmap application, and the restic backups.
pub const SQLITE_NODE: usize = 1;
/// node3: the buffering app and the app writer.
pub const APP_NODE: usize = 2;

/// Every writer of a healthy cluster on a volume of `kind`: (node, writer). On CephFS each
/// node also has its node flush, `flush.shared`.
pub fn expected_writers(kind: VolumeKind) -> BTreeSet<(String, String)> {
    let flushes: &[(usize, &str)] = match kind {
        VolumeKind::Btrfs => &[],
        VolumeKind::Cephfs => &[
            (0, "flush.shared"),
            (1, "flush.shared"),
            (2, "flush.shared"),
        ],
    };
    [
        (0, "probe"),
        (0, "pg"),
        (1, "probe"),
        (1, "sqlite"),
        (1, "mmap"),
        (2, "probe"),
        (2, "buffer"),
        (2, "app"),
    ]
    .into_iter()
    .chain(flushes.iter().copied())
    .map(|(i, w)| (NODES[i].to_string(), w.to_string()))
    .collect()
}

/// The lab's two applications that register their writers over D-Bus (both `app-writer`).
/// Each run numbers its records from 1 in a directory of its own; a run ends when the
/// application exits or its host is killed (its registration died with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// node3's app writer: records appended by `write()`.
    Writer,
    /// node2's mmap application: records stored into a shared mapping, never synced.
    Mapped,
}

impl App {
    pub const ALL: [App; 2] = [App::Writer, App::Mapped];

    pub fn node(self) -> usize {
        match self {
            App::Writer => APP_NODE,
            App::Mapped => SQLITE_NODE,
        }
    }

    /// Its writer's id (`--id`).
    pub fn writer(self) -> &'static str {
        match self {
            App::Writer => "app",
            App::Mapped => "mmap",
        }
    }

    /// Its name in the lab's ack logs and messages: runs are `<name> run <n>`.
    pub fn name(self) -> &'static str {
        match self {
            App::Writer => "app-writer",
            App::Mapped => "mmap-app",
        }
    }

    /// The file its records go to, inside its run's directory.
    fn records_file(self) -> &'static str {
        match self {
            App::Writer => "records.log",
            App::Mapped => "records.map",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Room in the mmap application's `records.map`: at one record per write interval (5 ms) it
/// lasts some 10 000 s, longer than a 200-cycle soak.
const MMAP_RECORDS: u64 = 2_000_000;

/// What the volume is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// One btrfs file system on a loop device, mounted once and shared by every node (one page
    /// cache for all); the broker's `btrfs` provider.
    Btrfs,
    /// A directory of a CephFS (a Ceph cluster of the lab's own): a `ceph-fuse` mount for the
    /// broker and one per node, each from its own namespace (a cache of its own), every node
    /// flushing its mount (`flush = "syncfs"`); the broker's `cephfs` provider.
    Cephfs,
}

impl std::str::FromStr for VolumeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "btrfs" => Ok(VolumeKind::Btrfs),
            "cephfs" => Ok(VolumeKind::Cephfs),
            _ => Err(format!("{s:?}: the volume is btrfs or cephfs")),
        }
    }
}

impl std::fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeKind::Btrfs => "btrfs",
            VolumeKind::Cephfs => "cephfs",
        })
    }
}

/// The lab's CephFS volume: the directory [`CephVolume::DIR`] of a Ceph cluster's file system,
/// mounted by the broker (from node1's namespace) and by every node from its own namespace.
/// Fields drop in order: the mounts (each unmount flushes through its namespace's link), then
/// the cluster.
pub struct CephVolume {
    pub broker: CephMount,
    /// Node i's own mount.
    pub nodes: Vec<CephMount>,
    pub cluster: CephCluster,
}

impl CephVolume {
    /// The volume's directory, from the root of the file system.
    pub const DIR: &'static str = "shared";

    fn create(net: &Network, size_mb: u64) -> CephVolume {
        let cluster = CephCluster::start_with(CephOptions {
            store: ObjectStore::Memstore,
            size_mb,
        });
        for node in &net.nodes {
            cluster.route_from(&node.netns, &net.lab_ip);
        }
        let broker = cluster.mount_in(
            Some(&net.nodes[PG_NODE].netns),
            &cluster.client_key("lab-broker", "rws"),
            &cluster.mountpoint("broker"),
        );
        std::fs::create_dir(broker.mountpoint.join(Self::DIR)).unwrap();
        std::fs::set_permissions(
            broker.mountpoint.join(Self::DIR),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let nodes = NODES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                cluster.mount_in(
                    Some(&net.nodes[i].netns),
                    &cluster.client_key(&format!("lab-{name}"), "rw"),
                    &cluster.mountpoint(name),
                )
            })
            .collect();
        CephVolume {
            broker,
            nodes,
            cluster,
        }
    }
}

/// The lab's volume.
pub enum Volume {
    Btrfs(BtrfsVolume),
    Cephfs(CephVolume),
}

impl Volume {
    pub fn kind(&self) -> VolumeKind {
        match self {
            Volume::Btrfs(_) => VolumeKind::Btrfs,
            Volume::Cephfs(_) => VolumeKind::Cephfs,
        }
    }

    /// The volume's data directory as node `i` sees it (on CephFS: through its own mount); the
    /// applications of node `i` write there. Every node's tree has the same layout, which a
    /// snapshot's and a restore's root has too.
    pub fn data(&self, i: usize) -> PathBuf {
        match self {
            Volume::Btrfs(v) => v.data.clone(),
            Volume::Cephfs(c) => c.nodes[i].mountpoint.join(CephVolume::DIR),
        }
    }

    /// The snapshots on the volume now: btrfs subvolumes in the snapshots directory, or the
    /// entries of the volume directory's `.snap` (read through the broker's mount).
    pub fn snapshots(&self) -> Vec<PathBuf> {
        match self {
            Volume::Btrfs(v) => v.snapshot_list(),
            Volume::Cephfs(c) => {
                let snapdir = c.broker.mountpoint.join(CephVolume::DIR).join(".snap");
                let mut list: Vec<PathBuf> = std::fs::read_dir(&snapdir)
                    .unwrap_or_else(|e| panic!("listing {}: {e}", snapdir.display()))
                    .map(|e| e.unwrap().path())
                    .collect();
                list.sort();
                list
            }
        }
    }
}

/// The lab's deadlines: short where a fault only costs time (lease, heartbeat), the product's
/// defaults for the hold limit, and room in every call for this machine's I/O stalls (seen:
/// 4 s and more on a 2-core machine whose loop device shares its disk with other work): a
/// commit of the SQLite application in rollback-journal mode holds the write lock through its
/// fsyncs, and the writer's freeze must wait for it; a checkpoint in prepare waits for the disk
/// (the sqlite writer's `busy_timeout_ms` is raised to match).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The hold limit of broker, hosts and applications (`hold_limit_ms`, `--hold-limit-ms`).
    pub hold_limit_ms: u64,
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    pub prepare_ms: u64,
    pub freeze_ms: u64,
    pub thaw_ms: u64,
    pub post_snapshot_ms: u64,
    pub abort_ms: u64,
    /// The `quiesce-lab` executable, which runs the load applications (`pg-load`, `sqlite-load`).
    pub lab_exe: PathBuf,
    /// Pace of the SQL loaders and the buffering app.
    pub write_interval_ms: u64,
    pub volume_mb: u64,
    /// What the volume is (`quiesce-lab soak --volume`).
    pub volume: VolumeKind,
    /// Each host's node flush on CephFS (`flush = …`): `syncfs`, or `none` to see what the
    /// lab finds without it (`quiesce-lab soak --node-flush none`: the negative control).
    pub node_flush: String,
    /// The tmpfs for the restic repository and the restores.
    pub backups_mb: u64,
}

impl Settings {
    pub fn new(lab_exe: PathBuf) -> Settings {
        Settings {
            hold_limit_ms: 10_000,
            lease_ms: 3000,
            heartbeat_ms: 3000,
            prepare_ms: 15_000,
            freeze_ms: 8000,
            thaw_ms: 5000,
            post_snapshot_ms: 8000,
            abort_ms: 5000,
            lab_exe,
            write_interval_ms: 5,
            volume_mb: 6144,
            volume: VolumeKind::Btrfs,
            node_flush: "syncfs".into(),
            backups_mb: 12_288,
        }
    }

    fn timeouts(&self) -> String {
        format!(
            "[timeouts]\nprepare_ms = {}\nfreeze_ms = {}\nthaw_ms = {}\npost_snapshot_ms = {}\nabort_ms = {}\nprovider_ms = 30000\n",
            self.prepare_ms, self.freeze_ms, self.thaw_ms, self.post_snapshot_ms, self.abort_ms
        )
    }

    /// How long a writer may go without writing in the lab's checks: the hold limit plus 1 s.
    pub fn frozen_limit_ms(&self) -> u64 {
        self.hold_limit_ms + 1000
    }

    /// How long a stall lasts (a paused broker, a silent node): longer than the lease, shorter
    /// than the hold limit — the window in which a node releases its writers on its own while
    /// the broker could still take the snapshot.
    pub fn stall(&self) -> Duration {
        Duration::from_millis(self.lease_ms + (self.hold_limit_ms - self.lease_ms) / 2)
    }

    /// Every writer of the healthy cluster: [`expected_writers`] of this volume.
    pub fn expected_writers(&self) -> BTreeSet<(String, String)> {
        expected_writers(self.volume)
    }
}

/// The programs the lab runs, built from the workspace (debug profile) and copied into the
/// lab's own `bin` directory: a daemon restarted hours later runs the same build, whatever
/// else rebuilds `target/` meanwhile.
#[derive(Debug)]
struct Binaries {
    broker: PathBuf,
    host: PathBuf,
    cli: PathBuf,
    app_writer: PathBuf,
    buffering_app: PathBuf,
    plugins: Vec<PathBuf>,
}

impl Binaries {
    fn build(into: &Path) -> Binaries {
        std::fs::create_dir_all(into).unwrap();
        let keep = |built: PathBuf| {
            let copy = into.join(built.file_name().unwrap());
            std::fs::copy(&built, &copy)
                .unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
            copy
        };
        Binaries {
            broker: keep(binary("quiesce-broker", "quiesce-broker")),
            host: keep(binary("quiesce-host", "quiesce-host")),
            cli: keep(binary("quiesce-cli", "quiesce")),
            app_writer: keep(binary("quiesce-example-app-writer", "app-writer")),
            buffering_app: keep(binary("quiesce-example-buffering-app", "buffering-app")),
            plugins: [
                "quiesce-test-plugin",
                "quiesce-writer-postgres",
                "quiesce-writer-sqlite",
                "quiesce-writer-filebuf",
            ]
            .iter()
            .map(|p| keep(plugin(p)))
            .collect(),
        }
    }
}

pub use quiesce_testbed::postgres::{as_postgres, chown_postgres, pg_bin};

/// A directory others (postgres) can traverse.
fn open_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// A PostgreSQL server on a data directory; stopped (immediately) when dropped.
#[derive(Debug)]
pub struct PgServer {
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    running: bool,
}

impl PgServer {
    /// A server over `data`, its socket and log under `scratch`; not started.
    pub fn on(data: &Path, scratch: &Path, port: u16) -> PgServer {
        let socket_dir = open_dir(&scratch.join(format!("pg-sock-{port}")));
        chown_postgres(&socket_dir);
        PgServer {
            data: data.into(),
            socket_dir,
            port,
            log: scratch.join(format!("pg-{port}.log")),
            running: false,
        }
    }

    /// Starts it (inside `netns`, if given) and waits until it accepts connections.
    pub fn start(&mut self, netns: Option<&str>, options: &[&str]) {
        let pg_ctl = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"])
                    .arg(pg_bin().join("pg_ctl"))
                    .current_dir("/");
                c
            }
            None => as_postgres("pg_ctl"),
        };
        let _ = std::fs::File::create(&self.log);
        chown_postgres(&self.log);
        quiesce_testbed::postgres::start(
            pg_ctl,
            &self.data,
            &self.log,
            self.port,
            &self.socket_dir,
            options,
        );
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    pub fn client(&self) -> Result<postgres::Client, String> {
        postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(20))
            .connect(postgres::NoTls)
            .map_err(|e| format!("connecting to PostgreSQL on {}: {e}", self.data.display()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One node: its host (restarted after a kill), its bus, and its probe writer's files.
struct Node {
    home: PathBuf,
    config: PathBuf,
    bus: Bus,
    host: Option<Child>,
    host_runs: u32,
    probe_events: PathBuf,
    probe_control: PathBuf,
    probe_fifo: PathBuf,
}

/// The certificates `quiesce-broker certs` made.
#[derive(Debug)]
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn flags(&self, name: &str) -> Vec<String> {
        [("--ca", "ca.pem"), ("--cert", ".pem"), ("--key", ".key")]
            .iter()
            .flat_map(|(flag, file)| {
                let file = if file.starts_with('.') {
                    format!("{name}{file}")
                } else {
                    file.to_string()
                };
                [flag.to_string(), self.dir.join(file).display().to_string()]
            })
            .collect()
    }
}

/// What `quiesce snapshot create` (or the backup script) ended with.
#[derive(Debug)]
pub struct Finished {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Waits, at most `timeout`, for a child to end; its output.
fn finish(child: std::process::Child, timeout: Duration, what: &str) -> Finished {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = rx
        .recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("{what}: still running after {timeout:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    Finished {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The whole cluster under load. Fields drop in order: applications, hosts, broker, PostgreSQL,
/// the network, the volume, the lab's directory.
pub struct Lab {
    /// The running [`App`]s, by [`App::index`].
    apps: [Option<Child>; 2],
    buffering_app: Option<Child>,
    loaders: Vec<Child>,
    nodes: Vec<Node>,
    broker: Option<Child>,
    pg: PgServer,
    /// The applications' ack logs: postgres, the two SQLite databases, the buffering app, then
    /// one per run of an [`App`] (a run that ended is no longer `live`).
    pub acks: Vec<AckLog>,
    /// Runs of each [`App`] so far, by [`App::index`].
    app_runs: [u32; 2],
    broker_runs: u32,
    broker_addr: String,
    certs: Certs,
    bins: Binaries,
    pub settings: Settings,
    /// Before the network: a CephFS client's unmount flushes through its node's link.
    pub volume: Volume,
    pub net: Network,
    /// The restic repository, restores and their PostgreSQL copies: another storage than the
    /// volume's disk, as a backup target would be.
    backups: Tmpfs,
    pub dir: tempfile::TempDir,
}

/// A tmpfs mounted for the lab's life.
#[derive(Debug)]
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        open_dir(path);
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(path));
        Tmpfs(path.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The SQLite databases on node2 and their journal modes.
pub const SQLITE_DBS: [(&str, &str); 2] = [("wal.db", "wal"), ("journal.db", "delete")];

impl Lab {
    /// Brings the whole cluster up and waits until every writer is attached and every
    /// application writes.
    pub fn start(settings: Settings) -> Lab {
        quiesce_testbed::require_root();
        for (tool, package) in [
            ("runuser", "util-linux"),
            ("restic", "restic"),
            ("jq", "jq"),
            ("mkfifo", "coreutils"),
            ("dbus-daemon", "dbus-daemon"),
        ] {
            require(tool, package);
        }
        let _ = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        open_dir(dir.path());
        let bins = Binaries::build(&dir.path().join("bin"));
        let net = Network::create(NODES.len());
        // Every mount is made before any process starts in a namespace (`ip netns exec` copies
        // the mount table of the lab's mount namespace when it starts a process).
        let volume = match settings.volume {
            VolumeKind::Btrfs => Volume::Btrfs(BtrfsVolume::create(settings.volume_mb)),
            VolumeKind::Cephfs => Volume::Cephfs(CephVolume::create(&net, settings.volume_mb)),
        };
        let backups = Tmpfs::mount(&dir.path().join("backups"), settings.backups_mb);

        // PostgreSQL on node1, its data directory on the volume.
        let pg_home = volume.data(PG_NODE).join("pg");
        std::fs::create_dir_all(pg_home.join("data")).unwrap();
        chown_postgres(&pg_home);
        std::fs::set_permissions(pg_home.join("data"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        run(as_postgres("initdb")
            .arg("-D")
            .arg(pg_home.join("data"))
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                "--wal-segsize=1",
            ]));
        let conf = pg_home.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(
            "\n# quiesce-lab\nlisten_addresses = ''\nshared_buffers = 16MB\nmax_connections = 20\n\
             fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nmin_wal_size = 4MB\n\
             max_wal_size = 32MB\n",
        );
        std::fs::write(&conf, text).unwrap();
        let mut pg = PgServer::on(&pg_home.join("data"), dir.path(), 5432);
        pg.start(Some(&net.nodes[PG_NODE].netns), &[]);

        let certs = Certs {
            dir: dir.path().join("certs"),
        };
        run(Command::new(&bins.broker)
            .args(["certs", "--out"])
            .arg(&certs.dir)
            .args(["--broker-name", "broker", "--broker-host"])
            .arg(&net.nodes[PG_NODE].ip)
            .args(["--nodes", &NODES.join(","), "--clients", "admin"]));

        let mut lab = Lab {
            apps: [None, None],
            buffering_app: None,
            loaders: Vec::new(),
            nodes: Vec::new(),
            broker: None,
            pg,
            acks: Vec::new(),
            app_runs: [0, 0],
            broker_runs: 0,
            broker_addr: format!("{}:0", net.nodes[PG_NODE].ip),
            certs,
            bins,
            settings,
            net,
            backups,
            volume,
            dir,
        };
        lab.start_loads();
        lab.start_broker();
        for i in 0..NODES.len() {
            lab.make_node(i);
            lab.start_host(i);
        }
        for app in App::ALL {
            lab.start_app(app);
        }
        lab.init_restic();
        lab.wait_healthy();
        lab
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_loads(&mut self) {
        let s = &self.settings;
        let interval = s.write_interval_ms.to_string();
        let pg_acks = self.path("postgres.acks");
        let mut command = self.net.command(PG_NODE, &s.lab_exe);
        command
            .arg("pg-load")
            .arg("--socket")
            .arg(&self.pg.socket_dir)
            .args(["--port", &self.pg.port.to_string()])
            .arg("--log")
            .arg(&pg_acks)
            .args(["--interval-ms", &interval]);
        self.loaders
            .push(Child::spawn(command, self.path("pg-load.log")));
        self.acks.push(AckLog::new("postgres", PG_NODE, &pg_acks));

        let sqlite_dir = self.volume.data(SQLITE_NODE).join("sqlite");
        std::fs::create_dir_all(&sqlite_dir).unwrap();
        for (db, mode) in SQLITE_DBS {
            let log = self.path(&format!("sqlite-{db}.acks"));
            let mut command = self.net.command(SQLITE_NODE, &s.lab_exe);
            command
                .arg("sqlite-load")
                .arg("--db")
                .arg(sqlite_dir.join(db))
                .args(["--mode", mode])
                .arg("--log")
                .arg(&log)
                .args(["--interval-ms", &interval]);
            self.loaders.push(Child::spawn(
                command,
                self.path(&format!("sqlite-{db}.log")),
            ));
            self.acks
                .push(AckLog::new(&format!("sqlite {db}"), SQLITE_NODE, &log));
        }

        let acks = self.path("buffering-app.acks");
        let mut command = self.net.command(APP_NODE, &self.bins.buffering_app);
        command
            .arg("--data")
            .arg(self.volume.data(APP_NODE).join("buffer"))
            .arg("--socket")
            .arg(self.path("buffering-app.sock"))
            .arg("--ack-log")
            .arg(&acks)
            .arg("--ack-times")
            .args(["--interval-us", &(s.write_interval_ms * 400).to_string()])
            .args(["--hold-limit-ms", &s.hold_limit_ms.to_string()])
            .stdout(Stdio::piped());
        let mut app = Child::spawn(command, self.path("buffering-app.log"));
        let line = first_line(&mut app);
        assert!(
            line.starts_with("ready "),
            "buffering-app did not start: {line:?}\n{}",
            app.log()
        );
        self.buffering_app = Some(app);
        self.acks.push(
            AckLog::new("buffering-app", APP_NODE, &acks)
                .with_records(Path::new("buffer/records.log")),
        );
        // Every application acknowledges writes before any host looks for them.
        for i in 0..self.acks.len() {
            let what = format!("{} acknowledging writes", self.acks[i].app);
            let logs = self.process_logs();
            wait_until_or(
                &what,
                Duration::from_secs(60),
                || {
                    self.acks[i].refresh();
                    (!self.acks[i].is_empty()).then_some(())
                },
                || logs.clone(),
            );
        }
    }

    fn process_logs(&self) -> String {
        let mut text = String::new();
        for c in self.loaders.iter().chain(&self.buffering_app) {
            text.push_str(&format!("--- {}:\n{}", c.stderr.display(), c.log()));
        }
        text.push_str(&format!("--- postgres:\n{}", self.pg.log_text()));
        text
    }

    /// The broker's URL, as the nodes and the lab reach it.
    pub fn broker_url(&self) -> String {
        format!("https://{}", self.broker_addr)
    }

    /// Starts the broker in node1's namespace (on the address it had, after a restart).
    pub fn start_broker(&mut self) {
        let config = self.path("broker.toml");
        if !config.exists() {
            let s = &self.settings;
            let provider = match &self.volume {
                Volume::Btrfs(v) => format!(
                    "provider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n",
                    v.data, v.snapshots
                ),
                Volume::Cephfs(c) => format!(
                    "provider = \"cephfs\"\ndirectory = {:?}\n",
                    c.broker.mountpoint.join(CephVolume::DIR)
                ),
            };
            std::fs::write(
                &config,
                format!(
                    "catalog = {:?}\nhold_limit_ms = {}\nlease_ms = {}\n\n{}\n[volumes.shared]\n{provider}",
                    self.path("catalog.sqlite"),
                    s.hold_limit_ms,
                    s.lease_ms,
                    s.timeouts(),
                ),
            )
            .unwrap();
        }
        self.broker_runs += 1;
        let mut command = self.net.command(PG_NODE, &self.bins.broker);
        command
            .args(["serve", "--listen", &self.broker_addr])
            .arg("--config")
            .arg(&config)
            .args(self.certs.flags("broker"))
            .args([
                "--heartbeat-timeout-ms",
                &self.settings.heartbeat_ms.to_string(),
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped());
        let log = self.path(&format!("broker-{}.log", self.broker_runs));
        let mut broker = Child::spawn(command, log);
        let line = first_line(&mut broker);
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the broker did not start: {line:?}\n{}", broker.log()))
            .to_string();
        self.broker_addr = addr;
        self.broker = Some(broker);
    }

    /// Pauses the broker (SIGSTOP) as a stalled machine or process would: its connections stay
    /// open, nothing answers.
    pub fn pause_broker(&self) {
        self.broker
            .as_ref()
            .expect("the broker runs")
            .signal("STOP");
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume_broker(&self) {
        self.broker
            .as_ref()
            .expect("the broker runs")
            .signal("CONT");
    }

    /// Node `i` silent: every packet in and out of it dropped, its link up.
    pub fn silence_node(&self, i: usize) {
        self.net.drop_packets(i);
    }

    /// Node `i`'s packets pass again.
    pub fn unsilence_node(&self, i: usize) {
        self.net.pass_packets(i);
    }

    /// `kill -9` of the broker.
    pub fn kill_broker(&mut self) {
        if let Some(mut broker) = self.broker.take() {
            broker.kill();
        }
    }

    fn make_node(&mut self, i: usize) {
        let name = NODES[i];
        let home = open_dir(&self.path(name));
        let plugins = home.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let wanted: &[&str] = match i {
            PG_NODE => &["quiesce_test_plugin", "quiesce_writer_postgres"],
            SQLITE_NODE => &["quiesce_test_plugin", "quiesce_writer_sqlite"],
            _ => &["quiesce_test_plugin", "quiesce_writer_filebuf"],
        };
        for lib in &self.bins.plugins {
            let file = lib.file_name().unwrap();
            if wanted
                .iter()
                .any(|w| file.to_string_lossy() == format!("lib{w}.so"))
            {
                std::fs::copy(lib, plugins.join(file)).unwrap();
            }
        }
        let probe_fifo = home.join("probe.fifo");
        run(Command::new("mkfifo").arg(&probe_fifo));
        let probe_events = home.join("probe.events");
        let probe_control = home.join("probe.control");
        let s = &self.settings;
        let data = &self.volume.data(i);
        // Where the postgres writer finds the volume: the mount and what a snapshot holds (the
        // btrfs subvolume, or the CephFS directory through node1's own mount).
        let pg_volume = match &self.volume {
            Volume::Btrfs(v) => format!("volume_path = {:?}\nsubvolume = {:?}\n", v.mount, v.data),
            Volume::Cephfs(c) => format!(
                "volume_path = {:?}\nsubvolume = {data:?}\n",
                c.nodes[i].mountpoint
            ),
        };
        // On CephFS every node flushes its own mount inside the freeze (the node flush): the
        // mount point itself, the file system syncfs flushes.
        let volume_table = match &self.volume {
            Volume::Btrfs(_) => String::new(),
            Volume::Cephfs(c) => format!(
                "[volumes.shared]\nmount = {:?}\nflush = {:?}\n\n",
                c.nodes[i].mountpoint, self.settings.node_flush
            ),
        };
        let writers = match i {
            PG_NODE => format!(
                "[plugins.postgres]\nid = \"pg\"\nhost = {:?}\nport = {}\nvolume = \"shared\"\n{pg_volume}",
                self.pg.socket_dir, self.pg.port
            ),
            SQLITE_NODE => format!(
                "[plugins.sqlite]\nid = \"sqlite\"\nvolume = \"shared\"\ndatabases = [{:?}]\nbusy_timeout_ms = 12000\nreport_query = \"SELECT coalesce(max(n), 0) FROM records\"\n",
                data.join("sqlite/*.db")
            ),
            _ => format!(
                "[[plugins.filebuf.writers]]\nid = \"buffer\"\nname = \"buffering-app\"\nvolume = \"shared\"\nfiles = [{:?}]\nsocket = {:?}\n",
                data.join("buffer/records.log"),
                self.path("buffering-app.sock")
            ),
        };
        let config = home.join("host.toml");
        std::fs::write(
            &config,
            format!(
                "node = {name:?}\nplugin_dir = {plugins:?}\nhold_limit_ms = {}\n\n{}\n{volume_table}[plugins.misbehave]\nevents = {probe_events:?}\n\n[[plugins.misbehave.writers]]\nid = \"probe\"\nvolume = \"shared\"\nneeds_post_snapshot = true\nhang_fifo = {probe_fifo:?}\ncontrol = {probe_control:?}\n\n{writers}",
                s.hold_limit_ms,
                s.timeouts(),
            ),
        )
        .unwrap();
        self.nodes.push(Node {
            home,
            config,
            bus: Bus::start(Policy::Permissive),
            host: None,
            host_runs: 0,
            probe_events,
            probe_control,
            probe_fifo,
        });
    }

    /// Starts node `i`'s host in its namespace and waits until it serves on D-Bus.
    pub fn start_host(&mut self, i: usize) {
        let url = self.broker_url();
        let node = &mut self.nodes[i];
        node.host_runs += 1;
        let mut command = self.net.command(i, &self.bins.host);
        command
            .arg("--config")
            .arg(&node.config)
            .args(["--bus", &node.bus.address, "--broker", &url])
            .args(self.certs.flags(NODES[i]))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        let host = Child::spawn(
            command,
            node.home.join(format!("host-{}.log", node.host_runs)),
        );
        wait_until_or(
            &format!("{}'s host serving on D-Bus", NODES[i]),
            Duration::from_secs(30),
            || host.log().contains("serving on D-Bus").then_some(()),
            || host.log(),
        );
        node.host = Some(host);
    }

    /// `kill -9` of node `i`'s host.
    pub fn kill_host(&mut self, i: usize) {
        if let Some(mut host) = self.nodes[i].host.take() {
            host.kill();
        }
    }

    /// Starts a new run of `app` on its node (each run writes its own directory: the
    /// application numbers its records from 1 at every start).
    pub fn start_app(&mut self, app: App) {
        self.app_runs[app.index()] += 1;
        let run = self.app_runs[app.index()];
        let i = app.node();
        let relative = PathBuf::from(format!("{}/run-{run}", app.writer()));
        let data = self.volume.data(i).join(&relative);
        let node = &self.nodes[i];
        let mut command = self.net.command(i, &self.bins.app_writer);
        command
            .args([
                "--bus",
                &node.bus.address,
                "--id",
                app.writer(),
                "--volume",
                "shared",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--events")
            .arg(node.home.join(format!("{}-{run}.events", app.writer())))
            .args(["--hold-limit-ms", &self.settings.hold_limit_ms.to_string()])
            .stdout(Stdio::piped());
        if app == App::Mapped {
            command.arg("--mmap").args([
                "--mmap-records",
                &MMAP_RECORDS.to_string(),
                "--interval-us",
                &(self.settings.write_interval_ms * 1000).to_string(),
            ]);
        }
        let name = format!("{} run {run}", app.name());
        let mut child = Child::spawn(
            command,
            node.home.join(format!("{}-{run}.log", app.writer())),
        );
        let line = first_line(&mut child);
        assert!(
            line.starts_with("registered "),
            "{name} did not register: {line:?}\n{}",
            child.log()
        );
        // The mmap application's records are read through its own node's mount, which holds
        // the pages it stored and has not synced.
        self.acks.push(
            AckLog::new(&name, i, &data.join(app.records_file()))
                .with_records(&relative.join(app.records_file())),
        );
        self.apps[app.index()] = Some(child);
    }

    /// `app` exits (SIGTERM: it stops writing, its bus name goes away); waits for it.
    pub fn stop_app(&mut self, app: App) {
        if let Some(mut child) = self.apps[app.index()].take() {
            child.signal("TERM");
            let _ = child.child.wait();
        }
        let run = self.current_run(app);
        if let Some(log) = self.acks.iter_mut().rev().find(|l| l.app == run) {
            log.refresh();
            log.live = false;
        }
    }

    /// The name of `app`'s current run, as its ack log is named.
    pub fn current_run(&self, app: App) -> String {
        format!("{} run {}", app.name(), self.app_runs[app.index()])
    }

    pub fn cut_link(&self, i: usize) {
        self.net.cut(i);
    }

    pub fn restore_link(&self, i: usize) {
        self.net.restore(i);
    }

    /// On CephFS: waits until node `i`'s own client writes and syncs a file again (its
    /// sessions with the MDS and the OSD are back after a cut: TCP resends on its own backoff,
    /// seconds after a link comes back), and says when. The file lies outside the volume's
    /// directory, in no snapshot. Immediate on btrfs, which no link cut takes away.
    pub fn wait_storage(&self, i: usize, timeout: Duration) -> Result<Duration, String> {
        let Volume::Cephfs(ceph) = &self.volume else {
            return Ok(Duration::ZERO);
        };
        let started = std::time::Instant::now();
        let probe = ceph.nodes[i]
            .mountpoint
            .join(format!(".lab-storage-probe-{}", NODES[i]));
        let (answered, answer) = std::sync::mpsc::channel();
        // In a thread of its own: a write to a client that is still cut off blocks.
        std::thread::spawn(move || {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&probe)
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, b"probe\n")?;
                    f.sync_all()
                });
            let _ = answered.send(written);
        });
        match answer.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(format!("{}'s CephFS mount: {e}", NODES[i])),
            Err(_) => Err(format!(
                "{}'s CephFS mount did not write and sync a file within {timeout:?} of its link coming back",
                NODES[i]
            )),
        }
    }

    fn init_restic(&self) {
        std::fs::write(self.path("restic.pass"), "quiesce-lab\n").unwrap();
        let mut command = Command::new("restic");
        self.restic_env(&mut command);
        run(command.args(["init", "-q"]));
    }

    pub fn restic_env(&self, command: &mut Command) {
        command
            .env("RESTIC_REPOSITORY", self.backups.0.join("restic-repo"))
            .env("RESTIC_PASSWORD_FILE", self.path("restic.pass"))
            .env("RESTIC_CACHE_DIR", self.backups.0.join("restic-cache"));
    }

    /// A directory on the backup storage (for restores).
    pub fn backup_path(&self, name: &str) -> PathBuf {
        self.backups.0.join(name)
    }

    /// The healthy cluster: every node attached with every writer (asked of the broker with the
    /// admin certificate), within `timeout`.
    pub fn wait_healthy_within(&self, timeout: Duration) {
        let expected = self.settings.expected_writers();
        wait_until_or(
            "every node attached with all its writers",
            timeout,
            || (self.writers().as_ref() == Some(&expected)).then_some(()),
            || format!("attached now: {:?}\n{}", self.writers(), self.logs()),
        );
    }

    pub fn wait_healthy(&self) {
        self.wait_healthy_within(Duration::from_secs(60));
    }

    /// The writers the broker knows on the volume, or None when it cannot be asked.
    pub fn writers(&self) -> Option<BTreeSet<(String, String)>> {
        let output = Command::new(&self.bins.cli)
            .args(["--broker", &self.broker_url()])
            .args(self.certs.flags("admin"))
            .args(["writers", "--volume", "shared", "--json"])
            .env_remove("QUIESCE_BROKER")
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let doc: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        Some(
            doc["volumes"][0]["writers"]
                .as_array()?
                .iter()
                .map(|w| {
                    (
                        w["node"].as_str().unwrap_or("").to_string(),
                        w["writer"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect(),
        )
    }

    /// Recent logs of the daemons, for failure messages.
    pub fn logs(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut text = String::new();
        if let Some(b) = &self.broker {
            text.push_str(&format!("--- broker:\n{}\n", tail(b.log())));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(h) = &n.host {
                text.push_str(&format!("--- {} host:\n{}\n", NODES[i], tail(h.log())));
            }
        }
        for app in App::ALL {
            if let Some(a) = &self.apps[app.index()] {
                text.push_str(&format!("--- {}:\n{}\n", app.name(), tail(a.log())));
            }
        }
        text
    }

    /// `quiesce snapshot …` on node `i` through its host's bus, inside its namespace.
    pub fn cli(&self, i: usize, args: &[&str]) -> Command {
        let mut command = self.net.command(i, &self.bins.cli);
        command
            .args(args)
            .args(["--bus", &self.nodes[i].bus.address])
            .env_remove("QUIESCE_BROKER");
        command
    }

    /// Starts `quiesce snapshot create --volume shared --json` on node `i`.
    pub fn spawn_create(&self, i: usize) -> std::process::Child {
        self.cli(i, &["snapshot", "create", "--volume", "shared", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn finish(&self, child: std::process::Child, what: &str) -> Finished {
        finish(child, Duration::from_secs(180), what)
    }

    /// Every set the broker has on record, oldest first (asked through node `i`'s host).
    pub fn list_sets(&self, i: usize) -> Result<Vec<SetRecord>, String> {
        let output = self
            .cli(i, &["snapshot", "list", "--json"])
            .output()
            .unwrap();
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| format!("not a list of records: {e}"))
    }

    /// Runs the backup recipe `examples/restic-backup.sh` as written, on node2, as a backup
    /// tool would: only `quiesce`, `restic` and `jq` on PATH and the bus of node2's host.
    pub fn run_backup(&self) -> Finished {
        let script = quiesce_testbed::workspace_root().join("examples/restic-backup.sh");
        let mut command = self.net.command(SQLITE_NODE, &script);
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        command
            .arg("shared")
            .env("PATH", path)
            .env("QUIESCE_BUS", &self.nodes[SQLITE_NODE].bus.address)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.restic_env(&mut command);
        finish(
            command.spawn().unwrap(),
            Duration::from_secs(600),
            "examples/restic-backup.sh",
        )
    }

    /// Where node `i`'s probe writer logs its calls.
    pub fn probe_events(&self, i: usize) -> &Path {
        &self.nodes[i].probe_events
    }

    /// Tells node `i`'s probe writer what to do from its next call on (`hang_in = "freeze"`, …);
    /// None: behave.
    pub fn order_probe(&self, i: usize, orders: Option<&str>) {
        let control = &self.nodes[i].probe_control;
        match orders {
            Some(text) => {
                let temp = control.with_extension("tmp");
                std::fs::write(&temp, text).unwrap();
                std::fs::rename(&temp, control).unwrap();
            }
            None => {
                let _ = std::fs::remove_file(control);
            }
        }
    }

    /// Lets node `i`'s probe writer's hanging call return: opens its FIFO for writing once
    /// the writer waits on it (within `timeout`). False when no one waited.
    pub fn release_probe(&self, i: usize, timeout: Duration) -> bool {
        quiesce_testbed::release_fifo(&self.nodes[i].probe_fifo, timeout)
    }

    /// Reads every application's ack log up to now.
    pub fn refresh_acks(&mut self) {
        for log in &mut self.acks {
            log.refresh();
        }
    }

    /// Waits until every running application has acknowledged a write after `after_ns`.
    pub fn wait_writing(&mut self, after_ns: u64, timeout: Duration) -> Result<(), String> {
        let stalled = |lab: &mut Lab| -> Vec<String> {
            lab.refresh_acks();
            lab.acks
                .iter()
                .filter(|l| l.live && l.last().is_none_or(|(_, at)| at <= after_ns))
                .map(|l| l.app.clone())
                .collect()
        };
        if poll_until(timeout, || stalled(self).is_empty()) {
            return Ok(());
        }
        Err(format!(
            "{} acknowledged no write within {timeout:?}",
            stalled(self).join(", ")
        ))
    }

    /// The snapshots on the volume now.
    pub fn snapshots(&self) -> Vec<PathBuf> {
        self.volume.snapshots()
    }

    /// Whether each loader and the buffering app still run (a crash of one is a lab failure).
    pub fn check_apps_alive(&mut self) -> Result<(), String> {
        for c in self.loaders.iter_mut().chain(&mut self.buffering_app) {
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}):\n{}",
                    c.stderr.display(),
                    c.log()
                ));
            }
        }
        Ok(())
    }

    pub fn pg(&self) -> &PgServer {
        &self.pg
    }

    pub fn now() -> u64 {
        unix_ns()
    }
}

/// The first line a child prints on stdout (its readiness line).
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    let stdout = child.child.stdout.take().expect("stdout is piped");
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).unwrap();
    // Keep the pipe open (and drained) so that later lines never block the child.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    line
}

/// Waits, for the probe writer of a node, until its events file (from `offset` on) shows
/// the start of `call`; false when it does not within `timeout`, or when `set` (the requester's
/// process) ends first.
pub fn wait_probe_call(
    events: &Path,
    offset: usize,
    call: &str,
    set: &mut std::process::Child,
    timeout: Duration,
) -> bool {
    let line = format!("probe {call}");
    let called = || {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        text.get(offset..)
            .is_some_and(|t| t.lines().any(|l| l == line))
    };
    poll_until(timeout, || {
        called() || set.try_wait().ok().flatten().is_some()
    }) && called()
}

/// Whether `condition` became true within `timeout` (the soak records a condition that does not
/// come true instead of failing): [`quiesce_testbed::poll_until`] on a `bool`.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    quiesce_testbed::poll_until(timeout, || condition().then_some(())).is_some()
}
