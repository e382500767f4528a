//! The hooks writer with real shell scripts: through the real host on a real btrfs volume, and
//! in-process through the SDK's harness.

use quiesce_host::{Config, Host};
use quiesce_proto::{FailureKind, Outcome, Phase, SetRecord, SetRequest};
use quiesce_sdk::harness::Plugin;
use quiesce_sdk::ComponentKind;
use quiesce_testbed::{host_config, plugin, wait_until, BtrfsVolume};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------------

/// A hook directory and the log its scripts append `<name> <argument>` to.
struct Hooks {
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Hooks {
    fn new() -> Hooks {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.log");
        let hooks = dir.path().join("hooks.d");
        std::fs::create_dir(&hooks).unwrap();
        Hooks { dir, log }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("hooks.d")
    }

    /// Writes a script that logs its call, then runs `body`.
    fn add(&self, name: &str, body: &str) -> &Hooks {
        self.add_file(
            name,
            &format!("#!/bin/sh\n{}\n{body}\n", self.logs()),
            0o755,
        )
    }

    fn add_file(&self, name: &str, text: &str, mode: u32) -> &Hooks {
        let path = self.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    fn logs(&self) -> String {
        format!("echo \"$(basename \"$0\") $1\" >> {}", self.log.display())
    }

    /// The calls the scripts logged, in order.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(&self.log);
    }

    fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

fn start_host(dir: &Path, volume: &BtrfsVolume, body: &str) -> Host {
    let text = host_config(dir, volume, &[&plugin("quiesce-writer-hooks")], body);
    let host = Host::start(Config::parse(&text, &dir.join("host.toml")).unwrap());
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    host
}

fn shared() -> SetRequest {
    SetRequest {
        volumes: vec!["shared".into()],
        best_effort: false,
    }
}

fn failure(record: &SetRecord) -> (Phase, String, String) {
    match &record.outcome {
        Outcome::Failed {
            phase,
            writer,
            reason,
        } => (
            *phase,
            writer
                .as_ref()
                .map(|w| w.writer.clone())
                .unwrap_or_default(),
            reason.clone(),
        ),
        other => panic!("the set must fail, it ended {other}: {record:#?}"),
    }
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet: it runs no more).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

// ---------------------------------------------------------------------------------------------
// Through the host, on btrfs
// ---------------------------------------------------------------------------------------------

/// Freeze runs the executables sorted by name, thaw in reverse; files that are not executable,
/// hidden or leftovers are skipped; each hook's exit and output land in the set's reports; the
/// hooks get the set's id in their environment.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_freeze_in_name_order_and_thaw_in_reverse_with_their_output_reported() {
    let volume = BtrfsVolume::create(256);
    let hooks = Hooks::new();
    let talk = "echo \"out of $(basename \"$0\") $1\"; echo \"err of $(basename \"$0\") $1\" >&2";
    hooks
        .add("20-database", talk)
        .add(
            "10-app",
            &format!(
                "{talk}; echo \"set $QUIESCE_SET_ID\" >> {}",
                hooks.log.display()
            ),
        )
        .add("30-filesystem", talk)
        .add_file("15-notes.txt", "not a program\n", 0o644)
        .add(".hidden", "exit 1")
        .add("25-database~", "exit 1")
        .add("26-database.dpkg-old", "exit 1");
    std::fs::create_dir(hooks.path().join("40-directory")).unwrap();
    let body = format!(
        "[plugins.hooks]\ndirectory = \"{}\"\nvolume = \"shared\"\npaths = [\"{}\"]\n",
        hooks.path().display(),
        volume.data.display()
    );
    let host = start_host(hooks.scratch(), &volume, &body);

    for round in 0..2 {
        hooks.clear();
        let record = host.run_local_set(shared()).await.unwrap();
        assert_eq!(record.outcome, Outcome::AppConsistent, "{record:#?}");
        assert_eq!(
            hooks.calls(),
            [
                "10-app freeze".to_string(),
                format!("set {}", record.id.0),
                "20-database freeze".into(),
                "30-filesystem freeze".into(),
                "30-filesystem thaw".into(),
                "20-database thaw".into(),
                "10-app thaw".into(),
                format!("set {}", record.id.0),
            ],
            "round {round}"
        );
        let reports = &record.writers[0].reports;
        assert_eq!(reports["hooks"], "10-app 20-database 30-filesystem");
        assert_eq!(reports["frozen"], "10-app 20-database 30-filesystem");
        assert!(
            reports["freeze.20-database"].starts_with("exit 0 after "),
            "{reports:#?}"
        );
        assert_eq!(
            reports["freeze.20-database.stdout"],
            "out of 20-database freeze\n"
        );
        assert_eq!(
            reports["freeze.20-database.stderr"],
            "err of 20-database freeze\n"
        );
        assert_eq!(reports["thaw.10-app.stdout"], "out of 10-app thaw\n");
        assert!(
            !reports
                .keys()
                .any(|k| k.contains("notes") || k.contains('~') || k.contains("dpkg")),
            "{reports:#?}"
        );
        let metadata = &record.writers[0].metadata;
        assert_eq!(metadata.level, quiesce_proto::Level::System);
        assert_eq!(metadata.components[0].volume, "shared");
    }
}

/// A hook that fails (exit 3, a message on stderr) fails the set in freeze: the outcome names
/// the writer and carries the hook's stderr; the hooks after it never run; the hooks that froze
/// get `freezeFail`, in reverse order, and no `thaw`. A writer with no volume joins every set.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_hook_fails_the_set_and_the_hooks_that_froze_get_freeze_fail_in_reverse() {
    let volume = BtrfsVolume::create(256);
    let hooks = Hooks::new();
    hooks
        .add("10-app", "")
        .add("20-database", "")
        .add(
            "30-cache",
            "echo 'cannot flush the cache: disk full' >&2; exit 3",
        )
        .add("40-filesystem", "");
    let body = format!(
        "[plugins.hooks]\nid = \"site-hooks\"\ndirectory = \"{}\"\n",
        hooks.path().display()
    );
    let host = start_host(hooks.scratch(), &volume, &body);
    assert!(host.writers()[0].metadata.components.is_empty());

