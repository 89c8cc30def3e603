//! `vaultfs admin backup DIR` and `vaultfs admin restore DIR`: a consistent
//! copy of a server's data taken while it runs, and the way back onto an
//! empty data directory.
//!
//! Backup: a *hold* on blob deletion is written to the live database first
//! (`meta/backup.rs` says why that makes the copy consistent), then SQLite's
//! online backup copies the database as it is at one instant, then every
//! blob that copy names is read from the store (local or S3) into `DIR/blobs`
//! with its SHA-256, with the TLS certificate and key the server made for
//! itself (a restored server keeps the fingerprint its clients pinned); the
//! manifest (`vaultfs-backup.json`: each file's length and hash) is written
//! last, so a backup without one did not finish. The hold ends, and the
//! server deletes what it held.
//!
//! Restore: the manifest and the database are checked (hash, SQLite's
//! integrity check, every blob it names listed) before anything is written;
//! then each blob goes into the target store with its hash checked on the
//! way, the database last; then the restored database is opened as the
//! server opens it and every blob it names is looked for in the store. Any
//! failure takes back what the restore wrote: the data directory is as
//! empty as it was.
//!
//! The server holds only ciphertext and sealed names, and so does a backup;
//! but it also holds the server's TLS key and its users' login hashes: keep
//! it as the server's own disk is kept.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::blob::{BlobError, BlobId, BlobStore, ByteStream, LocalBlobStore};
use super::config::{ServerConfig, StorageBackend};
use super::meta::{self, Meta, MetaError, MetaStore};
use super::META_FILE;
use crate::ids::hex_encode;

/// The manifest's name in a backup directory; written last.
pub const MANIFEST: &str = "vaultfs-backup.json";
/// The manifest format this version writes and reads.
const FORMAT: u32 = 1;
/// How long a hold lasts unless renewed: a backup that died stops holding
/// blobs after this.
const HOLD_FOR: Duration = Duration::from_secs(600);
/// How often a running backup renews its hold.
const RENEW_EVERY: Duration = Duration::from_secs(60);

/// Errors of a backup or a restore; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target is not new and empty, or overlaps the source: nothing
    /// was written.
    #[error("{0}")]
    Target(String),
    /// The backup is incomplete or altered: nothing was restored.
    #[error("damaged backup: {0}")]
    Damaged(String),
    /// A blob the snapshot names left the store during the backup (its
    /// hold lapsed, or something else deleted it).
    #[error("blob {0} went from the store during the backup; run it again")]
    Gone(String),
    /// Reading or writing a file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: io::Error,
    },
    /// The metadata database.
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    /// A blob store.
    #[error("blob {id}: {source}")]
    Blob {
        /// The blob (hex).
        id: String,
        /// The failure.
        source: BlobError,
    },
    /// Opening a blob store.
    #[error("blob store: {0}")]
    Store(BlobError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

fn blob_err(id: BlobId) -> impl FnOnce(BlobError) -> BackupError {
    move |source| BackupError::Blob { id: id.to_hex(), source }
}

/// What a backup holds, and how to check it.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// The version of vaultfs that wrote it.
    vaultfs: String,
    /// When the snapshot was taken (Unix seconds).
    created_unix: i64,
    metadata: Piece,
    /// The server's own TLS certificate and key, where it made them (see
    /// [`KEPT`]): a restored server keeps the fingerprint clients pinned.
    #[serde(default)]
    files: Vec<Piece>,
    blobs: Vec<Piece>,
}

/// Files of the data directory a backup keeps besides the database and
/// the blobs, by their path in it.
const KEPT: [&str; 2] = ["tls/cert.pem", "tls/key.pem"];

/// One file of a backup: the database or a kept file (`name` is its path
/// in the backup) or a blob (`name` is its id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Piece {
    name: String,
    len: u64,
    sha256: String,
}

/// What a finished backup or restore reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Files the database holds content for.
    pub blobs: usize,
    /// Bytes of content copied.
    pub bytes: u64,
    /// Blobs whose stored length differs from what their file records (a
    /// store damaged before the backup: copied as they are).
    pub odd_lengths: usize,
}

