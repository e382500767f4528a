//! Test support: certificates, a broker, hosts with their own buses, the CLI, and waiting on
//! conditions.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use quiesce_testbed::{binary, plugin, Bus, Child, Policy};

pub fn broker_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiesce-broker"))
}

pub fn host_exe() -> PathBuf {
    binary("quiesce-host", "quiesce-host")
}

pub fn cli_exe() -> PathBuf {
    binary("quiesce-cli", "quiesce")
}

/// How long any condition may take to come true.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `condition` returns `Some` (see [`quiesce_testbed::wait_until`]).
pub fn wait_for<T>(
    what: &str,
    condition: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    quiesce_testbed::wait_until_or(what, DEADLINE, condition, context)
}

/// Waits until a child's log holds `text`; returns the log.
pub fn wait_log(child: &Child, text: &str) -> String {
    wait_for(
        &format!("{text:?} in {}", child.stderr.display()),
        || {
            let log = child.log();
            log.contains(text).then_some(log)
        },
        || child.log(),
    )
}

/// The files `quiesce-broker certs` wrote.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// Runs the certificate command for these nodes, the clients `admin` and `backup`, broker
    /// at 127.0.0.1.
    pub fn make(dir: &Path, nodes: &[&str]) -> Certs {
        Self::make_for(dir, nodes, &["127.0.0.1"])
    }

    /// The same, with the broker reachable at each of `broker_hosts`.
    pub fn make_for(dir: &Path, nodes: &[&str], broker_hosts: &[&str]) -> Certs {
        let output = Command::new(broker_exe())
            .args(["certs", "--out"])
            .arg(dir)
            .args([
                "--broker-name",
                "broker",
                "--broker-host",
                &broker_hosts.join(","),
            ])
            .args(["--nodes", &nodes.join(","), "--clients", "admin,backup"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "quiesce-broker certs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Certs { dir: dir.into() }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The link's security with `name`'s certificate, for a gRPC client of the test's own.
    pub fn tls(&self, name: &str) -> quiesce_link::Security {
        quiesce_link::Security::Tls(quiesce_link::TlsFiles {
            ca: self.ca(),
            cert: self.cert(name),
            key: self.key(name),
        })
    }

    /// `--ca --cert --key` for `name`'s certificate.
    pub fn flags(&self, name: &str) -> Vec<String> {
        [
            ("--ca", self.ca()),
            ("--cert", self.cert(name)),
            ("--key", self.key(name)),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect()
    }
}

/// A running broker.
pub struct Broker {
    pub process: Child,
    pub addr: String,
    pub url: String,
    /// Flags for the broker's own TLS files (empty: insecure).
    tls: Vec<String>,
    heartbeat_ms: u64,
    dir: PathBuf,
    /// More `serve` arguments (`--config PATH`), kept for restarts.
    extra: Vec<String>,
    /// More environment (`NOTIFY_SOCKET`), kept for restarts.
    env: Vec<(String, std::ffi::OsString)>,
}

impl Broker {
    /// Starts a broker on any free loopback port: mutual TLS with `certs`, or insecure.
    pub fn start(dir: &Path, certs: Option<&Certs>, heartbeat_ms: u64) -> Broker {
        let tls = match certs {
            Some(c) => c.flags("broker"),
            None => vec!["--insecure".into()],
        };
        Self::start_at(dir, "127.0.0.1:0", tls, heartbeat_ms, vec![], vec![])
    }

    /// Starts an insecure broker on any free loopback port with more `serve` arguments and
    /// more environment.
    pub fn start_env(
        dir: &Path,
        heartbeat_ms: u64,
        extra: Vec<String>,
        env: Vec<(String, std::ffi::OsString)>,
    ) -> Broker {
        Self::start_at(
            dir,
            "127.0.0.1:0",
            vec!["--insecure".into()],
            heartbeat_ms,
            extra,
            env,
        )
    }

    /// Starts a broker with mutual TLS, listening on `listen`, with more `serve` arguments.
    pub fn start_with(
        dir: &Path,
        certs: &Certs,
        heartbeat_ms: u64,
        listen: &str,
        extra: Vec<String>,
    ) -> Broker {
        Self::start_at(
            dir,
            listen,
            certs.flags("broker"),
            heartbeat_ms,
            extra,
            vec![],
        )
    }

    fn start_at(
        dir: &Path,
        listen: &str,
        tls: Vec<String>,
        heartbeat_ms: u64,
        extra: Vec<String>,
        env: Vec<(String, std::ffi::OsString)>,
    ) -> Broker {
        let stderr = dir.join(format!("broker-{}.log", unique()));
        let mut command = Command::new(broker_exe());
        command
            .args(["serve", "--listen", listen])
            .args(&tls)
            .args(["--heartbeat-timeout-ms", &heartbeat_ms.to_string()])
            .args(&extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        let mut process = Child::spawn(command, stderr);
        let mut line = String::new();
        BufReader::new(process.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the broker did not start: {line:?}\n{}", process.log()))
            .to_string();
        let scheme = if tls.contains(&"--insecure".to_string()) {
            "http"
        } else {
            "https"
        };
        // A broker on every address is reached here on loopback.
        let reach = addr.replace("0.0.0.0:", "127.0.0.1:");
        Broker {
            url: format!("{scheme}://{reach}"),
            addr,
            process,
            tls,
            heartbeat_ms,
            dir: dir.into(),
            extra,
            env,
        }
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Kills the broker (SIGKILL) and starts a new one on the same address.
    pub fn restart(&mut self) {
        self.process.kill();
        self.start_again();
    }

    /// Starts the broker again on the same address (after it was killed).
    pub fn start_again(&mut self) {
        let next = Self::start_at(
            &self.dir,
            &self.addr,
            self.tls.clone(),
            self.heartbeat_ms,
            self.extra.clone(),
            self.env.clone(),
        );
        *self = next;
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A `quiesce-host` serving on its own bus, attached to a broker.
pub struct Host {
    pub process: Child,
    _bus: Bus,
}

/// How a host shows itself to the broker.
pub enum HostTls<'a> {
    /// These certificates, presenting `name`'s certificate.
    Cert(&'a Certs, &'a str),
    /// The CA of one set of certificates and the certificate of another.
    Mixed {
        ca: &'a Certs,
        cert: &'a Certs,
        name: &'a str,
    },
    Insecure,
}

impl Host {
    /// A host for `node` with the hello writer `writer` on `volume`; it can snapshot `volumes`.
    pub fn start(
        dir: &Path,
        node: &str,
        writer: &str,
        volume: &str,
        volumes: &[&str],
        broker: &Broker,
        tls: HostTls<'_>,
    ) -> Host {
        let home = dir.join(format!("host-{node}-{}", unique()));
        let plugins = home.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let hello = plugin("hello-writer");
        std::fs::copy(&hello, plugins.join(hello.file_name().unwrap())).unwrap();
        let mut config = format!(
            "node = {node:?}\nplugin_dir = {:?}\n\n[plugins.hello]\nid = {writer:?}\nvolume = {volume:?}\npath = \"/srv/{volume}/{writer}\"\n",
            plugins.display().to_string()
        );
        for v in volumes {
            let data = home.join(v);
            let snapshots = home.join(format!("{v}-snapshots"));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(&snapshots).unwrap();
            config.push_str(&format!(
                "\n[volumes.{v}]\nprovider = \"dir-copy\"\nsource = {:?}\nsnapshots = {:?}\n",
                data.display().to_string(),
                snapshots.display().to_string()
            ));
        }
        let config_path = home.join("host.toml");
        std::fs::write(&config_path, config).unwrap();
        let bus = Bus::start(Policy::Permissive);
        let mut command = Command::new(host_exe());
        command.arg("--config").arg(&config_path).args([
            "--bus",
            &bus.address,
            "--broker",
            &broker.url,
        ]);
        match tls {
            HostTls::Cert(certs, name) => {
                command.args(certs.flags(name));
            }
            HostTls::Mixed { ca, cert, name } => {
                command
                    .arg("--ca")
                    .arg(ca.ca())
                    .arg("--cert")
                    .arg(cert.cert(name))
                    .arg("--key")
                    .arg(cert.key(name));
            }
            HostTls::Insecure => {
                command.arg("--insecure");
            }
        }
        command.stdout(Stdio::null());
        let process = Child::spawn(command, home.join("host.log"));
        Host { process, _bus: bus }
    }

    pub fn bus(&self) -> &str {
        &self._bus.address
    }
}

/// Runs `quiesce` with `auth` (e.g. `Certs::flags("admin")` or `["--insecure"]`) against
/// `broker`: (success, stdout, stderr).
pub fn cli(broker: &Broker, auth: &[String], args: &[&str]) -> (bool, String, String) {
    let output = Command::new(cli_exe())
        .args(["--broker", &broker.url])
        .args(auth)
        .args(args)
        .env_remove("QUIESCE_BROKER")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `quiesce ARGS --json`, parsed; fails the test when the command fails.
pub fn cli_json(broker: &Broker, auth: &[String], args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let (ok, stdout, stderr) = cli(broker, auth, &args);
    assert!(ok, "quiesce {args:?} failed: {stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("quiesce {args:?} printed no JSON ({e}): {stdout}"))
}

/// The names of the live nodes and the epoch, from `quiesce nodes --json`.
pub fn nodes(broker: &Broker, auth: &[String]) -> (Vec<String>, u64) {
    let doc = cli_json(broker, auth, &["nodes"]);
    let names = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    (names, doc["epoch"].as_u64().unwrap())
}

/// Waits until exactly `expected` nodes are live; returns the epoch then.
pub fn wait_nodes(broker: &Broker, auth: &[String], expected: &[&str], logs: &[&Child]) -> u64 {
    wait_for(
        &format!("the live nodes to be {expected:?}"),
        || {
            let (names, epoch) = nodes(broker, auth);
            (names == expected).then_some(epoch)
        },
        || {
            let mut text = format!(
                "live now: {:?}\n--- broker:\n{}",
                nodes(broker, auth),
                broker.process.log()
            );
            for l in logs {
                text.push_str(&format!("--- {}:\n{}", l.stderr.display(), l.log()));
            }
            text
        },
    )
}

/// A file's text, or "" while it does not exist.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Now, in nanoseconds since the Unix epoch: the clock the applications' logs use.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Waits for a `quiesce snapshot create --json` to end: (exit code, the record when one was
/// printed, stderr).
pub fn finish(child: std::process::Child) -> (i32, Option<quiesce_proto::SetRecord>, String) {
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        serde_json::from_slice(&output.stdout).ok(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An app writer's freezes `(ns, last record)` and thaws `ns`, from its `--events` file.
pub fn app_holds(events: &Path) -> (Vec<(u128, u64)>, Vec<u128>) {
    let mut frozen = vec![];
    let mut thawed = vec![];
    for line in read(events).lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["frozen", ns, seq, ..] => frozen.push((ns.parse().unwrap(), seq.parse().unwrap())),
            ["thawed", ns, ..] => thawed.push(ns.parse().unwrap()),
            _ => {}
        }
    }
    (frozen, thawed)
}

/// Whether the app writer of `events` is frozen now.
pub fn app_frozen(events: &Path) -> bool {
    let (frozen, thawed) = app_holds(events);
    frozen.len() > thawed.len()
}
