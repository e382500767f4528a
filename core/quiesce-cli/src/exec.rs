//! `quiesce snapshot exec`: one set, then a command (the backup) run on its snapshot at a
//! path that is the same for every set of the volume, then the snapshot deleted however the
//! command ended.
//!
//! The stable path is what a backup tool's incremental logic keys on (restic's parent snapshot,
//! borg's files cache): the snapshot is bind-mounted there, read-only, in a private mount
//! namespace the command runs in, so nothing is left mounted on the node and two `exec`s of the
//! same volume never see each other's snapshot. The snapshot is held by a lease that `exec`
//! renews while the command runs: `quiesce` killed with SIGKILL leaks nothing, the broker
//! deletes the snapshot when the lease lapses.

use crate::exit::{Exit, Failure};
use anyhow::Context;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quiesce_dbus::HostClient;
use quiesce_proto::SetRecord;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Where `exec` mounts a volume's snapshot unless `--at` says otherwise: `<this>/<volume>`.
pub const SNAPSHOTS_DIR: &str = "/run/quiesce/snapshots";

/// What `quiesce snapshot exec` was asked.
#[derive(Debug)]
pub struct Exec {
    pub volume: String,
    pub best_effort: bool,
    pub at: Option<PathBuf>,
    pub lease: Duration,
    pub command: Vec<OsString>,
}

/// The signals `exec` passes on to the command (and, before the command runs, remembers: the
/// set is let finish and its snapshot deleted at once).
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next one to arrive.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.terminate.recv() => Signal::SIGTERM,
            _ = self.interrupt.recv() => Signal::SIGINT,
            _ = self.hangup.recv() => Signal::SIGHUP,
        }
    }
}

/// Where a volume's snapshot is mounted (`at`, or [`SNAPSHOTS_DIR`]`/<volume>`), checked that
/// `what` (exec, mount) can mount there: run as root, the directory made.
pub fn stable_path(volume: &str, at: Option<&Path>, what: &str) -> anyhow::Result<PathBuf> {
    let at = match at {
        Some(at) => at.to_path_buf(),
        None => {
            if volume.is_empty() || volume.starts_with('.') || volume.contains('/') {
                return Err(Failure::error(
                    Exit::Usage,
                    format!(
                        "{volume:?} cannot name a directory under {SNAPSHOTS_DIR}: give --at DIR"
                    ),
                ));
            }
            Path::new(SNAPSHOTS_DIR).join(volume)
        }
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::error(
            Exit::NotAuthorized,
            format!("{what} mounts the snapshot: run it as root (a member of the quiesce group can use `create`, then read the snapshot's own path)"),
        ));
    }
    std::fs::create_dir_all(&at).with_context(|| {
        format!(
            "creating the directory the snapshot is mounted at, {}",
            at.display()
        )
    })?;
    Ok(at)
}

pub async fn run(host: &HostClient, exec: Exec) -> anyhow::Result<ExitCode> {
    if exec.lease < Duration::from_secs(1) {
        return Err(Failure::error(
            Exit::Usage,
            "--lease must be at least 1s: exec renews it every third of it",
        ));
    }
    let at = stable_path(&exec.volume, exec.at.as_deref(), "exec")?;
    let mut signals = Signals::install().context("installing the signal handlers")?;

    let volumes = [exec.volume.clone()];
    let create = host.create_snapshot_leased(&volumes, exec.best_effort, Some(exec.lease), None);
    tokio::pin!(create);
    let mut interrupted = None;
    let json = loop {
        tokio::select! {
            reply = &mut create => break reply?,
            signo = signals.next() => {
                eprintln!("quiesce: {signo} while the set runs: the snapshot is deleted as soon as the set ends and the command is not run");
                interrupted = Some(signo);
            }
        }
    };
    let record: SetRecord = serde_json::from_str(&json)
        .with_context(|| format!("the host answered a record that does not parse: {json}"))?;
    let Some(snapshot) = record.snapshot.clone() else {
        eprintln!(
            "quiesce: set {} kept no snapshot ({}): the command was not run",
            record.id.0, record.outcome
        );
        return Ok(Exit::of_outcome(&record).into());
    };
    let id = record.id.0.clone();
    if let Some(signo) = interrupted {
        release(host, &id).await;
        return Ok(ExitCode::from(128 + signo as u8));
    }

    eprintln!(
        "quiesce: set {id} ({}): its snapshot {} mounted read-only at {} for the command",
        record.outcome,
        snapshot.path,
        at.display()
    );
    let status = match spawn(&exec, &at, &snapshot.path, &record) {
        Ok(mut child) => {
            let pid =
                Pid::from_raw(child.id().expect("a child not yet waited for has a pid") as i32);
            let every = exec.lease / 3;
            let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    status = child.wait() => break status.context("waiting for the command")?,
                    signo = signals.next() => {
                        // Gone already: the wait above answers next.
                        let _ = kill(pid, signo);
                    }
                    _ = renewals.tick() => {
                        if let Err(e) = host.renew_snapshot(&id, Some(exec.lease)).await {
                            eprintln!("quiesce: renewing the lease on set {id}'s snapshot failed (the command goes on; the broker deletes the snapshot if no renewal lands before the lease lapses): {e}");
                        }
                    }
                }
            }
        }
        Err(e) => {
            release(host, &id).await;
            let (program, status) = match e.kind() {
                std::io::ErrorKind::NotFound => ("cannot be found", 127),
                _ => ("cannot be started", 126),
            };
            // As env(1) and the shells: 127 for a command not found, 126 for one that cannot run.
            eprintln!(
                "quiesce: the command {:?} {program} with the snapshot of set {id} mounted at {}: {e}",
                exec.command.first().map(|c| c.to_string_lossy()).unwrap_or_default(),
                at.display()
            );
            return Ok(ExitCode::from(status));
        }
    };
    release(host, &id).await;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signo)) => ExitCode::from(128u8.wrapping_add(signo as u8)),
        (None, None) => Exit::Software.into(),
    })
}

/// Starts the command with the snapshot at `at`, in a mount namespace of its own.
fn spawn(
    exec: &Exec,
    at: &Path,
    source: &str,
    record: &SetRecord,
) -> std::io::Result<tokio::process::Child> {
    // clap requires at least one word after `--`.
    let (program, args) = exec.command.split_first().expect("a command");
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("QUIESCE_SNAPSHOT_PATH", at)
        .env("QUIESCE_SNAPSHOT_SOURCE", source)
        .env("QUIESCE_SET_ID", &record.id.0)
        .env("QUIESCE_OUTCOME", record.outcome.label())
        .env("QUIESCE_VOLUME", &exec.volume);
    let source = PathBuf::from(source);
    let target = at.to_path_buf();
    // SAFETY: between fork and exec only system calls run; nix passes paths shorter than
    // PATH_MAX on the stack, so nothing allocates.
    unsafe {
        command.pre_exec(move || {
            let none: Option<&str> = None;
            // quiesce killed (SIGKILL, OOM): the command is told to stop, since no one would
            // delete the snapshot after it and its lease is lapsing.
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            unshare(CloneFlags::CLONE_NEWNS)?;
            // Private: the mount below never propagates back to the node's namespace.
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
            mount(
                Some(&source),
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )?;
            mount(
                none,
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            )?;
            Ok(())
        });
    }
    command.spawn()
}

/// Deletes the set's snapshot; when that fails, says so (its lease still lapses).
pub async fn release(host: &HostClient, id: &str) {
    if let Err(e) = host.delete_snapshot(id).await {
        eprintln!("quiesce: deleting set {id}'s snapshot failed; the broker deletes it when its lease lapses: {e}");
    }
}
