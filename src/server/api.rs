//! The HTTP adapter: routes, extractors and responses over [`Service`].
//!
//! Handlers only translate: parse ids, headers and JSON (every malformed input
//! becomes a 400 with a JSON error body, never a panic), call the service, and
//! render its result or error. docs/API.md documents every route and status.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::blob::BlobStore;
use super::service::{Caller, Service, ServiceError, Upload};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::{
    etag, parse_etag, EnrollRequest, ErrorBody, ErrorDetail, FileUpdate, LoginKeyChange, LoginRequest,
    Member, NewFile, NewRecord, NewVault, PassphraseChanged, RecordUpdate, Rights, Sealed, VaultUpdate,
    HEADER_E2E, HEADER_MTIME,
};
use crate::protocol::{
    CommitRequest, HEADER_CONFLICT_COPY, HEADER_META, HEADER_NAME, HEADER_RECORD_PARENT, HEADER_RECORD_TITLE,
    HEADER_RECORD_VAULT, HEADER_STAGE,
};

/// Largest JSON body accepted (names are sealed and padded, fields may be long).
pub const MAX_JSON_BODY: usize = 2 << 20;

type AppState<B> = Arc<Service<B>>;

/// An error response: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    current_version: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), current_version: None }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ServiceError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ServiceError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ServiceError::E2eRequired => (StatusCode::FORBIDDEN, "e2e_required"),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServiceError::Exists(_) => (StatusCode::CONFLICT, "exists"),
            ServiceError::Refused(_) => (StatusCode::CONFLICT, "refused"),
            ServiceError::VersionConflict { .. } => (StatusCode::PRECONDITION_FAILED, "version_conflict"),
            ServiceError::PreconditionRequired => {
                (StatusCode::PRECONDITION_REQUIRED, "precondition_required")
            }
            ServiceError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ServiceError::BadRange(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "bad_range"),
            ServiceError::StorageFull => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
            ServiceError::Relist => (StatusCode::GONE, "relist"),
            ServiceError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let mut err = ApiError::new(status, code, message);
        if let ServiceError::VersionConflict { current } = e {
            err.current_version = Some(current);
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(v) = self.current_version {
            if let Ok(tag) = HeaderValue::from_str(&etag(v)) {
                resp.headers_mut().insert(header::ETAG, tag);
            }
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// JSON body whose rejections are rendered as our JSON errors.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("JSON body larger than {MAX_JSON_BODY} bytes"),
            )),
            Err(rej) => Err(ApiError::bad_request(rej.body_text())),
        }
    }
}

/// A byte body (the wallet) whose rejections are rendered as our JSON errors.
struct RawBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body larger than {MAX_JSON_BODY} bytes"),
            )),
            Err(rej) => Err(ApiError::bad_request(rej.body_text())),
        }
    }
}

/// The authenticated caller, from `Authorization: Bearer TOKEN`.
struct Auth(Caller, String);

impl<B: BlobStore> FromRequestParts<AppState<B>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState<B>,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing bearer token"))?
            .to_string();
        let caller = state.authenticate(&token).await.map_err(|e| match e {
            ServiceError::Unauthorized => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid or expired session")
            }
            other => other.into(),
        })?;
        Ok(Auth(caller, token))
    }
}

/// The value of the conflict-copy header: the copy's file id and its sealed name.
pub(crate) fn parse_conflict_copy(v: &str) -> Option<(FileId, Vec<u8>)> {
    let (id, name) = v.split_once(':')?;
    let name = base64::engine::general_purpose::STANDARD.decode(name).ok()?;
    Some((id.parse().ok()?, name))
}

fn parse_id<T: std::str::FromStr>(raw: &str, what: &str) -> ApiResult<T> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid {what} id {raw:?}: expected 32 hex digits")))
}

/// The version a conditional request replaces (If-Match), required.
fn if_match(headers: &HeaderMap) -> ApiResult<u64> {
    let raw = headers.get(header::IF_MATCH).ok_or(ServiceError::PreconditionRequired)?;
    raw.to_str()
        .ok()
        .and_then(parse_etag)
        .ok_or_else(|| ApiError::bad_request("If-Match must be a quoted version, like \"3\""))
}

fn with_etag(version: u64, resp: impl IntoResponse) -> Response {
    let mut resp = resp.into_response();
    if let Ok(tag) = HeaderValue::from_str(&etag(version)) {
        resp.headers_mut().insert(header::ETAG, tag);
    }
    resp
}

