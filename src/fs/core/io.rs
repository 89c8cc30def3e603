//! Reads and writes through open handles.
//!
//! Data flow. A read on a [`HandleMode::PassRead`] handle fetches checked
//! ranges from the server (super::passread); any other read waits until the
//! cache entry holds the bytes it asks for (super::fill) and hands the kernel
//! a window of the plaintext under the entry's lock ([`ReadData`]), without
//! a copy. A write goes to the file's stream if it has one (super::stream),
//! else into the cached plaintext; a file written front to back that passes
//! the end-to-end limit starts a stream there.
//!
//! Each operation has one path with two entries: `read_now` and `write_now`
//! run on the FUSE thread when nothing has to wait (the plaintext is whole,
//! unlocked), which spares each small read or 1 MiB write two thread
//! wake-ups and a copy; `read` and `write` take the same checks
//! ([`VaultFs::read_target`], [`VaultFs::write_target`]) and may wait.

use std::ops::Range;
use std::sync::Arc;

use super::backing::Change;
use super::handles::HandleMode;
use super::rules::check_size;
use super::tree::FileMeta;
use super::{FsError, Result, VaultFs};
use crate::cache::{PlainData, PlainHandle, SecretBuf};
use crate::ids::FileId;
use crate::policy::VaultPolicy;
use crate::remote::Remote;

/// One write's bytes: borrowed from the caller, or owned (the FUSE adapter's
/// copy of the request), which a pass-through upload takes without copying.
pub(super) enum WriteData<'a> {
    Borrowed(&'a [u8]),
    Owned(SecretBuf),
}

impl WriteData<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Borrowed(d) => d,
            WriteData::Owned(d) => d,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub(super) fn into_bytes(self) -> bytes::Bytes {
        match self {
            WriteData::Borrowed(d) => bytes::Bytes::copy_from_slice(d),
            WriteData::Owned(d) => d.into_bytes(),
        }
    }
}

/// What a read returns. Drop it as soon as the bytes are sent: a window of
/// cached plaintext keeps the file's lock until then, and a download filling
/// the file waits for it.
pub enum ReadData {
    /// A window of a file's plaintext in the cache, handed to the kernel while
    /// the file's lock is held: no copy, and no copy left in freed memory.
    Plain {
        /// The file's data, locked.
        data: tokio::sync::OwnedMutexGuard<PlainData>,
        /// The window (clipped to the end of the file).
        range: Range<usize>,
    },
    /// Bytes fetched from the server for a file passed through (not end-to-end
    /// encrypted).
    Fetched(bytes::Bytes),
}

impl ReadData {
    /// Up to `size` bytes of `data` at `offset` (none past the end).
    fn plain(data: tokio::sync::OwnedMutexGuard<PlainData>, offset: u64, size: u32) -> Self {
        let len = data.bytes.len() as u64;
        let start = offset.min(len);
        let end = offset.saturating_add(u64::from(size)).min(len);
        ReadData::Plain { data, range: start as usize..end as usize }
    }
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Plain { data, range } => &data.bytes[range.clone()],
            ReadData::Fetched(bytes) => bytes,
        }
    }
}

impl<T: AsRef<[u8]> + ?Sized> PartialEq<T> for ReadData {
    fn eq(&self, other: &T) -> bool {
        **self == *other.as_ref()
    }
}

impl std::fmt::Debug for ReadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadData({} bytes)", self.len())
    }
}

/// Where a read goes.
enum ReadTarget {
    /// A pass-through file, read in ranges from the server.
    Pass(Arc<tokio::sync::Mutex<super::passread::PassRead>>),
    /// The file's plaintext in the cache.
    Cached(PlainHandle),
}

/// What a write was checked against.
struct WriteTarget {
    id: FileId,
    end: u64,
    rules: Arc<VaultPolicy>,
}

impl<R: Remote> VaultFs<R> {
    /// The checks every read makes: the handle, and where its bytes are.
    fn read_target(&self, fh: u64) -> Result<(FileId, ReadTarget)> {
        let (id, mode) = self.handles.get(fh)?;
        let target = match mode {
            HandleMode::PassRead(pass) => ReadTarget::Pass(pass),
            HandleMode::Cached => ReadTarget::Cached(
                self.cache.peek(id).ok_or(FsError::Io("file data evicted while open".into()))?,
            ),
        };
        Ok((id, target))
    }

    /// Reads up to `size` bytes at `offset`.
    pub async fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Result<ReadData> {
        let (id, handle) = match self.read_target(fh)? {
            (id, ReadTarget::Cached(handle)) => (id, handle),
            (id, ReadTarget::Pass(pass)) => {
                let read = self.read_pass_through(&pass, offset, size).await;
                if let Err(FsError::Integrity { source, .. }) = &read {
                    let generation = pass.lock().await.generation;
                    if self.replaced_since(id, generation).await {
                        tracing::info!(file = %id, "the file was replaced while open; this handle reads no more of it");
                        return Err(FsError::Stale);
                    }
                    self.note_refusal(format!("file {id}: {source}"));
                }
                return read.map(ReadData::Fetched);
            }
        };
        let want = offset.saturating_add(u64::from(size));
        // Ready means the bytes up to `want` (or the end) have arrived.
        let (d, _) = self.ready(id, &handle, Some(want)).await?;
        Ok(ReadData::plain(d, offset, size))
    }

