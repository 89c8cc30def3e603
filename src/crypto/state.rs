//! The local freshness state: what this machine remembers of a server, so
//! that a server cannot roll files or the wallet back across mounts.
//!
//! It holds the highest wallet revision and the highest generation of each
//! file seen, each shared vault's accepted keyring (count, newest key id) and
//! the key ids vaults were seen using that this machine lacked, sealed (XChaCha20-Poly1305) under the state key from the user's
//! wallet and bound to the server identity and user name: no plaintext, no
//! names, no keys, and a file altered, or taken from another account, does not
//! open. The bytes are pure here; `fs::freshness` reads and writes the file.
//!
//! Layout (docs/FORMAT.md "Local freshness state"): `magic "VLTS" || version
//! (1) || reserved (3) || nonce (24) || Seal(state key, nonce, AAD, body)`.

use std::collections::{BTreeMap, BTreeSet};

use super::aead::{self, XNONCE_LEN};
use super::error::{check_prefix, CryptoError, Result};
use super::keys::{KeyId, KEY_ID_LEN};
use super::random::RandomSource;
use super::wallet::StateKey;
use crate::ids::{FileId, VaultId, ID_LEN};

/// First four bytes of a state file.
pub const STATE_MAGIC: [u8; 4] = *b"VLTS";
/// The version this build writes and reads.
pub const STATE_VERSION: u8 = 4;
/// Version 1 (no vault keyrings) is still read.
const STATE_V1: u8 = 1;
/// Version 2 (no lacking keys) is still read.
const STATE_V2: u8 = 2;
/// Version 3 (no check of the newest key) is still read.
const STATE_V3: u8 = 3;
const VAULT_ENTRY_V3_LEN: usize = ID_LEN + 4 + KEY_ID_LEN;
const VAULT_ENTRY_LEN: usize = VAULT_ENTRY_V3_LEN + KEY_ID_LEN;
const LACKING_ENTRY_LEN: usize = ID_LEN + KEY_ID_LEN;
/// Most vaults remembered.
pub const MAX_VAULTS: usize = 1 << 16;
/// Most lacking keys remembered per vault (one is enough to refuse; more
/// are not noted). Ids cleared since (a key derived under them is held)
/// count until this machine forgets them.
pub const MAX_LACKING_PER_VAULT: usize = 64;
/// Most lacking keys remembered in all: a server that lists made-up ids in
/// that many vaults can make this machine forget later evidence (it keeps
/// it for the session), not what it noted before.
pub const MAX_LACKING: usize = 1 << 16;

/// A shared vault's keyring as this machine accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RememberedRing {
    /// How many keys it had.
    pub count: u32,
    /// Its newest key's id.
    pub newest: KeyId,
    /// [`KeyId::of_secret`] of its newest key: which key that was, whatever
    /// its id (`None` from a version-3 or older file).
    pub check: Option<KeyId>,
}
const HEADER_LEN: usize = 8;
const DOMAIN: &[u8] = b"vaultfs/state/v1";
const ENTRY_LEN: usize = ID_LEN + 8;
/// Most files remembered (a bound on what a state file makes us allocate:
/// 24 MB at 24 bytes each).
pub const MAX_FILES: usize = 1 << 20;

/// What a machine remembers of one account on one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreshState {
    /// The highest wallet revision seen.
    pub wallet_revision: u64,
    /// The highest generation seen of each file.
    pub generations: BTreeMap<FileId, u64>,
    /// Per vault, how many keys the keyring accepted from shares had and
    /// the newest one's id: a later share must hold that many, with that key
    /// at that place (also when the server rolled the wallet back).
    pub vault_keys: BTreeMap<VaultId, RememberedRing>,
    /// Key ids seen in use in a vault's listing while this machine held no
    /// key under them (crate::remote::keys_in_use): nothing is sealed in
    /// that vault until a key derived under the id is held.
    pub lacking_keys: BTreeSet<(VaultId, KeyId)>,
}

impl FreshState {
    /// Takes the higher of each value from `other` (another mount's save).
    pub fn merge(&mut self, other: &FreshState) {
        self.wallet_revision = self.wallet_revision.max(other.wallet_revision);
        for (id, g) in &other.generations {
            let e = self.generations.entry(*id).or_insert(0);
            *e = (*e).max(*g);
        }
        for (vault, seen) in &other.vault_keys {
            let e = self.vault_keys.entry(*vault).or_insert(*seen);
            if seen.count > e.count || (seen.count == e.count && e.check.is_none()) {
                *e = *seen;
            }
        }
        for (vault, id) in &other.lacking_keys {
            self.note_lacking(*vault, *id);
        }
    }

