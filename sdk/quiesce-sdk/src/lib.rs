//! Write quiesce writer plugins.
//!
//! A **writer** knows how to make one application flush its state and hold still (freeze) and how
//! to let it go again (thaw), so that a snapshot of the volume it lives on is consistent for it.
//! A **plugin** is a shared library (`.so`) holding one or more writers; the per-node daemon
//! `quiesce-host` loads every plugin in its plugin directory, hands each its table from the host
//! configuration (`[plugins.<name>]`), and calls the writers whenever a snapshot set runs on the
//! cluster.
//!
//! A plugin author sees std types, one trait ([`Writer`]), one macro ([`export_plugin!`]) and a
//! [`harness`] for tests. Depend on `quiesce-sdk` only (no abi_stable), build a `cdylib`, and copy
//! the `.so` into the host's plugin directory. The whole hello-world plugin
//! (`examples/hello-writer`):
//!
#![doc = concat!("```rust,no_run\n", include_str!("../../../examples/hello-writer/src/lib.rs"), "```")]
//!
//! with, in its `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # rlib: so that its tests can call `init` in-process
//!
//! [dependencies]
//! quiesce-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! # The calls, and their contract
//!
//! For each snapshot set the host calls, in this order: [`prepare`](Writer::prepare) (slow work:
//! a checkpoint), [`freeze`](Writer::freeze) (hold still; the snapshot is taken once every writer
//! on every node is frozen), [`thaw`](Writer::thaw), [`post_snapshot`](Writer::post_snapshot)
//! (only if the metadata says `needs_post_snapshot`: finish your part on the still-writable
//! snapshot), and [`complete`](Writer::complete) with the outcome. If the set fails before
//! post-snapshot, every writer that was prepared or frozen gets [`abort`](Writer::abort)
//! instead of the remaining calls, then `complete` with `failed`.
//!
//! - **Synchronous, one at a time.** Each writer has a dedicated thread in the host; its calls are
//!   made from there, never concurrently. Block as you need to; do not spawn work that outlives
//!   the call unless you own it.
//! - **Deadlines.** Every call has a budget; [`Call::deadline`] / [`Call::remaining`] say how
//!   much is left (counted from the moment the call entered the plugin). Use it as the timeout of
//!   whatever you wait for. A call that outlives its budget is **abandoned** by the host (the set
//!   fails) and, once it does return, the writer gets `abort`.
//! - **Abort releases everything** that prepare or freeze set up, whatever state the writer is
//!   in, and is **idempotent**; so is thaw. The default `abort` calls `thaw`. The host also thaws
//!   a writer on its own when a freeze lasts past its hold limit.
//! - **Panics are caught.** A panic in init, in any writer method, or in a writer's `Drop` is
//!   caught at the plugin boundary and reported to the host as an error (`<plugin> panicked in
//!   <call>: <message>`); it never unwinds into the host (which would abort the process). The
//!   writer is still called afterwards (abort), so it must cope with any half-done state. Plugins
//!   must be built with `panic = "unwind"` (the default) for this to work.
//! - **Errors** are [`Error`]s: say what failed and what to do; the host adds node, plugin and
//!   writer. Results of a successful call go to the host with [`Call::report`].
//! - **Logging**: use [`log`] (`quiesce_sdk::log::info!(...)`); records reach the host's log with
//!   the target `<plugin>:<module path>`. The host does the filtering.
//! - **Plugins cannot be unloaded.** Reloading a plugin means restarting the host.
//!
//! # Versions
//!
//! The host checks, when it loads a plugin, the abi_stable version, the version of the plugin
//! ABI, and the layout of every type that crosses it. On a mismatch it says *"rebuild the plugin
//! against quiesce-sdk &lt;version&gt;"*: set the `quiesce-sdk` dependency of the plugin to that
//! version, rebuild the `cdylib` (`cargo build --release`), replace the `.so` in the plugin
//! directory and restart the host. Nothing else has to change unless the SDK's changelog says so.
//!
//! # Testing a plugin
//!
//! [`harness`] drives a writer through whole sets in-process, through the same boundary code as
//! the exported plugin ([`harness::Plugin::new`] for your init, [`harness::Harness::new`] for one
//! writer), or loads the built `.so` the way the host does ([`harness::Plugin::load`]).

mod adapter;
mod call;
mod config;
mod error;
pub mod harness;
mod logger;

pub use call::Call;
pub use config::Config;
pub use error::Error;
/// The `log` facade: plugin code logs with `quiesce_sdk::log::info!(...)` and friends.
pub use log;
/// Running a program on a deadline, killed with its process group at its limit
/// (`quiesce-process`): what the host's providers use, for plugins that run programs.
pub use quiesce_process as process;
pub use quiesce_proto::{CallKind, Component, ComponentKind, Level, WriterMetadata};

use std::path::Path;

/// The version of quiesce-sdk, recorded in every plugin built with it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The signature of a plugin's init: from its configuration, the writers it offers.
///
/// It may be called more than once (each call makes fresh writers). Return
/// [`Error::invalid_config`] (or the error of [`Config::deserialize`]) to refuse the
/// configuration.
pub type InitFn = fn(&Config) -> Result<Vec<Box<dyn Writer>>, Error>;

