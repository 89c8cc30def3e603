//! Streaming uploads: a file above the end-to-end limit, written front to
//! back, goes to the server as plain HTTPS while it is written, instead of
//! growing in memory.
//!
//! Data flow. When a sequential write takes a cached file past the limit
//! (super::io), [`VaultFs::start_stream`] stages an upload whose body is a
//! channel of at most [`STREAM_QUEUE`] writes: the memory bound, and the
//! backpressure (a writer waits for room). The cached bytes so far go first,
//! the buffer itself, not a copy; each piece is tagged on the way, and the
//! tags make the manifest the content is committed with once it is all
//! stored. A stream cannot be sent twice, so if the file changes on the
//! server meanwhile the server keeps ours as a conflict copy.
//!
//! A stream ends at fsync, at the release of the file's last handle, at
//! unmount, or when a write lands behind what was sent (then the file is
//! edited in memory like any other, at the price of downloading it again).
//! The file's mode (super::mode) says whether a stream runs or is ending; who
//! meets one that is ending waits for the mode's change signal.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::mode::{EndStream, Stream, StreamFeed};
use super::save::PlainUpload;
use super::{FsError, Ino, Result, VaultFs, WriteData, UPLOAD_PIECE};
use crate::cache::PlainData;
use crate::crypto::{self, OsRandom};
use crate::ids::FileId;
use crate::protocol::now_ms;
use crate::remote::{Remote, UploadBody};

/// Writes queued towards a streaming upload before a writer waits (each at most
/// one FUSE write of 1 MiB): the memory bound of a pass-through upload.
const STREAM_QUEUE: usize = 8;

/// How long an open waits for a stream that still has a writer: its release,
/// which ends it, follows the writer's close.
const SETTLE_OPEN_STREAM: Duration = Duration::from_secs(2);

impl<R: Remote> VaultFs<R> {
    /// Before a file is opened: if it is being streamed to the server, wait
    /// until that upload has committed, so a read right after the writer's
    /// close sees what was written. A stream that is ending is waited for; one
    /// that still has a writer gets [`SETTLE_OPEN_STREAM`], then the open goes
    /// ahead with what the server has.
    pub(super) async fn settle_stream(&self, ino: Ino) {
        let Ok(info) = self.file_info(ino) else { return };
        let deadline = tokio::time::Instant::now() + SETTLE_OPEN_STREAM;
        let mut changed = self.modes.changed();
        loop {
            if !self.modes.is_streaming(info.id) {
                return;
            }
            if self.modes.is_ending(info.id) {
                let _ = changed.changed().await;
            } else if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Before this mount uses a file's content itself (a read, a truncate, a
    /// move): if it is being streamed to the server, ends the stream and waits
    /// until it has committed, so the content is the one written.
    pub(super) async fn end_stream_before_use(&self, id: FileId) -> Result<()> {
        if self.modes.is_streaming(id) {
            self.finish_stream(id).await?;
            self.settle_stream(self.file_ino(id)?).await;
        }
        Ok(())
    }

    /// Starts a pass-through upload with what `d` holds so far.
    pub(super) async fn start_stream(self: &Arc<Self>, id: FileId, d: &mut PlainData) -> Result<()> {
        let ino = self.file_ino(id)?;
        // The stream is staged for a file the server has.
        self.create_on_server(ino, d).await?;
        let info = self.file_info(ino)?;
        // A stream cannot be sent twice, so if the file changes on the server
        // meanwhile, the server is asked to keep ours as a conflict copy.
        let copy = self.conflict_copy_file(ino, &info)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(STREAM_QUEUE);
        // Each piece is tagged as it goes by; the tags make the manifest the
        // stream is committed with once it has all been stored.
        let tagger = crypto::PieceTagger::new(&mut OsRandom).map_err(|e| FsError::Io(e.to_string()))?;
        let tagger = Arc::new(Mutex::new(Some(tagger)));
        let tagging = Arc::clone(&tagger);
        let body = futures_util::stream::unfold((rx, tagging), |(mut rx, tagging)| async move {
            let item =
                rx.recv().await?.and_then(|bytes| match tagging.lock().as_mut().map(|t| t.update(&bytes)) {
                    Some(Ok(())) => Ok(bytes),
                    Some(Err(e)) => Err(std::io::Error::other(e)),
                    None => Err(std::io::Error::other("the stream was already committed")),
                });
            Some((item, (rx, tagging)))
        });
        let fs = Arc::clone(self);
        let version = d.version;
        let generation = self.next_generation(ino, id, version);
        tracing::info!(file = %id, "file passes the end-to-end limit: streaming it as plain HTTPS");
        let task = tokio::spawn(async move {
            let body = UploadBody {
                len: None,
                stream: Box::pin(body),
                conflict_copy: Some(copy.clone()),
                meta: None,
            };
            let staged = fs.remote().stage(id, version, false, body).await?;
            let tagger =
                tagger.lock().take().ok_or_else(|| FsError::Io("the stream's tags are gone".into()))?;
            let length = tagger.length();
            let tags = tagger.finish().map_err(|e| FsError::Io(e.to_string()))?;
            let plain = PlainUpload { generation, length, mtime_ms: now_ms(), copy: Some(copy) };
            let (done, meta) = fs.commit_plain(&info, version, staged, tags, plain).await?;
            Ok((done, meta, generation))
        });
        let sent = d.bytes.len() as u64;
        // Hand the buffer itself to the upload rather than a copy (30 MB by
        // default): this file is not end-to-end encrypted, and a copy would double
        // the memory this stage needs.
        let first = std::mem::take(&mut d.bytes).into_bytes();
        d.loaded = false;
        d.dirty = false;
        self.modes.begin_stream(id, Stream { tx: tx.clone(), task, sent, ino });
        // From now on this file is not end-to-end encrypted: say so at once.
        self.set_file_info(ino, |i| i.e2e = false);
        tx.send(Ok(first)).await.map_err(|_| FsError::Unavailable("the upload stream closed".into()))
    }

    /// Feeds a write to a running pass-through upload; gives the data back if
    /// there is none.
    pub(super) async fn write_to_stream<'a>(
        &self,
        id: FileId,
        offset: u64,
        data: WriteData<'a>,
    ) -> Result<std::result::Result<u32, WriteData<'a>>> {
        let mut changed = self.modes.changed();
        let (tx, sent) = loop {
            match self.modes.stream_feed(id) {
                StreamFeed::Open(tx, sent) => break (tx, sent),
                StreamFeed::None => return Ok(Err(data)),
                // Someone is ending the stream (a close by the opener while another
                // of its threads still writes): once it is stored, this write edits
                // the stored file like any other.
                StreamFeed::Ending => {
                    let _ = changed.changed().await;
                }
            }
        };
        if offset < sent {
            // A write behind what was sent (a program going back to fix a header,
            // or writes from several threads arriving out of order): store what
            // was streamed, then edit the file in memory like any other, at the
            // price of downloading it again. Slower, never wrong.
            tracing::info!(file = %id, offset, sent, "write behind a pass-through stream: finishing it and editing in memory");
            // Our sender first: the upload's body ends only when every
            // sender is gone (kept, the upload waited for more until it timed out).
            drop(tx);
            self.finish_stream(id).await?;
            return Ok(Err(data));
        }
        let closed = || FsError::Unavailable("the upload stream closed".into());
        // A write past the end leaves a hole, which reads as zeros.
        let mut gap = offset - sent;
        while gap > 0 {
            let n = gap.min(UPLOAD_PIECE as u64);
            tx.send(Ok(bytes::Bytes::from(vec![0u8; n as usize]))).await.map_err(|_| closed())?;
            gap -= n;
        }
        let len = data.len();
        tx.send(Ok(data.into_bytes())).await.map_err(|_| closed())?;
        self.modes.streamed(id, offset - sent + len as u64);
        Ok(Ok(len as u32))
    }

