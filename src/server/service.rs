//! The server's logic, independent of HTTP: authentication, per-vault
//! authorization, optimistic concurrency and the upload protocol.
//!
//! The HTTP layer (`api.rs`) only parses requests and renders results; the
//! in-memory remote used by filesystem tests calls this same code directly, so
//! both enforce identical rules.
//!
//! Authorization: every vault, record and file operation resolves the object's
//! vault and checks the caller's membership. A caller who is not a member gets
//! `NotFound`, exactly as for an id that does not exist, so ids cannot be probed;
//! a member lacking the needed right gets `Forbidden`.
//!
//! Upload protocol: check rights, version and declared length first (cheap
//! refusals before any byte is read); stream the body into a *new* blob, durable
//! before anything points at it; then compare-and-swap the file's version to point
//! at it. Losing the race deletes the new blob and reports a conflict; winning
//! deletes the old blob after the commit. A crash anywhere leaves the old version
//! (plus at most an orphan blob, collected at the next start).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

mod locks;
mod pace;
#[cfg(test)]
mod tests;
pub use locks::{DEFAULT_LOCK_TTL, MAX_LOCK_WAITS};

use super::blob::{BlobError, BlobId, BlobRead, BlobStore, ByteStream};
use super::meta::postgres::Events;
use super::meta::{Committed, FileRow, MetaDb, MetaError, MetaStore, User};
use crate::ids::{hex_encode, FileId, RecordId, VaultId};
use crate::protocol::{
    Changes, CommitRequest, DeleteItem, DeleteOutcome, FileInfo, FileUpdate, KdfWire, Limits, LoginKeyChange,
    Me, Member, NewFile, NewRecord, NewVault, PreLogin, RecordInfo, RecordUpdate, Rights, Sealed, Session,
    Staged, UploadResult, UserKey, VaultInfo, VaultUpdate, MAX_DELETES, MAX_WAIT_MS,
};

/// Length of a login key (SHA-256 output).
pub const LOGIN_KEY_LEN: usize = 32;
/// Length of a login salt.
pub const LOGIN_SALT_LEN: usize = 16;
/// Largest sealed wallet accepted.
pub const MAX_WALLET_LEN: usize = 1 << 20;
/// Most objects one page of a vault's changes holds.
pub const MAX_CHANGES: usize = 1000;

/// Errors of the service, each with an HTTP status in `api.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Malformed input.
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials.
    #[error("invalid credentials")]
    Unauthorized,
    /// Authenticated, but the caller's rights do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// The vault refuses uploads that are not end-to-end encrypted.
    #[error("this vault accepts only end-to-end encrypted files")]
    E2eRequired,
    /// No such object (or not visible to the caller).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// An object with that id already exists.
    #[error("{0} already exists")]
    Exists(&'static str),
    /// The change is not possible in the current state.
    #[error("{0}")]
    Refused(String),
    /// Optimistic concurrency: the object changed since the caller read it.
    #[error("version conflict: the current version is {current}")]
    VersionConflict {
        /// Current version.
        current: u64,
    },
    /// A conditional request came without its condition.
    #[error("this request needs an If-Match header with the version being replaced")]
    PreconditionRequired,
    /// The upload exceeds the caller's limit.
    #[error("upload exceeds your limit of {0} bytes")]
    TooLarge(u64),
    /// The requested range is outside the content.
    #[error("range not satisfiable (size {0})")]
    BadRange(u64),
    /// The server's storage is full.
    #[error("the server's storage is full")]
    StorageFull,
    /// The caller's change number is further back than the history kept, or
    /// ahead of the vault: list it again.
    #[error("too far behind the vault's changes (or ahead of them): list the vault again")]
    Relist,
    /// Something broke on the server; details are logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl From<MetaError> for ServiceError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::NotFound(what) => ServiceError::NotFound(what),
            MetaError::Exists(what) => ServiceError::Exists(what),
            MetaError::VersionMismatch { current } => ServiceError::VersionConflict { current },
            MetaError::Refused(msg) => ServiceError::Refused(msg),
            // Both databases report a full disk as a code of their own; the
            // client must see the same "storage full" (ENOSPC) as for a blob
            // that did not fit.
            MetaError::Db(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DiskFull =>
            {
                ServiceError::StorageFull
            }
            MetaError::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL) => {
                ServiceError::StorageFull
            }
            e @ (MetaError::TooNew { .. } | MetaError::Unavailable(_) | MetaError::Postgres(_)) => {
                ServiceError::Internal(e.to_string())
            }
            MetaError::Db(e) => ServiceError::Internal(format!("database: {e}")),
        }
    }
}

impl From<BlobError> for ServiceError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::TooLarge(limit) => ServiceError::TooLarge(limit),
            BlobError::Full => ServiceError::StorageFull,
            BlobError::Body(msg) => ServiceError::BadRequest(format!("upload body failed: {msg}")),
            BlobError::BadRange => ServiceError::BadRange(0),
            BlobError::NotFound => ServiceError::Internal("blob missing for a committed file".into()),
            BlobError::Io(e) => ServiceError::Internal(format!("blob storage: {e}")),
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Session lifetime.
    pub session_ttl_secs: u64,
    /// Argon2id parameters announced for users that do not exist (so answers for
    /// unknown and known users look alike).
    pub login_kdf: KdfWire,
    /// How long a lock lasts unless its mount renews it.
    pub lock_ttl: std::time::Duration,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    user: User,
}

impl Caller {
    /// The caller's name.
    pub fn name(&self) -> &str {
        &self.user.name
    }

    /// The caller's limits.
    pub fn limits(&self) -> Limits {
        self.user.limits
    }
}

/// A download: the bytes and what the response should say about them.
pub struct Download {
    /// The requested bytes (empty stream for an empty file).
    pub stream: ByteStream,
    /// Range served, if a partial read: (start, end exclusive).
    pub range: Option<(u64, u64)>,
    /// Whole content length.
    pub total_len: u64,
    /// File version.
    pub version: u64,
    /// End-to-end flag.
    pub e2e: bool,
}

/// An upload request.
pub struct Upload {
    /// The version being replaced.
    pub expected_version: u64,
    /// Whether the body is end-to-end encrypted.
    pub e2e: bool,
    /// Modification time to record; `None` for now.
    pub mtime_ms: Option<i64>,
    /// Declared length, if known up front (refused early when over the limit).
    pub declared_len: Option<u64>,
    /// Where the content goes if the file is no longer at `expected_version`
    /// (a streamed upload that cannot be sent again): a new file in the same record.
    pub conflict_copy: Option<NewFile>,
    /// The content's sealed manifest (`None` from clients older than manifests).
    pub meta: Option<Sealed>,
    /// The body.
    pub body: ByteStream,
}

/// How old a blob no file points at must be before garbage collection
/// takes it: far longer than the moment between an upload's blob being
/// stored and its commit, on the slowest store and database.
pub const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long staged content waits for its commit before garbage collection
/// may take it (at the server's next start): a day, far longer than any
/// upload and commit take, so only abandoned ones go.
pub const STAGED_TTL_MS: i64 = 24 * 3600 * 1000;