fn json_with_etag<T: Serialize>(version: u64, status: StatusCode, value: T) -> Response {
    with_etag(version, (status, axum::Json(value)))
}

/// Builds the router for `service`.
pub fn router<B: BlobStore>(service: Arc<Service<B>>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/ready", get(ready::<B>))
        .route("/v1/prelogin", get(prelogin::<B>))
        .route("/v1/login", post(login::<B>))
        .route("/v1/enroll", post(enroll::<B>))
        .route("/v1/logout", post(logout::<B>))
        .route("/v1/login-key", put(change_login_key::<B>))
        .route("/v1/me", get(me::<B>))
        .route("/v1/me/key", put(put_user_key::<B>))
        .route("/v1/users/{user}/key", get(user_key::<B>))
        .route("/v1/wallet", get(get_wallet::<B>).put(put_wallet::<B>))
        .route("/v1/vaults", get(list_vaults::<B>).post(create_vault::<B>))
        .route("/v1/vaults/{vault}", get(get_vault::<B>).patch(update_vault::<B>).delete(delete_vault::<B>))
        .route("/v1/vaults/{vault}/members", get(list_members::<B>))
        .route("/v1/vaults/{vault}/members/{user}", put(set_member::<B>).delete(remove_member::<B>))
        .route("/v1/vaults/{vault}/records", get(list_records::<B>).post(create_record::<B>))
        .route("/v1/vaults/{vault}/files", get(vault_files::<B>))
        .route("/v1/vaults/{vault}/changes", get(vault_changes::<B>))
        .route("/v1/changes/wait", post(wait_for_changes::<B>))
        .route(
            "/v1/records/{record}",
            get(get_record::<B>).patch(update_record::<B>).delete(delete_record::<B>),
        )
        .route("/v1/records/{record}/files", get(record_files::<B>).post(create_file::<B>))
        .route(
            "/v1/records/{record}/files/{file}",
            put(create_with_content::<B>).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{file}", get(get_file::<B>).patch(update_file::<B>).delete(delete_file::<B>))
        .route(
            "/v1/files/{file}/content",
            get(download::<B>).put(upload::<B>).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{file}/commit", post(commit::<B>))
        .route("/v1/files/{file}/locks", get(file_locks::<B>).put(set_locks::<B>))
        .route("/v1/deletes", post(delete_many::<B>))
        .route("/v1/locks/renew", post(renew_locks::<B>))
        .route("/v1/locks/{holder}", delete(drop_locks::<B>))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::from_fn(drain_refused_bodies))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(service)
}

/// Logs each request at debug level (`VAULTFS_LOG=vaultfs::server::api=debug`):
/// method, route, status and how long the answer took. Ids in paths are not
/// secret; names, bodies and tokens never appear.
async fn log_request(req: Request, next: axum::middleware::Next) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return next.run(req).await;
    }
    let (method, route) = (req.method().clone(), route_of(req.uri().path()));
    let started = std::time::Instant::now();
    let answer = next.run(req).await;
    tracing::debug!(%method, route, status = answer.status().as_u16(), micros = started.elapsed().as_micros() as u64, "request");
    answer
}

