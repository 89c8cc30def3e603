//! Blob storage: the bytes of file contents, named by server-chosen ids.
//!
//! The metadata store decides which blob a file points to; a blob store only
//! keeps bytes. A blob is written completely and made durable *before* the
//! metadata points at it, and every upload gets a fresh blob id, so a reader
//! holding the old id never sees a half-written or mixed blob, and a crash at any
//! point leaves the old version intact (docs/API.md, "Durability").
//!
//! [`LocalBlobStore`] keeps blobs as files: written under `tmp/`, fsync'd,
//! renamed into `blobs/xx/`, and the directory fsync'd. Blob ids are 128 random
//! bits generated here and rendered as hex, so nothing from a request ever
//! becomes part of a path. An S3-compatible store implements the same trait.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::ids::{hex_encode, parse_hex_array};

pub use crate::protocol::ByteStream;

/// Server-chosen name of a stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobId(pub [u8; 16]);

impl BlobId {
    /// A fresh random blob id.
    pub fn random() -> io::Result<Self> {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b).map_err(io::Error::other)?;
        Ok(BlobId(b))
    }

    /// Hex form, as stored in the metadata.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// Parses the hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        parse_hex_array(s).map(BlobId)
    }
}

/// Errors from a blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with that id.
    #[error("blob not found")]
    NotFound,
    /// The body was longer than the limit; nothing was stored.
    #[error("upload exceeds the limit of {0} bytes")]
    TooLarge(u64),
    /// The storage device is full; nothing was stored.
    #[error("storage is full")]
    Full,
    /// The request body failed while streaming (client went away, say).
    #[error("upload body failed: {0}")]
    Body(String),
    /// The requested range lies outside the blob.
    #[error("range not satisfiable")]
    BadRange,
    /// Any other I/O failure.
    #[error("blob storage I/O error: {0}")]
    Io(io::Error),
}

impl From<io::Error> for BlobError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull {
            BlobError::Full
        } else {
            BlobError::Io(e)
        }
    }
}

/// What a read returns: the bytes asked for, and the blob's whole length.
pub struct BlobRead {
    /// The requested bytes.
    pub stream: ByteStream,
    /// Length of the whole blob.
    pub total_len: u64,
}

/// Where blobs live. Implementations must make `put` atomic and durable: the blob
/// exists under `id` only once complete and synced.
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `body` under `id`; fails with `TooLarge` (storing nothing) as soon
    /// as more than `limit` bytes arrive. Returns the stored length.
    fn put(
        &self,
        id: BlobId,
        body: ByteStream,
        limit: u64,
    ) -> impl Future<Output = Result<u64, BlobError>> + Send;
    /// Reads `range` (start..end, clipped by the caller) or the whole blob.
    fn get(
        &self,
        id: BlobId,
        range: Option<(u64, u64)>,
    ) -> impl Future<Output = Result<BlobRead, BlobError>> + Send;
    /// Removes a blob; removing a missing blob is not an error.
    fn delete(&self, id: BlobId) -> impl Future<Output = Result<(), BlobError>> + Send;
    /// Every stored blob (for garbage collection at startup).
    fn list(&self) -> impl Future<Output = Result<Vec<BlobId>, BlobError>> + Send;
    /// Removes leftovers of uploads interrupted by a crash.
    fn clean_incomplete(&self) -> impl Future<Output = Result<usize, BlobError>> + Send;
}

/// Blobs as files in a directory.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

/// Write buffer for uploads: large, so a 300 MB upload costs few syscalls.
const WRITE_BUFFER: usize = 1 << 20;
/// Read size for downloads: one chunk of the vault format per read.
const READ_CHUNK: usize = 64 * 1024;

impl LocalBlobStore {
    /// Opens (creating if needed) a store under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(LocalBlobStore { root: root.to_path_buf() })
    }

    fn path(&self, id: BlobId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn tmp_path(&self, id: BlobId) -> PathBuf {
        self.root.join("tmp").join(format!("{}.part", id.to_hex()))
    }

    async fn write_tmp(&self, tmp: &Path, mut body: ByteStream, limit: u64) -> Result<u64, BlobError> {
        let file = tokio::fs::File::create(tmp).await?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut written: u64 = 0;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| BlobError::Body(e.to_string()))?;
            written += piece.len() as u64;
            if written > limit {
                return Err(BlobError::TooLarge(limit));
            }
            out.write_all(&piece).await?;
        }
        out.flush().await?;
        out.into_inner().sync_all().await?;
        Ok(written)
    }
}

