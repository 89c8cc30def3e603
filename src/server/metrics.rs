//! Prometheus metrics, on a listener of their own that is off by default
//! (`[metrics] listen = "127.0.0.1:9464"` in the server's configuration).
//!
//! Data flow: a middleware around the API ([`count`]) counts each request by
//! method, the route it matched (as declared: `/v1/files/{file}`) and status, times it, counts the body bytes
//! that arrive and leave as they stream, and keeps a gauge of uploads in
//! flight; failed logins and enrollments get a counter of their own. A scrape
//! of `GET /metrics` on the metrics listener reads the stored bytes from the
//! metadata store and encodes everything in the Prometheus text format.
//! Nothing secret is in a metric: routes are the router's own patterns, so
//! they carry no ids, user names or tokens, and the label sets stay bounded
//! whatever paths and methods clients send.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
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

/// Whether a request carries file content up (by its matched route).
fn is_upload(method: &axum::http::Method, route: &str) -> bool {
    method == axum::http::Method::PUT
        && matches!(route, "/v1/files/{file}/content" | "/v1/records/{record}/files/{file}")
}

/// The route a request matched, as the router declares it (`/v1/files/{file}`),
/// so labels never hold ids, user names or anything a client chose; requests
/// that matched no route share one label. A bounded set, whatever clients send.
fn route_label(req: &Request) -> String {
    req.extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string())
}

/// The method, one of the few the API knows or `OTHER` (any token is a valid
/// HTTP method, and a label per token would grow without bound).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Takes one off the uploads gauge when dropped: also when the client goes
/// away and the request's future is dropped half way.
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A body that counts its data bytes as they pass and otherwise behaves as
/// the body it wraps (its size hint too, so a Content-Length stays).
struct Counted {
    inner: Body,
    bytes: Counter,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.inc_by(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The API middleware: counts, times and measures each request.
pub async fn count(State(m): State<Arc<Metrics>>, req: Request, next: axum::middleware::Next) -> Response {
    let (method, route) = (method_label(req.method()), route_label(&req));
    let _in_flight = is_upload(req.method(), &route).then(|| {
        m.uploads.inc();
        InFlight(m.uploads.clone())
    });
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let body = Body::new(Counted { inner: body, bytes: m.bytes_in.clone() });
    let answer = next.run(Request::from_parts(parts, body)).await;
    let status = answer.status().as_u16();
    m.seconds.get_or_create(&RouteLabels { route: route.clone() }).observe(started.elapsed().as_secs_f64());
    if matches!(route.as_str(), "/v1/login" | "/v1/enroll") && (status == 401 || status == 403) {
        m.login_failures.inc();
    }
    m.requests.get_or_create(&RequestLabels { method: method.to_string(), route, status }).inc();
    let (parts, body) = answer.into_parts();
    Response::from_parts(parts, Body::new(Counted { inner: body, bytes: m.bytes_out.clone() }))
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
