//! `quiesce-bench nodesim`: many simulated nodes in one process, to measure the broker apart
//! from its nodes.
//!
//! Each simulated node is one task with its own mutual-TLS link (`quiesce_link::connect`, the
//! node's own certificate from `quiesce-broker certs`), and sends the broker what a real
//! `quiesce-host` with `writers` in-memory writers would (core/quiesce-host/src/broker_link.rs
//! and remote_sets.rs): a `Register` with every writer's metadata as JSON (origin `bench`, no
//! volumes, as the swarm's hosts), a `Heartbeat` at the interval the broker's `Registered`
//! asks for, every message numbered by `seq` from 1; every `SetCommand` answered `ok` with no
//! reports, the answers to one `SetCommands` batch in one `CommandReplies` (a real host sends
//! the answers ready together in one message; here they are all ready at once), a lone command
//! in one `CommandReply`; `Lease` and `EndLease` taken silently (a lease that never lapses sends
//! nothing). No writer threads, no work: what is left of the freeze window is the broker.
//!
//! It also counts what crosses each link (protobuf `encoded_len` of every message, plus gRPC's
//! 5-byte length prefix; HTTP/2 and TLS framing are not counted), per set, and samples the
//! broker's CPU time (`--broker-pid`) at the first freeze command of a set and just before the
//! last thaw answer of it goes out: the broker's CPU inside the freeze window, measured where
//! the window is seen from the nodes.
//!
//! The bench talks to it over stdin and stdout, one line each way: it prints `ready` once every
//! node is registered; a `stats` line on stdin is answered with one JSON line ([`Stats`]); the
//! end of stdin ends it.

use crate::daemons::Broker;
use crate::scale;
use crate::stats::Sample;
use prost::Message;
use quiesce_link::v1::{self, broker_message, host_message, link_client::LinkClient};
use quiesce_link::{Security, TlsFiles, LINK_VERSION};
use quiesce_proto::SetRecord;
use quiesce_testbed::Child;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// What the simulator saw of one set, summed over its nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetTrace {
    /// Broker → nodes and nodes → broker: messages and bytes of this set (commands, leases,
    /// lease ends; answers).
    pub to_nodes_messages: u64,
    pub to_nodes_bytes: u64,
    pub from_nodes_messages: u64,
    pub from_nodes_bytes: u64,
    /// Writer calls the broker sent (one per writer per call).
    pub commands: u64,
    pub freezes: u64,
    pub thaws_answered: u64,
    /// The broker's CPU time (ns, all its threads) when the first freeze command of the set
    /// arrived at a node, and just before the last thaw answer went out.
    pub broker_cpu_ns_first_freeze: Option<u64>,
    pub broker_cpu_ns_last_thaw: Option<u64>,
}

/// The simulator's answer to `stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub sets: BTreeMap<String, SetTrace>,
    /// Everything else on the links (registrations, heartbeats, acks).
    pub other_to_nodes_bytes: u64,
    pub other_from_nodes_bytes: u64,
}

/// gRPC's length-prefixed framing: one compression flag byte and a 4-byte length per message.
const GRPC_PREFIX: u64 = 5;

struct Shared {
    broker_pid: Option<u32>,
    /// Every writer of every node: a set has answered its last thaw when this many are.
    writers_total: u64,
    stats: Mutex<Stats>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broker_cpu_ns(&self) -> Option<u64> {
        self.broker_pid.map(scale::cpu_ns)
    }

