//! Loading writer plugins through the stable ABI.
//!
//! Every `*.so` file in the plugin directory is loaded; a file that fails gets one error naming
//! the file and the cause (and what to rebuild), and the others still load. Libraries are never
//! unloaded (abi_stable leaks them by design): reloading a plugin means restarting the host.

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use abi_stable::std_types::{RResult, RStr};
use quiesce_abi::{ErrorKind, HostServices, LogLevel, PluginModuleRef, WriterBox};
use quiesce_proto::WriterMetadata;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why one plugin file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the plugin directory {dir}: {cause}")]
    Directory { dir: PathBuf, cause: std::io::Error },
    #[error("plugin {path}: not a loadable shared library ({cause}); remove it from the plugin directory or replace it with a plugin built with quiesce-sdk")]
    NotALibrary { path: PathBuf, cause: String },
    #[error("plugin {path}: cannot be read ({cause}); make it readable by the host's user (it runs as uid {uid})")]
    Unreadable {
        path: PathBuf,
        cause: String,
        uid: u32,
    },
    #[error("plugin {path}: refused: {why}; plugins run as the host's user (uid {uid}), so only root or that user may be able to replace them — {fix}")]
    Insecure {
        path: PathBuf,
        why: String,
        fix: String,
        uid: u32,
    },
    #[error("plugin {name} ({path}): init did not return within {ms} ms; the plugin is skipped (its init goes on in the background, and whatever it makes is dropped); fix what it waits for, or raise plugin_init_ms")]
    InitTimedOut {
        path: PathBuf,
        name: String,
        ms: u64,
    },
    #[error("plugin {path}: not a quiesce plugin (it exports no quiesce root module); build it with quiesce_sdk::export_plugin!")]
    NotAPlugin { path: PathBuf },
    #[error("plugin {path}: built against quiesce-abi {plugin}, this host speaks {host}; rebuild the plugin against quiesce-sdk {host_sdk}")]
    AbiVersion {
        path: PathBuf,
        plugin: String,
        host: String,
        host_sdk: String,
    },
    #[error("plugin {path}: its ABI layout differs from this host's although the versions match (was quiesce-abi changed without a version bump?); rebuild the plugin against quiesce-sdk {host_sdk}: {details}")]
    AbiLayout {
        path: PathBuf,
        host_sdk: String,
        details: String,
    },
    #[error("plugin {path}: built with an incompatible abi_stable ({cause}); rebuild the plugin against quiesce-sdk {host_sdk}")]
    AbiStable {
        path: PathBuf,
        host_sdk: String,
        cause: String,
    },
    #[error("plugin {path}: its root module failed to load: {cause}")]
    RootModule { path: PathBuf, cause: String },
    #[error("plugin {name} ({path}): init failed: {message}")]
    InitFailed {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("plugin {name} ({path}): init panicked: {message}; the plugin is skipped, report this to its vendor")]
    InitPanicked {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("plugin {name} ({path}): its configuration [plugins.{name}] was refused: {message}")]
    InvalidConfig {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("plugin {name} ({path}): a writer's metadata is invalid: {message}")]
    InvalidMetadata {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("plugin {name} ({path}): writer id {writer:?} is already taken by {other}; give one of them another id in its configuration (writer ids are unique per host, within a plugin too)")]
    DuplicateWriter {
        path: PathBuf,
        name: String,
        writer: String,
        other: String,
    },
    #[error("plugin {path}: a plugin named {name:?} is already loaded from {other}; remove one of the two files")]
    DuplicatePlugin {
        path: PathBuf,
        name: String,
        other: PathBuf,
    },
}

