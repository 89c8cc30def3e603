//! Sealing a file's content for the server: encryption (or, for
//! pass-through content, tagging), the one path every upload from plaintext
//! takes, pipelined with the upload for the cache's files.
//!
//! Data flow. The file's plaintext stays where it is, under its lock: the owned
//! guard goes to a blocking task that seals it a piece at a time (16 chunks,
//! 1 MiB) into a short queue, and the upload sends each piece while the next
//! ones are sealed. Encryption thus runs on one core while TLS and the socket use
//! another, and the memory an upload needs beyond the plaintext is the queue,
//! not a second, encrypted copy of the file. The guard comes back from the task
//! when it is done, so the caller can mark the data clean or keep it dirty.
//!
//! End-to-end content's manifest is known before the first byte (it names the
//! upload's header), so it goes with the upload. Pass-through content is sent
//! as it is, each 1 MiB piece tagged on the way ([`crate::crypto::PieceTagger`]),
//! so its manifest exists only at the end: that content is staged, and
//! committed with its manifest once the tags come back with the guard.
//!
//! Content that is not in the cache (a conflict copy, a file moved to
//! another record) is sealed whole by [`seal_whole`] through the same
//! [`Sealer`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::status::UploadProgress;
use super::{FsError, Result, VaultFs, UPLOAD_PIECE};
use crate::cache::PlainData;
use crate::crypto::manifest::PieceTags;
use crate::crypto::{
    self, ContentMode, FileContext, FileEncryptor, FileManifest, Layout, OsRandom, PieceTagger,
};
use crate::protocol::Sealed;
use crate::remote::{Remote, UploadBody};

/// Sealed pieces waiting for the connection: the pipeline's depth.
const PIPELINE: usize = 4;

/// How a file's content is made ready for the server, set up before the
/// plaintext is handed over.
pub(super) enum Sealer {
    /// End-to-end: the encryptor, the header to send first, and the sealed
    /// manifest that names this upload.
    EndToEnd { encryptor: FileEncryptor, header: Vec<u8>, meta: Sealed, len: u64 },
    /// Pass-through: the plain bytes, tagged on the way.
    Plain { tagger: PieceTagger, len: u64 },
}

impl Sealer {
    /// Bytes the upload will carry.
    pub(super) fn len(&self) -> u64 {
        match self {
            Sealer::EndToEnd { len, .. } | Sealer::Plain { len, .. } => *len,
        }
    }