/// Backs up the server `config` describes into `dest`, which must be new or
/// empty. `bar` shows the bytes copied (hidden where nobody watches).
pub async fn backup(config: &ServerConfig, dest: &Path, bar: &ProgressBar) -> Result<Summary, BackupError> {
    let live = config.data_dir.join(META_FILE);
    if !live.exists() {
        return Err(BackupError::Target(format!(
            "{}: no vaultfs server data here (start `vaultfs serve` once, or pass --data-dir)",
            config.data_dir.display()
        )));
    }
    if nested(dest, &config.data_dir) {
        return Err(BackupError::Target(format!(
            "{}: overlaps the data directory {}; a backup goes elsewhere",
            dest.display(),
            config.data_dir.display()
        )));
    }
    let created = claim_empty(dest, "a backup goes into a new or empty directory")?;
    let result = match config.storage.backend {
        StorageBackend::Local => {
            let store = LocalBlobStore::open(&config.data_dir).map_err(io_err("opening the blob store"))?;
            backup_from(&config.data_dir, &store, dest, bar).await
        }
        StorageBackend::S3 => {
            let store = open_s3(config)?;
            backup_from(&config.data_dir, &store, dest, bar).await
        }
    };
    if result.is_err() {
        take_back(dest, created);
    }
    result
}

/// Restores the backup in `from` onto the server `config` describes: its
/// data directory must be new or empty, and its blob store empty.
pub async fn restore(config: &ServerConfig, from: &Path, bar: &ProgressBar) -> Result<Summary, BackupError> {
    if nested(from, &config.data_dir) {
        return Err(BackupError::Target(format!(
            "{}: overlaps the backup {}",
            config.data_dir.display(),
            from.display()
        )));
    }
    let manifest = read_manifest(from)?;
    let listed = check_database(from, &manifest)?;
    let created = claim_empty(&config.data_dir, "a restore goes into a new or empty data directory")?;
    let result = match config.storage.backend {
        StorageBackend::Local => match LocalBlobStore::open(&config.data_dir) {
            Ok(store) => restore_into(from, &manifest, &listed, &store, &config.data_dir, bar).await,
            Err(e) => Err(BackupError::Io { what: "opening the blob store".into(), source: e }),
        },
        StorageBackend::S3 => match open_s3(config) {
            Ok(store) => restore_into(from, &manifest, &listed, &store, &config.data_dir, bar).await,
            Err(e) => Err(e),
        },
    };
    if result.is_err() {
        take_back(&config.data_dir, created);
    }
    result
}

fn open_s3(config: &ServerConfig) -> Result<super::s3::S3BlobStore, BackupError> {
    // HTTPS to the store goes through reqwest with rustls (as in `serve`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    super::s3::S3BlobStore::open(&config.storage.s3, &config.data_dir).map_err(BackupError::Store)
}

/// Makes sure `dir` is an empty directory, and only its owner's (what it
/// will hold is the server's: login verifiers, its TLS key, and files
/// above the end-to-end limit, which are not encrypted); returns whether it
/// was made here.
fn claim_empty(dir: &Path, why: &str) -> Result<bool, BackupError> {
    if let Ok(found) = std::fs::symlink_metadata(dir) {
        // Not one someone else made (who could open it up again), nor a
        // link to one.
        // SAFETY: geteuid only reads the process's effective user id.
        #[allow(unsafe_code)]
        let me = unsafe { libc::geteuid() };
        if !found.is_dir() || std::os::unix::fs::MetadataExt::uid(&found) != me {
            return Err(BackupError::Target(format!(
                "{}: not a directory of this user's (uid {me}); {why}",
                dir.display()
            )));
        }
    }
    let created = match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => false,
            Some(_) => return Err(BackupError::Target(format!("{}: not empty; {why}", dir.display()))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            true
        }
        Err(e) => return Err(BackupError::Io { what: format!("reading {}", dir.display()), source: e }),
    };
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io_err(format!("setting permissions of {}", dir.display())))?;
    Ok(created)
}

