//! What this machine remembers of a server across mounts: the newest
//! generation of each file and the newest wallet revision it has seen, so
//! that a server cannot serve an older version of either after a remount or a
//! reboot, how many keys each shared vault's keyring had (so an older share
//! is refused even if the wallet that stored its keys was rolled back), and
//! which key ids a vault was seen using that this machine lacked (so nothing
//! is sealed in it until they come, also in later sessions).
//!
//! Data flow. The mount loads the state file when it starts (refusing one
//! that does not open with the wallet's state key: altered, or another
//! account's), refuses a wallet older than the one remembered, and then keeps
//! the map in memory: reads check a file's generation against it, and every
//! newer generation seen or written is noted. A writer task saves the map at
//! most once a second while it changes, and the mount saves it once more when
//! it stops. Saving merges with what is on disk (another mount of the same
//! account may have saved meanwhile) and replaces the file atomically.
//!
//! The file (`$XDG_STATE_HOME/vaultfs/`, else `~/.local/state/vaultfs/`, mode
//! 0600 in a 0700 directory) holds file, vault and key ids and numbers,
//! sealed under a key from the wallet: no plaintext, no names, no keys (a
//! key id is the public label every sealed header carries). Deleting it loses the
//! protection for what it remembered, never data. Files this machine never saw
//! are not protected: a fresh machine cannot know what is newest.

use parking_lot::Mutex;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::crypto::state::{open_state, seal_state, FreshState, RememberedRing, StateBinding};
use crate::crypto::{CryptoError, IntegrityFailure, OsRandom, StateKey};
use crate::ids::FileId;

/// How long changes collect before the state is saved: a burst of writes
/// (a `tar -x`) costs one save a second, not one per file.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Why the freshness state cannot be used; each stops the mount with a
/// message saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file does not open with this account's key.
    #[error(
        "{path} does not open with this account's state key: it was altered, or belongs to another \
         account; vaultfs will not mount without knowing what this machine saw. If you trust the server, \
         remove the file (this machine then forgets which versions it saw)"
    )]
    Tampered {
        /// The file.
        path: PathBuf,
    },
    /// A state file exists, but the wallet has no key for it.
    #[error(
        "the server's wallet holds no state key, but this machine has a freshness state for the account \
         ({path}): the server may be serving a wallet older than the one this machine saw. If you trust \
         it, remove the file"
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The server served an older wallet than this machine saw.
    #[error(
        "the server served wallet revision {served}, older than revision {seen} this machine saw: refusing \
         a rolled-back wallet (it may lack keys or settings added since). If the server was restored from \
         a backup on purpose, remove {path}"
    )]
    WalletRolledBack {
        /// What the server served.
        served: u64,
        /// What this machine saw.
        seen: u64,
        /// The state file.
        path: PathBuf,
    },
}

/// Where the state lives and how it is sealed.
struct StateFile {
    path: PathBuf,
    key: StateKey,
    server: String,
    user: String,
}

impl StateFile {
    fn binding(&self) -> StateBinding<'_> {
        StateBinding { server: &self.server, user: &self.user }
    }

    fn io(&self, source: std::io::Error) -> FreshnessError {
        FreshnessError::Io { path: self.path.clone(), source }
    }

    /// What the file holds (empty if there is none).
    fn read(&self) -> Result<FreshState, FreshnessError> {
        match std::fs::read(&self.path) {
            Ok(blob) => open_state(&self.key, self.binding(), &blob)
                .map_err(|_| FreshnessError::Tampered { path: self.path.clone() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FreshState::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Replaces the file with `state`, atomically (a new file renamed over it).
    fn write(&self, state: &FreshState) -> Result<(), FreshnessError> {
        let blob = seal_state(&self.key, self.binding(), state, &mut OsRandom)
            .map_err(|e| self.io(std::io::Error::other(e)))?;
        crate::remote::account::write_private(&self.path, &blob).map_err(|e| self.io(e))
    }
}

/// The freshness state of one account on one server, for one mount.
pub struct Freshness {
    file: Option<StateFile>,
    state: Mutex<FreshState>,
    /// Generations this mount sent in uploads whose outcome it does not know
    /// yet (a server may store one and answer an error): the next upload of
    /// the file goes above them, so two uploads never share a generation.
    attempted: Mutex<std::collections::HashMap<FileId, u64>>,
    /// Lacking keys cleared this session (a key derived under them is held):
    /// left out of what is saved, whatever another mount saved meanwhile.
    cleared: Mutex<std::collections::BTreeSet<(crate::ids::VaultId, crate::crypto::KeyId)>>,
    /// Whether `state` holds something the file does not.
    dirty: std::sync::atomic::AtomicBool,
    changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Freshness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freshness")
            .field("path", &self.file.as_ref().map(|f| &f.path))
            .finish_non_exhaustive()
    }
}

/// `$XDG_STATE_HOME/vaultfs`, or `~/.local/state/vaultfs`.
pub fn state_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("vaultfs"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".local/state/vaultfs"))
}

