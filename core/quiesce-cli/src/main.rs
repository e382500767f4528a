//! `quiesce`: the cluster's command-line requester.
//!
//! ```text
//! quiesce writers [--volume NAME]... [--json]   per volume, which writers on which nodes use it
//! quiesce nodes [--json]                        the live nodes
//! ```
//!
//! It asks the broker's `Catalog` over mutual TLS: `--broker https://HOST:PORT --ca ca.pem
//! --cert admin.pem --key admin.key`, or the environment variables `QUIESCE_BROKER`,
//! `QUIESCE_CA`, `QUIESCE_CERT`, `QUIESCE_KEY` (`--insecure` / `QUIESCE_INSECURE=1` for a
//! plaintext demo broker). Any certificate of the cluster (client or node) will do.
//!
//! `--json` prints one document on stdout; its form is stable in the sense of quiesce-proto's
//! JSON.md (fields are only added): `writers` prints
//! `{"epoch": N, "volumes": [{"volume", "nodes", "writers": [{"node", "writer", "name", "level",
//! "origin", "components", "metadata"}]}]}` where `metadata` is the writer's WriterMetadata and
//! `components` the names of its components on that volume; `nodes` prints
//! `{"epoch": N, "nodes": [{"name", "host_version", "address", "volumes", "writers",
//! "attached_unix_ms", "last_seen_ms_ago", "joined_epoch"}]}`.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use quiesce_link::v1::catalog_client::CatalogClient;
use quiesce_link::v1::{ListNodesRequest, ListWritersRequest};
use quiesce_link::{Security, TlsFiles};
use quiesce_proto::WriterMetadata;
use serde::Serialize;
use std::path::PathBuf;

/// Ask the quiesce cluster broker.
#[derive(Debug, Parser)]
#[command(name = "quiesce", version)]
struct Cli {
    /// The broker's URL: https://HOST:PORT (http:// with --insecure).
    #[arg(long, global = true, env = "QUIESCE_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// The cluster CA certificate (ca.pem).
    #[arg(long, global = true, env = "QUIESCE_CA")]
    ca: Option<PathBuf>,
    /// This client's certificate (e.g. admin.pem from `quiesce-broker certs --clients admin`).
    #[arg(long, global = true, env = "QUIESCE_CERT")]
    cert: Option<PathBuf>,
    /// This client's private key (admin.key).
    #[arg(long, global = true, env = "QUIESCE_KEY")]
    key: Option<PathBuf>,
    /// Plaintext and no certificates, for a broker started with --insecure (local demos only).
    #[arg(long, global = true, env = "QUIESCE_INSECURE")]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn security(cli: &Cli) -> anyhow::Result<Security> {
    if cli.insecure {
        eprintln!("quiesce: WARNING: --insecure: plaintext, no certificates; only for a local demo broker");
        return Ok(Security::Insecure);
    }
    match (&cli.ca, &cli.cert, &cli.key) {
        (Some(ca), Some(cert), Some(key)) => Ok(Security::Tls(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        })),
        _ => bail!("the broker is reached over mutual TLS: pass --ca, --cert and --key (or set QUIESCE_CA, QUIESCE_CERT, QUIESCE_KEY) with a client certificate from `quiesce-broker certs --clients NAME`; --insecure only for a demo broker started with --insecure"),
    }
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
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quiesce: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(url) = cli.broker.clone() else {
        bail!("which broker? pass --broker https://HOST:PORT or set QUIESCE_BROKER");
    };
    let security = security(&cli)?;
    let channel = quiesce_link::connect(&url, &security).await?;
    let mut catalog = CatalogClient::new(channel);
    match cli.command {
        Command::Writers { volume, json } => {
            let reply = catalog
                .list_writers(ListWritersRequest { volumes: volume })
                .await
                .map_err(|s| refused(&url, s))?
                .into_inner();
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
        Command::Nodes { json } => {
            let reply = catalog
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|s| refused(&url, s))?
                .into_inner();
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
    Ok(())
}

fn print_writers(doc: &WritersDoc) {
    if doc.volumes.is_empty() {
        println!(
            "no volumes: no live node has a volume or a writer (`quiesce nodes` lists the nodes)"
        );
    }
    for v in &doc.volumes {
        let nodes = if v.nodes.is_empty() {
            "no live node has it configured".to_string()
        } else {
            format!("configured on {}", v.nodes.join(", "))
        };
        println!("volume {} ({nodes})", v.volume);
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
    let mut widths = header.each_ref().map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("  {}", line.join("  ").trim_end());
    }
}
