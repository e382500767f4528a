//! One connection to the server, and statements that keep to a call's deadline.
//!
//! Each statement runs under a `statement_timeout` that ends before the call's deadline (the
//! server cancels it); over TCP, keepalives find a peer that vanished. Errors say which server,
//! which statement, and whether the connection is gone.

use postgres::error::SqlState;
use postgres::{Client, NoTls, Row};
use quiesce_sdk::Error;
use std::time::Duration;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// An upper bound for every statement, below the call's own budget.
    pub statement_timeout: Option<Duration>,
}

impl Target {
    /// `PostgreSQL at /run/postgresql:5432 (database postgres, user postgres)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "PostgreSQL at {}:{} (database {}, user {})",
            self.host, self.port, self.dbname, self.user
        )
    }
}

pub struct Session {
    client: Client,
    target: Target,
}

/// How a statement failed.
pub enum Failure {
    /// The connection is gone (server stopped or restarted, session terminated, network cut).
    Lost(String),
    /// It ran out of time.
    TimedOut(String),
    /// The server refused it.
    Refused {
        code: Option<SqlState>,
        message: String,
    },
}

impl Failure {
    pub fn into_error(self, target: &Target, what: &str) -> Error {
        let server = target.describe();
        Error::new(match self {
            Failure::Lost(cause) => format!(
                "{what}: lost the connection to {server} ({cause}); the server stopped or \
                 restarted, or the session was terminated — check the server and retry the set"
            ),
            Failure::TimedOut(cause) => format!(
                "{what}: {server} did not answer within the call's budget ({cause}); raise the \
                 host's timeout for this call or find what slows the server"
            ),
            Failure::Refused { message, .. } => format!("{what}: {server} refused: {message}"),
        })
    }

    pub fn is_lost(&self) -> bool {
        matches!(self, Failure::Lost(_))
    }

    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Failure::Refused { code, .. } => code.as_ref(),
            _ => None,
        }
    }
}

/// The smallest budget worth sending a statement with.
const MIN_BUDGET: Duration = Duration::from_millis(5);

impl Session {
    /// Connects within `budget` (and the configured connect timeout).
    pub fn connect(target: &Target, budget: Duration) -> Result<Session, Error> {
        let timeout = target.connect_timeout.min(budget);
        if timeout < MIN_BUDGET {
            return Err(Error::new(format!(
                "no time left to connect to {}",
                target.describe()
            )));
        }
        let mut config = postgres::Config::new();
        config
            .host(&target.host)
            .port(target.port)
            .user(&target.user)
            .dbname(&target.dbname)
            .application_name(&target.application_name)
            .connect_timeout(timeout)
            // Over TCP (ignored for Unix sockets): notice a server or network that vanished
            // while a statement runs, instead of waiting on the socket for ever.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(10))
            // The server's notices (e.g. about archiving, from pg_backup_stop) go to the log.
            .notice_callback(|notice| {
                quiesce_sdk::log::info!("server notice: {}", notice.message());
            });
        if let Some(password) = &target.password {
            config.password(password);
        }
        let client = config.connect(NoTls).map_err(|e| {
            Error::new(format!(
                "cannot connect to {} within {} ms: {}; check that the server runs and the \
                 plugin's host/port/user/dbname (and pg_hba.conf) let the host in",
                target.describe(),
                timeout.as_millis(),
                describe_error(&e)
            ))
        })?;
        Ok(Session {
            client,
            target: target.clone(),
        })
    }

    /// Runs `sql` with `params`, to finish within `budget`.
    pub fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        budget: Duration,
    ) -> Result<Vec<Row>, Failure> {
        let mut timeout = budget.saturating_sub(budget / 10);
        if let Some(cap) = self.target.statement_timeout {
            timeout = timeout.min(cap);
        }
        if timeout < MIN_BUDGET {
            return Err(Failure::TimedOut("no time left in the call".into()));
        }
        let ms = timeout.as_millis().max(1);
        self.client
            .batch_execute(&format!("SET statement_timeout = {ms}"))
            .map_err(|e| self.classify(&e))?;
        let result = self.client.query(sql, params);
        result.map_err(|e| {
            let failure = self.classify(&e);
            match failure {
                Failure::Refused {
                    code: Some(SqlState::QUERY_CANCELED),
                    ..
                } => Failure::TimedOut(format!("cancelled after {ms} ms")),
                other => other,
            }
        })
    }

    fn classify(&self, error: &postgres::Error) -> Failure {
        let code = error.code().cloned();
        let lost = error.is_closed()
            || self.client.is_closed()
            || code.as_ref().is_some_and(|c| {
                // Class 57P: the server shut the session (terminated, crash, shutdown).
                c.code().starts_with("57P")
            })
            || error.as_db_error().is_none() && error.code().is_none() && is_io(error);
        let message = describe_error(error);
        if lost {
            Failure::Lost(message)
        } else {
            Failure::Refused { code, message }
        }
    }
}

fn is_io(error: &postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The server's message (with detail and hint) or the client's.
pub fn describe_error(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}
