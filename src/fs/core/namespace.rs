//! Loading the namespace from the server and answering lookups and listings.
//!
//! Data flow. The root lists the vaults the user can open; a vault's records
//! and files are fetched together ([`VaultFs::load_vault`]) and reused for
//! [`LISTING_TTL`](super::LISTING_TTL), and after that for as long as the
//! vault list shows the vault's change number where it was when the vault
//! was listed (the server's word: a server that hides a change only shows an
//! older listing, as it could anyway). A vault that changed is brought up to
//! date from its change feed (only what changed, checked as a listing is)
//! when it was listed with a change number, else listed whole. While the
//! change feed is live (super::follow) a listing current at the vault's
//! latest change number is fresh however old it is. One load of a vault runs
//! at a time (its loading lock); those that waited find it fresh. Names,
//! titles and manifests are opened here, outside the
//! tree's lock, and the result handed to the [`Tree`](super::tree::Tree) in
//! one call. Anything the server lists that fails its check is listed under a
//! stand-in name and gives EIO; anything it lists for another vault is left
//! out. While the server is unreachable, the last listing keeps answering.
//!
//! Each directory operation is one function on the loaded tree, run at once
//! by the `*_now` form when the listing is fresh (the FUSE adapter then
//! answers on its own thread) or after fetching the listing by the async form.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::tree::{display_name, FileMeta, Key, ListedFile, ListedRecord, Node};

/// Most objects (changed or deleted) the change feed may bring for one vault
/// before the vault is listed whole instead.
const FEED_MOST: usize = 50_000;
/// Most pages of changes asked for at once (a page holds up to 1,000).
const FEED_PAGES: usize = 100;
use super::{check_file_answer, Attr, Entry, FsError, Ino, Invalidation, Result, VaultFs, ROOT};
use crate::crypto::{self, open_name, seal_name, FileContext, FileManifest, NameContext, OsRandom};
use crate::ids::{FileId, RecordId, VaultId};
use crate::protocol::{FileInfo, RecordInfo, Sealed};
use crate::remote::account::AccountError;
use crate::remote::{Remote, RemoteError};

impl<R: Remote> VaultFs<R> {
    // ---- loading -------------------------------------------------------------

    pub(super) async fn load_root(&self, force: bool) -> Result<()> {
        if self.tree.lock().root_fresh(self.feed.live()) && !force {
            return Ok(());
        }
        // Another client of this user may have changed the wallet (a vault
        // created, a key added): read it again first, so the listing opens
        // with the keys it needs. Never an older wallet than this machine saw.
        let fresh = &self.freshness;
        match self
            .account
            .refresh_wallet(|revision| fresh.check_wallet(revision).map_err(|e| e.to_string()))
            .await
        {
            Ok(true) => tracing::info!(
                "the wallet changed on the server (another client of this user); read it again"
            ),
            Ok(false) => {}
            // Unreachable: the listing below says so (or answers from the last one).
            Err(AccountError::Remote(e)) => {
                tracing::debug!(error = %e, "cannot ask whether the wallet changed")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the wallet changed on the server but was not taken; keeping the one held")
            }
        }
        let vaults = match self.account.vaults().await {
            Ok(v) => v,
            Err(e) => {
                if !force && self.tree.lock().keep_root() {
                    // Keep answering from the last listing while the server is
                    // unreachable; try again after the listing's reuse time.
                    tracing::warn!(error = %e, "cannot refresh the vault list; showing the last one");
                    return Ok(());
                }
                return Err(FsError::Io(e.to_string()));
            }
        };
        // Keys of a share stored in the wallet by the listing: this machine
        // has seen that revision (an older wallet is refused from then on).
        if let Err(e) = fresh.check_wallet(self.account.wallet().revision()) {
            tracing::warn!(error = %e, "the wallet held is older than this machine saw");
        }
        let listed: Vec<(VaultId, u64)> = vaults.iter().map(|v| (v.info.id, v.info.changes)).collect();
        // A vault shared by someone whose key the user has not confirmed is
        // not shown (`vaultfs vault list` says how to confirm it).
        let pending = self.account.pending_shares();
        let vaults: Vec<_> =
            vaults.into_iter().filter(|v| !pending.iter().any(|p| p.0 == v.info.id)).collect();
        let mut rights_changed = Vec::new();
        for v in &vaults {
            if v.name.is_none() {
                tracing::error!(vault = %v.info.id, "vault name cannot be opened; it is listed as unreadable and gives EIO");
            }
            let before = self.rules.vault(v.info.id).read_only;
            self.rules.set_vault(v.info.id, v.name.as_deref(), v.info.e2e_required, v.info.rights);
            if self.rules.vault(v.info.id).read_only != before {
                rights_changed.push(v.info.id);
            }
        }
        // A shared vault whose name another listed vault has too is shown
        // with its sender's name: a share never takes the place of a vault
        // of the same name.
        let taken = |name: &str| vaults.iter().filter(|v| v.name.as_deref() == Some(name)).count() > 1;
        let shown = vaults
            .iter()
            .map(|v| {
                let name = match (&v.name, &v.shared_by) {
                    (Some(n), Some(by)) if taken(n) => Some(format!("{n} (from {by})")),
                    (n, _) => n.clone(),
                };
                (v.info.id, name)
            })
            .collect();
        let told = {
            let mut tree = self.tree.lock();
            let mut told = tree.set_vaults(shown);
            tree.note_vault_list(listed);
            // Rights granted or taken: every entry's permission bits changed.
            for vault in rights_changed {
                told.extend(tree.inos_of(vault).into_iter().map(Invalidation::Inode));
            }
            told
        };
        self.tell_kernel(told);
        Ok(())
    }

