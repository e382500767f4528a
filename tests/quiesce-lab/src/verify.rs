//! Restores and their verification: a backup restored from restic (or any copy of a snapshot's
//! tree) must hold every write each application acknowledged before the snapshot, and every
//! database in it must be sound:
//!
//! - PostgreSQL started on the copy (crash recovery) holds every committed record acknowledged
//!   before the snapshot, with no gap, and `pg_amcheck --all --heapallindexed` is clean;
//! - each SQLite database passes `PRAGMA integrity_check` and holds every acknowledged record;
//! - the buffering app's and each app writer run's `records.log` hold records 1..=K, whole
//!   lines, K at least the last acknowledged one.
//!
//! And nothing in it may be newer than the set's freeze: each writer that holds its
//! application's writes reports the application's last record at freeze (the buffering app's
//! and the app writer's `last_record`, the sqlite writer's `report_query`, here the highest
//! record number), and the copy holds no record past it. A record past it was written after the
//! freeze point its writer reported: the hold did not hold until the snapshot, and a set that
//! says app-consistent about such a snapshot lies.
//!
//! "Before the snapshot" is a bound the caller gives: a moment no later than the provider's
//! start (the lab takes the moment it asked for the set plus the record's `snapshot` phase start,
//! both measured before the snapshot). Every write acknowledged before it was durable, or held
//! by a frozen writer's flush, when the snapshot was taken.

use crate::lab::{
    chown_postgres, pg_bin, App, Lab, PgServer, APP_NODE, NODES, SQLITE_DBS, SQLITE_NODE,
};
use quiesce_proto::WriterResult;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// What one restore showed.
#[derive(Debug, Default, Clone)]
pub struct Verification {
    /// Acknowledged records found in the restore, per application.
    pub verified: Vec<(String, u64)>,
    /// Acknowledged records missing from it (must be none).
    pub lost: u64,
    /// Records in it past the freeze point their writer reported (must be none).
    pub past_freeze: u64,
    /// Everything that is wrong, each in words.
    pub problems: Vec<String>,
}

impl Verification {
    pub fn records(&self) -> u64 {
        self.verified.iter().map(|(_, n)| n).sum()
    }

    fn app(&mut self, app: &str, acked: u64, present: u64) {
        self.verified.push((app.into(), present.min(acked)));
        if present < acked {
            self.lost += acked - present;
            self.problems.push(format!(
                "{app}: {} of the {acked} records acknowledged before the snapshot are missing",
                acked - present
            ));
        }
    }

    /// `present`: the highest record the copy holds; `point`: the last record the app's writer
    /// reported at freeze, if it reports one.
    fn freeze_point(&mut self, app: &str, present: u64, point: Option<u64>) {
        if let Some(point) = point.filter(|&p| present > p) {
            self.past_freeze += present - point;
            self.problems.push(format!(
                "{app}: the copy holds records up to {present}, past record {point}, the last its writer reported at freeze: {} were written after the freeze point",
                present - point
            ));
        }
    }
}

