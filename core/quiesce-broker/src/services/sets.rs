//! The `Sets` service: snapshot sets for requesters, over [`crate::sets::Sets`].

use crate::broker::Broker;
use quiesce_link::v1;
use std::sync::Arc;
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
