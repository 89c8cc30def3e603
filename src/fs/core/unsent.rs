//! New files that exist only in this mount until their first save.
//!
//! Data flow. A create makes the file in the tree only (its name and empty
//! manifest sealed as for the server) and marks its empty plaintext unsaved.
//! Its first save (the close that follows, an fsync, unmount, or the retry
//! of a failed save) creates it on the server with its content, mode and
//! time in one request (`PUT /v1/records/{record}/files/{file}`), where it
//! used to take a create and an upload: what `tar -x` or `git checkout` pays
//! per small file. Anything else that must name the file to the server first
//! (a rename, a lock, a stream past the end-to-end limit, a pass-through
//! save) creates it empty, as before ([`VaultFs::ensure_on_server`]); an
//! unlink before the first save sends nothing, unless a request that would
//! have created it got no answer (then it is made sure of, and deleted). One
//! unlinked while open and created later (a stream, a lock) is deleted on
//! the server at its last close. Until its first save the tree keeps the
//! file across listings, which do not name it ([`Tree::is_unsent`]).
//!
//! Every step that creates it holds the file's plaintext lock, so a save and
//! an unlink or rename never overlap half way. A create sent again after its
//! answer was lost finds the id taken: the file the server then describes
//! is taken as ours (its manifest only if it opens for this file), and the
//! content goes up over it as an ordinary save.
//! A server that does not know the one-request create (an older one answers
//! 404) gets a create and an upload from then on. A file whose record is not
//! on the server yet either takes the record along (super::dirs) or, for a
//! create on its own, sends it first.
//!
//! [`Tree::is_unsent`]: super::tree::Tree::is_unsent

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::tree::{FileMeta, Key, Node};
use super::{check_file_answer, FsError, Ino, Result, VaultFs};
use crate::cache::{PlainData, PlainHandle};
use crate::crypto::{FileContext, FileManifest, NameContext};
use crate::ids::FileId;
use crate::protocol::{now_ms, FileInfo, NewFile, Sealed, UploadResult};
use crate::remote::{Remote, RemoteError, UploadBody};

/// Whether the server creates a file with its content in one request.
pub(super) struct Creates(AtomicBool);

impl Default for Creates {
    fn default() -> Self {
        Creates(AtomicBool::new(true))
    }
}

/// How a first save that tried to create the file with its content ended.
pub(super) enum FirstSave {
    /// Created and stored.
    Stored(UploadResult),
    /// Not created by that request: create the file on its own, then save
    /// it as usual. `unknown`: the answer was 404 (the record is gone, or
    /// the server does not know the request); else the id was taken.
    CreateFirst { unknown: bool },
    /// Not created: the server took neither the file nor the record sent
    /// with it (404). Send the record on its own, then save again.
    RecordFirst,
    /// Failed (kept unsaved, retried as any save).
    Failed(FsError),
}

impl<R: Remote> VaultFs<R> {
    /// Adds an empty file `name` with permission bits `perm` to record
    /// `parent`, in this mount only: unsaved, its first save creates it on
    /// the server.
    pub(super) fn new_unsent_file(&self, parent: Ino, name: &OsStr, perm: u16) -> Result<(Ino, FileInfo)> {
        let manifest = FileManifest::new_empty(1, perm);
        let new = self.new_file_request(parent, name, &manifest)?;
        let (vault, record) = self.file_parent(parent)?;
        let info = FileInfo {
            id: new.id,
            vault,
            record,
            name: new.name,
            size: 0,
            version: 0,
            e2e: true,
            mtime_ms: new.mtime_ms.unwrap_or_else(now_ms),
            meta: new.meta,
        };
        let node = self.file_node(info.clone(), parent);
        self.note_generation(info.id, manifest.generation);
        let ino = self.tree.lock().add_unsent(parent, name, Key::File(info.id), node);
        self.modes.note_change(info.id, 0);
        self.touch_dir(parent);
        Ok((ino, info))
    }