    let record = host.run_local_set(shared()).await.unwrap();
    let (phase, writer, reason) = failure(&record);
    assert_eq!((phase, writer.as_str()), (Phase::Freeze, "site-hooks"));
    for needle in [
        "30-cache",
        "exit 3",
        "cannot flush the cache: disk full",
        "10-app 20-database",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in {reason:?}");
    }
    assert_eq!(
        hooks.calls(),
        [
            "10-app freeze",
            "20-database freeze",
            "30-cache freeze",
            "20-database freezeFail",
            "10-app freezeFail",
        ]
    );
    let result = &record.writers[0];
    assert_eq!(result.failure.as_ref().unwrap().kind, FailureKind::Error);
    // The abort's own reports are on the record.
    assert!(
        result.reports["freezeFail.10-app"].starts_with("exit 0"),
        "{result:#?}"
    );
    assert!(record.snapshot.is_none());
    assert!(
        volume.snapshot_list().is_empty(),
        "{:?}",
        volume.snapshot_list()
    );
}

/// A hook that hangs is killed at its timeout together with the processes it started (its
/// process group) and fails the set; the hook before it gets `freezeFail`. When the call's
/// budget is shorter than `timeout_ms`, the budget is the limit: the plugin still answers in
/// time, with its own error rather than a timeout of the call.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_hook_is_killed_with_its_process_group_and_fails_the_set() {
    let volume = BtrfsVolume::create(256);
    let hooks = Hooks::new();
    let pids = hooks.scratch().join("pids");
    hooks.add("10-app", "").add(
        "20-hang",
        &format!(
            "sleep 1000 &\necho \"$$ $!\" > {}\necho 'hanging on'\nwait",
            pids.display()
        ),
    );

    for (case, body, limit) in [
        (
            "timeout_ms",
            "[plugins.hooks]\ntimeout_ms = 300\n",
            "300 ms timeout",
        ),
        (
            "the call's budget",
            "[timeouts]\nfreeze_ms = 1000\n[plugins.hooks]\ntimeout_ms = 60000\n",
            "budget was shorter than `timeout_ms`",
        ),
    ] {
        hooks.clear();
        let _ = std::fs::remove_file(&pids);
        let host_dir = tempfile::tempdir().unwrap();
        let body = format!("{body}directory = \"{}\"\n", hooks.path().display());
        let host = start_host(host_dir.path(), &volume, &body);
        let started = Instant::now();
        let record = host.run_local_set(shared()).await.unwrap();
        let elapsed = started.elapsed();
        let (phase, writer, reason) = failure(&record);
        assert_eq!((phase, writer.as_str()), (Phase::Freeze, "hooks"), "{case}");
        for needle in [
            "20-hang",
            "killed with its process group",
            limit,
            "hanging on",
        ] {
            assert!(
                reason.contains(needle),
                "{case}: {needle:?} not in {reason:?}"
            );
        }
        assert_eq!(
            record.writers[0].failure.as_ref().unwrap().kind,
            FailureKind::Error,
            "{case}: the plugin answered in time"
        );
        assert!(elapsed < Duration::from_secs(5), "{case}: {elapsed:?}");
        assert_eq!(
            hooks.calls(),
            ["10-app freeze", "20-hang freeze", "10-app freezeFail"],
            "{case}"
        );
        // The hook and the sleep it started are both gone.
        let text = std::fs::read_to_string(&pids).unwrap();
        for pid in text.split_whitespace() {
            wait_until(
                &format!("{case}: process {pid} ends"),
                Duration::from_secs(5),
                || gone(pid).then_some(()),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-process, through the harness
// ---------------------------------------------------------------------------------------------

fn writer(hooks: &Hooks, extra: &str) -> quiesce_sdk::harness::Harness {
    Plugin::new("hooks", quiesce_writer_hooks::init)
        .init(&format!(
            "directory = \"{}\"\n{extra}",
            hooks.path().display()
        ))
        .unwrap()
        .remove(0)
}

#[test]
fn the_configuration_is_checked_at_init() {
    let plugin = Plugin::new("hooks", quiesce_writer_hooks::init);
    for (config, expected) in [
        ("", "missing field `directory`"),
        ("directory = \"hooks.d\"", "not an absolute path"),
        ("directory = \"/h\"\ntimeout_ms = 0", "`timeout_ms` is 0"),
        (
            "directory = \"/h\"\noutput_bytes = 0",
            "`output_bytes` is 0",
        ),
        (
            "directory = \"/h\"\npaths = [\"/srv\"]",
            "`paths` needs `volume`",
        ),
        (
            "directory = \"/h\"\nvolume = \"v\"\npaths = [\"srv\"]",
            "not absolute",
        ),
        ("directory = \"/h\"\nvolume = \"\"", "`volume` is empty"),
        ("directory = \"/h\"\ntimeout = 5", "unknown field `timeout`"),
        (
            "[[writers]]\ndirectory = \"/a\"\n[[writers]]\ndirectory = \"/b\"",
            "two writers have the id",
        ),
    ] {
        let error = plugin.init(config).unwrap_err();
        assert_eq!(
            error.kind,
            quiesce_sdk::harness::FailureKind::RefusedConfig,
            "{config}"
        );
        assert!(error.reason.contains(expected), "{config}: {error}");
    }
    let writers = plugin
        .init("[[writers]]\nid = \"a\"\ndirectory = \"/a\"\nvolume = \"v\"\n[[writers]]\nid = \"b\"\ndirectory = \"/b\"")
        .unwrap();
    let a = writers[0].metadata().unwrap();
    assert_eq!((a.id.as_str(), a.level), ("a", quiesce_sdk::Level::System));
    assert_eq!(a.components[0].kind, ComponentKind::Files);
    assert!(writers[1].metadata().unwrap().components.is_empty());
}

/// Output is kept bounded (its end), per stream.
#[test]
fn output_is_captured_up_to_its_last_bytes() {
    let hooks = Hooks::new();
    hooks.add("10-loud", "head -c 10000 /dev/zero | tr '\\0' x; echo end");
    let run = writer(&hooks, "output_bytes = 100").run(|_| Ok(()));
    assert!(run.is_app_consistent(), "{run:#?}");
    let out = run.report(Phase::Freeze, "freeze.10-loud.stdout").unwrap();
    assert_eq!(
        out,
        format!("[9904 earlier bytes dropped]{}end\n", "x".repeat(96))
    );
    assert_eq!(run.report(Phase::Freeze, "freeze.10-loud.stderr"), None);
}

/// Thaw and abort are idempotent: once thawed, nothing runs again; a failing thaw hook does
/// not keep the others from being thawed.
#[test]
fn thaw_reaches_every_frozen_hook_once() {
    let hooks = Hooks::new();
    hooks
        .add("10-a", "")
        .add(
            "20-b",
            "[ \"$1\" = thaw ] && { echo 'thaw went wrong' >&2; exit 7; }; exit 0",
        )
        .add("30-c", "");
    let mut w = writer(&hooks, "");
    let run = w.run(|_| Ok(()));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Thaw);
    assert!(
        error.reason.contains("20-b") && error.reason.contains("exit 7"),
        "{error}"
    );
    assert!(error.reason.contains("thaw went wrong"), "{error}");
    // Every hook got its thaw; the abort the harness sends after the failed thaw runs nothing.
    assert_eq!(
        hooks.calls(),
        [
            "10-a freeze",
            "20-b freeze",
            "30-c freeze",
            "30-c thaw",
            "20-b thaw",
            "10-a thaw"
        ]
    );
    assert_eq!(
        run.steps(),
        [
            Phase::Prepare,
            Phase::Freeze,
            Phase::Snapshot,
            Phase::Thaw,
            Phase::Abort,
            Phase::Complete
        ]
    );
    assert_eq!(w.abort(), Ok(vec![]));
    assert_eq!(hooks.calls().len(), 6);
}

/// Abort after a whole freeze (the snapshot failed) sends `freezeFail` to all, in reverse; a
/// second abort does nothing.
#[test]
fn abort_after_a_freeze_sends_freeze_fail_once() {
    let hooks = Hooks::new();
    hooks.add("10-a", "").add("20-b", "");
    let mut w = writer(&hooks, "");
    let run = w.run_failing_after(Phase::Snapshot);
    assert_eq!(run.outcome, "failed");
    assert_eq!(run.result(Phase::Abort).unwrap().as_ref().unwrap().len(), 2);
    assert_eq!(w.abort(), Ok(vec![]));
    assert_eq!(
        hooks.calls(),
        [
            "10-a freeze",
            "20-b freeze",
            "20-b freezeFail",
            "10-a freezeFail"
        ]
    );
}

#[test]
fn a_hook_that_cannot_start_or_a_missing_directory_fails_clearly() {
    let hooks = Hooks::new();
    hooks.add_file("10-no-interpreter", "#!/nonexistent/interpreter\n", 0o755);
    let run = writer(&hooks, "").run(|_| Ok(()));
    let (step, error) = run.error().unwrap();
    assert_eq!(step, Phase::Freeze);
    assert!(
        error.reason.contains("10-no-interpreter") && error.reason.contains("could not be started"),
        "{error}"
    );
    assert!(error.reason.contains("no hook had frozen"), "{error}");

    let missing = Plugin::new("hooks", quiesce_writer_hooks::init)
        .init("directory = \"/nonexistent/hooks.d\"")
        .unwrap()
        .remove(0)
        .run(|_| Ok(()));
    let (step, error) = missing.error().unwrap();
    assert_eq!(step, Phase::Prepare);
    assert!(
        error.reason.contains("/nonexistent/hooks.d") && error.reason.contains("create it"),
        "{error}"
    );
}

#[test]
fn an_empty_directory_is_a_writer_with_nothing_to_do() {
    let hooks = Hooks::new();
    let run = writer(&hooks, "").run(|_| Ok(()));
    assert!(run.is_app_consistent(), "{run:#?}");
    assert_eq!(run.report(Phase::Freeze, "frozen"), Some(""));
}
