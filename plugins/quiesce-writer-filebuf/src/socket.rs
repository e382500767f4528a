//! The control-socket variant: one stream connection to the application, one line per request,
//! one line per answer, every step bounded by a deadline.

use crate::wait::Failure;
use nix::errno::Errno;
use nix::sys::socket::{
    connect, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest answer line accepted.
const MAX_LINE: usize = 4096;

/// An open control connection. While it is open after a `FROZEN`, the application holds writes;
/// closing it (dropping this) releases them, by protocol.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Bytes read past the last answer line.
    pending: Vec<u8>,
}

impl Connection {
    /// Connects to the socket at `path`, giving up at `until`.
    ///
    /// A blocking `connect` to a Unix socket whose listener does not accept and whose backlog is
    /// full would block for ever: the socket is non-blocking while connecting, and a full backlog
    /// (`EAGAIN`) is retried until the deadline.
    pub fn connect(path: &Path, until: Instant) -> Result<Connection, Failure> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| Failure::Io(e.into()))?;
        let address = UnixAddr::new(path).map_err(|e| Failure::Io(e.into()))?;
        let mut pause = Duration::from_millis(1);
        loop {
            match connect(fd.as_raw_fd(), &address) {
                Ok(()) => break,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    // The listener's backlog is full: nothing to wait on but time.
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Failure::Timeout);
                    }
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(Failure::Io(e.into())),
            }
        }
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(false).map_err(Failure::Io)?;
        Ok(Connection {
            stream,
            pending: Vec::new(),
        })
    }

    /// Sends `request` (one line, without its `\n`) and returns the answer line (without it),
    /// giving up at `until`.
    pub fn request(&mut self, request: &str, until: Instant) -> Result<String, Failure> {
        self.send(request, until)?;
        self.read_line(until)
    }

    /// Writes the request with `MSG_NOSIGNAL`: an application that went away gives `EPIPE`,
    /// never a `SIGPIPE` that would kill the host.
    fn send(&mut self, request: &str, until: Instant) -> Result<(), Failure> {
        let line = format!("{request}\n");
        let mut bytes = line.as_bytes();
        while !bytes.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            self.stream
                .set_write_timeout(Some(left))
                .map_err(Failure::Io)?;
            match send(self.stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(Failure::Timeout),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(Failure::Closed),
                Err(e) => return Err(Failure::Io(e.into())),
            }
        }
        Ok(())
    }

    fn read_line(&mut self, until: Instant) -> Result<String, Failure> {
        let mut buf = [0u8; 512];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line[..end]);
                return Ok(text.trim_end_matches('\r').to_string());
            }
            if self.pending.len() > MAX_LINE {
                return Err(Failure::Protocol(format!(
                    "an answer longer than {MAX_LINE} bytes without a newline"
                )));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(Failure::Io)?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(Failure::Timeout),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(Failure::Closed),
                Err(e) => return Err(Failure::Io(e)),
            }
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}
