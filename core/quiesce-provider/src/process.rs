//! Running a program under a time limit, in a process group of its own, so that it can be
//! killed with everything it started — and interrupted from another thread (the fsfreeze
//! watchdog) before its limit.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of a program's stderr is kept for messages: the end, where the reason usually is.
pub(crate) const STDERR_KEPT: usize = 4096;
/// How much of a program's stdout is kept (it carries one small JSON object).
pub(crate) const STDOUT_KEPT: usize = 64 * 1024;
/// How long output is still read once the program ended and its group was killed: only a
/// process that left the group (`setsid`) can hold the pipes open that long.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Ending {
    Exited(ExitStatus),
    /// Still running at its limit: killed with its process group.
    TimedOut(Duration),
    /// Interrupted by another thread, for the reason given: killed with its process group.
    Interrupted(String),
}

#[derive(Debug)]
pub(crate) struct Run {
    pub ending: Ending,
    /// The first [`STDOUT_KEPT`] bytes of stdout.
    pub stdout: String,
    /// The last [`STDERR_KEPT`] bytes of stderr, trimmed.
    pub stderr: String,
}

impl Ending {
    /// For messages: `exit status: 3`, `still running after its 500 ms timeout: killed ...`.
    pub fn describe(&self, limit_name: &str) -> String {
        match self {
            Ending::Exited(status) => status.to_string(),
            Ending::TimedOut(limit) => format!(
                "still running after its {} ms timeout ({limit_name}): killed with its process group",
                limit.as_millis()
            ),
            Ending::Interrupted(why) => format!("interrupted: {why}"),
        }
    }

    pub fn succeeded(&self) -> bool {
        matches!(self, Ending::Exited(s) if s.success())
    }
}

/// What a run waits on: the program's exit, or an interruption sent through an [`Interrupter`].
pub(crate) struct Waiting {
    tx: Sender<Event>,
    rx: Receiver<Event>,
}

enum Event {
    Exited(std::io::Result<ExitStatus>),
    Interrupted(String),
}

/// Interrupts the run its [`Waiting`] is given to (or, if it has not started yet, the run ends
/// as soon as it starts).
#[derive(Clone)]
pub(crate) struct Interrupter(Sender<Event>);

impl Interrupter {
    pub fn interrupt(&self, why: String) {
        let _ = self.0.send(Event::Interrupted(why));
    }
}

impl Waiting {
    pub fn new() -> Waiting {
        let (tx, rx) = mpsc::channel();
        Waiting { tx, rx }
    }

    pub fn interrupter(&self) -> Interrupter {
        Interrupter(self.tx.clone())
    }
}

/// Runs `command` (stdin `/dev/null`, stdout and stderr captured, working directory `/`) for at
/// most `limit`. When it ends, whatever it left running in its process group is killed: an
/// invocation does not outlive itself.
pub(crate) fn run(
    command: &mut Command,
    limit: Duration,
    waiting: Waiting,
) -> std::io::Result<Run> {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    command
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // A daemon killed outright (`kill -9`, outside systemd) must not leave a provider program
    // running on: it would take a snapshot nobody records. The program dies with the thread that
    // started it, which waits for it; what the program itself started is covered by the
    // restarted daemon waiting out the provider's deadline before it cleans up.
    let parent = nix::unistd::getpid();
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != parent {
                // The daemon died before the signal was armed.
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = spawn(command, started + limit)?;
    let group = Pid::from_raw(child.id() as i32);
    let stdout = Capture::start(child.stdout.take(), Keep::First(STDOUT_KEPT));
    let stderr = Capture::start(child.stderr.take(), Keep::Last(STDERR_KEPT));
    let Waiting { tx, rx } = waiting;
    // The waiter owns the child and reaps it whenever it ends, even after we stop waiting.
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exited(child.wait()));
    });
    let left = limit.saturating_sub(started.elapsed());
    let ending = match rx.recv_timeout(left) {
        Ok(Event::Exited(status)) => status.map(Ending::Exited),
        Ok(Event::Interrupted(why)) => Ok(Ending::Interrupted(why)),
        Err(_) => Ok(Ending::TimedOut(limit)),
    };
    // Whatever is left of the group dies now: after a timeout or an interruption, the program
    // itself; after an exit, what it left running (it would hold the output pipes open).
    let _ = killpg(group, Signal::SIGKILL);
    let ending = ending?;
    if !matches!(ending, Ending::Exited(_)) {
        // Wait for the kill to land, so that the program is gone when we return.
        let deadline = Instant::now() + OUTPUT_GRACE;
        while let Ok(event) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if matches!(event, Event::Exited(_)) {
                break;
            }
        }
    }
    let until = Instant::now() + OUTPUT_GRACE;
    Ok(Run {
        ending,
        stdout: stdout.finish(until),
        stderr: stderr.finish(until).trim().to_string(),
    })
}

