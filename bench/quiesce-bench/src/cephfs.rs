//! Item 6: CephFS. A bare CephFS snapshot against the freeze window of a set with each node's
//! flush, on three nodes, and what the flush costs.
//!
//! The test bed's Ceph cluster (one mon, mgr, OSD on memstore, MDS) and four `ceph-fuse`
//! clients of its file system, each with a cache of its own: the broker's (capability `rws`: it
//! takes the snapshots with the `cephfs` provider, `mkdir DIR/.snap/SET`) and one per node
//! (`rw`). Three hosts, each on a private dbus-daemon of its own, each with its node flush of
//! its mount (`[volumes.shared] mount`, `flush`) and the example application writer writing on
//! that mount: node1's stores its records through a shared mapping it never syncs
//! (`app-writer --mmap`), dirty pages in node1's kernel that only the flush sends to Ceph;
//! node2's and node3's append to a log (`write`, `fsync` at prepare).
//!
//! Two loads: the applications alone (node1's mapping gains a few pages a second: little for the
//! flush to write), and the applications with a burst of [`DIRTY_MB`] MB of dirty pages on every
//! node before every set (the bench writes them into a shared mapping of a file of its own on
//! each node's mount, never synced), a node whose applications wrote a lot since the last set.
//!
//! The same sets run with `flush = "syncfs"` and with `flush = "none"` on every host (the hosts
//! and applications restarted in between, the Ceph cluster, the mounts and the broker kept), in
//! alternating blocks so that the cluster's ageing is not charged to one mode; every block ends
//! with `sync -f` of each node's mount (untimed), so the next starts with nothing dirty. After
//! every set, the baseline: a bare `mkdir .snap/NAME` (then `rmdir`) on the broker's mount, the
//! applications writing as in the sets (and the burst written again first, in the second load).

use crate::daemons::{self, Broker};
use crate::stats::Sample;
use quiesce_proto::SetRecord;
use quiesce_testbed::{Bus, CephCluster, CephMount, Child};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODES: usize = 3;

/// The burst of dirty pages every node gets before each set of the second load, in MB.
pub const DIRTY_MB: usize = 8;

const PAGE: usize = 4096;

#[derive(Debug, Clone, serde::Serialize)]
pub struct CephfsResult {
    pub nodes: usize,
    /// How long the Ceph cluster took to come up (not part of any measurement).
    pub ceph_bring_up_ms: f64,
    /// The applications alone, then with [`DIRTY_MB`] MB dirty per node before every set.
    pub loads: Vec<LoadResult>,
}

/// One load: the baseline and the sets with and without the flush.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadResult {
    pub load: String,
    /// Dirty pages written on each node before every set and every bare snapshot, in MB.
    pub dirty_mb_per_node: usize,
    /// The baseline: a bare `mkdir DIR/.snap/NAME` on the broker's mount (the provider's
    /// syscall, nothing frozen), after every set of both modes, applications writing.
    pub bare_snap: Sample,
    pub syncfs: FlushRun,
    pub none: FlushRun,
    /// What the flush costs: freeze window median with `syncfs` minus with `none`.
    pub flush_cost_ms: f64,
    /// Where: the median of each phase inside the window (`freeze`, `snapshot`, `thaw`) with
    /// `syncfs` minus with `none`.
    pub flush_cost_by_phase_ms: BTreeMap<String, f64>,
}

/// The sets with one `flush` mode on every host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlushRun {
    pub flush: String,
    /// The bare snapshots taken between these sets.
    pub bare_snap: Sample,
    pub freeze_window: Sample,
    pub provider: Sample,
    /// The set asked for over gRPC, to the broker's answer.
    pub end_to_end: Sample,
    /// Each phase's duration, by phase name.
    pub phases: BTreeMap<String, Sample>,
    /// Each node's flush writer (`flush.shared`): its freeze as the broker saw it
    /// (`call_us["freeze"]`), by node.
    pub flush_freeze: BTreeMap<String, Sample>,
    /// The same writer's own time for the flush (its `flush_ms` report), by node.
    pub flush_ms: BTreeMap<String, Sample>,
    /// Each node's application writer's freeze as the broker saw it, by node.
    pub app_freeze: BTreeMap<String, Sample>,
}

/// Fields drop in order: the processes before the mounts they use.
struct Node {
    _app: Child,
    host: Child,
    _bus: Bus,
}

