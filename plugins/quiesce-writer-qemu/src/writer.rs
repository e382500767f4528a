//! The writers: one per guest ([`GuestWriter`]), and one per volume that catches guests started
//! after the host loaded the plugin ([`NewGuestsWriter`]).

use crate::agent::{AgentError, AgentLink};
use crate::config::Settings;
use crate::guest::{self, Place, Source, VmInfo, VolumeRoot};
use quiesce_sdk::{log, Call, ComponentKind, Error, Level, Writer, WriterMetadata};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The writer of one guest: freeze and thaw through its agent.
pub struct GuestWriter {
    id: String,
    level: Level,
    source: Source,
    volumes: Arc<Vec<VolumeRoot>>,
    settings: Arc<Settings>,
    info: VmInfo,
    shared: Arc<Shared>,
}

/// What the writer's calls and its background thaw share.
struct Shared {
    /// The VM's name, for messages.
    vm: String,
    agent: Box<dyn AgentLink>,
    thaw_retry: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// An exchange with the agent is running (a call's, or the background thaw's). The agent
    /// serves one client at a time; two connections of ours would only queue behind each other.
    in_use: bool,
    /// The guest may be frozen by this writer: a freeze was sent (whether or not it was answered)
    /// and no thaw has been confirmed since. The set that froze it.
    frozen_by: Option<String>,
    /// The background thaw is running.
    retrying: bool,
    /// The writer is being dropped: the background thaw stops.
    closing: bool,
}

/// The agent, held for one exchange; released when dropped.
struct Exclusive<'a>(&'a Shared);

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.0.lock().in_use = false;
        self.0.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent for one exchange, waiting at most until `deadline` (None: as long as it takes,
    /// unless the writer closes).
    fn exclusive(&self, deadline: Option<Instant>) -> Option<Exclusive<'_>> {
        let mut state = self.lock();
        while state.in_use {
            if state.closing {
                return None;
            }
            state = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
        state.in_use = true;
        Some(Exclusive(self))
    }

    /// `guest-fsfreeze-thaw`, then `guest-fsfreeze-status` must say `thawed`: the number of file
    /// systems thawed.
    fn thaw(&self, deadline: Instant) -> Result<i64, AgentError> {
        let answers = self
            .agent
            .run(&["guest-fsfreeze-thaw", "guest-fsfreeze-status"], deadline)?;
        let (thawed, status) = (&answers[0], &answers[1]);
        if status.as_str() != Some("thawed") {
            return Err(AgentError::Protocol {
                command: "guest-fsfreeze-status after guest-fsfreeze-thaw (expected \"thawed\")"
                    .into(),
                answer: status.to_string(),
            });
        }
        Ok(thawed.as_i64().unwrap_or(0))
    }

    /// Keeps thawing in the background until the agent confirms (or the VM is gone, or the
    /// writer is dropped). Started when a thaw did not reach the guest: the kernel keeps a
    /// file system frozen whatever happens to the agent that froze it, so an agent that died or
    /// hangs leaves the guest frozen until something thaws it — and nobody else will.
    fn keep_thawing(self: &Arc<Self>) {
        {
            let mut state = self.lock();
            if state.retrying || state.frozen_by.is_none() {
                return;
            }
            state.retrying = true;
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("qemu-thaw-{}", self.vm))
            .spawn(move || shared.thaw_loop());
        if let Err(e) = spawned {
            self.lock().retrying = false;
            log::error!(
                "VM {}: cannot start the background thaw ({e}); the next call thaws instead",
                self.vm
            );
        }
    }

    fn thaw_loop(&self) {
        let started = Instant::now();
        let attempt_budget = (self.thaw_retry * 2).max(Duration::from_secs(2));
        let mut attempts = 0u64;
        loop {
            {
                let state = self.lock();
                let (state, _) = self
                    .changed
                    .wait_timeout_while(state, self.thaw_retry, |s| {
                        !s.closing && s.frozen_by.is_some()
                    })
                    .unwrap_or_else(|e| e.into_inner());
                if state.closing || state.frozen_by.is_none() {
                    drop(state);
                    self.stop_retrying();
                    return;
                }
            }
            let Some(agent) = self.exclusive(None) else {
                self.stop_retrying();
                return;
            };
            // A call may have thawed it while we waited for the agent.
            if self.lock().frozen_by.is_none() {
                drop(agent);
                self.stop_retrying();
                return;
            }
            attempts += 1;
            let result = self.thaw(Instant::now() + attempt_budget);
            let set = self.lock().frozen_by.clone().unwrap_or_default();
            match result {
                Ok(n) => {
                    self.lock().frozen_by = None;
                    log::info!(
                        "VM {}: thawed by the writer's background thaw ({n} file systems, set \
                         {set}), attempt {attempts}, {:.1} s after the thaw that failed",
                        self.vm,
                        started.elapsed().as_secs_f64()
                    );
                }
                Err(e) if e.is_gone() => {
                    self.lock().frozen_by = None;
                    log::warn!(
                        "VM {}: stopped while it was frozen by set {set} ({e}); nothing is left to thaw",
                        self.vm
                    );
                }
                Err(e) => {
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        log::error!(
                            "VM {}: still frozen by set {set}? the background thaw failed \
                             (attempt {attempts}): {e}; retrying every {} ms — check qemu-ga in \
                             the guest",
                            self.vm,
                            self.thaw_retry.as_millis()
                        );
                    }
                    continue;
                }
            }
            drop(agent);
            self.stop_retrying();
            return;
        }
    }

    fn stop_retrying(&self) {
        self.lock().retrying = false;
        self.changed.notify_all();
    }
}

