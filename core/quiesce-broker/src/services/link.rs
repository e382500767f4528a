//! The `Link` service: hosts attach, register their writers, report changes and heartbeats,
//! and answer set commands. What a registration must satisfy is [`check_registration`], plain
//! logic tested below; this module does the streaming around it.

use crate::broker::{Broker, Outbound};
use crate::registry::{LinkId, Registration, RegistryError, Writer};
use quiesce_link::identity::{PeerIdentity, Role};
use quiesce_link::v1::{self, broker_message, host_message};
use quiesce_link::LINK_VERSION;
use quiesce_proto::WriterMetadata;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// The node a registration may attach as, or why it is refused. `who` is the peer's certificate
/// (`None` in insecure mode, where the claimed name is taken on trust but must still be a valid
/// node name).
pub fn check_registration(
    who: Option<&PeerIdentity>,
    register: &v1::Register,
    address: &str,
) -> Result<String, Status> {
    if let Some(who) = who {
        if who.role != Role::Node {
            tracing::warn!(peer = %who, %address, "refused a link: not a node certificate");
            return Err(Status::permission_denied(format!(
                "{} presents a {} certificate; only node certificates may attach as hosts (make one with `quiesce-broker certs --nodes NAME`)",
                who.name, who.role
            )));
        }
    }
    if register.link_version != LINK_VERSION {
        return Err(Status::failed_precondition(format!(
            "node {:?} speaks link version {}, this broker speaks {LINK_VERSION}; run the same quiesce release on the broker and the hosts",
            register.node, register.link_version
        )));
    }
    match who {
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
            Ok(who.name.clone())
        }
        None => {
            if !quiesce_proto::is_valid_node_name(&register.node) {
                return Err(Status::invalid_argument(format!(
                    "the registration names the node {:?}; {} (set node = \"NAME\" in the host's configuration)",
                    register.node,
                    quiesce_proto::NODE_NAME_RULE
                )));
            }
            tracing::warn!(
                node = %register.node,
                %address,
                "INSECURE: trusting the node name this host claims; nothing proves it"
            );
            Ok(register.node.clone())
        }
    }
}

