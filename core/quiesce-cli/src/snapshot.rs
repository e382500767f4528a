//! `quiesce snapshot create|exec|renew|list|show|delete|prune`: snapshot sets across the cluster, asked of the
//! host on this node over D-Bus (`org.quiesce.Host1`), which forwards them to the broker with
//! its own node certificate. The caller needs no certificate: this is the path for backup
//! software that knows nothing about the cluster.

use crate::exit::Exit;
use anyhow::Context;
use clap::Subcommand;
use quiesce_dbus::HostClient;
use quiesce_proto::{SetRecord, WriterResult};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Run one snapshot set of the volumes across the cluster, wait until it ends and print its
    /// record (needs root or the quiesce group). On a terminal, each phase the set enters is
    /// shown on stderr. SIGINT or SIGTERM cancels the set (every writer thawed, no snapshot
    /// kept); its record, failed and saying so, is printed as any other.
    Create {
        /// A volume to snapshot, as the hosts' [volumes.NAME] name it (repeatable: one set over
        /// all of them).
        #[arg(long = "volume", value_name = "NAME", required = true)]
        volumes: Vec<String>,
        /// Leave out writers that fail and keep a crash-consistent snapshot, saying so in the
        /// record (never the default).
        #[arg(long)]
        best_effort: bool,
        #[command(flatten)]
        hold: Hold,
        /// Give up on a set still running this long after it started ("30s", "5m"): the broker
        /// aborts it (every writer thawed, no snapshot kept) and it fails saying so.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Print the record as JSON (the SetRecord form of quiesce-proto's JSON.md).
        #[arg(long)]
        json: bool,
    },
    /// Run one set, then COMMAND with the snapshot mounted read-only at the same path every time
    /// (`/run/quiesce/snapshots/VOLUME`, in a mount namespace of the command's own), then delete
    /// the snapshot however the command ended (needs root). The command's environment has
    /// QUIESCE_SNAPSHOT_PATH, QUIESCE_SNAPSHOT_SOURCE, QUIESCE_SET_ID, QUIESCE_OUTCOME and
    /// QUIESCE_VOLUME; SIGTERM, SIGINT and SIGHUP are passed on to it. Exits with the command's
    /// status, or quiesce's own when no snapshot was kept.
    Exec {
        /// The volume to snapshot.
        #[arg(long, value_name = "NAME")]
        volume: String,
        /// As for `create`: keep a crash-consistent snapshot when writers fail (the command
        /// sees QUIESCE_OUTCOME=crash-consistent).
        #[arg(long)]
        best_effort: bool,
        /// Mount the snapshot here instead of /run/quiesce/snapshots/VOLUME.
        #[arg(long, value_name = "DIR")]
        at: Option<std::path::PathBuf>,
        /// The lease exec renews every third of while the command runs: if quiesce is killed,
        /// the broker deletes the snapshot this long after the last renewal.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "2m")]
        lease: Duration,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// For a backup tool's before-hook: run one set and bind-mount its snapshot read-only at
    /// /run/quiesce/snapshots/VOLUME on this node until `release` (needs root). Prints the set;
    /// exits as `create`.
    Mount {
        /// The volume to snapshot.
        #[arg(long, value_name = "NAME")]
        volume: String,
        /// As for `create`.
        #[arg(long)]
        best_effort: bool,
        /// Mount the snapshot here instead of /run/quiesce/snapshots/VOLUME.
        #[arg(long, value_name = "DIR")]
        at: Option<std::path::PathBuf>,
        /// Nothing renews this lease: the broker deletes the snapshot this long after the set
        /// ended unless `release` did first.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "12h")]
        lease: Duration,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// For a backup tool's after-hook: unmount what `mount` mounted for the volume and delete
    /// the snapshot (needs root). Nothing mounted: says so and succeeds.
    Release {
        /// The volume given to `mount`.
        #[arg(long, value_name = "NAME")]
        volume: String,
        /// The directory given to `mount --at`.
        #[arg(long, value_name = "DIR")]
        at: Option<std::path::PathBuf>,
    },
    /// Renew the lease on the snapshot a set kept (needs root or the quiesce group).
    Renew {
        /// The set's id.
        id: String,
        #[command(flatten)]
        hold: Hold,
        /// Print the record after the renewal as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The cluster's snapshot sets, oldest first: one line per set.
    List {
        /// Only the sets of this volume.
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
        /// Only the sets started within this long ("36h", "7d").
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Print a JSON array of SetRecord documents.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume's kept snapshots except those the rules keep (needs root or the quiesce
    /// group). A snapshot is kept when any rule keeps it; one still held by a lease (a backup
    /// reading it) is never deleted.
    Prune {
        /// The volume whose snapshots to prune.
        #[arg(long, value_name = "NAME")]
        volume: String,
        /// Keep the newest N snapshots.
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Keep the snapshots started within this long ("7d", "36h").
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        keep_within: Option<Duration>,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print {"volume", "kept", "held", "deleted", "dry_run"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One snapshot set's record.
    Show {
        /// The set's id (as `quiesce snapshot list` shows it).
        id: String,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete the snapshot a set kept; its record stays, marked deleted (needs root or the
    /// quiesce group).
    Delete {
        /// The set's id.
        id: String,
        /// Print the record after the deletion as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How long the snapshot a set keeps is held.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Hold {
    /// Hold the snapshot this long after the set ended ("90m", "1d"); the broker deletes it
    /// then unless `quiesce snapshot renew` renews it or it was deleted first. A requester that
    /// dies leaks nothing.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1h", conflicts_with = "keep")]
    lease: Duration,
    /// Keep the snapshot until `quiesce snapshot delete` (or prune, or the broker's retention)
    /// deletes it.
    #[arg(long)]
    keep: bool,
}

impl Hold {
    fn lease(self) -> Option<Duration> {
        (!self.keep).then_some(self.lease)
    }
}

/// Runs one `quiesce snapshot` command against the host on the bus at `bus` (the system bus
/// when `None`).
pub async fn run(bus: Option<&str>, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    let host = HostClient::connect(bus).await?;
    match command {
        SnapshotCommand::Create {
            volumes,
            best_effort,
            hold,
            timeout,
            json,
        } => {
            let record = create(&host, &volumes, best_effort, hold.lease(), timeout).await?;
            let record = whole(&host, record, json).await?;
            print_one(&record, json)?;
            Ok(Exit::of_outcome(&record).into())
        }
        SnapshotCommand::Exec {
            volume,
            best_effort,
            at,
            lease,
            command,
        } => {
            let exec = crate::exec::Exec {
                volume,
                best_effort,
                at,
                lease,
                command,
            };
            crate::exec::run(&host, exec).await
        }
        SnapshotCommand::Mount {
            volume,
            best_effort,
            at,
            lease,
            json,
        } => {
            crate::mount::mount_snapshot(&host, &volume, at.as_deref(), best_effort, lease, json)
                .await
        }
        SnapshotCommand::Release { volume, at } => {
            crate::mount::release_snapshot(&host, &volume, at.as_deref()).await
        }
        SnapshotCommand::Renew { id, hold, json } => {
            print_one(
                &parse(&host.renew_snapshot(&id, hold.lease()).await?)?,
                json,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::List {
            volume,
            since,
            json,
        } => {
            let now = unix_ms();
            let records: Vec<SetRecord> = all_records(&host)
                .await?
                .into_iter()
                .filter(|r| {
                    volume
                        .as_ref()
                        .is_none_or(|v| r.request.volumes.contains(v))
                })
                .filter(|r| {
                    since.is_none_or(|since| {
                        started_unix_ms(r)
                            .is_some_and(|t| t >= now.saturating_sub(since.as_millis() as u64))
                    })
                })
                .collect();
            if json {
                print_json(&records)?;
            } else {
                print_list(&records, now);
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Prune {
            volume,
            keep_last,
            keep_within,
            dry_run,
            json,
        } => {
            let rules = crate::prune::Rules {
                keep_last,
                keep_within,
            };
            crate::prune::run(&host, &volume, rules, dry_run, json).await
        }
        SnapshotCommand::Show { id, json } => {
            let record = parse(&host.show_snapshot(&id).await?)?;
            print_one(&whole(&host, record, json).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Delete { id, json } => {
            print_one(&parse(&host.delete_snapshot(&id).await?)?, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Every set record the cluster keeps, oldest first, page by page: a catalog of any size
/// lists, each reply stays small.
pub async fn all_records(host: &HostClient) -> anyhow::Result<Vec<SetRecord>> {
    let mut records = vec![];
    let mut after = String::new();
    loop {
        let (page, next, unreadable) = host.list_snapshots_page(&after, 1000).await?;
        for row in unreadable {
            eprintln!("quiesce: skipped a catalog row: {row}");
        }
        for r in &page {
            records.push(parse(r)?);
        }
        if next.is_empty() {
            return Ok(records);
        }
        after = next;
    }
}

/// When a set started: its record says so, or (a record of an older broker) its id does.
pub fn started_unix_ms(record: &SetRecord) -> Option<u64> {
    record.started_unix_ms.or_else(|| {
        record
            .id
            .0
            .strip_prefix("set-")?
            .split('-')
            .next()?
            .parse()
            .ok()
    })
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs one set through `StartSnapshot` and follows it to its end by the host's signals: its
/// phases on stderr when that is a terminal (a script's stderr stays as quiet as before), and
/// the first SIGINT or SIGTERM cancels it — a backup job stopped mid-set leaves nothing frozen
/// and nothing kept, and still learns the set's id and outcome.
async fn create(
    host: &HostClient,
    volumes: &[String],
    best_effort: bool,
    lease: Option<Duration>,
    timeout: Option<Duration>,
) -> anyhow::Result<SetRecord> {
    use quiesce_dbus::SetEvent;
    use std::io::IsTerminal;
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM's handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT's handler")?;
    // Subscribed before the set starts: none of its signals can come before the subscription.
    let mut events = host.set_signals().await?;
    let id = host
        .start_snapshot(volumes, best_effort, lease, timeout)
        .await?;
    let progress = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut cancelled = false;
    loop {
        let stop = tokio::select! {
            event = events.next_of(&id) => match event {
                Some(SetEvent::Phase(phase)) => {
                    if progress {
                        eprintln!("{id}: {phase} ({:.1} s)", started.elapsed().as_secs_f64());
                    }
                    continue;
                }
                Some(SetEvent::Ended(_)) => break,
                None => anyhow::bail!(
                    "the bus connection closed while set {id} ran: `quiesce snapshot show {id}` shows how it ended"
                ),
            },
            _ = terminate.recv(), if !cancelled => "SIGTERM",
            _ = interrupt.recv(), if !cancelled => "SIGINT",
        };
        cancelled = true;
        eprintln!("{stop}: cancelling set {id} (every writer is thawed, no snapshot is kept)");
        match host.cancel_snapshot(&id).await {
            Ok(()) => {}
            // It ended meanwhile: its SetEnded is on the way.
            Err(quiesce_dbus::CallError::Host(quiesce_dbus::Error::UnknownSet(_))) => {}
            Err(e) => return Err(e.into()),
        }
    }
    parse(&host.show_snapshot(&id).await?)
}

/// The whole record when `--json` asks for it: a record too large for one reply comes with
/// only some of its writers (`writers_omitted`), and the rest are fetched page by page.
async fn whole(host: &HostClient, mut record: SetRecord, json: bool) -> anyhow::Result<SetRecord> {
    if !json || record.writers_omitted == 0 {
        return Ok(record);
    }
    let mut writers = vec![];
    loop {
        let (page, total) = host
            .show_snapshot_writers(&record.id.0, writers.len() as u64, 0)
            .await?;
        if page.is_empty() {
            anyhow::bail!(
                "the host gave {} of set {}'s {total} writers and then none: ask again",
                writers.len(),
                record.id
            );
        }
        for w in page {
            writers.push(serde_json::from_str::<WriterResult>(&w).context(
                "the host answered with a writer that is not a WriterResult of JSON.md",
            )?);
        }
        if writers.len() as u64 >= total {
            break;
        }
    }
    record.writers = writers;
    record.writers_omitted = 0;
    Ok(record)
}

/// Reads the host's record: what `--json` prints is then always the form of JSON.md, however
/// the broker spaced it.
fn parse(json: &str) -> anyhow::Result<SetRecord> {
    serde_json::from_str(json).context(
        "the host answered with a record that is not a SetRecord of core/quiesce-proto/JSON.md; install the same quiesce release on this node's host and here",
    )
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn print_one(record: &SetRecord, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(record)
    } else {
        print_record(record);
        Ok(())
    }
}

fn print_record(record: &SetRecord) {
    println!("set {}: {}", record.id, record.outcome);
    println!(
        "  volumes: {}{}",
        record.request.volumes.join(", "),
        if record.request.best_effort {
            " (best effort)"
        } else {
            ""
        }
    );
    if let Some(started) = started_unix_ms(record) {
        println!("  started: {}", utc(started));
    }
    match &record.snapshot {
        Some(s) => println!(
            "  snapshot: {} ({}, id {}), {}",
            s.path,
            s.provider,
            s.id,
            held(record, unix_ms())
        ),
        None => println!("  snapshot: none kept"),
    }
    let freeze = match record.freeze_window_ms {
        Some(ms) => format!("freeze window {ms} ms"),
        None => "nothing was frozen".to_string(),
    };
    let provider = match record.provider_ms {
        Some(ms) => format!("provider {ms} ms"),
        None => "provider did not run".to_string(),
    };
    println!("  {freeze}, {provider}, total {} ms", record.total_ms);
    if let Some(cleanup) = &record.cleanup_error {
        println!("  cleanup failed: {cleanup}");
    }
    if record.writers.is_empty() {
        println!("  writers: none");
        return;
    }
    println!("  writers:");
    let rows: Vec<[String; 4]> = record
        .writers
        .iter()
        .map(|w| {
            [
                w.writer.node.clone(),
                w.writer.writer.clone(),
                w.state.to_string(),
                writer_result(w),
            ]
        })
        .collect();
    let header = ["NODE", "WRITER", "STATE", "FAILURE"].map(String::from);
    crate::print_table_indented("    ", &header, &rows);
    if record.writers_omitted > 0 {
        println!(
            "    … and {} more writers, none of them failed (--json shows every writer)",
            record.writers_omitted
        );
    }
}

fn writer_result(w: &WriterResult) -> String {
    let failure = w
        .failure
        .as_ref()
        .map(|f| format!("{} in {}: {}", f.kind, f.phase, f.reason));
    match (w.excluded, failure) {
        (true, Some(f)) => format!("left out (best effort): {f}"),
        (true, None) => "left out (best effort)".to_string(),
        (false, Some(f)) => f,
        (false, None) => String::new(),
    }
}

fn print_list(records: &[SetRecord], now: u64) {
    if records.is_empty() {
        println!("no snapshot sets (`quiesce snapshot create --volume NAME` runs one)");
        return;
    }
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            let started = started_unix_ms(r);
            [
                r.id.0.clone(),
                started.map_or("-".into(), utc),
                started.map_or("-".into(), |t| age(now.saturating_sub(t))),
                r.request.volumes.join(","),
                r.outcome.label().to_string(),
                r.snapshot.as_ref().map_or("-".into(), |s| s.path.clone()),
                match r.snapshot {
                    Some(_) => held(r, now),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let header = [
        "ID", "STARTED", "AGE", "VOLUMES", "OUTCOME", "SNAPSHOT", "HELD",
    ]
    .map(String::from);
    crate::print_table_indented("", &header, &rows);
}

/// How a kept snapshot is held: until deleted, by a lease (for how much longer), or deleted
/// (when and why).
fn held(record: &SetRecord, now: u64) -> String {
    match (record.deleted_unix_ms, record.lease_until_unix_ms) {
        (Some(at), _) => format!(
            "deleted {} ({})",
            utc(at),
            record.deleted_because.map_or("requested", |d| d.as_str())
        ),
        (None, Some(until)) if until > now => format!("lease {} left", age(until - now)),
        (None, Some(_)) => "lease lapsed, deletion due".into(),
        (None, None) => "kept until deleted".into(),
    }
}

/// A span of milliseconds, to the second, as people read it ("3h 2m 5s").
fn age(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC, to the second.
fn utc(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_records_print_and_round_trip() {
        let doc = include_str!("../../quiesce-proto/JSON.md");
        let records: Vec<SetRecord> = doc
            .split("<!-- example: SetRecord -->\n```json\n")
            .skip(1)
            .map(|rest| serde_json::from_str(&rest[..rest.find("```").unwrap()]).unwrap())
            .collect();
        assert_eq!(records.len(), 2, "JSON.md shows two SetRecord examples");
        let failed = &records[1];
        assert!(failed.outcome.is_failed());
        assert_eq!(writer_result(&failed.writers[0]), "");
        for record in &records {
            print_record(record);
        }
        print_list(&records, 1_795_809_300_123);
        // What --json prints reads back as the same record.
        let printed = serde_json::to_string_pretty(failed).unwrap();
        assert_eq!(
            &serde_json::from_str::<SetRecord>(&printed).unwrap(),
            failed
        );
    }
}
