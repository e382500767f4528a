//! `quiesce snapshot mount` / `release`: the two halves of `exec` for backup tools that run a
//! before-hook and an after-hook and carry no state between them (borgmatic's
//! `before_backup`/`after_backup`, Bacula's `ClientRunBeforeJob`/`ClientRunAfterJob`, vzdump's
//! hook phases). `mount` runs a set and bind-mounts its snapshot read-only at the volume's stable
//! path on this node; `release` unmounts it and deletes the snapshot. The set's id is kept next to
//! the mount point (`<path>.quiesce-set`), so `release` needs only the volume; a `mount` that
//! finds one left by an after-hook that never ran releases it first. The snapshot is held by a
//! lease (`--lease`, 12 h) that nothing renews: the backup must end within it, or the broker
//! deletes the snapshot.

use crate::exec::{release, stable_path};
use crate::exit::{Exit, Failure};
use anyhow::Context;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use quiesce_dbus::HostClient;
use quiesce_proto::SetRecord;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Where the id of the set mounted at `at` is kept.
fn state_file(at: &Path) -> PathBuf {
    let mut name = at.as_os_str().to_owned();
    name.push(".quiesce-set");
    PathBuf::from(name)
}

/// Whether something is mounted at `at` in this mount namespace.
fn is_mount_point(at: &Path) -> anyhow::Result<bool> {
    quiesce_provider::is_mount_point(at)
        .with_context(|| format!("checking whether {} is a mount point", at.display()))
}

pub async fn mount_snapshot(
    host: &HostClient,
    volume: &str,
    at: Option<&Path>,
    best_effort: bool,
    lease: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let at = stable_path(volume, at, "mount")?;
    if state_file(&at).exists() {
        eprintln!(
            "quiesce: a snapshot is still mounted at {} (its after-hook did not run): releasing it first",
            at.display()
        );
        release_snapshot(host, volume, Some(&at)).await?;
    }
    if is_mount_point(&at)? {
        return Err(Failure::error(
            Exit::Busy,
            format!("something quiesce did not mount is mounted at {}: unmount it, or give --at another directory", at.display()),
        ));
    }
    let json_record = host
        .create_snapshot_leased(&[volume.to_string()], best_effort, Some(lease), None)
        .await?;
    let record: SetRecord = serde_json::from_str(&json_record).with_context(|| {
        format!("the host answered a record that does not parse: {json_record}")
    })?;
    let Some(snapshot) = &record.snapshot else {
        crate::snapshot::print_one(&record, json)?;
        return Ok(Exit::of_outcome(&record).into());
    };
    let none: Option<&str> = None;
    let mounted = mount(
        Some(snapshot.path.as_str()),
        &at,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .and_then(|()| {
        mount(
            none,
            &at,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            none,
        )
    });
    if let Err(e) = mounted {
        let _ = umount2(&at, MntFlags::MNT_DETACH);
        release(host, &record.id.0).await;
        return Err(anyhow::anyhow!(
            "bind-mounting the snapshot {} at {}: {e}",
            snapshot.path,
            at.display()
        ));
    }
    let state = state_file(&at);
    let temp = state.with_extension("quiesce-set.tmp");
    std::fs::write(&temp, format!("{}\n", record.id.0))
        .and_then(|()| std::fs::rename(&temp, &state))
        .with_context(|| format!("writing {}", state.display()))?;
    if json {
        crate::snapshot::print_one(&record, true)?;
    } else {
        println!(
            "set {} ({}): snapshot mounted read-only at {}; `quiesce snapshot release --volume {volume}` unmounts and deletes it",
            record.id.0,
            record.outcome,
            at.display()
        );
    }
    Ok(Exit::of_outcome(&record).into())
}

pub async fn release_snapshot(
    host: &HostClient,
    volume: &str,
    at: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let at = stable_path(volume, at, "release")?;
    let state = state_file(&at);
    let id = match std::fs::read_to_string(&state) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // An on-error hook after the after-hook, or a release run twice: nothing to do.
            println!("nothing mounted for {volume} at {}", at.display());
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", state.display())),
    };
    if is_mount_point(&at)? {
        // Detached at once; a process still reading the snapshot keeps it until it lets go.
        umount2(&at, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting the snapshot at {}", at.display()))?;
    }
    host.delete_snapshot(&id).await?;
    std::fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
    println!(
        "released set {id}: unmounted from {} and deleted",
        at.display()
    );
    Ok(ExitCode::SUCCESS)
}
