//! Opening a file: its ciphertext is downloaded and decrypted into the cache
//! entry while readers already read the part that is ready.
//!
//! Data flow. [`VaultFs::start_fill`] marks the entry `filling` and spawns a task
//! that downloads the file and authenticates its 128-byte header (key, binding
//! to vault, record and file, generation). It then reserves the plaintext buffer
//! at its final size, so the buffer never moves (a move would leave an unwiped
//! copy behind), and decrypts each piece of the download straight into it under
//! the entry's lock, publishing on a watch channel how many bytes are ready.
//! Readers ([`VaultFs::ready`] with a length) wait only until their range is
//! ready; writers, which change the whole file, wait until it is complete.
//!
//! Each 64 KiB chunk is authenticated before its bytes become readable, so a
//! reader never sees forged data; that the file was not cut short is known only
//! at the end, and a failure there (or anywhere) wipes what was decrypted and
//! reaches every waiter, and every later read, as EIO.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{watch, OwnedMutexGuard};

use super::{lock, FsError, Result, VaultFs};
use crate::cache::{PlainData, PlainHandle, SecretBuf};
use crate::crypto::{self, CryptoError, FileContext, FileDecryptor, HEADER_LEN};
use crate::ids::FileId;
use crate::protocol::FileInfo;
use crate::remote::Remote;

/// A download being decrypted into a cache entry.
pub(super) struct Fill {
    state: watch::Sender<FillState>,
}

/// How far a [`Fill`] got.
#[derive(Debug, Clone)]
enum FillState {
    /// Downloading: `ready` plaintext bytes are in the entry; `total` is the
    /// plaintext length, known once the header has been authenticated.
    Running { ready: u64, total: Option<u64> },
    /// The entry holds the whole file.
    Done,
    /// The download or a check failed; the entry was wiped.
    Failed(FsError),
    /// Someone replaced the content (truncated it): look at the entry again.
    Cancelled,
}

