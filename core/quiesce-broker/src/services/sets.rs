//! The `Sets` service: snapshot sets for requesters, over [`crate::sets::Sets`].

use crate::broker::Broker;
use quiesce_link::{limits, v1};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

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

/// Who asks, from the peer's certificate: a node forwards for a local D-Bus caller, whose uid
/// it sends; a client names itself. A uid sent with a client certificate is not recorded: only
/// a host vouches for a caller on its node. (Without TLS, the uid is all there is.)
fn requester(
    peer: Option<quiesce_link::identity::PeerIdentity>,
    uid: Option<u32>,
) -> Option<quiesce_proto::Requester> {
    use quiesce_link::identity::Role;
    let requester = match peer {
        Some(p) if p.role == Role::Node => quiesce_proto::Requester {
            node: Some(p.name),
            uid,
            client: None,
        },
        Some(p) => quiesce_proto::Requester {
            client: Some(p.name),
            ..Default::default()
        },
        None => quiesce_proto::Requester {
            uid,
            ..Default::default()
        },
    };
    // Nothing known (an insecure broker, a requester that sent no uid): no field at all.
    (requester != quiesce_proto::Requester::default()).then_some(requester)
}

/// A record as a reply carries it: compacted past [`limits::RECORD_REPLY_BYTES`].
fn record_json(record: &quiesce_proto::SetRecord) -> String {
    serde_json::to_string(&record.compact(limits::RECORD_REPLY_BYTES))
        .expect("records always serialize to JSON")
}

/// A request's lease: 0 means kept until deleted.
fn lease(lease_ms: u64) -> Option<std::time::Duration> {
    (lease_ms > 0).then(|| std::time::Duration::from_millis(lease_ms))
}

fn catalog_status(e: crate::catalog::CatalogError) -> Status {
    tracing::error!("{e}");
    Status::internal(e.to_string())
}

impl SetsService {
    /// Admits the set a `Create` or `Start` asks for.
    fn start_set(
        &self,
        request: Request<v1::CreateSetRequest>,
    ) -> Result<crate::sets::Started, Status> {
        let sets = self.sets(&request)?;
        let peer = self.broker.authenticate(&request)?;
        let v1::CreateSetRequest {
            volumes,
            best_effort,
            lease_ms,
            timeout_ms,
            requester_uid,
        } = request.into_inner();
        sets.start(
            quiesce_proto::SetRequest {
                volumes,
                best_effort,
            },
            lease(lease_ms),
            (timeout_ms > 0).then(|| std::time::Duration::from_millis(timeout_ms)),
            requester(peer, requester_uid),
        )
        .map_err(|e| match e {
            crate::sets::CreateError::Catalog(e) => catalog_status(e),
            // Each refusal its own code, so that a requester can tell "retry later" from "fix
            // the request".
            e @ crate::sets::CreateError::Busy { .. } => Status::aborted(e.to_string()),
            e @ crate::sets::CreateError::UnknownVolume { .. } => Status::not_found(e.to_string()),
            e @ crate::sets::CreateError::OneVolume(_) => Status::invalid_argument(e.to_string()),
        })
    }
}

/// A set's record once its task ended.
async fn ended(started: tokio::task::JoinHandle<quiesce_proto::SetRecord>) -> String {
    record_json(&started.await.expect("a set's task does not panic"))
}

#[tonic::async_trait]
impl v1::sets_server::Sets for SetsService {
    async fn create(
        &self,
        request: Request<v1::CreateSetRequest>,
    ) -> Result<Response<v1::SetReply>, Status> {
        let started = self.start_set(request)?;
        Ok(Response::new(v1::SetReply {
            record_json: ended(started.record).await,
        }))
    }

    type StartStream = ReceiverStream<Result<v1::SetProgress, Status>>;