    /// The sealed manifest that goes with the upload (end-to-end content).
    pub(super) fn meta(&self) -> Option<Sealed> {
        match self {
            Sealer::EndToEnd { meta, .. } => Some(meta.clone()),
            Sealer::Plain { .. } => None,
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Seals a file's manifest with its vault's active key.
    pub(super) fn seal_manifest(&self, ctx: &FileContext, manifest: &FileManifest) -> Result<Sealed> {
        let key = self.sealing_key(ctx.vault)?;
        crypto::seal_manifest(&key, ctx, manifest, &mut OsRandom)
            .map(Sealed)
            .map_err(|e| FsError::Io(e.to_string()))
    }

    /// Prepares to seal `plain_len` bytes of generation `generation` for the
    /// file at `ctx` (tag them as they are if not `e2e`).
    pub(super) fn sealer(
        &self,
        ctx: &FileContext,
        generation: u64,
        e2e: bool,
        plain_len: u64,
    ) -> Result<Sealer> {
        if !e2e {
            let tagger = PieceTagger::new(&mut OsRandom).map_err(|e| FsError::Io(e.to_string()))?;
            return Ok(Sealer::Plain { tagger, len: plain_len });
        }
        let key = self.sealing_key(ctx.vault)?;
        let (encryptor, header) = FileEncryptor::new(&key, ctx, generation, plain_len, &mut OsRandom)
            .map_err(|e| FsError::Io(e.to_string()))?;
        let mode = ContentMode::EndToEnd { upload: encryptor.upload_id() };
        let manifest = FileManifest::new(generation, plain_len, mode, self.stated_perm(ctx.file)?);
        let meta = self.seal_manifest(ctx, &manifest)?;
        let len = Layout::new(plain_len).map_or(0, |l| l.ciphertext_len());
        Ok(Sealer::EndToEnd { encryptor, header: header.to_vec(), meta, len })
    }
}

/// What sealing gives back: the data's guard, and for pass-through content
/// its piece tags.
pub(super) type SealedBack = (OwnedMutexGuard<PlainData>, Option<PieceTags>);

/// The sealing side of an upload in progress.
pub(super) enum Sealing {
    /// A small file, sealed at once (a task would cost more than it saves).
    Done(OwnedMutexGuard<PlainData>, Option<PieceTags>),
    /// Sealing alongside the upload.
    Running { task: JoinHandle<(OwnedMutexGuard<PlainData>, Option<PieceTags>)>, stop: CancellationToken },
}

impl Sealing {
    /// Call once the upload returned: stops sealing if the upload ended early
    /// (the HTTP client may hold on to the body for a while after a refusal)
    /// and gives the data's guard back, with the tags of what was sent.
    pub(super) async fn finish(self) -> Result<SealedBack> {
        match self {
            Sealing::Done(d, tags) => Ok((d, tags)),
            Sealing::Running { task, stop } => {
                stop.cancel();
                task.await.map_err(|e| FsError::Io(format!("sealing task: {e}")))
            }
        }
    }
}

/// Starts sealing `d`'s bytes; returns the upload body, which counts what it
/// hands over in `progress`, and the sealing task.
pub(super) fn pipeline(
    d: OwnedMutexGuard<PlainData>,
    sealer: Sealer,
    progress: Arc<UploadProgress>,
) -> (UploadBody, Sealing) {
    let len = sealer.len();
    let meta = sealer.meta();
    if len <= UPLOAD_PIECE as u64 {
        let mut whole = Vec::with_capacity(len as usize);
        let result =
            produce(&d.bytes, sealer, &mut |piece| piece.map(|p| whole.extend_from_slice(&p)).is_ok());
        let (body, tags) = match result {
            Ok(tags) => (UploadBody::from_bytes(whole), tags),
            Err(e) => (
                UploadBody {
                    len: Some(len),
                    stream: Box::pin(futures_util::stream::iter([Err(std::io::Error::other(e))])),
                    conflict_copy: None,
                    meta: None,
                },
                None,
            ),
        };
        progress.sent.store(len, Ordering::Relaxed);
        return (UploadBody { meta, ..body }, Sealing::Done(d, tags));
    }
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(PIPELINE);
    let stop = CancellationToken::new();
    let runtime = tokio::runtime::Handle::current();
    let task_stop = stop.clone();
    let task = tokio::task::spawn_blocking(move || {
        // A send fails when the upload stopped reading (it failed or was
        // refused): then there is nothing left to do but give the data back.
        let mut send = |piece: std::io::Result<Bytes>| {
            runtime.block_on(async {
                tokio::select! {
                    sent = tx.send(piece) => sent.is_ok(),
                    () = task_stop.cancelled() => false,
                }
            })
        };
        let tags = match produce(&d.bytes, sealer, &mut send) {
            Ok(tags) => tags,
            Err(e) => {
                send(Err(std::io::Error::other(e)));
                None
            }
        };
        (d, tags)
    });
    let pieces = futures_util::stream::unfold((rx, progress), |(mut rx, progress)| async move {
        let piece = rx.recv().await?;
        if let Ok(p) = &piece {
            progress.sent.fetch_add(p.len() as u64, Ordering::Relaxed);
        }
        Some((piece, (rx, progress)))
    });
    let body = UploadBody { len: Some(len), stream: Box::pin(pieces), conflict_copy: None, meta };
    (body, Sealing::Running { task, stop })
}

/// Seals `plain` and hands it to `send_piece`; returns the tags of
/// pass-through content, if all of it was handed over. Errors are sealing
/// failures; a refused piece ends the work quietly.
fn produce(
    plain: &[u8],
    sealer: Sealer,
    send_piece: &mut dyn FnMut(std::io::Result<Bytes>) -> bool,
) -> std::result::Result<Option<PieceTags>, String> {
    let mut send = |piece: Vec<u8>| send_piece(Ok(Bytes::from(piece)));
    match sealer {
        Sealer::EndToEnd { mut encryptor, header, .. } => {
            if !send(header) {
                return Ok(None);
            }
            for piece in plain.chunks(UPLOAD_PIECE) {
                let mut out = Vec::with_capacity(piece.len() + UPLOAD_PIECE / 4096);
                encryptor.update(piece, &mut out).map_err(|e| e.to_string())?;
                if !send(out) {
                    return Ok(None);
                }
            }
            let mut last = Vec::new();
            encryptor.finish(&mut last).map_err(|e| e.to_string())?;
            if !last.is_empty() {
                send(last);
            }
            Ok(None)
        }
        Sealer::Plain { mut tagger, .. } => {
            // Not end-to-end encrypted: the server gets these bytes anyway;
            // each piece's tag goes into the manifest.
            for piece in plain.chunks(UPLOAD_PIECE) {
                tagger.update(piece).map_err(|e| e.to_string())?;
                if !send(piece.to_vec()) {
                    return Ok(None);
                }
            }
            tagger.finish().map(Some).map_err(|e| e.to_string())
        }
    }
}

/// Seals all of `plain` at once: the body, the sealed manifest of end-to-end
/// content, the tags of pass-through content.
pub(super) fn seal_whole(
    plain: &[u8],
    sealer: Sealer,
) -> Result<(Vec<u8>, Option<Sealed>, Option<PieceTags>)> {
    let meta = sealer.meta();
    let mut whole = Vec::with_capacity(sealer.len() as usize);
    let tags = produce(plain, sealer, &mut |piece| piece.map(|p| whole.extend_from_slice(&p)).is_ok())
        .map_err(FsError::Io)?;
    Ok((whole, meta, tags))
}
