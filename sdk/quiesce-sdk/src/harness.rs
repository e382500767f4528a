//! Drive a writer through whole snapshot sets in a test, the way the host does.
//!
//! ```rust
//! use quiesce_sdk::harness::{Plugin, Phase};
//! use quiesce_sdk::{Call, Config, Error, Level, Writer, WriterMetadata};
//!
//! struct Hello(String);
//!
//! impl Writer for Hello {
//!     fn metadata(&self) -> WriterMetadata {
//!         WriterMetadata::new(&self.0, "Hello", Level::BackEnd)
//!     }
//!     fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
//!         call.report("frozen_at", call.set_id().to_string());
//!         Ok(())
//!     }
//!     fn thaw(&mut self, _call: &mut Call) -> Result<(), Error> {
//!         Ok(())
//!     }
//! }
//!
//! fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
//!     let id = config.table().get("id").and_then(|v| v.as_str()).unwrap_or("hello");
//!     Ok(vec![Box::new(Hello(id.to_string()))])
//! }
//!
//! let mut writers = Plugin::new("hello", init).init("id = \"h1\"")?;
//! let run = writers[0].run(|_snapshot_dir| Ok(()));
//! assert!(run.is_app_consistent(), "{run:#?}");
//! assert_eq!(run.report(Phase::Freeze, "frozen_at"), Some(run.set_id.as_str()));
//!
//! let aborted = writers[0].run_failing_after(Phase::Freeze);
//! assert_eq!(aborted.steps(), [Phase::Prepare, Phase::Freeze, Phase::Abort, Phase::Complete]);
//! # Ok::<(), quiesce_sdk::harness::CallFailure>(())
//! ```
//!
//! Every call goes through the same adapter as an exported plugin (panics caught, errors mapped),
//! or through the real ABI for a plugin loaded with [`Plugin::load`], so a panicking writer shows
//! up here as a [`FailureKind::Panicked`] error, as it would in the host.
//!
//! The order of one set, and what the harness does when something fails (the host's rules):
//!
//! | step | on failure |
//! |---|---|
//! | prepare, freeze | abort, then complete with `failed` |
//! | snapshot (your closure, given an empty temporary directory) | abort, complete `failed` |
//! | thaw | abort (it must release whatever is left), complete `failed` |
//! | post-snapshot (only when the metadata says `needs_post_snapshot`) | complete `failed` |
//! | complete (`app-consistent` or `failed`) | recorded |
//!
//! A call that returns after its budget is recorded as [`FailureKind::TimedOut`]: the host
//! would have abandoned it and aborted the set.

use crate::adapter::{self, Adapter};
use crate::{Error, InitFn, Writer};
use abi_stable::library::lib_header_from_path;
use abi_stable::std_types::{RResult, RStr};
use quiesce_abi::{AbiError, CallContext, CallResult, ErrorKind, HostServices, LogLevel};
use quiesce_abi::{PluginModuleRef, WriterBox};
use quiesce_proto::WriterMetadata;
pub use quiesce_proto::{CallFailure, CallKind, FailureKind, Phase};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Key/value results of one call, in the order the writer reported them.
pub type Reports = Vec<(String, String)>;

/// How the harness tells a failure from the ABI: the kind the host would record.
fn failure(error: AbiError) -> CallFailure {
    let kind = match error.kind {
        ErrorKind::Failed => FailureKind::Error,
        ErrorKind::Panicked => FailureKind::Panicked,
        ErrorKind::InvalidConfig => FailureKind::RefusedConfig,
    };
    CallFailure::new(kind, error.message.into_string())
}

/// Why [`Plugin::load`] could not load a library.
#[derive(Debug, thiserror::Error)]
#[error("cannot load plugin {path}: {message}")]
pub struct LoadError {
    pub path: PathBuf,
    pub message: String,
}

/// One recorded step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub step: Phase,
    pub result: Result<Reports, CallFailure>,
    pub elapsed: Duration,
}

