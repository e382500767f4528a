//! Commits numbered rows, one transaction each, and logs every acknowledgement.
//!
//! `committer <socket> <ack-log> [<commits per second>]` connects as root over the Unix socket
//! and inserts 1, 2, 3, ...
//! into `app.records(n)` (InnoDB), each in its own transaction (autocommit), and after each
//! COMMIT has returned appends `<n> <unix time in microseconds>\n` to the ack log (one write each,
//! unbuffered), at most the given number of commits per second (default: as fast as the
//! server commits). It runs until killed, or until a statement fails. The restore tests of this crate
//! use it as the application whose acknowledged rows must all be in every snapshot; the times
//! show how long commits were held during a freeze.

use mysql::prelude::Queryable;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (socket, ack_log, rate) = match args.as_slice() {
        [_, socket, ack_log] => (socket, ack_log, None),
        [_, socket, ack_log, rate] => (socket, ack_log, Some(rate.parse::<u32>()?)),
        _ => anyhow::bail!("usage: committer <socket> <ack-log> [<commits per second>]"),
    };
    let opts = mysql::OptsBuilder::new()
        .socket(Some(socket.as_str()))
        .prefer_socket(false)
        .user(Some("root"))
        .db_name(Some("app"));
    let mut conn = mysql::Conn::new(opts)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ack_log)?;
    let insert = conn.prep("INSERT INTO records (n) VALUES (?)")?;
    let start = Instant::now();
    for n in 1i64.. {
        if let Some(rate) = rate {
            // Pacing, so that a server that commits without syncing does not fill the disk.
            let due = start + Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        // Autocommit: the statement is its own transaction; it returns once committed.
        conn.exec_drop(&insert, (n,))?;
        let micros = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
        log.write_all(format!("{n} {micros}\n").as_bytes())?;
    }
    Ok(())
}