    /// Notes that `vault` was seen using `id` while no key under it was
    /// held, within the caps. Returns whether it was new.
    pub fn note_lacking(&mut self, vault: VaultId, id: KeyId) -> bool {
        let in_vault =
            self.lacking_keys.range((vault, KeyId([0; KEY_ID_LEN]))..).take_while(|(v, _)| *v == vault);
        if self.lacking_keys.len() >= MAX_LACKING || in_vault.count() >= MAX_LACKING_PER_VAULT {
            return false;
        }
        self.lacking_keys.insert((vault, id))
    }

    /// The key ids `vault` was seen using while none was held.
    pub fn lacking_in(&self, vault: VaultId) -> Vec<KeyId> {
        let from = (vault, KeyId([0; KEY_ID_LEN]));
        self.lacking_keys.range(from..).take_while(|(v, _)| *v == vault).map(|(_, id)| *id).collect()
    }
}

/// Whose state this is: bound into the seal, so a file of another account or
/// server does not open.
#[derive(Debug, Clone, Copy)]
pub struct StateBinding<'a> {
    /// The server identity (as the login key binds it).
    pub server: &'a str,
    /// The user name.
    pub user: &'a str,
}

fn aad(header: &[u8], b: StateBinding<'_>) -> Result<Vec<u8>> {
    let mut aad = Vec::with_capacity(DOMAIN.len() + HEADER_LEN + b.server.len() + b.user.len() + 4);
    aad.extend_from_slice(DOMAIN);
    aad.extend_from_slice(header);
    for part in [b.server, b.user] {
        let len = u16::try_from(part.len()).map_err(|_| CryptoError::Misuse("identity or user too long"))?;
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    Ok(aad)
}

/// Seals `state` for `binding` under `key`. Draws a 24-byte nonce.
pub fn seal_state(
    key: &StateKey,
    binding: StateBinding<'_>,
    state: &FreshState,
    rng: &mut dyn RandomSource,
) -> Result<Vec<u8>> {
    if state.generations.len() > MAX_FILES {
        return Err(CryptoError::Misuse("too many files in the freshness state"));
    }
    let mut header = Vec::with_capacity(HEADER_LEN + XNONCE_LEN);
    header.extend_from_slice(&STATE_MAGIC);
    header.push(STATE_VERSION);
    header.extend_from_slice(&[0, 0, 0]);
    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce)?;
    let mut body = Vec::with_capacity(12 + state.generations.len() * ENTRY_LEN);
    body.extend_from_slice(&state.wallet_revision.to_be_bytes());
    body.extend_from_slice(&(state.generations.len() as u32).to_be_bytes());
    for (id, g) in &state.generations {
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(&g.to_be_bytes());
    }
    if state.vault_keys.len() > MAX_VAULTS {
        return Err(CryptoError::Misuse("too many vaults in the freshness state"));
    }
    body.extend_from_slice(&(state.vault_keys.len() as u32).to_be_bytes());
    for (vault, ring) in &state.vault_keys {
        body.extend_from_slice(vault.as_bytes());
        body.extend_from_slice(&ring.count.to_be_bytes());
        body.extend_from_slice(&ring.newest.0);
        // Zeros: no check known (an entry from a version-3 or older file).
        body.extend_from_slice(&ring.check.map_or([0; KEY_ID_LEN], |c| c.0));
    }
    if state.lacking_keys.len() > MAX_LACKING {
        return Err(CryptoError::Misuse("too many lacking keys in the freshness state"));
    }
    body.extend_from_slice(&(state.lacking_keys.len() as u32).to_be_bytes());
    for (vault, id) in &state.lacking_keys {
        body.extend_from_slice(vault.as_bytes());
        body.extend_from_slice(&id.0);
    }
    let sealed = aead::seal(key.secret(), &nonce, &aad(&header, binding)?, &body)?;
    header.extend_from_slice(&nonce);
    header.extend_from_slice(&sealed);
    Ok(header)
}

