//! The filesystem core: vaults, records and files as a directory tree, with
//! decryption on open and encryption and upload on flush.
//!
//! Data flow. The namespace ([`Tree`]) is built from the server's metadata: one
//! directory per vault the user can open, one per record (records nest), one file
//! per file linked to a record, each name opened with the vault key. A vault's
//! records and files are fetched together and reused for [`LISTING_TTL`]; our own
//! changes update the tree directly. Opening a file downloads its ciphertext,
//! checks and decrypts it into the memory-only [`PlainCache`]; reads and writes
//! work on that plaintext; flush (close) and fsync encrypt it with a fresh content
//! key and upload it, and return only once the server has stored it, so failures
//! reach the application as an errno. A failed upload leaves the data dirty in
//! memory and it is retried; a version conflict keeps both copies.
//!
//! Locks: `tree` (a std mutex) guards the namespace and is never held across an
//! await; each file's plaintext has its own async mutex, held while it is loaded,
//! changed or uploaded, which orders those steps per file.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::{FsError, Result};
use super::freshness::Freshness;
use crate::cache::{PlainCache, PlainData, PlainHandle, SecretBuf};
use crate::crypto::{
    self, encrypt_file, open_name, seal_name, FileContext, FileManifest, Layout, NameContext, OsRandom,
};
use crate::ids::{FileId, RecordId, VaultId};
use crate::policy::{Policy, VaultPolicy};
use crate::protocol::{
    FileInfo, FileUpdate, Limits, NewFile, NewRecord, ParentChange, RecordInfo, RecordUpdate, Sealed,
};
use crate::remote::account::Unlocked;
use crate::remote::{Remote, RemoteError, UploadBody};

mod fill;
mod passread;
mod save;

use passread::PassRead;
pub use passread::READ_AHEAD;

/// Inode number.
pub type Ino = u64;
/// The mount root.
pub const ROOT: Ino = 1;
/// How long a vault's listing is reused before it is fetched again. Short, so
/// other clients' changes show up quickly; our own changes never wait for it.
pub const LISTING_TTL: Duration = Duration::from_secs(2);
/// How long after the server said which version of a file is current an open
/// trusts that answer instead of asking again. The question is an HTTPS round
/// trip (about 1 ms on loopback, 0.15 ms for a whole open on gocryptfs), paid by
/// every open of a cached file; other clients' changes are seen on open at most
/// this late (lookups and listings: [`LISTING_TTL`]).
pub const CONFIRMED_FOR: Duration = Duration::from_secs(1);
/// Longest name, as on most Linux filesystems.
pub const NAME_MAX: usize = 255;

/// Writes queued towards a streaming upload before a writer waits (each at most
/// one FUSE write of 1 MiB): the memory bound of a pass-through upload.
const STREAM_QUEUE: usize = 8;

/// The largest server version a new generation is derived from: far above
/// any real count of changes, far below where the counter would run out.
const MAX_SERVER_VERSION: u64 = 1 << 48;

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

/// One write's bytes: borrowed from the caller, or owned (the FUSE adapter's
/// copy of the request), which a pass-through upload takes without copying.
enum WriteData<'a> {
    Borrowed(&'a [u8]),
    Owned(SecretBuf),
}

impl WriteData<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Borrowed(d) => d,
            WriteData::Owned(d) => d,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn into_bytes(self) -> bytes::Bytes {
        match self {
            WriteData::Borrowed(d) => bytes::Bytes::copy_from_slice(d),
            WriteData::Owned(d) => d.into_bytes(),
        }
    }
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory: the root, a vault or a record.
    Dir,
    /// A file linked to a record.
    File,
}

/// Attributes of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Directory or file.
    pub kind: Kind,
    /// Size in bytes (plaintext for files).
    pub size: u64,
    /// Modification time.
    pub mtime: SystemTime,
    /// Access time.
    pub atime: SystemTime,
    /// Permission bits.
    pub perm: u16,
    /// Hard links: 0 for a file unlinked while still open.
    pub nlink: u32,
}

/// A directory entry: inode, kind and name.
pub type Entry = (Ino, Kind, OsString);
/// A directory entry with its attributes, `None` if its name failed its check.
pub type EntryPlus = (Ino, Kind, OsString, Option<Attr>);

/// Options of a mount.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Bytes of plaintext the cache tries to stay under.
    pub cache_budget: usize,
    /// The admin's and the user's mount policies.
    pub policy: Policy,
    /// How long an open trusts the server's last word on a file's version
    /// ([`CONFIRMED_FOR`]; zero asks on every open).
    pub confirmed_for: Duration,
    /// What this machine remembers of the server across mounts (in memory
    /// only if `None`).
    pub freshness: Option<Arc<Freshness>>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            cache_budget: crate::policy::DEFAULT_CACHE_BUDGET as usize,
            policy: Policy::default(),
            confirmed_for: CONFIRMED_FOR,
            freshness: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Vault(VaultId),
    Record(RecordId),
    File(FileId),
}

#[derive(Debug, Clone)]
enum Node {
    Root,
    Vault { vault: VaultId },
    Record { info: RecordInfo, parent: Ino },
    File { info: FileInfo, parent: Ino, meta: FileMeta },
}

/// What the client knows of a file's content: its manifest (docs/FORMAT.md
/// "File manifests"), opened from `FileInfo::meta` whenever that changes.
/// Mode, length and generation come from here, never from the server's
/// `e2e` flag or size.
#[derive(Debug, Clone)]
enum FileMeta {
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
    fn manifest(&self) -> Option<&Arc<FileManifest>> {
        match self {
            FileMeta::Sealed(m) => Some(m),
            FileMeta::Legacy | FileMeta::Invalid => None,
        }
    }
}

impl Node {
    fn vault(&self) -> Option<VaultId> {
        match self {
            Node::Root => None,
            Node::Vault { vault } => Some(*vault),
            Node::Record { info, .. } => Some(info.vault),
            Node::File { info, .. } => Some(info.vault),
        }
    }
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<Ino, Node>,
    keys: HashMap<Key, Ino>,
    children: HashMap<Ino, BTreeMap<OsString, Ino>>,
    names: HashMap<Ino, OsString>,
    /// Entries whose sealed name or title failed its check: listed (so the
    /// damage is visible) under a stand-in name, but every use of them is EIO.
    unreadable: HashMap<Ino, String>,
    next: Ino,
    root_loaded: Option<Instant>,
    vault_loaded: HashMap<VaultId, Instant>,
}

impl Tree {
    fn new() -> Self {
        let mut t = Tree { next: ROOT + 1, ..Default::default() };
        t.nodes.insert(ROOT, Node::Root);
        t.children.insert(ROOT, BTreeMap::new());
        t
    }

    fn ino_for(&mut self, key: Key) -> Ino {
        if let Some(i) = self.keys.get(&key) {
            return *i;
        }
        let ino = self.next;
        self.next += 1;
        self.keys.insert(key, ino);
        ino
    }

    fn node(&self, ino: Ino) -> Result<&Node> {
        if let Some(what) = self.unreadable.get(&ino) {
            return Err(FsError::Integrity {
                what: what.clone(),
                source: crypto::CryptoError::Integrity(crypto::IntegrityFailure::Authentication),
            });
        }
        match self.nodes.get(&ino) {
            Some(Node::File { info, meta: FileMeta::Invalid, .. }) => Err(FsError::Integrity {
                what: format!("the manifest of file {}", info.id),
                source: crypto::CryptoError::Integrity(crypto::IntegrityFailure::Authentication),
            }),
            Some(node) => Ok(node),
            None => Err(FsError::NotFound),
        }
    }

    fn child(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        self.children.get(&parent)?.get(name).copied()
    }

    /// Places `ino` under `parent` as `name`, removing it from its old place.
    fn link(&mut self, parent: Ino, name: OsString, ino: Ino, node: Node) {
        self.unlink_ino(ino);
        if matches!(node, Node::Vault { .. } | Node::Record { .. }) {
            self.children.entry(ino).or_default();
        }
        self.children.entry(parent).or_default().insert(name.clone(), ino);
        self.names.insert(ino, name);
        self.nodes.insert(ino, node);
    }

    fn parent_of(&self, ino: Ino) -> Option<Ino> {
        match self.nodes.get(&ino)? {
            Node::Root => None,
            Node::Vault { .. } => Some(ROOT),
            Node::Record { parent, .. } | Node::File { parent, .. } => Some(*parent),
        }
    }

    fn unlink_ino(&mut self, ino: Ino) {
        if let (Some(parent), Some(name)) = (self.parent_of(ino), self.names.get(&ino).cloned()) {
            if let Some(kids) = self.children.get_mut(&parent) {
                if kids.get(&name) == Some(&ino) {
                    kids.remove(&name);
                }
            }
        }
    }
}

/// A pass-through upload in progress: a file above the end-to-end limit written
/// sequentially is streamed to the server as plain HTTPS while it is written.
struct Streaming {
    /// Feeds the upload; `None` once the stream is being finished.
    tx: Option<tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>>,
    /// The upload (staged, then committed with its manifest: the result, the
    /// sealed manifest and its generation); taken by whoever finishes the
    /// stream. The entry itself stays until the upload has committed, so size
    /// and flags stay right meanwhile.
    task: Option<tokio::task::JoinHandle<Result<(crate::protocol::UploadResult, Sealed, u64)>>>,
    sent: u64,
    ino: Ino,
}

/// How far an upload got.
#[derive(Debug)]
pub struct UploadProgress {
    /// Bytes handed to the connection so far.
    pub sent: AtomicU64,
    /// Total bytes, if known (a pass-through stream's end is not).
    pub total: Option<u64>,
}

/// Pieces an upload body is sent in, so progress can be counted.
const UPLOAD_PIECE: usize = 1 << 20;

/// How an upload from the cache ended.
enum Saved {
    /// Stored (in the file, or in the conflict copy the result names), with
    /// the sealed manifest that went with it.
    Stored(crate::protocol::UploadResult, Option<Sealed>),
    /// The file changed on the server meanwhile: nothing stored.
    Stale(Option<u64>),
    /// Not stored.
    Failed(FsError),
}

/// What a pass-through upload commits besides its tags.
struct PlainUpload {
    generation: u64,
    length: u64,
    mtime_ms: i64,
    /// Where the content goes if the file moved on (content sent once).
    copy: Option<NewFile>,
}

/// One line of `vaultfs status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadStatus {
    /// The file's name.
    pub name: String,
    /// Bytes sent.
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

