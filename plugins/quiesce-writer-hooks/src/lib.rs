//! The quiesce writer plugin for hook scripts (plugin name `hooks`). Configuration and
//! reports: `README.md`.
//!
//! For everything that has no writer of its own: a directory of executables, each run with one
//! argument — `freeze`, `thaw` or `freezeFail` — the convention of VMware Tools' freeze/thaw
//! scripts and of the QEMU guest agent's `fsfreeze-hook.d`, so existing scripts work as they are.
//!
//! - **prepare** lists the hooks (the directory must exist) and reports them.
//! - **freeze** runs each hook with `freeze`, sorted by name, one after the other. A hook that
//!   exits non-zero, dies of a signal, cannot start or outlives its timeout fails the call — the
//!   set aborts — with the hook's stderr in the message; the hooks after it do not run.
//! - **thaw** runs `thaw` for the hooks that froze, in reverse order, all of them even when one
//!   fails (a hook left frozen is the worst outcome); it fails the call if any failed.
//! - **abort** after a freeze that went (partly) through runs `freezeFail` for the hooks that
//!   froze, in reverse order, and nothing else. A hook whose freeze failed or timed out is not
//!   one that froze: it gets nothing.
//! - thaw and abort are idempotent: a hook gets at most one of `thaw` / `freezeFail` per freeze.
//!   If a thaw ran out of time half-way, the abort that follows finishes it with `thaw`.
//!
//! Each hook runs under the smaller of `timeout_ms` and what is left of the call's budget (less a
//! small margin to answer in time); past it the hook's whole process group is killed. Its exit,
//! and the end of its stdout and stderr, go into the call's reports.
//!
//! The level is `system`: hooks freeze after every application writer and thaw before them.

mod config;
mod hook;

pub use config::HookDir;

use hook::Hook;
use quiesce_sdk::{log, Call, ComponentKind, Config, Error, Level, Writer, WriterMetadata};
use std::time::Duration;

/// Makes one writer per configured hook directory.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    Ok(config::parse(config)?
        .into_iter()
        .map(|dir| Box::new(HooksWriter::new(dir)) as Box<dyn Writer>)
        .collect())
}

quiesce_sdk::export_plugin!(name: "hooks", init: init);

/// The writer of one hook directory.
pub struct HooksWriter {
    dir: HookDir,
    /// The hooks whose `freeze` succeeded and that have had neither `thaw` nor `freezeFail`.
    frozen: Vec<Hook>,
    /// A thaw began: what is still frozen gets `thaw`, not `freezeFail`.
    thawing: bool,
}

impl HooksWriter {
    pub fn new(dir: HookDir) -> HooksWriter {
        HooksWriter {
            dir,
            frozen: Vec::new(),
            thawing: false,
        }
    }

    fn list(&self) -> Result<Vec<Hook>, Error> {
        let (hooks, skipped) = hook::list(&self.dir.directory).map_err(|e| {
            Error::new(format!(
                "cannot read the hook directory {}: {e}; create it (it may be empty) or fix \
                 `directory`",
                self.dir.directory.display()
            ))
        })?;
        for s in &skipped {
            log::info!(
                "{}: skipping {}: {}",
                self.dir.id,
                self.dir.directory.join(&s.name).display(),
                s.why
            );
        }
        Ok(hooks)
    }

    /// The time a hook may take now: `timeout_ms`, bounded by the call's budget less a margin
    /// to kill it and answer in time.
    fn limit(&self, call: &Call) -> Duration {
        let left = call.remaining();
        let margin = (left / 10).min(Duration::from_millis(250));
        Duration::from_millis(self.dir.timeout_ms).min(left.saturating_sub(margin))
    }

