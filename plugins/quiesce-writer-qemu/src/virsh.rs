//! Guests managed by libvirt, through `virsh`.
//!
//! libvirtd holds a guest's agent channel and its QMP monitor itself, so they are reached
//! through it: `virsh qemu-agent-command` (libvirt does the agent's `guest-sync` on its own
//! connection, and knows when no agent is connected in the guest), `virsh list`, `domuuid` and
//! `domblklist`. Every `virsh` runs under the call's deadline and is killed when it passes.
//! `qemu-agent-command` marks a domain "tainted: custom-ga-command" in libvirt's log; that is
//! all it does.

use crate::agent::{AgentError, AgentLink};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

/// Why a `virsh` command failed.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    /// libvirt has no running domain of that name.
    #[error("libvirt has no running domain {domain} ({uri}): {stderr}")]
    Gone {
        uri: String,
        domain: String,
        stderr: String,
    },
    #[error("virsh -c {uri} {command} did not finish in time (killed)")]
    Timeout { uri: String, command: String },
    #[error("virsh -c {uri} {command} failed: {stderr}")]
    Failed {
        uri: String,
        command: String,
        stderr: String,
    },
    #[error("cannot run virsh ({0}): install libvirt-clients")]
    Spawn(std::io::Error),
}

impl VirshError {
    pub fn is_gone(&self) -> bool {
        matches!(self, VirshError::Gone { .. })
    }
}

/// A libvirt connection, by URI (`qemu:///system`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Virsh {
    pub uri: String,
}

impl Virsh {
    /// Runs `virsh -c URI ARGS...` for `domain` (for messages; "" for none) before `deadline`:
    /// its stdout.
    pub fn run(
        &self,
        domain: &str,
        args: &[&str],
        deadline: Instant,
    ) -> Result<String, VirshError> {
        let command = args.first().copied().unwrap_or("").to_string();
        let child = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(VirshError::Spawn)?;
        let pid = Pid::from_raw(child.id() as i32);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let output = match rx.recv_timeout(left) {
            Ok(output) => output.map_err(VirshError::Spawn)?,
            Err(_) => {
                // The child is not reaped until the waiting thread sees it exit, so its pid is
                // still its own here.
                let _ = kill(pid, Signal::SIGKILL);
                let _ = rx.recv();
                return Err(VirshError::Timeout {
                    uri: self.uri.clone(),
                    command,
                });
            }
        };
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !domain.is_empty()
            && (stderr.contains("failed to get domain")
                || stderr.contains("Domain not found")
                || stderr.contains("domain is not running"))
        {
            return Err(VirshError::Gone {
                uri: self.uri.clone(),
                domain: domain.to_string(),
                stderr,
            });
        }
        Err(VirshError::Failed {
            uri: self.uri.clone(),
            command,
            stderr,
        })
    }

    /// The running domains.
    pub fn running(&self, deadline: Instant) -> Result<Vec<String>, VirshError> {
        Ok(self
            .run("", &["list", "--name"], deadline)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The hypervisor's version, as `virsh version` says it (`QEMU 7.2.22`).
    pub fn hypervisor(&self, deadline: Instant) -> Result<String, VirshError> {
        let text = self.run("", &["version"], deadline)?;
        Ok(text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Running hypervisor:"))
            .map(|v| v.trim().trim_start_matches("QEMU ").to_string())
            .unwrap_or_default())
    }
}

/// One disk of `virsh domblklist --details`: type (`file`, `block`, `network`, ...), device
/// (`disk`, `cdrom`), target (`vda`) and source (a path, or `-` for no medium).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub kind: String,
    pub device: String,
    pub target: String,
    pub source: String,
}

pub fn block_devices(text: &str) -> Vec<BlockDevice> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("---"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (kind, device, target) = (words.next()?, words.next()?, words.next()?);
            let source = words.collect::<Vec<_>>().join(" ");
            // The header line, when virsh prints one despite -q.
            (kind != "Type").then(|| BlockDevice {
                kind: kind.into(),
                device: device.into(),
                target: target.into(),
                source,
            })
        })
        .collect()
}

