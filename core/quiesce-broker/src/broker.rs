//! The broker's shared state: the registry of live nodes, each node's current link (where its set
//! commands and leases go), the set commands waiting for replies, and the membership changes
//! broadcast to running sets. The gRPC services (`services`) and the sets (`sets`) use it; it
//! uses neither.

use crate::registry::{Attached, LinkId, Registration, Registry, RegistryError, Writer};
use quiesce_link::identity::{peer_identity, PeerIdentity};
use quiesce_link::v1::{self, broker_message, command_reply};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::{Request, Status};

/// Where a node's link takes the broker's messages.
pub type Outbound = mpsc::Sender<Result<v1::BrokerMessage, Status>>;

/// How the broker judges its peers.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// A node that sends nothing for this long is dropped; hosts are told to send a heartbeat
    /// every third of it.
    pub heartbeat_timeout: Duration,
    /// No TLS: node names are taken from the registrations, unchecked (local demos only).
    pub insecure: bool,
    /// The volumes the broker snapshots, with their provider's name.
    pub volumes: std::collections::BTreeMap<String, String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            heartbeat_timeout: Duration::from_secs(15),
            insecure: false,
            volumes: Default::default(),
        }
    }
}

struct State {
    registry: Registry,
    /// Closes a link when a newer link of its node replaces it.
    kicks: HashMap<LinkId, oneshot::Sender<String>>,
    /// Each live node's current link: where its set commands and leases go.
    outbound: HashMap<String, (LinkId, Outbound)>,
    /// Set commands sent and not yet answered, by command id.
    awaiting: HashMap<u64, Awaiting>,
}

/// A set command waiting for its node's reply.
#[derive(Debug, Clone)]
pub struct Awaiting {
    pub writer: quiesce_proto::WriterRef,
    pub kind: quiesce_proto::CallKind,
    pub inputs: quiesce_driver::Inputs,
}

/// A change of the cluster's membership, as running sets need to hear it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// A node attached; `replaced`: it was attached already (its host restarted or
    /// reconnected), so the state of its writers is unknown.
    Joined {
        node: String,
        epoch: u64,
        replaced: bool,
    },
    Left {
        node: String,
        epoch: u64,
        why: String,
    },
    WritersChanged {
        node: String,
        epoch: u64,
        removed: Vec<String>,
    },
}

impl Membership {
    pub fn epoch(&self) -> u64 {
        match self {
            Membership::Joined { epoch, .. }
            | Membership::Left { epoch, .. }
            | Membership::WritersChanged { epoch, .. } => *epoch,
        }
    }
}

