//! Snapshot sets across the cluster, for requesters on this node.
//!
//! `org.quiesce.Host1`'s `CreateSnapshot`, `ListSnapshots`, `ShowSnapshot` and `DeleteSnapshot`
//! come here and are forwarded to the broker's `quiesce.link.v1.Sets` with the link options this
//! host was started with (`--broker` and its node certificate): a backup tool on the node needs
//! no certificate of its own, only the right to call the host.
//!
//! Each request opens its own channel: a set takes seconds, so the connection costs nothing
//! worth keeping, and no state is shared between concurrent requests (nor with the host's link,
//! whose stream must never wait behind a request).

use crate::broker_link::LinkOptions;
use quiesce_link::v1::sets_client::SetsClient;
use quiesce_link::v1::{
    CancelSetRequest, CreateSetRequest, DeleteSetRequest, ListSetsRequest, RenewSetRequest,
    ShowSetRequest, ShowWritersRequest,
};
use quiesce_link::ConnectError;
use quiesce_proto::SetRecord;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tonic::transport::Channel;

/// Forwards requesters' set requests to the broker, when the host has one.
#[derive(Debug, Clone)]
pub struct SetRequests {
    broker: Option<LinkOptions>,
    /// The last records of sets started through this host ([`SetRequests::start`]) as the
    /// broker's stream ended them: see [`SetRequests::show`].
    ended: Arc<Mutex<VecDeque<(String, String)>>>,
}

/// How many ended records of started sets the host keeps for [`SetRequests::show`].
const ENDED_KEPT: usize = 16;

/// Why a forwarded request got no set record; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetRequestError {
    #[error("this host was started without --broker, so it cannot ask the cluster for snapshot sets: restart quiesce-host with --broker https://BROKER:PORT --ca ca.pem --cert NODE.pem --key NODE.key (RunLocalSet snapshots a volume of this node alone)")]
    NoBroker,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("cannot reach the broker at {url} to {action}: {cause}")]
    Unreachable {
        url: String,
        action: &'static str,
        cause: String,
    },
    #[error("the broker at {url} refused to {action}: {message}")]
    Refused {
        url: String,
        action: &'static str,
        message: String,
    },
    #[error("the broker at {url} is busy: {message}; nothing was frozen or deleted")]
    Busy { url: String, message: String },
    #[error("the broker at {url} has no such volume: {message}; `quiesce writers` lists the cluster's volumes")]
    UnknownVolume { url: String, message: String },
    #[error("the broker at {url} knows no set {id:?} ({message}); ListSnapshots (`quiesce snapshot list`) shows the sets it knows")]
    UnknownSet {
        url: String,
        id: String,
        message: String,
    },
    #[error("the broker at {url} refused the cancellation: {message}")]
    NotItsRequester { url: String, message: String },
    #[error("the broker at {url} failed to {action}: {message}; {hint}")]
    Failed {
        url: String,
        action: &'static str,
        message: String,
        hint: &'static str,
    },
}

/// The most record JSON `ListSnapshots` returns in one D-Bus reply (the system bus refuses
/// messages past 32 MiB).
pub const ALL_RECORDS_BYTES: usize = 16 << 20;

/// One page of set records.
#[derive(Debug, Clone, Default)]
pub struct SetsPage {
    pub records: Vec<String>,
    /// Where the next page starts; empty on the last.
    pub next: String,
    /// Catalog rows the broker could not read, with why and how to remove them.
    pub unreadable: Vec<String>,
}

impl SetRequests {
    /// `broker`: the host's `--broker` options, or `None` when it runs alone.
    pub fn new(broker: Option<LinkOptions>) -> SetRequests {
        SetRequests {
            broker,
            ended: Arc::default(),
        }
    }

    /// Runs one set of `volumes` across the cluster; returns its record (SetRecord JSON) once
    /// it ended, whatever its outcome.
    /// `lease_ms`: the requester's lease on the snapshot kept, from the set's end; 0: kept
    /// until deleted. `requester_uid`: the D-Bus caller's uid, which the broker records as the
    /// set's requester beside this node's name.
    pub async fn create(
        &self,
        volumes: Vec<String>,
        best_effort: bool,
        lease_ms: u64,
        timeout_ms: u64,
        requester_uid: Option<u32>,
    ) -> Result<String, SetRequestError> {
        const ACTION: &str = "run a snapshot set";
        let broker = self.broker()?;
        check_volumes(&volumes)?;
        tracing::info!(broker = %broker.url, ?volumes, best_effort, "forwarding a snapshot set request to the broker");
        let mut client = connect(broker, ACTION).await?;
        let reply = client
            .create(CreateSetRequest {
                volumes,
                best_effort,
                lease_ms,
                timeout_ms,
                requester_uid,
            })
            .await
            .map_err(|status| {
                from_status(
                    broker,
                    ACTION,
                    "",
                    status,
                    // The set may have run: its record is the only trustworthy account.
                    "if the set had started, its record shows its outcome once the broker answers again (ListSnapshots)",
                )
            })?;
        record(broker, ACTION, reply.into_inner().record_json)
    }