/// The freeze point each holding writer of a set (its `writers`) reported, by application (the names of the
/// lab's ack logs): what the snapshot may hold at most. `runs` names each [`App`]'s current
/// run, the one its writer speaks for.
pub fn freeze_points(writers: &[WriterResult], runs: &[(App, String)]) -> BTreeMap<String, u64> {
    let mut points = BTreeMap::new();
    for w in writers {
        let number = |key: &str| {
            w.reports
                .get(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (w.writer.node.as_str(), w.writer.writer.as_str()) {
            (node, "buffer") if node == NODES[APP_NODE] => {
                if let Some(n) = number("last_record") {
                    points.insert("buffering-app".to_string(), n);
                }
            }
            (node, id)
                if runs
                    .iter()
                    .any(|(a, _)| (NODES[a.node()], a.writer()) == (node, id)) =>
            {
                let (_, run) = runs.iter().find(|(a, _)| a.writer() == id).unwrap();
                if let Some(n) = number("last_record") {
                    points.insert(run.clone(), n);
                }
            }
            (node, "sqlite") if node == NODES[SQLITE_NODE] => {
                for (db, _) in SQLITE_DBS {
                    let reported = w
                        .reports
                        .iter()
                        .find(|(k, _)| k.ends_with(&format!("/{db}:report_query")))
                        .and_then(|(_, v)| v.trim().parse::<u64>().ok());
                    if let Some(n) = reported {
                        points.insert(format!("sqlite {db}"), n);
                    }
                }
            }
            _ => {}
        }
    }
    points
}

impl Lab {
    /// Every [`App`]'s current run, as its ack log is named (for [`freeze_points`]).
    pub fn app_runs(&self) -> Vec<(App, String)> {
        App::ALL.iter().map(|&a| (a, self.current_run(a))).collect()
    }

    /// Restores the restic snapshot tagged with `set_id` into `target` (the volume's tree).
    pub fn restore_backup(&self, set_id: &str, target: &Path) -> Result<(), String> {
        let mut command = Command::new("restic");
        self.restic_env(&mut command);
        let output = command
            .args([
                "restore",
                "latest",
                "--tag",
                &format!("quiesce-set={set_id}"),
            ])
            .arg("--target")
            .arg(target)
            .output()
            .map_err(|e| format!("running restic: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "restic restore of set {set_id} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    }

    /// Verifies a restored tree against what the applications acknowledged before `bound_ns`
    /// and the freeze points their writers reported (`points`, see [`freeze_points`]).
    pub fn verify_restore(
        &mut self,
        root: &Path,
        bound_ns: u64,
        points: &BTreeMap<String, u64>,
    ) -> Verification {
        self.refresh_acks();
        let mut v = Verification::default();
        self.verify_postgres(root, bound_ns, &mut v);
        for (k, (db, _)) in SQLITE_DBS.iter().enumerate() {
            let acked = self.acks[1 + k].acked_before(bound_ns);
            let (count, last) = (acked.len() as u64, acked.last().map_or(0, |a| a.0));
            let app = self.acks[1 + k].app.clone();
            match sqlite_contents(&root.join("sqlite").join(db), last) {
                Ok(c) => {
                    if c.integrity != "ok" {
                        v.problems
                            .push(format!("{app}: integrity_check says {:?}", c.integrity));
                    }
                    check_gapless(&mut v, &app, c.count, c.min, c.max);
                    v.app(&app, count, c.present);
                    v.freeze_point(&app, c.max, points.get(&app).copied());
                }
                Err(e) => {
                    v.problems.push(e);
                    v.app(&app, count, 0);
                }
            }
        }
        let file_apps: Vec<(usize, std::path::PathBuf)> = (0..self.acks.len())
            .filter_map(|i| Some((i, root.join(self.acks[i].records.as_ref()?))))
            .collect();
        for (i, path) in file_apps {
            let acked = self.acks[i].acked_before(bound_ns);
            let (count, last) = (acked.len() as u64, acked.last().map_or(0, |a| a.0));
            let app = self.acks[i].app.clone();
            if count == 0 {
                continue; // started after the snapshot
            }
            let restored = if path.extension().is_some_and(|e| e == "map") {
                mapped_records(&path)
            } else {
                numbered_lines(&path)
            };
            match restored {
                Ok(k) => {
                    v.app(&app, count, k.min(last).min(count));
                    v.freeze_point(&app, k, points.get(&app).copied());
                }
                Err(e) => {
                    v.problems.push(format!("{app}: {e}"));
                    v.app(&app, count, 0);
                }
            }
        }
        v
    }

    fn verify_postgres(&mut self, root: &Path, bound_ns: u64, v: &mut Verification) {
        let acked = self.acks[0].acked_before(bound_ns);
        let (count, last) = (acked.len() as u64, acked.last().map_or(0, |a| a.0));
        let data = root.join("pg/data");
        if !data.join("PG_VERSION").is_file() {
            v.problems
                .push(format!("postgres: no data directory in {}", root.display()));
            v.app("postgres", count, 0);
            return;
        }
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        for dir in root
            .ancestors()
            .take_while(|d| d.starts_with(self.dir.path()))
        {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        chown_postgres(&root.join("pg"));
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A port of its own: another lab (a soak beside the test suite) restores at the same time.
        let mut copy = PgServer::on(&data, root, quiesce_testbed::postgres::free_port());
        // Thrown away after the checks: it need not be durable itself.
        copy.start(None, &["fsync=off"]);
        let checked = (|| -> Result<(i64, i64, i64, i64), String> {
            let mut client = copy.client()?;
            let row = client
                .query_one(
                    "SELECT count(*), coalesce(min(n), 0), coalesce(max(n), 0), \
                     count(*) FILTER (WHERE n <= $1) FROM records",
                    &[&(last as i64)],
                )
                .map_err(|e| format!("postgres: reading the restored records: {e}"))?;
            Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
        })();
        match checked {
            Ok((n, min, max, present)) => {
                check_gapless(v, "postgres", n as u64, min as u64, max as u64);
                v.app("postgres", count, present as u64);
            }
            Err(e) => {
                v.problems.push(format!("{e}\n{}", copy.log_text()));
                v.app("postgres", count, 0);
            }
        }
        let output = Command::new(pg_bin().join("pg_amcheck"))
            .arg("-h")
            .arg(&copy.socket_dir)
            .args(["-p", &copy.port.to_string(), "-U", "postgres"])
            .args(["--all", "--install-missing", "--heapallindexed"])
            .output()
            .unwrap();
        if !output.status.success() || !output.stdout.is_empty() {
            v.problems.push(format!(
                "postgres: pg_amcheck on the restored copy found problems ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        copy.stop();
    }
}

/// Records in a restored copy: numbers 1..=max with none missing.
fn check_gapless(v: &mut Verification, app: &str, count: u64, min: u64, max: u64) {
    if count > 0 && (min != 1 || count != max) {
        v.problems.push(format!(
            "{app}: the restored records are not 1..={max} without a gap ({count} records, from {min})"
        ));
    }
}

struct SqliteContents {
    integrity: String,
    count: u64,
    min: u64,
    max: u64,
    present: u64,
}

/// Opens a restored database (ours to change: SQLite may recover its WAL) and reads it.
fn sqlite_contents(db: &Path, last: u64) -> Result<SqliteContents, String> {
    if !db.is_file() {
        return Err(format!("{} is not in the restore", db.display()));
    }
    let what = |e: rusqlite::Error| format!("{}: {e}", db.display());
    let c = rusqlite::Connection::open(db).map_err(what)?;
    let integrity: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(what)?;
    let (count, min, max, present): (i64, i64, i64, i64) = c
        .query_row(
            "SELECT count(*), coalesce(min(n), 0), coalesce(max(n), 0), \
             count(*) FILTER (WHERE n <= ?1) FROM records",
            [last as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .map_err(what)?;
    Ok(SqliteContents {
        integrity,
        count: count as u64,
        min: min as u64,
        max: max as u64,
        present: present as u64,
    })
}

/// A restored `records.log` of numbered lines (`<n> …`): K when it holds exactly 1..=K, whole
/// lines, in order.
fn numbered_lines(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{} is not in the restore: {e}", path.display()))?;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(format!(
            "a record is cut short at the end of {}",
            path.display()
        ));
    }
    let mut k = 0u64;
    for line in text.lines() {
        let n: u64 = line
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("{}: a line is not a record: {line:?}", path.display()))?;
        if n != k + 1 {
            return Err(format!("{}: record {n} follows record {k}", path.display()));
        }
        k = n;
    }
    Ok(k)
}

/// A restored `records.map` of fixed-width records (`app-writer --mmap`): K when it holds
/// exactly records 1..=K, each whole at its place, and zeros after them.
fn mapped_records(path: &Path) -> Result<u64, String> {
    let map = std::fs::read(path)
        .map_err(|e| format!("{} is not in the restore: {e}", path.display()))?;
    let mut k = 0u64;
    for slot in map.chunks(MMAP_RECORD_BYTES) {
        if slot.iter().all(|&b| b == 0) {
            break;
        }
        let n = std::str::from_utf8(slot)
            .ok()
            .filter(|r| r.len() == MMAP_RECORD_BYTES && r.ends_with('\n'))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok());
        if n != Some(k + 1) {
            return Err(format!(
                "{}: the record after record {k} is not record {} (torn or misplaced): {:?}",
                path.display(),
                k + 1,
                String::from_utf8_lossy(slot)
            ));
        }
        k += 1;
    }
    let rest = (k as usize * MMAP_RECORD_BYTES).min(map.len());
    if let Some(at) = map[rest..].iter().position(|&b| b != 0) {
        return Err(format!(
            "{}: data at byte {} after the last whole record {k}",
            path.display(),
            rest + at
        ));
    }
    Ok(k)
}

/// The width of one record in `records.map` (`app-writer --mmap`).
const MMAP_RECORD_BYTES: usize = 33;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_lines_are_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        std::fs::write(&p, "1 10\n2 11\n3 12\n").unwrap();
        assert_eq!(numbered_lines(&p), Ok(3));
        std::fs::write(&p, "1 10\n3 11\n").unwrap();
        assert!(numbered_lines(&p)
            .unwrap_err()
            .contains("record 3 follows record 1"));
        std::fs::write(&p, "1 10\n2 1").unwrap();
        assert!(numbered_lines(&p).unwrap_err().contains("cut short"));
    }

    #[test]
    fn mapped_records_are_whole_in_place_and_followed_by_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("records.map");
        let record = |n: u64| format!("{n:>12} {:>19}\n", n * 7);
        let mut map = vec![0u8; 33 * 5];
        for n in 1..=3u64 {
            let at = (n as usize - 1) * 33;
            map[at..at + 33].copy_from_slice(record(n).as_bytes());
        }
        std::fs::write(&p, &map).unwrap();
        assert_eq!(mapped_records(&p), Ok(3));
        // A lost record 2 (zeros where it was), with 3 after it.
        let mut hole = map.clone();
        hole[33..66].fill(0);
        std::fs::write(&p, &hole).unwrap();
        assert!(mapped_records(&p)
            .unwrap_err()
            .contains("after the last whole record 1"));
        // A torn record 3.
        let mut torn = map.clone();
        torn[66 + 20..99].fill(0);
        std::fs::write(&p, &torn).unwrap();
        assert!(mapped_records(&p).unwrap_err().contains("torn"));
    }

    #[test]
    fn a_record_past_the_reported_freeze_point_is_a_problem() {
        let mut v = Verification::default();
        v.freeze_point("x", 10, Some(10));
        v.freeze_point("y", 10, None);
        assert_eq!((v.past_freeze, v.problems.len()), (0, 0));
        v.freeze_point("z", 12, Some(10));
        assert_eq!(v.past_freeze, 2);
        assert!(v.problems[0].contains("past record 10"), "{:?}", v.problems);
    }

    #[test]
    fn freeze_points_are_read_from_the_holding_writers_reports() {
        use quiesce_proto::{Level, WriterMetadata, WriterRef, WriterState};
        let writer = |node: &str, id: &str, reports: &[(&str, &str)]| WriterResult {
            writer: WriterRef::new(node, id),
            metadata: WriterMetadata::new(id, id, Level::BackEnd),
            state: WriterState::Thawed,
            failure: None,
            excluded: false,
            reports: reports
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            call_us: BTreeMap::new(),
        };
        let writers = vec![
            writer("node3", "buffer", &[("last_record", "41")]),
            writer("node3", "app", &[("last_record", "7")]),
            writer("node2", "mmap", &[("last_record", "9")]),
            writer(
                "node2",
                "sqlite",
                &[
                    ("/v/sqlite/wal.db:report_query", "100"),
                    ("/v/sqlite/journal.db:report_query", "99"),
                ],
            ),
            writer("node1", "pg", &[("wal_flush_lsn", "0/1")]),
        ];
        let points = freeze_points(
            &writers,
            &[
                (App::Writer, "app-writer run 2".to_string()),
                (App::Mapped, "mmap-app run 1".to_string()),
            ],
        );
        let expect: BTreeMap<String, u64> = [
            ("buffering-app", 41),
            ("app-writer run 2", 7),
            ("mmap-app run 1", 9),
            ("sqlite wal.db", 100),
            ("sqlite journal.db", 99),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(points, expect);
    }

    #[test]
    fn a_missing_acknowledged_record_is_lost() {
        let mut v = Verification::default();
        v.app("x", 10, 10);
        v.app("y", 5, 3);
        assert_eq!((v.records(), v.lost), (13, 2));
        assert_eq!(v.problems.len(), 1);
    }
}
