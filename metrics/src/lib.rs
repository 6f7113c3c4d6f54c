//! The HTTP endpoint that serves a daemon's Prometheus metrics.
//!
//! Each daemon (the broker, every worker) keeps its metrics in a
//! [`prometheus_client::registry::Registry`] and calls [`serve`] with it: a task of
//! its own answers `GET /metrics` with the registry in the Prometheus text format
//! (version 0.0.4), so scraping never runs on, or waits for, the daemon's own
//! loop. Metrics are plain atomics the daemon updates as things happen; a scrape
//! only reads them.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` and `_bytes`
//! in base units); the catalogue is in docs/metrics.md.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use prometheus_client;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr} (`{key}`): {source}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
}

/// A running metrics endpoint; dropping it stops serving.
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The bound address (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_text::encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

/// Serves `registry` at `http://<addr>/metrics` until the returned server is
/// dropped. `key` names the setting `addr` came from, for the bind error.
pub async fn serve(
    addr: SocketAddr,
    key: &'static str,
    registry: Arc<Registry>,
) -> Result<MetricsServer, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, key, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, key, source })?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                        encode(&registry),
                    )
                }
            }),
        )
        .route(
            "/",
            get(|| async { "Kiln metrics: GET /metrics (Prometheus text format)\n" }),
        )
        .fallback(|| async {
            (StatusCode::NOT_FOUND, "not found: GET /metrics\n").into_response()
        });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(MetricsServer { addr, task })
}

/// The exponential buckets of Kiln's duration histograms, in seconds: 0.05 s to
/// about 27 min, doubling (a generation takes seconds to many minutes).
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.05, 2.0, 16)
}

/// Buckets for fast operations (a store commit), in seconds: 0.1 ms to about 3 s.
pub fn fast_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn serves_the_registry_in_the_text_format() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        registry.register("kiln_test_things", "Things counted", c.clone());
        c.inc_by(3);
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            "test.metrics_listen",
            Arc::new(registry),
        )
        .await
        .unwrap();
        let url = format!("http://{}/metrics", server.addr());
        let resp = reqwest::get(&url).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            prometheus_text::CONTENT_TYPE
        );
        let body = resp.text().await.unwrap();
        assert!(
            body.contains("# TYPE kiln_test_things_total counter"),
            "{body}"
        );
        assert!(body.contains("kiln_test_things_total 3"), "{body}");
        c.inc();
        let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
        assert!(body.contains("kiln_test_things_total 4"), "{body}");
        let missing = reqwest::get(format!("http://{}/nope", server.addr()))
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_key() {
        let first = serve(
            "127.0.0.1:0".parse().unwrap(),
            "a",
            Arc::new(Registry::default()),
        )
        .await
        .unwrap();
        let err = serve(
            first.addr(),
            "broker.metrics_listen",
            Arc::new(Registry::default()),
        )
        .await
        .err()
        .expect("the port is taken");
        assert!(err.to_string().contains("broker.metrics_listen"), "{err}");
    }
}