/// The filesystem.
pub struct VaultFs<R> {
    account: Unlocked<R>,
    limits: Limits,
    tree: Mutex<Tree>,
    cache: PlainCache,
    handles: Mutex<HashMap<u64, FileId>>,
    next_handle: AtomicU64,
    /// Uploads in progress, with how far they got (for status and xattrs).
    uploading: Mutex<HashMap<FileId, Arc<UploadProgress>>>,
    /// Highest generation seen per file (and wallet revision), remembered
    /// across mounts where a state file is kept: an older one is a replay.
    freshness: Arc<Freshness>,
    /// The latest checks that failed (tampering, replays), for `vaultfs status`.
    refusals: Mutex<std::collections::VecDeque<String>>,
    /// Vaults whose files without manifests were logged (once per mount).
    legacy_warned: Mutex<std::collections::HashSet<VaultId>>,
    /// Pass-through uploads being streamed, by file.
    streams: Mutex<HashMap<FileId, Streaming>>,
    /// Next offset of files written strictly sequentially from empty (only those
    /// can be streamed once they pass the end-to-end limit).
    sequential: Mutex<HashMap<FileId, u64>>,
    /// Sizes of files with unsaved changes (dirty in the cache), kept apart from
    /// the data's lock so attributes never wait for, or miss, a write in progress.
    local_sizes: Mutex<HashMap<FileId, (u64, SystemTime)>>,
    /// Modification times set (utimensat, as `cp -a` and `touch -d` do) on files
    /// with unsaved changes: the upload stores this time instead of "now". A
    /// later write drops it, since the file then changed after that time.
    chosen_mtimes: Mutex<HashMap<FileId, SystemTime>>,
    /// Read windows of handles reading pass-through files.
    pass_reads: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<PassRead>>>>,
    /// The version of each pass-through file last opened for reading here,
    /// and when the server last said it was current: while the server still
    /// has that version, the kernel may keep the pages it cached from it.
    pass_versions: Mutex<HashMap<FileId, (u64, Instant)>>,
    /// Files unlinked while open: gone from their directory and the server,
    /// still readable and writable through their open handles (POSIX) until
    /// the last one is released; nothing of them is uploaded. Locked after
    /// `tree` when both are needed.
    orphans: Mutex<std::collections::HashSet<Ino>>,
    /// When this mount last changed each directory's entries. Records carry no
    /// times on the server, so directories show the mount time until then.
    dir_times: Mutex<HashMap<Ino, SystemTime>>,
    /// Access times set by the application (memory only; see `attr_of`).
    atimes: Mutex<HashMap<Ino, SystemTime>>,
    /// Downloads being decrypted into the cache, by file.
    fills: Mutex<HashMap<FileId, Arc<fill::Fill>>>,
    /// The mount policies, and what they resolve to for each vault (by the
    /// vault's name, so filled in as vaults are listed).
    policy: Policy,
    /// See [`FsOptions::confirmed_for`].
    confirmed_for: Duration,
    vault_rules: Mutex<HashMap<VaultId, Arc<VaultPolicy>>>,
    /// Called with an inode whose content we replaced behind the kernel's back
    /// (a reduced image), so its cached pages and size are dropped.
    invalidate: std::sync::OnceLock<Box<dyn Fn(Ino) + Send + Sync>>,
    mounted_at: SystemTime,
}

fn now_ms() -> i64 {
    ms_of(SystemTime::now())
}

/// Milliseconds since the epoch, as the server stores times (0 before it).
fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn time_of(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH
    }
}

fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(FsError::Invalid(format!("invalid name {}", super::lognames::shown(name))));
    }
    if b.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

