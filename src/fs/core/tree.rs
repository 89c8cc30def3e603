//! The namespace: which inode is which vault, record or file, and under which
//! name in which directory.
//!
//! Data flow. [`super::namespace`] fetches listings from the server, opens
//! their sealed names and manifests (outside this lock), and hands the result
//! to [`Tree::set_vaults`] or [`Tree::apply_listing`]; the mount's own changes
//! go through [`Tree::add`], [`Tree::place`], [`Tree::remove`],
//! [`Tree::unlink`], [`Tree::unlink_deleting`], [`Tree::rmdir_deleting`],
//! [`Tree::file_deleting`], [`Tree::rekey_file`] and
//! [`Tree::kept_on_server`]. Everything here is synchronous
//! and cheap: the tree sits behind one mutex that is never held across an
//! await.
//!
//! Invariants (checked by the tests below):
//! - an object (vault, record, file: a [`Key`]) keeps one inode for the life
//!   of the mount, and an inode names one object;
//! - every entry of a directory is a node whose name is that entry's name;
//!   a node is in at most one directory;
//! - a listing never takes a node back to an older server version than the
//!   one this mount holds (its own change may be newer than the listing);
//! - a file unlinked while open (an orphan) is in no directory but keeps its
//!   node until [`Tree::release_orphan`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use std::time::Instant;

use super::{FsError, Ino, Invalidation, Kind, Result, LISTING_TTL, NAME_MAX, ROOT};
use crate::crypto::{self, FileManifest};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::{FileInfo, NewRecord, RecordInfo};

/// What an inode stands for on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Vault(VaultId),
    Record(RecordId),
    File(FileId),
}

/// A node of the tree.
#[derive(Debug, Clone)]
pub(super) enum Node {
    Root,
    Vault { vault: VaultId },
    Record { info: RecordInfo, parent: Ino },
    File { info: FileInfo, parent: Ino, meta: FileMeta },
}

impl Node {
    /// The vault the node is in (none for the root).
    pub(super) fn vault(&self) -> Option<VaultId> {
        match self {
            Node::Root => None,
            Node::Vault { vault } => Some(*vault),
            Node::Record { info, .. } => Some(info.vault),
            Node::File { info, .. } => Some(info.vault),
        }
    }

    fn parent(&self) -> Option<Ino> {
        match self {
            Node::Root => None,
            Node::Vault { .. } => Some(ROOT),
            Node::Record { parent, .. } | Node::File { parent, .. } => Some(*parent),
        }
    }

    fn is_dir(&self) -> bool {
        !matches!(self, Node::File { .. })
    }

    /// What the node is shown as: a file whose manifest says link is one.
    pub(super) fn kind(&self) -> Kind {
        match self {
            Node::File { meta: FileMeta::Sealed(m), .. } if m.is_link() => Kind::Symlink,
            Node::File { .. } => Kind::File,
            _ => Kind::Dir,
        }
    }

    /// The server's version of a record or file.
    pub(super) fn version(&self) -> Option<u64> {
        match self {
            Node::File { info, .. } => Some(info.version),
            Node::Record { info, .. } => Some(info.version),
            Node::Root | Node::Vault { .. } => None,
        }
    }
}

/// What the client knows of a file's content: its manifest (docs/FORMAT.md
/// "File manifests"), opened from `FileInfo::meta` whenever that changes.
/// Mode, length and generation come from here, never from the server's
/// `e2e` flag or size.
#[derive(Debug, Clone)]
pub(super) enum FileMeta {
    /// The writer's authenticated statement.
    Sealed(Arc<FileManifest>),
    /// No manifest: written by a vaultfs older than manifests, so the
    /// server's word on mode and size is all there is.
    Legacy,
    /// The manifest failed its check (altered, another file's, or sealed with
    /// a key this wallet lacks): every use of the file is EIO.
    Invalid,
}

impl FileMeta {
    /// The authenticated manifest, if there is one.
    pub(super) fn manifest(&self) -> Option<&Arc<FileManifest>> {
        match self {
            FileMeta::Sealed(m) => Some(m),
            FileMeta::Legacy | FileMeta::Invalid => None,
        }
    }
}

/// Where a node was, to tell the kernel what a listing changed.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Its directory and name there, if it is in one.
    entry: Option<(Ino, OsString)>,
    /// Its server version.
    version: Option<u64>,
}

/// What the last release of an orphan leaves to do.
#[derive(Debug)]
pub(super) enum Released {
    /// Nothing: the server deleted it at the unlink.
    Gone,
    /// Delete it on the server now (it was kept there for its handles); it
    /// waits for its delete in `deleting` already.
    DeleteOnServer(FileInfo),
}

/// A record of a vault listing, with its opened title (`None`: it failed its check).
pub(super) type ListedRecord = (RecordInfo, Option<OsString>);
/// A file of a vault listing, with its opened manifest and name.
pub(super) type ListedFile = (FileInfo, FileMeta, Option<OsString>);

/// The namespace. See the module documentation for its invariants.
#[derive(Default)]
pub(super) struct Tree {
    nodes: HashMap<Ino, Node>,
    keys: HashMap<Key, Ino>,
    children: HashMap<Ino, BTreeMap<OsString, Ino>>,
    names: HashMap<Ino, OsString>,
    /// Entries whose sealed name or title failed its check: listed (so the
    /// damage is visible) under a stand-in name, but every use of them is EIO.
    unreadable: HashMap<Ino, String>,
    /// Files unlinked while open: in no directory, still readable and
    /// writable through their handles until the last one is released. The
    /// value: the server still holds the file (its content is read from
    /// there, a pass-through file), to be deleted at that release.
    orphans: HashMap<Ino, bool>,
    /// Files and records created here that are not on the server yet: a
    /// file's first save creates it there with its content, in one request,
    /// and a record goes with the first file saved in it (super::dirs).
    /// Listings do not name them, and leave them where they are. The value:
    /// a request that would have created it got no answer (it may be there
    /// after all).
    unsent: HashMap<Ino, bool>,
    /// What this mount deleted on the server, with the vault and the number
    /// of the change (see `local_changes`): a listing or page of changes
    /// asked for before then may still name it, and must not put it back
    /// (rm -r right after tar -x met its files again, brought by the change
    /// feed's page of tar's own changes, and rmdir said "not empty").
    /// Forgotten once an answer about the vault asked for after it was applied.
    deleted_here: HashMap<Key, (VaultId, u64)>,
    /// What this mount created on the server, likewise: a listing asked for
    /// before then does not name it, and must not take it away.
    made_here: HashMap<Ino, (VaultId, u64)>,
    /// Files unlinked and records removed here whose deletion the server
    /// has not confirmed yet (super::deletes), with their vault and the
    /// record they are in: every listing and page of changes leaves them
    /// out, whenever it was asked for.
    deleting: HashMap<Key, (VaultId, Option<RecordId>)>,
    /// How many creations and deletions this mount made on the server: taken
    /// before an answer is asked for, it tells which of them the answer may
    /// predate.
    local_changes: u64,
    next: Ino,
    root_loaded: Option<Instant>,
    vault_loaded: HashMap<VaultId, Instant>,
    /// Each vault's change number as the latest vault list gave it.
    vault_changes: HashMap<VaultId, u64>,
    /// Every vault the latest vault list named.
    server_vaults: std::collections::BTreeSet<VaultId>,
    /// The change number each vault's listing is known to be current at:
    /// the vault list's, read before the listing was fetched.
    listed_at: HashMap<VaultId, u64>,
}

impl Tree {
    /// A tree with only the root.
    pub(super) fn new() -> Self {
        let mut t = Tree { next: ROOT + 1, ..Default::default() };
        t.nodes.insert(ROOT, Node::Root);
        t.children.insert(ROOT, BTreeMap::new());
        t
    }

    /// Every node of `vault` the tree holds (the vault's own too).
    pub(super) fn inos_of(&self, vault: VaultId) -> Vec<Ino> {
        self.nodes.iter().filter(|(_, n)| n.vault() == Some(vault)).map(|(ino, _)| *ino).collect()
    }

    /// How many nodes the tree holds (the root, vaults, records, files).
    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The inode of `key`, given one now if it has none yet.
    fn ino_for(&mut self, key: Key) -> Ino {
        if let Some(i) = self.keys.get(&key) {
            return *i;
        }
        let ino = self.next;
        self.next += 1;
        self.keys.insert(key, ino);
        ino
    }

    /// The node of `ino`: EIO if its name or manifest failed its check.
    pub(super) fn node(&self, ino: Ino) -> Result<&Node> {
        let refused = |what: String| FsError::Integrity {
            what,
            source: crypto::CryptoError::Integrity(crypto::IntegrityFailure::Authentication),
        };
        if let Some(what) = self.unreadable.get(&ino) {
            return Err(refused(what.clone()));
        }
        match self.nodes.get(&ino) {
            Some(Node::File { info, meta: FileMeta::Invalid, .. }) => {
                Err(refused(format!("the manifest of file {}", info.id)))
            }
            Some(node) => Ok(node),
            None => Err(FsError::NotFound),
        }
    }