    /// Counts a message from the broker; `set` is the set it belongs to, if any.
    fn received(&self, set: Option<&str>, bytes: usize, commands: &[v1::SetCommand]) {
        let bytes = bytes as u64 + GRPC_PREFIX;
        let mut stats = self.stats();
        let Some(set) = set else {
            stats.other_to_nodes_bytes += bytes;
            return;
        };
        let freezes = commands
            .iter()
            .filter(|c| matches!(c.call, Some(v1::set_command::Call::Freeze(_))))
            .count() as u64;
        let first_freeze = freezes > 0 && stats.sets.get(set).is_none_or(|t| t.freezes == 0);
        // Sampled before taking the lock again: reading /proc takes tens of microseconds.
        let cpu = if first_freeze {
            drop(stats);
            let cpu = self.broker_cpu_ns();
            stats = self.stats();
            cpu
        } else {
            None
        };
        let trace = stats.sets.entry(set.to_string()).or_default();
        trace.to_nodes_messages += 1;
        trace.to_nodes_bytes += bytes;
        trace.commands += commands.len() as u64;
        trace.freezes += freezes;
        if trace.broker_cpu_ns_first_freeze.is_none() {
            trace.broker_cpu_ns_first_freeze = cpu;
        }
    }

    /// Counts a message to the broker, before it is sent.
    fn sending(&self, set: Option<&str>, bytes: usize, thaws: u64) {
        let bytes = bytes as u64 + GRPC_PREFIX;
        let mut stats = self.stats();
        let Some(set) = set else {
            stats.other_from_nodes_bytes += bytes;
            return;
        };
        let trace = stats.sets.entry(set.to_string()).or_default();
        trace.from_nodes_messages += 1;
        trace.from_nodes_bytes += bytes;
        trace.thaws_answered += thaws;
        if thaws > 0 && trace.thaws_answered == self.writers_total {
            drop(stats);
            let cpu = self.broker_cpu_ns();
            self.stats()
                .sets
                .entry(set.to_string())
                .or_default()
                .broker_cpu_ns_last_thaw = cpu;
        }
    }
}

/// `quiesce-bench nodesim`: `nodes` simulated nodes named `prefix1..` of `writers` writers each.
pub async fn run(
    url: &str,
    certs: &Path,
    prefix: &str,
    nodes: usize,
    writers: usize,
    volume: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        broker_pid,
        writers_total: (nodes * writers) as u64,
        stats: Mutex::new(Stats::default()),
    });
    let metadata: Vec<v1::Writer> = (0..writers)
        .map(|i| v1::Writer {
            metadata_json: serde_json::to_string(&scale::metadata(i, volume))
                .expect("writer metadata always serializes to JSON"),
            origin: "bench".into(),
        })
        .collect();
    // Attaching a thousand nodes at once makes the broker's TLS handshakes time out; a bounded
    // number in flight attaches them all quickly.
    let attaching = Arc::new(Semaphore::new(32));
    let (registered, mut ready) = mpsc::channel::<anyhow::Result<()>>(nodes.max(1));
    for n in 1..=nodes {
        let node = Node {
            shared: shared.clone(),
            url: url.to_string(),
            name: format!("{prefix}{n}"),
            certs: certs.to_path_buf(),
            writers: metadata.clone(),
        };
        let (attaching, registered) = (attaching.clone(), registered.clone());
        tokio::spawn(async move {
            let name = node.name.clone();
            if let Err(e) = node.run(attaching, registered.clone()).await {
                let _ = registered
                    .send(Err(e.context(format!("node {name}"))))
                    .await;
            }
        });
    }
    drop(registered);
    for _ in 0..nodes {
        match ready.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => anyhow::bail!("the simulated nodes ended before all registered"),
        }
    }
    println!("ready");
    // A link that breaks after the registration is reported on stderr and ends this process:
    // the broker would see a node leave, and the bench's set fail saying so.
    tokio::spawn(async move {
        if let Some(Err(e)) = ready.recv().await {
            eprintln!("nodesim: {e:#}");
            std::process::exit(1);
        }
    });
    tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.trim() == "stats" {
                let json = serde_json::to_string(&*shared.stats()).expect("stats serialize");
                let mut out = std::io::stdout().lock();
                writeln!(out, "{json}").and_then(|()| out.flush())?;
            }
            line.clear();
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    Ok(())
}

struct Node {
    shared: Arc<Shared>,
    url: String,
    name: String,
    certs: PathBuf,
    writers: Vec<v1::Writer>,
}

