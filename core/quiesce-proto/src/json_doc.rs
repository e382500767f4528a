//! Keeps `JSON.md` true: every example in it is read back into its type and must be written out
//! exactly as shown; every enum's documented list of values is complete; and both `SetRecord`
//! examples are what the machine records for the timelines they describe.

use crate::call::CallKind;
use crate::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const DOC: &str = include_str!("../JSON.md");

/// The examples of `JSON.md` in order: the marker after `<!-- example: ` and the JSON below it.
fn examples() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!-- example: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert_eq!(
            fence.trim(),
            "```json",
            "example {marker}: a ```json block must follow"
        );
        let mut body = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        out.push((marker.to_string(), body));
    }
    out
}

fn parse(marker: &str, body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON.md example {marker}: {e}"))
}

/// The example is exactly the JSON form of a value of `T`.
fn exact<T: Serialize + DeserializeOwned>(marker: &str, body: &str) -> T {
    let doc = parse(marker, body);
    let value: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("JSON.md example {marker} does not read back: {e}"));
    let written = serde_json::to_value(&value).unwrap();
    assert_eq!(
        written, doc,
        "JSON.md example {marker} is not the exact form; the type writes:\n{written:#}"
    );
    value
}

/// The example reads (fields left out take their defaults).
fn minimal<T: DeserializeOwned>(marker: &str, body: &str) -> T {
    serde_json::from_value(parse(marker, body))
        .unwrap_or_else(|e| panic!("JSON.md example {marker} does not read: {e}"))
}

// The lists of every value of each enum. The `match`es stop compiling when a variant is added:
// add it to the list here and to JSON.md.

fn all_levels() -> Vec<Level> {
    let all = Level::FREEZE_ORDER.to_vec();
    for l in &all {
        match l {
            Level::FrontEnd | Level::BackEnd | Level::System | Level::Volume => {}
        }
    }
    all
}

fn all_component_kinds() -> Vec<ComponentKind> {
    use ComponentKind::*;
    let all = vec![Database, Log, Tablespace, Files, Config];
    for k in &all {
        match k {
            Database | Log | Tablespace | Files | Config => {}
        }
    }
    all
}

fn all_phases() -> Vec<Phase> {
    use Phase::*;
    let all = vec![
        Identify,
        Prepare,
        Freeze,
        Snapshot,
        Thaw,
        PostSnapshot,
        Finalize,
        Abort,
        Complete,
    ];
    for p in &all {
        match p {
            Identify | Prepare | Freeze | Snapshot | Thaw | PostSnapshot | Finalize | Abort
            | Complete => {}
        }
    }
    all
}

fn all_writer_states() -> Vec<WriterState> {
    use WriterState::*;
    let all = vec![
        Idle,
        Preparing,
        Prepared,
        Freezing,
        Frozen,
        Thawing,
        Thawed,
        PostSnapshotting,
        Done,
        Aborting,
        Aborted,
        Failed,
    ];
    for s in &all {
        match s {
            Idle | Preparing | Prepared | Freezing | Frozen | Thawing | Thawed
            | PostSnapshotting | Done | Aborting | Aborted | Failed => {}
        }
    }
    all
}

fn all_failure_kinds() -> Vec<FailureKind> {
    use FailureKind::*;
    let all = FailureKind::ALL.to_vec();
    for k in &all {
        match k {
            Error | Panicked | TimedOut | Lost | RefusedConfig => {}
        }
    }
    all
}

fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::AppConsistent | Outcome::CrashConsistent { .. } | Outcome::Failed { .. } => {
            o.label()
        }
    }
}

