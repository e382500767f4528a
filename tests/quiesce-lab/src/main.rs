//! `quiesce-lab`: the soak command, and the lab's load applications.
//!
//! ```text
//! quiesce-lab soak [--cycles 200] [--seed S] [--volume btrfs|cephfs]
//!                                                the cluster under faults; prints the summary
//! quiesce-lab pg-load --socket DIR --port P --log FILE [--interval-ms 5]
//! quiesce-lab sqlite-load --db FILE --mode wal|delete --log FILE [--interval-ms 5]
//! ```
//!
//! `soak` exits 0 when the summary is clean (every cycle ran, nothing lost, nobody frozen past
//! the limit, no snapshot left behind, no violation), 1 otherwise. SIGINT or SIGTERM end it
//! after the cycle under way: it prints the summary and takes the lab down (namespaces, mounts,
//! daemons).

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiesce_lab::{soak, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by SIGINT / SIGTERM: the soak stops after the cycle under way.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn ask_to_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`] instead of ending the process, so that the lab is taken down.
fn stop_on_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, ask_to_stop as *const () as libc::sighandler_t);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "quiesce-lab",
    about = "A three-node quiesce cluster under load on this machine: faults mid-set, every backup restored and verified"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N cycles (a set with a fault injected mid-set, then a restic backup restored and
    /// verified) and print the summary. Needs root.
    Soak {
        #[arg(long, default_value_t = 200)]
        cycles: usize,
        /// The seed of the random choice of nodes and phases (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The volume: `btrfs` (one file system on a loop device, shared by every node) or
        /// `cephfs` (a Ceph cluster of the lab's own, a ceph-fuse mount per node).
        #[arg(long, default_value = "btrfs")]
        volume: quiesce_lab::VolumeKind,
        /// Each host's node flush on CephFS: `syncfs`, or `none` to show what goes missing
        /// without it (the negative control: the mmap application's records).
        #[arg(long, default_value = "syncfs", value_parser = ["syncfs", "none"])]
        node_flush: String,
    },
    /// Commit numbered records into PostgreSQL, logging each acknowledgement (the lab's
    /// application on node1).
    PgLoad {
        #[arg(long, value_name = "DIR")]
        socket: PathBuf,
        #[arg(long)]
        port: u16,
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
    },
    /// Commit numbered records into an SQLite database, logging each acknowledgement (the
    /// lab's applications on node2).
    SqliteLoad {
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        #[arg(long, default_value = "wal")]
        mode: String,
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("quiesce-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Soak {
            cycles,
            seed,
            volume,
            node_flush,
        } => {
            let seed = seed.unwrap_or_else(|| quiesce_lab::acks::unix_ns() % 1_000_000);
            let exe = std::env::current_exe().context("cannot find this executable")?;
            stop_on_signals();
            let mut settings = Settings::new(exe);
            settings.volume = volume;
            settings.node_flush = node_flush;
            let summary = soak(
                settings,
                cycles,
                seed,
                |line| eprintln!("{line}"),
                || STOP.load(Ordering::SeqCst),
            );
            println!("{summary}");
            Ok(if summary.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::PgLoad {
            socket,
            port,
            log,
            interval_ms,
        } => {
            quiesce_lab::load::postgres(&socket, port, &log, Duration::from_millis(interval_ms))
                .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SqliteLoad {
            db,
            mode,
            log,
            interval_ms,
        } => {
            quiesce_lab::load::sqlite(&db, &mode, &log, Duration::from_millis(interval_ms))
                .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