/// Whether one of two directories is the other or within it, their links
/// resolved (a part not made yet is taken as named).
fn nested(a: &Path, b: &Path) -> bool {
    fn resolved(p: &Path) -> PathBuf {
        let whole = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut existing = whole.as_path();
        let mut rest = Vec::new();
        loop {
            if let Ok(mut found) = existing.canonicalize() {
                found.extend(rest.iter().rev());
                return found;
            }
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                _ => return whole,
            }
        }
    }
    let (a, b) = (resolved(a), resolved(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// Removes what a failed backup or restore wrote into `dir`, which was
/// empty (or not there) before it.
fn take_back(dir: &Path, created: bool) {
    let removed = if created {
        std::fs::remove_dir_all(dir)
    } else {
        std::fs::read_dir(dir).and_then(|entries| {
            for e in entries {
                let path = e?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
            Ok(())
        })
    };
    if let Err(e) = removed {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove what was written");
    }
}

/// A stream that hashes what passes and counts it on `bar`.
fn hashing(stream: ByteStream, bar: &ProgressBar) -> (ByteStream, Arc<parking_lot::Mutex<Sha256>>) {
    let hash = Arc::new(parking_lot::Mutex::new(Sha256::new()));
    let (h, bar) = (Arc::clone(&hash), bar.clone());
    let stream = stream.inspect(move |piece| {
        if let Ok(piece) = piece {
            h.lock().update(piece);
            bar.inc(piece.len() as u64);
        }
    });
    (Box::pin(stream), hash)
}

fn hex_of(hash: &parking_lot::Mutex<Sha256>) -> String {
    hex_encode(&hash.lock().clone().finalize())
}

/// Writes `bytes` to `path` durably (a temporary name, fsync, rename,
/// fsync of the directory).
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = path.with_extension("part");
    let what = format!("writing {}", path.display());
    let mut f = std::fs::File::create(&tmp).map_err(io_err(what.clone()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(what.clone()))?;
    std::fs::rename(&tmp, path).map_err(io_err(what.clone()))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), BackupError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(format!("syncing {}", dir.display())))
}

/// Length and SHA-256 of a file.
fn file_piece(path: &Path, name: &str) -> Result<Piece, BackupError> {
    let mut f = std::fs::File::open(path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut hash = Sha256::new();
    let len = io::copy(&mut f, &mut hash).map_err(io_err(format!("reading {}", path.display())))?;
    Ok(Piece { name: name.to_string(), len, sha256: hex_encode(&hash.finalize()) })
}

/// Copies a kept file (its mode too: a key stays owner-only) into a
/// directory of its own that only the owner reads, durably; returns what
/// the copy holds.
fn copy_kept(from: &Path, to: &Path, name: &str) -> Result<Piece, BackupError> {
    let what = format!("copying {} to {}", from.display(), to.display());
    if !std::fs::symlink_metadata(from).map_err(io_err(what.clone()))?.is_file() {
        return Err(BackupError::Damaged(format!("{} is not a regular file", from.display())));
    }
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(what.clone()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_err(what.clone()))?;
    }
    std::fs::copy(from, to).and_then(|_| std::fs::File::open(to)?.sync_all()).map_err(io_err(what))?;
    sync_dir(to)?;
    file_piece(to, name)
}

fn now_ms() -> i64 {
    crate::protocol::now_ms()
}

async fn backup_from<B: BlobStore>(
    data_dir: &Path,
    store: &B,
    dest: &Path,
    bar: &ProgressBar,
) -> Result<Summary, BackupError> {
    let mut meta = Meta::open(&data_dir.join(META_FILE))?;
    let mut hold = [0u8; 16];
    getrandom::getrandom(&mut hold)
        .map_err(|e| BackupError::Io { what: "getrandom".into(), source: io::Error::other(e) })?;
    let live = data_dir.join(META_FILE);
    meta.hold_blobs(&hold, now_ms() + HOLD_FOR.as_millis() as i64)?;
    let keeper = meta::HoldKeeper::start(&live, hold, RENEW_EVERY, HOLD_FOR);
    let copied = match keeper {
        Ok(keeper) => {
            let copied = copy_out(&meta, store, data_dir, dest, bar).await;
            drop(keeper);
            copied
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = meta.end_hold(&hold) {
        // It lapses by itself; the server then deletes what it held.
        tracing::warn!(error = %e, "could not end the backup's hold on blob deletion");
    }
    // What the server held back for this backup goes now (unless another
    // backup holds it), not at the server's next replaced blob.
    match meta.release_blobs(&[], now_ms()) {
        Ok(free) => {
            for id in free {
                if let Err(e) = store.delete(id).await {
                    tracing::warn!(blob = %id.to_hex(), error = %e, "could not delete a blob held for the backup");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "blobs held for the backup are left for the server"),
    }
    copied
}

async fn copy_out<B: BlobStore>(
    meta: &Meta,
    store: &B,
    data_dir: &Path,
    dest: &Path,
    bar: &ProgressBar,
) -> Result<Summary, BackupError> {
    let created_unix = now_ms() / 1000;
    let snapshot = dest.join(META_FILE);
    meta.snapshot_to(&snapshot)?;
    std::fs::File::open(&snapshot)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("syncing {}", snapshot.display())))?;
    let metadata = file_piece(&snapshot, META_FILE)?;
    let named = meta::snapshot_blobs(&snapshot)?;
    bar.set_length(named.iter().map(|(_, len)| len).sum());
    let copies = LocalBlobStore::open(dest).map_err(io_err(format!("creating {}/blobs", dest.display())))?;
    let mut summary = Summary { blobs: named.len(), bytes: 0, odd_lengths: 0 };
    let mut blobs = Vec::with_capacity(named.len());
    for (id, recorded) in named {
        let read = match store.get(id, None).await {
            Err(BlobError::NotFound) => return Err(BackupError::Gone(id.to_hex())),
            read => read.map_err(blob_err(id))?,
        };
        let (stream, hash) = hashing(read.stream, bar);
        let len = copies.put(id, stream, u64::MAX).await.map_err(blob_err(id))?;
        if len != recorded {
            tracing::warn!(blob = %id.to_hex(), len, recorded, "a blob's length differs from its file's");
            summary.odd_lengths += 1;
        }
        summary.bytes += len;
        blobs.push(Piece { name: id.to_hex(), len, sha256: hex_of(&hash) });
    }
    let _ = std::fs::remove_dir(dest.join("tmp"));
    let mut files = Vec::new();
    for name in KEPT {
        let path = data_dir.join(name);
        if path.exists() {
            files.push(copy_kept(&path, &dest.join(name), name)?);
        }
    }
    let manifest = Manifest {
        format: FORMAT,
        vaultfs: env!("CARGO_PKG_VERSION").to_string(),
        created_unix,
        metadata,
        files,
        blobs,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::Io { what: "writing the manifest".into(), source: io::Error::other(e) })?;
    write_durably(&dest.join(MANIFEST), &text)?;
    Ok(summary)
}

fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BackupError::Damaged(format!(
                "{} is missing: not a vaultfs backup, or one that did not finish",
                path.display()
            )))
        }
        Err(e) => return Err(BackupError::Io { what: format!("reading {}", path.display()), source: e }),
    };
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Damaged(format!("{}: {e}", path.display())))?;
    if m.format != FORMAT {
        return Err(BackupError::Damaged(format!(
            "{}: format {} (this vaultfs reads format {FORMAT})",
            path.display(),
            m.format
        )));
    }
    if m.metadata.name != META_FILE {
        return Err(BackupError::Damaged(format!("{}: the database is not {META_FILE}", path.display())));
    }
    if let Some(odd) = m.files.iter().find(|f| !KEPT.contains(&f.name.as_str())) {
        // Names a restore writes to: only the known ones (never `../x`).
        return Err(BackupError::Damaged(format!("{}: names a file {:?}", path.display(), odd.name)));
    }
    Ok(m)
}

