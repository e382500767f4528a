//! `misbehave`: a plugin whose writers fail, panic or hang where its configuration says, so that
//! the host's tests can exercise every error path through the real ABI.
//!
//! ```toml
//! events = "/path/events.log"   # optional: one line per call, "<writer-id> <call>", written
//!                               # before the call acts, and "<writer-id> <call>-done" after a
//!                               # call that succeeded
//! panic_in_init = false
//! init_sleep_ms = 0             # init sleeps this long first (a plugin whose init hangs)
//! print = "text"                # optional: init and every call print this on stdout
//! default_panic_hook = false    # true: panics are printed by std's default hook, as before the
//!                               # SDK installed its own (the negative control of the test that
//!                               # a panic is reported fast with RUST_BACKTRACE=1)
//! fail_init = "message"         # optional: init fails with this message
//!
//! [[writers]]
//! id = "w1"
//! name = "..."                  # optional: the writer's name (default "misbehave writer ID")
//! level = "back-end"            # front-end | back-end | system
//! volume = "demo"
//! needs_post_snapshot = false
//! fail_in = "freeze"            # optional: that call fails with "w1 was told to fail in freeze"
//! panic_in = "freeze"           # optional: that call panics with "w1 was told to panic in freeze"
//! hang_in = "freeze"            # optional: that call blocks until someone opens hang_fifo for
//! hang_fifo = "/path/fifo"      # writing (the FIFO must exist), then succeeds
//! control = "/path/control"     # optional: read at every call, see below
//! ```
//!
//! Calls are `prepare`, `freeze`, `thaw`, `post-snapshot`, `abort`, `complete` (the names of
//! `quiesce_sdk::CallKind`). Where one call is
//! told several things, it panics first, else fails, else hangs.
//!
//! **The control file** changes a writer's behaviour while the host runs (a fault injected in
//! the middle of a set, without restarting the host). It is read at the start of every call;
//! when it exists, its keys `fail_in`, `panic_in` and `hang_in` (TOML, the same values as above,
//! each optional) replace the writer's configured ones for that call; when it is missing or
//! empty, the configuration applies. A file that cannot be read or parsed fails the call, saying
//! why. A test replaces the file as a whole (write a temporary file, rename it) and removes it to
//! end the fault:
//!
//! ```toml
//! hang_in = "thaw"     # the next thaw blocks on hang_fifo
//! ```
//!
//! The events are written with one `write` each to a file opened for appending, so lines of
//! writers called concurrently do not interleave, and a test can read them as soon as the call
//! has started (no buffering).

use quiesce_sdk::{
    Call, CallKind, Component, ComponentKind, Config, Error, Level, Writer, WriterMetadata,
};
use serde::Deserialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    events: Option<PathBuf>,
    #[serde(default)]
    panic_in_init: bool,
    #[serde(default)]
    default_panic_hook: bool,
    #[serde(default)]
    init_sleep_ms: u64,
    print: Option<String>,
    fail_init: Option<String>,
    #[serde(default)]
    writers: Vec<WriterSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterSettings {
    id: String,
    name: Option<String>,
    #[serde(default = "back_end")]
    level: Level,
    #[serde(default = "demo")]
    volume: String,
    #[serde(default)]
    needs_post_snapshot: bool,
    fail_in: Option<CallKind>,
    panic_in: Option<CallKind>,
    hang_in: Option<CallKind>,
    hang_fifo: Option<PathBuf>,
    control: Option<PathBuf>,
}

/// What the control file may say: which call fails, panics or hangs now.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Control {
    fail_in: Option<CallKind>,
    panic_in: Option<CallKind>,
    hang_in: Option<CallKind>,
}

fn back_end() -> Level {
    Level::BackEnd
}

fn demo() -> String {
    "demo".into()
}

struct Misbehave {
    settings: WriterSettings,
    events: Option<PathBuf>,
    default_panic_hook: bool,
    print: Option<String>,
}

impl Misbehave {
    fn event(&self, what: &str) -> Result<(), Error> {
        let Some(path) = &self.events else {
            return Ok(());
        };
        let line = format!("{} {what}\n", self.settings.id);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .map_err(|e| Error::from(e).context(format!("appending to {}", path.display())))
    }

