//! The command provider: a user's program takes the snapshot (a SAN, a cloud snapshot, anything).
//!
//! # The interface a program implements
//!
//! It is invoked as `PROGRAM [ARGS...] OPERATION`, where `OPERATION` is `take`, `finalize`,
//! `delete` or `find`, with stdin `/dev/null`, working directory `/`, in a process group of its
//! own, and these variables added to the daemon's environment:
//!
//! | variable | set for | value |
//! |---|---|---|
//! | `QUIESCE_OPERATION` | all | the operation, as in the last argument |
//! | `QUIESCE_SET_ID` | `take`, `find` | the snapshot set's id (letters, digits, `-`, `_`, `.`) |
//! | `QUIESCE_SNAPSHOT_ID` | `finalize`, `delete` | the `id` that `take` (or `find`) printed |
//! | `QUIESCE_SNAPSHOT_PATH` | `finalize`, `delete` | the `path` that `take` (or `find`) printed |
//!
//! (`finalize` and `delete` name a snapshot, not a set: put into `id` whatever you need to find
//! it again, the set id included.)
//!
//! - `take` takes a **writable** snapshot and prints on stdout one JSON object,
//!   `{"id": "...", "path": "..."}`: `id` is the program's own handle (non-empty), `path` where
//!   the snapshot can be read and written — or `""` if it cannot be mounted on this node (writers
//!   that need post-snapshot work then fail, and the set with them).
//! - `finalize` makes it read-only, once the writers' post-snapshot work is done.
//! - `delete` deletes it (after an abort, or when the user releases it). Deleting a snapshot
//!   that is already gone should succeed.
//! - `find` prints the same object for the snapshot a set with `QUIESCE_SET_ID` left behind —
//!   also a partial one — or nothing when there is none, and exits 0 either way. A daemon calls it
//!   after a restart to clean up after a set it was running when it died.
//!
//! Exit status 0 is success; anything else is a failure, reported with the last 4 KiB of the
//! program's stderr (trimmed). Print diagnostics on stderr, never on stdout. Each invocation runs
//! for at most `timeout_ms` (default 60000); past it, its whole process group is killed. When the
//! program exits, whatever it left running in its process group is killed too.
//!
//! # fsfreeze
//!
//! With `fsfreeze = "/mount/point"`, `take` runs as: `fsfreeze --freeze`, the program's `take`,
//! `fsfreeze --unfreeze` — the thaw always happens, also when `take` fails or times out. A
//! watchdog thread thaws the file system when `hold_limit_ms` (default 10000) passes while it is
//! still frozen, kills the program, and `take` fails saying that the watchdog thawed it; a
//! snapshot the program took anyway is deleted. The program must not write to the frozen file
//! system (it would wait until the watchdog thaws it). [`crate::ProviderConfig::check`] refuses
//! `/`, a path that is not a mount point, and a file system the daemon itself writes to.

use crate::freeze::{self, Release};
use crate::process::{self, Waiting};
use crate::{
    check_set_id, is_executable_file, require_tool, Provider, ProviderError, SnapshotInfo,
};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NAME: &str = "command";

/// Snapshots through a user's program; see [the module documentation](crate::command) for the
/// interface a program implements.
#[derive(Debug, Clone)]
pub struct CommandProvider {
    program: PathBuf,
    args: Vec<String>,
    timeout: Duration,
    fsfreeze: Option<Fsfreeze>,
}

#[derive(Debug, Clone)]
struct Fsfreeze {
    mount: PathBuf,
    hold_limit: Duration,
}

/// The operations, as passed to the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Take,
    Finalize,
    Delete,
    Find,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Take => "take",
            Operation::Finalize => "finalize",
            Operation::Delete => "delete",
            Operation::Find => "find",
        }
    }
}

/// What `take` and `find` print.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Printed {
    id: String,
    path: String,
}

