//! The built plugins (examples/hello-writer, tests/quiesce-test-plugin), loaded as the host loads
//! them: this is what proves that `export_plugin!` exports a root module abi_stable accepts.
//!
//! Both are dev-dependencies of quiesce-sdk, so cargo builds their cdylibs into the directory of
//! this test binary (`target/<profile>/deps`).

use abi_stable::library::lib_header_from_path;
use abi_stable::std_types::{ROption, RStr};
use quiesce_abi::{CallContext, ErrorKind, HostServices, LogLevel, PluginModuleRef};
use quiesce_sdk::harness::{FailureKind, Phase, Plugin};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

fn library(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .expect("the test binary is in a directory")
        .join(format!("lib{name}.so"));
    assert!(
        path.is_file(),
        "{} is missing: it is built as a dev-dependency of quiesce-sdk",
        path.display()
    );
    path
}

static LOGGED: Mutex<Vec<(LogLevel, String, String)>> = Mutex::new(Vec::new());

extern "C" fn capture_log(level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
    LOGGED
        .lock()
        .unwrap()
        .push((level, target.to_string(), message.to_string()));
}

fn ctx(set_id: &str) -> CallContext {
    CallContext {
        set_id: set_id.into(),
        budget_ms: 5_000,
        snapshot_path: ROption::RNone,
        outcome: ROption::RNone,
    }
}

// One test for everything about the hello library: its logger forwards to the services of the
// latest init, so tests initialising it concurrently with different services would race.
#[test]
fn hello_writer_loads_through_abi_stable_and_runs_a_set() {
    let path = library("hello_writer");

    // Exactly what the host does.
    let module = lib_header_from_path(&path)
        .unwrap()
        .init_root_module::<PluginModuleRef>()
        .unwrap();
    assert_eq!(module.name().as_str(), "hello");
    assert_eq!(module.version().as_str(), "0.1.0");
    assert_eq!(module.sdk_version().as_str(), quiesce_sdk::SDK_VERSION);

    let host = HostServices { log: capture_log };
    let mut writers = (module.init())(RStr::from_str("id = \"h1\""), host).unwrap();
    assert_eq!(writers.len(), 1);
    let metadata: quiesce_sdk::WriterMetadata =
        serde_json::from_str(writers[0].metadata_json().as_str()).unwrap();
    assert_eq!(metadata.id, "h1");
    assert_eq!(metadata.components[0].volume, "demo");
    assert_eq!(metadata.components[0].paths, ["/var/lib/hello"]);

    let reports = writers[0].freeze(&ctx("set-42")).unwrap();
    assert_eq!(reports[0].0.as_str(), "frozen_at");
    assert_eq!(reports[0].1.as_str(), "set-42");
    assert!(
        LOGGED.lock().unwrap().contains(&(
            LogLevel::Info,
            "hello:hello_writer".into(),
            "h1: frozen for set set-42".into()
        )),
        "{:?}",
        LOGGED.lock().unwrap()
    );

    // A configuration error names the key and is reported as one.
    let error = (module.init())(RStr::from_str("volume = 3"), host)
        .into_result()
        .err()
        .expect("init must fail");
    assert_eq!(error.kind, ErrorKind::InvalidConfig);
    assert!(error.message.as_str().contains("`volume`"), "{error:?}");

    // The same library through the harness.
    let plugin = Plugin::load(&path).unwrap();
    assert_eq!(
        (plugin.name(), plugin.version()),
        ("hello", env!("CARGO_PKG_VERSION"))
    );
    let mut harness = plugin.init("").unwrap().remove(0);
    assert_eq!(harness.metadata().unwrap().id, "hello");
    let run = harness.run(|_| Ok(()));
    assert!(run.is_app_consistent(), "{run:#?}");
    assert_eq!(
        run.steps(),
        [
            Phase::Prepare,
            Phase::Freeze,
            Phase::Snapshot,
            Phase::Thaw,
            Phase::PostSnapshot,
            Phase::Complete
        ]
    );
    let label = std::fs::read_to_string(run.snapshot_path().join("hello-writer.label")).unwrap();
    assert_eq!(label, run.set_id);
}

#[test]
fn a_file_that_is_not_a_plugin_is_refused_by_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libbogus.so");
    std::fs::write(&bogus, "not an ELF file").unwrap();
    let error = Plugin::load(&bogus).unwrap_err();
    assert!(error.to_string().contains("libbogus.so"), "{error}");
}

