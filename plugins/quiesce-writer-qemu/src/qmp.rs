//! A client of QEMU's monitor protocol (QMP) over its Unix socket, for what the host side knows
//! about a guest: its name, UUID and disks (`query-name`, `query-uuid`, `query-block`).
//!
//! A session: QEMU greets (`{"QMP": {"version": ...}}`), the client sends `qmp_capabilities`,
//! then commands, each answered by `{"return": ...}` or `{"error": ...}`; asynchronous
//! `{"event": ...}` messages may come in between and are skipped. Like the agent's, a QMP
//! socket serves one client at a time, so every query opens a connection and closes it.

use crate::socket::{self, Lines, SocketError};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("its QMP socket {socket} refuses connections ({cause}): the VM is not running")]
    Gone { socket: PathBuf, cause: String },
    #[error(
        "QEMU did not answer {step} on its QMP socket {socket} in time (another client connected?)"
    )]
    Timeout { socket: PathBuf, step: String },
    #[error("QEMU closed its QMP socket {socket} during {step}")]
    Closed { socket: PathBuf, step: String },
    #[error("talking to QEMU through {socket}: {cause}")]
    Io { socket: PathBuf, cause: String },
    #[error("QEMU answered {command} with {class}: {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU's answer to {step} on {socket} is not QMP: {answer}")]
    Protocol {
        socket: PathBuf,
        step: String,
        answer: String,
    },
}

impl QmpError {
    pub fn is_gone(&self) -> bool {
        matches!(self, QmpError::Gone { .. })
    }
}

/// An open QMP session, past the capabilities negotiation.
pub struct Qmp {
    socket: PathBuf,
    lines: Lines,
    /// QEMU's version as its greeting gives it (`7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)`).
    pub version: String,
    /// The QEMU process (its peer credentials), to resolve disk paths relative to its directory.
    pub pid: Option<i32>,
}

impl Qmp {
    pub fn connect(socket: &Path, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = socket::connect(socket, deadline).map_err(|e| match e {
            SocketError::Gone(cause) => QmpError::Gone {
                socket: socket.into(),
                cause: cause.to_string(),
            },
            other => convert(socket, "the connection", other),
        })?;
        let pid = getsockopt(&stream, PeerCredentials).ok().map(|c| c.pid());
        let mut qmp = Qmp {
            socket: socket.into(),
            lines: Lines::new(stream),
            version: String::new(),
            pid,
        };
        let greeting = qmp.message("the greeting", deadline)?;
        let Some(info) = greeting.get("QMP") else {
            return Err(qmp.protocol("the greeting", &greeting));
        };
        let v = &info["version"]["qemu"];
        qmp.version = format!(
            "{}.{}.{}",
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0)
        );
        if let Some(package) = info["version"]["package"]
            .as_str()
            .filter(|p| !p.is_empty())
        {
            qmp.version.push_str(&format!(" ({})", package.trim()));
        }
        qmp.execute("qmp_capabilities", deadline)?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, deadline: Instant) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command }).to_string().into_bytes();
        request.push(b'\n');
        self.lines
            .send(&request, deadline)
            .map_err(|e| convert(&self.socket, command, e))?;
        loop {
            let answer = self.message(command, deadline)?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                let text = |k: &str| error[k].as_str().unwrap_or("?").to_string();
                return Err(QmpError::Refused {
                    command: command.into(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(self.protocol(command, &answer));
        }
    }

    fn message(&mut self, step: &str, deadline: Instant) -> Result<Value, QmpError> {
        let line = self
            .lines
            .line(deadline)
            .map_err(|e| convert(&self.socket, step, e))?;
        serde_json::from_slice(&line).map_err(|_| QmpError::Protocol {
            socket: self.socket.clone(),
            step: step.into(),
            answer: String::from_utf8_lossy(&line).into_owned(),
        })
    }

    fn protocol(&self, step: &str, answer: &Value) -> QmpError {
        QmpError::Protocol {
            socket: self.socket.clone(),
            step: step.into(),
            answer: answer.to_string(),
        }
    }
}

fn convert(socket: &Path, step: &str, error: SocketError) -> QmpError {
    let (socket, step) = (socket.to_path_buf(), step.to_string());
    match error {
        SocketError::Timeout => QmpError::Timeout { socket, step },
        SocketError::Closed => QmpError::Closed { socket, step },
        SocketError::Gone(cause) => QmpError::Gone {
            socket,
            cause: cause.to_string(),
        },
        SocketError::Io(cause) => QmpError::Io {
            socket,
            cause: cause.to_string(),
        },
    }
}

/// One disk image file as `query-block` names it: the device, the file, and its place in the
/// backing chain (0: the active image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockFile {
    pub device: String,
    pub file: String,
    pub depth: usize,
    pub read_only: bool,
}

/// The image files of every device with a medium, active images and their backing chains.
pub fn block_files(query_block: &Value) -> Vec<BlockFile> {
    let mut files = Vec::new();
    for (index, device) in query_block.as_array().into_iter().flatten().enumerate() {
        let Some(inserted) = device.get("inserted") else {
            continue; // an empty CD-ROM drive
        };
        let name = device["device"]
            .as_str()
            .filter(|d| !d.is_empty())
            .or_else(|| device["qdev"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("block{index}"));
        let read_only = inserted["ro"].as_bool().unwrap_or(false);
        let mut image = inserted.get("image");
        let mut depth = 0;
        while let Some(i) = image {
            if let Some(file) = i["filename"].as_str() {
                files.push(BlockFile {
                    device: name.clone(),
                    file: file.to_string(),
                    depth,
                    // Backing images are never written through this device.
                    read_only: read_only || depth > 0,
                });
            }
            image = i.get("backing-image");
            depth += 1;
        }
        if depth == 0 {
            if let Some(file) = inserted["file"].as_str() {
                files.push(BlockFile {
                    device: name.clone(),
                    file: file.to_string(),
                    depth: 0,
                    read_only,
                });
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_files_follow_backing_chains_and_skip_empty_drives() {
        let reply = json!([
            {"device": "disk0", "inserted": {"ro": false, "file": "/v/top.qcow2",
                "image": {"filename": "/v/top.qcow2",
                    "backing-image": {"filename": "/v/base.qcow2"}}}},
            {"device": "cd0", "removable": true},
            {"device": "", "qdev": "/machine/peripheral/vd1/virtio-backend",
                "inserted": {"ro": true, "file": "data.img",
                    "image": {"filename": "data.img"}}}
        ]);
        assert_eq!(
            block_files(&reply),
            vec![
                BlockFile {
                    device: "disk0".into(),
                    file: "/v/top.qcow2".into(),
                    depth: 0,
                    read_only: false
                },
                BlockFile {
                    device: "disk0".into(),
                    file: "/v/base.qcow2".into(),
                    depth: 1,
                    read_only: true
                },
                BlockFile {
                    device: "/machine/peripheral/vd1/virtio-backend".into(),
                    file: "data.img".into(),
                    depth: 0,
                    read_only: true
                },
            ]
        );
    }
}
