//! The hello-world plugin: one writer that holds nothing, logs each step and labels the snapshot.

use quiesce_sdk::{log, Call, ComponentKind, Config, Error, Level, Writer, WriterMetadata};
use std::path::Path;

/// The plugin's table in the host configuration, `[plugins.hello]`; every key is optional.
#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Hello {
    id: String,
    volume: String,
    path: String,
}

impl Default for Hello {
    fn default() -> Self {
        let (id, volume, path) = ("hello".into(), "demo".into(), "/var/lib/hello".into());
        Hello { id, volume, path }
    }
}

impl Writer for Hello {
    fn metadata(&self) -> WriterMetadata {
        WriterMetadata::new(&self.id, "Hello writer", Level::BackEnd)
            .with_component("greeting", ComponentKind::Files, &self.volume, [&self.path])
            .with_post_snapshot()
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        log::info!("{}: frozen for set {}", self.id, call.set_id());
        call.report("frozen_at", call.set_id().to_string());
        Ok(())
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        log::info!("{}: thawed after set {}", self.id, call.set_id());
        Ok(())
    }

    fn post_snapshot(&mut self, call: &mut Call, snapshot: &Path) -> Result<(), Error> {
        Ok(std::fs::write(
            snapshot.join("hello-writer.label"),
            call.set_id(),
        )?)
    }
}

/// Makes the one writer from the plugin's configuration.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    Ok(vec![Box::new(config.deserialize::<Hello>()?)])
}

quiesce_sdk::export_plugin!(name: "hello", init: init);
