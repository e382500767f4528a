//! The metrics endpoints (`--metrics-listen`) of the broker and of every host, scraped with a
//! real HTTP client (hyper's) after real sets on the three-node cluster of `sets.rs`; the
//! broker's `grpc.health.v1`, asked with the admin's client certificate; and an address that
//! cannot be bound stopping either daemon at start.

use super::*;
use quiesce_link::v1::sets_client::SetsClient;
use quiesce_link::v1::CreateSetRequest;
use quiesce_proto::Requester;
use std::collections::BTreeMap;

/// The samples of one scrape, strictly parsed from the OpenMetrics text format.
#[derive(Debug)]
struct Exposition {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Exposition {
    /// Parses `text`: `# HELP` / `# TYPE` / `# UNIT` lines, samples of declared families only,
    /// `# EOF` last. Anything else fails the test.
    fn parse(text: String) -> Exposition {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = vec![];
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF:\n{text}");
        for line in &lines[..lines.len() - 1] {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
                match kind {
                    "TYPE" => {
                        let t = parts.next().unwrap_or("").to_string();
                        assert!(
                            ["counter", "gauge", "histogram"].contains(&t.as_str()),
                            "{line}"
                        );
                        types.insert(name.to_string(), t);
                    }
                    "HELP" | "UNIT" => {}
                    _ => panic!("not a metadata line: {line:?}"),
                }
                continue;
            }
            let (name, labels, value) = sample(line);
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
                .unwrap_or(&name);
            assert!(
                types.contains_key(family),
                "the sample {line:?} has no # TYPE"
            );
            samples.push((name.clone(), labels, value));
        }
        Exposition { text, samples }
    }

    /// The value of the sample `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// The same, failing the test when it is missing.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Every sample of `name`.
    fn all(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l, *v))
            .collect()
    }
}

/// `name{k="v",...} value`, label values unescaped.
fn sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("a sample without a value: {line:?}"));
    let name = &line[..name_end];
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "a bad metric name in {line:?}"
    );
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        loop {
            let (start, c) = chars.next().expect("an unterminated label set");
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let key_start = if c == ',' {
                chars.next().expect("a label after ,").0
            } else {
                start
            };
            let eq = inner[key_start..]
                .find("=\"")
                .unwrap_or_else(|| panic!("a label without =\" in {line:?}"));
            let key = &inner[key_start..key_start + eq];
            for _ in 0..eq + 1 {
                chars.next();
            }
            let mut value = String::new();
            loop {
                match chars.next().expect("an unterminated label value").1 {
                    '"' => break,
                    '\\' => match chars.next().expect("an escape").1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("a bad escape \\{c} in {line:?}"),
                    },
                    c => value.push(c),
                }
            }
            assert!(
                labels.insert(key.to_string(), value).is_none(),
                "a label twice in {line:?}"
            );
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("a bad value in {line:?}: {e}")),
    };
    (name.to_string(), labels, value)
}

/// The address a daemon's log says its metrics endpoint listens on.
fn metrics_addr(child: &Child) -> String {
    const SAID: &str = "metrics listening on http://";
    let log = wait_log(child, SAID);
    let at = log.find(SAID).unwrap() + SAID.len();
    log[at..].split("/metrics").next().unwrap().to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `GET /metrics` at `addr` with hyper's HTTP/1.1 client, parsed.
fn scrape(addr: &str) -> Exposition {
    use http_body_util::BodyExt;
    runtime().block_on(async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to the metrics at {addr}: {e}"));
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get("/metrics")
            .header(hyper::header::HOST, addr)
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "GET http://{addr}/metrics");
        let kind = response.headers()[hyper::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Exposition::parse(String::from_utf8(body.to_vec()).unwrap())
    })
}