/// Checks the backup's database against the manifest and SQLite's own
/// checks; returns the manifest's blobs by id (each one the database names).
fn check_database(from: &Path, m: &Manifest) -> Result<BTreeMap<BlobId, Piece>, BackupError> {
    let db = from.join(META_FILE);
    if !db.exists() {
        return Err(BackupError::Damaged(format!("{} is missing", db.display())));
    }
    if file_piece(&db, META_FILE)? != m.metadata {
        return Err(BackupError::Damaged(format!(
            "{} differs from the manifest (length or SHA-256)",
            db.display()
        )));
    }
    meta::check_snapshot(&db).map_err(|e| BackupError::Damaged(format!("{}: {e}", db.display())))?;
    for f in &m.files {
        let path = from.join(&f.name);
        if !path.exists() || file_piece(&path, &f.name)? != *f {
            return Err(BackupError::Damaged(format!(
                "{} is missing or differs from the manifest",
                path.display()
            )));
        }
    }
    let mut listed = BTreeMap::new();
    for p in &m.blobs {
        let id = BlobId::from_hex(&p.name)
            .ok_or_else(|| BackupError::Damaged(format!("the manifest names blob {:?}", p.name)))?;
        if listed.insert(id, p.clone()).is_some() {
            return Err(BackupError::Damaged(format!("the manifest lists blob {} twice", p.name)));
        }
    }
    let named =
        meta::snapshot_blobs(&db).map_err(|e| BackupError::Damaged(format!("{}: {e}", db.display())))?;
    let mut missing = named.iter().filter(|(id, _)| !listed.contains_key(id));
    if let Some((id, _)) = missing.next() {
        return Err(BackupError::Damaged(format!(
            "the database names blob {} (and {} more) that the manifest does not list",
            id.to_hex(),
            missing.count()
        )));
    }
    Ok(listed)
}

