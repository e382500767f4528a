//! The host: the writers of this node, the volumes it can snapshot, and the sets it ran.

use crate::config::Config;
use crate::plugins::{self, LoadError};
use crate::volume_flush::VolumeFlush;
use crate::worker::{Backend, PluginBackend, WriterHandle};
use quiesce_proto::{SetId, SetRecord, SetRequest, WriterMetadata};
use quiesce_provider::Provider;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How many local sets' records a host keeps (`ListSets`, `ShowSet`).
pub const HISTORY_KEPT: usize = 100;

/// Why a set could not start. Nothing was frozen when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("node {node}: volume {volume:?} is not configured here for local sets (volumes with a provider: {known}); add it, with its provider, under [volumes.{volume}]")]
    UnknownVolume {
        node: String,
        volume: String,
        known: String,
    },
    #[error("node {node}: a local set takes exactly one volume, {count} were asked for; run one set per volume")]
    OneVolume { node: String, count: usize },
    #[error("node {node}: set {running} is still running; one set at a time per node — retry when it ends")]
    Busy { node: String, running: String },
    #[error("node {node}: writer {writer} is frozen by a diagnostic freeze (Writer1.Freeze); thaw it (Writer1.Thaw) or wait for its hold limit, then start the set")]
    WriterHeld { node: String, writer: String },
    #[error("node {node}: writer {writer} is still stuck in {call} for {stuck_ms} ms since an earlier set; restart the host to reload it")]
    WriterStuck {
        node: String,
        writer: String,
        call: quiesce_proto::CallKind,
        stuck_ms: u64,
    },
}

/// Why a writer could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddWriterError {
    #[error("node {node}: writer id {id:?} is already taken by {other}")]
    Duplicate {
        node: String,
        id: String,
        other: String,
    },
    #[error("node {node}: it has {count} writers already, the most a node may have (README, \"Limits\"); unregister some first")]
    TooMany { node: String, count: usize },
}

#[derive(Debug)]
pub struct Host {
    config: Config,
    writers: Mutex<Vec<Arc<WriterHandle>>>,
    load_errors: Vec<LoadError>,
    /// `[volumes.NAME] mount`s whose flush writer could not be made: the host does not start.
    flush_errors: Vec<String>,
    /// `(name, version, path)` of each plugin loaded.
    plugins: Vec<(String, String, std::path::PathBuf)>,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    history: Mutex<Vec<SetRecord>>,
    /// The set running now, and where to tell it that one of its writers is gone.
    running: Arc<quiesce_driver::RunningSlot>,
    counter: AtomicU64,
    /// Bumped whenever a writer is added or removed (the broker link follows it).
    writer_list: watch::Sender<u64>,
}