#[test]
fn after_a_set_every_metrics_endpoint_says_what_happened_and_the_broker_is_healthy() {
    let spec = Spec {
        metrics: true,
        ..Spec::default()
    };
    let cluster = Cluster::start(&[spec; 3]);
    let broker_metrics = metrics_addr(&cluster.broker.process);
    let host_metrics: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| metrics_addr(&n.host))
        .collect();

    // Before any set: every outcome of the volume at 0, the nodes live.
    let before = scrape(&broker_metrics);
    for outcome in ["app-consistent", "crash-consistent", "failed"] {
        assert_eq!(
            before.value(
                "quiesce_sets_total",
                &[("volume", "shared"), ("outcome", outcome)]
            ),
            0.0
        );
    }

    // An app-consistent set, asked for on node3 as backup software does (through its host).
    let (code, record, stderr) = cluster.create(2);
    let record =
        record.unwrap_or_else(|| panic!("no record ({code}): {stderr}\n{}", cluster.logs()));
    assert_eq!(record.outcome, Outcome::AppConsistent, "{}", cluster.logs());
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(
        record.requester,
        Some(Requester {
            node: Some("node3".into()),
            uid: Some(uid),
            client: None
        }),
        "the record names who asked"
    );
    let started = record
        .started_unix_ms
        .expect("a cluster set records its start");

    // A failing set, asked for with the admin's client certificate straight at the broker's
    // Sets service, with a timeout far shorter than any set: it names the client, and a uid
    // claimed by a client certificate is not taken.
    let (failed_record, health) = runtime().block_on(async {
        let admin = cluster.certs.tls("admin");
        let channel = quiesce_link::connect(&cluster.broker.url, &admin)
            .await
            .unwrap();
        let reply = SetsClient::new(channel.clone())
            .create(CreateSetRequest {
                volumes: vec!["shared".into()],
                best_effort: false,
                lease_ms: 0,
                timeout_ms: 1,
                requester_uid: Some(4242),
            })
            .await
            .unwrap()
            .into_inner();
        let record: SetRecord = serde_json::from_str(&reply.record_json).unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut statuses = vec![];
        for service in ["", "quiesce.link.v1.Sets", "quiesce.link.v1.Link"] {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
                .into_inner()
                .status;
            statuses.push((service, status));
        }
        (record, statuses)
    });
    let (_, _, reason) = failed(&failed_record);
    assert!(reason.contains("requester's timeout"), "{failed_record:?}");
    assert_eq!(
        failed_record.requester,
        Some(Requester {
            client: Some("admin".into()),
            ..Requester::default()
        })
    );
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for (service, status) in health {
        assert_eq!(status, serving, "grpc.health.v1 of {service:?}");
    }

    let records = [&record, &failed_record];
    let broker = scrape(&broker_metrics);
    let sets = |outcome| {
        broker.value(
            "quiesce_sets_total",
            &[("volume", "shared"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (
            sets("app-consistent"),
            sets("crash-consistent"),
            sets("failed")
        ),
        (1.0, 0.0, 1.0),
        "{}",
        broker.text
    );
    assert_eq!(broker.value("quiesce_live_nodes", &[]), 3.0);
    // The freeze window of every set that froze anything, to the millisecond.
    let windows: Vec<u64> = records.iter().filter_map(|r| r.freeze_window_ms).collect();
    let volume = [("volume", "shared")];
    assert_eq!(
        broker.value("quiesce_freeze_window_seconds_count", &volume),
        windows.len() as f64
    );
    let sum = broker.value("quiesce_freeze_window_seconds_sum", &volume);
    let expected = windows.iter().sum::<u64>() as f64 / 1e3;
    assert!((sum - expected).abs() < 1e-6, "{sum} vs {expected}");
    // One observation per phase each record went through.
    for phase in ["prepare", "freeze", "snapshot", "thaw", "complete"] {
        let ran = records
            .iter()
            .filter(|r| r.phases.iter().any(|p| p.phase.as_str() == phase))
            .count();
        assert_eq!(
            broker.value("quiesce_phase_duration_seconds_count", &[("phase", phase)]),
            ran as f64,
            "phase {phase}"
        );
    }
    // The last app-consistent snapshot: when the set's snapshot phase began.
    let snapshot_at = record
        .phases
        .iter()
        .find(|p| p.phase == Phase::Snapshot)
        .unwrap()
        .start_ms;
    let last = broker.value(
        "quiesce_last_app_consistent_snapshot_timestamp_seconds",
        &volume,
    );
    assert!(
        (last - (started + snapshot_at) as f64 / 1e3).abs() < 1e-6,
        "{last} vs started {started} + {snapshot_at} ms"
    );
    assert!(last >= started as f64 / 1e3 && last <= (started + record.total_ms) as f64 / 1e3);
    assert!(
        broker.all("quiesce_lease_lapses_total").is_empty(),
        "no lease lapsed: {}",
        broker.text
    );

    for (node, addr) in cluster.nodes.iter().zip(&host_metrics) {
        // The writers' last calls (complete, abort) are not awaited by the broker: settled
        // once both are idle again.
        let host = wait_for(
            &format!("{}: both writers idle in its metrics", node.name),
            || {
                let host = scrape(addr);
                (host.get("quiesce_writers", &[("state", "idle")]) == Some(2.0)).then_some(host)
            },
            || format!("{}\n{}", scrape(addr).text, node.host.log()),
        );
        for state in ["prepared", "frozen", "thawed", "failed"] {
            assert_eq!(
                host.value("quiesce_writers", &[("state", state)]),
                0.0,
                "{}",
                node.name
            );
        }
        for writer in ["db", "app"] {
            for call in ["prepare", "freeze", "thaw"] {
                let count = host.value(
                    "quiesce_writer_call_duration_seconds_count",
                    &[("writer", writer), ("call", call)],
                );
                assert!(count >= 1.0, "{}: {writer} {call}: {count}", node.name);
                let inf = host.value(
                    "quiesce_writer_call_duration_seconds_bucket",
                    &[("writer", writer), ("call", call), ("le", "+Inf")],
                );
                assert_eq!(inf, count, "the +Inf bucket holds every call");
            }
            assert_eq!(
                host.value("quiesce_watchdog_thaws_total", &[("writer", writer)]),
                0.0
            );
        }
        // Its freeze calls took no longer on the writer's thread than the round trips the
        // broker recorded for them.
        let round_trips_us: u64 = records
            .iter()
            .flat_map(|r| &r.writers)
            .filter(|w| w.writer.node == node.name && w.writer.writer == "db")
            .filter_map(|w| w.call_us.get("freeze"))
            .sum();
        let freeze_sum = host.value(
            "quiesce_writer_call_duration_seconds_sum",
            &[("writer", "db"), ("call", "freeze")],
        );
        assert!(
            freeze_sum <= round_trips_us as f64 / 1e6 + 1e-6,
            "{}: the calls on the writer's thread ({freeze_sum} s) within the round trips the broker saw ({round_trips_us} us)",
            node.name
        );
        assert_eq!(host.value("quiesce_lease_lapses_total", &[]), 0.0);
    }
}

/// An address that cannot be bound: the daemon stops at start, exit status 1, one line saying
/// which flag and why — before it serves anything.
#[test]
fn a_metrics_address_in_use_stops_the_broker_and_the_host_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let check = |who: &str, output: std::process::Output| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{who}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with(&format!("{who}: ")))
            .collect();
        assert_eq!(errors.len(), 1, "{who}: one line: {stderr}");
        assert!(
            errors[0].contains(&format!("--metrics-listen {addr}")) && errors[0].contains("in use"),
            "{who}: {}",
            errors[0]
        );
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("listening on"),
            "{who} never served"
        );
    };

    let broker = Command::new(broker_exe())
        .args(["serve", "--insecure", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", &addr])
        .output()
        .unwrap();
    check("quiesce-broker", broker);

    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!("node = \"node1\"\nplugin_dir = {:?}\n", plugins.display()),
    )
    .unwrap();
    let bus = Bus::start(Policy::Permissive);
    let host = Command::new(host_exe())
        .arg("--config")
        .arg(&config)
        .args(["--bus", &bus.address, "--metrics-listen", &addr])
        .output()
        .unwrap();
    check("quiesce-host", host);
    drop(taken);
}

