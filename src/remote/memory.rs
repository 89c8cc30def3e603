//! An in-process remote: the real server logic over in-memory storage.
//!
//! [`MemoryServer`] is a complete vault service (SQLite in memory, blobs in a
//! hash map) with no network and no disk; [`MemoryRemote`] is one user's view of
//! it. Because it runs `server::service` itself, it enforces exactly the rules of
//! `vaultfs serve` (versions, conflicts, limits, rights), so filesystem tests
//! against it exercise real behaviour.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::{Content, RemoteError, Result, UploadBody};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::{
    Changes, CommitRequest, FileInfo, FileUpdate, KdfWire, Limits, Me, Member, NewFile, NewRecord, NewVault,
    RecordInfo, RecordUpdate, Sealed, Staged, UploadResult, UserKey, VaultInfo,
};
use crate::server::admin;
use crate::server::blob::MemoryBlobStore;
use crate::server::meta::Meta;
use crate::server::service::{Caller, Service, ServiceConfig, ServiceError, Upload};

impl From<ServiceError> for RemoteError {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::BadRequest(_) | ServiceError::PreconditionRequired => RemoteError::Protocol(msg),
            ServiceError::Unauthorized => RemoteError::Unauthorized(msg),
            ServiceError::Forbidden(_) => RemoteError::Forbidden(msg),
            ServiceError::E2eRequired => RemoteError::E2eRequired,
            ServiceError::NotFound(_) => RemoteError::NotFound(msg),
            ServiceError::Exists(_) => RemoteError::Exists(msg),
            ServiceError::Refused(_) => RemoteError::Refused(msg),
            ServiceError::VersionConflict { current } => RemoteError::Conflict { current: Some(current) },
            ServiceError::TooLarge(_) => RemoteError::TooLarge(msg),
            ServiceError::BadRange(_) => RemoteError::BadRange,
            ServiceError::StorageFull => RemoteError::StorageFull,
            ServiceError::Relist => RemoteError::Relist(msg),
            ServiceError::Internal(_) => RemoteError::Unavailable(msg),
        }
    }
}

