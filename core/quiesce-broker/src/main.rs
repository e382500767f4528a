//! `quiesce-broker`: the cluster daemon (`serve`) and the certificate maker (`certs`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiesce_broker::certs::{self, CertRequest};
use quiesce_broker::config::Config;
use quiesce_broker::{Broker, ServeOptions, DEFAULT_LISTEN};
use quiesce_daemon::notify;
use quiesce_daemon::{LogArgs, Signal, Signals};
use quiesce_link::Security;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The quiesce cluster broker: knows the live nodes and their writers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker: hosts attach to it, requesters ask it.
    ///
    /// Signals: SIGHUP re-reads and checks --config, applies deadlines, volumes added or changed
    /// and retention to the sets started from then on, and says what needs a restart (the
    /// catalog's path, a volume removed); it never stops the broker; SIGTERM or SIGINT shut it down cleanly. Under a systemd unit with
    /// Type=notify the broker sends READY=1 once its listener is bound, a STATUS= line with the
    /// nodes attached, and WATCHDOG=1 when WatchdogSec= is set.
    Serve(Serve),
    /// Make the cluster CA and the certificates of the broker, the nodes and the clients.
    Certs(Certs),
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// Check the configuration and the TLS files as the broker would at start, print what it
    /// would serve, and exit: 0 when it can start, 1 with the errors. Listens on nothing.
    #[arg(long)]
    check_config: bool,
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
    #[command(flatten)]
    metrics: quiesce_daemon::MetricsArgs,
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
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Refused TLS handshakes (a certificate from another CA) are logged at debug there.
    let default = "info,tonic::transport::server::io_stream=debug";
    if let Err(e) = quiesce_daemon::log::init(&args.log, default) {
        eprintln!("quiesce-broker: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // The error, once, as an operator reads it (no "Caused by:" list repeating it).
    match command(args.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quiesce-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn command(command: Command) -> anyhow::Result<()> {
    match command {
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

/// Loads `--config` and checks its providers, as at start.
fn load_config(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    for (volume, provider) in &config.volumes {
        // A provider that freezes the file system the catalog is on would deadlock.
        provider
            .check(&[config.catalog.as_path()])
            .with_context(|| format!("{}: [volumes.{volume}]", path.display()))?;
    }
    Ok(config)
}

async fn run(serve: Serve) -> anyhow::Result<()> {
    // From here on SIGHUP, SIGTERM and SIGINT are the broker's to answer.
    let mut signals = Signals::new().context("installing the signal handlers")?;
    let security = Security::from_flags(serve.ca, serve.cert, serve.key, serve.insecure)?;
    match security {
        Security::Tls(_) => {}
        Security::Insecure => {
            tracing::warn!("INSECURE MODE (--insecure): plaintext gRPC, no certificates; any process that reaches this port can register as any node and read the catalog. Use it only for a local demo; a cluster runs with --ca, --cert and --key (`quiesce-broker certs` makes them).");
        }
    }
    let config = match &serve.config {
        Some(path) => {
            let config = load_config(path)?;
            if let Some(warning) =
                quiesce_config::set_limit_warning(config.hold_limit_ms, &config.timeouts)
            {
                tracing::warn!("{}: {warning}", path.display());
            }
            Some(config)
        }
        None => {
            tracing::warn!("no --config: this broker has no volumes and runs no sets");
            None
        }
    };
    if serve.check_config {
        return check(
            &serve.listen,
            &security,
            serve.config.as_deref(),
            config.as_ref(),
        );
    }
    // What a SIGHUP compares the file with: the configuration in force.
    let mut running = config.clone();
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
    // The listener is bound: a host connecting from now on is answered once `run` serves.
    let broker = bound.broker();
    // Bound before READY: an address that cannot be bound stops the broker here.
    let _metrics = match serve.metrics.metrics_listen {
        Some(addr) => {
            let mut registry =
                quiesce_daemon::metrics::prometheus_client::registry::Registry::default();
            broker.metrics().register(&mut registry, &broker);
            Some(quiesce_daemon::metrics::serve(addr, registry).await?)
        }
        None => None,
    };
    notify::ready(&status_line(&addr, &broker));
    let _watchdog = notify::watchdog();
    let _status = AbortOnDrop(tokio::spawn(follow_status(addr, broker)));
    // The tests (and scripts) read the bound address here, e.g. with --listen 127.0.0.1:0.
    println!("listening on {addr}");
    let config_path = serve.config.clone();
    let sets = bound.sets();
    let shutdown = async move {
        loop {
            match signals.next().await {
                Signal::Hangup => reload(config_path.as_deref(), &mut running, sets.as_deref()),
                Signal::Terminate(name) => {
                    tracing::info!(
                        "{name}: shutting down: aborting a running set, closing every link"
                    );
                    notify::stopping("shutting down");
                    return;
                }
            }
        }
    };
    bound.run(shutdown).await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// `serve --check-config`: the TLS files as `bind` checks them, the configuration as loaded;
/// what the broker would serve, on stdout.
fn check(
    listen: &SocketAddr,
    security: &Security,
    path: Option<&Path>,
    config: Option<&Config>,
) -> anyhow::Result<()> {
    let tls = match security {
        Security::Tls(files) => {
            let me = files.identity()?;
            if me.role != quiesce_link::Role::Broker {
                anyhow::bail!(
                    "--cert {}: it is the certificate of {me}, a {} certificate; the broker needs the broker certificate (broker.pem from `quiesce-broker certs`)",
                    files.cert.display(),
                    me.role
                );
            }
            files.server_config()?;
            format!("mutual TLS as {}", me.name)
        }
        Security::Insecure => "INSECURE (plaintext)".to_string(),
    };
    if let Some(config) = config {
        let dir = config
            .catalog
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            anyhow::bail!(
                "{}: catalog = {:?}: its directory {} does not exist: create it (the broker's state directory), or fix the path",
                path.map(|p| p.display().to_string()).unwrap_or_default(),
                config.catalog.display().to_string(),
                dir.display()
            );
        }
    }
    let mut out = std::io::stdout().lock();
    match path {
        Some(p) => writeln!(out, "{}: the broker can start", p.display())?,
        None => writeln!(out, "no --config: the broker can start, with no volumes")?,
    }
    writeln!(out, "listen {listen} ({tls})")?;
    if let Some(config) = config {
        writeln!(out, "catalog {}", config.catalog.display())?;
        for (name, provider) in &config.volumes {
            let retention = match config.retention.get(name) {
                Some(r) => format!(
                    ", retention: max_kept {}, max_age {}",
                    r.max_kept.map_or("none".into(), |n| n.to_string()),
                    r.max_age
                        .map_or("none".into(), |d| humantime::format_duration(d).to_string())
                ),
                None => String::new(),
            };
            writeln!(
                out,
                "volume {name}: provider {}{retention}",
                provider.build().name()
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The `STATUS=` line: where the broker listens and the nodes attached.
fn status_line(addr: &SocketAddr, broker: &Broker) -> String {
    let registry = broker.registry();
    let nodes: Vec<&str> = registry.nodes().keys().map(String::as_str).collect();
    if nodes.is_empty() {
        format!("listening on {addr}: no node attached")
    } else {
        format!(
            "listening on {addr}: {} node(s) attached: {}",
            nodes.len(),
            nodes.join(", ")
        )
    }
}

/// Keeps `STATUS=` up to date as nodes attach and leave.
async fn follow_status(addr: SocketAddr, broker: Arc<Broker>) {
    let mut membership = broker.subscribe_membership();
    loop {
        match membership.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                notify::status(&status_line(&addr, &broker));
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// SIGHUP: re-reads and checks `--config`, applies what a running broker can change to the
/// sets started from now on (deadlines, volumes added or changed, retention, keep_records:
/// [`quiesce_broker::sets::Sets::reload`]), and says in one line what it applied and what takes
/// a restart (the catalog's path, a volume removed). An invalid file changes nothing.
fn reload(
    path: Option<&Path>,
    running: &mut Option<Config>,
    sets: Option<&quiesce_broker::sets::Sets>,
) {
    let (Some(path), Some(current), Some(sets)) = (path, running.as_ref(), sets) else {
        tracing::info!("SIGHUP: no --config to re-read; the broker runs on");
        return;
    };
    let config = match load_config(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("SIGHUP: {e:#}; nothing changed: the broker runs on with the configuration in force; fix the file");
            return;
        }
    };
    let changed = current.changes(&config);
    if changed.is_empty() {
        tracing::info!(
            "SIGHUP: re-read {}: valid, unchanged; the broker runs on",
            path.display()
        );
        return;
    }
    let restart = sets.reload(&config);
    let applied: Vec<&String> = changed
        .iter()
        .filter(|c| !restart.iter().any(|r| r.starts_with(c.as_str())))
        .collect();
    // What is in force now: the file, but for what waits for a restart.
    let mut in_force = config;
    for (volume, provider) in &current.volumes {
        in_force
            .volumes
            .entry(volume.clone())
            .or_insert_with(|| provider.clone());
    }
    in_force.catalog = current.catalog.clone();
    *running = Some(in_force);
    let applied = match applied.as_slice() {
        [] => "nothing".to_string(),
        some => some
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    if restart.is_empty() {
        tracing::info!(
            "SIGHUP: re-read {}: applied {applied} to the sets started from now on (a running set keeps what it started with)",
            path.display()
        );
    } else {
        tracing::warn!(
            "SIGHUP: re-read {}: applied {applied} to the sets started from now on; {} take effect only when the broker restarts (systemctl restart quiesce-broker)",
            path.display(),
            restart.join(", ")
        );
    }
}

/// A task that ends when its owner does.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