/// The end of a call's budget less a margin to answer in time: a fifth of what is left, at
/// most a second. The writer's own error ("no answer from the agent ...") says more than the
/// host's "no answer within its deadline", and on a loaded node the answer needs time to get
/// back through the host's worker.
fn agent_deadline(call: &Call) -> Instant {
    let left = call.remaining();
    call.deadline() - (left / 5).min(Duration::from_secs(1))
}

impl GuestWriter {
    pub fn new(
        source: Source,
        info: VmInfo,
        volumes: Arc<Vec<VolumeRoot>>,
        settings: Arc<Settings>,
    ) -> GuestWriter {
        GuestWriter {
            id: guest::writer_id(&settings.id_prefix, &info.name),
            level: settings.level,
            shared: Arc::new(Shared {
                vm: info.name.clone(),
                agent: source.agent(),
                thaw_retry: settings.thaw_retry(),
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
            source,
            volumes,
            settings,
            info,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    fn vm(&self) -> &str {
        &self.shared.vm
    }

    fn agent_for(&self, call: &Call, what: &str) -> Result<Exclusive<'_>, Error> {
        self.shared
            .exclusive(Some(agent_deadline(call)))
            .ok_or_else(|| {
                Error::new(format!(
                    "VM {}: {what}: the guest agent stayed busy with the writer's background \
                     thaw until the call's deadline",
                    self.vm()
                ))
            })
    }

    /// Thaws if this writer may have frozen the guest; confirms it with the agent.
    fn release(&mut self, call: &mut Call, what: &str) -> Result<(), Error> {
        let Some(set) = self.shared.lock().frozen_by.clone() else {
            call.report(
                "thaw",
                "nothing to thaw: this writer has not frozen the guest",
            );
            return Ok(());
        };
        let agent = self.agent_for(call, what)?;
        let started = Instant::now();
        let result = self.shared.thaw(agent_deadline(call));
        drop(agent);
        match result {
            Ok(n) => {
                self.shared.lock().frozen_by = None;
                self.shared.changed.notify_all();
                call.report("filesystems_thawed", n.to_string());
                call.report("fsfreeze_status", "thawed");
                call.report("thaw_ms", started.elapsed().as_millis().to_string());
                Ok(())
            }
            Err(e) if e.is_gone() => {
                self.shared.lock().frozen_by = None;
                Err(Error::new(format!(
                    "VM {}: {what}: the VM is gone — {e}. A VM that is not running is not \
                     frozen, but the set cannot vouch for its disks",
                    self.vm()
                )))
            }
            Err(e) => {
                self.shared.keep_thawing();
                Err(Error::new(format!(
                    "VM {}: {what} did not reach the guest (frozen by set {set}): {e}. Its file \
                     systems stay frozen until its agent answers — the guest kernel holds a \
                     freeze even when the agent that made it died. This writer keeps sending \
                     guest-fsfreeze-thaw every {} ms in the background until \
                     guest-fsfreeze-status says thawed, and fails the next set's prepare until \
                     then; check qemu-ga in the guest (systemctl status qemu-guest-agent)",
                    self.vm(),
                    self.shared.thaw_retry.as_millis()
                )))
            }
        }
    }

    fn refresh(&mut self, call: &mut Call) -> Result<(), Error> {
        let deadline = agent_deadline(call).min(Instant::now() + self.settings.query_timeout());
        let info = self.source.query(&self.volumes, deadline).map_err(|e| {
            if e.is_gone() {
                Error::new(format!(
                    "VM {} is gone: {e}. It stopped after quiesce-host loaded the qemu plugin; \
                     its writer fails every set until the VM runs again (or restart \
                     quiesce-host to drop it)",
                    self.vm()
                ))
            } else {
                Error::new(format!("VM {}: cannot read its disks: {e}", self.vm()))
            }
        })?;
        let on: Vec<String> = info.on_volumes().map(|(d, _)| d.describe()).collect();
        let off: Vec<String> = info
            .disks
            .iter()
            .filter(|d| !matches!(d.place, Place::Volume(_)))
            .map(|d| d.describe())
            .collect();
        call.report("disks", on.join("; "));
        if !off.is_empty() {
            call.report("disks_not_in_snapshot", off.join("; "));
        }
        for d in info
            .disks
            .iter()
            .filter(|d| matches!(d.place, Place::Nested { .. }))
        {
            log::warn!("VM {}: disk {}", self.vm(), d.describe());
        }
        self.info = info;
        Ok(())
    }
}

impl Drop for GuestWriter {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closing = true;
        if let Some(set) = &state.frozen_by {
            log::error!(
                "VM {}: the writer goes away while the guest may still be frozen by set {set} \
                 (its thaw never reached the guest agent): thaw it by hand with \
                 guest-fsfreeze-thaw once its agent answers",
                self.shared.vm
            );
        }
        drop(state);
        self.shared.changed.notify_all();
    }
}

impl Writer for GuestWriter {
    fn metadata(&self) -> WriterMetadata {
        let mut metadata = WriterMetadata::new(
            &self.id,
            format!("QEMU guest {}", self.info.name),
            self.level,
        );
        metadata.instance = if self.info.uuid.is_empty() {
            self.source.fallback_name().to_string()
        } else {
            self.info.uuid.clone()
        };
        metadata.vendor_version = format!("QEMU {}", self.info.qemu_version);
        // A freeze is a sync of the guest's dirty pages: usually well under a second.
        metadata.expected_freeze_ms = 1000;
        for (disk, volume) in self.info.on_volumes() {
            let path = disk
                .real
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| disk.file.clone());
            metadata =
                metadata.with_component(disk.component(), ComponentKind::Files, volume, [path]);
        }
        metadata
    }

    /// Thaws what an earlier set left frozen; checks the VM runs (its disks, through QMP) and
    /// that its agent answers and the guest is not frozen by someone else. Nothing freezes here.
    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        let left_frozen = self.shared.lock().frozen_by.clone();
        if let Some(set) = left_frozen {
            self.release(call, "the thaw left over from an earlier set")
                .map_err(|e| {
                    e.context(format!(
                        "VM {} is still frozen by set {set}; no new set until it is thawed",
                        self.vm()
                    ))
                })?;
            call.report(
                "thawed_first",
                format!("the guest was still frozen by set {set}"),
            );
        }
        self.refresh(call)?;
        let agent = self.agent_for(call, "prepare")?;
        let started = Instant::now();
        let status = self
            .shared
            .agent
            .run(&["guest-fsfreeze-status"], agent_deadline(call))
            .map(|mut a| a.remove(0));
        drop(agent);
        let status = status.map_err(|e| {
            Error::new(format!(
                "VM {}: no answer from its guest agent to guest-fsfreeze-status within {} ms: \
                 {e}. Is qemu-guest-agent installed and running in the guest, with the \
                 virtio-serial channel org.qemu.guest_agent.0? Nothing was frozen",
                self.vm(),
                started.elapsed().as_millis()
            ))
        })?;
        match status.as_str() {
            Some("thawed") => {}
            Some("frozen") => {
                return Err(Error::new(format!(
                    "VM {} is frozen already (guest-fsfreeze-status says frozen), and not by \
                     this writer: another tool or an administrator froze it. Thaw it \
                     (guest-fsfreeze-thaw) once that is done; nothing was frozen by this set",
                    self.vm()
                )))
            }
            _ => {
                return Err(Error::new(format!(
                    "VM {}: guest-fsfreeze-status answered {status}, expected thawed or frozen",
                    self.vm()
                )))
            }
        }
        call.report(
            "agent",
            format!(
                "answered guest-fsfreeze-status (thawed) in {} ms",
                started.elapsed().as_millis()
            ),
        );
        Ok(())
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        let agent = self.agent_for(call, "freeze")?;
        // Marked before the command goes out: a freeze that is not answered in time may still
        // be carried out, and must then be thawed.
        self.shared.lock().frozen_by = Some(call.set_id().to_string());
        let started = Instant::now();
        let result = self
            .shared
            .agent
            .run(&["guest-fsfreeze-freeze"], agent_deadline(call))
            .map(|mut a| a.remove(0));
        drop(agent);
        let ms = started.elapsed().as_millis();
        match result {
            Ok(Value::Number(n)) => {
                let n = n.as_i64().unwrap_or(0);
                if n == 0 {
                    log::warn!(
                        "VM {}: the guest agent froze no file system (none it can freeze is mounted)",
                        self.vm()
                    );
                }
                call.report("filesystems_frozen", n.to_string());
                call.report("freeze_ms", ms.to_string());
                call.report("vm", self.info.name.clone());
                if !self.info.uuid.is_empty() {
                    call.report("uuid", self.info.uuid.clone());
                }
                Ok(())
            }
            Ok(other) => Err(Error::new(format!(
                "VM {}: guest-fsfreeze-freeze answered {other}, expected a number; the abort \
                 that follows thaws the guest",
                self.vm()
            ))),
            Err(e) if e.is_gone() => {
                self.shared.lock().frozen_by = None;
                Err(Error::new(format!(
                    "VM {} is gone: {e}; it stopped after the set's prepare",
                    self.vm()
                )))
            }
            Err(e) => Err(Error::new(format!(
                "VM {}: guest-fsfreeze-freeze failed after {ms} ms: {e}; the abort that follows \
                 thaws the guest",
                self.vm()
            ))),
        }
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        self.release(call, "the thaw")
    }

    fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
        self.release(call, "the abort's thaw")
    }
}

/// Fails the sets of one volume while a guest with disks on it runs without a writer: one that
/// started after the host loaded the plugin (the host takes a plugin's writers once, at load),
/// or whose disks could not be read then.
pub struct NewGuestsWriter {
    id: String,
    volume: VolumeRoot,
    settings: Arc<Settings>,
    volumes: Arc<Vec<VolumeRoot>>,
    /// Keys ([`Source::key`]) of the guests that have a writer.
    covered: BTreeSet<String>,
}

impl NewGuestsWriter {
    pub fn new(
        volume: VolumeRoot,
        volumes: Arc<Vec<VolumeRoot>>,
        settings: Arc<Settings>,
        covered: BTreeSet<String>,
    ) -> NewGuestsWriter {
        let clean = guest::writer_id("", &volume.name);
        NewGuestsWriter {
            id: format!("{}new-guests.{clean}", settings.id_prefix)
                .chars()
                .take(64)
                .collect(),
            volume,
            settings,
            volumes,
            covered,
        }
    }
}

impl Writer for NewGuestsWriter {
    fn metadata(&self) -> WriterMetadata {
        WriterMetadata::new(
            &self.id,
            format!(
                "QEMU guests on volume {} without a writer (started after the host loaded the plugin)",
                self.volume.name
            ),
            self.settings.level,
        )
        .with_component(
            "guests",
            ComponentKind::Files,
            &self.volume.name,
            [self.volume.configured.display().to_string()],
        )
    }

    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        let deadline = agent_deadline(call).min(Instant::now() + self.settings.query_timeout());
        let found = guest::discover(&self.settings, deadline)
            .map_err(|e| e.context("guests on this volume may have no writer"))?;
        let mut problems = Vec::new();
        let mut checked = Vec::new();
        for source in found.iter().filter(|s| !self.covered.contains(&s.key())) {
            let deadline = agent_deadline(call).min(Instant::now() + self.settings.query_timeout());
            match source.query(&self.volumes, deadline) {
                Ok(info) if info.on_volume(&self.volume.name) => problems.push(format!(
                    "VM {} ({}) has disks on volume {} ({}) but no writer: it started \
                     after quiesce-host loaded the qemu plugin, and the host takes a plugin's \
                     writers only when it loads it",
                    info.name,
                    source.describe(),
                    self.volume.name,
                    info.on_volumes()
                        .filter(|(_, v)| *v == self.volume.name)
                        .map(|(d, _)| d.describe())
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
                Ok(info) => checked.push(info.name),
                // A stale socket of a VM that stopped: nothing of it runs.
                Err(e) if e.is_gone() => {}
                Err(e) => problems.push(format!(
                    "VM of {}: its disks cannot be read ({e}), so it may lie on volume {}",
                    source.describe(),
                    self.volume.name
                )),
            }
        }
        if !problems.is_empty() {
            return Err(Error::new(format!(
                "{}. Restart quiesce-host so that the plugin makes a writer for it (or stop the \
                 VM, or set new_guests = \"ignore\" in [plugins.qemu] to accept that its disks \
                 are only crash-consistent in the snapshot); nothing was frozen",
                problems.join("; ")
            )));
        }
        call.report(
            "guests_without_writer",
            if checked.is_empty() {
                "none".to_string()
            } else {
                format!("{} (not on this volume)", checked.join(", "))
            },
        );
        Ok(())
    }

    fn freeze(&mut self, _: &mut Call) -> Result<(), Error> {
        Ok(())
    }

    fn thaw(&mut self, _: &mut Call) -> Result<(), Error> {
        Ok(())
    }
}
