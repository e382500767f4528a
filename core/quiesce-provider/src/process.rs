//! How the providers run their programs (a command provider's, `fsfreeze`): through
//! `quiesce-process`, killed with their process group at their limit or when interrupted (the
//! fsfreeze watchdog), and with everything they left running once they exit — an invocation
//! does not outlive itself.

pub(crate) use quiesce_process::{Ending, Run, Waiting};
use quiesce_process::{Keep, Options};
use std::process::Command;
use std::time::Duration;

/// How much of a program's stderr is kept for messages: the end, where the reason usually is.
pub(crate) const STDERR_KEPT: usize = 4096;
/// How much of a program's stdout is kept (it carries one small JSON object).
const STDOUT_KEPT: usize = 64 * 1024;

/// Runs `command` for at most `limit`; its stderr trimmed.
pub(crate) fn run(
    command: &mut Command,
    limit: Duration,
    waiting: Waiting,
) -> std::io::Result<Run> {
    let options = Options {
        stdout: Keep::First(STDOUT_KEPT),
        stderr: Keep::Last(STDERR_KEPT),
        kill_leftovers: true,
        // A daemon killed outright (`kill -9`, outside systemd) must not leave a provider
        // program running on: it would take a snapshot nobody records. What the program itself
        // started is covered by the restarted daemon waiting out the provider's deadline
        // before it cleans up.
        die_with_parent: true,
        ..Options::new(limit)
    };
    let mut run = quiesce_process::run(command, &options, waiting)?;
    run.stderr = run.stderr.trim().to_string();
    Ok(run)
}

/// The last `keep` bytes of `bytes` as text, trimmed, saying how much was dropped before them.
pub(crate) fn last_bytes(bytes: &[u8], keep: usize) -> String {
    quiesce_process::kept(bytes, Keep::Last(keep))
        .trim()
        .to_string()
}
