//! What the mount tells about itself: `vaultfs status` (cache, unsaved
//! files, uploads, refused checks) and the `user.vaultfs.*` extended
//! attributes of each file.
//!
//! Data flow. Nothing here changes state: uploads and unsaved changes are
//! read from super::mode, cache figures from the cache, names from the tree.
//! Failed checks (tampered or replayed files, names, manifests) are noted
//! here by whoever refused them ([`VaultFs::note_refusal`]); the log has
//! them too. The refusals lock is a leaf.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;

use super::tree::Node;
use super::{FsError, Ino, Result, VaultFs};
use crate::ids::FileId;
use crate::remote::Remote;

/// Failed checks `vaultfs status` lists (the latest ones).
const MAX_REFUSALS_SHOWN: usize = 20;

/// Extended attribute: "1" if the file is end-to-end encrypted, else "0".
pub const XATTR_E2E: &str = "user.vaultfs.e2e";
/// Extended attribute: "clean", "dirty" or "uploading".
pub const XATTR_STATE: &str = "user.vaultfs.state";
/// Extended attribute: the server's version of the file.
pub const XATTR_VERSION: &str = "user.vaultfs.version";
/// Extended attribute: the id of a vault, record or file, as log lines name
/// it (they never name a decrypted name). Readable also where the object's
/// name or manifest failed its check, which is when a log line names it.
pub const XATTR_ID: &str = "user.vaultfs.id";
/// Who holds locks on a file, one line each, asked of the server (not
/// listed by listxattr, so copying a file never asks).
pub const XATTR_LOCKS: &str = "user.vaultfs.locks";

/// How far an upload got.
#[derive(Debug)]
pub struct UploadProgress {
    /// Bytes handed to the connection so far.
    pub sent: AtomicU64,
    /// Total bytes, if known (a pass-through stream's end is not).
    pub total: Option<u64>,
}

/// One line of `vaultfs status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadStatus {
    /// The file's name.
    pub name: String,
    /// Bytes sent (of a download: plaintext bytes ready).
    pub sent: u64,
    /// Total, if known.
    pub total: Option<u64>,
}

/// What a running mount reports to `vaultfs status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsStatus {
    /// Plaintext held in the cache, in bytes.
    pub cache_used: u64,
    /// The cache budget.
    pub cache_budget: u64,
    /// Files in the cache.
    pub cached_files: u64,
    /// Files with unsaved changes.
    pub unsaved: u64,
    /// Uploads in progress.
    pub uploads: Vec<UploadStatus>,
    /// The latest failed checks (tampered or replayed files, names,
    /// manifests), by id, newest last.
    #[serde(default)]
    pub refused: Vec<String>,
    /// Vaults, records and files the mount holds from the server's listings.
    #[serde(default)]
    pub listed: u64,
    /// Whether the server's change feed is live (changes pushed at once).
    #[serde(default)]
    pub feed_live: bool,
    /// Whether locks are held on the server (else on this machine only).
    #[serde(default)]
    pub locks_shared: bool,
    /// Lock ranges this mount holds on the server.
    #[serde(default)]
    pub locks_held: u64,
    /// Whether the kernel serves reads of files open for reading from
    /// memory (passthrough), and if not, why.
    #[serde(default)]
    pub passthrough: String,
    /// Handles given a backing file (passthrough) since the mount.
    #[serde(default)]
    pub passthrough_opens: u64,
    /// Bytes the backing files hold now (counted against the cache budget).
    #[serde(default)]
    pub backing_bytes: u64,
    /// Unlinked files the server has not deleted yet.
    #[serde(default)]
    pub deleting: u64,
    /// Downloads in progress (files being fetched and decrypted into the
    /// cache; pass-through reads, fetched a piece at a time, are not listed).
    #[serde(default)]
    pub downloads: Vec<UploadStatus>,
}

/// Upload state of a file, for `user.vaultfs.state` and `vaultfs status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Stored on the server as it is here.
    Clean,
    /// Changed here, not yet stored.
    Dirty,
    /// Being uploaded now.
    Uploading,
}

/// The latest checks that failed, oldest first.
#[derive(Default)]
pub(super) struct Refusals(Mutex<VecDeque<String>>);