    /// The node of `ino` even if it failed its check (to name it by id).
    pub(super) fn node_unchecked(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// The metadata of file `ino`.
    pub(super) fn file(&self, ino: Ino) -> Result<(&FileInfo, &FileMeta)> {
        match self.node(ino)? {
            Node::File { info, meta, .. } => Ok((info, meta)),
            _ => Err(FsError::IsDir),
        }
    }

    /// The inode of file `id`, if the tree has it.
    pub(super) fn file_ino(&self, id: FileId) -> Option<Ino> {
        self.keys.get(&Key::File(id)).copied()
    }

    /// Changes the metadata of file `ino` in place; `reopen` gives the
    /// manifest again when `f` changed the sealed one.
    pub(super) fn update_file(
        &mut self,
        ino: Ino,
        f: impl FnOnce(&mut FileInfo),
        reopen: impl FnOnce(&FileInfo) -> FileMeta,
    ) {
        if let Some(Node::File { info, meta, .. }) = self.nodes.get_mut(&ino) {
            let before = info.meta.clone();
            f(info);
            if info.meta != before {
                *meta = reopen(info);
            }
        }
    }

    /// The child `name` of directory `parent`.
    pub(super) fn child(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        self.children.get(&parent)?.get(name).copied()
    }

    /// The entries of directory `ino`, in name order.
    pub(super) fn entries(&self, ino: Ino) -> Result<impl Iterator<Item = (&OsString, Ino, &Node)>> {
        let kids = self.children.get(&ino).ok_or(FsError::NotDir)?;
        Ok(kids.iter().filter_map(|(name, &child)| Some((name, child, self.nodes.get(&child)?))))
    }

    /// Whether directory `ino` has no entries.
    pub(super) fn is_empty_dir(&self, ino: Ino) -> bool {
        self.children.get(&ino).is_none_or(|k| k.is_empty())
    }

    /// How many directories directory `ino` holds (for its link count).
    pub(super) fn subdirs(&self, ino: Ino) -> usize {
        self.children
            .get(&ino)
            .map_or(0, |kids| kids.values().filter(|k| self.nodes.get(k).is_some_and(Node::is_dir)).count())
    }

    /// The directory `ino` is in (the root for the root and for unknowns).
    pub(super) fn parent_of(&self, ino: Ino) -> Option<Ino> {
        self.nodes.get(&ino)?.parent()
    }

    /// The name `ino` was last seen under (also once unlinked).
    pub(super) fn name_of(&self, ino: Ino) -> OsString {
        self.names.get(&ino).cloned().unwrap_or_default()
    }

    /// Whether `ino` is a file unlinked while open.
    pub(super) fn is_orphan(&self, ino: Ino) -> bool {
        self.orphans.contains_key(&ino)
    }

    // ---- the mount's own changes ---------------------------------------------

    /// Adds the object `key` as `name` in `parent` (a new record or file),
    /// or moves it there; returns its inode.
    pub(super) fn add(&mut self, parent: Ino, name: &OsStr, key: Key, node: Node) -> Ino {
        let ino = self.ino_for(key);
        self.place(parent, name, ino, node);
        self.note_made(ino);
        ino
    }

    /// Places `ino` under `parent` as `name` with `node`, removing it from
    /// where it was.
    pub(super) fn place(&mut self, parent: Ino, name: &OsStr, ino: Ino, node: Node) {
        self.detach(ino);
        if node.is_dir() {
            self.children.entry(ino).or_default();
        }
        self.children.entry(parent).or_default().insert(name.to_os_string(), ino);
        self.names.insert(ino, name.to_os_string());
        self.nodes.insert(ino, node);
    }

    /// Takes `ino` out of its directory (its node stays).
    fn detach(&mut self, ino: Ino) {
        if let (Some(parent), Some(name)) = (self.parent_of(ino), self.names.get(&ino)) {
            if let Some(kids) = self.children.get_mut(&parent) {
                if kids.get(name) == Some(&ino) {
                    kids.remove(name);
                }
            }
        }
    }

    /// Adds file or record `key` as `name` in `parent`, known only here
    /// until it is [`Tree::sent`]; returns its inode.
    pub(super) fn add_unsent(&mut self, parent: Ino, name: &OsStr, key: Key, node: Node) -> Ino {
        let ino = self.add(parent, name, key, node);
        self.unsent.insert(ino, false);
        ino
    }

    /// Whether file or record `ino` exists only here (created, never sent).
    pub(super) fn is_unsent(&self, ino: Ino) -> bool {
        self.unsent.contains_key(&ino)
    }

    /// What creates unsent record `ino` on the server: its vault, and the
    /// record as it is here (`None` if it is not an unsent record).
    pub(super) fn unsent_record(&self, ino: Ino) -> Option<(VaultId, NewRecord)> {
        match self.nodes.get(&ino) {
            Some(Node::Record { info, .. }) if self.is_unsent(ino) => Some((
                info.vault,
                NewRecord {
                    id: info.id,
                    parent: info.parent,
                    title: info.title.clone(),
                    fields: info.fields.clone(),
                },
            )),
            _ => None,
        }
    }

    /// The unsent records from `ino` up, `ino` first (each must be sent
    /// after the one above it).
    pub(super) fn unsent_chain(&self, ino: Ino) -> Vec<Ino> {
        let mut chain = Vec::new();
        let mut at = ino;
        while let Some(Node::Record { parent, .. }) = self.nodes.get(&at).filter(|_| self.is_unsent(at)) {
            chain.push(at);
            at = *parent;
        }
        chain
    }

    /// Unsent records in directory `dir` (every one, if `None`).
    pub(super) fn unsent_records(&self, dir: Option<Ino>) -> Vec<Ino> {
        self.unsent
            .keys()
            .filter(|ino| matches!(self.nodes.get(ino), Some(Node::Record { .. })))
            .filter(|&&ino| dir.is_none() || self.parent_of(ino) == dir)
            .copied()
            .collect()
    }

    /// Record `ino` now exists on the server, at `version` (`None`: the
    /// version the tree holds, a listing's).
    pub(super) fn record_sent(&mut self, ino: Ino, version: Option<u64>) {
        if let (Some(Node::Record { info, .. }), Some(version)) = (self.nodes.get_mut(&ino), version) {
            info.version = version;
        }
        self.sent(ino);
    }

    /// Whether a request that would have created unsent file `ino` got no
    /// answer: the server may have it.
    pub(super) fn maybe_sent(&self, ino: Ino) -> bool {
        self.unsent.get(&ino).copied().unwrap_or(false)
    }

    /// A request that would have created unsent file `ino` got no answer.
    pub(super) fn note_maybe_sent(&mut self, ino: Ino) {
        if let Some(maybe) = self.unsent.get_mut(&ino) {
            *maybe = true;
        }
    }

    /// File `ino` now exists on the server (if it was unlinked meanwhile,
    /// it is deleted there at its last close).
    pub(super) fn sent(&mut self, ino: Ino) {
        self.note_made(ino);
        self.unsent.remove(&ino);
        if let Some(on_server) = self.orphans.get_mut(&ino) {
            *on_server = true;
        }
    }

    /// Removes `ino` (deleted on the server, nothing of it open).
    pub(super) fn remove(&mut self, ino: Ino) {
        self.note_deleted(ino);
        self.detach(ino);
        self.nodes.remove(&ino);
        self.orphans.remove(&ino);
        self.unsent.remove(&ino);
    }

    /// Removes file `ino` from its directory; if it is still `open`, it
    /// stays an orphan until [`Tree::release_orphan`], else it goes.
    /// `on_server`: the server still holds it (see `orphans`).
    pub(super) fn unlink(&mut self, ino: Ino, open: bool, on_server: bool) {
        if open {
            if !on_server {
                self.note_deleted(ino);
            }
            self.detach(ino);
            self.orphans.insert(ino, on_server);
        } else {
            self.remove(ino);
        }
    }

    /// Removes file `ino` (no handle holds it open) before the server
    /// deleted it (see `deleting`).
    pub(super) fn unlink_deleting(&mut self, ino: Ino, info: &FileInfo) {
        self.file_deleting(info);
        self.remove(ino);
    }

    /// File `info`, no longer in the tree (a move's source: its inode went
    /// to the copy), waits for the server to delete it (see `deleting`).
    pub(super) fn file_deleting(&mut self, info: &FileInfo) {
        self.deleting.insert(Key::File(info.id), (info.vault, Some(info.record)));
    }

    /// Removes record `ino`, empty here, before the server deleted it (see
    /// `deleting`).
    pub(super) fn rmdir_deleting(&mut self, ino: Ino) {
        if let Some(Node::Record { info, .. }) = self.nodes.get(&ino) {
            self.deleting.insert(Key::Record(info.id), (info.vault, info.parent));
        }
        self.remove(ino);
    }

    /// The server deleted `key` (or refused to, if not `deleted`): it is no
    /// longer left out of every listing; answers asked for before now still
    /// leave it out (`deleted_here`). After a refusal the vault's next
    /// listing is fetched anew (whatever the change feed says: nothing
    /// changed on the server), and shows it again.
    pub(super) fn deletion_done(&mut self, key: Key, deleted: bool) {
        let Some((vault, _)) = self.deleting.remove(&key) else { return };
        if deleted {
            self.local_changes += 1;
            self.deleted_here.insert(key, (vault, self.local_changes));
        } else {
            self.kept_on_server(vault, key);
        }
    }

    /// `key`, which this mount took for deleted, is still on the server: no
    /// answer is to leave it out, not even one asked for before it was
    /// removed here and applied only now, and the vault's next listing is
    /// fetched anew (whatever the change feed says), which shows it again.
    pub(super) fn kept_on_server(&mut self, vault: VaultId, key: Key) {
        self.deleted_here.remove(&key);
        self.vault_loaded.remove(&vault);
        self.listed_at.remove(&vault);
    }

    /// Whether files or records removed here wait for the server to delete
    /// them (those in `record` only, if given).
    pub(super) fn deleting(&self, record: Option<RecordId>) -> bool {
        match record {
            Some(r) => self.deleting.values().any(|&(_, of)| of == Some(r)),
            None => !self.deleting.is_empty(),
        }
    }

    /// Whether a file unlinked while open was in directory `ino`.
    pub(super) fn holds_orphans(&self, ino: Ino) -> bool {
        self.orphans.keys().any(|o| self.parent_of(*o) == Some(ino))
    }

    /// Whether record `ino` holds a file unlinked while open that the server
    /// still has (until its last close): the server finds the record not empty.
    pub(super) fn holds_orphans_on_server(&self, ino: Ino) -> bool {
        self.orphans.iter().any(|(o, on_server)| *on_server && self.parent_of(*o) == Some(ino))
    }

    /// How many files and records removed here wait for the server to delete them.
    pub(super) fn deleting_count(&self) -> usize {
        self.deleting.len()
    }

    /// The last handle of `ino` closed: if it was an orphan it goes now
    /// (`None` if it was not one).
    pub(super) fn release_orphan(&mut self, ino: Ino) -> Option<Released> {
        let on_server = self.orphans.remove(&ino)?;
        self.unsent.remove(&ino);
        let node = self.nodes.remove(&ino);
        Some(match node {
            Some(Node::File { info, .. }) if on_server => {
                // From an orphan to one waiting for its delete, in one step:
                // rmdir of its record never sees neither.
                self.file_deleting(&info);
                Released::DeleteOnServer(info)
            }
            _ => Released::Gone,
        })
    }

    /// Whether a file a listing of `vault` names stays out of it: it (or its
    /// record) is another vault's, or it is an orphan (the server holds it
    /// until its last close; the listing does not put it back).
    fn not_listed_here(&self, vault: VaultId, info: &FileInfo) -> bool {
        self.elsewhere(vault, Key::File(info.id))
            || self.elsewhere(vault, Key::Record(info.record))
            || self.keys.get(&Key::File(info.id)).is_some_and(|ino| self.orphans.contains_key(ino))
    }

    /// A file moved to another record was written anew as `new` (its
    /// placeholder inode `new_ino`): the kernel keeps the old inode `ino` for
    /// the renamed entry, so the new file takes it over.
    pub(super) fn rekey_file(&mut self, ino: Ino, old: FileId, new: FileId, new_ino: Ino) {
        // The old file is deleted on the server (or kept, changed elsewhere
        // meanwhile: then `kept_on_server`); the new one lives on.
        self.note_deleted(ino);
        self.remove(new_ino);
        self.deleted_here.remove(&Key::File(new));
        self.keys.remove(&Key::File(new));
        self.keys.remove(&Key::File(old));
        self.keys.insert(Key::File(new), ino);
        self.note_made(ino);
    }

    /// `ino`'s object was deleted on the server by this mount (see
    /// `deleted_here`).
    fn note_deleted(&mut self, ino: Ino) {
        let key = match self.nodes.get(&ino) {
            Some(Node::Record { info, .. }) => (Key::Record(info.id), info.vault),
            Some(Node::File { info, .. }) => (Key::File(info.id), info.vault),
            _ => return,
        };
        self.local_changes += 1;
        self.deleted_here.insert(key.0, (key.1, self.local_changes));
        self.made_here.remove(&ino);
    }

    /// `ino`'s object was created on the server by this mount (see
    /// `made_here`).
    fn note_made(&mut self, ino: Ino) {
        let Some(vault) = self.nodes.get(&ino).and_then(Node::vault) else { return };
        self.local_changes += 1;
        self.made_here.insert(ino, (vault, self.local_changes));
    }

    // ---- listings from the server --------------------------------------------

    /// Where this mount's own creations and deletions stand: taken before a
    /// listing or a page of changes is asked for, and given with the answer
    /// to [`Tree::apply_listing`] or [`Tree::apply_changes`].
    pub(super) fn local_changes(&self) -> u64 {
        self.local_changes
    }

    /// Forgets this mount's changes in `vault` older than `asked`: the answer
    /// being applied, and every later one, reflects them (answers about one
    /// vault are applied one at a time, under its loading lock); then takes
    /// out of that answer what this mount deleted since it was asked for.
    fn drop_deleted_here(
        &mut self,
        vault: VaultId,
        asked: u64,
        records: &mut Vec<ListedRecord>,
        files: &mut Vec<ListedFile>,
    ) {
        self.deleted_here.retain(|_, (v, n)| *v != vault || *n > asked);
        self.made_here.retain(|_, (v, n)| *v != vault || *n > asked);
        if self.deleted_here.is_empty() && self.deleting.is_empty() {
            return;
        }
        let since = |key: Key| self.deleted_here.contains_key(&key);
        let gone = |key: Key| since(key) || self.deleting.contains_key(&key);
        records.retain(|(r, _)| !gone(Key::Record(r.id)));
        files.retain(|(f, ..)| !gone(Key::File(f.id)));
    }

    /// Whether the vault list was fetched less than [`LISTING_TTL`] ago, or
    /// at all while the change feed is `live` (it tells when a vault is
    /// added, left or renamed, or the wallet changed).
    pub(super) fn root_fresh(&self, live: bool) -> bool {
        self.root_loaded.is_some_and(|t| live || t.elapsed() < LISTING_TTL)
    }

    /// Whether `vault`'s listing was fetched less than [`LISTING_TTL`] ago,
    /// or is current at the change number the `live` feed last gave.
    pub(super) fn vault_fresh(&self, vault: VaultId, live: bool) -> bool {
        self.vault_loaded.get(&vault).is_some_and(|t| t.elapsed() < LISTING_TTL)
            || (live && self.vault_current(vault))
    }

    /// Whether `vault`'s listing is current at the vault's latest known
    /// change number (never for a server without a change feed).
    pub(super) fn vault_current(&self, vault: VaultId) -> bool {
        self.listed_at(vault).is_some_and(|n| n == self.vault_changes(vault))
    }

    /// Every vault the latest vault list named (also those the root does
    /// not show: shares still waiting for the sender's key to be confirmed),
    /// with its latest known change number: what the server's list says, so
    /// a wait for changes is answered only when something moved.
    pub(super) fn known_changes(&self) -> BTreeMap<VaultId, u64> {
        self.server_vaults.iter().map(|v| (*v, self.vault_changes(*v))).collect()
    }

    /// The server could not be asked: keeps showing the last vault list for
    /// another [`LISTING_TTL`] if there is one (returns whether there was).
    pub(super) fn keep_root(&mut self) -> bool {
        let had = self.root_loaded.is_some();
        if had {
            self.root_loaded = Some(Instant::now());
        }
        had
    }

    /// As [`Tree::keep_root`], for `vault`'s listing.
    pub(super) fn keep_vault(&mut self, vault: VaultId) -> bool {
        let had = self.vault_loaded.contains_key(&vault);
        if had {
            self.vault_loaded.insert(vault, Instant::now());
        }
        had
    }

    /// Sets the vaults the root lists, each with its opened name (`None`: it
    /// failed its check). Returns what the kernel must forget.
    pub(super) fn set_vaults(&mut self, vaults: Vec<(VaultId, Option<String>)>) -> Vec<Invalidation> {
        let before = self
            .seen(self.children.get(&ROOT).into_iter().flat_map(|k| k.values().copied()).collect::<Vec<_>>());
        let mut kids = BTreeMap::new();
        for (vault, name) in vaults {
            let ino = self.ino_for(Key::Vault(vault));
            let failed = name.is_none().then(|| format!("the name of vault {vault}"));
            self.mark_unreadable(ino, failed);
            let name = OsString::from(name.unwrap_or_else(|| unreadable_name("vault", &vault.to_string())));
            self.nodes.insert(ino, Node::Vault { vault });
            self.children.entry(ino).or_default();
            let mut name = name;
            while kids.contains_key(&name) {
                name = duplicate_name(name, ino);
            }
            self.names.insert(ino, name.clone());
            kids.insert(name, ino);
        }
        let mut after: Vec<Ino> = before.keys().chain(kids.values()).copied().collect();
        after.sort_unstable();
        after.dedup();
        self.children.insert(ROOT, kids);
        self.root_loaded = Some(Instant::now());
        self.changed_since(before, after)
    }

    /// Notes each vault's change number from a vault list: a vault whose
    /// listing is current at that number is fresh again without fetching it
    /// (0: a server without a change feed, which says nothing).
    pub(super) fn note_vault_list(&mut self, changes: Vec<(VaultId, u64)>) {
        self.server_vaults = changes.iter().map(|(v, _)| *v).collect();
        self.note_vault_changes(changes);
    }

    /// As [`Tree::note_vault_list`], for vaults of the latest list only (a
    /// wait's answer: it may name vaults the list did not, which are read
    /// with the next list, not noted).
    pub(super) fn note_vault_changes(&mut self, changes: impl IntoIterator<Item = (VaultId, u64)>) {
        let now = Instant::now();
        for (vault, n) in changes {
            if !self.server_vaults.contains(&vault) {
                continue;
            }
            self.vault_changes.insert(vault, n);
            if n != 0 && self.listed_at.get(&vault) == Some(&n) {
                self.vault_loaded.insert(vault, now);
            }
        }
    }

    /// `vault`'s change number as the latest vault list gave it (0: unknown).
    pub(super) fn vault_changes(&self, vault: VaultId) -> u64 {
        self.vault_changes.get(&vault).copied().unwrap_or(0)
    }

    /// The change number `vault`'s listing is current at, if it was listed
    /// with one.
    pub(super) fn listed_at(&self, vault: VaultId) -> Option<u64> {
        self.listed_at.get(&vault).copied().filter(|n| *n != 0)
    }

    /// The vaults listed with a change number whose listing is behind the
    /// latest known number.
    pub(super) fn listed_behind(&self) -> Vec<VaultId> {
        self.listed_at
            .keys()
            .copied()
            .filter(|v| {
                self.server_vaults.contains(v) && self.listed_at(*v).is_some() && !self.vault_current(*v)
            })
            .collect()
    }

    /// Whether the tree holds `key` as an object of another vault than
    /// `vault`: what a listing of `vault` says of it (or places under it) is
    /// left out, checked under the tree's lock (the namespace checks it too,
    /// before; another vault's listing may have been applied since).
    fn elsewhere(&self, vault: VaultId, key: Key) -> bool {
        self.keys
            .get(&key)
            .and_then(|ino| self.nodes.get(ino))
            .and_then(Node::vault)
            .is_some_and(|v| v != vault)
    }

    /// The vault of record `id` as this tree holds it.
    pub(super) fn record_vault(&self, id: RecordId) -> Option<VaultId> {
        self.keys.get(&Key::Record(id)).and_then(|ino| self.nodes.get(ino)).and_then(Node::vault)
    }

    /// Applies what changed in `vault` since its listing (from the change
    /// feed: each object as it is now, or deleted), keeping inodes and any
    /// newer version this mount holds; the listing is then current at
    /// `until`. Refused (false: list the vault whole) unless the listing was
    /// current at `from`. `asked`: [`Tree::local_changes`] when the changes
    /// were asked for (what this mount deleted since stays deleted).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_changes(
        &mut self,
        vault: VaultId,
        from: u64,
        until: u64,
        asked: u64,
        mut records: Vec<ListedRecord>,
        mut files: Vec<ListedFile>,
        deleted: Vec<Key>,
    ) -> Option<Vec<Invalidation>> {
        if self.listed_at(vault) != Some(from) {
            return None;
        }
        self.drop_deleted_here(vault, asked, &mut records, &mut files);
        let vault_ino = self.ino_for(Key::Vault(vault));
        let touched = deleted
            .iter()
            .copied()
            .chain(records.iter().map(|(r, _)| Key::Record(r.id)))
            .chain(files.iter().map(|(f, _, _)| Key::File(f.id)))
            .filter_map(|key| self.keys.get(&key).copied());
        let before = self.seen(touched);
        // Deletions first, then every changed object out of its directory,
        // then each placed: a file replaced by another of its name, or two
        // that swapped names, show under their names, not as duplicates.
        for key in deleted {
            if let Some(&ino) = self.keys.get(&key) {
                // Only an object of this vault; its node stays for handles
                // still open on it, as after a listing.
                if self.nodes.get(&ino).and_then(Node::vault) == Some(vault) {
                    self.detach(ino);
                }
            }
        }
        let mut placed = Vec::with_capacity(records.len() + files.len());
        for (info, name) in records {
            if self.elsewhere(vault, Key::Record(info.id))
                || info.parent.is_some_and(|p| self.elsewhere(vault, Key::Record(p)))
            {
                continue;
            }
            let ino = self.ino_for(Key::Record(info.id));
            let parent = match info.parent {
                Some(p) => self.ino_for(Key::Record(p)),
                None => vault_ino,
            };
            let what = ("record", info.id.to_string());
            placed.push((parent, ino, name, what, Node::Record { info, parent }));
        }
        for (info, meta, name) in files {
            if self.not_listed_here(vault, &info) {
                continue;
            }
            let ino = self.ino_for(Key::File(info.id));
            let parent = self.ino_for(Key::Record(info.record));
            let what = ("file", info.id.to_string());
            placed.push((parent, ino, name, what, Node::File { info, parent, meta }));
        }
        // Not where this mount holds a newer version (its own change, not yet in the feed).
        placed.retain(|(_, ino, _, _, node)| {
            self.nodes.get(ino).and_then(Node::version).is_none_or(|ours| ours <= node.version().unwrap_or(0))
        });
        for (_, ino, ..) in &placed {
            self.detach(*ino);
        }
        let mut after: Vec<Ino> = before.keys().copied().collect();
        after.extend(placed.iter().map(|(_, ino, ..)| *ino));
        for (parent, ino, name, what, node) in placed {
            self.place_listed(parent, ino, name, what, node);
        }
        self.vault_loaded.insert(vault, Instant::now());
        self.listed_at.insert(vault, until);
        // The feed says the vault is at least this far.
        let known = self.vault_changes.entry(vault).or_insert(0);
        *known = (*known).max(until);
        Some(self.changed_since(before, after))
    }

