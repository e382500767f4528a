//! A client of the QEMU guest agent (`qemu-ga`) over its host-side socket.
//!
//! The protocol is JSON objects, one per line: `{"execute": "guest-fsfreeze-freeze"}` answered
//! by `{"return": 1}` or `{"error": {"class": ..., "desc": ...}}`. The channel is a byte stream
//! that outlives any one client: a reply to a command an earlier client sent (one that gave up
//! waiting) may still be in it. So every connection starts as libvirt's does and as the agent's
//! schema asks (`guest-sync-delimited`): send a `0xFF` byte (the agent drops any partial input
//! of an earlier client; it may answer that byte with a parse error, which is skipped), then
//! `guest-sync-delimited` with a random id; the agent answers `0xFF` followed by
//! `{"return": <id>}`. Everything before the sentinel, and any reply that does not carry our
//! id, is stale and skipped. Only then is the command sent.
//!
//! Each exchange opens its own connection and closes it. The agent serves one client at a time:
//! a long-lived connection would lock out every other tool (and an administrator's `socat`).

use crate::socket::{self, Lines, SocketError};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Why an exchange with the agent failed. `via` says how it was reached (`socket PATH`,
/// `libvirt URI domain NAME`).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The VM is not running: its socket is missing or refuses connections, or libvirt has no
    /// such running domain.
    #[error("the VM is not running ({via}: {cause})")]
    Gone { via: String, cause: String },
    /// No answer before the deadline, at the step named.
    #[error("the guest agent did not answer {step} in time ({via})")]
    Timeout { via: String, step: String },
    /// The channel to the agent is there, but no agent is on its other end (libvirt knows).
    #[error("no guest agent is connected in the guest ({via}: {cause})")]
    NotConnected { via: String, cause: String },
    #[error("the guest agent's channel closed during {step} ({via}; QEMU stopped?)")]
    Closed { via: String, step: String },
    #[error("talking to the guest agent ({via}): {cause}")]
    Io { via: String, cause: String },
    /// The agent answered with an error.
    #[error("the guest agent answered {command} with {class}: {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
    #[error("the guest agent's answer to {command} is not what its protocol says: {answer}")]
    Protocol { command: String, answer: String },
}

impl AgentError {
    /// The VM is not running (nothing of it can be frozen).
    pub fn is_gone(&self) -> bool {
        matches!(self, AgentError::Gone { .. })
    }
}

/// How a writer reaches a guest's agent: its socket, or libvirt.
pub trait AgentLink: Send + Sync + 'static {
    /// Runs `commands` (without arguments) in order, all before `deadline`; their `return`
    /// values.
    fn run(&self, commands: &[&str], deadline: Instant) -> Result<Vec<Value>, AgentError>;
}

/// One guest agent, reached through its socket.
#[derive(Debug, Clone)]
pub struct Agent {
    pub socket: PathBuf,
}

/// An open, synchronised connection to an agent.
pub struct Session<'a> {
    socket: &'a Path,
    lines: Lines,
}

impl AgentLink for Agent {
    fn run(&self, commands: &[&str], deadline: Instant) -> Result<Vec<Value>, AgentError> {
        let mut session = self.session(deadline)?;
        commands
            .iter()
            .map(|c| session.execute(c, None, deadline))
            .collect()
    }
}

impl Agent {
    pub fn new(socket: impl Into<PathBuf>) -> Agent {
        Agent {
            socket: socket.into(),
        }
    }

    /// Connects and synchronises, all before `deadline`.
    pub fn session(&self, deadline: Instant) -> Result<Session<'_>, AgentError> {
        let socket = self.socket.as_path();
        let stream = socket::connect(socket, deadline).map_err(|e| match e {
            SocketError::Gone(cause) => AgentError::Gone {
                via: via(socket),
                cause: cause.to_string(),
            },
            other => convert(socket, "the connection", other),
        })?;
        let mut session = Session {
            socket,
            lines: Lines::new(stream),
        };
        session.sync(deadline)?;
        Ok(session)
    }

    /// Connects, synchronises and runs one command.
    pub fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, AgentError> {
        self.session(deadline)?
            .execute(command, arguments, deadline)
    }
}

