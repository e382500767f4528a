//! The one error type a writer returns.

use std::fmt;

/// Why a writer call (or the plugin's init) failed: a message for the operator.
///
/// Any `std::error::Error` converts into it, so `?` works on I/O, database and parse errors; the
/// message keeps the whole source chain (`reading /x: permission denied`), because only text
/// crosses the ABI. Like `anyhow::Error`, it does not implement `std::error::Error` itself: that
/// is what lets the blanket `From` exist.
///
/// Say what failed and what to do: the host adds the node, the plugin and the writer.
pub struct Error {
    message: String,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Failed,
    /// Reported to the host as a refused configuration rather than a failure of the writer.
    InvalidConfig,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            kind: Kind::Failed,
        }
    }

    /// An error that refuses the plugin's configuration, e.g. a value out of range.
    ///
    /// Returned from init, it reaches the host as "configuration refused" rather than as a
    /// failure of the plugin. [`Config::deserialize`](crate::Config::deserialize) returns these.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            kind: Kind::InvalidConfig,
        }
    }

    /// Puts `context` in front of the message: `Error::from(io).context("reading /etc/x")`.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The message, with the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True for errors made by [`Error::invalid_config`] (and config deserialization).
    pub fn is_invalid_config(&self) -> bool {
        self.kind == Kind::InvalidConfig
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

// Debug prints the message as is, so that `unwrap()` in a test shows it readably.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Failed => write!(f, "Error({:?})", self.message),
            Kind::InvalidConfig => write!(f, "Error(invalid config: {:?})", self.message),
        }
    }
}

impl<E> From<E> for Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            // Many errors already print their source in their own message; don't say it twice.
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Error::new(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the label")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the label: {0}")]
    struct Repeats(#[source] std::io::Error);

    fn io() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied")
    }

    #[test]
    fn question_mark_converts_and_keeps_the_source_chain() {
        fn fails() -> Result<(), Error> {
            Err(Outer(io()))?;
            Ok(())
        }
        let error = fails().unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot read the label: permission denied"
        );
        assert!(!error.is_invalid_config());
    }

    #[test]
    fn a_source_already_in_the_message_is_not_repeated() {
        let error = Error::from(Repeats(io()));
        assert_eq!(error.message(), "cannot read the label: permission denied");
    }

    #[test]
    fn context_and_kind() {
        let error = Error::invalid_config("port must not be 0").context("key `port`");
        assert_eq!(error.to_string(), "key `port`: port must not be 0");
        assert!(error.is_invalid_config());
        assert_eq!(
            format!("{error:?}"),
            r#"Error(invalid config: "key `port`: port must not be 0")"#
        );
    }
}
