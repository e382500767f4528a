//! One connection to the server, owned by a thread of its own, and statements that keep to a
//! call's deadline.
//!
//! Why a thread: the client crate sets a socket's read timeout once, when it connects, but the
//! session lives through several calls with budgets of their own. Each statement goes to the
//! thread over a channel and the call waits for its answer no longer than its budget. Two bounds
//! stack up:
//!
//! - the server's own: MariaDB runs each statement under `SET STATEMENT max_statement_time = …,
//!   lock_wait_timeout = … FOR …` (both also interrupt a `BACKUP STAGE` waiting for a lock), so a
//!   statement that waits too long ends with an error and the session stays usable — to end what
//!   it holds. MySQL has no `SET STATEMENT`; there `lock_wait_timeout` is set before it.
//! - the writer's: if the answer does not come in time anyway (a server that hangs, a network
//!   that went away), the call gives up on the session and a second, short-lived connection
//!   `KILL`s it, so that the server releases whatever it held or waited for.

use mysql::prelude::Queryable;
use quiesce_sdk::{log, Error};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Socket(PathBuf),
    Tcp { host: String, port: u16 },
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    pub user: String,
    pub password_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// An upper bound for every statement, below the call's own budget.
    pub statement_timeout: Option<Duration>,
}

/// How long the session's socket waits for one answer, as a last resort: calls stop waiting
/// long before (their budget), and then kill the session; this only ends the session's thread
/// if even the kill cannot reach the server.
const SOCKET_BACKSTOP: Duration = Duration::from_secs(300);

/// The smallest budget worth sending a statement with.
const MIN_BUDGET: Duration = Duration::from_millis(5);

impl Target {
    /// `the server at socket /run/mysqld/mysqld.sock (user root)`, for messages.
    pub fn describe(&self) -> String {
        let at = match &self.endpoint {
            Endpoint::Socket(path) => format!("socket {}", path.display()),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        };
        format!("the server at {at} (user {})", self.user)
    }

    fn opts(
        &self,
        connect_timeout: Duration,
        socket_timeout: Duration,
    ) -> Result<mysql::Opts, Error> {
        let password = match &self.password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::new(format!(
                        "cannot read the password file {} for {}: {e}; check `password_file` \
                         and that the host may read it",
                        path.display(),
                        self.describe()
                    ))
                })?;
                Some(
                    text.lines()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches('\r')
                        .to_string(),
                )
            }
            None => None,
        };
        let builder = mysql::OptsBuilder::new()
            .user(Some(self.user.clone()))
            .pass(password)
            // Not the client's own reconnection via `@@socket`: the session must stay the one
            // that holds the lock, or fail.
            .prefer_socket(false)
            .tcp_connect_timeout(Some(connect_timeout))
            .read_timeout(Some(socket_timeout))
            .write_timeout(Some(socket_timeout))
            // Over TCP: notice a server or network that vanished while the session is held.
            .tcp_keepalive_time_ms(Some(5000))
            .tcp_keepalive_probe_interval_secs(Some(1))
            .tcp_keepalive_probe_count(Some(3))
            .stmt_cache_size(Some(0));
        let builder = match &self.endpoint {
            Endpoint::Socket(path) => builder.socket(Some(path.display().to_string())),
            Endpoint::Tcp { host, port } => {
                builder.ip_or_hostname(Some(host.clone())).tcp_port(*port)
            }
        };
        Ok(mysql::Opts::from(builder))
    }
}

/// Which server answers, from `VERSION()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `VERSION()` as the server says it.
    pub version: String,
    pub mariadb: bool,
    pub number: (u32, u32, u32),
}

impl Server {
    pub fn parse(version: &str) -> Server {
        // Old MariaDB servers prefixed their version with `5.5.5-` on the wire; VERSION() does
        // not, but be lenient.
        let text = version.strip_prefix("5.5.5-").unwrap_or(version);
        let digits: Vec<u32> = text
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| digits.get(i).copied().unwrap_or(0);
        Server {
            version: version.to_string(),
            mariadb: version.contains("MariaDB"),
            number: (at(0), at(1), at(2)),
        }
    }

    /// `MariaDB 10.11.19-MariaDB-0+deb12u1-log` / `MySQL 8.0.36`.
    pub fn name(&self) -> String {
        if self.mariadb {
            format!("MariaDB {}", self.version)
        } else {
            format!("MySQL {}", self.version)
        }
    }

