//! Test support: building real plugins and reading what they recorded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub use quiesce_testbed::{
    binary, plugin, require, require_root, target_dir, workspace_root, Bus, Child, Policy,
};

/// A zbus connection to a private bus.
pub async fn connect(bus: &Bus) -> zbus::Connection {
    zbus::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .serve_at("/org/quiesce/Test", TestClient)
        .unwrap()
        .build()
        .await
        .expect("connecting to the private bus")
}

/// Served on every test connection so that `build()` starts zbus's object server and waits
/// until it dispatches. Started later by `Connection::object_server()`, its dispatcher is
/// spawned without a wait (zbus 5.19, `start_object_server`), and a method call arriving
/// before its match rule is in place goes unanswered: now and then a test application that
/// served its `AppWriter1` object that way and registered at once never answered the host's
/// read of its metadata.
struct TestClient;

#[zbus::interface(name = "org.quiesce.Test1")]
impl TestClient {
    fn ping(&self) {}
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// One alien build at a time: they share a target directory.
static BUILD: Mutex<()> = Mutex::new(());

fn run_build(mut command: Command, what: &str) {
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running cargo for {what}: {e}"));
    assert!(
        output.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Builds a plugin against a modified copy of quiesce-abi, outside the workspace, as a vendor
/// with another SDK release would: `version` replaces the ABI crate's version, `edit` changes its
/// source. Returns the shared library.
pub fn alien_plugin(name: &str, version: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let dir = target_dir().join("alien-plugins").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let abi = dir.join("quiesce-abi");
    std::fs::create_dir_all(abi.join("src")).unwrap();
    let abi_stable = read_workspace_dependency("abi_stable");
    std::fs::write(
        abi.join("Cargo.toml"),
        format!(
            "[package]\nname = \"quiesce-abi\"\nversion = \"{version}\"\nedition = \"2021\"\n\n\
             [dependencies]\nabi_stable = {{ version = \"{abi_stable}\", default-features = false }}\n"
        ),
    )
    .unwrap();
    let source =
        std::fs::read_to_string(workspace_root().join("sdk/quiesce-abi/src/lib.rs")).unwrap();
    std::fs::write(abi.join("src/lib.rs"), edit(source)).unwrap();

    let plugin = dir.join("plugin");
    std::fs::create_dir_all(plugin.join("src")).unwrap();
    std::fs::write(
        plugin.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"9.9.9\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[workspace]\n\n\
             [dependencies]\nquiesce-abi = {{ path = \"../quiesce-abi\" }}\n\
             abi_stable = {{ version = \"{abi_stable}\", default-features = false }}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        plugin.join("src/lib.rs"),
        r#"
use abi_stable::{export_root_module, prefix_type::PrefixTypeTrait, std_types::{RResult, RStr, RVec}};
use quiesce_abi::{AbiError, HostServices, PluginModule, PluginModuleRef, WriterBox};

#[export_root_module]
fn root() -> PluginModuleRef {
    PluginModule { name: RStr::from_str("alien"), version: RStr::from_str("9.9.9"),
                   sdk_version: RStr::from_str("?"), init }.leak_into_prefix()
}

extern "C" fn init(_config: RStr<'_>, _host: HostServices) -> RResult<RVec<WriterBox>, AbiError> {
    RResult::ROk(RVec::new())
}
"#,
    )
    .unwrap();
    // Same lock file as the workspace: same dependency versions, compiled artifacts reused.
    std::fs::copy(
        workspace_root().join("Cargo.lock"),
        plugin.join("Cargo.lock"),
    )
    .unwrap();
    let mut command = cargo();
    command
        .current_dir(&plugin)
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["build", "--quiet", "--offline"]);
    run_build(command, name);
    let lib = target_dir()
        .join("debug")
        .join(format!("lib{}.so", name.replace('-', "_")));
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

fn read_workspace_dependency(name: &str) -> String {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let table: toml::Table = toml::from_str(&manifest).unwrap();
    let dep = &table["workspace"]["dependencies"][name];
    dep.get("version")
        .and_then(|v| v.as_str())
        .or_else(|| dep.as_str())
        .expect("a versioned workspace dependency")
        .to_string()
}

/// Copies plugin libraries into a fresh plugin directory.
pub fn plugin_dir(into: &Path, libs: &[&Path]) -> PathBuf {
    let dir = into.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    for lib in libs {
        std::fs::copy(lib, dir.join(lib.file_name().unwrap())).unwrap();
    }
    dir
}

/// Lets a writer hanging on `fifo` (`hang_fifo`) go on; fails when none hangs on it.
pub fn release_fifo(fifo: &Path) {
    assert!(
        quiesce_testbed::release_fifo(fifo, std::time::Duration::from_secs(60)),
        "no writer was hanging on {}",
        fifo.display()
    );
}

/// The lines the test plugin wrote to its events file: `"<writer> <call>"`.
pub fn events(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The position of `line` in `events`, failing loudly when it is missing.
pub fn position(events: &[String], line: &str) -> usize {
    events
        .iter()
        .position(|e| e == line)
        .unwrap_or_else(|| panic!("no event {line:?} in {events:#?}"))
}

pub fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("running mkfifo");
    assert!(status.success(), "mkfifo {} failed", path.display());
}

/// Runs a command-line D-Bus client (busctl, dbus-send) as `uid` (None: as this process),
/// returning (success, stdout, stderr).
pub fn client(uid: Option<u32>, program: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = match uid {
        Some(uid) => {
            require("setpriv", "util-linux");
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                program.into(),
            ]);
            c
        }
        None => Command::new(program),
    };
    let output = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
