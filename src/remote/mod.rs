//! The client side of the vault server: what the filesystem core talks to.
//!
//! [`Remote`] is the interface; [`http::HttpRemote`] speaks HTTPS to a real
//! `vaultfs serve` (rustls, pinned certificate, pooled connections, timeouts,
//! retries for idempotent requests, automatic re-login), and
//! [`memory::MemoryRemote`] runs the very same server logic in process, with no
//! network and no disk, for tests of the filesystem core; it and the
//! failure-injecting [`faulty`] remote are test doubles, built only for tests
//! and fuzzing (the `testing` feature). Errors are typed
//! ([`RemoteError`]) so the filesystem can map each to an errno.
//!
//! Everything crossing this boundary is already sealed: names, titles and fields
//! as `Sealed` blobs, end-to-end file content as vault-format ciphertext.

pub mod account;
#[cfg(any(test, feature = "testing"))]
pub mod faulty;
pub mod http;
pub mod keys_in_use;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod migrate;
pub mod pins;
pub mod rekey;
pub mod sharing;
pub mod tls;

use std::future::Future;
use std::ops::Range;

use crate::ids::{FileId, HolderId, RecordId, VaultId};
use crate::protocol::{
    ByteStream, Changes, CommitRequest, FileInfo, FileUpdate, HeldLock, LockAnswer, LockOwnerOf,
    LocksRenewed, Me, Member, NewFile, NewRecord, NewVault, RecordInfo, RecordUpdate, Sealed, SetLocks,
    Staged, UploadResult, UserKey, VaultInfo,
};

/// Errors a remote reports; each maps to one errno in the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// The object does not exist or is not visible to this user (ENOENT).
    #[error("not found: {0}")]
    NotFound(String),
    /// The object changed since we read it (412): keep both copies.
    #[error("version conflict (current version {current:?})")]
    Conflict {
        /// The server's current version, if it said.
        current: Option<u64>,
    },
    /// An object with that id already exists (EEXIST).
    #[error("already exists: {0}")]
    Exists(String),
    /// The change is not possible now, e.g. a record that is not empty (ENOTEMPTY).
    #[error("refused: {0}")]
    Refused(String),
    /// Over the upload limit (EFBIG).
    #[error("too large: {0}")]
    TooLarge(String),
    /// Not allowed for this user (EACCES).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The vault accepts only end-to-end encrypted files (EACCES).
    #[error("this vault accepts only end-to-end encrypted files")]
    E2eRequired,
    /// Credentials rejected (EACCES).
    #[error("not authorized: {0}")]
    Unauthorized(String),
    /// The server's storage is full (ENOSPC).
    #[error("the server's storage is full")]
    StorageFull,
    /// The requested range is outside the content (EINVAL).
    #[error("range not satisfiable")]
    BadRange,
    /// The server cannot be reached or failed, after retries (EIO, or EAGAIN).
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server answered something we do not understand (EIO).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A vault's changes since the number asked for are not kept (or that
    /// number is ahead of the vault): list it whole (EIO if it gets this far).
    #[error("list the vault again: {0}")]
    Relist(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, RemoteError>;

/// Downloaded content.
pub struct Content {
    /// The bytes asked for.
    pub stream: ByteStream,
    /// Length of the whole content.
    pub total_len: u64,
    /// The file's version.
    pub version: u64,
    /// Whether the content is end-to-end encrypted.
    pub e2e: bool,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("total_len", &self.total_len)
            .field("version", &self.version)
            .field("e2e", &self.e2e)
            .finish_non_exhaustive()
    }
}

/// Content to upload: its length if known, and the bytes.
pub struct UploadBody {
    /// Exact length if known (sent as Content-Length, so the server can refuse
    /// early); `None` for a stream whose end is not known yet (chunked).
    pub len: Option<u64>,
    /// The bytes.
    pub stream: ByteStream,
    /// If set and the file changed meanwhile, the server stores the content as
    /// this new file next to it instead of refusing: for streams, which cannot
    /// be sent a second time.
    pub conflict_copy: Option<NewFile>,
    /// The content's sealed manifest, when it is known before the content is
    /// sent (end-to-end content); staged content gets it at the commit.
    pub meta: Option<Sealed>,
}