/// A path with its ids replaced by `{id}`, so requests group by route.
fn route_of(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.len() == 32 && seg.bytes().all(|b| b.is_ascii_hexdigit()) { "{id}" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// How long a refused request's unread body is read and dropped, at most.
const DRAIN_FOR: Duration = Duration::from_secs(30);
/// A refused body that stops arriving for this long is not waited for.
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Reads what is left of a refused request's body before the answer goes out.
///
/// A refusal often comes before the body is read (a stale version, a lapsed
/// session, a full disk after the first megabytes). Closing the connection
/// with the client's data unread makes the kernel reset it, and a reset
/// discards the answer the client has not read yet: our client saw a broken
/// pipe, took it for an outage and retried, instead of learning of the
/// conflict or the full disk. So the body is read to its end (bounded by
/// [`DRAIN_FOR`] and [`DRAIN_IDLE`]), as web servers do with a "lingering
/// close". A 413 is answered at once: that body is the one thing not to read.
async fn drain_refused_bodies(req: Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = req.into_parts();
    let shared = SharedBody(Arc::new(parking_lot::Mutex::new(Some(body))));
    let answer = next.run(Request::from_parts(parts, Body::new(shared.clone()))).await;
    let status = answer.status();
    if (status.is_client_error() || status.is_server_error()) && status != StatusCode::PAYLOAD_TOO_LARGE {
        let left = shared.slot().take();
        if let Some(left) = left {
            let mut left = left.into_data_stream();
            let until = tokio::time::Instant::now() + DRAIN_FOR;
            loop {
                let wait = until.min(tokio::time::Instant::now() + DRAIN_IDLE);
                match tokio::time::timeout_at(wait, left.next()).await {
                    Ok(Some(Ok(_))) => continue,
                    _ => break,
                }
            }
        }
    }
    answer
}

/// A request body the handler reads while the middleware keeps a way to
/// take what it left (the handler's copy then ends).
#[derive(Clone)]
struct SharedBody(Arc<parking_lot::Mutex<Option<Body>>>);

impl SharedBody {
    /// The body, if nobody took it (a body is read or taken, never
    /// half-changed, so a panic elsewhere leaves it usable: no poisoning).
    fn slot(&self) -> parking_lot::MutexGuard<'_, Option<Body>> {
        self.0.lock()
    }
}

impl axum::body::HttpBody for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        match self.slot().as_mut() {
            Some(body) => std::pin::Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.slot().as_ref() {
            Some(body) => body.size_hint(),
            None => http_body::SizeHint::with_exact(0),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.slot().as_ref().is_none_or(|b| b.is_end_stream())
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness for a load balancer: 503 while shutting down, or while the
/// database or the blob store does not answer.
async fn ready<B: BlobStore>(State(s): State<AppState<B>>) -> Response {
    match s.ready().await {
        Ok(()) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(why) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why.to_string()).into_response()
        }
    }
}

#[derive(Deserialize)]
struct PreloginQuery {
    user: String,
}

async fn prelogin<B: BlobStore>(
    State(s): State<AppState<B>>,
    q: Result<Query<PreloginQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(axum::Json(s.prelogin(q.user).await?).into_response())
}

async fn login<B: BlobStore>(
    State(s): State<AppState<B>>,
    JsonBody(req): JsonBody<LoginRequest>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.login(req.user, req.login_key).await?).into_response())
}

async fn enroll<B: BlobStore>(
    State(s): State<AppState<B>>,
    JsonBody(req): JsonBody<EnrollRequest>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.enroll(req.user, req.code, req.login_key, req.login_version).await?).into_response())
}

async fn change_login_key<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, token): Auth,
    JsonBody(req): JsonBody<LoginKeyChange>,
) -> ApiResult<Response> {
    Ok(match s.change_login_key(&c, &token, req).await? {
        Some(wallet_version) => axum::Json(PassphraseChanged { wallet_version }).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn logout<B: BlobStore>(State(s): State<AppState<B>>, Auth(_, token): Auth) -> ApiResult<StatusCode> {
    s.logout(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me<B: BlobStore>(State(s): State<AppState<B>>, Auth(c, _): Auth) -> ApiResult<Response> {
    Ok(axum::Json(s.me(&c)).into_response())
}

#[derive(Deserialize)]
struct UserKeyBody {
    public_key: Sealed,
}

async fn put_user_key<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    JsonBody(k): JsonBody<UserKeyBody>,
) -> ApiResult<StatusCode> {
    s.put_user_key(&c, k.public_key.0).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn user_key<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.user_key(&c, user).await?).into_response())
}

async fn get_wallet<B: BlobStore>(State(s): State<AppState<B>>, Auth(c, _): Auth) -> ApiResult<Response> {
    let (blob, version) = s.wallet(&c).await?;
    Ok(with_etag(version, ([(header::CONTENT_TYPE, "application/octet-stream")], blob)))
}

async fn put_wallet<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let create = headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == b"*");
    let expected = if create { None } else { Some(if_match(&headers)?) };
    let version = s.put_wallet(&c, body.to_vec(), expected).await?;
    Ok(with_etag(version, if create { StatusCode::CREATED } else { StatusCode::OK }))
}

async fn list_vaults<B: BlobStore>(State(s): State<AppState<B>>, Auth(c, _): Auth) -> ApiResult<Response> {
    Ok(axum::Json(s.vaults(&c).await?).into_response())
}