/// What a host answers a command carried out without a failure: `ok`, no reports.
fn answer(command: &v1::SetCommand) -> v1::CommandReply {
    v1::CommandReply {
        command_id: command.command_id,
        set_id: command.set_id.clone(),
        writer: command.writer.clone(),
        result: Some(v1::command_reply::Result::Ok(v1::CallOk::default())),
    }
}

impl Node {
    async fn run(
        self,
        attaching: Arc<Semaphore>,
        registered: mpsc::Sender<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let security = Security::Tls(TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{}.pem", self.name)),
            key: self.certs.join(format!("{}.key", self.name)),
        });
        // The host's channel size (broker_link.rs).
        let (tx, rx) = mpsc::channel(16);
        let mut seq = 0u64;
        let mut message = |body| {
            seq += 1;
            v1::HostMessage {
                seq,
                body: Some(body),
            }
        };
        let register = message(host_message::Body::Register(v1::Register {
            node: self.name.clone(),
            host_version: env!("CARGO_PKG_VERSION").into(),
            link_version: LINK_VERSION,
            writers: self.writers.clone(),
            volumes: vec![],
        }));
        self.shared.sending(None, register.encoded_len(), 0);
        tx.send(register).await?;
        let permit = attaching.acquire().await?;
        let channel = quiesce_link::connect(&self.url, &security).await?;
        let mut inbound = LinkClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the broker closed the link before answering"))?;
        self.shared.received(None, first.encoded_len(), &[]);
        let Some(broker_message::Body::Registered(registration)) = first.body else {
            anyhow::bail!("the broker answered the registration with {first:?}");
        };
        drop(permit);
        registered.send(Ok(())).await?;
        let every = Duration::from_millis(registration.heartbeat_interval_ms.max(10).into());
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    let beat = message(host_message::Body::Heartbeat(v1::Heartbeat {}));
                    self.shared.sending(None, beat.encoded_len(), 0);
                    tx.send(beat).await?;
                }
                next = inbound.message() => {
                    let Some(m) = next? else {
                        anyhow::bail!("the broker closed the link");
                    };
                    let len = m.encoded_len();
                    let commands = match m.body {
                        Some(broker_message::Body::Command(c)) => vec![c],
                        Some(broker_message::Body::Commands(batch)) => batch.commands,
                        Some(broker_message::Body::Lease(lease)) => {
                            self.shared.received(Some(&lease.set_id), len, &[]);
                            continue;
                        }
                        Some(broker_message::Body::EndLease(end)) => {
                            self.shared.received(Some(&end.set_id), len, &[]);
                            continue;
                        }
                        _ => {
                            self.shared.received(None, len, &[]);
                            continue;
                        }
                    };
                    let Some(set) = commands.first().map(|c| c.set_id.clone()) else {
                        continue;
                    };
                    self.shared.received(Some(&set), len, &commands);
                    let thaws = commands
                        .iter()
                        .filter(|c| matches!(c.call, Some(v1::set_command::Call::Thaw(_))))
                        .count() as u64;
                    let mut replies: Vec<v1::CommandReply> = commands.iter().map(answer).collect();
                    let body = if replies.len() == 1 {
                        host_message::Body::CommandReply(replies.remove(0))
                    } else {
                        host_message::Body::CommandReplies(v1::CommandReplies { replies })
                    };
                    let reply = message(body);
                    self.shared.sending(Some(&set), reply.encoded_len(), thaws);
                    tx.send(reply).await?;
                }
            }
        }
    }
}

