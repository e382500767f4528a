//! Finding the hooks of a directory, and running one under a timeout with its output captured.

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// One executable of the hook directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub name: String,
    pub path: PathBuf,
}

/// A file of the directory that is not run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub why: &'static str,
}

/// The hooks of `dir`, sorted by name (byte order), and the files left out.
///
/// Left out, as the QEMU guest agent's `fsfreeze-hook` leaves them out: hidden files, editor
/// backups (`~`) and package-manager leftovers (`.dpkg-old`, `.rpmnew`, ...); and anything
/// that is not an executable regular file (symbolic links are followed).
pub fn list(dir: &Path) -> std::io::Result<(Vec<Hook>, Vec<Skipped>)> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let (mut hooks, mut skipped) = (Vec::new(), Vec::new());
    for os_name in names {
        let name = os_name.to_string_lossy().into_owned();
        let path = dir.join(&os_name);
        let why = if name.starts_with('.') {
            Some("hidden")
        } else if is_leftover(&name) {
            Some("a backup or package-manager leftover")
        } else {
            match std::fs::metadata(&path) {
                Err(_) => Some("unreadable or a dangling link"),
                Ok(m) if !m.is_file() => Some("not a regular file"),
                Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                    Some("not executable (chmod +x to run it)")
                }
                Ok(_) => None,
            }
        };
        match why {
            Some(why) => skipped.push(Skipped { name, why }),
            None => hooks.push(Hook { name, path }),
        }
    }
    Ok((hooks, skipped))
}

fn is_leftover(name: &str) -> bool {
    name.ends_with('~')
        || [
            ".dpkg-dist",
            ".dpkg-old",
            ".dpkg-new",
            ".dpkg-tmp",
            ".dpkg-bak",
            ".rpmsave",
            ".rpmnew",
            ".rpmorig",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// Killed (with its process group) at `limit`; `exited` says whether it was gone soon after.
    TimedOut {
        limit: Duration,
        exited: bool,
    },
    /// It could not be started.
    NotStarted(String),
}

/// What one run of a hook did.
#[derive(Debug, Clone)]
pub struct Run {
    pub ending: Ending,
    pub elapsed: Duration,
    /// The end of its stdout and stderr (lossy UTF-8).
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn succeeded(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// `exit 0 after 12 ms`, `killed after its 300 ms timeout`, ...
    pub fn summary(&self) -> String {
        let ms = self.elapsed.as_millis();
        match &self.ending {
            Ending::Exited(code) => format!("exit {code} after {ms} ms"),
            Ending::Signaled(signal) => format!("killed by signal {signal} after {ms} ms"),
            Ending::TimedOut { limit, exited } => format!(
                "still running at its {} ms timeout: killed with its process group{}",
                limit.as_millis(),
                if *exited {
                    ""
                } else {
                    " (and not gone yet: stuck in the kernel?)"
                }
            ),
            Ending::NotStarted(why) => format!("could not be started: {why}"),
        }
    }
}

/// How long a killed hook is waited for, and how long output is read after a hook exited (a
/// background process it started may hold its stdout open: its output is not waited for).
const GRACE: Duration = Duration::from_millis(500);

/// Runs `hook` with `action` as its only argument and `env` added to its environment, for at
/// most `limit`; keeps the last `keep` bytes of stdout and of stderr. Returns by `answer_by`
/// whatever happens (the graces after the hook ends are cut short to fit).
///
/// The hook runs in a process group of its own (stdin `/dev/null`, working directory `/`); at
/// `limit` the whole group gets SIGKILL, so that what the hook started dies with it.
pub fn run(
    hook: &Hook,
    action: &str,
    env: &[(&str, String)],
    limit: Duration,
    keep: usize,
    answer_by: Instant,
) -> Run {
    let started = Instant::now();
    let not_started = |why: String| Run {
        ending: Ending::NotStarted(why),
        elapsed: started.elapsed(),
        stdout: String::new(),
        stderr: String::new(),
    };
    let mut command = Command::new(&hook.path);
    command
        .arg(action)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match spawn(&mut command, started + limit) {
        Ok(child) => child,
        Err(e) => return not_started(e.to_string()),
    };
    let group = Pid::from_raw(child.id() as i32);
    let stdout = Capture::start(child.stdout.take(), keep);
    let stderr = Capture::start(child.stderr.take(), keep);
    let (done, exited) = mpsc::channel();
    // The waiter owns the child and reaps it whenever it ends, even after we stop waiting.
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let left = (started + limit).saturating_duration_since(Instant::now());
    let ending = match exited.recv_timeout(left) {
        Ok(status) => ending(status),
        Err(_) => {
            let _ = killpg(group, Signal::SIGKILL);
            Ending::TimedOut {
                limit,
                exited: exited.recv_timeout(grace(answer_by)).is_ok(),
            }
        }
    };
    let elapsed = started.elapsed();
    let until = Instant::now() + grace(answer_by);
    Run {
        ending,
        elapsed,
        stdout: stdout.finish(until),
        stderr: stderr.finish(until),
    }
}

/// [`GRACE`], or less if `answer_by` comes sooner.
fn grace(answer_by: Instant) -> Duration {
    GRACE.min(answer_by.saturating_duration_since(Instant::now()))
}

/// Spawns, retrying while the executable is busy (`ETXTBSY`: a file being written — a hook
/// being installed, or another thread's fork still holding it open for writing).
fn spawn(command: &mut Command, until: Instant) -> std::io::Result<std::process::Child> {
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(Errno::ETXTBSY as i32) && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn ending(status: std::io::Result<ExitStatus>) -> Ending {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(signal)) => Ending::Signaled(signal),
            (None, None) => Ending::NotStarted(format!("unexpected status {s}")),
        },
        Err(e) => Ending::NotStarted(format!("waiting for it failed: {e}")),
    }
}

/// The end of one output stream, read on a thread of its own.
struct Capture {
    tail: Arc<Mutex<Tail>>,
    eof: mpsc::Receiver<()>,
}

impl Capture {
    fn start(stream: Option<impl Read + Send + 'static>, keep: usize) -> Capture {
        let tail = Arc::new(Mutex::new(Tail {
            keep,
            bytes: Vec::new(),
            dropped: 0,
        }));
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

    /// What was read by `until` (or by the end of the stream, if sooner).
    fn finish(self, until: Instant) -> String {
        let _ = self
            .eof
            .recv_timeout(until.saturating_duration_since(Instant::now()));
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.text()
    }
}

struct Tail {
    keep: usize,
    bytes: Vec<u8>,
    dropped: u64,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        if self.dropped > 0 {
            format!("[{} earlier bytes dropped]{text}", self.dropped)
        } else {
            text.into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_end() {
        let mut t = Tail {
            keep: 4,
            bytes: Vec::new(),
            dropped: 0,
        };
        t.push(b"ab");
        assert_eq!(t.text(), "ab");
        t.push(b"cdef");
        assert_eq!(t.text(), "[2 earlier bytes dropped]cdef");
    }

    #[test]
    fn leftovers() {
        assert!(is_leftover("10-db~"));
        assert!(is_leftover("10-db.dpkg-old"));
        assert!(is_leftover("10-db.rpmnew"));
        assert!(!is_leftover("10-db"));
    }
}