impl Refusals {
    fn note(&self, what: String) {
        let mut refusals = self.0.lock();
        if refusals.len() >= MAX_REFUSALS_SHOWN {
            refusals.pop_front();
        }
        refusals.push_back(what);
    }

    fn list(&self) -> Vec<String> {
        self.0.lock().iter().cloned().collect()
    }
}

impl<R: Remote> VaultFs<R> {
    /// Notes a failed check for `vaultfs status` (the log has it too).
    pub(super) fn note_refusal(&self, what: String) {
        self.refusals.note(what);
    }

    fn sync_state(&self, id: FileId) -> SyncState {
        // Unsaved changes always show in the file's mode; the data's lock
        // may be held by a write or an upload, so it is only tried.
        if let Some(state) = self.modes.sync_state(id) {
            return state;
        }
        match self.cache.peek(id).and_then(|h| h.try_lock().ok().map(|d| d.dirty)) {
            Some(true) => SyncState::Dirty,
            _ => SyncState::Clean,
        }
    }

    /// What `vaultfs status` shows.
    pub fn status(&self) -> FsStatus {
        let stats = self.cache.stats();
        let uploads = self.modes.uploads();
        let downloads = self.downloads();
        let feed_live = self.feed.live();
        let (passthrough_opens, backing_bytes) = self.passthrough_use();
        let tree = self.tree.lock();
        let listed = tree.len() as u64;
        let named = |(id, sent, total): (FileId, u64, Option<u64>)| {
            let name = tree
                .file_ino(id)
                .map(|ino| tree.name_of(ino))
                .filter(|n| !n.is_empty())
                .map_or_else(|| id.to_string(), |n| n.to_string_lossy().into_owned());
            UploadStatus { name, sent, total }
        };
        let uploads = uploads.into_iter().map(named).collect();
        let downloads = downloads.into_iter().map(named).collect();
        drop(tree);
        FsStatus {
            cache_used: stats.used as u64,
            cache_budget: stats.budget as u64,
            cached_files: stats.entries as u64,
            unsaved: self.cache.dirty_ids().len() as u64,
            uploads,
            refused: self.refusals.list(),
            listed,
            feed_live,
            locks_shared: self.locks_across_clients(),
            locks_held: self.locks.count(),
            passthrough: self.passthrough_mode().to_string(),
            passthrough_opens,
            backing_bytes,
            deleting: self.deletes_pending() as u64,
            downloads,
        }
    }

    /// Names of the extended attributes of `ino`.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<&'static str>> {
        match self.tree.lock().node(ino)? {
            Node::File { .. } => Ok(vec![XATTR_E2E, XATTR_STATE, XATTR_VERSION, XATTR_ID]),
            Node::Root => Ok(Vec::new()),
            _ => Ok(vec![XATTR_ID]),
        }
    }

    /// Value of an extended attribute.
    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        if name == XATTR_ID {
            let id = match self.tree.lock().node_unchecked(ino) {
                Some(Node::Vault { vault }) => vault.to_string(),
                Some(Node::Record { info, .. }) => info.id.to_string(),
                Some(Node::File { info, .. }) => info.id.to_string(),
                Some(Node::Root) => return Err(FsError::NoAttr),
                None => return Err(FsError::NotFound),
            };
            return Ok(id.into_bytes());
        }
        let (info, e2e) = match self.tree.lock().node(ino)? {
            Node::File { info, meta, .. } => (info.clone(), meta.manifest().map_or(info.e2e, |m| m.is_e2e())),
            _ => return Err(FsError::NoAttr),
        };
        let value = match name.to_str() {
            // New files are created end-to-end; a file stops being so the moment it
            // starts streaming as pass-through (set in start_stream).
            // (A listing refresh may bring back the server's view of a file that is
            // streaming right now, so the stream itself is asked too.)
            Some(XATTR_E2E) => if e2e && !self.modes.is_streaming(info.id) { "1" } else { "0" }.to_string(),
            Some(XATTR_STATE) => match self.sync_state(info.id) {
                SyncState::Clean => "clean",
                SyncState::Dirty => "dirty",
                SyncState::Uploading => "uploading",
            }
            .to_string(),
            Some(XATTR_VERSION) => info.version.to_string(),
            _ => return Err(FsError::NoAttr),
        };
        Ok(value.into_bytes())
    }
}
