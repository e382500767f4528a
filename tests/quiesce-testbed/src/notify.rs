//! A `NOTIFY_SOCKET` of a test's own: what a daemon tells its service manager (systemd's
//! notification protocol, `READY=1`, `STATUS=…`, `WATCHDOG=1`), without systemd.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct NotifySocket {
    socket: UnixDatagram,
    /// What to set `NOTIFY_SOCKET` to.
    pub path: PathBuf,
}

impl NotifySocket {
    /// Binds `DIR/notify.sock`.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        NotifySocket { socket, path }
    }

    /// The next datagram, waiting at most until `until` (a blocking read with a timeout).
    pub fn next(&self, until: Instant) -> Option<String> {
        let left = until.checked_duration_since(Instant::now())?;
        self.socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }

    /// Waits up to `timeout` for a datagram with a line for which `wanted` holds; returns the
    /// whole datagram. Fails naming `what`, what came instead and `log()`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
        log: impl Fn() -> String,
    ) -> String {
        let until = Instant::now() + timeout;
        let mut seen = vec![];
        while let Some(message) = self.next(until) {
            if message.lines().any(&wanted) {
                return message;
            }
            seen.push(message);
        }
        panic!(
            "no {what} on the notify socket within {timeout:?} (seen: {seen:?}):\n{}",
            log()
        )
    }

    /// What is queued on the socket now (the sender has exited: nothing more comes).
    pub fn queued(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut all = vec![];
        while let Ok(n) = self.socket.recv(&mut buf) {
            all.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        all
    }
}