    /// Starts one set of `volumes` across the cluster, as [`SetRequests::create`] runs one, and
    /// returns its id as soon as the broker admitted it, with the set's progress to follow.
    pub async fn start(
        &self,
        volumes: Vec<String>,
        best_effort: bool,
        lease_ms: u64,
        timeout_ms: u64,
        requester_uid: Option<u32>,
    ) -> Result<(String, SetProgress), SetRequestError> {
        const ACTION: &str = "start a snapshot set";
        let broker = self.broker()?;
        check_volumes(&volumes)?;
        tracing::info!(broker = %broker.url, ?volumes, best_effort, "forwarding a snapshot set request to the broker, following its progress");
        let mut client = connect(broker, ACTION).await?;
        let not_started = |status| {
            from_status(
                broker,
                ACTION,
                "",
                status,
                "if the set had started, its record shows its outcome once the broker answers again (ListSnapshots)",
            )
        };
        let mut stream = client
            .start(CreateSetRequest {
                volumes,
                best_effort,
                lease_ms,
                timeout_ms,
                requester_uid,
            })
            .await
            .map_err(not_started)?
            .into_inner();
        let first = stream.message().await.map_err(not_started)?;
        let Some(first) = first.filter(|m| !m.id.is_empty()) else {
            return Err(SetRequestError::Failed {
                url: broker.url.clone(),
                action: ACTION,
                message: "its answer named no set".into(),
                hint: "run the same quiesce release on the broker and the hosts",
            });
        };
        Ok((
            first.id.clone(),
            SetProgress {
                broker: broker.clone(),
                id: first.id,
                stream,
                ended: self.ended.clone(),
            },
        ))
    }

    /// Cancels the running set `id` for the D-Bus caller `requester_uid`: the broker aborts
    /// it (everyone thawed, nothing kept) if the caller is its requester or root.
    pub async fn cancel(&self, id: String, requester_uid: u32) -> Result<(), SetRequestError> {
        const ACTION: &str = "cancel a snapshot set";
        let broker = self.broker()?;
        check_id(&id)?;
        tracing::info!(broker = %broker.url, set = %id, uid = requester_uid, "forwarding a set's cancellation to the broker");
        let mut client = connect(broker, ACTION).await?;
        client
            .cancel(CancelSetRequest {
                id: id.clone(),
                requester_uid: Some(requester_uid),
            })
            .await
            .map_err(|status| match status.code() {
                // The broker's own refusal: the caller is not the set's requester.
                tonic::Code::PermissionDenied => SetRequestError::NotItsRequester {
                    url: broker.url.clone(),
                    message: status.message().to_string(),
                },
                _ => from_status(broker, ACTION, &id, status, "try again"),
            })?;
        Ok(())
    }

    /// One page of the set records the broker keeps, oldest first, after the set `after`
    /// (empty: from the first).
    pub async fn list_page(&self, after: String, limit: u32) -> Result<SetsPage, SetRequestError> {
        const ACTION: &str = "list the snapshot sets";
        let broker = self.broker()?;
        let mut client = connect(broker, ACTION).await?;
        let reply = client
            .list(ListSetsRequest {
                page_size: limit,
                page_token: after,
            })
            .await
            .map_err(|status| from_status(broker, ACTION, "", status, "try again"))?
            .into_inner();
        Ok(SetsPage {
            records: reply
                .records_json
                .into_iter()
                .map(|json| record(broker, ACTION, json))
                .collect::<Result<_, _>>()?,
            next: reply.next_page_token,
            unreadable: reply.unreadable,
        })
    }

    /// Every set record the broker keeps, oldest first, page by page — as long as they fit
    /// one D-Bus reply ([`ALL_RECORDS_BYTES`]); past that, `list_page` pages on.
    pub async fn list(&self) -> Result<Vec<String>, SetRequestError> {
        let (mut records, mut after, mut bytes) = (vec![], String::new(), 0);
        loop {
            let page = self.list_page(after, 0).await?;
            for unreadable in &page.unreadable {
                tracing::warn!("{unreadable}");
            }
            bytes += page.records.iter().map(String::len).sum::<usize>();
            if bytes > ALL_RECORDS_BYTES {
                return Err(SetRequestError::InvalidRequest(format!(
                    "the catalog holds more records than fit one reply ({} MiB): ask for them page by page (ListSnapshotsPage; `quiesce snapshot list` does)",
                    ALL_RECORDS_BYTES >> 20
                )));
            }
            records.extend(page.records);
            if page.next.is_empty() {
                return Ok(records);
            }
            after = page.next;
        }
    }