    /// What to do now: the control file's orders when it exists, else the configuration's.
    fn orders(&self) -> Result<Control, Error> {
        let configured = Control {
            fail_in: self.settings.fail_in,
            panic_in: self.settings.panic_in,
            hang_in: self.settings.hang_in,
        };
        let Some(path) = &self.settings.control else {
            return Ok(configured);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(configured),
            Err(e) => {
                return Err(Error::from(e).context(format!(
                    "{}: reading the control file {}",
                    self.settings.id,
                    path.display()
                )))
            }
        };
        if text.trim().is_empty() {
            return Ok(configured);
        }
        toml::from_str(&text).map_err(|e| {
            Error::new(format!(
                "{}: the control file {} is not valid: {e}",
                self.settings.id,
                path.display()
            ))
        })
    }

    fn act(&self, call: CallKind) -> Result<(), Error> {
        let (id, name) = (&self.settings.id, call.as_str());
        if let Some(text) = &self.print {
            println!("{text}");
        }
        let orders = self.orders()?;
        self.event(name)?;
        if orders.panic_in == Some(call) {
            if self.default_panic_hook {
                // `take_hook` leaves std's default hook in place of the SDK's.
                drop(std::panic::take_hook());
            }
            panic!("{id} was told to panic in {name}");
        }
        if orders.fail_in == Some(call) {
            return Err(Error::new(format!("{id} was told to fail in {name}")));
        }
        if orders.hang_in == Some(call) {
            let fifo = self.settings.hang_fifo.as_deref().unwrap_or(Path::new(""));
            // Opening a FIFO for reading blocks until someone opens it for writing.
            File::open(fifo)
                .map_err(|e| Error::from(e).context(format!("{id}: opening {}", fifo.display())))?;
        }
        self.event(&format!("{name}-done"))
    }
}

impl Writer for Misbehave {
    fn metadata(&self) -> WriterMetadata {
        let id = &self.settings.id;
        WriterMetadata {
            id: id.clone(),
            name: self
                .settings
                .name
                .clone()
                .unwrap_or_else(|| format!("misbehave writer {id}")),
            instance: String::new(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            level: self.settings.level,
            components: vec![Component {
                name: "data".into(),
                kind: ComponentKind::Files,
                volume: self.settings.volume.clone(),
                paths: vec![format!("/var/lib/misbehave/{id}")],
            }],
            expected_freeze_ms: 1,
            needs_post_snapshot: self.settings.needs_post_snapshot,
        }
    }

    fn prepare(&mut self, _: &mut Call) -> Result<(), Error> {
        self.act(CallKind::Prepare)
    }

    fn freeze(&mut self, _: &mut Call) -> Result<(), Error> {
        self.act(CallKind::Freeze)
    }

    fn thaw(&mut self, _: &mut Call) -> Result<(), Error> {
        self.act(CallKind::Thaw)
    }

    fn post_snapshot(&mut self, _: &mut Call, _: &Path) -> Result<(), Error> {
        self.act(CallKind::PostSnapshot)
    }

    fn abort(&mut self, _: &mut Call) -> Result<(), Error> {
        self.act(CallKind::Abort)
    }

    fn complete(&mut self, _: &mut Call, _: &str) -> Result<(), Error> {
        self.act(CallKind::Complete)
    }
}

/// Makes the configured writers, or fails or panics as told.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    let settings: Settings = config.deserialize()?;
    if settings.init_sleep_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(settings.init_sleep_ms));
    }
    if let Some(text) = &settings.print {
        println!("{text}");
    }
    if settings.panic_in_init {
        panic!("misbehave was told to panic in init");
    }
    if let Some(message) = settings.fail_init {
        return Err(Error::new(message));
    }
    let (events, default_panic_hook, print) =
        (settings.events, settings.default_panic_hook, settings.print);
    settings
        .writers
        .into_iter()
        .map(|writer| {
            if (writer.hang_in.is_some() || writer.control.is_some()) && writer.hang_fifo.is_none()
            {
                return Err(Error::invalid_config(format!(
                    "writer {}: hang_in and control need hang_fifo, the FIFO to wait on",
                    writer.id
                )));
            }
            Ok(Box::new(Misbehave {
                settings: writer,
                events: events.clone(),
                default_panic_hook,
                print: print.clone(),
            }) as Box<dyn Writer>)
        })
        .collect()
}

quiesce_sdk::export_plugin!(name: "misbehave", init: init);