    /// Ends a pass-through upload and waits until the server has stored it.
    /// Returns whether there was one.
    pub(super) async fn finish_stream(&self, id: FileId) -> Result<bool> {
        let (task, ino, sent) = match self.modes.end_stream(id) {
            EndStream::None => return Ok(false),
            EndStream::Already => return Ok(true), // someone else is finishing it
            EndStream::Now { task, ino, sent } => (task, ino, sent),
        };
        let result = task.await.map_err(|e| FsError::Io(format!("upload task: {e}")));
        tracing::debug!(file = %id, sent, ok = matches!(result, Ok(Ok(_))), "stream finished");
        let outcome = match result {
            Ok(r) => r,
            Err(e) => {
                self.modes.stream_done(id);
                return Err(e);
            }
        };
        // The file's info is updated before the stream ends, so size and
        // flags never fall back to the pre-upload view in between.
        if let Some((done, meta, generation)) = outcome.as_ref().ok().filter(|d| d.0.conflict_copy.is_none())
        {
            self.set_file_info(ino, |i| {
                i.version = done.version;
                i.size = done.size;
                i.e2e = false;
                i.mtime_ms = now_ms();
                i.meta = meta.clone();
            });
            // After the tree holds it (see `attr_of`).
            self.note_generation(id, *generation);
        }
        self.modes.stream_done(id);
        match outcome {
            Ok((done, _, _)) if done.conflict_copy.is_some() => {
                tracing::warn!(file = %id, copy = ?done.conflict_copy, "the file changed on the server while it was streamed; ours was saved as a conflict copy");
                // Show the server's version of the original, and the copy.
                if let Ok(info) = self.file_info(ino) {
                    self.refresh_after_conflict(ino, &info).await;
                }
                Ok(true)
            }
            Ok((done, _, _)) => {
                if let Some(h) = self.cache.peek(id) {
                    let mut d = h.lock().await;
                    if !d.dirty && (d.loaded || d.filling) {
                        // Not what was streamed (a stream keeps none of it):
                        // read from the server at the next use.
                        self.cancel_fill(id, &mut d);
                        d.loaded = false;
                    }
                    d.version = done.version;
                }
                Ok(true)
            }
            Err(e) => {
                tracing::error!(file = %id, error = %e, "streaming upload failed; the data was not stored");
                Err(e)
            }
        }
    }
}
