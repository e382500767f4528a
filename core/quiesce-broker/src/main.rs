//! `quiesce-broker`: the cluster daemon (`serve`) and the certificate maker (`certs`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiesce_broker::certs::{self, CertRequest};
use quiesce_broker::{ServeOptions, DEFAULT_LISTEN};
use quiesce_link::Security;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The quiesce cluster broker: knows the live nodes and their writers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker: hosts attach to it, requesters ask it.
    Serve(Serve),
    /// Make the cluster CA and the certificates of the broker, the nodes and the clients.
    Certs(Certs),
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// The address to listen on (port 0: any free port; the address is printed on stdout).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The cluster CA certificate (ca.pem): hosts and clients must present a certificate it signed.
    #[arg(
        long,
        required_unless_present = "insecure",
        conflicts_with = "insecure"
    )]
    ca: Option<PathBuf>,
    /// The broker's certificate (broker.pem).
    #[arg(
        long,
        required_unless_present = "insecure",
        conflicts_with = "insecure"
    )]
    cert: Option<PathBuf>,
    /// The broker's private key (broker.key).
    #[arg(
        long,
        required_unless_present = "insecure",
        conflicts_with = "insecure"
    )]
    key: Option<PathBuf>,
    /// Plaintext, no certificates, node names taken on trust: ONLY for a local demo.
    #[arg(long)]
    insecure: bool,
    /// The broker's configuration: the volumes it snapshots, deadlines, the catalog file.
    /// Without it the broker only knows nodes and writers and runs no sets.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Drop a node that sends nothing for this long (hosts send a heartbeat every third of it).
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    heartbeat_timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct Certs {
    /// The directory to write into; an existing CA there (ca.pem, ca.key) is reused.
    #[arg(long)]
    out: PathBuf,
    /// The broker's name (its certificate's CN).
    #[arg(long, default_value = "broker")]
    broker_name: String,
    /// Host names or IP addresses at which the hosts reach the broker (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    broker_host: Vec<String>,
    /// The node names (comma-separated), as in each host's configuration (`node = ...`).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Client names (comma-separated): certificates for `quiesce` and backup software.
    #[arg(long, value_delimiter = ',')]
    clients: Vec<String>,
    /// How long the broker, node and client certificates are valid (the CA: ten years).
    #[arg(long, default_value_t = 825)]
    days: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Refused TLS handshakes (a certificate from another CA) are logged there.
                .unwrap_or_else(|_| "info,tonic::transport::server::io_stream=debug".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Command::Serve(serve) => run(serve).await,
        Command::Certs(c) => {
            let written = certs::make(&CertRequest {
                out: c.out.clone(),
                broker_name: c.broker_name,
                broker_hosts: c.broker_host,
                nodes: c.nodes,
                clients: c.clients,
                days: c.days,
            })
            .with_context(|| format!("making certificates in {}", c.out.display()))?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

async fn run(serve: Serve) -> anyhow::Result<()> {
    let security = Security::from_flags(serve.ca, serve.cert, serve.key, serve.insecure)?;
    match security {
        Security::Tls(_) => {}
        Security::Insecure => {
            tracing::warn!("INSECURE MODE (--insecure): plaintext gRPC, no certificates; any process that reaches this port can register as any node and read the catalog. Use it only for a local demo; a cluster runs with --ca, --cert and --key (`quiesce-broker certs` makes them).");
        }
    }
    let config = match &serve.config {
        Some(path) => {
            let config = quiesce_broker::config::Config::load(path)?;
            if let Some(warning) =
                quiesce_config::set_limit_warning(config.hold_limit_ms, &config.timeouts)
            {
                tracing::warn!("{}: {warning}", path.display());
            }
            for (volume, provider) in &config.volumes {
                // A provider that freezes the file system the catalog is on would deadlock.
                provider
                    .check(&[config.catalog.as_path()])
                    .with_context(|| format!("{}: [volumes.{volume}]", path.display()))?;
            }
            Some(config)
        }
        None => {
            tracing::warn!("no --config: this broker has no volumes and runs no sets");
            None
        }
    };
    let bound = quiesce_broker::bind(ServeOptions {
        config,
        listen: serve.listen,
        security: security.clone(),
        heartbeat_timeout: Duration::from_millis(serve.heartbeat_timeout_ms.max(30)),
    })
    .await?;
    let addr = bound.local_addr();
    tracing::info!(
        %addr,
        tls = matches!(security, Security::Tls(_)),
        heartbeat_timeout_ms = serve.heartbeat_timeout_ms,
        "broker listening"
    );
    // The tests (and scripts) read the bound address here, e.g. with --listen 127.0.0.1:0.
    println!("listening on {addr}");
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    };
    bound.run(shutdown).await?;
    Ok(())
}
