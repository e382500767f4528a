//! `app-writer`: the reference application that becomes a quiesce writer over D-Bus.
//!
//! It writes numbered records (`<seq> <unix_time_ns>`) to `DIR/records.log` (with `--mmap`:
//! into a shared mapping of `DIR/records.map`, never synced), about one per millisecond, serves `org.quiesce.AppWriter1` at `--object`, then registers that object with
//! the host (`org.quiesce.Host1.RegisterWriter`) and prints `registered <writer_path>`. Freeze
//! really holds its writes until thaw, abort, or 30 s without a thaw.

mod records;
mod writer;

use anyhow::Context;
use clap::Parser;
use quiesce_proto::{Component, ComponentKind, Level, WriterMetadata};
use records::{log, Events, Records};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use zbus::zvariant::ObjectPath;

#[derive(Parser)]
#[command(
    name = "app-writer",
    about = "An application that writes records and registers itself as a quiesce writer over D-Bus"
)]
struct Cli {
    /// The D-Bus address of the host's bus (default: the system bus).
    #[arg(long, value_name = "ADDRESS")]
    bus: Option<String>,
    /// The directory to write `records.log` into (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The writer id.
    #[arg(long, default_value = "app")]
    id: String,
    /// The host's name of the volume DIR lies on.
    #[arg(long, default_value = "demo")]
    volume: String,
    /// Append `frozen <ns> <last_seq>`, `thawed <ns>` and `registered <path>` lines to FILE.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// The object path to serve org.quiesce.AppWriter1 at.
    #[arg(long, value_name = "PATH", default_value = "/com/example/AppWriter")]
    object: String,
    /// Resume writes on our own after this long frozen without a thaw (the safety net).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    hold_limit_ms: u64,
    /// Store the records into a shared mapping of `DIR/records.map` instead, never synced
    /// (fixed-width records of 33 bytes, record N at byte (N-1)*33).
    #[arg(long)]
    mmap: bool,
    /// How many records `records.map` has room for.
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    mmap_records: u64,
    /// Write at most one record per this many microseconds.
    #[arg(long, value_name = "US", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    interval_us: u64,
}

fn metadata(cli: &Cli, dir: &std::path::Path) -> WriterMetadata {
    WriterMetadata {
        id: cli.id.clone(),
        name: "Example record writer".into(),
        instance: String::new(),
        vendor_version: String::new(),
        level: Level::FrontEnd,
        components: vec![Component {
            name: "records".into(),
            kind: ComponentKind::Files,
            volume: cli.volume.clone(),
            paths: vec![dir.display().to_string()],
        }],
        expected_freeze_ms: 5,
        needs_post_snapshot: true,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            log(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&cli.data)
        .with_context(|| format!("cannot create the data directory {}", cli.data.display()))?;
    let dir = std::fs::canonicalize(&cli.data)
        .with_context(|| format!("cannot resolve the data directory {}", cli.data.display()))?;
    let object = ObjectPath::try_from(cli.object.as_str())
        .with_context(|| format!("--object {:?} is not a D-Bus object path", cli.object))?
        .into_owned();
    let metadata =
        serde_json::to_string(&metadata(&cli, &dir)).context("cannot encode the metadata")?;
    let events = cli.events.as_deref().map(Events::open).transpose()?;
    let hold_limit = Duration::from_millis(cli.hold_limit_ms);
    let records = Arc::new(
        if cli.mmap {
            Records::create_mapped(&dir, cli.mmap_records, events, hold_limit)?
        } else {
            Records::create(&dir, events, hold_limit)?
        }
        .with_pace(Duration::from_micros(cli.interval_us)),
    );

    // The application's own work: it writes from the start, whatever the bus does.
    let (stopped_tx, mut stopped) = tokio::sync::oneshot::channel();
    let looper = std::thread::Builder::new().name("records".into()).spawn({
        let records = records.clone();
        move || {
            let result = records.run();
            let _ = stopped_tx.send(());
            result
        }
    })?;

    let code = serve_and_wait(&cli, &object, &records, metadata, &mut stopped).await;
    records.shutdown();
    let loop_result = looper
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the writing loop panicked")));
    let code = code?;
    loop_result?;
    Ok(code)
}

/// Serves the object, registers it, prints `registered <path>`, then waits for SIGTERM/SIGINT
/// (or the writing loop stopping).
async fn serve_and_wait(
    cli: &Cli,
    object: &ObjectPath<'static>,
    records: &Arc<Records>,
    metadata: String,
    stopped: &mut tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<ExitCode> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let builder = match &cli.bus {
        Some(address) => zbus::connection::Builder::address(address.as_str())
            .with_context(|| format!("invalid D-Bus address {address:?}"))?,
        None => zbus::connection::Builder::system().context("cannot find the system bus")?,
    };
    let bus = cli.bus.as_deref().unwrap_or("the system bus");
    // Serve the object first: the host calls it back (Metadata) while it handles RegisterWriter.
    let connection = builder
        .serve_at(
            object,
            writer::AppWriter::new(cli.id.clone(), records.clone(), metadata),
        )?
        .build()
        .await
        .with_context(|| format!("cannot connect to {bus}"))?;
    log(&format!(
        "serving {} at {object} as {} on {bus}",
        quiesce_dbus::APP_WRITER_INTERFACE,
        connection
            .unique_name()
            .map_or("?".to_owned(), |n| n.to_string()),
    ));

    let host = quiesce_dbus::HostProxy::builder(&connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let writer_path = match host.register_writer(object).await {
        Ok(path) => path,
        Err(e) => {
            log(&format!(
                "registering {object} with {} on {bus} failed: {e}",
                quiesce_dbus::HOST_NAME
            ));
            return Ok(ExitCode::FAILURE);
        }
    };
    records.event(&format!("registered {writer_path}"));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "registered {writer_path}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    drop(stdout);

    tokio::select! {
        _ = sigterm.recv() => log("SIGTERM: exiting"),
        _ = sigint.recv() => log("SIGINT: exiting"),
        _ = stopped => return Ok(ExitCode::FAILURE), // the loop's error is reported by run()
    }
    Ok(ExitCode::SUCCESS)
}
