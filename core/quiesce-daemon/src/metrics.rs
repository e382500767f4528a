//! The daemons' Prometheus endpoint: `--metrics-listen ADDR` serves `GET /metrics` in the text
//! exposition format (OpenMetrics text, as `prometheus-client` writes it) over plain HTTP/1.1, on
//! the daemon's tokio runtime. Off unless the flag is given; an address that cannot be bound
//! stops the daemon at start ([`MetricsError`]), never a silent skip.
//!
//! Each daemon decides what its [`Registry`] holds; this module knows only how to serve one, and
//! [`AtomicHistogram`], a histogram whose `observe` is a few relaxed atomic additions (no lock,
//! no allocation), for durations measured where a lock must not be taken — on a writer's thread
//! between its freeze and its thaw.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use prometheus_client;

/// The content type of what `/metrics` returns (what `prometheus-client`'s text encoder writes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `--metrics-listen`, shared by both daemons' command lines.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9645; port 0: any free
    /// port, logged at start). Plain HTTP, no authentication: bind it to loopback or a
    /// management network. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics-listen {addr}: cannot listen for metrics there: {cause}; is another daemon using it? pick another address, or leave --metrics-listen out")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A metrics endpoint that serves while it lives.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Where it listens (the port chosen, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `registry` at `/metrics` from a task on the current runtime.
pub async fn serve(addr: SocketAddr, registry: Registry) -> Result<Endpoint, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| MetricsError::Bind { addr, cause })?;
    let bound = listener
        .local_addr()
        .map_err(|cause| MetricsError::Bind { addr, cause })?;
    // The tests (and operators) read the bound address here, e.g. with port 0.
    tracing::info!(addr = %bound, "metrics listening on http://{bound}/metrics");
    let registry = Arc::new(registry);
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, typically: said, and tried again shortly.
                    tracing::warn!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let reply = answer(&registry, &request);
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!("a metrics connection ended: {e}");
                }
            });
        }
    });
    Ok(Endpoint { addr: bound, task })
}

fn answer<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .expect("a response of static parts")
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".into(),
        );
    }
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => {
            tracing::error!("encoding the metrics: {e}");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "encoding the metrics failed\n".into(),
            )
        }
    }
}

/// Bucket bounds in seconds for calls and phases: 1 ms to 60 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram of durations in seconds whose [`observe`](AtomicHistogram::observe) takes no
/// lock: three relaxed atomic additions. (`prometheus_client`'s `Histogram` takes a mutex.) The
/// sum is kept in whole microseconds.
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last is `+Inf`.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self.bounds.partition_point(|b| *b < seconds);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram::new(DURATION_BUCKETS)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_histogram_encodes_cumulative_buckets_and_its_sum_in_seconds() {
        let h = AtomicHistogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(2));
        let mut registry = Registry::default();
        registry.register_with_unit(
            "call_duration",
            "Calls",
            prometheus_client::registry::Unit::Seconds,
            h,
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE call_duration_seconds histogram",
            "call_duration_seconds_sum 2.055",
            "call_duration_seconds_count 3",
            "call_duration_seconds_bucket{le=\"0.01\"} 1",
            "call_duration_seconds_bucket{le=\"0.1\"} 2",
            "call_duration_seconds_bucket{le=\"+Inf\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
    }
}
