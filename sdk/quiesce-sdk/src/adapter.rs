//! The bridge from a [`Writer`] to the ABI: std types to abi_stable types, errors to `AbiError`,
//! and every panic caught before it reaches an `extern "C"` frame (where it would abort the host).
//!
//! Both the exported plugin and the harness go through this module, so what a test sees is what
//! the host gets.

use crate::{Call, Config, Error, InitFn, Writer};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString, RVec, Tuple2};
use quiesce_abi::{
    AbiError, AbiReports, AbiWriter, AbiWriter_TO, CallContext, CallResult, ErrorKind,
    HostServices, WriterBox,
};
use quiesce_proto::{CallKind, WriterMetadata};
use std::any::Any;
use std::backtrace::{Backtrace, BacktraceStatus};
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

/// What the exported `init` returns.
pub type InitResult = RResult<RVec<WriterBox>, AbiError>;

thread_local! {
    /// How many [`catch`] frames are running on this thread: a panic inside one is reported by
    /// `catch`, not by the default hook.
    static CATCHING: Cell<usize> = const { Cell::new(0) };
    /// What the hook saw of the last caught panic on this thread.
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

struct Caught {
    location: Option<String>,
    /// Captured only when `RUST_BACKTRACE` asks for it, and never resolved inside the call.
    backtrace: Backtrace,
}

/// Installs, once per plugin (each plugin has its own std and so its own hook), a panic hook
/// that keeps a caught panic cheap. The default hook prints the panic, and with
/// `RUST_BACKTRACE=1` resolves a backtrace's symbols from the plugin's debug information — which
/// took seconds inside the call, so that a writer panicking in freeze was reported as "no answer
/// within 400 ms" instead of as panicked. Inside [`catch`] this hook only notes where the panic
/// happened and captures the raw frames; `catch` hands them to a thread of their own, which
/// resolves and logs them after the call has returned. Panics outside `catch` go to the hook
/// that was there before.
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) == 0 {
                return previous(info);
            }
            let caught = Caught {
                location: info.location().map(|l| l.to_string()),
                backtrace: Backtrace::capture(),
            };
            CAUGHT.with(|c| *c.borrow_mut() = Some(caught));
        }));
    });
}

/// Runs `f`, turning a panic into `<plugin> panicked in <call>: <payload> (at <file:line>)`.
pub(crate) fn catch<R>(plugin: &str, call: &str, f: impl FnOnce() -> R) -> Result<R, AbiError> {
    install_panic_hook();
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| {
        let what = describe(payload);
        let caught = CAUGHT.with(|c| c.borrow_mut().take());
        let at = caught
            .as_ref()
            .and_then(|c| c.location.as_deref())
            .map(|l| format!(" (at {l})"))
            .unwrap_or_default();
        let message = format!("{plugin} panicked in {call}: {what}{at}");
        if let Some(caught) = caught.filter(|c| c.backtrace.status() == BacktraceStatus::Captured) {
            log_backtrace_later(message.clone(), caught.backtrace);
        }
        AbiError {
            kind: ErrorKind::Panicked,
            message: message.into(),
        }
    })
}

/// Resolves and logs a caught panic's backtrace on a thread of its own, off the call's clock.
fn log_backtrace_later(message: String, backtrace: Backtrace) {
    let logger = std::thread::Builder::new().name("quiesce-panic-backtrace".into());
    let shared = std::sync::Arc::new(message);
    let theirs = shared.clone();
    if logger
        .spawn(move || log::error!("{theirs}; backtrace:\n{backtrace}"))
        .is_err()
    {
        log::error!("{shared}; its backtrace is not logged: no thread could be started for it");
    }
}

fn describe(payload: Box<dyn Any + Send>) -> String {
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not text)".to_string()
    };
    // Dropping a payload runs its destructor, which could panic in turn; that second payload is
    // leaked rather than dropped, which ends the chain.
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
    text
}

pub(crate) fn to_abi(error: Error) -> AbiError {
    let kind = match error.kind() {
        crate::error::Kind::Failed => ErrorKind::Failed,
        crate::error::Kind::InvalidConfig => ErrorKind::InvalidConfig,
    };
    AbiError {
        kind,
        message: error.message().into(),
    }
}

fn metadata_json(metadata: &WriterMetadata) -> String {
    serde_json::to_string(metadata)
        .expect("WriterMetadata serializes: plain fields, no maps with non-string keys")
}

