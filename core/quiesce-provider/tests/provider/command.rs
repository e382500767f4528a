//! The command provider with real programs: a shell script that snapshots a btrfs subvolume the
//! way a SAN tool would, programs that fail, and one that hangs.

use crate::script;
use quiesce_provider::{Provider, ProviderConfig, SnapshotInfo};
use quiesce_testbed::{wait_until, BtrfsVolume};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A snapshot program over btrfs, invoked as `san LOG DATA SNAPSHOTS OPERATION`; it logs each
/// invocation with the variables it was given.
const BTRFS_SAN: &str = r#"set -eu
log="$1"; data="$2"; snaps="$3"; op="$4"
echo "$op op=$QUIESCE_OPERATION set=${QUIESCE_SET_ID-unset} id=${QUIESCE_SNAPSHOT_ID-unset} path=${QUIESCE_SNAPSHOT_PATH-unset}" >> "$log"
print() { printf '{"id": "lun7-%s", "path": "%s"}\n' "$QUIESCE_SET_ID" "$snaps/$QUIESCE_SET_ID"; }
case "$op" in
  take) btrfs subvolume snapshot "$data" "$snaps/$QUIESCE_SET_ID" >&2; print ;;
  finalize) btrfs property set -ts "$QUIESCE_SNAPSHOT_PATH" ro true ;;
  delete) btrfs subvolume delete "$QUIESCE_SNAPSHOT_PATH" >&2 ;;
  find) if [ -d "$snaps/$QUIESCE_SET_ID" ]; then print; fi ;;
  *) echo "unknown operation $op" >&2; exit 2 ;;
esac
"#;

fn btrfs_san(volume: &BtrfsVolume) -> (ProviderConfig, PathBuf) {
    let log = volume.scratch().join("san.log");
    let program = script(&volume.scratch().join("san"), BTRFS_SAN);
    let config = ProviderConfig::Command {
        program,
        args: vec![
            log.display().to_string(),
            volume.data.display().to_string(),
            volume.snapshots.display().to_string(),
        ],
        fsfreeze: None,
        timeout_ms: None,
        hold_limit_ms: None,
    };
    (config, log)
}

fn command(program: PathBuf, timeout_ms: Option<u64>) -> Box<dyn Provider> {
    ProviderConfig::Command {
        program,
        args: vec![],
        fsfreeze: None,
        timeout_ms,
        hold_limit_ms: None,
    }
    .build()
}

#[test]
fn a_script_takes_finalizes_finds_and_deletes_a_btrfs_snapshot() {
    let volume = BtrfsVolume::create(256);
    std::fs::write(volume.data.join("table"), "before").unwrap();
    let (config, log) = btrfs_san(&volume);
    config.check(&[]).unwrap();
    let provider = config.build();
    assert_eq!(provider.name(), "command");

    let snapshot = provider.take("set-1").unwrap();
    let path = volume.snapshots.join("set-1");
    assert_eq!(
        snapshot,
        SnapshotInfo {
            id: "lun7-set-1".into(),
            path: path.display().to_string(),
            provider: "command".into(),
        }
    );
    std::fs::write(volume.data.join("table"), "after").unwrap();
    assert_eq!(
        std::fs::read_to_string(path.join("table")).unwrap(),
        "before"
    );
    // Writable until finalized, like every provider's snapshot.
    std::fs::write(path.join("label"), "set-1").unwrap();
    provider.finalize(&snapshot).unwrap();
    assert!(BtrfsVolume::is_read_only(&path));

    assert_eq!(provider.find("set-1").unwrap(), Some(snapshot.clone()));
    assert_eq!(
        provider.find("set-2").unwrap(),
        None,
        "nothing printed: none"
    );
    provider.delete(&snapshot).unwrap();
    assert!(volume.snapshot_list().is_empty());
    assert_eq!(provider.find("set-1").unwrap(), None);

    let path = path.display();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!(
            "take op=take set=set-1 id=unset path=unset\n\
             finalize op=finalize set=unset id=lun7-set-1 path={path}\n\
             find op=find set=set-1 id=unset path=unset\n\
             find op=find set=set-2 id=unset path=unset\n\
             delete op=delete set=unset id=lun7-set-1 path={path}\n\
             find op=find set=set-1 id=unset path=unset\n"
        )
    );
}

#[test]
fn a_failing_program_s_error_quotes_its_stderr() {
    let volume = BtrfsVolume::create(256);
    let (config, _) = btrfs_san(&volume);
    let provider = config.build();
    // The tool's own error, from a real failure: a file where the snapshot would go.
    std::fs::write(volume.snapshots.join("set-1"), "").unwrap();
    let err = provider.take("set-1").unwrap_err().to_string();
    let program = volume.scratch().join("san");
    assert!(
        err.starts_with(&format!("command: `{} ", program.display())),
        "{err}"
    );
    assert!(err.contains(" take` failed (exit status: 1): "), "{err}");
    assert!(err.contains("exists and it is not a directory"), "{err}");

    // Only the end of a long stderr is kept: that is where the reason is.
    let noisy = script(
        &volume.scratch().join("noisy"),
        "head -c 10000 /dev/zero | tr '\\0' x >&2\necho ' LUN 7 is offline: ask the storage team' >&2\nexit 4\n",
    );
    let err = command(noisy, None).take("set-2").unwrap_err().to_string();
    assert!(err.contains("(exit status: 4)"), "{err}");
    assert!(
        err.ends_with("xxx LUN 7 is offline: ask the storage team"),
        "{err}"
    );
    assert!(err.contains("earlier bytes dropped]"), "{err}");
    assert!(err.len() < 4096 + 300, "{} bytes", err.len());

    // Success with output that is not the documented object is a failure too.
    let chatty = script(
        &volume.scratch().join("chatty"),
        "echo 'snapshot created'\n",
    );
    let err = command(chatty, None).take("set-3").unwrap_err().to_string();
    assert!(err.contains("is not one JSON object"), "{err}");
    assert!(err.contains("snapshot created"), "{err}");
}

#[test]
fn a_hanging_program_is_killed_at_its_timeout() {
    let volume = BtrfsVolume::create(256);
    let pid_file = volume.scratch().join("pid");
    let hang = script(
        &volume.scratch().join("hang"),
        &format!(
            "echo $$ > {}\necho 'waiting for the array' >&2\nsleep 600\n",
            pid_file.display()
        ),
    );
    let started = Instant::now();
    let err = command(hang, Some(300))
        .take("set-1")
        .unwrap_err()
        .to_string();
    let took = started.elapsed();
    assert!(
        err.contains(
            "still running after its 300 ms timeout (timeout_ms): killed with its process group"
        ),
        "{err}"
    );
    assert!(err.ends_with("waiting for the array"), "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    wait_until(
        "the killed program is gone",
        Duration::from_secs(10),
        || (!Path::new(&format!("/proc/{}", pid.trim())).exists()).then_some(()),
    );
}