/// The state file of `user` at the server with identity `server`, in `dir`:
/// named by a hash, so the name says nothing of either.
pub fn state_path(dir: &Path, server: &str, user: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"vaultfs/state-name")
        .chain_update((server.len() as u64).to_be_bytes())
        .chain_update(server)
        .chain_update(user)
        .finalize();
    dir.join(format!("freshness-{}.state", crate::ids::hex_encode(&digest[..12])))
}

impl Freshness {
    /// A state kept in memory only (tests, or a mount told not to remember).
    pub fn memory() -> Self {
        Freshness {
            file: None,
            state: Mutex::default(),
            attempted: Default::default(),
            cleared: Default::default(),
            dirty: false.into(),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Loads the state at `path` (none yet is an empty state), sealed under
    /// `key` for `server` and `user`.
    pub fn load(path: PathBuf, key: StateKey, server: &str, user: &str) -> Result<Self, FreshnessError> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| FreshnessError::Io { path: dir.to_path_buf(), source })?;
        }
        let file = StateFile { path, key, server: server.to_string(), user: user.to_string() };
        let state = file.read()?;
        Ok(Freshness {
            file: Some(file),
            state: Mutex::new(state),
            attempted: Default::default(),
            cleared: Default::default(),
            dirty: false.into(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Where it is kept, if on disk.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Refuses a wallet older than the newest this machine saw, and
    /// remembers this one's revision.
    pub fn check_wallet(&self, revision: u64) -> Result<(), FreshnessError> {
        let mut state = self.state.lock();
        if revision < state.wallet_revision {
            return Err(FreshnessError::WalletRolledBack {
                served: revision,
                seen: state.wallet_revision,
                path: self.path().map(Path::to_path_buf).unwrap_or_default(),
            });
        }
        if revision > state.wallet_revision {
            state.wallet_revision = revision;
            drop(state);
            self.mark_changed();
        }
        Ok(())
    }

    /// The newest generation of `file` seen, 0 if none.
    pub fn generation(&self, file: FileId) -> u64 {
        self.state.lock().generations.get(&file).copied().unwrap_or(0)
    }

    /// Refuses a generation of `file` older than the newest seen: a replay.
    pub fn check(&self, file: FileId, generation: u64) -> Result<(), CryptoError> {
        let seen = self.generation(file);
        if generation < seen {
            return Err(CryptoError::Integrity(IntegrityFailure::Stale {
                found: generation,
                required: seen,
            }));
        }
        Ok(())
    }

    /// Notes that an upload of `file` at `generation` is being sent.
    pub fn attempt(&self, file: FileId, generation: u64) {
        let mut attempted = self.attempted.lock();
        let entry = attempted.entry(file).or_insert(0);
        *entry = (*entry).max(generation);
    }

    /// What the next upload of `file` must be above: every generation seen
    /// of it, and every one this mount already sent.
    pub fn write_floor(&self, file: FileId) -> u64 {
        let attempted = self.attempted.lock().get(&file).copied();
        self.generation(file).max(attempted.unwrap_or(0))
    }

    /// Notes that generation `generation` of `file` exists.
    pub fn note(&self, file: FileId, generation: u64) {
        let mut state = self.state.lock();
        let entry = state.generations.entry(file).or_insert(0);
        if generation > *entry {
            *entry = generation;
            drop(state);
            self.mark_changed();
        }
    }

    fn mark_changed(&self) {
        if self.file.is_some() && !self.dirty.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// Saves what changed (merged with what another mount saved meanwhile).
    pub fn save(&self) -> Result<(), FreshnessError> {
        let Some(file) = &self.file else { return Ok(()) };
        if !self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        let mut merged = match file.read() {
            Ok(on_disk) => on_disk,
            // Someone replaced it meanwhile with something that does not
            // open: ours (which opened at mount) replaces it.
            Err(FreshnessError::Tampered { .. }) => FreshState::default(),
            Err(e) => {
                self.dirty.store(true, std::sync::atomic::Ordering::Release);
                return Err(e);
            }
        };
        merged.merge(&self.state.lock());
        for cleared in self.cleared.lock().iter() {
            merged.lacking_keys.remove(cleared);
        }
        let result = file.write(&merged);
        if result.is_err() {
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }

    /// Saves changes as they come, at most once every [`SAVE_EVERY`]; runs
    /// until the mount ends (the caller saves once more then).
    pub async fn run_saver(self: std::sync::Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        loop {
            self.changed.notified().await;
            tokio::time::sleep(SAVE_EVERY).await;
            let this = std::sync::Arc::clone(&self);
            match tokio::task::spawn_blocking(move || this.save()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not save the freshness state; will try again")
                }
                Err(e) => tracing::warn!(error = %e, "freshness state saver failed"),
            }
        }
    }
}

/// The keyrings accepted from shares, remembered on this machine next to the
/// generations: so that a share lacking a key accepted before is refused in a
/// later session even if the server rolled the wallet back or never stored it;
/// and the keys seen in use that this machine lacked, so that a later session
/// seals nothing in that vault either, whatever the server lists then.
impl crate::remote::account::KeyMemory for Freshness {
    fn keys_seen(&self, vault: crate::ids::VaultId) -> Option<RememberedRing> {
        self.state.lock().vault_keys.get(&vault).copied()
    }

    fn note_keys(&self, vault: crate::ids::VaultId, count: u32, newest: &crate::crypto::VaultKey) {
        let ring = RememberedRing {
            count,
            newest: newest.id(),
            check: Some(crate::crypto::KeyId::of_secret(newest.secret())),
        };
        let mut state = self.state.lock();
        let seen = state.vault_keys.entry(vault).or_insert(ring);
        if count > seen.count || (count == seen.count && seen.newest == ring.newest && seen.check.is_none()) {
            *seen = ring;
        }
        drop(state);
        self.mark_changed();
    }

    fn keys_lacking(&self, vault: crate::ids::VaultId) -> Vec<crate::crypto::KeyId> {
        self.state.lock().lacking_in(vault)
    }

    fn note_lacking(&self, vault: crate::ids::VaultId, id: crate::crypto::KeyId) {
        self.cleared.lock().remove(&(vault, id));
        if self.state.lock().note_lacking(vault, id) {
            self.mark_changed();
        }
    }

    fn forget_lacking(&self, vault: crate::ids::VaultId, id: crate::crypto::KeyId) {
        self.cleared.lock().insert((vault, id));
        if self.state.lock().lacking_keys.remove(&(vault, id)) {
            self.mark_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Wallet;

    fn key() -> StateKey {
        let mut w = Wallet::new();
        w.ensure_state_key(&mut OsRandom).unwrap();
        w.state_key().unwrap().duplicate()
    }

    #[test]
    fn remembered_across_loads_and_refused_when_altered_or_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "tls-cert:sha256:aa", "alice");
        assert!(!path.to_string_lossy().contains("alice"));
        let k = key();
        let f = Freshness::load(path.clone(), k.duplicate(), "tls-cert:sha256:aa", "alice").unwrap();
        f.check_wallet(4).unwrap();
        f.note(FileId([1; 16]), 7);
        f.save().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);

        let again = Freshness::load(path.clone(), k.duplicate(), "tls-cert:sha256:aa", "alice").unwrap();
        assert_eq!(again.generation(FileId([1; 16])), 7);
        assert!(again.check(FileId([1; 16]), 6).unwrap_err().is_integrity(), "an older generation");
        again.check(FileId([1; 16]), 7).unwrap();
        let e = again.check_wallet(3).unwrap_err().to_string();
        assert!(e.contains("revision 3") && e.contains("revision 4"), "{e}");

        // Another account's key, or altered bytes: refused, with what to do.
        let e = Freshness::load(path.clone(), key(), "tls-cert:sha256:aa", "alice").unwrap_err().to_string();
        assert!(e.contains("does not open") && e.contains("remove the file"), "{e}");
        let mut blob = std::fs::read(&path).unwrap();
        blob[20] ^= 1;
        std::fs::write(&path, &blob).unwrap();
        assert!(matches!(
            Freshness::load(path.clone(), k.duplicate(), "tls-cert:sha256:aa", "alice"),
            Err(FreshnessError::Tampered { .. })
        ));
        // Deleted: the protection is gone, nothing else.
        std::fs::remove_file(&path).unwrap();
        let fresh = Freshness::load(path, k, "tls-cert:sha256:aa", "alice").unwrap();
        fresh.check(FileId([1; 16]), 1).unwrap();
    }

    #[test]
    fn saving_merges_what_another_mount_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "s", "u");
        let k = key();
        let a = Freshness::load(path.clone(), k.duplicate(), "s", "u").unwrap();
        let b = Freshness::load(path.clone(), k.duplicate(), "s", "u").unwrap();
        a.note(FileId([1; 16]), 3);
        b.note(FileId([2; 16]), 5);
        a.save().unwrap();
        b.save().unwrap();
        let c = Freshness::load(path, k, "s", "u").unwrap();
        assert_eq!((c.generation(FileId([1; 16])), c.generation(FileId([2; 16]))), (3, 5));
    }
}