/// What one snapshot set did.
#[derive(Debug)]
pub struct Run {
    pub set_id: String,
    /// The writer's metadata, parsed and validated; an error means no call was made.
    pub metadata: Result<WriterMetadata, String>,
    /// Every step, in the order made.
    pub records: Vec<Record>,
    /// What complete was told: `app-consistent` or `failed`.
    pub outcome: &'static str,
    snapshot: tempfile::TempDir,
}

impl Run {
    /// The steps made, in order.
    pub fn steps(&self) -> Vec<Phase> {
        self.records.iter().map(|r| r.step).collect()
    }

    /// The result of the last call of `step`, if it was made.
    pub fn result(&self, step: Phase) -> Option<&Result<Reports, CallFailure>> {
        self.records
            .iter()
            .rev()
            .find(|r| r.step == step)
            .map(|r| &r.result)
    }

    /// The value `step` reported under `key`.
    pub fn report(&self, step: Phase, key: &str) -> Option<&str> {
        let reports = self.result(step)?.as_ref().ok()?;
        reports
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first failed step and its error.
    pub fn error(&self) -> Option<(Phase, &CallFailure)> {
        self.records
            .iter()
            .find_map(|r| r.result.as_ref().err().map(|e| (r.step, e)))
    }

    /// True when the set went through and nothing failed (complete included).
    pub fn is_app_consistent(&self) -> bool {
        self.metadata.is_ok() && self.outcome == "app-consistent" && self.error().is_none()
    }

    /// The directory that stood in for the snapshot; it lives as long as the `Run`.
    pub fn snapshot_path(&self) -> &Path {
        self.snapshot.path()
    }
}

/// A plugin to initialise: in-process from its init function, or a built library.
pub struct Plugin {
    name: String,
    version: String,
    sdk_version: String,
    source: Source,
}

enum Source {
    InProcess(&'static str, InitFn),
    Loaded(PluginModuleRef),
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sdk_version", &self.sdk_version)
            .finish_non_exhaustive()
    }
}

/// Log records of the plugins the harness drives go to the test's stderr (captured by the test
/// runner unless `--nocapture`).
extern "C" fn harness_log(level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
    // eprintln! panics if stderr is gone; this is an `extern "C"` function.
    let _ = std::panic::catch_unwind(|| eprintln!("[{level:?} {target}] {message}"));
}

fn host() -> HostServices {
    HostServices { log: harness_log }
}

impl Plugin {
    /// The plugin whose `export_plugin!` would name `name` and `init`, run in-process.
    pub fn new(name: &'static str, init: InitFn) -> Plugin {
        Plugin {
            name: name.to_string(),
            version: String::new(),
            sdk_version: crate::SDK_VERSION.to_string(),
            source: Source::InProcess(name, init),
        }
    }