/// The broker's shared state: the registry of live nodes, the set commands in flight, and the
/// membership changes, broadcast to running sets.
pub struct Broker {
    config: BrokerConfig,
    state: Mutex<State>,
    membership: broadcast::Sender<Membership>,
    /// Nodes reporting that their lease on a set lapsed: (node, set id, why).
    lapses: broadcast::Sender<(String, String, String)>,
    next_command: AtomicU64,
    metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.config)
            .field("epoch", &self.lock().registry.epoch())
            .finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Arc<Broker> {
        Arc::new(Broker {
            config,
            state: Mutex::new(State {
                registry: Registry::new(),
                kicks: HashMap::new(),
                outbound: HashMap::new(),
                awaiting: HashMap::new(),
            }),
            membership: broadcast::channel(1024).0,
            lapses: broadcast::channel(1024).0,
            next_command: AtomicU64::new(1),
            metrics: crate::metrics::Metrics::default(),
        })
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// What the broker counts (kept whether or not `--metrics-listen` serves it).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Every membership change from now on, with what changed (running sets follow it).
    pub fn subscribe_membership(&self) -> broadcast::Receiver<Membership> {
        self.membership.subscribe()
    }

    /// Nodes' reports that their lease on a set lapsed, from now on (running sets follow it).
    pub fn subscribe_lapses(&self) -> broadcast::Receiver<(String, String, String)> {
        self.lapses.subscribe()
    }

    /// `node` reports that its lease on `set` lapsed and it released the set's writers.
    pub fn lease_lapsed(&self, node: &str, set: String, reason: String) {
        tracing::error!(node, set = %set, "{reason}");
        self.metrics.lease_lapsed(node);
        // No receiver (no set running, or another set): the set is over already.
        let _ = self.lapses.send((node.to_string(), set, reason));
    }

    /// Sends a message to `node`'s current link, without waiting; `false` when the node has no
    /// link or its link's queue is full (a node that stopped reading).
    pub fn send_to(&self, node: &str, message: broker_message::Body) -> bool {
        let Some((_, tx)) = self.lock().outbound.get(node).cloned() else {
            return false;
        };
        tx.try_send(Ok(v1::BrokerMessage {
            body: Some(message),
        }))
        .is_ok()
    }

    /// A new command id; when `awaiting` is given, the reply to that command will go to its
    /// set (a `Complete` is sent without: nobody waits for its reply).
    pub fn new_command(&self, awaiting: Option<Awaiting>) -> u64 {
        let id = self.next_command.fetch_add(1, Ordering::Relaxed);
        if let Some(awaiting) = awaiting {
            self.lock().awaiting.insert(id, awaiting);
        }
        id
    }

    /// Stops waiting for the replies to these commands (their set ended).
    pub fn forget_commands(&self, ids: &[u64]) {
        let mut state = self.lock();
        for id in ids {
            state.awaiting.remove(id);
        }
    }

    /// Records a node's new link: it becomes the node's current link (an older one of the same
    /// node is closed with `kick`'s message), and every running set hears that it joined.
    pub fn attach(
        &self,
        registration: Registration,
        kick: oneshot::Sender<String>,
        outbound: Outbound,
    ) -> Attached {
        let node = registration.node.clone();
        let address = registration.address.clone();
        let attached = {
            let mut state = self.lock();
            let attached = state
                .registry
                .attach(registration, Instant::now(), SystemTime::now());
            if let Some(old) = attached.replaced {
                if let Some(kick) = state.kicks.remove(&old) {
                    let _ = kick.send(format!(
                        "node {node} attached again from {address}; this older link is closed"
                    ));
                }
            }
            state.kicks.insert(attached.link, kick);
            state
                .outbound
                .insert(node.clone(), (attached.link, outbound));
            attached
        };
        self.announce(Membership::Joined {
            node,
            epoch: attached.epoch,
            replaced: attached.replaced.is_some(),
        });
        attached
    }

    /// The node was heard from on `link`; the epoch now.
    pub fn seen(&self, node: &str, link: LinkId) -> Result<u64, RegistryError> {
        self.lock().registry.seen(node, link, Instant::now())
    }

    /// The node's writer list changed; running sets hear which writers went away.
    pub fn change_writers(
        &self,
        node: &str,
        link: LinkId,
        removed: &[String],
        added: Vec<Writer>,
    ) -> Result<u64, RegistryError> {
        let ids_added: Vec<String> = added.iter().map(|w| w.metadata.id.clone()).collect();
        let epoch =
            self.lock()
                .registry
                .change_writers(node, link, removed, added, Instant::now())?;
        self.announce(Membership::WritersChanged {
            node: node.into(),
            epoch,
            removed: removed.to_vec(),
        });
        tracing::info!(node, added = ?ids_added, removed = ?removed, epoch, "writers changed");
        Ok(epoch)
    }

    /// Hands each reply to the set waiting for it. A node answers only for its own writers;
    /// replies nobody waits for (late, for an ended set, completion notices) are dropped.
    pub fn deliver_replies(&self, node: &str, replies: Vec<v1::CommandReply>) {
        let routed: Vec<(Awaiting, v1::CommandReply)> = {
            let mut state = self.lock();
            replies
                .into_iter()
                .filter_map(|reply| match state.awaiting.get(&reply.command_id) {
                    Some(a) if a.writer.node == node && a.writer.writer == reply.writer => {
                        state.awaiting.remove(&reply.command_id).map(|a| (a, reply))
                    }
                    _ => {
                        tracing::debug!(
                            node,
                            command = reply.command_id,
                            "a reply nobody waits for (late, for an ended set, or a completion notice)"
                        );
                        None
                    }
                })
                .collect()
        };
        for (a, reply) in routed {
            let result = match reply.result {
                Some(command_reply::Result::Ok(ok)) => Ok(ok.reports.into_iter().collect()),
                Some(command_reply::Result::Failed(f)) => {
                    Err(quiesce_link::calls::failure_from_wire(f))
                }
                None => Err(quiesce_proto::CallFailure::error(format!(
                    "node {node} answered with an empty result (a newer host?)"
                ))),
            };
            let _ = a.inputs.send(quiesce_driver::Input::Reply {
                writer: a.writer,
                kind: a.kind,
                result,
            });
        }
    }

    fn announce(&self, change: Membership) {
        // No receiver (no set running) is fine.
        let _ = self.membership.send(change);
    }

    /// The registry now. Hold the guard briefly: every link waits on it.
    pub fn registry(&self) -> RegistryGuard<'_> {
        RegistryGuard(self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.config.heartbeat_timeout / 3).max(Duration::from_millis(10))
    }

    /// The identity of a caller: from its certificate; `None` in insecure mode.
    pub(crate) fn authenticate<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<PeerIdentity>, Status> {
        if self.config.insecure {
            return Ok(None);
        }
        peer_identity(request)
            .map(Some)
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }

    /// The end of a link: the node leaves unless a newer link replaced this one. `clean`: its
    /// host said goodbye (logged as information, not as a warning).
    pub(crate) fn detach(&self, node: &str, link: LinkId, why: &str, clean: bool) {
        let epoch = {
            let mut state = self.lock();
            state.kicks.remove(&link);
            if state.outbound.get(node).is_some_and(|(l, _)| *l == link) {
                state.outbound.remove(node);
            }
            state.registry.detach(node, link)
        };
        if let Some(epoch) = epoch {
            if clean {
                tracing::info!(node, epoch, "node left: {why}");
            } else {
                tracing::warn!(node, epoch, "node left: {why}");
            }
            self.announce(Membership::Left {
                node: node.into(),
                epoch,
                why: why.into(),
            });
        }
    }
}

/// A view of the registry; see [`Broker::registry`].
pub struct RegistryGuard<'a>(MutexGuard<'a, State>);

impl std::ops::Deref for RegistryGuard<'_> {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.0.registry
    }
}