/// A name as it appears in a directory: a name from the server that could not be
/// a file name (a slash, say, written by another client) is shown escaped.
fn display_name(raw: &[u8]) -> OsString {
    if !raw.is_empty() && raw != b"." && raw != b".." && !raw.contains(&b'/') && !raw.contains(&0) {
        return OsString::from_vec(raw.to_vec());
    }
    let escaped: Vec<u8> = raw.iter().map(|&c| if c == b'/' || c == 0 { b'_' } else { c }).collect();
    OsString::from_vec([b"_".as_slice(), &escaped].concat())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R: Remote> VaultFs<R> {
    /// A filesystem over an unlocked account.
    pub async fn new(account: Unlocked<R>, options: FsOptions) -> Result<Self> {
        let limits = account.remote.me().await?.limits;
        Ok(VaultFs {
            account,
            limits,
            tree: Mutex::new(Tree::new()),
            cache: PlainCache::new(options.cache_budget),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            uploading: Mutex::new(HashMap::new()),
            freshness: options.freshness.unwrap_or_else(|| Arc::new(Freshness::memory())),
            refusals: Mutex::new(std::collections::VecDeque::new()),
            legacy_warned: Mutex::new(std::collections::HashSet::new()),
            streams: Mutex::new(HashMap::new()),
            sequential: Mutex::new(HashMap::new()),
            local_sizes: Mutex::new(HashMap::new()),
            chosen_mtimes: Mutex::new(HashMap::new()),
            pass_reads: Mutex::new(HashMap::new()),
            pass_versions: Mutex::new(HashMap::new()),
            orphans: Mutex::new(std::collections::HashSet::new()),
            dir_times: Mutex::new(HashMap::new()),
            atimes: Mutex::new(HashMap::new()),
            fills: Mutex::new(HashMap::new()),
            policy: options.policy,
            confirmed_for: options.confirmed_for,
            vault_rules: Mutex::new(HashMap::new()),
            invalidate: std::sync::OnceLock::new(),
            mounted_at: SystemTime::now(),
        })
    }

    fn remote(&self) -> &R {
        &self.account.remote
    }

    /// What this mount remembers of the server (saved by the caller at the end).
    pub fn freshness(&self) -> &Arc<Freshness> {
        &self.freshness
    }

    /// The user's limits, as the server set them.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Sets what is called when we replaced a file's content behind the
    /// kernel's back (the FUSE adapter drops the kernel's pages and attributes).
    pub fn set_invalidator(&self, f: Box<dyn Fn(Ino) + Send + Sync>) {
        let _ = self.invalidate.set(f);
    }

    /// The resolved policy of `vault`.
    pub fn vault_policy(&self, vault: VaultId) -> Arc<VaultPolicy> {
        if let Some(rules) = lock(&self.vault_rules).get(&vault) {
            return Arc::clone(rules);
        }
        // Not listed under a name (yet, or its name failed its check): the
        // policy's defaults, which still include the admin's.
        Arc::new(self.policy.vault("", &self.limits))
    }

    /// The policy of the vault `ino` is in (the defaults at the root).
    fn policy_at(&self, ino: Ino) -> Result<Arc<VaultPolicy>> {
        let vault = lock(&self.tree).node(ino)?.vault();
        Ok(match vault {
            Some(v) => self.vault_policy(v),
            None => Arc::new(self.policy.vault("", &self.limits)),
        })
    }

    /// Refuses changes in a read-only vault (EROFS); else its policy.
    fn writable(&self, ino: Ino) -> Result<Arc<VaultPolicy>> {
        let rules = self.policy_at(ino)?;
        if rules.read_only {
            return Err(FsError::ReadOnly);
        }
        Ok(rules)
    }

    /// Refuses deletes where the policy does (EROFS or EPERM).
    fn deletable(&self, ino: Ino) -> Result<()> {
        if !self.writable(ino)?.allow_delete {
            return Err(FsError::NotPermitted(
                "the mount policy does not allow deletes in this vault".into(),
            ));
        }
        Ok(())
    }

    /// The plaintext cache (for status).
    pub fn cache(&self) -> &PlainCache {
        &self.cache
    }

    fn key_for(&self, vault: VaultId, sealed: &[u8]) -> Option<&crypto::VaultKey> {
        let id = crypto::names::name_key_id(sealed).ok()?;
        self.account.wallet().key(vault, id)
    }

    /// Opens a sealed name or title; on failure logs it, naming the object
    /// (`what`), and returns `None`.
    fn open_sealed(&self, vault: VaultId, ctx: NameContext, sealed: &Sealed, what: &str) -> Option<OsString> {
        let Some(key) = self.key_for(vault, &sealed.0) else {
            tracing::error!(%vault, "no key in the wallet for {what}; it is listed as unreadable");
            return None;
        };
        match open_name(key, &ctx, &sealed.0) {
            Ok(plain) => Some(display_name(&plain)),
            Err(e) => {
                tracing::error!(%vault, error = %e, "{what} failed its integrity check; it is listed as unreadable and gives EIO");
                None
            }
        }
    }

    fn seal(&self, vault: VaultId, ctx: NameContext, name: &OsStr) -> Result<Sealed> {
        let key = self
            .account
            .wallet()
            .active_key(vault)
            .ok_or_else(|| FsError::Access("no key for this vault".into()))?;
        seal_name(key, &ctx, name.as_bytes(), &mut OsRandom)
            .map(Sealed)
            .map_err(|e| FsError::Io(e.to_string()))
    }

    /// Seals a file's manifest with its vault's active key.
    fn seal_manifest(&self, ctx: &FileContext, manifest: &FileManifest) -> Result<Sealed> {
        let key = self
            .account
            .wallet()
            .active_key(ctx.vault)
            .ok_or_else(|| FsError::Access("no key for this vault".into()))?;
        crypto::seal_manifest(key, ctx, manifest, &mut OsRandom)
            .map(Sealed)
            .map_err(|e| FsError::Io(e.to_string()))
    }

    /// Opens the manifest a file's metadata carries; a failure is logged
    /// with the file's id and makes every use of the file EIO.
    fn open_meta(&self, info: &FileInfo) -> FileMeta {
        if info.meta.0.is_empty() {
            if self.account.wallet().manifests_required(info.vault) {
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
            .and_then(|id| self.account.wallet().key(info.vault, id));
        match key.map(|key| crypto::open_manifest(key, &ctx, &info.meta.0)) {
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
    async fn fetch_file(&self, info: &FileInfo) -> Result<FileInfo> {
        let got = self.remote().file(info.id).await?;
        check_file_answer(info.id, info.vault, got)
    }

    /// The tree node of a file.
    fn file_node(&self, info: FileInfo, parent: Ino) -> Node {
        let meta = self.open_meta(&info);
        Node::File { info, parent, meta }
    }

    // ---- loading the namespace ---------------------------------------------

    async fn load_root(&self, force: bool) -> Result<()> {
        let fresh = lock(&self.tree).root_loaded.is_some_and(|t| t.elapsed() < LISTING_TTL);
        if fresh && !force {
            return Ok(());
        }
        let vaults = match self.account.vaults().await {
            Ok(v) => v,
            Err(e) => {
                let mut tree = lock(&self.tree);
                if tree.root_loaded.is_some() && !force {
                    // Keep answering from the last listing while the server is
                    // unreachable; try again after the listing's reuse time.
                    tracing::warn!(error = %e, "cannot refresh the vault list; showing the last one");
                    tree.root_loaded = Some(Instant::now());
                    return Ok(());
                }
                return Err(FsError::Io(e.to_string()));
            }
        };
        let mut tree = lock(&self.tree);
        let mut kids = BTreeMap::new();
        for v in vaults {
            let ino = tree.ino_for(Key::Vault(v.info.id));
            let readable = v.name.is_some();
            if !readable {
                tracing::error!(vault = %v.info.id, "vault name cannot be opened; it is listed as unreadable and gives EIO");
            }
            let what = format!("the name of vault {}", v.info.id);
            mark_unreadable(&mut tree, ino, v.name.is_none().then_some(what));
            let name = v.name.unwrap_or_else(|| unreadable_name("vault", &v.info.id.to_string()));
            tree.nodes.insert(ino, Node::Vault { vault: v.info.id });
            let mut rules = self.policy.vault(if readable { &name } else { "" }, &self.limits);
            // The server's word here can only make the client refuse more.
            rules.e2e_required = v.info.e2e_required;
            lock(&self.vault_rules).insert(v.info.id, Arc::new(rules));
            tree.children.entry(ino).or_default();
            tree.names.insert(ino, OsString::from(&name));
            kids.insert(OsString::from(name), ino);
        }
        tree.children.insert(ROOT, kids);
        tree.root_loaded = Some(Instant::now());
        Ok(())
    }

    async fn load_vault(&self, vault: VaultId, force: bool) -> Result<()> {
        let fresh = lock(&self.tree).vault_loaded.get(&vault).is_some_and(|t| t.elapsed() < LISTING_TTL);
        if fresh && !force {
            return Ok(());
        }
        let listing = tokio::try_join!(self.remote().records(vault), self.remote().files(vault));
        let (records, files) = match listing {
            Ok(l) => l,
            Err(e @ RemoteError::Unavailable(_)) if !force => {
                let mut tree = lock(&self.tree);
                if !tree.vault_loaded.contains_key(&vault) {
                    return Err(e.into());
                }
                // As for the vault list: the last listing, until the server answers.
                tracing::warn!(%vault, error = %e, "cannot refresh the vault's listing; showing the last one");
                tree.vault_loaded.insert(vault, Instant::now());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // Only what is of this vault: a record or file the server lists here
        // but says belongs elsewhere would be read under another vault's key
        // check and policy (or under no manifest rule at all).
        let stray = |kind: &str, id: String| {
            tracing::error!(%vault, kind, id, "the server listed an object of another vault (or of no record of this one); it is left out");
        };
        let records: Vec<RecordInfo> = records
            .into_iter()
            .filter(|r| {
                let ours = r.vault == vault;
                if !ours {
                    stray("record", r.id.to_string());
                }
                ours
            })
            .collect();
        let known: std::collections::HashSet<RecordId> = records.iter().map(|r| r.id).collect();
        let files: Vec<FileInfo> = files
            .into_iter()
            .filter(|f| {
                let ours = f.vault == vault && known.contains(&f.record);
                if !ours {
                    stray("file", f.id.to_string());
                }
                ours
            })
            .collect();
        let mut tree = lock(&self.tree);
        let vault_ino = tree.ino_for(Key::Vault(vault));
        // Rebuild the children of the vault and of each of its records.
        let mut kids: HashMap<Ino, BTreeMap<OsString, Ino>> = HashMap::new();
        kids.insert(vault_ino, BTreeMap::new());
        let mut placed: Vec<(Ino, Ino, OsString, Node)> = Vec::new();
        for r in &records {
            let ino = tree.ino_for(Key::Record(r.id));
            kids.entry(ino).or_default();
            let parent = match r.parent {
                Some(p) => tree.ino_for(Key::Record(p)),
                None => vault_ino,
            };
            let ctx = NameContext::RecordTitle { vault, record: r.id };
            let what = format!("the title of record {}", r.id);
            let name = self.open_sealed(vault, ctx, &r.title, &what);
            mark_unreadable(&mut tree, ino, name.is_none().then_some(what));
            let name = name.unwrap_or_else(|| unreadable_name("record", &r.id.to_string()).into());
            placed.push((parent, ino, name, Node::Record { info: r.clone(), parent }));
        }
        for f in &files {
            let ino = tree.ino_for(Key::File(f.id));
            let parent = tree.ino_for(Key::Record(f.record));
            let ctx = NameContext::FileName { vault, record: f.record, file: f.id };
            let what = format!("the name of file {}", f.id);
            let name = self.open_sealed(vault, ctx, &f.name, &what);
            mark_unreadable(&mut tree, ino, name.is_none().then_some(what));
            let name = name.unwrap_or_else(|| unreadable_name("file", &f.id.to_string()).into());
            placed.push((parent, ino, name, self.file_node(f.clone(), parent)));
        }
        for (parent, ino, mut name, node) in placed {
            let dir = kids.entry(parent).or_default();
            if dir.contains_key(&name) {
                // Two entries with one name (written by other clients): keep both visible.
                let mut alt = name.clone();
                alt.push(format!(" (duplicate {})", &format!("{ino:x}")));
                tracing::warn!(
                    ino,
                    name = %super::lognames::shown(&name),
                    "two entries of one directory have the same name; this one is shown with \"(duplicate {ino:x})\" added"
                );
                name = alt;
            }
            dir.insert(name.clone(), ino);
            tree.names.insert(ino, name);
            // The listing may have been fetched before one of our own changes was
            // committed: never go back to an older version than the one we hold.
            let ours = match tree.nodes.get(&ino) {
                Some(Node::File { info, .. }) => Some(info.version),
                Some(Node::Record { info, .. }) => Some(info.version),
                _ => None,
            };
            let theirs = match &node {
                Node::File { info, .. } => info.version,
                Node::Record { info, .. } => info.version,
                _ => 0,
            };
            if ours.is_none_or(|v| v <= theirs) {
                tree.nodes.insert(ino, node);
            }
        }
        for (dir, entries) in kids {
            tree.children.insert(dir, entries);
        }
        tree.vault_loaded.insert(vault, Instant::now());
        drop(tree);
        let legacy = files.iter().filter(|f| f.meta.0.is_empty()).count();
        if !self.account.wallet().manifests_required(vault) && lock(&self.legacy_warned).insert(vault) {
            tracing::warn!(%vault, files_without_manifest = legacy, "vault made by an older vaultfs: until `vaultfs vault migrate` marks it, a file without a manifest is trusted as the server describes it (and the server could remove one)");
        }
        Ok(())
    }

    /// Whether directory `ino`'s listing is fresh, so looking in it needs no
    /// server: then the FUSE adapter answers on its own thread.
    fn listing_fresh(&self, ino: Ino) -> bool {
        let tree = lock(&self.tree);
        let fresh = |t: &Instant| t.elapsed() < LISTING_TTL;
        // An unreadable directory is not fresh: the async path reports it.
        match tree.node(ino).ok() {
            Some(Node::Root) => tree.root_loaded.as_ref().is_some_and(fresh),
            Some(Node::Vault { vault } | Node::Record { info: RecordInfo { vault, .. }, .. }) => {
                tree.vault_loaded.get(vault).is_some_and(fresh)
            }
            _ => false,
        }
    }

    /// Makes sure the children of directory `ino` are known.
    async fn load_dir(&self, ino: Ino) -> Result<()> {
        let node = lock(&self.tree).node(ino)?.clone();
        match node {
            Node::Root => self.load_root(false).await,
            Node::Vault { vault } | Node::Record { info: RecordInfo { vault, .. }, .. } => {
                self.load_vault(vault, false).await
            }
            Node::File { .. } => Err(FsError::NotDir),
        }
    }

    // ---- attributes --------------------------------------------------------

    /// Attributes of `ino` (`node`), with `tree` for a directory's link count.
    fn attr_of(&self, tree: &Tree, ino: Ino, node: &Node) -> Attr {
        let mut attr = match node {
            Node::Root | Node::Vault { .. } | Node::Record { .. } => {
                // "." and the entry in the parent, plus each subdirectory's "..".
                let subdirs = tree.children.get(&ino).map_or(0, |kids| {
                    kids.values().filter(|k| !matches!(tree.nodes.get(k), Some(Node::File { .. }))).count()
                });
                Attr {
                    ino,
                    kind: Kind::Dir,
                    size: 0,
                    mtime: lock(&self.dir_times).get(&ino).copied().unwrap_or(self.mounted_at),
                    atime: UNIX_EPOCH,
                    perm: self.perm_of(node, 0o777),
                    nlink: 2 + subdirs as u32,
                }
            }
            Node::File { info, meta, .. } => {
                let mut size = match meta {
                    FileMeta::Sealed(m) => m.length,
                    FileMeta::Legacy if info.e2e => {
                        Layout::from_ciphertext_len(info.size).map_or(0, |l| l.plaintext_len())
                    }
                    FileMeta::Legacy => info.size,
                    FileMeta::Invalid => 0,
                };
                let mut mtime = time_of(info.mtime_ms);
                if let Some(st) = lock(&self.streams).get(&info.id) {
                    size = st.sent;
                    mtime = SystemTime::now();
                } else if let Some(&(local, changed)) = lock(&self.local_sizes).get(&info.id) {
                    // A file with unsaved changes: its size is what the
                    // application wrote. Read from a map, never by trying the
                    // data's lock: a stale size here makes the kernel truncate
                    // its page cache under a write in progress, which then
                    // sends zeros. The time is that of the last change, not
                    // "now": a time that moves on every stat makes the kernel
                    // drop the file's cached pages each time.
                    size = local;
                    mtime = changed;
                }
                let nlink = if lock(&self.orphans).contains(&ino) { 0 } else { 1 };
                Attr {
                    ino,
                    kind: Kind::File,
                    size,
                    mtime,
                    atime: UNIX_EPOCH,
                    perm: self.perm_of(node, 0o666),
                    nlink,
                }
            }
        };
        // Access times live in memory only (set by utimensat, as cp -a and
        // rsync -a do); otherwise they follow the modification time.
        attr.atime = lock(&self.atimes).get(&ino).copied().unwrap_or(attr.mtime);
        attr
    }

    /// Sets the access time of `ino` (kept in memory for this mount).
    pub fn set_atime(&self, ino: Ino, t: SystemTime) -> Result<()> {
        self.writable(ino)?;
        lock(&self.atimes).insert(ino, t);
        Ok(())
    }

    /// Notes that directory `ino`'s entries changed now.
    fn touch_dir(&self, ino: Ino) {
        lock(&self.dir_times).insert(ino, SystemTime::now());
    }

    /// Presented permissions: `full` (before the mount's umask), without the
    /// write bits in a read-only vault.
    fn perm_of(&self, node: &Node, full: u16) -> u16 {
        match node.vault() {
            Some(v) if self.vault_policy(v).read_only => full & 0o555,
            _ => full,
        }
    }

    /// Attributes of `ino`.
    pub async fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.getattr_now(ino)
    }

    /// Attributes of `ino`: always known without asking the server.
    pub fn getattr_now(&self, ino: Ino) -> Result<Attr> {
        let tree = lock(&self.tree);
        let node = tree.node(ino)?;
        Ok(self.attr_of(&tree, ino, node))
    }

    /// Looks `name` up in directory `parent`.
    pub async fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        self.load_dir(parent).await?;
        self.lookup_loaded(parent, name)
    }

    /// [`VaultFs::lookup`] when the listing is fresh; `None` if it must be
    /// fetched first (then the caller takes the async path).
    pub fn lookup_now(&self, parent: Ino, name: &OsStr) -> Option<Result<Attr>> {
        if name.len() > NAME_MAX {
            return Some(Err(FsError::NameTooLong));
        }
        self.listing_fresh(parent).then(|| self.lookup_loaded(parent, name))
    }

    fn lookup_loaded(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let tree = lock(&self.tree);
        let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
        Ok(self.attr_of(&tree, ino, tree.node(ino)?))
    }

    /// The entries of directory `ino` (without `.` and `..`).
    pub async fn readdir(&self, ino: Ino) -> Result<Vec<Entry>> {
        self.load_dir(ino).await?;
        self.names_of(ino)
    }

    fn names_of(&self, ino: Ino) -> Result<Vec<Entry>> {
        self.entries(ino, |_, _, _| ())
            .map(|v| v.into_iter().map(|(ino, kind, name, ())| (ino, kind, name)).collect())
    }

    /// [`VaultFs::readdir`] when the listing is fresh; `None` if it must be
    /// fetched first.
    pub fn readdir_now(&self, ino: Ino) -> Option<Result<Vec<Entry>>> {
        self.listing_fresh(ino).then(|| self.names_of(ino))
    }

    /// The entries of directory `ino` with their attributes (for readdirplus,
    /// which spares the kernel a lookup per entry); `None` for an entry whose
    /// name or title failed its check, whose every use must reach us (EIO).
    pub async fn readdir_plus(&self, ino: Ino) -> Result<Vec<EntryPlus>> {
        self.load_dir(ino).await?;
        self.entries_plus(ino)
    }

    fn entries_plus(&self, ino: Ino) -> Result<Vec<EntryPlus>> {
        self.entries(ino, |fs, tree, (child, node)| {
            tree.node(child).is_ok().then(|| fs.attr_of(tree, child, node))
        })
    }

    /// [`VaultFs::readdir_plus`] when the listing is fresh; `None` if it must
    /// be fetched first.
    pub fn readdir_plus_now(&self, ino: Ino) -> Option<Result<Vec<EntryPlus>>> {
        self.listing_fresh(ino).then(|| self.entries_plus(ino))
    }

    /// The children of a loaded directory, each with `extra(child)`.
    fn entries<T>(
        &self,
        ino: Ino,
        extra: impl Fn(&Self, &Tree, (Ino, &Node)) -> T,
    ) -> Result<Vec<(Ino, Kind, OsString, T)>> {
        let tree = lock(&self.tree);
        let kids = tree.children.get(&ino).ok_or(FsError::NotDir)?;
        Ok(kids
            .iter()
            .filter_map(|(name, &child)| {
                let node = tree.nodes.get(&child)?;
                let kind = if matches!(node, Node::File { .. }) { Kind::File } else { Kind::Dir };
                Some((child, kind, name.clone(), extra(self, &tree, (child, node))))
            })
            .collect())
    }

    /// The parent of `ino` (for `..`).
    pub fn parent(&self, ino: Ino) -> Ino {
        lock(&self.tree).parent_of(ino).unwrap_or(ROOT)
    }

    // ---- directories -------------------------------------------------------

    /// Creates a record (a directory) in a vault or record.
    pub async fn mkdir(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_name(name)?;
        self.load_dir(parent).await?;
        self.writable(parent)?;
        let (vault, parent_record) = {
            let tree = lock(&self.tree);
            if tree.child(parent, name).is_some() {
                return Err(FsError::Exists);
            }
            match tree.node(parent)? {
                Node::Root => {
                    return Err(FsError::NotPermitted("create vaults with `vaultfs vault create`".into()))
                }
                Node::Vault { vault } => (*vault, None),
                Node::Record { info, .. } => (info.vault, Some(info.id)),
                Node::File { .. } => return Err(FsError::NotDir),
            }
        };
        let id = RecordId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let title = self.seal(vault, NameContext::RecordTitle { vault, record: id }, name)?;
        let info = self
            .remote()
            .create_record(vault, NewRecord { id, parent: parent_record, title, fields: Sealed::default() })
            .await?;
        let mut tree = lock(&self.tree);
        let ino = tree.ino_for(Key::Record(id));
        let node = Node::Record { info, parent };
        tree.link(parent, name.to_os_string(), ino, node.clone());
        self.touch_dir(parent);
        self.touch_dir(ino);
        Ok(self.attr_of(&tree, ino, &node))
    }

    /// Removes an empty record.
    pub async fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.load_dir(parent).await?;
        if lock(&self.tree).node(parent)?.vault().is_some() {
            self.deletable(parent)?;
        }
        let (ino, info) = {
            let tree = lock(&self.tree);
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            match tree.node(ino)? {
                Node::Record { info, .. } => {
                    if tree.children.get(&ino).is_some_and(|k| !k.is_empty()) {
                        return Err(FsError::NotEmpty);
                    }
                    (ino, info.clone())
                }
                Node::Vault { .. } => {
                    return Err(FsError::NotPermitted("vaults are not removed through the mount".into()))
                }
                _ => return Err(FsError::NotDir),
            }
        };
        self.remote().delete_record(info.id, info.version).await?;
        let mut tree = lock(&self.tree);
        tree.unlink_ino(ino);
        tree.nodes.remove(&ino);
        self.touch_dir(parent);
        Ok(())
    }

    // ---- files: create, open, read, write ----------------------------------

    fn file_parent(&self, parent: Ino) -> Result<(VaultId, RecordId)> {
        match lock(&self.tree).node(parent)? {
            Node::Root | Node::Vault { .. } => {
                Err(FsError::NotPermitted("files live in records: create a directory first".into()))
            }
            Node::Record { info, .. } => Ok((info.vault, info.id)),
            Node::File { .. } => Err(FsError::NotDir),
        }
    }

    async fn new_file(&self, parent: Ino, name: &OsStr) -> Result<(Ino, FileInfo)> {
        let (vault, record) = self.file_parent(parent)?;
        let id = FileId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let sealed = self.seal(vault, NameContext::FileName { vault, record, file: id }, name)?;
        let ctx = FileContext { vault, record, file: id };
        let meta = self.seal_manifest(&ctx, &FileManifest::new_empty(1))?;
        let new = NewFile { id, name: sealed, e2e: true, mtime_ms: Some(now_ms()), meta };
        let info = self.remote().create_file(record, new).await?;
        let info = check_file_answer(id, vault, info)?;
        if info.record != record {
            return Err(FsError::Io("the server created the file in another record".into()));
        }
        let node = self.file_node(info.clone(), parent);
        let mut tree = lock(&self.tree);
        let ino = tree.ino_for(Key::File(id));
        tree.link(parent, name.to_os_string(), ino, node);
        self.touch_dir(parent);
        Ok((ino, info))
    }

    /// Creates and opens a new, empty file.
    pub async fn create(&self, parent: Ino, name: &OsStr) -> Result<(Attr, u64)> {
        check_name(name)?;
        self.load_dir(parent).await?;
        self.writable(parent)?;
        if lock(&self.tree).child(parent, name).is_some() {
            return Err(FsError::Exists);
        }
        let (ino, info) = self.new_file(parent, name).await?;
        let handle = self.cache.pin(info.id);
        {
            let mut d = handle.lock().await;
            *d = PlainData {
                bytes: SecretBuf::new(),
                dirty: false,
                version: info.version,
                confirmed: None,
                loaded: true,
                filling: false,
            };
        }
        lock(&self.sequential).insert(info.id, 0);
        let fh = self.new_handle(info.id);
        Ok((self.getattr(ino).await?, fh))
    }

    fn new_handle(&self, file: FileId) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, file);
        fh
    }

    fn file_info(&self, ino: Ino) -> Result<FileInfo> {
        match lock(&self.tree).node(ino)? {
            Node::File { info, .. } => Ok(info.clone()),
            _ => Err(FsError::IsDir),
        }
    }

    fn set_file_info(&self, ino: Ino, f: impl FnOnce(&mut FileInfo)) {
        let mut tree = lock(&self.tree);
        if let Some(Node::File { info, meta, .. }) = tree.nodes.get_mut(&ino) {
            let before = info.meta.clone();
            f(info);
            if info.meta != before {
                *meta = self.open_meta(info);
            }
        }
    }

    /// Opens a file; `truncate` empties it (O_TRUNC); `write` if opened for writing.
    pub async fn open(self: &Arc<Self>, ino: Ino, truncate: bool, write: bool) -> Result<u64> {
        self.open_keeping_cache(ino, truncate, write).await.map(|(fh, _)| fh)
    }

    /// Like [`VaultFs::open`], also saying whether the kernel may keep the pages
    /// it cached for this file: yes while the content is the version we had, no
    /// once it changed on the server (then the pages are stale).
    pub async fn open_keeping_cache(
        self: &Arc<Self>,
        ino: Ino,
        truncate: bool,
        write: bool,
    ) -> Result<(u64, bool)> {
        if write || truncate {
            self.writable(ino)?;
        }
        self.settle_stream(ino).await;
        let mut info = self.file_info(ino)?;
        let cached = self.cache.peek(info.id).is_some_and(|h| h.try_lock().map_or(true, |d| d.loaded));
        if !write && !truncate && self.passes_through(ino)? && !cached {
            // Above the end-to-end limit: read in ranges from the server, never
            // whole. Asked first which version the server has (unless it said so
            // just now): the listing may be two seconds old, and the kernel may
            // keep the pages it cached only while the version is the one they
            // came from.
            let known = lock(&self.pass_versions).get(&info.id).copied();
            let recent = known.is_some_and(|(v, at)| v == info.version && at.elapsed() < self.confirmed_for);
            if !recent {
                let asked = Instant::now();
                info = self.fetch_file(&info).await?;
                self.set_file_info(ino, |i| *i = info.clone());
                lock(&self.pass_versions).insert(info.id, (info.version, asked));
            }
            if self.passes_through(ino)? {
                let reader = match self.file_state_by_id(info.id)?.1 {
                    FileMeta::Sealed(m) => {
                        if let Err(source) = self.check_fresh(info.id, m.generation) {
                            tracing::error!(file = %info.id, error = %source, "refusing an older version of the file than this machine saw");
                            self.note_refusal(format!("file {}: {source}", info.id));
                            return Err(FsError::Integrity { what: format!("file {}", info.id), source });
                        }
                        self.note_generation(info.id, m.generation);
                        let crypto::ContentMode::Plain(tags) = &m.mode else {
                            return Err(FsError::Io("not a pass-through file".into()));
                        };
                        PassRead::new(info.id, m.length, m.generation, Some(tags.verifier()))
                    }
                    _ => PassRead::new(info.id, info.size, 0, None),
                };
                let keep = known.is_some_and(|(v, _)| v == info.version);
                let fh = self.new_handle(info.id);
                lock(&self.pass_reads).insert(fh, Arc::new(tokio::sync::Mutex::new(reader)));
                self.cache.pin(info.id);
                return Ok((fh, keep));
            }
        }
        // Opened any other way, the kernel's pages are checked by what follows.
        lock(&self.pass_versions).remove(&info.id);
        if truncate {
            lock(&self.sequential).insert(info.id, 0);
        }
        let handle = self.cache.pin(info.id);
        let result = async {
            let mut d = handle.lock().await;
            if truncate {
                if !d.loaded || !d.bytes.is_empty() || info.size > 0 {
                    d.dirty = true;
                }
                self.cancel_fill(info.id, &mut d);
                d.bytes = SecretBuf::new();
                d.loaded = true;
                d.version = d.version.max(info.version);
                if d.dirty {
                    self.note_change(info.id, 0);
                }
                return Ok(false);
            }
            if d.dirty {
                return Ok(true);
            }
            // Is what we hold (or are downloading) still the server's current
            // version? Not asked again soon after its last answer (CONFIRMED_FOR).
            if d.loaded || d.filling {
                let recent = d.version == info.version
                    && d.confirmed.is_some_and(|t| t.elapsed() < self.confirmed_for);
                if !recent {
                    let asked = Instant::now();
                    info = self.fetch_file(&info).await?;
                    self.set_file_info(ino, |i| *i = info.clone());
                    if d.version == info.version {
                        d.confirmed = Some(asked);
                    }
                }
                if d.version == info.version {
                    let loaded = d.loaded;
                    drop(d);
                    if !loaded {
                        drop(self.ready(info.id, &handle, Some(0)).await?);
                    }
                    return Ok(true);
                }
                // Stale: download it again.
                self.cancel_fill(info.id, &mut d);
                d.loaded = false;
            }
            drop(d);
            // Returns once the header is authenticated; reads wait for their chunks.
            self.ready(info.id, &handle, Some(0)).await.map(|_| false)
        }
        .await;
        match result {
            Ok(keep) => {
                if let Ok(d) = handle.try_lock() {
                    if d.loaded {
                        self.cache.account(info.id, d.bytes.len());
                    }
                }
                Ok((self.new_handle(info.id), keep))
            }
            Err(e) => {
                self.cache.unpin(info.id);
                Err(e)
            }
        }
    }

    /// Whether a file's content is passed through (not end-to-end) and not
    /// empty, by its manifest (by the server's word for a legacy file):
    /// then it is read in ranges, never held whole.
    fn passes_through(&self, ino: Ino) -> Result<bool> {
        match lock(&self.tree).node(ino)? {
            Node::File { meta: FileMeta::Sealed(m), .. } => Ok(!m.is_e2e() && m.length > 0),
            Node::File { info, .. } => Ok(!info.e2e && info.size > 0),
            _ => Err(FsError::IsDir),
        }
    }

    /// Before a file is opened: if it is being streamed to the server, wait
    /// until that upload has committed, so a read right after the writer's
    /// close sees what was written. A stream that is ending is waited for; one
    /// that still has a writer gets two seconds (its release, which ends it,
    /// follows the writer's close), then the open goes ahead with what the
    /// server has.
    async fn settle_stream(&self, ino: Ino) {
        let Ok(info) = self.file_info(ino) else { return };
        let started = Instant::now();
        loop {
            let ending = match lock(&self.streams).get(&info.id) {
                None => return,
                Some(st) => st.tx.is_none(),
            };
            if !ending && started.elapsed() > Duration::from_secs(2) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn handle_file(&self, fh: u64) -> Result<FileId> {
        lock(&self.handles).get(&fh).copied().ok_or(FsError::Invalid("bad file handle".into()))
    }

    /// Reads up to `size` bytes at `offset`.
    pub async fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Result<ReadData> {
        let id = self.handle_file(fh)?;
        let pass = lock(&self.pass_reads).get(&fh).cloned();
        if let Some(pass) = pass {
            let read = self.read_pass_through(&pass, offset, size).await;
            if let Err(FsError::Integrity { source, .. }) = &read {
                let generation = pass.lock().await.generation;
                if self.replaced_since(id, generation).await {
                    tracing::info!(file = %id, "the file was replaced while open; this handle reads no more of it");
                    return Err(FsError::Stale);
                }
                self.note_refusal(format!("file {id}: {source}"));
            }
            return read.map(ReadData::Fetched);
        }
        let handle = self.cache.peek(id).ok_or(FsError::Io("file data evicted while open".into()))?;
        let want = offset.saturating_add(u64::from(size));
        // Ready means the bytes up to `want` (or the end) have arrived.
        let (d, _) = self.ready(id, &handle, Some(want)).await?;
        Ok(ReadData::plain(d, offset, size))
    }

    /// Whether the server now holds a newer generation of the file than
    /// `generation` under an authentic manifest: content that fails its
    /// check for a handle opened before was replaced, not tampered with.
    async fn replaced_since(&self, id: FileId, generation: u64) -> bool {
        let Ok(info) = self.file_info_by_id(id) else { return false };
        let Ok(fresh) = self.fetch_file(&info).await else { return false };
        match self.open_meta(&fresh) {
            FileMeta::Sealed(m) => m.generation > generation && self.check_fresh(id, m.generation).is_ok(),
            FileMeta::Legacy | FileMeta::Invalid => false,
        }
    }

    /// Serves a read on the calling thread when the plaintext is already whole
    /// in memory and nobody holds it: `None` when the read would have to wait
    /// (still downloading, being saved, or passed through), and then the caller
    /// takes [`VaultFs::read`]. Handing each small read to the runtime costs more
    /// than the copy (two thread wake-ups), which is what random 4 KiB reads pay.
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Option<Result<ReadData>> {
        let id = self.handle_file(fh).ok()?;
        if lock(&self.pass_reads).contains_key(&fh) {
            return None;
        }
        let handle = self.cache.peek(id)?;
        let d = handle.try_lock_owned().ok()?;
        if !d.loaded {
            return None;
        }
        Some(Ok(ReadData::plain(d, offset, size)))
    }

    /// Writes `data` at `offset`.
    pub async fn write(self: &Arc<Self>, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.write_data(fh, offset, WriteData::Borrowed(data)).await
    }

    /// Writes `data` at `offset`, taking the buffer: a pass-through upload
    /// sends it as it is instead of copying it.
    pub async fn write_owned(self: &Arc<Self>, fh: u64, offset: u64, data: SecretBuf) -> Result<u32> {
        self.write_data(fh, offset, WriteData::Owned(data)).await
    }

    async fn write_data(self: &Arc<Self>, fh: u64, offset: u64, data: WriteData<'_>) -> Result<u32> {
        let id = self.handle_file(fh)?;
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::TooBig("offset".into()))?;
        let rules = self.file_policy(id);
        check_size(&rules, end)?;
        let data = match self.write_to_stream(id, offset, data).await? {
            Ok(n) => return Ok(n),
            Err(data) => data,
        };
        let data = data.as_slice();
        let sequential = self.note_write_order(id, offset, end);
        let handle = self.cache.peek(id).ok_or(FsError::Io("file data evicted while open".into()))?;
        let (mut d, _) = self.ready(id, &handle, None).await?;
        let new_len = self.apply_write(id, &mut d, offset, data);
        if sequential && new_len as u64 > rules.e2e_limit {
            // Past the end-to-end limit while being written front to back: stream
            // it to the server from here on instead of holding it all in memory.
            self.start_stream(id, &mut d).await?;
            drop(d);
            self.cache.account(id, 0);
        } else {
            drop(d);
            self.cache.account(id, new_len);
        }
        Ok(data.len() as u32)
    }

    /// Applies a write on the calling thread when nothing has to wait: the file
    /// is whole in memory, unlocked, not being streamed, and stays within the
    /// end-to-end limit (crossing it starts a stream, which is async). `None`
    /// sends the caller to [`VaultFs::write`], which also reports every error.
    /// This spares each 1 MiB write a copy and two thread wake-ups.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<Result<u32>> {
        let id = self.handle_file(fh).ok()?;
        let end = offset.checked_add(data.len() as u64)?;
        let rules = self.file_policy(id);
        if check_size(&rules, end).is_err() {
            return None;
        }
        if lock(&self.streams).contains_key(&id) {
            return self.write_to_stream_now(id, offset, data).map(Ok);
        }
        if end > rules.e2e_limit {
            return None;
        }
        let handle = self.cache.peek(id)?;
        let mut d = handle.try_lock().ok()?;
        if !d.loaded || d.bytes.len() as u64 > rules.e2e_limit {
            return None;
        }
        self.note_write_order(id, offset, end);
        let new_len = self.apply_write(id, &mut d, offset, data);
        drop(d);
        self.cache.account(id, new_len);
        Some(Ok(data.len() as u32))
    }

    /// Tracks whether a file is written front to back (only such files may be
    /// streamed past the end-to-end limit); true if this write continues it.
    fn note_write_order(&self, id: FileId, offset: u64, end: u64) -> bool {
        let mut seq = lock(&self.sequential);
        match seq.get(&id) {
            Some(&next) if next == offset => {
                seq.insert(id, end);
                true
            }
            Some(&next) => {
                tracing::debug!(file = %id, offset, expected = next, "write out of sequence: this file will not be streamed");
                seq.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Copies a write into the loaded plaintext; returns the new length.
    fn apply_write(&self, id: FileId, d: &mut PlainData, offset: u64, data: &[u8]) -> usize {
        tracing::trace!(file = %id, offset, len = data.len(), "write");
        let end = offset as usize + data.len();
        if d.bytes.len() < end {
            d.bytes.resize(end);
        }
        d.bytes[offset as usize..end].copy_from_slice(data);
        d.dirty = true;
        let new_len = d.bytes.len();
        self.note_change(id, new_len as u64);
        new_len
    }

    /// The policy of the vault a file is in (the defaults if it was unlinked).
    fn file_policy(&self, id: FileId) -> Arc<VaultPolicy> {
        match self.file_info_by_id(id) {
            Ok(info) => self.vault_policy(info.vault),
            Err(_) => Arc::new(self.policy.vault("", &self.limits)),
        }
    }

    /// A file's metadata and what its manifest says, by id.
    fn file_state_by_id(&self, id: FileId) -> Result<(FileInfo, FileMeta)> {
        let tree = lock(&self.tree);
        let ino = tree.keys.get(&Key::File(id)).copied().ok_or(FsError::NotFound)?;
        match tree.node(ino)? {
            Node::File { info, meta, .. } => Ok((info.clone(), meta.clone())),
            _ => Err(FsError::IsDir),
        }
    }

    /// Refuses a generation of a file older than the newest this client has
    /// seen of it: a replay.
    fn check_fresh(&self, id: FileId, generation: u64) -> std::result::Result<(), crypto::CryptoError> {
        self.freshness.check(id, generation)
    }

    /// Notes that generation `generation` of a file exists.
    fn note_generation(&self, id: FileId, generation: u64) {
        self.freshness.note(id, generation);
    }

    /// Notes a failed check for `vaultfs status` (the log has it too).
    fn note_refusal(&self, what: String) {
        let mut refusals = lock(&self.refusals);
        if refusals.len() >= MAX_REFUSALS_SHOWN {
            refusals.pop_front();
        }
        refusals.push_back(what);
    }

    fn file_info_by_id(&self, id: FileId) -> Result<FileInfo> {
        let ino = lock(&self.tree).keys.get(&Key::File(id)).copied().ok_or(FsError::NotFound)?;
        self.file_info(ino)
    }

    /// Starts a pass-through upload with what `d` holds so far.
    async fn start_stream(self: &Arc<Self>, id: FileId, d: &mut PlainData) -> Result<()> {
        let ino = lock(&self.tree).keys.get(&Key::File(id)).copied().ok_or(FsError::NotFound)?;
        let info = self.file_info(ino)?;
        // A stream cannot be sent twice, so if the file changes on the server
        // meanwhile, the server is asked to keep ours as a conflict copy.
        let copy = self.conflict_copy_file(ino, &info)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(STREAM_QUEUE);
        // Each piece is tagged as it goes by; the tags make the manifest the
        // stream is committed with once it has all been stored.
        let tagger = crypto::PieceTagger::new(&mut OsRandom).map_err(|e| FsError::Io(e.to_string()))?;
        let tagger = Arc::new(Mutex::new(Some(tagger)));
        let tagging = Arc::clone(&tagger);
        let body = futures_util::stream::unfold((rx, tagging), |(mut rx, tagging)| async move {
            let item =
                rx.recv().await?.and_then(|bytes| match lock(&tagging).as_mut().map(|t| t.update(&bytes)) {
                    Some(Ok(())) => Ok(bytes),
                    Some(Err(e)) => Err(std::io::Error::other(e)),
                    None => Err(std::io::Error::other("the stream was already committed")),
                });
            Some((item, (rx, tagging)))
        });
        let fs = Arc::clone(self);
        let version = d.version;
        let generation = self.next_generation(ino, id, version);
        tracing::info!(file = %id, "file passes the end-to-end limit: streaming it as plain HTTPS");
        let task = tokio::spawn(async move {
            let body = UploadBody {
                len: None,
                stream: Box::pin(body),
                conflict_copy: Some(copy.clone()),
                meta: None,
            };
            let staged = fs.remote().stage(id, version, false, body).await?;
            let tagger =
                lock(&tagger).take().ok_or_else(|| FsError::Io("the stream's tags are gone".into()))?;
            let length = tagger.length();
            let tags = tagger.finish().map_err(|e| FsError::Io(e.to_string()))?;
            let plain = PlainUpload { generation, length, mtime_ms: now_ms(), copy: Some(copy) };
            let (done, meta) = fs.commit_plain(&info, version, staged, tags, plain).await?;
            Ok((done, meta, generation))
        });
        let sent = d.bytes.len() as u64;
        // Hand the buffer itself to the upload rather than a copy (30 MB by
        // default): this file is not end-to-end encrypted, and a copy would double
        // the memory this stage needs.
        let first = std::mem::take(&mut d.bytes).into_bytes();
        d.loaded = false;
        d.dirty = false;
        lock(&self.streams).insert(id, Streaming { tx: Some(tx.clone()), task: Some(task), sent, ino });
        self.forget_unsaved(id);
        // From now on this file is not end-to-end encrypted: say so at once.
        self.set_file_info(ino, |i| i.e2e = false);
        lock(&self.uploading)
            .insert(id, Arc::new(UploadProgress { sent: AtomicU64::new(sent), total: None }));
        tx.send(Ok(first)).await.map_err(|_| FsError::Unavailable("the upload stream closed".into()))
    }

    /// Feeds a write to a running pass-through upload; gives the data back if
    /// there is none.
    async fn write_to_stream<'a>(
        &self,
        id: FileId,
        offset: u64,
        data: WriteData<'a>,
    ) -> Result<std::result::Result<u32, WriteData<'a>>> {
        let (tx, sent) = loop {
            match lock(&self.streams).get(&id) {
                Some(Streaming { tx: Some(tx), sent, .. }) => break (tx.clone(), *sent),
                Some(_) => {}
                None => return Ok(Err(data)),
            }
            // Someone is ending the stream (a close by the opener while another
            // of its threads still writes): once it is stored, this write edits
            // the stored file like any other.
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if offset < sent {
            // A write behind what was sent (a program going back to fix a header,
            // or writes from several threads arriving out of order): store what
            // was streamed, then edit the file in memory like any other, at the
            // price of downloading it again. Slower, never wrong.
            tracing::info!(file = %id, offset, sent, "write behind a pass-through stream: finishing it and editing in memory");
            self.finish_stream(id).await?;
            return Ok(Err(data));
        }
        let closed = || FsError::Unavailable("the upload stream closed".into());
        // A write past the end leaves a hole, which reads as zeros.
        let mut gap = offset - sent;
        while gap > 0 {
            let n = gap.min(UPLOAD_PIECE as u64);
            tx.send(Ok(bytes::Bytes::from(vec![0u8; n as usize]))).await.map_err(|_| closed())?;
            gap -= n;
        }
        let len = data.len();
        tx.send(Ok(data.into_bytes())).await.map_err(|_| closed())?;
        let added = offset - sent + len as u64;
        if let Some(s) = lock(&self.streams).get_mut(&id) {
            s.sent += added;
        }
        self.note_streamed(id, added);
        Ok(Ok(len as u32))
    }

    /// Feeds a write to a running pass-through upload on the calling thread:
    /// one copy, no hop through the runtime. `None` (nothing sent) unless the
    /// write continues the stream and its queue has room; the async path
    /// handles the rest, waiting for room if the upload is behind.
    fn write_to_stream_now(&self, id: FileId, offset: u64, data: &[u8]) -> Option<u32> {
        let mut streams = lock(&self.streams);
        let s = streams.get_mut(&id)?;
        let tx = s.tx.as_ref()?;
        if offset != s.sent || tx.capacity() == 0 {
            return None;
        }
        // The copy happens under the lock, so no other write can slip between
        // the check of the offset and the send (the kernel does not send two
        // writes of one file at once, so this lock is not contended).
        tx.try_send(Ok(bytes::Bytes::copy_from_slice(data))).ok()?;
        s.sent += data.len() as u64;
        drop(streams);
        self.note_streamed(id, data.len() as u64);
        Some(data.len() as u32)
    }

    /// Counts `added` more bytes as handed to the upload of `id` (status, xattrs).
    fn note_streamed(&self, id: FileId, added: u64) {
        if let Some(p) = lock(&self.uploading).get(&id) {
            p.sent.fetch_add(added, Ordering::Relaxed);
        }
    }

    /// Ends a pass-through upload and waits until the server has stored it.
    async fn finish_stream(&self, id: FileId) -> Result<bool> {
        let (task, ino, sent) = {
            let mut streams = lock(&self.streams);
            let Some(st) = streams.get_mut(&id) else { return Ok(false) };
            st.tx = None; // closes the body once queued pieces are sent
            match st.task.take() {
                Some(task) => (task, st.ino, st.sent),
                None => return Ok(true), // someone else is finishing it
            }
        };
        lock(&self.sequential).remove(&id);
        let result = task.await.map_err(|e| FsError::Io(format!("upload task: {e}")));
        tracing::debug!(file = %id, sent, ok = matches!(result, Ok(Ok(_))), "stream finished");
        let outcome = match result {
            Ok(r) => r,
            Err(e) => {
                lock(&self.streams).remove(&id);
                lock(&self.uploading).remove(&id);
                return Err(e);
            }
        };
        // The file's info is updated before the stream leaves the map, so size
        // and flags never fall back to the pre-upload view in between.
        if let Some((done, meta, generation)) = outcome.as_ref().ok().filter(|d| d.0.conflict_copy.is_none())
        {
            self.note_generation(id, *generation);
            self.set_file_info(ino, |i| {
                i.version = done.version;
                i.size = done.size;
                i.e2e = false;
                i.mtime_ms = now_ms();
                i.meta = meta.clone();
            });
        }
        lock(&self.streams).remove(&id);
        lock(&self.uploading).remove(&id);
        match outcome {
            Ok((done, _, _)) if done.conflict_copy.is_some() => {
                tracing::warn!(file = %id, copy = ?done.conflict_copy, "the file changed on the server while it was streamed; ours was saved as a conflict copy");
                // Show the server's version of the original, and the copy.
                if let Ok(info) = self.file_info(ino) {
                    self.refresh_after_conflict(ino, &info).await;
                }
                Ok(true)
            }
            Ok((done, _, _)) => {
                if let Some(h) = self.cache.peek(id) {
                    h.lock().await.version = done.version;
                }
                Ok(true)
            }
            Err(e) => {
                tracing::error!(file = %id, error = %e, "streaming upload failed; the data was not stored");
                Err(e)
            }
        }
    }

    /// Changes size and/or modification time.
    pub async fn setattr(
        self: &Arc<Self>,
        ino: Ino,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> Result<Attr> {
        let info = match lock(&self.tree).node(ino)? {
            Node::File { info, .. } => Some(info.clone()),
            _ => None,
        };
        let Some(info) = info else {
            // Directory times are not stored on the server; this mount shows them.
            if let Some(t) = mtime {
                self.writable(ino)?;
                lock(&self.dir_times).insert(ino, t);
            }
            return self.getattr(ino).await;
        };
        let rules = self.writable(ino)?;
        if let Some(size) = size {
            check_size(&rules, size)?;
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
                    d.loaded = true;
                    if d.bytes.len() as u64 != size {
                        let size = size as usize;
                        d.bytes.resize(size);
                        d.dirty = true;
                        self.note_change(info.id, size as u64);
                        if size == 0 {
                            // O_TRUNC arrives as a truncate to 0 (the kernel
                            // splits it from the open): written front to back
                            // from here, the file may stream past the limit.
                            lock(&self.sequential).insert(info.id, 0);
                        }
                    }
                }
                // Without an open handle (truncate(2)) nothing else will flush it.
                let open = lock(&self.handles).values().any(|f| *f == info.id);
                if !open {
                    self.upload(ino, &handle).await?;
                }
                Ok::<_, FsError>(())
            }
            .await;
            self.cache.unpin(info.id);
            result?;
        }
        if let Some(t) = mtime {
            // Unsaved changes: the time goes up with the content (one
            // request, no version bump that the upload would then conflict with).
            let pending = match lock(&self.local_sizes).get_mut(&info.id) {
                Some(entry) => {
                    entry.1 = t;
                    lock(&self.chosen_mtimes).insert(info.id, t);
                    true
                }
                None => false,
            };
            if pending {
                return self.getattr(ino).await;
            }
            let ms = ms_of(t);
            let current = self.file_info(ino)?;
            let updated = self
                .remote()
                .update_file(
                    current.id,
                    current.version,
                    FileUpdate { mtime_ms: Some(ms), ..Default::default() },
                )
                .await?;
            let updated = check_file_answer(current.id, current.vault, updated)?;
            self.set_file_info(ino, |i| *i = updated);
            if let Some(h) = self.cache.peek(current.id) {
                let mut d = h.lock().await;
                if d.version == current.version {
                    d.version = current.version + 1;
                }
            }
        }
        self.getattr(ino).await
    }

    /// Records that the application changed file `id` (now `len` bytes) and
    /// has not saved it yet; its modification time becomes now.
    fn note_change(&self, id: FileId, len: u64) {
        lock(&self.local_sizes).insert(id, (len, SystemTime::now()));
        lock(&self.chosen_mtimes).remove(&id);
    }

    /// The file has no unsaved changes any more (saved, streamed or gone).
    fn forget_unsaved(&self, id: FileId) {
        lock(&self.local_sizes).remove(&id);
        lock(&self.chosen_mtimes).remove(&id);
    }

    // ---- saving --------------------------------------------------------------

    /// Uploads the file's plaintext if it changed. Returns when the server has
    /// stored it. On a version conflict, our data goes to a conflict copy.
    async fn upload(&self, ino: Ino, handle: &PlainHandle) -> Result<()> {
        let mut d = Arc::clone(handle).lock_owned().await;
        if !d.dirty {
            return Ok(());
        }
        if lock(&self.orphans).contains(&ino) {
            d.dirty = false; // unlinked: there is nothing to save it to
            return Ok(());
        }
        let info = self.file_info(ino)?;
        let rules = self.vault_policy(info.vault);
        let name = lock(&self.tree).names.get(&ino).cloned().unwrap_or_default();
        let d = match rules.images.applies_to(&name) {
            Some(format) => self.reduce_image(ino, info.id, handle, d, format, &rules.images).await,
            None => d,
        };
        let plain_len = d.bytes.len() as u64;
        check_size(&rules, plain_len)?;
        let e2e = rules.encrypts(plain_len);
        let generation = self.next_generation(ino, info.id, d.version);
        let ctx = FileContext { vault: info.vault, record: info.record, file: info.id };
        let sealer = self.sealer(&ctx, generation, e2e, plain_len)?;
        let meta = sealer.meta();
        let copy = if e2e { None } else { Some(self.conflict_copy_file(ino, &info)?) };
        let progress = Arc::new(UploadProgress { sent: AtomicU64::new(0), total: Some(sealer.len()) });
        lock(&self.uploading).insert(info.id, Arc::clone(&progress));
        let expected = d.version;
        tracing::debug!(file = %info.id, len = plain_len, expected, e2e, "uploading from the cache");
        let (body, sealing) = save::pipeline(d, sealer, progress);
        let mtime_ms = lock(&self.chosen_mtimes).get(&info.id).map_or_else(now_ms, |&t| ms_of(t));
        let asked = Instant::now();
        let outcome = match copy {
            None => {
                let result = self.remote().upload(info.id, expected, true, Some(mtime_ms), body).await;
                sealing.finish().await.map(|(d, _)| {
                    let saved = match result {
                        Ok(done) => Saved::Stored(done, meta),
                        Err(RemoteError::Conflict { current }) => Saved::Stale(current),
                        Err(e) => Saved::Failed(e.into()),
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
        lock(&self.uploading).remove(&info.id);
        let (mut d, saved) = outcome?;
        tracing::debug!(file = %info.id, ok = matches!(saved, Saved::Stored(..)), "upload from the cache done");
        match saved {
            Saved::Stored(done, meta) if done.conflict_copy.is_none() => {
                d.dirty = false;
                d.version = done.version;
                d.confirmed = Some(asked);
                self.note_generation(info.id, generation);
                self.set_file_info(ino, |i| {
                    i.version = done.version;
                    i.size = done.size;
                    i.e2e = e2e;
                    i.mtime_ms = mtime_ms;
                    i.meta = meta.unwrap_or_default();
                });
                // The server's size now says what the application wrote.
                self.forget_unsaved(info.id);
                Ok(())
            }
            Saved::Stored(done, _) => {
                tracing::warn!(file = %info.id, copy = ?done.conflict_copy, "the file changed on the server meanwhile; ours was saved as a conflict copy");
                // The original now shows the server's version; ours lives in the copy.
                d.dirty = false;
                d.loaded = false;
                d.bytes = SecretBuf::new();
                self.forget_unsaved(info.id);
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
                self.forget_unsaved(info.id);
                Ok(())
            }
            Saved::Failed(e) => {
                tracing::warn!(file = %info.id, error = %e, "upload failed; the data stays in memory and will be retried");
                Err(e)
            }
        }
    }

    /// The generation the next upload of a file gets: above every generation
    /// seen of it (remembered, in its manifest) and its server version.
    /// The server's version counts too (a file without a manifest has no
    /// other), bounded so that a server's huge number cannot exhaust the
    /// counter; the generation is noted as sent, so a retry goes above it.
    fn next_generation(&self, ino: Ino, id: FileId, version: u64) -> u64 {
        let seen = self.freshness.write_floor(id);
        let stated = match lock(&self.tree).nodes.get(&ino) {
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
    fn conflict_copy_file(&self, ino: Ino, info: &FileInfo) -> Result<NewFile> {
        let name = lock(&self.tree).names.get(&ino).cloned().unwrap_or_default();
        let copy_name = conflict_name(&name, SystemTime::now());
        let copy_id = FileId::random().map_err(|e| FsError::Io(e.to_string()))?;
        let ctx = NameContext::FileName { vault: info.vault, record: info.record, file: copy_id };
        let sealed = self.seal(info.vault, ctx, &copy_name)?;
        Ok(NewFile { id: copy_id, name: sealed, e2e: false, mtime_ms: None, meta: Sealed::default() })
    }

    /// Commits staged pass-through content with its manifest (sealed for the
    /// file, and for its conflict copy if one may take it).
    async fn commit_plain(
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
        let manifest = FileManifest {
            generation: plain.generation,
            length: plain.length,
            mode: crypto::ContentMode::Plain(tags),
        };
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
    async fn refresh_after_conflict(&self, ino: Ino, info: &FileInfo) {
        if let Ok(fresh) = self.fetch_file(info).await {
            self.set_file_info(ino, |i| *i = fresh);
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
        use super::reduce::{reduce, Reduced};
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
                // Not the user's change: a time set with utimensat stays.
                lock(&self.local_sizes).insert(id, (len as u64, SystemTime::now()));
                self.cache.account(id, len);
                // The kernel still holds the pages and size the application wrote.
                if let Some(invalidate) = self.invalidate.get() {
                    invalidate(ino);
                }
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
    async fn upload_whole(
        &self,
        target: &FileInfo,
        generation: u64,
        mtime_ms: i64,
        plain: &[u8],
    ) -> Result<(crate::protocol::UploadResult, Sealed)> {
        let rules = self.vault_policy(target.vault);
        check_size(&rules, plain.len() as u64)?;
        let ctx = FileContext { vault: target.vault, record: target.record, file: target.id };
        self.freshness.attempt(target.id, generation);
        let done = self.upload_whole_as(target, &ctx, &rules, generation, mtime_ms, plain).await?;
        // Its generation is what this machine knows of it from now on: the
        // server cannot serve its first, empty manifest instead.
        self.note_generation(target.id, generation);
        Ok(done)
    }

    async fn upload_whole_as(
        &self,
        target: &FileInfo,
        ctx: &FileContext,
        rules: &VaultPolicy,
        generation: u64,
        mtime_ms: i64,
        plain: &[u8],
    ) -> Result<(crate::protocol::UploadResult, Sealed)> {
        let ctx = *ctx;
        if rules.encrypts(plain.len() as u64) {
            let key = self
                .account
                .wallet()
                .active_key(ctx.vault)
                .ok_or_else(|| FsError::Access("no key for this vault".into()))?;
            let body = encrypt_file(key, &ctx, generation, plain, &mut OsRandom)
                .map_err(|e| FsError::Io(e.to_string()))?;
            let header = crypto::peek_header(&body).map_err(|e| FsError::Io(e.to_string()))?;
            let manifest = FileManifest {
                generation,
                length: plain.len() as u64,
                mode: crypto::ContentMode::EndToEnd { upload: header.upload_id },
            };
            let meta = self.seal_manifest(&ctx, &manifest)?;
            let body = UploadBody::from_bytes(body).with_meta(meta.clone());
            let done = self.remote().upload(target.id, target.version, true, Some(mtime_ms), body).await?;
            return Ok((done, meta));
        }
        let mut tagger = crypto::PieceTagger::new(&mut OsRandom).map_err(|e| FsError::Io(e.to_string()))?;
        tagger.update(plain).map_err(|e| FsError::Io(e.to_string()))?;
        let tags = tagger.finish().map_err(|e| FsError::Io(e.to_string()))?;
        // Not end-to-end encrypted: the server gets these bytes anyway.
        let body = UploadBody::from_bytes(plain.to_vec());
        let staged = self.remote().stage(target.id, target.version, false, body).await?;
        let upload = PlainUpload { generation, length: plain.len() as u64, mtime_ms, copy: None };
        self.commit_plain(target, target.version, staged, tags, upload).await
    }

    async fn save_conflict_copy(&self, ino: Ino, info: &FileInfo, plain: &[u8]) -> Result<()> {
        let (parent, name) = {
            let tree = lock(&self.tree);
            (tree.parent_of(ino).ok_or(FsError::NotFound)?, tree.names.get(&ino).cloned().unwrap_or_default())
        };
        let copy_name = conflict_name(&name, SystemTime::now());
        let (copy_ino, copy) = self.new_file(parent, &copy_name).await?;
        let (done, meta) = self.upload_whole(&copy, 2, now_ms(), plain).await?;
        let e2e = self.vault_policy(info.vault).encrypts(plain.len() as u64);
        self.set_file_info(copy_ino, |i| {
            i.version = done.version;
            i.size = done.size;
            i.e2e = e2e;
            i.meta = meta;
        });
        tracing::warn!(file = %info.id, copy = %copy.id, name = %super::lognames::shown(&copy_name), "conflict copy saved");
        let _ = self.load_vault(info.vault, true).await;
        Ok(())
    }

    /// fsync: uploads changes, ends a pass-through stream, and returns once the
    /// server has stored them.
    pub async fn flush(&self, ino: Ino, fh: u64) -> Result<()> {
        self.save(ino, fh, false).await
    }

    /// Close of one descriptor (FUSE flush): uploads changes and returns once
    /// the server has stored them.
    ///
    /// The kernel sends a flush for *every* close of a descriptor, including the
    /// copies a fork hands to a child that then execs, so a flush can arrive in
    /// the middle of a write. For files in the cache that only stores a snapshot.
    /// A pass-through stream, though, cannot be resumed once ended, so a close
    /// leaves it running; it ends at fsync, or at release, when the last
    /// descriptor is gone. (Ending it at the opener's close, told apart by
    /// process id, corrupted a 250 MB file in one loaded CI run that I could not
    /// reproduce, so that is not done.)
    pub async fn close(&self, ino: Ino, fh: u64) -> Result<()> {
        self.save(ino, fh, true).await
    }

    async fn save(&self, ino: Ino, fh: u64, closing: bool) -> Result<()> {
        let id = self.handle_file(fh)?;
        if lock(&self.streams).contains_key(&id) {
            if closing {
                tracing::debug!(file = %id, "close of a streaming file: the stream goes on until release");
                return Ok(());
            }
            return self.finish_stream(id).await.map(|_| ());
        }
        if lock(&self.pass_reads).contains_key(&fh) {
            return Ok(());
        }
        let handle = self.cache.peek(id).ok_or(FsError::Io("file data evicted while open".into()))?;
        self.upload(ino, &handle).await
    }

    /// Last close of a handle. Changes that could not be uploaded stay in memory
    /// and are retried in the background until they are stored.
    pub async fn release(self: &Arc<Self>, ino: Ino, fh: u64) -> Result<()> {
        let id = lock(&self.handles).remove(&fh).ok_or(FsError::Invalid("bad file handle".into()))?;
        lock(&self.pass_reads).remove(&fh);
        if !lock(&self.handles).values().any(|f| *f == id) {
            self.finish_stream(id).await?;
        }
        let last = !lock(&self.handles).values().any(|f| *f == id);
        if last && lock(&self.orphans).remove(&ino) {
            // The last handle of an unlinked file: now it goes.
            lock(&self.tree).nodes.remove(&ino);
            self.forget_unsaved(id);
            self.cache.remove(id);
            return Ok(());
        }
        let dirty = match self.cache.peek(id) {
            Some(h) => h.lock().await.dirty,
            None => false,
        };
        if dirty {
            let fs = Arc::clone(self);
            tokio::spawn(async move { fs.retry_upload(ino, id).await });
        } else {
            self.cache.unpin(id);
        }
        Ok(())
    }

    async fn retry_upload(self: Arc<Self>, ino: Ino, id: FileId) {
        let mut wait = Duration::from_secs(1);
        loop {
            let Some(handle) = self.cache.peek(id) else { return };
            match self.upload(ino, &handle).await {
                Ok(()) => break,
                Err(e) if e.is_permanent() => {
                    // Sending the same bytes again cannot succeed (too large,
                    // refused, not allowed): no retry loop. The data stays in
                    // memory, unsaved; unmount reports it.
                    tracing::error!(file = %id, error = %e, "upload refused; the file stays unsaved in memory");
                    break;
                }
                Err(e) => {
                    tracing::warn!(file = %id, error = %e, "upload still failing; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            }
        }
        self.cache.unpin(id);
    }

    /// Uploads every file with unsaved changes (before unmount). Returns how many
    /// could not be saved.
    pub async fn flush_all(&self) -> usize {
        let mut failed = 0;
        let streaming: Vec<FileId> = lock(&self.streams).keys().copied().collect();
        for id in streaming {
            if let Err(e) = self.finish_stream(id).await {
                tracing::error!(file = %id, error = %e, "streaming upload failed before unmount");
                failed += 1;
            }
        }
        // Streams being finished by a release elsewhere: wait until they commit,
        // or leaving now would abort them.
        let mut waited = Duration::ZERO;
        while !lock(&self.streams).is_empty() {
            if waited.as_secs() > 0 && waited.as_millis() % 5000 == 0 {
                tracing::info!(
                    "waiting for {} upload(s) to finish before unmounting",
                    lock(&self.streams).len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
        let dirty = self.cache.dirty_ids();
        for (id, handle) in dirty {
            let ino = lock(&self.tree).keys.get(&Key::File(id)).copied();
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
        failed
    }

    // ---- unlink and rename ---------------------------------------------------

    /// Removes a file.
    pub async fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.load_dir(parent).await?;
        self.deletable(parent)?;
        let (ino, info) = {
            let tree = lock(&self.tree);
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            match tree.node(ino)? {
                Node::File { info, .. } => (ino, info.clone()),
                _ => return Err(FsError::IsDir),
            }
        };
        self.delete_file(&info).await?;
        let open = lock(&self.handles).values().any(|f| *f == info.id);
        let mut tree = lock(&self.tree);
        tree.unlink_ino(ino);
        self.touch_dir(parent);
        if open {
            // Open handles keep reading and writing until they close (POSIX).
            lock(&self.orphans).insert(ino);
            return Ok(());
        }
        tree.nodes.remove(&ino);
        drop(tree);
        self.forget_unsaved(info.id);
        self.cache.remove(info.id);
        Ok(())
    }

    async fn delete_file(&self, info: &FileInfo) -> Result<()> {
        match self.remote().delete_file(info.id, info.version).await {
            Err(RemoteError::Conflict { .. }) => {
                // Changed meanwhile (renamed, touched): unlink removes it regardless.
                let fresh = self.fetch_file(info).await?;
                Ok(self.remote().delete_file(info.id, fresh.version).await?)
            }
            other => Ok(other?),
        }
    }

    /// Renames or moves within a vault; across vaults it fails with EXDEV so that
    /// `mv` copies and deletes instead.
    pub async fn rename(
        self: &Arc<Self>,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        self.rename_entry(parent, name, new_parent, new_name).await?;
        self.touch_dir(parent);
        self.touch_dir(new_parent);
        Ok(())
    }

    async fn rename_entry(
        self: &Arc<Self>,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        check_name(new_name)?;
        self.load_dir(parent).await?;
        self.load_dir(new_parent).await?;
        self.writable(parent)?;
        self.writable(new_parent)?;
        self.load_dir(new_parent).await?;
        let (ino, node, target, dest) = {
            let tree = lock(&self.tree);
            let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
            let node = tree.node(ino)?.clone();
            let target = tree.child(new_parent, new_name).map(|t| (t, tree.nodes.get(&t).cloned()));
            (ino, node, target, tree.node(new_parent)?.clone())
        };
        if node.vault() != dest.vault() {
            return Err(match dest {
                Node::Root => FsError::NotPermitted("vaults are top-level only".into()),
                _ => FsError::CrossDevice,
            });
        }
        if let Some((t, _)) = target {
            if t == ino {
                return Ok(());
            }
        }
        match node {
            Node::Root | Node::Vault { .. } => {
                Err(FsError::NotPermitted("vaults are renamed with the CLI".into()))
            }
            Node::Record { info, .. } => {
                let new_record_parent = match &dest {
                    Node::Vault { .. } => None,
                    Node::Record { info: p, .. } => Some(p.id),
                    _ => return Err(FsError::NotDir),
                };
                if let Some((t, tnode)) = target {
                    match tnode {
                        Some(Node::Record { info: tinfo, .. }) => {
                            if lock(&self.tree).children.get(&t).is_some_and(|k| !k.is_empty()) {
                                return Err(FsError::NotEmpty);
                            }
                            self.remote().delete_record(tinfo.id, tinfo.version).await?;
                            lock(&self.tree).unlink_ino(t);
                        }
                        _ => return Err(FsError::NotDir),
                    }
                }
                let title = self.seal(
                    info.vault,
                    NameContext::RecordTitle { vault: info.vault, record: info.id },
                    new_name,
                )?;
                let update = RecordUpdate {
                    title: Some(title),
                    fields: None,
                    parent: (new_parent != parent).then_some(ParentChange { to: new_record_parent }),
                };
                let updated = self.remote().update_record(info.id, info.version, update).await?;
                if updated.id != info.id || updated.vault != info.vault {
                    return Err(FsError::Io("the server answered for another record".into()));
                }
                lock(&self.tree).link(
                    new_parent,
                    new_name.to_os_string(),
                    ino,
                    Node::Record { info: updated, parent: new_parent },
                );
                Ok(())
            }
            Node::File { info, .. } => {
                let (_, new_record) = self.file_parent(new_parent)?;
                if let Some((_, tnode)) = &target {
                    match tnode {
                        Some(Node::File { info: tinfo, .. }) => {
                            // rename(2) replaces the target.
                            self.delete_file(tinfo).await?;
                            let t = target.as_ref().map(|(t, _)| *t).unwrap_or_default();
                            let mut tree = lock(&self.tree);
                            tree.unlink_ino(t);
                            tree.nodes.remove(&t);
                        }
                        _ => return Err(FsError::IsDir),
                    }
                }
                if new_record == info.record {
                    let sealed = self.seal(
                        info.vault,
                        NameContext::FileName { vault: info.vault, record: info.record, file: info.id },
                        new_name,
                    )?;
                    let updated = self
                        .remote()
                        .update_file(
                            info.id,
                            info.version,
                            FileUpdate { name: Some(sealed), ..Default::default() },
                        )
                        .await?;
                    let updated = check_file_answer(info.id, info.vault, updated)?;
                    bump_cached_version(&self.cache, info.id, info.version, updated.version).await;
                    let node = self.file_node(updated, new_parent);
                    lock(&self.tree).link(new_parent, new_name.to_os_string(), ino, node);
                    Ok(())
                } else {
                    self.move_file(ino, &info, new_parent, new_name).await
                }
            }
        }
    }

    /// Moves a file to another record. Content is bound to its record, so the file
    /// is written anew under the target record (new id) and the old one deleted:
    /// a reader sees the old file or the complete new one, never a half.
    async fn move_file(
        self: &Arc<Self>,
        ino: Ino,
        info: &FileInfo,
        new_parent: Ino,
        new_name: &OsStr,
    ) -> Result<()> {
        let handle = self.cache.pin(info.id);
        let result = async {
            let (mut d, _) = self.ready(info.id, &handle, None).await?;
            if !d.dirty && d.version != info.version {
                d.loaded = false; // stale: download the current version
                drop(d);
                d = self.ready(info.id, &handle, None).await?.0;
            }
            let (new_ino, created) = self.new_file(new_parent, new_name).await?;
            let (done, meta) = self.upload_whole(&created, 2, info.mtime_ms, &d.bytes).await?;
            let mut moved = created.clone();
            moved.version = done.version;
            moved.size = done.size;
            moved.e2e = self.vault_policy(info.vault).encrypts(d.bytes.len() as u64);
            moved.mtime_ms = info.mtime_ms;
            moved.meta = meta;
            self.delete_file(info).await?;
            // The kernel keeps the old inode number for the renamed entry, so the
            // new file takes it over; open handles and cached data follow.
            {
                let mut tree = lock(&self.tree);
                tree.unlink_ino(new_ino);
                tree.nodes.remove(&new_ino);
                tree.keys.remove(&Key::File(info.id));
                tree.keys.insert(Key::File(created.id), ino);
                tree.link(
                    new_parent,
                    new_name.to_os_string(),
                    ino,
                    self.file_node(moved.clone(), new_parent),
                );
            }
            for file in lock(&self.handles).values_mut() {
                if *file == info.id {
                    *file = created.id;
                }
            }
            d.version = moved.version;
            d.dirty = false;
            self.forget_unsaved(info.id);
            Ok::<_, FsError>(created.id)
        }
        .await;
        match result {
            Ok(new_id) => {
                self.cache.rename(info.id, new_id);
                self.cache.unpin(new_id);
                Ok(())
            }
            Err(e) => {
                self.cache.unpin(info.id);
                Err(e)
            }
        }
    }

    // ---- extended attributes and statfs ----------------------------------------

    fn sync_state(&self, id: FileId) -> SyncState {
        if lock(&self.uploading).contains_key(&id) {
            return SyncState::Uploading;
        }
        // Unsaved changes always have an entry in `local_sizes`; the data's
        // lock may be held by a write or an upload, so it is not asked.
        if lock(&self.local_sizes).contains_key(&id) {
            return SyncState::Dirty;
        }
        match self.cache.peek(id).and_then(|h| h.try_lock().ok().map(|d| d.dirty)) {
            Some(true) => SyncState::Dirty,
            _ => SyncState::Clean,
        }
    }

    /// What `vaultfs status` shows.
    pub fn status(&self) -> FsStatus {
        let stats = self.cache.stats();
        let uploads = lock(&self.uploading)
            .iter()
            .map(|(id, p)| (*id, p.sent.load(Ordering::Relaxed), p.total))
            .collect::<Vec<_>>();
        let tree = lock(&self.tree);
        let uploads = uploads
            .into_iter()
            .map(|(id, sent, total)| {
                let name = tree
                    .keys
                    .get(&Key::File(id))
                    .and_then(|ino| tree.names.get(ino))
                    .map_or_else(|| id.to_string(), |n| n.to_string_lossy().into_owned());
                UploadStatus { name, sent, total }
            })
            .collect();
        FsStatus {
            cache_used: stats.used as u64,
            cache_budget: stats.budget as u64,
            cached_files: stats.entries as u64,
            unsaved: self.cache.dirty_ids().len() as u64,
            uploads,
            refused: lock(&self.refusals).iter().cloned().collect(),
        }
    }

    /// Names of the extended attributes of `ino`.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<&'static str>> {
        match lock(&self.tree).node(ino)? {
            Node::File { .. } => Ok(vec![XATTR_E2E, XATTR_STATE, XATTR_VERSION, XATTR_ID]),
            Node::Root => Ok(Vec::new()),
            _ => Ok(vec![XATTR_ID]),
        }
    }

    /// Value of an extended attribute.
    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        if name == XATTR_ID {
            let id = match lock(&self.tree).nodes.get(&ino) {
                Some(Node::Vault { vault }) => vault.to_string(),
                Some(Node::Record { info, .. }) => info.id.to_string(),
                Some(Node::File { info, .. }) => info.id.to_string(),
                Some(Node::Root) => return Err(FsError::NoAttr),
                None => return Err(FsError::NotFound),
            };
            return Ok(id.into_bytes());
        }
        let (info, e2e) = match lock(&self.tree).node(ino)? {
            Node::File { info, meta, .. } => (info.clone(), meta.manifest().map_or(info.e2e, |m| m.is_e2e())),
            _ => return Err(FsError::NoAttr),
        };
        let value = match name.to_str() {
            // New files are created end-to-end; a file stops being so the moment it
            // starts streaming as pass-through (set in start_stream).
            // (A listing refresh may bring back the server's view of a file that is
            // streaming right now, so the stream itself is asked too.)
            Some(XATTR_E2E) => {
                let streaming = lock(&self.streams).contains_key(&info.id);
                if e2e && !streaming { "1" } else { "0" }.to_string()
            }
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

async fn bump_cached_version(cache: &PlainCache, id: FileId, from: u64, to: u64) {
    if let Some(h) = cache.peek(id) {
        let mut d = h.lock().await;
        if d.version == from {
            d.version = to;
        }
    }
}

/// Refuses a file of `size` bytes where the vault's policy does: a read-only
/// vault (EROFS), or a size the vault cannot store without breaking a rule
/// (EFBIG: above the upload limit, or above the end-to-end limit where such
/// files are refused or the server marks the vault end-to-end only, or within
/// the policy's end-to-end limit but above the server's: never plaintext).
fn check_size(rules: &VaultPolicy, size: u64) -> Result<()> {
    if rules.read_only {
        return Err(FsError::ReadOnly);
    }
    rules.check_size(size).map_err(|why| FsError::TooBig(why.to_string()))
}

/// Refuses file metadata the server gave for another file or vault than the
/// one asked about: paired with this file's name or manifest check, it could
/// show one file's content under another's name, or put a file under another
/// vault's key, policy and manifest rule.
fn check_file_answer(id: FileId, vault: VaultId, info: FileInfo) -> Result<FileInfo> {
    if info.id != id || info.vault != vault {
        tracing::error!(file = %id, answered = %info.id, "the server answered with another file's metadata; refused");
        return Err(FsError::Integrity {
            what: format!("the metadata of file {id}"),
            source: crypto::CryptoError::Integrity(crypto::IntegrityFailure::Authentication),
        });
    }
    Ok(info)
}

/// The stand-in name of an entry whose real name failed its check.
fn unreadable_name(kind: &str, id: &str) -> String {
    format!("UNREADABLE {kind} {}", id.get(..12).unwrap_or(id))
}

/// Records whether `ino`'s name failed its check, and which object it is.
fn mark_unreadable(tree: &mut Tree, ino: Ino, failed: Option<String>) {
    match failed {
        Some(what) => tree.unreadable.insert(ino, what),
        None => tree.unreadable.remove(&ino),
    };
}

/// What a read returns. Drop it as soon as the bytes are sent: a window of
/// cached plaintext keeps the file's lock until then, and a download filling
/// the file waits for it.
pub enum ReadData {
    /// A window of a file's plaintext in the cache, handed to the kernel while
    /// the file's lock is held: no copy, and no copy left in freed memory.
    Plain {
        /// The file's data, locked.
        data: tokio::sync::OwnedMutexGuard<PlainData>,
        /// The window (clipped to the end of the file).
        range: Range<usize>,
    },
    /// Bytes fetched from the server for a file passed through (not end-to-end
    /// encrypted).
    Fetched(bytes::Bytes),
}

impl ReadData {
    /// Up to `size` bytes of `data` at `offset` (none past the end).
    fn plain(data: tokio::sync::OwnedMutexGuard<PlainData>, offset: u64, size: u32) -> Self {
        let len = data.bytes.len() as u64;
        let start = offset.min(len);
        let end = offset.saturating_add(u64::from(size)).min(len);
        ReadData::Plain { data, range: start as usize..end as usize }
    }
}

impl std::ops::Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Plain { data, range } => &data.bytes[range.clone()],
            ReadData::Fetched(bytes) => bytes,
        }
    }
}

impl<T: AsRef<[u8]> + ?Sized> PartialEq<T> for ReadData {
    fn eq(&self, other: &T) -> bool {
        **self == *other.as_ref()
    }
}

impl std::fmt::Debug for ReadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadData({} bytes)", self.len())
    }
}

/// `report.pdf` -> `report (conflict 2026-11-23 051500).pdf`.
pub fn conflict_name(name: &OsStr, when: SystemTime) -> OsString {
    let secs = when.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let stamp = format!("{y:04}-{m:02}-{d:02} {:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    let bytes = name.as_bytes();
    let dot = bytes.iter().rposition(|&c| c == b'.').filter(|&i| i > 0);
    let (stem, ext) = match dot {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &b""[..]),
    };
    let mut out = stem.to_vec();
    out.extend_from_slice(format!(" (conflict {stamp})").as_bytes());
    out.extend_from_slice(ext);
    OsString::from_vec(out)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_keep_the_extension() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_410_900); // 2026-11-23 05:15:00
        assert_eq!(conflict_name(OsStr::new("report.pdf"), t), "report (conflict 2026-11-23 051500).pdf");
        assert_eq!(conflict_name(OsStr::new("notes"), t), "notes (conflict 2026-11-23 051500)");
        assert_eq!(conflict_name(OsStr::new(".bashrc"), t), ".bashrc (conflict 2026-11-23 051500)");
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
