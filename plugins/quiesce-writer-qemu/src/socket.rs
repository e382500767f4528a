//! Unix-socket plumbing shared by the guest-agent and QMP clients: a connect bounded by a
//! deadline, and line reads bounded by it.
//!
//! QEMU's socket chardevs (the agent's and QMP's) serve **one client at a time**: a second
//! client's connection waits in the listen backlog until the first one closes, and once the
//! backlog is full `connect` itself would block. Connecting is therefore non-blocking and
//! retried until the deadline, and every read has the deadline as its timeout.

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Why talking over a socket failed.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Nothing listens there: the socket file is missing or refuses connections (QEMU stopped).
    #[error("{0}")]
    Gone(io::Error),
    #[error("no answer in time")]
    Timeout,
    #[error("the other side closed the connection")]
    Closed,
    #[error("{0}")]
    Io(io::Error),
}

/// Connects to the Unix socket `path`, retrying while its backlog is full, until `deadline`.
pub fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, SocketError> {
    let addr = UnixAddr::new(path).map_err(|e| SocketError::Io(e.into()))?;
    loop {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| SocketError::Io(e.into()))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false).map_err(SocketError::Io)?;
                return Ok(stream);
            }
            // A Unix socket whose backlog is full answers EAGAIN to a non-blocking connect.
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20).min(left(deadline)));
            }
            Err(Errno::EAGAIN) => return Err(SocketError::Timeout),
            Err(e @ (Errno::ENOENT | Errno::ECONNREFUSED | Errno::ENOTDIR)) => {
                return Err(SocketError::Gone(e.into()))
            }
            Err(e) => return Err(SocketError::Io(e.into())),
        }
    }
}

/// What is left until `deadline`, at least 1 ms (a zero socket timeout means "none").
pub fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A connection read line by line (both protocols end each message with a newline).
pub struct Lines {
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl Lines {
    pub fn new(stream: UnixStream) -> Lines {
        Lines {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Sends `bytes` whole, before `deadline`.
    pub fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), SocketError> {
        if Instant::now() >= deadline {
            return Err(SocketError::Timeout);
        }
        self.stream
            .set_write_timeout(Some(left(deadline)))
            .map_err(SocketError::Io)?;
        self.stream.write_all(bytes).map_err(classify)
    }

    /// The next line (without its newline), read before `deadline`.
    pub fn line(&mut self, deadline: Instant) -> Result<Vec<u8>, SocketError> {
        loop {
            if let Some(at) = self.buffer.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if Instant::now() >= deadline {
                return Err(SocketError::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left(deadline)))
                .map_err(SocketError::Io)?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(SocketError::Closed),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(classify(e)),
            }
        }
    }
}

fn classify(e: io::Error) -> SocketError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => SocketError::Timeout,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => SocketError::Closed,
        _ => SocketError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_missing_socket_is_gone_and_a_silent_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let soon = Instant::now() + Duration::from_millis(200);
        assert!(matches!(connect(&path, soon), Err(SocketError::Gone(_))));

        let _listener = UnixListener::bind(&path).unwrap();
        let stream = connect(&path, soon).unwrap();
        let mut lines = Lines::new(stream);
        let started = Instant::now();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert!(matches!(lines.line(deadline), Err(SocketError::Timeout)));
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn lines_are_split_and_a_closed_peer_is_reported() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"one\r\ntwo\nthr").unwrap();
        drop(b);
        let mut lines = Lines::new(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(lines.line(deadline).unwrap(), b"one");
        assert_eq!(lines.line(deadline).unwrap(), b"two");
        assert!(matches!(lines.line(deadline), Err(SocketError::Closed)));
    }
}