#[test]
fn every_example_in_json_md_is_the_exact_form() {
    let mut seen = BTreeSet::new();
    let mut outcomes = BTreeSet::new();
    let mut records = Vec::new();
    for (marker, body) in examples() {
        let m = marker.as_str();
        match m {
            "Level" => assert_eq!(exact::<Vec<Level>>(m, &body), all_levels()),
            "ComponentKind" => {
                assert_eq!(exact::<Vec<ComponentKind>>(m, &body), all_component_kinds())
            }
            "Phase" => assert_eq!(exact::<Vec<Phase>>(m, &body), all_phases()),
            "WriterState" => assert_eq!(exact::<Vec<WriterState>>(m, &body), all_writer_states()),
            "FailureKind" => assert_eq!(exact::<Vec<FailureKind>>(m, &body), all_failure_kinds()),
            "Component" => drop(exact::<Component>(m, &body)),
            "WriterMetadata" => {
                let w = exact::<WriterMetadata>(m, &body);
                assert_eq!(w.validate(), Ok(()), "the example must be valid metadata");
            }
            "WriterMetadata minimal" => {
                let w = minimal::<WriterMetadata>(m, &body);
                assert_eq!(w.validate(), Ok(()));
                assert_eq!(
                    (w.instance.as_str(), w.vendor_version.as_str()),
                    ("", ""),
                    "documented defaults"
                );
                assert!(w.components.is_empty() && !w.needs_post_snapshot);
                assert_eq!(w.expected_freeze_ms, 0);
                assert!(w.touches_any(&["any-volume".into()]));
            }
            "WriterRef" => drop(exact::<WriterRef>(m, &body)),
            "SetId" => drop(exact::<SetId>(m, &body)),
            "SetRequest" => drop(exact::<SetRequest>(m, &body)),
            "SetRequest minimal" => assert!(!minimal::<SetRequest>(m, &body).best_effort),
            "Outcome" => {
                let o = exact::<Outcome>(m, &body);
                outcomes.insert(outcome_label(&o));
            }
            "WriterFailure" => drop(exact::<WriterFailure>(m, &body)),
            "WriterResult" => drop(exact::<WriterResult>(m, &body)),
            "SnapshotInfo" => drop(exact::<SnapshotInfo>(m, &body)),
            "PhaseTiming" => drop(exact::<PhaseTiming>(m, &body)),
            "SetRecord" => records.push(exact::<SetRecord>(m, &body)),
            "Requester" => drop(exact::<Requester>(m, &body)),
            "Requester client" => drop(exact::<Requester>(m, &body)),
            other => panic!("JSON.md has an example of {other:?}, which this test does not know"),
        }
        seen.insert(marker);
    }
    for required in [
        "Level",
        "ComponentKind",
        "Component",
        "WriterMetadata",
        "WriterMetadata minimal",
        "WriterRef",
        "SetId",
        "SetRequest",
        "SetRequest minimal",
        "Phase",
        "Outcome",
        "WriterState",
        "FailureKind",
        "WriterFailure",
        "WriterResult",
        "SnapshotInfo",
        "PhaseTiming",
        "SetRecord",
        "Requester",
        "Requester client",
    ] {
        assert!(
            seen.contains(required),
            "JSON.md lacks an example of {required}"
        );
    }
    assert_eq!(
        outcomes,
        BTreeSet::from(["app-consistent", "crash-consistent", "failed"]),
        "JSON.md shows every outcome"
    );
    assert_eq!(records.len(), 2);
    assert_eq!(records[0], app_consistent_record());
    assert_eq!(records[1], hold_limit_record());
}

#[test]
fn optional_fields_may_be_left_out_and_unknown_fields_are_ignored() {
    let r: WriterResult = serde_json::from_str(
        r#"{"writer": {"node": "a", "writer": "w"},
            "metadata": {"id": "w", "name": "W", "level": "system", "future_field": 1},
            "state": "done", "excluded": false, "reports": {}}"#,
    )
    .unwrap();
    assert_eq!(r.failure, None);
    let o: Outcome =
        serde_json::from_str(r#"{"outcome": "failed", "phase": "freeze", "reason": "x"}"#).unwrap();
    assert_eq!(
        o,
        Outcome::Failed {
            phase: Phase::Freeze,
            writer: None,
            reason: "x".into()
        }
    );
}