/// A file of the bench's own on a node's mount, mapped shared: its pages are dirtied in the
/// node's kernel and never synced by the bench.
struct Dirty {
    map: memmap2::MmapMut,
    round: u8,
}

impl Dirty {
    fn create(path: &Path) -> anyhow::Result<Dirty> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len((DIRTY_MB << 20) as u64)?;
        // SAFETY: the file is the bench's own; nothing else maps or truncates it.
        let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        Ok(Dirty { map, round: 0 })
    }

    /// Writes one byte into every page: the whole mapping dirty.
    fn dirty(&mut self) {
        self.round = self.round.wrapping_add(1);
        for page in self.map.chunks_mut(PAGE) {
            page[0] = self.round;
        }
    }
}

struct Rig {
    nodes: Vec<Node>,
    dirty: Vec<Dirty>,
    broker: Broker,
    node_mounts: Vec<CephMount>,
    broker_mount: CephMount,
    _ceph: CephCluster,
    bin: PathBuf,
    dir: PathBuf,
    certs: PathBuf,
    /// The volume directory, relative to the root of the file system.
    volume_dir: String,
}

/// Runs item 6: `sets` sets per flush mode, in `blocks` alternating blocks per mode.
pub async fn measure(
    dir: &Path,
    bin: &Path,
    sets: usize,
    blocks: usize,
) -> anyhow::Result<CephfsResult> {
    let dir = dir.join("cephfs");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let ceph = CephCluster::start();
    let ceph_bring_up_ms = started.elapsed().as_secs_f64() * 1000.0;
    let names: Vec<String> = (1..=NODES).map(|n| format!("node{n}")).collect();
    let certs = dir.join("certs");
    daemons::certs(bin, &certs, &names)?;
    let volume_dir = format!("bench-volume-{}", std::process::id());
    let broker_mount = ceph.mount(
        None,
        &ceph.client_key("bench-broker", "rws"),
        &ceph.mountpoint("bench-broker"),
    );
    std::fs::create_dir(broker_mount.mountpoint.join(&volume_dir))?;
    let node_mounts: Vec<CephMount> = names
        .iter()
        .map(|name| {
            ceph.mount(
                None,
                &ceph.client_key(&format!("bench-{name}"), "rw"),
                &ceph.mountpoint(&format!("bench-{name}")),
            )
        })
        .collect();
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "catalog = {:?}\nhold_limit_ms = 10000\nlease_ms = 5000\n[volumes.shared]\nprovider = \"cephfs\"\ndirectory = {:?}\n",
            dir.join("catalog.sqlite"),
            broker_mount.mountpoint.join(&volume_dir),
        ),
    )?;
    let broker = Broker::start(bin, &certs, &config, dir.join("broker.log"))?;
    let mut dirty = vec![];
    for m in &node_mounts {
        let dir = m.mountpoint.join(&volume_dir).join("bench-dirty");
        std::fs::create_dir_all(&dir)?;
        dirty.push(Dirty::create(&dir.join(format!("{}.bin", m.client.name)))?);
    }
    let mut rig = Rig {
        nodes: vec![],
        dirty,
        broker,
        node_mounts,
        broker_mount,
        _ceph: ceph,
        bin: bin.into(),
        dir,
        certs,
        volume_dir,
    };

    type Runs = Vec<(SetRecord, Duration, Duration)>;
    let mut runs: BTreeMap<(bool, &str), Runs> = BTreeMap::new();
    let per_block = sets.div_ceil(blocks);
    for block in 0..blocks {
        for flush in ["syncfs", "none"] {
            rig.start_nodes(flush, block).await?;
            let count = per_block.min(sets - block * per_block);
            for burst in [false, true] {
                let done = rig.sets(flush, burst, block, count).await?;
                runs.entry((burst, flush)).or_default().extend(done);
            }
            rig.stop_nodes().await?;
        }
    }
    let loads = [false, true]
        .into_iter()
        .map(|burst| {
            let syncfs = summarise("syncfs", &runs[&(burst, "syncfs")]);
            let none = summarise("none", &runs[&(burst, "none")]);
            let bare: Vec<Duration> = [&runs[&(burst, "syncfs")], &runs[&(burst, "none")]]
                .into_iter()
                .flatten()
                .map(|(_, _, b)| *b)
                .collect();
            let by_phase = ["freeze", "snapshot", "thaw"]
                .into_iter()
                .filter_map(|p| {
                    let median = |run: &FlushRun| run.phases.get(p).map(|s| s.median_ms);
                    Some((p.to_string(), median(&syncfs)? - median(&none)?))
                })
                .collect();
            LoadResult {
                load: if burst {
                    format!("apps + {DIRTY_MB} MB dirty per node")
                } else {
                    "apps".into()
                },
                dirty_mb_per_node: if burst { DIRTY_MB } else { 0 },
                bare_snap: Sample::of(&bare),
                flush_cost_ms: syncfs.freeze_window.median_ms - none.freeze_window.median_ms,
                flush_cost_by_phase_ms: by_phase,
                syncfs,
                none,
            }
        })
        .collect();
    Ok(CephfsResult {
        nodes: NODES,
        ceph_bring_up_ms,
        loads,
    })
}

