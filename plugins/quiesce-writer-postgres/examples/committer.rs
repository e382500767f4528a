//! Commits numbered records, one transaction each, and logs every acknowledgement.
//!
//! `committer <socket-dir-or-host> <port> <ack-log>` inserts 1, 2, 3, ... into `records(n)`, each
//! in its own transaction, and after each COMMIT has returned appends `<n>\n` to the ack log
//! (one write each, unbuffered). It runs until killed, or until a statement fails. The restore
//! tests of this crate use it as the "application" whose acknowledged records must all be in
//! every snapshot.

use std::io::Write;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port, ack_log] = args.as_slice() else {
        anyhow::bail!("usage: committer <socket-dir-or-host> <port> <ack-log>");
    };
    let mut client = postgres::Config::new()
        .host(host)
        .port(port.parse()?)
        .user("postgres")
        .dbname("postgres")
        .application_name("committer")
        .connect(postgres::NoTls)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ack_log)?;
    let insert = client.prepare("INSERT INTO records (n) VALUES ($1)")?;
    for n in 1i64.. {
        // Autocommit: the statement is its own transaction; it returns once COMMIT is durable
        // (synchronous_commit = on).
        client.execute(&insert, &[&n])?;
        log.write_all(format!("{n}\n").as_bytes())?;
    }
    Ok(())
}