    /// `BACKUP STAGE` exists from MariaDB 10.4.1.
    pub fn has_backup_stage(&self) -> bool {
        self.mariadb && self.number >= (10, 4, 1)
    }

    /// `SET STATEMENT … FOR` exists from MariaDB 10.1.2.
    fn has_set_statement(&self) -> bool {
        self.mariadb && self.number >= (10, 1, 2)
    }

    /// The statement giving the binlog file and position: `SHOW BINLOG STATUS` from MariaDB
    /// 10.5.2, `SHOW BINARY LOG STATUS` from MySQL 8.2 (8.4 removed the old name), else `SHOW
    /// MASTER STATUS`.
    pub fn binlog_status(&self) -> &'static str {
        if self.mariadb && self.number >= (10, 5, 2) {
            "SHOW BINLOG STATUS"
        } else if !self.mariadb && self.number >= (8, 2, 0) {
            "SHOW BINARY LOG STATUS"
        } else {
            "SHOW MASTER STATUS"
        }
    }

    /// The privilege that statement needs, for messages.
    pub fn binlog_privilege(&self) -> &'static str {
        if self.mariadb && self.number >= (10, 5, 2) {
            "BINLOG MONITOR"
        } else {
            "REPLICATION CLIENT"
        }
    }
}

/// Rows as text (`None` for NULL): everything this writer reads is text or a number.
pub type Rows = Vec<Vec<Option<String>>>;

/// How a statement failed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The connection is gone (server stopped or restarted, session killed, network cut); or
    /// the writer gave up on it.
    Lost(String),
    /// It ran out of time (the server interrupted it, or it did not answer).
    TimedOut(String),
    /// The server refused it.
    Refused { code: Option<u16>, message: String },
}

/// `ER_BACKUP_NOT_RUNNING`: "You must start backup with BACKUP STAGE START".
pub const ER_BACKUP_NOT_RUNNING: u16 = 4146;
/// `ER_SPECIFIC_ACCESS_DENIED_ERROR`, `ER_DBACCESS_DENIED_ERROR`, `ER_ACCESS_DENIED_ERROR`.
const ACCESS_DENIED: [u16; 3] = [1227, 1044, 1045];

impl Failure {
    pub fn into_error(self, target: &Target, what: &str) -> Error {
        let server = target.describe();
        Error::new(match self {
            Failure::Lost(cause) => format!(
                "{what}: lost the connection to {server} ({cause}); the server stopped or \
                 restarted, or the session was killed — check the server and retry the set"
            ),
            Failure::TimedOut(cause) => format!(
                "{what}: {server} did not finish within the call's budget ({cause}); raise the \
                 host's timeout for this call or find what holds the server up (SHOW PROCESSLIST)"
            ),
            Failure::Refused { code, message } => {
                let hint = if code.is_some_and(|c| ACCESS_DENIED.contains(&c)) {
                    "; grant the account the privileges the README lists (RELOAD, BINLOG MONITOR)"
                } else {
                    ""
                };
                format!("{what}: {server} refused: {message}{hint}")
            }
        })
    }

