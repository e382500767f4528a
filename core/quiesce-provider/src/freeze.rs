//! `fsfreeze` around a snapshot, with a watchdog that thaws the file system when the hold limit
//! passes — a freeze has no timeout of its own and outlives the process that set it.

use crate::mounts;
use crate::process::{self, Ending, Waiting};
use crate::ProviderError;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

/// How a hold ended: who thawed the file system, and whether the thaw worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Release {
    /// The work ended within the hold limit; the file system was thawed after it.
    AfterWork(Result<(), String>),
    /// The hold limit passed first: the watchdog thawed the file system and interrupted the
    /// work. The work's result does not count (it ran, at least in part, unfrozen).
    ByWatchdog(Result<(), String>),
}

/// Runs `work` while a file system is frozen (the caller froze it just before), then thaws it
/// with `thaw` — exactly once, whoever comes first: the end of `work`, or a watchdog thread when
/// `hold_limit` passes. The watchdog then calls `interrupt`, so that `work` can stop early.
///
/// The watchdog does not depend on `work` returning: a hung program, a stuck pipe, a panic
/// unwinding — the file system is thawed at the hold limit all the same.
pub(crate) fn hold<R>(
    hold_limit: Duration,
    thaw: &(dyn Fn() -> Result<(), String> + Sync),
    interrupt: impl FnOnce() + Send,
    work: impl FnOnce() -> R,
) -> (R, Release) {
    // `None` while frozen; set once, by whichever side thaws.
    let released: Mutex<Option<Release>> = Mutex::new(None);
    let release_once = |by_watchdog: bool| {
        let mut released = released.lock().unwrap_or_else(|e| e.into_inner());
        if released.is_some() {
            return false;
        }
        let result = thaw();
        *released = Some(if by_watchdog {
            Release::ByWatchdog(result)
        } else {
            Release::AfterWork(result)
        });
        true
    };
    let (work_done, watchdog_wakes) = mpsc::channel::<()>();
    let release_once = &release_once;
    let result = std::thread::scope(|scope| {
        scope.spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = watchdog_wakes.recv_timeout(hold_limit) {
                if release_once(true) {
                    interrupt();
                }
            }
        });
        // Thaws when `work` ends, also by a panic; then wakes the watchdog (dropped channel).
        let _thaw_after_work = OnDrop(Some(|| {
            release_once(false);
            drop(work_done);
        }));
        work()
    });
    let release = released
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .expect("one side thawed: the end of the work does when the watchdog did not");
    (result, release)
}

/// Runs a closure when dropped, however the scope is left.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// `fsfreeze --freeze MOUNT`. If the tool itself runs past `limit` the freeze may still land:
/// it is thawed again before the error is returned.
pub(crate) fn freeze(
    provider: &'static str,
    mount: &Path,
    limit: Duration,
) -> Result<(), ProviderError> {
    let run = fsfreeze(provider, "--freeze", mount, limit)?;
    match run.ending {
        Ending::Exited(status) if status.success() => Ok(()),
        Ending::Exited(status) => Err(ProviderError::Command {
            provider,
            command: format!("fsfreeze --freeze {}", mount.display()),
            status: status.to_string(),
            stderr: format!(
                "{} (already frozen? thaw it with `fsfreeze --unfreeze {}`)",
                run.stderr,
                mount.display()
            ),
        }),
        ending => {
            let thawed = thaw(provider, mount, limit);
            Err(ProviderError::Command {
                provider,
                command: format!("fsfreeze --freeze {}", mount.display()),
                status: ending.describe("timeout_ms"),
                stderr: format!(
                    "{}; thawing it again: {}",
                    run.stderr,
                    thawed.map_or_else(|e| e.to_string(), |()| "done".into())
                ),
            })
        }
    }
}

/// `fsfreeze --unfreeze MOUNT`.
pub(crate) fn thaw(
    provider: &'static str,
    mount: &Path,
    limit: Duration,
) -> Result<(), ProviderError> {
    let run = fsfreeze(provider, "--unfreeze", mount, limit)?;
    if run.ending.succeeded() {
        Ok(())
    } else {
        Err(ProviderError::Command {
            provider,
            command: format!("fsfreeze --unfreeze {}", mount.display()),
            status: run.ending.describe("timeout_ms"),
            stderr: run.stderr,
        })
    }
}

fn fsfreeze(
    provider: &'static str,
    action: &str,
    mount: &Path,
    limit: Duration,
) -> Result<process::Run, ProviderError> {
    process::run(
        Command::new("fsfreeze").arg(action).arg(mount),
        limit,
        Waiting::new(),
    )
    .map_err(|cause| ProviderError::Io {
        provider,
        what: format!(
            "running `fsfreeze {action} {}` (install util-linux)",
            mount.display()
        ),
        cause,
    })
}