    /// Where each of `inos` is now (its entry, if it is in a directory) and
    /// which server version it has, to tell the kernel what changed.
    fn seen(&self, inos: impl IntoIterator<Item = Ino>) -> HashMap<Ino, Seen> {
        inos.into_iter()
            .map(|ino| {
                let entry = self.parent_of(ino).zip(self.names.get(&ino)).filter(|(parent, name)| {
                    self.children.get(parent).and_then(|kids| kids.get(*name)) == Some(&ino)
                });
                let seen = Seen {
                    entry: entry.map(|(parent, name)| (parent, name.clone())),
                    version: self.nodes.get(&ino).and_then(Node::version),
                };
                (ino, seen)
            })
            .collect()
    }

    /// What the kernel must forget about `inos` (those seen `before`, and
    /// others new since): names gone (deleted: inotify watchers hear of it),
    /// names that moved away, nodes of a new version (their attributes and
    /// cached pages), and the directories whose entries changed. A name new
    /// to a directory is not told: the kernel keeps no memory that a name did
    /// not exist (a lookup answered ENOENT is asked again at its next use),
    /// and telling it races with the lookup that made the name known: the
    /// kernel would drop the entry it just made, and a process whose working
    /// directory is under it could no longer find its path (getcwd: ENOENT).
    fn changed_since(&self, before: HashMap<Ino, Seen>, inos: Vec<Ino>) -> Vec<Invalidation> {
        let now = self.seen(inos);
        let mut out = Vec::new();
        let mut dirs: Vec<Ino> = Vec::new();
        for (ino, new) in now {
            let old = before.get(&ino).cloned().unwrap_or_default();
            if old.entry != new.entry {
                match old.entry {
                    Some((parent, name)) if new.entry.is_none() => {
                        out.push(Invalidation::Deleted { parent, child: ino, name })
                    }
                    Some((parent, name)) => out.push(Invalidation::Entry { parent, name }),
                    None => {}
                }
                if let Some((parent, _)) = new.entry {
                    dirs.push(parent);
                }
            }
            if old.version.is_some() && old.version != new.version {
                out.push(Invalidation::Inode(ino));
            }
        }
        // The directories whose entries changed: their attributes (links,
        // which the kernel keeps while the feed is live).
        dirs.extend(out.iter().filter_map(|i| match i {
            Invalidation::Entry { parent, .. } | Invalidation::Deleted { parent, .. } => Some(*parent),
            Invalidation::Inode(_) | Invalidation::Told(_) => None,
        }));
        dirs.sort_unstable();
        dirs.dedup();
        let told: HashSet<Ino> = out
            .iter()
            .filter_map(|i| match i {
                Invalidation::Inode(ino) => Some(*ino),
                _ => None,
            })
            .collect();
        out.extend(dirs.into_iter().filter(|d| !told.contains(d)).map(Invalidation::Inode));
        // Deletions first: told of a new name first, the kernel would forget
        // the old file's entry, and its watchers would not hear it went.
        out.sort_by_key(|i| match i {
            Invalidation::Deleted { .. } => 0,
            Invalidation::Entry { .. } => 1,
            Invalidation::Inode(_) => 2,
            Invalidation::Told(_) => 3,
        });
        out
    }

