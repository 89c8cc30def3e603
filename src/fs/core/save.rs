//! Saving: from the cached plaintext to the server, and what happens when
//! that cannot go as planned.
//!
//! Data flow. flush (each close), fsync and release call [`VaultFs::upload`]
//! for a file with unsaved changes: the policy may first reduce an image;
//! the content is sealed (end to end, or tagged as pass-through) by
//! super::seal while it is sent, under a fresh generation above every one
//! seen of the file; the upload states the version it replaces. Only once
//! the server has stored it does the file count as saved; until then it stays
//! dirty in memory, and after the last release it is retried with backoff
//! ([`VaultFs::retry_upload`], one per file, storing only a version its
//! writer finished) unless the refusal is permanent. If the file
//! changed on the server meanwhile, both versions are kept: ours goes to a
//! conflict copy next to it ([`conflict_name`]). Unmount calls
//! [`VaultFs::flush_all`].
//!
//! A pass-through stream cannot be resumed once ended, so a flush (a close
//! of one descriptor) leaves it running; it ends at fsync, or at release,
//! when the last descriptor is gone.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::backing::Change;
use super::handles::HandleMode;
use super::rules::check_size;
use super::seal;
use super::tree::{FileMeta, Node, Released};
use super::unsent::FirstSave;
use super::{FsError, Ino, Result, VaultFs, MAX_SERVER_VERSION};
use crate::cache::{PlainCache, PlainData, PlainHandle, SecretBuf};
use crate::crypto::{self, FileContext, FileManifest, NameContext};
use crate::ids::FileId;
use crate::policy::VaultPolicy;
use crate::protocol::{ms_of, now_ms, FileInfo, NewFile, Sealed, UploadResult};
use crate::remote::{Remote, RemoteError, UploadBody};

/// How often unmount says it is still waiting for streams to commit.
const UNMOUNT_WAIT_NOTICE: Duration = Duration::from_secs(5);
/// How long unmount waits for the deletes of unlinked files.
const UNMOUNT_DELETE_WAIT: Duration = Duration::from_secs(30);

/// How an upload from the cache ended.
enum Saved {
    /// Stored (in the file, or in the conflict copy the result names), with
    /// the sealed manifest that went with it.
    Stored(UploadResult, Option<Sealed>),
    /// The file changed on the server meanwhile: nothing stored.
    Stale(Option<u64>),
    /// A first save that did not create the file (see `unsent`).
    CreateFirst { unknown: bool },
    /// A first save that made neither the file nor its new record (see `dirs`).
    RecordFirst,
    /// Not stored.
    Failed(FsError),
}

/// What a pass-through upload commits besides its tags.
pub(super) struct PlainUpload {
    pub(super) generation: u64,
    pub(super) length: u64,
    pub(super) mtime_ms: i64,
    /// Where the content goes if the file moved on (content sent once).
    pub(super) copy: Option<NewFile>,
}

impl<R: Remote> VaultFs<R> {
    // ---- the FUSE operations ------------------------------------------------------

    /// fsync: uploads changes, ends a pass-through stream, and returns once the
    /// server has stored them.
    pub async fn fsync(&self, ino: Ino, fh: u64) -> Result<()> {
        self.save(ino, fh, false).await
    }

    /// FUSE flush, the close of one descriptor: uploads changes and returns
    /// once the server has stored them.
    ///
    /// The kernel sends a flush for *every* close of a descriptor, including the
    /// copies a fork hands to a child that then execs, so a flush can arrive in
    /// the middle of a write. For files in the cache that only stores a snapshot.
    /// A pass-through stream, though, cannot be resumed once ended, so a flush
    /// leaves it running; it ends at fsync, or at release, when the last
    /// descriptor is gone. (Ending it at the opener's close, told apart by
    /// process id, corrupted a 250 MB file in one loaded CI run that I could not
    /// reproduce, so that is not done.)
    pub async fn flush(&self, ino: Ino, fh: u64) -> Result<()> {
        self.save(ino, fh, true).await
    }

