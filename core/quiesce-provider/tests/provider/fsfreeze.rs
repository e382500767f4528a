//! The command provider's `fsfreeze` on a real btrfs loop mount: writes wait while it is frozen,
//! the watchdog thaws it at the hold limit, every failure thaws it, and `check` refuses the
//! freezes that would deadlock.

use crate::script;
use quiesce_provider::{Provider, ProviderConfig};
use quiesce_testbed::{require, wait_until, BtrfsVolume, Child};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Thaws the file system when a test ends, however it ends: a failed test must not leave the
/// machine with a frozen file system.
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn frozen_volume() -> (BtrfsVolume, ThawOnDrop) {
    require("fsfreeze", "util-linux");
    let volume = BtrfsVolume::create(256);
    let thaw = ThawOnDrop(volume.mount.clone());
    (volume, thaw)
}

fn provider(
    volume: &BtrfsVolume,
    program: PathBuf,
    timeout_ms: u64,
    hold_limit_ms: u64,
) -> Box<dyn Provider> {
    let config = ProviderConfig::Command {
        program,
        args: vec![],
        fsfreeze: Some(volume.mount.clone()),
        timeout_ms: Some(timeout_ms),
        hold_limit_ms: Some(hold_limit_ms),
    };
    config.check(&[volume.scratch()]).unwrap();
    config.build()
}

/// Another process writing a file on the volume, then a marker outside it once the write is
/// done.
fn writer(volume: &BtrfsVolume) -> (Child, PathBuf) {
    let written = volume.scratch().join("written");
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "echo during > {} && touch {}",
        volume.data.join("during").display(),
        written.display()
    ));
    (
        Child::spawn(command, volume.scratch().join("writer.stderr")),
        written,
    )
}

/// The scheduler state of a process (`D`: waiting uninterruptibly, as a write on a frozen file
/// system does).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Waits until a write to the volume by another process completes: proof that it is thawed.
fn assert_thawed(volume: &BtrfsVolume) {
    let (_writer, written) = writer(volume);
    wait_until(
        "a write to the volume completes (the file system is thawed)",
        Duration::from_secs(20),
        || written.exists().then_some(()),
    );
    std::fs::remove_file(&written).unwrap();
}

#[test]
fn a_write_waits_while_frozen_and_completes_after_the_snapshot() {
    let (volume, _thaw) = frozen_volume();
    let scratch = volume.scratch();
    let started = scratch.join("started");
    let go = scratch.join("go");
    quiesce_testbed::run(Command::new("mkfifo").arg(&go));
    // A block-level snapshot tool: it runs while the file system is frozen, and writes nothing
    // to it. It finishes when the test says so.
    let program = script(
        &scratch.join("san"),
        &format!(
            "touch {}\nread line < {}\nprintf '{{\"id\": \"blk-%s\", \"path\": \"\"}}\\n' \"$QUIESCE_SET_ID\"\n",
            started.display(),
            go.display()
        ),
    );
    let provider = provider(&volume, program, 60_000, 60_000);

    std::thread::scope(|s| {
        let taking = s.spawn(|| provider.take("set-f"));
        wait_until("the program runs (frozen)", Duration::from_secs(20), || {
            started.exists().then_some(())
        });
        let (writer, written) = writer(&volume);
        wait_until(
            "the writer waits on the frozen file system",
            Duration::from_secs(20),
            || (state(writer.pid()) == Some('D')).then_some(()),
        );
        assert!(
            !written.exists(),
            "a write went through a frozen file system"
        );

        std::fs::write(&go, "go\n").unwrap();
        let snapshot = taking.join().unwrap().unwrap();
        assert_eq!(snapshot.id, "blk-set-f");
        assert_eq!(snapshot.path, "", "not mountable: an empty path");
        wait_until(
            "the write completes once thawed",
            Duration::from_secs(20),
            || written.exists().then_some(()),
        );
    });
    assert_eq!(
        std::fs::read_to_string(volume.data.join("during")).unwrap(),
        "during\n"
    );
}

