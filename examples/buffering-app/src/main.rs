//! `buffering-app`: the reference file-buffering application for the `filebuf` writer.
//!
//! ```text
//! buffering-app --data DIR --socket PATH [--ack-log FILE]
//! buffering-app --data DIR --signal-mode --pid-file P --ack-file A [--ack-log FILE]
//! ```
//!
//! It makes numbered records (`<n> <unix_ns> buffered-record`), about one per millisecond, and
//! keeps them in memory; only every `--flush-records` records or `--flush-ms` milliseconds does it
//! write the batch to `DIR/records.log` and fsync it. So at any moment the last few dozen records
//! exist only in memory: a crash-consistent snapshot of DIR would miss them.
//!
//! A record is **acknowledged** once it is durable: after the batch holding it is written and
//! fsynced, its number is appended (one per line) to the ack log, `--ack-log` (with
//! `--ack-times`, `<n> <unix_ns>`: when it was acknowledged). A client of a real application
//! would get its "OK" at that moment.
//!
//! It speaks the flush protocol of the `filebuf` writer (see that plugin's README): on the
//! control socket `--socket` (`FREEZE <set-id>` → `FROZEN <last-record>`, `THAW <set-id>` →
//! `THAWED`), and, with `--signal-mode`, by signals (`SIGUSR1` freezes, `SIGUSR2` thaws, answers
//! in `--ack-file`, pid in `--pid-file`). While frozen, no record is made or written; the hold
//! ends on thaw, when the control connection that asked for it closes, or after `--hold-limit-ms`.
//!
//! Once it listens (and has written its pid file), it prints `ready <pid>` on stdout. SIGTERM or
//! SIGINT make it flush, acknowledge and exit.

mod control;
mod records;

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use records::{log, Pace, Records};
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "buffering-app",
    about = "A file-buffering application: buffers numbered records in memory, flushes them in batches, and holds still on request of the quiesce filebuf writer"
)]
struct Cli {
    /// The directory to write `records.log` into (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Serve the control socket here (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also take freeze/thaw requests by signal (SIGUSR1 / SIGUSR2).
    #[arg(long, requires_all = ["pid_file", "ack_file"])]
    signal_mode: bool,
    /// Write our pid here (with --signal-mode).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// The file signal requests are read from and answered in (with --signal-mode).
    #[arg(long, value_name = "FILE")]
    ack_file: Option<PathBuf>,
    /// Append the number of each acknowledged (durable) record to FILE, one per line.
    #[arg(long, value_name = "FILE")]
    ack_log: Option<PathBuf>,
    /// Write each ack log line as `<n> <unix_ns>`: the record and when it was acknowledged.
    #[arg(long, requires = "ack_log")]
    ack_times: bool,
    /// Make one record every this many microseconds.
    #[arg(long, value_name = "US", default_value_t = 1000)]
    interval_us: u64,
    /// Flush when this many records are buffered...
    #[arg(long, value_name = "N", default_value_t = 64)]
    flush_records: u64,
    /// ...or when the oldest buffered record is this old.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    flush_ms: u64,
    /// Resume writes on our own after being held this long without a thaw.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    hold_limit_ms: u64,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    std::fs::write(&temp, text)?;
    std::fs::rename(&temp, path)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.socket.is_none() && !cli.signal_mode {
        bail!("give --socket PATH, or --signal-mode with --pid-file and --ack-file (or both)");
    }
    if cli.interval_us == 0 || cli.flush_records == 0 || cli.hold_limit_ms == 0 {
        bail!("--interval-us, --flush-records and --hold-limit-ms must be more than 0");
    }
    // Signals are taken by this thread alone, with sigwait: block them before any thread starts
    // (threads inherit the mask). When a freeze and a thaw signal are pending together, sigwait
    // returns SIGUSR1 first: a freeze that was given up is thawed, never the other way round.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        signals.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .context("cannot block signals")?;

    std::fs::create_dir_all(&cli.data)
        .with_context(|| format!("cannot create the data directory {}", cli.data.display()))?;
    let pace = Pace {
        interval: Duration::from_micros(cli.interval_us),
        flush_records: cli.flush_records,
        flush_after: Duration::from_millis(cli.flush_ms),
        hold_limit: Duration::from_millis(cli.hold_limit_ms),
    };
    let records = Arc::new(
        Records::create(&cli.data, cli.ack_log.as_deref(), pace)?.with_ack_times(cli.ack_times),
    );

    if let Some(path) = &cli.socket {
        match std::fs::remove_file(path) {
            Ok(()) => log(&format!("replaced the stale socket {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let records = records.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control::serve(listener, records))?;
    }
    let ack_file = match (cli.signal_mode, &cli.ack_file) {
        (true, Some(path)) => Some(control::AckFile::new(path)),
        _ => None,
    };
    if let Some(path) = &cli.pid_file {
        write_atomically(path, &format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the pid file {}", path.display()))?;
    }

    std::thread::Builder::new().name("records".into()).spawn({
        let records = records.clone();
        move || {
            if let Err(e) = records.run() {
                log(&format!("{e:#}"));
                std::process::exit(1);
            }
        }
    })?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready {}", std::process::id())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    drop(stdout);

    loop {
        let signal = signals.wait().context("waiting for signals")?;
        match (signal, &ack_file) {
            (Signal::SIGUSR1, Some(ack)) => ack.freeze(&records),
            (Signal::SIGUSR2, Some(ack)) => ack.thaw(&records),
            (Signal::SIGUSR1 | Signal::SIGUSR2, None) => {
                log(&format!("{signal} ignored: not in --signal-mode"));
            }
            _ => {
                log(&format!("{signal}: flushing and exiting"));
                break;
            }
        }
    }
    records.shutdown();
    let last = records.flush()?;
    log(&format!("exiting; records 1..={last} are durable"));
    for path in [&cli.socket, &cli.pid_file].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