impl CommandProvider {
    /// `program` invoked with `args`, then the operation; the default timeout, no fsfreeze.
    pub fn new(program: PathBuf, args: Vec<String>) -> Self {
        CommandProvider {
            program,
            args,
            timeout: crate::DEFAULT_COMMAND_TIMEOUT,
            fsfreeze: None,
        }
    }

    /// The limit of each invocation; past it the program's process group is killed.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Freezes `mount` around `take`, for at most `hold_limit`.
    pub fn with_fsfreeze(mut self, mount: PathBuf, hold_limit: Duration) -> Self {
        self.fsfreeze = Some(Fsfreeze { mount, hold_limit });
        self
    }

    fn command_line(&self, operation: Operation) -> String {
        let mut args = self.args.clone();
        args.push(operation.as_str().into());
        crate::command_line(&self.program.to_string_lossy(), &args)
    }

    /// Runs the program for `operation`; its stdout when it succeeds.
    fn invoke(
        &self,
        operation: Operation,
        env: &[(&str, &str)],
        waiting: Waiting,
    ) -> Result<String, ProviderError> {
        let mut command = Command::new(&self.program);
        // Only the variables of this operation: none inherited from the daemon's environment.
        for name in [
            "QUIESCE_SET_ID",
            "QUIESCE_SNAPSHOT_ID",
            "QUIESCE_SNAPSHOT_PATH",
        ] {
            command.env_remove(name);
        }
        command
            .args(&self.args)
            .arg(operation.as_str())
            .env("QUIESCE_OPERATION", operation.as_str())
            .envs(env.iter().copied());
        let run = process::run(&mut command, self.timeout, waiting).map_err(|cause| {
            ProviderError::Io {
                provider: NAME,
                what: format!(
                    "starting `{}` (check `program` in the volume's configuration)",
                    self.command_line(operation)
                ),
                cause,
            }
        })?;
        if run.ending.succeeded() {
            Ok(run.stdout)
        } else {
            Err(ProviderError::Command {
                provider: NAME,
                command: self.command_line(operation),
                status: run.ending.describe("timeout_ms"),
                stderr: if run.stderr.is_empty() {
                    "(nothing on stderr)".into()
                } else {
                    run.stderr
                },
            })
        }
    }

    /// Parses what `take` or `find` printed: one JSON object, or (for `find`) nothing.
    fn parse_printed(
        &self,
        operation: Operation,
        stdout: &str,
    ) -> Result<Option<SnapshotInfo>, ProviderError> {
        let text = stdout.trim();
        if text.is_empty() {
            return if operation == Operation::Find {
                Ok(None)
            } else {
                Err(self.bad_output(operation, stdout, "it printed nothing"))
            };
        }
        let printed: Printed = serde_json::from_str(text)
            .map_err(|e| self.bad_output(operation, stdout, &e.to_string()))?;
        if printed.id.is_empty() {
            return Err(self.bad_output(operation, stdout, "`id` is empty"));
        }
        Ok(Some(SnapshotInfo {
            id: printed.id,
            path: printed.path,
            provider: NAME.into(),
        }))
    }

    fn bad_output(&self, operation: Operation, stdout: &str, problem: &str) -> ProviderError {
        let mut shown: String = stdout.trim().chars().take(300).collect();
        if shown.len() < stdout.trim().len() {
            shown.push('…');
        }
        ProviderError::Refused {
            provider: NAME,
            reason: format!(
                "`{}` succeeded but its output {shown:?} is not one JSON object \
                 {{\"id\": \"...\", \"path\": \"...\"}} ({problem}); print exactly that on stdout, \
                 and diagnostics on stderr",
                self.command_line(operation)
            ),
        }
    }

    fn take_with(&self, set_id: &str, waiting: Waiting) -> Result<SnapshotInfo, ProviderError> {
        let stdout = self.invoke(Operation::Take, &[("QUIESCE_SET_ID", set_id)], waiting)?;
        self.parse_printed(Operation::Take, &stdout)?
            .ok_or_else(|| self.bad_output(Operation::Take, &stdout, "it printed nothing"))
    }

