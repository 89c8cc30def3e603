//! Saving a file: encryption pipelined with the upload.
//!
//! Data flow. The file's plaintext stays where it is, under its lock: the owned
//! guard goes to a blocking task that seals it a piece at a time (16 chunks,
//! 1 MiB) into a short queue, and the upload sends each piece while the next
//! ones are sealed. Encryption thus runs on one core while TLS and the socket use
//! another, and the memory an upload needs beyond the plaintext is the queue,
//! not a second, encrypted copy of the file. The guard comes back from the task
//! when it is done, so the caller can mark the data clean or keep it dirty.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{FsError, Result, UploadProgress, VaultFs, UPLOAD_PIECE};
use crate::cache::PlainData;
use crate::crypto::{FileContext, FileEncryptor, Layout, OsRandom};
use crate::remote::{Remote, UploadBody};

/// Sealed pieces waiting for the connection: the pipeline's depth.
const PIPELINE: usize = 4;

/// A file's sealing key and header, made before the plaintext is handed over.
pub(super) struct Sealer {
    encryptor: Option<FileEncryptor>,
    header: Vec<u8>,
    /// Bytes the upload will carry.
    pub len: u64,
}

impl<R: Remote> VaultFs<R> {
    /// Prepares to seal `plain_len` bytes for the file at `ctx` (plain bytes as
    /// they are if not `e2e`).
    pub(super) fn sealer(
        &self,
        ctx: &FileContext,
        generation: u64,
        e2e: bool,
        plain_len: u64,
    ) -> Result<Sealer> {
        if !e2e {
            return Ok(Sealer { encryptor: None, header: Vec::new(), len: plain_len });
        }
        let key = self
            .account
            .wallet()
            .active_key(ctx.vault)
            .ok_or_else(|| FsError::Access("no key for this vault".into()))?;
        let (encryptor, header) = FileEncryptor::new(key, ctx, generation, plain_len, &mut OsRandom)
            .map_err(|e| FsError::Io(e.to_string()))?;
        let len = Layout::new(plain_len).map_or(0, |l| l.ciphertext_len());
        Ok(Sealer { encryptor: Some(encryptor), header: header.to_vec(), len })
    }
}

/// The sealing side of an upload in progress.
pub(super) enum Sealing {
    /// A small file, sealed at once (a task would cost more than it saves).
    Done(OwnedMutexGuard<PlainData>),
    /// Sealing alongside the upload.
    Running { task: JoinHandle<OwnedMutexGuard<PlainData>>, stop: CancellationToken },
}

impl Sealing {
    /// Call once the upload returned: stops sealing if the upload ended early
    /// (the HTTP client may hold on to the body for a while after a refusal)
    /// and gives the data's guard back.
    pub(super) async fn finish(self) -> Result<OwnedMutexGuard<PlainData>> {
        match self {
            Sealing::Done(d) => Ok(d),
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
    let len = sealer.len;
    if len <= UPLOAD_PIECE as u64 {
        let mut whole = Vec::with_capacity(len as usize);
        let result = produce(&d, sealer, &mut |piece| piece.map(|p| whole.extend_from_slice(&p)).is_ok());
        let body = match result {
            Ok(()) => UploadBody::from_bytes(whole),
            Err(e) => UploadBody {
                len: Some(len),
                stream: Box::pin(futures_util::stream::iter([Err(std::io::Error::other(e))])),
                conflict_copy: None,
            },
        };
        progress.sent.store(len, Ordering::Relaxed);
        return (body, Sealing::Done(d));
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
        if let Err(e) = produce(&d, sealer, &mut send) {
            send(Err(std::io::Error::other(e)));
        }
        d
    });
    let pieces = futures_util::stream::unfold((rx, progress), |(mut rx, progress)| async move {
        let piece = rx.recv().await?;
        if let Ok(p) = &piece {
            progress.sent.fetch_add(p.len() as u64, Ordering::Relaxed);
        }
        Some((piece, (rx, progress)))
    });
    let body = UploadBody { len: Some(len), stream: Box::pin(pieces), conflict_copy: None };
    (body, Sealing::Running { task, stop })
}

/// Seals `d`'s bytes and hands them to `send_piece`. Errors are sealing
/// failures; a refused piece ends the work quietly.
fn produce(
    d: &PlainData,
    sealer: Sealer,
    send_piece: &mut dyn FnMut(std::io::Result<Bytes>) -> bool,
) -> std::result::Result<(), String> {
    let Sealer { mut encryptor, header, .. } = sealer;
    let mut send = |piece: Vec<u8>| send_piece(Ok(Bytes::from(piece)));
    if !header.is_empty() && !send(header) {
        return Ok(());
    }
    for piece in d.bytes.chunks(UPLOAD_PIECE) {
        let out = match &mut encryptor {
            Some(enc) => {
                let mut out = Vec::with_capacity(piece.len() + UPLOAD_PIECE / 4096);
                enc.update(piece, &mut out).map_err(|e| e.to_string())?;
                out
            }
            // Not end-to-end encrypted: the server gets these bytes anyway.
            None => piece.to_vec(),
        };
        if !send(out) {
            return Ok(());
        }
    }
    if let Some(enc) = encryptor {
        let mut last = Vec::new();
        enc.finish(&mut last).map_err(|e| e.to_string())?;
        if !last.is_empty() {
            send(last);
        }
    }
    Ok(())
}