    /// What creates file `name` in record `parent` with `manifest` (an empty
    /// file's, or a symbolic link's): a new id, the name and manifest sealed.
    pub(super) fn new_file_request(
        &self,
        parent: Ino,
        name: &OsStr,
        manifest: &FileManifest,
    ) -> Result<NewFile> {
        let (vault, record) = self.file_parent(parent)?;
        let id = FileId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let sealed = self.seal(vault, NameContext::FileName { vault, record, file: id }, name)?;
        let meta = self.seal_manifest(&FileContext { vault, record, file: id }, manifest)?;
        Ok(NewFile { id, name: sealed, e2e: true, mtime_ms: Some(now_ms()), meta })
    }

    /// Whether the first save of file `ino` may create it with its content
    /// (end-to-end content, a server that knows the request).
    pub(super) fn creates_with_content(&self, ino: Ino, e2e: bool) -> bool {
        e2e && self.creates.0.load(Ordering::Relaxed) && self.tree.lock().is_unsent(ino)
    }

    /// The first save of file `info`: creates it with `body` (sealed as
    /// `meta`, dated `mtime_ms`) in one request. The caller holds its
    /// plaintext.
    pub(super) async fn create_with_content(
        &self,
        ino: Ino,
        info: &FileInfo,
        meta: Sealed,
        mtime_ms: i64,
        body: UploadBody,
    ) -> FirstSave {
        let new = NewFile { id: info.id, name: info.name.clone(), e2e: true, mtime_ms: Some(mtime_ms), meta };
        // Its record goes along if it is not on the server yet (super::dirs).
        let Some(record_ino) = self.tree.lock().parent_of(ino) else {
            return FirstSave::Failed(FsError::NotFound);
        };
        let (new_record, _sending) = match self.record_with_file(record_ino, body.len).await {
            Ok(Some((vault, record, sending))) => (Some((vault, record)), Some(sending)),
            Ok(None) => (None, None),
            Err(e) => return FirstSave::Failed(e),
        };
        let with_record = new_record.is_some();
        match self.remote().create_with_content(info.record, new_record, new, body).await {
            // Nothing of the sort was asked: a server that says it kept our
            // content as a copy is not believed (the content stays unsaved).
            Ok(done) if done.conflict_copy.is_some() => {
                let e = RemoteError::Protocol(
                    "the server answered a new file's first save with a conflict copy".into(),
                );
                self.note_uncertain(ino, &e);
                if with_record {
                    self.note_record_uncertain(record_ino, &e);
                }
                FirstSave::Failed(e.into())
            }
            Ok(done) => {
                if with_record {
                    // Every new record's version.
                    self.record_now_sent(record_ino, Some(1));
                }
                FirstSave::Stored(done)
            }
            // The file's id or the record's is taken (an earlier request
            // whose answer was lost): each is made sure of on its own.
            Err(RemoteError::Exists(_)) => FirstSave::CreateFirst { unknown: false },
            Err(RemoteError::NotFound(_)) if with_record => FirstSave::RecordFirst,
            Err(RemoteError::NotFound(_)) => FirstSave::CreateFirst { unknown: true },
            Err(e) => {
                self.note_uncertain(ino, &e);
                if with_record {
                    self.note_record_uncertain(record_ino, &e);
                }
                FirstSave::Failed(e.into())
            }
        }
    }

    /// A request that would have created file `ino` failed: if it may have
    /// reached the server anyway (no answer), an unlink must ask there.
    fn note_uncertain(&self, ino: Ino, e: &RemoteError) {
        if matches!(e, RemoteError::Unavailable(_) | RemoteError::Protocol(_)) {
            self.tree.lock().note_maybe_sent(ino);
        }
    }

    /// The first save of file `ino` went up: it is on the server now.
    pub(super) fn now_sent(&self, ino: Ino) {
        self.tree.lock().sent(ino);
    }

    /// Creates file `ino` on the server, empty as its manifest says, if it
    /// exists only in this mount: before anything that names it to the
    /// server. Takes its plaintext lock (so no save is half way).
    pub(super) async fn ensure_on_server(&self, ino: Ino) -> Result<()> {
        if !self.tree.lock().is_unsent(ino) {
            return Ok(());
        }
        let id = self.file_info(ino)?.id;
        match self.cache.peek(id) {
            Some(handle) => {
                let mut d = Arc::clone(&handle).lock_owned().await;
                self.create_on_server(ino, &mut d).await.map(drop)
            }
            None => self.create_on_server(ino, &mut PlainData::default()).await.map(drop),
        }
    }

