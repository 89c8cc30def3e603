//! Attributes: sizes, times, permissions and link counts as the kernel sees
//! them, and setattr (truncate, utimensat).
//!
//! Data flow. A file's size and time come from its manifest and server
//! metadata (in the tree), unless this mount holds something newer: a stream
//! in progress or unsaved changes (super::mode), read from there, never by
//! trying the data's lock: a stale size here makes the kernel truncate its
//! page cache under a write in progress, which then sends zeros. Records carry
//! no times on the server, so a directory shows the mount's start until this
//! mount changes it; access times are memory only. Those times live in
//! [`Times`], whose lock is a leaf.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::backing::Change;
use super::rules::check_size;
use super::tree::{FileMeta, Node, Tree};
use super::{check_file_answer, Attr, FsError, Ino, Kind, Result, VaultFs};
use crate::crypto::manifest::{LEGACY_PERM, PERM_MASK};
use crate::crypto::{FileContext, Layout};
use crate::protocol::{ms_of, time_from_ms, FileInfo, FileUpdate};
use crate::remote::Remote;

/// Times this mount keeps for a node, in memory only.
#[derive(Default, Clone, Copy)]
struct NodeTimes {
    /// When this mount last changed a directory's entries (or what utimensat set).
    dir_mtime: Option<SystemTime>,
    /// An access time set by the application (as cp -a and rsync -a do).
    atime: Option<SystemTime>,
}

/// The times of [`NodeTimes`], by inode.
#[derive(Default)]
pub(super) struct Times(Mutex<HashMap<Ino, NodeTimes>>);

impl Times {
    fn get(&self, ino: Ino) -> NodeTimes {
        self.0.lock().get(&ino).copied().unwrap_or_default()
    }

    fn set_dir_mtime(&self, ino: Ino, t: SystemTime) {
        self.0.lock().entry(ino).or_default().dir_mtime = Some(t);
    }

    fn set_atime(&self, ino: Ino, t: SystemTime) {
        self.0.lock().entry(ino).or_default().atime = Some(t);
    }
}

impl<R: Remote> VaultFs<R> {
    /// Attributes of `ino` (`node`), with `tree` for a directory's link count.
    pub(super) fn attr_of(&self, tree: &Tree, ino: Ino, node: &Node) -> Attr {
        let times = self.times.get(ino);
        let mut attr = match node {
            Node::Root | Node::Vault { .. } | Node::Record { .. } => Attr {
                ino,
                kind: Kind::Dir,
                size: 0,
                mtime: times.dir_mtime.unwrap_or(self.mounted_at),
                atime: UNIX_EPOCH,
                perm: self.perm_of(node, 0o777),
                // "." and the entry in the parent, plus each subdirectory's "..".
                nlink: 2 + tree.subdirs(ino) as u32,
            },
            Node::File { info, meta, .. } => {
                let size = match meta {
                    FileMeta::Sealed(m) => m.length,
                    FileMeta::Legacy if info.e2e => {
                        Layout::from_ciphertext_len(info.size).map_or(0, |l| l.plaintext_len())
                    }
                    FileMeta::Legacy => info.size,
                    FileMeta::Invalid => 0,
                };
                let (size, mtime) =
                    self.modes.local_size(info.id).unwrap_or((size, time_from_ms(info.mtime_ms)));
                let perm = match meta {
                    // Older than a generation this machine saw (a rollback),
                    // or failed its check: every use is EIO, and it shows no
                    // permissions.
                    FileMeta::Sealed(m) if m.generation < self.freshness.generation(info.id) => 0,
                    FileMeta::Invalid => 0,
                    FileMeta::Sealed(m) if m.is_link() => 0o777,
                    FileMeta::Sealed(m) => {
                        self.perm_of(node, self.modes.chosen_perm(info.id).unwrap_or(m.perm))
                    }
                    FileMeta::Legacy => self.perm_of(node, LEGACY_PERM),
                };
                Attr {
                    ino,
                    kind: node.kind(),
                    size,
                    mtime,
                    atime: UNIX_EPOCH,
                    perm,
                    nlink: if tree.is_orphan(ino) { 0 } else { 1 },
                }
            }
        };
        // Access times follow the modification time unless one was set.
        attr.atime = times.atime.unwrap_or(attr.mtime);
        attr
    }