/// How long a session looked up in the database is trusted without looking
/// again. A request otherwise starts with a database round trip just to learn
/// who is asking; with this, a burst of requests (a `tar -x`, a `cp -r`) costs
/// one lookup a second. A logout through this server ends the session at once;
/// on SQLite, a user removed or reset with `vaultfs admin` (another process)
/// is refused from at most this long later. On PostgreSQL every ended session
/// is announced to every instance (and to this one for `vaultfs admin`'s), so
/// all of them drop it at once.
pub const SESSION_CACHE: std::time::Duration = std::time::Duration::from_secs(1);
/// Sessions kept in that cache before expired entries are swept.
const SESSION_CACHE_ENTRIES: usize = 1024;

/// Recently confirmed sessions: SHA-256 of the token -> user, and when.
type SessionCache = parking_lot::Mutex<HashMap<[u8; 32], (User, Instant)>>;

/// The vault service over a blob store.
pub struct Service<B> {
    meta: MetaDb,
    blobs: Arc<B>,
    secret: [u8; 32],
    config: ServiceConfig,
    /// Recently confirmed sessions: SHA-256 of the token -> user, and when
    /// (shared with the database's listener, which drops the sessions other
    /// instances end).
    sessions: Arc<SessionCache>,
    /// Counts the calls that changed a vault: waits for changes wake on it
    /// and look at their vaults again.
    written: Arc<tokio::sync::watch::Sender<u64>>,
    /// Waits for changes held open, per user (at most [`MAX_WAITS`] each).
    waits: parking_lot::Mutex<HashMap<i64, usize>>,
    /// Counts the calls that may have given up a lock: lock requests that
    /// wait look again when it moves.
    lock_released: Arc<tokio::sync::watch::Sender<u64>>,
    /// Lock requests waiting, per user (at most `MAX_LOCK_WAITS` each).
    lock_waits: parking_lot::Mutex<HashMap<i64, usize>>,
    /// Set when the server begins to shut down: readiness fails from then
    /// on, so a load balancer sends new requests elsewhere while the ones in
    /// flight finish.
    draining: std::sync::atomic::AtomicBool,
    /// The last look at readiness, and when ([`Service::ready`]).
    readiness: tokio::sync::Mutex<Option<(Instant, std::result::Result<(), NotReady>)>>,
    /// Whether small writes run in place or on the blocking pool.
    pace: pace::WritePace,
}

/// Why the server is not ready for requests (`GET /v1/ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// It is shutting down.
    #[error("shutting down")]
    Draining,
    /// The metadata database did not answer.
    #[error("the metadata database does not answer")]
    Database,
    /// The blob store did not answer.
    #[error("the blob store does not answer")]
    BlobStore,
}

/// How long an answer about readiness is reused.
const READY_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long readiness waits for the database and the blob store.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Most waits for changes one user may hold open at once.
pub const MAX_WAITS: usize = 8;

/// One wait for changes held open by a user; counted down when dropped.
struct WaitSlot<'a> {
    waits: &'a parking_lot::Mutex<HashMap<i64, usize>>,
    user: i64,
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        let mut waits = self.waits.lock();
        if let Some(n) = waits.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                waits.remove(&self.user);
            }
        }
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// What a member's rights (`None`: not a member, or no such object) allow.
fn check_rights(rights: Option<Rights>, need: Rights, what: &'static str) -> Result<Rights> {
    match rights {
        None => Err(ServiceError::NotFound(what)),
        Some(r) if r < need => Err(ServiceError::Forbidden(format!(
            "you have {} rights in this vault; this needs {}",
            r.as_str(),
            need.as_str()
        ))),
        Some(r) => Ok(r),
    }
}

/// Runs `f` on the metadata store on the blocking pool (see
/// [`Service::db`]); with whether it changed a vault.
async fn on_blocking_pool<T: Send + 'static>(
    meta: MetaDb,
    f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError> + Send + 'static,
) -> Result<(Result<T>, bool)> {
    tokio::task::spawn_blocking(move || {
        let (result, wrote) = meta.run(f);
        (result.map_err(ServiceError::from), wrote)
    })
    .await
    .map_err(|e| ServiceError::Internal(format!("metadata task: {e}")))
}

/// `f` timed from the moment it holds the database, with `before` (the
/// blob's own write) added: one observation of a small write's pace, which
/// waiting for the database or for a thread does not count in.
fn timed<T>(
    pace: pace::WritePace,
    before: Duration,
    f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError>,
) -> impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError> {
    move |m| {
        let started = Instant::now();
        let done = f(m);
        pace.observe(before + started.elapsed());
        done
    }
}

/// Stores a small body with [`BlobStore::put_in_place`] and says how long
/// that took, for the commit's [`timed`] to add; a failed write is one
/// observation of the pace on its own.
fn put_timed<B: BlobStore>(
    blobs: &B,
    pace: &pace::WritePace,
    blob: BlobId,
    pieces: Vec<Bytes>,
) -> std::result::Result<Duration, BlobError> {
    let started = Instant::now();
    let put = blobs.put_in_place(blob, pieces);
    let took = started.elapsed();
    if put.is_err() {
        pace.observe(took);
    }
    put.map(|_| took)
}

/// Bodies up to this declared size are read whole before they are stored
/// (see [`Service::store_and_commit`]).
const SMALL_IN_PLACE: usize = 1 << 20;

/// Reads a body of declared length `len` whole: refused if it is longer or
/// shorter than declared.
async fn read_declared(mut body: ByteStream, len: u64) -> Result<Vec<Bytes>> {
    let mut pieces = Vec::new();
    let mut held = 0u64;
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| BlobError::Body(e.to_string()))?;
        held += piece.len() as u64;
        if held > len {
            return Err(ServiceError::BadRequest("body longer than its declared length".into()));
        }
        pieces.push(piece);
    }
    if held != len {
        return Err(ServiceError::BadRequest("body shorter than its declared length".into()));
    }
    Ok(pieces)
}

/// Deletes a blob the metadata no longer points to; a failure only leaves an
/// orphan, which the next start collects.
async fn delete_replaced<B: BlobStore>(blobs: &B, blob: BlobId) {
    if let Err(e) = blobs.delete(blob).await {
        tracing::warn!(blob = %blob.to_hex(), error = %e, "could not delete replaced blob");
    }
}

/// Unix time in seconds.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub use crate::protocol::now_ms;

