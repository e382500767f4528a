//! The host's link to the cluster broker (`quiesce-host --broker URL --ca --cert --key`).
//!
//! One task keeps one `Attach` stream (`quiesce.link.v1.Link`) open: it connects over mutual
//! TLS, registers the node (name, version, volumes, every writer's metadata as JSON), then sends
//! the writer list's changes as they happen (applications registering and leaving over D-Bus)
//! and a heartbeat at the interval the broker asks for. When the link breaks, the broker goes
//! silent, or the broker refuses the node, it logs why and connects again after a backoff
//! (0.1 s doubling, jittered, at most 10 s; from the start again once registered). The
//! host runs on its own meanwhile: local sets and D-Bus do not depend on the broker.
//!
//! A host that shuts down ([`Link::close`]) ends its request stream: the broker tells that end
//! (a clean leave) from a link that broke (a crash, a cut), and logs it as such.
//!
//! The broker's set commands arriving on the link are carried out by [`crate::remote_sets`]; the
//! node's leases outlive any one link, so a broker that dies or a link that is cut mid-set leaves
//! no writer frozen past the lease.

use crate::remote_sets::{self, Leases};
use crate::Host;
use quiesce_link::v1::{self, broker_message, host_message, link_client::LinkClient};
use quiesce_link::{ConnectError, Security, LINK_VERSION};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Where the broker is and how to prove who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOptions {
    pub url: String,
    pub security: Security,
}

#[derive(Debug, thiserror::Error)]
#[error("--broker {url}: {flags}")]
pub struct LinkOptionsError {
    url: String,
    flags: quiesce_link::SecurityFlagsError,
}

