//! The filesystem core: vaults, records and files as a directory tree, with
//! decryption on open and encryption and upload on flush. It knows nothing of
//! FUSE (super::fuse forwards the kernel's requests) and is generic over the
//! [`Remote`], so tests run it against the in-memory and failure-injecting
//! remotes.
//!
//! Data flow, and the file that owns each step and its state:
//!
//! | step | file | owns |
//! |---|---|---|
//! | name → inode: the namespace built from the server's listings | `tree.rs`, `namespace.rs` | [`tree::Tree`] |
//! | open directories: the listing each pass of readdir reads by position | `listings.rs` | [`listings::Listings`] |
//! | records as directories: mkdir, rmdir; new ones known only here until their first file (or a moment) sends them | `dirs.rs` | [`dirs::NewDirs`] |
//! | the server's changes while mounted: long poll, catching up, telling the kernel | `follow.rs` | [`follow::Feed`] |
//! | what the mount policies allow in each vault | `rules.rs` | [`rules::Rules`] |
//! | attributes and times | `attr.rs` | [`attr::Times`] |
//! | create and open: handle → file and how it reads | `open.rs`, `handles.rs` | [`handles::Handles`] |
//! | plaintext the kernel reads itself (passthrough): memfd copies that follow every change | `backing.rs` | [`backing::Backing`] (held in the handle table) |
//! | server → plaintext: download, check, decrypt into the cache | `fill.rs` | running fills |
//! | server → bytes for files above the end-to-end limit | `passread.rs` | each handle's read window |
//! | reads and writes | `io.rs` | |
//! | what each file is doing: cached, sequential, streaming; unsaved; uploading | `mode.rs` | [`mode::FileModes`] |
//! | plaintext → server while written (files above the limit) | `stream.rs` | |
//! | plaintext → server on flush, fsync, release; conflicts; retries | `save.rs`, `seal.rs` | |
//! | symbolic links: symlink, readlink | `links.rs` | |
//! | flock and POSIX locks across clients: leases on the server, renewed | `locks.rs` | [`locks::LockTable`] |
//! | new files known only here until their first save creates them with their content | `unsent.rs` | [`unsent::Creates`] |
//! | unlink and rename | `rename.rs` | |
//! | deleting unlinked files and removed records on the server in the background, many per request | `deletes.rs` | [`deletes::Deletes`] (the objects waiting: [`tree::Tree`]) |
//! | `vaultfs status` and the `user.vaultfs.*` attributes | `status.rs` | [`status::Refusals`] |
//!
//! A file's plaintext lives in the memory-only [`PlainCache`], each file
//! behind its own async mutex; what this machine remembers of the server's
//! generations is the [`Freshness`].
//!
//! Lock order. Outermost first:
//! 0. a lock owner's gate (async, per file and owner, in `locks`: held while
//!    one request of that owner is sent, waited on and followed up, which
//!    takes the file's plaintext);
//! 1. a file's plaintext (async, per file; held across awaits while the file
//!    is loaded, changed or uploaded, which orders those steps per file; no
//!    task holds two files' plaintext at once);
//! 2. a new record's sending lock (async, per record, in `new_dirs`: held
//!    while the request that creates it is sent, so it is created once; no
//!    task holds two: the records above it are sent first, each under its
//!    own);
//! 3. a vault's loading lock (async, per vault, in `loading`: held while its
//!    listing or changes are fetched and applied, so one load of a vault runs
//!    at a time and those waiting find it fresh; nothing else async is taken
//!    under it);
//! 4. `tree`;
//! 5. leaf locks: `rules`, `handles`, `modes`, `times`, `fills`, `refusals`,
//!    `legacy_warned`, `loading`, `feed`, `creates`, `passthrough`, `listings`, the maps
//!    in `new_dirs` (its sending locks, the records to send later), those inside `locks` and each backing
//!    file (its mapping, its registration), the cache and the freshness
//!    state.
//!
//! The tree and every leaf lock are synchronous (`parking_lot`), never held
//! across an await (the compiler checks it: their guards are not `Send`), and
//! a leaf lock is never held while another lock is taken. The tree's lock is
//! not reentrant: code that holds it calls only functions that do not take it.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::error::{FsError, Result};
use super::freshness::Freshness;
use crate::cache::PlainCache;
use crate::crypto;
use crate::ids::{FileId, VaultId};
use crate::policy::Policy;
use crate::protocol::{FileInfo, Limits};
use crate::remote::account::Unlocked;
use crate::remote::Remote;

