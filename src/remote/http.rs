//! The HTTPS remote: talks to `vaultfs serve` (docs/API.md).
//!
//! One pooled `reqwest` client over rustls with the server's certificate pinned
//! (or a CA file). Requests time out instead of hanging: connecting is bounded by
//! [`CONNECT_TIMEOUT`], each read of a response by [`READ_TIMEOUT`]. Idempotent
//! requests (reads) are retried with exponential backoff when the server cannot
//! be reached or answers 502/503/504; requests that change state are sent once,
//! because a lost answer must surface as an error, not as a second change. The
//! session token is renewed before it expires and once more on a 401, using the
//! login key kept in memory (never the passphrase).

use std::ops::Range;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::TryStreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MATCH, IF_NONE_MATCH, RANGE};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::tls::{client_config, probe_config, Trust};
use super::{Content, RemoteError, Result, UploadBody};
use crate::crypto::login::{LoginBinding, LoginStretch, LOGIN_KEY_VERSION};
use crate::crypto::KdfParams;
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::{
    etag, parse_content_range_len, parse_etag, EnrollRequest, ErrorBody, FileInfo, FileUpdate,
    LoginKeyChange, LoginRequest, Me, Member, NewFile, NewRecord, NewVault, PassphraseChanged, PreLogin,
    RecordInfo, RecordUpdate, Sealed, Session, UploadResult, UserKey, VaultInfo, HEADER_E2E, HEADER_MTIME,
};
use crate::protocol::{
    Changes, CommitRequest, Staged, HEADER_CONFLICT_COPY, HEADER_META, HEADER_NAME, HEADER_RECORD_PARENT,
    HEADER_RECORD_TITLE, HEADER_RECORD_VAULT, HEADER_STAGE,
};
use crate::with_causes;

/// Longest wait for a TCP + TLS connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next bytes of a response.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts for an idempotent request (1 + retries).
const ATTEMPTS: u32 = 4;
/// First backoff; doubled after each failed attempt (0.2 s, 0.4 s, 0.8 s).
const BACKOFF: Duration = Duration::from_millis(200);
/// Renew the session this long before the server would expire it.
const RENEW_MARGIN: Duration = Duration::from_secs(60);

/// Where the server is and how to trust it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerAccess {
    /// Base URL, e.g. `https://vault.example.org:8443`.
    pub url: String,
    /// How to verify its certificate (`None` only for plain HTTP on loopback).
    pub trust: Option<Trust>,
    /// The server identity this machine's login is bound to, remembered from
    /// an earlier login (`login.toml`); `None` derives it from `trust`. Once
    /// remembered, a server that asks for an unbound (version-1) login key is
    /// refused.
    pub identity: Option<String>,
}

impl ServerAccess {
    /// Where the server is and how to trust it, with no identity remembered.
    pub fn new(url: impl Into<String>, trust: Option<Trust>) -> Self {
        ServerAccess { url: url.into(), trust, identity: None }
    }

    /// The identity a login key for this server is bound to: the remembered
    /// one, else what this client verifies the server by, which another
    /// server cannot present: the pinned certificate (`tls-cert:sha256:...`),
    /// or for a CA-verified or plain loopback server its origin
    /// (`origin:https://host:port`), whose host name the CA vouches for.
    pub fn identity(&self) -> Result<String> {
        if let Some(id) = &self.identity {
            return Ok(id.clone());
        }
        Ok(match &self.trust {
            Some(Trust::Pinned(fp)) => format!("tls-cert:{fp}"),
            Some(Trust::CaFile(_)) | None => {
                let url = parse_server_url(&self.url)?;
                let host = url.host_str().ok_or_else(|| protocol("server URL without a host"))?;
                let port = url.port_or_known_default().unwrap_or(443);
                format!("origin:{}://{host}:{port}", url.scheme())
            }
        })
    }
}

fn protocol(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Protocol(e.to_string())
}

fn unavailable(e: reqwest::Error) -> RemoteError {
    RemoteError::Unavailable(with_causes(&e))
}

fn is_loopback_http(url: &reqwest::Url) -> bool {
    url.scheme() == "http"
        && match url.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
}

fn base_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(90))
        .no_proxy()
        .user_agent(concat!("vaultfs/", env!("CARGO_PKG_VERSION")))
}