impl<B: BlobStore> Service<B> {
    /// A service over an open metadata store and blob store.
    pub fn new(meta: impl Into<MetaDb>, blobs: B, config: ServiceConfig) -> Result<Self> {
        let meta = meta.into();
        let secret = meta.run(|m| m.server_secret()).0?;
        let sessions: Arc<SessionCache> = Arc::default();
        let written = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let lock_released = Arc::new(tokio::sync::watch::Sender::new(0u64));
        // Changes made through other instances wake this one's waits too,
        // and sessions they end leave this one's cache.
        let bump = |w: &Arc<tokio::sync::watch::Sender<u64>>| {
            let w = Arc::clone(w);
            Arc::new(move || w.send_modify(|n| *n = n.wrapping_add(1)))
        };
        let cache = Arc::clone(&sessions);
        meta.listen(Events {
            changed: bump(&written),
            lock_released: bump(&lock_released),
            sessions_ended: Arc::new(move |user| match user {
                Some(id) => cache.lock().retain(|_, (u, _)| u.id != id),
                None => cache.lock().clear(),
            }),
        });
        Ok(Service {
            meta,
            blobs: Arc::new(blobs),
            secret,
            config,
            sessions,
            written,
            waits: parking_lot::Mutex::default(),
            lock_released,
            lock_waits: parking_lot::Mutex::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            readiness: tokio::sync::Mutex::new(None),
            pace: pace::WritePace::new(),
        })
    }

    /// Whether this instance should be sent requests: not shutting down,
    /// and its database and blob store answer (each within [`READY_WITHIN`];
    /// what failed is logged, the answer only says which). One look at a
    /// time, its answer reused for [`READY_KEPT`]: the endpoint needs no
    /// login, and a flood of asks must not queue work on the database.
    pub async fn ready(&self) -> std::result::Result<(), NotReady> {
        if self.draining() {
            return Err(NotReady::Draining);
        }
        let mut last = self.readiness.lock().await;
        if let Some((at, answer)) = *last {
            if at.elapsed() < READY_KEPT {
                return answer;
            }
        }
        let answer = self.look_ready().await;
        *last = Some((Instant::now(), answer));
        answer
    }