mod attr;
mod backing;
mod deletes;
mod dirs;
mod fill;
mod follow;
mod handles;
mod io;
mod links;
mod listings;
mod locks;
mod mode;
mod namespace;
mod open;
mod passread;
mod rename;
mod rules;
mod save;
mod seal;
mod status;
mod stream;
mod tree;
mod unsent;

pub use backing::{Backing, KernelOpen, OpenHow, PassthroughMode, PASSTHROUGH_MIN};
pub use deletes::DELETES_IN_FLIGHT;
pub use dirs::SEND_NEW_DIR_AFTER;
pub use io::ReadData;
use io::WriteData;
pub use listings::{Listing, ReadFrom};
pub use locks::{with_lock, LockConflict, LockKind, LockRequest};
pub use passread::READ_AHEAD;
pub use save::conflict_name;
pub use status::{
    FsStatus, SyncState, UploadProgress, UploadStatus, XATTR_E2E, XATTR_ID, XATTR_LOCKS, XATTR_STATE,
    XATTR_VERSION,
};

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

/// The largest server version a new generation is derived from: far above
/// any real count of changes, far below where the counter would run out.
const MAX_SERVER_VERSION: u64 = 1 << 48;

/// Pieces an upload body is sent in, so progress can be counted.
const UPLOAD_PIECE: usize = 1 << 20;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory: the root, a vault or a record.
    Dir,
    /// A file linked to a record.
    File,
    /// A symbolic link in a record (a file whose manifest holds its target).
    Symlink,
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

/// What the kernel is told to forget when the server's state changed under
/// it (FUSE notifications), so `stat`, `ls`, reads and inotify watchers see
/// the new state without waiting for a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// A node's attributes and cached pages (a new version).
    Inode(Ino),
    /// A name in a directory: now another node's, or new.
    Entry {
        /// The directory.
        parent: Ino,
        /// The name.
        name: std::ffi::OsString,
    },
    /// Not a notification: the ones before it in the batch were sent.
    Told(Told),
    /// A name gone from a directory, with the node it named (inotify watchers
    /// of the directory are told).
    Deleted {
        /// The directory.
        parent: Ino,
        /// The node the name was.
        child: Ino,
        /// The name.
        name: std::ffi::OsString,
    },
}

/// Said once the notifications before it were sent to the kernel.
#[derive(Debug, Clone, Default)]
pub struct Told(Arc<tokio::sync::Notify>);

impl Told {
    /// The notifications before it were sent.
    pub fn done(&self) {
        self.0.notify_one();
    }
}

impl PartialEq for Told {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Told {}

/// A directory entry: inode, kind and name.
pub type Entry = (Ino, Kind, std::ffi::OsString);
/// A directory entry with its attributes, `None` if its name failed its check.
pub type EntryPlus = (Ino, Kind, std::ffi::OsString, Option<Attr>);

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
    /// Keep locks on this machine only (the kernel's), not on the server.
    pub local_locks: bool,
    /// Let the kernel read files open for reading from memory itself
    /// (passthrough, where it allows: super::backing).
    pub passthrough: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            cache_budget: crate::policy::DEFAULT_CACHE_BUDGET as usize,
            policy: Policy::default(),
            confirmed_for: CONFIRMED_FOR,
            freshness: None,
            local_locks: false,
            passthrough: true,
        }
    }
}

