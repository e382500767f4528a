//! The `filebuf` writer against the real thing: the reference application `buffering-app`, the
//! real host loading the built plugin, snapshots of a real btrfs volume on a loop device.
//!
//! No sleep synchronises anything here: every wait is for a condition (a file grows, a line
//! arrives), woken by inotify and bounded by a deadline; where something must *not* happen, the
//! test waits for it with a deadline that must expire.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use quiesce_host::{Config, Host};
use quiesce_proto::WriterCall;
use quiesce_proto::{Outcome, Phase, SetRecord, SetRequest};
use quiesce_testbed::BtrfsVolume;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WRITER: &str = "buffering-app";

// ---------------------------------------------------------------------------------------------
// Waiting on conditions

/// Waits until `done` holds, re-checking whenever something changes in `dirs` (inotify) and at
/// least every 100 ms, for at most `limit`. Returns whether it held.
fn wait_until(dirs: &[&Path], limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    for dir in dirs {
        inotify
            .add_watch(
                *dir,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE,
            )
            .unwrap_or_else(|e| panic!("watching {}: {e}", dir.display()));
    }
    loop {
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = PollTimeout::try_from(left.min(Duration::from_millis(100))).unwrap();
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, timeout);
        while matches!(inotify.read_events(), Ok(events) if !events.is_empty()) {}
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The numbers in the ack log, complete lines only.
fn acked(ack_log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(ack_log).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("ack log line {l:?}")))
        .collect()
}

fn max_acked(ack_log: &Path) -> u64 {
    acked(ack_log).last().copied().unwrap_or(0)
}

/// Checks that `records.log` holds exactly records `1..=last`, whole lines, no gap, nothing
/// more. Returns how many it holds.
fn assert_records_exactly(file: &Path, last: u64, what: &str) -> u64 {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{what}: reading {}: {e}", file.display()));
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{what}: the last line of {} is cut short",
        file.display()
    );
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let expected = i as u64 + 1;
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(
            fields.len() == 3
                && fields[0] == expected.to_string()
                && fields[2] == "buffered-record",
            "{what}: line {expected} of {} is {line:?}",
            file.display()
        );
        count = expected;
    }
    assert_eq!(
        count,
        last,
        "{what}: {} holds records 1..={count}, the writer reported {last}",
        file.display()
    );
    count
}