async fn restore_into<B: BlobStore>(
    from: &Path,
    m: &Manifest,
    listed: &BTreeMap<BlobId, Piece>,
    store: &B,
    data_dir: &Path,
    bar: &ProgressBar,
) -> Result<Summary, BackupError> {
    let already = store.list().await.map_err(BackupError::Store)?;
    if !already.is_empty() {
        return Err(BackupError::Target(format!(
            "the blob store already holds {} blob(s); a restore goes into an empty one",
            already.len()
        )));
    }
    let copies = LocalBlobStore::open_existing(from)
        .map_err(|e| BackupError::Damaged(format!("{}/blobs: {e}", from.display())))?;
    bar.set_length(m.blobs.iter().map(|p| p.len).sum());
    let mut put = Vec::with_capacity(listed.len());
    let copied = async {
        let mut bytes = 0;
        for (&id, p) in listed {
            let read = match copies.get(id, None).await {
                Err(BlobError::NotFound) => {
                    return Err(BackupError::Damaged(format!("blob {} is missing from the backup", p.name)))
                }
                read => read.map_err(blob_err(id))?,
            };
            let (stream, hash) = hashing(read.stream, bar);
            put.push(id);
            let len = match store.put(id, stream, p.len).await {
                Err(BlobError::TooLarge(_)) => u64::MAX,
                stored => stored.map_err(blob_err(id))?,
            };
            if len != p.len || hex_of(&hash) != p.sha256 {
                return Err(BackupError::Damaged(format!(
                    "blob {} differs from the manifest (length or SHA-256)",
                    p.name
                )));
            }
            bytes += len;
        }
        for f in &m.files {
            let kept = copy_kept(&from.join(&f.name), &data_dir.join(&f.name), &f.name)?;
            if kept != *f {
                return Err(BackupError::Damaged(format!("{} changed during the restore", f.name)));
            }
        }
        // The copy is what is checked (again): the backup's file could
        // have changed since it was.
        let db = data_dir.join(META_FILE);
        let tmp = db.with_extension("part");
        std::fs::copy(from.join(META_FILE), &tmp)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        if file_piece(&tmp, META_FILE)? != m.metadata {
            return Err(BackupError::Damaged(format!("{META_FILE} changed during the restore")));
        }
        meta::check_snapshot(&tmp).map_err(|e| BackupError::Damaged(format!("{META_FILE}: {e}")))?;
        std::fs::rename(&tmp, &db).map_err(io_err(format!("writing {}", db.display())))?;
        sync_dir(&db)?;
        // Opened as the server opens it (which brings an older schema up to
        // date); every blob it names must now be in the store.
        let in_use = Meta::open(&db)?.blobs_in_use()?;
        let stored: HashSet<String> =
            store.list().await.map_err(BackupError::Store)?.iter().map(|(id, _)| id.to_hex()).collect();
        if let Some(lost) = in_use.iter().find(|b| !stored.contains(*b)) {
            return Err(BackupError::Damaged(format!("blob {lost} is not in the store after the restore")));
        }
        Ok(Summary { blobs: listed.len(), bytes, odd_lengths: 0 })
    }
    .await;
    if copied.is_err() {
        for id in put {
            if let Err(e) = store.delete(id).await {
                tracing::warn!(blob = %id.to_hex(), error = %e, "could not remove a restored blob");
            }
        }
    }
    copied
}
