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
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::ids::{hex_encode, parse_hex_array};

pub use crate::protocol::ByteStream;

/// Server-chosen name of a stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Every stored blob, with when it was stored (garbage collection takes
    /// only blobs old enough to be no upload's that is about to commit).
    fn list(&self) -> impl Future<Output = Result<Vec<(BlobId, SystemTime)>, BlobError>> + Send;
    /// Removes leftovers of uploads interrupted by a crash.
    fn clean_incomplete(&self) -> impl Future<Output = Result<usize, BlobError>> + Send;
    /// Whether the store answers (readiness): one cheap request, no data.
    fn probe(&self) -> impl Future<Output = Result<(), BlobError>> + Send;
    /// Whether [`BlobStore::put_in_place`] stores on the calling thread (a
    /// local directory): then a small upload's blob and its commit take one
    /// blocking task.
    fn writes_in_place(&self) -> bool {
        false
    }
    /// Stores `pieces` under `id` on the calling thread, which may block (it
    /// runs on the blocking pool, or on an async worker while small writes
    /// are quick: see `service::pace`), where [`BlobStore::writes_in_place`];
    /// a store that only writes asynchronously refuses.
    fn put_in_place(&self, _id: BlobId, _pieces: Vec<Bytes>) -> Result<u64, BlobError> {
        Err(BlobError::Io(io::Error::other("this blob store does not write in place")))
    }
}

/// Blobs as files in a directory.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

/// Bodies up to this size are collected in memory and stored by one blocking
/// task (create, write, fsync, rename, fsync the directory): most uploads are
/// small files, and each hop to the blocking pool cost more than the write.
const SMALL_BODY: usize = 1 << 20;
/// Larger bodies go to a writer thread in batches of about this size (one
/// vectored write each, no copy), through a queue of [`WRITE_QUEUE`] pieces.
const WRITE_BATCH: usize = 1 << 20;
/// Pieces of a large upload queued towards its writer thread: the memory an
/// upload holds on the server is bounded by this many network reads.
const WRITE_QUEUE: usize = 64;
/// Read size for downloads: large pieces, read by one thread per download, so
/// a 300 MB file costs few system calls and no copies between buffers.
const READ_PIECE: usize = 256 << 10;
/// Pieces read ahead of the connection.
const READ_QUEUE: usize = 4;

/// What the writer thread of a large upload is told.
enum Write {
    Piece(Bytes),
    /// The body ended as it should: make the blob durable.
    Finish,
}

impl LocalBlobStore {
    /// Opens (creating if needed) a store under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(LocalBlobStore { root: root.to_path_buf() })
    }

    /// A store over the blobs already under `root`, creating nothing (a
    /// backup being restored, which may be read-only).
    pub fn open_existing(root: &Path) -> io::Result<Self> {
        if !std::fs::symlink_metadata(root.join("blobs"))?.is_dir() {
            return Err(io::Error::other(format!("{}/blobs is not a directory", root.display())));
        }
        Ok(LocalBlobStore { root: root.to_path_buf() })
    }

    fn path(&self, id: BlobId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn tmp_path(&self, id: BlobId) -> PathBuf {
        self.root.join("tmp").join(format!("{}.part", id.to_hex()))
    }
}