    /// Loads a built plugin library the way the host does (abi_stable version and layout
    /// checks included). Libraries are never unloaded.
    pub fn load(path: &Path) -> Result<Plugin, LoadError> {
        let error = |message: String| LoadError {
            path: path.to_path_buf(),
            message,
        };
        let header = lib_header_from_path(path).map_err(|e| error(e.to_string()))?;
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(|e| error(e.to_string()))?;
        Ok(Plugin {
            name: module.name().to_string(),
            version: module.version().to_string(),
            sdk_version: module.sdk_version().to_string(),
            source: Source::Loaded(module),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's own version (empty in-process).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The quiesce-sdk version the plugin was built with.
    pub fn sdk_version(&self) -> &str {
        &self.sdk_version
    }

    /// Runs the plugin's init with `config_toml` (its table as TOML text) and returns a harness
    /// for each writer it made.
    pub fn init(&self, config_toml: &str) -> Result<Vec<Harness>, CallFailure> {
        let result = match self.source {
            Source::InProcess(name, init) => {
                adapter::init_plugin(name, config_toml.into(), host(), init)
            }
            Source::Loaded(module) => (module.init())(config_toml.into(), host()),
        };
        let writers = result.into_result().map_err(failure)?;
        Ok(writers
            .into_iter()
            .map(|writer| Harness::from_box(&self.name, writer))
            .collect())
    }
}

/// Drives one writer through snapshot sets.
pub struct Harness {
    plugin: String,
    writer: WriterBox,
    budget: Duration,
    sets: u32,
    set_id: String,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("plugin", &self.plugin)
            .field("budget", &self.budget)
            .field("sets", &self.sets)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// The budget each call gets unless [`with_budget`](Harness::with_budget) says otherwise.
    pub const DEFAULT_BUDGET: Duration = Duration::from_secs(30);

    /// A harness for one writer, wrapped as the export macro wraps it (messages name the
    /// plugin `writer`). Fails only if the writer's `metadata()` panics.
    pub fn new(writer: Box<dyn Writer>) -> Result<Harness, CallFailure> {
        let adapter = Adapter::new("writer", writer).map_err(failure)?;
        Ok(Harness::from_box("writer", adapter.into_writer_box()))
    }

    fn from_box(plugin: &str, writer: WriterBox) -> Harness {
        Harness {
            plugin: plugin.to_string(),
            writer,
            budget: Harness::DEFAULT_BUDGET,
            sets: 0,
            set_id: String::new(),
        }
    }

    /// Gives every call this budget (the `deadline` of its `Call`).
    pub fn with_budget(mut self, budget: Duration) -> Harness {
        self.budget = budget;
        self
    }

    /// The name of the plugin the writer came from.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The writer's metadata, parsed from the JSON that crosses the ABI and validated as the
    /// host validates it.
    pub fn metadata(&self) -> Result<WriterMetadata, String> {
        let json = self.writer.metadata_json();
        let metadata: WriterMetadata = serde_json::from_str(json.as_str())
            .map_err(|e| format!("the writer's metadata JSON does not parse: {e}: {json}"))?;
        metadata.validate().map_err(|e| e.to_string())?;
        Ok(metadata)
    }

    /// One whole snapshot set; `snapshot` stands in for the provider and gets the (empty)
    /// directory that post-snapshot will then be given.
    pub fn run(&mut self, snapshot: impl FnOnce(&Path) -> Result<(), Error>) -> Run {
        self.drive(None, snapshot)
    }

    /// A set that fails right after this writer's `step` succeeded, for a reason outside it
    /// (another writer, the provider): the writer is aborted. `step` is `Prepare` or `Freeze`;
    /// `Snapshot` is the same as a `run` whose closure fails.
    pub fn run_failing_after(&mut self, step: Phase) -> Run {
        assert!(
            matches!(step, Phase::Prepare | Phase::Freeze | Phase::Snapshot),
            "a set can only be made to fail after prepare, freeze or snapshot, not {step}"
        );
        self.drive(Some(step), |_| Ok(()))
    }

    /// Calls abort alone, for the set of the last run (abort must be idempotent: a second abort
    /// after a run that aborted must succeed).
    pub fn abort(&mut self) -> Result<Reports, CallFailure> {
        self.call(CallKind::Abort, None, None).result
    }

    fn drive(
        &mut self,
        fail_after: Option<Phase>,
        snapshot: impl FnOnce(&Path) -> Result<(), Error>,
    ) -> Run {
        self.sets += 1;
        self.set_id = format!("harness-set-{}", self.sets);
        let mut run = Run {
            set_id: self.set_id.clone(),
            metadata: self.metadata(),
            records: Vec::new(),
            outcome: "failed",
            snapshot: tempfile::Builder::new()
                .prefix("quiesce-harness-snapshot-")
                .tempdir()
                .expect("the harness needs a temporary directory for the snapshot"),
        };
        let needs_post_snapshot = match &run.metadata {
            Ok(metadata) => metadata.needs_post_snapshot,
            // The host refuses such a writer: it would never be called.
            Err(_) => return run,
        };
        let path = run.snapshot.path().to_string_lossy().into_owned();

        let mut failed = false;
        for kind in [CallKind::Prepare, CallKind::Freeze] {
            failed = !self.record(&mut run, kind, None, None) || fail_after == Some(kind.phase());
            if failed {
                break;
            }
        }
        if !failed {
            let start = Instant::now();
            let result = match fail_after {
                Some(Phase::Snapshot) => Err(Error::new("the harness was told to fail the set")),
                _ => snapshot(run.snapshot.path()),
            };
            let result = result
                .map(|()| Vec::new())
                .map_err(|e| CallFailure::error(e.to_string()));
            failed = result.is_err();
            run.records.push(Record {
                step: Phase::Snapshot,
                result,
                elapsed: start.elapsed(),
            });
        }
        if !failed {
            failed = !self.record(&mut run, CallKind::Thaw, None, None);
        }
        if failed {
            self.record(&mut run, CallKind::Abort, None, None);
        } else if needs_post_snapshot {
            failed = !self.record(&mut run, CallKind::PostSnapshot, Some(&path), None);
        }
        run.outcome = if failed { "failed" } else { "app-consistent" };
        let outcome = run.outcome;
        self.record(&mut run, CallKind::Complete, None, Some(outcome));
        run
    }

    /// Makes a call and records it; true when it succeeded.
    fn record(
        &mut self,
        run: &mut Run,
        kind: CallKind,
        snapshot: Option<&str>,
        outcome: Option<&str>,
    ) -> bool {
        let record = self.call(kind, snapshot, outcome);
        let ok = record.result.is_ok();
        run.records.push(record);
        ok
    }

    fn call(&mut self, kind: CallKind, snapshot: Option<&str>, outcome: Option<&str>) -> Record {
        let ctx = CallContext {
            set_id: self.set_id.as_str().into(),
            budget_ms: u64::try_from(self.budget.as_millis()).unwrap_or(u64::MAX),
            snapshot_path: snapshot.map(Into::into).into(),
            outcome: outcome.map(Into::into).into(),
        };
        let start = Instant::now();
        let result: CallResult = match kind {
            CallKind::Prepare => self.writer.prepare(&ctx),
            CallKind::Freeze => self.writer.freeze(&ctx),
            CallKind::Thaw => self.writer.thaw(&ctx),
            CallKind::PostSnapshot => self.writer.post_snapshot(&ctx),
            CallKind::Abort => self.writer.abort(&ctx),
            CallKind::Complete => self.writer.complete(&ctx),
        };
        let elapsed = start.elapsed();
        let result = match result {
            _ if elapsed > self.budget => Err(CallFailure {
                kind: FailureKind::TimedOut,
                reason: format!(
                    "{kind} returned after {elapsed:?}, over its budget of {:?}: the host would \
                     have abandoned the call and aborted the set",
                    self.budget
                ),
            }),
            RResult::ROk(reports) => Ok(reports
                .into_iter()
                .map(|pair| (pair.0.into_string(), pair.1.into_string()))
                .collect()),
            RResult::RErr(error) => Err(failure(error)),
        };
        Record {
            step: kind.phase(),
            result,
            elapsed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Call, Component, ComponentKind, Config, Level};
    use std::sync::{Arc, Mutex};

    /// A writer that logs its calls and misbehaves where told.
    #[derive(Clone, Default)]
    struct Probe {
        calls: Arc<Mutex<Vec<String>>>,
        fail_in: &'static str,
        panic_in: &'static str,
        post_snapshot: bool,
        bad_id: bool,
        /// Return only once the call's deadline has passed.
        outlive_deadline: bool,
    }

    impl Probe {
        fn act(&self, call: &mut Call, name: &str) -> Result<(), Error> {
            self.calls.lock().unwrap().push(name.to_string());
            while self.outlive_deadline && Instant::now() <= call.deadline() {
                std::hint::spin_loop();
            }
            if self.panic_in == name {
                panic!("probe told to panic in {name}");
            }
            if self.fail_in == name {
                return Err(Error::new(format!("probe told to fail in {name}")));
            }
            call.report("set", call.set_id().to_string());
            Ok(())
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Writer for Probe {
        fn metadata(&self) -> WriterMetadata {
            WriterMetadata {
                id: if self.bad_id { "bad id" } else { "probe" }.into(),
                name: "Probe".into(),
                instance: String::new(),
                vendor_version: String::new(),
                level: Level::FrontEnd,
                components: vec![Component {
                    name: "files".into(),
                    kind: ComponentKind::Files,
                    volume: "v".into(),
                    paths: vec!["/srv/probe".into()],
                }],
                expected_freeze_ms: 1,
                needs_post_snapshot: self.post_snapshot,
            }
        }
        fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
            self.act(call, "prepare")
        }
        fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
            self.act(call, "freeze")
        }
        fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
            self.act(call, "thaw")
        }
        fn post_snapshot(&mut self, call: &mut Call, snapshot: &Path) -> Result<(), Error> {
            std::fs::write(snapshot.join("label"), call.set_id())?;
            self.act(call, "post_snapshot")
        }
        fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
            self.act(call, "abort")
        }
        fn complete(&mut self, call: &mut Call, outcome: &str) -> Result<(), Error> {
            call.report("outcome", outcome);
            self.act(call, "complete")
        }
    }

    fn harness(probe: &Probe) -> Harness {
        Harness::new(Box::new(probe.clone())).unwrap()
    }

    use Phase::*;

    #[test]
    fn a_whole_set_in_protocol_order() {
        let probe = Probe {
            post_snapshot: true,
            ..Probe::default()
        };
        let mut h = harness(&probe);
        let run = h.run(|dir| {
            // The snapshot dir is empty when the "provider" runs.
            assert_eq!(std::fs::read_dir(dir)?.count(), 0);
            Ok(())
        });
        assert!(run.is_app_consistent(), "{run:#?}");
        assert_eq!(
            run.steps(),
            [Prepare, Freeze, Snapshot, Thaw, PostSnapshot, Complete]
        );
        assert_eq!(run.set_id, "harness-set-1");
        assert_eq!(run.report(Freeze, "set"), Some("harness-set-1"));
        assert_eq!(run.report(Complete, "outcome"), Some("app-consistent"));
        assert_eq!(
            std::fs::read_to_string(run.snapshot_path().join("label")).unwrap(),
            "harness-set-1"
        );
        assert_eq!(run.metadata.as_ref().unwrap().id, "probe");

        // A second set gets a new id.
        assert_eq!(h.run(|_| Ok(())).set_id, "harness-set-2");
    }

    #[test]
    fn post_snapshot_only_when_the_metadata_asks() {
        let probe = Probe::default();
        let run = harness(&probe).run(|_| Ok(()));
        assert_eq!(run.steps(), [Prepare, Freeze, Snapshot, Thaw, Complete]);
    }

    #[test]
    fn a_failing_freeze_is_aborted_and_the_set_fails() {
        let probe = Probe {
            fail_in: "freeze",
            ..Probe::default()
        };
        let run = harness(&probe).run(|_| panic!("no snapshot after a failed freeze"));
        assert_eq!(run.steps(), [Prepare, Freeze, Abort, Complete]);
        assert_eq!(run.outcome, "failed");
        assert!(!run.is_app_consistent());
        let (step, error) = run.error().unwrap();
        assert_eq!(step, Freeze);
        assert_eq!(error.kind, FailureKind::Error);
        assert_eq!(error.reason, "probe told to fail in freeze");
        assert_eq!(run.report(Complete, "outcome"), Some("failed"));
    }

    #[test]
    fn a_panicking_writer_shows_as_panicked() {
        let probe = Probe {
            panic_in: "thaw",
            ..Probe::default()
        };
        let run = harness(&probe).run(|_| Ok(()));
        assert_eq!(
            run.steps(),
            [Prepare, Freeze, Snapshot, Thaw, Abort, Complete]
        );
        let (step, error) = run.error().unwrap();
        assert_eq!(step, Thaw);
        assert_eq!(error.kind, FailureKind::Panicked);
        crate::adapter::tests::assert_panic_message(
            &error.reason,
            "writer panicked in thaw: probe told to panic in thaw",
            "src/harness.rs",
        );
    }

    #[test]
    fn sets_failed_from_outside_abort_the_writer() {
        for (fail_after, steps) in [
            (Prepare, vec![Prepare, Abort, Complete]),
            (Freeze, vec![Prepare, Freeze, Abort, Complete]),
            (Snapshot, vec![Prepare, Freeze, Snapshot, Abort, Complete]),
        ] {
            let probe = Probe::default();
            let mut h = harness(&probe);
            let run = h.run_failing_after(fail_after);
            assert_eq!(run.steps(), steps, "failing after {fail_after}");
            assert_eq!(run.outcome, "failed");
            // The writer saw the calls the harness recorded, except the snapshot.
            let expected: Vec<_> = steps
                .iter()
                .filter(|s| **s != Snapshot)
                .map(|s| s.as_str().to_string())
                .collect();
            assert_eq!(probe.calls(), expected);
            // Abort again: must be idempotent.
            assert!(h.abort().is_ok());
        }
    }

    #[test]
    fn a_failing_snapshot_aborts() {
        let run = harness(&Probe::default()).run(|_| Err(Error::new("disk full")));
        assert_eq!(run.steps(), [Prepare, Freeze, Snapshot, Abort, Complete]);
        assert_eq!(run.error().unwrap().1.reason, "disk full");
    }

    #[test]
    fn a_call_over_its_budget_is_recorded_and_aborted() {
        let probe = Probe {
            outlive_deadline: true,
            ..Probe::default()
        };
        // A zero budget keeps the spin short; the call still returns strictly after it.
        let mut h = harness(&probe).with_budget(Duration::ZERO);
        let run = h.run(|_| Ok(()));
        let (step, error) = run.error().unwrap();
        assert_eq!((step, error.kind), (Prepare, FailureKind::TimedOut));
        assert!(error.reason.contains("abandoned"), "{error}");
        assert_eq!(run.steps(), [Prepare, Abort, Complete]);
    }

    #[test]
    fn invalid_metadata_means_no_calls() {
        let probe = Probe {
            bad_id: true,
            ..Probe::default()
        };
        let h = harness(&probe);
        assert!(h.metadata().unwrap_err().contains("\"bad id\""));
        let run = harness(&probe).run(|_| Ok(()));
        assert!(run.metadata.is_err());
        assert!(run.records.is_empty());
        assert!(probe.calls().is_empty());
        assert!(!run.is_app_consistent());
    }

    #[test]
    fn in_process_plugins_init_through_the_export_path() {
        fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
            #[derive(serde::Deserialize)]
            struct Settings {
                count: usize,
            }
            let settings: Settings = config.deserialize()?;
            Ok((0..settings.count)
                .map(|_| Box::new(Probe::default()) as Box<dyn Writer>)
                .collect())
        }
        let plugin = Plugin::new("probes", init);
        assert_eq!(plugin.name(), "probes");
        assert_eq!(plugin.sdk_version(), crate::SDK_VERSION);
        let writers = plugin.init("count = 2").unwrap();
        assert_eq!(writers.len(), 2);
        assert_eq!(writers[0].plugin(), "probes");
        let refused = plugin.init("count = \"two\"").unwrap_err();
        assert_eq!(refused.kind, FailureKind::RefusedConfig);
        assert!(refused.reason.contains("`count`"), "{refused}");
    }
}