/// The filesystem: the parts below, each owned by one file (see the table
/// above).
pub struct VaultFs<R> {
    /// The user's wallet (vault keys) and the remote.
    account: Unlocked<R>,
    /// Mount policies resolved per vault, and the user's limits.
    rules: rules::Rules,
    /// The namespace.
    tree: Mutex<tree::Tree>,
    /// Decrypted plaintext, memory only.
    cache: PlainCache,
    /// Open handles.
    handles: handles::Handles,
    /// What each file is doing besides being cached.
    modes: mode::FileModes,
    /// Directory and access times kept by this mount.
    times: attr::Times,
    /// Downloads being decrypted into the cache, by file.
    fills: Mutex<std::collections::HashMap<FileId, Arc<fill::Fill>>>,
    /// Highest generation seen per file (and wallet revision), remembered
    /// across mounts where a state file is kept: an older one is a replay.
    freshness: Arc<Freshness>,
    /// The latest checks that failed (tampering, replays), for `vaultfs status`.
    refusals: status::Refusals,
    /// Vaults whose files without manifests were logged (once per mount).
    legacy_warned: Mutex<HashSet<VaultId>>,
    /// See [`FsOptions::confirmed_for`].
    confirmed_for: Duration,
    /// Told what the kernel must forget: a file whose content we replaced
    /// behind its back (a reduced image), what other clients changed.
    invalidate: OnceLock<Box<dyn Fn(Vec<Invalidation>) + Send + Sync>>,
    /// Whether the change feed is live (see `follow.rs`).
    feed: follow::Feed,
    /// The locks this mount holds on the server.
    locks: locks::LockTable,
    /// Each vault's loading lock (see the lock order).
    loading: Mutex<std::collections::HashMap<VaultId, Arc<tokio::sync::Mutex<()>>>>,
    /// What directories show as their time until this mount changes them.
    mounted_at: SystemTime,
    /// Whether the server creates a file with its content in one request.
    creates: unsent::Creates,
    /// Whether the kernel reads from backing files, and how often it did.
    passthrough: backing::Passthrough,
    /// Deletes of unlinked files on their way to the server.
    deletes: deletes::Deletes,
    /// Records made here on their way to the server (one request at a time each).
    new_dirs: dirs::NewDirs,
    /// Open directories and the listing each is reading.
    listings: listings::Listings,
}

impl<R: Remote> VaultFs<R> {
    /// A filesystem over an unlocked account.
    pub async fn new(account: Unlocked<R>, options: FsOptions) -> Result<Self> {
        let limits = account.remote.me().await?.limits;
        let fs = VaultFs {
            account,
            rules: rules::Rules::new(options.policy, limits),
            tree: Mutex::new(tree::Tree::new()),
            cache: PlainCache::new(options.cache_budget),
            handles: handles::Handles::new(),
            modes: mode::FileModes::new(),
            times: attr::Times::default(),
            fills: Mutex::new(std::collections::HashMap::new()),
            freshness: options.freshness.unwrap_or_else(|| Arc::new(Freshness::memory())),
            refusals: status::Refusals::default(),
            legacy_warned: Mutex::new(HashSet::new()),
            confirmed_for: options.confirmed_for,
            invalidate: OnceLock::new(),
            feed: follow::Feed::default(),
            locks: locks::LockTable::new(),
            loading: Mutex::new(std::collections::HashMap::new()),
            mounted_at: SystemTime::now(),
            creates: unsent::Creates::default(),
            passthrough: backing::Passthrough::new(options.passthrough),
            deletes: deletes::Deletes::default(),
            new_dirs: dirs::NewDirs::default(),
            listings: listings::Listings::default(),
        };
        if !options.local_locks {
            fs.start_locks().await;
        }
        Ok(fs)
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
        self.rules.limits()
    }

    /// Sets what is told what the kernel must forget (the FUSE adapter sends
    /// it notifications). It must not block: it may be called while a request
    /// on the same inode is in flight.
    pub fn set_invalidator(&self, f: Box<dyn Fn(Vec<Invalidation>) + Send + Sync>) {
        let _ = self.invalidate.set(f);
    }

    /// Tells the kernel what to forget (nothing without a mount).
    fn tell_kernel(&self, what: Vec<Invalidation>) {
        if what.is_empty() {
            return;
        }
        if let Some(invalidate) = self.invalidate.get() {
            invalidate(what);
        }
    }

    /// Tells the kernel what to forget and waits until it was told (for at
    /// most [`locks::KERNEL_TOLD_WITHIN`]): what a caller reads next must not
    /// come from pages it dropped.
    async fn tell_kernel_now(&self, mut what: Vec<Invalidation>) {
        let Some(invalidate) = self.invalidate.get() else { return };
        let told = Told::default();
        what.push(Invalidation::Told(told.clone()));
        invalidate(what);
        let _ = tokio::time::timeout(locks::KERNEL_TOLD_WITHIN, told.0.notified()).await;
    }

    /// The plaintext cache (for status).
    pub fn cache(&self) -> &PlainCache {
        &self.cache
    }
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
