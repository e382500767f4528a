//! `quiesce-bench`: how long applications are held, against the physical limit, and how the
//! broker scales. Run it with `scripts/bench` (it builds everything in release mode first; root:
//! it makes a btrfs volume on a loop device and starts PostgreSQL).
//!
//! In one run, side by side:
//! 1. the physical limit: a bare `btrfs subvolume snapshot` of the volume, nothing frozen (idle,
//!    and between the sets of 2 with the applications writing);
//! 2. a full set on a three-node cluster with PostgreSQL, SQLite and buffering writers: the freeze
//!    window, the end-to-end time of `quiesce snapshot create`, each phase and each writer's
//!    freeze and thaw;
//! 3. scale: one broker with 16 to 1,024 simulated nodes of 8 writers each (`nodesim`: the link
//!    protocol over mutual TLS in a process of its own, no writer work: the broker measured
//!    apart: overhead, its CPU inside and outside the window, RSS, bytes in the catalog and on
//!    the wire), and with 16, 64 and 256 real in-memory hosts (`swarm`: end to end); the
//!    coordination overhead is the freeze window minus provider time. Then `model`: the set
//!    machine in virtual time predicts 10,000 and 100,000 nodes with stragglers;
//! 4. the cost to applications: pgbench TPS and p99 / max latency without snapshots and with a
//!    snapshot every 5 s;
//! 5. the per-call overhead of a plugin writer through the ABI and of an app writer over D-Bus;
//! 6. CephFS: a bare `mkdir .snap/NAME` against the freeze window of three nodes with their node
//!    flush (`syncfs`) and without (`none`), on the test bed's Ceph cluster: what the flush costs.
//!
//! It prints a table with medians and ratios and writes a JSON report.

mod bare;
mod calls;
mod cephfs;
mod cluster;
mod daemons;
mod model;
mod nodesim;
mod scale;
mod stats;

use clap::{Parser, Subcommand};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "quiesce-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Fewer repetitions and shorter pgbench runs: a smoke run, not numbers to quote.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-report.json")]
    report: PathBuf,
    /// Node counts for the scale benchmark's swarm of real hosts.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    nodes: Vec<usize>,
    /// Node counts for the scale benchmark's simulated nodes (the broker measured apart).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024")]
    sim_nodes: Vec<usize>,
    /// Runtime threads of the node simulator: 1 leaves the broker the other core.
    #[arg(long, default_value_t = 1)]
    sim_threads: usize,
    /// Node counts the model predicts a set for (with item 3's measured broker CPU).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    model_nodes: Vec<usize>,
    /// Run only these items (1 bare snapshot, 2 cluster sets, 3 scale, 4 pgbench, 5 per call,
    /// 6 CephFS); all by default.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=6))]
    only: Vec<u8>,
}

#[derive(Subcommand)]
enum Sub {
    /// (internal) Run many hosts of in-memory writers in this process, attached to a broker.
    #[command(hide = true)]
    Swarm {
        #[arg(long)]
        url: String,
        #[arg(long)]
        certs: PathBuf,
        #[arg(long, default_value = "n")]
        prefix: String,
        #[arg(long)]
        nodes: usize,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long, default_value = "bench")]
        volume: String,
    },
    /// (internal) Simulate many nodes attached to a broker: the link protocol, no writers.
    #[command(hide = true)]
    Nodesim {
        #[arg(long)]
        url: String,
        #[arg(long)]
        certs: PathBuf,
        #[arg(long, default_value = "s")]
        prefix: String,
        #[arg(long)]
        nodes: usize,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long, default_value = "bench")]
        volume: String,
        /// Whose CPU to sample at the first freeze and the last thaw of each set.
        #[arg(long)]
        broker_pid: Option<u32>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Predict the freeze window of large clusters: the real set machine in virtual time.
    Model {
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        nodes: Vec<usize>,
        /// The broker's CPU per writer call; by default the largest simulated size's in the
        /// JSON report (`--report`), else issue 19's figure for the swarm (26 us).
        #[arg(long)]
        cpu_us_per_call: Option<f64>,
        #[arg(long, default_value_t = 200.0)]
        straggler_ms: f64,
        #[arg(long, default_value_t = 0.0)]
        provider_ms: f64,
    },
}

