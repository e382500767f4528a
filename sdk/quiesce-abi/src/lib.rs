//! The stable ABI between `quiesce-host` and writer plugins.
//!
//! Architecture Invariant: this is the only crate that knows the C ABI. The host loads plugins
//! through it; plugin authors never see it (they use `quiesce-sdk`, whose export macro fills it in).
//!
//! The root module is checked by abi_stable when a plugin is loaded: first the abi_stable version,
//! then this crate's version (`0.x` must match exactly in `x`), then the layout of every type
//! reachable from [`PluginModule`]. A mismatch is reported naming what to rebuild.
//!
//! Writer metadata crosses as JSON in the documented form of `quiesce_proto::WriterMetadata`
//! (`core/quiesce-proto/JSON.md`), so the metadata model can grow without an ABI break.

// `#[sabi_trait]` expands to impls inside a const block; that is abi_stable's design, not ours.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RStr, RString, RVec, Tuple2},
    StableAbi,
};

/// What every call to a writer is given.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct CallContext {
    /// The snapshot set this call belongs to.
    pub set_id: RString,
    /// How long the call may take, in milliseconds; past it the host abandons the call.
    pub budget_ms: u64,
    /// For post-snapshot: the path of the still-writable snapshot.
    pub snapshot_path: ROption<RString>,
    /// For complete: the outcome label (`app-consistent`, `crash-consistent`, `failed`).
    pub outcome: ROption<RString>,
}

/// How a writer call failed.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The writer reported an error.
    Failed = 0,
    /// The writer panicked; the SDK caught the panic at the boundary.
    Panicked = 1,
    /// The plugin's configuration was refused.
    InvalidConfig = 2,
}

#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct AbiError {
    pub kind: ErrorKind,
    pub message: RString,
}

/// Key/value results of a call (for example the WAL position a PostgreSQL freeze recorded).
pub type AbiReports = RVec<Tuple2<RString, RString>>;

pub type CallResult = RResult<AbiReports, AbiError>;

/// One writer inside a plugin, as an ABI-stable trait object.
///
/// Calls are synchronous; the host makes them from a thread of the writer's own and never
/// concurrently on one writer. Implementations must not let a panic unwind out of a method
/// (the SDK guarantees this).
#[sabi_trait]
pub trait AbiWriter: Send {
    /// The writer's metadata as JSON (see the crate docs).
    fn metadata_json(&self) -> RString;
    fn prepare(&mut self, ctx: &CallContext) -> CallResult;
    fn freeze(&mut self, ctx: &CallContext) -> CallResult;
    fn thaw(&mut self, ctx: &CallContext) -> CallResult;
    fn post_snapshot(&mut self, ctx: &CallContext) -> CallResult;
    fn abort(&mut self, ctx: &CallContext) -> CallResult;
    /// ABI evolution: new methods go after this one, and only there; an older plugin's vtable
    /// lacks them, so the host must check for them before calling.
    #[sabi(last_prefix_field)]
    fn complete(&mut self, ctx: &CallContext) -> CallResult;
}

/// An owned writer object handed from a plugin to the host.
pub type WriterBox = AbiWriter_TO<'static, RBox<()>>;

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// What the host offers a plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HostServices {
    /// Plugin log records reach the host's `tracing` through this callback.
    pub log: extern "C" fn(level: LogLevel, target: RStr<'_>, message: RStr<'_>),
}

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin's name, for messages (`postgres`, `hello`).
    pub name: RStr<'static>,
    /// The version of the plugin itself.
    pub version: RStr<'static>,
    /// The version of `quiesce-sdk` the plugin was built with, for messages.
    pub sdk_version: RStr<'static>,
    /// Creates the plugin's writers from its configuration table (TOML text), sending its log
    /// records to `host.log` from then on. May be called more than once.
    ///
    /// ABI evolution: new fields go after this one, and only there, each with a
    /// `missing_field` default for plugins built before it existed.
    #[sabi(last_prefix_field)]
    pub init: extern "C" fn(
        config_toml: RStr<'_>,
        host: HostServices,
    ) -> RResult<RVec<WriterBox>, AbiError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "quiesce_plugin";
    const NAME: &'static str = "quiesce writer plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The version of this ABI crate; a plugin must have been built against a compatible one.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");