/// One writer as the ABI sees it.
pub(crate) struct Adapter {
    plugin: String,
    /// `None` only while dropping: taken out so its destructor can run under `catch`.
    writer: Option<Box<dyn Writer>>,
    /// The metadata the writer gave when it was created, served if a later `metadata()` panics:
    /// `metadata_json` has no error channel, and the host must not be handed garbage.
    initial_metadata: String,
}

impl Adapter {
    pub(crate) fn new(plugin: &str, writer: Box<dyn Writer>) -> Result<Adapter, AbiError> {
        let metadata = catch(plugin, "metadata", || writer.metadata())?;
        Ok(Adapter {
            plugin: plugin.to_string(),
            writer: Some(writer),
            initial_metadata: metadata_json(&metadata),
        })
    }

    pub(crate) fn into_writer_box(self) -> WriterBox {
        AbiWriter_TO::from_value(self, TD_Opaque)
    }

    fn call(
        &mut self,
        kind: CallKind,
        ctx: &CallContext,
        f: impl FnOnce(&mut dyn Writer, &mut Call) -> Result<(), Error>,
    ) -> CallResult {
        // The deadline counts from the moment the call enters the plugin.
        let mut call = Call::new(ctx.set_id.as_str(), Duration::from_millis(ctx.budget_ms));
        let writer = self
            .writer
            .as_deref_mut()
            .expect("the writer is only taken out when the adapter is dropped");
        match catch(&self.plugin, kind.as_str(), || f(writer, &mut call)) {
            Ok(Ok(())) => RResult::ROk(
                call.into_reports()
                    .into_iter()
                    .map(|(k, v)| Tuple2(RString::from(k), RString::from(v)))
                    .collect::<AbiReports>(),
            ),
            Ok(Err(error)) => RResult::RErr(to_abi(error)),
            Err(panicked) => RResult::RErr(panicked),
        }
    }

    fn host_bug(&self, call: &str, missing: &str) -> CallResult {
        RResult::RErr(AbiError {
            kind: ErrorKind::Failed,
            message: format!(
                "the host called {call} of plugin {} without {missing}; this is a bug in the \
                 host, not the plugin: report it to quiesce",
                self.plugin
            )
            .into(),
        })
    }
}

impl AbiWriter for Adapter {
    fn metadata_json(&self) -> RString {
        let writer = self
            .writer
            .as_deref()
            .expect("the writer is only taken out when the adapter is dropped");
        match catch(&self.plugin, "metadata", || writer.metadata()) {
            Ok(metadata) => metadata_json(&metadata).into(),
            Err(panicked) => {
                log::error!(
                    "{}; serving the metadata the writer gave when it was created",
                    panicked.message
                );
                self.initial_metadata.as_str().into()
            }
        }
    }

    fn prepare(&mut self, ctx: &CallContext) -> CallResult {
        self.call(CallKind::Prepare, ctx, |w, c| w.prepare(c))
    }

    fn freeze(&mut self, ctx: &CallContext) -> CallResult {
        self.call(CallKind::Freeze, ctx, |w, c| w.freeze(c))
    }

    fn thaw(&mut self, ctx: &CallContext) -> CallResult {
        self.call(CallKind::Thaw, ctx, |w, c| w.thaw(c))
    }

    fn post_snapshot(&mut self, ctx: &CallContext) -> CallResult {
        let Some(path) = ctx.snapshot_path.as_ref().into_option() else {
            return self.host_bug("post_snapshot", "a snapshot path");
        };
        let path = path.to_string();
        self.call(CallKind::PostSnapshot, ctx, |w, c| {
            w.post_snapshot(c, Path::new(&path))
        })
    }

    fn abort(&mut self, ctx: &CallContext) -> CallResult {
        self.call(CallKind::Abort, ctx, |w, c| w.abort(c))
    }

    fn complete(&mut self, ctx: &CallContext) -> CallResult {
        let Some(outcome) = ctx.outcome.as_ref().into_option() else {
            return self.host_bug("complete", "an outcome");
        };
        let outcome = outcome.to_string();
        self.call(CallKind::Complete, ctx, |w, c| w.complete(c, &outcome))
    }
}