/// One size's result with simulated nodes.
#[derive(Debug, Clone, Serialize)]
pub struct SimResult {
    pub nodes: usize,
    pub writers: usize,
    /// Freeze window minus provider time, per set.
    pub coordination: Sample,
    pub freeze_window: Sample,
    pub provider: Sample,
    /// From the request to the answer at the requester.
    pub end_to_end: Sample,
    /// The broker's CPU time (user + system, all its threads) per set, from the request to the
    /// answer (the snapshot's deletion not included)...
    pub broker_cpu: Sample,
    /// ...of it, between the first freeze command arriving at a node and the last thaw answer
    /// leaving one (the freeze window as the nodes see it)...
    pub broker_cpu_in_window: Sample,
    /// ...and the rest (identify, prepare, the record, post-snapshot, complete).
    pub broker_cpu_outside_window: Sample,
    /// The same whole-set figure from /proc/PID/stat's 10 ms ticks over all the sets: a check
    /// on the per-thread sums (which miss threads that ended).
    pub broker_cpu_ms_per_set_stat: f64,
    /// Writer calls per set (commands the broker sent), and the broker's median CPU per set
    /// divided by them.
    pub writer_calls_per_set: f64,
    pub broker_cpu_us_per_call: f64,
    /// The simulator's own CPU per set: it shares the machine with the broker.
    pub nodesim_cpu_ms_per_set: f64,
    /// The broker's resident memory with every node attached before the first set, after the
    /// last, and its peak.
    pub broker_rss_mib_attached: f64,
    pub broker_rss_mib_after: f64,
    pub broker_rss_mib_peak: f64,
    /// After each measured set: whether the growth from `attached` levels off.
    pub broker_rss_mib_by_set: Vec<f64>,
    /// The set's record as the catalog keeps it (JSON, median over the sets), and as the
    /// requester's answer carries it (compacted past 1 MiB).
    pub catalog_record_bytes: f64,
    pub reply_record_bytes: f64,
    /// Per set, medians: messages and bytes (protobuf plus gRPC's 5-byte prefix) broker → nodes
    /// and nodes → broker.
    pub wire_to_nodes_messages: f64,
    pub wire_to_nodes_bytes: f64,
    pub wire_from_nodes_messages: f64,
    pub wire_from_nodes_bytes: f64,
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    Sample::of_ms(&values.into_iter().collect::<Vec<_>>()).median_ms
}

/// The simulator running for one size, as the bench sees it.
struct Simulator {
    process: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Simulator {
    fn start(
        here: &Path,
        broker: &Broker,
        certs: &Path,
        nodes: usize,
        writers: usize,
        threads: usize,
    ) -> anyhow::Result<Simulator> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["nodesim", "--url", &broker.url, "--certs"])
            .arg(certs)
            .args(["--prefix", PREFIX])
            .args(["--nodes", &nodes.to_string()])
            .args(["--writers", &writers.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--broker-pid", &broker.process.pid().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut process = Child::spawn(command, here.join("nodesim.log"));
        let stdin = process.child.stdin.take().expect("piped");
        let stdout = BufReader::new(process.child.stdout.take().expect("piped"));
        let mut sim = Simulator {
            process,
            stdin,
            stdout,
        };
        let line = sim.line()?;
        anyhow::ensure!(
            line.trim() == "ready",
            "the node simulator did not start: {line:?} {}",
            sim.process.log()
        );
        Ok(sim)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line)
    }

    fn stats(&mut self) -> anyhow::Result<Stats> {
        writeln!(self.stdin, "stats")?;
        self.stdin.flush()?;
        let line = self.line()?;
        serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "the node simulator's stats {line:?}: {e} {}",
                self.process.log()
            )
        })
    }

    /// Ends it: the end of its stdin.
    fn stop(self) {
        let Simulator {
            mut process, stdin, ..
        } = self;
        drop(stdin);
        let _ = process.child.wait();
    }
}

/// The simulated nodes' names: `s1`, `s2`, ...
const PREFIX: &str = "s";

