//! Issue 16: backup tools on top of `quiesce snapshot exec` (restic, borg) and of `mount` /
//! `release` as before- and after-hooks (borgmatic, Bacula), each the real tool run as its
//! users run it, through a one-node cluster (the sets' cluster of `sets.rs`: a broker, a host
//! with the misbehave plugin writer and the example application writing records into the
//! shared btrfs). The recipes are the README's, one line each.
//!
//! What is checked is what a backup administrator relies on: the second backup of a volume is
//! incremental (restic finds its parent, borg's files cache its files) because the snapshot is
//! at the same path every time; the tool's own retention groups the backups; the snapshot is
//! gone afterwards however the command ended. The negative control backs up from the snapshot's
//! own path, as the recipe did before `exec`: no parent, nothing unmodified, no grouping.

use super::*;
use serde_json::Value;

/// Files that no set changes: a second backup finds every one of them unmodified.
const STATIC_FILES: usize = 40;

/// The stable path `exec` mounts the volume `shared` at.
const STABLE: &str = "/run/quiesce/snapshots/shared";

fn cluster_with_static_files() -> Cluster {
    let cluster = Cluster::start(&[Spec::default()]);
    let dir = cluster.volume.data.join("static");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..STATIC_FILES {
        std::fs::write(
            dir.join(format!("file-{i:03}")),
            format!("unchanging {i}\n").repeat(100),
        )
        .unwrap();
    }
    cluster
}