    /// The writers of set `id`'s record from `offset`, at most `limit` (0: a page's worth), and
    /// how many the record has in all: for a record a reply had to compact.
    pub async fn show_writers(
        &self,
        id: String,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<String>, u64), SetRequestError> {
        const ACTION: &str = "show a snapshot set's writers";
        let broker = self.broker()?;
        check_id(&id)?;
        let mut client = connect(broker, ACTION).await?;
        let reply = client
            .show_writers(ShowWritersRequest {
                id: id.clone(),
                offset,
                limit,
            })
            .await
            .map_err(|status| from_status(broker, ACTION, &id, status, "try again"))?
            .into_inner();
        Ok((reply.writers_json, reply.total))
    }

    /// The record of set `id`.
    pub async fn show(&self, id: String) -> Result<String, SetRequestError> {
        const ACTION: &str = "show a snapshot set";
        let broker = self.broker()?;
        check_id(&id)?;
        let mut client = connect(broker, ACTION).await?;
        let reply = client.show(ShowSetRequest { id: id.clone() }).await;
        match reply.map_err(|status| from_status(broker, ACTION, &id, status, "try again")) {
            Ok(reply) => record(broker, ACTION, reply.into_inner().record_json),
            // The catalog still says running while the broker told this host the set ended:
            // its final record could not be written (a full disk). The set's end as the broker
            // told it is the truthful answer for the requester that started it.
            Err(e @ SetRequestError::Refused { .. }) => {
                let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
                match ended.iter().find(|(of, _)| *of == id) {
                    Some((_, json)) => Ok(json.clone()),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the snapshot set `id` kept; returns its record after the deletion.
    pub async fn delete(&self, id: String) -> Result<String, SetRequestError> {
        const ACTION: &str = "delete a snapshot";
        let broker = self.broker()?;
        check_id(&id)?;
        tracing::info!(broker = %broker.url, set = %id, "forwarding a snapshot deletion to the broker");
        let mut client = connect(broker, ACTION).await?;
        let reply = client
            .delete(DeleteSetRequest { id: id.clone() })
            .await
            .map_err(|status| {
                from_status(
                    broker,
                    ACTION,
                    &id,
                    status,
                    "ShowSnapshot tells whether the snapshot was deleted once the broker answers again",
                )
            })?;
        record(broker, ACTION, reply.into_inner().record_json)
    }

    /// Renews the requester's lease on the snapshot set `id` kept: `lease_ms` from now (0:
    /// until deleted); returns its record.
    pub async fn renew(&self, id: String, lease_ms: u64) -> Result<String, SetRequestError> {
        const ACTION: &str = "renew a snapshot's lease";
        let broker = self.broker()?;
        check_id(&id)?;
        let mut client = connect(broker, ACTION).await?;
        let reply = client
            .renew(RenewSetRequest {
                id: id.clone(),
                lease_ms,
            })
            .await
            .map_err(|status| from_status(broker, ACTION, &id, status, "try again"))?;
        record(broker, ACTION, reply.into_inner().record_json)
    }

    fn broker(&self) -> Result<&LinkOptions, SetRequestError> {
        self.broker.as_ref().ok_or(SetRequestError::NoBroker)
    }
}

/// A started set's progress, as the broker tells it.
#[derive(Debug)]
pub struct SetProgress {
    broker: LinkOptions,
    id: String,
    stream: tonic::Streaming<quiesce_link::v1::SetProgress>,
    ended: Arc<Mutex<VecDeque<(String, String)>>>,
}

/// What a started set did next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// It entered this phase (as JSON.md spells phases).
    Phase(String),
    /// It ended: its record (SetRecord JSON).
    Ended(String),
}

impl SetProgress {
    /// The next thing the set did; after [`Progress::Ended`], nothing more comes. An error when
    /// the broker stopped telling before the set ended (it died, the connection broke).
    pub async fn next(&mut self) -> Result<Progress, SetRequestError> {
        const ACTION: &str = "follow a snapshot set";
        let lost = |cause: String| {
            SetRequestError::Unreachable {
            url: self.broker.url.clone(),
            action: ACTION,
            cause: format!(
                "{cause}; the set {} may still be running or have ended: ShowSnapshot shows its record once the broker answers again",
                self.id
            ),
        }
        };
        match self.stream.message().await {
            Ok(Some(m)) if !m.record_json.is_empty() => {
                let json = record(&self.broker, ACTION, m.record_json)?;
                let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
                if ended.len() == ENDED_KEPT {
                    ended.pop_front();
                }
                ended.push_back((self.id.clone(), json.clone()));
                Ok(Progress::Ended(json))
            }
            Ok(Some(m)) => Ok(Progress::Phase(m.phase)),
            Ok(None) => Err(lost(
                "the broker ended the stream before the set ended".into(),
            )),
            Err(status) => Err(lost(status.to_string())),
        }
    }
}

fn check_volumes(volumes: &[String]) -> Result<(), SetRequestError> {
    if volumes.is_empty() {
        return Err(SetRequestError::InvalidRequest(
            "no volume given: name at least one volume of the cluster (`quiesce writers` lists them)".into(),
        ));
    }
    if volumes.iter().any(|v| v.trim().is_empty()) {
        return Err(SetRequestError::InvalidRequest(format!(
            "an empty volume name in {volumes:?}: name volumes as the hosts' [volumes.NAME] tables do"
        )));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), SetRequestError> {
    if id.trim().is_empty() {
        return Err(SetRequestError::InvalidRequest(
            "no set id given: pass one of the ids ListSnapshots (`quiesce snapshot list`) shows"
                .into(),
        ));
    }
    Ok(())
}

/// A fresh channel to the broker. `quiesce_link::connect` bounds the whole connect (TLS
/// handshake included) by its `CONNECT_TIMEOUT`, so a peer that accepts and never answers cannot
/// hold the requester.
async fn connect(
    broker: &LinkOptions,
    action: &'static str,
) -> Result<SetsClient<Channel>, SetRequestError> {
    let unreachable = |cause: String| SetRequestError::Unreachable {
        url: broker.url.clone(),
        action,
        cause,
    };
    match quiesce_link::connect(&broker.url, &broker.security).await {
        Ok(channel) => Ok(SetsClient::new(channel)),
        // The message names the URL and the fix already; keep only what it adds.
        Err(ConnectError::Connect { cause, hint, .. }) => {
            Err(unreachable(format!("{cause}; {hint}")))
        }
        Err(e) => Err(unreachable(format!(
            "{e} (these are the --broker options this host was started with: fix them and restart it)"
        ))),
    }
}

fn from_status(
    broker: &LinkOptions,
    action: &'static str,
    id: &str,
    status: tonic::Status,
    if_unreachable: &'static str,
) -> SetRequestError {
    use tonic::Code;
    let message = match (status.message(), std::error::Error::source(&status)) {
        ("", None) => format!("{:?}", status.code()),
        (m, None) => m.to_string(),
        ("", Some(cause)) => quiesce_link::error_chain(cause),
        (m, Some(cause)) => format!("{m}: {}", quiesce_link::error_chain(cause)),
    };
    let url = broker.url.clone();
    match status.code() {
        // Only a create names volumes; every other request names a set.
        Code::NotFound if id.is_empty() => SetRequestError::UnknownVolume { url, message },
        Code::Aborted => SetRequestError::Busy { url, message },
        Code::NotFound => SetRequestError::UnknownSet {
            url,
            id: id.to_string(),
            message,
        },
        Code::FailedPrecondition => SetRequestError::Refused {
            url,
            action,
            message: format!("{message}; nothing was frozen or deleted"),
        },
        Code::InvalidArgument => SetRequestError::InvalidRequest(format!(
            "the broker at {url} refused the request as malformed: {message}"
        )),
        // A status with a cause was made here from a transport error (the connection broke
        // mid-call: the broker died or the link was cut); one the broker sent has none.
        Code::Unknown | Code::Internal if std::error::Error::source(&status).is_some() => {
            SetRequestError::Unreachable {
                url,
                action,
                cause: format!(
                    "the connection broke during the call ({message}); {if_unreachable}"
                ),
            }
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            SetRequestError::Unreachable {
                url,
                action,
                cause: format!("{message}; {if_unreachable}"),
            }
        }
        Code::PermissionDenied | Code::Unauthenticated => SetRequestError::Failed {
            url,
            action,
            message,
            hint: "the broker refused this node's certificate for requests: give the host (--cert, --key) the node certificate `quiesce-broker certs` made for it",
        },
        Code::Unimplemented => SetRequestError::Failed {
            url,
            action,
            message,
            hint: "this broker does not serve snapshot sets (quiesce.link.v1.Sets): run the same quiesce release on the broker and the hosts",
        },
        _ => SetRequestError::Failed {
            url,
            action,
            message,
            hint: "see the broker's log",
        },
    }
}

/// Passes the broker's record on as it came, once it reads as a SetRecord: a requester must be
/// able to rely on the form of JSON.md, and a broker of another release is better named here
/// than in every requester's parser.
fn record(
    broker: &LinkOptions,
    action: &'static str,
    json: String,
) -> Result<String, SetRequestError> {
    match serde_json::from_str::<SetRecord>(&json) {
        Ok(_) => Ok(json),
        Err(e) => Err(SetRequestError::Failed {
            url: broker.url.clone(),
            action,
            message: format!("its answer is not a set record in the form of JSON.md ({e})"),
            hint: "run the same quiesce release on the broker and the hosts",
        }),
    }
}