impl Host {
    /// Loads the plugins of the configuration and starts a worker for each writer.
    /// Plugins that fail to load are reported by [`Host::load_errors`]; the others run.
    pub fn start(config: Config) -> Host {
        let report = match &config.plugin_dir {
            Some(dir) if dir.is_dir() => {
                plugins::load_directory(dir, &config.plugins, config.plugin_init_timeout())
            }
            // Named but missing: `problems` says so, and the daemon does not start.
            _ => plugins::LoadReport::default(),
        };
        // Load errors are told by the daemon once it has sorted them (`problems` stop it, the
        // others are plugins skipped): said here as well, they were printed twice.
        for (name, version, path) in &report.plugins {
            tracing::info!(plugin = %name, version = %version, path = %path.display(), "plugin loaded");
        }
        let mut writers: Vec<Arc<WriterHandle>> = report
            .writers
            .into_iter()
            .map(|w| {
                let backend = Box::new(PluginBackend(w.object));
                WriterHandle::spawn(w.metadata, w.origin, backend, config.hold_limit())
            })
            .collect();
        let mut flush_errors = vec![];
        for (volume, v) in &config.volumes {
            let Some(mount) = &v.mount else { continue };
            let flush = VolumeFlush::new(&config.node, volume, mount, v.flush).and_then(|f| {
                let metadata = f.metadata();
                metadata.validate().map_err(|e| {
                    format!("[volumes.{volume}]: its flush writer cannot be named after it: {e}")
                })?;
                if writers.iter().any(|w| w.id() == metadata.id) {
                    return Err(format!(
                        "[volumes.{volume}]: a plugin writer already has the id {:?} of the volume's flush writer: rename that writer",
                        metadata.id
                    ));
                }
                Ok((metadata, f))
            });
            match flush {
                Ok((metadata, f)) => writers.push(WriterHandle::spawn(
                    metadata,
                    format!("the node flush of [volumes.{volume}]"),
                    Box::new(f),
                    config.hold_limit(),
                )),
                Err(e) => flush_errors.push(e),
            }
        }
        let providers = config
            .volumes
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), Arc::from(v.provider.as_ref()?.build()))))
            .collect();
        Host {
            config,
            writers: Mutex::new(writers),
            load_errors: report.errors,
            flush_errors,
            plugins: report.plugins,
            providers,
            history: Mutex::new(Vec::new()),
            running: quiesce_driver::RunningSlot::new(),
            counter: AtomicU64::new(0),
            writer_list: watch::channel(0).0,
        }
    }

    pub fn node(&self) -> &str {
        &self.config.node
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `(name, version, path)` of each plugin loaded.
    pub fn plugins(&self) -> &[(String, String, std::path::PathBuf)] {
        &self.plugins
    }

    pub fn load_errors(&self) -> &[LoadError] {
        &self.load_errors
    }

    /// What in the configuration cannot work as written, each with the key and the fix: the
    /// daemon refuses to start with any of these (`quiesce-host` exits 1 before it serves). A
    /// broken plugin file the configuration does not mention is not among them: it is reported
    /// and skipped.
    pub fn problems(&self) -> Vec<String> {
        let config = &self.config;
        let mut problems = self.flush_errors.clone();
        match &config.plugin_dir {
            Some(dir) if !dir.exists() => problems.push(format!(
                "plugin_dir = {:?} does not exist: create it (and put the plugins there), or fix the path",
                dir.display().to_string()
            )),
            Some(dir) if !dir.is_dir() => problems.push(format!(
                "plugin_dir = {:?} is not a directory: name the directory the plugins are in",
                dir.display().to_string()
            )),
            Some(_) => {}
            None if !config.plugins.is_empty() => problems.push(
                "[plugins.*] tables are given but no plugin_dir: set plugin_dir to the directory of the plugins".into(),
            ),
            None => {}
        }
        let loaded: Vec<&str> = self.plugins.iter().map(|(n, _, _)| n.as_str()).collect();
        for e in &self.load_errors {
            let configured = e
                .plugin_name()
                .is_some_and(|n| config.plugins.contains_key(n));
            if configured || matches!(e, LoadError::Insecure { .. } | LoadError::Directory { .. }) {
                problems.push(e.to_string());
            }
        }
        for name in config.plugins.keys() {
            let failed = self
                .load_errors
                .iter()
                .any(|e| e.plugin_name() == Some(name.as_str()));
            if !failed
                && !loaded.contains(&name.as_str())
                && config.plugin_dir.as_ref().is_some_and(|d| d.is_dir())
            {
                problems.push(format!(
                    "[plugins.{name}] configures a plugin that is not in plugin_dir (loaded: {}): fix the name, or install the plugin",
                    if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") }
                ));
            }
        }
        problems
    }

    /// What the configuration may not mean (each said once, at start, as a warning).
    pub fn warnings(&self) -> Vec<String> {
        let config = &self.config;
        let mut warnings: Vec<String> =
            quiesce_config::set_limit_warning(config.hold_limit_ms, &config.timeouts)
                .into_iter()
                .collect();
        if config.plugin_dir.is_none() && config.volumes.is_empty() {
            warnings.push("no plugin_dir and no [volumes.*]: this host serves only writers that applications register over D-Bus, and takes no snapshot of its own".into());
        }
        let writers = self.writers();
        for volume in config.volumes.keys() {
            let covered = writers.iter().any(|w| {
                w.metadata.level != quiesce_proto::Level::Volume
                    && w.metadata.touches_any(std::slice::from_ref(volume))
            });
            if !covered {
                warnings.push(format!(
                    "[volumes.{volume}]: no plugin writer has components on it: until an application registers one, a set of it quiesces nothing"
                ));
            }
        }
        warnings
    }

    pub fn writers(&self) -> Vec<Arc<WriterHandle>> {
        self.writers.lock().unwrap().clone()
    }

    /// Changes whenever a writer is added or removed; read [`Host::writers`] after it changes.
    pub fn watch_writers(&self) -> watch::Receiver<u64> {
        self.writer_list.subscribe()
    }

    /// Adds a writer that is not a plugin (an application's, or a test's).
    pub fn add_writer(
        &self,
        metadata: WriterMetadata,
        origin: String,
        backend: Box<dyn Backend>,
    ) -> Result<Arc<WriterHandle>, AddWriterError> {
        let mut writers = self.writers.lock().unwrap();
        if writers.len() >= quiesce_proto::limits::WRITERS_PER_NODE {
            return Err(AddWriterError::TooMany {
                node: self.config.node.clone(),
                count: writers.len(),
            });
        }
        if let Some(other) = writers.iter().find(|w| w.id() == metadata.id) {
            return Err(AddWriterError::Duplicate {
                node: self.config.node.clone(),
                id: metadata.id,
                other: other.origin.clone(),
            });
        }
        let handle = WriterHandle::spawn(metadata, origin, backend, self.config.hold_limit());
        writers.push(handle.clone());
        self.writer_list.send_modify(|g| *g += 1);
        Ok(handle)
    }

    /// Removes a writer (an application unregistered it). Returns it, if it was there.
    pub fn remove_writer(&self, id: &str) -> Option<Arc<WriterHandle>> {
        let mut writers = self.writers.lock().unwrap();
        let index = writers.iter().position(|w| w.id() == id)?;
        let removed = writers.remove(index);
        self.writer_list.send_modify(|g| *g += 1);
        Some(removed)
    }

    /// A writer is gone for good (its application exited): it is removed, and a running set
    /// that includes it is told, so that set fails naming it and releases everyone else.
    pub fn writer_lost(&self, id: &str, reason: &str) {
        self.remove_writer(id);
        if let Some((set, inputs)) = self.running.current() {
            tracing::warn!(set = %set, writer = id, "writer lost during the set: {reason}");
            let _ = inputs.send(quiesce_driver::Input::WriterLost {
                writer: quiesce_proto::WriterRef::new(self.node(), id),
                reason: reason.to_string(),
            });
        }
    }

    /// A writer by id.
    pub fn writer(&self, id: &str) -> Option<Arc<WriterHandle>> {
        self.writers
            .lock()
            .unwrap()
            .iter()
            .find(|w| w.id() == id)
            .cloned()
    }

    /// A set this host ran, by id.
    pub fn set(&self, id: &str) -> Option<SetRecord> {
        self.history
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.id.0 == id)
            .cloned()
    }

    /// The sets this host ran, oldest first.
    pub fn history(&self) -> Vec<SetRecord> {
        self.history.lock().unwrap().clone()
    }

    fn new_set_id(&self) -> SetId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        SetId(format!("set-{}-{ms}-{n}", self.config.node))
    }

    /// Runs a set on this node alone: the writers with components on the volume, then the
    /// volume's provider. Returns the set's record whatever its outcome; an error only when the
    /// set could not start.
    pub async fn run_local_set(&self, request: SetRequest) -> Result<SetRecord, SetError> {
        let node = self.config.node.clone();
        let [volume] = request.volumes.as_slice() else {
            return Err(SetError::OneVolume {
                node,
                count: request.volumes.len(),
            });
        };
        let provider =
            self.providers
                .get(volume)
                .cloned()
                .ok_or_else(|| SetError::UnknownVolume {
                    node: node.clone(),
                    volume: quiesce_proto::cut(volume, 80),
                    known: self
                        .providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        // Identify: the writers with components on the volume.
        let writers: Vec<Arc<WriterHandle>> = self
            .writers()
            .into_iter()
            .filter(|w| w.metadata.touches_any(&request.volumes))
            .collect();
        let now = Instant::now();
        if let Some((w, (call, stuck))) = writers.iter().find_map(|w| w.stuck(now).map(|s| (w, s)))
        {
            return Err(SetError::WriterStuck {
                node,
                writer: w.id().to_string(),
                call,
                stuck_ms: stuck.as_millis() as u64,
            });
        }
        if let Some(w) = writers
            .iter()
            .find(|w| w.status().held_by == Some(crate::worker::Holder::Diagnosis))
        {
            return Err(SetError::WriterHeld {
                node,
                writer: w.id().to_string(),
            });
        }
        let id = self.new_set_id();
        let (inputs, inbox) = quiesce_driver::inputs();
        // Released however this future ends, even if the caller drops it midway.
        let _running = self
            .running
            .claim(id.clone(), inputs.clone())
            .map_err(|busy| SetError::Busy {
                node: node.clone(),
                running: busy.running.0,
            })?;
        let record = crate::local_set::run(
            id,
            &node,
            request,
            &writers,
            self.config.deadlines(),
            provider,
            (inputs, inbox),
        )
        .await;
        {
            // The newest local sets only: a long-running host does not keep every record.
            let mut history = self.history.lock().unwrap();
            history.push(record.clone());
            let excess = history.len().saturating_sub(HISTORY_KEPT);
            history.drain(..excess);
        }
        Ok(record)
    }
}