/// One size: a fresh broker and a simulator process of `nodes` nodes of `writers` writers.
pub async fn measure(
    dir: &Path,
    bin: &Path,
    nodes: usize,
    writers: usize,
    sets: usize,
    threads: usize,
) -> anyhow::Result<SimResult> {
    let here = dir.join(format!("nodesim-{nodes}"));
    let (broker, certs) = scale::start_broker(&here, bin, PREFIX, nodes)?;
    let mut sim = Simulator::start(&here, &broker, &certs, nodes, writers, threads)?;
    broker.wait_nodes(nodes, Duration::from_secs(300)).await?;
    let (broker_pid, sim_pid) = (broker.process.pid(), sim.process.pid());
    let (rss_attached, _) = scale::rss_mib(broker_pid);
    let mut client = broker.sets().await?;
    for _ in 0..2 {
        broker.set(&mut client, VOLUME).await?; // warm-up
    }
    let stat_before = scale::cpu_time(broker_pid);
    let sim_before = scale::cpu_ns(sim_pid);
    let (mut runs, mut rss_by_set) = (vec![], vec![]);
    for _ in 0..sets {
        let before = scale::cpu_ns(broker_pid);
        let (record, took, reply_bytes) = broker.create(&mut client, VOLUME).await?;
        let cpu = scale::cpu_ns(broker_pid).saturating_sub(before);
        broker.delete(&mut client, &record).await?;
        rss_by_set.push(scale::rss_mib(broker_pid).0);
        runs.push((record, took, reply_bytes, cpu));
    }
    let sim_cpu = scale::cpu_ns(sim_pid).saturating_sub(sim_before);
    let stat_cpu = scale::cpu_time(broker_pid).saturating_sub(stat_before);
    let (rss_after, rss_peak) = scale::rss_mib(broker_pid);
    // One more set, not measured: the broker ends the last measured set's leases on each link
    // before it sends that node the next set's first command, and the simulator answers each
    // link's messages in order, so once this set ended every message of the measured ones
    // has been counted.
    broker.set(&mut client, VOLUME).await?;
    let stats = sim.stats()?;
    sim.stop();
    let catalog = rusqlite::Connection::open_with_flags(
        here.join(scale::CATALOG),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let mut catalog_bytes = vec![];
    for (record, ..) in &runs {
        let bytes: i64 = catalog.query_row(
            "SELECT length(CAST(record_json AS BLOB)) FROM sets WHERE id = ?1",
            [&record.id.0],
            |row| row.get(0),
        )?;
        catalog_bytes.push(bytes as f64);
    }
    drop(client);
    drop(broker);

    let ms = |ns: u64| ns as f64 / 1e6;
    let traces: Vec<&SetTrace> = runs
        .iter()
        .map(|(r, ..)| {
            stats
                .sets
                .get(&r.id.0)
                .ok_or_else(|| anyhow::anyhow!("the simulator saw nothing of set {}", r.id))
        })
        .collect::<anyhow::Result<_>>()?;
    let in_window: Vec<f64> = traces
        .iter()
        .filter_map(|t| {
            Some(ms(t
                .broker_cpu_ns_last_thaw?
                .saturating_sub(t.broker_cpu_ns_first_freeze?)))
        })
        .collect();
    let whole: Vec<f64> = runs.iter().map(|r| ms(r.3)).collect();
    let outside: Vec<f64> = traces
        .iter()
        .zip(&whole)
        .filter_map(|(t, whole)| {
            let inside = ms(t
                .broker_cpu_ns_last_thaw?
                .saturating_sub(t.broker_cpu_ns_first_freeze?));
            Some((whole - inside).max(0.0))
        })
        .collect();
    let records: Vec<(SetRecord, Duration)> = runs.iter().map(|r| (r.0.clone(), r.1)).collect();
    let base = scale::summarise(nodes, writers, &records, (Duration::ZERO, Duration::ZERO));
    let calls = median(traces.iter().map(|t| t.commands as f64));
    let broker_cpu = Sample::of_ms(&whole);
    let per_set = |d: f64| d / sets.max(1) as f64;
    Ok(SimResult {
        nodes,
        writers,
        coordination: base.coordination,
        freeze_window: base.freeze_window,
        provider: base.provider,
        end_to_end: base.end_to_end,
        broker_cpu_us_per_call: broker_cpu.median_ms * 1000.0 / calls.max(1.0),
        broker_cpu,
        broker_cpu_in_window: Sample::of_ms(&in_window),
        broker_cpu_outside_window: Sample::of_ms(&outside),
        broker_cpu_ms_per_set_stat: per_set(stat_cpu.as_secs_f64() * 1000.0),
        writer_calls_per_set: calls,
        nodesim_cpu_ms_per_set: per_set(ms(sim_cpu)),
        broker_rss_mib_attached: rss_attached,
        broker_rss_mib_after: rss_after,
        broker_rss_mib_peak: rss_peak,
        broker_rss_mib_by_set: rss_by_set,
        catalog_record_bytes: median(catalog_bytes),
        reply_record_bytes: median(runs.iter().map(|r| r.2 as f64)),
        wire_to_nodes_messages: median(traces.iter().map(|t| t.to_nodes_messages as f64)),
        wire_to_nodes_bytes: median(traces.iter().map(|t| t.to_nodes_bytes as f64)),
        wire_from_nodes_messages: median(traces.iter().map(|t| t.from_nodes_messages as f64)),
        wire_from_nodes_bytes: median(traces.iter().map(|t| t.from_nodes_bytes as f64)),
    })
}

/// The volume the bench's broker snapshots.
const VOLUME: &str = "bench";

#[cfg(test)]
mod tests {
    use super::*;

    fn command(id: u64, set: &str, call: v1::set_command::Call) -> v1::SetCommand {
        v1::SetCommand {
            command_id: id,
            set_id: set.into(),
            epoch: 1,
            writer: format!("mem{id}"),
            budget_ms: 1000,
            call: Some(call),
        }
    }

    #[test]
    fn a_set_is_counted_and_the_broker_sampled_at_its_first_freeze_and_last_thaw() {
        // Two writers in all; this process stands in for the broker.
        let shared = Shared {
            broker_pid: Some(std::process::id()),
            writers_total: 2,
            stats: Mutex::new(Stats::default()),
        };
        let freeze = || v1::set_command::Call::Freeze(v1::Freeze { hold_limit_ms: 1 });
        let thaw = || v1::set_command::Call::Thaw(v1::Thaw {});
        shared.received(Some("s"), 10, &[command(1, "s", freeze())]);
        shared.received(Some("s"), 10, &[command(2, "s", freeze())]);
        let first = shared.stats().sets["s"].broker_cpu_ns_first_freeze;
        assert!(first.is_some_and(|ns| ns > 0), "{first:?}");
        shared.received(
            Some("s"),
            20,
            &[command(3, "s", thaw()), command(4, "s", thaw())],
        );
        shared.sending(Some("s"), 30, 1);
        assert_eq!(shared.stats().sets["s"].broker_cpu_ns_last_thaw, None);
        shared.sending(Some("s"), 30, 1);
        shared.sending(None, 7, 0);
        let stats = shared.stats().clone();
        let trace = &stats.sets["s"];
        assert!(trace.broker_cpu_ns_last_thaw >= first, "{trace:?}");
        assert_eq!(trace.broker_cpu_ns_first_freeze, first, "sampled once");
        assert_eq!(
            (trace.commands, trace.freezes, trace.thaws_answered),
            (4, 2, 2)
        );
        assert_eq!(
            (trace.to_nodes_messages, trace.to_nodes_bytes),
            (3, 40 + 15)
        );
        assert_eq!((trace.from_nodes_messages, trace.from_nodes_bytes), (2, 70));
        assert_eq!(stats.other_from_nodes_bytes, 12);
    }

    #[test]
    fn every_command_is_answered_ok_for_its_writer() {
        let c = command(7, "s", v1::set_command::Call::Prepare(v1::Prepare {}));
        let reply = answer(&c);
        assert_eq!((reply.command_id, reply.set_id.as_str()), (7, "s"));
        assert_eq!(reply.writer, "mem7");
        assert!(matches!(
            reply.result,
            Some(v1::command_reply::Result::Ok(ref ok)) if ok.reports.is_empty()
        ));
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        assert!(scale::cpu_ns(std::process::id()) > 0);
        let (rss, peak) = scale::rss_mib(std::process::id());
        assert!(rss > 0.0 && peak >= rss, "{rss} {peak}");
    }
}
