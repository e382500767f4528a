//! Item 3, scale: one broker and 16, 64, 256 nodes of 8 in-memory writers each.
//!
//! The nodes are real `quiesce_host::Host` instances, each with its own mutual-TLS link to the
//! broker (`broker_link`), many of them in one `quiesce-bench swarm` process so that hundreds fit
//! on one machine. The broker is the real `quiesce-broker` process; the volume a directory copied
//! by `dir-copy` (empty: the provider's time is subtracted anyway). What is measured is the
//! coordination overhead: the freeze window minus the provider's own time.

use crate::daemons::{self, Broker};
use crate::stats::Sample;
use quiesce_host::broker_link::{self, LinkOptions};
use quiesce_host::worker::Backend;
use quiesce_host::{Config, Host};
use quiesce_link::{Security, TlsFiles};
use quiesce_proto::{CallFailure, WriterCall};
use quiesce_proto::{ComponentKind, Level, Reports, SetRecord, WriterMetadata};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A writer that does nothing: what is left is quiesce's own cost.
struct InMemory;

impl Backend for InMemory {
    fn call(
        &mut self,
        _call: &WriterCall,
        _set: &str,
        _budget: Duration,
    ) -> Result<Reports, CallFailure> {
        Ok(Reports::new())
    }
}

/// Writer `i` of a node: levels spread as a real node's would be (3 front-end, 3 back-end,
/// 2 system), so a set freezes three levels one after the other.
pub fn metadata(i: usize, volume: &str) -> WriterMetadata {
    let level = match i % 8 {
        0..=2 => Level::FrontEnd,
        3..=5 => Level::BackEnd,
        _ => Level::System,
    };
    WriterMetadata::new(format!("mem{i}"), "in-memory writer", level).with_component(
        "data",
        ComponentKind::Files,
        volume,
        ["/bench"],
    )
}

/// `quiesce-bench swarm`: runs `nodes` hosts named `prefix1..` with `writers` each, attached to
/// the broker with the certificates in `certs`; prints `ready` and runs until stdin closes.
pub async fn swarm(
    url: &str,
    certs: &Path,
    prefix: &str,
    nodes: usize,
    writers: usize,
    volume: &str,
) -> anyhow::Result<()> {
    let mut hosts = Vec::with_capacity(nodes);
    for n in 1..=nodes {
        let node = format!("{prefix}{n}");
        let config = Config::parse(
            &format!("node = {node:?}\nhold_limit_ms = 30000\n"),
            Path::new("swarm.toml"),
        )?;
        let host = Arc::new(Host::start(config));
        for i in 0..writers {
            host.add_writer(metadata(i, volume), "bench".into(), Box::new(InMemory))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let link = broker_link::spawn(
            host.clone(),
            LinkOptions {
                url: url.to_string(),
                security: Security::Tls(TlsFiles {
                    ca: certs.join("ca.pem"),
                    cert: certs.join(format!("{node}.pem")),
                    key: certs.join(format!("{node}.key")),
                }),
            },
        );
        hosts.push((host, link));
    }
    println!("ready");
    // Until the bench closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await?;
    Ok(())
}

/// A fresh broker in `here` whose volume `bench` is an empty directory copied by `dir-copy`,
/// with certificates for the nodes `prefix1..=prefixN`: (the broker, the certificates' folder).
pub fn start_broker(
    here: &Path,
    bin: &Path,
    prefix: &str,
    nodes: usize,
) -> anyhow::Result<(Broker, PathBuf)> {
    let empty = here.join("volume");
    let snapshots = here.join("snapshots");
    std::fs::create_dir_all(&empty)?;
    std::fs::create_dir_all(&snapshots)?;
    let names: Vec<String> = (1..=nodes).map(|n| format!("{prefix}{n}")).collect();
    let certs = here.join("certs");
    daemons::certs(bin, &certs, &names)?;
    let config = here.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "catalog = {:?}\nhold_limit_ms = 30000\nlease_ms = 15000\n[volumes.bench]\nprovider = \"dir-copy\"\nsource = {:?}\nsnapshots = {:?}\n",
            here.join(CATALOG),
            empty,
            snapshots
        ),
    )?;
    let broker = Broker::start(bin, &certs, &config, here.join("broker.log"))?;
    Ok((broker, certs))
}

/// The broker's catalog file in its folder.
pub const CATALOG: &str = "catalog.sqlite";

/// One size's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleResult {
    pub nodes: usize,
    pub writers: usize,
    /// Freeze window minus provider time, per set.
    pub coordination: Sample,
    pub freeze_window: Sample,
    pub provider: Sample,
    /// From the request to the answer at the requester.
    pub end_to_end: Sample,
    /// CPU time per set (user + system) of the broker process and of the process running all
    /// the nodes: where the coordination's time goes on this one machine.
    pub broker_cpu_ms_per_set: f64,
    pub nodes_cpu_ms_per_set: f64,
}

/// A process's CPU time so far (user + system), from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5), in clock ticks (100 per second here).
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(14) + ticks(15)) * 10)
}

/// A process's CPU time so far, in nanoseconds: the sum over its live threads of the time on
/// a CPU from /proc/PID/task/TID/schedstat (nanosecond resolution, where `/proc/PID/stat`
/// counts 10 ms ticks: too coarse for one freeze window). Threads that ended are not in it; the
/// broker's runtime threads live as long as it does.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A process's resident and peak resident memory (`VmRSS`, `VmHWM` of /proc/PID/status), in
/// MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The coordination overhead of each record.
pub fn summarise(
    nodes: usize,
    writers: usize,
    records: &[(SetRecord, Duration)],
    (broker_cpu, nodes_cpu): (Duration, Duration),
) -> ScaleResult {
    let per_set = |d: Duration| d.as_secs_f64() * 1000.0 / records.len().max(1) as f64;
    let ms = |f: fn(&SetRecord) -> Option<u64>| -> Vec<f64> {
        records
            .iter()
            .filter_map(|(r, _)| f(r))
            .map(|v| v as f64)
            .collect()
    };
    let window = ms(|r| r.freeze_window_ms);
    let provider = ms(|r| r.provider_ms);
    let coordination: Vec<f64> = records
        .iter()
        .filter_map(|(r, _)| Some(r.freeze_window_ms? as f64 - r.provider_ms? as f64))
        .collect();
    ScaleResult {
        nodes,
        writers,
        coordination: Sample::of_ms(&coordination),
        freeze_window: Sample::of_ms(&window),
        provider: Sample::of_ms(&provider),
        end_to_end: Sample::of(&records.iter().map(|(_, d)| *d).collect::<Vec<_>>()),
        broker_cpu_ms_per_set: per_set(broker_cpu),
        nodes_cpu_ms_per_set: per_set(nodes_cpu),
    }
}