/// Parses and checks a server URL: HTTPS, or plain HTTP on a loopback address.
pub fn parse_server_url(raw: &str) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(raw.trim_end_matches('/'))
        .map_err(|e| RemoteError::Protocol(format!("invalid server URL {raw:?}: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_http(&url) => Ok(url),
        "http" => Err(RemoteError::Protocol(format!(
            "refusing plain HTTP to {raw}: only loopback addresses may be used without TLS"
        ))),
        other => Err(RemoteError::Protocol(format!("unsupported URL scheme {other:?} in {raw}"))),
    }
}

/// An HTTP client that enforces `access`.
pub fn build_client(access: &ServerAccess) -> Result<reqwest::Client> {
    let url = parse_server_url(&access.url)?;
    let builder = match (url.scheme(), &access.trust) {
        ("https", Some(trust)) => {
            base_builder().tls_backend_preconfigured(client_config(trust).map_err(protocol)?)
        }
        ("https", None) => {
            return Err(RemoteError::Protocol(
                "an https server needs a pinned fingerprint or a CA file".into(),
            ))
        }
        // Plain HTTP on loopback: no TLS, but reqwest still wants a crypto
        // provider to exist (it panicked without one), so the process gets
        // the same one everything else uses.
        _ => {
            let _ = rustls::crypto::CryptoProvider::install_default(rustls::crypto::ring::default_provider());
            base_builder()
        }
    };
    builder.build().map_err(protocol)
}

/// Connects once without verifying the certificate and returns its fingerprint,
/// so a person can compare it with what the server printed before pinning it.
pub async fn probe_fingerprint(url: &str) -> Result<String> {
    let parsed = parse_server_url(url)?;
    if parsed.scheme() != "https" {
        return Err(RemoteError::Protocol("plain HTTP has no certificate to pin".into()));
    }
    let (config, seen) = probe_config().map_err(protocol)?;
    let client = base_builder().tls_backend_preconfigured(config).build().map_err(protocol)?;
    client
        .get(format!("{}/v1/health", parsed.as_str().trim_end_matches('/')))
        .send()
        .await
        .map_err(unavailable)?;
    let fp = seen.lock().map_err(|_| protocol("lock poisoned"))?.clone();
    fp.ok_or_else(|| protocol("the server presented no certificate"))
}

/// Turns an error response into a [`RemoteError`].
async fn error_from(resp: reqwest::Response) -> RemoteError {
    let status = resp.status();
    let current = resp.headers().get(ETAG).and_then(|v| v.to_str().ok()).and_then(parse_etag);
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (String::new(), format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())),
    };
    match (status, code.as_str()) {
        (StatusCode::NOT_FOUND, _) => RemoteError::NotFound(message),
        (StatusCode::PRECONDITION_FAILED, _) => RemoteError::Conflict { current },
        (StatusCode::CONFLICT, "exists") => RemoteError::Exists(message),
        (StatusCode::CONFLICT, _) => RemoteError::Refused(message),
        (StatusCode::PAYLOAD_TOO_LARGE, _) => RemoteError::TooLarge(message),
        (StatusCode::FORBIDDEN, "e2e_required") => RemoteError::E2eRequired,
        (StatusCode::FORBIDDEN, _) => RemoteError::Forbidden(message),
        (StatusCode::UNAUTHORIZED, _) => RemoteError::Unauthorized(message),
        (StatusCode::INSUFFICIENT_STORAGE, _) => RemoteError::StorageFull,
        (StatusCode::RANGE_NOT_SATISFIABLE, _) => RemoteError::BadRange,
        (StatusCode::GONE, "relist") => RemoteError::Relist(message),
        (s, _) if s.is_server_error() => RemoteError::Unavailable(message),
        _ => RemoteError::Protocol(message),
    }
}