async fn create_vault<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    JsonBody(v): JsonBody<NewVault>,
) -> ApiResult<Response> {
    let info = s.create_vault(&c, v).await?;
    Ok(json_with_etag(info.version, StatusCode::CREATED, info))
}

async fn get_vault<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    let info = s.vault(&c, parse_id::<VaultId>(&v, "vault")?).await?;
    Ok(json_with_etag(info.version, StatusCode::OK, info))
}

async fn update_vault<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
    headers: HeaderMap,
    JsonBody(u): JsonBody<VaultUpdate>,
) -> ApiResult<Response> {
    let info = s.update_vault(&c, parse_id(&v, "vault")?, if_match(&headers)?, u).await?;
    Ok(json_with_etag(info.version, StatusCode::OK, info))
}

async fn delete_vault<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    s.delete_vault(&c, parse_id(&v, "vault")?, if_match(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_members<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.members(&c, parse_id(&v, "vault")?).await?).into_response())
}

#[derive(Deserialize)]
struct MemberBody {
    rights: Rights,
    #[serde(default)]
    wrapped_key: Option<Sealed>,
}

async fn set_member<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path((v, user)): Path<(String, String)>,
    JsonBody(m): JsonBody<MemberBody>,
) -> ApiResult<StatusCode> {
    let member = Member { user, rights: m.rights, wrapped_key: m.wrapped_key };
    s.set_member(&c, parse_id(&v, "vault")?, member).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path((v, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    s.remove_member(&c, parse_id(&v, "vault")?, user).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_records<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.records(&c, parse_id(&v, "vault")?).await?).into_response())
}

async fn create_record<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
    JsonBody(r): JsonBody<NewRecord>,
) -> ApiResult<Response> {
    let info = s.create_record(&c, parse_id(&v, "vault")?, r).await?;
    Ok(json_with_etag(info.version, StatusCode::CREATED, info))
}

async fn vault_files<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.vault_files(&c, parse_id(&v, "vault")?).await?).into_response())
}

async fn wait_for_changes<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    JsonBody(w): JsonBody<crate::protocol::WaitForChanges>,
) -> ApiResult<Response> {
    let answer = s.wait_for_changes(&c, w.known, w.wallet, Duration::from_millis(w.timeout_ms)).await?;
    Ok(axum::Json(answer).into_response())
}

#[derive(Deserialize)]
struct ChangesQuery {
    since: u64,
    #[serde(default = "default_change_page")]
    limit: usize,
}

fn default_change_page() -> usize {
    super::service::MAX_CHANGES
}

async fn vault_changes<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(v): Path<String>,
    query: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("since (and limit) must be numbers: {e}")))?;
    Ok(axum::Json(s.changes(&c, parse_id(&v, "vault")?, q.since, q.limit).await?).into_response())
}

async fn get_record<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(r): Path<String>,
) -> ApiResult<Response> {
    let info = s.record(&c, parse_id::<RecordId>(&r, "record")?).await?;
    Ok(json_with_etag(info.version, StatusCode::OK, info))
}

async fn update_record<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(r): Path<String>,
    headers: HeaderMap,
    JsonBody(u): JsonBody<RecordUpdate>,
) -> ApiResult<Response> {
    let info = s.update_record(&c, parse_id(&r, "record")?, if_match(&headers)?, u).await?;
    Ok(json_with_etag(info.version, StatusCode::OK, info))
}

async fn delete_record<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(r): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    s.delete_record(&c, parse_id(&r, "record")?, if_match(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn record_files<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(r): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.record_files(&c, parse_id(&r, "record")?).await?).into_response())
}

async fn create_file<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(r): Path<String>,
    JsonBody(f): JsonBody<NewFile>,
) -> ApiResult<Response> {
    let info = s.create_file(&c, parse_id(&r, "record")?, f).await?;
    Ok(json_with_etag(info.version, StatusCode::CREATED, info))
}

async fn get_file<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
) -> ApiResult<Response> {
    let info = s.file(&c, parse_id::<FileId>(&f, "file")?).await?;
    Ok(json_with_etag(info.version, StatusCode::OK, info))
}

async fn update_file<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
    headers: HeaderMap,
    JsonBody(u): JsonBody<FileUpdate>,
) -> ApiResult<Response> {
    let info = s.update_file(&c, parse_id(&f, "file")?, if_match(&headers)?, u).await?;
    Ok(json_with_etag(info.version, StatusCode::OK, info))
}