    async fn save(&self, ino: Ino, fh: u64, closing: bool) -> Result<()> {
        self.take_mapped_writes(fh).await;
        let (id, mode) = self.handles.get(fh)?;
        if self.modes.is_streaming(id) {
            if closing {
                tracing::debug!(file = %id, "close of a streaming file: the stream goes on until release");
                return Ok(());
            }
            return self.finish_stream(id).await.map(|_| ());
        }
        if let HandleMode::PassRead(_) = mode {
            return Ok(());
        }
        let handle = self.cache.peek(id).ok_or(FsError::Io("file data evicted while open".into()))?;
        self.upload(ino, &handle).await
    }

    /// This mount keeps nothing more of file `id` (deleted, replaced or
    /// never to be saved): its unsaved state, its plaintext (wiped) and its
    /// backing file go.
    pub(super) fn forget_content(&self, id: FileId) {
        self.modes.forget_unsaved(id);
        self.cache.remove(id);
        self.forget_backing(id);
    }

    /// Last close of a handle. Changes that could not be uploaded stay in memory
    /// and are retried in the background until they are stored.
    pub async fn release(self: &Arc<Self>, ino: Ino, fh: u64) -> Result<()> {
        self.take_mapped_writes(fh).await;
        let id = self.handles.close(fh)?;
        self.closed_for_backing(id);
        if !self.handles.is_open(id) {
            self.finish_stream(id).await?;
        }
        let last = !self.handles.is_open(id);
        let released = if last { self.tree.lock().release_orphan(ino) } else { None };
        if let Some(released) = released {
            // The last handle of an unlinked file: now it goes.
            self.forget_content(id);
            if let Released::DeleteOnServer(info) = released {
                // Waiting for its delete since the tree let go of it (rmdir
                // of its record waits for it), like any unlinked file.
                self.delete_in_background(info);
            }
            return Ok(());
        }
        // Unsaved changes: a retry takes this handle's pin and saves them,
        // unless one already waits (it takes them along). Otherwise the pin
        // goes from the entry itself, which a move may rename meanwhile.
        let entry = self.cache.peek(id);
        let retry = match &entry {
            Some(h) => {
                let mut d = h.lock().await;
                d.dirty && !std::mem::replace(&mut d.retrying, true)
            }
            None => false,
        };
        match entry {
            Some(h) if retry => {
                let fs = Arc::clone(self);
                tokio::spawn(async move { fs.retry_upload(ino, h).await });
            }
            Some(h) => self.cache.unpin(Some(id), &h),
            // Removed from the cache (unlinked, replaced): no pin left.
            None => {}
        }
        Ok(())
    }