/// `quiesce snapshot exec --volume shared -- COMMAND…` on `node` with `env`: (exit code,
/// stdout, stderr).
fn exec(node: &Node, env: &[(&str, &Path)], command: &[&str]) -> (i32, String, String) {
    let mut cli = exec_command(node, &[], command);
    for (key, value) in env {
        cli.env(key, value);
    }
    let output = cli.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `quiesce snapshot exec --volume shared OPTIONS -- COMMAND…` against `node`'s host.
fn exec_command(node: &Node, options: &[&str], command: &[&str]) -> Command {
    let mut cli = Command::new(cli_exe());
    cli.args([
        "snapshot",
        "exec",
        "--bus",
        &node.bus.address,
        "--volume",
        "shared",
    ])
    .args(options)
    .arg("--")
    .args(command)
    .env_remove("QUIESCE_BROKER");
    cli
}

/// The one set of the cluster whose record was written last, checked deleted on request.
fn last_set_released(cluster: &Cluster) -> SetRecord {
    let listed: Vec<SetRecord> = cluster.nodes[0].cli_json(&["snapshot", "list"]);
    let last = listed.last().cloned().expect("a set ran");
    assert_eq!(
        last.deleted_because,
        Some(quiesce_proto::Deletion::Requested),
        "exec deleted the snapshot when the command ended: {last:?}"
    );
    assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
    last
}

struct Restic {
    repo: tempfile::TempDir,
}

impl Restic {
    fn init() -> Restic {
        let restic = Restic {
            repo: tempfile::tempdir().unwrap(),
        };
        std::fs::write(restic.repo.path().join("pass"), "quiesce-test\n").unwrap();
        let output = restic.command().args(["init", "-q"]).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        restic
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("RESTIC_REPOSITORY", self.repo.path().join("repo")),
            ("RESTIC_PASSWORD_FILE", self.repo.path().join("pass")),
            ("RESTIC_CACHE_DIR", self.repo.path().join("cache")),
        ]
    }

    fn command(&self) -> Command {
        let mut command = Command::new("restic");
        for (key, value) in self.env() {
            command.env(key, value);
        }
        command
    }

    /// One backup through `exec`: its `summary` message.
    fn backup(&self, cluster: &Cluster, command: &[&str]) -> Value {
        let env = self.env();
        let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
        let (code, stdout, stderr) = exec(&cluster.nodes[0], &env, command);
        assert_eq!(code, 0, "{stderr}\n{}", cluster.logs());
        last_set_released(cluster);
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|m| m["message_type"] == "summary")
            .unwrap_or_else(|| panic!("restic printed no summary: {stdout}"))
    }

    /// `restic snapshots --json`.
    fn snapshots(&self) -> Vec<Value> {
        let output = self
            .command()
            .args(["snapshots", "--json"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn forget_keep_last_1(&self) {
        let output = self
            .command()
            .args(["forget", "-q", "--keep-last", "1"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The README's restic recipe, `quiesce snapshot exec --volume shared -- restic backup
/// /run/quiesce/snapshots/shared`, twice: the second backup has the first as its parent and
/// reads only what changed; `restic forget --keep-last 1` keeps one of the two.
#[test]
fn restic_through_exec_finds_its_parent_reads_only_changed_files_and_forgets_by_group() {
    let cluster = cluster_with_static_files();
    let restic = Restic::init();
    let recipe = ["restic", "backup", "--json", STABLE];
    let first = restic.backup(&cluster, &recipe);
    assert!(
        first["files_new"].as_u64().unwrap() as usize > STATIC_FILES,
        "{first}"
    );
    let second = restic.backup(&cluster, &recipe);
    let unmodified = second["files_unmodified"].as_u64().unwrap() as usize;
    assert!(
        unmodified >= STATIC_FILES,
        "the static files are read from the parent, not again: {second}"
    );
    assert!(
        second["files_changed"].as_u64().unwrap() >= 1,
        "the app's records changed between the sets: {second}"
    );
    let snapshots = restic.snapshots();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(
        snapshots[1]["parent"], snapshots[0]["id"],
        "the second backup's parent is the first: {snapshots:?}"
    );
    for snapshot in &snapshots {
        assert_eq!(snapshot["paths"], serde_json::json!([STABLE]));
    }
    restic.forget_keep_last_1();
    assert_eq!(restic.snapshots().len(), 1, "the two backups are one group");
}

/// The negative control: the same two backups from the snapshot's own path (`set-<id>` each
/// time). restic finds no parent, re-reads everything, and `forget --keep-last 1` keeps both.
#[test]
fn restic_from_the_snapshots_own_path_finds_no_parent_the_control() {
    let cluster = cluster_with_static_files();
    let restic = Restic::init();
    let recipe = [
        "sh",
        "-c",
        "exec restic backup --json \"$QUIESCE_SNAPSHOT_SOURCE\"",
    ];
    restic.backup(&cluster, &recipe);
    let second = restic.backup(&cluster, &recipe);
    assert_eq!(second["files_unmodified"], 0, "{second}");
    let snapshots = restic.snapshots();
    assert_eq!(snapshots.len(), 2);
    assert!(snapshots[1]["parent"].is_null(), "{snapshots:?}");
    restic.forget_keep_last_1();
    assert_eq!(restic.snapshots().len(), 2, "each backup is its own group");
}

/// `borg create --list` through exec, twice into one repository: the output's status letter of
/// each file (`A` added, `M` modified, `U` unchanged).
fn borg_statuses(cluster: &Cluster, source: &str) -> Vec<Vec<(char, String)>> {
    let repo = tempfile::tempdir().unwrap();
    let borg = |args: &[&str]| {
        let mut command = Command::new("borg");
        command
            .args(args)
            .env("BORG_REPO", repo.path().join("repo"))
            .env("BORG_BASE_DIR", repo.path().join("base"))
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
        command
    };
    let output = borg(&["init", "--encryption", "none"]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (0..2)
        .map(|i| {
            let archive = format!("::backup-{i}");
            let script = format!("exec borg create --list --filter AMEU {archive} \"{source}\"");
            let mut env: Vec<(&str, PathBuf)> = vec![
                ("BORG_REPO", repo.path().join("repo")),
                ("BORG_BASE_DIR", repo.path().join("base")),
            ];
            env.push((
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK",
                PathBuf::from("yes"),
            ));
            let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
            let (code, _, stderr) = exec(&cluster.nodes[0], &env, &["sh", "-c", &script]);
            assert_eq!(code, 0, "{stderr}");
            last_set_released(cluster);
            stderr
                .lines()
                .filter_map(|l| {
                    let (status, path) = l.split_once(' ')?;
                    let status = status.chars().next().filter(|_| status.len() == 1)?;
                    Some((status, path.to_string()))
                })
                .collect()
        })
        .collect()
}

fn static_statuses(statuses: &[(char, String)]) -> Vec<char> {
    statuses
        .iter()
        .filter(|(_, path)| path.contains("/static/file-"))
        .map(|(status, _)| *status)
        .collect()
}

/// borg through exec from the stable path: the second archive finds every static file
/// unchanged in its files cache; from the snapshot's own path (the control), it adds them all
/// again.
#[test]
fn borg_through_exec_finds_unchanged_files_in_its_cache_only_at_the_stable_path() {
    let cluster = cluster_with_static_files();
    let stable = borg_statuses(&cluster, STABLE);
    assert_eq!(static_statuses(&stable[0]), vec!['A'; STATIC_FILES]);
    assert_eq!(
        static_statuses(&stable[1]),
        vec!['U'; STATIC_FILES],
        "{:?}",
        stable[1]
    );
    let control = borg_statuses(&cluster, "$QUIESCE_SNAPSHOT_SOURCE");
    assert_eq!(
        static_statuses(&control[1]),
        vec!['A'; STATIC_FILES],
        "from a new path each time, borg's cache knows nothing: {:?}",
        control[1]
    );
}

/// exec's contract with the command: the snapshot read-only at the stable path, the set in the
/// environment, the command's status as its own, the snapshot deleted after; nothing mounted on
/// the node.
#[test]
fn exec_runs_the_command_on_the_snapshot_and_passes_its_status_through() {
    let cluster = cluster_with_static_files();
    let node = &cluster.nodes[0];
    let script = "set -e
        test \"$QUIESCE_SNAPSHOT_PATH\" = /run/quiesce/snapshots/shared
        test \"$QUIESCE_VOLUME\" = shared
        test \"$QUIESCE_OUTCOME\" = app-consistent
        cmp \"$QUIESCE_SNAPSHOT_PATH/static/file-007\" \"$QUIESCE_SNAPSHOT_SOURCE/static/file-007\"
        if touch \"$QUIESCE_SNAPSHOT_PATH/static/new\" 2>/dev/null; then exit 90; fi
        echo \"$QUIESCE_SET_ID\"
        exit 7";
    let (code, stdout, stderr) = exec(node, &[], &["sh", "-c", script]);
    assert_eq!(code, 7, "the command's own status: {stderr}");
    let record = last_set_released(&cluster);
    assert_eq!(stdout.trim(), record.id.0, "QUIESCE_SET_ID names the set");
    assert_eq!(record.outcome, Outcome::AppConsistent);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(STABLE),
        "the mount lived in the command's namespace only: {mounts}"
    );
    let (code, _, stderr) = exec(node, &[], &["/nonexistent/backup-tool"]);
    assert_eq!(
        code, 127,
        "a command that cannot be found, as env(1) says it: {stderr}"
    );
    assert!(stderr.contains("/nonexistent/backup-tool"), "{stderr}");
    last_set_released(&cluster);
}

/// `quiesce` itself signalled or killed while the backup runs. SIGTERM: passed on to the
/// command, the snapshot deleted at once, 143. SIGKILL: the command is told to stop
/// (SIGTERM, as its parent died) and the broker deletes the snapshot when exec's lease lapses.
#[test]
fn exec_signalled_deletes_the_snapshot_and_exec_killed_leaks_none_past_its_lease() {
    let cluster = cluster_with_static_files();
    let node = &cluster.nodes[0];
    let dir = tempfile::tempdir().unwrap();
    for (signal, lease) in [(Stop::Term, "2m"), (Stop::Kill, "3s")] {
        let ready = dir.path().join(format!("ready-{lease}"));
        let script = format!(
            "trap 'kill $t; echo stopped > {ready:?}.stopped; exit 5' TERM; touch {ready:?}; tail -f /dev/null & t=$!; wait $t"
        );
        let mut command = exec_command(node, &["--lease", lease], &["bash", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(
            "the command to run on the snapshot",
            || ready.exists().then_some(()),
            || cluster.logs(),
        );
        assert_eq!(cluster.volume.snapshot_list().len(), 1);
        let pid = nix::unistd::Pid::from_raw(command.id() as i32);
        let stopped = ready.with_extension("stopped");
        match signal {
            Stop::Term => {
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
                let output = command.wait_with_output().unwrap();
                assert_eq!(
                    output.status.code(),
                    Some(5),
                    "the command's status after it handled the SIGTERM passed on: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                assert!(stopped.exists(), "the command got the SIGTERM");
                last_set_released(&cluster);
            }
            Stop::Kill => {
                command.kill().unwrap();
                command.wait().unwrap();
                wait_for(
                    "the command told to stop when quiesce died",
                    || stopped.exists().then_some(()),
                    || cluster.logs(),
                );
                let record = wait_for(
                    "the broker to delete the snapshot when exec's lease lapsed",
                    || {
                        let listed: Vec<SetRecord> = node.cli_json(&["snapshot", "list"]);
                        listed
                            .last()
                            .filter(|r| r.deleted_unix_ms.is_some())
                            .cloned()
                    },
                    || cluster.logs(),
                );
                assert_eq!(
                    record.deleted_because,
                    Some(quiesce_proto::Deletion::LeaseLapsed)
                );
                assert_eq!(cluster.volume.snapshot_list(), Vec::<PathBuf>::new());
            }
        }
    }
}

enum Stop {
    Term,
    Kill,
}

/// A backup tool's hook command: `quiesce snapshot ACTION` (mount, release) of the volume
/// `shared` at `at`, through `node`'s host. (The bus address has no space or quote in it.)
fn hook(node: &Node, at: &Path, action: &str) -> String {
    format!(
        "{} snapshot {action} --volume shared --at {} --bus {}",
        cli_exe().display(),
        at.display(),
        node.bus.address
    )
}

/// The static files `borgmatic create --list` listed, with their status letters.
fn listed_static(output: &str) -> Vec<char> {
    output
        .lines()
        .filter(|l| l.contains("/static/file-"))
        .filter_map(|l| {
            let (status, _) = l.trim_start().split_once(' ')?;
            status.chars().next().filter(|_| status.len() == 1)
        })
        .collect()
}

/// borgmatic as its users run it: the volume's stable path as a source directory,
/// `quiesce snapshot mount` / `release` as its `before_backup` / `after_backup` (and `on_error`)
/// hooks. Two backups: the second reads no static file again; `borgmatic prune` with
/// `keep_daily: 1` keeps one of the two; a `mount` left by an after-hook that never ran is
/// released by the next backup's before-hook. (`--at` a test directory, not the default
/// /run/quiesce/snapshots/shared: tests of this binary run side by side, and a mount in the node's
/// own namespace would be seen by the others.)
#[test]
fn borgmatic_hooks_mount_and_release_the_snapshot_and_its_second_backup_is_incremental() {
    let cluster = cluster_with_static_files();
    let node = &cluster.nodes[0];
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("shared");
    // A YAML single-quoted string of the hook's shell command.
    let quiesce = |action: &str| format!("'{}'", hook(node, &at, action));
    let config = dir.path().join("borgmatic.yaml");
    std::fs::write(
        &config,
        format!(
            "location:\n    source_directories:\n        - {at:?}\n    repositories:\n        - {:?}\n\
             storage:\n    borg_base_directory: {:?}\n    unknown_unencrypted_repo_access_is_ok: true\n\
             retention:\n    keep_daily: 1\n\
             hooks:\n    before_backup:\n        - {}\n    after_backup:\n        - {}\n    on_error:\n        - {}\n",
            dir.path().join("repo"),
            dir.path().join("base"),
            quiesce("mount"),
            quiesce("release"),
            quiesce("release"),
        ),
    )
    .unwrap();
    let borgmatic = |args: &[&str]| {
        let output = Command::new("borgmatic")
            .arg("--config")
            .arg(&config)
            .args(["--syslog-verbosity", "-1"])
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "borgmatic {args:?}: {text}\n{}",
            cluster.logs()
        );
        text
    };
    borgmatic(&["init", "--encryption", "none"]);
    let first = borgmatic(&["create", "--list"]);
    let first_set = last_set_released(&cluster);
    assert_eq!(listed_static(&first), vec!['A'; STATIC_FILES], "{first}");
    assert!(!state_left(&at), "release removed its state");

    // An after-hook that never ran: the snapshot stays mounted until the next before-hook.
    let (code, _, stderr) = run_cli(
        node,
        &[
            "snapshot",
            "mount",
            "--volume",
            "shared",
            "--at",
            at.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(cluster.volume.snapshot_list().len(), 1);
    let stale: Vec<SetRecord> = node.cli_json(&["snapshot", "list"]);
    let stale = stale.last().unwrap().clone();
    assert!(stale.id != first_set.id);

    let second = borgmatic(&["create", "--list"]);
    last_set_released(&cluster);
    assert_eq!(
        show(node, &stale).deleted_because,
        Some(quiesce_proto::Deletion::Requested),
        "the stale mount was released by the next before-hook"
    );
    assert_eq!(
        listed_static(&second),
        Vec::<char>::new(),
        "borgmatic lists only added and modified files: the static ones were unchanged: {second}"
    );
    assert!(
        second.lines().any(|l| l.contains("records.log")),
        "the app's records changed and were read again: {second}"
    );

    let archives = || {
        borgmatic(&["list", "--short"])
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("Listing archives"))
            .count()
    };
    assert_eq!(archives(), 2);
    borgmatic(&["prune"]);
    assert_eq!(archives(), 1, "keep_daily: 1 keeps one archive of the two");
}

/// Whether `mount`'s state file for `at` is still there.
fn state_left(at: &Path) -> bool {
    let mut name = at.as_os_str().to_owned();
    name.push(".quiesce-set");
    Path::new(&name).exists()
}

/// Bacula's three daemons, started by hand on ports of their own with configurations of the
/// test's own (a director with a SQLite catalog made by the package's own script, a storage
/// daemon writing file volumes, a file daemon), and `bconsole` to drive them.
struct Bacula {
    dir: tempfile::TempDir,
    console: PathBuf,
    // Dropped (SIGKILL) with the test, however it ends.
    _daemons: Vec<quiesce_testbed::Child>,
}

impl Bacula {
    /// Bacula backing up the fixed FileSet path `at`, the job's `ClientRunBeforeJob` /
    /// `ClientRunAfterJob` as the README gives them (`before` and `after`).
    fn start(at: &Path, before: &str, after: &str) -> Bacula {
        for (tool, package) in [
            ("bacula-dir", "bacula-director"),
            ("bacula-sd", "bacula-sd"),
            ("bacula-fd", "bacula-fd"),
            ("bconsole", "bacula-console"),
        ] {
            quiesce_testbed::require(tool, package);
        }
        let tables = Path::new("/usr/share/bacula-director/make_sqlite3_tables");
        assert!(
            tables.exists(),
            "{} is missing: install bacula-director-sqlite3 (scripts/setup does)",
            tables.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let work = d.join("work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(d.join("volumes")).unwrap();
        let [dir_port, sd_port, fd_port] =
            std::array::from_fn(|_| quiesce_testbed::postgres::free_port());
        let messages = |name: &str| {
            format!(
                "Messages {{\n  Name = {name}\n  console = all, !skipped, !saved\n  append = {:?} = all, !skipped\n  catalog = all\n}}\n",
                work.join("log")
            )
        };
        let files = [
            (
                "bacula-dir.conf",
                format!(
                    "Director {{\n  Name = quiesce-dir\n  DIRport = {dir_port}\n  DirAddress = 127.0.0.1\n  QueryFile = \"/etc/bacula/scripts/query.sql\"\n  WorkingDirectory = {work:?}\n  PidDirectory = {work:?}\n  Password = \"console\"\n  Messages = Standard\n}}\n\
                     Catalog {{\n  Name = Catalog\n  dbname = \"bacula\"; dbuser = \"\"; dbpassword = \"\"\n}}\n{}\
                     Storage {{\n  Name = File\n  Address = 127.0.0.1\n  SDPort = {sd_port}\n  Password = \"storage\"\n  Device = Files\n  Media Type = File\n}}\n\
                     Pool {{\n  Name = Default\n  Pool Type = Backup\n  Label Format = \"Vol-\"\n}}\n\
                     Client {{\n  Name = node1-fd\n  Address = 127.0.0.1\n  FDPort = {fd_port}\n  Catalog = Catalog\n  Password = \"client\"\n}}\n\
                     FileSet {{\n  Name = Shared\n  Include {{\n    Options {{\n      signature = MD5\n    }}\n    File = {at:?}\n  }}\n}}\n\
                     Job {{\n  Name = Shared\n  Type = Backup\n  Level = Incremental\n  Client = node1-fd\n  FileSet = Shared\n  Storage = File\n  Pool = Default\n  Messages = Standard\n  ClientRunBeforeJob = {before:?}\n  ClientRunAfterJob = {after:?}\n}}\n",
                    messages("Standard")
                ),
            ),
            (
                "bacula-sd.conf",
                format!(
                    "Storage {{\n  Name = quiesce-sd\n  SDPort = {sd_port}\n  SDAddress = 127.0.0.1\n  WorkingDirectory = {work:?}\n  PidDirectory = {work:?}\n}}\n\
                     Director {{\n  Name = quiesce-dir\n  Password = \"storage\"\n}}\n\
                     Device {{\n  Name = Files\n  Media Type = File\n  Archive Device = {:?}\n  LabelMedia = yes\n  Random Access = yes\n  AutomaticMount = yes\n  RemovableMedia = no\n  AlwaysOpen = no\n}}\n\
                     Messages {{\n  Name = Standard\n  director = quiesce-dir = all\n}}\n",
                    d.join("volumes")
                ),
            ),
            (
                "bacula-fd.conf",
                format!(
                    "FileDaemon {{\n  Name = node1-fd\n  FDport = {fd_port}\n  FDAddress = 127.0.0.1\n  WorkingDirectory = {work:?}\n  PidDirectory = {work:?}\n}}\n\
                     Director {{\n  Name = quiesce-dir\n  Password = \"client\"\n}}\n\
                     Messages {{\n  Name = Standard\n  director = quiesce-dir = all, !skipped, !restored\n}}\n"
                ),
            ),
            (
                "bconsole.conf",
                format!(
                    "Director {{\n  Name = quiesce-dir\n  DIRport = {dir_port}\n  Address = 127.0.0.1\n  Password = \"console\"\n}}\n"
                ),
            ),
        ];
        for (name, text) in &files {
            std::fs::write(d.join(name), text).unwrap();
        }
        // The package's script, pointed at this catalog instead of /var/lib/bacula.
        let script = std::fs::read_to_string(tables)
            .unwrap()
            .replace("cd /var/lib/bacula", &format!("cd {:?}", work))
            .replace("XXX_DBNAME_XXX", "bacula");
        quiesce_testbed::run(Command::new("sh").arg("-c").arg(script));
        let mut daemons = Vec::new();
        for (daemon, port) in [
            ("bacula-sd", sd_port),
            ("bacula-fd", fd_port),
            ("bacula-dir", dir_port),
        ] {
            let mut command = Command::new(daemon);
            command
                .arg("-f")
                .arg("-c")
                .arg(d.join(format!("{daemon}.conf")))
                .stdout(std::process::Stdio::null());
            let child = quiesce_testbed::Child::spawn(command, d.join(format!("{daemon}.stderr")));
            quiesce_testbed::wait_until(&format!("{daemon} listening on {port}"), DEADLINE, || {
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()
            });
            daemons.push(child);
        }
        Bacula {
            console: d.join("bconsole.conf"),
            dir,
            _daemons: daemons,
        }
    }

    /// `bconsole` reading `commands`: what it printed. Bacula's `wait` has no deadline of its
    /// own: a job that never ends fails the test after 5 minutes instead of hanging it.
    fn console(&self, commands: &str) -> String {
        use std::io::Write;
        let mut child = Command::new("timeout")
            .args(["--kill-after=5", "300", "bconsole"])
            .arg("-c")
            .arg(&self.console)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{commands}\nquit\n").as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "bconsole {commands:?} ({}; 124 is the 5-minute deadline): {text}",
            output.status
        );
        text
    }

    /// Runs the job and waits for it: its level (`F`, `I`) and the files it backed up.
    fn backup(&self, job: u32) -> (String, Vec<String>) {
        self.console(&format!("run job=Shared yes\nwait jobid={job}"));
        let listed = self.console(&format!("list jobid={job}"));
        let log = std::fs::read_to_string(self.dir.path().join("work/log")).unwrap_or_default();
        // | JobId | Name | StartTime | Type | Level | JobFiles | JobBytes | JobStatus |
        let row: Vec<String> = listed
            .lines()
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells.len() > 8 && cells[1] == job.to_string())
            .unwrap_or_else(|| panic!("job {job} not listed:\n{listed}\n{log}"));
        assert_eq!(
            row[8], "T",
            "job {job} ended OK (JobStatus T):\n{listed}\n{log}"
        );
        let level = row[5].clone();
        let files = self
            .console(&format!("list files jobid={job}"))
            .lines()
            .filter_map(|l| {
                let cell = l.trim().trim_matches('|').trim();
                cell.starts_with('/').then(|| cell.to_string())
            })
            .collect();
        (level, files)
    }
}

/// Bacula as its users run it: a FileSet with the volume's fixed path, `quiesce snapshot mount`
/// as the job's `ClientRunBeforeJob` and `release` as its `ClientRunAfterJob`, run by the real
/// bacula-fd. The first job (Bacula makes it Full) backs up every static file; the second,
/// Incremental, none of them (their times are the snapshot's, unchanged since the first) but
/// the application's records, which changed. After each job the snapshot is gone.
#[test]
fn bacula_client_run_hooks_mount_and_release_the_snapshot_and_the_second_job_is_incremental() {
    let cluster = cluster_with_static_files();
    let node = &cluster.nodes[0];
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("shared");
    let quiesce = |action: &str| hook(node, &at, action);
    let bacula = Bacula::start(&at, &quiesce("mount"), &quiesce("release"));

    let (level, first) = bacula.backup(1);
    last_set_released(&cluster);
    assert!(!state_left(&at), "release removed its state");
    assert_eq!(level, "F", "Bacula's first job of a FileSet is Full");
    let static_in = |files: &[String]| files.iter().filter(|f| f.contains("/static/file-")).count();
    assert_eq!(static_in(&first), STATIC_FILES, "{first:?}");

    let (level, second) = bacula.backup(2);
    last_set_released(&cluster);
    assert_eq!(level, "I");
    assert_eq!(
        static_in(&second),
        0,
        "unchanged files are not read again: {second:?}"
    );
    assert!(
        second.iter().any(|f| f.ends_with("records.log")),
        "the app's records changed and were backed up: {second:?}"
    );
}

/// A Proxmox VE vzdump hook (`examples/vzdump-hook.sh`, as written) run with the phases vzdump
/// gives it, in vzdump's order: `job-start` mounts an app-consistent snapshot at the stable
/// path, the per-guest phases leave it be, `job-end` releases it; a job vzdump aborts after
/// `job-start` releases it at `job-abort`. (vzdump itself is not in Debian: the script is run
/// as vzdump runs it, the phase first.)
#[test]
fn a_vzdump_hook_mounts_the_snapshot_for_the_job_and_releases_it_when_the_job_ends_or_aborts() {
    let cluster = cluster_with_static_files();
    let node = &cluster.nodes[0];
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("shared");
    let script = quiesce_testbed::workspace_root().join("examples/vzdump-hook.sh");
    let phase = |args: &[&str]| {
        let output = Command::new(&script)
            .args(args)
            .env("QUIESCE_CLI", cli_exe())
            .env("QUIESCE_AT", &at)
            .env("QUIESCE_BUS", &node.bus.address)
            .env_remove("QUIESCE_BROKER")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "vzdump-hook.sh {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            cluster.logs()
        );
    };
    let guest = |name: &'static str| [name, "snapshot", "100"];
    for ending in ["job-end", "job-abort"] {
        phase(&["job-init"]);
        assert!(
            cluster.volume.snapshot_list().is_empty(),
            "job-init takes nothing"
        );
        phase(&["job-start"]);
        let listed: Vec<SetRecord> = node.cli_json(&["snapshot", "list"]);
        let set = listed.last().expect("job-start ran a set").clone();
        assert_eq!(set.outcome, quiesce_proto::Outcome::AppConsistent);
        assert_eq!(
            std::fs::read_dir(at.join("static")).unwrap().count(),
            STATIC_FILES,
            "the snapshot is at the stable path"
        );
        for args in [guest("backup-start"), guest("backup-end"), guest("log-end")] {
            phase(&args);
        }
        assert!(
            at.join("static").is_dir(),
            "still mounted through the guests' phases"
        );
        phase(&[ending]);
        assert!(!at.join("static").exists(), "{ending} unmounted it");
        assert!(!state_left(&at), "{ending} removed its state");
        assert_eq!(
            show(node, &set).deleted_because,
            Some(quiesce_proto::Deletion::Requested),
            "{ending} deleted the snapshot"
        );
        assert!(cluster.volume.snapshot_list().is_empty());
    }
}
