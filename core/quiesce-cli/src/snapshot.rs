//! `quiesce snapshot create|list|show|delete`: snapshot sets across the cluster, asked of the
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

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Run one snapshot set of the volumes across the cluster, wait until it ends and print its
    /// record (needs root or the quiesce group).
    Create {
        /// A volume to snapshot, as the hosts' [volumes.NAME] name it (repeatable: one set over
        /// all of them).
        #[arg(long = "volume", value_name = "NAME", required = true)]
        volumes: Vec<String>,
        /// Leave out writers that fail and keep a crash-consistent snapshot, saying so in the
        /// record (never the default).
        #[arg(long)]
        best_effort: bool,
        /// Print the record as JSON (the SetRecord form of quiesce-proto's JSON.md).
        #[arg(long)]
        json: bool,
    },
    /// The cluster's snapshot sets, oldest first: one line per set.
    List {
        /// Print a JSON array of SetRecord documents.
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

/// Runs one `quiesce snapshot` command against the host on the bus at `bus` (the system bus
/// when `None`).
pub async fn run(bus: Option<&str>, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    let host = HostClient::connect(bus).await?;
    match command {
        SnapshotCommand::Create {
            volumes,
            best_effort,
            json,
        } => {
            let record = parse(&host.create_snapshot(&volumes, best_effort).await?)?;
            let record = whole(&host, record, json).await?;
            print_one(&record, json)?;
            Ok(Exit::of_outcome(&record).into())
        }
        SnapshotCommand::List { json } => {
            // Page by page: a catalog of any size lists, each reply stays small.
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
                    break;
                }
                after = next;
            }
            if json {
                print_json(&records)?;
            } else {
                print_list(&records);
            }
            Ok(ExitCode::SUCCESS)
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

fn print_one(record: &SetRecord, json: bool) -> anyhow::Result<()> {
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
    match (&record.snapshot, record.deleted_unix_ms) {
        (Some(s), None) => println!("  snapshot: {} ({}, id {})", s.path, s.provider, s.id),
        (Some(s), Some(ms)) => println!(
            "  snapshot: {} ({}, id {}), deleted {}",
            s.path,
            s.provider,
            s.id,
            utc(ms)
        ),
        (None, _) => println!("  snapshot: none kept"),
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
                kebab(&w.state),
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
        .map(|f| format!("{} in {}: {}", kebab(&f.kind), f.phase, f.reason));
    match (w.excluded, failure) {
        (true, Some(f)) => format!("left out (best effort): {f}"),
        (true, None) => "left out (best effort)".to_string(),
        (false, Some(f)) => f,
        (false, None) => String::new(),
    }
}

fn print_list(records: &[SetRecord]) {
    if records.is_empty() {
        println!("no snapshot sets yet (`quiesce snapshot create --volume NAME` runs one)");
        return;
    }
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|r| {
            let snapshot = match (&r.snapshot, r.deleted_unix_ms) {
                (Some(s), None) => s.path.clone(),
                (Some(s), Some(_)) => format!("{} (deleted)", s.path),
                (None, _) => "-".to_string(),
            };
            [
                r.id.0.clone(),
                r.outcome.label().to_string(),
                r.request.volumes.join(","),
                snapshot,
                format!("{} ms", r.total_ms),
            ]
        })
        .collect();
    let header = ["ID", "OUTCOME", "VOLUMES", "SNAPSHOT", "TOTAL"].map(String::from);
    crate::print_table_indented("", &header, &rows);
}

/// The kebab-case name JSON.md gives an enum value (`post-snapshotting`, `timeout`).
fn kebab<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_809_300_123), "2026-11-27 19:55:00 UTC");
    }

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
        print_list(&records);
        // What --json prints reads back as the same record.
        let printed = serde_json::to_string_pretty(failed).unwrap();
        assert_eq!(
            &serde_json::from_str::<SetRecord>(&printed).unwrap(),
            failed
        );
    }
}