    /// Saves file `ino` (its plaintext `handle`) after a failed save, with
    /// backoff, until it is stored or refused for good; it holds one pin of
    /// the entry (the last handle's), and follows it by inode and entry, so
    /// a move that gives the file a new id does not lose it.
    ///
    /// It stores only a version its writer finished (see
    /// [`PlainData::is_finished`]), or what the file holds once nobody else
    /// pins it: a writer that reopened the file may be halfway through its
    /// next version, and storing that half would store a version nobody
    /// wrote, which a backup taken then would keep. That writer's close
    /// saves the file; if that fails too, this retry stores what that close
    /// finished. (A close of another descriptor meanwhile, or its fsync or
    /// lock release, stores what the file holds then, as before: such a
    /// save takes what it finds as finished.)
    async fn retry_upload(self: Arc<Self>, ino: Ino, handle: PlainHandle) {
        let mut wait = Duration::from_secs(1);
        let mut refused = false;
        loop {
            let mut d = Arc::clone(&handle).lock_owned().await;
            let pins = self.cache.pins_of(&handle);
            // Ended under the lock a release asks under: a failed close
            // either finds this retry still on, or starts another.
            if !d.dirty || refused || pins == 0 {
                d.retrying = false;
                self.cache.unpin(None, &handle);
                return;
            }
            if pins == 1 {
                // Only this retry holds the entry: nobody has the file open
                // or is at work on it, so what it holds is what its users
                // left (also what no close marked: writes through a map
                // that came after the last one, at release).
                d.finished();
            }
            if !d.is_finished() {
                drop(d);
                tracing::debug!(ino, "being written again, so saved by its close; looking again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
                continue;
            }
            match self.upload_locked(ino, &handle, d).await {
                // Looked at again: stored, or changed once more meanwhile
                // (and its writer's close failed too).
                Ok(()) => {}
                Err(e) if e.is_permanent() => {
                    // Sending the same bytes again cannot succeed (too large,
                    // refused, not allowed): no retry loop. The data stays in
                    // memory, unsaved; unmount reports it, and a later failed
                    // close starts a retry again.
                    tracing::error!(ino, error = %e, "upload refused; the file stays unsaved in memory");
                    refused = true;
                }
                Err(e) => {
                    tracing::warn!(ino, error = %e, "upload still failing; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                    if matches!(e, FsError::KeyBehind(_)) {
                        // The missing key comes with a share, found by listing the vaults.
                        if let Err(e) = self.load_root(false).await {
                            tracing::debug!(error = %e, "cannot list the vaults to look for a new share");
                        }
                    }
                }
            }
        }
    }

    /// Uploads every file with unsaved changes, and sends the directories
    /// made here that are not on the server yet (before unmount). Returns
    /// how many could not be saved.
    pub async fn flush_all(&self) -> usize {
        let mut failed = 0;
        for id in self.modes.streaming() {
            if let Err(e) = self.finish_stream(id).await {
                tracing::error!(file = %id, error = %e, "streaming upload failed before unmount");
                failed += 1;
            }
        }
        // Streams being finished by a release elsewhere: wait until they commit,
        // or leaving now would abort them.
        let mut changed = self.modes.changed();
        loop {
            let left = self.modes.streaming().len();
            if left == 0 {
                break;
            }
            if tokio::time::timeout(UNMOUNT_WAIT_NOTICE, changed.changed()).await.is_err() {
                tracing::info!("waiting for {left} upload(s) to finish before unmounting");
            }
        }
        for (id, handle) in self.cache.dirty_ids() {
            let ino = self.tree.lock().file_ino(id);
            match ino {
                Some(ino) => {
                    if let Err(e) = self.upload(ino, &handle).await {
                        tracing::error!(file = %id, error = %e, "could not save before unmount");
                        failed += 1;
                    }
                }
                None => failed += 1,
            }
        }
        // Directories made here that no save took along.
        failed += self.send_new_dirs(None).await;
        // Unlinked files the server has not deleted yet: waited for a while
        // (a delete the server cannot take now would show the file again).
        if tokio::time::timeout(UNMOUNT_DELETE_WAIT, self.deletes_settled(None)).await.is_err() {
            let left = self.deletes_pending();
            tracing::warn!(left, "unmounted before the server deleted every unlinked file; they show again");
        }
        failed
    }

    // ---- uploading from the cache ---------------------------------------------------

    /// Uploads the file's plaintext if it changed. Returns when the server has
    /// stored it. On a version conflict, our data goes to a conflict copy.
    /// What it holds is taken as a finished version (a close, fsync, lock
    /// release, truncate(2) or unmount asked to save it).
    pub(super) async fn upload(&self, ino: Ino, handle: &PlainHandle) -> Result<()> {
        let mut d = Arc::clone(handle).lock_owned().await;
        d.finished();
        self.upload_locked(ino, handle, d).await
    }

    /// [`VaultFs::upload`] with the plaintext lock `d` of `handle` held
    /// throughout (also while a new record or the file is created first),
    /// so what is stored is what the caller looked at.
    pub(super) async fn upload_locked(
        &self,
        ino: Ino,
        handle: &PlainHandle,
        mut d: tokio::sync::OwnedMutexGuard<PlainData>,
    ) -> Result<()> {
        if !d.dirty {
            return Ok(());
        }
        if self.tree.lock().is_orphan(ino) {
            d.dirty = false; // unlinked: there is nothing to save it to
            return Ok(());
        }
        let info = self.file_info(ino)?;
        let rules = self.rules.vault(info.vault);
        let name = self.tree.lock().name_of(ino);
        let d = match rules.images.applies_to(&name) {
            Some(format) => self.reduce_image(ino, info.id, handle, d, format, &rules.images).await,
            None => d,
        };
        let plain_len = d.bytes.len() as u64;
        check_size(&rules, plain_len)?;
        let e2e = rules.encrypts(plain_len);
        // A file only this mount knows: created with its content in one
        // request, or else created first.
        let first = self.creates_with_content(ino, e2e);
        let mut d = d;
        let info = if !first && self.tree.lock().is_unsent(ino) {
            self.create_on_server(ino, &mut d).await?;
            self.file_info(ino)?
        } else {
            info
        };
        let generation = self.next_generation(ino, info.id, d.version);
        let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
        let sealer = self.sealer(&ctx, generation, e2e, plain_len)?;
        let meta = sealer.meta();
        let copy = if e2e { None } else { Some(self.conflict_copy_file(ino, &info)?) };
        let progress = self.modes.begin_upload(info.id, sealer.len());
        let expected = d.version;
        tracing::debug!(file = %info.id, len = plain_len, expected, e2e, "uploading from the cache");
        let (body, sealing) = seal::pipeline(d, sealer, progress);
        let mtime_ms = self.modes.unsaved_since(info.id).map_or_else(now_ms, ms_of);
        let asked = Instant::now();
        let outcome = match copy {
            None => {
                let result = match (first, meta.clone()) {
                    (true, Some(sealed)) => {
                        match self.create_with_content(ino, &info, sealed, mtime_ms, body).await {
                            FirstSave::Stored(done) => Ok(done),
                            FirstSave::CreateFirst { unknown } => Err(Saved::CreateFirst { unknown }),
                            FirstSave::RecordFirst => Err(Saved::RecordFirst),
                            FirstSave::Failed(e) => Err(Saved::Failed(e)),
                        }
                    }
                    _ => match self.remote().upload(info.id, expected, true, Some(mtime_ms), body).await {
                        // None was asked for: a server that says it kept our
                        // content as a copy is not believed (it stays unsaved).
                        Ok(done) if done.conflict_copy.is_some() => Err(Saved::Failed(FsError::Io(
                            "the server answered with a conflict copy it was not asked for".into(),
                        ))),
                        Ok(done) => Ok(done),
                        Err(RemoteError::Conflict { current }) => Err(Saved::Stale(current)),
                        Err(e) => Err(Saved::Failed(e.into())),
                    },
                };
                sealing.finish().await.map(|(d, _)| {
                    let saved = match result {
                        Ok(done) => Saved::Stored(done, meta),
                        Err(not) => not,
                    };
                    (d, saved)
                })
            }
            Some(copy) => {
                // Pass-through content: staged, then committed with its
                // manifest (or, if the file moved on, as a conflict copy).
                let body = UploadBody { conflict_copy: Some(copy.clone()), ..body };
                let staged = self.remote().stage(info.id, expected, false, body).await;
                match sealing.finish().await {
                    Ok((d, tags)) => {
                        let plain = PlainUpload { generation, length: plain_len, mtime_ms, copy: Some(copy) };
                        let saved = match (staged, tags) {
                            (Ok(staged), Some(tags)) => {
                                match self.commit_plain(&info, expected, staged, tags, plain).await {
                                    Ok((done, meta)) => Saved::Stored(done, Some(meta)),
                                    Err(e) => Saved::Failed(e),
                                }
                            }
                            (Err(e), _) => Saved::Failed(e.into()),
                            (Ok(_), None) => {
                                Saved::Failed(FsError::Io("the content was not all sent".into()))
                            }
                        };
                        Ok((d, saved))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        self.modes.end_upload(info.id);
        let (mut d, saved) = outcome?;
        tracing::debug!(file = %info.id, ok = matches!(saved, Saved::Stored(..)), "upload from the cache done");
        match saved {
            Saved::Stored(done, meta) if done.conflict_copy.is_none() => {
                d.dirty = false;
                d.version = done.version;
                d.confirmed = Some(asked);
                if first {
                    self.now_sent(ino);
                }
                self.set_file_info(ino, |i| {
                    i.version = done.version;
                    i.size = done.size;
                    i.e2e = e2e;
                    i.mtime_ms = mtime_ms;
                    i.meta = meta.unwrap_or_default();
                });
                // After the tree holds it (see `attr_of`).
                self.note_generation(info.id, generation);
                // The server's size now says what the application wrote.
                self.modes.forget_unsaved(info.id);
                Ok(())
            }
            Saved::Stored(done, _) => {
                tracing::warn!(file = %info.id, copy = ?done.conflict_copy, "the file changed on the server meanwhile; ours was saved as a conflict copy");
                // The original now shows the server's version; ours lives in the copy.
                d.dirty = false;
                d.loaded = false;
                d.bytes = SecretBuf::new();
                self.modes.forget_unsaved(info.id);
                self.refresh_after_conflict(ino, &info).await;
                Ok(())
            }
            Saved::Stale(current) => {
                tracing::warn!(file = %info.id, ?current, "the file changed on the server meanwhile; saving ours as a conflict copy");
                self.save_conflict_copy(ino, &info, &d.bytes).await?;
                // The original now shows the server's version; ours lives in the copy.
                d.dirty = false;
                d.loaded = false;
                d.bytes = SecretBuf::new();
                self.modes.forget_unsaved(info.id);
                Ok(())
            }
            Saved::Failed(e) => {
                tracing::warn!(file = %info.id, error = %e, "upload failed; the data stays in memory and will be retried");
                Err(e)
            }
            Saved::RecordFirst => {
                // Neither the record nor the file was made: the record alone,
                // then the save again. If the record could be made, the
                // server did not know the request with a record.
                let record = self.tree.lock().parent_of(ino).ok_or(FsError::NotFound)?;
                self.record_on_server(record).await?;
                self.no_records_with_files();
                Box::pin(self.upload_locked(ino, handle, d)).await
            }
            Saved::CreateFirst { unknown } => {
                let created = self.create_on_server(ino, &mut d).await?;
                if unknown && created {
                    // The record is there, so the server did not know the request.
                    self.no_creates_with_content();
                }
                Box::pin(self.upload_locked(ino, handle, d)).await
            }
        }
    }

    /// The generation the next upload of a file gets: above every generation
    /// seen of it (remembered, in its manifest) and its server version.
    /// The server's version counts too (a file without a manifest has no
    /// other), bounded so that a server's huge number cannot exhaust the
    /// counter; the generation is noted as sent, so a retry goes above it.
    pub(super) fn next_generation(&self, ino: Ino, id: FileId, version: u64) -> u64 {
        let seen = self.freshness.write_floor(id);
        let stated = match self.tree.lock().node_unchecked(ino) {
            Some(Node::File { meta: FileMeta::Sealed(m), .. }) => m.generation,
            _ => 0,
        };
        let generation = seen.max(stated).max(version.min(MAX_SERVER_VERSION)).saturating_add(1);
        self.freshness.attempt(id, generation);
        generation
    }

    /// A new file next to `ino`, named as a conflict copy of it, for content
    /// that can be sent only once (staged content goes to it if the file
    /// moved on). Its manifest is sealed at the commit.
    pub(super) fn conflict_copy_file(&self, ino: Ino, info: &FileInfo) -> Result<NewFile> {
        let copy_name = self.conflict_copy_name(ino);
        let copy_id = FileId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let ctx = NameContext::FileName { vault: info.vault, record: info.record, file: copy_id };
        let sealed = self.seal(info.vault, ctx, &copy_name)?;
        Ok(NewFile { id: copy_id, name: sealed, e2e: false, mtime_ms: None, meta: Sealed::default() })
    }

    /// Commits staged pass-through content with its manifest (sealed for the
    /// file, and for its conflict copy if one may take it).
    pub(super) async fn commit_plain(
        &self,
        info: &FileInfo,
        expected: u64,
        staged: crate::protocol::Staged,
        tags: crate::crypto::manifest::PieceTags,
        plain: PlainUpload,
    ) -> Result<(crate::protocol::UploadResult, Sealed)> {
        if staged.size != plain.length {
            return Err(FsError::Io(format!("the server stored {} bytes of {}", staged.size, plain.length)));
        }
        let perm = self.stated_perm(info.id)?;
        let manifest =
            FileManifest::new(plain.generation, plain.length, crypto::ContentMode::Plain(tags), perm);
        let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
        let meta = self.seal_manifest(&ctx, &manifest)?;
        let conflict_copy = match plain.copy {
            Some(copy) => {
                let ctx = FileContext { file: copy.id, ..ctx };
                Some(NewFile { meta: self.seal_manifest(&ctx, &manifest)?, ..copy })
            }
            None => None,
        };
        let request = crate::protocol::CommitRequest {
            staged: staged.staged,
            meta: meta.clone(),
            mtime_ms: Some(plain.mtime_ms),
            conflict_copy,
        };
        Ok((self.remote().commit(info.id, expected, request).await?, meta))
    }

    /// After our content went to a conflict copy: the original shows the
    /// server's version again, and the copy appears.
    pub(super) async fn refresh_after_conflict(&self, ino: Ino, info: &FileInfo) {
        if let Ok(fresh) = self.fetch_file(info).await {
            self.take_server_info(ino, fresh);
        }
        let _ = self.load_vault(info.vault, true).await;
    }

    /// Reduces a saved image as the vault's policy says, on a blocking thread
    /// (only this file waits). Whatever goes wrong, the data stays as it was.
    async fn reduce_image(
        &self,
        ino: Ino,
        id: FileId,
        handle: &PlainHandle,
        d: tokio::sync::OwnedMutexGuard<PlainData>,
        format: crate::policy::ImageFormat,
        images: &crate::policy::ImagePolicy,
    ) -> tokio::sync::OwnedMutexGuard<PlainData> {
        use super::super::reduce::{reduce, Reduced};
        let (max_edge, quality) = (images.max_edge, images.jpeg_quality);
        let task = tokio::task::spawn_blocking(move || {
            let outcome = reduce(&d.bytes, format, max_edge, quality);
            (d, outcome)
        });
        let (mut d, outcome) = match task.await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(file = %id, error = %e, "image reduction failed; the image is stored unchanged");
                return Arc::clone(handle).lock_owned().await;
            }
        };
        match outcome {
            Ok(Reduced::Smaller { bytes, width, height }) => {
                tracing::info!(file = %id, from = d.bytes.len(), to = bytes.len(), width, height, "image reduced");
                let len = bytes.len();
                d.bytes = SecretBuf::from_vec(bytes);
                self.follow_in_backing(id, Change::Whole(&d.bytes));
                // Not the user's change: a time set with utimensat stays.
                self.modes.note_resized(id, len as u64);
                self.cache.account(id, len);
                // The kernel still holds the pages and size the application wrote.
                self.tell_kernel(vec![super::Invalidation::Inode(ino)]);
            }
            Ok(Reduced::Unchanged(why)) => tracing::debug!(file = %id, "image not reduced: {why}"),
            Err(why) => {
                tracing::warn!(file = %id, "image could not be reduced and is stored unchanged: {why}")
            }
        }
        d
    }

    /// Uploads `plain` whole as the new content of `target` (a file just
    /// created: a conflict copy, or a file moved to another record), end to
    /// end or passed through as the vault's policy says. Returns the result
    /// and the sealed manifest stored with it.
    pub(super) async fn upload_whole(
        &self,
        target: &FileInfo,
        generation: u64,
        mtime_ms: i64,
        plain: &[u8],
    ) -> Result<(crate::protocol::UploadResult, Sealed)> {
        let rules = self.rules.vault(target.vault);
        check_size(&rules, plain.len() as u64)?;
        let ctx = FileContext { vault: target.vault, record: target.record, file: target.id };
        self.freshness.attempt(target.id, generation);
        let done = self.upload_whole_as(target, &ctx, &rules, generation, mtime_ms, plain).await?;
        // Its generation is what this machine knows of it from now on: the
        // server cannot serve its first, empty manifest instead.
        self.note_generation(target.id, generation);
        Ok(done)
    }

    /// A name for a conflict copy of `ino` that no entry of its directory
    /// has: a copy made in the same second as another gets a number after
    /// the time (two entries of one name would show as a duplicate).
    fn conflict_copy_name(&self, ino: Ino) -> OsString {
        let tree = self.tree.lock();
        let (name, now) = (tree.name_of(ino), SystemTime::now());
        let parent = tree.parent_of(ino);
        (1..)
            .map(|nth| conflict_name(&name, now, nth))
            .find(|copy| parent.is_none_or(|p| tree.child(p, copy).is_none()))
            .expect("a free name among endless numbers")
    }

    async fn save_conflict_copy(&self, ino: Ino, info: &FileInfo, plain: &[u8]) -> Result<()> {
        // The names other clients gave their copies meanwhile are known
        // before one is chosen (a failed listing leaves the tree's).
        let _ = self.load_vault(info.vault, true).await;
        let parent = self.tree.lock().parent_of(ino).ok_or(FsError::NotFound)?;
        let copy_name = self.conflict_copy_name(ino);
        let (copy_ino, copy) = self.new_file(parent, &copy_name, self.stated_perm(info.id)?).await?;
        let (done, meta) = self.upload_whole(&copy, 2, now_ms(), plain).await?;
        let e2e = self.rules.vault(info.vault).encrypts(plain.len() as u64);
        self.set_file_info(copy_ino, |i| {
            i.version = done.version;
            i.size = done.size;
            i.e2e = e2e;
            i.meta = meta;
        });
        tracing::warn!(file = %info.id, copy = %copy.id, name = %super::super::lognames::shown(&copy_name), "conflict copy saved");
        let _ = self.load_vault(info.vault, true).await;
        Ok(())
    }

    /// Seals `plain` whole for `target` and sends it: end to end with its
    /// manifest, or staged and committed with its tags.
    async fn upload_whole_as(
        &self,
        target: &FileInfo,
        ctx: &FileContext,
        rules: &VaultPolicy,
        generation: u64,
        mtime_ms: i64,
        plain: &[u8],
    ) -> Result<(UploadResult, Sealed)> {
        let e2e = rules.encrypts(plain.len() as u64);
        let sealer = self.sealer(ctx, generation, e2e, plain.len() as u64)?;
        let (body, meta, tags) = seal::seal_whole(plain, sealer)?;
        if let Some(meta) = meta {
            let body = UploadBody::from_bytes(body).with_meta(meta.clone());
            let done = self.remote().upload(target.id, target.version, true, Some(mtime_ms), body).await?;
            return Ok((done, meta));
        }
        let tags = tags.ok_or_else(|| FsError::Io("the content was not all tagged".into()))?;
        // Not end-to-end encrypted: the server gets these bytes anyway.
        let staged =
            self.remote().stage(target.id, target.version, false, UploadBody::from_bytes(body)).await?;
        let upload = PlainUpload { generation, length: plain.len() as u64, mtime_ms, copy: None };
        self.commit_plain(target, target.version, staged, tags, upload).await
    }
}

/// Sets the version of the cached copy of `id` to `to` if it was `from` (the
/// server bumped it for a change of metadata only).
pub(super) async fn bump_cached_version(cache: &PlainCache, id: FileId, from: u64, to: u64) {
    if let Some(h) = cache.peek(id) {
        let mut d = h.lock().await;
        if d.version == from {
            d.version = to;
        }
    }
}

/// `report.pdf` -> `report (conflict 2026-11-23 051500).pdf` (UTC); the
/// `nth` copy of that second after the first: `report (conflict 2026-11-23
/// 051500 2).pdf`.
pub fn conflict_name(name: &OsStr, when: SystemTime, nth: u32) -> OsString {
    let t = time::OffsetDateTime::from(when);
    let stamp = format!(
        "{:04}-{:02}-{:02} {:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let bytes = name.as_bytes();
    let dot = bytes.iter().rposition(|&c| c == b'.').filter(|&i| i > 0);
    let (stem, ext) = match dot {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &b""[..]),
    };
    let mut out = stem.to_vec();
    let nth = if nth > 1 { format!(" {nth}") } else { String::new() };
    out.extend_from_slice(format!(" (conflict {stamp}{nth})").as_bytes());
    out.extend_from_slice(ext);
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn conflict_names_keep_the_extension() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_410_900); // 2026-11-23 05:15:00
        assert_eq!(conflict_name(OsStr::new("report.pdf"), t, 1), "report (conflict 2026-11-23 051500).pdf");
        assert_eq!(conflict_name(OsStr::new("notes"), t, 1), "notes (conflict 2026-11-23 051500)");
        assert_eq!(conflict_name(OsStr::new(".bashrc"), t, 1), ".bashrc (conflict 2026-11-23 051500)");
        // Leap day and the last second of a year.
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29 23:59:59
        assert_eq!(conflict_name(OsStr::new("a"), leap, 1), "a (conflict 2024-02-29 235959)");
        let eoy = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31 23:59:59
        assert_eq!(conflict_name(OsStr::new("a"), eoy, 0), "a (conflict 2026-12-31 235959)");
        // A second copy in the same second.
        assert_eq!(
            conflict_name(OsStr::new("report.pdf"), t, 2),
            "report (conflict 2026-11-23 051500 2).pdf"
        );
    }
}