async fn delete_file<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    s.delete_file(&c, parse_id(&f, "file")?, if_match(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_many<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    JsonBody(req): JsonBody<crate::protocol::DeleteMany>,
) -> ApiResult<Response> {
    let outcomes = s.delete_many(&c, req.items).await?;
    Ok(axum::Json(crate::protocol::DeletedMany { outcomes }).into_response())
}

async fn set_locks<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
    JsonBody(req): JsonBody<crate::protocol::SetLocks>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.set_locks(&c, parse_id(&f, "file")?, req).await?).into_response())
}

async fn file_locks<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.file_locks(&c, parse_id(&f, "file")?).await?).into_response())
}

async fn renew_locks<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    JsonBody(req): JsonBody<crate::protocol::RenewLocks>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.renew_locks(&c, req.holder, req.held).await?).into_response())
}

async fn drop_locks<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(h): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(s.drop_locks(&c, parse_id(&h, "holder")?).await?).into_response())
}

/// Parses a single `Range: bytes=...` into (start, end exclusive). `bytes=-N`
/// (the last N bytes) needs the size, so it is returned as a suffix. Anything else
/// (several ranges, other units, bad syntax) is ignored, as RFC 9110 allows: the
/// whole content is served.
pub(crate) enum RangeSpec {
    From(u64, Option<u64>),
    Suffix(u64),
}

fn parse_range(headers: &HeaderMap) -> Option<RangeSpec> {
    parse_range_value(headers.get(header::RANGE)?.to_str().ok()?)
}

/// The value of a Range header (see [`RangeSpec`]).
pub(crate) fn parse_range_value(v: &str) -> Option<RangeSpec> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return Some(RangeSpec::Suffix(b.parse().ok()?));
    }
    let start: u64 = a.parse().ok()?;
    if b.is_empty() {
        return Some(RangeSpec::From(start, None));
    }
    let last: u64 = b.parse().ok()?;
    (last >= start).then_some(RangeSpec::From(start, Some(last.checked_add(1)?)))
}

async fn download<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id: FileId = parse_id(&f, "file")?;
    let range = match parse_range(&headers) {
        None => None,
        Some(RangeSpec::From(start, end)) => Some((start, end)),
        Some(RangeSpec::Suffix(n)) => {
            let size = s.file(&c, id).await?.size;
            if n == 0 {
                return Err(ServiceError::BadRange(size).into());
            }
            Some((size.saturating_sub(n), None))
        }
    };
    let d = match s.download(&c, id, range).await {
        Err(ServiceError::BadRange(size)) => {
            let mut resp = ApiError::from(ServiceError::BadRange(size)).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
        other => other?,
    };
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag(d.version))
        .header(HEADER_E2E, if d.e2e { "1" } else { "0" });
    builder = match d.range {
        Some((start, end)) => builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{}/{}", end - 1, d.total_len))
            .header(header::CONTENT_LENGTH, end - start),
        None => builder.status(StatusCode::OK).header(header::CONTENT_LENGTH, d.total_len),
    };
    builder
        .body(Body::from_stream(d.stream))
        .map_err(|e| ServiceError::Internal(format!("building response: {e}")).into())
}

/// What every content upload says in its headers.
struct UploadFields {
    e2e: bool,
    mtime_ms: Option<i64>,
    declared_len: Option<u64>,
}

fn upload_fields(headers: &HeaderMap) -> ApiResult<UploadFields> {
    let e2e = match headers.get(HEADER_E2E).map(|v| v.as_bytes()) {
        Some(b"1") => true,
        Some(b"0") => false,
        _ => return Err(ApiError::bad_request(format!("header {HEADER_E2E} must be 1 or 0"))),
    };
    let mtime_ms = match headers.get(HEADER_MTIME) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|v| v.parse().ok()).ok_or_else(|| {
            ApiError::bad_request(format!("header {HEADER_MTIME} must be Unix milliseconds"))
        })?),
    };
    let declared_len = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?,
        ),
    };
    Ok(UploadFields { e2e, mtime_ms, declared_len })
}

