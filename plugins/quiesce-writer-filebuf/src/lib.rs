#![doc = include_str!("../README.md")]

mod files;
mod signal;
mod socket;
mod wait;

use files::FileSpec;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use quiesce_sdk::{log, Call, ComponentKind, Config, Error, Level, Writer, WriterMetadata};
use serde::Deserialize;
use signal::AckFile;
use socket::Connection;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wait::{ms, Failure};

/// The plugin's table, `[plugins.filebuf]`: one `[[plugins.filebuf.writers]]` per application.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    writers: Vec<WriterSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterSettings {
    id: String,
    #[serde(default = "default_name")]
    name: String,
    volume: String,
    #[serde(default = "front_end")]
    level: Level,
    files: Vec<String>,
    socket: Option<PathBuf>,
    signal: Option<String>,
    thaw_signal: Option<String>,
    pid_file: Option<PathBuf>,
    ack_file: Option<PathBuf>,
    freeze_timeout_ms: Option<u64>,
    thaw_timeout_ms: Option<u64>,
}

fn default_name() -> String {
    "File-buffering application".into()
}

fn front_end() -> Level {
    Level::FrontEnd
}

/// How the writer reaches its application.
#[derive(Debug)]
enum Control {
    Socket(PathBuf),
    Signal {
        freeze: Signal,
        thaw: Signal,
        pid_file: PathBuf,
        ack: AckFile,
    },
}

/// The writer of one file-buffering application.
#[derive(Debug)]
pub struct FilebufWriter {
    id: String,
    name: String,
    volume: String,
    level: Level,
    files: Vec<String>,
    specs: Vec<FileSpec>,
    control: Control,
    freeze_timeout: Option<Duration>,
    thaw_timeout: Option<Duration>,
    /// Socket variant: the connection whose `FREEZE` holds the application. Dropping it releases
    /// the application, by protocol.
    connection: Option<Connection>,
    /// Signal variant: the process sent the freeze signal and not yet confirmed thawed.
    signalled: Option<Pid>,
}

fn parse_signal(writer: &str, key: &str, name: &str) -> Result<Signal, Error> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>().map_err(|_| {
        Error::invalid_config(format!(
            "writer {writer:?}: `{key}` = {name:?} is not a signal name: write e.g. \"USR1\" or \"SIGUSR2\""
        ))
    })
}

