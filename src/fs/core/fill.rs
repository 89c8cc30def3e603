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
//! What the content is comes from the file's manifest (docs/FORMAT.md "File
//! manifests"), never from the server: end-to-end content must carry the
//! header the manifest names; pass-through content is checked a 1 MiB piece at
//! a time against the manifest's tags, and a piece becomes readable only once
//! it verified. Each 64 KiB chunk of end-to-end content is authenticated before
//! its bytes become readable, so a reader never sees forged data; that the file
//! was not cut short is known only at the end, and a failure there (or
//! anywhere) wipes what was decrypted and reaches every waiter, and every later
//! read, as EIO. A manifest older than the newest generation this client saw
//! of the file is a replay, refused the same way.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{watch, OwnedMutexGuard};

use super::backing::Change;
use super::tree::FileMeta;
use super::{FsError, Result, VaultFs};
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
    fn start_fill(
        self: &Arc<Self>,
        (info, meta): &(FileInfo, FileMeta),
        handle: &PlainHandle,
        d: &mut PlainData,
    ) -> Arc<Fill> {
        let (state, _) = watch::channel(FillState::Running { ready: 0, total: None });
        let fill = Arc::new(Fill { state });
        d.bytes = SecretBuf::new();
        d.loaded = false;
        d.filling = true;
        d.version = info.version; // until the download says which version it got
        self.fills.lock().insert(info.id, Arc::clone(&fill));
        let (fs, handle, info, meta, task_fill) =
            (Arc::clone(self), Arc::clone(handle), info.clone(), meta.clone(), Arc::clone(&fill));
        tokio::spawn(async move { fs.fill_task(info, meta, handle, task_fill).await });
        fill
    }

    /// Stops a fill in progress because the caller replaces the content (it
    /// holds the entry's lock as `d`). Waiters look at the entry again.
    pub(super) fn cancel_fill(&self, id: FileId, d: &mut PlainData) {
        if !std::mem::take(&mut d.filling) {
            return;
        }
        if let Some(fill) = self.fills.lock().remove(&id) {
            fill.state.send_replace(FillState::Cancelled);
        }
    }

    /// Downloads in progress: each file's id, the plaintext bytes ready and
    /// its length once known (for `vaultfs status`).
    pub(super) fn downloads(&self) -> Vec<(FileId, u64, Option<u64>)> {
        let fills = self.fills.lock();
        fills
            .iter()
            .filter_map(|(id, fill)| match *fill.state.borrow() {
                FillState::Running { ready, total } => Some((*id, ready, total)),
                _ => None,
            })
            .collect()
    }

    /// Whether `fill` is still the one filling the entry `d`.
    fn is_current(&self, id: FileId, fill: &Arc<Fill>, d: &PlainData) -> bool {
        d.filling && self.fills.lock().get(&id).is_some_and(|f| Arc::ptr_eq(f, fill))
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
            if self.modes.is_streaming(id) {
                // What a stream sent is not kept here (a streaming entry is
                // never loaded): it is read back from the server once
                // committed, else a read, a truncate or a move of it would
                // start from the version before the stream. Committing it
                // cancels any fill of that older version.
                drop(d);
                self.end_stream_before_use(id).await?;
                continue;
            }
            let running = if d.filling { self.fills.lock().get(&id).cloned() } else { None };
            let fill = match running {
                Some(fill) => fill,
                None => {
                    let file = self.file_state_by_id(id)?;
                    self.start_fill(&file, handle, &mut d)
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

    async fn fill_task(
        self: Arc<Self>,
        info: FileInfo,
        meta: FileMeta,
        handle: PlainHandle,
        fill: Arc<Fill>,
    ) {
        let result = self.fill_run(&info, meta, &handle, &fill).await;
        let mut d = handle.lock().await;
        if !self.is_current(info.id, &fill, &d) {
            return; // cancelled; whoever cancelled it owns the entry now
        }
        d.filling = false;
        self.fills.lock().remove(&info.id);
        match result {
            Ok(()) => {
                d.loaded = true;
                // A new version: readers through the kernel see it too.
                self.follow_in_backing(info.id, Change::Whole(&d.bytes));
                let len = d.bytes.len();
                drop(d);
                fill.state.send_replace(FillState::Done);
                self.cache.account(info.id, len);
            }
            Err(e) => {
                d.bytes = SecretBuf::new();
                drop(d);
                if let FsError::Integrity { source, .. } = &e {
                    tracing::error!(file = %info.id, error = %e, "refusing to read a file that failed its integrity check");
                    self.note_refusal(format!("file {}: {source}", info.id));
                } else {
                    tracing::warn!(file = %info.id, error = %e, "could not download the file");
                }
                fill.state.send_replace(FillState::Failed(e));
                self.cache.account(info.id, 0);
            }
        }
    }

    /// Downloads and decrypts (or checks); returns early (Ok) if the fill was
    /// cancelled.
    async fn fill_run(
        &self,
        info: &FileInfo,
        meta: FileMeta,
        handle: &PlainHandle,
        fill: &Arc<Fill>,
    ) -> Result<()> {
        let integrity = |source| FsError::Integrity { what: format!("file {}", info.id), source };
        let unavailable = |e: std::io::Error| FsError::Unavailable(e.to_string());
        let asked = std::time::Instant::now();
        if let FileMeta::Sealed(m) = &meta {
            self.check_fresh(info.id, m.generation).map_err(integrity)?;
            if m.is_never_uploaded() {
                // Created empty and never written: empty, whatever the server holds.
                return self.fill_empty(info, handle, fill, asked).await;
            }
        }
        let content = self.remote().download(info.id, None).await?;
        let meta = self.meta_for_version(info, meta, content.version).await?;
        if let FileMeta::Sealed(m) = &meta {
            // The manifest of the version downloaded, which may be newer
            // than the one listed: as fresh as what this machine saw.
            self.check_fresh(info.id, m.generation).map_err(integrity)?;
        }
        let mut stream = content.stream;
        // The first piece of content after the header, if the header's piece held more.
        let mut pending = None;
        let mut decryptor = None;
        let mut pieces = None;
        let (total, e2e) = match &meta {
            FileMeta::Sealed(m) => (m.length, m.is_e2e()),
            FileMeta::Legacy => (0, content.e2e),
            FileMeta::Invalid => {
                return Err(integrity(CryptoError::Integrity(crypto::IntegrityFailure::Authentication)))
            }
        };
        // A manifest that says end-to-end means a header, always (an emptied
        // file has none, and fails); legacy files go by the server's word.
        let headed = match &meta {
            FileMeta::Sealed(m) => m.is_e2e(),
            _ => e2e && content.total_len > 0,
        };
        let total = if headed {
            let mut head = Vec::with_capacity(HEADER_LEN as usize);
            while head.len() < HEADER_LEN as usize {
                let Some(piece) = stream.next().await else { break };
                let piece = piece.map_err(unavailable)?;
                let take = (HEADER_LEN as usize - head.len()).min(piece.len());
                head.extend_from_slice(&piece[..take]);
                pending = Some(piece.slice(take..));
            }
            let header = crypto::peek_header(&head).map_err(integrity)?;
            let key = self
                .account
                .vault_key(info.vault, header.key_id)
                .ok_or(integrity(CryptoError::Malformed("header names a key this vault does not have")))?;
            let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
            // Content under a manifest is as fresh as the manifest (checked
            // above), whose upload the header must be: a chmod since then
            // made the manifest newer than the content.
            let min =
                meta.manifest().map_or_else(|| self.freshness.generation(info.id), |m| m.content_generation);
            let dec = FileDecryptor::open(&head, &key, &ctx, min).map_err(integrity)?;
            if let Some(m) = meta.manifest() {
                // The header must be the upload the manifest names.
                m.check_header(&dec.info()).map_err(integrity)?;
            }
            dec.check_ciphertext_len(content.total_len).map_err(integrity)?;
            let total = dec.info().plaintext_len;
            decryptor = Some(dec.into_stream());
            total
        } else if let Some(m) = meta.manifest() {
            // Pass-through content: exactly the length the manifest states,
            // each piece checked against its tag.
            let crypto::ContentMode::Plain(tags) = &m.mode else {
                // A link's manifest (the server answered with another
                // version of another kind): nothing to read as content.
                return Err(integrity(CryptoError::Integrity(crypto::IntegrityFailure::Authentication)));
            };
            if content.total_len != m.length {
                return Err(integrity(CryptoError::Integrity(crypto::IntegrityFailure::Length)));
            }
            pieces = Some(tags.verifier());
            total
        } else {
            content.total_len
        };
        if total > self.rules.limits().upload_limit.max(crate::policy::DEFAULT_E2E_LIMIT) {
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
        // Of pass-through content, the bytes before this have been checked.
        let mut verified = 0u64;
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
                    return Err(match pieces {
                        Some(_) => integrity(CryptoError::Integrity(crypto::IntegrityFailure::Length)),
                        None => FsError::Io("the server sent more than the file's length".into()),
                    });
                }
                None => d.bytes.extend_from_slice(&piece),
            }
            let ready = match &pieces {
                Some(verifier) => {
                    // Every whole piece now held is checked before it counts.
                    while let Some(len) = Self::whole_piece(verified, d.bytes.len() as u64, total) {
                        let index = verified / crypto::manifest::PIECE_SIZE;
                        let piece = &d.bytes[verified as usize..(verified + len) as usize];
                        verifier.verify(index, [piece]).map_err(integrity)?;
                        verified += len;
                    }
                    verified
                }
                None => d.bytes.len() as u64,
            };
            drop(d);
            fill.state.send_replace(FillState::Running { ready, total: Some(total) });
        }
        match decryptor {
            Some(dec) => {
                let header = dec.finish().map_err(integrity)?;
                let seen = meta.manifest().map_or(header.generation, |m| m.generation);
                self.note_generation(info.id, seen);
            }
            None => {
                let ready = handle.lock().await.bytes.len() as u64;
                if pieces.is_some() && verified != total {
                    return Err(integrity(CryptoError::Integrity(crypto::IntegrityFailure::Length)));
                }
                if ready != total {
                    return Err(FsError::Unavailable("the download ended early".into()));
                }
                if let Some(m) = meta.manifest() {
                    self.note_generation(info.id, m.generation);
                }
            }
        }
        Ok(())
    }

    /// The length of the whole pass-through piece starting at `verified`, if
    /// the `held` bytes (of `total`) contain it.
    fn whole_piece(verified: u64, held: u64, total: u64) -> Option<u64> {
        let len = crypto::manifest::PIECE_SIZE.min(total - verified);
        (len > 0 && held >= verified + len).then_some(len)
    }

    /// Fills the entry with an empty file (one created empty, never written).
    async fn fill_empty(
        &self,
        info: &FileInfo,
        handle: &PlainHandle,
        fill: &Arc<Fill>,
        asked: std::time::Instant,
    ) -> Result<()> {
        let mut d = handle.lock().await;
        if self.is_current(info.id, fill, &d) {
            d.bytes = SecretBuf::new();
            d.version = info.version;
            d.confirmed = Some(asked);
        }
        Ok(())
    }

    /// The manifest that goes with content of `version`: the one held if it
    /// is of that version; else the file's current one, if the server has
    /// moved on to exactly that version (renamed, touched or rewritten since
    /// it was listed). What the content is checked against either way.
    pub(super) async fn meta_for_version(
        &self,
        info: &FileInfo,
        meta: FileMeta,
        version: u64,
    ) -> Result<FileMeta> {
        if version == info.version || matches!(meta, FileMeta::Legacy) {
            return Ok(meta);
        }
        let fresh = self.fetch_file(info).await?;
        if fresh.version != version {
            return Ok(meta);
        }
        let meta = self.open_meta(&fresh);
        if let Ok(ino) = self.file_ino(info.id) {
            self.take_server_info(ino, fresh);
        }
        Ok(meta)
    }
}
