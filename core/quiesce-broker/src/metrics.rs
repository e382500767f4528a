//! The broker's metrics, served at `--metrics-listen` (`quiesce_daemon::metrics`).
//!
//! Everything about a set is recorded once, from its record, when the set has ended: nothing
//! here runs while writers are frozen. Live nodes are read from the registry at each scrape.

use crate::broker::Broker;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use quiesce_daemon::metrics::DURATION_BUCKETS;
use quiesce_proto::{OutcomeKind, Phase, SetRecord};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabels {
    volume: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn durations() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}

/// What the broker counts.
#[derive(Debug)]
pub struct Metrics {
    sets: Family<SetLabels, Counter>,
    freeze_window: Histograms<VolumeLabel>,
    phase_duration: Histograms<PhaseLabel>,
    last_app_consistent: Family<VolumeLabel, Gauge<f64, AtomicU64>>,
    lease_lapses: Family<NodeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            sets: Family::default(),
            freeze_window: Family::new_with_constructor(durations),
            phase_duration: Family::new_with_constructor(durations),
            last_app_consistent: Family::default(),
            lease_lapses: Family::default(),
        }
    }
}

impl Metrics {
    /// Every outcome of `volume` at 0, so that a dashboard sees the series before the first set.
    pub fn volume(&self, volume: &str) {
        for outcome in OutcomeKind::ALL {
            let _ = self.sets.get_or_create(&SetLabels {
                volume: volume.into(),
                outcome: outcome.as_str().into(),
            });
        }
    }

    /// A set ended with `record`: counted by outcome, its freeze window and phases timed, and,
    /// when app-consistent, the time its snapshot holds (the start of its snapshot phase).
    pub fn set_ended(&self, volume: &str, record: &SetRecord) {
        let outcome = record.outcome.kind();
        self.sets
            .get_or_create(&SetLabels {
                volume: volume.into(),
                outcome: outcome.as_str().into(),
            })
            .inc();
        let volume_label = VolumeLabel {
            volume: volume.into(),
        };
        if let Some(ms) = record.freeze_window_ms {
            self.freeze_window
                .get_or_create(&volume_label)
                .observe(ms as f64 / 1e3);
        }
        for p in &record.phases {
            self.phase_duration
                .get_or_create(&PhaseLabel {
                    phase: p.phase.as_str().into(),
                })
                .observe(p.end_ms.saturating_sub(p.start_ms) as f64 / 1e3);
        }
        if outcome == OutcomeKind::AppConsistent {
            if let Some(started) = record.started_unix_ms {
                let snapshot_at = record
                    .phases
                    .iter()
                    .find(|p| p.phase == Phase::Snapshot)
                    .map_or(0, |p| p.start_ms);
                self.last_app_consistent
                    .get_or_create(&volume_label)
                    .set((started + snapshot_at) as f64 / 1e3);
            }
        }
    }

    /// A node reported that its lease on a set lapsed.
    pub fn lease_lapsed(&self, node: &str) {
        self.lease_lapses
            .get_or_create(&NodeLabel { node: node.into() })
            .inc();
    }

    /// Puts the broker's metrics into `registry`; live nodes are read from `broker` at each
    /// scrape.
    pub fn register(&self, registry: &mut Registry, broker: &Arc<Broker>) {
        registry.register(
            "quiesce_sets",
            "Snapshot sets ended, by volume and outcome",
            self.sets.clone(),
        );
        registry.register_with_unit(
            "quiesce_freeze_window",
            "From the first freeze sent to the last writer thawed or aborted, per set",
            Unit::Seconds,
            self.freeze_window.clone(),
        );
        registry.register_with_unit(
            "quiesce_phase_duration",
            "How long each phase of a set took (the record's phases, to the millisecond)",
            Unit::Seconds,
            self.phase_duration.clone(),
        );
        registry.register_with_unit(
            "quiesce_last_app_consistent_snapshot_timestamp",
            "When the newest app-consistent snapshot of the volume was taken (the start of its snapshot phase), in seconds since the Unix epoch",
            Unit::Seconds,
            self.last_app_consistent.clone(),
        );
        registry.register(
            "quiesce_lease_lapses",
            "Nodes' reports that their lease on a set lapsed and they released its writers themselves",
            self.lease_lapses.clone(),
        );
        registry.register_collector(Box::new(LiveNodes(Arc::downgrade(broker))));
    }
}

/// `quiesce_live_nodes`, read from the registry at each scrape.
#[derive(Debug)]
struct LiveNodes(Weak<Broker>);

impl prometheus_client::collector::Collector for LiveNodes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(broker) = self.0.upgrade() else {
            return Ok(());
        };
        let live = broker.registry().nodes().len() as i64;
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(live);
        let metric = encoder.encode_descriptor(
            "quiesce_live_nodes",
            "Nodes attached to the broker now.",
            None,
            MetricType::Gauge,
        )?;
        gauge.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerConfig;

    #[test]
    fn lease_lapses_are_counted_by_node_and_live_nodes_read_at_each_scrape() {
        let broker = Broker::new(BrokerConfig::default());
        broker.lease_lapsed("node2", "set-1".into(), "no renewal".into());
        broker.lease_lapsed("node2", "set-2".into(), "no renewal".into());
        let mut registry = Registry::default();
        broker.metrics().register(&mut registry, &broker);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "quiesce_lease_lapses_total{node=\"node2\"} 2",
            "quiesce_live_nodes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