    /// Takes the snapshot between `fsfreeze --freeze` and `--unfreeze`, under the watchdog.
    fn take_frozen(&self, set_id: &str, frozen: &Fsfreeze) -> Result<SnapshotInfo, ProviderError> {
        freeze::freeze(NAME, &frozen.mount, self.timeout)?;
        let thaw = || freeze::thaw(NAME, &frozen.mount, self.timeout).map_err(|e| e.to_string());
        let waiting = Waiting::new();
        let interrupter = waiting.interrupter();
        let hold_limit_ms = frozen.hold_limit.as_millis() as u64;
        let (taken, release) = freeze::hold(
            frozen.hold_limit,
            &thaw,
            move || {
                interrupter.interrupt(format!(
                    "the watchdog thawed the file system after the hold limit of {hold_limit_ms} ms"
                ))
            },
            || self.take_with(set_id, waiting),
        );
        match release {
            Release::AfterWork(Ok(())) => taken,
            Release::AfterWork(Err(thaw_error)) => {
                let deleted = self.delete_unwanted(&taken);
                Err(ProviderError::Refused {
                    provider: NAME,
                    reason: format!(
                        "thawing {mount} after the snapshot failed: {thaw_error}; it may still be \
                         frozen: run `fsfreeze --unfreeze {mount}` now{outcome}{deleted}",
                        mount = frozen.mount.display(),
                        outcome = taken
                            .as_ref()
                            .err()
                            .map(|e| format!("; the snapshot failed too: {e}"))
                            .unwrap_or_default(),
                    ),
                })
            }
            Release::ByWatchdog(thawed) => {
                let mut detail = String::new();
                if let Err(thaw_error) = thawed {
                    detail += &format!(
                        "; thawing failed: {thaw_error}: run `fsfreeze --unfreeze {}` now",
                        frozen.mount.display()
                    );
                }
                match &taken {
                    Err(ProviderError::Command { stderr, .. }) => {
                        detail += &format!("; the program's stderr: {stderr}")
                    }
                    Err(other) => detail += &format!("; {other}"),
                    Ok(_) => {}
                }
                detail += &self.delete_unwanted(&taken);
                Err(ProviderError::HoldLimit {
                    provider: NAME,
                    mount: frozen.mount.clone(),
                    hold_limit_ms,
                    detail,
                })
            }
        }
    }

    /// Deletes a snapshot that was taken but cannot be returned (the caller gets an error and
    /// will never know it); says how that went, for the error message.
    fn delete_unwanted(&self, taken: &Result<SnapshotInfo, ProviderError>) -> String {
        match taken {
            Err(_) => String::new(),
            Ok(snapshot) => match self.delete(snapshot) {
                Ok(()) => format!("; the snapshot {:?} was deleted", snapshot.id),
                Err(e) => format!(
                    "; the snapshot {:?} could not be deleted ({e}): delete it by hand",
                    snapshot.id
                ),
            },
        }
    }
}

impl Provider for CommandProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn take(&self, set_id: &str) -> Result<SnapshotInfo, ProviderError> {
        check_set_id(NAME, set_id)?;
        match &self.fsfreeze {
            None => self.take_with(set_id, Waiting::new()),
            Some(frozen) => self.take_frozen(set_id, frozen),
        }
    }

    fn finalize(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        self.invoke(
            Operation::Finalize,
            &[
                ("QUIESCE_SNAPSHOT_ID", &snapshot.id),
                ("QUIESCE_SNAPSHOT_PATH", &snapshot.path),
            ],
            Waiting::new(),
        )
        .map(drop)
    }

    fn delete(&self, snapshot: &SnapshotInfo) -> Result<(), ProviderError> {
        self.invoke(
            Operation::Delete,
            &[
                ("QUIESCE_SNAPSHOT_ID", &snapshot.id),
                ("QUIESCE_SNAPSHOT_PATH", &snapshot.path),
            ],
            Waiting::new(),
        )
        .map(drop)
    }

    fn find(&self, set_id: &str) -> Result<Option<SnapshotInfo>, ProviderError> {
        check_set_id(NAME, set_id)?;
        let stdout = self.invoke(
            Operation::Find,
            &[("QUIESCE_SET_ID", set_id)],
            Waiting::new(),
        )?;
        self.parse_printed(Operation::Find, &stdout)
    }
}