/// Refuses a freeze that would hang the system or the daemon: `/`, a directory that is not a
/// mount point, or a file system that one of `own_paths` (what the daemon writes) lies on.
pub(crate) fn refuse_unsafe_freeze(
    provider: &'static str,
    mount: &Path,
    own_paths: &[&Path],
) -> Result<(), ProviderError> {
    let refuse = |reason: String| Err(ProviderError::Refused { provider, reason });
    let io = |what: String| {
        move |cause| ProviderError::Io {
            provider,
            what,
            cause,
        }
    };
    let canonical = mount.canonicalize().map_err(io(format!(
        "finding fsfreeze mount point {}",
        mount.display()
    )))?;
    if canonical == Path::new("/") {
        return refuse(format!(
            "fsfreeze = {:?} would freeze the root file system, which this daemon, its logs and \
             every shell need; set fsfreeze to the mount point of the snapshotted volume, or \
             remove it",
            mount.display().to_string()
        ));
    }
    let mounts = mounts::read_mounts().map_err(io("reading /proc/self/mountinfo".into()))?;
    if !mounts::is_mount_point(&mounts, &canonical) {
        return refuse(format!(
            "fsfreeze = {:?} is not a mount point (fsfreeze freezes a whole file system, through \
             its mount point); set it to the mount point of the snapshotted volume ({})",
            mount.display().to_string(),
            mounts::containing(&mounts, &canonical).map_or_else(
                || "see findmnt".into(),
                |m| format!("this path is on {}", m.mount_point.display())
            )
        ));
    }
    for own in own_paths {
        let existing = mounts::nearest_existing(own)
            .map_err(io(format!("finding the file system of {}", own.display())))?;
        let shared = mounts::same_file_system(&mounts, &existing, &canonical).map_err(io(
            format!("comparing {} with {}", own.display(), mount.display()),
        ))?;
        if shared {
            return refuse(format!(
                "{} is on the file system that fsfreeze = {:?} freezes, and this daemon writes \
                 there: it would wait on its own freeze until the watchdog thaws it; move {} to \
                 another file system, or snapshot without fsfreeze",
                own.display(),
                mount.display().to_string(),
                own.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A thaw that counts its calls and answers `answer`.
    fn counting_thaw(
        count: &AtomicUsize,
        answer: Result<(), String>,
    ) -> impl Fn() -> Result<(), String> + Sync + '_ {
        move || {
            count.fetch_add(1, Ordering::SeqCst);
            answer.clone()
        }
    }

    #[test]
    fn work_within_the_limit_is_thawed_after_it_and_the_watchdog_stays_quiet() {
        let thaws = AtomicUsize::new(0);
        let interrupted = AtomicUsize::new(0);
        let (result, release) = hold(
            Duration::from_secs(60),
            &counting_thaw(&thaws, Ok(())),
            || {
                interrupted.fetch_add(1, Ordering::SeqCst);
            },
            || {
                assert_eq!(thaws.load(Ordering::SeqCst), 0, "frozen while working");
                "snapshot"
            },
        );
        assert_eq!(result, "snapshot");
        assert_eq!(release, Release::AfterWork(Ok(())));
        assert_eq!(thaws.load(Ordering::SeqCst), 1);
        assert_eq!(interrupted.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn work_past_the_limit_is_thawed_by_the_watchdog_which_interrupts_it() {
        let thaws = AtomicUsize::new(0);
        let (interrupt, interrupted) = mpsc::channel();
        let limit = Duration::from_millis(100);
        let started = Instant::now();
        let (result, release) = hold(
            limit,
            &counting_thaw(&thaws, Ok(())),
            move || interrupt.send(()).unwrap(),
            || {
                // A hung program: it ends only when the watchdog interrupts it.
                interrupted.recv().unwrap();
                "interrupted"
            },
        );
        assert!(started.elapsed() >= limit);
        assert_eq!(result, "interrupted");
        assert_eq!(release, Release::ByWatchdog(Ok(())));
        assert_eq!(
            thaws.load(Ordering::SeqCst),
            1,
            "thawed once, not again after the work"
        );
    }

    #[test]
    fn a_failed_thaw_by_the_watchdog_is_reported() {
        let thaws = AtomicUsize::new(0);
        let (interrupt, interrupted) = mpsc::channel();
        let (_, release) = hold(
            Duration::from_millis(10),
            &counting_thaw(&thaws, Err("fsfreeze: Invalid argument".into())),
            move || interrupt.send(()).unwrap(),
            || interrupted.recv().unwrap(),
        );
        assert_eq!(
            release,
            Release::ByWatchdog(Err("fsfreeze: Invalid argument".into()))
        );
    }

    #[test]
    fn a_panic_in_the_work_still_thaws_at_once() {
        let thaws = AtomicUsize::new(0);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hold(
                Duration::from_secs(60),
                &counting_thaw(&thaws, Ok(())),
                || {},
                || panic!("the program runner panicked"),
            )
        }));
        assert!(outcome.is_err());
        assert_eq!(
            thaws.load(Ordering::SeqCst),
            1,
            "a panic in the work still thaws"
        );
    }

    #[test]
    fn exactly_one_thaw_when_the_work_ends_at_the_limit() {
        // Races between the end of the work and the watchdog, at every timing near the limit.
        for micros in 0..200u64 {
            let thaws = AtomicUsize::new(0);
            let (_, release) = hold(
                Duration::from_micros(micros),
                &counting_thaw(&thaws, Ok(())),
                || {},
                || std::hint::black_box(micros),
            );
            assert_eq!(
                thaws.load(Ordering::SeqCst),
                1,
                "at {micros} µs: {release:?}"
            );
        }
    }
}
