//! The registry of live nodes and their writers, and the membership epoch.
//!
//! Plain data: it reads no clock (instants come in as arguments) and does no I/O, so the link
//! service drives it and the unit tests below check it directly.
//!
//! The **epoch** grows by one on every membership change: a node attaches (or attaches again,
//! replacing its previous link), a node leaves (its link closed or went silent), or a node's
//! writer list changes. A snapshot set records the epoch it started at; a set that sees another
//! epoch fails (`quiesce_proto::SnapshotSet::handle_epoch`).

use quiesce_proto::WriterMetadata;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

/// One link (one `Attach` stream) of a node. A node that reconnects gets a new link; messages
/// and the end of an older link then change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// A writer as a node reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Writer {
    pub metadata: WriterMetadata,
    /// The metadata exactly as the host sent it (fields this broker does not know survive).
    pub metadata_json: String,
    pub origin: String,
}

/// What a host sends when it attaches.
#[derive(Debug, Clone)]
pub struct Registration {
    pub node: String,
    pub host_version: String,
    /// Where the link comes from (`ip:port`), for the record.
    pub address: String,
    pub volumes: Vec<String>,
    pub writers: Vec<Writer>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub link: LinkId,
    pub host_version: String,
    pub address: String,
    pub volumes: BTreeSet<String>,
    /// By writer id.
    pub writers: BTreeMap<String, Writer>,
    pub attached: SystemTime,
    pub last_seen: Instant,
    /// The epoch this link's registration made.
    pub joined_epoch: u64,
}

/// What [`Registry::attach`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub link: LinkId,
    pub epoch: u64,
    /// The node's previous link, still open: it is replaced and must be closed.
    pub replaced: Option<LinkId>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("node {node}: this link was replaced by a newer one from the same node")]
    Replaced { node: String },
    #[error("node {node}: removes writer {writer:?}, which it never registered; the host re-registers its whole list on its next link")]
    UnknownWriter { node: String, writer: String },
    #[error("node {node}: adds writer {writer:?}, which it registered already; a writer whose metadata changed must be removed and added in one message")]
    DuplicateWriter { node: String, writer: String },
}

/// One volume's writers, as the catalog answers.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeView {
    pub volume: String,
    /// Live nodes with the volume configured.
    pub nodes: Vec<String>,
    /// (node, writer, names of its components on the volume), by node then writer id.
    pub writers: Vec<(String, Writer, Vec<String>)>,
}

