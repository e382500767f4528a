"""The application of the SQLite writer's tests: another process using the databases.

  create DB MODE           make DB with table `records`, journal mode MODE (wal, delete, ...)
  run DB MODE ACKLOG       commit records 1, 2, 3, ... one per transaction, forever; after each
                           commit returns, append "<n> <CLOCK_MONOTONIC ns>" to ACKLOG; print
                           "ready" once the first record is acknowledged
  once DB N                read (print "read <count>"), then insert record N (print "writing"
                           before, "committed" after), waiting up to 60 s for the write lock
  hold DB                  hold a write transaction (BEGIN IMMEDIATE) until a line on stdin

Every line printed is flushed at once: the test waits on them.
"""

import os
import sqlite3
import sys
import time


def say(line):
    print(line, flush=True)


def connect(db):
    # isolation_level=None: autocommit, each INSERT is its own transaction. timeout: the busy
    # timeout, how long a statement waits for a lock another connection holds.
    return sqlite3.connect(db, timeout=60, isolation_level=None)


def create(db, mode):
    con = connect(db)
    got = con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
    assert got == mode, f"journal mode {got}, wanted {mode}"
    con.execute(
        "CREATE TABLE IF NOT EXISTS records (n INTEGER PRIMARY KEY, payload TEXT NOT NULL)"
    )
    return con


def run(db, mode, acklog):
    con = create(db, mode)
    fd = os.open(acklog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = con.execute("SELECT coalesce(max(n), 0) FROM records").fetchone()[0]
    ready = False
    while True:
        n += 1
        con.execute("INSERT INTO records (n, payload) VALUES (?, ?)", (n, f"record {n} " * 8))
        # The commit has returned: the record is acknowledged. Time it, then log it (one
        # write(2) per line, O_APPEND: lines never interleave or tear).
        acked = time.monotonic_ns()
        os.write(fd, f"{n} {acked}\n".encode())
        if not ready:
            say("ready")
            ready = True


def once(db, n):
    con = connect(db)
    count = con.execute("SELECT count(*) FROM records").fetchone()[0]
    say(f"read {count}")
    say("writing")
    con.execute("INSERT INTO records (n, payload) VALUES (?, ?)", (n, "written during the freeze"))
    say("committed")


def hold(db):
    con = connect(db)
    con.execute("BEGIN IMMEDIATE")
    say("holding")
    sys.stdin.readline()
    con.execute("COMMIT")
    say("released")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "create":
        create(*args)
        say("created")
    elif command == "run":
        run(*args)
    elif command == "once":
        once(args[0], int(args[1]))
    elif command == "hold":
        hold(*args)
    else:
        sys.exit(f"unknown command {command}")
