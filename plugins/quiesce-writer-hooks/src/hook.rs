//! Finding the hooks of a directory, and running one under a timeout with its output captured.

use quiesce_sdk::process::{self, Keep};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One executable of the hook directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub name: String,
    pub path: PathBuf,
}

/// A file of the directory that is not run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub why: &'static str,
}

/// The hooks of `dir`, sorted by name (byte order), and the files left out.
///
/// Left out, as the QEMU guest agent's `fsfreeze-hook` leaves them out: hidden files, editor
/// backups (`~`) and package-manager leftovers (`.dpkg-old`, `.rpmnew`, ...); and anything
/// that is not an executable regular file (symbolic links are followed).
pub fn list(dir: &Path) -> std::io::Result<(Vec<Hook>, Vec<Skipped>)> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let (mut hooks, mut skipped) = (Vec::new(), Vec::new());
    for os_name in names {
        let name = os_name.to_string_lossy().into_owned();
        let path = dir.join(&os_name);
        let why = if name.starts_with('.') {
            Some("hidden")
        } else if is_leftover(&name) {
            Some("a backup or package-manager leftover")
        } else {
            match std::fs::metadata(&path) {
                Err(_) => Some("unreadable or a dangling link"),
                Ok(m) if !m.is_file() => Some("not a regular file"),
                Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                    Some("not executable (chmod +x to run it)")
                }
                Ok(_) => None,
            }
        };
        match why {
            Some(why) => skipped.push(Skipped { name, why }),
            None => hooks.push(Hook { name, path }),
        }
    }
    Ok((hooks, skipped))
}

fn is_leftover(name: &str) -> bool {
    name.ends_with('~')
        || [
            ".dpkg-dist",
            ".dpkg-old",
            ".dpkg-new",
            ".dpkg-tmp",
            ".dpkg-bak",
            ".rpmsave",
            ".rpmnew",
            ".rpmorig",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// Killed (with its process group) at `limit`; `exited` says whether it was gone soon after.
    TimedOut {
        limit: Duration,
        exited: bool,
    },
    /// It could not be started.
    NotStarted(String),
}

/// What one run of a hook did.
#[derive(Debug, Clone)]
pub struct Run {
    pub ending: Ending,
    pub elapsed: Duration,
    /// The end of its stdout and stderr (lossy UTF-8).
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn succeeded(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// `exit 0 after 12 ms`, `killed after its 300 ms timeout`, ...
    pub fn summary(&self) -> String {
        let ms = self.elapsed.as_millis();
        match &self.ending {
            Ending::Exited(code) => format!("exit {code} after {ms} ms"),
            Ending::Signaled(signal) => format!("killed by signal {signal} after {ms} ms"),
            Ending::TimedOut { limit, exited } => format!(
                "still running at its {} ms timeout: killed with its process group{}",
                limit.as_millis(),
                if *exited {
                    ""
                } else {
                    " (and not gone yet: stuck in the kernel?)"
                }
            ),
            Ending::NotStarted(why) => format!("could not be started: {why}"),
        }
    }
}

/// Runs `hook` with `action` as its only argument and `env` added to its environment, for at
/// most `limit`; keeps the last `keep` bytes of stdout and of stderr. Returns by `answer_by`
/// whatever happens (the graces after the hook ends are cut short to fit).
///
/// The hook runs in a process group of its own (stdin `/dev/null`, working directory `/`); at
/// `limit` the whole group gets SIGKILL, so that what the hook started dies with it. What a
/// hook that exited left running is left alone (a thaw hook may restart a service).
pub fn run(
    hook: &Hook,
    action: &str,
    env: &[(&str, String)],
    limit: Duration,
    keep: usize,
    answer_by: Instant,
) -> Run {
    let started = Instant::now();
    let mut command = Command::new(&hook.path);
    command.arg(action).envs(env.iter().map(|(k, v)| (k, v)));
    let options = process::Options {
        stdout: Keep::Last(keep),
        stderr: Keep::Last(keep),
        answer_by: Some(answer_by),
        ..process::Options::new(limit)
    };
    match process::run(&mut command, &options, process::Waiting::new()) {
        Ok(run) => Run {
            ending: ending(run.ending),
            elapsed: run.elapsed,
            stdout: run.stdout,
            stderr: run.stderr,
        },
        Err(e) => Run {
            ending: Ending::NotStarted(e.to_string()),
            elapsed: started.elapsed(),
            stdout: String::new(),
            stderr: String::new(),
        },
    }
}

fn ending(ending: process::Ending) -> Ending {
    match ending {
        process::Ending::Exited(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(signal)) => Ending::Signaled(signal),
            (None, None) => Ending::NotStarted(format!("unexpected status {s}")),
        },
        process::Ending::TimedOut { limit, gone } => Ending::TimedOut {
            limit,
            exited: gone,
        },
        // No one interrupts a hook: its limit is its only end.
        process::Ending::Interrupted(why) => Ending::NotStarted(format!("interrupted: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers() {
        assert!(is_leftover("10-db~"));
        assert!(is_leftover("10-db.dpkg-old"));
        assert!(is_leftover("10-db.rpmnew"));
        assert!(!is_leftover("10-db"));
    }
}
