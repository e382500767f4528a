//! `quiesce snapshot prune`: delete a volume's kept snapshots except those the rules keep.
//!
//! The rules are restic's and borg's: a snapshot is kept when any rule keeps it (`--keep-last N`:
//! the N newest; `--keep-within D`: started within D). A snapshot held by a lease that has not
//! lapsed is never deleted: a backup is reading it, and the broker deletes it when the lease
//! lapses.

use crate::exit::{Exit, Failure};
use crate::snapshot::{all_records, started_unix_ms, unix_ms};
use quiesce_dbus::HostClient;
use quiesce_proto::SetRecord;
use serde::Serialize;
use std::process::ExitCode;
use std::time::Duration;

/// What to keep.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    pub keep_last: Option<usize>,
    pub keep_within: Option<Duration>,
}

/// The verdict on a volume's kept snapshots, each list oldest first.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub kept: Vec<String>,
    /// Held by a lease that has not lapsed: kept whatever the rules say.
    pub held: Vec<String>,
    pub deleted: Vec<String>,
}

/// Which of `kept` (the volume's kept snapshots, oldest first) the rules keep at `now_unix_ms`.
pub fn verdict(kept: &[&SetRecord], rules: Rules, now_unix_ms: u64) -> Verdict {
    let newest_first: Vec<&&SetRecord> = kept.iter().rev().collect();
    let mut verdict = Verdict::default();
    for (newer, record) in newest_first.into_iter().enumerate().rev() {
        let id = record.id.0.clone();
        let by_last = rules.keep_last.is_some_and(|n| newer < n);
        let by_within = rules.keep_within.is_some_and(|within| {
            started_unix_ms(record)
                .is_some_and(|t| t >= now_unix_ms.saturating_sub(within.as_millis() as u64))
        });
        let leased = record
            .lease_until_unix_ms
            .is_some_and(|until| until > now_unix_ms);
        if by_last || by_within {
            verdict.kept.push(id);
        } else if leased {
            verdict.held.push(id);
        } else {
            verdict.deleted.push(id);
        }
    }
    verdict
}

#[derive(Serialize)]
struct Report<'a> {
    volume: &'a str,
    dry_run: bool,
    #[serde(flatten)]
    verdict: &'a Verdict,
}

pub async fn run(
    host: &HostClient,
    volume: &str,
    rules: Rules,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if rules.keep_last.is_none() && rules.keep_within.is_none() {
        return Err(Failure::error(
            Exit::Usage,
            "say what to keep: --keep-last N, --keep-within DURATION, or both (prune never deletes everything by default)",
        ));
    }
    let records = all_records(host).await?;
    let kept: Vec<&SetRecord> = records
        .iter()
        .filter(|r| r.request.volumes.iter().any(|v| v == volume))
        .filter(|r| r.snapshot.is_some() && r.deleted_unix_ms.is_none())
        .collect();
    let verdict = verdict(&kept, rules, unix_ms());
    let mut failed = None;
    if !dry_run {
        for id in &verdict.deleted {
            if let Err(e) = host.delete_snapshot(id).await {
                eprintln!("quiesce: could not delete the snapshot of set {id}: {e}");
                failed.get_or_insert(e);
            }
        }
    }
    if json {
        let report = Report {
            volume,
            dry_run,
            verdict: &verdict,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let deleted = if dry_run { "would delete" } else { "deleted" };
        for (what, ids) in [
            ("kept", &verdict.kept),
            ("held by a lease", &verdict.held),
            (deleted, &verdict.deleted),
        ] {
            for id in ids {
                println!("{what}: {id}");
            }
        }
        println!(
            "{volume}: {} kept, {} held by a lease, {} {deleted}",
            verdict.kept.len(),
            verdict.held.len(),
            verdict.deleted.len()
        );
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn record(id: &str, started: u64, lease_until: Option<u64>) -> SetRecord {
        let doc = include_str!("../../quiesce-proto/JSON.md");
        let rest = doc
            .split("<!-- example: SetRecord -->\n```json\n")
            .nth(1)
            .unwrap();
        let mut record: SetRecord = serde_json::from_str(&rest[..rest.find("```").unwrap()])
            .expect("JSON.md's first SetRecord example");
        record.id.0 = id.into();
        record.started_unix_ms = Some(started);
        record.lease_until_unix_ms = lease_until;
        record
    }

    #[test]
    fn any_rule_keeps_a_snapshot_and_a_held_one_is_never_deleted() {
        let now = 10 * DAY;
        let records = [
            record("a", DAY, None),
            record("b", 2 * DAY, Some(now + 1)),
            record("c", 3 * DAY, None),
            record("d", 8 * DAY + 1, None),
            record("e", 9 * DAY, None),
            record("f", 9 * DAY + 5, None),
        ];
        let kept: Vec<&SetRecord> = records.iter().collect();
        let rules = |last, within_days: Option<u64>| Rules {
            keep_last: last,
            keep_within: within_days.map(|d| Duration::from_millis(d * DAY)),
        };
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            verdict(&kept, rules(Some(2), None), now),
            Verdict {
                kept: ids(&["e", "f"]),
                held: ids(&["b"]),
                deleted: ids(&["a", "c", "d"]),
            }
        );
        assert_eq!(
            verdict(&kept, rules(None, Some(2)), now),
            Verdict {
                kept: ids(&["d", "e", "f"]),
                held: ids(&["b"]),
                deleted: ids(&["a", "c"]),
            }
        );
        // Together: kept by either.
        assert_eq!(
            verdict(&kept, rules(Some(4), Some(1)), now).deleted,
            ids(&["a"])
        );
        // A lease that lapsed holds nothing.
        assert_eq!(
            verdict(&kept, rules(Some(1), None), now + 2).deleted,
            ids(&["a", "b", "c", "d", "e"])
        );
    }
}