#[test]
fn the_watchdog_thaws_at_the_hold_limit_when_the_program_hangs() {
    let (volume, _thaw) = frozen_volume();
    let scratch = volume.scratch();
    let started = scratch.join("started");
    let pid_file = scratch.join("pid");
    let program = script(
        &scratch.join("hang"),
        &format!(
            "echo $$ > {}\ntouch {}\necho 'the array does not answer' >&2\nsleep 600\n",
            pid_file.display(),
            started.display()
        ),
    );
    let provider = provider(&volume, program, 60_000, 700);

    let began = Instant::now();
    std::thread::scope(|s| {
        let taking = s.spawn(|| provider.take("set-w"));
        wait_until("the program runs (frozen)", Duration::from_secs(20), || {
            started.exists().then_some(())
        });
        let (_writer, written) = writer(&volume);
        wait_until(
            "the watchdog thaws the file system and the write completes",
            Duration::from_secs(30),
            || written.exists().then_some(()),
        );
        let write_done = began.elapsed();
        assert!(
            write_done >= Duration::from_millis(700),
            "the write completed after {write_done:?}, before the hold limit: it was not frozen"
        );
        let err = taking.join().unwrap().unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "the watchdog thawed {} after the hold limit of 700 ms",
                volume.mount.display()
            )),
            "{err}"
        );
        assert!(err.contains("no snapshot was kept"), "{err}");
        assert!(err.contains("the array does not answer"), "{err}");
        assert!(err.contains("raise hold_limit_ms"), "{err}");
    });
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "not held to the 60 s timeout"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    wait_until(
        "the hung program is killed",
        Duration::from_secs(10),
        || (!Path::new(&format!("/proc/{}", pid.trim())).exists()).then_some(()),
    );
}

#[test]
fn a_failing_or_timed_out_take_still_thaws() {
    let (volume, _thaw) = frozen_volume();
    let failing = script(
        &volume.scratch().join("failing"),
        "echo 'snapshot quota exceeded' >&2\nexit 3\n",
    );
    let err = provider(&volume, failing, 60_000, 60_000)
        .take("set-1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(exit status: 3): snapshot quota exceeded"),
        "{err}"
    );
    assert_thawed(&volume);

    let hanging = script(&volume.scratch().join("hanging"), "sleep 600\n");
    let err = provider(&volume, hanging, 300, 60_000)
        .take("set-2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("after its 300 ms timeout"), "{err}");
    assert_thawed(&volume);
}

#[test]
fn a_file_system_frozen_by_someone_else_is_refused_and_left_frozen() {
    let (volume, _thaw) = frozen_volume();
    let program = script(
        &volume.scratch().join("san"),
        "echo '{\"id\": \"x\", \"path\": \"\"}'\n",
    );
    let provider = provider(&volume, program, 60_000, 60_000);
    quiesce_testbed::run(Command::new("fsfreeze").arg("--freeze").arg(&volume.mount));
    let err = provider.take("set-1").unwrap_err().to_string();
    assert!(err.contains("fsfreeze --freeze"), "{err}");
    assert!(err.contains("already frozen?"), "{err}");
    // Still frozen: thawing it now succeeds (thawing a thawed file system fails).
    quiesce_testbed::run(
        Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&volume.mount),
    );
}

#[test]
fn check_refuses_freezes_that_would_deadlock_the_daemon() {
    let (volume, _thaw) = frozen_volume();
    let program = script(&volume.scratch().join("san"), "exit 0\n");
    let config = |mount: &Path| ProviderConfig::Command {
        program: program.clone(),
        args: vec![],
        fsfreeze: Some(mount.into()),
        timeout_ms: None,
        hold_limit_ms: None,
    };
    let frozen = config(&volume.mount);

    // The daemon's state elsewhere: fine.
    let elsewhere = volume.scratch().join("state/catalog.db");
    frozen.check(&[&elsewhere]).unwrap();

    // A catalog that does not exist yet, in another subvolume of the frozen file system (with
    // a st_dev of its own): still the same file system, still refused.
    let catalog = volume.data.join("quiesce/catalog.db");
    let err = frozen
        .check(&[&elsewhere, &catalog])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "{} is on the file system that fsfreeze",
            catalog.display()
        )),
        "{err}"
    );
    assert!(err.contains("move"), "{err}");
    let err = frozen
        .check(&[&volume.snapshots.join("state")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("is on the file system that fsfreeze"), "{err}");

    let err = config(Path::new("/")).check(&[]).unwrap_err().to_string();
    assert!(err.contains("would freeze the root file system"), "{err}");

    let err = config(&volume.data).check(&[]).unwrap_err().to_string();
    assert!(err.contains("is not a mount point"), "{err}");
    assert!(
        err.contains(&format!("this path is on {}", volume.mount.display())),
        "{err}"
    );
}