/// A guest's agent, through libvirt.
pub struct LibvirtAgent {
    pub virsh: Virsh,
    pub domain: String,
}

impl LibvirtAgent {
    fn via(&self) -> String {
        format!("libvirt {} domain {}", self.virsh.uri, self.domain)
    }

    fn execute(&self, command: &str, deadline: Instant) -> Result<Value, AgentError> {
        let request = json!({ "execute": command }).to_string();
        // libvirt's own bound, in whole seconds; the kill at the deadline is the exact one.
        let seconds = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1)
            .to_string();
        let out = self
            .virsh
            .run(
                &self.domain,
                &[
                    "qemu-agent-command",
                    &self.domain,
                    &request,
                    "--timeout",
                    &seconds,
                ],
                deadline,
            )
            .map_err(|e| self.classify(command, e))?;
        let answer: Value = serde_json::from_str(out.trim()).map_err(|_| AgentError::Protocol {
            command: command.into(),
            answer: out.trim().into(),
        })?;
        answer
            .get("return")
            .cloned()
            .ok_or_else(|| AgentError::Protocol {
                command: command.into(),
                answer: answer.to_string(),
            })
    }

    fn classify(&self, command: &str, error: VirshError) -> AgentError {
        let via = self.via();
        match error {
            VirshError::Gone { stderr, .. } => AgentError::Gone { via, cause: stderr },
            VirshError::Timeout { .. } => AgentError::Timeout {
                via,
                step: command.into(),
            },
            VirshError::Failed { stderr, .. } => {
                if stderr.contains("agent is not connected") || stderr.contains("not available") {
                    AgentError::NotConnected { via, cause: stderr }
                } else if stderr.contains("not responding") || stderr.contains("timed out") {
                    AgentError::Timeout {
                        via,
                        step: command.into(),
                    }
                } else if let Some((_, desc)) = stderr.split_once(&format!("'{command}': ")) {
                    AgentError::Refused {
                        command: command.into(),
                        class: "error".into(),
                        desc: desc.to_string(),
                    }
                } else {
                    AgentError::Io { via, cause: stderr }
                }
            }
            VirshError::Spawn(e) => AgentError::Io {
                via,
                cause: e.to_string(),
            },
        }
    }
}

impl AgentLink for LibvirtAgent {
    fn run(&self, commands: &[&str], deadline: Instant) -> Result<Vec<Value>, AgentError> {
        commands.iter().map(|c| self.execute(c, deadline)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domblklist_is_parsed() {
        let text = " Type   Device   Target   Source\n\
                    ------------------------------------------\n \
                    file   disk     vda      /srv/vms/web 1.img\n \
                    file   cdrom    sda      -\n \
                    network disk    vdb      pool/rbd-image\n";
        let devices = block_devices(text);
        assert_eq!(devices.len(), 3, "{devices:?}");
        assert_eq!(devices[0].source, "/srv/vms/web 1.img");
        assert_eq!(devices[1].source, "-");
        assert_eq!(devices[2].kind, "network");
    }

    #[test]
    fn libvirts_agent_errors_are_classified() {
        let agent = LibvirtAgent {
            virsh: Virsh {
                uri: "qemu:///system".into(),
            },
            domain: "web1".into(),
        };
        let failed = |stderr: &str| VirshError::Failed {
            uri: "qemu:///system".into(),
            command: "qemu-agent-command".into(),
            stderr: stderr.into(),
        };
        assert!(matches!(
            agent.classify(
                "guest-fsfreeze-status",
                failed("error: Guest agent is not responding: QEMU guest agent is not connected")
            ),
            AgentError::NotConnected { .. }
        ));
        let refused = agent.classify(
            "guest-fsfreeze-freeze",
            failed("error: internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze': Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state"),
        );
        assert!(
            matches!(&refused, AgentError::Refused { desc, .. } if desc.starts_with("Command guest-fsfreeze-freeze has been disabled")),
            "{refused}"
        );
    }
}