    /// Places an object of the change feed as `name` (`None`: it failed its
    /// check) in `parent`, taking it out of where it was.
    fn place_listed(
        &mut self,
        parent: Ino,
        ino: Ino,
        name: Option<OsString>,
        what: (&str, String),
        node: Node,
    ) {
        self.detach(ino);
        let (kind, id) = what;
        let field = if kind == "record" { "title" } else { "name" };
        self.mark_unreadable(ino, name.is_none().then(|| format!("the {field} of {kind} {id}")));
        let mut name = name.unwrap_or_else(|| unreadable_name(kind, &id).into());
        let dir = self.children.entry(parent).or_default();
        if dir.get(&name).is_some_and(|other| *other != ino) {
            name = duplicate_name(name, ino);
        }
        let dir = self.children.entry(parent).or_default();
        dir.insert(name.clone(), ino);
        self.names.insert(ino, name);
        if node.is_dir() {
            self.children.entry(ino).or_default();
        }
        self.nodes.insert(ino, node);
    }

    /// Replaces the content of `vault` (its records, nested, and their files)
    /// with a listing, keeping inodes and any newer version this mount holds.
    /// `changes` is the vault's change number read before the listing was
    /// fetched: the listing is current at least at that number. `asked`:
    /// [`Tree::local_changes`] then (what this mount created or deleted
    /// since stays as it is).
    pub(super) fn apply_listing(
        &mut self,
        vault: VaultId,
        changes: u64,
        asked: u64,
        mut records: Vec<ListedRecord>,
        mut files: Vec<ListedFile>,
    ) -> Vec<Invalidation> {
        self.drop_deleted_here(vault, asked, &mut records, &mut files);
        let vault_ino = self.ino_for(Key::Vault(vault));
        let held = self.nodes.iter().filter(|(_, n)| n.vault() == Some(vault)).map(|(ino, _)| *ino);
        let before = self.seen(held.collect::<Vec<_>>());
        // Rebuild the children of the vault and of each of its records.
        let mut kids: HashMap<Ino, BTreeMap<OsString, Ino>> = HashMap::new();
        kids.insert(vault_ino, BTreeMap::new());
        let mut placed: Vec<(Ino, Ino, OsString, Node)> = Vec::new();
        for (info, name) in records {
            if self.elsewhere(vault, Key::Record(info.id))
                || info.parent.is_some_and(|p| self.elsewhere(vault, Key::Record(p)))
            {
                continue;
            }
            let ino = self.ino_for(Key::Record(info.id));
            kids.entry(ino).or_default();
            let parent = match info.parent {
                Some(p) => self.ino_for(Key::Record(p)),
                None => vault_ino,
            };
            let id = info.id.to_string();
            self.mark_unreadable(ino, name.is_none().then(|| format!("the title of record {id}")));
            let name = name.unwrap_or_else(|| unreadable_name("record", &id).into());
            placed.push((parent, ino, name, Node::Record { info, parent }));
        }
        for (info, meta, name) in files {
            if self.not_listed_here(vault, &info) {
                continue;
            }
            let ino = self.ino_for(Key::File(info.id));
            let parent = self.ino_for(Key::Record(info.record));
            let id = info.id.to_string();
            self.mark_unreadable(ino, name.is_none().then(|| format!("the name of file {id}")));
            let name = name.unwrap_or_else(|| unreadable_name("file", &id).into());
            placed.push((parent, ino, name, Node::File { info, parent, meta }));
        }
        // Records and files created here since the listing was asked for, and
        // those created here and not yet sent, stay where they are (if the
        // listing still has their directory, or it is one of them), under
        // their names; records first, so that what is in them has a place.
        let listed: HashSet<Ino> = placed.iter().map(|(_, ino, ..)| *ino).collect();
        let made: Vec<(Ino, Ino, bool)> = self
            .made_here
            .keys()
            .chain(self.unsent.keys())
            .filter(|ino| !listed.contains(ino) && !self.orphans.contains_key(ino))
            .filter_map(|&ino| {
                let node = self.nodes.get(&ino).filter(|n| n.vault() == Some(vault))?;
                Some((ino, node.parent()?, node.is_dir()))
            })
            .collect();
        // Directories first (one may have been moved into another made here).
        for &(ino, _, dir) in &made {
            if dir {
                kids.entry(ino).or_default();
            }
        }
        for (ino, parent, _) in made {
            if let (Some(dir), Some(name)) = (kids.get_mut(&parent), self.names.get(&ino)) {
                dir.insert(name.clone(), ino);
            }
        }
        for (parent, ino, mut name, node) in placed {
            // The listing may have been fetched before one of our own changes was
            // committed: never go back to an older version than the one we hold,
            // nor to where the object was before (a rename or move made here).
            let ours = self.nodes.get(&ino).filter(|n| n.version() > node.version());
            let (parent, node) = match ours.and_then(|n| Some((n.parent()?, self.names.get(&ino)?))) {
                Some((our_parent, our_name)) => {
                    name = our_name.clone();
                    (our_parent, None)
                }
                None => (parent, Some(node)),
            };
            let dir = kids.entry(parent).or_default();
            if dir.get(&name).is_some_and(|other| *other != ino) {
                name = duplicate_name(name, ino);
            }
            dir.insert(name.clone(), ino);
            self.names.insert(ino, name);
            if let Some(node) = node {
                self.nodes.insert(ino, node);
            }
        }
        let mut after: Vec<Ino> = before.keys().copied().collect();
        for (dir, entries) in kids {
            after.extend(entries.values().copied());
            self.children.insert(dir, entries);
        }
        self.vault_loaded.insert(vault, Instant::now());
        self.listed_at.insert(vault, changes);
        after.sort_unstable();
        after.dedup();
        self.changed_since(before, after)
    }