impl Rig {
    /// The three hosts with node flush `flush`, and their applications; returns once the broker
    /// knows every writer.
    async fn start_nodes(&mut self, flush: &str, block: usize) -> anyhow::Result<()> {
        for i in 0..NODES {
            let name = format!("node{}", i + 1);
            let home = self.dir.join(format!("{name}-{flush}-{block}"));
            std::fs::create_dir_all(&home)?;
            let mount = &self.node_mounts[i].mountpoint;
            let config = home.join("host.toml");
            std::fs::write(
                &config,
                format!(
                    "node = {name:?}\nhold_limit_ms = 10000\n\n[volumes.shared]\nmount = {:?}\nflush = {flush:?}\n",
                    mount
                ),
            )?;
            let (host, bus) = daemons::start_host(
                &self.bin,
                &self.certs,
                &self.broker,
                &name,
                &config,
                home.join("host.log"),
            )
            .await?;
            // The application on its node's own mount, in a directory of this block's.
            let data = mount
                .join(&self.volume_dir)
                .join(format!("app-{name}-{flush}-{block}"));
            let mut command = Command::new(self.bin.join("app-writer"));
            command
                .args(["--bus", &bus.address, "--id", "app", "--volume", "shared"])
                .arg("--data")
                .arg(&data)
                .stdout(Stdio::piped());
            if i == 0 {
                command.args(["--mmap", "--mmap-records", "1000000"]);
            }
            let mut app = Child::spawn(command, home.join("app-writer.log"));
            let mut line = String::new();
            BufReader::new(app.child.stdout.take().expect("piped")).read_line(&mut line)?;
            anyhow::ensure!(
                line.starts_with("registered "),
                "{name}'s app writer did not register: {line:?}\n{}",
                app.log()
            );
            self.nodes.push(Node {
                _app: app,
                host,
                _bus: bus,
            });
        }
        self.broker
            .wait_nodes(NODES, Duration::from_secs(60))
            .await?;
        self.wait_writers(2 * NODES).await
    }

    /// Stops the hosts and applications, and writes back what the nodes' kernels hold of the
    /// volume (`sync -f`, untimed); returns once the broker has dropped every node.
    async fn stop_nodes(&mut self) -> anyhow::Result<()> {
        self.nodes.clear();
        for m in &self.node_mounts {
            quiesce_testbed::run(Command::new("sync").arg("-f").arg(&m.mountpoint));
        }
        self.broker.wait_nodes(0, Duration::from_secs(60)).await
    }

    /// The burst: every node's mapping dirty (about [`DIRTY_MB`] MB each).
    fn dirty_all(&mut self) {
        for d in &mut self.dirty {
            d.dirty();
        }
    }

    async fn wait_writers(&self, count: usize) -> anyhow::Result<()> {
        self.broker
            .wait_writers("shared", count, Duration::from_secs(30), || self.logs())
            .await
    }

    fn logs(&self) -> String {
        let mut text = format!("broker:\n{}", self.broker.process.log());
        for (i, n) in self.nodes.iter().enumerate() {
            text.push_str(&format!("node{}:\n{}", i + 1, n.host.log()));
        }
        text
    }

