//! The quiesce cluster broker.
//!
//! - [`registry`]: the live nodes, their writers per volume, and the membership epoch (plain
//!   data, no I/O);
//! - [`broker`]: the shared state — live nodes and their current links, set commands waiting
//!   for replies, membership changes broadcast to running sets;
//! - [`services`]: the gRPC services of `quiesce.link.v1`, one module each: `Link` (hosts
//!   attach, register, send writer changes and heartbeats, answer set commands), `Catalog`
//!   (requesters list writers and nodes) and `Sets` (requesters create, list, show and delete
//!   snapshot sets);
//! - [`sets`]: driving a snapshot set across the nodes, with the volume's provider;
//! - [`catalog`]: every set in an embedded SQLite file, surviving restarts;
//! - [`config`]: the broker's configuration (volumes, deadlines, catalog);
//! - [`certs`]: the cluster CA and the broker, node and client certificates;
//! - [`metrics`]: what `--metrics-listen` serves (sets by outcome, freeze windows, phases, live
//!   nodes, lease lapses);
//! - [`bind`]: binding and running the broker over mutual TLS (or plaintext, for demos), with
//!   `grpc.health.v1` beside the link's services.

pub mod broker;
pub mod catalog;
pub mod certs;
pub mod config;
pub mod metrics;
pub mod registry;
pub mod services;
pub mod sets;

pub use broker::{Broker, BrokerConfig};

use quiesce_link::identity::Role;
use quiesce_link::v1::{
    catalog_server::CatalogServer, link_server::LinkServer, sets_server::SetsServer,
};
use quiesce_link::{Security, TlsError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

/// Where the broker listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7645";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {cause}; is another broker running there? pick another --listen address")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the certificate {path} is {who}'s, a {role} certificate; the broker needs the broker certificate (broker.pem from `quiesce-broker certs`)")]
    NotABrokerCertificate {
        path: std::path::PathBuf,
        who: String,
        role: Role,
    },
    #[error("the broker's gRPC server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
}

/// How to run a broker.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub security: Security,
    pub heartbeat_timeout: Duration,
    /// Volumes, deadlines and the catalog; without it the broker runs no sets.
    pub config: Option<config::Config>,
}

/// A broker bound to its address, not yet serving.
pub struct Bound {
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    broker: Arc<Broker>,
    sets: Option<Arc<sets::Sets>>,
}

/// Checks the TLS files and binds the listening socket.
pub async fn bind(options: ServeOptions) -> Result<Bound, ServeError> {
    let tls = match &options.security {
        Security::Tls(files) => {
            let me = files.identity()?;
            if me.role != Role::Broker {
                return Err(ServeError::NotABrokerCertificate {
                    path: files.cert.clone(),
                    who: me.name,
                    role: me.role,
                });
            }
            Some(files.server_config()?)
        }
        Security::Insecure => None,
    };
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|cause| ServeError::Bind {
            addr: options.listen,
            cause,
        })?;
    let volumes = options
        .config
        .iter()
        .flat_map(|c| &c.volumes)
        .map(|(name, p)| (name.clone(), p.build().name().to_string()))
        .collect();
    let broker = Broker::new(BrokerConfig {
        heartbeat_timeout: options.heartbeat_timeout,
        insecure: tls.is_none(),
        volumes,
    });
    let sets = match options.config {
        Some(config) => {
            let broker = broker.clone();
            // Cleaning up after abandoned sets may run provider commands.
            let opened = tokio::task::spawn_blocking(move || sets::Sets::open(broker, &config))
                .await
                .map_err(|e| ServeError::Serve(format!("opening the catalog: {e}")))??;
            Some(opened)
        }
        None => None,
    };
    Ok(Bound {
        listener,
        tls,
        broker,
        sets,
    })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    pub fn sets(&self) -> Option<Arc<sets::Sets>> {
        self.sets.clone()
    }

    /// Serves until `shutdown` completes; a set running then is aborted first, so that its
    /// writers are released by the broker rather than by their leases.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        // Leases and retention are kept while the broker serves, and stop with it.
        let _reaper = self
            .sets
            .clone()
            .map(|sets| AbortOnDrop(tokio::spawn(sets.reap_forever())));
        let sets = self.sets.clone();
        // `grpc.health.v1` (behind the same mutual TLS as everything else): the overall status
        // "" and each service SERVING while the broker serves, NOT_SERVING once it shuts down.
        let health = tonic_health::server::HealthReporter::new();
        set_health(&health, tonic_health::ServingStatus::Serving).await;
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            services::HealthService::new(health.clone(), stopped),
        );
        let shutdown = async move {
            shutdown.await;
            set_health(&health, tonic_health::ServingStatus::NotServing).await;
            // Health watchers are told, and their streams end: graceful shutdown waits for them.
            let _ = stopping.send(true);
            if let Some(sets) = sets {
                sets.shutdown(Duration::from_secs(30)).await;
            }
        };
        let mut server = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        if let Some(tls) = self.tls {
            server = server
                .tls_config(tls)
                .map_err(|e| ServeError::Serve(quiesce_link::error_chain(&e)))?;
        }
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        server
            .add_service(health_service)
            .add_service(
                // A registration carries every writer's metadata: see `limits`.
                LinkServer::new(services::LinkService(self.broker.clone()))
                    .max_decoding_message_size(quiesce_link::limits::LINK_MESSAGE_BYTES),
            )
            .add_service(CatalogServer::new(services::CatalogService(
                self.broker.clone(),
            )))
            .add_service(SetsServer::new(services::SetsService {
                broker: self.broker,
                sets: self.sets,
            }))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ServeError::Serve(quiesce_link::error_chain(&e)))
    }
}

/// The health of the overall server ("") and of each of its services.
async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    use tonic::server::NamedService;
    type Link = LinkServer<services::LinkService>;
    type Catalog = CatalogServer<services::CatalogService>;
    type Sets = SetsServer<services::SetsService>;
    for name in ["", Link::NAME, Catalog::NAME, Sets::NAME] {
        health.set_service_status(name, status).await;
    }
}

/// A task that ends when its owner does.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
