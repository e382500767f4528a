//! The broker's gRPC services: `Link` (hosts attach) and `Catalog` (requesters ask), over the
//! shared [`Broker`] state.

use crate::registry::{LinkId, Registration, Registry, RegistryError, Writer};
use quiesce_link::identity::{peer_identity, PeerIdentity, Role};
use quiesce_link::v1::{self, broker_message, command_reply, host_message};
use quiesce_link::LINK_VERSION;
use quiesce_proto::WriterMetadata;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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
    next_command: AtomicU64,
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
            next_command: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Every membership change from now on, with what changed (running sets follow it).
    pub fn subscribe_membership(&self) -> broadcast::Receiver<Membership> {
        self.membership.subscribe()
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

    fn heartbeat_interval(&self) -> Duration {
        (self.config.heartbeat_timeout / 3).max(Duration::from_millis(10))
    }

    /// The identity of a caller: from its certificate; `None` in insecure mode.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<PeerIdentity>, Status> {
        if self.config.insecure {
            return Ok(None);
        }
        peer_identity(request)
            .map(Some)
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }

    /// The end of a link: the node leaves unless a newer link replaced this one.
    fn detach(&self, node: &str, link: LinkId, why: &str) {
        let epoch = {
            let mut state = self.lock();
            state.kicks.remove(&link);
            if state.outbound.get(node).is_some_and(|(l, _)| *l == link) {
                state.outbound.remove(node);
            }
            state.registry.detach(node, link)
        };
        if let Some(epoch) = epoch {
            tracing::warn!(node, epoch, "node left: {why}");
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

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// Reads a host's writers, refusing bad metadata with the node and writer named.
fn parse_writers(node: &str, writers: &[v1::Writer]) -> Result<Vec<Writer>, Status> {
    let mut ids = BTreeSet::new();
    writers
        .iter()
        .map(|w| {
            let metadata: WriterMetadata = serde_json::from_str(&w.metadata_json).map_err(|e| {
                Status::invalid_argument(format!(
                    "node {node}: a writer's metadata (from {}) is not the JSON form of JSON.md: {e}",
                    w.origin
                ))
            })?;
            metadata.validate().map_err(|e| {
                Status::invalid_argument(format!(
                    "node {node}: writer {:?} (from {}): {e}",
                    metadata.id, w.origin
                ))
            })?;
            if !ids.insert(metadata.id.clone()) {
                return Err(Status::invalid_argument(format!(
                    "node {node}: writer id {:?} is listed twice; writer ids are unique per node",
                    metadata.id
                )));
            }
            Ok(Writer {
                metadata,
                metadata_json: w.metadata_json.clone(),
                origin: w.origin.clone(),
            })
        })
        .collect()
}

/// The `Link` service.
#[derive(Debug, Clone)]
pub struct LinkService(pub Arc<Broker>);

type Outbound = mpsc::Sender<Result<v1::BrokerMessage, Status>>;

#[tonic::async_trait]
impl v1::link_server::Link for LinkService {
    type AttachStream = ReceiverStream<Result<v1::BrokerMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<v1::HostMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let broker = &self.0;
        let who = broker.authenticate(&request)?;
        let address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "an unknown address".into());
        if let Some(who) = &who {
            if who.role != Role::Node {
                tracing::warn!(peer = %who, %address, "refused a link: not a node certificate");
                return Err(Status::permission_denied(format!(
                    "{} presents a {} certificate; only node certificates may attach as hosts (make one with `quiesce-broker certs --nodes NAME`)",
                    who.name, who.role
                )));
            }
        }
        let mut inbound = request.into_inner();
        let timeout = broker.config.heartbeat_timeout;
        let first = match tokio::time::timeout(timeout, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no registration within {} ms of attaching",
                    timeout.as_millis()
                )))
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => {
                return Err(Status::cancelled(
                    "the host closed the link before registering",
                ))
            }
            Ok(Ok(Some(message))) => message,
        };
        let Some(host_message::Body::Register(register)) = first.body else {
            return Err(Status::failed_precondition(
                "the first message of a link must be a registration (Register)",
            ));
        };
        if register.link_version != LINK_VERSION {
            return Err(Status::failed_precondition(format!(
                "node {:?} speaks link version {}, this broker speaks {LINK_VERSION}; run the same quiesce release on the broker and the hosts",
                register.node, register.link_version
            )));
        }
        let node = match &who {
            Some(who) => {
                if register.node != who.name {
                    tracing::warn!(
                        certificate = %who.name,
                        claimed = %register.node,
                        %address,
                        "refused a registration: it claims another node than its certificate"
                    );
                    return Err(Status::permission_denied(format!(
                        "refused: this host's certificate is node {:?}'s but its registration claims node {:?}; the node name comes from the certificate: set node = {:?} in the host's configuration, or give the host the certificate of {:?} (`quiesce-broker certs --nodes {}`)",
                        who.name, register.node, who.name, register.node, register.node
                    )));
                }
                who.name.clone()
            }
            None => {
                if !crate::certs::is_valid_name(&register.node) {
                    return Err(Status::invalid_argument(format!(
                        "the registration names the node {:?}; a node name is 1 to 63 of A-Z a-z 0-9 - _ . (set node = \"NAME\" in the host's configuration)",
                        register.node
                    )));
                }
                tracing::warn!(
                    node = %register.node,
                    %address,
                    "INSECURE: trusting the node name this host claims; nothing proves it"
                );
                register.node.clone()
            }
        };
        let writers = parse_writers(&node, &register.writers)?;
        let writer_count = writers.len();
        let volumes = register.volumes.clone();
        let (kick_tx, kick) = oneshot::channel();
        // Room for every command of a set at once: commands are sent without waiting.
        let (tx, rx) = mpsc::channel(1024);
        let attached = {
            let mut state = broker.lock();
            let attached = state.registry.attach(
                Registration {
                    node: node.clone(),
                    host_version: register.host_version.clone(),
                    address: address.clone(),
                    volumes: register.volumes,
                    writers,
                },
                Instant::now(),
                SystemTime::now(),
            );
            if let Some(old) = attached.replaced {
                if let Some(kick) = state.kicks.remove(&old) {
                    let _ = kick.send(format!(
                        "node {node} attached again from {address}; this older link is closed"
                    ));
                }
            }
            state.kicks.insert(attached.link, kick_tx);
            state
                .outbound
                .insert(node.clone(), (attached.link, tx.clone()));
            attached
        };
        broker.announce(Membership::Joined {
            node: node.clone(),
            epoch: attached.epoch,
            replaced: attached.replaced.is_some(),
        });
        tracing::info!(
            %node,
            %address,
            host_version = %register.host_version,
            writers = writer_count,
            volumes = ?volumes,
            epoch = attached.epoch,
            replaced_link = attached.replaced.is_some(),
            "node attached"
        );
        let registered = v1::BrokerMessage {
            body: Some(broker_message::Body::Registered(v1::Registered {
                node: node.clone(),
                epoch: attached.epoch,
                heartbeat_interval_ms: millis(broker.heartbeat_interval()),
                heartbeat_timeout_ms: millis(timeout),
                broker_version: env!("CARGO_PKG_VERSION").into(),
            })),
        };
        // The first message on the stream: the channel is new and nothing else has used it yet.
        tx.try_send(Ok(registered))
            .expect("a new channel has room for one message");
        tokio::spawn(run_link(
            broker.clone(),
            node,
            attached.link,
            inbound,
            tx,
            kick,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves one attached link until it ends, then takes its node out.
async fn run_link(
    broker: Arc<Broker>,
    node: String,
    link: LinkId,
    mut inbound: Streaming<v1::HostMessage>,
    tx: Outbound,
    mut kick: oneshot::Receiver<String>,
) {
    let timeout = broker.config.heartbeat_timeout;
    let why = loop {
        let message = tokio::select! {
            reason = &mut kick => {
                let reason = reason.unwrap_or_else(|_| "the broker closed this link".into());
                let _ = tx.send(Err(Status::aborted(reason.clone()))).await;
                // Replaced: the node stays, with its newer link.
                broker.detach(&node, link, &reason);
                return;
            }
            _ = tx.closed() => break "the host stopped reading its link".to_string(),
            next = tokio::time::timeout(timeout, inbound.message()) => match next {
                Err(_) => {
                    let why = format!("no heartbeat for {} ms (the heartbeat timeout)", timeout.as_millis());
                    let _ = tx.try_send(Err(Status::deadline_exceeded(format!(
                        "node {node}: {why}; the broker dropped this link, attach again"
                    ))));
                    break why;
                }
                Ok(Ok(None)) => break "its host closed the link".to_string(),
                Ok(Err(status)) => break format!("its link broke: {}", status.message()),
                Ok(Ok(Some(message))) => message,
            },
        };
        match handle(&broker, &node, link, message) {
            Ok(Some(reply)) => {
                if tx.send(Ok(reply)).await.is_err() {
                    break "the host stopped reading its link".to_string();
                }
            }
            Ok(None) => {}
            Err(status) => {
                let why = format!("refused a message: {}", status.message());
                let _ = tx.send(Err(status)).await;
                break why;
            }
        }
    };
    broker.detach(&node, link, &why);
}

/// Hands each reply to the set waiting for it. A node answers only for its own writers; replies
/// nobody waits for (late, for an ended set, completion notices) are dropped.
fn route_replies(broker: &Broker, node: &str, replies: Vec<v1::CommandReply>) {
    let routed: Vec<(Awaiting, v1::CommandReply)> = {
        let mut state = broker.lock();
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

/// One message on an attached link; the answer to send, if any.
fn handle(
    broker: &Broker,
    node: &str,
    link: LinkId,
    message: v1::HostMessage,
) -> Result<Option<v1::BrokerMessage>, Status> {
    let now = Instant::now();
    let replaced = |e: RegistryError| match e {
        RegistryError::Replaced { .. } => Status::aborted(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    };
    // A command reply is its own answer: acknowledging it would double the traffic of a set.
    let acknowledge = !matches!(
        message.body,
        Some(host_message::Body::CommandReply(_) | host_message::Body::CommandReplies(_))
    );
    let epoch = match message.body {
        Some(host_message::Body::Heartbeat(_)) => broker.lock().registry.seen(node, link, now),
        Some(host_message::Body::WritersChanged(change)) => {
            let added = parse_writers(node, &change.added)?;
            let (ids_added, ids_removed): (Vec<String>, Vec<String>) = (
                added.iter().map(|w| w.metadata.id.clone()).collect(),
                change.removed.clone(),
            );
            let result = broker
                .lock()
                .registry
                .change_writers(node, link, &change.removed, added, now);
            if let Ok(epoch) = result.clone() {
                broker.announce(Membership::WritersChanged {
                    node: node.into(),
                    epoch,
                    removed: ids_removed.clone(),
                });
                tracing::info!(
                    node,
                    added = ?ids_added,
                    removed = ?ids_removed,
                    epoch,
                    "writers changed"
                );
            }
            result
        }
        Some(host_message::Body::Register(_)) => {
            return Err(Status::invalid_argument(
                "a link registers once, in its first message; to register again, attach again",
            ))
        }
        Some(host_message::Body::CommandReply(reply)) => {
            route_replies(broker, node, vec![reply]);
            broker.lock().registry.seen(node, link, now)
        }
        Some(host_message::Body::CommandReplies(batch)) => {
            route_replies(broker, node, batch.replies);
            broker.lock().registry.seen(node, link, now)
        }
        None => {
            return Err(Status::invalid_argument(
                "an empty message: this host speaks a newer link protocol than the broker; upgrade the broker",
            ))
        }
    }
    .map_err(replaced)?;
    if !acknowledge {
        return Ok(None);
    }
    Ok(Some(v1::BrokerMessage {
        body: Some(broker_message::Body::Ack(v1::Ack {
            seq: message.seq,
            epoch,
        })),
    }))
}

/// The `Catalog` service.
#[derive(Debug, Clone)]
pub struct CatalogService(pub Arc<Broker>);

#[tonic::async_trait]
impl v1::catalog_server::Catalog for CatalogService {
    async fn list_writers(
        &self,
        request: Request<v1::ListWritersRequest>,
    ) -> Result<Response<v1::ListWritersReply>, Status> {
        self.0.authenticate(&request)?;
        let mut filter = request.into_inner().volumes;
        let registry = self.0.registry();
        let snapshotted = &self.0.config.volumes;
        if filter.is_empty() && !snapshotted.is_empty() {
            // Every volume: the broker's own as well as those the nodes know.
            let mut all: BTreeSet<String> = registry
                .writers_by_volume(&[])
                .into_iter()
                .map(|v| v.volume)
                .collect();
            all.extend(snapshotted.keys().cloned());
            filter = all.into_iter().collect();
        }
        let volumes = registry
            .writers_by_volume(&filter)
            .into_iter()
            .map(|v| v1::VolumeWriters {
                broker_provider: snapshotted.get(&v.volume).cloned().unwrap_or_default(),
                volume: v.volume,
                nodes: v.nodes,
                writers: v
                    .writers
                    .into_iter()
                    .map(|(node, w, components)| v1::WriterOnNode {
                        node,
                        metadata_json: w.metadata_json,
                        origin: w.origin,
                        components,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(v1::ListWritersReply {
            epoch: registry.epoch(),
            volumes,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesReply>, Status> {
        self.0.authenticate(&request)?;
        let registry = self.0.registry();
        let now = Instant::now();
        let nodes = registry
            .nodes()
            .iter()
            .map(|(name, n)| v1::NodeInfo {
                name: name.clone(),
                host_version: n.host_version.clone(),
                address: n.address.clone(),
                volumes: n.volumes.iter().cloned().collect(),
                writers: n.writers.keys().cloned().collect(),
                attached_unix_ms: n
                    .attached
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                last_seen_ms_ago: now.saturating_duration_since(n.last_seen).as_millis() as u64,
                joined_epoch: n.joined_epoch,
            })
            .collect();
        Ok(Response::new(v1::ListNodesReply {
            epoch: registry.epoch(),
            nodes,
        }))
    }
}

/// The `Sets` service: requesters (`quiesce snapshot ...` through a host, backup software with a
/// client certificate) create, list, show and delete sets.
#[derive(Debug, Clone)]
pub struct SetsService {
    pub broker: Arc<Broker>,
    /// `None`: the broker was started without a configuration, so it has no volumes.
    pub sets: Option<Arc<crate::sets::Sets>>,
}

impl SetsService {
    fn sets<T>(&self, request: &Request<T>) -> Result<Arc<crate::sets::Sets>, Status> {
        self.broker.authenticate(request)?;
        self.sets.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this broker was started without --config, so it has no volumes and no catalog: start it with --config broker.toml ([volumes.NAME] and catalog = PATH)",
            )
        })
    }
}

fn record_json(record: &quiesce_proto::SetRecord) -> String {
    serde_json::to_string(record).expect("records always serialize to JSON")
}

fn catalog_status(e: crate::catalog::CatalogError) -> Status {
    tracing::error!("{e}");
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl v1::sets_server::Sets for SetsService {
    async fn create(
        &self,
        request: Request<v1::CreateSetRequest>,
    ) -> Result<Response<v1::SetReply>, Status> {
        let sets = self.sets(&request)?;
        let v1::CreateSetRequest {
            volumes,
            best_effort,
        } = request.into_inner();
        let record = sets
            .create(quiesce_proto::SetRequest {
                volumes,
                best_effort,
            })
            .await
            .map_err(|e| match e {
                crate::sets::CreateError::Catalog(e) => catalog_status(e),
                e => Status::failed_precondition(e.to_string()),
            })?;
        Ok(Response::new(v1::SetReply {
            record_json: record_json(&record),
        }))
    }

    async fn list(
        &self,
        request: Request<v1::ListSetsRequest>,
    ) -> Result<Response<v1::ListSetsReply>, Status> {
        let sets = self.sets(&request)?;
        let records = sets.list().map_err(catalog_status)?;
        Ok(Response::new(v1::ListSetsReply {
            records_json: records.iter().map(record_json).collect(),
        }))
    }

    async fn show(
        &self,
        request: Request<v1::ShowSetRequest>,
    ) -> Result<Response<v1::SetReply>, Status> {
        let sets = self.sets(&request)?;
        let id = request.into_inner().id;
        match sets.show(&id).map_err(catalog_status)? {
            None => Err(Status::not_found(format!(
                "no set {id} in the catalog (`quiesce snapshot list` shows them)"
            ))),
            Some((record, true)) => Err(Status::failed_precondition(format!(
                "set {id} is still running (in {}); ask again when it has ended",
                match record.outcome {
                    quiesce_proto::Outcome::Failed { phase, .. } => phase.to_string(),
                    _ => "progress".into(),
                }
            ))),
            Some((record, false)) => Ok(Response::new(v1::SetReply {
                record_json: record_json(&record),
            })),
        }
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteSetRequest>,
    ) -> Result<Response<v1::SetReply>, Status> {
        let sets = self.sets(&request)?;
        let id = request.into_inner().id;
        let record = tokio::task::spawn_blocking(move || sets.delete(&id))
            .await
            .map_err(|e| Status::internal(format!("the deletion task failed: {e}")))?
            .map_err(|e| match e {
                crate::sets::DeleteError::Unknown(_) => Status::not_found(e.to_string()),
                crate::sets::DeleteError::Catalog(e) => catalog_status(e),
                e => Status::failed_precondition(e.to_string()),
            })?;
        Ok(Response::new(v1::SetReply {
            record_json: record_json(&record),
        }))
    }
}