    /// `count` sets after two to warm up, each followed by a bare snapshot, with the burst of
    /// dirty pages before each of both when `burst`: (record, time to the broker's answer, the
    /// bare snapshot's time).
    async fn sets(
        &mut self,
        flush: &str,
        burst: bool,
        block: usize,
        count: usize,
    ) -> anyhow::Result<Vec<(SetRecord, Duration, Duration)>> {
        let tag = if burst { "burst" } else { "apps" };
        let mut client = self.broker.sets().await?;
        let snapdir = self
            .broker_mount
            .mountpoint
            .join(&self.volume_dir)
            .join(".snap");
        let mut done = vec![];
        for i in 0..count + 2 {
            if burst {
                self.dirty_all();
            }
            let (record, took) = self.broker.set(&mut client, "shared").await.map_err(|e| {
                anyhow::anyhow!("a set with flush = {flush:?}: {e:#}\n{}", self.logs())
            })?;
            check_flush(&record, flush)?;
            if burst {
                self.dirty_all();
            }
            let bare = one_snap(&snapdir.join(format!("bare-{tag}-{flush}-{block}-{i}")))?;
            if i >= 2 {
                done.push((record, took, bare));
            }
        }
        Ok(done)
    }
}

/// One bare CephFS snapshot, `mkdir .snap/NAME` as the provider makes it (the syscall), timed;
/// removed after (`rmdir`), untimed.
fn one_snap(path: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    std::fs::create_dir(path).map_err(|e| anyhow::anyhow!("mkdir {}: {e}", path.display()))?;
    let took = started.elapsed();
    std::fs::remove_dir(path).map_err(|e| anyhow::anyhow!("rmdir {}: {e}", path.display()))?;
    Ok(took)
}

/// Every node's flush writer ran, in mode `flush`: the set measured what it says.
fn check_flush(record: &SetRecord, flush: &str) -> anyhow::Result<()> {
    for n in 1..=NODES {
        let node = format!("node{n}");
        let writer = record
            .writers
            .iter()
            .find(|w| w.writer.node == node && w.writer.writer == "flush.shared")
            .ok_or_else(|| anyhow::anyhow!("no flush.shared of {node} in set {}", record.id))?;
        anyhow::ensure!(
            writer.reports.get("flush_mode").map(String::as_str) == Some(flush)
                && writer.call_us.contains_key("freeze"),
            "{node}'s flush in set {} is not a {flush:?} flush that ran: {writer:?}",
            record.id
        );
    }
    Ok(())
}

fn summarise(flush: &str, runs: &[(SetRecord, Duration, Duration)]) -> FlushRun {
    let ms = |f: &dyn Fn(&SetRecord) -> Option<u64>| {
        Sample::of_ms(
            &runs
                .iter()
                .filter_map(|(r, _, _)| f(r))
                .map(|v| v as f64)
                .collect::<Vec<_>>(),
        )
    };
    let (mut flush_freeze, mut flush_ms, mut app_freeze) =
        (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (record, _, _) in runs {
        for w in &record.writers {
            let node = w.writer.node.clone();
            let freeze_ms = w.call_us.get("freeze").map(|us| *us as f64 / 1000.0);
            match w.writer.writer.as_str() {
                "flush.shared" => {
                    if let Some(v) = freeze_ms {
                        flush_freeze
                            .entry(node.clone())
                            .or_insert_with(Vec::new)
                            .push(v);
                    }
                    if let Some(v) = w.reports.get("flush_ms").and_then(|v| v.parse().ok()) {
                        flush_ms.entry(node).or_insert_with(Vec::new).push(v);
                    }
                }
                "app" => {
                    if let Some(v) = freeze_ms {
                        app_freeze.entry(node).or_insert_with(Vec::new).push(v);
                    }
                }
                _ => {}
            }
        }
    }
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (r, _, _) in runs {
        for p in &r.phases {
            phases
                .entry(p.phase.to_string())
                .or_default()
                .push((p.end_ms - p.start_ms) as f64);
        }
    }
    let samples = |m: BTreeMap<String, Vec<f64>>| {
        m.into_iter()
            .map(|(k, v)| (k, Sample::of_ms(&v)))
            .collect::<BTreeMap<_, _>>()
    };
    FlushRun {
        flush: flush.into(),
        bare_snap: Sample::of(&runs.iter().map(|(_, _, b)| *b).collect::<Vec<_>>()),
        freeze_window: ms(&|r| r.freeze_window_ms),
        provider: ms(&|r| r.provider_ms),
        end_to_end: Sample::of(&runs.iter().map(|(_, d, _)| *d).collect::<Vec<_>>()),
        phases: samples(phases),
        flush_freeze: samples(flush_freeze),
        flush_ms: samples(flush_ms),
        app_freeze: samples(app_freeze),
    }
}
