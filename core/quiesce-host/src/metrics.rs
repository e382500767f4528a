//! The host's metrics, served at `--metrics-listen` (`quiesce_daemon::metrics`).
//!
//! The freeze window is sacred: what a writer's thread records between a freeze and a thaw is
//! a few relaxed atomic additions ([`AtomicHistogram::observe`], a counter), never a lock, an
//! allocation or a log line. The per-writer entries are made when a writer's thread starts,
//! and writers by state are read from the writers' published status at each scrape.
//!
//! One set of metrics per process (as one endpoint serves the process): the entries are kept
//! by writer id, and kept after a writer goes, so that its counters never go down (an app
//! writer that registers again under its id goes on counting where it left off).

use crate::host::Host;
use crate::worker::State;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use quiesce_daemon::metrics::AtomicHistogram;
use quiesce_proto::CallKind;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

/// One writer's calls and watchdog thaws.
#[derive(Debug, Default)]
pub struct WriterMetrics {
    /// By `CallKind::ALL`'s order.
    calls: [AtomicHistogram; CallKind::ALL.len()],
    watchdog_thaws: AtomicU64,
}

impl WriterMetrics {
    /// A call of the writer's backend returned after `took` (atomic additions only).
    pub fn call(&self, kind: CallKind, took: Duration) {
        if let Some(i) = CallKind::ALL.iter().position(|k| *k == kind) {
            self.calls[i].observe(took);
        }
    }

    /// The hold-limit watchdog thawed the writer.
    pub fn watchdog_thaw(&self) {
        self.watchdog_thaws.fetch_add(1, Ordering::Relaxed);
    }
}

static WRITERS: LazyLock<Mutex<BTreeMap<String, Arc<WriterMetrics>>>> =
    LazyLock::new(Default::default);
static LEASE_LAPSES: AtomicU64 = AtomicU64::new(0);

/// The metrics of writer `id` (made on first use: when its thread starts).
pub fn writer(id: &str) -> Arc<WriterMetrics> {
    let mut writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    writers.entry(id.to_string()).or_default().clone()
}

/// A lease of the broker's lapsed on this node (it aborted the set's writers itself).
pub fn lease_lapsed() {
    LEASE_LAPSES.fetch_add(1, Ordering::Relaxed);
}

/// How many leases lapsed on this node since the process started.
pub fn lease_lapses() -> u64 {
    LEASE_LAPSES.load(Ordering::Relaxed)
}

/// Puts the host's metrics into `registry`.
pub fn register(registry: &mut Registry, host: &Arc<Host>) {
    registry.register_collector(Box::new(Collector(Arc::downgrade(host))));
}

#[derive(Debug)]
struct Collector(Weak<Host>);

const STATES: [State; 5] = [
    State::Idle,
    State::Prepared,
    State::Frozen,
    State::Thawed,
    State::Failed,
];

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let writers: Vec<(String, Arc<WriterMetrics>)> = WRITERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "quiesce_writer_call_duration",
                "How long each call of a writer took on its thread, by writer and call.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (id, m) in &writers {
                for (kind, histogram) in CallKind::ALL.iter().zip(&m.calls) {
                    let labels = [("writer", id.as_str()), ("call", kind.as_str())];
                    histogram.encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "quiesce_watchdog_thaws",
                "Writers thawed by the host's hold-limit watchdog, no caller involved.",
                None,
                MetricType::Counter,
            )?;
            for (id, m) in &writers {
                let n = ConstCounter::new(m.watchdog_thaws.load(Ordering::Relaxed));
                n.encode(family.encode_family(&[("writer", id.as_str())])?)?;
            }
        }
        let lapses = ConstCounter::new(lease_lapses());
        lapses.encode(encoder.encode_descriptor(
            "quiesce_lease_lapses",
            "Broker leases that lapsed on this node (it aborted the set's writers itself).",
            None,
            MetricType::Counter,
        )?)?;
        let Some(host) = self.0.upgrade() else {
            return Ok(());
        };
        let mut by_state = [0i64; STATES.len()];
        for w in host.writers() {
            let state = w.status().state;
            if let Some(i) = STATES.iter().position(|s| *s == state) {
                by_state[i] += 1;
            }
        }
        let mut family = encoder.encode_descriptor(
            "quiesce_writers",
            "The host's writers now, by state (as the Writer1 State property says).",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in STATES.iter().zip(by_state) {
            ConstGauge::new(n).encode(family.encode_family(&[("state", state.as_str())])?)?;
        }
        Ok(())
    }
}