    /// Whether `vault`'s listing can answer without asking the server.
    fn vault_fresh(&self, vault: VaultId) -> bool {
        let live = self.feed.live();
        self.tree.lock().vault_fresh(vault, live)
    }

    pub(super) async fn load_vault(&self, vault: VaultId, force: bool) -> Result<()> {
        if !force && self.vault_fresh(vault) {
            return Ok(());
        }
        // One load of a vault at a time: those that waited find it fresh.
        let loading = self.loading_lock(vault);
        let _one = loading.lock().await;
        if !force {
            if self.vault_fresh(vault) {
                return Ok(());
            }
            // The vault list says whether the vault changed since it was
            // listed: if not, it is fresh again without listing it.
            if let Err(e) = self.load_root(false).await {
                tracing::debug!(error = %e, "cannot refresh the vault list before listing a vault");
            }
            if self.vault_fresh(vault) {
                return Ok(());
            }
        }
        self.refresh_vault(vault, force).await
    }

    /// Brings `vault`'s listing up to date: from its change feed, else (or
    /// if `force`d) by listing it whole. The caller holds its loading lock.
    pub(super) async fn refresh_vault(&self, vault: VaultId, force: bool) -> Result<()> {
        if !force {
            match self.follow_feed(vault).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e @ FsError::Unavailable(_)) => {
                    if !self.tree.lock().keep_vault(vault) {
                        return Err(e);
                    }
                    tracing::warn!(%vault, error = %e, "cannot follow the vault's changes; showing the last listing");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        let (changes, asked) = {
            let tree = self.tree.lock();
            (tree.vault_changes(vault), tree.local_changes())
        };
        let listing = tokio::try_join!(self.remote().records(vault), self.remote().files(vault));
        let (records, files) = match listing {
            Ok(l) => l,
            Err(e @ RemoteError::Unavailable(_)) if !force => {
                if !self.tree.lock().keep_vault(vault) {
                    return Err(e.into());
                }
                // As for the vault list: the last listing, until the server answers.
                tracing::warn!(%vault, error = %e, "cannot refresh the vault's listing; showing the last one");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let legacy = files.iter().filter(|f| f.meta.0.is_empty()).count();
        let (records, files) = self.open_listed(vault, records, files, false);
        self.note_keys_in_use(vault, &records, &files);
        let told = self.tree.lock().apply_listing(vault, changes, asked, records, files);
        self.tell_kernel(told);
        if !self.account.manifests_required(vault) && self.legacy_warned.lock().insert(vault) {
            tracing::warn!(%vault, files_without_manifest = legacy, "vault made by an older vaultfs: until `vaultfs vault migrate` marks it, a file without a manifest is trusted as the server describes it (and the server could remove one)");
        }
        Ok(())
    }

    /// Brings `vault`'s listing up to date from the change feed (only what
    /// changed since it was listed); `Ok(false)`: list it whole (never listed
    /// with a change number, too far behind, or another listing meanwhile).
    async fn follow_feed(&self, vault: VaultId) -> Result<bool> {
        let (from, asked) = {
            let tree = self.tree.lock();
            (tree.listed_at(vault), tree.local_changes())
        };
        let Some(from) = from else { return Ok(false) };
        // Each object as the latest page has it (a page fetched later may
        // bring again, or delete, what an earlier one brought).
        let mut records: HashMap<RecordId, Option<RecordInfo>> = HashMap::new();
        let mut files: HashMap<FileId, Option<FileInfo>> = HashMap::new();
        let mut since = from;
        for _ in 0..FEED_PAGES {
            let page = match self.remote().changes(vault, since).await {
                Ok(page) => page,
                Err(e @ RemoteError::Unavailable(_)) => return Err(e.into()),
                // Told to list again, or any other refusal: the listing says
                // what is wrong, if anything.
                Err(_) => return Ok(false),
            };
            if page.until < since || (page.more && page.until == since) {
                // Not a page that moves on: list the vault whole.
                return Ok(false);
            }
            since = page.until;
            records.extend(page.records.into_iter().map(|r| (r.id, Some(r))));
            records.extend(page.deleted_records.into_iter().map(|id| (id, None)));
            files.extend(page.files.into_iter().map(|f| (f.id, Some(f))));
            files.extend(page.deleted_files.into_iter().map(|id| (id, None)));
            if records.len() + files.len() > FEED_MOST {
                // More than a listing would cost.
                return Ok(false);
            }
            if !page.more {
                let mut deleted = Vec::new();
                let records = present(records, Key::Record, &mut deleted);
                let files = present(files, Key::File, &mut deleted);
                let (records, files) = self.open_listed(vault, records, files, true);
                self.note_keys_in_use(vault, &records, &files);
                let told = self.tree.lock().apply_changes(vault, from, since, asked, records, files, deleted);
                let applied = told.is_some();
                self.tell_kernel(told.unwrap_or_default());
                return Ok(applied);
            }
        }
        // Pages without end: list the vault whole.
        Ok(false)
    }

    /// Keeps what is of `vault` and opens the names, titles and manifests,
    /// before the tree is locked. A record or file the server lists here but
    /// says belongs elsewhere would be read under another vault's key check
    /// and policy (or under no manifest rule at all); a record whose parents
    /// do not lead to this vault's top (through records of this listing, or,
    /// for the `feed`, records of this vault the tree holds) would show, and
    /// take new files sealed under this vault's key, among another vault's;
    /// a record the tree holds in another vault would move there. All are
    /// left out.
    fn open_listed(
        &self,
        vault: VaultId,
        records: Vec<RecordInfo>,
        files: Vec<FileInfo>,
        feed: bool,
    ) -> (Vec<ListedRecord>, Vec<ListedFile>) {
        let stray = |kind: &str, id: String| {
            tracing::error!(%vault, kind, id, "the server listed an object of another vault (or of no record of this one); it is left out");
        };
        let held = |id: RecordId| self.tree.lock().record_vault(id);
        // A record listed twice: which of its entries to believe?
        let mut times: HashMap<RecordId, usize> = HashMap::new();
        for r in &records {
            *times.entry(r.id).or_default() += 1;
        }
        let mut parents: HashMap<RecordId, Option<RecordId>> = HashMap::new();
        let mut candidates = Vec::with_capacity(records.len());
        for r in records {
            if r.vault == vault && times[&r.id] == 1 && held(r.id).is_none_or(|v| v == vault) {
                parents.insert(r.id, r.parent);
                candidates.push(r);
            } else {
                stray("record", r.id.to_string());
            }
        }
        // Whether each record's parents lead to the top of the vault: one
        // walk up per record, each result kept for the records on its way
        // (a cycle leads nowhere).
        let mut leads: HashMap<RecordId, bool> = HashMap::new();
        for r in &candidates {
            let (mut at, mut path) = (r.id, Vec::new());
            let mut on_path = HashSet::new();
            let result = loop {
                if let Some(known) = leads.get(&at) {
                    break *known;
                }
                if !on_path.insert(at) {
                    break false;
                }
                path.push(at);
                match parents.get(&at).copied().flatten() {
                    None => break true,
                    Some(p) if parents.contains_key(&p) => at = p,
                    Some(p) => break feed && held(p) == Some(vault),
                }
            };
            for id in path {
                leads.insert(id, result);
            }
        }
        let records: Vec<RecordInfo> = candidates
            .into_iter()
            .filter(|r| {
                let ours = leads.get(&r.id).copied().unwrap_or(false);
                if !ours {
                    stray("record", r.id.to_string());
                }
                ours
            })
            .collect();
        let listed: HashSet<RecordId> = records.iter().map(|r| r.id).collect();
        let files: Vec<FileInfo> = files
            .into_iter()
            .filter(|f| {
                let ours = f.vault == vault
                    && (listed.contains(&f.record) || (feed && held(f.record) == Some(vault)));
                if !ours {
                    stray("file", f.id.to_string());
                }
                ours
            })
            .collect();
        let records = records
            .into_iter()
            .map(|r| {
                let ctx = NameContext::RecordTitle { vault, record: r.id };
                let name = self.open_sealed(vault, ctx, &r.title, &format!("the title of record {}", r.id));
                (r, name)
            })
            .collect();
        let files = files
            .into_iter()
            .map(|f| {
                let ctx = NameContext::FileName { vault, record: f.record, file: f.id };
                let name = self.open_sealed(vault, ctx, &f.name, &format!("the name of file {}", f.id));
                let meta = self.open_meta(&f);
                (f, meta, name)
            })
            .collect();
        (records, files)
    }

    /// Tells the account which keys the listing's titles, names and
    /// manifests are under, and whether the keys held opened them
    /// (crate::remote::keys_in_use): a vault seen using a key this client
    /// lacks gets nothing new sealed in it.
    fn note_keys_in_use(&self, vault: VaultId, records: &[ListedRecord], files: &[ListedFile]) {
        let names = records
            .iter()
            .map(|(r, name)| (&r.title, name.is_some()))
            .chain(files.iter().map(|(f, _, name)| (&f.name, name.is_some())))
            .filter_map(|(sealed, opened)| Some((crypto::names::name_key_id(&sealed.0).ok()?, opened)));
        let manifests = files.iter().filter_map(|(f, meta, _)| {
            let id = crypto::manifest::manifest_key_id(&f.meta.0).ok()?;
            Some((id, matches!(meta, FileMeta::Sealed(_))))
        });
        if self.account.note_keys_in_use(vault, names.chain(manifests).collect::<Vec<_>>()) {
            let e = AccountError::KeyBehind { vault, missing: self.account.keys_missing(vault).unwrap_or(0) };
            tracing::error!(%vault, "{e}");
            self.note_refusal(format!(
                "vault {vault}: sealed under a key this client was not given; nothing new is sealed in it"
            ));
        }
    }

    /// Whether directory `ino`'s listing is fresh, so looking in it needs no
    /// server.
    fn listing_fresh(&self, ino: Ino) -> bool {
        let live = self.feed.live();
        let tree = self.tree.lock();
        // An unreadable directory is not fresh: the async path reports it.
        match tree.node(ino).ok() {
            Some(Node::Root) => tree.root_fresh(live),
            Some(Node::Vault { vault } | Node::Record { info: RecordInfo { vault, .. }, .. }) => {
                tree.vault_fresh(*vault, live)
            }
            _ => false,
        }
    }

    /// `answer`, computed on the tree as it is if `dir`'s listing is fresh;
    /// `None` if the listing must be fetched first.
    pub(super) fn answer_now<T>(&self, dir: Ino, answer: impl FnOnce() -> Result<T>) -> Option<Result<T>> {
        self.listing_fresh(dir).then(answer)
    }

    /// `answer`, computed once `dir`'s listing is loaded.
    pub(super) async fn answer<T>(&self, dir: Ino, answer: impl FnOnce() -> Result<T>) -> Result<T> {
        self.load_dir(dir).await?;
        answer()
    }

    // ---- lookups and listings -------------------------------------------------

    /// Looks `name` up in directory `parent`.
    pub async fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_lookup_name(name)?;
        self.answer(parent, || self.lookup_loaded(parent, name)).await
    }

    /// [`VaultFs::lookup`] if the listing is fresh (or the name too long).
    pub fn lookup_now(&self, parent: Ino, name: &OsStr) -> Option<Result<Attr>> {
        if let Err(e) = check_lookup_name(name) {
            return Some(Err(e));
        }
        self.answer_now(parent, || self.lookup_loaded(parent, name))
    }

    fn lookup_loaded(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let tree = self.tree.lock();
        let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(&tree, ino, tree.node(ino)?))
    }

    /// The entries of directory `ino` (without `.` and `..`).
    pub async fn readdir(&self, ino: Ino) -> Result<Vec<Entry>> {
        self.answer(ino, || self.names_of(ino)).await
    }

    /// [`VaultFs::readdir`] if the listing is fresh.
    pub fn readdir_now(&self, ino: Ino) -> Option<Result<Vec<Entry>>> {
        self.answer_now(ino, || self.names_of(ino))
    }

    fn names_of(&self, ino: Ino) -> Result<Vec<Entry>> {
        let tree = self.tree.lock();
        let entries =
            tree.entries(ino)?.map(|(name, child, node)| (child, node.kind(), name.clone())).collect();
        Ok(entries)
    }

    /// The parent of `ino` (for `..`).
    pub fn parent(&self, ino: Ino) -> Ino {
        self.tree.lock().parent_of(ino).unwrap_or(ROOT)
    }

    // ---- files by id --------------------------------------------------------------

    /// Creates an empty file `name` with permission bits `perm` in record
    /// `parent` on the server and in the tree.
    pub(super) async fn new_file(&self, parent: Ino, name: &OsStr, perm: u16) -> Result<(Ino, FileInfo)> {
        self.new_entry(parent, name, &FileManifest::new_empty(1, perm)).await
    }

    /// Creates file `name` in record `parent` with `manifest` (an empty file's,
    /// or a symbolic link's), on the server and in the tree.
    pub(super) async fn new_entry(
        &self,
        parent: Ino,
        name: &OsStr,
        manifest: &FileManifest,
    ) -> Result<(Ino, FileInfo)> {
        let (vault, record) = self.file_parent(parent)?;
        // The record first, if it is not on the server yet (super::dirs).
        self.record_on_server(parent).await?;
        let new = self.new_file_request(parent, name, manifest)?;
        let id = new.id;
        let info = self.remote().create_file(record, new).await?;
        let info = check_file_answer(id, vault, info)?;
        if info.record != record {
            return Err(FsError::Io("the server created the file in another record".into()));
        }
        let node = self.file_node(info.clone(), parent);
        self.note_generation(id, manifest.generation);
        let ino = self.tree.lock().add(parent, name, Key::File(id), node);
        self.touch_dir(parent);
        Ok((ino, info))
    }

    /// Changes the metadata of file `ino` (its manifest is opened again if
    /// that changed).
    pub(super) fn set_file_info(&self, ino: Ino, f: impl FnOnce(&mut FileInfo)) {
        self.tree.lock().update_file(ino, f, |info| self.open_meta(info));
    }

    /// Takes the server's word on file `ino` (read just now). A version the
    /// tree did not hold means the kernel's attributes and pages of the file
    /// are of another content, and it is told to drop them: a reader must not
    /// get the new content cut at the old length until its attributes expire.
    pub(super) fn take_server_info(&self, ino: Ino, fresh: FileInfo) {
        let mut held = None;
        let version = fresh.version;
        self.set_file_info(ino, |i| {
            held = Some(i.version);
            *i = fresh;
        });
        if held.is_some_and(|v| v != version) {
            self.tell_kernel(vec![super::Invalidation::Inode(ino)]);
        }
    }

    /// A file's metadata and what its manifest says, by id.
    pub(super) fn file_state_by_id(&self, id: FileId) -> Result<(FileInfo, FileMeta)> {
        let tree = self.tree.lock();
        let ino = tree.file_ino(id).ok_or(FsError::NotFound)?;
        tree.file(ino).map(|(info, meta)| (info.clone(), meta.clone()))
    }

    /// The permission bits a new manifest of file `id` keeps: those chosen
    /// while it streams, else its manifest's. Refused (EIO) for a manifest
    /// that failed its check or is older than one this machine saw: sealing
    /// its bits at a new generation would undo a chmod the server rolled back.
    pub(super) fn stated_perm(&self, id: FileId) -> Result<u16> {
        if let Some(perm) = self.modes.chosen_perm(id) {
            return Ok(perm);
        }
        let meta = {
            let tree = self.tree.lock();
            tree.file_ino(id).and_then(|ino| tree.file(ino).ok().map(|(_, meta)| meta.clone()))
        };
        match meta {
            Some(FileMeta::Sealed(m)) => {
                self.refuse_stale(id, m.generation)?;
                Ok(m.perm)
            }
            Some(FileMeta::Invalid) => Err(FsError::Integrity {
                what: format!("the manifest of file {id}"),
                source: crypto::CryptoError::Integrity(crypto::IntegrityFailure::Authentication),
            }),
            Some(FileMeta::Legacy) | None => Ok(crypto::manifest::LEGACY_PERM),
        }
    }

    pub(super) fn file_info_by_id(&self, id: FileId) -> Result<FileInfo> {
        self.file_state_by_id(id).map(|(info, _)| info)
    }

    /// The inode of file `id`.
    pub(super) fn file_ino(&self, id: FileId) -> Result<Ino> {
        self.tree.lock().file_ino(id).ok_or(FsError::NotFound)
    }

    // ---- names, titles and manifests ----------------------------------------------

    pub(super) fn key_for(&self, vault: VaultId, sealed: &[u8]) -> Option<crypto::VaultKey> {
        let id = crypto::names::name_key_id(sealed).ok()?;
        self.account.vault_key(vault, id)
    }

    /// Opens a sealed name or title; on failure logs it, naming the object
    /// (`what`), and returns `None`.
    pub(super) fn open_sealed(
        &self,
        vault: VaultId,
        ctx: NameContext,
        sealed: &Sealed,
        what: &str,
    ) -> Option<OsString> {
        let Some(key) = self.key_for(vault, &sealed.0) else {
            tracing::error!(%vault, "no key in the wallet for {what}; it is listed as unreadable");
            return None;
        };
        match open_name(&key, &ctx, &sealed.0) {
            Ok(plain) => Some(display_name(&plain)),
            Err(e) => {
                tracing::error!(%vault, error = %e, "{what} failed its integrity check; it is listed as unreadable and gives EIO");
                None
            }
        }
    }

    /// The key new names, manifests and files of `vault` are sealed with
    /// (EACCES if this user holds none, or the vault is seen using a key this
    /// client lacks: see crate::remote::keys_in_use).
    pub(super) fn sealing_key(&self, vault: VaultId) -> Result<crypto::VaultKey> {
        self.account.sealing_key(vault).map_err(|e| match e {
            e @ AccountError::KeyBehind { .. } => FsError::KeyBehind(e.to_string()),
            _ => FsError::Access("no key for this vault".into()),
        })
    }

    pub(super) fn seal(&self, vault: VaultId, ctx: NameContext, name: &OsStr) -> Result<Sealed> {
        let key = self.sealing_key(vault)?;
        seal_name(&key, &ctx, name.as_bytes(), &mut OsRandom)
            .map(Sealed)
            .map_err(|e| FsError::Io(e.to_string()))
    }

    /// Opens the manifest a file's metadata carries; a failure is logged
    /// with the file's id and makes every use of the file EIO.
    pub(super) fn open_meta(&self, info: &FileInfo) -> FileMeta {
        if info.meta.0.is_empty() {
            if self.account.manifests_required(info.vault) {
                // Every file of this vault has one: this one's was removed.
                tracing::error!(file = %info.id, "the file has no manifest in a vault whose files all have one (removed by the server?); every use of the file gives EIO");
                self.note_refusal(format!("file {}: its manifest is missing", info.id));
                return FileMeta::Invalid;
            }
            return FileMeta::Legacy;
        }
        let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
        let key = crypto::manifest::manifest_key_id(&info.meta.0)
            .ok()
            .and_then(|id| self.account.vault_key(info.vault, id));
        match key.map(|key| crypto::open_manifest(&key, &ctx, &info.meta.0)) {
            Some(Ok(m)) => FileMeta::Sealed(Arc::new(m)),
            Some(Err(e)) => {
                tracing::error!(file = %info.id, error = %e, "the file's manifest failed its check (altered, or another file's); every use of the file gives EIO");
                self.note_refusal(format!("file {}: its manifest failed its check", info.id));
                FileMeta::Invalid
            }
            None => {
                tracing::error!(file = %info.id, "the file's manifest names a key this wallet does not have; every use of the file gives EIO");
                self.note_refusal(format!("file {}: its manifest names a key this wallet lacks", info.id));
                FileMeta::Invalid
            }
        }
    }

    /// The server's current metadata of the file `info` describes, refused if
    /// it answers for another file or vault ([`check_file_answer`]).
    /// A file only this mount knows (see `unsent`) is as the tree holds it.
    pub(super) async fn fetch_file(&self, info: &FileInfo) -> Result<FileInfo> {
        {
            let tree = self.tree.lock();
            if let Some(ino) = tree.file_ino(info.id).filter(|&ino| tree.is_unsent(ino)) {
                return tree.file(ino).map(|(i, _)| i.clone());
            }
        }
        let got = self.remote().file(info.id).await?;
        check_file_answer(info.id, info.vault, got)
    }

    /// The tree node of a file.
    pub(super) fn file_node(&self, info: FileInfo, parent: Ino) -> Node {
        let meta = self.open_meta(&info);
        Node::File { info, parent, meta }
    }

    /// Makes sure the children of directory `ino` are known.
    pub(super) async fn load_dir(&self, ino: Ino) -> Result<()> {
        let node = self.tree.lock().node(ino)?.clone();
        match node {
            Node::Root => self.load_root(false).await,
            Node::Vault { vault } | Node::Record { info: RecordInfo { vault, .. }, .. } => {
                self.load_vault(vault, false).await
            }
            Node::File { .. } => Err(FsError::NotDir),
        }
    }

    pub(super) fn file_parent(&self, parent: Ino) -> Result<(VaultId, RecordId)> {
        match self.tree.lock().node(parent)? {
            Node::Root | Node::Vault { .. } => {
                Err(FsError::NotPermitted("files live in records: create a directory first".into()))
            }
            Node::Record { info, .. } => Ok((info.vault, info.id)),
            Node::File { .. } => Err(FsError::NotDir),
        }
    }

    pub(super) fn file_info(&self, ino: Ino) -> Result<FileInfo> {
        match self.tree.lock().node(ino)? {
            Node::File { info, .. } => Ok(info.clone()),
            _ => Err(FsError::IsDir),
        }
    }

    /// Refuses a generation of a file older than the newest this client has
    /// seen of it: a replay.
    pub(super) fn check_fresh(
        &self,
        id: FileId,
        generation: u64,
    ) -> std::result::Result<(), crypto::CryptoError> {
        self.freshness.check(id, generation)
    }

    /// [`VaultFs::check_fresh`] as the error every use of such a file gets
    /// (EIO), logged and listed in `vaultfs status`.
    pub(super) fn refuse_stale(&self, id: FileId, generation: u64) -> Result<()> {
        self.check_fresh(id, generation).map_err(|source| {
            tracing::error!(file = %id, error = %source, "refusing an older version of the file than this machine saw");
            self.note_refusal(format!("file {id}: {source}"));
            FsError::Integrity { what: format!("file {id}"), source }
        })
    }

    /// Notes that generation `generation` of a file exists.
    pub(super) fn note_generation(&self, id: FileId, generation: u64) {
        self.freshness.note(id, generation);
    }
}

/// The objects of `changes` that are there, as they are now; the keys of
/// those deleted go to `deleted`.
fn present<I, T>(changes: HashMap<I, Option<T>>, key: fn(I) -> Key, deleted: &mut Vec<Key>) -> Vec<T> {
    let mut out = Vec::with_capacity(changes.len());
    for (id, object) in changes {
        match object {
            Some(o) => out.push(o),
            None => deleted.push(key(id)),
        }
    }
    out
}

/// A name too long for any entry needs no listing to be refused.
fn check_lookup_name(name: &OsStr) -> Result<()> {
    if name.len() > super::NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}
