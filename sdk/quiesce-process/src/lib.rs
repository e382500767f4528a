//! Running a program under a time limit, in a process group of its own, so that it can be
//! killed with everything it started — and interrupted from another thread (a watchdog) before
//! its limit. Its output is read on threads of its own and kept within bounds, so that a
//! program that prints without end costs neither memory nor its caller's deadline.
//!
//! One implementation for every program quiesce runs on a deadline: the command provider's
//! programs (`quiesce-provider`) and the hook writers' hooks (through `quiesce_sdk::process`).

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long output is still read, and a killed program waited for, once it ended: only a
/// process that left the group (`setsid`) can hold the pipes open that long.
pub const GRACE: Duration = Duration::from_millis(500);

/// Which part of an output stream is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The first N bytes (a program's answer: one small document).
    First(usize),
    /// The last N bytes (its diagnostics: the reason is usually at the end).
    Last(usize),
}

/// How a program is run.
#[derive(Debug, Clone)]
pub struct Options {
    /// At this limit, measured from the start, the program is killed with its process group.
    pub limit: Duration,
    pub stdout: Keep,
    pub stderr: Keep,
    /// The caller must answer by then whatever happens: the graces after the program ends are
    /// cut short to fit.
    pub answer_by: Option<Instant>,
    /// Kill what the program left running in its group once it exited (it would hold the
    /// output pipes open, and act after the run's caller thinks it over).
    pub kill_leftovers: bool,
    /// The program is killed when the thread that started it dies (`PR_SET_PDEATHSIG`): a
    /// daemon killed outright leaves no program of it running on.
    pub die_with_parent: bool,
}

impl Options {
    /// `limit`, the first 64 KiB of stdout and the last 4 KiB of stderr kept, nothing else.
    pub fn new(limit: Duration) -> Options {
        Options {
            limit,
            stdout: Keep::First(64 * 1024),
            stderr: Keep::Last(4096),
            answer_by: None,
            kill_leftovers: false,
            die_with_parent: false,
        }
    }

    /// [`GRACE`], or less if the answer is due sooner.
    fn grace(&self) -> Duration {
        match self.answer_by {
            Some(by) => GRACE.min(by.saturating_duration_since(Instant::now())),
            None => GRACE,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(ExitStatus),
    /// Still running at its limit: killed with its process group; `gone` says whether it was
    /// gone within the grace after (if not: stuck in the kernel).
    TimedOut {
        limit: Duration,
        gone: bool,
    },
    /// Interrupted by another thread, for the reason given: killed with its process group.
    Interrupted(String),
}

impl Ending {
    pub fn succeeded(&self) -> bool {
        matches!(self, Ending::Exited(s) if s.success())
    }

    /// For messages: `exit status: 3`, `still running after its 500 ms timeout (timeout_ms):
    /// killed with its process group`, ...; `limit_name` names the setting of the limit.
    pub fn describe(&self, limit_name: &str) -> String {
        match self {
            Ending::Exited(status) => status.to_string(),
            Ending::TimedOut { limit, gone } => format!(
                "still running after its {} ms timeout ({limit_name}): killed with its process group{}",
                limit.as_millis(),
                if *gone {
                    ""
                } else {
                    " (and not gone yet: stuck in the kernel?)"
                }
            ),
            Ending::Interrupted(why) => format!("interrupted: {why}"),
        }
    }
}

/// What one run did.
#[derive(Debug, Clone)]
pub struct Run {
    pub ending: Ending,
    /// From the start until it ended (or was killed).
    pub elapsed: Duration,
    /// What [`Options::stdout`] and [`Options::stderr`] keep, as lossy UTF-8, saying how much
    /// was dropped.
    pub stdout: String,
    pub stderr: String,
}

/// What a run waits on: the program's exit, or an interruption sent through an [`Interrupter`].
pub struct Waiting {
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
pub struct Interrupter(Sender<Event>);

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

impl Default for Waiting {
    fn default() -> Self {
        Waiting::new()
    }
}

/// Runs `command` (stdin `/dev/null`, stdout and stderr captured, working directory `/`) as
/// `options` say. An error only when it cannot be started.
pub fn run(command: &mut Command, options: &Options, waiting: Waiting) -> std::io::Result<Run> {
    let started = Instant::now();
    command
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if options.die_with_parent {
        let parent = nix::unistd::getpid();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    // The parent died before the signal was armed.
                    nix::libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    let mut child = spawn(command, started + options.limit)?;
    let group = Pid::from_raw(child.id() as i32);
    let stdout = Capture::start(child.stdout.take(), options.stdout);
    let stderr = Capture::start(child.stderr.take(), options.stderr);
    let Waiting { tx, rx } = waiting;
    // The waiter owns the child and reaps it whenever it ends, even after we stop waiting.
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exited(child.wait()));
    });
    let left = options.limit.saturating_sub(started.elapsed());
    let ending = match rx.recv_timeout(left) {
        Ok(Event::Exited(status)) => status.map(Ending::Exited),
        Ok(Event::Interrupted(why)) => Ok(Ending::Interrupted(why)),
        Err(_) => Ok(Ending::TimedOut {
            limit: options.limit,
            gone: false,
        }),
    };
    let elapsed = started.elapsed();
    let mut ending = ending?;
    if !matches!(ending, Ending::Exited(_)) || options.kill_leftovers {
        // After a timeout or an interruption, the program itself; after an exit, what it left.
        let _ = killpg(group, Signal::SIGKILL);
    }
    if !matches!(ending, Ending::Exited(_)) {
        // Wait for the kill to land, so that the program is gone when we return.
        let deadline = Instant::now() + options.grace();
        let mut gone = false;
        while let Ok(event) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if matches!(event, Event::Exited(_)) {
                gone = true;
                break;
            }
        }
        if let Ending::TimedOut { gone: g, .. } = &mut ending {
            *g = gone;
        }
    }
    let until = Instant::now() + options.grace();
    Ok(Run {
        ending,
        elapsed,
        stdout: stdout.finish(until),
        stderr: stderr.finish(until),
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

/// The part `keep` keeps of `bytes`, as text, saying how much was dropped.
pub fn kept(bytes: &[u8], keep: Keep) -> String {
    let mut tail = Tail::new(keep);
    tail.push(bytes);
    tail.text()
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
            &Options::new(Duration::from_secs(10)),
            Waiting::new(),
        )
        .unwrap();
        assert!(matches!(run.ending, Ending::Exited(s) if s.code() == Some(3)));
        assert!(!run.ending.succeeded());
        assert_eq!(run.stdout, "out\n");
        assert!(run.stderr.ends_with("xxx the end\n"), "{}", run.stderr);
        assert!(
            run.stderr.starts_with("[913 earlier bytes dropped]"),
            "says what was dropped: {}",
            &run.stderr[..40]
        );
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
            &Options::new(Duration::from_millis(300)),
            Waiting::new(),
        )
        .unwrap();
        assert!(
            matches!(run.ending, Ending::TimedOut { gone: true, .. }),
            "{run:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(run.stderr, "started\n");
        assert!(run
            .ending
            .describe("timeout_ms")
            .contains("300 ms timeout (timeout_ms)"));
        let grandchild = std::fs::read_to_string(&pid_file).unwrap();
        assert_gone(grandchild.trim());
    }

    /// SIGKILL is delivered at once but a process takes a moment to die: gone, or a zombie
    /// waiting for init to reap it.
    fn assert_gone(pid: &str) {
        quiesce_testbed::wait_until(
            "the process to die with its group",
            Duration::from_secs(5),
            || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
                    .then_some(())
            },
        );
    }

