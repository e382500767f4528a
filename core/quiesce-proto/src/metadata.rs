//! Writer metadata: what a writer tells the host and the broker about itself (the "Identify" step).

use serde::{Deserialize, Serialize};

/// The freeze level of a writer. Freeze runs front-end → back-end → system → volume; thaw runs in
/// reverse.
///
/// A front-end application (one that writes into a database) is frozen first so that the back-end
/// (the database) sees no new work while it holds still; system writers (virtual machines' guests,
/// hooks that quiesce the whole machine) come after; last, each node flushes its own cache of the
/// volume (`volume`: the host's node flush, once everything above it on every node holds still),
/// and it comes back first.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Level {
    FrontEnd,
    BackEnd,
    System,
    Volume,
}

impl Level {
    /// All levels in freeze order.
    pub const FREEZE_ORDER: [Level; 4] = [
        Level::FrontEnd,
        Level::BackEnd,
        Level::System,
        Level::Volume,
    ];

    /// Its name in JSON, messages and logs: `front-end`, ...
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What a component holds; it tells a backup tool what it is looking at.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum ComponentKind {
    /// A database's data files (a PostgreSQL data directory, an SQLite file).
    Database,
    /// A write-ahead or transaction log (`pg_wal`, an SQLite `-wal` file).
    Log,
    /// A tablespace or other data area outside the main data directory.
    Tablespace,
    /// Plain files an application writes.
    Files,
    /// Configuration needed to restore the application.
    Config,
}

impl ComponentKind {
    /// Its name in JSON, messages and logs: `database`, ...
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// One part of an application's state, living on one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Unique within the writer, e.g. `data`, `wal`, `tablespace:fast`.
    pub name: String,
    pub kind: ComponentKind,
    /// The name of the volume the paths lie on (as the host's configuration names volumes).
    pub volume: String,
    /// Absolute paths of the component on that volume.
    pub paths: Vec<String>,
}

/// Everything a writer says about itself. Its JSON form is stable (see `JSON.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterMetadata {
    /// Unique among the writers of one node, e.g. `postgres-main`. Letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// A human name, e.g. `PostgreSQL 15 (main cluster)`.
    pub name: String,
    /// Which instance of the application, e.g. a port or a data directory.
    #[serde(default)]
    pub instance: String,
    /// The version of the application or plugin, for the record.
    #[serde(default)]
    pub vendor_version: String,
    pub level: Level,
    #[serde(default)]
    pub components: Vec<Component>,
    /// How long the writer expects to stay frozen, in milliseconds (informational, for planning).
    #[serde(default)]
    pub expected_freeze_ms: u64,
    /// Whether the writer has work to do on the writable snapshot (post-snapshot).
    #[serde(default)]
    pub needs_post_snapshot: bool,
}

/// Why a writer's metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("writer id {0:?} is invalid: use 1 to 64 letters, digits, '-', '_' or '.'")]
    InvalidId(String),
    #[error("writer {writer}: the name is empty: give the writer a human-readable name")]
    EmptyName { writer: String },
    #[error("writer {writer}: component {component:?} has {problem}")]
    InvalidComponent {
        writer: String,
        component: String,
        problem: &'static str,
    },
    #[error(
        "writer {writer}: two components are named {component:?}: component names must be unique"
    )]
    DuplicateComponent { writer: String, component: String },
    #[error("writer {writer}: {what} is {size} long, more than the {limit} a writer may declare (README, \"Limits\"): shorten it")]
    TooLarge {
        writer: String,
        what: &'static str,
        size: String,
        limit: String,
    },
}

/// How much a writer may declare and report, chosen so that a node's writers fit one D-Bus
/// reply and one broker registration, and a set of thousands of writers one record: documented
/// in the README ("Limits"). Checked where metadata enters (plugin load, `RegisterWriter`,
/// the broker's registration) and where a call's results come back.
pub mod limits {
    /// A writer's name, instance or vendor version, in bytes.
    pub const TEXT_BYTES: usize = 256;
    /// Components per writer.
    pub const COMPONENTS: usize = 64;
    /// Paths per component.
    pub const PATHS: usize = 64;
    /// One path, in bytes (PATH_MAX).
    pub const PATH_BYTES: usize = 4096;
    /// The whole metadata as JSON, in bytes.
    pub const METADATA_BYTES: usize = 16 * 1024;
    /// What one call may report (keys and values together), in bytes.
    pub const REPORTS_BYTES: usize = 16 * 1024;
    /// A failure's reason, in bytes; longer ones are cut, saying so.
    pub const REASON_BYTES: usize = 4096;
    /// Writers one node may have (plugins' and applications' together).
    pub const WRITERS_PER_NODE: usize = 1024;
}

