//! Items 2 and 4: full sets on a three-node cluster, and the cost to PostgreSQL (pgbench).
//!
//! The real daemons on loopback, over mutual TLS: a broker snapshotting the btrfs volume, and
//! three hosts, each on a private dbus-daemon of its own — node1 with the PostgreSQL writer (the
//! server's data directory on the volume), node2 with the SQLite writer (a database another
//! thread keeps writing to), node3 with the file-buffering writer (the reference buffering app
//! writing records) and the example application writer over D-Bus. Sets are asked for the way
//! backup software does: `quiesce snapshot create` on node2.

use crate::daemons::{self, Broker};
use crate::stats::Sample;
use quiesce_proto::SetRecord;
use quiesce_testbed::{run, BtrfsVolume, Bus, Child};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterResult {
    /// The physical limit (item 1), measured between the sets on the same volume with the same
    /// applications writing: `btrfs subvolume snapshot`, and the ioctl the provider calls.
    pub bare_command: Sample,
    pub bare_ioctl: Sample,
    pub freeze_window: Sample,
    pub provider: Sample,
    pub end_to_end: Sample,
    /// Each phase's duration, by phase name.
    pub phases: BTreeMap<String, Sample>,
    /// Each writer's freeze and thaw calls as the broker saw them (sent to answered), by
    /// `node/writer call`.
    pub calls: BTreeMap<String, Sample>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PgbenchRun {
    pub tps: f64,
    /// Per-transaction latency, from pgbench's transaction log.
    pub latency: Sample,
    pub snapshots: usize,
    /// How many of those sets the PostgreSQL writer ran `CHECKPOINT` in (the others it skipped:
    /// less WAL than `checkpoint_after_wal_mb` since the last checkpoint).
    pub checkpoints: usize,
    /// Every transaction's latency, for merging runs (not in the report).
    #[serde(skip)]
    latencies: Vec<f64>,
}

impl PgbenchRun {
    /// Two runs of equal length as one: mean TPS, all latencies.
    fn merge(a: PgbenchRun, b: PgbenchRun) -> PgbenchRun {
        let latencies: Vec<f64> = a.latencies.iter().chain(&b.latencies).copied().collect();
        PgbenchRun {
            tps: (a.tps + b.tps) / 2.0,
            latency: Sample::of_ms(&latencies),
            snapshots: a.snapshots + b.snapshots,
            checkpoints: a.checkpoints + b.checkpoints,
            latencies,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PgbenchResult {
    pub clients: usize,
    pub seconds: u64,
    pub without: PgbenchRun,
    pub with: PgbenchRun,
}

use quiesce_testbed::postgres::{as_postgres, chown_postgres, free_port, pg_bin};

fn postgres_owns(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    chown_postgres(path);
}

/// A SQLite "application": inserts a row every millisecond until stopped.
fn sqlite_writer(db: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let run = || -> anyhow::Result<()> {
            let mut conn = rusqlite::Connection::open(&db)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.busy_timeout(Duration::from_secs(30))?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, at INTEGER)",
            )?;
            while !stop.load(Ordering::Relaxed) {
                let tx = conn.transaction()?;
                tx.execute("INSERT INTO orders (at) VALUES (strftime('%s','now'))", [])?;
                tx.commit()?;
                // The application's own pace, not a synchronisation.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        };
        if let Err(e) = run() {
            eprintln!("the SQLite writer stopped: {e}");
        }
    })
}

struct Node {
    host: Child,
    bus: Bus,
}

/// The running cluster; everything stops when it is dropped.
pub struct Lab {
    bin: PathBuf,
    dir: PathBuf,
    pg: PathBuf,
    pg_data: PathBuf,
    pg_socket: PathBuf,
    pg_port: u16,
    broker: Broker,
    nodes: Vec<Node>,
    apps: Vec<Child>,
    sqlite_stop: Arc<AtomicBool>,
    sqlite: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sqlite_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sqlite.take() {
            let _ = t.join();
        }
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.pg_data)
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Lab {
    pub async fn start(dir: &Path, bin: &Path, volume: &BtrfsVolume) -> anyhow::Result<Lab> {
        let dir = dir.join("lab");
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = (1..=3).map(|n| format!("node{n}")).collect();
        let certs = dir.join("certs");
        daemons::certs(bin, &certs, &names)?;
        let config = dir.join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "catalog = {:?}\nhold_limit_ms = 10000\nlease_ms = 5000\n[volumes.shared]\nprovider = \"btrfs\"\nsubvolume = {:?}\nsnapshots = {:?}\n",
                dir.join("catalog.sqlite"),
                volume.data,
                volume.snapshots
            ),
        )?;
        let broker = Broker::start(bin, &certs, &config, dir.join("broker.log"))?;

        // PostgreSQL on the volume, for node1.
        let pg = pg_bin();
        let pg_data = volume.data.join("pg");
        postgres_owns(&pg_data);
        std::fs::set_permissions(
            &pg_data,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        run(as_postgres("initdb").arg("-D").arg(&pg_data).args([
            "--auth=trust",
            "--username=postgres",
            "--locale=C",
            "--no-instructions",
        ]));
        let pg_socket = dir.join("pg-socket");
        postgres_owns(&pg_socket);
        let pg_port = free_port();
        let pg_log = dir.join("pg-log");
        postgres_owns(&pg_log);
        quiesce_testbed::postgres::start(
            as_postgres("pg_ctl"),
            &pg_data,
            &pg_log.join("server.log"),
            pg_port,
            &pg_socket,
            &[
                "listen_addresses=''",
                "shared_buffers=128MB",
                "max_connections=50",
            ],
        );

        let sqlite_dir = volume.data.join("sqlite");
        std::fs::create_dir_all(&sqlite_dir)?;
        let sqlite_db = sqlite_dir.join("shop.db");
        let sqlite_stop = Arc::new(AtomicBool::new(false));
        let sqlite = sqlite_writer(sqlite_db.clone(), sqlite_stop.clone());
        // The writer's database must exist before the host checks it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sqlite_db.exists() {
            anyhow::ensure!(Instant::now() < deadline, "the SQLite writer did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let buffered = volume.data.join("buffered");
        let socket = dir.join("buffering.sock");
        let plugin_tables = [
            (
                "libquiesce_writer_postgres.so",
                format!(
                    "[plugins.postgres]\nid = \"pg\"\nhost = {:?}\nport = {pg_port}\nvolume = \"shared\"\nvolume_path = {:?}\nsubvolume = {:?}\n",
                    pg_socket, volume.mount, volume.data
                ),
            ),
            (
                "libquiesce_writer_sqlite.so",
                format!(
                    "[plugins.sqlite]\nid = \"shop\"\nvolume = \"shared\"\ndatabases = [{:?}]\n",
                    sqlite_db
                ),
            ),
            (
                "libquiesce_writer_filebuf.so",
                format!(
                    "[[plugins.filebuf.writers]]\nid = \"buffered\"\nvolume = \"shared\"\nfiles = [{:?}]\nsocket = {:?}\n",
                    buffered.join("records.log"),
                    socket
                ),
            ),
        ];
        let mut apps = vec![];
        let mut command = Command::new(bin.join("buffering-app"));
        command
            .arg("--data")
            .arg(&buffered)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null());
        apps.push(Child::spawn(command, dir.join("buffering-app.log")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !buffered.join("records.log").exists() || !socket.exists() {
            anyhow::ensure!(Instant::now() < deadline, "the buffering app did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let mut nodes = vec![];
        for (name, (lib, table)) in names.iter().zip(plugin_tables) {
            let home = dir.join(name);
            let plugins = home.join("plugins");
            std::fs::create_dir_all(&plugins)?;
            std::fs::copy(bin.join(lib), plugins.join(lib))?;
            let config = home.join("host.toml");
            std::fs::write(
                &config,
                format!(
                    "node = {name:?}\nplugin_dir = {:?}\nhold_limit_ms = 10000\n\n{table}",
                    plugins.display().to_string()
                ),
            )?;
            let (host, bus) =
                daemons::start_host(bin, &certs, &broker, name, &config, home.join("host.log"))
                    .await?;
            nodes.push(Node { host, bus });
        }
        // The application writer on node3, over D-Bus.
        let mut command = Command::new(bin.join("app-writer"));
        command
            .args([
                "--bus",
                &nodes[2].bus.address,
                "--id",
                "app",
                "--volume",
                "shared",
            ])
            .arg("--data")
            .arg(volume.data.join("app"))
            .stdout(Stdio::null());
        apps.push(Child::spawn(command, dir.join("app-writer.log")));
        broker.wait_nodes(3, Duration::from_secs(30)).await?;
        let lab = Lab {
            bin: bin.into(),
            dir,
            pg,
            pg_data,
            pg_socket,
            pg_port,
            broker,
            nodes,
            apps,
            sqlite_stop,
            sqlite: Some(sqlite),
        };
        lab.wait_writers(4).await?;
        Ok(lab)
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
        for a in &self.apps {
            text.push_str(&a.log());
        }
        text
    }

    /// Runs `quiesce ARGS` through node `i`'s host, as backup software on that node would.
    fn quiesce(&self, args: &[&str], i: usize) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(self.bin.join("quiesce"))
            .args(args)
            .args(["--bus", &self.nodes[i].bus.address])
            .output()?)
    }

    /// One `quiesce snapshot create` on node2, timed, and the snapshot deleted after.
    fn snapshot(&self) -> anyhow::Result<(SetRecord, Duration)> {
        let started = Instant::now();
        let out = self.quiesce(&["snapshot", "create", "--volume", "shared", "--json"], 1)?;
        let took = started.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "quiesce snapshot create: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        let record: SetRecord = serde_json::from_slice(&out.stdout)?;
        let del = self.quiesce(&["snapshot", "delete", &record.id.0], 1)?;
        anyhow::ensure!(
            del.status.success(),
            "quiesce snapshot delete: {}",
            String::from_utf8_lossy(&del.stderr)
        );
        Ok((record, took))
    }

    /// `reps` sets after two to warm up, each followed by a bare snapshot with the command and
    /// one with the provider's ioctl, so that all three meet the same conditions.
    pub async fn sets(&self, volume: &BtrfsVolume, reps: usize) -> anyhow::Result<ClusterResult> {
        for _ in 0..2 {
            self.snapshot()?;
        }
        let mut records = vec![];
        let (mut command, mut ioctl) = (vec![], vec![]);
        let provider = quiesce_provider::Btrfs::new(volume.data.clone(), volume.snapshots.clone());
        for i in 0..reps {
            records.push(self.snapshot()?);
            command.push(crate::bare::one_command(volume, &format!("bare-{i}")));
            ioctl.push(crate::bare::one_ioctl(
                &provider,
                &format!("bare-ioctl-{i}"),
            )?);
        }
        let ms = |f: &dyn Fn(&SetRecord) -> Option<u64>| -> Sample {
            Sample::of_ms(
                &records
                    .iter()
                    .filter_map(|(r, _)| f(r))
                    .map(|v| v as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (r, _) in &records {
            for p in &r.phases {
                phases
                    .entry(p.phase.to_string())
                    .or_default()
                    .push((p.end_ms - p.start_ms) as f64);
            }
        }
        let mut calls: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (r, _) in &records {
            for w in &r.writers {
                for call in ["freeze", "thaw"] {
                    if let Some(us) = w.call_us.get(call) {
                        calls
                            .entry(format!("{}/{} {call}", w.writer.node, w.writer.writer))
                            .or_default()
                            .push(*us as f64 / 1000.0);
                    }
                }
            }
        }
        Ok(ClusterResult {
            bare_command: Sample::of(&command),
            bare_ioctl: Sample::of(&ioctl),
            calls: calls
                .into_iter()
                .map(|(k, v)| (k, Sample::of_ms(&v)))
                .collect(),
            freeze_window: ms(&|r| r.freeze_window_ms),
            provider: ms(&|r| r.provider_ms),
            end_to_end: Sample::of(&records.iter().map(|(_, d)| *d).collect::<Vec<_>>()),
            phases: phases
                .into_iter()
                .map(|(k, v)| (k, Sample::of_ms(&v)))
                .collect(),
        })
    }

    fn pgbench_command(&self) -> Command {
        let mut command = Command::new(self.pg.join("pgbench"));
        command
            .arg("-h")
            .arg(&self.pg_socket)
            .args(["-p", &self.pg_port.to_string(), "-U", "postgres"])
            .env("PGDATABASE", "postgres");
        command
    }

    /// One pgbench run of `seconds`; with `every`, a snapshot is taken at that interval meanwhile.
    async fn pgbench_run(
        self: &Arc<Self>,
        name: &str,
        clients: usize,
        seconds: u64,
        every: Option<Duration>,
    ) -> anyhow::Result<PgbenchRun> {
        let logs = self.dir.join(format!("pgbench-{name}"));
        std::fs::create_dir_all(&logs)?;
        let mut command = self.pgbench_command();
        command
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                "2",
                "-T",
                &seconds.to_string(),
            ])
            .args(["-l", "--log-prefix", "txn"])
            .current_dir(&logs);
        let pgbench = tokio::task::spawn_blocking(move || command.output());
        let (mut snapshots, mut checkpoints) = (0, 0);
        if let Some(every) = every {
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if Instant::now() + Duration::from_secs(1) >= end {
                    break;
                }
                let lab = self.clone();
                let (record, _) = tokio::task::spawn_blocking(move || lab.snapshot()).await??;
                snapshots += 1;
                checkpoints += usize::from(record.writers.iter().any(|w| {
                    w.writer.writer == "pg"
                        && w.reports.get("checkpoint").map(String::as_str) == Some("done")
                }));
            }
        }
        let out = pgbench.await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "pgbench failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tps = stdout
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l["tps = ".len()..].split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output: {stdout}"))?;
        // Transaction logs: `client_id transaction_no time_us script_no epoch epoch_us`.
        let mut latencies = vec![];
        for entry in std::fs::read_dir(&logs)? {
            for line in std::fs::read_to_string(entry?.path())?.lines() {
                if let Some(us) = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    latencies.push(us / 1000.0);
                }
            }
        }
        Ok(PgbenchRun {
            tps,
            latency: Sample::of_ms(&latencies),
            snapshots,
            checkpoints,
            latencies,
        })
    }

    /// pgbench TPS and latency without snapshots, then with one every 5 s.
    pub async fn pgbench(self, seconds: u64) -> anyhow::Result<PgbenchResult> {
        let out = self
            .pgbench_command()
            .args(["-i", "-s", "10", "-q"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lab = Arc::new(self);
        let clients = 4;
        // Warm the caches first: the first run would otherwise pay for them alone.
        lab.pgbench_run("warm-up", clients, 10, None).await?;
        // Alternated, half the time each twice (without, with, without, with): the database
        // grows and ages as pgbench runs, and running one mode after the other would charge
        // that drift to the second.
        let half = (seconds / 2).max(5);
        let every = Some(Duration::from_secs(5));
        let a1 = lab.pgbench_run("without-1", clients, half, None).await?;
        let b1 = lab.pgbench_run("with-1", clients, half, every).await?;
        let a2 = lab.pgbench_run("without-2", clients, half, None).await?;
        let b2 = lab.pgbench_run("with-2", clients, half, every).await?;
        Ok(PgbenchResult {
            clients,
            seconds: 2 * half,
            without: PgbenchRun::merge(a1, a2),
            with: PgbenchRun::merge(b1, b2),
        })
    }
}