fn ms(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

/// The first `SetRecord` example, as the machine records it.
fn app_consistent_record() -> SetRecord {
    let [pg, app] = [("node-a", "postgres-main"), ("node-b", "orders-app")]
        .map(|(node, writer)| WriterRef::new(node, writer));
    let pg_meta = WriterMetadata {
        id: "postgres-main".into(),
        name: "PostgreSQL 15 (main cluster)".into(),
        instance: "/srv/pg/15/main".into(),
        vendor_version: "15.8".into(),
        level: Level::BackEnd,
        components: vec![Component {
            name: "data".into(),
            kind: ComponentKind::Database,
            volume: "shared".into(),
            paths: vec!["/srv/pg/15/main".into()],
        }],
        expected_freeze_ms: 50,
        needs_post_snapshot: true,
    };
    let app_meta = WriterMetadata {
        id: "orders-app".into(),
        name: "Orders front end".into(),
        instance: String::new(),
        vendor_version: "2.3.1".into(),
        level: Level::FrontEnd,
        components: vec![],
        expected_freeze_ms: 10,
        needs_post_snapshot: false,
    };
    let base = Instant::now();
    let mut set = SnapshotSet::new(
        SetId("set-20261127T195500Z-3f2a".into()),
        SetRequest {
            volumes: vec!["shared".into()],
            best_effort: false,
        },
        12,
        vec![(pg.clone(), pg_meta), (app.clone(), app_meta)],
        Deadlines::default(),
        base,
    );
    let ok = || Ok(Reports::new());
    let lsn = Reports::from([("wal_flush_lsn".into(), "0/3000148".into())]);
    set.handle_reply(ms(base, 980), &app, CallKind::Prepare, ok());
    set.handle_reply(ms(base, 1204), &pg, CallKind::Prepare, ok());
    set.handle_reply(ms(base, 1219), &app, CallKind::Freeze, ok());
    set.handle_reply(ms(base, 1236), &pg, CallKind::Freeze, Ok(lsn));
    set.handle_snapshot_taken(
        ms(base, 1251),
        Ok(SnapshotInfo {
            id: "set-20261127T195500Z-3f2a".into(),
            path: "/srv/.snapshots/set-20261127T195500Z-3f2a".into(),
            provider: "btrfs".into(),
        }),
    );
    set.handle_reply(ms(base, 1255), &pg, CallKind::Thaw, ok());
    set.handle_reply(ms(base, 1262), &app, CallKind::Thaw, ok());
    set.handle_reply(ms(base, 1290), &pg, CallKind::PostSnapshot, ok());
    set.handle_finalized(ms(base, 1297), Ok(()));
    assert!(set.is_ended());
    set.record().unwrap()
}

/// The second `SetRecord` example, as the machine records it.
fn hold_limit_record() -> SetRecord {
    let hooks = WriterRef::new("node-a", "hooks");
    let meta: WriterMetadata =
        serde_json::from_str(r#"{ "id": "hooks", "name": "Hook scripts", "level": "system" }"#)
            .unwrap();
    let base = Instant::now();
    let mut set = SnapshotSet::new(
        SetId("set-20261127T201000Z-91c0".into()),
        SetRequest {
            volumes: vec!["shared".into()],
            best_effort: false,
        },
        12,
        vec![(hooks.clone(), meta)],
        Deadlines {
            lease: Duration::from_secs(15),
            ..Deadlines::default()
        },
        base,
    );
    set.handle_reply(ms(base, 12), &hooks, CallKind::Prepare, Ok(Reports::new()));
    set.handle_reply(ms(base, 20), &hooks, CallKind::Freeze, Ok(Reports::new()));
    // Lease renewals every 5 s, then the hold limit, 10 s after the freeze.
    for at in [5000, 10000, 10012] {
        assert_eq!(set.poll_timeout(), Some(ms(base, at)));
        set.handle_timeout(ms(base, at));
    }
    set.handle_reply(ms(base, 10015), &hooks, CallKind::Abort, Ok(Reports::new()));
    set.handle_snapshot_taken(
        ms(base, 15000),
        Ok(SnapshotInfo {
            id: "set-20261127T201000Z-91c0".into(),
            path: "/srv/.snapshots/set-20261127T201000Z-91c0".into(),
            provider: "btrfs".into(),
        }),
    );
    set.handle_deleted(
        ms(base, 15040),
        Err(crate::call::ProviderFailure::new(
            crate::call::ProviderOp::Delete,
            "subvolume busy",
        )),
    );
    assert!(set.is_ended());
    set.record().unwrap()
}