async fn sync_dir(dir: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

impl BlobStore for LocalBlobStore {
    async fn put(&self, id: BlobId, body: ByteStream, limit: u64) -> Result<u64, BlobError> {
        let tmp = self.tmp_path(id);
        let written = match self.write_tmp(&tmp, body, limit).await {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let dest = self.path(id);
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
        let placed = async {
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::rename(&tmp, &dest).await?;
            sync_dir(dir).await
        }
        .await;
        if let Err(e) = placed {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        Ok(written)
    }

    async fn get(&self, id: BlobId, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let mut file = match tokio::fs::File::open(self.path(id)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let total_len = file.metadata().await?.len();
        let (start, end) = range.unwrap_or((0, total_len));
        if start > end || end > total_len {
            return Err(BlobError::BadRange);
        }
        file.seek(io::SeekFrom::Start(start)).await?;
        let reader = tokio::io::AsyncReadExt::take(file, end - start);
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK);
        Ok(BlobRead { stream: Box::pin(stream), total_len })
    }

    async fn delete(&self, id: BlobId) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> Result<Vec<BlobId>, BlobError> {
        let mut ids = Vec::new();
        let mut shards = tokio::fs::read_dir(self.root.join("blobs")).await?;
        while let Some(shard) = shards.next_entry().await? {
            if !shard.file_type().await?.is_dir() {
                continue;
            }
            let mut files = tokio::fs::read_dir(shard.path()).await?;
            while let Some(f) = files.next_entry().await? {
                if let Some(id) = f.file_name().to_str().and_then(BlobId::from_hex) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    async fn clean_incomplete(&self) -> Result<usize, BlobError> {
        let mut removed = 0;
        let mut entries = tokio::fs::read_dir(self.root.join("tmp")).await?;
        while let Some(e) = entries.next_entry().await? {
            tokio::fs::remove_file(e.path()).await?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Blobs in memory, for tests and the in-memory remote.
#[derive(Debug, Default, Clone)]
pub struct MemoryBlobStore {
    blobs: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<BlobId, Bytes>>>,
}

impl MemoryBlobStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, std::collections::HashMap<BlobId, Bytes>>, BlobError> {
        self.blobs.lock().map_err(|_| BlobError::Io(io::Error::other("memory blob store lock poisoned")))
    }
}

impl BlobStore for MemoryBlobStore {
    async fn put(&self, id: BlobId, mut body: ByteStream, limit: u64) -> Result<u64, BlobError> {
        let mut data = Vec::new();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| BlobError::Body(e.to_string()))?;
            if (data.len() + piece.len()) as u64 > limit {
                return Err(BlobError::TooLarge(limit));
            }
            data.extend_from_slice(&piece);
        }
        let len = data.len() as u64;
        self.lock()?.insert(id, Bytes::from(data));
        Ok(len)
    }

    async fn get(&self, id: BlobId, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let data = self.lock()?.get(&id).cloned().ok_or(BlobError::NotFound)?;
        let total_len = data.len() as u64;
        let (start, end) = range.unwrap_or((0, total_len));
        if start > end || end > total_len {
            return Err(BlobError::BadRange);
        }
        let part = data.slice(start as usize..end as usize);
        Ok(BlobRead { stream: Box::pin(futures_util::stream::iter([Ok(part)])), total_len })
    }

    async fn delete(&self, id: BlobId) -> Result<(), BlobError> {
        self.lock()?.remove(&id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<BlobId>, BlobError> {
        Ok(self.lock()?.keys().copied().collect())
    }

    async fn clean_incomplete(&self) -> Result<usize, BlobError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        let items: Vec<io::Result<Bytes>> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        Box::pin(futures_util::stream::iter(items))
    }

    async fn read_all(read: BlobRead) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = read.stream;
        while let Some(p) = s.next().await {
            out.extend_from_slice(&p.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn put_get_range_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let id = BlobId::random().unwrap();
        assert_eq!(store.put(id, body(&[b"hello ", b"world"]), 100).await.unwrap(), 11);
        assert_eq!(read_all(store.get(id, None).await.unwrap()).await, b"hello world");
        let part = store.get(id, Some((6, 11))).await.unwrap();
        assert_eq!(part.total_len, 11);
        assert_eq!(read_all(part).await, b"world");
        assert!(matches!(store.get(id, Some((5, 12))).await, Err(BlobError::BadRange)));
        assert_eq!(store.list().await.unwrap(), vec![id]);
        store.delete(id).await.unwrap();
        store.delete(id).await.unwrap();
        assert!(matches!(store.get(id, None).await, Err(BlobError::NotFound)));
    }

    #[tokio::test]
    async fn oversized_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let id = BlobId::random().unwrap();
        assert!(matches!(store.put(id, body(&[b"12345", b"6"]), 5).await, Err(BlobError::TooLarge(5))));
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn failed_body_leaves_nothing_and_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let broken: ByteStream = Box::pin(futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(io::Error::other("client went away")),
        ]));
        let id = BlobId::random().unwrap();
        assert!(matches!(store.put(id, broken, 100).await, Err(BlobError::Body(_))));
        assert!(store.list().await.unwrap().is_empty());
        std::fs::write(dir.path().join("tmp/leftover.part"), b"x").unwrap();
        assert_eq!(store.clean_incomplete().await.unwrap(), 1);
    }
}