/// An application adapter. See the [crate docs](crate) for the order of calls and the contract.
pub trait Writer: Send + 'static {
    /// What the writer is and which paths on which volumes it covers. Called when the plugin is
    /// initialised and whenever the host asks (it may change, e.g. a new tablespace).
    fn metadata(&self) -> WriterMetadata;

    /// Slow preparation before the freeze (a checkpoint, a flush). Nothing by default.
    fn prepare(&mut self, call: &mut Call) -> Result<(), Error> {
        let _ = call;
        Ok(())
    }

    /// Make the application hold still until [`thaw`](Writer::thaw) or
    /// [`abort`](Writer::abort); return once it is consistent on disk.
    fn freeze(&mut self, call: &mut Call) -> Result<(), Error>;

    /// Let the application go on. Must be idempotent.
    fn thaw(&mut self, call: &mut Call) -> Result<(), Error>;

    /// Finish the writer's part on the still-writable snapshot mounted at `snapshot` (write a
    /// label file, a backup label). Only called when the metadata says `needs_post_snapshot`.
    fn post_snapshot(&mut self, call: &mut Call, snapshot: &Path) -> Result<(), Error> {
        let _ = (call, snapshot);
        Ok(())
    }

    /// The set failed: release whatever prepare and freeze set up, whatever state the writer is
    /// in. Must be idempotent. By default: [`thaw`](Writer::thaw).
    fn abort(&mut self, call: &mut Call) -> Result<(), Error> {
        self.thaw(call)
    }

    /// The set is over, with `outcome` `app-consistent`, `crash-consistent` or `failed`.
    /// Nothing by default.
    fn complete(&mut self, call: &mut Call, outcome: &str) -> Result<(), Error> {
        let _ = (call, outcome);
        Ok(())
    }
}

/// Exports the plugin: `quiesce_sdk::export_plugin!(name: "hello", init: init);`
///
/// `name` (a `&'static str`) is how the host and its configuration (`[plugins.<name>]`) call the
/// plugin; `init` is an [`InitFn`]. The plugin's version is its crate's `CARGO_PKG_VERSION`.
/// Use it once, in a `cdylib` crate.
///
/// It generates what abi_stable's `#[export_root_module]` generates (the exported
/// `LibHeader` static the host looks up), but through paths into this crate, so that the plugin
/// crate needs no abi_stable dependency of its own. Every call from the host into the plugin
/// runs under `catch_unwind`.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, init: $init:expr $(,)?) => {
        // An anonymous const: nothing is added to the plugin crate's namespace.
        const _: () = {
            struct __QuiescePlugin;

            impl $crate::__private::Export for __QuiescePlugin {
                const NAME: &'static str = $name;
                const VERSION: &'static str = ::core::env!("CARGO_PKG_VERSION");
                const INIT: $crate::InitFn = $init;
            }

            #[export_name = $crate::__lib_header_symbol!()]
            pub static __QUIESCE_LIB_HEADER: $crate::__private::LibHeader =
                $crate::__private::lib_header::<__QuiescePlugin>();
        };
    };
}

/// The symbol under which abi_stable 0.11 looks up a library's `LibHeader`
/// (`abi_stable::library::ROOT_MODULE_LOADER_NAME`).
///
/// `#[export_name]` needs a literal, not a constant, hence a macro; a test checks it against
/// abi_stable's constant so that an abi_stable upgrade that changes it cannot go unnoticed.
#[doc(hidden)]
#[macro_export]
macro_rules! __lib_header_symbol {
    () => {
        "_1as_0lib_1header_0root_bmodule_bloader"
    };
}

/// What the export macro expands to. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::adapter::{init_plugin, InitResult};
    pub use abi_stable;
    pub use abi_stable::library::LibHeader;
    pub use quiesce_abi;

    use abi_stable::library::{CheckTypeLayout, RootModuleResult};
    use abi_stable::prefix_type::PrefixTypeTrait;
    use abi_stable::std_types::RStr;
    use quiesce_abi::{HostServices, PluginModule, PluginModuleRef};

    /// The plugin, as `export_plugin!` describes it. A trait rather than function arguments
    /// because `extern "C"` functions cannot capture: they are instantiated per plugin instead.
    pub trait Export: 'static {
        const NAME: &'static str;
        const VERSION: &'static str;
        const INIT: crate::InitFn;
    }

    extern "C" fn init<P: Export>(config_toml: RStr<'_>, host: HostServices) -> InitResult {
        init_plugin(P::NAME, config_toml, host, P::INIT)
    }

    fn root_module<P: Export>() -> PluginModuleRef {
        PluginModule {
            name: RStr::from_str(P::NAME),
            version: RStr::from_str(P::VERSION),
            sdk_version: RStr::from_str(crate::SDK_VERSION),
            init: init::<P>,
        }
        .leak_into_prefix()
    }

    // What `#[export_root_module]` generates around the root-module function: abi_stable's
    // loader wrapper, which also catches a panic of `root_module` (there is none to catch).
    extern "C" fn load_root_module<P: Export>() -> RootModuleResult {
        abi_stable::library::__call_root_module_loader(root_module::<P>)
    }

    /// The exported header: abi_stable's version, the root module's version strings and type
    /// layout (checked by the host before anything runs), and the loader.
    pub const fn lib_header<P: Export>() -> LibHeader {
        // SAFETY: `from_constructor` requires that the constructor's `PrefixRef<ErasedPrefix>`
        // was transmuted from a `PrefixRef<M>` for the `M` given here; `load_root_module`
        // returns exactly the `PluginModuleRef` of `root_module`, erased by
        // `__call_root_module_loader`, as `#[export_root_module]` does.
        unsafe {
            LibHeader::from_constructor::<PluginModuleRef>(
                load_root_module::<P>,
                CheckTypeLayout::Yes,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_exported_symbol_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            crate::__lib_header_symbol!(),
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