/// `text` cut to at most `limit` bytes (at a character boundary), saying how much was cut: for
/// what cannot be refused, a failure's reason, a hook's output.
pub fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit.saturating_sub(48);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes cut)", &text[..end], text.len() - end)
}

/// True when `id` is a valid writer id: 1..=64 of `[A-Za-z0-9._-]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What a node name must be, for messages.
pub const NODE_NAME_RULE: &str =
    "a node name is 1 to 63 of A-Z a-z 0-9 - _ . and starts with neither '-' nor '.'";

/// A node's name: in its host's configuration, its certificate's CN and file names
/// (`node1.pem`), messages and records. One rule for all of them ([`NODE_NAME_RULE`]): a name
/// the certificate command refuses must not start a host.
pub fn is_valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl WriterMetadata {
    /// Metadata with the required fields; add components with [`WriterMetadata::with_component`].
    pub fn new(id: impl Into<String>, name: impl Into<String>, level: Level) -> Self {
        WriterMetadata {
            id: id.into(),
            name: name.into(),
            instance: String::new(),
            vendor_version: String::new(),
            level,
            components: Vec::new(),
            expected_freeze_ms: 0,
            needs_post_snapshot: false,
        }
    }

    /// Adds a component on `volume` with the given absolute paths.
    pub fn with_component<P: Into<String>>(
        mut self,
        name: impl Into<String>,
        kind: ComponentKind,
        volume: impl Into<String>,
        paths: impl IntoIterator<Item = P>,
    ) -> Self {
        self.components.push(Component {
            name: name.into(),
            kind,
            volume: volume.into(),
            paths: paths.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Says that the writer has work to do on the writable snapshot.
    pub fn with_post_snapshot(mut self) -> Self {
        self.needs_post_snapshot = true;
        self
    }

    /// Checks what the protocol relies on; a writer whose metadata fails this is refused.
    pub fn validate(&self) -> Result<(), MetadataError> {
        if !is_valid_id(&self.id) {
            return Err(MetadataError::InvalidId(cut(&self.id, 80)));
        }
        let too_large = |what, size: usize, limit: usize, unit: &str| MetadataError::TooLarge {
            writer: self.id.clone(),
            what,
            size: format!("{size} {unit}"),
            limit: format!("{limit} {unit}"),
        };
        for (what, text) in [
            ("the name", &self.name),
            ("the instance", &self.instance),
            ("the vendor version", &self.vendor_version),
        ] {
            if text.len() > limits::TEXT_BYTES {
                return Err(too_large(what, text.len(), limits::TEXT_BYTES, "bytes"));
            }
        }
        if self.components.len() > limits::COMPONENTS {
            return Err(too_large(
                "the list of components",
                self.components.len(),
                limits::COMPONENTS,
                "components",
            ));
        }
        for c in &self.components {
            if c.name.len() > limits::TEXT_BYTES || c.volume.len() > limits::TEXT_BYTES {
                return Err(too_large(
                    "a component's name or volume",
                    c.name.len().max(c.volume.len()),
                    limits::TEXT_BYTES,
                    "bytes",
                ));
            }
            if c.paths.len() > limits::PATHS {
                return Err(too_large(
                    "a component's list of paths",
                    c.paths.len(),
                    limits::PATHS,
                    "paths",
                ));
            }
            if let Some(p) = c.paths.iter().find(|p| p.len() > limits::PATH_BYTES) {
                return Err(too_large("a path", p.len(), limits::PATH_BYTES, "bytes"));
            }
        }
        let json = serde_json::to_string(self)
            .map(|j| j.len())
            .unwrap_or(usize::MAX);
        if json > limits::METADATA_BYTES {
            return Err(too_large(
                "the metadata as JSON",
                json,
                limits::METADATA_BYTES,
                "bytes",
            ));
        }
        if self.name.trim().is_empty() {
            return Err(MetadataError::EmptyName {
                writer: self.id.clone(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.components {
            let problem = if c.name.is_empty() {
                Some("an empty name")
            } else if c.volume.is_empty() {
                Some("no volume: name the volume its paths lie on")
            } else if c.paths.iter().any(|p| !p.starts_with('/')) {
                Some("a relative path: component paths must be absolute")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(MetadataError::InvalidComponent {
                    writer: self.id.clone(),
                    component: c.name.clone(),
                    problem,
                });
            }
            if !seen.insert(c.name.as_str()) {
                return Err(MetadataError::DuplicateComponent {
                    writer: self.id.clone(),
                    component: c.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// True when any component of the writer lies on one of `volumes`.
    ///
    /// A writer with no components at all is taken to concern every volume: it declared nothing,
    /// so the safe choice is to quiesce it (hook scripts are like that).
    pub fn touches_any(&self, volumes: &[String]) -> bool {
        self.components.is_empty() || self.components.iter().any(|c| volumes.contains(&c.volume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_component_kinds_are_named_as_json_names_them() {
        use strum::VariantArray;
        for level in Level::VARIANTS {
            assert_eq!(serde_json::to_value(level).unwrap(), level.as_str());
            assert_eq!(level.to_string(), level.as_str());
        }
        assert_eq!(Level::FREEZE_ORDER.as_slice(), Level::VARIANTS);
        for kind in ComponentKind::VARIANTS {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    fn sample() -> WriterMetadata {
        WriterMetadata {
            id: "pg-main".into(),
            name: "PostgreSQL main".into(),
            instance: "5432".into(),
            vendor_version: "15.8".into(),
            level: Level::BackEnd,
            components: vec![Component {
                name: "data".into(),
                kind: ComponentKind::Database,
                volume: "shared".into(),
                paths: vec!["/srv/pg".into()],
            }],
            expected_freeze_ms: 20,
            needs_post_snapshot: true,
        }
    }

    #[test]
    fn json_form_is_the_documented_one() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "pg-main", "name": "PostgreSQL main", "instance": "5432",
                "vendor_version": "15.8", "level": "back-end",
                "components": [{"name": "data", "kind": "database", "volume": "shared",
                                "paths": ["/srv/pg"]}],
                "expected_freeze_ms": 20, "needs_post_snapshot": true
            })
        );
        let minimal: WriterMetadata =
            serde_json::from_str(r#"{"id":"x","name":"X","level":"system"}"#).unwrap();
        assert_eq!(minimal.components, vec![]);
        assert!(!minimal.needs_post_snapshot);
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(sample().validate().is_ok());
        let mut m = sample();
        m.id = "bad id".into();
        assert_eq!(m.validate(), Err(MetadataError::InvalidId("bad id".into())));
        let mut m = sample();
        m.components[0].paths = vec!["relative".into()];
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("relative path"), "{err}");
        let mut m = sample();
        m.components.push(m.components[0].clone());
        assert!(matches!(
            m.validate(),
            Err(MetadataError::DuplicateComponent { .. })
        ));
    }

    #[test]
    fn volume_selection() {
        let m = sample();
        assert!(m.touches_any(&["shared".into()]));
        assert!(!m.touches_any(&["other".into()]));
        let mut none = sample();
        none.components.clear();
        assert!(none.touches_any(&["other".into()]));
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn metadata_past_its_limits_is_refused_naming_what_and_how_much() {
        let mut m = WriterMetadata::new("w", "x".repeat(10 * 1024 * 1024), Level::BackEnd);
        let e = m.validate().unwrap_err().to_string();
        assert!(
            e.contains("the name is 10485760 bytes long, more than the 256 bytes"),
            "{e}"
        );
        m.name = "ok".into();
        m.validate().unwrap();
        for i in 0..65 {
            m = m.with_component(format!("c{i}"), ComponentKind::Files, "v", ["/x"]);
        }
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("65 components"), "{e}");
        let long_id = "a".repeat(100_000);
        let e = WriterMetadata::new(&long_id, "x", Level::System)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.len() < 300,
            "a 100 KB id is not echoed whole: {} bytes",
            e.len()
        );
    }

    #[test]
    fn cut_keeps_the_start_and_says_how_much_went() {
        assert_eq!(cut("short", 100), "short");
        let long = "é".repeat(10_000);
        let c = cut(&long, 4096);
        assert!(c.len() <= 4096 + 40, "{}", c.len());
        assert!(c.ends_with("more bytes cut)"), "{c}");
    }
}