#[derive(Serialize)]
struct Report {
    bare_snapshot: Option<stats::Sample>,
    cluster: Option<cluster::ClusterResult>,
    scale: Vec<scale::ScaleResult>,
    scale_simulated: Vec<nodesim::SimResult>,
    model_assumptions: Option<model::Assumptions>,
    model: Vec<model::Prediction>,
    pgbench: Option<cluster::PgbenchResult>,
    calls: Option<calls::CallsResult>,
    cephfs: Option<cephfs::CephfsResult>,
    ratios: Ratios,
    targets: Vec<Target>,
}

#[derive(Serialize)]
struct Ratios {
    freeze_window_over_bare: Option<f64>,
    freeze_window_minus_bare_ms: Option<f64>,
    pgbench_tps_with_over_without: Option<f64>,
    plugin_call_over_in_memory: Option<f64>,
    dbus_call_over_in_memory: Option<f64>,
    coordination_256_over_16: Option<f64>,
    /// Simulated nodes: the broker apart.
    simulated_coordination_1024_over_64: Option<f64>,
    simulated_broker_cpu_1024_over_64: Option<f64>,
    /// The swarm's coordination at 256 nodes over the simulated nodes': what the simulation of
    /// real hosts on the broker's cores adds.
    swarm_over_simulated_coordination_256: Option<f64>,
    cephfs_window_syncfs_over_bare: Option<f64>,
    cephfs_window_none_over_bare: Option<f64>,
    cephfs_flush_cost_ms: Option<f64>,
    cephfs_burst_window_syncfs_over_bare: Option<f64>,
    cephfs_burst_flush_cost_ms: Option<f64>,
}

#[derive(Serialize)]
struct Target {
    what: String,
    target: String,
    measured: String,
    met: bool,
}