/// A health watcher sees `SERVING`, then `NOT_SERVING` as soon as the broker is told to stop,
/// and the broker still stops (an open `Watch` stream does not hold up its shutdown).
#[test]
fn the_health_service_says_not_serving_once_the_broker_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("certs"), &["node1"]);
    let mut broker = Broker::start(dir.path(), Some(&certs), 3000);
    use tonic_health::pb::health_check_response::ServingStatus;
    // A runtime of its own threads: the watcher's connection stays driven (and open) while the
    // test waits for the broker to exit.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (seen, _watch) = rt.block_on(async {
        let channel = quiesce_link::connect(&broker.url, &certs.tls("admin"))
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut watch = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = vec![];
        seen.push(next_status(&mut watch).await);
        broker.process.signal("TERM");
        seen.push(next_status(&mut watch).await);
        (seen, watch)
    });
    assert_eq!(
        seen,
        [
            Some(ServingStatus::Serving as i32),
            Some(ServingStatus::NotServing as i32)
        ],
        "{}",
        broker.process.log()
    );
    let log = broker.process.stderr.clone();
    let status = wait_for(
        "the broker to exit after SIGTERM",
        || broker.process.child.try_wait().unwrap(),
        || read(&log),
    );
    assert!(status.success(), "{status}: {}", broker.process.log());
}

/// The next status a health `Watch` sends (`None` when the stream ends), within the deadline.
async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<i32> {
    tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("a health status within the deadline")
        .ok()
        .flatten()
        .map(|m| m.status)
}