    /// Records whether `ino`'s name failed its check, and which object it is.
    fn mark_unreadable(&mut self, ino: Ino, failed: Option<String>) {
        match failed {
            Some(what) => self.unreadable.insert(ino, what),
            None => self.unreadable.remove(&ino),
        };
    }
}

/// The name entry `ino` is shown under when its directory has another
/// entry named `name` (written by other clients): both stay visible.
fn duplicate_name(name: OsString, ino: Ino) -> OsString {
    let mut alt = name.clone();
    alt.push(format!(" (duplicate {ino:x})"));
    tracing::warn!(
        ino,
        name = %super::super::lognames::shown(&name),
        "two entries of one directory have the same name; this one is shown with \"(duplicate {ino:x})\" added"
    );
    alt
}

/// Refuses a name no directory entry may have (EINVAL, ENAMETOOLONG).
pub(super) fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(FsError::Invalid(format!("invalid name {}", super::super::lognames::shown(name))));
    }
    if b.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

/// A name as it appears in a directory: a name from the server that could not be
/// a file name (a slash, say, written by another client) is shown escaped.
pub(super) fn display_name(raw: &[u8]) -> OsString {
    if !raw.is_empty() && raw != b"." && raw != b".." && !raw.contains(&b'/') && !raw.contains(&0) {
        return OsString::from_vec(raw.to_vec());
    }
    let escaped: Vec<u8> = raw.iter().map(|&c| if c == b'/' || c == 0 { b'_' } else { c }).collect();
    OsString::from_vec([b"_".as_slice(), &escaped].concat())
}

