//! How a plugin tests its writers: in-process, through the same boundary code as the export.

use quiesce_sdk::harness::{FailureKind, Phase, Plugin};

#[test]
fn a_set_labels_the_snapshot() {
    let mut writers = Plugin::new("hello", hello_writer::init)
        .init("id = \"h1\"\nvolume = \"shared\"")
        .unwrap();
    let run = writers[0].run(|_snapshot| Ok(()));
    assert!(run.is_app_consistent(), "{run:#?}");
    assert_eq!(
        run.metadata.as_ref().unwrap().components[0].volume,
        "shared"
    );
    assert_eq!(
        run.report(Phase::Freeze, "frozen_at"),
        Some(run.set_id.as_str())
    );
    let label = std::fs::read_to_string(run.snapshot_path().join("hello-writer.label")).unwrap();
    assert_eq!(label, run.set_id);
}

#[test]
fn an_aborted_set_thaws() {
    let mut writers = Plugin::new("hello", hello_writer::init).init("").unwrap();
    let run = writers[0].run_failing_after(Phase::Freeze);
    assert_eq!(
        run.steps(),
        [Phase::Prepare, Phase::Freeze, Phase::Abort, Phase::Complete]
    );
    assert_eq!(run.result(Phase::Abort), Some(&Ok(vec![])));
}

#[test]
fn a_misspelt_key_is_refused() {
    let error = Plugin::new("hello", hello_writer::init)
        .init("volum = \"x\"")
        .unwrap_err();
    assert_eq!(error.kind, FailureKind::RefusedConfig);
    assert!(error.reason.contains("unknown field `volum`"), "{error}");
}
