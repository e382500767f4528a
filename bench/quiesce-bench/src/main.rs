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
//! 3. scale: one broker with 16, 64 and 256 nodes of 8 in-memory writers each: the coordination
//!    overhead (freeze window minus provider time);
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
    /// Node counts for the scale benchmark.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    nodes: Vec<usize>,
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
}

#[derive(Serialize)]
struct Report {
    bare_snapshot: Option<stats::Sample>,
    cluster: Option<cluster::ClusterResult>,
    scale: Vec<scale::ScaleResult>,
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
        None => runtime.block_on(run(&cli)),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    quiesce_testbed::require_root();
    let bin = sibling_dir();
    for needed in [
        "quiesce-broker",
        "quiesce-host",
        "quiesce",
        "app-writer",
        "buffering-app",
        "libhello_writer.so",
        "libquiesce_writer_postgres.so",
        "libquiesce_writer_sqlite.so",
        "libquiesce_writer_filebuf.so",
    ] {
        anyhow::ensure!(
            bin.join(needed).exists(),
            "{} is missing: run the bench with scripts/bench (it builds everything first)",
            bin.join(needed).display()
        );
    }
    let dir = tempfile::tempdir()?;
    let reps = if cli.quick { 5 } else { 30 };
    let wanted = |item: u8| cli.only.is_empty() || cli.only.contains(&item);

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
    if wanted(3) {
        eprintln!(
            "[3] scale: {:?} nodes of 8 in-memory writers ...",
            cli.nodes
        );
        for &n in &cli.nodes {
            scale.push(scale_run(dir.path(), &bin, n, if cli.quick { 5 } else { 20 }).await?);
        }
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
    let report = Report {
        bare_snapshot: bare,
        cluster: cluster_result,
        scale,
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

/// One scale size: a fresh broker and a swarm process of `nodes` hosts.
async fn scale_run(
    dir: &Path,
    bin: &Path,
    nodes: usize,
    sets: usize,
) -> anyhow::Result<scale::ScaleResult> {
    let here = dir.join(format!("scale-{nodes}"));
    let empty = here.join("volume");
    let snapshots = here.join("snapshots");
    std::fs::create_dir_all(&empty)?;
    std::fs::create_dir_all(&snapshots)?;
    let names: Vec<String> = (1..=nodes).map(|n| format!("n{n}")).collect();
    let certs = here.join("certs");
    daemons::certs(bin, &certs, &names)?;
    let config = here.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "catalog = {:?}\nhold_limit_ms = 30000\nlease_ms = 15000\n[volumes.bench]\nprovider = \"dir-copy\"\nsource = {:?}\nsnapshots = {:?}\n",
            here.join("catalog.sqlite"),
            empty,
            snapshots
        ),
    )?;
    let broker = daemons::Broker::start(bin, &certs, &config, here.join("broker.log"))?;
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
    if !r.scale.is_empty() {
        println!("3. scale: coordination overhead (freeze window - provider)");
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