/// The stand-in name of an entry whose real name failed its check.
fn unreadable_name(kind: &str, id: &str) -> String {
    format!("UNREADABLE {kind} {}", id.get(..12).unwrap_or(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Sealed;

    fn vault() -> VaultId {
        VaultId::random().unwrap()
    }

    fn record(vault: VaultId, parent: Option<RecordId>, version: u64) -> RecordInfo {
        RecordInfo {
            id: RecordId::random().unwrap(),
            vault,
            parent,
            title: Sealed::default(),
            fields: Sealed::default(),
            version,
        }
    }

    fn file(vault: VaultId, record: RecordId, version: u64) -> FileInfo {
        FileInfo {
            id: FileId::random().unwrap(),
            vault,
            record,
            name: Sealed::default(),
            size: 0,
            e2e: true,
            version,
            mtime_ms: 0,
            meta: Sealed::default(),
        }
    }

    fn name(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    /// Every directory entry is a node of that name whose parent is that
    /// directory; no node is in two directories.
    fn check_consistent(t: &Tree) {
        let mut seen = HashSet::new();
        for (dir, kids) in &t.children {
            for (n, ino) in kids {
                assert!(seen.insert(*ino), "{ino} is in two directories");
                assert_eq!(t.names.get(ino), Some(n), "entry {n:?} of {dir}");
                assert_eq!(t.parent_of(*ino), Some(*dir), "parent of {ino}");
            }
        }
        for (key, ino) in &t.keys {
            assert_eq!(t.keys.values().filter(|i| *i == ino).count(), 1, "{key:?}");
        }
    }

    /// The change feed applied: a file replaced by another of its name, and
    /// two files that swap names, show under their names (no duplicates);
    /// a deleted file leaves its directory; a moved record takes its files
    /// along; the listing is current at the new number, and only if it was
    /// current at the old one.
    #[test]
    fn changes_apply_in_place_without_stray_duplicates() {
        let v = vault();
        let (r, r2) = (record(v, None, 1), record(v, None, 1));
        let (f, g, h) = (file(v, r.id, 1), file(v, r.id, 1), file(v, r.id, 1));
        let mut t = Tree::new();
        let listing = |f: &FileInfo, g: &FileInfo, h: &FileInfo| {
            vec![
                (f.clone(), FileMeta::Legacy, name("f")),
                (g.clone(), FileMeta::Legacy, name("g")),
                (h.clone(), FileMeta::Legacy, name("h")),
            ]
        };
        t.apply_listing(v, 5, 0, vec![(r.clone(), name("r")), (r2.clone(), name("r2"))], listing(&f, &g, &h));
        let dir = t.keys[&Key::Record(r.id)];
        assert!(t.apply_changes(v, 4, 6, 0, vec![], vec![], vec![]).is_none(), "not current at 4");
        // f deleted and a new file named f; g and h swap names.
        let f2 = file(v, r.id, 1);
        let g2 = FileInfo { version: 2, ..g.clone() };
        let h2 = FileInfo { version: 2, ..h.clone() };
        let changed = vec![
            (f2.clone(), FileMeta::Legacy, name("f")),
            (g2, FileMeta::Legacy, name("h")),
            (h2, FileMeta::Legacy, name("g")),
        ];
        let f_ino = t.keys[&Key::File(f.id)];
        let told = t.apply_changes(v, 5, 9, 0, vec![], changed, vec![Key::File(f.id)]).unwrap();
        check_consistent(&t);
        let names: Vec<_> = t.entries(dir).unwrap().map(|(n, ino, _)| (n.clone(), ino)).collect();
        let ino = |id| t.keys[&Key::File(id)];
        // The kernel hears of each: f deleted (watchers too), g and h gone
        // from their names (each now the other's), new versions, the
        // directory; not of the name f again (new to it: the kernel keeps no
        // negative entries, and telling it would race with its lookups).
        let entry = |n: &str| Invalidation::Entry { parent: dir, name: n.into() };
        for expected in [
            Invalidation::Deleted { parent: dir, child: f_ino, name: "f".into() },
            entry("g"),
            entry("h"),
            Invalidation::Inode(ino(g.id)),
            Invalidation::Inode(ino(h.id)),
            Invalidation::Inode(dir),
        ] {
            assert!(told.contains(&expected), "{expected:?} not in {told:?}");
        }
        assert!(!told.contains(&entry("f")), "{told:?}");
        assert!(!told.contains(&Invalidation::Inode(ino(f2.id))), "a new file has nothing cached");
        assert_eq!(
            names,
            [
                (OsString::from("f"), ino(f2.id)),
                (OsString::from("g"), ino(h.id)),
                (OsString::from("h"), ino(g.id))
            ]
        );
        assert_eq!(t.listed_at(v), Some(9));
        // The same object twice in one batch (a hostile page): in one place.
        let twice =
            vec![(f2.clone(), FileMeta::Legacy, name("x")), (f2.clone(), FileMeta::Legacy, name("y"))];
        assert!(t.apply_changes(v, 9, 9, 0, vec![], twice, vec![]).is_some());
        check_consistent(&t);
        assert_eq!(t.name_of(t.keys[&Key::File(f2.id)]), "y");
        let twice_back = vec![(f2.clone(), FileMeta::Legacy, name("f"))];
        assert!(t.apply_changes(v, 9, 9, 0, vec![], twice_back, vec![]).is_some());
        // The record moves under r2, with its files.
        let moved = RecordInfo { parent: Some(r2.id), version: 2, ..r.clone() };
        let told = t.apply_changes(v, 9, 10, 0, vec![(moved, name("r"))], vec![], vec![]).unwrap();
        check_consistent(&t);
        let r2_ino = t.keys[&Key::Record(r2.id)];
        let vault_ino = t.keys[&Key::Vault(v)];
        for expected in [
            Invalidation::Entry { parent: vault_ino, name: "r".into() },
            Invalidation::Inode(vault_ino),
            Invalidation::Inode(r2_ino),
        ] {
            assert!(told.contains(&expected), "{expected:?} not in {told:?}");
        }
        assert_eq!(t.child(r2_ino, OsStr::new("r")), Some(dir));
        assert_eq!(t.entries(dir).unwrap().count(), 3);
    }

    /// Records and files made here and not sent yet, nested, stay where
    /// they are across listings, which do not name them, once this mount's
    /// own changes are forgotten too; until they are sent and the server's
    /// listing names them.
    #[test]
    fn unsent_records_and_what_is_in_them_stay_across_listings() {
        let v = vault();
        let r = record(v, None, 1);
        let mut t = Tree::new();
        t.apply_listing(v, 1, 0, vec![(r.clone(), name("r"))], vec![]);
        let (vault_ino, r_ino) = (t.keys[&Key::Vault(v)], t.keys[&Key::Record(r.id)]);
        let outer = record(v, Some(r.id), 0);
        let inner = record(v, Some(outer.id), 0);
        let f = file(v, inner.id, 0);
        let o = t.add_unsent(
            r_ino,
            OsStr::new("o"),
            Key::Record(outer.id),
            Node::Record { info: outer.clone(), parent: r_ino },
        );
        let i = t.add_unsent(
            o,
            OsStr::new("i"),
            Key::Record(inner.id),
            Node::Record { info: inner.clone(), parent: o },
        );
        let meta = FileMeta::Legacy;
        let fi = t.add_unsent(
            i,
            OsStr::new("f"),
            Key::File(f.id),
            Node::File { info: f.clone(), parent: i, meta },
        );
        assert_eq!(t.unsent_chain(fi), Vec::<Ino>::new(), "a file is no record");
        assert_eq!(t.unsent_chain(i), [i, o]);
        assert_eq!(
            t.unsent_record(i).map(|(vault, new)| (vault, new.id, new.parent)),
            Some((v, inner.id, Some(outer.id)))
        );
        for _ in 0..2 {
            // The second listing comes after this mount's changes are forgotten.
            t.apply_listing(v, 2, t.local_changes(), vec![(r.clone(), name("r"))], vec![]);
            check_consistent(&t);
            assert_eq!(t.child(r_ino, OsStr::new("o")), Some(o));
            assert_eq!(t.child(o, OsStr::new("i")), Some(i));
            assert_eq!(t.child(i, OsStr::new("f")), Some(fi));
        }
        assert!(t.made_here.is_empty());
        assert_eq!(t.unsent_records(Some(r_ino)), [o]);
        t.record_sent(o, Some(1));
        assert_eq!(t.unsent_chain(i), [i]);
        assert_eq!(t.node_unchecked(o).and_then(Node::version), Some(1));
        // Sent, and listed: in place as the server says.
        t.apply_listing(
            v,
            3,
            t.local_changes(),
            vec![(r.clone(), name("r")), (RecordInfo { version: 1, ..outer }, name("o"))],
            vec![],
        );
        check_consistent(&t);
        assert_eq!(t.child(o, OsStr::new("i")), Some(i));
        assert_eq!(t.child(vault_ino, OsStr::new("r")), Some(r_ino));
    }

    /// Under the tree's lock: a listing or a change of one vault never
    /// places anything under (or as) a record or file the tree holds in
    /// another vault.
    #[test]
    fn nothing_goes_under_another_vaults_objects() {
        let (v, w) = (vault(), VaultId([8; 16]));
        let wr = record(w, None, 1);
        let wf = file(w, wr.id, 1);
        let mut t = Tree::new();
        t.apply_listing(
            w,
            3,
            0,
            vec![(wr.clone(), name("w"))],
            vec![(wf.clone(), FileMeta::Legacy, name("wf"))],
        );
        let w_dir = t.keys[&Key::Record(wr.id)];
        let x = record(v, Some(wr.id), 1);
        let claimed = RecordInfo { vault: v, ..wr.clone() };
        let into_w = FileInfo { vault: v, ..file(v, wr.id, 1) };
        let wf_claimed = FileInfo { vault: v, ..wf.clone() };
        t.apply_listing(
            v,
            4,
            0,
            vec![(x.clone(), name("x")), (claimed.clone(), name("c"))],
            vec![
                (into_w.clone(), FileMeta::Legacy, name("i")),
                (wf_claimed.clone(), FileMeta::Legacy, name("j")),
            ],
        );
        check_consistent(&t);
        let names: Vec<_> = t.entries(w_dir).unwrap().map(|(n, ..)| n.clone()).collect();
        assert_eq!(names, ["wf"], "W's record holds what it held");
        assert_eq!(t.record_vault(wr.id), Some(w));
        assert!(t
            .apply_changes(
                v,
                4,
                5,
                0,
                vec![(x, name("x"))],
                vec![(into_w, FileMeta::Legacy, name("i"))],
                vec![]
            )
            .is_some());
        assert!(t
            .apply_changes(
                v,
                5,
                6,
                0,
                vec![(claimed, name("c"))],
                vec![(wf_claimed, FileMeta::Legacy, name("j"))],
                vec![Key::File(wf.id)]
            )
            .is_some());
        check_consistent(&t);
        let names: Vec<_> = t.entries(w_dir).unwrap().map(|(n, ..)| n.clone()).collect();
        assert_eq!(names, ["wf"], "nor through changes");
        assert_eq!(t.name_of(w_dir), "w");
    }

    /// The vault list: two vaults of one name both show; a vault left is
    /// told as deleted, and the root's attributes as changed (a name new to
    /// it is not told: see `changed_since`).
    #[test]
    fn the_vault_list_tells_what_left_and_keeps_both_of_one_name() {
        let (v, w, x) = (vault(), VaultId([8; 16]), VaultId([9; 16]));
        let mut t = Tree::new();
        t.set_vaults(vec![(v, name("A").map(|n| n.into_string().unwrap())), (w, Some("B".into()))]);
        let v_ino = t.keys[&Key::Vault(v)];
        let told = t.set_vaults(vec![(w, Some("B".into())), (x, Some("B".into()))]);
        check_consistent(&t);
        assert_eq!(t.entries(ROOT).unwrap().count(), 2, "both vaults named B show");
        assert_eq!(told[0], Invalidation::Deleted { parent: ROOT, child: v_ino, name: "A".into() });
        assert_eq!(told[1..], [Invalidation::Inode(ROOT)], "{told:?}");
        // A vault whose own name is another's stand-in stays visible too.
        let (x_ino, y) = (t.keys[&Key::Vault(x)], VaultId([10; 16]));
        let stand_in = format!("B (duplicate {x_ino:x})");
        t.set_vaults(vec![(w, Some("B".into())), (x, Some("B".into())), (y, Some(stand_in))]);
        check_consistent(&t);
        assert_eq!(t.entries(ROOT).unwrap().count(), 3, "all three show");
    }

    #[test]
    fn listings_keep_inodes_and_nest_records() {
        let v = vault();
        let mut t = Tree::new();
        t.set_vaults(vec![(v, Some("Finance".into()))]);
        let vino = t.child(ROOT, OsStr::new("Finance")).unwrap();
        let top = record(v, None, 1);
        let sub = record(v, Some(top.id), 1);
        let f = file(v, sub.id, 1);
        let listing = |t: &mut Tree| {
            t.apply_listing(
                v,
                0,
                0,
                vec![(sub.clone(), name("2026")), (top.clone(), name("Taxes"))],
                vec![(f.clone(), FileMeta::Legacy, name("a.pdf"))],
            )
        };
        listing(&mut t);
        let top_ino = t.child(vino, OsStr::new("Taxes")).unwrap();
        let sub_ino = t.child(top_ino, OsStr::new("2026")).unwrap();
        let f_ino = t.child(sub_ino, OsStr::new("a.pdf")).unwrap();
        assert_eq!(t.file_ino(f.id), Some(f_ino));
        assert_eq!(t.subdirs(top_ino), 1);
        check_consistent(&t);
        listing(&mut t);
        assert_eq!(t.child(sub_ino, OsStr::new("a.pdf")), Some(f_ino), "same inode on every listing");
        check_consistent(&t);
    }

    #[test]
    fn an_answer_asked_for_before_a_change_here_does_not_undo_it() {
        let v = vault();
        let mut t = Tree::new();
        let r = record(v, None, 1);
        let r2 = record(v, None, 1);
        let (f, g, h) = (file(v, r.id, 1), file(v, r.id, 1), file(v, r.id, 1));
        let (records, files) = (
            vec![(r.clone(), name("r")), (r2.clone(), name("r2"))],
            vec![
                (f.clone(), FileMeta::Legacy, name("f")),
                (g.clone(), FileMeta::Legacy, name("g")),
                (h.clone(), FileMeta::Legacy, name("h")),
            ],
        );
        t.apply_listing(v, 5, 0, records.clone(), files.clone());
        let vino = t.ino_for(Key::Vault(v));
        let r_ino = t.child(vino, OsStr::new("r")).unwrap();
        let asked = t.local_changes();
        // While answers were on their way: f unlinked, the record r2 removed,
        // a record and a file in it created, h renamed (a new version).
        t.remove(t.file_ino(f.id).unwrap());
        t.remove(t.keys[&Key::Record(r2.id)]);
        let a = record(v, None, 1);
        let a_ino =
            t.add(vino, OsStr::new("a"), Key::Record(a.id), Node::Record { info: a.clone(), parent: vino });
        let made = record(v, None, 1);
        let made_ino = t.add(
            vino,
            OsStr::new("new"),
            Key::Record(made.id),
            Node::Record { info: made.clone(), parent: vino },
        );
        // a, made first, moved into the record made after it.
        let moved_a = RecordInfo { version: 2, parent: Some(made.id), ..a };
        t.place(made_ino, OsStr::new("a"), a_ino, Node::Record { info: moved_a, parent: made_ino });
        let inner = file(v, r.id, 1);
        let node = Node::File { info: inner.clone(), parent: made_ino, meta: FileMeta::Legacy };
        let inner_ino = t.add(made_ino, OsStr::new("inner"), Key::File(inner.id), node);
        let h_ino = t.file_ino(h.id).unwrap();
        let moved = FileInfo { version: 2, ..h.clone() };
        t.place(
            r_ino,
            OsStr::new("h2"),
            h_ino,
            Node::File { info: moved, parent: r_ino, meta: FileMeta::Legacy },
        );

        t.apply_listing(v, 5, asked, records.clone(), files.clone());
        let shown = |t: &Tree, dir: Ino| -> Vec<String> {
            t.children[&dir].keys().map(|n| n.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(shown(&t, vino), ["new", "r"], "a listing asked for before: r2 stays gone, new stays");
        assert_eq!(shown(&t, r_ino), ["g", "h2"], "f stays gone, h keeps its new name");
        assert_eq!(shown(&t, made_ino), ["a", "inner"]);
        assert_eq!(t.file_ino(inner.id), Some(inner_ino));
        check_consistent(&t);
        let page = (vec![(r2.clone(), name("r2"))], files.clone());
        assert!(t.apply_changes(v, 5, 6, asked, page.0, page.1, vec![]).is_some());
        assert_eq!(shown(&t, vino), ["new", "r"], "a page of changes asked for before");
        assert_eq!(shown(&t, r_ino), ["g", "h2"]);
        check_consistent(&t);
        // An answer asked for after the changes is taken whole: the server
        // has f again and lost the new record, its word stands; and the
        // changes are forgotten.
        t.apply_listing(v, 6, t.local_changes(), records, files);
        assert_eq!(shown(&t, vino), ["r", "r2"]);
        assert_eq!(shown(&t, r_ino), ["f", "g", "h2"]);
        assert!(t.deleted_here.is_empty() && t.made_here.is_empty());
        check_consistent(&t);
    }

    #[test]
    fn a_file_waiting_for_its_delete_stays_out_of_every_answer() {
        let v = vault();
        let mut t = Tree::new();
        let r = record(v, None, 1);
        let (f, g) = (file(v, r.id, 1), file(v, r.id, 1));
        let records = vec![(r.clone(), name("r"))];
        let files = vec![(f.clone(), FileMeta::Legacy, name("f")), (g.clone(), FileMeta::Legacy, name("g"))];
        t.apply_listing(v, 5, 0, records.clone(), files.clone());
        let r_ino = t.keys[&Key::Record(r.id)];
        let shown = |t: &Tree| -> Vec<String> {
            t.children[&r_ino].keys().map(|n| n.to_string_lossy().into_owned()).collect()
        };
        t.unlink_deleting(t.file_ino(f.id).unwrap(), &f);
        assert!(t.deleting(Some(r.id)) && t.deleting(None) && t.deleting_count() == 1);
        assert!(!t.deleting(Some(record(v, None, 1).id)), "another record has none");
        // Asked for after the unlink, but before the server deleted it.
        t.apply_listing(v, 6, t.local_changes(), records.clone(), files.clone());
        assert_eq!(shown(&t), ["g"], "a listing");
        assert!(t.apply_changes(v, 6, 7, t.local_changes(), vec![], files.clone(), vec![]).is_some());
        assert_eq!(shown(&t), ["g"], "a page of changes");
        // Deleted now: an answer asked for before that still leaves it out...
        let asked = t.local_changes();
        t.deletion_done(Key::File(f.id), true);
        assert!(!t.deleting(None));
        t.apply_listing(v, 7, asked, records.clone(), files.clone());
        assert_eq!(shown(&t), ["g"], "asked for before the delete");
        // ...one asked for after is taken whole.
        t.apply_listing(v, 8, t.local_changes(), records.clone(), files.clone());
        assert_eq!(shown(&t), ["f", "g"]);
        // A delete the server refused: the file shows again at the next listing.
        t.unlink_deleting(t.file_ino(g.id).unwrap(), &g);
        t.deletion_done(Key::File(g.id), false);
        t.apply_listing(v, 9, t.local_changes(), records, files);
        assert_eq!(shown(&t), ["f", "g"]);
        check_consistent(&t);
    }

    #[test]
    fn a_record_waiting_for_its_delete_stays_out_of_every_answer() {
        let v = vault();
        let mut t = Tree::new();
        let (p, q) = (record(v, None, 1), record(v, None, 1));
        let c = record(v, Some(p.id), 1);
        let records = vec![(p.clone(), name("p")), (q.clone(), name("q")), (c.clone(), name("c"))];
        t.apply_listing(v, 5, 0, records.clone(), vec![]);
        let vault_ino = t.keys[&Key::Vault(v)];
        let shown = |t: &Tree| -> Vec<String> {
            t.children[&vault_ino].keys().map(|n| n.to_string_lossy().into_owned()).collect()
        };
        let asked_before = t.local_changes();
        t.rmdir_deleting(t.keys[&Key::Record(c.id)]);
        t.rmdir_deleting(t.keys[&Key::Record(p.id)]);
        assert!(t.deleting(Some(p.id)), "p waits for c");
        assert!(!t.deleting(Some(c.id)) && t.deleting_count() == 2);
        t.apply_listing(v, 6, t.local_changes(), records.clone(), vec![]);
        assert_eq!(shown(&t), ["q"], "a listing");
        assert!(t.apply_changes(v, 6, 7, t.local_changes(), records.clone(), vec![], vec![]).is_some());
        assert_eq!(shown(&t), ["q"], "a page of changes");
        t.deletion_done(Key::Record(c.id), true);
        assert!(!t.deleting(Some(p.id)));
        // Refused: the vault is listed anew, and shows it again, even from a
        // listing asked for before the rmdir.
        t.deletion_done(Key::Record(p.id), false);
        assert!(!t.vault_fresh(v, true), "listed anew, whatever the feed says");
        t.apply_listing(v, 8, asked_before, records, vec![]);
        assert_eq!(shown(&t), ["p", "q"]);
        check_consistent(&t);
    }

    #[test]
    fn a_listing_never_goes_back_to_an_older_version() {
        let v = vault();
        let mut t = Tree::new();
        let r = record(v, None, 1);
        let mut f = file(v, r.id, 5);
        t.apply_listing(
            v,
            0,
            0,
            vec![(r.clone(), name("r"))],
            vec![(f.clone(), FileMeta::Legacy, name("x"))],
        );
        let ino = t.file_ino(f.id).unwrap();
        t.update_file(ino, |i| i.version = 7, |_| FileMeta::Legacy);
        f.version = 6; // fetched before our change was committed
        t.apply_listing(v, 0, 0, vec![(r, name("r"))], vec![(f, FileMeta::Legacy, name("x"))]);
        assert_eq!(t.file(ino).unwrap().0.version, 7);
    }

    #[test]
    fn duplicate_and_unreadable_names_stay_visible() {
        let v = vault();
        let mut t = Tree::new();
        let r = record(v, None, 1);
        let (a, b, c) = (file(v, r.id, 1), file(v, r.id, 1), file(v, r.id, 1));
        t.apply_listing(
            v,
            0,
            0,
            vec![(r.clone(), name("r"))],
            vec![
                (a.clone(), FileMeta::Legacy, name("same")),
                (b.clone(), FileMeta::Legacy, name("same")),
                (c.clone(), FileMeta::Legacy, None),
            ],
        );
        let rino = t.parent_of(t.file_ino(a.id).unwrap()).unwrap();
        let names: Vec<_> =
            t.entries(rino).unwrap().map(|(n, ..)| n.to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("same (duplicate ")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("UNREADABLE file ")), "{names:?}");
        assert!(matches!(t.node(t.file_ino(c.id).unwrap()), Err(FsError::Integrity { .. })));
        assert!(t.node_unchecked(t.file_ino(c.id).unwrap()).is_some(), "still named by id");
        check_consistent(&t);
    }

    #[test]
    fn place_moves_and_unlink_keeps_open_files_until_released() {
        let v = vault();
        let mut t = Tree::new();
        let (r1, r2) = (record(v, None, 1), record(v, None, 1));
        let f = file(v, r1.id, 1);
        t.apply_listing(v, 0, 0, vec![(r1.clone(), name("one")), (r2.clone(), name("two"))], vec![]);
        let vino = t.parent_of(t.keys[&Key::Record(r1.id)]).unwrap();
        let (one, two) =
            (t.child(vino, OsStr::new("one")).unwrap(), t.child(vino, OsStr::new("two")).unwrap());
        let node = |parent| Node::File { info: f.clone(), parent, meta: FileMeta::Legacy };
        let ino = t.add(one, OsStr::new("f"), Key::File(f.id), node(one));
        assert!(!t.is_empty_dir(one));
        t.place(two, OsStr::new("g"), ino, node(two));
        assert!(t.is_empty_dir(one), "moved away");
        assert_eq!(t.child(two, OsStr::new("g")), Some(ino));
        assert_eq!(t.name_of(ino), "g");
        check_consistent(&t);
        t.unlink(ino, true, false);
        assert_eq!(t.child(two, OsStr::new("g")), None);
        assert!(t.is_orphan(ino) && t.file(ino).is_ok(), "still usable while open");
        assert!(matches!(t.release_orphan(ino), Some(Released::Gone)));
        assert!(matches!(t.node(ino), Err(FsError::NotFound)));
        assert!(t.release_orphan(ino).is_none(), "released once");
        check_consistent(&t);
    }

    #[test]
    fn a_rekeyed_file_keeps_the_old_inode() {
        let v = vault();
        let mut t = Tree::new();
        let r = record(v, None, 1);
        let (old, new) = (file(v, r.id, 1), file(v, r.id, 1));
        t.apply_listing(
            v,
            0,
            0,
            vec![(r.clone(), name("r"))],
            vec![(old.clone(), FileMeta::Legacy, name("old"))],
        );
        let ino = t.file_ino(old.id).unwrap();
        let rino = t.parent_of(ino).unwrap();
        let node = Node::File { info: new.clone(), parent: rino, meta: FileMeta::Legacy };
        let placeholder = t.add(rino, OsStr::new("new"), Key::File(new.id), node.clone());
        t.rekey_file(ino, old.id, new.id, placeholder);
        t.place(rino, OsStr::new("new"), ino, node);
        assert_eq!(t.file_ino(new.id), Some(ino));
        assert_eq!(t.file_ino(old.id), None);
        assert!(matches!(t.node(placeholder), Err(FsError::NotFound)));
        assert_eq!(t.child(rino, OsStr::new("new")), Some(ino));
        assert_eq!(t.child(rino, OsStr::new("old")), None);
        check_consistent(&t);
    }

    #[test]
    fn names_are_checked_and_displayed_safely() {
        assert!(check_name(OsStr::new("ok name.txt")).is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(matches!(check_name(OsStr::new(&"x".repeat(256))), Err(FsError::NameTooLong)));
        assert_eq!(display_name(b"a/b"), "_a_b");
        assert_eq!(display_name(b".."), "_..");
        assert_eq!(display_name(b"fine"), "fine");
    }
}