impl FilebufWriter {
    fn from_settings(s: WriterSettings) -> Result<FilebufWriter, Error> {
        let id = s.id;
        let invalid = |what: String| Error::invalid_config(format!("writer {id:?}: {what}"));
        if s.files.is_empty() {
            return Err(invalid(
                "`files` is empty: list the files (paths or glob patterns) the application writes, so they can be fsynced and reported".into(),
            ));
        }
        let specs = s
            .files
            .iter()
            .map(|f| FileSpec::parse(f).map_err(|e| invalid(format!("`files`: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let signal_keys = s.signal.is_some()
            || s.thaw_signal.is_some()
            || s.pid_file.is_some()
            || s.ack_file.is_some();
        let control = match (s.socket, signal_keys) {
            (Some(_), true) => {
                return Err(invalid(
                    "set either `socket`, or `signal` with `pid_file` and `ack_file` — not both"
                        .into(),
                ))
            }
            (Some(path), false) => {
                if !path.is_absolute() {
                    return Err(invalid(format!(
                        "`socket` = {:?} is not an absolute path",
                        path.display()
                    )));
                }
                Control::Socket(path)
            }
            (None, false) => {
                return Err(invalid(
                    "say how to reach the application: `socket`, or `signal` with `pid_file` and `ack_file`".into(),
                ))
            }
            (None, true) => {
                let (Some(signal), Some(pid_file), Some(ack_file)) =
                    (s.signal, s.pid_file, s.ack_file)
                else {
                    return Err(invalid(
                        "the signal variant needs `signal`, `pid_file` and `ack_file`".into(),
                    ));
                };
                let freeze = parse_signal(&id, "signal", &signal)?;
                let thaw = parse_signal(&id, "thaw_signal", s.thaw_signal.as_deref().unwrap_or("USR2"))?;
                if freeze == thaw {
                    return Err(invalid(format!(
                        "`signal` and `thaw_signal` are both {freeze}: they must differ"
                    )));
                }
                for (key, path) in [("pid_file", &pid_file), ("ack_file", &ack_file)] {
                    if !path.is_absolute() {
                        return Err(invalid(format!(
                            "`{key}` = {:?} is not an absolute path",
                            path.display()
                        )));
                    }
                }
                Control::Signal {
                    freeze,
                    thaw,
                    pid_file,
                    ack: AckFile::new(&ack_file),
                }
            }
        };
        for (key, value) in [
            ("freeze_timeout_ms", s.freeze_timeout_ms),
            ("thaw_timeout_ms", s.thaw_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(invalid(format!("`{key}` must be more than 0")));
            }
        }
        Ok(FilebufWriter {
            id,
            name: s.name,
            volume: s.volume,
            level: s.level,
            files: s.files,
            specs,
            control,
            freeze_timeout: s.freeze_timeout_ms.map(Duration::from_millis),
            thaw_timeout: s.thaw_timeout_ms.map(Duration::from_millis),
            connection: None,
            signalled: None,
        })
    }

    /// Where the application is reached, for messages.
    fn endpoint(&self) -> String {
        match &self.control {
            Control::Socket(path) => format!("control socket {}", path.display()),
            Control::Signal { pid_file, ack, .. } => format!(
                "process of {} (ack file {})",
                pid_file.display(),
                ack.path().display()
            ),
        }
    }

    /// Says why an exchange `request` with the application ended without an answer, and what
    /// happened to the application because of it.
    fn explain(&self, request: &str, failure: Failure, start: Instant, then: &str) -> Error {
        let endpoint = self.endpoint();
        let waited = ms(start, Instant::now());
        let what = match failure {
            Failure::Timeout => format!(
                "the application did not answer {request} on its {endpoint} within {waited} ms"
            ),
            Failure::Closed => format!(
                "the application closed its {endpoint} without answering {request}"
            ),
            Failure::Gone => format!("the application exited before answering {request} ({endpoint})"),
            Failure::Protocol(answer) => format!(
                "the application answered {request} on its {endpoint} with {answer:?}, which is not the filebuf protocol (see the plugin's README)"
            ),
            Failure::Io(e) => format!("{request} on the application's {endpoint}: {e}"),
        };
        Error::new(format!("{what}; {then}"))
    }

    /// Says why the control socket could not be connected to.
    fn connect_error(&self, failure: Failure, start: Instant) -> Error {
        let endpoint = self.endpoint();
        let why = match failure {
            Failure::Timeout => format!(
                "within {} ms: it accepts no connections (its backlog is full)",
                ms(start, Instant::now())
            ),
            Failure::Io(e) => e.to_string(),
            other => other.to_string(),
        };
        Error::new(format!(
            "cannot connect to the application's {endpoint}: {why}; check that the application runs and serves its control socket there"
        ))
    }

    /// Socket variant of freeze: returns the application's last record.
    fn freeze_socket(&mut self, set: &str, until: Instant) -> Result<String, Error> {
        let Control::Socket(path) = &self.control else {
            unreachable!("called for the socket variant only")
        };
        // A connection left from an earlier freeze is dropped: that releases its hold.
        self.connection = None;
        let start = Instant::now();
        let request = format!("FREEZE {set}");
        let released = "nothing is held (the connection is closed, which releases the application by protocol); check that it runs and speaks the filebuf protocol";
        let mut connection =
            Connection::connect(path, until).map_err(|f| self.connect_error(f, start))?;
        let answer = connection
            .request(&request, until)
            .map_err(|f| self.explain(&request, f, start, released))?;
        let words: Vec<&str> = answer.split_ascii_whitespace().collect();
        match words.as_slice() {
            ["FROZEN", last] => {
                self.connection = Some(connection);
                Ok(last.to_string())
            }
            ["ERROR", ..] => Err(Error::new(format!(
                "the application refused to freeze: {}; nothing is held",
                reason(&answer)
            ))),
            _ => Err(self.explain(&request, Failure::Protocol(answer), start, released)),
        }
    }

    /// Signal variant of freeze: returns the application's last record.
    fn freeze_signal(&mut self, set: &str, until: Instant) -> Result<String, Error> {
        let Control::Signal {
            freeze,
            pid_file,
            ack,
            ..
        } = &self.control
        else {
            unreachable!("called for the signal variant only")
        };
        let start = Instant::now();
        let pid = signal::read_pid(pid_file)
            .map_err(|e| Error::new(format!("{e}; nothing was signalled")))?;
        ack.request(&format!("FREEZE {set}")).map_err(|e| {
            Error::new(format!(
                "cannot write the request to the ack file {}: {e}; nothing was signalled",
                ack.path().display()
            ))
        })?;
        let watch = ack.watch().map_err(|f| {
            Error::new(format!(
                "cannot watch the directory of the ack file {}: {f}; nothing was signalled",
                ack.path().display()
            ))
        })?;
        match signal::send(pid, *freeze) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::new(format!(
                "process {pid} named by {} exited before it could be signalled; nothing is held",
                pid_file.display()
            )))
            }
            Err(e) => return Err(Error::new(format!("{e}; nothing is held"))),
        }
        self.signalled = Some(pid);
        let request = format!("FREEZE {set} ({freeze} to process {pid})");
        let answer = ack.wait(&watch, pid, until, |line| {
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            match words.as_slice() {
                ["FROZEN", s, last] if *s == set => Some(Ok(last.to_string())),
                ["ERROR", s, ..] if *s == set => Some(Err(reason_after(line, 2))),
                _ => None,
            }
        });
        match answer {
            Ok(Ok(last)) => Ok(last),
            Ok(Err(why)) => {
                self.release_now(set);
                Err(Error::new(format!(
                    "the application refused to freeze: {why}; it was sent the thaw signal"
                )))
            }
            Err(failure) => {
                let error = self.explain(&request, failure, start, "it was sent the thaw signal");
                self.release_now(set);
                Err(error)
            }
        }
    }

    /// Releases the application at once, without waiting for its answer (a freeze that failed).
    fn release_now(&mut self, set: &str) {
        match &self.control {
            Control::Socket(_) => self.connection = None,
            Control::Signal { thaw, ack, .. } => {
                if let Some(pid) = self.signalled {
                    // Even if the request cannot be written, the signal alone thaws.
                    let _ = ack.request(&format!("THAW {set}"));
                    if let Err(e) = signal::send(pid, *thaw) {
                        log::warn!("{}: {e}", self.id);
                    }
                }
            }
        }
    }

    fn thaw_socket(&mut self, set: &str, until: Instant) -> Result<(), Error> {
        // Nothing held: thaw is idempotent.
        let Some(mut connection) = self.connection.take() else {
            return Ok(());
        };
        let start = Instant::now();
        let request = format!("THAW {set}");
        let closed = "the connection is closed, which releases the application by protocol; check the application";
        match connection.request(&request, until) {
            Ok(answer) if answer.split_ascii_whitespace().next() == Some("THAWED") => Ok(()),
            Ok(answer) if answer.starts_with("ERROR") => Err(Error::new(format!(
                "the application answered THAW with an error: {}; {closed}",
                reason(&answer)
            ))),
            Ok(answer) => Err(self.explain(&request, Failure::Protocol(answer), start, closed)),
            Err(Failure::Closed) => {
                // It went away: with the connection, its hold is gone too.
                log::warn!(
                    "{}: the application closed its {} before THAW; it released its hold then",
                    self.id,
                    self.endpoint()
                );
                Ok(())
            }
            Err(failure) => Err(self.explain(&request, failure, start, closed)),
        }
    }

    fn thaw_signal(&mut self, set: &str, until: Instant) -> Result<(), Error> {
        let Control::Signal { thaw, ack, .. } = &self.control else {
            unreachable!("called for the signal variant only")
        };
        // Nothing signalled: thaw is idempotent.
        let Some(pid) = self.signalled else {
            return Ok(());
        };
        let start = Instant::now();
        if let Err(e) = ack.request(&format!("THAW {set}")) {
            log::warn!(
                "{}: cannot write the THAW request to {}: {e}; signalling anyway",
                self.id,
                ack.path().display()
            );
        }
        // Made before the signal, so that no answer is missed; a failure to make it must not
        // keep the signal from going out.
        let watch = ack.watch();
        match signal::send(pid, *thaw) {
            Ok(true) => {}
            Ok(false) => {
                self.signalled = None;
                log::warn!("{}: process {pid} is gone; nothing is held", self.id);
                return Ok(());
            }
            Err(e) => return Err(Error::new(e)),
        }
        let watch = watch.map_err(|f| {
            Error::new(format!(
                "{thaw} was sent to process {pid}, but its answer cannot be awaited: cannot watch the directory of the ack file {}: {f}",
                ack.path().display()
            ))
        })?;
        let request = format!("THAW {set} ({thaw} to process {pid})");
        let answer = ack.wait(&watch, pid, until, |line| {
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            matches!(words.as_slice(), ["THAWED", s] if *s == set).then_some(())
        });
        match answer {
            Ok(()) => {
                self.signalled = None;
                Ok(())
            }
            Err(Failure::Gone) => {
                self.signalled = None;
                log::warn!("{}: process {pid} exited before answering THAW; nothing is held", self.id);
                Ok(())
            }
            Err(failure) => Err(self.explain(
                &request,
                failure,
                start,
                "the next thaw or abort signals it again; the application's own hold limit releases it in any case",
            )),
        }
    }
}

/// What follows `ERROR ` in an answer.
fn reason(answer: &str) -> String {
    reason_after(answer, 1)
}

/// The text after the first `words` words of `line`.
fn reason_after(line: &str, words: usize) -> String {
    let mut rest = line.trim_start();
    for _ in 0..words {
        rest = rest
            .split_once(char::is_whitespace)
            .map_or("", |(_, r)| r)
            .trim_start();
    }
    if rest.is_empty() {
        "(no reason given)".into()
    } else {
        rest.to_string()
    }
}

/// A set id as it goes on the wire: one word.
fn wire_id(set: &str) -> String {
    set.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl Writer for FilebufWriter {
    fn metadata(&self) -> WriterMetadata {
        let mut metadata = WriterMetadata::new(&self.id, &self.name, self.level).with_component(
            "files",
            ComponentKind::Files,
            &self.volume,
            &self.files,
        );
        metadata.instance = match &self.control {
            Control::Socket(path) => path.display().to_string(),
            Control::Signal { pid_file, .. } => pid_file.display().to_string(),
        };
        metadata.vendor_version = format!("quiesce-writer-filebuf {}", env!("CARGO_PKG_VERSION"));
        metadata.expected_freeze_ms = 100;
        metadata
    }

    /// Checks, before anything is frozen, that the application can be reached and that its
    /// files are there.
    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        let until = wait::until(call, None);
        match &self.control {
            Control::Socket(path) => {
                let start = Instant::now();
                // Connect and close at once: a connection that sent nothing holds nothing.
                Connection::connect(path, until).map_err(|f| self.connect_error(f, start))?;
            }
            Control::Signal { pid_file, .. } => {
                signal::read_pid(pid_file).map_err(Error::new)?;
            }
        }
        // Slow work belongs here, not in the window: fsync what the application wrote so far,
        // so that little is left for the snapshot to flush.
        let synced = files::resolve(&self.specs)
            .and_then(|files| files::sync(&files))
            .map_err(Error::new)?;
        call.report("files_synced", synced.to_string());
        Ok(())
    }

    fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
        let set = wire_id(call.set_id());
        let until = wait::until(call, self.freeze_timeout);
        let start = Instant::now();
        let last = match self.control {
            Control::Socket(_) => self.freeze_socket(&set, until)?,
            Control::Signal { .. } => self.freeze_signal(&set, until)?,
        };
        let acked = start.elapsed();
        // Acknowledged: the application has flushed and holds its writes. No fsync here: it
        // would only lengthen the window, because every provider captures what is written to
        // the file system (a btrfs snapshot flushes the subvolume's dirty data itself; LVM and
        // fsfreeze freeze the file system, which syncs it). The files were fsynced at prepare.
        log::info!("{}: frozen for {set}: last record {last}", self.id);
        call.report("last_record", last);
        call.report("ack_ms", acked.as_millis().to_string());
        Ok(())
    }

    fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
        let set = wire_id(call.set_id());
        let until = wait::until(call, self.thaw_timeout);
        match self.control {
            Control::Socket(_) => self.thaw_socket(&set, until),
            Control::Signal { .. } => self.thaw_signal(&set, until),
        }
    }
}

/// Makes one writer per `[[plugins.filebuf.writers]]`.
pub fn init(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
    let settings: Settings = config.deserialize()?;
    if settings.writers.is_empty() {
        log::warn!("no [[plugins.filebuf.writers]] configured: this plugin offers no writer");
    }
    let mut writers: Vec<Box<dyn Writer>> = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for w in settings.writers {
        if !ids.insert(w.id.clone()) {
            return Err(Error::invalid_config(format!(
                "two writers have the id {:?}: ids must be unique",
                w.id
            )));
        }
        writers.push(Box::new(FilebufWriter::from_settings(w)?));
    }
    Ok(writers)
}

quiesce_sdk::export_plugin!(name: "filebuf", init: init);

#[cfg(test)]
mod tests {
    use super::*;

    fn init_text(text: &str) -> Result<Vec<Box<dyn Writer>>, Error> {
        init(&Config::from_toml(text).unwrap())
    }

    fn refused(text: &str) -> String {
        match init_text(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => {
                assert!(e.is_invalid_config(), "{e}");
                e.message().to_string()
            }
        }
    }