/// Reads a host's writers, refusing bad metadata with the node and writer named.
fn parse_writers(node: &str, writers: &[v1::Writer]) -> Result<Vec<Writer>, Status> {
    if writers.len() > quiesce_proto::limits::WRITERS_PER_NODE {
        return Err(Status::invalid_argument(format!(
            "node {node}: {} writers, more than the {} a node may have (README, \"Limits\")",
            writers.len(),
            quiesce_proto::limits::WRITERS_PER_NODE
        )));
    }
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
        if let Some(who) = who.as_ref().filter(|w| w.role != Role::Node) {
            // Refused before reading anything from the stream.
            let register = v1::Register::default();
            return Err(check_registration(Some(who), &register, &address).unwrap_err());
        }
        let mut inbound = request.into_inner();
        let timeout = broker.config().heartbeat_timeout;
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
        let node = check_registration(who.as_ref(), &register, &address)?;
        let writers = parse_writers(&node, &register.writers)?;
        let writer_count = writers.len();
        let volumes = register.volumes.clone();
        let (kick_tx, kick) = oneshot::channel();
        // Room for every command of a set at once: commands are sent without waiting.
        let (tx, rx) = mpsc::channel(1024);
        let attached = broker.attach(
            Registration {
                node: node.clone(),
                host_version: register.host_version.clone(),
                address: address.clone(),
                volumes: register.volumes,
                writers,
            },
            kick_tx,
            tx.clone(),
        );
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
    let timeout = broker.config().heartbeat_timeout;
    // Only a host that ended its request stream left cleanly (it shut down, `Link::close`);
    // a crash, a cut or a reset ends the stream with an error instead.
    let mut clean = false;
    let why = loop {
        let message = tokio::select! {
            reason = &mut kick => {
                let reason = reason.unwrap_or_else(|_| "the broker closed this link".into());
                let _ = tx.send(Err(Status::aborted(reason.clone()))).await;
                // Replaced: the node stays, with its newer link.
                broker.detach(&node, link, &reason, false);
                return;
            }
            _ = tx.closed() => break "the host stopped reading its link".to_string(),
            next = next_message(&mut inbound, timeout, broker.heartbeat_interval(), &node) => match next {
                None => {
                    let why = format!("no heartbeat for {} ms (the heartbeat timeout)", timeout.as_millis());
                    let _ = tx.try_send(Err(Status::deadline_exceeded(format!(
                        "node {node}: {why}; the broker dropped this link, attach again"
                    ))));
                    break why;
                }
                Some(Ok(None)) => {
                    clean = true;
                    break "its host closed the link (the host shut down cleanly)".to_string();
                }
                Some(Err(status)) => break format!("its link broke: {}", status.message()),
                Some(Ok(Some(message))) => message,
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
    broker.detach(&node, link, &why, clean);
}

/// The next message of a link, or `None` when the node sent nothing for `timeout`. A timeout
/// that fires late is the broker's own stall (SIGSTOPped, starved of CPU: it did not run at the
/// deadline), not the node's silence — what the node sent meanwhile waits unread in the
/// connection — so the node gets another `grace` (a heartbeat interval) to be heard, and the
/// set in progress fails on the broker's own gap in its leases, not on a node said to be gone.
async fn next_message(
    inbound: &mut Streaming<v1::HostMessage>,
    timeout: Duration,
    grace: Duration,
    node: &str,
) -> Option<Result<Option<v1::HostMessage>, Status>> {
    let mut until = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(until, inbound.message()).await {
            Ok(next) => return Some(next),
            Err(_) => {
                let late = tokio::time::Instant::now().saturating_duration_since(until);
                if late <= grace / 4 {
                    return None;
                }
                tracing::warn!(
                    node,
                    "the heartbeat timeout fired {} ms late: the broker itself did not run (paused or starved of CPU); node {node} gets another {} ms to be heard before it is dropped",
                    late.as_millis(),
                    grace.as_millis()
                );
                until = tokio::time::Instant::now() + grace;
            }
        }
    }
}

/// One message on an attached link; the answer to send, if any.
fn handle(
    broker: &Broker,
    node: &str,
    link: LinkId,
    message: v1::HostMessage,
) -> Result<Option<v1::BrokerMessage>, Status> {
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
        Some(host_message::Body::Heartbeat(_)) => broker.seen(node, link),
        Some(host_message::Body::WritersChanged(change)) => {
            let added = parse_writers(node, &change.added)?;
            broker.change_writers(node, link, &change.removed, added)
        }
        Some(host_message::Body::Register(_)) => {
            return Err(Status::invalid_argument(
                "a link registers once, in its first message; to register again, attach again",
            ))
        }
        Some(host_message::Body::CommandReply(reply)) => {
            broker.deliver_replies(node, vec![reply]);
            broker.seen(node, link)
        }
        Some(host_message::Body::CommandReplies(batch)) => {
            broker.deliver_replies(node, batch.replies);
            broker.seen(node, link)
        }
        Some(host_message::Body::LeaseLapsed(lapsed)) => {
            broker.lease_lapsed(node, lapsed.set_id, lapsed.reason);
            broker.seen(node, link)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn register(node: &str) -> v1::Register {
        v1::Register {
            node: node.into(),
            host_version: "test".into(),
            link_version: LINK_VERSION,
            writers: vec![],
            volumes: vec![],
        }
    }

    fn peer(name: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn a_node_attaches_as_its_certificate_says_and_nothing_else() {
        let n1 = peer("n1", Role::Node);
        assert_eq!(
            check_registration(Some(&n1), &register("n1"), "a").unwrap(),
            "n1"
        );
        let e = check_registration(Some(&n1), &register("n2"), "a").unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains("claims node \"n2\""),
            "{}",
            e.message()
        );
        let client = peer("backup", Role::Client);
        let e = check_registration(Some(&client), &register("backup"), "a").unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message().contains("only node certificates"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn another_link_version_and_bad_names_are_refused() {
        let mut old = register("n1");
        old.link_version = LINK_VERSION + 1;
        let e = check_registration(Some(&peer("n1", Role::Node)), &old, "a").unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        // Insecure mode takes the name on trust, but only a valid one: the same rule as the
        // certificates' (a host named "-n1" could never get one).
        assert_eq!(
            check_registration(None, &register("n1"), "a").unwrap(),
            "n1"
        );
        for bad in ["-n1", ".n1", "", "a b", &"x".repeat(64)] {
            let e = check_registration(None, &register(bad), "a").unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        }
    }
}
