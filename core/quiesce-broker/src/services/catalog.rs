//! The `Catalog` service: requesters list the writers per volume and the live nodes.

use crate::broker::Broker;
use quiesce_link::{limits, v1};
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
        let v1::ListWritersRequest {
            volumes: mut filter,
            page_size,
            page_token,
        } = request.into_inner();
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
        let views = registry.writers_by_volume(&filter);
        let (volumes, next_page_token) = writers_page(views, snapshotted, &page_token, page_size);
        Ok(Response::new(v1::ListWritersReply {
            epoch: registry.epoch(),
            volumes,
            next_page_token,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesReply>, Status> {
        self.0.authenticate(&request)?;
        let v1::ListNodesRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let size = page_limit(page_size);
        let registry = self.0.registry();
        let now = Instant::now();
        let mut nodes: Vec<v1::NodeInfo> = registry
            .nodes()
            .range::<String, _>((
                std::ops::Bound::Excluded(&page_token),
                std::ops::Bound::Unbounded,
            ))
            .take(size + 1)
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
        let next_page_token = if nodes.len() > size {
            nodes.truncate(size);
            nodes.last().map(|n| n.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListNodesReply {
            epoch: registry.epoch(),
            nodes,
            next_page_token,
        }))
    }
}

fn page_limit(asked: u32) -> usize {
    match asked as usize {
        0 => limits::MAX_WRITERS_PAGE,
        n => n.min(limits::MAX_WRITERS_PAGE),
    }
}

/// Where a writer stands in the listing: volume, node, writer id. A volume with no writers is
/// listed as one item with an empty node and writer.
fn position(volume: &str, node: &str, writer: &str) -> String {
    format!("{volume}\u{1f}{node}\u{1f}{writer}")
}

/// One page of the writers per volume, after `token`: at most `page_size` writers (and
/// [`limits::WRITERS_PAGE_BYTES`] of metadata, always at least one item); the token of the next
/// page, empty on the last.
fn writers_page(
    views: Vec<crate::registry::VolumeView>,
    snapshotted: &std::collections::BTreeMap<String, String>,
    token: &str,
    page_size: u32,
) -> (Vec<v1::VolumeWriters>, String) {
    let size = page_limit(page_size);
    let mut volumes: Vec<v1::VolumeWriters> = vec![];
    let (mut taken, mut bytes, mut last) = (0usize, 0usize, String::new());
    for view in views {
        let mut items: Vec<(String, Option<v1::WriterOnNode>)> = view
            .writers
            .into_iter()
            .map(|(node, w, components)| {
                (
                    position(&view.volume, &node, &w.metadata.id),
                    Some(v1::WriterOnNode {
                        node,
                        metadata_json: w.metadata_json,
                        origin: w.origin,
                        components,
                    }),
                )
            })
            .collect();
        if items.is_empty() {
            items.push((position(&view.volume, "", ""), None));
        }
        for (at, writer) in items {
            if at.as_str() <= token && !token.is_empty() {
                continue;
            }
            let cost = writer
                .as_ref()
                .map_or(0, |w| w.metadata_json.len() + w.origin.len());
            if taken == size || (taken > 0 && bytes + cost > limits::WRITERS_PAGE_BYTES) {
                return (volumes, last);
            }
            if volumes.last().map(|v| &v.volume) != Some(&view.volume) {
                volumes.push(v1::VolumeWriters {
                    broker_provider: snapshotted.get(&view.volume).cloned().unwrap_or_default(),
                    volume: view.volume.clone(),
                    nodes: view.nodes.clone(),
                    writers: vec![],
                });
            }
            if let Some(writer) = writer {
                volumes.last_mut().expect("pushed").writers.push(writer);
            }
            taken += 1;
            bytes += cost;
            last = at;
        }
    }
    (volumes, String::new())
}
