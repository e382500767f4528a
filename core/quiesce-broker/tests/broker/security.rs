//! Who may attach: certificates of the cluster only, node names from the certificate, and the
//! insecure demo mode that says so.

use crate::support::*;

#[test]
fn a_host_with_a_certificate_of_another_ca_is_refused_in_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("cluster"), &["node1"]);
    let other = Certs::make(&dir.path().join("other"), &["node1"]);
    let broker = Broker::start(dir.path(), Some(&certs), 3000);
    let admin = certs.flags("admin");
    // Trusts the broker, but presents node1's certificate from another CA.
    let foreign = Host::start(
        dir.path(),
        "node1",
        "hello-1",
        "shared",
        &["shared"],
        &broker,
        HostTls::Mixed {
            ca: &certs,
            cert: &other,
            name: "node1",
        },
    );
    wait_log(&broker.process, "tls accept error");
    let log = wait_log(&foreign.process, "refused this node's certificate");
    assert!(!log.contains("attached to the broker"), "{log}");
    // Trusts another CA altogether: it refuses the broker itself.
    let stranger = Host::start(
        dir.path(),
        "node1",
        "hello-1",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&other, "node1"),
    );
    let log = wait_log(&stranger.process, "the TLS handshake failed");
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert!(!log.contains("attached to the broker"), "{log}");
    assert_eq!(nodes(&broker, &admin).0, Vec::<String>::new());
    // The CLI with the foreign certificate is refused too.
    let (ok, _, stderr) = cli(&broker, &other.flags("admin"), &["nodes"]);
    assert!(!ok);
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    assert!(stderr.contains("the TLS handshake failed"), "{stderr}");
}

#[test]
fn a_registration_claiming_another_node_than_its_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path(), &["node1", "node2"]);
    let broker = Broker::start(dir.path(), Some(&certs), 3000);
    let admin = certs.flags("admin");
    // node9 presents node2's certificate.
    let liar = Host::start(
        dir.path(),
        "node9",
        "hello-9",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "node2"),
    );
    let log = wait_log(&liar.process, "refused this node");
    assert!(
        log.contains(
            r#"this host's certificate is node "node2"'s but its registration claims node "node9""#
        ),
        "{log}"
    );
    assert!(
        log.contains("not the node certificate of"),
        "the host warns at start: {log}"
    );
    wait_log(
        &broker.process,
        "refused a registration: it claims another node than its certificate",
    );
    // A client certificate cannot attach as a host.
    let client = Host::start(
        dir.path(),
        "admin",
        "hello-a",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "admin"),
    );
    let log = wait_log(&client.process, "refused this node");
    assert!(
        log.contains("only node certificates may attach as hosts"),
        "{log}"
    );
    assert_eq!(nodes(&broker, &admin).0, Vec::<String>::new());
    // The rightful node1 attaches meanwhile.
    let good = Host::start(
        dir.path(),
        "node1",
        "hello-1",
        "shared",
        &["shared"],
        &broker,
        HostTls::Cert(&certs, "node1"),
    );
    wait_nodes(&broker, &admin, &["node1"], &[&good.process]);
    // And a CLI without certificates is told what to pass.
    let (ok, _, stderr) = cli(&broker, &[], &["writers"]);
    assert!(!ok);
    assert!(stderr.contains("pass --ca, --cert and --key"), "{stderr}");
}

#[test]
fn insecure_mode_works_for_a_demo_and_says_so_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), None, 3000);
    assert!(broker.url.starts_with("http://"));
    assert!(
        broker.process.log().contains("INSECURE MODE"),
        "{}",
        broker.process.log()
    );
    let insecure = vec!["--insecure".to_string()];
    let host = Host::start(
        dir.path(),
        "demo1",
        "hello-d",
        "demo",
        &["demo"],
        &broker,
        HostTls::Insecure,
    );
    wait_nodes(&broker, &insecure, &["demo1"], &[&host.process]);
    assert!(
        host.process.log().contains("INSECURE LINK"),
        "{}",
        host.process.log()
    );
    wait_log(
        &broker.process,
        "INSECURE: trusting the node name this host claims",
    );
    let (ok, stdout, stderr) = cli(&broker, &insecure, &["writers", "--json"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("WARNING: --insecure"), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["volumes"][0]["volume"], "demo");
    assert_eq!(doc["volumes"][0]["writers"][0]["node"], "demo1");
    // A TLS client cannot talk to it by mistake: the scheme says which mode it is.
    let certs = Certs::make(&dir.path().join("certs"), &["demo1"]);
    let (ok, _, stderr) = cli(&broker, &certs.flags("admin"), &["nodes"]);
    assert!(!ok);
    assert!(stderr.contains("must start with https://"), "{stderr}");
}

/// A requester whose clock runs years ahead (or a certificate that expired) is refused in the
/// handshake, and told to look at the clocks and the certificates' dates — not that the
/// certificates come from another CA, which is what it was told before. `faketime` moves only
/// the CLI's clock, as a skewed machine would.
#[test]
fn a_skewed_clock_is_named_as_the_cause_of_a_refused_handshake() {
    quiesce_testbed::require("faketime", "faketime");
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("cluster"), &["node1"]);
    let broker = Broker::start(dir.path(), Some(&certs), 3000);
    // Valid for the CLI's true clock.
    let (ok, _, stderr) = cli(&broker, &certs.flags("admin"), &["nodes"]);
    assert!(ok, "{stderr}");
    // The certificates last 825 days: three years on, the broker's has expired for this clock.
    let output = std::process::Command::new("faketime")
        .args(["-f", "+1100d"])
        .arg(cli_exe())
        .args(["--broker", &broker.url])
        .args(certs.flags("admin"))
        .arg("nodes")
        .env_remove("QUIESCE_BROKER")
        .env("DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("check that the clocks") && stderr.contains("openssl x509 -noout -dates"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("must both come from the cluster's CA"),
        "{stderr}"
    );
}