    /// Sets the access time of `ino` (kept in memory for this mount).
    pub fn set_atime(&self, ino: Ino, t: SystemTime) -> Result<()> {
        self.writable(ino)?;
        self.times.set_atime(ino, t);
        Ok(())
    }

    /// Notes that directory `ino`'s entries changed now.
    pub(super) fn touch_dir(&self, ino: Ino) {
        self.times.set_dir_mtime(ino, SystemTime::now());
    }

    /// Presented permissions: `full` (before the mount's umask), without the
    /// write bits in a read-only vault.
    fn perm_of(&self, node: &Node, full: u16) -> u16 {
        match node.vault() {
            Some(v) if self.rules.vault(v).read_only => full & 0o7555,
            _ => full,
        }
    }

    /// Sets a file's permission bits: a new manifest with a newer generation
    /// and the same content (nothing is encrypted again). Directories show
    /// the mount's permissions and keep them (records carry no mode).
    pub async fn chmod(&self, ino: Ino, perm: u16) -> Result<Attr> {
        let perm = perm & PERM_MASK;
        let file = match self.tree.lock().node(ino)? {
            Node::File { info, .. } => Some(info.clone()),
            _ => None,
        };
        // (The tree's guard is gone here: getattr takes it again.)
        let Some(info) = file else { return self.getattr(ino) };
        self.writable(ino)?;
        // A stream being ended commits first; one still running takes the
        // bits with its commit (a chmod of its own would bump the version the
        // commit expects, and its data would go to a conflict copy).
        self.settle_stream(ino).await;
        if self.modes.choose_perm(info.id, perm) {
            return self.getattr(ino);
        }
        // Under the file's plaintext lock, as uploads are: none seals a
        // manifest meanwhile, and the cached copy's version follows.
        let handle = self.cache.pin(info.id);
        let result = async {
            let d = Arc::clone(&handle).lock_owned().await;
            if d.dirty && self.modes.choose_unsaved_perm(info.id, perm) {
                // Unsaved changes: the bits go up with them, in the manifest
                // their upload seals (one request, as tar's fchmod before
                // close). Under the plaintext lock, so no upload is between
                // sealing its manifest and being stored.
                return Ok(());
            }
            let (current, meta) = self.tree.lock().file(ino).map(|(i, m)| (i.clone(), m.clone()))?;
            let manifest = match meta {
                FileMeta::Sealed(m) if m.is_link() => return Ok(()),
                FileMeta::Sealed(m) => {
                    // Never seal an older manifest anew: that would undo a
                    // rollback this machine refused (its content included).
                    self.refuse_stale(current.id, m.generation)?;
                    if m.perm == perm {
                        return Ok(());
                    }
                    m
                }
                FileMeta::Legacy => {
                    // No manifest to keep a mode in: accepted and ignored,
                    // as before modes were stored, so `cp -a` still works.
                    tracing::debug!(file = %current.id, "chmod of a file without a manifest ignored (run `vaultfs vault migrate`)");
                    return Ok(());
                }
                FileMeta::Invalid => return Err(FsError::Io("the file's manifest failed its check".into())),
            };
            let generation = self.next_generation(ino, current.id, current.version);
            let ctx = FileContext { vault: current.vault, record: current.record, file: current.id };
            let sealed = self.seal_manifest(&ctx, &manifest.with_perm(generation, perm))?;
            let update = FileUpdate { meta: Some(sealed.clone()), ..Default::default() };
            let updated = self.remote().update_file(current.id, current.version, update).await?;
            // The manifest is the one sealed here, whatever the server answers.
            let updated = FileInfo { meta: sealed, ..check_file_answer(current.id, current.vault, updated)? };
            let mut d = d;
            if d.version == current.version {
                d.version = updated.version;
            }
            // The tree first: a generation noted before the tree holds it
            // would show the file as rolled back meanwhile.
            self.set_file_info(ino, |i| *i = updated);
            self.note_generation(current.id, generation);
            Ok(())
        }
        .await;
        self.cache.unpin(Some(info.id), &handle);
        result?;
        self.getattr(ino)
    }

