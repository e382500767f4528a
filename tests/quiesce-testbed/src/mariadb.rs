//! Private MariaDB servers for tests: `mariadb-install-db` into a directory (on the test's btrfs
//! volume), `mariadbd` on its own socket and port, run as root with `--user=mysql`; a second
//! server on a restored copy on another port. Each waits for the server's own readiness line in
//! its log; dropping a [`Server`] kills it.
//!
//! Needs the Debian packages `mariadb-server` and `mariadb-client` (`scripts/setup` installs them).

use crate::{poll_until, require, run, Child};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub const MARIADBD: &str = "/usr/sbin/mariadbd";

/// Fails loudly when the server or its tools are missing.
pub fn require_mariadb() {
    assert!(
        Path::new(MARIADBD).is_file(),
        "{MARIADBD} is missing: install the Debian package mariadb-server (scripts/setup does)"
    );
    for tool in [
        "mariadb-install-db",
        "mariadb",
        "mariadb-check",
        "mariadb-binlog",
    ] {
        require(tool, "mariadb-client");
    }
    require("runuser", "util-linux");
    assert!(
        run(Command::new("getent").args(["passwd", "mysql"])).contains("mysql"),
        "the user mysql is missing: install mariadb-server"
    );
}

/// Gives `path` (recursively) to the `mysql` user.
pub fn chown_mysql(path: &Path) {
    run(Command::new("chown").args(["-R", "mysql:mysql"]).arg(path));
}

/// A directory the `mysql` user owns.
pub fn mysql_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chown_mysql(path);
    path.to_path_buf()
}

/// Options every test server gets, at install and at start: a small redo log keeps copies small.
const INNODB: [&str; 2] = [
    "--innodb-log-file-size=16M",
    "--innodb-buffer-pool-size=32M",
];

/// One `mariadbd`, killed when dropped.
pub struct Server {
    pub datadir: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    /// The server's error log (`--log-error`).
    pub log: PathBuf,
    pid_file: PathBuf,
    tmpdir: PathBuf,
    /// More `mariadbd` options, given at every start.
    options: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// `mariadb-install-db` into `datadir` (created, given to mysql). `scratch` (traversable by
    /// others) holds the socket, pid file and log; `options` are more `mariadbd` options for
    /// every start (`--log-bin=binlog`, `--server-id=1`, ...).
    pub fn install(datadir: &Path, scratch: &Path, options: &[&str]) -> Server {
        require_mariadb();
        std::fs::create_dir_all(datadir).unwrap();
        chown_mysql(datadir);
        let server = Server::on(datadir, scratch, options);
        run(Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--tmpdir={}", server.tmpdir.display()))
            .args([
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ])
            .args(INNODB)
            .current_dir("/"));
        server
    }

    /// A server over an existing data directory (a restored copy, given to mysql here), on a
    /// port and socket of its own; not started.
    pub fn on(datadir: &Path, scratch: &Path, options: &[&str]) -> Server {
        require_mariadb();
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let name = format!("mariadb{}", SERVERS.fetch_add(1, Ordering::Relaxed));
        let dir = mysql_dir(&scratch.join(&name));
        chown_mysql(datadir);
        Server {
            // Its own: servers installing or running at once with the shared /tmp have been
            // seen to fail on each other's temporary tables.
            tmpdir: mysql_dir(&dir.join("tmp")),
            datadir: datadir.to_path_buf(),
            socket: dir.join("mysqld.sock"),
            port: crate::postgres::free_port(),
            log: dir.join("error.log"),
            pid_file: dir.join("mysqld.pid"),
            options: options.iter().map(|o| o.to_string()).collect(),
            child: None,
        }
    }

    /// Starts the server and waits until it says it is ready for connections (a line of its
    /// log); fails with the log if it exits or does not get there in `timeout`.
    pub fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "{} already runs",
            self.datadir.display()
        );
        let offset = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let mut command = Command::new(MARIADBD);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.datadir.display()))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--pid-file={}", self.pid_file.display()))
            .arg(format!("--log-error={}", self.log.display()))
            .arg(format!("--tmpdir={}", self.tmpdir.display()))
            .args([
                "--user=mysql",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
            ])
            .arg("--max-connections=60")
            .args(INNODB)
            .args(&self.options)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Options the server does not know are fatal; the log says which.
        let stderr = self.log.with_extension("stderr");
        let mut child = Child::spawn(command, stderr);
        let ready = poll_until(Duration::from_secs(120), || {
            if let Some(status) = child.child.try_wait().unwrap() {
                return Some(Err(format!("mariadbd exited ({status})")));
            }
            let text = std::fs::read(&self.log).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(offset..).unwrap_or_default());
            new.contains("ready for connections").then_some(Ok(()))
        });
        if ready != Some(Ok(())) {
            let why = match ready {
                Some(Err(why)) => why,
                _ => "not ready within 120 s".into(),
            };
            let log = self.log_text();
            let stderr = child.log();
            child.kill();
            panic!(
                "mariadbd on {} did not start: {why}\nlog:\n{log}\nstderr:\n{stderr}",
                self.datadir.display()
            );
        }
        self.child = Some(child);
    }

    /// Stops the server cleanly (SIGTERM, then waits for it to exit, up to two minutes).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        child.signal("TERM");
        let exited = poll_until(Duration::from_secs(120), || {
            child.child.try_wait().unwrap().map(|_| ())
        });
        assert!(
            exited.is_some(),
            "mariadbd on {} did not stop within 120 s:\n{}",
            self.datadir.display(),
            self.log_text()
        );
    }

    /// Kills the server (SIGKILL, as a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// The server process, while it runs.
    pub fn process(&self) -> Option<&Child> {
        self.child.as_ref()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.child.try_wait().unwrap().is_none())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The client, as root over the socket (unix_socket authentication).
    pub fn client(&self) -> Command {
        let mut command = Command::new("mariadb");
        command
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--batch", "--skip-column-names"]);
        command
    }

    /// Runs `sql` as root; its output (tab-separated, no column names), or the error.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let output = self
            .client()
            .arg("--execute")
            .arg(sql)
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Runs `sql` as root and returns its output; panics, with the error, if it fails.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("{sql} on {}: {e}", self.datadir.display()))
    }

    /// `mariadb-check --all-databases --extended` (CHECK TABLE … EXTENDED on every table):
    /// every table OK, or panic with what it found.
    pub fn check(&self) -> String {
        let output = Command::new("mariadb-check")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--all-databases", "--extended"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let bad: Vec<&str> = stdout
            .lines()
            .filter(|l| !l.trim_end().ends_with("OK"))
            .collect();
        assert!(
            output.status.success() && bad.is_empty() && !stdout.is_empty(),
            "mariadb-check on {} found problems ({}):\n{stdout}{}",
            self.datadir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // What the server said is usually what explains a failed test.
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- the log of mariadbd on {} (last 40 lines):\n{}",
                self.datadir.display(),
                tail.join("\n")
            );
        }
    }
}
