//! Writer metadata: what a writer tells the host and the broker about itself (the "Identify" step).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The freeze level of a writer. Freeze runs front-end → back-end → system; thaw runs in reverse.
///
/// A front-end application (one that writes into a database) is frozen first so that the back-end
/// (the database) sees no new work while it holds still; system writers (file systems, hooks that
/// quiesce the whole machine) go last and come back first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    FrontEnd,
    BackEnd,
    System,
}

impl Level {
    /// All levels in freeze order.
    pub const FREEZE_ORDER: [Level; 3] = [Level::FrontEnd, Level::BackEnd, Level::System];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::FrontEnd => "front-end",
            Level::BackEnd => "back-end",
            Level::System => "system",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a component holds; it tells a backup tool what it is looking at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
            return Err(MetadataError::InvalidId(self.id.clone()));
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