/// The daemons, plugins and examples, built next to this executable by `scripts/bench`.
fn sibling_dir() -> PathBuf {
    std::env::current_exe()
        .expect("the bench knows where it runs from")
        .parent()
        .expect("an executable lives in a directory")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::Nodesim {
        ref url,
        ref certs,
        ref prefix,
        nodes,
        writers,
        ref volume,
        broker_pid,
        threads,
    }) = cli.command
    {
        // A runtime of its own size: the simulator's CPU is what the broker does not get.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .enable_all()
            .build()?;
        return runtime.block_on(nodesim::run(
            url, certs, prefix, nodes, writers, volume, broker_pid,
        ));
    }
    if let Some(Sub::Model {
        ref nodes,
        cpu_us_per_call,
        straggler_ms,
        provider_ms,
    }) = cli.command
    {
        let (cpu, source) = match cpu_us_per_call {
            Some(cpu) => (cpu, "--cpu-us-per-call".to_string()),
            None => measured_cpu_per_call(&cli.report),
        };
        let assumptions = model::Assumptions {
            straggler_rtt_ms: straggler_ms,
            provider_ms,
            ..model::Assumptions::issue_19(cpu, source)
        };
        let predictions: Vec<model::Prediction> = nodes
            .iter()
            .map(|&n| model::predict(n, &assumptions))
            .collect();
        print_model(&assumptions, &predictions);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Sub::Swarm {
            ref url,
            ref certs,
            ref prefix,
            nodes,
            writers,
            ref volume,
        }) => runtime.block_on(scale::swarm(url, certs, prefix, nodes, writers, volume)),
        Some(Sub::Nodesim { .. } | Sub::Model { .. }) => unreachable!("run above"),
        None => runtime.block_on(run(&cli)),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    quiesce_testbed::require_root();
    let bin = sibling_dir();
    let wanted = |item: u8| cli.only.is_empty() || cli.only.contains(&item);
    // What each item runs; item 3 (scale) needs the broker alone, its nodes are this binary.
    let needs: [(&str, &[u8]); 9] = [
        ("quiesce-broker", &[2, 3, 4, 5, 6]),
        ("quiesce-host", &[2, 4, 5, 6]),
        ("quiesce", &[2, 4, 6]),
        ("app-writer", &[2, 4, 5, 6]),
        ("buffering-app", &[2, 4]),
        ("libhello_writer.so", &[5]),
        ("libquiesce_writer_postgres.so", &[2, 4]),
        ("libquiesce_writer_sqlite.so", &[2, 4]),
        ("libquiesce_writer_filebuf.so", &[2, 4]),
    ];
    for (needed, items) in needs {
        anyhow::ensure!(
            !items.iter().any(|&i| wanted(i)) || bin.join(needed).exists(),
            "{} is missing: run the bench with scripts/bench (it builds everything first)",
            bin.join(needed).display()
        );
    }
    let dir = tempfile::tempdir()?;
    let reps = if cli.quick { 5 } else { 30 };

    // The volume every btrfs measurement shares: bare snapshots and the cluster's sets.
    let volume =
        (wanted(1) || wanted(2) || wanted(4)).then(|| quiesce_testbed::BtrfsVolume::create(2048));
    let bare = match &volume {
        Some(volume) if wanted(1) => {
            eprintln!("[1] bare btrfs snapshots, idle volume ...");
            bare::populate(volume, 2000);
            Some(bare::snapshots(volume, reps))
        }
        _ => None,
    };
    let (mut cluster_result, mut pgbench) = (None, None);
    if let (Some(volume), true) = (&volume, wanted(2) || wanted(4)) {
        let lab = cluster::Lab::start(dir.path(), &bin, volume).await?;
        if wanted(2) {
            eprintln!("[2] full sets on a three-node cluster (PostgreSQL, SQLite, buffering) ...");
            cluster_result = Some(lab.sets(volume, reps).await?);
        }
        if wanted(4) {
            eprintln!("[4] pgbench without and with a snapshot every 5 s ...");
            pgbench = Some(lab.pgbench(if cli.quick { 10 } else { 60 }).await?);
        }
    }
    let mut scale = vec![];
    let mut simulated = vec![];
    if wanted(3) {
        eprintln!(
            "[3] scale: one broker, {:?} simulated nodes of 8 writers (the link protocol, no work) ...",
            cli.sim_nodes
        );
        for &n in &cli.sim_nodes {
            simulated.push(
                nodesim::measure(
                    dir.path(),
                    &bin,
                    n,
                    8,
                    if cli.quick { 5 } else { 20 },
                    cli.sim_threads,
                )
                .await?,
            );
        }
        eprintln!(
            "[3] scale: {:?} nodes of 8 in-memory writers ...",
            cli.nodes
        );
        for &n in &cli.nodes {
            scale.push(scale_run(dir.path(), &bin, n, if cli.quick { 5 } else { 20 }).await?);
        }
    }
    let (mut model_assumptions, mut predictions) = (None, vec![]);
    if let Some(largest) = simulated.iter().max_by_key(|s| s.nodes) {
        eprintln!(
            "[3] model: {:?} nodes, the set machine in virtual time ...",
            cli.model_nodes
        );
        let assumptions = model::Assumptions::issue_19(
            largest.broker_cpu_us_per_call,
            format!("measured above at {} simulated nodes", largest.nodes),
        );
        predictions = cli
            .model_nodes
            .iter()
            .map(|&n| model::predict(n, &assumptions))
            .collect();
        model_assumptions = Some(assumptions);
    }
    let calls = if wanted(5) {
        eprintln!("[5] per-call overhead ...");
        Some(calls::measure(dir.path(), &bin, if cli.quick { 200 } else { 2000 }).await?)
    } else {
        None
    };
    let cephfs = if wanted(6) {
        eprintln!("[6] CephFS: bare .snap against three nodes with and without the node flush ...");
        Some(cephfs::measure(dir.path(), &bin, reps, if cli.quick { 1 } else { 2 }).await?)
    } else {
        None
    };

    let cephfs_load = |burst: bool| {
        cephfs
            .as_ref()
            .and_then(|c| c.loads.iter().find(|l| (l.dirty_mb_per_node > 0) == burst))
    };
    let (cephfs_apps, cephfs_burst) = (cephfs_load(false), cephfs_load(true));
    let window = cluster_result.as_ref().map(|c| c.freeze_window.median_ms);
    // The physical limit the window is held against: the bare command's snapshot under the
    // same conditions (between the sets, applications writing).
    let bare_ms = cluster_result.as_ref().map(|c| c.bare_command.median_ms);
    let tps_ratio = pgbench.as_ref().map(|p| p.with.tps / p.without.tps);
    let ratios = Ratios {
        freeze_window_over_bare: window.zip(bare_ms).map(|(w, b)| w / b),
        freeze_window_minus_bare_ms: window.zip(bare_ms).map(|(w, b)| w - b),
        pgbench_tps_with_over_without: tps_ratio,
        plugin_call_over_in_memory: calls
            .as_ref()
            .map(|c| c.plugin_abi.median_ms / c.in_memory.median_ms),
        dbus_call_over_in_memory: calls
            .as_ref()
            .map(|c| c.app_dbus.median_ms / c.in_memory.median_ms),
        coordination_256_over_16: {
            let at = |n| {
                scale
                    .iter()
                    .find(|s| s.nodes == n)
                    .map(|s| s.coordination.median_ms)
            };
            match (at(256), at(16)) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            }
        },
        simulated_coordination_1024_over_64: sim_ratio(&simulated, |s| s.coordination.median_ms),
        simulated_broker_cpu_1024_over_64: sim_ratio(&simulated, |s| s.broker_cpu.median_ms),
        swarm_over_simulated_coordination_256: {
            let swarm = scale.iter().find(|s| s.nodes == 256);
            let sim = simulated.iter().find(|s| s.nodes == 256);
            match (swarm, sim) {
                (Some(a), Some(b)) if b.coordination.median_ms > 0.0 => {
                    Some(a.coordination.median_ms / b.coordination.median_ms)
                }
                _ => None,
            }
        },
        cephfs_window_syncfs_over_bare: cephfs_apps
            .map(|c| c.syncfs.freeze_window.median_ms / c.bare_snap.median_ms),
        cephfs_window_none_over_bare: cephfs_apps
            .map(|c| c.none.freeze_window.median_ms / c.bare_snap.median_ms),
        cephfs_flush_cost_ms: cephfs_apps.map(|c| c.flush_cost_ms),
        cephfs_burst_window_syncfs_over_bare: cephfs_burst
            .map(|c| c.syncfs.freeze_window.median_ms / c.bare_snap.median_ms),
        cephfs_burst_flush_cost_ms: cephfs_burst.map(|c| c.flush_cost_ms),
    };
    let mut targets = vec![];
    if let (Some(window), Some(bare)) = (window, bare_ms) {
        targets.push(Target {
            what: "freeze window median, three-node cluster".into(),
            target: format!("<= bare snapshot + 10 ms = {:.1} ms", bare + 10.0),
            measured: format!("{window:.1} ms"),
            met: window <= bare + 10.0,
        });
    }
    if let Some(ratio) = tps_ratio {
        targets.push(Target {
            what: "pgbench TPS with a snapshot every 5 s".into(),
            target: ">= 95 % of without".into(),
            measured: format!("{:.1} %", 100.0 * ratio),
            met: ratio >= 0.95,
        });
    }
    if let Some(apps) = cephfs_apps {
        // As item 2's target, on CephFS: with the example applications the flush has little to
        // write, and the window holds them no longer than the bare snapshot plus 10 ms.
        let (window, bare) = (
            apps.syncfs.freeze_window.median_ms,
            apps.bare_snap.median_ms,
        );
        targets.push(Target {
            what: "CephFS freeze window median with the node flush (syncfs), three nodes".into(),
            target: format!("<= bare .snap + 10 ms = {:.1} ms", bare + 10.0),
            measured: format!("{window:.1} ms"),
            met: window <= bare + 10.0,
        });
    }
    if let Some(s256) = scale.iter().find(|s| s.nodes == 256) {
        targets.push(Target {
            what: "coordination overhead median at 256 nodes".into(),
            target: "<= 50 ms".into(),
            measured: format!("{:.1} ms", s256.coordination.median_ms),
            met: s256.coordination.median_ms <= 50.0,
        });
    }
    if let [first, .., last] = scale.as_slice() {
        // Logarithmic growth: overhead(n) ≈ a + b·log n, so from n1 to n2 it may grow at most
        // by log n2 / log n1; linear growth would be n2 / n1.
        let growth = last.coordination.median_ms / first.coordination.median_ms.max(0.5);
        let log_ratio = (last.nodes as f64).ln() / (first.nodes as f64).ln();
        let node_ratio = last.nodes as f64 / first.nodes as f64;
        targets.push(Target {
            what: format!(
                "coordination growth {} -> {} nodes",
                first.nodes, last.nodes
            ),
            target: format!(
                "no faster than logarithmic: x{log_ratio:.2} (linear would be x{node_ratio:.0})"
            ),
            measured: format!("x{growth:.2}"),
            met: growth <= log_ratio,
        });
    }
    targets.extend(simulated_targets(&simulated));
    for p in &predictions {
        targets.push(Target {
            what: format!("model: freeze window at {} nodes with a straggler", p.nodes),
            target: format!(
                "<= slowest round trip + 100 ms = {:.0} ms, app-consistent",
                p.target_ms
            ),
            measured: format!("{:.1} ms, {}", p.window_ms, p.outcome),
            met: p.met,
        });
    }
    let report = Report {
        bare_snapshot: bare,
        cluster: cluster_result,
        scale,
        scale_simulated: simulated,
        model_assumptions,
        model: predictions,
        pgbench,
        calls,
        cephfs,
        ratios,
        targets,
    };
    print_table(&report);
    std::fs::write(&cli.report, serde_json::to_string_pretty(&report)?)?;
    println!("\nJSON report: {}", cli.report.display());
    Ok(())
}

