//! PostgreSQL for tests and benchmarks: the server binaries, running its tools as the
//! `postgres` user, and what that user must own.

use crate::{require, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// PostgreSQL's server binaries: `$PG_BIN`, or the newest `/usr/lib/postgresql/<v>/bin`.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    let (_, bin) = found.pop().expect(
        "PostgreSQL server binaries not found (/usr/lib/postgresql/<version>/bin/pg_ctl): \
         install postgresql and postgresql-contrib (scripts/setup does), or set PG_BIN",
    );
    for tool in ["initdb", "pg_ctl", "postgres", "pg_amcheck", "pgbench"] {
        assert!(
            bin.join(tool).is_file(),
            "{tool} is missing from {}: install postgresql and postgresql-contrib",
            bin.display()
        );
    }
    bin
}

/// A PostgreSQL tool run as the `postgres` user (initdb and postgres refuse root).
pub fn as_postgres(tool: &str) -> Command {
    require("runuser", "util-linux");
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(pg_bin().join(tool))
        .current_dir("/");
    command
}

/// Gives `path` (recursively) to the `postgres` user.
pub fn chown_postgres(path: &Path) {
    run(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path));
}

/// A TCP port free on loopback now (for a server's `port`, which also names its socket).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

/// `pg_ctl start` through `pg_ctl` (from [`as_postgres`], or the same inside a network
/// namespace): the server on `data`, listening on `port` with its socket in `socket_dir`, more
/// settings in `options` (`name=value`), its log in `log`. Waits until it accepts connections;
/// fails with the server's log when it does not.
pub fn start(
    mut pg_ctl: Command,
    data: &Path,
    log: &Path,
    port: u16,
    socket_dir: &Path,
    options: &[&str],
) {
    let mut opts = format!(
        "-c port={port} -c unix_socket_directories='{}'",
        socket_dir.display()
    );
    for o in options {
        opts.push_str(&format!(" -c {o}"));
    }
    let output = pg_ctl
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(log)
        .args(["-w", "-t", "120", "-o", &opts, "start"])
        .output()
        .unwrap_or_else(|e| panic!("running pg_ctl: {e}"));
    assert!(
        output.status.success(),
        "pg_ctl start on {} failed: {}{}\nserver log:\n{}",
        data.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
