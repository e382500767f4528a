//! A cluster over mutual TLS: writers per volume, writer changes, nodes that die and return,
//! a broker that restarts.

use crate::support::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

/// (node, writer id, component names) of a volume in `quiesce writers --json`.
fn rows(doc: &Value, volume: &str) -> Vec<(String, String, Vec<String>)> {
    let v = doc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume} in {doc:#}"));
    v["writers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["node"].as_str().unwrap().to_string(),
                w["writer"].as_str().unwrap().to_string(),
                w["components"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn row(node: &str, writer: &str, components: &[&str]) -> (String, String, Vec<String>) {
    (
        node.into(),
        writer.into(),
        components.iter().map(|c| c.to_string()).collect(),
    )
}

#[test]
fn three_nodes_writers_are_grouped_per_volume_and_follow_app_writers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("certs"), &["node1", "node2", "node3"]);
    for name in ["ca", "broker", "node1", "node2", "node3", "admin"] {
        let mode = std::fs::metadata(certs.key(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}.key must be private");
        assert!(certs.cert(name).is_file(), "{name}.pem");
    }
    let broker = Broker::start(dir.path(), Some(&certs), 3000);
    let admin = certs.flags("admin");
    let n1 = Host::start(
        dir.path(),
        "node1",
        "hello-1",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "node1"),
    );
    let n2 = Host::start(
        dir.path(),
        "node2",
        "hello-2",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "node2"),
    );
    let n3 = Host::start(
        dir.path(),
        "node3",
        "hello-3",
        "logs",
        &["logs"],
        &broker,
        HostTls::Cert(&certs, "node3"),
    );
    let attached = wait_nodes(
        &broker,
        &admin,
        &["node1", "node2", "node3"],
        &[&n1.process, &n2.process, &n3.process],
    );
    assert!(attached >= 3, "one epoch per node at least: {attached}");

    let doc = cli_json(&broker, &admin, &["writers"]);
    let volumes: Vec<&str> = doc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["logs", "shared"], "{doc:#}");
    assert_eq!(
        rows(&doc, "shared"),
        [
            row("node1", "hello-1", &["greeting"]),
            row("node2", "hello-2", &["greeting"])
        ]
    );
    assert_eq!(rows(&doc, "logs"), [row("node3", "hello-3", &["greeting"])]);
    let shared = &doc["volumes"][1];
    assert_eq!(shared["nodes"], serde_json::json!(["node1", "node2"]));
    let w = &shared["writers"][0];
    assert_eq!(w["level"], "back-end");
    assert_eq!(
        w["metadata"]["id"], "hello-1",
        "the full metadata in JSON.md form"
    );
    assert_eq!(w["metadata"]["components"][0]["volume"], "shared");

    // A filter; and the table for people.
    let only_logs = cli_json(&broker, &admin, &["writers", "--volume", "logs"]);
    assert_eq!(only_logs["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(
        rows(&only_logs, "logs"),
        [row("node3", "hello-3", &["greeting"])]
    );
    let (ok, table, stderr) = cli(&broker, &admin, &["writers", "--volume", "shared"]);
    assert!(ok, "{stderr}");
    assert!(
        table.contains(
            "volume shared (the broker cannot snapshot it: no [volumes.NAME] in its configuration; configured on node1, node2)"
        ),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("node2") && l.contains("hello-2") && l.contains("back-end")),
        "{table}"
    );

    // The environment can stand in for the flags.
    let output = Command::new(cli_exe())
        .arg("nodes")
        .env("QUIESCE_BROKER", &broker.url)
        .env("QUIESCE_CA", certs.ca())
        .env("QUIESCE_CERT", certs.cert("admin"))
        .env("QUIESCE_KEY", certs.key("admin"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (node, volume, writer) in [("node1", "shared", "hello-1"), ("node3", "logs", "hello-3")] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(node) && l.contains(volume) && l.contains(writer)),
            "{table}"
        );
    }

    // An application registers a writer over D-Bus on node1: the broker hears of it.
    let app_dir = dir.path().join("app");
    let mut app = Child::spawn(
        {
            let mut c = Command::new(binary("quiesce-example-app-writer", "app-writer"));
            c.args([
                "--bus",
                n1.bus(),
                "--id",
                "app-1",
                "--volume",
                "shared",
                "--data",
            ])
            .arg(&app_dir)
            .stdout(Stdio::null());
            c
        },
        dir.path().join("app.log"),
    );
    let with_app = wait_for(
        "app-1 on node1 in the catalog",
        || {
            let doc = cli_json(&broker, &admin, &["writers", "--volume", "shared"]);
            rows(&doc, "shared")
                .iter()
                .any(|(n, w, _)| n == "node1" && w == "app-1")
                .then_some(doc)
        },
        || format!("{}\n{}", n1.process.log(), app.log()),
    );
    assert!(
        with_app["epoch"].as_u64().unwrap() > attached,
        "a writer joining bumps the epoch"
    );
    assert_eq!(rows(&with_app, "shared").len(), 3);

    // It exits: its writer leaves the catalog, and the epoch moves again.
    app.kill();
    let without = wait_for(
        "app-1 gone from the catalog",
        || {
            let doc = cli_json(&broker, &admin, &["writers", "--volume", "shared"]);
            (!rows(&doc, "shared").iter().any(|(_, w, _)| w == "app-1")).then_some(doc)
        },
        || n1.process.log(),
    );
    assert!(without["epoch"].as_u64() > with_app["epoch"].as_u64());
    assert!(broker.process.log().contains("writers changed"));
}

#[test]
fn dead_nodes_leave_by_heartbeat_or_closed_link_and_hosts_survive_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path(), &["node1", "node2"]);
    let mut broker = Broker::start(dir.path(), Some(&certs), 1500);
    let admin = certs.flags("admin");
    let mut n1 = Host::start(
        dir.path(),
        "node1",
        "hello-1",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "node1"),
    );
    let n2 = Host::start(
        dir.path(),
        "node2",
        "hello-2",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "node2"),
    );
    let both = wait_nodes(
        &broker,
        &admin,
        &["node1", "node2"],
        &[&n1.process, &n2.process],
    );

    // node2's host freezes (SIGSTOP): its link stays open but goes silent.
    n2.process.signal("STOP");
    let silent = wait_nodes(&broker, &admin, &["node1"], &[&n2.process]);
    assert!(silent > both, "a node leaving bumps the epoch");
    assert!(
        broker.process.log().contains("no heartbeat for 1500 ms"),
        "{}",
        broker.process.log()
    );

    // It resumes: it finds its link dropped and attaches again.
    n2.process.signal("CONT");
    let back = wait_nodes(&broker, &admin, &["node1", "node2"], &[&n2.process]);
    assert!(back > silent);
    wait_log(&n2.process, "reconnects in");

    // node1's host dies: its link closes and it leaves at once.
    n1.process.kill();
    let gone = wait_nodes(&broker, &admin, &["node2"], &[]);
    assert!(gone > back);

    // The broker restarts on the same address: node2 attaches to the new one by itself.
    broker.restart();
    wait_nodes(&broker, &admin, &["node2"], &[&n2.process]);
    // The broker lists the node once it registered it; the host logs its attach once it has
    // read the answer, a moment later.
    wait_for(
        "node2's host to log its third attach",
        || (n2.process.log().matches("attached to the broker").count() >= 3).then_some(()),
        || n2.process.log(),
    );
}