    pub fn is_lost(&self) -> bool {
        matches!(self, Failure::Lost(_))
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            Failure::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

fn classify(error: mysql::Error) -> Failure {
    match error {
        mysql::Error::MySqlError(e) => match e.code {
            // ER_STATEMENT_TIMEOUT (MariaDB), ER_LOCK_WAIT_TIMEOUT, ER_QUERY_TIMEOUT (MySQL).
            1969 | 1205 | 3024 => Failure::TimedOut(format!("ERROR {}: {}", e.code, e.message)),
            // ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED, ER_NEW_ABORTING_CONNECTION.
            1053 | 1927 | 1184 => Failure::Lost(format!("ERROR {}: {}", e.code, e.message)),
            code => Failure::Refused {
                code: Some(code),
                message: format!("ERROR {code} ({}): {}", e.state, e.message),
            },
        },
        e @ (mysql::Error::IoError(_)
        | mysql::Error::CodecError(_)
        | mysql::Error::DriverError(_)) => Failure::Lost(e.to_string()),
        other => Failure::Refused {
            code: None,
            message: other.to_string(),
        },
    }
}

fn text(value: mysql::Value) -> Option<String> {
    match value {
        mysql::Value::NULL => None,
        mysql::Value::Bytes(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

struct Job {
    statements: Vec<String>,
    reply: mpsc::Sender<Result<Rows, Failure>>,
}

/// Runs the session's statements, one job at a time, until the writer drops the channel (then
/// the connection closes, which ends whatever the server session still held) or the connection
/// is lost.
fn serve(mut conn: mysql::Conn, jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let mut result = Ok(Vec::new());
        for sql in &job.statements {
            result = conn
                .query::<mysql::Row, _>(sql.as_str())
                .map(|rows| {
                    rows.into_iter()
                        .map(|row| row.unwrap().into_iter().map(text).collect())
                        .collect()
                })
                .map_err(classify);
            if result.is_err() {
                break;
            }
        }
        let lost = matches!(&result, Err(Failure::Lost(_)));
        let _ = job.reply.send(result);
        if lost {
            return;
        }
    }
}

/// One connection, held by its thread.
pub struct Session {
    jobs: Option<mpsc::Sender<Job>>,
    /// `CONNECTION_ID()`: what a kill names.
    pub id: u32,
    pub server: Server,
    target: Target,
    /// Why the session is unusable, once it is.
    lost: Option<String>,
}

impl Session {
    /// Connects within `budget` (and the configured connect timeout) and asks the version.
    pub fn connect(target: &Target, budget: Duration) -> Result<Session, Error> {
        let timeout = target.connect_timeout.min(budget);
        if timeout < MIN_BUDGET {
            return Err(Error::new(format!(
                "no time left to connect to {}",
                target.describe()
            )));
        }
        let start = Instant::now();
        let opts = target.opts(timeout, SOCKET_BACKSTOP)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("quiesce-mariadb-session".into())
            .spawn(move || match mysql::Conn::new(opts) {
                Ok(conn) => {
                    let (jobs, queue) = mpsc::channel();
                    if tx.send(Ok((conn.connection_id(), jobs))).is_ok() {
                        serve(conn, queue);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            })
            .map_err(|e| Error::new(format!("cannot start the session thread: {e}")))?;
        let failed = |why: String| {
            Error::new(format!(
                "cannot connect to {} within {} ms: {why}; check that the server runs and the \
                 plugin's socket/host/port/user/password_file let the host in",
                target.describe(),
                timeout.as_millis()
            ))
        };
        let (id, jobs) = match rx.recv_timeout(timeout) {
            Ok(Ok(connected)) => connected,
            Ok(Err(why)) => return Err(failed(why)),
            // The thread finds nobody waiting once it connects, and closes the connection.
            Err(_) => return Err(failed("no answer".into())),
        };
        let mut session = Session {
            jobs: Some(jobs),
            id,
            server: Server::parse(""),
            target: target.clone(),
            lost: None,
        };
        let rows = session
            .query("SELECT VERSION()", timeout.saturating_sub(start.elapsed()))
            .map_err(|f| f.into_error(target, "asking the server's version"))?;
        session.server = Server::parse(&first(&rows, 0).unwrap_or_default());
        Ok(session)
    }

    /// Runs `sql`, to finish within `budget`.
    pub fn query(&mut self, sql: &str, budget: Duration) -> Result<Rows, Failure> {
        if let Some(why) = &self.lost {
            return Err(Failure::Lost(why.clone()));
        }
        // The server gets most of the budget; the rest is for its answer to come back and for
        // the call to clean up (end a backup stage) before its own deadline.
        let margin = (budget / 5).min(Duration::from_secs(1));
        let mut server_budget = budget.saturating_sub(margin);
        if let Some(cap) = self.target.statement_timeout {
            server_budget = server_budget.min(cap);
        }
        if server_budget < MIN_BUDGET {
            return Err(Failure::TimedOut("no time left in the call".into()));
        }
        let wait = server_budget + margin / 2;
        // lock_wait_timeout counts whole seconds; max_statement_time ends the wait in time.
        let lock_wait = server_budget.as_secs().max(1);
        let statements = if self.server.has_set_statement() {
            vec![format!(
                "SET STATEMENT max_statement_time = {:.3}, lock_wait_timeout = {lock_wait} FOR {sql}",
                server_budget.as_secs_f64()
            )]
        } else {
            vec![
                format!("SET SESSION lock_wait_timeout = {lock_wait}"),
                sql.to_string(),
            ]
        };
        let (reply, answer) = mpsc::channel();
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job { statements, reply }).is_ok());
        if !sent {
            return Err(self.lose("the session's thread ended".into()));
        }
        match answer.recv_timeout(wait) {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(failure)) => {
                if let Failure::Lost(why) = &failure {
                    self.lose(why.clone());
                }
                Err(failure)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.lose(format!(
                    "no answer within {} ms; the writer killed the session",
                    wait.as_millis()
                ));
                self.kill();
                Err(Failure::TimedOut(format!(
                    "no answer to {sql} within {} ms",
                    wait.as_millis()
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.lose("the session's thread ended".into()))
            }
        }
    }

    /// Whether the session is unusable (lost, or given up on and killed).
    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    fn lose(&mut self, why: String) -> Failure {
        self.lost = Some(why.clone());
        self.jobs = None;
        Failure::Lost(why)
    }

    /// Ends the server side of this session from a second connection, in the background: the
    /// call that gave up on it must return in time.
    fn kill(&self) {
        let (target, id) = (self.target.clone(), self.id);
        let spawned = std::thread::Builder::new()
            .name("quiesce-mariadb-kill".into())
            .spawn(move || {
                let result = target
                    .opts(Duration::from_secs(2), Duration::from_secs(5))
                    .map_err(|e| e.to_string())
                    .and_then(|opts| mysql::Conn::new(opts).map_err(|e| e.to_string()))
                    .and_then(|mut conn| {
                        conn.query_drop(format!("KILL CONNECTION {id}"))
                            .map_err(|e| e.to_string())
                    });
                match result {
                    Ok(()) => log::info!("killed session {id} on {}", target.describe()),
                    Err(e) => log::warn!(
                        "could not kill session {id} on {}: {e}; the server ends it when it \
                         notices the connection closed",
                        target.describe()
                    ),
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread to kill session {}: {e}", self.id);
        }
    }
}

/// The first row's column `i`, if any and not NULL.
pub fn first(rows: &Rows, i: usize) -> Option<String> {
    rows.first().and_then(|r| r.get(i).cloned().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_what_they_support() {
        let m = Server::parse("10.11.19-MariaDB-0+deb12u1-log");
        assert!(m.mariadb && m.has_backup_stage() && m.has_set_statement());
        assert_eq!(m.number, (10, 11, 19));
        assert_eq!(m.binlog_status(), "SHOW BINLOG STATUS");
        assert_eq!(m.binlog_privilege(), "BINLOG MONITOR");
        assert_eq!(m.name(), "MariaDB 10.11.19-MariaDB-0+deb12u1-log");
        let old = Server::parse("5.5.5-10.3.39-MariaDB");
        assert_eq!(old.number, (10, 3, 39));
        assert!(!old.has_backup_stage() && old.has_set_statement());
        assert_eq!(old.binlog_status(), "SHOW MASTER STATUS");
        assert!(Server::parse("10.4.1-MariaDB").has_backup_stage());
        assert!(!Server::parse("10.4.0-MariaDB").has_backup_stage());
        assert_eq!(
            Server::parse("10.5.2-MariaDB").binlog_status(),
            "SHOW BINLOG STATUS"
        );
        let mysql = Server::parse("8.0.36");
        assert!(!mysql.mariadb && !mysql.has_backup_stage() && !mysql.has_set_statement());
        assert_eq!(mysql.binlog_status(), "SHOW MASTER STATUS");
        assert_eq!(mysql.binlog_privilege(), "REPLICATION CLIENT");
        assert_eq!(
            Server::parse("8.4.3").binlog_status(),
            "SHOW BINARY LOG STATUS"
        );
    }

    #[test]
    fn a_server_that_is_not_there_fails_the_connection_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let target = Target {
            endpoint: Endpoint::Socket(tmp.path().join("none.sock")),
            user: "quiesce".into(),
            password_file: None,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: None,
        };
        let start = Instant::now();
        let error = Session::connect(&target, Duration::from_secs(5))
            .err()
            .expect("nothing listens there");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        assert!(
            error
                .message()
                .contains("cannot connect to the server at socket")
                && error.message().contains("none.sock"),
            "{error}"
        );
        let target = Target {
            password_file: Some(tmp.path().join("no-password")),
            ..target
        };
        let error = Session::connect(&target, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(
            error.message().contains("cannot read the password file"),
            "{error}"
        );
    }
}