/// Cheap Argon2id parameters: the memory server never persists anything.
const TEST_KDF: KdfWire = KdfWire { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

/// A vault server in memory.
#[derive(Clone)]
pub struct MemoryServer {
    service: Arc<Service<MemoryBlobStore>>,
    /// The same store the service writes to: tests look at (and tamper with)
    /// what the server holds.
    blobs: MemoryBlobStore,
}

impl MemoryServer {
    /// A fresh, empty server.
    pub fn new() -> Result<Self> {
        let meta = Meta::open(Path::new(":memory:")).map_err(|e| RemoteError::Unavailable(e.to_string()))?;
        let config = ServiceConfig {
            session_ttl_secs: 3600,
            login_kdf: TEST_KDF,
            lock_ttl: crate::server::service::DEFAULT_LOCK_TTL,
        };
        let blobs = MemoryBlobStore::default();
        let service = Service::new(meta, blobs.clone(), config)?;
        Ok(MemoryServer { service: Arc::new(service), blobs })
    }

    /// Changes a user's limits (as `vaultfs admin user limits` does).
    pub async fn set_limits(&self, name: &str, limits: Limits) -> Result<()> {
        let name = name.to_string();
        Ok(self.service.run_admin(move |m| m.set_limits(&name, limits)).await?)
    }

    /// Every blob the server holds (tests look for plaintext in them).
    pub fn stored_blobs(&self) -> Vec<bytes::Bytes> {
        self.blobs.snapshot()
    }

    /// Adds a user with `limits` and returns their remote, already logged in.
    pub async fn add_user(&self, name: &str, limits: Limits) -> Result<MemoryRemote> {
        let name_owned = name.to_string();
        let code = self
            .service
            .run_admin(move |m| admin::add_user(m, &name_owned, limits, TEST_KDF).map_err(admin_to_meta))
            .await?;
        let key = Sealed(vec![0x42; 32]);
        let session = self.service.enroll(name.to_string(), code, key, 2).await?;
        let caller = self.service.authenticate(&session.token).await?;
        Ok(MemoryRemote { service: Arc::clone(&self.service), caller })
    }
}

fn admin_to_meta(e: admin::AdminError) -> crate::server::meta::MetaError {
    match e {
        admin::AdminError::Meta(m) => m,
        other => crate::server::meta::MetaError::Refused(other.to_string()),
    }
}

/// One user's view of a [`MemoryServer`].
#[derive(Clone)]
pub struct MemoryRemote {
    service: Arc<Service<MemoryBlobStore>>,
    caller: Caller,
}

impl super::Remote for MemoryRemote {
    async fn me(&self) -> Result<Me> {
        // Read afresh, as the HTTP server does for each request: an admin may
        // have changed the limits since this remote logged in.
        let name = self.caller.name().to_string();
        let user = self.service.run_admin(move |m| m.user_by_name(&name)).await?;
        let limits = user.map_or(self.caller.limits(), |u| u.limits);
        Ok(Me { user: self.caller.name().to_string(), limits })
    }

    async fn wallet(&self) -> Result<Option<(Vec<u8>, u64)>> {
        match self.service.wallet(&self.caller).await {
            Ok(w) => Ok(Some(w)),
            Err(ServiceError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn wallet_version(&self) -> Result<Option<u64>> {
        Ok(self.wallet().await?.map(|(_, v)| v))
    }

    async fn put_wallet(&self, blob: Vec<u8>, expected: Option<u64>) -> Result<u64> {
        Ok(self.service.put_wallet(&self.caller, blob, expected).await?)
    }

    async fn put_user_key(&self, key: Sealed) -> Result<()> {
        Ok(self.service.put_user_key(&self.caller, key.0).await?)
    }

    async fn user_key(&self, user: &str) -> Result<UserKey> {
        Ok(self.service.user_key(&self.caller, user.to_string()).await?)
    }

    async fn members(&self, vault: VaultId) -> Result<Vec<Member>> {
        Ok(self.service.members(&self.caller, vault).await?)
    }

    async fn set_member(&self, vault: VaultId, member: Member) -> Result<()> {
        Ok(self.service.set_member(&self.caller, vault, member).await?)
    }

    async fn remove_member(&self, vault: VaultId, user: &str) -> Result<()> {
        Ok(self.service.remove_member(&self.caller, vault, user.to_string()).await?)
    }

    async fn vaults(&self) -> Result<Vec<VaultInfo>> {
        Ok(self.service.vaults(&self.caller).await?)
    }

    async fn create_vault(&self, vault: NewVault) -> Result<VaultInfo> {
        Ok(self.service.create_vault(&self.caller, vault).await?)
    }

    async fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>> {
        Ok(self.service.records(&self.caller, vault).await?)
    }

    async fn create_record(&self, vault: VaultId, record: NewRecord) -> Result<RecordInfo> {
        Ok(self.service.create_record(&self.caller, vault, record).await?)
    }

    async fn update_record(&self, id: RecordId, expected: u64, update: RecordUpdate) -> Result<RecordInfo> {
        Ok(self.service.update_record(&self.caller, id, expected, update).await?)
    }

    async fn delete_record(&self, id: RecordId, expected: u64) -> Result<()> {
        Ok(self.service.delete_record(&self.caller, id, expected).await?)
    }

    async fn delete_many(
        &self,
        items: Vec<crate::protocol::DeleteItem>,
    ) -> Result<Vec<crate::protocol::DeleteOutcome>> {
        Ok(self.service.delete_many(&self.caller, items).await?)
    }

    async fn files(&self, vault: VaultId) -> Result<Vec<FileInfo>> {
        Ok(self.service.vault_files(&self.caller, vault).await?)
    }

    async fn wait_for_changes(
        &self,
        known: std::collections::BTreeMap<VaultId, u64>,
        wallet: Option<u64>,
        timeout: std::time::Duration,
    ) -> Result<crate::protocol::VaultChanges> {
        Ok(self.service.wait_for_changes(&self.caller, known, wallet, timeout).await?)
    }

    async fn changes(&self, vault: VaultId, since: u64) -> Result<Changes> {
        Ok(self.service.changes(&self.caller, vault, since, crate::server::service::MAX_CHANGES).await?)
    }

    async fn file(&self, id: FileId) -> Result<FileInfo> {
        Ok(self.service.file(&self.caller, id).await?)
    }

    async fn create_file(&self, record: RecordId, file: NewFile) -> Result<FileInfo> {
        Ok(self.service.create_file(&self.caller, record, file).await?)
    }

    async fn update_file(&self, id: FileId, expected: u64, update: FileUpdate) -> Result<FileInfo> {
        Ok(self.service.update_file(&self.caller, id, expected, update).await?)
    }

    async fn delete_file(&self, id: FileId, expected: u64) -> Result<()> {
        Ok(self.service.delete_file(&self.caller, id, expected).await?)
    }

    async fn set_locks(
        &self,
        file: FileId,
        req: crate::protocol::SetLocks,
    ) -> Result<crate::protocol::LockAnswer> {
        Ok(self.service.set_locks(&self.caller, file, req).await?)
    }

    async fn file_locks(&self, file: FileId) -> Result<Vec<crate::protocol::HeldLock>> {
        Ok(self.service.file_locks(&self.caller, file).await?)
    }

    async fn renew_locks(
        &self,
        holder: crate::ids::HolderId,
        held: Vec<crate::protocol::LockOwnerOf>,
    ) -> Result<crate::protocol::LocksRenewed> {
        Ok(self.service.renew_locks(&self.caller, holder, held).await?)
    }

    async fn drop_locks(&self, holder: crate::ids::HolderId) -> Result<crate::protocol::LocksRenewed> {
        Ok(self.service.drop_locks(&self.caller, holder).await?)
    }

    async fn download(&self, id: FileId, range: Option<Range<u64>>) -> Result<Content> {
        let d = self.service.download(&self.caller, id, range.map(|r| (r.start, Some(r.end)))).await?;
        Ok(Content { stream: d.stream, total_len: d.total_len, version: d.version, e2e: d.e2e })
    }

    async fn upload(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        mtime_ms: Option<i64>,
        body: UploadBody,
    ) -> Result<UploadResult> {
        let up = Upload {
            expected_version: expected,
            e2e,
            mtime_ms,
            declared_len: body.len,
            conflict_copy: body.conflict_copy,
            meta: body.meta,
            body: body.stream,
        };
        Ok(self.service.upload(&self.caller, id, up).await?)
    }

    async fn create_with_content(
        &self,
        record: RecordId,
        new_record: Option<(VaultId, NewRecord)>,
        file: NewFile,
        body: UploadBody,
    ) -> Result<UploadResult> {
        let up = Upload {
            expected_version: 0,
            e2e: file.e2e,
            mtime_ms: file.mtime_ms,
            declared_len: body.len,
            conflict_copy: None,
            meta: Some(file.meta.clone()),
            body: body.stream,
        };
        Ok(self.service.create_with_content(&self.caller, record, new_record, file, up).await?)
    }

    async fn stage(&self, id: FileId, expected: u64, e2e: bool, body: UploadBody) -> Result<Staged> {
        let up = Upload {
            expected_version: expected,
            e2e,
            mtime_ms: None,
            declared_len: body.len,
            conflict_copy: body.conflict_copy,
            meta: None,
            body: body.stream,
        };
        Ok(self.service.stage(&self.caller, id, up).await?)
    }

    async fn commit(&self, id: FileId, expected: u64, request: CommitRequest) -> Result<UploadResult> {
        Ok(self.service.commit(&self.caller, id, expected, request).await?)
    }
}
