//! `quiesce-host`: the per-node daemon.

use anyhow::Context;
use clap::Parser;
use quiesce_daemon::notify;
use quiesce_daemon::{LogArgs, Signal, Signals};
use quiesce_host::{Config, Host};
use quiesce_proto::SetRequest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The quiesce node daemon: loads writer plugins and runs snapshot sets for this node.
///
/// Signals: SIGHUP re-reads and checks the configuration (and says which changes need a
/// restart; it never stops the host); SIGTERM or SIGINT shut the host down cleanly. Under a
/// systemd unit with Type=notify the host sends READY=1 once it owns its bus name, a STATUS=
/// line, and WATCHDOG=1 when WatchdogSec= is set.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The host's TOML configuration.
    #[arg(long, default_value = "/etc/quiesce/host.toml")]
    config: PathBuf,
    /// Check the configuration as the host would at start (parse it, load every plugin, check
    /// providers and mounts), print what it would serve, and exit: 0 when it can start, 1 with
    /// the errors. Takes no bus name and attaches to no broker.
    #[arg(long, conflicts_with_all = ["once", "bus"])]
    check_config: bool,
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
    #[command(flatten)]
    metrics: quiesce_daemon::MetricsArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `--help` and `--version` print on the real stdout, before it is set aside.
    let args = Args::parse();
    if let Err(e) = quiesce_daemon::log::init(&args.log, "info") {
        eprintln!("quiesce-host: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // The error, once, as an operator reads it (no backtrace of this program's own frames,
    // whatever RUST_BACKTRACE says).
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quiesce-host: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // From here on SIGHUP, SIGTERM and SIGINT are the host's to answer (loading plugins may
    // take a while: a SIGHUP meanwhile must not kill it).
    let mut signals = Signals::new().context("installing the signal handlers")?;
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
    check_providers(&config, &args.config)?;
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
    if args.check_config {
        if let Some(link) = &link {
            check_link(link, host.node())?;
        }
        print_check(&mut out, &args.config, &host)?;
        return Ok(());
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
                    .map(|f| format!(" — {} in {}: {}", f.kind, f.phase, f.reason));
                writeln!(
                    out,
                    "  {}: {}{}",
                    w.writer,
                    w.state.as_str(),
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

    // Bound before the bus name is taken: an address that cannot be bound stops the host here.
    let _metrics = match args.metrics.metrics_listen {
        Some(addr) => {
            let mut registry =
                quiesce_daemon::metrics::prometheus_client::registry::Registry::default();
            quiesce_host::metrics::register(&mut registry, &host);
            Some(quiesce_daemon::metrics::serve(addr, registry).await?)
        }
        None => None,
    };
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
    // The bus name is taken: whoever sees it may rely on every object and watch (see `serve`).
    notify::ready(&status_line(&host));
    let _watchdog = notify::watchdog();
    let _status = tokio::spawn(follow_status(host.clone()));
    let link = link.map(|link| quiesce_host::broker_link::spawn(host.clone(), link));
    // The connection stays open as long as `_connection` lives.
    let quiesce_host::dbus::Served {
        connection: _connection,
        closed: mut bus_lost,
    } = served;
    let lost = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Hangup => reload(&args.config, host.config()),
                Signal::Terminate(name) => {
                    tracing::info!("{name}: shutting down: closing the broker link, releasing every writer");
                    break false;
                }
            },
            () = &mut bus_lost => break true,
        }
    };
    if lost {
        // Off the bus no requester reaches the host and no application can register: exit
        // with a failure, so that the service manager starts it again.
        tracing::error!("the bus closed this host's connection (it was disconnected or the bus stopped): releasing every writer and exiting");
    }
    notify::stopping("shutting down: releasing every writer");
    if let Some(link) = link {
        // The broker then logs this node as gone cleanly, not as a broken link.
        link.close(Duration::from_secs(3)).await;
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
    tracing::info!("shut down cleanly");
    Ok(())
}

/// The providers of the host's own local sets, checked as at start.
fn check_providers(config: &Config, path: &Path) -> anyhow::Result<()> {
    for (volume, provider) in config
        .volumes
        .iter()
        .filter_map(|(v, c)| Some((v, c.provider.as_ref()?)))
    {
        // The host writes nothing of its own on a volume it snapshots.
        provider
            .check(&[])
            .with_context(|| format!("{}: [volumes.{volume}]", path.display()))?;
    }
    Ok(())
}

/// With `--check-config --broker`: the node certificate must be this node's.
fn check_link(link: &quiesce_host::broker_link::LinkOptions, node: &str) -> anyhow::Result<()> {
    let quiesce_link::Security::Tls(files) = &link.security else {
        return Ok(());
    };
    let me = files.identity()?;
    if me.name != node || me.role != quiesce_link::Role::Node {
        anyhow::bail!(
            "--cert {}: it is the certificate of {me}, not the node certificate of {node:?}: give the host {node}.pem, or set node = {:?} in its configuration",
            files.cert.display(),
            me.name
        );
    }
    Ok(())
}

/// What `--check-config` prints on stdout when the host can start.
fn print_check(out: &mut impl Write, path: &Path, host: &Host) -> anyhow::Result<()> {
    writeln!(out, "{}: the host can start", path.display())?;
    writeln!(out, "node {}", host.node())?;
    for (name, version, file) in host.plugins() {
        writeln!(out, "plugin {name} {version} ({})", file.display())?;
    }
    for e in host.load_errors() {
        writeln!(out, "skipped: {e}")?;
    }
    for w in host.writers() {
        let mut volumes: Vec<&str> = w
            .metadata
            .components
            .iter()
            .map(|c| c.volume.as_str())
            .collect();
        volumes.sort_unstable();
        volumes.dedup();
        writeln!(
            out,
            "writer {} ({}, level {}): volumes {}",
            w.id(),
            w.origin,
            w.metadata.level.as_str(),
            if volumes.is_empty() {
                "none".to_string()
            } else {
                volumes.join(", ")
            }
        )?;
    }
    for (name, v) in &host.config().volumes {
        let mount = match &v.mount {
            Some(m) => format!("mount {} (flush {})", m.display(), v.flush.as_str()),
            None => "no mount here".into(),
        };
        let provider = match &v.provider {
            Some(p) => format!("provider {}", p.build().name()),
            None => "no provider (the broker's snapshots only)".into(),
        };
        writeln!(out, "volume {name}: {mount}, {provider}")?;
    }
    out.flush()?;
    Ok(())
}

/// The `STATUS=` line: what the host serves.
fn status_line(host: &Host) -> String {
    let failed: Vec<String> = host
        .load_errors()
        .iter()
        .map(|e| match e.plugin_name() {
            Some(name) => name.to_string(),
            None => "a plugin file".to_string(),
        })
        .collect();
    let writers = host.writers().len();
    if failed.is_empty() {
        format!("serving {}: {writers} writer(s)", quiesce_dbus::HOST_NAME)
    } else {
        format!(
            "serving {}: {writers} writer(s); {} plugin(s) failed to load: {}",
            quiesce_dbus::HOST_NAME,
            failed.len(),
            failed.join(", ")
        )
    }
}

/// Keeps `STATUS=` up to date as applications register and leave.
async fn follow_status(host: std::sync::Arc<Host>) {
    let mut generation = host.watch_writers();
    while generation.changed().await.is_ok() {
        notify::status(&status_line(&host));
    }
}

/// SIGHUP: re-reads and checks the configuration, and says in one line what changed. Nothing is
/// applied while the host runs: plugins cannot be unloaded, and writers, flushes and deadlines
/// are made from the configuration at start, so any change takes a restart.
fn reload(path: &Path, running: &Config) {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; the host runs on with the configuration it started with; fix the file before the next restart");
            return;
        }
    };
    if let Err(e) = check_providers(&config, path) {
        tracing::error!("SIGHUP: {e:#}; the host runs on with the configuration it started with; fix the file before the next restart");
        return;
    }
    let changed = running.changes(&config);
    if changed.is_empty() {
        tracing::info!(
            "SIGHUP: re-read {}: valid, unchanged; the host runs on",
            path.display()
        );
    } else {
        tracing::warn!(
            "SIGHUP: re-read {}: valid; changed: {}; these take effect only when the host restarts (systemctl restart quiesce-host): it runs on with the configuration it started with",
            path.display(),
            changed.join(", ")
        );
    }
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
