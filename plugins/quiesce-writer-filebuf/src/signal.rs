//! The signal variant: the request is left in the ack file, the application is signalled, and its
//! answer replaces the ack file. Waiting for the answer is a bounded wait on the file's content,
//! woken by inotify (with a slow re-check in case no event comes, e.g. on a network file system).

use crate::wait::Failure;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest the wait goes without looking at the file again, events or not.
const RECHECK: Duration = Duration::from_millis(50);

/// Reads the application's pid from its pid file and checks that the process exists.
pub fn read_pid(pid_file: &Path) -> Result<Pid, String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("cannot read the pid file {}: {e}", pid_file.display()))?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        format!(
            "the pid file {} does not hold a process id (it holds {:?})",
            pid_file.display(),
            text.trim()
        )
    })?;
    let pid = Pid::from_raw(pid);
    if !alive(pid) {
        return Err(format!(
            "process {pid} named by the pid file {} is not running",
            pid_file.display()
        ));
    }
    Ok(pid)
}

fn alive(pid: Pid) -> bool {
    // EPERM: it exists but belongs to someone else (then the signal fails, and says so).
    !matches!(kill(pid, None), Err(nix::errno::Errno::ESRCH))
}

/// The ack file: requests go in, answers come back, each replacing the whole file by a rename.
#[derive(Debug)]
pub struct AckFile {
    path: PathBuf,
    dir: PathBuf,
    temp: PathBuf,
}

impl AckFile {
    pub fn new(path: &Path) -> AckFile {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        AckFile {
            path: path.to_path_buf(),
            temp: dir.join(format!(".{name}.quiesce-tmp")),
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves `request` (one line) in the file, atomically.
    pub fn request(&self, request: &str) -> std::io::Result<()> {
        std::fs::write(&self.temp, format!("{request}\n"))?;
        std::fs::rename(&self.temp, &self.path)
    }

    /// Watches the file's directory; make the watch before signalling, so no answer is missed.
    pub fn watch(&self) -> Result<Watch, Failure> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| Failure::Io(e.into()))?;
        inotify
            .add_watch(
                &self.dir,
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_CREATE,
            )
            .map_err(|e| Failure::Io(e.into()))?;
        Ok(Watch { inotify })
    }

    /// The first line of the file now (empty when there is none).
    fn first_line(&self) -> String {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
            .unwrap_or_default()
    }

    /// Waits until `answer` accepts the file's first line, giving up at `until` or as soon as
    /// process `pid` is gone.
    pub fn wait<T>(
        &self,
        watch: &Watch,
        pid: Pid,
        until: Instant,
        answer: impl Fn(&str) -> Option<T>,
    ) -> Result<T, Failure> {
        loop {
            if let Some(found) = answer(&self.first_line()) {
                return Ok(found);
            }
            if !alive(pid) {
                return Err(Failure::Gone);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            watch.wait(left.min(RECHECK))?;
        }
    }
}

/// An inotify watch on the ack file's directory.
pub struct Watch {
    inotify: Inotify,
}

impl Watch {
    /// Waits at most `at_most` for events, and drains them.
    fn wait(&self, at_most: Duration) -> Result<(), Failure> {
        let timeout = PollTimeout::try_from(at_most).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Failure::Io(e.into())),
        }
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => continue,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(Failure::Io(e.into())),
            }
        }
    }
}

/// Sends `signal` to `pid`: `Ok(false)` when the process is gone.
pub fn send(pid: Pid, signal: Signal) -> Result<bool, String> {
    match kill(pid, signal) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(format!("cannot send {signal} to process {pid}: {e}")),
    }
}