/// Writes every piece, with as few system calls as the pieces allow.
fn write_pieces(file: &mut std::fs::File, pieces: &mut Vec<Bytes>) -> io::Result<()> {
    use std::io::Write as _;
    let mut pieces: std::collections::VecDeque<Bytes> = std::mem::take(pieces).into();
    while !pieces.is_empty() {
        let slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut n = file.write_vectored(&slices)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = pieces.front_mut() else { break };
            if n >= front.len() {
                n -= front.len();
                pieces.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// Makes `tmp` durable and gives it its final name (blocking).
fn place(file: std::fs::File, tmp: &Path, dest: &Path) -> io::Result<()> {
    file.sync_all()?;
    drop(file);
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::rename(tmp, dest)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Stores `pieces` as the blob at `dest` in one go (blocking).
fn store_whole(tmp: &Path, dest: &Path, mut pieces: Vec<Bytes>) -> io::Result<()> {
    let mut file = std::fs::File::create(tmp)?;
    write_pieces(&mut file, &mut pieces)?;
    place(file, tmp, dest)
}

/// The writer thread of a large upload: stores what arrives until told to
/// finish; anything else (the sender gone) is an aborted upload.
fn store_streamed(
    tmp: &Path,
    dest: &Path,
    mut rx: tokio::sync::mpsc::Receiver<Write>,
) -> Result<(), BlobError> {
    let mut file = std::fs::File::create(tmp)?;
    let mut batch = Vec::new();
    let mut batched = 0;
    loop {
        match rx.blocking_recv() {
            Some(Write::Piece(p)) => {
                batched += p.len();
                batch.push(p);
                // Write when a batch is full, or when nothing more is waiting.
                if batched >= WRITE_BATCH || rx.is_empty() {
                    write_pieces(&mut file, &mut batch)?;
                    batched = 0;
                }
            }
            Some(Write::Finish) => {
                write_pieces(&mut file, &mut batch)?;
                return Ok(place(file, tmp, dest)?);
            }
            None => return Err(BlobError::Body("the upload was abandoned".into())),
        }
    }
}

fn joined<T>(r: Result<Result<T, BlobError>, tokio::task::JoinError>) -> Result<T, BlobError> {
    r.map_err(|e| BlobError::Io(io::Error::other(format!("blob task: {e}"))))?
}

impl BlobStore for LocalBlobStore {
    async fn put(&self, id: BlobId, mut body: ByteStream, limit: u64) -> Result<u64, BlobError> {
        let (tmp, dest) = (self.tmp_path(id), self.path(id));
        let mut written: u64 = 0;
        let mut next = async |body: &mut ByteStream| -> Result<Option<Bytes>, BlobError> {
            match body.next().await {
                None => Ok(None),
                Some(Err(e)) => Err(BlobError::Body(e.to_string())),
                Some(Ok(piece)) => {
                    written += piece.len() as u64;
                    if written > limit {
                        return Err(BlobError::TooLarge(limit));
                    }
                    Ok(Some(piece))
                }
            }
        };
        // Small bodies: collect, then one blocking task does all the file work.
        let mut head = Vec::new();
        let mut held = 0;
        let mut ended = false;
        while held <= SMALL_BODY {
            match next(&mut body).await? {
                Some(piece) => {
                    held += piece.len();
                    head.push(piece);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            let (t, d) = (tmp.clone(), dest);
            let stored =
                tokio::task::spawn_blocking(move || store_whole(&t, &d, head).map_err(BlobError::from)).await;
            return match joined(stored) {
                Ok(()) => Ok(held as u64),
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Err(e)
                }
            };
        }
        // Large bodies: a writer thread stores pieces while more arrive.
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        let (t, d) = (tmp.clone(), dest);
        let writer = tokio::task::spawn_blocking(move || store_streamed(&t, &d, rx));
        let fed = async {
            for piece in head {
                tx.send(Write::Piece(piece)).await.map_err(|_| BlobError::Body("writer stopped".into()))?;
            }
            while let Some(piece) = next(&mut body).await? {
                tx.send(Write::Piece(piece)).await.map_err(|_| BlobError::Body("writer stopped".into()))?;
            }
            tx.send(Write::Finish).await.map_err(|_| BlobError::Body("writer stopped".into()))
        }
        .await;
        drop(tx);
        // The writer's own error (a full disk, say) explains a stopped writer best.
        let stored = joined(writer.await);
        match (fed, stored) {
            (Ok(()), Ok(())) => Ok(written),
            (Err(e), Ok(())) | (Ok(()), Err(e)) | (Err(BlobError::Body(_)), Err(e)) | (Err(e), Err(_)) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    async fn get(&self, id: BlobId, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let path = self.path(id);
        let opened = tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
            use std::os::unix::fs::OpenOptionsExt as _;
            // A blob is a regular file: never a link followed elsewhere, nor
            // a FIFO that would block the open (a restored backup's blobs
            // come from outside).
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound),
                Err(e) => return Err(e.into()),
            };
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(BlobError::Io(io::Error::other("a blob that is not a regular file")));
            }
            Ok((file, meta.len()))
        })
        .await;
        let (mut file, total_len) = joined(opened)?;
        let (start, end) = range.unwrap_or((0, total_len));
        if start > end || end > total_len {
            return Err(BlobError::BadRange);
        }
        // One thread reads the range in large pieces, a few ahead of the
        // connection; it stops when the download is dropped.
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(READ_QUEUE);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Seek as _};
            let mut at = start;
            if let Err(e) = file.seek(io::SeekFrom::Start(start)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            while at < end {
                let n = (end - at).min(READ_PIECE as u64);
                // Read into fresh capacity, not a zeroed buffer: the file's bytes
                // overwrite it anyway, and zeroing every piece first was a memset
                // of every byte served (std reads into spare capacity as is).
                let mut buf = Vec::with_capacity(n as usize);
                let piece = match (&mut file).take(n).read_to_end(&mut buf) {
                    Ok(0) => {
                        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than its length"))
                    }
                    Ok(got) => {
                        at += got as u64;
                        Ok(Bytes::from(buf))
                    }
                    Err(e) => Err(e),
                };
                let failed = piece.is_err();
                if tx.blocking_send(piece).is_err() || failed {
                    return;
                }
            }
        });
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
        Ok(BlobRead { stream: Box::pin(stream), total_len })
    }

    async fn delete(&self, id: BlobId) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> Result<Vec<(BlobId, SystemTime)>, BlobError> {
        let mut ids = Vec::new();
        let mut shards = tokio::fs::read_dir(self.root.join("blobs")).await?;
        while let Some(shard) = shards.next_entry().await? {
            if !shard.file_type().await?.is_dir() {
                continue;
            }
            let mut files = tokio::fs::read_dir(shard.path()).await?;
            while let Some(f) = files.next_entry().await? {
                if let Some(id) = f.file_name().to_str().and_then(BlobId::from_hex) {
                    match f.metadata().await {
                        Ok(meta) => ids.push((id, meta.modified()?)),
                        // Deleted since the directory was read: not stored.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
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

    async fn probe(&self) -> Result<(), BlobError> {
        if tokio::fs::metadata(self.root.join("blobs")).await?.is_dir() {
            Ok(())
        } else {
            Err(BlobError::Io(io::Error::other("blobs/ is not a directory")))
        }
    }

    fn writes_in_place(&self) -> bool {
        true
    }

    fn put_in_place(&self, id: BlobId, pieces: Vec<Bytes>) -> Result<u64, BlobError> {
        let (tmp, dest) = (self.tmp_path(id), self.path(id));
        let len = pieces.iter().map(|p| p.len() as u64).sum();
        match store_whole(&tmp, &dest, pieces) {
            Ok(()) => Ok(len),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e.into())
            }
        }
    }
}

/// Blobs in memory, for tests and the in-memory remote.
#[derive(Debug, Default, Clone)]
pub struct MemoryBlobStore {
    blobs: std::sync::Arc<std::sync::Mutex<Held>>,
}

/// What a [`MemoryBlobStore`] holds: each blob, and when it was stored.
type Held = std::collections::HashMap<BlobId, (Bytes, SystemTime)>;

impl MemoryBlobStore {
    /// Every blob held now.
    pub fn snapshot(&self) -> Vec<Bytes> {
        self.blobs.lock().map(|b| b.values().map(|(data, _)| data.clone()).collect()).unwrap_or_default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Held>, BlobError> {
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
        self.lock()?.insert(id, (Bytes::from(data), SystemTime::now()));
        Ok(len)
    }

    async fn get(&self, id: BlobId, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let data = self.lock()?.get(&id).map(|(data, _)| data.clone()).ok_or(BlobError::NotFound)?;
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

    async fn list(&self) -> Result<Vec<(BlobId, SystemTime)>, BlobError> {
        Ok(self.lock()?.iter().map(|(id, (_, at))| (*id, *at)).collect())
    }

    async fn clean_incomplete(&self) -> Result<usize, BlobError> {
        Ok(0)
    }

    async fn probe(&self) -> Result<(), BlobError> {
        self.lock().map(drop)
    }

    fn writes_in_place(&self) -> bool {
        true
    }

    fn put_in_place(&self, id: BlobId, pieces: Vec<Bytes>) -> Result<u64, BlobError> {
        let data: Vec<u8> = pieces.concat();
        let len = data.len() as u64;
        self.lock()?.insert(id, (Bytes::from(data), SystemTime::now()));
        Ok(len)
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
        assert_eq!(store.list().await.unwrap().into_iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![id]);
        store.delete(id).await.unwrap();
        store.delete(id).await.unwrap();
        assert!(matches!(store.get(id, None).await, Err(BlobError::NotFound)));
    }

    fn big_body(pieces: usize, piece: usize, fail_at: Option<usize>) -> (ByteStream, Vec<u8>) {
        let mut all = Vec::new();
        let mut items = Vec::new();
        for i in 0..pieces {
            if Some(i) == fail_at {
                items.push(Err(io::Error::other("client went away")));
                break;
            }
            let p: Vec<u8> = (0..piece).map(|j| (i * 7 + j) as u8).collect();
            all.extend_from_slice(&p);
            items.push(Ok(Bytes::from(p)));
        }
        (Box::pin(futures_util::stream::iter(items)), all)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_bodies_stream_through_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        // 5 MiB in odd-sized pieces: past the small-body path, several batches.
        let (body, all) = big_body(80, 65_537, None);
        let id = BlobId::random().unwrap();
        assert_eq!(store.put(id, body, u64::MAX).await.unwrap(), all.len() as u64);
        assert!(read_all(store.get(id, None).await.unwrap()).await == all);
        let part = read_all(store.get(id, Some((1_000_000, 3_500_001))).await.unwrap()).await;
        assert!(part[..] == all[1_000_000..3_500_001]);
        // Over the limit half-way, or broken half-way: nothing is stored or left.
        let (body, _) = big_body(80, 65_537, None);
        let big = BlobId::random().unwrap();
        assert!(matches!(store.put(big, body, 3 << 20).await, Err(BlobError::TooLarge(_))));
        let (body, _) = big_body(80, 65_537, Some(40));
        assert!(matches!(store.put(big, body, u64::MAX).await, Err(BlobError::Body(_))));
        assert_eq!(store.list().await.unwrap().into_iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![id]);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
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