impl FillState {
    /// Whether a waiter for the first `want` bytes (all, if `None`) may go on.
    fn satisfies(&self, want: Option<u64>) -> bool {
        match self {
            FillState::Running { ready, total: Some(total) } => want.is_some_and(|w| *ready >= w.min(*total)),
            FillState::Running { total: None, .. } => false,
            FillState::Done | FillState::Failed(_) | FillState::Cancelled => true,
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Starts decrypting `info` into the entry behind `handle`, whose lock the
    /// caller holds as `d`.
    fn start_fill(self: &Arc<Self>, info: &FileInfo, handle: &PlainHandle, d: &mut PlainData) -> Arc<Fill> {
        let (state, _) = watch::channel(FillState::Running { ready: 0, total: None });
        let fill = Arc::new(Fill { state });
        d.bytes = SecretBuf::new();
        d.loaded = false;
        d.filling = true;
        d.version = info.version; // until the download says which version it got
        lock(&self.fills).insert(info.id, Arc::clone(&fill));
        let (fs, handle, info, task_fill) =
            (Arc::clone(self), Arc::clone(handle), info.clone(), Arc::clone(&fill));
        tokio::spawn(async move { fs.fill_task(info, handle, task_fill).await });
        fill
    }

    /// Stops a fill in progress because the caller replaces the content (it
    /// holds the entry's lock as `d`). Waiters look at the entry again.
    pub(super) fn cancel_fill(&self, id: FileId, d: &mut PlainData) {
        if !std::mem::take(&mut d.filling) {
            return;
        }
        if let Some(fill) = lock(&self.fills).remove(&id) {
            fill.state.send_replace(FillState::Cancelled);
        }
    }

    /// Whether `fill` is still the one filling the entry `d`.
    fn is_current(&self, id: FileId, fill: &Arc<Fill>, d: &PlainData) -> bool {
        d.filling && lock(&self.fills).get(&id).is_some_and(|f| Arc::ptr_eq(f, fill))
    }

    /// Waits until the entry behind `handle` holds its first `want` bytes, or
    /// the whole file if `want` is `None`, starting a download if none is under
    /// way. Returns the entry's lock and the file's length.
    pub(super) async fn ready(
        self: &Arc<Self>,
        id: FileId,
        handle: &PlainHandle,
        want: Option<u64>,
    ) -> Result<(OwnedMutexGuard<PlainData>, u64)> {
        loop {
            let mut d = Arc::clone(handle).lock_owned().await;
            if d.loaded {
                let len = d.bytes.len() as u64;
                return Ok((d, len));
            }
            let running = if d.filling { lock(&self.fills).get(&id).cloned() } else { None };
            let fill = match running {
                Some(fill) => fill,
                None => {
                    let info = self.file_info_by_id(id)?;
                    self.start_fill(&info, handle, &mut d)
                }
            };
            let state = fill.state.borrow().clone();
            if let FillState::Running { total: Some(total), .. } = state {
                if state.satisfies(want) {
                    return Ok((d, total));
                }
            }
            let mut rx = fill.state.subscribe();
            drop(d);
            let state = match rx.wait_for(|s| s.satisfies(want)).await {
                Ok(s) => s.clone(),
                Err(_) => FillState::Cancelled, // the fill went away: look again
            };
            if let FillState::Failed(e) = state {
                return Err(e);
            }
        }
    }

    async fn fill_task(self: Arc<Self>, info: FileInfo, handle: PlainHandle, fill: Arc<Fill>) {
        let result = self.fill_run(&info, &handle, &fill).await;
        let mut d = handle.lock().await;
        if !self.is_current(info.id, &fill, &d) {
            return; // cancelled; whoever cancelled it owns the entry now
        }
        d.filling = false;
        lock(&self.fills).remove(&info.id);
        match result {
            Ok(()) => {
                d.loaded = true;
                let len = d.bytes.len();
                drop(d);
                fill.state.send_replace(FillState::Done);
                self.cache.account(info.id, len);
            }
            Err(e) => {
                d.bytes = SecretBuf::new();
                drop(d);
                if matches!(e, FsError::Integrity { .. }) {
                    tracing::error!(file = %info.id, error = %e, "refusing to read a file that failed its integrity check");
                } else {
                    tracing::warn!(file = %info.id, error = %e, "could not download the file");
                }
                fill.state.send_replace(FillState::Failed(e));
                self.cache.account(info.id, 0);
            }
        }
    }

    /// Downloads and decrypts; returns early (Ok) if the fill was cancelled.
    async fn fill_run(&self, info: &FileInfo, handle: &PlainHandle, fill: &Arc<Fill>) -> Result<()> {
        let integrity = |source| FsError::Integrity { what: format!("file {}", info.id), source };
        let unavailable = |e: std::io::Error| FsError::Unavailable(e.to_string());
        let asked = std::time::Instant::now();
        let content = self.remote().download(info.id, None).await?;
        let mut stream = content.stream;
        // The first piece of content after the header, if the header's piece held more.
        let mut pending = None;
        let mut decryptor = None;
        let total = if content.e2e && content.total_len > 0 {
            let mut head = Vec::with_capacity(HEADER_LEN as usize);
            while head.len() < HEADER_LEN as usize {
                let Some(piece) = stream.next().await else { break };
                let piece = piece.map_err(unavailable)?;
                let take = (HEADER_LEN as usize - head.len()).min(piece.len());
                head.extend_from_slice(&piece[..take]);
                pending = Some(piece.slice(take..));
            }
            let header = crypto::peek_header(&head).map_err(integrity)?;
            let key =
                self.account.wallet().key(info.vault, header.key_id).ok_or(integrity(
                    CryptoError::Malformed("header names a key this vault does not have"),
                ))?;
            let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
            let min = lock(&self.generations).get(&info.id).copied().unwrap_or(0);
            let dec = FileDecryptor::open(&head, key, &ctx, min).map_err(integrity)?;
            dec.check_ciphertext_len(content.total_len).map_err(integrity)?;
            let total = dec.info().plaintext_len;
            decryptor = Some(dec.into_stream());
            total
        } else {
            content.total_len
        };
        if total > self.limits.upload_limit.max(self.limits.e2e_limit) {
            // Nothing this large can have been uploaded; do not reserve memory for it.
            return Err(FsError::Io(format!("the server reports {total} bytes, above the upload limit")));
        }
        {
            let mut d = handle.lock().await;
            if !self.is_current(info.id, fill, &d) {
                return Ok(());
            }
            d.bytes = SecretBuf::with_capacity(total as usize);
            d.version = content.version;
            d.confirmed = Some(asked);
        }
        self.cache.account(info.id, total as usize);
        fill.state.send_replace(FillState::Running { ready: 0, total: Some(total) });
        loop {
            let piece = match pending.take() {
                Some(piece) => piece,
                None => match stream.next().await {
                    Some(piece) => piece.map_err(unavailable)?,
                    None => break,
                },
            };
            if piece.is_empty() {
                continue;
            }
            let mut d = handle.lock().await;
            if !self.is_current(info.id, fill, &d) {
                return Ok(());
            }
            match &mut decryptor {
                Some(dec) => dec.update(&piece, &mut d.bytes).map_err(integrity)?,
                None if d.bytes.len() + piece.len() > total as usize => {
                    return Err(FsError::Io("the server sent more than the file's length".into()));
                }
                None => d.bytes.extend_from_slice(&piece),
            }
            let ready = d.bytes.len() as u64;
            drop(d);
            fill.state.send_replace(FillState::Running { ready, total: Some(total) });
        }
        match decryptor {
            Some(dec) => {
                let header = dec.finish().map_err(integrity)?;
                lock(&self.generations).insert(info.id, header.generation);
            }
            None => {
                let ready = handle.lock().await.bytes.len() as u64;
                if ready != total {
                    return Err(FsError::Unavailable("the download ended early".into()));
                }
            }
        }
        Ok(())
    }
}
