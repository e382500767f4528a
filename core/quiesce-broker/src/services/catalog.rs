//! The `Catalog` service: requesters list the writers per volume and the live nodes.

use crate::broker::Broker;
use quiesce_link::v1;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};
use tonic::{Request, Response, Status};

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
        let snapshotted = &self.0.config().volumes;
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
