//! `quiesce-host`: the per-node daemon.

use anyhow::Context;
use clap::Parser;
use quiesce_host::{Config, Host};
use quiesce_proto::SetRequest;
use std::io::Write;
use std::path::PathBuf;

/// The quiesce node daemon: loads writer plugins and runs snapshot sets for this node.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The host's TOML configuration.
    #[arg(long, default_value = "/etc/quiesce/host.toml")]
    config: PathBuf,
    /// Run one local snapshot set of this volume, print its record and exit
    /// (exit status 0 when the snapshot was kept, 1 when the set failed).
    #[arg(long, value_name = "VOLUME")]
    once: Option<String>,
    /// With --once: leave out writers that fail and keep a crash-consistent snapshot.
    #[arg(long, requires = "once")]
    best_effort: bool,
    /// With --once: print the record as JSON.
    #[arg(long, requires = "once")]
    json: bool,
    /// Serve on the D-Bus bus at this address instead of the system bus (tests, session buses).
    #[arg(long, value_name = "ADDRESS", conflicts_with = "once")]
    bus: Option<String>,
    /// Attach to the cluster broker at this URL (https://HOST:PORT) with --ca, --cert and --key;
    /// without it the host runs alone.
    #[arg(long, value_name = "URL", conflicts_with = "once")]
    broker: Option<String>,
    /// With --broker: the cluster CA certificate (ca.pem).
    #[arg(long, requires = "broker")]
    ca: Option<PathBuf>,
    /// With --broker: this node's certificate (NODE.pem; its name must be this node's).
    #[arg(long, requires = "broker")]
    cert: Option<PathBuf>,
    /// With --broker: this node's private key (NODE.key).
    #[arg(long, requires = "broker")]
    key: Option<PathBuf>,
    /// With --broker: plaintext and no certificates (http://), ONLY for a local demo.
    #[arg(long, requires = "broker")]
    insecure: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The error, once, as an operator reads it (no backtrace of this program's own frames,
    // whatever RUST_BACKTRACE says).
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quiesce-host: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // `--help` and `--version` print on the real stdout, before it is set aside.
    let args = Args::parse();
    // What this process prints on stdout (`--once --json`) goes through `out`; whatever a
    // plugin prints to its stdout lands on stderr, among the log, instead of in the record.
    let mut out = own_stdout().context("setting up stdout")?;
    let link = match args.broker.clone() {
        Some(url) => Some(quiesce_host::broker_link::LinkOptions::from_flags(
            url,
            args.ca.clone(),
            args.cert.clone(),
            args.key.clone(),
            args.insecure,
        )?),
        None => None,
    };
    let config = Config::load(&args.config)?;
    for (volume, provider) in config
        .volumes
        .iter()
        .filter_map(|(v, c)| Some((v, c.provider.as_ref()?)))
    {
        // The host writes nothing of its own on a volume it snapshots.
        provider
            .check(&[])
            .with_context(|| format!("{}: [volumes.{volume}]", args.config.display()))?;
    }
    let host = std::sync::Arc::new(Host::start(config));
    let problems = host.problems();
    if !problems.is_empty() {
        for problem in &problems {
            tracing::error!("{}: {problem}", args.config.display());
        }
        anyhow::bail!(
            "{}: {} problem(s) in the configuration (above): the host does not start until they are fixed",
            args.config.display(),
            problems.len()
        );
    }
    for warning in host.warnings() {
        tracing::warn!("{}: {warning}", args.config.display());
    }
    for e in host.load_errors() {
        tracing::warn!("{e}; the host runs without it");
    }
    tracing::info!(
        node = host.node(),
        writers = host.writers().len(),
        failed_plugins = host.load_errors().len(),
        "host started"
    );

    if let Some(volume) = args.once {
        let request = SetRequest {
            volumes: vec![volume],
            best_effort: args.best_effort,
        };
        let record = host.run_local_set(request).await?;
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&record)?)?;
        } else {
            writeln!(out, "set {}: {}", record.id, record.outcome)?;
            if let Some(s) = &record.snapshot {
                writeln!(out, "snapshot {} at {} ({})", s.id, s.path, s.provider)?;
            }
            for w in &record.writers {
                let failure = w
                    .failure
                    .as_ref()
                    .map(|f| format!(" — {} in {}: {}", kebab(&f.kind), f.phase, f.reason));
                writeln!(
                    out,
                    "  {}: {}{}",
                    w.writer,
                    kebab(&w.state),
                    failure.unwrap_or_default()
                )?;
            }
            if let Some(ms) = record.freeze_window_ms {
                writeln!(
                    out,
                    "freeze window {ms} ms, provider {} ms, total {} ms",
                    record.provider_ms.unwrap_or(0),
                    record.total_ms
                )?;
            }
        }
        out.flush()?;
        for w in host.writers() {
            w.settled().await;
        }
        std::process::exit(if record.outcome.is_failed() { 1 } else { 0 });
    }

    // The cluster snapshot methods of Host1 reach the broker with the host's own link options.
    let set_requests = quiesce_host::set_requests::SetRequests::new(link.clone());
    let served = quiesce_host::dbus::serve(host.clone(), args.bus.as_deref(), set_requests)
        .await
        .with_context(|| match &args.bus {
            Some(a) => format!("serving {} on the bus at {a}", quiesce_dbus::HOST_NAME),
            None => format!(
                "serving {} on the system bus (is dbus/org.quiesce.Host1.conf installed in /usr/share/dbus-1/system.d/?)",
                quiesce_dbus::HOST_NAME
            ),
        })?;
    tracing::info!(name = quiesce_dbus::HOST_NAME, "serving on D-Bus");
    if let Some(link) = link {
        quiesce_host::broker_link::spawn(host.clone(), link);
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The connection stays open as long as `_connection` lives.
    let quiesce_host::dbus::Served {
        connection: _connection,
        closed: bus_lost,
    } = served;
    let lost = tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for a shutdown signal")?; false }
        _ = terminate.recv() => false,
        () = bus_lost => true,
    };
    if lost {
        // Off the bus no requester reaches the host and no application can register: exit
        // with a failure, so that the service manager starts it again.
        tracing::error!("the bus closed this host's connection (it was disconnected or the bus stopped): releasing every writer and exiting");
    } else {
        tracing::info!("shutting down: releasing every writer");
    }
    for w in host.writers() {
        if w.status().held_by.is_some() {
            if let Err(e) = w.release(host.config().deadlines().abort).await {
                tracing::error!("releasing writer {} at shutdown: {e}", w.id());
            }
        }
    }
    if lost {
        std::process::exit(1);
    }
    Ok(())
}

/// A handle on the process's original stdout, with file descriptor 1 pointed at stderr from
/// now on: plugins (which share the process) can print nothing into this process's output.
fn own_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
    let saved = std::io::stdout().as_fd().try_clone_to_owned()?;
    // SAFETY: dup2 of two valid descriptors; fd 1 then refers to stderr's file.
    if unsafe { nix::libc::dup2(2, 1) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `saved` is an open descriptor this function owns and hands over.
    Ok(unsafe { std::fs::File::from_raw_fd(saved.into_raw_fd()) })
}

fn kebab<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