    async fn start(
        &self,
        request: Request<v1::CreateSetRequest>,
    ) -> Result<Response<Self::StartStream>, Status> {
        let crate::sets::Started {
            id,
            mut phases,
            record,
        } = self.start_set(request)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let progress = move |phase: String, record_json: String| v1::SetProgress {
            id: id.0.clone(),
            phase,
            record_json,
        };
        tx.try_send(Ok(progress(String::new(), String::new())))
            .expect("a new channel has room for one message");
        tokio::spawn(async move {
            // Phases a requester reads late wait in the set's channel; one that hung up stops
            // being told, and the set runs on.
            while let Some(phase) = phases.recv().await {
                if tx
                    .send(Ok(progress(phase.to_string(), String::new())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx
                .send(Ok(progress(String::new(), ended(record).await)))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelSetRequest>,
    ) -> Result<Response<v1::CancelSetReply>, Status> {
        let sets = self.sets(&request)?;
        let peer = self.broker.authenticate(&request)?;
        let v1::CancelSetRequest { id, requester_uid } = request.into_inner();
        sets.cancel(&id, requester(peer, requester_uid))
            .map_err(|e| match e {
                crate::sets::CancelError::NotRunning(_) => Status::not_found(e.to_string()),
                crate::sets::CancelError::NotItsRequester { .. } => {
                    Status::permission_denied(e.to_string())
                }
            })?;
        Ok(Response::new(v1::CancelSetReply {}))
    }

    async fn list(
        &self,
        request: Request<v1::ListSetsRequest>,
    ) -> Result<Response<v1::ListSetsReply>, Status> {
        let sets = self.sets(&request)?;
        let v1::ListSetsRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let size = match page_size as usize {
            0 => limits::DEFAULT_SETS_PAGE,
            n => n.min(limits::MAX_SETS_PAGE),
        };
        let after = (!page_token.is_empty()).then_some(page_token.as_str());
        let page = sets.page(after, size).map_err(catalog_status)?;
        // Cut by bytes too (always one record): a page of large records stays readable.
        let mut records_json = vec![];
        let mut bytes = 0;
        let mut last = None;
        let mut cut = false;
        for record in &page.records {
            let json = record_json(record);
            if !records_json.is_empty() && bytes + json.len() > limits::LIST_PAGE_BYTES {
                cut = true;
                break;
            }
            bytes += json.len();
            records_json.push(json);
            last = Some(record.id.0.clone());
        }
        let next_page_token = if cut { last } else { page.next }.unwrap_or_default();
        Ok(Response::new(v1::ListSetsReply {
            records_json,
            next_page_token,
            unreadable: page.unreadable,
        }))
    }

    async fn show_writers(
        &self,
        request: Request<v1::ShowWritersRequest>,
    ) -> Result<Response<v1::ShowWritersReply>, Status> {
        let sets = self.sets(&request)?;
        let v1::ShowWritersRequest { id, offset, limit } = request.into_inner();
        let Some((record, _)) = sets.show(&id).map_err(catalog_status)? else {
            return Err(Status::not_found(format!(
                "no set {id} in the catalog (`quiesce snapshot list` shows them)"
            )));
        };
        let limit = match limit as usize {
            0 => limits::MAX_WRITERS_PAGE,
            n => n.min(limits::MAX_WRITERS_PAGE),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut writers_json = vec![];
        let mut bytes = 0;
        for writer in record.writers.iter().skip(start).take(limit) {
            let json = serde_json::to_string(writer).expect("writer results serialize");
            if !writers_json.is_empty() && bytes + json.len() > limits::RECORD_REPLY_BYTES {
                break;
            }
            bytes += json.len();
            writers_json.push(json);
        }
        Ok(Response::new(v1::ShowWritersReply {
            writers_json,
            total: record.writers.len() as u64,
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
                crate::sets::DeleteError::Running(_) => Status::aborted(e.to_string()),
                crate::sets::DeleteError::Catalog(e) => catalog_status(e),
                e => Status::failed_precondition(e.to_string()),
            })?;
        Ok(Response::new(v1::SetReply {
            record_json: record_json(&record),
        }))
    }

    async fn renew(
        &self,
        request: Request<v1::RenewSetRequest>,
    ) -> Result<Response<v1::SetReply>, Status> {
        let sets = self.sets(&request)?;
        let v1::RenewSetRequest { id, lease_ms } = request.into_inner();
        let record = tokio::task::spawn_blocking(move || sets.renew(&id, lease(lease_ms)))
            .await
            .map_err(|e| Status::internal(format!("the renewal task failed: {e}")))?
            .map_err(|e| match e {
                crate::sets::RenewError::Unknown(_) => Status::not_found(e.to_string()),
                crate::sets::RenewError::Running(_) => Status::aborted(e.to_string()),
                crate::sets::RenewError::Catalog(e) => catalog_status(e),
                e => Status::failed_precondition(e.to_string()),
            })?;
        Ok(Response::new(v1::SetReply {
            record_json: record_json(&record),
        }))
    }
}