fn last_record(record: &SetRecord) -> u64 {
    let writer = record
        .writers
        .iter()
        .find(|w| w.writer.writer == WRITER)
        .unwrap_or_else(|| panic!("no writer {WRITER} in {record:#?}"));
    writer
        .reports
        .get("last_record")
        .unwrap_or_else(|| panic!("no last_record reported: {record:#?}"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The application, the host

/// A running `buffering-app`, killed (SIGKILL, as a crash) when dropped.
struct App {
    child: std::process::Child,
    stderr: PathBuf,
    data: PathBuf,
    ack_log: PathBuf,
}

impl App {
    fn records(&self) -> PathBuf {
        self.data.join("records.log")
    }

    /// Starts the app with its data in `data`, its ack log in `scratch`, and `args`; returns
    /// once it says `ready`.
    fn start(data: &Path, scratch: &Path, args: &[&str]) -> App {
        let exe = quiesce_testbed::binary("quiesce-example-buffering-app", "buffering-app");
        let ack_log = scratch.join("acks.log");
        let stderr = scratch.join("app.stderr");
        let mut child = Command::new(exe)
            .arg("--data")
            .arg(data)
            .arg("--ack-log")
            .arg(&ack_log)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting buffering-app");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("ready "),
            "buffering-app did not start: {line:?}\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        App {
            child,
            stderr,
            data: data.to_path_buf(),
            ack_log,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded) until the app has acknowledged record `n`.
    fn wait_acked(&self, n: u64) {
        let scratch = self.ack_log.parent().unwrap();
        assert!(
            wait_until(&[scratch], Duration::from_secs(10), || max_acked(
                &self.ack_log
            ) >= n),
            "the app acknowledged no record {n} within 10 s (last: {}):\n{}",
            max_acked(&self.ack_log),
            self.stderr()
        );
    }

    /// Waits (bounded) until records.log holds more than `n` records' worth of bytes.
    fn wait_grows_past(&self, bytes: u64, limit: Duration) -> bool {
        wait_until(&[&self.data], limit, || size(&self.records()) > bytes)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host(scratch: &Path, volume: &BtrfsVolume, body: &str) -> Host {
    let plugin = quiesce_testbed::plugin("quiesce-writer-filebuf");
    let text = quiesce_testbed::host_config(scratch, volume, &[&plugin], body);
    let host = Host::start(Config::parse(&text, Path::new("host.toml")).unwrap());
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    assert_eq!(host.writers().len(), 1, "one filebuf writer");
    host
}

fn socket_writer(id: &str, data: &Path, socket: &Path) -> String {
    format!(
        "[[plugins.filebuf.writers]]\nid = \"{id}\"\nvolume = \"shared\"\n\
         files = [\"{data}/records.log\", \"{data}/*.log\"]\nsocket = \"{socket}\"\n",
        data = data.display(),
        socket = socket.display()
    )
}

fn shared() -> SetRequest {
    SetRequest {
        volumes: vec!["shared".into()],
        best_effort: false,
    }
}

/// A fresh volume, a scratch directory off the volume, and the app's data directory on it.
fn setup() -> (BtrfsVolume, tempfile::TempDir, PathBuf) {
    let volume = BtrfsVolume::create(256);
    let scratch = tempfile::tempdir().unwrap();
    let data = volume.data.join("app");
    std::fs::create_dir(&data).unwrap();
    (volume, scratch, data)
}

/// Runs `count` sets while the app runs and checks each snapshot. Returns (snapshots, records
/// verified, records that were only in memory when their set started).
async fn snapshots_hold_every_acknowledged_record(
    host: &Host,
    app: &App,
    count: usize,
) -> (usize, u64, u64) {
    let mut verified = 0;
    let mut only_in_memory = 0;
    let mut previous = 0;
    for i in 0..count {
        // Read before the set starts: what the app's clients were told is durable, and what is
        // in the file (the rest of what it made is in its memory).
        let acked_before = max_acked(&app.ack_log);
        let in_file_before = std::fs::read_to_string(app.records())
            .unwrap()
            .lines()
            .count() as u64;
        let record = host.run_local_set(shared()).await.unwrap();
        assert_eq!(
            record.outcome,
            Outcome::AppConsistent,
            "set {i}: {record:#?}"
        );
        let last = last_record(&record);
        assert!(
            acked_before <= last,
            "set {i}: record {acked_before} was acknowledged before the set, the freeze reported {last}"
        );
        assert!(
            last > previous,
            "set {i}: the app made no progress since the last set"
        );
        let snapshot = Path::new(&record.snapshot.as_ref().unwrap().path).join("app");
        verified += assert_records_exactly(
            &snapshot.join("records.log"),
            last,
            &format!("snapshot {i}"),
        );
        only_in_memory += last.saturating_sub(in_file_before);
        previous = last;
        // Thawed: the app goes on, and acknowledges beyond what the snapshot holds.
        app.wait_acked(last + 20);
    }
    (count, verified, only_in_memory)
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_record_is_in_each_of_25_snapshots() {
    let started = Instant::now();
    let (volume, scratch, data) = setup();
    let socket = scratch.path().join("app.sock");
    let app = App::start(
        &data,
        scratch.path(),
        &["--socket", socket.to_str().unwrap()],
    );
    let host = host(
        scratch.path(),
        &volume,
        &socket_writer(WRITER, &data, &socket),
    );
    app.wait_acked(100);

    let (snapshots, verified, only_in_memory) =
        snapshots_hold_every_acknowledged_record(&host, &app, 25).await;
    assert_eq!(volume.snapshot_list().len(), snapshots);
    // The test means something: at the start of the sets, records existed only in the app's
    // memory, which a crash-consistent snapshot would have missed; the freeze flushed them.
    assert!(only_in_memory > 0, "the app never had unflushed records");
    let record = host.history().pop().unwrap();
    let reports = &record.writers[0].reports;
    assert!(
        reports["files_synced"].parse::<u64>().unwrap() >= 1,
        "{reports:?}"
    );
    assert_eq!(record.writers[0].failure, None);
    eprintln!(
        "restore (socket): {snapshots} snapshots, {verified} records verified, 0 lost, \
         {only_in_memory} records only in memory at set start, {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_holds_its_writes_while_frozen_until_thaw() {
    let (volume, scratch, data) = setup();
    let socket = scratch.path().join("app.sock");
    let app = App::start(
        &data,
        scratch.path(),
        &["--socket", socket.to_str().unwrap()],
    );
    let host = host(
        scratch.path(),
        &volume,
        &socket_writer(WRITER, &data, &socket),
    );
    app.wait_acked(50);
    let writer = host.writers().pop().unwrap();

    let reports = writer
        .call(WriterCall::Freeze, "set-manual", Duration::from_secs(5))
        .await
        .unwrap();
    let last: u64 = reports["last_record"].parse().unwrap();
    assert_records_exactly(&app.records(), last, "frozen");
    assert_eq!(
        max_acked(&app.ack_log),
        last,
        "everything flushed is acknowledged"
    );
    let (file, acks) = (size(&app.records()), size(&app.ack_log));
    // Unheld, the app would flush (and acknowledge) about every 50 ms: in 500 ms, ten times.
    let moved = wait_until(&[&data, scratch.path()], Duration::from_millis(500), || {
        size(&app.records()) != file || size(&app.ack_log) != acks
    });
    assert!(!moved, "the app wrote or acknowledged while frozen");
    assert_records_exactly(&app.records(), last, "still frozen");

    writer
        .call(WriterCall::Thaw, "set-manual", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        app.wait_grows_past(file, Duration::from_secs(5)),
        "the app did not resume after thaw"
    );
    app.wait_acked(last + 1);
    // Thaw is idempotent.
    writer
        .call(WriterCall::Thaw, "set-manual", Duration::from_secs(5))
        .await
        .unwrap();
}

/// Sends one request line on `stream` and returns the answer line.
fn exchange(stream: &mut UnixStream, request: &str) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    String::from_utf8(answer).unwrap()
}

fn frozen_at(answer: &str) -> u64 {
    answer
        .strip_prefix("FROZEN ")
        .unwrap_or_else(|| panic!("answer {answer:?}"))
        .parse()
        .unwrap()
}

#[test]
fn the_app_thaws_itself_when_the_control_connection_drops_or_its_hold_limit_passes() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let socket = scratch.path().join("app.sock");
    let app = App::start(
        &data,
        scratch.path(),
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--hold-limit-ms",
            "1000",
        ],
    );
    app.wait_acked(20);

    // A connection that freezes, then goes away without THAW.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let asked = Instant::now();
    let last = frozen_at(&exchange(&mut stream, "FREEZE set-dropped"));
    assert_records_exactly(&app.records(), last, "frozen");
    let file = size(&app.records());
    drop(stream);
    assert!(
        app.wait_grows_past(file, Duration::from_secs(5)),
        "the app stayed frozen after its control connection closed"
    );
    assert!(
        asked.elapsed() < Duration::from_millis(1000),
        "resumed at the hold limit ({:?} after FREEZE), not when the connection closed",
        asked.elapsed()
    );
    assert!(wait_until(
        &[scratch.path()],
        Duration::from_secs(5),
        || app
            .stderr()
            .contains("closed while holding writes: resuming")
    ));

    // A connection that freezes and stays open, silent: the app's own hold limit ends it.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let asked = Instant::now();
    let last = frozen_at(&exchange(&mut stream, "FREEZE set-forgotten"));
    let file = size(&app.records());
    assert_records_exactly(&app.records(), last, "frozen again");
    assert!(
        app.wait_grows_past(file, Duration::from_secs(5)),
        "the app stayed frozen past its hold limit"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(1000),
        "resumed after {:?}, before the hold limit",
        asked.elapsed()
    );
    assert!(app.stderr().contains("without a thaw: resuming on my own"));
    // Thaw after the fact is still answered: thaw is idempotent.
    assert_eq!(exchange(&mut stream, "THAW set-forgotten"), "THAWED");
    assert!(exchange(&mut stream, "FLUSH").starts_with("ERROR "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signal_variant_end_to_end() {
    let started = Instant::now();
    let (volume, scratch, data) = setup();
    let pid_file = scratch.path().join("app.pid");
    let ack_file = scratch.path().join("app.ack");
    let app = App::start(
        &data,
        scratch.path(),
        &[
            "--signal-mode",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--ack-file",
            ack_file.to_str().unwrap(),
        ],
    );
    let body = format!(
        "[[plugins.filebuf.writers]]\nid = \"{WRITER}\"\nvolume = \"shared\"\n\
         files = [\"{data}/records.log\"]\nsignal = \"USR1\"\nthaw_signal = \"SIGUSR2\"\n\
         pid_file = \"{pid}\"\nack_file = \"{ack}\"\n",
        data = data.display(),
        pid = pid_file.display(),
        ack = ack_file.display()
    );
    let host = host(scratch.path(), &volume, &body);
    app.wait_acked(50);

    let (snapshots, verified, _) = snapshots_hold_every_acknowledged_record(&host, &app, 5).await;
    let last = host.history().pop().unwrap();
    assert_eq!(
        std::fs::read_to_string(&ack_file).unwrap(),
        format!("THAWED {}\n", last.id.0),
        "the last exchange in the ack file is the last set's thaw"
    );
    let stderr = app.stderr();
    assert_eq!(
        stderr.matches("frozen by signal for set-").count(),
        snapshots,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("thawed by signal after set-").count(),
        snapshots,
        "{stderr}"
    );

    // Held while frozen by signal, too.
    let writer = host.writers().pop().unwrap();
    let reports = writer
        .call(WriterCall::Freeze, "set-manual", Duration::from_secs(5))
        .await
        .unwrap();
    let frozen: u64 = reports["last_record"].parse().unwrap();
    let file = size(&app.records());
    assert!(
        !app.wait_grows_past(file, Duration::from_millis(300)),
        "wrote while frozen"
    );
    assert_records_exactly(&app.records(), frozen, "frozen by signal");
    writer
        .call(WriterCall::Thaw, "set-manual", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        app.wait_grows_past(file, Duration::from_secs(5)),
        "no resume after the thaw signal"
    );
    eprintln!(
        "restore (signal): {snapshots} snapshots, {verified} records verified, 0 lost, {:?}",
        started.elapsed()
    );
}

/// A stand-in application on `socket`: for each connection, reads one request line and, if
/// `answer` is given, answers it; then waits for the connection to close. Reports every request
/// line, and `EOF` when a connection that sent one is closed.
fn fake_app(socket: &Path, answer: Option<&'static str>) -> mpsc::Receiver<String> {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                continue; // prepare's reachability check: connect, close
            }
            let _ = tx.send(line.trim_end().to_string());
            if let Some(answer) = answer {
                (&stream)
                    .write_all(format!("{answer}\n").as_bytes())
                    .unwrap();
            }
            let mut rest = String::new();
            if reader.read_line(&mut rest).unwrap_or(1) == 0 {
                let _ = tx.send("EOF".into());
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_answers_fails_the_freeze_at_its_deadline() {
    let (volume, scratch, data) = setup();
    std::fs::write(data.join("records.log"), "").unwrap();
    let socket = scratch.path().join("silent.sock");
    let requests = fake_app(&socket, None);
    let body = format!(
        "[timeouts]\nfreeze_ms = 1000\nabort_ms = 1000\n{}",
        socket_writer("silent", &data, &socket)
    );
    let host = host(scratch.path(), &volume, &body);

    let started = Instant::now();
    let record = host.run_local_set(shared()).await.unwrap();
    let took = started.elapsed();
    match &record.outcome {
        Outcome::Failed {
            phase,
            writer,
            reason,
        } => {
            assert_eq!(*phase, Phase::Freeze);
            assert_eq!(writer.as_ref().unwrap().writer, "silent");
            assert!(
                reason.contains("the application did not answer FREEZE set-")
                    && reason.contains(&format!("control socket {}", socket.display()))
                    && reason.contains(" ms;"),
                "{reason}"
            );
        }
        other => panic!("expected a failed set, got {other:?}"),
    }
    // It waited until (just before) its deadline, not less, and not past it.
    assert!(took >= Duration::from_millis(800), "gave up after {took:?}");
    assert!(took < Duration::from_millis(2500), "the set took {took:?}");
    assert!(volume.snapshot_list().is_empty(), "no snapshot was taken");
    let freeze = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(freeze, format!("FREEZE {}", record.id.0));
    // The writer closed the connection: an app that froze late would now thaw.
    assert_eq!(
        requests.recv_timeout(Duration::from_secs(5)).unwrap(),
        "EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_answers_error_fails_the_set_naming_the_writer() {
    let (volume, scratch, data) = setup();
    std::fs::write(data.join("records.log"), "").unwrap();
    let socket = scratch.path().join("refusing.sock");
    let _requests = fake_app(&socket, Some("ERROR disk full on /data"));
    let host = host(
        scratch.path(),
        &volume,
        &socket_writer("refusing", &data, &socket),
    );

    let record = host.run_local_set(shared()).await.unwrap();
    match &record.outcome {
        Outcome::Failed {
            phase,
            writer,
            reason,
        } => {
            assert_eq!(*phase, Phase::Freeze);
            assert_eq!(writer.as_ref().unwrap().writer, "refusing");
            assert!(
                reason.contains("the application refused to freeze: disk full on /data"),
                "{reason}"
            );
        }
        other => panic!("expected a failed set, got {other:?}"),
    }
    let text = record.outcome.to_string();
    assert!(
        text.contains("refusing") && text.contains("disk full"),
        "{text}"
    );
    assert!(volume.snapshot_list().is_empty(), "no snapshot was taken");
}