    /// [`VaultFs::ensure_on_server`] for a caller that holds the plaintext
    /// `d` of file `ino`; `d` then follows the server's version. True if
    /// this request created it (not: it was there, or on the server already).
    pub(super) async fn create_on_server(&self, ino: Ino, d: &mut PlainData) -> Result<bool> {
        if !self.tree.lock().is_unsent(ino) {
            return Ok(false);
        }
        // Its record first, if that is not on the server yet (super::dirs).
        let record_ino = self.tree.lock().parent_of(ino).ok_or(FsError::NotFound)?;
        self.record_on_server(record_ino).await?;
        let info = self.file_info(ino)?;
        let new = NewFile {
            id: info.id,
            name: info.name.clone(),
            e2e: true,
            mtime_ms: Some(info.mtime_ms),
            meta: info.meta.clone(),
        };
        let (created, by_us) = match self.remote().create_file(info.record, new).await {
            Ok(created) => {
                let created = check_file_answer(info.id, info.vault, created)?;
                // As sealed here, whatever the server echoes.
                (FileInfo { meta: info.meta.clone(), ..created }, true)
            }
            // Created by an earlier request whose answer was lost (or the
            // server says so): what it holds now is the file, and what this
            // mount holds goes up over it as an ordinary save. Its manifest
            // is taken only if it opens (sealed for this file); else ours
            // stays, and nothing of the server's word on the file's kind
            // (e2e, size) is used.
            Err(RemoteError::Exists(_)) => {
                let there = check_file_answer(info.id, info.vault, self.remote().file(info.id).await?)?;
                match self.open_meta(&there) {
                    FileMeta::Sealed(_) => (there, false),
                    _ => (FileInfo { meta: info.meta.clone(), ..there }, false),
                }
            }
            Err(e) => {
                self.note_uncertain(ino, &e);
                return Err(e.into());
            }
        };
        if created.record != info.record {
            return Err(FsError::Io("the server created the file in another record".into()));
        }
        d.version = created.version;
        self.tree.lock().sent(ino);
        // Not news to the kernel: what it holds of the file is this mount's,
        // and that is what goes up.
        self.set_file_info(ino, |i| *i = created);
        Ok(by_us)
    }

    /// Unlinks or replaces file `ino` if it exists only in this mount: it
    /// leaves the tree (an orphan while `open`) and nothing is sent. Under
    /// its plaintext lock, so a first save is not half way. False if it is on
    /// the server (delete it there): also when a request that would have
    /// created it got no answer, after making sure it is there.
    pub(super) async fn forget_unsent(&self, ino: Ino, id: FileId, open: bool) -> Result<bool> {
        if !self.tree.lock().is_unsent(ino) {
            return Ok(false);
        }
        let handle: Option<PlainHandle> = self.cache.peek(id);
        let mut d = match &handle {
            Some(h) => Some(Arc::clone(h).lock_owned().await),
            None => None,
        };
        if self.tree.lock().maybe_sent(ino) {
            let mut none = PlainData::default();
            self.create_on_server(ino, d.as_deref_mut().unwrap_or(&mut none)).await?;
            return Ok(false);
        }
        {
            let mut tree = self.tree.lock();
            if !tree.is_unsent(ino) {
                return Ok(false);
            }
            match tree.node_unchecked(ino) {
                Some(Node::File { .. }) => tree.unlink(ino, open, false),
                _ => return Ok(false),
            }
        }
        if !open {
            // Nothing of it is left to save.
            if let Some(d) = d.as_mut() {
                d.dirty = false;
            }
            drop(d);
            self.forget_content(id);
        }
        Ok(true)
    }

    /// A server answering 404 to a one-request create knows no such request
    /// (an older version) if a create of the same file then works: from
    /// then on new files are created, then uploaded.
    pub(super) fn no_creates_with_content(&self) {
        if self.creates.0.swap(false, Ordering::Relaxed) {
            tracing::info!("the server does not create files with their content in one request (an older version): each new file costs a create and an upload");
        }
    }
}