/// The events file of a test, as lines.
fn events(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn misbehave() -> Plugin {
    let plugin = Plugin::load(&library("quiesce_test_plugin")).unwrap();
    assert_eq!(plugin.name(), "misbehave");
    plugin
}

#[test]
fn misbehave_fails_and_panics_where_told_and_logs_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let config = format!(
        r#"
        events = "{}"
        [[writers]]
        id = "ok"
        level = "front-end"
        needs_post_snapshot = true
        [[writers]]
        id = "w1"
        fail_in = "freeze"
        [[writers]]
        id = "w2"
        level = "system"
        panic_in = "thaw"
        "#,
        log.display()
    );
    let mut writers = misbehave().init(&config).unwrap();
    let levels: Vec<_> = writers
        .iter()
        .map(|w| w.metadata().unwrap().level.as_str())
        .collect();
    assert_eq!(levels, ["front-end", "back-end", "system"]);

    let run = writers[0].run(|_| Ok(()));
    assert!(run.is_app_consistent(), "{run:#?}");
    let mut expected: Vec<String> = Vec::new();
    for call in ["prepare", "freeze", "thaw", "post-snapshot", "complete"] {
        expected.push(format!("ok {call}"));
        expected.push(format!("ok {call}-done"));
    }
    assert_eq!(events(&log), expected);

    let run = writers[1].run(|_| Ok(()));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Freeze);
    assert_eq!(error.kind, FailureKind::Error);
    assert_eq!(error.reason, "w1 was told to fail in freeze");
    assert_eq!(
        run.steps(),
        [Phase::Prepare, Phase::Freeze, Phase::Abort, Phase::Complete]
    );
    let w1: Vec<_> = events(&log)
        .into_iter()
        .filter(|l| l.starts_with("w1 "))
        .collect();
    assert_eq!(
        w1,
        [
            "w1 prepare",
            "w1 prepare-done",
            "w1 freeze",
            "w1 abort",
            "w1 abort-done",
            "w1 complete",
            "w1 complete-done"
        ]
    );

    // The panic is caught in the library and comes back as an error; the writer is still
    // callable (abort) afterwards.
    let run = writers[2].run(|_| Ok(()));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Thaw);
    assert_eq!(error.kind, FailureKind::Panicked);
    // What panicked and where (the plugin's source), nothing slower to make.
    let where_ = "(at tests/quiesce-test-plugin/src/lib.rs:";
    assert!(
        error
            .reason
            .starts_with("misbehave panicked in thaw: w2 was told to panic in thaw ")
            && error.reason.contains(where_),
        "{error}"
    );
    assert_eq!(run.result(Phase::Abort), Some(&Ok(vec![])));
    assert!(events(&log).contains(&"w2 thaw".to_string()));
    assert!(!events(&log).contains(&"w2 thaw-done".to_string()));
}

#[test]
fn misbehave_hangs_until_its_fifo_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let fifo = dir.path().join("hang");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let config = format!(
        "events = \"{}\"\n[[writers]]\nid = \"w3\"\nhang_in = \"freeze\"\nhang_fifo = \"{}\"",
        log.display(),
        fifo.display()
    );
    let mut harness = misbehave().init(&config).unwrap().remove(0);
    let release = fifo.clone();
    let set = std::thread::spawn(move || {
        let run = harness.run(|_| Ok(()));
        // Had freeze failed without opening the FIFO, the open below would wait forever; an
        // O_RDWR open of a FIFO never blocks (Linux) and releases it, so the test fails instead.
        drop(OpenOptions::new().read(true).write(true).open(&release));
        run
    });
    // Opening a FIFO for writing blocks until the writer has opened it for reading, that is,
    // until freeze is hanging; so by then its event line has been written.
    drop(OpenOptions::new().write(true).open(&fifo).unwrap());
    let run = set.join().unwrap();
    assert!(run.is_app_consistent(), "{run:#?}");
    let lines = events(&log);
    assert_eq!(lines[2..4], ["w3 freeze", "w3 freeze-done"]);
}

#[test]
fn misbehave_init_fails_panics_and_refuses_configs_as_told() {
    let plugin = misbehave();
    let error = plugin.init("panic_in_init = true").unwrap_err();
    assert_eq!(error.kind, FailureKind::Panicked);
    // What panicked and where (the plugin's source), nothing slower to make.
    let where_ = "(at tests/quiesce-test-plugin/src/lib.rs:";
    assert!(
        error
            .reason
            .starts_with("misbehave panicked in init: misbehave was told to panic in init ")
            && error.reason.contains(where_),
        "{error}"
    );

    let error = plugin.init("fail_init = \"no database\"").unwrap_err();
    assert_eq!(error.kind, FailureKind::Error);
    assert_eq!(error.reason, "no database");

    for config in [
        "[[writers]]\nid = \"w\"\nhang_in = \"freeze\"",
        "[[writers]]\nid = \"w\"\nlevel = \"middle\"",
        "[[writers]]\nid = \"w\"\nfail_in = \"snapshot\"",
        "colour = \"red\"",
    ] {
        let error = plugin.init(config).unwrap_err();
        assert_eq!(error.kind, FailureKind::RefusedConfig, "{config}: {error}");
    }

    assert!(plugin.init("").unwrap().is_empty());
}

#[test]
fn both_plugins_load_side_by_side() {
    // abi_stable caches one root module per module type when loaded with `RootModule::load_*`;
    // loading through the header (as the host and the harness do) keeps them apart.
    let hello = Plugin::load(&library("hello_writer")).unwrap();
    let misbehave = misbehave();
    assert_eq!((hello.name(), misbehave.name()), ("hello", "misbehave"));
}