/// The broker's CPU per writer call at the largest simulated size of a JSON report, and where
/// it comes from; issue 19's figure for the swarm when there is none.
fn measured_cpu_per_call(report: &Path) -> (f64, String) {
    let largest = std::fs::read_to_string(report)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| {
            json["scale_simulated"]
                .as_array()?
                .iter()
                .filter_map(|s| Some((s["nodes"].as_u64()?, s["broker_cpu_us_per_call"].as_f64()?)))
                .max_by_key(|(nodes, _)| *nodes)
        });
    match largest {
        Some((nodes, cpu)) => (
            cpu,
            format!("{} at {nodes} simulated nodes", report.display()),
        ),
        None => (
            26.0,
            "issue 19's figure for the swarm (no simulated sizes in the report)".into(),
        ),
    }
}

fn print_model(a: &model::Assumptions, predictions: &[model::Prediction]) {
    println!("3. model: one set in virtual time (the real SnapshotSet; no I/O)");
    println!(
        "  assumptions: round trip per node log-normal p50 {} ms, p99 {} ms, one node at {} ms; each writer call p50 {} ms, p99 {} ms; broker {:.2} us CPU per writer call ({}), one core, half on sending, half on reading; provider {} ms; {} writers per node in 3 levels; the machine's default deadlines (lease 5 s renewed every third, hold limit 10 s); seed {}",
        a.rtt_p50_ms, a.rtt_p99_ms, a.straggler_rtt_ms, a.call_p50_ms, a.call_p99_ms,
        a.cpu_us_per_call, a.cpu_source, a.provider_ms, a.writers_per_node, a.seed
    );
    println!(
        "  {:>8} {:>9} {:>16} {:>11} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "nodes",
        "writers",
        "outcome",
        "window ms",
        "CPU in win",
        "CPU per set",
        "no-CPU win",
        "even win",
        "target"
    );
    for p in predictions {
        println!(
            "  {:>8} {:>9} {:>16} {:>11} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>10.0}",
            p.nodes,
            p.writers,
            p.outcome,
            // A failed set's window is not the figure the target is about.
            if p.outcome == "failed" {
                "-".to_string()
            } else {
                format!("{:.1}", p.window_ms)
            },
            p.broker_cpu_in_window_ms,
            p.broker_cpu_per_set_ms,
            p.window_without_broker_cpu_ms,
            p.window_without_straggler_ms,
            p.target_ms
        );
    }
    println!("  (no-CPU win: the same set with a broker that costs nothing; even win: without the straggler)");
    for p in predictions.iter().filter(|p| p.outcome == "failed") {
        println!("  {} nodes: {}", p.nodes, p.outcome_detail);
    }
}