impl UploadBody {
    /// A body from bytes in memory.
    pub fn from_bytes(data: impl Into<bytes::Bytes>) -> Self {
        let data = data.into();
        UploadBody {
            len: Some(data.len() as u64),
            stream: Box::pin(futures_util::stream::iter([Ok(data)])),
            conflict_copy: None,
            meta: None,
        }
    }

    /// The same body with `meta` as its manifest.
    pub fn with_meta(mut self, meta: Sealed) -> Self {
        self.meta = Some(meta);
        self
    }
}

/// Collects a byte stream into memory (for tests and small reads).
pub async fn collect(mut stream: ByteStream) -> std::io::Result<Vec<u8>> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out)
}

/// The operations the filesystem needs from a vault server, as one user.
pub trait Remote: Send + Sync + 'static {
    /// The user and their limits.
    fn me(&self) -> impl Future<Output = Result<Me>> + Send;
    /// The sealed wallet and its version, if stored.
    fn wallet(&self) -> impl Future<Output = Result<Option<(Vec<u8>, u64)>>> + Send;
    /// The version of the stored wallet, if one is stored (without its bytes:
    /// a mount asks this often, to notice another client's change).
    fn wallet_version(&self) -> impl Future<Output = Result<Option<u64>>> + Send;
    /// Stores the sealed wallet; `expected` is `None` to create it.
    fn put_wallet(&self, blob: Vec<u8>, expected: Option<u64>) -> impl Future<Output = Result<u64>> + Send;
    /// Publishes this user's public key for shares.
    fn put_user_key(&self, key: Sealed) -> impl Future<Output = Result<()>> + Send;
    /// The public key `user` published (NotFound: no such user, or no key).
    fn user_key(&self, user: &str) -> impl Future<Output = Result<UserKey>> + Send;
    /// The members of a vault, with their wrapped keys.
    fn members(&self, vault: VaultId) -> impl Future<Output = Result<Vec<Member>>> + Send;
    /// Adds a member or changes their rights and wrapped key (admin).
    fn set_member(&self, vault: VaultId, member: Member) -> impl Future<Output = Result<()>> + Send;
    /// Removes a member (admin).
    fn remove_member(&self, vault: VaultId, user: &str) -> impl Future<Output = Result<()>> + Send;
    /// Vaults this user is a member of.
    fn vaults(&self) -> impl Future<Output = Result<Vec<VaultInfo>>> + Send;
    /// Creates a vault.
    fn create_vault(&self, vault: NewVault) -> impl Future<Output = Result<VaultInfo>> + Send;
    /// All records of a vault.
    fn records(&self, vault: VaultId) -> impl Future<Output = Result<Vec<RecordInfo>>> + Send;
    /// Creates a record.
    fn create_record(
        &self,
        vault: VaultId,
        record: NewRecord,
    ) -> impl Future<Output = Result<RecordInfo>> + Send;
    /// Changes a record if it is still at `expected`.
    fn update_record(
        &self,
        id: RecordId,
        expected: u64,
        update: RecordUpdate,
    ) -> impl Future<Output = Result<RecordInfo>> + Send;
    /// Deletes an empty record if it is still at `expected`.
    fn delete_record(&self, id: RecordId, expected: u64) -> impl Future<Output = Result<()>> + Send;
    /// All files of a vault.
    fn files(&self, vault: VaultId) -> impl Future<Output = Result<Vec<FileInfo>>> + Send;
    /// Each of the user's vaults with its change number (and the wallet's
    /// version), once they are not `known` (or the wallet's version is not
    /// `wallet`, if given) or after `timeout` (the server holds the request
    /// meanwhile).
    fn wait_for_changes(
        &self,
        known: std::collections::BTreeMap<VaultId, u64>,
        wallet: Option<u64>,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<crate::protocol::VaultChanges>> + Send;
    /// What changed in a vault after its change `since`: one page
    /// ([`RemoteError::Relist`] when the server keeps no such history).
    fn changes(&self, vault: VaultId, since: u64) -> impl Future<Output = Result<Changes>> + Send;
    /// One file's metadata.
    fn file(&self, id: FileId) -> impl Future<Output = Result<FileInfo>> + Send;
    /// Creates an empty file in a record.
    fn create_file(&self, record: RecordId, file: NewFile) -> impl Future<Output = Result<FileInfo>> + Send;
    /// Renames, moves or touches a file if it is still at `expected`.
    fn update_file(
        &self,
        id: FileId,
        expected: u64,
        update: FileUpdate,
    ) -> impl Future<Output = Result<FileInfo>> + Send;
    /// Deletes a file if it is still at `expected`.
    fn delete_file(&self, id: FileId, expected: u64) -> impl Future<Output = Result<()>> + Send;
    /// Deletes files and records in order, each if it is still at the
    /// version named (a record: and empty by then), in one request; one
    /// outcome per item, in order (a server may lie: the caller checks the
    /// count). `NotFound` from a server that does not know the request.
    fn delete_many(
        &self,
        items: Vec<crate::protocol::DeleteItem>,
    ) -> impl Future<Output = Result<Vec<crate::protocol::DeleteOutcome>>> + Send;
    /// Makes what one lock owner of a mount holds on a file exactly
    /// `req.ranges`, waiting up to `req.wait_ms` for conflicting locks to go.
    fn set_locks(&self, file: FileId, req: SetLocks) -> impl Future<Output = Result<LockAnswer>> + Send;
    /// The locks held on a file, by anyone.
    fn file_locks(&self, file: FileId) -> impl Future<Output = Result<Vec<HeldLock>>> + Send;
    /// Keeps the locks of mount `holder` on the (file, owner) pairs `held`
    /// names for another lock lifetime, and drops its others.
    fn renew_locks(
        &self,
        holder: HolderId,
        held: Vec<LockOwnerOf>,
    ) -> impl Future<Output = Result<LocksRenewed>> + Send;
    /// Gives up every lock of mount `holder`.
    fn drop_locks(&self, holder: HolderId) -> impl Future<Output = Result<LocksRenewed>> + Send;
    /// Reads content, whole or a byte range.
    fn download(&self, id: FileId, range: Option<Range<u64>>)
        -> impl Future<Output = Result<Content>> + Send;
    /// Replaces content if the file is still at `expected`.
    fn upload(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        mtime_ms: Option<i64>,
        body: UploadBody,
    ) -> impl Future<Output = Result<UploadResult>> + Send;
    /// Creates `file` in `record` with `body` as its content, in one request
    /// (`file.meta` is the content's sealed manifest). `Exists` if the id is
    /// taken (sent again after a lost answer); `NotFound` if the record is
    /// gone, or from a server that does not know the request (an older one).
    /// With `new_record` (its vault, and the record with the id `record`),
    /// the record is created in the same request; `Exists` also if its id is
    /// taken, and `NotFound` also from a server that does not know that.
    fn create_with_content(
        &self,
        record: RecordId,
        new_record: Option<(VaultId, NewRecord)>,
        file: NewFile,
        body: UploadBody,
    ) -> impl Future<Output = Result<UploadResult>> + Send;
    /// Stores content for file `id` without committing it (its manifest is
    /// known only once it was all sent); `expected` is checked at once unless
    /// the body names a conflict copy. [`Remote::commit`] makes it the file's.
    fn stage(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        body: UploadBody,
    ) -> impl Future<Output = Result<Staged>> + Send;
    /// Makes staged content file `id`'s if it is still at `expected` (or the
    /// request's conflict copy's), with its manifest.
    fn commit(
        &self,
        id: FileId,
        expected: u64,
        request: CommitRequest,
    ) -> impl Future<Output = Result<UploadResult>> + Send;
}