impl LinkOptions {
    /// From the command-line flags, checked.
    pub fn from_flags(
        url: String,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        insecure: bool,
    ) -> Result<LinkOptions, LinkOptionsError> {
        match Security::from_flags(ca, cert, key, insecure) {
            Ok(security) => Ok(LinkOptions { url, security }),
            Err(flags) => Err(LinkOptionsError { url, flags }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the broker at {url} refused this node: {message}")]
    Refused { url: String, message: String },
    #[error("the link to the broker at {url} broke: {message}")]
    Broken { url: String, message: String },
    #[error("the broker at {url} closed the link")]
    Closed { url: String },
    #[error("the broker at {url} sent nothing for {ms} ms (its heartbeat timeout)")]
    Silent { url: String, ms: u128 },
    #[error("the broker at {url} did not answer the registration as a quiesce broker of this release would ({got}); run the same quiesce release on the broker and the hosts")]
    Protocol { url: String, got: String },
    /// The host shuts down: it ended its side of the link ([`Link::close`]).
    #[error("the host closed its link to the broker at {url}")]
    Stopping { url: String },
}

impl LinkError {
    fn from_status(url: &str, status: tonic::Status) -> LinkError {
        use tonic::Code;
        let message = if status.message().is_empty() {
            format!("{:?}", status.code())
        } else {
            status.message().to_string()
        };
        let message = match std::error::Error::source(&status) {
            Some(cause) => format!("{message}: {}", quiesce_link::error_chain(cause)),
            None => message,
        };
        let url = url.to_string();
        match status.code() {
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::FailedPrecondition => LinkError::Refused { url, message },
            _ => LinkError::Broken { url, message },
        }
    }
}

/// The running link task (see [`spawn`]).
#[derive(Debug)]
pub struct Link {
    closing: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Ends the link as a host that shuts down: the host ends its request stream (the broker
    /// then sees the node leave cleanly, not a broken link) and waits, at most `within`, for the
    /// broker to end its side. A link that is not attached just stops reconnecting.
    pub async fn close(self, within: Duration) {
        let _ = self.closing.send(true);
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Starts the link task; it runs until the process ends or [`Link::close`].
pub fn spawn(host: Arc<Host>, options: LinkOptions) -> Link {
    match &options.security {
        Security::Insecure => tracing::warn!(
            broker = %options.url,
            "INSECURE LINK (--insecure): plaintext, no certificate; the broker takes this node's name on trust. Use it only for a local demo."
        ),
        Security::Tls(files) => match files.identity() {
            Ok(me) if me.name != host.node() || me.role != quiesce_link::Role::Node => {
                tracing::warn!(
                    certificate = %me,
                    node = host.node(),
                    "this host's certificate is not the node certificate of {:?}: the broker will refuse the registration; give the host {}.pem, or set node = {:?} in its configuration",
                    host.node(),
                    host.node(),
                    me.name
                )
            }
            Ok(_) => {}
            Err(e) => tracing::error!("{e}"),
        },
    }
    let (closing, closed) = watch::channel(false);
    let task = tokio::spawn(run(host, options, closed));
    Link { closing, task }
}

async fn run(host: Arc<Host>, options: LinkOptions, mut closing: watch::Receiver<bool>) {
    let mut backoff = reconnect_backoff();
    let leases = Leases::start(host.clone());
    loop {
        let mut registered = false;
        let Err(error) = session(&host, &leases, &options, &mut registered, closing.clone()).await;
        if let LinkError::Stopping { .. } = error {
            tracing::info!("{error}");
            return;
        }
        if registered {
            backoff = reconnect_backoff();
        }
        let delay = backoff.next().unwrap_or(RECONNECT_MAX);
        match &error {
            LinkError::Refused { .. } => tracing::error!(
                "{error}; fix the host's certificate or configuration; trying again in {} ms",
                delay.as_millis()
            ),
            _ => tracing::warn!(
                "{error}; the host goes on alone and reconnects in {} ms",
                delay.as_millis()
            ),
        }
        // A retry delay, not a synchronisation: nothing waits on the link.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            true = closing_asked(&mut closing) => return,
        }
    }
}

/// Whether [`Link::close`] was called (`false`, never, when the [`Link`] was dropped instead:
/// the link then runs on, as a dropped task handle's task would).
async fn closing_asked(closing: &mut watch::Receiver<bool>) -> bool {
    closing.wait_for(|c| *c).await.is_ok()
}

/// How long a closing link waits for the broker to end its side.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Writer id → (metadata JSON, origin): what the broker was last told.
type WriterList = BTreeMap<String, (String, String)>;

fn writer_list(host: &Host) -> WriterList {
    host.writers()
        .iter()
        .map(|w| {
            let json = serde_json::to_string(&w.metadata)
                .expect("writer metadata always serializes to JSON");
            (w.id().to_string(), (json, w.origin.clone()))
        })
        .collect()
}

fn wire_writer((json, origin): &(String, String)) -> v1::Writer {
    v1::Writer {
        metadata_json: json.clone(),
        origin: origin.clone(),
    }
}

/// What to tell a broker that was last told `told` when the writers are `now`: every writer
/// gone or changed is removed, every writer new or changed is added (a changed writer is in
/// both, which the broker applies as removed-then-added). `None` when nothing changed.
fn writers_changed(told: &WriterList, now: &WriterList) -> Option<v1::WritersChanged> {
    let removed: Vec<String> = told
        .iter()
        .filter(|(id, w)| now.get(*id) != Some(w))
        .map(|(id, _)| id.clone())
        .collect();
    let added: Vec<v1::Writer> = now
        .iter()
        .filter(|(id, w)| told.get(*id) != Some(w))
        .map(|(_, w)| wire_writer(w))
        .collect();
    (!removed.is_empty() || !added.is_empty()).then_some(v1::WritersChanged { removed, added })
}

/// Ends an attached link as a host that shuts down. The end of the request stream is the
/// host's goodbye: the broker logs the node as gone cleanly, then ends the response stream,
/// which is waited for (at most [`CLOSE_WAIT`]) so that the process does not exit, resetting
/// the connection, before.
async fn say_goodbye(
    requests: mpsc::Sender<v1::HostMessage>,
    mut inbound: Streaming<v1::BrokerMessage>,
) {
    drop(requests);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
}

/// One link, from connecting until it fails.
async fn session(
    host: &Host,
    leases: &Leases,
    options: &LinkOptions,
    registered: &mut bool,
    mut closing: watch::Receiver<bool>,
) -> Result<std::convert::Infallible, LinkError> {
    let url = options.url.as_str();
    let mut generation = host.watch_writers();
    generation.borrow_and_update();
    let mut told = writer_list(host);
    let (tx, rx) = mpsc::channel(16);
    let mut seq = 0u64;
    let mut message = |body| {
        seq += 1;
        v1::HostMessage {
            seq,
            body: Some(body),
        }
    };
    let register = v1::Register {
        node: host.node().to_string(),
        host_version: env!("CARGO_PKG_VERSION").to_string(),
        link_version: LINK_VERSION,
        writers: told.values().map(wire_writer).collect(),
        volumes: host.config().volumes.keys().cloned().collect(),
    };
    tx.try_send(message(host_message::Body::Register(register)))
        .expect("a new channel has room for one message");
    let attaching = async {
        let channel = quiesce_link::connect(url, &options.security).await?;
        let mut client = LinkClient::new(channel);

        let response = client
            .attach(ReceiverStream::new(rx))
            .await
            .map_err(|s| match LinkError::from_status(url, s) {
                LinkError::Broken { url, message } => LinkError::Broken {
                    message: format!("{message} (before registering; if the broker logs `tls accept error`, it refused this node's certificate: use one made by the cluster's `quiesce-broker certs`, same ca.key)"),
                    url,
                },
                other => other,
            })?;
        let mut inbound = response.into_inner();
        let first =
            tokio::time::timeout(quiesce_link::tls::CONNECT_TIMEOUT, inbound.message()).await;
        let registration = match first {
            Err(_) => {
                return Err(LinkError::Silent {
                    url: url.into(),
                    ms: quiesce_link::tls::CONNECT_TIMEOUT.as_millis(),
                })
            }
            Ok(Err(status)) => return Err(LinkError::from_status(url, status)),
            Ok(Ok(None)) => return Err(LinkError::Closed { url: url.into() }),
            Ok(Ok(Some(v1::BrokerMessage {
                body: Some(broker_message::Body::Registered(r)),
            }))) => r,
            Ok(Ok(Some(other))) => {
                return Err(LinkError::Protocol {
                    url: url.into(),
                    got: format!("{other:?}"),
                })
            }
        };
        Ok::<_, LinkError>((inbound, registration))
    };
    tokio::pin!(attaching);
    let (mut inbound, registration) = tokio::select! {
        attached = &mut attaching => attached?,
        true = closing_asked(&mut closing) => {
            // The broker may have registered this node already, its answer still on the way: a
            // host that dropped the half-made link now would be seen leaving by a reset. So the
            // attach gets a moment to finish, and an attached link is closed as a goodbye.
            if let Ok(Ok((inbound, _))) = tokio::time::timeout(CLOSE_WAIT, attaching).await {
                say_goodbye(tx, inbound).await;
            }
            return Err(LinkError::Stopping { url: url.into() });
        }
    };
    *registered = true;
    tracing::info!(
        broker = url,
        node = %registration.node,
        epoch = registration.epoch,
        writers = told.len(),
        broker_version = %registration.broker_version,
        "attached to the broker"
    );
    let silence = Duration::from_millis(registration.heartbeat_timeout_ms.max(30) as u64);
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + Duration::from_millis(registration.heartbeat_interval_ms.max(10) as u64),
        Duration::from_millis(registration.heartbeat_interval_ms.max(10) as u64),
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let (replies, mut outgoing) = mpsc::unbounded_channel();
    let broken = |_| LinkError::Broken {
        url: url.into(),
        message: "the request stream closed".into(),
    };
    loop {
        tokio::select! {
            true = closing_asked(&mut closing) => {
                say_goodbye(tx, inbound).await;
                return Err(LinkError::Stopping { url: url.into() });
            }
            Some(body) = outgoing.recv() => {
                // Answers ready together go in one message.
                let mut replies = vec![];
                let mut others = vec![];
                for body in std::iter::once(body).chain(std::iter::from_fn(|| outgoing.try_recv().ok())) {
                    match body {
                        host_message::Body::CommandReply(reply) => replies.push(reply),
                        other => others.push(other),
                    }
                }
                match <[v1::CommandReply; 1]>::try_from(replies) {
                    Ok([one]) => tx.send(message(host_message::Body::CommandReply(one))).await.map_err(broken)?,
                    Err(replies) if replies.is_empty() => {}
                    Err(replies) => tx
                        .send(message(host_message::Body::CommandReplies(v1::CommandReplies { replies })))
                        .await
                        .map_err(broken)?,
                }
                for other in others {
                    tx.send(message(other)).await.map_err(broken)?;
                }
            }
            () = leases.noticed() => {
                for notice in leases.take_notices() {
                    tracing::warn!(broker = url, set = %notice.set_id, "telling the broker this node's lease lapsed");
                    tx.send(message(host_message::Body::LeaseLapsed(notice)))
                        .await
                        .map_err(broken)?;
                }
            }
            _ = heartbeat.tick() => {
                tx.send(message(host_message::Body::Heartbeat(v1::Heartbeat {})))
                    .await
                    .map_err(broken)?;
            }
            Ok(()) = generation.changed() => {
                generation.borrow_and_update();
                let now = writer_list(host);
                let Some(change) = writers_changed(&told, &now) else {
                    continue;
                };
                tracing::info!(broker = url, removed = ?change.removed, added = change.added.len(), "telling the broker of writer changes");
                tx.send(message(host_message::Body::WritersChanged(change)))
                    .await
                    .map_err(broken)?;
                told = now;
            }
            next = tokio::time::timeout_at(last_heard + silence, inbound.message()) => match next {
                Err(_) => return Err(LinkError::Silent { url: url.into(), ms: silence.as_millis() }),
                Ok(Err(status)) => return Err(LinkError::from_status(url, status)),
                Ok(Ok(None)) => return Err(LinkError::Closed { url: url.into() }),
                Ok(Ok(Some(m))) => {
                    last_heard = Instant::now();
                    match m.body {
                        Some(broker_message::Body::Ack(ack)) => {
                            tracing::trace!(seq = ack.seq, epoch = ack.epoch, "acknowledged");
                        }
                        Some(broker_message::Body::Command(command)) => {
                            remote_sets::carry_out(host, leases, command, &replies);
                        }
                        Some(broker_message::Body::Commands(batch)) => {
                            for command in batch.commands {
                                remote_sets::carry_out(host, leases, command, &replies);
                            }
                        }
                        Some(broker_message::Body::Lease(lease)) => {
                            leases.renew(&lease.set_id, Duration::from_millis(lease.lease_ms.into()));
                        }
                        Some(broker_message::Body::EndLease(end)) => leases.end(&end.set_id),
                        Some(broker_message::Body::Registered(_)) => tracing::warn!(
                            "the broker sent a second registration answer on one link; ignored"
                        ),
                        None => tracing::warn!(
                            "the broker sent a message this host does not know (a newer broker?); ignored"
                        ),
                    }
                }
            },
        }
    }
}

/// The longest wait before a reconnection.
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Reconnection delays: 0.1 s doubling up to 5 s, each plus a random jitter of up to 100 % (so
/// at most [`RECONNECT_MAX`]), so that a restarted broker is not hit by every node at once.
fn reconnect_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(RECONNECT_MAX / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        let ms = Duration::from_millis;
        let delays: Vec<Duration> = reconnect_backoff().take(12).collect();
        assert!(delays[0] >= ms(100) && delays[0] < ms(200), "{delays:?}");
        assert!(delays[1] >= ms(200) && delays[1] < ms(400), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= RECONNECT_MAX), "{delays:?}");
        assert!(delays[11] >= RECONNECT_MAX / 2, "{delays:?}");
        // Jittered: twelve draws are not all the same multiple of their base.
        let again: Vec<Duration> = reconnect_backoff().take(12).collect();
        assert_ne!(delays, again);
    }

    #[test]
    fn writer_changes_name_what_left_what_came_and_what_changed() {
        let list = |items: &[(&str, &str)]| -> WriterList {
            items
                .iter()
                .map(|(id, json)| (id.to_string(), (json.to_string(), "test".to_string())))
                .collect()
        };
        let told = list(&[("a", "{a}"), ("b", "{b}"), ("c", "{c}")]);
        assert_eq!(writers_changed(&told, &told), None);
        let now = list(&[("a", "{a}"), ("b", "{b2}"), ("d", "{d}")]);
        let change = writers_changed(&told, &now).unwrap();
        assert_eq!(change.removed, ["b", "c"]);
        let added: Vec<&str> = change
            .added
            .iter()
            .map(|w| w.metadata_json.as_str())
            .collect();
        assert_eq!(added, ["{b2}", "{d}"]);
        let change = writers_changed(&told, &WriterList::new()).unwrap();
        assert_eq!(change.removed, ["a", "b", "c"]);
        assert!(change.added.is_empty());
    }

    #[test]
    fn link_flags_errors_name_the_broker() {
        let e =
            LinkOptions::from_flags("https://b:7645".into(), None, None, None, false).unwrap_err();
        assert!(
            e.to_string().starts_with("--broker https://b:7645: "),
            "{e}"
        );
    }
}