/// [`crate::ProviderConfig::check`] for a command provider.
pub(crate) fn check(
    program: &Path,
    fsfreeze: Option<&Path>,
    timeout_ms: Option<u64>,
    hold_limit_ms: Option<u64>,
    own_paths: &[&Path],
) -> Result<(), ProviderError> {
    let refuse = |reason: String| {
        Err(ProviderError::Refused {
            provider: NAME,
            reason,
        })
    };
    if !program.is_absolute() {
        return refuse(format!(
            "program = {:?} is not an absolute path: give the full path of the executable",
            program.display().to_string()
        ));
    }
    if !program.is_file() {
        return refuse(format!(
            "program = {:?} does not exist (or is not a file): install it, or fix `program`",
            program.display().to_string()
        ));
    }
    if !is_executable_file(program) {
        return refuse(format!(
            "program = {:?} is not executable: chmod +x it",
            program.display().to_string()
        ));
    }
    if timeout_ms == Some(0) {
        return refuse("timeout_ms = 0 would kill the program at once: remove it (default 60000) or give a positive limit".into());
    }
    match (fsfreeze, hold_limit_ms) {
        (None, Some(_)) => refuse(
            "hold_limit_ms limits an fsfreeze, and no fsfreeze is set: remove hold_limit_ms, or \
             set fsfreeze to the volume's mount point"
                .into(),
        ),
        (Some(_), Some(0)) => refuse(
            "hold_limit_ms = 0 would thaw before the snapshot: remove it (default 10000) or give \
             a positive limit"
                .into(),
        ),
        (Some(mount), _) => {
            require_tool(NAME, "fsfreeze", "util-linux")?;
            freeze::refuse_unsafe_freeze(NAME, mount, own_paths)
        }
        (None, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> CommandProvider {
        CommandProvider::new("/opt/snap".into(), vec!["--pool".into(), "p1".into()])
    }

    #[test]
    fn take_output_is_one_json_object_with_id_and_path() {
        let p = provider();
        let snap = p
            .parse_printed(Operation::Take, "{\"id\": \"lun-7@s1\", \"path\": \"\"}\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            snap,
            SnapshotInfo {
                id: "lun-7@s1".into(),
                path: "".into(),
                provider: "command".into()
            }
        );
        for (bad, says) in [
            ("", "it printed nothing"),
            ("snapshot created", "expected"),
            ("{\"id\": \"x\"}", "missing field `path`"),
            ("{\"id\": \"\", \"path\": \"/p\"}", "`id` is empty"),
            (
                "{\"id\": \"x\", \"path\": \"/p\", \"size\": 3}",
                "unknown field `size`",
            ),
        ] {
            let err = p
                .parse_printed(Operation::Take, bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
            assert!(
                err.contains("`/opt/snap --pool p1 take` succeeded"),
                "{err}"
            );
        }
    }

    #[test]
    fn find_may_print_nothing() {
        assert_eq!(
            provider().parse_printed(Operation::Find, " \n").unwrap(),
            None
        );
    }

    #[test]
    fn check_refuses_what_cannot_run() {
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("snap");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let err = check(&script, None, None, None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not executable: chmod +x"), "{err}");
        let err = check(Path::new("snap"), None, None, None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an absolute path"), "{err}");
        let err = check(&tmp.path().join("none"), None, None, None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        check(&script, None, Some(1000), None, &[]).unwrap();
        let err = check(&script, None, None, Some(500), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no fsfreeze is set"), "{err}");
        let err = check(&script, None, Some(0), None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout_ms = 0"), "{err}");
    }
}
