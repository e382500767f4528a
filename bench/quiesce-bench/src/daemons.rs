//! Starting the real daemons for a benchmark, and asking the broker.

use quiesce_link::v1::catalog_client::CatalogClient;
use quiesce_link::v1::sets_client::SetsClient;
use quiesce_link::v1::{CreateSetRequest, DeleteSetRequest, ListNodesRequest, ListWritersRequest};
use quiesce_link::{Security, TlsFiles};
use quiesce_proto::SetRecord;
use quiesce_testbed::{Bus, Child, Policy};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `quiesce-broker certs` for these nodes and the client `bench`.
pub fn certs(bin: &Path, out: &Path, nodes: &[String]) -> anyhow::Result<()> {
    let output = Command::new(bin.join("quiesce-broker"))
        .args(["certs", "--out"])
        .arg(out)
        .args([
            "--broker-host",
            "127.0.0.1",
            "--clients",
            "bench",
            "--nodes",
        ])
        .arg(nodes.join(","))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "quiesce-broker certs: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A running broker and a client of it (certificate `bench`).
pub struct Broker {
    pub process: Child,
    pub url: String,
    certs: PathBuf,
}

impl Broker {
    /// Starts `quiesce-broker serve` on a free loopback port with `config`.
    pub fn start(bin: &Path, certs: &Path, config: &Path, log: PathBuf) -> anyhow::Result<Broker> {
        let mut command = Command::new(bin.join("quiesce-broker"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("broker.pem"))
            .arg("--key")
            .arg(certs.join("broker.key"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        let mut process = Child::spawn(command, log);
        let mut line = String::new();
        BufReader::new(process.child.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| anyhow::anyhow!("the broker did not start: {line:?} {}", process.log()))?
            .to_string();
        Ok(Broker {
            process,
            url: format!("https://{addr}"),
            certs: certs.into(),
        })
    }

    pub fn security(&self) -> Security {
        Security::Tls(TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join("bench.pem"),
            key: self.certs.join("bench.key"),
        })
    }

    pub async fn sets(&self) -> anyhow::Result<SetsClient<tonic::transport::Channel>> {
        Ok(SetsClient::new(
            quiesce_link::connect(&self.url, &self.security()).await?,
        ))
    }

    /// Waits until exactly `nodes` nodes are attached.
    pub async fn wait_nodes(&self, nodes: usize, within: Duration) -> anyhow::Result<()> {
        let mut catalog =
            CatalogClient::new(quiesce_link::connect(&self.url, &self.security()).await?);
        let deadline = Instant::now() + within;
        loop {
            // Counted page by page: a page holds at most 1,000 nodes.
            let (mut live, mut page_token) = (0, String::new());
            loop {
                let page = catalog
                    .list_nodes(ListNodesRequest {
                        page_size: 0,
                        page_token,
                    })
                    .await?
                    .into_inner();
                live += page.nodes.len();
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if live == nodes {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {live} of {nodes} nodes attached within {within:?}"
            );
            // Polling the broker's catalog; nothing can notify the bench of attachments.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the broker knows exactly `count` writers on `volume`; `logs` says why not.
    pub async fn wait_writers(
        &self,
        volume: &str,
        count: usize,
        within: Duration,
        logs: impl Fn() -> String,
    ) -> anyhow::Result<()> {
        let mut catalog =
            CatalogClient::new(quiesce_link::connect(&self.url, &self.security()).await?);
        let deadline = Instant::now() + within;
        loop {
            // One page: a benchmark's few writers fit the broker's default page.
            let known: usize = catalog
                .list_writers(ListWritersRequest {
                    volumes: vec![volume.into()],
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volumes
                .iter()
                .map(|v| v.writers.len())
                .sum();
            if known == count {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the broker knows {known} of {count} writers on {volume} after {within:?}\n{}",
                logs()
            );
            // Polling the broker's catalog, as in `wait_nodes`.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs one set of `volume` and deletes its snapshot: (record, time to the answer).
    pub async fn set(
        &self,
        client: &mut SetsClient<tonic::transport::Channel>,
        volume: &str,
    ) -> anyhow::Result<(SetRecord, Duration)> {
        let (record, took, _) = self.create(client, volume).await?;
        self.delete(client, &record).await?;
        Ok((record, took))
    }

    /// Runs one set of `volume`, which must not fail: (record, time to the answer, the size of
    /// the record's JSON in the answer).
    pub async fn create(
        &self,
        client: &mut SetsClient<tonic::transport::Channel>,
        volume: &str,
    ) -> anyhow::Result<(SetRecord, Duration, usize)> {
        let started = Instant::now();
        let reply = client
            .create(CreateSetRequest {
                volumes: vec![volume.into()],
                best_effort: false,
                lease_ms: 0,
                timeout_ms: 0,
                requester_uid: None,
            })
            .await?
            .into_inner();
        let took = started.elapsed();
        let record: SetRecord = serde_json::from_str(&reply.record_json)?;
        anyhow::ensure!(
            !record.outcome.is_failed(),
            "set {} failed: {}",
            record.id,
            record.outcome
        );
        Ok((record, took, reply.record_json.len()))
    }

    /// Deletes the snapshot a set kept.
    pub async fn delete(
        &self,
        client: &mut SetsClient<tonic::transport::Channel>,
        record: &SetRecord,
    ) -> anyhow::Result<()> {
        client
            .delete(DeleteSetRequest {
                id: record.id.0.clone(),
            })
            .await?;
        Ok(())
    }
}

/// Starts `quiesce-host` for node `name` with `config` on a private bus of its own, attached to
/// `broker` with the node's certificate from `certs`; returns once it serves on D-Bus.
pub async fn start_host(
    bin: &Path,
    certs: &Path,
    broker: &Broker,
    name: &str,
    config: &Path,
    log: PathBuf,
) -> anyhow::Result<(Child, Bus)> {
    let bus = Bus::start(Policy::Permissive);
    let mut command = Command::new(bin.join("quiesce-host"));
    command
        .arg("--config")
        .arg(config)
        .args(["--bus", &bus.address, "--broker", &broker.url])
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("{name}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{name}.key")))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let host = Child::spawn(command, log);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Its log is the only sign: polled.
    while !host.log().contains("serving on D-Bus") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}'s host did not start: {}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((host, bus))
}
