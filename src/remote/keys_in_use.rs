//! Which keys a vault's listing shows in use that this client lacks, and the
//! one way to the key anything new is sealed with.
//!
//! Data flow. Whoever lists a vault (the mount's namespace, `vault rekey`,
//! `vault migrate`, a share or a rotation) hands the key ids that its
//! records, names and manifests name to [`Unlocked::note_keys_in_use`]; the
//! ids this client holds no key for are remembered for the session, by
//! vault. [`Unlocked::sealing_key`] then refuses while any of them is still
//! missing: a vault where others seal under a key this client was not given
//! is one whose key rotated without this member getting the new key (the
//! server withheld the share, or someone the server calls an admin handed
//! this client a key of its own making), and sealing under an older or such
//! a key would let whoever holds it (a removed member) read what is sealed.
//! The refusal ends by itself once a share brings the missing key.
//!
//! What is remembered only grows within a session: a listing that no longer
//! shows the key (the server hides those files) does not lift the refusal.

use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;

use super::account::{AccountError, Unlocked};
use super::Remote;
use crate::crypto::manifest::manifest_key_id;
use crate::crypto::names::name_key_id;
use crate::crypto::{KeyId, VaultKey};
use crate::ids::VaultId;
use crate::protocol::{FileInfo, RecordInfo};

/// Key ids seen in use in each vault that this client held no key for when
/// it saw them. A leaf lock.
#[derive(Default)]
pub(super) struct KeysInUse {
    lacking: Mutex<HashMap<VaultId, HashSet<KeyId>>>,
}

/// The key ids a vault's records and files are sealed under (what does not
/// parse names none: it fails its own check where it is opened).
pub fn key_ids_of<'a>(
    records: impl IntoIterator<Item = &'a RecordInfo>,
    files: impl IntoIterator<Item = &'a FileInfo>,
) -> Vec<KeyId> {
    let names = |s: &[u8]| (!s.is_empty()).then(|| name_key_id(s).ok()).flatten();
    let mut ids = Vec::new();
    for r in records {
        ids.extend(names(&r.title.0));
        ids.extend(names(&r.fields.0));
    }
    for f in files {
        ids.extend(names(&f.name.0));
        if !f.meta.0.is_empty() {
            ids.extend(manifest_key_id(&f.meta.0).ok());
        }
    }
    ids
}

impl<R: Remote> Unlocked<R> {
    /// Notes that `vault`'s listing names `ids`. Returns whether this made
    /// the vault one this client must not seal in (it was not before).
    pub fn note_keys_in_use(&self, vault: VaultId, ids: impl IntoIterator<Item = KeyId>) -> bool {
        let missing: Vec<KeyId> = ids.into_iter().filter(|id| self.vault_key(vault, *id).is_none()).collect();
        if missing.is_empty() {
            return false;
        }
        let was_behind = self.keys_missing(vault).is_some();
        self.keys_in_use.lacking.lock().entry(vault).or_default().extend(missing);
        !was_behind
    }

    /// Lists `vault`'s records and files to note the keys they name, for
    /// commands that seal without listing otherwise (sharing, rotating).
    pub async fn list_keys_in_use(&self, vault: VaultId) -> Result<(), AccountError> {
        let (records, files) = tokio::try_join!(self.remote.records(vault), self.remote.files(vault))?;
        self.note_keys_in_use(vault, key_ids_of(&records, &files));
        Ok(())
    }

    /// How many of the key ids seen in use in `vault` this client still
    /// lacks (`None`: none).
    pub fn keys_missing(&self, vault: VaultId) -> Option<usize> {
        let lacking = self.keys_in_use.lacking.lock();
        let missing = lacking.get(&vault)?.iter().filter(|id| self.vault_key(vault, **id).is_none()).count();
        (missing > 0).then_some(missing)
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