    /// [`VaultFs::read`] on the calling thread when the plaintext is already
    /// whole in memory and nobody holds it; `None` when the read would have to
    /// wait (still downloading, being saved, or passed through), and then the
    /// caller takes [`VaultFs::read`], which also reports every error.
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Option<Result<ReadData>> {
        let Ok((_, ReadTarget::Cached(handle))) = self.read_target(fh) else { return None };
        let d = handle.try_lock_owned().ok()?;
        d.loaded.then(|| Ok(ReadData::plain(d, offset, size)))
    }

    /// Whether the server now holds a newer generation of the file than
    /// `generation` under an authentic manifest: content that fails its
    /// check for a handle opened before was replaced, not tampered with.
    async fn replaced_since(&self, id: FileId, generation: u64) -> bool {
        let Ok(info) = self.file_info_by_id(id) else { return false };
        let Ok(fresh) = self.fetch_file(&info).await else { return false };
        match self.open_meta(&fresh) {
            // New content, not a new manifest of the same content (a chmod).
            FileMeta::Sealed(m) => {
                m.content_generation > generation && self.check_fresh(id, m.generation).is_ok()
            }
            FileMeta::Legacy | FileMeta::Invalid => false,
        }
    }

    /// The checks every write makes: the handle, the end offset, and the
    /// size the vault's policy allows.
    fn write_target(&self, fh: u64, offset: u64, len: usize) -> Result<WriteTarget> {
        let id = self.handles.file(fh)?;
        let end = offset.checked_add(len as u64).ok_or(FsError::TooBig("offset".into()))?;
        let rules = self.file_policy(id);
        check_size(&rules, end)?;
        Ok(WriteTarget { id, end, rules })
    }

    /// Writes `data` at `offset`.
    pub async fn write(self: &Arc<Self>, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.write_data(fh, offset, WriteData::Borrowed(data)).await
    }

    /// Writes `data` at `offset`, taking the buffer: a pass-through upload
    /// sends it as it is instead of copying it.
    pub async fn write_owned(self: &Arc<Self>, fh: u64, offset: u64, data: SecretBuf) -> Result<u32> {
        self.write_data(fh, offset, WriteData::Owned(data)).await
    }

    async fn write_data(self: &Arc<Self>, fh: u64, offset: u64, data: WriteData<'_>) -> Result<u32> {
        let WriteTarget { id, end, rules } = self.write_target(fh, offset, data.len())?;
        let data = match self.write_to_stream(id, offset, data).await? {
            Ok(n) => return Ok(n),
            Err(data) => data,
        };
        let data = data.as_slice();
        let sequential = self.modes.note_write(id, offset, end);
        let handle = self.cache.peek(id).ok_or(FsError::Io("file data evicted while open".into()))?;
        let (mut d, _) = self.ready(id, &handle, None).await?;
        let new_len = self.apply_write(id, &mut d, offset, data);
        // Not while a handle names the file's backing file, which follows
        // the cached plaintext only (it grows in memory instead, as a file
        // written out of order past the limit does; a backing file kept for
        // nobody went at this writer's open).
        if sequential && new_len as u64 > rules.e2e_limit && !self.handles.backing_named(id) {
            // Past the end-to-end limit while being written front to back: stream
            // it to the server from here on instead of holding it all in memory.
            self.start_stream(id, &mut d).await?;
            drop(d);
            self.cache.account(id, 0);
        } else {
            drop(d);
            self.cache.account(id, new_len);
        }
        Ok(data.len() as u32)
    }

    /// [`VaultFs::write`] on the calling thread when nothing has to wait: the
    /// file is whole in memory, unlocked, and stays within the end-to-end limit
    /// (crossing it starts a stream, which is async), or it is streaming and
    /// the stream's queue has room. `None` sends the caller to
    /// [`VaultFs::write`], which also reports every error.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<u32> {
        let WriteTarget { id, end, rules } = self.write_target(fh, offset, data.len()).ok()?;
        if self.modes.is_streaming(id) {
            return self.modes.try_stream_write(id, offset, data);
        }
        if end > rules.e2e_limit {
            return None;
        }
        let handle = self.cache.peek(id)?;
        let mut d = handle.try_lock().ok()?;
        if !d.loaded || d.bytes.len() as u64 > rules.e2e_limit {
            return None;
        }
        self.modes.note_write(id, offset, end);
        let new_len = self.apply_write(id, &mut d, offset, data);
        drop(d);
        self.cache.account(id, new_len);
        Some(data.len() as u32)
    }

    /// Copies a write into the loaded plaintext; returns the new length.
    fn apply_write(&self, id: FileId, d: &mut PlainData, offset: u64, data: &[u8]) -> usize {
        tracing::trace!(file = %id, offset, len = data.len(), "write");
        let end = offset as usize + data.len();
        if d.bytes.len() < end {
            d.bytes.resize(end);
        }
        d.bytes[offset as usize..end].copy_from_slice(data);
        self.follow_in_backing(id, Change::Wrote { offset, data });
        d.edited();
        let new_len = d.bytes.len();
        self.modes.note_change(id, new_len as u64);
        new_len
    }
}