async fn upload<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let id: FileId = parse_id(&f, "file")?;
    let expected_version = if_match(&headers)?;
    let UploadFields { e2e, mtime_ms, declared_len } = upload_fields(&headers)?;
    let conflict_copy = match headers.get(HEADER_CONFLICT_COPY) {
        None => None,
        Some(v) => {
            let (id, name) = v.to_str().ok().and_then(parse_conflict_copy).ok_or_else(|| {
                ApiError::bad_request(format!("header {HEADER_CONFLICT_COPY} must be ID:BASE64-NAME"))
            })?;
            Some(NewFile { id, name: Sealed(name), e2e, mtime_ms, meta: Sealed::default() })
        }
    };
    let meta = match headers.get(HEADER_META) {
        None => None,
        Some(v) => Some(Sealed(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|_| ApiError::bad_request(format!("header {HEADER_META} must be base64")))?,
        )),
    };
    let stage = match headers.get(HEADER_STAGE).map(|v| v.as_bytes()) {
        None | Some(b"0") => false,
        Some(b"1") => true,
        _ => return Err(ApiError::bad_request(format!("header {HEADER_STAGE} must be 1 or 0"))),
    };
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let up =
        Upload { expected_version, e2e, mtime_ms, declared_len, conflict_copy, meta, body: Box::pin(stream) };
    if stage {
        return Ok((StatusCode::ACCEPTED, axum::Json(s.stage(&c, id, up).await?)).into_response());
    }
    let result = s.upload(&c, id, up).await?;
    Ok(json_with_etag(result.version, StatusCode::OK, result))
}

/// `PUT /v1/records/{record}/files/{file}` with `If-None-Match: *`: a new
/// file with its content, in one request.
async fn create_with_content<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path((r, f)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (record, id): (RecordId, FileId) = (parse_id(&r, "record")?, parse_id(&f, "file")?);
    if headers.get(header::IF_NONE_MATCH).map(|v| v.as_bytes()) != Some(b"*") {
        return Err(ServiceError::PreconditionRequired.into());
    }
    let fields = upload_fields(&headers)?;
    let b64 = |name: &str| {
        headers.get(name).map(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|_| ApiError::bad_request(format!("header {name} must be base64")))
        })
    };
    let name = b64(HEADER_NAME)
        .ok_or_else(|| ApiError::bad_request(format!("header {HEADER_NAME} is required")))??;
    let meta = b64(HEADER_META)
        .ok_or_else(|| ApiError::bad_request(format!("header {HEADER_META} is required")))??;
    // The record it goes in, created in the same request (a new directory's
    // first file): its vault, title and parent.
    let new_record = match headers.get(HEADER_RECORD_VAULT) {
        None if headers.contains_key(HEADER_RECORD_TITLE) || headers.contains_key(HEADER_RECORD_PARENT) => {
            return Err(ApiError::bad_request(format!(
                "headers {HEADER_RECORD_TITLE} and {HEADER_RECORD_PARENT} need {HEADER_RECORD_VAULT}"
            )))
        }
        None => None,
        Some(v) => {
            let vault = parse_id(v.to_str().unwrap_or_default(), "vault")?;
            let title = b64(HEADER_RECORD_TITLE).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "header {HEADER_RECORD_TITLE} is required with {HEADER_RECORD_VAULT}"
                ))
            })??;
            let parent = match headers.get(HEADER_RECORD_PARENT) {
                None => None,
                Some(p) => Some(parse_id(p.to_str().unwrap_or_default(), "record")?),
            };
            Some((vault, NewRecord { id: record, parent, title: Sealed(title), fields: Sealed::default() }))
        }
    };
    let new = NewFile {
        id,
        name: Sealed(name),
        e2e: fields.e2e,
        mtime_ms: fields.mtime_ms,
        meta: Sealed(meta.clone()),
    };
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let up = Upload {
        expected_version: 0,
        e2e: fields.e2e,
        mtime_ms: fields.mtime_ms,
        declared_len: fields.declared_len,
        conflict_copy: None,
        meta: Some(Sealed(meta)),
        body: Box::pin(stream),
    };
    let result = s.create_with_content(&c, record, new_record, new, up).await?;
    Ok(json_with_etag(result.version, StatusCode::CREATED, result))
}

async fn commit<B: BlobStore>(
    State(s): State<AppState<B>>,
    Auth(c, _): Auth,
    Path(f): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CommitRequest>,
) -> ApiResult<Response> {
    let result = s.commit(&c, parse_id(&f, "file")?, if_match(&headers)?, req).await?;
    Ok(json_with_etag(result.version, StatusCode::OK, result))
}