/// Spawns, retrying while the executable is busy (`ETXTBSY`: a program being installed, or
/// another thread's fork still holding it open for writing).
fn spawn(command: &mut Command, until: Instant) -> std::io::Result<std::process::Child> {
    loop {
        match command.spawn() {
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
                    && Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// The last `keep` bytes of `bytes` as text, trimmed, saying how much was dropped before them.
pub(crate) fn last_bytes(bytes: &[u8], keep: usize) -> String {
    let mut tail = Tail::new(Keep::Last(keep));
    tail.push(bytes);
    tail.text().trim().to_string()
}

#[derive(Clone, Copy)]
enum Keep {
    First(usize),
    Last(usize),
}

/// One output stream, read on a thread of its own.
struct Capture {
    tail: Arc<Mutex<Tail>>,
    eof: Receiver<()>,
}

impl Capture {
    fn start(stream: Option<impl Read + Send + 'static>, keep: Keep) -> Capture {
        let tail = Arc::new(Mutex::new(Tail::new(keep)));
        let (done, eof) = mpsc::channel();
        if let Some(mut stream) = stream {
            let tail = tail.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => tail
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(&buf[..n]),
                    }
                }
                let _ = done.send(());
            });
        }
        Capture { tail, eof }
    }

    /// What was read by the end of the stream, or by `until` if it stays open longer.
    fn finish(self, until: Instant) -> String {
        let _ = self
            .eof
            .recv_timeout(until.saturating_duration_since(Instant::now()));
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.text()
    }
}

struct Tail {
    keep: Keep,
    bytes: Vec<u8>,
    dropped: u64,
}

impl Tail {
    fn new(keep: Keep) -> Tail {
        Tail {
            keep,
            bytes: Vec::new(),
            dropped: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        match self.keep {
            Keep::First(keep) => {
                let room = keep.saturating_sub(self.bytes.len()).min(data.len());
                self.bytes.extend_from_slice(&data[..room]);
                self.dropped += (data.len() - room) as u64;
            }
            Keep::Last(keep) => {
                self.bytes.extend_from_slice(data);
                if self.bytes.len() > keep {
                    let excess = self.bytes.len() - keep;
                    self.bytes.drain(..excess);
                    self.dropped += excess as u64;
                }
            }
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        match (self.dropped, self.keep) {
            (0, _) => text.into_owned(),
            (n, Keep::Last(_)) => format!("[{n} earlier bytes dropped]{text}"),
            (n, Keep::First(_)) => format!("{text}[{n} later bytes dropped]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn captures_exit_status_stdout_and_the_end_of_stderr() {
        let run = run(
            &mut sh(
                "echo out; head -c 5000 /dev/zero | tr '\\0' x >&2; echo ' the end' >&2; exit 3",
            ),
            Duration::from_secs(10),
            Waiting::new(),
        )
        .unwrap();
        assert!(matches!(run.ending, Ending::Exited(s) if s.code() == Some(3)));
        assert_eq!(run.stdout, "out\n");
        assert!(run.stderr.ends_with("xxx the end"), "{}", run.stderr);
        assert!(
            run.stderr.starts_with("["),
            "says what was dropped: {}",
            &run.stderr[..40]
        );
        assert!(run.stderr.len() < STDERR_KEPT + 40);
    }

    #[test]
    fn a_program_past_its_limit_is_killed_with_its_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pid_file = tmp.path().join("grandchild");
        let started = Instant::now();
        let run = run(
            &mut sh(&format!(
                "sleep 600 & echo $! > {}; echo started >&2; wait",
                pid_file.display()
            )),
            Duration::from_millis(300),
            Waiting::new(),
        )
        .unwrap();
        assert!(matches!(run.ending, Ending::TimedOut(_)), "{run:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(run.stderr, "started");
        let grandchild = std::fs::read_to_string(&pid_file).unwrap();
        // SIGKILL is delivered at once but a process takes a moment to die: wait (a condition,
        // under a deadline) until it is gone, or a zombie waiting for init to reap it.
        let dead = || {
            std::fs::read_to_string(format!("/proc/{}/stat", grandchild.trim()))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
        };
        quiesce_testbed::wait_until(
            "the grandchild to die with its group",
            Duration::from_secs(5),
            || dead().then_some(()),
        );
    }

    #[test]
    fn an_interruption_ends_the_run_before_its_limit() {
        let waiting = Waiting::new();
        waiting.interrupter().interrupt("the watchdog fired".into());
        let started = Instant::now();
        let run = run(&mut sh("sleep 600"), Duration::from_secs(60), waiting).unwrap();
        assert!(
            matches!(&run.ending, Ending::Interrupted(why) if why == "the watchdog fired"),
            "{run:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stdout_keeps_its_beginning() {
        let mut tail = Tail::new(Keep::First(4));
        tail.push(b"abc");
        tail.push(b"def");
        assert_eq!(tail.text(), "abcd[2 later bytes dropped]");
    }
}