    #[test]
    fn both_variants_parse_and_report_their_files_as_a_component() {
        let writers = init_text(
            r#"
            [[writers]]
            id = "app"
            volume = "shared"
            files = ["/data/records.log", "/data/*.idx"]
            socket = "/run/app.sock"
            [[writers]]
            id = "legacy"
            volume = "shared"
            files = ["/data/legacy.log"]
            signal = "SIGUSR1"
            pid_file = "/run/legacy.pid"
            ack_file = "/run/legacy.ack"
            freeze_timeout_ms = 2000
            "#,
        )
        .unwrap();
        let m = writers[0].metadata();
        assert_eq!(m.id, "app");
        assert_eq!(m.level, Level::FrontEnd);
        assert_eq!(m.components[0].kind, ComponentKind::Files);
        assert_eq!(m.components[0].volume, "shared");
        assert_eq!(m.components[0].paths, ["/data/records.log", "/data/*.idx"]);
        assert_eq!(m.instance, "/run/app.sock");
        m.validate().unwrap();
        assert_eq!(writers[1].metadata().instance, "/run/legacy.pid");
    }

    #[test]
    fn bad_configurations_are_refused_naming_the_writer_and_key() {
        let base = "[[writers]]\nid = \"w\"\nvolume = \"v\"\n";
        let e = refused(&format!("{base}files = []\nsocket = \"/s\""));
        assert!(
            e.contains("writer \"w\"") && e.contains("`files` is empty"),
            "{e}"
        );
        let e = refused(&format!("{base}files = [\"rel.log\"]\nsocket = \"/s\""));
        assert!(e.contains("not an absolute path"), "{e}");
        let e = refused(&format!("{base}files = [\"/f\"]"));
        assert!(e.contains("`socket`, or `signal`"), "{e}");
        let e = refused(&format!(
            "{base}files = [\"/f\"]\nsocket = \"/s\"\nsignal = \"USR1\""
        ));
        assert!(e.contains("not both"), "{e}");
        let e = refused(&format!(
            "{base}files = [\"/f\"]\nsignal = \"USR1\"\npid_file = \"/p\""
        ));
        assert!(
            e.contains("needs `signal`, `pid_file` and `ack_file`"),
            "{e}"
        );
        let e = refused(&format!(
            "{base}files = [\"/f\"]\nsignal = \"USR9\"\npid_file = \"/p\"\nack_file = \"/a\""
        ));
        assert!(
            e.contains("`signal` = \"USR9\" is not a signal name"),
            "{e}"
        );
        let e = refused(&format!(
            "{base}files = [\"/f\"]\nsignal = \"USR2\"\npid_file = \"/p\"\nack_file = \"/a\""
        ));
        assert!(e.contains("must differ"), "{e}");
        let e = refused(&format!(
            "{base}files = [\"/f\"]\nsocket = \"/s\"\nsokcet = 1"
        ));
        assert!(e.contains("unknown field `sokcet`"), "{e}");
    }