    #[test]
    fn what_an_exited_program_left_running_dies_only_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        for kill_leftovers in [false, true] {
            let pid_file = tmp.path().join(format!("left-{kill_leftovers}"));
            let mut options = Options::new(Duration::from_secs(10));
            options.kill_leftovers = kill_leftovers;
            // The leftover holds no pipe: the run does not wait for it.
            let run = run(
                &mut sh(&format!(
                    "sleep 600 >/dev/null 2>&1 & echo $! > {}",
                    pid_file.display()
                )),
                &options,
                Waiting::new(),
            )
            .unwrap();
            assert!(run.ending.succeeded(), "{run:?}");
            let pid = std::fs::read_to_string(&pid_file).unwrap();
            let pid = pid.trim();
            if kill_leftovers {
                assert_gone(pid);
            } else {
                assert!(
                    std::path::Path::new(&format!("/proc/{pid}")).exists(),
                    "left running"
                );
                let _ =
                    nix::sys::signal::kill(Pid::from_raw(pid.parse().unwrap()), Signal::SIGKILL);
            }
        }
    }

    #[test]
    fn an_interruption_ends_the_run_before_its_limit() {
        let waiting = Waiting::new();
        waiting.interrupter().interrupt("the watchdog fired".into());
        let started = Instant::now();
        let run = run(
            &mut sh("sleep 600"),
            &Options::new(Duration::from_secs(60)),
            waiting,
        )
        .unwrap();
        assert_eq!(run.ending, Ending::Interrupted("the watchdog fired".into()));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error() {
        let e = run(
            &mut Command::new("/nonexistent/program"),
            &Options::new(Duration::from_secs(1)),
            Waiting::new(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn output_keeps_its_beginning_or_its_end() {
        assert_eq!(
            kept(b"abcdef", Keep::First(4)),
            "abcd[2 later bytes dropped]"
        );
        assert_eq!(
            kept(b"abcdef", Keep::Last(4)),
            "[2 earlier bytes dropped]cdef"
        );
        assert_eq!(kept(b"ab", Keep::Last(4)), "ab");
    }
}