fn retryable_status(s: StatusCode) -> bool {
    matches!(s, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

/// Whether a request may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

struct Token {
    value: String,
    renew_at: Instant,
}

/// A logged-in connection to `vaultfs serve`.
pub struct HttpRemote {
    client: reqwest::Client,
    base: String,
    user: String,
    login_key: Zeroizing<[u8; 32]>,
    /// The unbound key of a login made by an older vaultfs, until replaced.
    legacy_key: Option<Zeroizing<[u8; 32]>>,
    token: tokio::sync::Mutex<Option<Token>>,
}

impl std::fmt::Debug for HttpRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRemote")
            .field("base", &self.base)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl HttpRemote {
    async fn prepare(access: &ServerAccess, user: &str, passphrase: &[u8], floor: KdfParams) -> Result<Self> {
        let client = build_client(access)?;
        let base = parse_server_url(&access.url)?.as_str().trim_end_matches('/').to_string();
        let resp = client
            .get(format!("{base}/v1/prelogin"))
            .query(&[("user", user)])
            .send()
            .await
            .map_err(unavailable)?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let pre: PreLogin = resp.json().await.map_err(protocol)?;
        let params =
            KdfParams { m_cost_kib: pre.kdf.m_cost_kib, t_cost: pre.kdf.t_cost, p_cost: pre.kdf.p_cost };
        match pre.login_version {
            LOGIN_KEY_VERSION => {}
            // An old login: used once, then replaced by a bound one. Not
            // from a machine that already has a bound login with this server:
            // then the server claims what cannot be (a relay of an old
            // server's answer, say).
            1 if access.identity.is_some() => return Err(RemoteError::Forbidden(
                "the server asks for an unbound (version 1) login key, but this machine's login to it is \
                     already bound to the server: refusing (is this the server you enrolled with?)"
                    .into(),
            )),
            1 => {}
            v => return Err(protocol(format!("the server asks for login key version {v}, unknown here"))),
        }
        let identity = access.identity()?;
        let (passphrase, salt, name) = (passphrase.to_vec(), pre.salt.0, user.to_string());
        // Argon2id takes a noticeable fraction of a second: keep it off the async workers.
        let (login_key, legacy_key) = tokio::task::spawn_blocking(move || {
            let passphrase = Zeroizing::new(passphrase);
            let stretch = LoginStretch::new(&passphrase, &salt, params, floor)?;
            let key = stretch.key(LoginBinding { server: &identity, user: &name })?;
            Ok::<_, crate::crypto::CryptoError>((key, stretch.legacy_key()))
        })
        .await
        .map_err(protocol)?
        .map_err(|e| RemoteError::Forbidden(e.to_string()))?;
        Ok(HttpRemote {
            client,
            base,
            user: user.to_string(),
            login_key,
            legacy_key: (pre.login_version == 1).then_some(legacy_key),
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// Logs in with a passphrase. `floor` is the weakest Argon2id the client
    /// accepts from the server for deriving the login key. A login made by an
    /// older vaultfs (an unbound key) is replaced by a bound one here.
    pub async fn login(
        access: &ServerAccess,
        user: &str,
        passphrase: &[u8],
        floor: KdfParams,
    ) -> Result<Self> {
        let mut remote = Self::prepare(access, user, passphrase, floor).await?;
        match remote.legacy_key.take() {
            Some(old) => {
                let body = LoginRequest { user: remote.user.clone(), login_key: Sealed(old.to_vec()) };
                remote.authenticate(&body).await?;
                let change = LoginKeyChange {
                    old_login_key: Sealed(old.to_vec()),
                    new_login_key: Sealed(remote.login_key.to_vec()),
                    login_version: LOGIN_KEY_VERSION,
                    wallet: None,
                    wallet_version: None,
                };
                remote.send(Method::PUT, "/v1/login-key", Idempotent::No, |r| r.json(&change)).await?;
                tracing::info!("login upgraded: the login key is now bound to this server and user");
            }
            None => {
                remote.renew().await?;
            }
        }
        Ok(remote)
    }

    /// Changes the passphrase: the login key derived from `new` replaces the
    /// current one and `wallet` (sealed under `new`) replaces wallet version
    /// `wallet_version`, in one request the server applies as one
    /// transaction; every other session of the user ends. Returns the
    /// wallet's new version. From here on this remote logs in with `new`.
    pub async fn change_passphrase(
        &mut self,
        access: &ServerAccess,
        new: &[u8],
        floor: KdfParams,
        wallet: Vec<u8>,
        wallet_version: u64,
    ) -> Result<u64> {
        let next = Self::prepare(access, &self.user, new, floor).await?;
        let change = LoginKeyChange {
            old_login_key: Sealed(self.login_key.to_vec()),
            new_login_key: Sealed(next.login_key.to_vec()),
            login_version: LOGIN_KEY_VERSION,
            wallet: Some(Sealed(wallet)),
            wallet_version: Some(wallet_version),
        };
        let resp = self.send(Method::PUT, "/v1/login-key", Idempotent::No, |r| r.json(&change)).await?;
        let done: PassphraseChanged = resp.json().await.map_err(protocol)?;
        self.login_key = next.login_key;
        Ok(done.wallet_version)
    }

    /// First login with the admin's enrollment code; `passphrase` becomes the
    /// user's passphrase.
    pub async fn enroll(
        access: &ServerAccess,
        user: &str,
        code: &str,
        passphrase: &[u8],
        floor: KdfParams,
    ) -> Result<Self> {
        let remote = Self::prepare(access, user, passphrase, floor).await?;
        let body = EnrollRequest {
            user: user.to_string(),
            code: code.trim().to_string(),
            login_key: Sealed(remote.login_key.to_vec()),
            login_version: LOGIN_KEY_VERSION,
        };
        let resp = remote
            .client
            .post(format!("{}/v1/enroll", remote.base))
            .json(&body)
            .send()
            .await
            .map_err(unavailable)?;
        remote.store_session(resp).await?;
        Ok(remote)
    }

    async fn store_session(&self, resp: reqwest::Response) -> Result<String> {
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        let session: Session = resp.json().await.map_err(protocol)?;
        let lifetime = Duration::from_secs(session.expires_in_secs).saturating_sub(RENEW_MARGIN);
        let value = session.token.clone();
        *self.token.lock().await = Some(Token { value: session.token, renew_at: Instant::now() + lifetime });
        Ok(value)
    }

    async fn renew(&self) -> Result<String> {
        let body = LoginRequest { user: self.user.clone(), login_key: Sealed(self.login_key.to_vec()) };
        self.authenticate(&body).await
    }

    async fn authenticate(&self, body: &LoginRequest) -> Result<String> {
        let resp = self
            .client
            .post(format!("{}/v1/login", self.base))
            .json(body)
            .send()
            .await
            .map_err(unavailable)?;
        self.store_session(resp).await
    }

    async fn current_token(&self) -> Result<String> {
        let valid = {
            let guard = self.token.lock().await;
            guard.as_ref().filter(|t| Instant::now() < t.renew_at).map(|t| t.value.clone())
        };
        match valid {
            Some(t) => Ok(t),
            None => self.renew().await,
        }
    }

    /// Sends a request built by `build`, with authentication, retries for
    /// idempotent requests, and one re-login on 401.
    async fn send(
        &self,
        method: Method,
        path: &str,
        idempotent: Idempotent,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut relogged = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.current_token().await?;
            let request = build(self.client.request(method.clone(), &url).bearer_auth(token));
            let may_retry = idempotent == Idempotent::Yes && attempt < ATTEMPTS;
            match request.send().await {
                // Any transport failure of an idempotent request is retried: a
                // refused connection, a timeout, or a pooled connection the server
                // had already closed.
                Err(_) if may_retry => {}
                Err(e) => {
                    return Err(RemoteError::Unavailable(format!("{method} {path}: {}", with_causes(&e))))
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !relogged => {
                    relogged = true;
                    attempt -= 1;
                    self.renew().await?;
                    continue;
                }
                Ok(resp) if may_retry && retryable_status(resp.status()) => {}
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => return Err(error_from(resp).await),
            }
            tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(Method::GET, path, Idempotent::Yes, |r| r).await?.json().await.map_err(protocol)
    }

    async fn send_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        if_match: Option<u64>,
        body: &B,
    ) -> Result<T> {
        let resp = self
            .send(method, path, Idempotent::No, |r| {
                let r = r.json(body);
                match if_match {
                    Some(v) => r.header(IF_MATCH, etag(v)),
                    None => r,
                }
            })
            .await?;
        resp.json().await.map_err(protocol)
    }

    async fn delete(&self, path: &str, expected: u64) -> Result<()> {
        self.send(Method::DELETE, path, Idempotent::No, |r| r.header(IF_MATCH, etag(expected))).await?;
        Ok(())
    }

    /// The current session token (tests that carry a session to another
    /// server instance).
    #[cfg(feature = "testing")]
    pub async fn session_token(&self) -> Option<String> {
        self.token.lock().await.as_ref().map(|t| t.value.clone())
    }

    /// Ends the session on the server.
    pub async fn logout(&self) -> Result<()> {
        self.send(Method::POST, "/v1/logout", Idempotent::No, |r| r).await?;
        *self.token.lock().await = None;
        Ok(())
    }
}

/// A user name as one URL path segment: every byte but letters, digits, '_'
/// and '-' percent-encoded (so "." or ".." stay names, not path steps).
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl HttpRemote {
    /// `PUT /v1/files/{id}/content` (staged if `stage`), and its JSON answer.
    /// A streamed body cannot be sent twice, so this request is never
    /// retried; the token is renewed first if it is about to expire.
    async fn put_content<T: DeserializeOwned>(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        mtime_ms: Option<i64>,
        body: UploadBody,
        stage: bool,
    ) -> Result<T> {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let token = self.current_token().await?;
        let mut request = self
            .client
            .put(format!("{}/v1/files/{id}/content", self.base))
            .bearer_auth(token)
            .header(IF_MATCH, etag(expected))
            .header(HEADER_E2E, if e2e { "1" } else { "0" })
            .body(reqwest::Body::wrap_stream(body.stream));
        if stage {
            request = request.header(HEADER_STAGE, "1");
        }
        if let Some(copy) = &body.conflict_copy {
            request = request.header(HEADER_CONFLICT_COPY, format!("{}:{}", copy.id, b64(&copy.name.0)));
        }
        if let Some(meta) = &body.meta {
            request = request.header(HEADER_META, b64(&meta.0));
        }
        send_content(request, body.len, mtime_ms).await
    }
}

/// Sends a content upload built as `request`, with its length and time when
/// known, and reads the answer.
async fn send_content<T: DeserializeOwned>(
    mut request: reqwest::RequestBuilder,
    len: Option<u64>,
    mtime_ms: Option<i64>,
) -> Result<T> {
    if let Some(len) = len {
        request = request.header(CONTENT_LENGTH, len);
    }
    if let Some(m) = mtime_ms {
        request = request.header(HEADER_MTIME, m);
    }
    let resp =
        request.send().await.map_err(|e| RemoteError::Unavailable(format!("upload: {}", with_causes(&e))))?;
    if !resp.status().is_success() {
        return Err(error_from(resp).await);
    }
    resp.json().await.map_err(protocol)
}

fn header_u64(resp: &reqwest::Response, name: impl reqwest::header::AsHeaderName) -> Option<u64> {
    resp.headers().get(name)?.to_str().ok()?.parse().ok()
}

impl super::Remote for HttpRemote {
    async fn me(&self) -> Result<Me> {
        self.get_json("/v1/me").await
    }

    async fn wallet(&self) -> Result<Option<(Vec<u8>, u64)>> {
        match self.send(Method::GET, "/v1/wallet", Idempotent::Yes, |r| r).await {
            Ok(resp) => {
                let version = resp
                    .headers()
                    .get(ETAG)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_etag)
                    .ok_or_else(|| protocol("wallet without ETag"))?;
                let bytes = resp.bytes().await.map_err(unavailable)?;
                Ok(Some((bytes.to_vec(), version)))
            }
            Err(RemoteError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_wallet(&self, blob: Vec<u8>, expected: Option<u64>) -> Result<u64> {
        let resp = self
            .send(Method::PUT, "/v1/wallet", Idempotent::No, |r| {
                let r = r.body(blob.clone());
                match expected {
                    Some(v) => r.header(IF_MATCH, etag(v)),
                    None => r.header(IF_NONE_MATCH, "*"),
                }
            })
            .await?;
        resp.headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_etag)
            .ok_or_else(|| protocol("wallet stored without ETag"))
    }

    async fn put_user_key(&self, key: Sealed) -> Result<()> {
        let body = serde_json::json!({ "public_key": key });
        self.send(Method::PUT, "/v1/me/key", Idempotent::Yes, |r| r.json(&body)).await?;
        Ok(())
    }

    async fn user_key(&self, user: &str) -> Result<UserKey> {
        let key: UserKey = self.get_json(&format!("/v1/users/{}/key", path_segment(user))).await?;
        if key.user != user {
            return Err(protocol(format!("asked for the key of {user:?}, the answer is for {:?}", key.user)));
        }
        Ok(key)
    }

    async fn members(&self, vault: VaultId) -> Result<Vec<Member>> {
        self.get_json(&format!("/v1/vaults/{vault}/members")).await
    }

    async fn set_member(&self, vault: VaultId, member: Member) -> Result<()> {
        let body = serde_json::json!({ "rights": member.rights, "wrapped_key": member.wrapped_key });
        let path = format!("/v1/vaults/{vault}/members/{}", path_segment(&member.user));
        self.send(Method::PUT, &path, Idempotent::Yes, |r| r.json(&body)).await?;
        Ok(())
    }

    async fn remove_member(&self, vault: VaultId, user: &str) -> Result<()> {
        let path = format!("/v1/vaults/{vault}/members/{}", path_segment(user));
        self.send(Method::DELETE, &path, Idempotent::Yes, |r| r).await?;
        Ok(())
    }

    async fn wallet_version(&self) -> Result<Option<u64>> {
        match self.send(Method::HEAD, "/v1/wallet", Idempotent::Yes, |r| r).await {
            Ok(resp) => {
                let version = resp.headers().get(ETAG).and_then(|v| v.to_str().ok()).and_then(parse_etag);
                version.map(Some).ok_or_else(|| protocol("wallet without ETag"))
            }
            Err(RemoteError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn vaults(&self) -> Result<Vec<VaultInfo>> {
        self.get_json("/v1/vaults").await
    }

    async fn create_vault(&self, vault: NewVault) -> Result<VaultInfo> {
        self.send_json(Method::POST, "/v1/vaults", None, &vault).await
    }

    async fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>> {
        self.get_json(&format!("/v1/vaults/{vault}/records")).await
    }

    async fn create_record(&self, vault: VaultId, record: NewRecord) -> Result<RecordInfo> {
        self.send_json(Method::POST, &format!("/v1/vaults/{vault}/records"), None, &record).await
    }

    async fn update_record(&self, id: RecordId, expected: u64, update: RecordUpdate) -> Result<RecordInfo> {
        self.send_json(Method::PATCH, &format!("/v1/records/{id}"), Some(expected), &update).await
    }

    async fn delete_record(&self, id: RecordId, expected: u64) -> Result<()> {
        self.delete(&format!("/v1/records/{id}"), expected).await
    }

    async fn files(&self, vault: VaultId) -> Result<Vec<FileInfo>> {
        self.get_json(&format!("/v1/vaults/{vault}/files")).await
    }

    async fn wait_for_changes(
        &self,
        known: std::collections::BTreeMap<VaultId, u64>,
        wallet: Option<u64>,
        timeout: Duration,
    ) -> Result<crate::protocol::VaultChanges> {
        let body = crate::protocol::WaitForChanges { known, wallet, timeout_ms: timeout.as_millis() as u64 };
        self.send_json(Method::POST, "/v1/changes/wait", None, &body).await
    }

    async fn changes(&self, vault: VaultId, since: u64) -> Result<Changes> {
        self.get_json(&format!("/v1/vaults/{vault}/changes?since={since}")).await
    }

    async fn file(&self, id: FileId) -> Result<FileInfo> {
        self.get_json(&format!("/v1/files/{id}")).await
    }

    async fn create_file(&self, record: RecordId, file: NewFile) -> Result<FileInfo> {
        self.send_json(Method::POST, &format!("/v1/records/{record}/files"), None, &file).await
    }

    async fn update_file(&self, id: FileId, expected: u64, update: FileUpdate) -> Result<FileInfo> {
        self.send_json(Method::PATCH, &format!("/v1/files/{id}"), Some(expected), &update).await
    }

    async fn delete_file(&self, id: FileId, expected: u64) -> Result<()> {
        self.delete(&format!("/v1/files/{id}"), expected).await
    }

    async fn delete_many(
        &self,
        items: Vec<crate::protocol::DeleteItem>,
    ) -> Result<Vec<crate::protocol::DeleteOutcome>> {
        // Sent again after a lost answer, what went is NotFound: no harm.
        let body = crate::protocol::DeleteMany { items };
        let resp = self.send(Method::POST, "/v1/deletes", Idempotent::Yes, |r| r.json(&body)).await?;
        let answer: crate::protocol::DeletedMany = resp.json().await.map_err(protocol)?;
        Ok(answer.outcomes)
    }

    async fn set_locks(
        &self,
        file: FileId,
        req: crate::protocol::SetLocks,
    ) -> Result<crate::protocol::LockAnswer> {
        // A request names all the owner holds: sent twice, it does no harm.
        let path = format!("/v1/files/{file}/locks");
        let resp = self.send(Method::PUT, &path, Idempotent::Yes, |r| r.json(&req)).await?;
        resp.json().await.map_err(protocol)
    }

    async fn file_locks(&self, file: FileId) -> Result<Vec<crate::protocol::HeldLock>> {
        self.get_json(&format!("/v1/files/{file}/locks")).await
    }

    async fn renew_locks(
        &self,
        holder: crate::ids::HolderId,
        held: Vec<crate::protocol::LockOwnerOf>,
    ) -> Result<crate::protocol::LocksRenewed> {
        let body = crate::protocol::RenewLocks { holder, held };
        let resp = self.send(Method::POST, "/v1/locks/renew", Idempotent::Yes, |r| r.json(&body)).await?;
        resp.json().await.map_err(protocol)
    }

    async fn drop_locks(&self, holder: crate::ids::HolderId) -> Result<crate::protocol::LocksRenewed> {
        let resp = self.send(Method::DELETE, &format!("/v1/locks/{holder}"), Idempotent::Yes, |r| r).await?;
        resp.json().await.map_err(protocol)
    }

    async fn download(&self, id: FileId, range: Option<Range<u64>>) -> Result<Content> {
        if range.as_ref().is_some_and(|r| r.start >= r.end) {
            return Err(RemoteError::BadRange);
        }
        let resp = self
            .send(Method::GET, &format!("/v1/files/{id}/content"), Idempotent::Yes, |r| match &range {
                Some(r2) => r.header(RANGE, format!("bytes={}-{}", r2.start, r2.end - 1)),
                None => r,
            })
            .await?;
        let version = resp
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_etag)
            .ok_or_else(|| protocol("content without ETag"))?;
        let e2e = resp.headers().get(HEADER_E2E).is_some_and(|v| v.as_bytes() == b"1");
        let total_len = if resp.status() == StatusCode::PARTIAL_CONTENT {
            resp.headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range_len)
                .ok_or_else(|| protocol("206 without a usable Content-Range"))?
        } else {
            header_u64(&resp, CONTENT_LENGTH).ok_or_else(|| protocol("content without Content-Length"))?
        };
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        Ok(Content { stream: Box::pin(stream), total_len, version, e2e })
    }

    async fn upload(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        mtime_ms: Option<i64>,
        body: UploadBody,
    ) -> Result<UploadResult> {
        self.put_content(id, expected, e2e, mtime_ms, body, false).await
    }

    async fn create_with_content(
        &self,
        record: RecordId,
        new_record: Option<(VaultId, NewRecord)>,
        file: NewFile,
        body: UploadBody,
    ) -> Result<UploadResult> {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let token = self.current_token().await?;
        let mut request = self
            .client
            .put(format!("{}/v1/records/{record}/files/{}", self.base, file.id))
            .bearer_auth(token)
            .header(IF_NONE_MATCH, "*")
            .header(HEADER_E2E, if file.e2e { "1" } else { "0" })
            .header(HEADER_NAME, b64(&file.name.0))
            .header(HEADER_META, b64(&file.meta.0));
        if let Some((vault, r)) = new_record {
            request = request
                .header(HEADER_RECORD_VAULT, vault.to_string())
                .header(HEADER_RECORD_TITLE, b64(&r.title.0));
            if let Some(parent) = r.parent {
                request = request.header(HEADER_RECORD_PARENT, parent.to_string());
            }
        }
        let request = request.body(reqwest::Body::wrap_stream(body.stream));
        send_content(request, body.len, file.mtime_ms).await
    }

    async fn stage(&self, id: FileId, expected: u64, e2e: bool, body: UploadBody) -> Result<Staged> {
        // The content is kept uncommitted: the manifest goes with the commit.
        // A conflict copy is named there too; here it only tells the server
        // not to refuse a stale version yet.
        self.put_content(id, expected, e2e, None, body, true).await
    }

    async fn commit(&self, id: FileId, expected: u64, request: CommitRequest) -> Result<UploadResult> {
        self.send_json(Method::POST, &format!("/v1/files/{id}/commit"), Some(expected), &request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        assert!(parse_server_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_server_url("http://[::1]:8080").is_ok());
        assert!(parse_server_url("http://localhost:8080").is_ok());
        assert!(parse_server_url("http://example.org").is_err());
        assert!(parse_server_url("http://10.0.0.1").is_err());
        assert!(parse_server_url("https://example.org").is_ok());
        assert!(parse_server_url("ftp://example.org").is_err());
        assert!(parse_server_url("not a url").is_err());
    }

    #[test]
    fn https_needs_trust() {
        let access = ServerAccess::new("https://example.org", None);
        assert!(build_client(&access).is_err());
    }
}