impl Drop for Adapter {
    // The host drops writers through an `extern "C"` destructor: a panicking `Drop` of the
    // writer must be caught here too.
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            if let Err(panicked) = catch(&self.plugin, "drop", move || drop(writer)) {
                log::error!("{}", panicked.message);
            }
        }
    }
}

/// Creates the writers: parses the configuration, runs the author's init, wraps each writer.
fn init_writers(plugin: &str, config_toml: &str, init: InitFn) -> Result<Vec<WriterBox>, AbiError> {
    let config = Config::from_toml(config_toml).map_err(to_abi)?;
    let writers = catch(plugin, "init", || init(&config))?.map_err(to_abi)?;
    writers
        .into_iter()
        .map(|writer| Adapter::new(plugin, writer).map(Adapter::into_writer_box))
        .collect()
}

/// The body of the `init` the export macro generates (and of the harness's in-process init).
pub fn init_plugin(
    plugin: &'static str,
    config_toml: RStr<'_>,
    host: HostServices,
    init: InitFn,
) -> InitResult {
    // Everything, the SDK's own code included, runs under `catch`: this is called from an
    // `extern "C"` function.
    catch(plugin, "init", || {
        crate::logger::install(plugin, host);
        init_writers(plugin, config_toml.as_str(), init)
    })
    .and_then(|writers| writers)
    .map(RVec::from)
    .into()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use abi_stable::std_types::ROption;
    use quiesce_proto::Level;

    /// A caught panic's message: what and where, `<text> (at <file>:<line>:<column>)`.
    pub(crate) fn assert_panic_message(message: &str, text: &str, file: &str) {
        let at = message
            .strip_prefix(text)
            .and_then(|rest| rest.strip_prefix(" (at "))
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{message:?} is not {text:?} (at {file}:LINE:COLUMN)"));
        let (path, line_column) = at.split_once(':').expect("file:line:column");
        assert!(path.ends_with(file), "{message:?} names {path}, not {file}");
        let numbers: Vec<&str> = line_column.split(':').collect();
        assert!(
            numbers.len() == 2 && numbers.iter().all(|n| n.parse::<u32>().is_ok()),
            "{message:?}: no line and column"
        );
    }

    struct Scripted {
        panic_in: &'static str,
        metadata_panics: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Scripted {
        fn act(&self, call: &mut Call, name: &str) -> Result<(), Error> {
            if self.panic_in == name {
                panic!("told to panic in {name}");
            }
            call.report("seen", name);
            if name == "thaw" {
                return Err(Error::new("thaw refused"));
            }
            Ok(())
        }
    }

    impl Writer for Scripted {
        fn metadata(&self) -> WriterMetadata {
            if self
                .metadata_panics
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                panic!("metadata exploded");
            }
            WriterMetadata {
                id: "scripted".into(),
                name: "Scripted".into(),
                instance: String::new(),
                vendor_version: String::new(),
                level: Level::System,
                components: vec![],
                expected_freeze_ms: 0,
                needs_post_snapshot: true,
            }
        }
        fn freeze(&mut self, call: &mut Call) -> Result<(), Error> {
            self.act(call, "freeze")
        }
        fn thaw(&mut self, call: &mut Call) -> Result<(), Error> {
            self.act(call, "thaw")
        }
        fn post_snapshot(&mut self, call: &mut Call, snapshot: &Path) -> Result<(), Error> {
            call.report("path", snapshot.to_string_lossy());
            Ok(())
        }
        fn complete(&mut self, call: &mut Call, outcome: &str) -> Result<(), Error> {
            call.report("outcome", outcome);
            Ok(())
        }
    }

    impl Drop for Scripted {
        fn drop(&mut self) {
            if self.panic_in == "drop" {
                panic!("told to panic in drop");
            }
        }
    }

    fn boxed(panic_in: &'static str) -> (WriterBox, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = Scripted {
            panic_in,
            metadata_panics: flag.clone(),
        };
        let adapter = Adapter::new("scripted-plugin", Box::new(writer)).unwrap();
        (adapter.into_writer_box(), flag)
    }

    fn ctx() -> CallContext {
        CallContext {
            set_id: "set-7".into(),
            budget_ms: 1000,
            snapshot_path: ROption::RNone,
            outcome: ROption::RNone,
        }
    }

    #[test]
    fn results_reports_and_errors_cross_as_abi_types() {
        let (mut w, _) = boxed("");
        let reports = w.freeze(&ctx()).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].0.as_str(), "seen");
        assert_eq!(reports[0].1.as_str(), "freeze");
        // prepare is the trait's default.
        assert!(w.prepare(&ctx()).unwrap().is_empty());

        let error = w.thaw(&ctx()).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Failed);
        assert_eq!(error.message.as_str(), "thaw refused");

        // abort defaults to thaw.
        assert_eq!(
            w.abort(&ctx()).unwrap_err().message.as_str(),
            "thaw refused"
        );
    }

    #[test]
    fn a_panic_becomes_a_panicked_error_naming_plugin_call_and_payload() {
        let (mut w, _) = boxed("freeze");
        let error = w.freeze(&ctx()).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Panicked);
        assert_panic_message(
            error.message.as_str(),
            "scripted-plugin panicked in freeze: told to panic in freeze",
            "src/adapter.rs",
        );
        // The writer stays usable: the host goes on to abort it.
        assert_eq!(
            w.abort(&ctx()).unwrap_err().message.as_str(),
            "thaw refused"
        );
    }

    #[test]
    fn non_text_panic_payloads_are_described() {
        let error = catch("p", "freeze", || std::panic::panic_any(42_u32)).unwrap_err();
        assert_panic_message(
            error.message.as_str(),
            "p panicked in freeze: (a panic payload that is not text)",
            "src/adapter.rs",
        );
    }

    #[test]
    fn post_snapshot_and_complete_get_their_arguments_or_a_host_bug_error() {
        let (mut w, _) = boxed("");
        let error = w.post_snapshot(&ctx()).unwrap_err();
        assert!(
            error.message.as_str().contains("bug in the host"),
            "{error:?}"
        );

        let mut c = ctx();
        c.snapshot_path = ROption::RSome("/snap/1".into());
        c.outcome = ROption::RSome("app-consistent".into());
        assert_eq!(w.post_snapshot(&c).unwrap()[0].1.as_str(), "/snap/1");
        assert_eq!(w.complete(&c).unwrap()[0].1.as_str(), "app-consistent");
    }

    #[test]
    fn metadata_falls_back_to_the_initial_one_when_it_panics_later() {
        let (w, flag) = boxed("");
        let first = w.metadata_json();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(w.metadata_json(), first);
        let parsed: WriterMetadata = serde_json::from_str(first.as_str()).unwrap();
        assert_eq!(parsed.id, "scripted");
    }

    #[test]
    fn a_panicking_drop_does_not_unwind_out_of_the_writer_box() {
        let (w, _) = boxed("drop");
        drop(w);
    }

    extern "C" fn ignore_log(_: quiesce_abi::LogLevel, _: RStr<'_>, _: RStr<'_>) {}

    fn host() -> HostServices {
        HostServices { log: ignore_log }
    }

    #[test]
    fn init_maps_config_errors_failures_and_panics() {
        fn needs_port(config: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
            #[derive(serde::Deserialize)]
            #[allow(dead_code)] // only parsed
            struct Settings {
                port: u16,
            }
            config.deserialize::<Settings>()?;
            Err(Error::new("no database at that port"))
        }
        fn panics(_: &Config) -> Result<Vec<Box<dyn Writer>>, Error> {
            panic!("init exploded")
        }

        let not_toml = init_plugin("p", "port = ".into(), host(), needs_port)
            .into_result()
            .err()
            .expect("init must fail");
        assert_eq!(not_toml.kind, ErrorKind::InvalidConfig);
        let bad_key = init_plugin("p", "port = -1".into(), host(), needs_port)
            .into_result()
            .err()
            .expect("init must fail");
        assert_eq!(bad_key.kind, ErrorKind::InvalidConfig);
        assert!(bad_key.message.as_str().contains("`port`"), "{bad_key:?}");
        let failed = init_plugin("p", "port = 1".into(), host(), needs_port)
            .into_result()
            .err()
            .expect("init must fail");
        assert_eq!(failed.kind, ErrorKind::Failed);
        assert_eq!(failed.message.as_str(), "no database at that port");
        let panicked = init_plugin("p", "".into(), host(), panics)
            .into_result()
            .err()
            .expect("init must fail");
        assert_eq!(panicked.kind, ErrorKind::Panicked);
        assert_panic_message(
            panicked.message.as_str(),
            "p panicked in init: init exploded",
            "src/adapter.rs",
        );
    }
}