    fn env(&self, call: &Call) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("QUIESCE_SET_ID", call.set_id().to_string()),
            ("QUIESCE_WRITER_ID", self.dir.id.clone()),
        ];
        if let Some(volume) = &self.dir.volume {
            env.push(("QUIESCE_VOLUME", volume.clone()));
        }
        env
    }

    /// Runs `action` for one hook and reports it; the failure message if it failed.
    fn run(&self, call: &mut Call, hook: &Hook, action: &str) -> Result<(), String> {
        let limit = self.limit(call);
        if limit.is_zero() {
            return Err(format!(
                "hook {}: no time left in the {action} call's budget to run it; raise the host's \
                 [timeouts] or lower `timeout_ms`",
                hook.name
            ));
        }
        let env = self.env(call);
        let run = hook::run(
            hook,
            action,
            &env,
            limit,
            self.dir.output_bytes,
            call.deadline(),
        );
        let key = format!("{action}.{}", hook.name);
        log::info!("{}: {} {action}: {}", self.dir.id, hook.name, run.summary());
        call.report(key.clone(), run.summary());
        if !run.stdout.is_empty() {
            call.report(format!("{key}.stdout"), run.stdout.clone());
        }
        if !run.stderr.is_empty() {
            call.report(format!("{key}.stderr"), run.stderr.clone());
        }
        if run.succeeded() {
            return Ok(());
        }
        let mut message = format!(
            "hook {} ({}) {action}: {}",
            hook.name,
            hook.path.display(),
            run.summary()
        );
        if !run.stderr.trim().is_empty() {
            message.push_str(&format!("; stderr: {}", run.stderr.trim_end()));
        } else if !run.stdout.trim().is_empty() {
            message.push_str(&format!("; stdout: {}", run.stdout.trim_end()));
        }
        if matches!(run.ending, hook::Ending::TimedOut { .. }) && limit < self.timeout() {
            message.push_str(&format!(
                " (the call's budget was shorter than `timeout_ms` = {} ms)",
                self.dir.timeout_ms
            ));
        }
        Err(message)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.dir.timeout_ms)
    }

    /// Runs `action` for every frozen hook, last frozen first; all of them, whatever fails.
    fn release(&mut self, call: &mut Call, action: &str) -> Result<(), Error> {
        let mut failures = Vec::new();
        while let Some(hook) = self.frozen.last().cloned() {
            if self.limit(call).is_zero() {
                let left: Vec<&str> = self.frozen.iter().map(|h| h.name.as_str()).collect();
                failures.push(format!(
                    "no time left in the call's budget for hooks {}: they get `thaw` at the \
                     abort that follows",
                    left.join(", ")
                ));
                // A thaw that ran out of time is finished by the abort, with `thaw`.
                self.thawing = true;
                return Err(Error::new(failures.join("; ")));
            }
            self.frozen.pop();
            if let Err(e) = self.run(call, &hook, action) {
                failures.push(e);
            }
        }
        self.thawing = false;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::new(failures.join("; ")))
        }
    }

    fn names(hooks: &[Hook]) -> String {
        hooks
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Writer for HooksWriter {
    fn metadata(&self) -> WriterMetadata {
        let mut metadata = WriterMetadata::new(
            &self.dir.id,
            format!("Hook scripts in {}", self.dir.directory.display()),
            Level::System,
        );
        metadata.instance = self.dir.directory.display().to_string();
        metadata.vendor_version = env!("CARGO_PKG_VERSION").to_string();
        match &self.dir.volume {
            Some(volume) => {
                metadata.with_component("hooks", ComponentKind::Files, volume, &self.dir.paths)
            }
            // No components: the writer concerns every volume.
            None => metadata,
        }
    }

    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        let hooks = self.list()?;
        call.report("hooks", Self::names(&hooks));
        Ok(())
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        if !self.frozen.is_empty() {
            return Err(Error::new(format!(
                "hooks {} are still frozen from an earlier freeze: they must get `thaw` or \
                 `freezeFail` first (the abort that follows sends it)",
                Self::names(&self.frozen)
            )));
        }
        self.thawing = false;
        for hook in self.list()? {
            if let Err(message) = self.run(call, &hook, "freeze") {
                let frozen = if self.frozen.is_empty() {
                    "no hook had frozen".to_string()
                } else {
                    format!(
                        "hooks that froze, which get freezeFail: {}",
                        Self::names(&self.frozen)
                    )
                };
                return Err(Error::new(format!("{message}; {frozen}")));
            }
            self.frozen.push(hook);
        }
        call.report("frozen", Self::names(&self.frozen));
        Ok(())
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        self.thawing = true;
        self.release(call, "thaw")
    }

    fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
        let action = if self.thawing { "thaw" } else { "freezeFail" };
        self.release(call, action)
    }
}
