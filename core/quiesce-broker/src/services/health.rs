//! `grpc.health.v1.Health`: tonic-health's service, except that each `Watch` stream ends with a
//! last `NOT_SERVING` once the broker shuts down. tonic-health's own `Watch` streams never end,
//! and the server's graceful shutdown waits for every open stream: one health watcher would
//! keep a broker told to stop running until the service manager killed it.

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService as Statuses};

pub struct HealthService {
    statuses: Statuses,
    /// Becomes true when the broker shuts down (after the statuses say NOT_SERVING).
    stopping: watch::Receiver<bool>,
}

impl HealthService {
    pub fn new(reporter: HealthReporter, stopping: watch::Receiver<bool>) -> HealthService {
        HealthService {
            statuses: Statuses::from_health_reporter(reporter),
            stopping,
        }
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.statuses.check(request).await
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut statuses = self.statuses.watch(request).await?.into_inner();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    // (The guard `wait_for` returns is dropped at once: it is not `Send`.)
                    () = async { drop(stopping.wait_for(|s| *s).await) } => {
                        let last = HealthCheckResponse {
                            status: ServingStatus::NotServing as i32,
                        };
                        let _ = tx.send(Ok(last)).await;
                        return;
                    }
                    () = tx.closed() => return,
                    status = statuses.next() => {
                        let Some(status) = status else { return };
                        if tx.send(status).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
