//! A remote that fails on demand, for testing how the filesystem copes with a
//! server that is down: wraps any [`Remote`] and, while switched off, answers
//! every call with [`RemoteError::Unavailable`] without reaching the inner one.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{Content, Remote, RemoteError, Result, UploadBody};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::{
    FileInfo, FileUpdate, Me, NewFile, NewRecord, NewVault, RecordInfo, RecordUpdate, UploadResult, VaultInfo,
};

/// A switch shared between a test and its [`FaultyRemote`].
#[derive(Debug, Clone, Default)]
pub struct Outage(Arc<AtomicBool>);

impl Outage {
    /// Takes the server "down" (true) or brings it back (false).
    pub fn set(&self, down: bool) {
        self.0.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<()> {
        if self.0.load(Ordering::SeqCst) {
            Err(RemoteError::Unavailable("injected outage".into()))
        } else {
            Ok(())
        }
    }
}

/// Wraps a remote with an [`Outage`] switch.
#[derive(Clone)]
pub struct FaultyRemote<R> {
    inner: R,
    outage: Outage,
}

impl<R> FaultyRemote<R> {
    /// Wraps `inner`; returns the switch.
    pub fn new(inner: R) -> (Self, Outage) {
        let outage = Outage::default();
        (FaultyRemote { inner, outage: outage.clone() }, outage)
    }
}

impl<R: Remote> Remote for FaultyRemote<R> {
    async fn me(&self) -> Result<Me> {
        self.outage.check()?;
        self.inner.me().await
    }
    async fn wallet(&self) -> Result<Option<(Vec<u8>, u64)>> {
        self.outage.check()?;
        self.inner.wallet().await
    }
    async fn put_wallet(&self, blob: Vec<u8>, expected: Option<u64>) -> Result<u64> {
        self.outage.check()?;
        self.inner.put_wallet(blob, expected).await
    }
    async fn vaults(&self) -> Result<Vec<VaultInfo>> {
        self.outage.check()?;
        self.inner.vaults().await
    }
    async fn create_vault(&self, vault: NewVault) -> Result<VaultInfo> {
        self.outage.check()?;
        self.inner.create_vault(vault).await
    }
    async fn records(&self, vault: VaultId) -> Result<Vec<RecordInfo>> {
        self.outage.check()?;
        self.inner.records(vault).await
    }
    async fn create_record(&self, vault: VaultId, record: NewRecord) -> Result<RecordInfo> {
        self.outage.check()?;
        self.inner.create_record(vault, record).await
    }
    async fn update_record(&self, id: RecordId, expected: u64, update: RecordUpdate) -> Result<RecordInfo> {
        self.outage.check()?;
        self.inner.update_record(id, expected, update).await
    }
    async fn delete_record(&self, id: RecordId, expected: u64) -> Result<()> {
        self.outage.check()?;
        self.inner.delete_record(id, expected).await
    }
    async fn files(&self, vault: VaultId) -> Result<Vec<FileInfo>> {
        self.outage.check()?;
        self.inner.files(vault).await
    }
    async fn file(&self, id: FileId) -> Result<FileInfo> {
        self.outage.check()?;
        self.inner.file(id).await
    }
    async fn create_file(&self, record: RecordId, file: NewFile) -> Result<FileInfo> {
        self.outage.check()?;
        self.inner.create_file(record, file).await
    }
    async fn update_file(&self, id: FileId, expected: u64, update: FileUpdate) -> Result<FileInfo> {
        self.outage.check()?;
        self.inner.update_file(id, expected, update).await
    }
    async fn delete_file(&self, id: FileId, expected: u64) -> Result<()> {
        self.outage.check()?;
        self.inner.delete_file(id, expected).await
    }
    async fn download(&self, id: FileId, range: Option<Range<u64>>) -> Result<Content> {
        self.outage.check()?;
        self.inner.download(id, range).await
    }
    async fn upload(
        &self,
        id: FileId,
        expected: u64,
        e2e: bool,
        mtime_ms: Option<i64>,
        body: UploadBody,
    ) -> Result<UploadResult> {
        self.outage.check()?;
        self.inner.upload(id, expected, e2e, mtime_ms, body).await
    }
}
