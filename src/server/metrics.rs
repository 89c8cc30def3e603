//! Prometheus metrics, on a listener of their own that is off by default
//! (`[metrics] listen = "127.0.0.1:9464"` in the server's configuration).
//!
//! Data flow: a middleware around the API ([`count`]) counts each request by
//! method, route (ids as `{id}`) and status, times it, counts the body bytes
//! that arrive and leave as they stream, and keeps a gauge of uploads in
//! flight; failed logins and enrollments get a counter of their own. A scrape
//! of `GET /metrics` on the metrics listener reads the stored bytes from the
//! metadata store and encodes everything in the Prometheus text format.
//! Nothing secret is in a metric: routes carry no ids, names or tokens.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// Labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    seconds: Family<RouteLabels, Histogram>,
    bytes_in: Counter,
    bytes_out: Counter,
    uploads: Gauge,
    login_failures: Counter,
    stored: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vaultfs");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "API requests answered, by method, route and status", requests.clone());
        // 100 µs to about 52 s.
        let seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 20))
        });
        registry.register("request_duration_seconds", "Time to the answer's head, by route", seconds.clone());
        let bytes_in = Counter::default();
        registry.register("received_bytes", "Request body bytes received", bytes_in.clone());
        let bytes_out = Counter::default();
        registry.register("sent_bytes", "Response body bytes sent", bytes_out.clone());
        let uploads = Gauge::default();
        registry.register("uploads_in_flight", "File contents being received now", uploads.clone());
        let login_failures = Counter::default();
        registry.register("login_failures", "Logins and enrollments refused", login_failures.clone());
        let stored = Gauge::<u64, AtomicU64>::default();
        registry.register("stored_bytes", "Bytes of file content stored (current versions)", stored.clone());
        Metrics { registry, requests, seconds, bytes_in, bytes_out, uploads, login_failures, stored }
    }

    /// The text exposition of every metric, with the stored bytes set to
    /// `stored` first.
    pub fn encode(&self, stored: Option<u64>) -> String {
        if let Some(stored) = stored {
            self.stored.set(stored);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Whether a request carries file content up.
fn is_upload(method: &axum::http::Method, route: &str) -> bool {
    method == axum::http::Method::PUT && (route.ends_with("/content") || route.contains("/files/{id}"))
}

/// The API middleware: counts, times and measures each request.
pub async fn count(State(m): State<Arc<Metrics>>, req: Request, next: axum::middleware::Next) -> Response {
    let (method, route) = (req.method().clone(), super::api::route_of(req.uri().path()));
    let upload = is_upload(&method, &route);
    if upload {
        m.uploads.inc();
    }
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let received = m.bytes_in.clone();
    let body = Body::new(body.map_frame(move |f| {
        if let Some(data) = f.data_ref() {
            received.inc_by(data.len() as u64);
        }
        f
    }));
    let answer = next.run(Request::from_parts(parts, body)).await;
    if upload {
        m.uploads.dec();
    }
    let status = answer.status().as_u16();
    m.seconds.get_or_create(&RouteLabels { route: route.clone() }).observe(started.elapsed().as_secs_f64());
    if matches!(route.as_str(), "/v1/login" | "/v1/enroll") && (status == 401 || status == 403) {
        m.login_failures.inc();
    }
    m.requests.get_or_create(&RequestLabels { method: method.to_string(), route, status }).inc();
    let sent = m.bytes_out.clone();
    let (parts, body) = answer.into_parts();
    let body = Body::new(body.map_frame(move |f| {
        if let Some(data) = f.data_ref() {
            sent.inc_by(data.len() as u64);
        }
        f
    }));
    Response::from_parts(parts, body)
}

/// The metrics listener's one route: `GET /metrics`.
pub fn router(
    metrics: Arc<Metrics>,
    stored: impl Fn() -> futures_util::future::BoxFuture<'static, Option<u64>> + Clone + Send + Sync + 'static,
) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, stored) = (Arc::clone(&metrics), stored.clone());
            async move {
                let text = metrics.encode(stored().await);
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
                    .into_response()
            }
        }),
    )
}
