//! The plugin's configuration: its table from the host's configuration file.

use crate::Error;
use serde::de::DeserializeOwned;

/// The plugin's TOML table from the host configuration (`[plugins.<name>]`), empty when the host
/// configuration has none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    table: toml::Table,
}

impl Config {
    /// Parses the TOML text of a table, as the host hands it to the plugin.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let table = text.parse::<toml::Table>().map_err(|e| {
            Error::invalid_config(format!(
                "the configuration is not a TOML table: {}",
                one_line(&e.to_string())
            ))
        })?;
        Ok(Config { table })
    }

    /// A configuration holding `table`.
    pub fn from_table(table: toml::Table) -> Config {
        Config { table }
    }

    /// The raw table.
    pub fn table(&self) -> &toml::Table {
        &self.table
    }

    /// The table as a `T` (usually a `#[derive(Deserialize)]` struct).
    ///
    /// The error is an [invalid-config](Error::invalid_config) error naming the key, e.g.
    /// ``invalid configuration: invalid type: string "x", expected u16 in `port` ``, so init can
    /// return it with `?`. Use `#[serde(deny_unknown_fields)]` to catch misspelt keys.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, Error> {
        // Deserializing the table rather than the original text is what makes toml name the
        // key ("in `port`"); line numbers of the text would refer to the plugin's sub-table as
        // the host re-serialised it, not to the host's file, and would only mislead.
        self.table.clone().try_into::<T>().map_err(|e| {
            Error::invalid_config(format!(
                "invalid configuration: {}",
                one_line(&e.to_string())
            ))
        })
    }
}

/// toml puts the key on a line of its own; messages here are one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        port: u16,
        #[serde(default)]
        writers: Vec<WriterSettings>,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct WriterSettings {
        id: String,
    }

    #[test]
    fn deserializes_the_table() {
        let config = Config::from_toml("port = 5432\n[[writers]]\nid = \"a\"").unwrap();
        assert_eq!(config.table()["port"].as_integer(), Some(5432));
        let settings: Settings = config.deserialize().unwrap();
        assert_eq!(settings.port, 5432);
        assert_eq!(settings.writers, vec![WriterSettings { id: "a".into() }]);
    }

    #[test]
    fn errors_name_the_key_and_are_config_errors() {
        let error = Config::from_toml("port = \"x\"")
            .unwrap()
            .deserialize::<Settings>()
            .unwrap_err();
        assert!(error.is_invalid_config());
        assert_eq!(
            error.message(),
            "invalid configuration: invalid type: string \"x\", expected u16 in `port`"
        );

        let nested = Config::from_toml("port = 1\n[[writers]]\nid = 3")
            .unwrap()
            .deserialize::<Settings>()
            .unwrap_err();
        assert!(nested.message().contains("in `writers.id`"), "{nested}");

        let unknown = Config::from_toml("port = 1\nprot = 2")
            .unwrap()
            .deserialize::<Settings>()
            .unwrap_err();
        assert!(
            unknown.message().contains("unknown field `prot`"),
            "{unknown}"
        );
    }

    #[test]
    fn text_that_is_not_toml_is_refused() {
        let error = Config::from_toml("port = ").unwrap_err();
        assert!(error.is_invalid_config());
        assert!(!error.message().contains('\n'), "{error}");
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }
}