/// Opens a sealed state: an integrity error if it was altered, or sealed for
/// another account or server, or with another key.
pub fn open_state(key: &StateKey, binding: StateBinding<'_>, blob: &[u8]) -> Result<FreshState> {
    let version = match blob.get(4) {
        Some(&v @ (STATE_V1 | STATE_V2 | STATE_V3)) => v,
        _ => STATE_VERSION,
    };
    check_prefix(blob, &STATE_MAGIC, version, HEADER_LEN + XNONCE_LEN + aead::TAG_LEN, "state file")?;
    if blob[5..8] != [0, 0, 0] {
        return Err(CryptoError::Malformed("state file (reserved bytes)"));
    }
    let mut nonce = [0u8; XNONCE_LEN];
    nonce.copy_from_slice(&blob[HEADER_LEN..HEADER_LEN + XNONCE_LEN]);
    let body = aead::open(
        key.secret(),
        &nonce,
        &aad(&blob[..HEADER_LEN], binding)?,
        &blob[HEADER_LEN + XNONCE_LEN..],
    )?;
    let bad = || CryptoError::Malformed("state file contents");
    if body.len() < 12 {
        return Err(bad());
    }
    let wallet_revision = u64::from_be_bytes(body[..8].try_into().map_err(|_| bad())?);
    let count = u32::from_be_bytes(body[8..12].try_into().map_err(|_| bad())?) as usize;
    let files_end = count.checked_mul(ENTRY_LEN).and_then(|n| n.checked_add(12)).ok_or_else(bad)?;
    if count > MAX_FILES || body.len() < files_end || (version == STATE_V1 && body.len() != files_end) {
        return Err(bad());
    }
    let generations = body[12..files_end]
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let id = FileId(e[..ID_LEN].try_into().map_err(|_| bad())?);
            Ok((id, u64::from_be_bytes(e[ID_LEN..].try_into().map_err(|_| bad())?)))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let mut vault_keys = BTreeMap::new();
    let mut lacking_keys = BTreeSet::new();
    if version != STATE_V1 {
        let rest = &body[files_end..];
        let n = count_of(rest).ok_or_else(bad)?;
        let entry = if version == STATE_VERSION { VAULT_ENTRY_LEN } else { VAULT_ENTRY_V3_LEN };
        let vaults_end = n.checked_mul(entry).and_then(|l| l.checked_add(4)).ok_or_else(bad)?;
        if n > MAX_VAULTS || rest.len() < vaults_end || (version == STATE_V2 && rest.len() != vaults_end) {
            return Err(bad());
        }
        for e in rest[4..vaults_end].chunks_exact(entry) {
            let vault = VaultId(e[..ID_LEN].try_into().map_err(|_| bad())?);
            let count = u32::from_be_bytes(e[ID_LEN..ID_LEN + 4].try_into().map_err(|_| bad())?);
            let newest = KeyId(e[ID_LEN + 4..VAULT_ENTRY_V3_LEN].try_into().map_err(|_| bad())?);
            let check = match e.get(VAULT_ENTRY_V3_LEN..) {
                Some(c) if !c.is_empty() && c.iter().any(|b| *b != 0) => {
                    Some(KeyId(c.try_into().map_err(|_| bad())?))
                }
                _ => None,
            };
            if count == 0 || vault_keys.insert(vault, RememberedRing { count, newest, check }).is_some() {
                return Err(bad());
            }
        }
        if version != STATE_V2 {
            let rest = &rest[vaults_end..];
            let n = count_of(rest).ok_or_else(bad)?;
            if n > MAX_LACKING || rest.len() - 4 != n * LACKING_ENTRY_LEN {
                return Err(bad());
            }
            let mut state = FreshState::default();
            for e in rest[4..].chunks_exact(LACKING_ENTRY_LEN) {
                let vault = VaultId(e[..ID_LEN].try_into().map_err(|_| bad())?);
                let id = KeyId(e[ID_LEN..].try_into().map_err(|_| bad())?);
                if state.lacking_keys.contains(&(vault, id)) {
                    return Err(bad());
                }
                // Beyond the caps (a file written under other caps): dropped.
                state.note_lacking(vault, id);
            }
            lacking_keys = state.lacking_keys;
        }
    }
    Ok(FreshState { wallet_revision, generations, vault_keys, lacking_keys })
}

