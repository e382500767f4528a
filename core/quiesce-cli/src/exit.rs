//! The exit statuses of `quiesce`, in one place: `--help` prints [`help`], the README's table is
//! [`markdown_table`] (a test keeps the two the same), and every failure the CLI can meet maps to
//! one of them ([`of_error`]), so that a script can branch on the status alone.
//!
//! The statuses follow `sysexits.h` where one fits (64–78); the outcomes of a set that ran have
//! small numbers of their own.

use quiesce_dbus::{CallError, Error as HostError};
use quiesce_proto::{Outcome, SetRecord};
use std::process::ExitCode;

/// Why `quiesce` exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The set is app-consistent; any other command did what it was asked.
    Ok,
    /// A refusal none of the statuses below names (a snapshot that cannot be deleted: the set
    /// kept none, or its provider failed); the message says why.
    Refused,
    /// The set ran and failed (a writer or a phase): nothing was kept.
    SetFailed,
    /// `--best-effort`: the set kept a crash-consistent snapshot, some writers left out.
    CrashConsistent,
    /// EX_USAGE: a bad command line or a malformed request.
    Usage,
    /// EX_NOINPUT: no such volume or set.
    Unknown,
    /// EX_UNAVAILABLE: the host or the broker could not be reached (retry later).
    Unavailable,
    /// EX_SOFTWARE: the host or broker answered something this release does not understand,
    /// or failed internally.
    Software,
    /// EX_TEMPFAIL: another set is running (retry later).
    Busy,
    /// EX_NOPERM: the caller is not authorised (root or the quiesce group create and delete).
    NotAuthorized,
    /// EX_CONFIG: the host cannot serve the request as configured (started without --broker).
    Config,
}