    /// Attributes of `ino`: always known without asking the server.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let tree = self.tree.lock();
        let node = tree.node(ino)?;
        Ok(self.attr_of(&tree, ino, node))
    }

    /// Changes size and/or modification time.
    pub async fn setattr(
        self: &Arc<Self>,
        ino: Ino,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> Result<Attr> {
        let info = match self.tree.lock().node(ino)? {
            Node::File { info, .. } => Some(info.clone()),
            _ => None,
        };
        let Some(info) = info else {
            // Directory times are not stored on the server; this mount shows them.
            if let Some(t) = mtime {
                self.writable(ino)?;
                self.times.set_dir_mtime(ino, t);
            }
            return self.getattr(ino);
        };
        let rules = self.writable(ino)?;
        if let Some(size) = size {
            self.not_a_link(ino)?;
            check_size(&rules, size)?;
            // A stream commits first: emptied here, its later bytes would
            // still be sent and the emptying lost.
            self.end_stream_before_use(info.id).await?;
            // What the file holds now, as shown: an entry not loaded yet is
            // empty, but the file it stands for may not be.
            let shown = self.getattr(ino)?.size;
            let version = self.file_info(ino)?.version;
            let handle = self.cache.pin(info.id);
            let result = async {
                {
                    let mut d = if size > 0 {
                        self.ready(info.id, &handle, None).await?.0
                    } else {
                        let mut d = Arc::clone(&handle).lock_owned().await;
                        self.cancel_fill(info.id, &mut d);
                        d
                    };
                    let held = if d.loaded { d.bytes.len() as u64 } else { shown };
                    if !d.loaded {
                        // Its emptying replaces the version shown (as O_TRUNC does).
                        d.version = d.version.max(version);
                        d.loaded = true;
                        self.follow_in_backing(info.id, Change::Whole(&d.bytes));
                    }
                    if held != size {
                        let size = size as usize;
                        d.bytes.resize(size);
                        self.follow_in_backing(info.id, Change::Length(size as u64));
                        d.edited();
                        self.modes.note_change(info.id, size as u64);
                        if size == 0 {
                            // O_TRUNC arrives as a truncate to 0 (the kernel
                            // splits it from the open): written front to back
                            // from here, the file may stream past the limit.
                            self.modes.start_sequential(info.id);
                        }
                    }
                    // Without an open handle (truncate(2)) nothing else will
                    // flush it: saved as it is now, under the same lock (an
                    // open waiting for it must not empty it first).
                    if !self.handles.is_open(info.id) {
                        d.finished();
                        self.upload_locked(ino, &handle, d).await?;
                    }
                }
                Ok::<_, FsError>(())
            }
            .await;
            self.cache.unpin(Some(info.id), &handle);
            result?;
        }
        if let Some(t) = mtime {
            // Unsaved changes: the time goes up with the content (one
            // request, no version bump that the upload would then conflict with).
            if self.modes.choose_mtime(info.id, t) {
                return self.getattr(ino);
            }
            let current = self.file_info(ino)?;
            let update = FileUpdate { mtime_ms: Some(ms_of(t)), ..Default::default() };
            let updated = self.remote().update_file(current.id, current.version, update).await?;
            let updated = check_file_answer(current.id, current.vault, updated)?;
            let version = updated.version;
            self.set_file_info(ino, |i| *i = updated);
            super::save::bump_cached_version(&self.cache, current.id, current.version, version).await;
        }
        self.getattr(ino)
    }
}
