//! `quiesce`: the cluster's command-line requester.
//!
//! ```text
//! quiesce snapshot create --volume NAME... [--best-effort] [--lease D | --keep] [--timeout D] [--json]   run one set
//! quiesce snapshot exec --volume NAME [--best-effort] [--at DIR] [--lease D] -- COMMAND...  a set, COMMAND on it
//! quiesce snapshot renew ID [--lease D | --keep] [--json]      renew the lease on a kept snapshot
//! quiesce snapshot list [--volume NAME] [--since D] [--json]   the cluster's sets, oldest first
//! quiesce snapshot show ID [--json]                            one set's record
//! quiesce snapshot delete ID [--json]                          delete the snapshot a set kept
//! quiesce snapshot prune --volume NAME [--keep-last N] [--keep-within D] [--dry-run] [--json]
//! quiesce writers [--volume NAME]... [--json]   per volume, which writers on which nodes use it
//! quiesce nodes [--json]                        the live nodes
//! ```
//!
//! ## `quiesce snapshot`: through the host on this node
//!
//! `snapshot` asks the local `quiesce-host` over D-Bus (`org.quiesce.Host1` on the system bus,
//! which follows `DBUS_SYSTEM_BUS_ADDRESS`; `--bus ADDRESS` or `QUIESCE_BUS` for another bus).
//! The host forwards to the broker with its own node certificate, so the caller needs no
//! certificate — this is the path for backup software that knows nothing about the cluster.
//! Creating, renewing, deleting and pruning need root or the `quiesce` group (`exec` needs root:
//! it mounts); `list` and `show` are open to all. `create` waits until the set ended; the
//! snapshot it keeps is held by a lease (1 h by default) unless `--keep`.
//!
//! Output: the set's id and outcome (with the phase, writer and reason when it failed), its
//! volumes, the snapshot's path, provider and id (or that none was kept, or when it was
//! deleted), the freeze window, the provider's and the total time, and one line per writer
//! (node, writer, state, failure); `list` prints one line per set. With `--json`, stdout holds
//! exactly one document: the record in the `SetRecord` form of `core/quiesce-proto/JSON.md`
//! (`list`: a JSON array of them, oldest first), or on failure `{"error": {...}}`.
//!
//! The exit statuses are in one place, [`exit`]: `--help` and the README print its table.
//!
//! ## `quiesce writers`, `quiesce nodes`: the broker directly
//!
//! They ask the broker's `Catalog` over mutual TLS: `--broker https://HOST:PORT --ca ca.pem
//! --cert admin.pem --key admin.key`, or the environment variables `QUIESCE_BROKER`,
//! `QUIESCE_CA`, `QUIESCE_CERT`, `QUIESCE_KEY` (`--insecure` / `QUIESCE_INSECURE=1` for a
//! plaintext demo broker). Any certificate of the cluster (client or node) will do. They exit 0
//! on success; a failure exits with the status [`exit`] gives it and a message on stderr.
//!
//! `--json` prints one document on stdout; its form is stable in the sense of quiesce-proto's
//! JSON.md (fields are only added): `writers` prints
//! `{"epoch": N, "volumes": [{"volume", "broker_provider", "nodes", "writers": [{"node", "writer", "name", "level",
//! "origin", "components", "metadata"}]}]}` where `metadata` is the writer's WriterMetadata and
//! `components` the names of its components on that volume; `nodes` prints
//! `{"epoch": N, "nodes": [{"name", "host_version", "address", "volumes", "writers",
//! "attached_unix_ms", "last_seen_ms_ago", "joined_epoch"}]}`.

mod assets;
mod exec;
mod exit;
mod mount;
mod prune;
mod snapshot;
mod table;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use quiesce_link::v1::catalog_client::CatalogClient;
use quiesce_link::v1::{ListNodesRequest, ListWritersRequest};
use quiesce_link::Security;
use quiesce_proto::WriterMetadata;
use serde::Serialize;
use snapshot::SnapshotCommand;
use std::path::PathBuf;
use std::process::ExitCode;

/// The flags that reach the broker directly (`writers`, `nodes`); `snapshot` goes through the
/// host, which has its own.
const BROKER_FLAGS: [&str; 5] = ["broker", "ca", "cert", "key", "insecure"];

/// Ask the quiesce cluster for snapshot sets (through this node's host) or about its writers
/// and nodes (from the broker).
#[derive(Debug, Parser)]
#[command(name = "quiesce", version)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: Command,
}