impl LoadError {
    /// The plugin's name, when the error comes from a plugin whose name is known.
    pub fn plugin_name(&self) -> Option<&str> {
        match self {
            LoadError::InitFailed { name, .. }
            | LoadError::InitPanicked { name, .. }
            | LoadError::InitTimedOut { name, .. }
            | LoadError::InvalidConfig { name, .. }
            | LoadError::InvalidMetadata { name, .. }
            | LoadError::DuplicateWriter { name, .. }
            | LoadError::DuplicatePlugin { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// A writer object created by a plugin, with its metadata.
pub struct PluginWriter {
    pub metadata: WriterMetadata,
    /// `plugin NAME (PATH)`, for messages.
    pub origin: String,
    pub object: WriterBox,
}

impl std::fmt::Debug for PluginWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWriter")
            .field("metadata", &self.metadata)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// What loading a plugin directory produced: the writers, and one error per failed file.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub writers: Vec<PluginWriter>,
    pub errors: Vec<LoadError>,
    /// `(name, version, path)` of each plugin loaded.
    pub plugins: Vec<(String, String, PathBuf)>,
    /// Files named like plugins that are not (directories, dangling links), with why.
    pub skipped: Vec<String>,
}

/// The SDK version a plugin must be rebuilt against: the ABI crate's version is the SDK's.
fn host_sdk() -> String {
    quiesce_abi::ABI_VERSION.to_string()
}

/// Opens one plugin library and checks its versions and ABI layout.
pub fn open(path: &Path) -> Result<PluginModuleRef, LoadError> {
    let header = lib_header_from_path(path).map_err(|e| classify(path, e))?;
    header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| classify(path, e))
}

fn classify(path: &Path, error: LibraryError) -> LoadError {
    let path = path.to_path_buf();
    match error {
        LibraryError::OpenError { err, .. } => {
            let cause = err.to_string();
            // A file the host may not read is not a file to rebuild.
            if std::fs::File::open(&path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
            {
                LoadError::Unreadable {
                    path,
                    cause,
                    uid: nix::unistd::geteuid().as_raw(),
                }
            } else {
                LoadError::NotALibrary { path, cause }
            }
        }
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin { path },
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::AbiVersion {
            path,
            plugin: actual_version.to_string(),
            host: expected_version.to_string(),
            host_sdk: host_sdk(),
        },
        LibraryError::AbiInstability(details) => {
            let details = details.to_string();
            tracing::debug!(path = %path.display(), "full ABI comparison: {details}");
            // abi_stable's version check only refuses plugins older than the host; a newer one
            // shows up here, as types of another package version.
            match version_mismatch(&details) {
                Some((host, plugin)) => LoadError::AbiVersion {
                    path,
                    plugin,
                    host,
                    host_sdk: host_sdk(),
                },
                None => LoadError::AbiLayout {
                    path,
                    host_sdk: host_sdk(),
                    details: summarize_layout_error(&details),
                },
            }
        }
        LibraryError::InvalidAbiHeader(header) => LoadError::AbiStable {
            path,
            host_sdk: host_sdk(),
            cause: format!("abi_stable header {header:?}"),
        },
        LibraryError::InvalidCAbi { .. } => LoadError::AbiStable {
            path,
            host_sdk: host_sdk(),
            cause: "the C ABI test failed".into(),
        },
        other => LoadError::RootModule {
            path,
            cause: other.to_string(),
        },
    }
}

/// `(expected, found)` when a layout comparison failed on package versions of the ABI crate.
fn version_mismatch(details: &str) -> Option<(String, String)> {
    let at = details.find("Error:incompatible package versions")?;
    let mut words = details[at..].split_whitespace();
    words.find(|w| *w == "Expected:")?;
    let expected = words.next()?.to_string();
    words.find(|w| *w == "Found:")?;
    let found = words.next()?.to_string();
    Some((expected, found))
}

/// The `Error:` lines of abi_stable's layout comparison (which runs to thousands of lines),
/// each with the few lines that say what differs.
fn summarize_layout_error(details: &str) -> String {
    let lines: Vec<&str> = details.lines().collect();
    let mut summary = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("Error:") {
            summary.extend(lines[i..(i + 5).min(lines.len())].iter().map(|l| l.trim()));
        }
    }
    if summary.is_empty() {
        return "abi_stable reported a layout difference (run with RUST_LOG=debug for the full comparison)".into();
    }
    summary.join(" ")
}

/// Plugin log records arrive here and go to the host's `tracing`, under the target `plugin`.
extern "C" fn plugin_log(level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
    let (target, message) = (target.as_str(), message.as_str());
    match level {
        LogLevel::Error => tracing::error!(target: "plugin", origin = target, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "plugin", origin = target, "{message}"),
        LogLevel::Info => tracing::info!(target: "plugin", origin = target, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "plugin", origin = target, "{message}"),
        LogLevel::Trace => tracing::trace!(target: "plugin", origin = target, "{message}"),
    }
}

/// Creates the writers of one opened plugin with its configuration table.
pub fn init(
    path: &Path,
    module: PluginModuleRef,
    config: &toml::Table,
) -> Result<Vec<PluginWriter>, LoadError> {
    let name = module.name().to_string();
    let text = toml::to_string(config).expect("a TOML table always serialises");
    let host = HostServices { log: plugin_log };
    let objects = match (module.init())(RStr::from_str(&text), host) {
        RResult::ROk(objects) => objects,
        RResult::RErr(e) => {
            let (path, message) = (path.to_path_buf(), e.message.into_string());
            return Err(match e.kind {
                ErrorKind::Panicked => LoadError::InitPanicked {
                    path,
                    name,
                    message,
                },
                ErrorKind::InvalidConfig => LoadError::InvalidConfig {
                    path,
                    name,
                    message,
                },
                ErrorKind::Failed => LoadError::InitFailed {
                    path,
                    name,
                    message,
                },
            });
        }
    };
    let origin = format!("plugin {name} ({})", path.display());
    objects
        .into_iter()
        .map(|object| {
            let json = object.metadata_json();
            let metadata: WriterMetadata = serde_json::from_str(json.as_str())
                .map_err(|e| e.to_string())
                .and_then(|m: WriterMetadata| m.validate().map(|()| m).map_err(|e| e.to_string()))
                .map_err(|message| LoadError::InvalidMetadata {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message,
                })?;
            Ok(PluginWriter {
                metadata,
                origin: origin.clone(),
                object,
            })
        })
        .collect()
}

/// Whether the host may load code from `path` (a plugin file or its directory): only root or
/// the host's own user may be able to replace it, since it runs with the host's rights.
fn check_ownership(path: &Path, what: &str) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    let insecure = |why: String, fix: String| LoadError::Insecure {
        path: path.to_path_buf(),
        why,
        fix,
        uid,
    };
    let meta = std::fs::metadata(path).map_err(|e| LoadError::Unreadable {
        path: path.to_path_buf(),
        cause: e.to_string(),
        uid,
    })?;
    if meta.uid() != 0 && meta.uid() != uid {
        return Err(insecure(
            format!("the {what} is owned by uid {}", meta.uid()),
            format!("`chown root {}`", path.display()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        let by = if meta.mode() & 0o002 != 0 {
            "everyone"
        } else {
            "its group"
        };
        return Err(insecure(
            format!(
                "the {what} is writable by {by} (mode {:o})",
                meta.mode() & 0o7777
            ),
            format!("`chmod go-w {}`", path.display()),
        ));
    }
    Ok(())
}

/// How long one plugin's init may take by default (`plugin_init_ms`).
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads every `*.so` in `dir`. Files that fail are reported in the result; the rest load.
/// Each plugin's init runs on a thread of its own, all at once, each for at most
/// `init_timeout`: one plugin that hangs delays the others by no more than that.
pub fn load_directory(
    dir: &Path,
    configs: &BTreeMap<String, toml::Table>,
    init_timeout: Duration,
) -> LoadReport {
    let mut report = LoadReport::default();
    if let Err(e) = check_ownership(dir, "plugin directory") {
        report.errors.push(e);
        return report;
    }
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(cause) => {
            report.errors.push(LoadError::Directory {
                dir: dir.into(),
                cause,
            });
            return report;
        }
    };
    paths.sort();
    // Open each library (version and layout checks) and check who may replace it.
    let mut opened: Vec<(PathBuf, PluginModuleRef)> = vec![];
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in paths {
        if path.extension().is_none_or(|e| e != "so") {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                report.skipped.push(format!(
                    "{}: a directory or special file named like a plugin: skipped",
                    path.display()
                ));
                continue;
            }
            Err(e) => {
                // A dangling symbolic link, a loop of them, a file that vanished.
                report.skipped.push(format!(
                    "{}: cannot be followed ({e}): skipped; remove it or fix the link",
                    path.display()
                ));
                continue;
            }
        }
        if let Err(e) = check_ownership(&path, "plugin file") {
            report.errors.push(e);
            continue;
        }
        let module = match open(&path) {
            Ok(m) => m,
            Err(e) => {
                report.errors.push(e);
                continue;
            }
        };
        let name = module.name().to_string();
        if let Some(other) = by_name.get(&name) {
            report.errors.push(LoadError::DuplicatePlugin {
                path,
                name,
                other: other.clone(),
            });
            continue;
        }
        by_name.insert(name, path.clone());
        opened.push((path, module));
    }
    for line in &report.skipped {
        tracing::warn!("{line}");
    }
    // Every init at once, each under the deadline.
    let empty = toml::Table::new();
    let pending: Vec<_> = opened
        .into_iter()
        .map(|(path, module)| {
            let config = configs
                .get(module.name().as_str())
                .unwrap_or(&empty)
                .clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let (thread_path, name) = (path.clone(), module.name().to_string());
            tracing::info!(plugin = %name, path = %path.display(), "initialising plugin");
            let spawned = std::thread::Builder::new()
                .name(format!("init-{name}"))
                .spawn(move || {
                    let _ = tx.send(init(&thread_path, module, &config));
                });
            (path, module, name, spawned.map(|_| rx))
        })
        .collect();
    let deadline = std::time::Instant::now() + init_timeout;
    let mut by_writer: BTreeMap<String, String> = BTreeMap::new();
    for (path, module, name, rx) in pending {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let result = match rx {
            Ok(rx) => rx.recv_timeout(left).unwrap_or_else(|_| {
                Err(LoadError::InitTimedOut {
                    path: path.clone(),
                    name: name.clone(),
                    ms: init_timeout.as_millis() as u64,
                })
            }),
            Err(e) => Err(LoadError::InitFailed {
                path: path.clone(),
                name: name.clone(),
                message: format!("no thread could be started for its init: {e}"),
            }),
        };
        let writers = match result {
            Ok(w) => w,
            Err(e) => {
                report.errors.push(e);
                continue;
            }
        };
        // Unique per host: across plugins, and within this one. All of a plugin's writers, or
        // none: a half-loaded plugin would be harder to reason about.
        let mut taken = by_writer.clone();
        let mut duplicate = None;
        for w in &writers {
            if let Some(other) = taken.insert(w.metadata.id.clone(), w.origin.clone()) {
                duplicate = Some((w.metadata.id.clone(), other));
                break;
            }
        }
        if let Some((writer, other)) = duplicate {
            let other = if other == writers[0].origin {
                "another writer of the same plugin".to_string()
            } else {
                other
            };
            report.errors.push(LoadError::DuplicateWriter {
                path,
                name,
                writer,
                other,
            });
            continue;
        }
        by_writer = taken;
        report
            .plugins
            .push((name, module.version().to_string(), path.clone()));
        report.writers.extend(writers);
    }
    report
}

/// The name under which abi_stable looks for a plugin's root module (for diagnostics).
pub fn root_module_name() -> &'static str {
    PluginModuleRef::NAME
}