    async fn look_ready(&self) -> std::result::Result<(), NotReady> {
        match tokio::time::timeout(READY_WITHIN, self.db(|m| m.setting(""))).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "not ready: the database failed");
                return Err(NotReady::Database);
            }
            Err(_) => {
                tracing::warn!("not ready: the database did not answer in time");
                return Err(NotReady::Database);
            }
        }
        match tokio::time::timeout(READY_WITHIN, self.blobs.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "not ready: the blob store failed");
                Err(NotReady::BlobStore)
            }
            Err(_) => {
                tracing::warn!("not ready: the blob store did not answer in time");
                Err(NotReady::BlobStore)
            }
        }
    }

    /// The server begins to shut down: readiness fails from now on, and
    /// waits for changes and for locks are answered at once (they would
    /// hold the shutdown for their whole time).
    pub fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        self.written.send_modify(|n| *n = n.wrapping_add(1));
        self.lock_released.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether [`Service::drain`] was called.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs an administrative operation on the metadata store (users, limits).
    pub async fn run_admin<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError> + Send + 'static,
    ) -> Result<T> {
        self.db(f).await
    }

    /// Runs a metadata operation on the blocking pool.
    async fn db<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError> + Send + 'static,
    ) -> Result<T> {
        let (result, wrote) = on_blocking_pool(self.meta.clone(), f).await?;
        self.note_written(wrote);
        result
    }

    /// [`Service::db`] for a lookup of a few rows by key (a file, a record,
    /// the caller's rights): run right here when nobody holds the store, which
    /// takes microseconds, where the hand-off to the blocking pool and back
    /// took about a tenth of a small upload. Never for a listing or a write
    /// (their time grows with the vault, or with a disk's fsync).
    async fn db_lookup<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError> + Send + 'static,
    ) -> Result<T> {
        match self.meta.run_if_free(f) {
            Ok((result, wrote)) => {
                self.note_written(wrote);
                result.map_err(ServiceError::from)
            }
            Err(f) => self.db(f).await,
        }
    }

    /// [`Service::db`] for a small write (a record): run right here while
    /// small writes have been quick, no other runs in place and nobody holds
    /// the database (SQLite only), saving the hand-off to the blocking pool
    /// and back (see [`pace`]). Timed wherever it runs.
    async fn db_write<T: Send + 'static>(
        &self,
        f: impl Fn(&mut dyn MetaStore) -> std::result::Result<T, MetaError> + Send + 'static,
    ) -> Result<T> {
        let unit = timed(self.pace.clone(), Duration::ZERO, f);
        let Some(leave) = self.in_place() else {
            return self.db(unit).await;
        };
        let here = self.meta.run_if_free(unit);
        drop(leave);
        match here {
            Ok((result, wrote)) => {
                self.note_written(wrote);
                result.map_err(ServiceError::from)
            }
            Err(unit) => self.db(unit).await,
        }
    }

    /// Leave to run a small write right here (see [`pace`]): only on a
    /// database in this process, which waits on no network.
    fn in_place(&self) -> Option<pace::InPlace<'_>> {
        self.meta.in_process().then(|| self.pace.in_place()).flatten()
    }

    /// Wakes the waits for changes after a call that changed a vault.
    fn note_written(&self, wrote: bool) {
        if wrote {
            self.written.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Stores an upload's body as a new blob and commits it with `commit`
    /// (given the blob and its size); on failure the blob is gone again. A
    /// small body of declared length on a store that writes in place (a
    /// local directory) is read whole first, then stored and committed by
    /// one blocking task: a small file's upload makes one hand-off to the
    /// blocking pool instead of two; or, on SQLite while small writes are
    /// quick, none: stored and committed right here (see [`pace`]).
    async fn store_and_commit<T: Send + 'static>(
        &self,
        caller: &Caller,
        body: ByteStream,
        declared: Option<u64>,
        commit: impl Fn(&mut dyn MetaStore, BlobId, u64) -> std::result::Result<T, MetaError> + Send + 'static,
    ) -> Result<(T, u64)> {
        let small = declared.filter(|&len| len <= SMALL_IN_PLACE as u64 && self.blobs.writes_in_place());
        let Some(len) = small else {
            let (blob, size) = self.store_body(caller, body, declared).await?;
            return match self.db(move |m| commit(m, blob, size)).await {
                Ok(done) => Ok((done, size)),
                Err(e) => {
                    self.discard_blob(Some(blob)).await;
                    Err(e)
                }
            };
        };
        let limit = caller.user.limits.upload_limit;
        if len > limit {
            return Err(ServiceError::TooLarge(limit));
        }
        let pieces = read_declared(body, len).await?;
        let blob = BlobId::random().map_err(|e| ServiceError::Internal(e.to_string()))?;
        let (blobs, meta, pace) = (Arc::clone(&self.blobs), self.meta.clone(), self.pace.clone());
        let leave = if len <= pace::IN_PLACE_MAX { self.in_place() } else { None };
        let stored = if let Some(leave) = leave {
            // In place (see `pace`): the blob, then the commit if nobody
            // holds the database, else the commit alone goes to the pool. A
            // panic is caught, as the pool's task would have been.
            let here = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match put_timed(&*blobs, &pace, blob, pieces) {
                    Err(e) => Ok(Err(e.into())),
                    Ok(blob_took) => meta
                        .run_if_free(timed(pace.clone(), blob_took, move |m| commit(m, blob, len)))
                        .map(|(result, wrote)| Ok((result.map_err(ServiceError::from), wrote))),
                }
            }));
            drop(leave);
            match here {
                Ok(Ok(done)) => Ok(done),
                Ok(Err(unit)) => on_blocking_pool(meta, unit).await.map(Ok),
                Err(_) => Err(ServiceError::Internal("a small upload's store failed".into())),
            }
        } else {
            tokio::task::spawn_blocking(move || {
                let blob_took = put_timed(&*blobs, &pace, blob, pieces)?;
                let (result, wrote) = meta.run(timed(pace, blob_took, move |m| commit(m, blob, len)));
                Ok::<_, ServiceError>((result.map_err(ServiceError::from), wrote))
            })
            .await
            .map_err(|e| ServiceError::Internal(format!("metadata task: {e}")))
        };
        match stored {
            Ok(Ok((Ok(done), wrote))) => {
                self.note_written(wrote);
                Ok((done, len))
            }
            Ok(Ok((Err(e), wrote))) => {
                self.note_written(wrote);
                self.discard_blob(Some(blob)).await;
                Err(e)
            }
            Ok(Err(e)) | Err(e) => {
                // Not stored, or stored and not committed (the lock was
                // poisoned, the task failed): the blob is no file's.
                self.discard_blob(Some(blob)).await;
                Err(e)
            }
        }
    }

    /// Removes what uploads this instance was making when it stopped left
    /// (its temporary files, its journal of multipart uploads): only safe
    /// before it serves.
    pub async fn clean_incomplete(&self) -> Result<usize> {
        Ok(self.blobs.clean_incomplete().await?)
    }

    /// Removes staged content never committed ([`STAGED_TTL_MS`]) and blobs
    /// no file points at that were stored more than [`ORPHAN_AGE`] ago
    /// (unless a backup holds them); returns how many blobs went. Safe at
    /// any time and on any number of instances sharing a store: a younger
    /// blob may be an upload about to commit, here or on another instance,
    /// and a blob is stored only moments before its commit (or its staging,
    /// which makes it one in use).
    pub async fn collect_garbage(&self) -> Result<usize> {
        let before = now_ms() - STAGED_TTL_MS;
        let staged = self.db(move |m| m.collect_staged(before)).await?;
        for &blob in &staged {
            self.blobs.delete(blob).await?;
        }
        // Listed before what is in use is read: a blob the listing shows
        // was stored by then, so its commit follows in a moment, before the
        // read below (a long listing of a large bucket leaves no window).
        let listed = self.blobs.list().await?;
        let in_use = self.db(|m| m.blobs_in_use()).await?;
        let old_enough = SystemTime::now() - ORPHAN_AGE;
        let orphans: Vec<BlobId> = listed
            .into_iter()
            .filter(|(id, stored)| *stored < old_enough && !in_use.contains(&id.to_hex()))
            .map(|(id, _)| id)
            .collect();
        // Those a running backup may still copy wait for its end.
        let now = now_ms();
        let free = self.db(move |m| m.release_blobs(&orphans, now)).await?;
        for &id in &free {
            self.blobs.delete(id).await?;
        }
        Ok(staged.len() + free.len())
    }

    // ---- authentication ----------------------------------------------------

    /// Salt and parameters for deriving `user`'s login key. Unknown users get a
    /// stable fake answer, so the endpoint does not reveal which names exist.
    pub async fn prelogin(&self, user: String) -> Result<PreLogin> {
        let found = {
            let name = user.clone();
            self.db(move |m| m.user_by_name(&name)).await?
        };
        Ok(match found {
            Some(u) => PreLogin { salt: Sealed(u.login_salt), kdf: u.kdf, login_version: u.login_version },
            None => PreLogin {
                salt: Sealed(
                    sha256(&[&self.secret, b"prelogin", user.as_bytes()])[..LOGIN_SALT_LEN].to_vec(),
                ),
                kdf: self.config.login_kdf,
                login_version: crate::crypto::login::LOGIN_KEY_VERSION,
            },
        })
    }

    async fn new_session(&self, user_id: i64) -> Result<Session> {
        let mut token = [0u8; 32];
        getrandom::getrandom(&mut token).map_err(|e| ServiceError::Internal(format!("getrandom: {e}")))?;
        let hash = sha256(&[&token]);
        let ttl = self.config.session_ttl_secs;
        let expires = now_secs() + ttl as i64;
        self.db(move |m| m.create_session(user_id, &hash, expires)).await?;
        Ok(Session { token: hex_encode(&token), expires_in_secs: ttl })
    }

    fn check_login_key(key: &Sealed) -> Result<()> {
        if key.0.len() != LOGIN_KEY_LEN {
            return Err(ServiceError::BadRequest(format!("login_key must be {LOGIN_KEY_LEN} bytes")));
        }
        Ok(())
    }

    /// Verifies a login key and opens a session.
    pub async fn login(&self, user: String, login_key: Sealed) -> Result<Session> {
        Self::check_login_key(&login_key)?;
        let found = self.db(move |m| m.user_by_name(&user)).await?;
        let presented = sha256(&[&login_key.0]);
        let ok =
            found.as_ref().and_then(|u| u.login_hash.as_deref()).map(|h| bool::from(h.ct_eq(&presented[..])));
        match (found, ok) {
            (Some(u), Some(true)) => self.new_session(u.id).await,
            _ => Err(ServiceError::Unauthorized),
        }
    }

    /// First login with the admin's one-time code: sets the login key (made
    /// by a client of login-key version `version`).
    pub async fn enroll(
        &self,
        user: String,
        code: String,
        login_key: Sealed,
        version: u8,
    ) -> Result<Session> {
        Self::check_login_key(&login_key)?;
        Self::check_login_version(version)?;
        let found = self.db(move |m| m.user_by_name(&user)).await?;
        let presented = sha256(&[code.as_bytes()]);
        let u = match found {
            Some(u) if u.enroll_hash.as_deref().is_some_and(|h| bool::from(h.ct_eq(&presented[..]))) => u,
            _ => return Err(ServiceError::Unauthorized),
        };
        let login_hash = sha256(&[&login_key.0]);
        let id = u.id;
        self.db(move |m| m.complete_enrollment(id, &login_hash, version)).await?;
        self.new_session(id).await
    }

    fn check_login_version(version: u8) -> Result<()> {
        if !(1..=crate::crypto::login::LOGIN_KEY_VERSION).contains(&version) {
            return Err(ServiceError::BadRequest(format!("unknown login key version {version}")));
        }
        Ok(())
    }

    /// Replaces the caller's login key, given the current one (an old
    /// version's key, upgraded by the client; or a new passphrase's).
    /// Replaces the caller's login key, proving the current one. With a
    /// wallet (a new passphrase), stores it in the same transaction and ends
    /// every other session of the user: returns the wallet's new version.
    pub async fn change_login_key(
        &self,
        caller: &Caller,
        token: &str,
        change: LoginKeyChange,
    ) -> Result<Option<u64>> {
        Self::check_login_key(&change.old_login_key)?;
        Self::check_login_key(&change.new_login_key)?;
        Self::check_login_version(change.login_version)?;
        let (old, new) = (sha256(&[&change.old_login_key.0]), sha256(&[&change.new_login_key.0]));
        let (id, version) = (caller.user.id, change.login_version);
        let Some(Sealed(wallet)) = change.wallet else {
            return match self.db(move |m| m.change_login_key(id, &old, &new, version)).await? {
                true => Ok(None),
                false => Err(ServiceError::Unauthorized),
            };
        };
        if wallet.len() > MAX_WALLET_LEN {
            return Err(ServiceError::TooLarge(MAX_WALLET_LEN as u64));
        }
        let expected = change.wallet_version.ok_or_else(|| {
            ServiceError::BadRequest("a wallet needs the wallet_version it replaces".into())
        })?;
        let keep = sha256(&[&crate::ids::hex_decode(token).ok_or(ServiceError::Unauthorized)?]);
        let keep2 = keep;
        let stored = self
            .db(move |m| m.change_passphrase(id, &old, &new, version, &wallet, expected, &keep2))
            .await?
            .ok_or(ServiceError::Unauthorized)?;
        // The ended sessions must not live on in the cache either.
        self.session_cache().retain(|hash, (user, _)| user.id != id || *hash == keep);
        Ok(Some(stored))
    }

    fn session_cache(&self) -> parking_lot::MutexGuard<'_, HashMap<[u8; 32], (User, Instant)>> {
        self.sessions.lock()
    }

    /// The caller behind a bearer token.
    pub async fn authenticate(&self, token: &str) -> Result<Caller> {
        let raw = crate::ids::hex_decode(token).ok_or(ServiceError::Unauthorized)?;
        let hash = sha256(&[&raw]);
        if let Some((user, _)) =
            self.session_cache().get(&hash).filter(|(_, at)| at.elapsed() < SESSION_CACHE)
        {
            return Ok(Caller { user: user.clone() });
        }
        let now = now_secs();
        let user = self.db(move |m| m.session_user(&hash, now)).await?;
        let user = user.ok_or(ServiceError::Unauthorized)?;
        let mut cache = self.session_cache();
        if cache.len() >= SESSION_CACHE_ENTRIES {
            cache.retain(|_, (_, at)| at.elapsed() < SESSION_CACHE);
        }
        cache.insert(hash, (user.clone(), Instant::now()));
        Ok(Caller { user })
    }

    /// Ends the session of `token`.
    pub async fn logout(&self, token: &str) -> Result<()> {
        let raw = crate::ids::hex_decode(token).ok_or(ServiceError::Unauthorized)?;
        let hash = sha256(&[&raw]);
        self.session_cache().remove(&hash);
        self.db(move |m| m.delete_session(&hash)).await
    }

    /// Who the caller is and what their limits are.
    pub fn me(&self, caller: &Caller) -> Me {
        Me { user: caller.user.name.clone(), limits: caller.user.limits }
    }

    // ---- wallet ------------------------------------------------------------

    /// The caller's sealed wallet and its version.
    pub async fn wallet(&self, caller: &Caller) -> Result<(Vec<u8>, u64)> {
        let id = caller.user.id;
        self.db(move |m| m.wallet(id)).await?.ok_or(ServiceError::NotFound("wallet"))
    }

    /// Stores the caller's wallet; `expected` is `None` to create it.
    pub async fn put_wallet(&self, caller: &Caller, blob: Vec<u8>, expected: Option<u64>) -> Result<u64> {
        if blob.len() > MAX_WALLET_LEN {
            return Err(ServiceError::TooLarge(MAX_WALLET_LEN as u64));
        }
        let id = caller.user.id;
        let version = self.db(move |m| m.put_wallet(id, &blob, expected)).await?;
        // Waits for changes watch the wallet too.
        self.written.send_modify(|n| *n = n.wrapping_add(1));
        Ok(version)
    }

    // ---- user keys ---------------------------------------------------------

    /// Publishes the caller's public key for shares (replacing any). The server
    /// checks only its length: clients check keys by their fingerprints.
    pub async fn put_user_key(&self, caller: &Caller, key: Vec<u8>) -> Result<()> {
        if key.len() != crate::crypto::share::USER_KEY_LEN {
            return Err(ServiceError::BadRequest(format!(
                "a public key is {} bytes, not {}",
                crate::crypto::share::USER_KEY_LEN,
                key.len()
            )));
        }
        let id = caller.user.id;
        self.db(move |m| m.set_public_key(id, &key)).await
    }

    /// The public key `user` published. Any signed-in user may ask (sharing
    /// needs it); an unknown user and one without a key are both 404.
    pub async fn user_key(&self, _caller: &Caller, user: String) -> Result<UserKey> {
        let name = user.clone();
        let key = self.db(move |m| m.public_key(&name)).await?;
        let key = key.ok_or(ServiceError::NotFound("user key"))?;
        Ok(UserKey { user, public_key: Sealed(key) })
    }

    // ---- authorization -----------------------------------------------------

    /// The caller's rights in `vault`, refused below `need`: a lookup by
    /// key, run in place when the database is free ([`Service::db_lookup`]).
    async fn require(
        &self,
        caller: &Caller,
        vault: VaultId,
        need: Rights,
        what: &'static str,
    ) -> Result<Rights> {
        let id = caller.user.id;
        check_rights(self.db_lookup(move |m| m.rights(id, vault)).await?, need, what)
    }

    /// A record and the caller's rights in its vault, in one trip to the database.
    async fn record_checked(&self, caller: &Caller, id: RecordId, need: Rights) -> Result<RecordInfo> {
        let uid = caller.user.id;
        let (record, rights) = self
            .db_lookup(move |m| {
                let record = m.record(id)?;
                let rights = m.rights(uid, record.vault)?;
                Ok((record, rights))
            })
            .await?;
        check_rights(rights, need, "record")?;
        Ok(record)
    }

    /// A file and the caller's rights in its vault, in one trip to the
    /// database; with `e2e_check`, also whether its vault requires end-to-end
    /// encrypted content.
    async fn file_checked_with(
        &self,
        caller: &Caller,
        id: FileId,
        need: Rights,
        e2e_check: bool,
    ) -> Result<(FileRow, bool)> {
        let uid = caller.user.id;
        let (row, rights, e2e_required) = self
            .db_lookup(move |m| {
                let row = m.file(id)?;
                let rights = m.rights(uid, row.info.vault)?;
                let required = e2e_check && rights.is_some() && m.e2e_required(row.info.vault)?;
                Ok((row, rights, required))
            })
            .await?;
        check_rights(rights, need, "file")?;
        Ok((row, e2e_required))
    }

    async fn file_checked(&self, caller: &Caller, id: FileId, need: Rights) -> Result<FileRow> {
        Ok(self.file_checked_with(caller, id, need, false).await?.0)
    }

    // ---- vaults ------------------------------------------------------------

    /// Vaults the caller is a member of.
    pub async fn vaults(&self, caller: &Caller) -> Result<Vec<VaultInfo>> {
        let id = caller.user.id;
        self.db(move |m| m.vaults_of(id)).await
    }

    /// Creates a vault with the caller as its admin.
    pub async fn create_vault(&self, caller: &Caller, v: NewVault) -> Result<VaultInfo> {
        let (uid, vid) = (caller.user.id, v.id);
        self.db(move |m| {
            m.create_vault(uid, &v)?;
            m.vault_of(uid, vid)
        })
        .await
    }

    /// One vault.
    pub async fn vault(&self, caller: &Caller, vault: VaultId) -> Result<VaultInfo> {
        let uid = caller.user.id;
        self.db(move |m| m.vault_of(uid, vault)).await
    }

    /// Renames a vault or changes its flags (admin).
    pub async fn update_vault(
        &self,
        caller: &Caller,
        vault: VaultId,
        expected: u64,
        u: VaultUpdate,
    ) -> Result<VaultInfo> {
        self.require(caller, vault, Rights::Admin, "vault").await?;
        let uid = caller.user.id;
        self.db(move |m| {
            m.update_vault(vault, expected, &u)?;
            m.vault_of(uid, vault)
        })
        .await
    }

    /// Deletes an empty vault (admin).
    pub async fn delete_vault(&self, caller: &Caller, vault: VaultId, expected: u64) -> Result<()> {
        self.require(caller, vault, Rights::Admin, "vault").await?;
        self.db(move |m| m.delete_vault(vault, expected)).await
    }

    /// Members of a vault (any member may look).
    pub async fn members(&self, caller: &Caller, vault: VaultId) -> Result<Vec<Member>> {
        self.require(caller, vault, Rights::Read, "vault").await?;
        self.db(move |m| m.members(vault)).await
    }

    /// Adds a member or changes their rights (admin).
    pub async fn set_member(&self, caller: &Caller, vault: VaultId, member: Member) -> Result<()> {
        self.require(caller, vault, Rights::Admin, "vault").await?;
        self.db(move |m| m.set_member(vault, &member)).await
    }

    /// Removes a member (admin).
    pub async fn remove_member(&self, caller: &Caller, vault: VaultId, user: String) -> Result<()> {
        self.require(caller, vault, Rights::Admin, "vault").await?;
        self.db(move |m| m.remove_member(vault, &user)).await
    }

    /// Each of the caller's vaults with its change number, once they are not
    /// `known` (a vault changed, was added or left) or after `timeout`
    /// (at most [`MAX_WAIT_MS`]): what a client waits on to learn of
    /// changes as they happen, holding one request open.
    pub async fn wait_for_changes(
        &self,
        caller: &Caller,
        known: BTreeMap<VaultId, u64>,
        wallet: Option<u64>,
        timeout: std::time::Duration,
    ) -> Result<crate::protocol::VaultChanges> {
        let deadline =
            tokio::time::Instant::now() + timeout.min(std::time::Duration::from_millis(MAX_WAIT_MS));
        let _slot = {
            let mut waits = self.waits.lock();
            let n = waits.entry(caller.user.id).or_insert(0);
            if *n >= MAX_WAITS {
                return Err(ServiceError::Refused(format!("at most {MAX_WAITS} waits for changes at once")));
            }
            *n += 1;
            WaitSlot { waits: &self.waits, user: caller.user.id }
        };
        let mut written = self.written.subscribe();
        loop {
            // Marked seen before looking: a write after the look wakes the wait.
            written.borrow_and_update();
            let vaults: BTreeMap<VaultId, u64> =
                self.vaults(caller).await?.into_iter().map(|v| (v.id, v.changes)).collect();
            let user = caller.user.id;
            let now_wallet = match wallet {
                Some(_) => self.db(move |m| m.wallet_version(user)).await?,
                None => None,
            };
            let now = crate::protocol::VaultChanges { vaults, wallet: now_wallet };
            if now.vaults != known || wallet.is_some_and(|w| Some(w) != now_wallet) || self.draining() {
                // (Shutting down: answered now, so the wait does not hold
                // the shutdown; the client asks again, elsewhere.)
                return Ok(now);
            }
            match tokio::time::timeout_at(deadline, written.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(now),
            }
        }
    }

    /// What changed in a vault after change `since` (any member), at most
    /// `limit` objects (1 to [`MAX_CHANGES`]).
    pub async fn changes(
        &self,
        caller: &Caller,
        vault: VaultId,
        since: u64,
        limit: usize,
    ) -> Result<Changes> {
        if !(1..=MAX_CHANGES).contains(&limit) {
            return Err(ServiceError::BadRequest(format!("limit must be 1 to {MAX_CHANGES}")));
        }
        self.require(caller, vault, Rights::Read, "vault").await?;
        self.db(move |m| m.changes(vault, since, limit)).await?.ok_or(ServiceError::Relist)
    }

    // ---- records -----------------------------------------------------------

    /// All records of a vault.
    pub async fn records(&self, caller: &Caller, vault: VaultId) -> Result<Vec<RecordInfo>> {
        self.require(caller, vault, Rights::Read, "vault").await?;
        self.db(move |m| m.records(vault)).await
    }

    /// Creates a record.
    pub async fn create_record(&self, caller: &Caller, vault: VaultId, r: NewRecord) -> Result<RecordInfo> {
        self.require(caller, vault, Rights::Write, "vault").await?;
        // A parent must be a record of the same vault, which the store checks
        // in the unit that inserts (NotFound otherwise, as for a parent that
        // does not exist): the caller's rights there are the ones just checked.
        self.db_write(move |m| m.create_record(vault, &r)).await
    }

    /// One record.
    pub async fn record(&self, caller: &Caller, id: RecordId) -> Result<RecordInfo> {
        self.record_checked(caller, id, Rights::Read).await
    }

    /// Changes a record.
    pub async fn update_record(
        &self,
        caller: &Caller,
        id: RecordId,
        expected: u64,
        u: RecordUpdate,
    ) -> Result<RecordInfo> {
        self.record_checked(caller, id, Rights::Write).await?;
        if let Some(target) = u.parent.and_then(|p| p.to) {
            // A parent the caller cannot see is "not found", never "elsewhere".
            self.record_checked(caller, target, Rights::Read).await?;
        }
        self.db(move |m| m.update_record(id, expected, &u)).await
    }

    /// Deletes an empty record.
    pub async fn delete_record(&self, caller: &Caller, id: RecordId, expected: u64) -> Result<()> {
        self.record_checked(caller, id, Rights::Write).await?;
        self.db(move |m| m.delete_record(id, expected)).await
    }

    // ---- files -------------------------------------------------------------

    /// Files of a vault.
    pub async fn vault_files(&self, caller: &Caller, vault: VaultId) -> Result<Vec<FileInfo>> {
        self.require(caller, vault, Rights::Read, "vault").await?;
        self.db(move |m| m.files(vault, None)).await
    }

    /// Files of a record.
    pub async fn record_files(&self, caller: &Caller, record: RecordId) -> Result<Vec<FileInfo>> {
        let r = self.record_checked(caller, record, Rights::Read).await?;
        self.db(move |m| m.files(r.vault, Some(record))).await
    }

    /// Creates an empty file in a record.
    pub async fn create_file(&self, caller: &Caller, record: RecordId, f: NewFile) -> Result<FileInfo> {
        let (uid, now) = (caller.user.id, now_ms());
        // The check and the insert in one trip to the database.
        let (rights, created) = self
            .db(move |m| {
                let rights = m.rights(uid, m.record(record)?.vault)?;
                if check_rights(rights, Rights::Write, "record").is_err() {
                    return Ok((rights, None));
                }
                Ok((rights, Some(m.create_file(record, &f, now)?)))
            })
            .await?;
        check_rights(rights, Rights::Write, "record")?;
        created.ok_or_else(|| ServiceError::Internal("file not created".into()))
    }

    /// One file's metadata.
    pub async fn file(&self, caller: &Caller, id: FileId) -> Result<FileInfo> {
        Ok(self.file_checked(caller, id, Rights::Read).await?.info)
    }

    /// Renames, moves or touches a file.
    pub async fn update_file(
        &self,
        caller: &Caller,
        id: FileId,
        expected: u64,
        u: FileUpdate,
    ) -> Result<FileInfo> {
        self.file_checked(caller, id, Rights::Write).await?;
        if let Some(target) = u.record {
            self.record_checked(caller, target, Rights::Write).await?;
        }
        self.db(move |m| m.update_file(id, expected, &u)).await
    }

    /// Deletes a file and its content.
    pub async fn delete_file(&self, caller: &Caller, id: FileId, expected: u64) -> Result<()> {
        let uid = caller.user.id;
        // The check and the delete in one trip to the database (rm -r sends
        // one request per file), and the blob deleted after the answer.
        let (rights, old) = self
            .db(move |m| {
                let rights = m.rights(uid, m.file(id)?.info.vault)?;
                if check_rights(rights, Rights::Write, "file").is_err() {
                    return Ok((rights, None));
                }
                Ok((rights, Some(m.delete_file(id, expected)?)))
            })
            .await?;
        check_rights(rights, Rights::Write, "file")?;
        self.discard_later(old.flatten());
        Ok(())
    }

    /// Deletes files and records in order, each on its own terms (see
    /// [`Meta::delete_many`]), in one trip to the database: `rm -r` removes
    /// many, and one commit each was most of their cost. The blobs are
    /// deleted after the answer.
    pub async fn delete_many(&self, caller: &Caller, items: Vec<DeleteItem>) -> Result<Vec<DeleteOutcome>> {
        if items.len() > MAX_DELETES {
            return Err(ServiceError::BadRequest(format!("at most {MAX_DELETES} objects per request")));
        }
        let uid = caller.user.id;
        let (outcomes, blobs) = self.db(move |m| m.delete_many(uid, &items)).await?;
        self.discard_later(blobs);
        Ok(outcomes)
    }

    async fn discard_blob(&self, blob: Option<BlobId>) {
        if let Some(blob) = blob {
            delete_replaced(&*self.blobs, blob).await;
        }
    }

    /// Reads a file's content, whole or a byte range (start..end, end exclusive,
    /// clipped to the content; `BadRange` if it starts past the end).
    pub async fn download(
        &self,
        caller: &Caller,
        id: FileId,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Download> {
        // A concurrent upload may replace and delete the blob between reading the
        // metadata and opening the blob; then the metadata is read again.
        for _ in 0..3 {
            let row = self.file_checked(caller, id, Rights::Read).await?;
            let size = row.info.size;
            let resolved = match range {
                None => None,
                Some((start, _)) if start >= size => return Err(ServiceError::BadRange(size)),
                Some((start, end)) => Some((start, end.map_or(size, |e| e.min(size)))),
            };
            let Some(blob) = row.blob else {
                return Ok(Download {
                    stream: Box::pin(futures_util::stream::empty()),
                    range: None,
                    total_len: 0,
                    version: row.info.version,
                    e2e: row.info.e2e,
                });
            };
            match self.blobs.get(blob, resolved).await {
                Ok(BlobRead { stream, total_len }) => {
                    return Ok(Download {
                        stream,
                        range: resolved,
                        total_len,
                        version: row.info.version,
                        e2e: row.info.e2e,
                    })
                }
                Err(BlobError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Internal("file content kept changing while being read".into()))
    }

    /// Replaces a file's content (see the module comment for the protocol).
    pub async fn upload(&self, caller: &Caller, id: FileId, up: Upload) -> Result<UploadResult> {
        self.check_upload(caller, id, up.e2e, Some(up.expected_version), up.conflict_copy.as_ref()).await?;
        let mtime = up.mtime_ms.unwrap_or_else(now_ms);
        let (e2e, meta, expected, copy) = (up.e2e, up.meta, up.expected_version, up.conflict_copy);
        let ((version, old, conflict_copy), size) = self
            .store_and_commit(caller, up.body, up.declared_len, move |m, blob, size| {
                let c = Committed { blob, size, e2e, mtime_ms: mtime, meta: meta.clone() };
                match (m.commit_upload(id, expected, &c), &copy) {
                    // Changed meanwhile, or deleted: the content goes to the
                    // copy (if the record itself is gone, creating the copy
                    // fails and the upload with it).
                    (Err(MetaError::VersionMismatch { .. } | MetaError::NotFound("file")), Some(copy)) => {
                        let (version, old) = m.commit_to_copy(id, copy, &c)?;
                        Ok((version, old, Some(copy.id)))
                    }
                    (committed, _) => committed.map(|(version, old)| (version, old, None)),
                }
            })
            .await?;
        self.discard_later(old);
        Ok(UploadResult { version, size, conflict_copy })
    }

    /// Creates file `f` in `record` with the upload's content: what a new
    /// small file costs in one request and one transaction, instead of a
    /// create and an upload. Checked before any byte is read as an upload is
    /// (write rights in the record's vault, its end-to-end rule); `Exists` if
    /// the id is taken (a request sent again after its answer was lost).
    /// With `new_record` (the vault it goes in, and the record with the id
    /// `record`), the record is created in the same transaction: a new
    /// directory's first file, one request where it took two. Checked as
    /// [`Service::create_record`] checks it (write rights in that vault, a
    /// parent of the same vault); `Exists` if its id is taken.
    pub async fn create_with_content(
        &self,
        caller: &Caller,
        record: RecordId,
        new_record: Option<(VaultId, NewRecord)>,
        f: NewFile,
        up: Upload,
    ) -> Result<UploadResult> {
        let (uid, e2e) = (caller.user.id, up.e2e);
        if new_record.as_ref().is_some_and(|(_, r)| r.id != record) {
            return Err(ServiceError::BadRequest("the new record's id is not the record named".into()));
        }
        let id = f.id;
        let in_vault = new_record.as_ref().map(|(vault, _)| *vault);
        let (rights, e2e_required, taken) = self
            .db_lookup(move |m| {
                let vault = match in_vault {
                    Some(vault) => vault,
                    None => m.record(record)?.vault,
                };
                let rights = m.rights(uid, vault)?;
                let required = !e2e && rights.is_some() && m.e2e_required(vault)?;
                // Taken already (sent again after a lost answer): said before
                // the body is read, not after it was stored.
                let taken = match rights {
                    None => None,
                    Some(_) if in_vault.is_some() && m.record(record).is_ok() => Some("record"),
                    Some(_) => m.file(id).is_ok().then_some("file"),
                };
                Ok((rights, required, taken))
            })
            .await?;
        check_rights(rights, Rights::Write, if in_vault.is_some() { "vault" } else { "record" })?;
        if e2e_required {
            return Err(ServiceError::E2eRequired);
        }
        if let Some(what) = taken {
            return Err(ServiceError::Exists(what));
        }
        let mtime_ms = up.mtime_ms.unwrap_or_else(now_ms);
        let f = NewFile { e2e, mtime_ms: Some(mtime_ms), ..f };
        let meta = up.meta;
        let (version, size) = self
            .store_and_commit(caller, up.body, up.declared_len, move |m, blob, size| {
                let c = Committed { blob, size, e2e, mtime_ms, meta: meta.clone() };
                let new_record = new_record.as_ref().map(|(vault, r)| (*vault, r));
                m.create_with_content(new_record, record, &f, &c)
            })
            .await?;
        Ok(UploadResult { version, size, conflict_copy: None })
    }

    /// The checks before any byte of an upload is read: rights, the vault's
    /// end-to-end rule, the version (unless a conflict copy may take the
    /// content, or none is given), a conflict copy's id.
    async fn check_upload(
        &self,
        caller: &Caller,
        id: FileId,
        e2e: bool,
        expected: Option<u64>,
        conflict_copy: Option<&NewFile>,
    ) -> Result<FileRow> {
        let (row, e2e_required) = self.file_checked_with(caller, id, Rights::Write, !e2e).await?;
        if e2e_required {
            return Err(ServiceError::E2eRequired);
        }
        if let Some(copy) = conflict_copy {
            // The copy is created in the file's record, so that needs write rights too.
            self.record_checked(caller, row.info.record, Rights::Write).await?;
            if copy.id == id {
                return Err(ServiceError::BadRequest("the conflict copy needs a new id".into()));
            }
        } else if expected.is_some_and(|v| v != row.info.version) {
            return Err(ServiceError::VersionConflict { current: row.info.version });
        }
        Ok(row)
    }

    /// Streams an upload's body into a new blob, within the caller's limit
    /// and its declared length; returns the blob and its length.
    async fn store_body(
        &self,
        caller: &Caller,
        body: ByteStream,
        declared: Option<u64>,
    ) -> Result<(BlobId, u64)> {
        let limit = caller.user.limits.upload_limit;
        if declared.is_some_and(|len| len > limit) {
            return Err(ServiceError::TooLarge(limit));
        }
        let blob = BlobId::random().map_err(|e| ServiceError::Internal(e.to_string()))?;
        let size = self.blobs.put(blob, body, limit).await?;
        if declared.is_some_and(|len| len != size) {
            self.discard_blob(Some(blob)).await;
            return Err(ServiceError::BadRequest("body shorter than its declared length".into()));
        }
        Ok((blob, size))
    }

    /// Deletes blobs no file points at any more, after the answer: freeing
    /// a large blob took 50-100 ms here (300 MB on tmpfs), which the writer
    /// would otherwise wait for. While a backup holds them
    /// (`meta/backup.rs`) they are written down instead, and go with the
    /// first ones let go after it. If the server stops first, the next
    /// start collects them.
    fn discard_later(&self, old: impl IntoIterator<Item = BlobId>) {
        let old: Vec<BlobId> = old.into_iter().collect();
        if old.is_empty() {
            return;
        }
        let (blobs, meta) = (Arc::clone(&self.blobs), self.meta.clone());
        tokio::spawn(async move {
            let now = now_ms();
            // (Releasing blobs changes no vault: nothing to wake.)
            let free =
                on_blocking_pool(meta, move |m| m.release_blobs(&old, now)).await.and_then(|(free, _)| free);
            match free {
                Ok(free) => {
                    for blob in free {
                        delete_replaced(&*blobs, blob).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "replaced blobs left for the next start"),
            }
        });
    }

    /// Stores an upload's content without committing it (its manifest is
    /// known only once it was all sent): checked as an upload is, then kept
    /// until [`Service::commit`] names it, or collected after
    /// [`STAGED_TTL_MS`].
    pub async fn stage(&self, caller: &Caller, id: FileId, up: Upload) -> Result<Staged> {
        // A conflict copy is named at the commit; the version is checked now
        // only if the stream could not go to a copy anyway.
        let expected = up.conflict_copy.is_none().then_some(up.expected_version);
        self.check_upload(caller, id, up.e2e, expected, None).await?;
        let (blob, size) = self.store_body(caller, up.body, up.declared_len).await?;
        let mut token = [0u8; 16];
        getrandom::getrandom(&mut token).map_err(|e| ServiceError::Internal(format!("getrandom: {e}")))?;
        let c = Committed { blob, size, e2e: up.e2e, mtime_ms: 0, meta: None };
        let (uid, now) = (caller.user.id, now_ms());
        if let Err(e) = self.db(move |m| m.stage(&token, id, uid, &c, now)).await {
            self.discard_blob(Some(blob)).await;
            return Err(e);
        }
        Ok(Staged { staged: hex_encode(&token), size })
    }

    /// Commits staged content to the file at `expected`, with its manifest;
    /// or to the request's conflict copy if the file moved on.
    pub async fn commit(
        &self,
        caller: &Caller,
        id: FileId,
        expected: u64,
        req: CommitRequest,
    ) -> Result<UploadResult> {
        let token = crate::ids::hex_decode(&req.staged)
            .filter(|t| t.len() == 16)
            .ok_or_else(|| ServiceError::BadRequest("staged must be 32 hex digits".into()))?;
        let row = self.file_checked(caller, id, Rights::Write).await?;
        if let Some(copy) = &req.conflict_copy {
            self.record_checked(caller, row.info.record, Rights::Write).await?;
            if copy.id == id {
                return Err(ServiceError::BadRequest("the conflict copy needs a new id".into()));
            }
        }
        let (uid, mtime) = (caller.user.id, req.mtime_ms.unwrap_or_else(now_ms));
        let copy_id = req.conflict_copy.as_ref().map(|c| c.id);
        let (version, old, size, copied) = self
            .db(move |m| {
                m.commit_staged(&token, id, uid, expected, &req.meta, mtime, req.conflict_copy.as_ref())
            })
            .await?;
        self.discard_later(old);
        Ok(UploadResult { version, size, conflict_copy: copy_id.filter(|_| copied) })
    }
}