    #[test]
    fn an_application_that_is_not_there_fails_prepare_before_anything_is_frozen() {
        use quiesce_sdk::harness::{Phase, Plugin};
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().display();
        std::fs::write(tmp.path().join("f.log"), "").unwrap();
        // Above Linux's largest pid (2^22): no such process.
        std::fs::write(tmp.path().join("app.pid"), "99999999\n").unwrap();
        let config = format!(
            "[[writers]]\nid = \"gone\"\nvolume = \"v\"\nfiles = [\"{d}/f.log\"]\n\
             socket = \"{d}/none.sock\"\n\
             [[writers]]\nid = \"dead\"\nvolume = \"v\"\nfiles = [\"{d}/f.log\"]\n\
             signal = \"USR1\"\npid_file = \"{d}/app.pid\"\nack_file = \"{d}/app.ack\"\n"
        );
        let mut writers = Plugin::new("filebuf", init).init(&config).unwrap();
        for (writer, expected) in [
            (0, "cannot connect to the application's control socket"),
            (1, "is not running"),
        ] {
            let run = writers[writer].run(|_| Ok(()));
            let (step, error) = run.error().expect("the set fails");
            assert_eq!(step, Phase::Prepare, "{run:#?}");
            assert!(error.reason.contains(expected), "{}", error.reason);
            assert!(!run.steps().contains(&Phase::Freeze));
        }
    }

    #[test]
    fn reasons_and_wire_ids() {
        assert_eq!(reason("ERROR disk full"), "disk full");
        assert_eq!(reason("ERROR"), "(no reason given)");
        assert_eq!(
            reason_after("ERROR set-1 cannot  flush", 2),
            "cannot  flush"
        );
        assert_eq!(wire_id("set a\nb"), "set_a_b");
    }
}
