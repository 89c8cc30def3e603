//! Which keys a vault's listing shows in use that this client lacks, and the
//! one way to the key anything new is sealed with.
//!
//! Data flow. Whoever lists a vault (the mount's namespace, `vault rekey`,
//! `vault migrate`, a share or a rotation, `vault members`) opens what the
//! listing holds (record titles, file names, manifests) and hands, for each,
//! the key id it names and whether the key held under that id opened it to
//! [`Unlocked::note_keys_in_use`]. An id counts as lacking when this client
//! holds no key under it, or when the key it holds under it, not derived
//! from it, failed to open something sealed under that id. [`Unlocked::sealing_key`] refuses while
//! any id is lacking: a vault where others seal under a key this client was
//! not given is one whose key rotated without this member getting the new
//! key (the server withheld the share, or someone the server calls an admin
//! handed this client a key of its own making), and sealing under an older or
//! such a key would let whoever holds it (a removed member) read what is
//! sealed.
//!
//! A key held under an id is the key the vault's items name only if the id
//! is derived from it ([`crate::crypto::KeyId::of_secret`]); the newest key a
//! share adds to those held must be (super::sharing). Keys made before ids
//! were derived, and a first share's keys, prove nothing by their ids: such a
//! key that fails to open something sealed under its id is not the vault's
//! key, and its id stays lacking for the session; and an id seen lacking is
//! cleared only by a key whose id is derived from it, never by a listing (the
//! server chooses what a listing shows). Ids seen lacking are also noted in
//! the machine's memory ([`super::account::KeyMemory`], the freshness state),
//! so later sessions on this machine refuse too; so does a session whose
//! wallet lacks the newest key this machine accepted for the vault.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::account::{AccountError, Unlocked};
use super::Remote;
use crate::crypto::manifest::manifest_key_id;
use crate::crypto::names::name_key_id;
use crate::crypto::share::Keyring;
use crate::crypto::{self, FileContext, KeyId, NameContext, VaultKey};
use crate::ids::VaultId;
use crate::protocol::{FileInfo, RecordInfo};

/// Why a key id is lacking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lack {
    /// No key under this id was held when it was seen; cleared once a key
    /// whose id is derived from it is held.
    NotHeld,
    /// The key held under this id, whose id is not derived from it, failed
    /// to open something sealed under it: not the vault's key, whatever its
    /// id says. Kept for the session.
    WrongKey,
}

/// Key ids seen in use in each vault that this client lacks. A leaf lock.
#[derive(Default)]
pub(super) struct KeysInUse {
    lacking: Mutex<HashMap<VaultId, HashMap<KeyId, Lack>>>,
}

/// A listing's record titles, file names and manifests opened with the keys
/// held: for each, the key id it names and whether it opened (what does not
/// parse names no id and is not counted: it fails its own check where it is
/// used). For the commands that list a vault; the mount opens these anyway
/// and reports the same from what it opened.
pub fn opened_in<R: Remote>(
    account: &Unlocked<R>,
    vault: VaultId,
    records: &[RecordInfo],
    files: &[FileInfo],
) -> Vec<(KeyId, bool)> {
    let mut seen = Vec::new();
    let mut name = |ctx: NameContext, sealed: &[u8]| {
        if let Ok(id) = name_key_id(sealed) {
            let opened =
                account.vault_key(vault, id).is_some_and(|k| crypto::open_name(&k, &ctx, sealed).is_ok());
            seen.push((id, opened));
        }
    };
    for r in records.iter().filter(|r| r.vault == vault) {
        name(NameContext::RecordTitle { vault, record: r.id }, &r.title.0);
    }
    for f in files.iter().filter(|f| f.vault == vault) {
        name(NameContext::FileName { vault, record: f.record, file: f.id }, &f.name.0);
    }
    for f in files.iter().filter(|f| f.vault == vault && !f.meta.0.is_empty()) {
        if let Ok(id) = manifest_key_id(&f.meta.0) {
            let ctx = FileContext { vault, record: f.record, file: f.id };
            let opened = account
                .vault_key(vault, id)
                .is_some_and(|k| crypto::open_manifest(&k, &ctx, &f.meta.0).is_ok());
            seen.push((id, opened));
        }
    }
    seen
}