impl Exit {
    pub const ALL: [Exit; 11] = [
        Exit::Ok,
        Exit::Refused,
        Exit::SetFailed,
        Exit::CrashConsistent,
        Exit::Usage,
        Exit::Unknown,
        Exit::Unavailable,
        Exit::Software,
        Exit::Busy,
        Exit::NotAuthorized,
        Exit::Config,
    ];

    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Refused => 1,
            Exit::SetFailed => 2,
            Exit::CrashConsistent => 3,
            Exit::Usage => 64,
            Exit::Unknown => 66,
            Exit::Unavailable => 69,
            Exit::Software => 70,
            Exit::Busy => 75,
            Exit::NotAuthorized => 77,
            Exit::Config => 78,
        }
    }

    /// The name a `--json` error document gives it.
    pub fn kind(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Refused => "refused",
            Exit::SetFailed => "set-failed",
            Exit::CrashConsistent => "crash-consistent",
            Exit::Usage => "usage",
            Exit::Unknown => "unknown",
            Exit::Unavailable => "unavailable",
            Exit::Software => "software",
            Exit::Busy => "busy",
            Exit::NotAuthorized => "not-authorized",
            Exit::Config => "config",
        }
    }

    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "app-consistent (`create`, `exec` when the command succeeded); any other command: done",
            Exit::Refused => "refused for a reason none below names (a snapshot that cannot be deleted); the message says why",
            Exit::SetFailed => "the set ran and failed (a writer or a phase): no snapshot was kept; the record is printed all the same",
            Exit::CrashConsistent => "`--best-effort`: a crash-consistent snapshot was kept, some writers left out (the record names them)",
            Exit::Usage => "EX_USAGE: a bad command line or a malformed request",
            Exit::Unknown => "EX_NOINPUT: no such volume or set",
            Exit::Unavailable => "EX_UNAVAILABLE: the host or the broker could not be reached: retry later",
            Exit::Software => "EX_SOFTWARE: the host or the broker failed, or speaks another release",
            Exit::Busy => "EX_TEMPFAIL: another set is running: retry later",
            Exit::NotAuthorized => "EX_NOPERM: not authorised (creating and deleting need root or the quiesce group)",
            Exit::Config => "EX_CONFIG: the host cannot do it as configured (started without --broker)",
        }
    }

    /// The status of a set that ran, by its outcome.
    pub fn of_outcome(record: &SetRecord) -> Exit {
        match record.outcome {
            Outcome::AppConsistent => Exit::Ok,
            Outcome::CrashConsistent { .. } => Exit::CrashConsistent,
            Outcome::Failed { .. } => Exit::SetFailed,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// The status a failure of the CLI exits with: the host's documented errors each by what a
/// script does about them; anything the CLI itself refused (the command line, its own checks)
/// is [`Exit::Usage`] unless it says otherwise with [`Failure`].
pub fn of_error(error: &anyhow::Error) -> Exit {
    if let Some(failure) = error.downcast_ref::<Failure>() {
        return failure.exit;
    }
    if let Some(call) = error.downcast_ref::<CallError>() {
        return of_call(call);
    }
    if error.downcast_ref::<quiesce_link::ConnectError>().is_some() {
        return Exit::Unavailable;
    }
    Exit::Refused
}

fn of_call(error: &CallError) -> Exit {
    match error {
        CallError::Host(e) => match e {
            HostError::NotAuthorized(_) => Exit::NotAuthorized,
            HostError::UnknownSet(_)
            | HostError::UnknownVolume(_)
            | HostError::UnknownWriter(_) => Exit::Unknown,
            HostError::Busy(_) | HostError::WriterStuck(_) => Exit::Busy,
            HostError::InvalidRequest(_)
            | HostError::InvalidMetadata(_)
            | HostError::DuplicateWriter(_) => Exit::Usage,
            HostError::NoBroker(_) => Exit::Config,
            HostError::BrokerUnreachable(_) => Exit::Unavailable,
            HostError::BrokerFailed(_) => Exit::Software,
            HostError::SetRefused(_) | HostError::CallFailed(_) | HostError::ZBus(_) => {
                Exit::Refused
            }
        },
        CallError::NoBus { .. } | CallError::NoHost { .. } | CallError::Bus { .. } => {
            Exit::Unavailable
        }
        CallError::Denied { .. } => Exit::NotAuthorized,
        CallError::OldHost { .. } => Exit::Software,
    }
}

/// A failure the CLI found itself, with the status it exits with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    /// The failure as the `anyhow::Error` every command returns.
    pub fn error(exit: Exit, message: impl Into<String>) -> anyhow::Error {
        Failure {
            exit,
            message: message.into(),
        }
        .into()
    }
}

/// What `--help` says about the exit status.
pub fn help() -> String {
    let mut text = String::from("Exit status (sysexits.h where one fits):\n");
    for exit in Exit::ALL {
        text.push_str(&format!(
            "  {:>2}  {}\n",
            exit.code(),
            exit.meaning().replace('`', "")
        ));
    }
    text.push_str("With --json, a request that failed prints {\"error\": {\"exit_status\", \"kind\", \"message\"}} on stdout.");
    text
}

/// The README's table of exit statuses.
#[cfg(test)]
pub fn markdown_table() -> String {
    let mut text = String::from("| status | meaning |\n|---|---|\n");
    for exit in Exit::ALL {
        text.push_str(&format!("| {} | {} |\n", exit.code(), exit.meaning()));
    }
    text
}

/// The JSON document a failed request prints on stdout with `--json`.
pub fn error_document(exit: Exit, message: &str) -> serde_json::Value {
    serde_json::json!({
        "error": {"exit_status": exit.code(), "kind": exit.kind(), "message": message}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_shows_the_exit_statuses_as_the_cli_defines_them() {
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(&markdown_table()),
            "README.md's exit status table differs from quiesce-cli's; paste this:\n{}",
            markdown_table()
        );
    }

    #[test]
    fn every_status_is_distinct() {
        let mut codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Exit::ALL.len());
    }
}