#[derive(Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<String, Node>,
    epoch: u64,
    next_link: u64,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    fn bump(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    /// A node attaches with its whole state. An open link of the same node is replaced.
    pub fn attach(
        &mut self,
        registration: Registration,
        now: Instant,
        wall: SystemTime,
    ) -> Attached {
        self.next_link += 1;
        let link = LinkId(self.next_link);
        let epoch = self.bump();
        let node = Node {
            link,
            host_version: registration.host_version,
            address: registration.address,
            volumes: registration.volumes.into_iter().collect(),
            writers: registration
                .writers
                .into_iter()
                .map(|w| (w.metadata.id.clone(), w))
                .collect(),
            attached: wall,
            last_seen: now,
            joined_epoch: epoch,
        };
        let replaced = self
            .nodes
            .insert(registration.node, node)
            .map(|old| old.link);
        Attached {
            link,
            epoch,
            replaced,
        }
    }

    fn current(&mut self, node: &str, link: LinkId) -> Result<&mut Node, RegistryError> {
        match self.nodes.get_mut(node) {
            Some(n) if n.link == link => Ok(n),
            _ => Err(RegistryError::Replaced { node: node.into() }),
        }
    }

    /// The node was heard from (any message). Returns the epoch now.
    pub fn seen(&mut self, node: &str, link: LinkId, now: Instant) -> Result<u64, RegistryError> {
        self.current(node, link)?.last_seen = now;
        Ok(self.epoch)
    }

    /// The node's writer list changed: `removed` go first, then `added`. Checked whole before
    /// anything changes. Returns the epoch now (bumped when anything changed).
    pub fn change_writers(
        &mut self,
        node: &str,
        link: LinkId,
        removed: &[String],
        added: Vec<Writer>,
        now: Instant,
    ) -> Result<u64, RegistryError> {
        let entry = self.current(node, link)?;
        entry.last_seen = now;
        let mut ids: BTreeSet<&str> = entry.writers.keys().map(String::as_str).collect();
        for id in removed {
            if !ids.remove(id.as_str()) {
                return Err(RegistryError::UnknownWriter {
                    node: node.into(),
                    writer: id.clone(),
                });
            }
        }
        for w in &added {
            if !ids.insert(w.metadata.id.as_str()) {
                return Err(RegistryError::DuplicateWriter {
                    node: node.into(),
                    writer: w.metadata.id.clone(),
                });
            }
        }
        if removed.is_empty() && added.is_empty() {
            return Ok(self.epoch);
        }
        for id in removed {
            entry.writers.remove(id);
        }
        for w in added {
            entry.writers.insert(w.metadata.id.clone(), w);
        }
        Ok(self.bump())
    }

    /// The link ended (closed, broken or silent). Removes the node when this is its current
    /// link and returns the new epoch; an older, replaced link changes nothing.
    pub fn detach(&mut self, node: &str, link: LinkId) -> Option<u64> {
        match self.nodes.get(node) {
            Some(n) if n.link == link => {
                self.nodes.remove(node);
                Some(self.bump())
            }
            _ => None,
        }
    }

    /// Per volume, which writers on which live nodes have components on it. `filter` empty:
    /// every volume a node has or a writer names. A writer with no components concerns every
    /// volume (JSON.md) and is listed under each, with no component names.
    pub fn writers_by_volume(&self, filter: &[String]) -> Vec<VolumeView> {
        let volumes: BTreeSet<String> = if filter.is_empty() {
            self.nodes
                .values()
                .flat_map(|n| {
                    n.volumes.iter().cloned().chain(
                        n.writers
                            .values()
                            .flat_map(|w| w.metadata.components.iter().map(|c| c.volume.clone())),
                    )
                })
                .collect()
        } else {
            filter.iter().cloned().collect()
        };
        volumes
            .into_iter()
            .map(|volume| {
                let nodes = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.volumes.contains(&volume))
                    .map(|(name, _)| name.clone())
                    .collect();
                let mut writers = vec![];
                for (name, node) in &self.nodes {
                    for w in node.writers.values() {
                        let components: Vec<String> = w
                            .metadata
                            .components
                            .iter()
                            .filter(|c| c.volume == volume)
                            .map(|c| c.name.clone())
                            .collect();
                        if w.metadata.components.is_empty() || !components.is_empty() {
                            writers.push((name.clone(), w.clone(), components));
                        }
                    }
                }
                VolumeView {
                    volume,
                    nodes,
                    writers,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiesce_proto::{ComponentKind, Level};

    fn writer(id: &str, volumes: &[&str]) -> Writer {
        let mut metadata = WriterMetadata::new(id, "test writer", Level::BackEnd);
        for (i, v) in volumes.iter().enumerate() {
            metadata = metadata.with_component(format!("c{i}"), ComponentKind::Files, *v, ["/x"]);
        }
        Writer {
            metadata_json: String::new(),
            metadata,
            origin: "test".into(),
        }
    }

    fn registration(node: &str, volumes: &[&str], writers: Vec<Writer>) -> Registration {
        Registration {
            node: node.into(),
            host_version: "0.1.0".into(),
            address: "127.0.0.1:1".into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            writers,
        }
    }

    #[test]
    fn every_membership_change_bumps_the_epoch_once() {
        let (mut r, now, wall) = (Registry::new(), Instant::now(), SystemTime::now());
        let a = r.attach(registration("n1", &["shared"], vec![]), now, wall);
        assert_eq!(a.epoch, 1);
        let b = r.attach(registration("n2", &["shared"], vec![]), now, wall);
        assert_eq!(b.epoch, 2);
        assert_eq!(
            r.seen("n1", a.link, now),
            Ok(2),
            "a heartbeat changes nothing"
        );
        let e = r
            .change_writers("n1", a.link, &[], vec![writer("w", &["shared"])], now)
            .unwrap();
        assert_eq!(e, 3);
        assert_eq!(r.change_writers("n1", a.link, &[], vec![], now), Ok(3));
        let e = r
            .change_writers(
                "n1",
                a.link,
                &["w".into()],
                vec![writer("w", &["other"])],
                now,
            )
            .unwrap();
        assert_eq!(e, 4, "a changed writer is one change");
        assert_eq!(r.detach("n2", b.link), Some(5));
        assert_eq!(r.detach("n2", b.link), None);
        assert_eq!(r.epoch(), 5);
    }

    #[test]
    fn a_reattaching_node_replaces_its_old_link_which_then_changes_nothing() {
        let (mut r, now, wall) = (Registry::new(), Instant::now(), SystemTime::now());
        let old = r.attach(registration("n1", &[], vec![]), now, wall);
        let new = r.attach(registration("n1", &[], vec![]), now, wall);
        assert_eq!(new.replaced, Some(old.link));
        assert!(matches!(
            r.seen("n1", old.link, now),
            Err(RegistryError::Replaced { .. })
        ));
        assert_eq!(
            r.detach("n1", old.link),
            None,
            "the old link's end keeps the node"
        );
        assert_eq!(r.nodes().len(), 1);
        assert_eq!(r.detach("n1", new.link), Some(3));
    }

    #[test]
    fn inconsistent_changes_are_refused_whole() {
        let (mut r, now, wall) = (Registry::new(), Instant::now(), SystemTime::now());
        let a = r.attach(registration("n1", &[], vec![writer("w", &[])]), now, wall);
        let e = r.change_writers("n1", a.link, &["nope".into()], vec![], now);
        assert!(matches!(e, Err(RegistryError::UnknownWriter { .. })));
        let e = r.change_writers(
            "n1",
            a.link,
            &[],
            vec![writer("x", &[]), writer("w", &[])],
            now,
        );
        assert!(matches!(e, Err(RegistryError::DuplicateWriter { .. })));
        assert_eq!(r.nodes()["n1"].writers.len(), 1, "nothing half-applied");
        assert_eq!(r.epoch(), 1);
    }

    #[test]
    fn writers_are_grouped_per_volume() {
        let (mut r, now, wall) = (Registry::new(), Instant::now(), SystemTime::now());
        r.attach(
            registration("n1", &["shared"], vec![writer("pg", &["shared", "logs"])]),
            now,
            wall,
        );
        r.attach(
            registration(
                "n2",
                &["shared"],
                vec![writer("hooks", &[]), writer("app", &["shared"])],
            ),
            now,
            wall,
        );
        let all = r.writers_by_volume(&[]);
        let names: Vec<&str> = all.iter().map(|v| v.volume.as_str()).collect();
        assert_eq!(names, ["logs", "shared"]);
        let shared = &all[1];
        assert_eq!(shared.nodes, ["n1", "n2"]);
        let rows: Vec<(&str, &str, usize)> = shared
            .writers
            .iter()
            .map(|(n, w, c)| (n.as_str(), w.metadata.id.as_str(), c.len()))
            .collect();
        assert_eq!(
            rows,
            [("n1", "pg", 1), ("n2", "app", 1), ("n2", "hooks", 0)]
        );
        let logs = &all[0];
        assert!(logs.nodes.is_empty());
        let ids: Vec<&str> = logs
            .writers
            .iter()
            .map(|(_, w, _)| w.metadata.id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["pg", "hooks"],
            "a writer without components concerns every volume"
        );
        let unknown = r.writers_by_volume(&["nowhere".into()]);
        assert_eq!(unknown.len(), 1);
        assert_eq!(
            unknown[0].writers.len(),
            1,
            "only the writer without components"
        );
    }
}