impl<R: Remote> Unlocked<R> {
    /// Notes what a listing of `vault` found: for each item, the key id it
    /// names and whether the key held under that id opened it. Returns
    /// whether this made the vault one this client must not seal in (it was
    /// not before).
    pub fn note_keys_in_use(&self, vault: VaultId, seen: impl IntoIterator<Item = (KeyId, bool)>) -> bool {
        let mut all_opened: HashMap<KeyId, bool> = HashMap::new();
        for (id, opened) in seen {
            *all_opened.entry(id).or_insert(true) &= opened;
        }
        let was_behind = self.keys_missing(vault).is_some();
        let held: HashMap<KeyId, Option<bool>> = all_opened
            .keys()
            .map(|id| (*id, self.vault_key(vault, *id).map(|k| k.id_is_derived())))
            .collect();
        let mut lacking = self.keys_in_use.lacking.lock();
        let ids = lacking.entry(vault).or_default();
        for (id, opened) in all_opened {
            match (held[&id], opened) {
                _ if ids.get(&id) == Some(&Lack::WrongKey) => {}
                (None, _) => {
                    ids.insert(id, Lack::NotHeld);
                    if let Some(memory) = &self.key_memory {
                        memory.note_lacking(vault, id);
                    }
                }
                (Some(true), _) => {
                    ids.remove(&id);
                    if let Some(memory) = &self.key_memory {
                        memory.forget_lacking(vault, id);
                    }
                }
                (Some(false), false) => {
                    ids.insert(id, Lack::WrongKey);
                }
                (Some(false), true) => {}
            }
        }
        drop(lacking);
        !was_behind && self.keys_missing(vault).is_some()
    }

    /// Lists `vault`'s records and files to note the keys they name, for
    /// commands that seal without listing otherwise (sharing, rotating).
    pub async fn list_keys_in_use(&self, vault: VaultId) -> Result<(), AccountError> {
        let (records, files) = tokio::try_join!(self.remote.records(vault), self.remote.files(vault))?;
        self.note_keys_in_use(vault, opened_in(self, vault, &records, &files));
        Ok(())
    }

    /// How many key ids seen in use in `vault` this client lacks (`None`: none).
    pub fn keys_missing(&self, vault: VaultId) -> Option<usize> {
        let mut missing = self.lacking_ids(vault, true).len();
        // The newest key this machine accepted for the vault (a wallet stored
        // before it, or rolled back, lacks it until its share is taken again).
        let remembered = self.key_memory.as_ref().and_then(|m| m.keys_seen(vault));
        if remembered.is_some_and(|seen| {
            !self.vault_key(vault, seen.newest).is_some_and(|k| super::sharing::is_remembered(&seen, &k))
        }) {
            missing += 1;
        }
        (missing > 0).then_some(missing)
    }

    /// The key ids `vault` is seen using (in this session, or noted on this
    /// machine before) that this client lacks; with `wrong_keys`, also those
    /// under which it holds a key that failed to open something (this
    /// session only: no share can replace a key held, so those do not ask a
    /// share for anything).
    fn lacking_ids(&self, vault: VaultId, wrong_keys: bool) -> Vec<KeyId> {
        let mut lacking: HashMap<KeyId, Lack> =
            self.keys_in_use.lacking.lock().get(&vault).cloned().unwrap_or_default();
        for id in self.key_memory.as_ref().map(|m| m.keys_lacking(vault)).unwrap_or_default() {
            lacking.entry(id).or_insert(Lack::NotHeld);
        }
        lacking
            .into_iter()
            .filter(|(id, lack)| match lack {
                Lack::WrongKey => wrong_keys,
                Lack::NotHeld => !self.vault_key(vault, *id).is_some_and(|k| k.id_is_derived()),
            })
            .map(|(id, _)| id)
            .collect()
    }

    /// Refuses a share of `vault` that adds keys to those held without
    /// bringing, for every id the vault is seen using that this client lacks,
    /// a key derived under that id: taking it would put a key of its sender's
    /// choosing in the wallet (and in every session of this user) and split
    /// the vault, as the share that brings the missing key would no longer
    /// extend the keys held.
    pub(super) fn check_brings_lacking(&self, vault: VaultId, ring: &Keyring) -> Result<(), AccountError> {
        let held = self.keyring_of(vault).map_or(0, |r| r.keys.len());
        if ring.keys.len() <= held {
            return Ok(());
        }
        let lacking = self.lacking_ids(vault, false);
        let brought = |id: &KeyId| ring.keys.iter().any(|k| k.key.id() == *id && k.key.id_is_derived());
        match lacking.iter().filter(|id| !brought(id)).count() {
            0 => Ok(()),
            n => Err(AccountError::Refused(format!(
                "a share of vault {vault} adds keys but not the {n} key(s) this machine saw the vault use \
                 and lacks: refused (ask the admin who rotated the vault's key to share it with you again)"
            ))),
        }
    }

    /// The key new names, manifests, files and shares of `vault` are sealed
    /// with: the newest held, unless the vault was seen using a key this
    /// client lacks ([`AccountError::KeyBehind`]).
    pub fn sealing_key(&self, vault: VaultId) -> Result<VaultKey, AccountError> {
        self.check_not_behind(vault)?;
        self.active_key(vault).ok_or(AccountError::NoKey(vault))
    }

    /// Refuses to seal in `vault` while it is seen using a key this client lacks.
    pub fn check_not_behind(&self, vault: VaultId) -> Result<(), AccountError> {
        match self.keys_missing(vault) {
            Some(missing) => Err(AccountError::KeyBehind { vault, missing }),
            None => Ok(()),
        }
    }
}