/// How `writers` and `nodes` reach the broker.
#[derive(Debug, clap::Args)]
struct BrokerArgs {
    /// For writers and nodes: the broker's URL, https://HOST:PORT (http:// with --insecure).
    #[arg(long, global = true, env = "QUIESCE_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// For writers and nodes: the cluster CA certificate (ca.pem).
    #[arg(long, global = true, env = "QUIESCE_CA")]
    ca: Option<PathBuf>,
    /// For writers and nodes: this client's certificate (e.g. admin.pem from
    /// `quiesce-broker certs --clients admin`).
    #[arg(long, global = true, env = "QUIESCE_CERT")]
    cert: Option<PathBuf>,
    /// For writers and nodes: this client's private key (admin.key).
    #[arg(long, global = true, env = "QUIESCE_KEY")]
    key: Option<PathBuf>,
    /// For writers and nodes: plaintext and no certificates, for a broker started with
    /// --insecure (local demos only).
    #[arg(long, global = true, env = "QUIESCE_INSECURE")]
    insecure: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Snapshot sets across the cluster, through the quiesce-host on this node over D-Bus (no
    /// certificates needed).
    #[command(after_help = exit::help())]
    Snapshot {
        /// The D-Bus bus the host serves on (default: the system bus, which follows
        /// DBUS_SYSTEM_BUS_ADDRESS).
        #[arg(long, global = true, env = "QUIESCE_BUS", value_name = "ADDRESS")]
        bus: Option<String>,
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    #[command(flatten)]
    Catalog(CatalogCommand),
}

/// What the broker's `Catalog` answers.
#[derive(Debug, Subcommand)]
enum CatalogCommand {
    /// Per volume, which writers on which live nodes have components on it.
    Writers {
        /// Only this volume (repeatable).
        #[arg(long, value_name = "NAME")]
        volume: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The live nodes: their address, volumes and writers.
    Nodes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct WritersDoc {
    epoch: u64,
    volumes: Vec<VolumeDoc>,
}

#[derive(Serialize)]
struct VolumeDoc {
    volume: String,
    /// The broker's provider for the volume; empty: the broker cannot snapshot it.
    broker_provider: String,
    nodes: Vec<String>,
    writers: Vec<WriterDoc>,
}

#[derive(Serialize)]
struct WriterDoc {
    node: String,
    writer: String,
    name: String,
    level: String,
    origin: String,
    components: Vec<String>,
    metadata: serde_json::Value,
}

#[derive(Serialize)]
struct NodesDoc {
    epoch: u64,
    nodes: Vec<NodeDoc>,
}

#[derive(Serialize)]
struct NodeDoc {
    name: String,
    host_version: String,
    address: String,
    volumes: Vec<String>,
    writers: Vec<String>,
    attached_unix_ms: u64,
    last_seen_ms_ago: u64,
    joined_epoch: u64,
}

fn security(cli: &BrokerArgs) -> anyhow::Result<Security> {
    let security = Security::from_flags(
        cli.ca.clone(),
        cli.cert.clone(),
        cli.key.clone(),
        cli.insecure,
    )
    .map_err(|e| {
        anyhow::anyhow!("{e} (QUIESCE_CA, QUIESCE_CERT, QUIESCE_KEY may give the files; a client certificate comes from `quiesce-broker certs --clients NAME`)")
    })?;
    if security == Security::Insecure {
        eprintln!("quiesce: WARNING: --insecure: plaintext, no certificates; only for a local demo broker");
    }
    Ok(security)
}

fn refused(url: &str, status: tonic::Status) -> anyhow::Error {
    let cause = std::error::Error::source(&status)
        .map(|c| format!(": {}", quiesce_link::error_chain(c)))
        .unwrap_or_default();
    let hint = match status.code() {
        tonic::Code::Unknown | tonic::Code::Unavailable => "; if the broker logs `tls accept error`, it refused this certificate: use one made by the cluster's `quiesce-broker certs` (same ca.key)",
        _ => "",
    };
    anyhow::anyhow!(
        "the broker at {url} answered {:?}: {}{cause}{hint}",
        status.code(),
        status.message()
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // `quiesce snapshot list | head -1`: a reader that goes away ends the CLI quietly, as it
    // ends any Unix filter, instead of a panic in `println!`.
    // SAFETY: setting a signal's disposition to its default before any thread is spawned.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    if let Some(dir) = assets::requested() {
        return match assets::generate(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("quiesce: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => {
            let _ = e.print();
            // clap's own status for a usage error is 2, which `snapshot create` uses for a set
            // that ran and failed: a bad command line is EX_USAGE.
            return if e.use_stderr() {
                exit::Exit::Usage.into()
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match Cli::from_arg_matches(&matches) {
        Ok(cli) => run(cli, &matches).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let status = exit::of_error(&e);
            eprintln!("quiesce: {e:#}");
            if wants_json(&matches) {
                // One parser for a script: the failure is a document on stdout too.
                println!("{}", exit::error_document(status, &format!("{e:#}")));
            }
            status.into()
        }
    }
}

/// Whether the command line asked for `--json` (on whichever subcommand has it).
fn wants_json(matches: &clap::ArgMatches) -> bool {
    let mut matches = matches;
    while let Some((_, sub)) = matches.subcommand() {
        matches = sub;
    }
    matches!(matches.try_get_one::<bool>("json"), Ok(Some(true)))
}

async fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Snapshot { bus, command } => snapshot(matches, bus, command).await,
        Command::Catalog(command) => catalog(&cli.broker, command).await,
    }
}

async fn snapshot(
    matches: &clap::ArgMatches,
    bus: Option<String>,
    command: SnapshotCommand,
) -> anyhow::Result<ExitCode> {
    // Flags from the environment (a shell that also runs `quiesce writers`) are fine to ignore;
    // the same flags typed on this command line mean a misunderstanding.
    let typed: Vec<String> = BROKER_FLAGS
        .iter()
        .filter(|flag| matches.value_source(flag) == Some(ValueSource::CommandLine))
        .map(|flag| format!("--{flag}"))
        .collect();
    if !typed.is_empty() {
        return Err(exit::Failure::error(exit::Exit::Usage, format!(
            "`quiesce snapshot` asks the quiesce-host on this node, which reaches the broker with its own certificate: drop {} (they are for `quiesce writers` and `quiesce nodes`)",
            typed.join(", ")
        )));
    }
    snapshot::run(bus.as_deref(), command).await
}

/// How often a listing starts over when the membership changes between its pages.
const LISTING_TRIES: usize = 5;

/// Every page of `ListWriters`, merged: one answer as of one membership epoch.
async fn all_writers(
    catalog: &mut CatalogClient<tonic::transport::Channel>,
    url: &str,
    volumes: Vec<String>,
) -> anyhow::Result<quiesce_link::v1::ListWritersReply> {
    for _ in 0..LISTING_TRIES {
        let mut all = quiesce_link::v1::ListWritersReply::default();
        let mut token = String::new();
        let mut first = true;
        loop {
            let page = catalog
                .list_writers(ListWritersRequest {
                    volumes: volumes.clone(),
                    page_size: 0,
                    page_token: token,
                })
                .await
                .map_err(|s| refused(url, s))?
                .into_inner();
            if !first && page.epoch != all.epoch {
                break; // the membership changed: start over
            }
            first = false;
            all.epoch = page.epoch;
            for v in page.volumes {
                match all.volumes.last_mut() {
                    Some(last) if last.volume == v.volume => last.writers.extend(v.writers),
                    _ => all.volumes.push(v),
                }
            }
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            token = page.next_page_token;
        }
    }
    bail!("the cluster's membership kept changing while its writers were listed ({LISTING_TRIES} tries): ask again")
}

/// Every page of `ListNodes`, merged: one answer as of one membership epoch.
async fn all_nodes(
    catalog: &mut CatalogClient<tonic::transport::Channel>,
    url: &str,
) -> anyhow::Result<quiesce_link::v1::ListNodesReply> {
    for _ in 0..LISTING_TRIES {
        let mut all = quiesce_link::v1::ListNodesReply::default();
        let mut token = String::new();
        let mut first = true;
        loop {
            let page = catalog
                .list_nodes(ListNodesRequest {
                    page_size: 0,
                    page_token: token,
                })
                .await
                .map_err(|s| refused(url, s))?
                .into_inner();
            if !first && page.epoch != all.epoch {
                break;
            }
            first = false;
            all.epoch = page.epoch;
            all.nodes.extend(page.nodes);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            token = page.next_page_token;
        }
    }
    bail!("the cluster's membership kept changing while its nodes were listed ({LISTING_TRIES} tries): ask again")
}

async fn catalog(broker: &BrokerArgs, command: CatalogCommand) -> anyhow::Result<ExitCode> {
    let Some(url) = broker.broker.clone() else {
        return Err(exit::Failure::error(
            exit::Exit::Usage,
            "which broker? pass --broker https://HOST:PORT or set QUIESCE_BROKER",
        ));
    };
    let security = security(broker)?;
    let channel = quiesce_link::connect(&url, &security).await?;
    let mut catalog = CatalogClient::new(channel);
    match command {
        CatalogCommand::Writers { volume, json } => {
            let reply = all_writers(&mut catalog, &url, volume).await?;
            let doc = WritersDoc {
                epoch: reply.epoch,
                volumes: reply
                    .volumes
                    .into_iter()
                    .map(|v| {
                        let writers = v
                            .writers
                            .into_iter()
                            .map(|w| {
                                let metadata: serde_json::Value =
                                    serde_json::from_str(&w.metadata_json).with_context(|| {
                                        format!("the broker sent metadata of a writer on {} that is not JSON", w.node)
                                    })?;
                                let parsed: Option<WriterMetadata> =
                                    serde_json::from_value(metadata.clone()).ok();
                                Ok(WriterDoc {
                                    node: w.node,
                                    writer: parsed.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
                                    name: parsed.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                                    level: parsed
                                        .as_ref()
                                        .map(|m| m.level.as_str().to_string())
                                        .unwrap_or_default(),
                                    origin: w.origin,
                                    components: w.components,
                                    metadata,
                                })
                            })
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        Ok(VolumeDoc {
                            broker_provider: v.broker_provider,
                            volume: v.volume,
                            nodes: v.nodes,
                            writers,
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_writers(&doc);
            }
        }
        CatalogCommand::Nodes { json } => {
            let reply = all_nodes(&mut catalog, &url).await?;
            let doc = NodesDoc {
                epoch: reply.epoch,
                nodes: reply
                    .nodes
                    .into_iter()
                    .map(|n| NodeDoc {
                        name: n.name,
                        host_version: n.host_version,
                        address: n.address,
                        volumes: n.volumes,
                        writers: n.writers,
                        attached_unix_ms: n.attached_unix_ms,
                        last_seen_ms_ago: n.last_seen_ms_ago,
                        joined_epoch: n.joined_epoch,
                    })
                    .collect(),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_nodes(&doc);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_writers(doc: &WritersDoc) {
    if doc.volumes.is_empty() {
        println!(
            "no volumes: no live node has a volume or a writer (`quiesce nodes` lists the nodes)"
        );
    }
    for v in &doc.volumes {
        let broker = if v.broker_provider.is_empty() {
            "the broker cannot snapshot it: no [volumes.NAME] in its configuration".to_string()
        } else {
            format!("snapshotted by the broker with {}", v.broker_provider)
        };
        let nodes = if v.nodes.is_empty() {
            String::new()
        } else {
            format!("; configured on {}", v.nodes.join(", "))
        };
        println!("volume {} ({broker}{nodes})", v.volume);
        if v.writers.is_empty() {
            println!("  no writers");
            continue;
        }
        let rows: Vec<[String; 5]> = v
            .writers
            .iter()
            .map(|w| {
                [
                    w.node.clone(),
                    w.writer.clone(),
                    w.level.clone(),
                    if w.components.is_empty() {
                        "(every volume)".into()
                    } else {
                        w.components.join(",")
                    },
                    w.name.clone(),
                ]
            })
            .collect();
        let header = ["NODE", "WRITER", "LEVEL", "COMPONENTS", "NAME"].map(String::from);
        print_table(&header, &rows);
    }
    println!("epoch {}", doc.epoch);
}

fn print_nodes(doc: &NodesDoc) {
    if doc.nodes.is_empty() {
        println!("no live nodes");
    } else {
        let rows: Vec<[String; 5]> = doc
            .nodes
            .iter()
            .map(|n| {
                [
                    n.name.clone(),
                    n.address.clone(),
                    n.volumes.join(","),
                    n.writers.join(","),
                    format!("{} ms ago", n.last_seen_ms_ago),
                ]
            })
            .collect();
        let header = ["NODE", "ADDRESS", "VOLUMES", "WRITERS", "LAST HEARD"].map(String::from);
        print_table(&header, &rows);
    }
    println!("epoch {}", doc.epoch);
}

fn print_table<const N: usize>(header: &[String; N], rows: &[[String; N]]) {
    print_table_indented("  ", header, rows)
}

fn print_table_indented<const N: usize>(indent: &str, header: &[String; N], rows: &[[String; N]]) {
    print!("{}", table::render(indent, header, rows));
}