/// A figure at 1,024 simulated nodes over the same at 64.
fn sim_ratio(sims: &[nodesim::SimResult], f: fn(&nodesim::SimResult) -> f64) -> Option<f64> {
    let at = |n| sims.iter().find(|s| s.nodes == n).map(f);
    match (at(1024), at(64)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Issue 19's targets for the broker measured apart from its nodes.
fn simulated_targets(sims: &[nodesim::SimResult]) -> Vec<Target> {
    let mut targets = vec![];
    let at = |n| sims.iter().find(|s| s.nodes == n);
    if let Some(s) = at(1024) {
        targets.push(Target {
            what: "coordination overhead median at 1024 simulated nodes x 8 writers".into(),
            target: "<= 30 ms".into(),
            measured: format!("{:.1} ms", s.coordination.median_ms),
            met: s.coordination.median_ms <= 30.0,
        });
        let mb = s.broker_rss_mib_peak * 1.048_576;
        targets.push(Target {
            what: "broker RSS with 1024 attached nodes (peak over the sets)".into(),
            target: "<= 200 MB".into(),
            measured: format!("{mb:.0} MB"),
            met: mb <= 200.0,
        });
    }
    if let Some(s) = sims.iter().max_by_key(|s| s.nodes) {
        targets.push(Target {
            what: format!(
                "broker CPU per writer call at {} simulated nodes (median per set / calls)",
                s.nodes
            ),
            target: "<= 2.5 us".into(),
            measured: format!(
                "{:.1} us ({:.1} ms over {:.0} calls)",
                s.broker_cpu_us_per_call, s.broker_cpu.median_ms, s.writer_calls_per_set
            ),
            met: s.broker_cpu_us_per_call <= 2.5,
        });
    }
    if let (Some(small), Some(large)) = (at(64), at(1024)) {
        let growth = large.broker_cpu.median_ms / small.broker_cpu.median_ms.max(0.001);
        targets.push(Target {
            what: "broker CPU per set growth 64 -> 1024 simulated nodes".into(),
            target: "no worse than linear: x16".into(),
            measured: format!("x{growth:.2}"),
            met: growth <= 16.0,
        });
    }
    targets
}

/// One scale size: a fresh broker and a swarm process of `nodes` hosts.
async fn scale_run(
    dir: &Path,
    bin: &Path,
    nodes: usize,
    sets: usize,
) -> anyhow::Result<scale::ScaleResult> {
    let here = dir.join(format!("scale-{nodes}"));
    let (broker, certs) = scale::start_broker(&here, bin, "n", nodes)?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["swarm", "--url", &broker.url, "--certs"])
        .arg(&certs)
        .args(["--nodes", &nodes.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut swarm = quiesce_testbed::Child::spawn(command, here.join("swarm.log"));
    let mut line = String::new();
    BufReader::new(swarm.child.stdout.take().expect("piped")).read_line(&mut line)?;
    anyhow::ensure!(
        line.trim() == "ready",
        "the swarm did not start: {}",
        swarm.log()
    );
    broker.wait_nodes(nodes, Duration::from_secs(120)).await?;
    let mut client = broker.sets().await?;
    for _ in 0..2 {
        broker.set(&mut client, "bench").await?; // warm-up
    }
    let cpu = || {
        (
            scale::cpu_time(broker.process.pid()),
            scale::cpu_time(swarm.pid()),
        )
    };
    let before = cpu();
    let mut records = vec![];
    for _ in 0..sets {
        records.push(broker.set(&mut client, "bench").await?);
    }
    let after = cpu();
    // Closing its stdin ends the swarm.
    drop(swarm.child.stdin.take());
    let _ = swarm.child.wait();
    Ok(scale::summarise(
        nodes,
        8,
        &records,
        (after.0 - before.0, after.1 - before.1),
    ))
}

fn print_table(r: &Report) {
    let row = |what: &str, s: &stats::Sample| {
        println!(
            "  {what:<52} {:>9.2} {:>9.2} {:>9.2} {:>5}",
            s.median_ms, s.p99_ms, s.max_ms, s.n
        )
    };
    println!(
        "\n{:<54} {:>9} {:>9} {:>9} {:>5}",
        "ms", "median", "p99", "max", "n"
    );
    if let Some(bare) = &r.bare_snapshot {
        println!("1. physical limit");
        row("bare btrfs subvolume snapshot, idle volume", bare);
    }
    if let Some(c) = &r.cluster {
        println!("2. full set, three nodes (PostgreSQL, SQLite, buffering app, app writer)");
        row(
            "bare btrfs subvolume snapshot, apps writing",
            &c.bare_command,
        );
        row(
            "bare snapshot ioctl (the provider's), apps writing",
            &c.bare_ioctl,
        );
        row(
            "freeze window (first freeze -> last thaw)",
            &c.freeze_window,
        );
        row("provider (btrfs snapshot inside the window)", &c.provider);
        row("quiesce snapshot create, end to end", &c.end_to_end);
        for (phase, s) in &c.phases {
            row(&format!("  phase {phase}"), s);
        }
        for (call, s) in &c.calls {
            row(&format!("  {call}"), s);
        }
    }
    if !r.scale.is_empty() || !r.scale_simulated.is_empty() {
        println!("3. scale: coordination overhead (freeze window - provider)");
    }
    if !r.scale_simulated.is_empty() {
        println!("  simulated nodes (the link protocol over mutual TLS, no writer work): the broker apart");
    }
    for s in &r.scale_simulated {
        row(
            &format!("{} nodes x {} writers, simulated", s.nodes, s.writers),
            &s.coordination,
        );
        row("  freeze window", &s.freeze_window);
        row("  broker CPU per set (request to answer)", &s.broker_cpu);
        row(
            "  of it inside the window (first freeze -> last thaw)",
            &s.broker_cpu_in_window,
        );
        row("  of it outside the window", &s.broker_cpu_outside_window);
        println!(
            "  {:<52} {:.2} us over {:.0} calls; /proc stat {:.1} ms per set; simulator {:.1} ms per set",
            "  broker CPU per writer call", s.broker_cpu_us_per_call, s.writer_calls_per_set,
            s.broker_cpu_ms_per_set_stat, s.nodesim_cpu_ms_per_set
        );
        println!(
            "  {:<52} {:.1} MiB attached, {:.1} after the first set, {:.1} after the last, {:.1} peak",
            "  broker RSS",
            s.broker_rss_mib_attached,
            s.broker_rss_mib_by_set.first().copied().unwrap_or(f64::NAN),
            s.broker_rss_mib_after,
            s.broker_rss_mib_peak
        );
        println!(
            "  {:<52} {:.0} in the catalog, {:.0} in the answer",
            "  record JSON bytes per set", s.catalog_record_bytes, s.reply_record_bytes
        );
        println!(
            "  {:<52} to nodes {:.0} msgs {:.0} B, from nodes {:.0} msgs {:.0} B",
            "  wire per set (protobuf + gRPC prefix)",
            s.wire_to_nodes_messages,
            s.wire_to_nodes_bytes,
            s.wire_from_nodes_messages,
            s.wire_from_nodes_bytes
        );
    }
    if !r.scale.is_empty() {
        println!("  a swarm of real hosts (8 writer threads each) in one process beside the broker: end to end");
    }
    for s in &r.scale {
        row(
            &format!("{} nodes x {} writers", s.nodes, s.writers),
            &s.coordination,
        );
        println!(
            "  {:<52} broker {:.1} ms, nodes {:.1} ms per set (including deletions)",
            "  CPU", s.broker_cpu_ms_per_set, s.nodes_cpu_ms_per_set
        );
    }
    if let Some(a) = &r.model_assumptions {
        print_model(a, &r.model);
    }
    if let Some(p) = &r.pgbench {
        println!("4. pgbench ({} clients, {} s each)", p.clients, p.seconds);
        for (what, run) in [
            ("without snapshots", &p.without),
            ("with a snapshot every 5 s", &p.with),
        ] {
            println!(
                "  {what:<52} TPS {:>9.1}  latency p99 {:>7.2} ms  max {:>7.2} ms  ({} snapshots, {} with a CHECKPOINT)",
                run.tps, run.latency.p99_ms, run.latency.max_ms, run.snapshots, run.checkpoints
            );
        }
    }
    if let Some(calls) = &r.calls {
        println!("5. per call (thaw, one at a time)");
        row("in-memory writer (worker thread only)", &calls.in_memory);
        row("plugin writer through the ABI", &calls.plugin_abi);
        row("application writer over D-Bus", &calls.app_dbus);
    }
    if let Some(c) = &r.cephfs {
        println!(
            "6. CephFS, {} nodes (ceph-fuse each, app writer on each, node1 --mmap)",
            c.nodes
        );
    }
    for c in r.cephfs.iter().flat_map(|c| &c.loads) {
        println!("  load: {}", c.load);
        row(
            "bare mkdir .snap/NAME (the provider's), apps writing",
            &c.bare_snap,
        );
        for run in [&c.syncfs, &c.none] {
            let f = &run.flush;
            row(&format!("freeze window, flush = {f}"), &run.freeze_window);
            row(
                &format!("  provider (mkdir .snap), flush = {f}"),
                &run.provider,
            );
            row(
                &format!("  set over gRPC, end to end, flush = {f}"),
                &run.end_to_end,
            );
            // The phases inside the window; the others are in the JSON report.
            for phase in ["freeze", "snapshot", "thaw"] {
                if let Some(s) = run.phases.get(phase) {
                    row(&format!("  phase {phase}, flush = {f}"), s);
                }
            }
            for (node, s) in &run.flush_freeze {
                row(&format!("  {node}/flush.shared freeze, flush = {f}"), s);
            }
            if run.flush == "syncfs" {
                for (node, s) in &run.flush_ms {
                    row(&format!("  {node}/flush.shared flush_ms (its own)"), s);
                }
            }
            for (node, s) in &run.app_freeze {
                row(&format!("  {node}/app freeze, flush = {f}"), s);
            }
        }
        println!(
            "  {:<52} {:>9.2}",
            "what the flush costs: window syncfs - none (median)", c.flush_cost_ms
        );
        let by_phase: Vec<String> = c
            .flush_cost_by_phase_ms
            .iter()
            .map(|(phase, ms)| format!("{phase} {ms:+.1}"))
            .collect();
        println!(
            "  {:<52} {}",
            "  of it, by phase (median syncfs - none, ms)",
            by_phase.join(", ")
        );
    }
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    println!("\nratios");
    for (what, v) in [
        (
            "freeze window / bare snapshot",
            r.ratios.freeze_window_over_bare,
        ),
        (
            "freeze window - bare snapshot (ms)",
            r.ratios.freeze_window_minus_bare_ms,
        ),
        (
            "pgbench TPS with / without",
            r.ratios.pgbench_tps_with_over_without,
        ),
        (
            "coordination 256 nodes / 16 nodes",
            r.ratios.coordination_256_over_16,
        ),
        (
            "simulated: coordination 1024 / 64 nodes",
            r.ratios.simulated_coordination_1024_over_64,
        ),
        (
            "simulated: broker CPU 1024 / 64 nodes",
            r.ratios.simulated_broker_cpu_1024_over_64,
        ),
        (
            "coordination at 256: swarm / simulated",
            r.ratios.swarm_over_simulated_coordination_256,
        ),
        (
            "plugin call / in-memory call",
            r.ratios.plugin_call_over_in_memory,
        ),
        (
            "D-Bus call / in-memory call",
            r.ratios.dbus_call_over_in_memory,
        ),
        (
            "CephFS window syncfs / bare .snap",
            r.ratios.cephfs_window_syncfs_over_bare,
        ),
        (
            "CephFS window none / bare .snap",
            r.ratios.cephfs_window_none_over_bare,
        ),
        (
            "CephFS flush cost, syncfs - none (ms)",
            r.ratios.cephfs_flush_cost_ms,
        ),
        (
            "CephFS burst: window syncfs / bare .snap",
            r.ratios.cephfs_burst_window_syncfs_over_bare,
        ),
        (
            "CephFS burst: flush cost (ms)",
            r.ratios.cephfs_burst_flush_cost_ms,
        ),
    ] {
        println!("  {what:<40} {}", opt(v));
    }
    println!("\ntargets");
    for t in &r.targets {
        println!(
            "  [{}] {}: {} (target {})",
            if t.met { "met" } else { "MISSED" },
            t.what,
            t.measured,
            t.target
        );
    }
}