/// The u32 count a section starts with.
fn count_of(section: &[u8]) -> Option<usize> {
    Some(u32::from_be_bytes(section.get(..4)?.try_into().ok()?) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::OsRandom;
    use crate::crypto::Wallet;

    fn key() -> StateKey {
        let mut w = Wallet::new();
        w.ensure_state_key(&mut OsRandom).unwrap();
        let (w, _) = Wallet::open(&w.seal(b"p", FAST, &mut OsRandom).unwrap(), b"p").unwrap();
        w.state_key().unwrap().duplicate()
    }

    const FAST: crate::crypto::KdfParams = crate::crypto::KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };
    const ME: StateBinding<'static> = StateBinding { server: "tls-cert:sha256:aa", user: "alice" };

    #[test]
    fn states_round_trip_and_are_bound_to_their_account_and_key() {
        let k = key();
        let mut s = FreshState { wallet_revision: 9, ..Default::default() };
        s.generations.insert(FileId([1; 16]), 4);
        s.generations.insert(FileId([2; 16]), 7);
        let blob = seal_state(&k, ME, &s, &mut OsRandom).unwrap();
        assert_eq!(open_state(&k, ME, &blob).unwrap(), s);
        let other_user = StateBinding { user: "bob", ..ME };
        assert!(open_state(&k, other_user, &blob).unwrap_err().is_integrity(), "another account's file");
        let other_server = StateBinding { server: "tls-cert:sha256:bb", ..ME };
        assert!(open_state(&k, other_server, &blob).unwrap_err().is_integrity());
        assert!(open_state(&key(), ME, &blob).unwrap_err().is_integrity(), "another wallet's key");
        for at in [4, 9, 40, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 1;
            assert!(open_state(&k, ME, &bad).is_err(), "byte {at}");
        }
        assert!(!String::from_utf8_lossy(&blob).contains("alice"), "no names in the file");
    }

    fn ring(count: u32, id: u8, check: Option<u8>) -> RememberedRing {
        RememberedRing { count, newest: KeyId([id; 16]), check: check.map(|c| KeyId([c; 16])) }
    }

    #[test]
    fn merging_keeps_the_highest() {
        let mut a = FreshState { wallet_revision: 3, ..Default::default() };
        a.generations.insert(FileId([1; 16]), 5);
        let mut b = FreshState { wallet_revision: 2, ..Default::default() };
        b.generations.insert(FileId([1; 16]), 9);
        b.generations.insert(FileId([2; 16]), 1);
        a.vault_keys.insert(VaultId([5; 16]), ring(2, 2, Some(2)));
        b.vault_keys.insert(VaultId([5; 16]), ring(3, 3, Some(4)));
        b.vault_keys.insert(VaultId([6; 16]), ring(1, 1, Some(1)));
        a.vault_keys.insert(VaultId([7; 16]), ring(1, 1, None));
        b.vault_keys.insert(VaultId([7; 16]), ring(1, 1, Some(9)));
        a.lacking_keys.insert((VaultId([5; 16]), KeyId([7; 16])));
        b.lacking_keys.insert((VaultId([6; 16]), KeyId([8; 16])));
        a.merge(&b);
        assert_eq!(a.lacking_keys.len(), 2, "lacking keys are kept from both");
        assert_eq!(a.wallet_revision, 3);
        assert_eq!(a.generations[&FileId([1; 16])], 9);
        assert_eq!(a.generations[&FileId([2; 16])], 1);
        assert_eq!(a.vault_keys[&VaultId([5; 16])], ring(3, 3, Some(4)));
        assert_eq!(a.vault_keys[&VaultId([7; 16])], ring(1, 1, Some(9)), "an entry with its check wins");
        assert_eq!(a.vault_keys.len(), 3);
    }

    /// Lacking keys are capped per vault (one is enough to refuse), so a
    /// flood of made-up ids in one vault leaves room for every other vault.
    #[test]
    fn lacking_keys_are_capped_per_vault() {
        let mut s = FreshState::default();
        for i in 0..MAX_LACKING_PER_VAULT as u8 + 10 {
            s.note_lacking(VaultId([1; 16]), KeyId([i; 16]));
        }
        assert_eq!(s.lacking_in(VaultId([1; 16])).len(), MAX_LACKING_PER_VAULT);
        assert!(s.note_lacking(VaultId([2; 16]), KeyId([1; 16])), "another vault still has room");
        assert!(!s.note_lacking(VaultId([2; 16]), KeyId([1; 16])), "once");
        assert_eq!(s.lacking_in(VaultId([2; 16])), vec![KeyId([1; 16])]);
        assert!(s.lacking_in(VaultId([3; 16])).is_empty());
    }

    fn sealed_body(k: &StateKey, version: u8, body: &[u8]) -> Vec<u8> {
        let header = [&STATE_MAGIC[..], &[version, 0, 0, 0]].concat();
        let nonce = [version; XNONCE_LEN];
        let sealed = aead::seal(k.secret(), &nonce, &aad(&header, ME).unwrap(), body).unwrap();
        [header, nonce.to_vec(), sealed].concat()
    }

    /// Version 4 keeps the vaults' keyrings with a check of the newest key,
    /// and lacking keys; version-3, -2 and -1 files still open; a section
    /// with trailing bytes, or a lacking key twice, does not.
    #[test]
    fn vault_keyrings_and_lacking_keys_round_trip_and_older_versions_still_open() {
        let k = key();
        let mut s = FreshState { wallet_revision: 2, ..Default::default() };
        s.generations.insert(FileId([1; 16]), 4);
        s.vault_keys.insert(VaultId([7; 16]), ring(3, 9, Some(10)));
        s.vault_keys.insert(VaultId([6; 16]), ring(1, 5, None));
        s.lacking_keys.insert((VaultId([7; 16]), KeyId([8; 16])));
        let blob = seal_state(&k, ME, &s, &mut OsRandom).unwrap();
        assert_eq!(blob[4], 4);
        assert_eq!(open_state(&k, ME, &blob).unwrap(), s);
        // Versions 3 and 2: vault entries without the check; version 2 ends after them.
        let mut v2 = 2u64.to_be_bytes().to_vec();
        v2.extend_from_slice(&0u32.to_be_bytes());
        v2.extend_from_slice(&1u32.to_be_bytes());
        v2.extend_from_slice(&[7; 16]);
        v2.extend_from_slice(&3u32.to_be_bytes());
        v2.extend_from_slice(&[9; 16]);
        let opened = open_state(&k, ME, &sealed_body(&k, 2, &v2)).unwrap();
        assert_eq!(opened.vault_keys[&VaultId([7; 16])], ring(3, 9, None));
        assert!(opened.lacking_keys.is_empty());
        let mut v3 = v2.clone();
        v3.extend_from_slice(&1u32.to_be_bytes());
        v3.extend_from_slice(&[7; 16]);
        v3.extend_from_slice(&[8; 16]);
        let opened = open_state(&k, ME, &sealed_body(&k, 3, &v3)).unwrap();
        assert_eq!(opened.vault_keys[&VaultId([7; 16])], ring(3, 9, None));
        assert_eq!(opened.lacking_in(VaultId([7; 16])), vec![KeyId([8; 16])]);
        assert!(open_state(&k, ME, &sealed_body(&k, 2, &v3)).is_err(), "version 2 with a lacking section");
        let mut trailing = v3.clone();
        trailing.push(0);
        assert!(open_state(&k, ME, &sealed_body(&k, 3, &trailing)).is_err(), "trailing bytes");
        let mut crowded = v2.clone();
        crowded.extend_from_slice(&(MAX_LACKING_PER_VAULT as u32 + 3).to_be_bytes());
        for i in 0..MAX_LACKING_PER_VAULT as u8 + 3 {
            crowded.extend_from_slice(&[[7u8; 16], [i; 16]].concat());
        }
        let opened = open_state(&k, ME, &sealed_body(&k, 3, &crowded)).expect("over the cap: extras dropped");
        assert_eq!(opened.lacking_in(VaultId([7; 16])).len(), MAX_LACKING_PER_VAULT);
        let mut twice = v2.clone();
        twice.extend_from_slice(&2u32.to_be_bytes());
        twice.extend_from_slice(&[[7u8; 16], [8; 16], [7; 16], [8; 16]].concat());
        assert!(open_state(&k, ME, &sealed_body(&k, 3, &twice)).is_err(), "a lacking key twice");
        // A version-1 file: no vault section.
        let mut v1 = 2u64.to_be_bytes().to_vec();
        v1.extend_from_slice(&1u32.to_be_bytes());
        v1.extend_from_slice(&[1; 16]);
        v1.extend_from_slice(&4u64.to_be_bytes());
        let opened = open_state(&k, ME, &sealed_body(&k, 1, &v1)).unwrap();
        assert_eq!((opened.wallet_revision, opened.generations.len(), opened.vault_keys.len()), (2, 1, 0));
    }
}
