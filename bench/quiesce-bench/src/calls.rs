//! Item 5, the per-call overhead of a writer: in memory (the host's worker thread alone), a
//! plugin through the stable ABI, and an application writer over D-Bus.
//!
//! Each is called with `thaw` (idempotent, and cheap in all three) one call at a time, through
//! the host's own `WriterHandle` — the path every set's calls take.

use crate::stats::Sample;
use quiesce_host::set_requests::SetRequests;
use quiesce_host::worker::{Backend, WriterHandle};
use quiesce_host::{Config, Host};
use quiesce_proto::{CallFailure, WriterCall};
use quiesce_proto::{Level, Reports, WriterMetadata};
use quiesce_testbed::{Bus, Child, Policy};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Nothing;

impl Backend for Nothing {
    fn call(
        &mut self,
        _call: &WriterCall,
        _set: &str,
        _budget: Duration,
    ) -> Result<Reports, CallFailure> {
        Ok(Reports::new())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CallsResult {
    pub in_memory: Sample,
    pub plugin_abi: Sample,
    pub app_dbus: Sample,
}

async fn time_calls(writer: &WriterHandle, calls: usize) -> anyhow::Result<Sample> {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        writer
            .call(WriterCall::Thaw, "bench-calls", Duration::from_secs(5))
            .await?;
        times.push(started.elapsed());
    }
    Ok(Sample::of(&times))
}

pub async fn measure(dir: &Path, bin: &Path, calls: usize) -> anyhow::Result<CallsResult> {
    let plugins = dir.join("call-plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(
        bin.join("libhello_writer.so"),
        plugins.join("libhello_writer.so"),
    )?;
    let config = Config::parse(
        &format!(
            "node = \"bench\"\nplugin_dir = {:?}\n[plugins.hello]\nvolume = \"bench\"\npath = \"/bench\"\n",
            plugins.display().to_string()
        ),
        Path::new("bench.toml"),
    )?;
    let host = Arc::new(Host::start(config));
    anyhow::ensure!(
        host.load_errors().is_empty(),
        "loading hello-writer: {:?}",
        host.load_errors()
    );
    let plugin = host.writer("hello").expect("hello-writer's writer");
    let memory = host
        .add_writer(
            WriterMetadata::new("memory", "in-memory writer", Level::BackEnd),
            "bench".into(),
            Box::new(Nothing),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let bus = Bus::start(Policy::Permissive);
    let _connection =
        quiesce_host::dbus::serve(host.clone(), Some(&bus.address), SetRequests::new(None)).await?;
    let mut command = Command::new(bin.join("app-writer"));
    command
        .args(["--bus", &bus.address, "--id", "app", "--volume", "bench"])
        .arg("--data")
        .arg(dir.join("app-data"))
        .stdout(Stdio::piped());
    let mut app = Child::spawn(command, dir.join("app-writer.log"));
    let mut line = String::new();
    BufReader::new(app.child.stdout.take().expect("piped")).read_line(&mut line)?;
    anyhow::ensure!(
        line.starts_with("registered"),
        "app-writer did not register: {line:?} {}",
        app.log()
    );
    let app_writer = host.writer("app").expect("the app writer registered");

    // Warm up each path once (connections, page faults), then measure.
    for w in [&memory, &plugin, &app_writer] {
        time_calls(w, 20).await?;
    }
    Ok(CallsResult {
        in_memory: time_calls(&memory, calls).await?,
        plugin_abi: time_calls(&plugin, calls).await?,
        app_dbus: time_calls(&app_writer, calls).await?,
    })
}