impl Session<'_> {
    fn sync(&mut self, deadline: Instant) -> Result<(), AgentError> {
        let id = random_id();
        let mut request = vec![0xff];
        request.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        request.push(b'\n');
        let step = "guest-sync-delimited";
        self.lines
            .send(&request, deadline)
            .map_err(|e| convert(self.socket, step, e))?;
        loop {
            let line = self
                .lines
                .line(deadline)
                .map_err(|e| convert(self.socket, step, e))?;
            // Our answer follows the last sentinel of its line; anything else is stale.
            let Some(at) = line.iter().rposition(|b| *b == 0xff) else {
                continue;
            };
            let answer: Option<Value> = serde_json::from_slice(&line[at + 1..]).ok();
            if answer.as_ref().and_then(|a| a.get("return")) == Some(&json!(id)) {
                return Ok(());
            }
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, AgentError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        let step = command.to_string();
        self.lines
            .send(&bytes, deadline)
            .map_err(|e| convert(self.socket, &step, e))?;
        let line = self
            .lines
            .line(deadline)
            .map_err(|e| convert(self.socket, &step, e))?;
        let answer: Value = serde_json::from_slice(&line).map_err(|_| AgentError::Protocol {
            command: step.clone(),
            answer: String::from_utf8_lossy(&line).into_owned(),
        })?;
        if let Some(value) = answer.get("return") {
            return Ok(value.clone());
        }
        if let Some(error) = answer.get("error") {
            let text = |key: &str| {
                error
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            return Err(AgentError::Refused {
                command: step,
                class: text("class"),
                desc: text("desc"),
            });
        }
        Err(AgentError::Protocol {
            command: step,
            answer: answer.to_string(),
        })
    }
}

fn via(socket: &Path) -> String {
    format!("socket {}", socket.display())
}

fn convert(socket: &Path, step: &str, error: SocketError) -> AgentError {
    let (via, step) = (via(socket), step.to_string());
    match error {
        SocketError::Timeout => AgentError::Timeout { via, step },
        SocketError::Closed => AgentError::Closed { via, step },
        SocketError::Gone(cause) => AgentError::Gone {
            via,
            cause: cause.to_string(),
        },
        SocketError::Io(cause) => AgentError::Io {
            via,
            cause: cause.to_string(),
        },
    }
}

/// A random id for `guest-sync-delimited` (below 2^31: the agent's integers are signed).
fn random_id() -> u64 {
    let mut bytes = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    let n = match random {
        Ok(()) => u32::from_le_bytes(bytes),
        // Only a collision with a stale reply of the same id could mislead: time will do.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1),
    };
    u64::from(n & 0x7fff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    /// The protocol's stream as the agent produces it after another client gave up: a stale
    /// reply, the parse error the 0xFF byte provokes, a stale delimited reply, ours.
    #[test]
    fn stale_replies_before_the_sentinel_and_other_ids_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let mut request = Vec::new();
            reader.read_until(b'\n', &mut request).unwrap();
            assert_eq!(request[0], 0xff, "the request starts with the 0xFF byte");
            let sync: Value = serde_json::from_slice(&request[1..]).unwrap();
            assert_eq!(sync["execute"], "guest-sync-delimited");
            let id = sync["arguments"]["id"].as_u64().unwrap();
            writer.write_all(b"{\"return\": 3}\n").unwrap();
            writer
                .write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\ufffd'\"}}\n")
                .unwrap();
            writer.write_all(b"\xff{\"return\": 12}\n").unwrap();
            // Junk on the line before our sentinel (half a stale reply).
            writer.write_all(b"{\"ret").unwrap();
            let mut ours = vec![0xff];
            ours.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
            writer.write_all(&ours).unwrap();
            let mut command = String::new();
            reader.read_line(&mut command).unwrap();
            assert_eq!(command.trim(), r#"{"execute":"guest-fsfreeze-freeze"}"#);
            writer.write_all(b"{\"return\": 2}\n").unwrap();
            reader.read_line(&mut command).unwrap();
        });
        let agent = Agent::new(&path);
        let deadline = Instant::now() + Duration::from_secs(10);
        let frozen = agent
            .execute("guest-fsfreeze-freeze", None, deadline)
            .unwrap();
        assert_eq!(frozen, json!(2));
        server.join().unwrap();
    }

    #[test]
    fn errors_and_silence_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let soon = || Instant::now() + Duration::from_millis(300);
        let gone = Agent::new(&path)
            .execute("guest-ping", None, soon())
            .unwrap_err();
        assert!(gone.is_gone(), "{gone}");

        // A socket nobody answers on (QEMU up, no agent in the guest): a timeout at the sync.
        let listener = UnixListener::bind(&path).unwrap();
        let silent = Agent::new(&path)
            .execute("guest-ping", None, soon())
            .unwrap_err();
        assert!(
            matches!(&silent, AgentError::Timeout { step, .. } if step == "guest-sync-delimited"),
            "{silent}"
        );
        drop(listener);
    }
}
