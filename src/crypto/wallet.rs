//! The wallet: the user's vault keys, sealed under a key derived from a passphrase.
//!
//! passphrase --Argon2id(params, salt)--> wallet key --XChaCha20-Poly1305--> wallet
//! The sealed wallet is stored on the server, so one passphrase is enough to mount
//! from a new machine; the server sees only the blob. The Argon2id parameters are
//! stored in the blob (and authenticated), so they can be raised later: open with
//! the old ones, seal again with the new ones ([`KdfParams::is_weaker_than`] says
//! when). A vault may hold several keys: one active (used for new files and names)
//! and retired ones kept until every header that names them has been re-wrapped.
//!
//! Layout (docs/FORMAT.md): a 60-byte header (magic, version, KDF id and
//! parameters, salt, nonce); since version 3 the entries are sealed under a
//! random body key, fresh for each seal, which the header's slots carry:
//! wrapped under the passphrase's key, and (once the user made a recovery
//! key) sealed to the recovery key's public half (super::recovery). Each
//! part is authenticated together with every byte before it.
//!
//! The entries are typed records: vault keys, the key that authenticates this
//! user's local freshness state, per-vault flags (a vault all of whose
//! files carry manifests), the user's secret key for shares (super::share)
//! and the recovery key's public half. Records of a type this build does not
//! know are kept and written back unchanged, so an older client never drops
//! what a newer one stored. Version-1 (keys only) and version-2 wallets (the
//! records sealed under the passphrase's key directly) still open and are
//! written back as version 3.

use zeroize::Zeroizing;

use super::aead::{self, KEY_LEN, XNONCE_LEN};
use super::error::{check_prefix, CryptoError, Result};
use super::keys::{KeyId, VaultKey, WalletKey, KEY_ID_LEN};
use super::random::RandomSource;
use super::recovery::{self, RecoveryKey, RecoveryPublic, RECOVERY_PUBLIC_LEN, RECOVERY_SLOT_LEN};
use super::share::{UserSecret, USER_KEY_LEN};
use crate::ids::{VaultId, ID_LEN};

/// First four bytes of a sealed wallet.
pub const WALLET_MAGIC: [u8; 4] = *b"VLTW";
/// Wallet format version written by this build (versions 1 and 2 are still read).
pub const WALLET_FORMAT_VERSION: u8 = 3;
const WALLET_V1: u8 = 1;
const WALLET_V2: u8 = 2;
/// Record types of a version-2 wallet.
const RECORD_VAULT_KEY: u8 = 1;
const RECORD_STATE_KEY: u8 = 2;
const RECORD_VAULT_FLAGS: u8 = 3;
const RECORD_USER_KEY: u8 = 4;
const RECORD_RECOVERY: u8 = 5;
/// Vault flag: every file of the vault carries a manifest; a file without one
/// had it removed (by the server) and is refused.
const FLAG_MANIFESTS_REQUIRED: u8 = 1;
/// Longest record body accepted (a bound on what a wallet makes us allocate).
const MAX_RECORD_LEN: usize = 1 << 20;
/// KDF identifier for Argon2id version 0x13.
const KDF_ARGON2ID_13: u8 = 1;
const SALT_LEN: usize = 16;
const WALLET_HEADER_LEN: usize = 60;
/// Version 3: the body key wrapped under the passphrase's key.
const PASSPHRASE_SLOT_LEN: usize = KEY_LEN + aead::TAG_LEN;
/// Version 3: where the recovery slot count is.
const SLOT_COUNT_AT: usize = WALLET_HEADER_LEN + PASSPHRASE_SLOT_LEN;
const ENTRY_LEN: usize = ID_LEN + KEY_ID_LEN + 1 + KEY_LEN;
const STATE_ACTIVE: u8 = 1;
const STATE_RETIRED: u8 = 2;

/// Largest Argon2 memory cost accepted (2 GiB). A wallet asking for more is refused
/// before any memory is allocated, so a hostile server cannot exhaust the client.
pub const MAX_M_COST_KIB: u32 = 2 * 1024 * 1024;
/// Largest Argon2 time cost accepted.
pub const MAX_T_COST: u32 = 64;
/// Largest Argon2 parallelism accepted.
pub const MAX_P_COST: u32 = 16;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over memory.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl KdfParams {
    /// The default for new wallets: 64 MiB, 3 passes, 1 lane (RFC 9106's second
    /// recommendation; about 0.13 s per derivation on this kind of machine).
    pub const DEFAULT: KdfParams = KdfParams { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 };

    /// Checks the parameters are within what Argon2 allows and what we accept.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(CryptoError::KdfParams(why));
        if self.p_cost == 0 || self.p_cost > MAX_P_COST {
            return bad(format!("p_cost {} not in 1..={MAX_P_COST}", self.p_cost));
        }
        if self.t_cost == 0 || self.t_cost > MAX_T_COST {
            return bad(format!("t_cost {} not in 1..={MAX_T_COST}", self.t_cost));
        }
        let min_m = 8 * self.p_cost;
        if self.m_cost_kib < min_m || self.m_cost_kib > MAX_M_COST_KIB {
            return bad(format!("m_cost {} KiB not in {min_m}..={MAX_M_COST_KIB}", self.m_cost_kib));
        }
        Ok(())
    }

    /// True if these parameters cost less than `target` in memory or time, i.e.
    /// the wallet should be sealed again with `target`.
    pub fn is_weaker_than(&self, target: &KdfParams) -> bool {
        self.m_cost_kib < target.m_cost_kib || self.t_cost < target.t_cost
    }

    fn derive(&self, passphrase: &[u8], salt: &[u8; SALT_LEN]) -> Result<WalletKey> {
        Ok(WalletKey(self.stretch(passphrase, salt)?))
    }

    /// Argon2id(passphrase, salt) with these parameters, 32 bytes.
    pub(crate) fn stretch(&self, passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        self.validate()?;
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .map_err(|e| CryptoError::KdfParams(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase, salt, &mut key[..])
            .map_err(|e| CryptoError::KdfParams(e.to_string()))?;
        Ok(key)
    }
}

/// One key in the wallet.
#[derive(Debug)]
pub struct WalletEntry {
    /// The vault this key belongs to.
    pub vault: VaultId,
    /// The key.
    pub key: VaultKey,
    /// Whether this is the vault's current key (used for new files and names).
    pub active: bool,
}

/// The user's vault keys. `Debug` shows vault and key ids only.
#[derive(Default)]
pub struct Wallet {
    revision: u64,
    entries: Vec<WalletEntry>,
    state_key: Option<StateKey>,
    vault_flags: std::collections::BTreeMap<VaultId, u8>,
    /// The secret half of the user's key pair for shares.
    user_key: Option<UserSecret>,
    /// The public half of the user's recovery key: every seal adds a slot
    /// that the recovery key opens.
    recovery: Option<RecoveryPublic>,
    /// Records of types this build does not know, kept as they were.
    unknown: Vec<(u8, Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for Wallet {
    /// Vault and key ids, flags, the user key's fingerprint; no secret, and
    /// records of unknown types by type and length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unknown: Vec<(u8, usize)> = self.unknown.iter().map(|(t, b)| (*t, b.len())).collect();
        f.debug_struct("Wallet")
            .field("revision", &self.revision)
            .field("entries", &self.entries)
            .field("state_key", &self.state_key)
            .field("vault_flags", &self.vault_flags)
            .field("user_key", &self.user_key)
            .field("recovery", &self.recovery)
            .field("unknown (type, length)", &unknown)
            .finish()
    }
}

/// The key that seals this user's local freshness state (docs/FORMAT.md
/// "Local freshness state"). `Debug` hides it.
pub struct StateKey(Zeroizing<[u8; KEY_LEN]>);

impl StateKey {
    /// The key bytes.
    pub fn secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// An explicit copy (for the freshness store, which outlives the borrow
    /// of the wallet).
    pub fn duplicate(&self) -> Self {
        StateKey(Zeroizing::new(*self.0))
    }
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(<redacted>)")
    }
}

impl Wallet {
    /// An empty wallet at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// An explicit copy (to change and store it while the original stays in
    /// use until the copy is stored).
    pub fn duplicate(&self) -> Self {
        Wallet {
            revision: self.revision,
            entries: self
                .entries
                .iter()
                .map(|e| WalletEntry { vault: e.vault, key: e.key.duplicate(), active: e.active })
                .collect(),
            state_key: self.state_key.as_ref().map(StateKey::duplicate),
            vault_flags: self.vault_flags.clone(),
            user_key: self.user_key.as_ref().map(UserSecret::duplicate),
            recovery: self.recovery,
            unknown: self.unknown.clone(),
        }
    }

    /// The keys of `vault`, oldest first (the order they were added in).
    pub fn keys_of(&self, vault: VaultId) -> impl Iterator<Item = &VaultKey> {
        self.entries.iter().filter(move |e| e.vault == vault).map(|e| &e.key)
    }

    /// Incremented by every change, and sealed with the entries: a client that
    /// remembers the highest revision it saw can detect a rolled-back wallet.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Adds `key` as the active key of `vault`; the previous active key (if any)
    /// stays, retired, for reading headers not yet re-wrapped.
    pub fn add_key(&mut self, vault: VaultId, key: VaultKey) -> Result<()> {
        // Per vault: key ids are looked up within a vault only, and a key id
        // of another vault (ids are not secret) must not block this one.
        if self.entries.iter().any(|e| e.vault == vault && e.key.id() == key.id()) {
            return Err(CryptoError::Misuse("key id already in the wallet for this vault"));
        }
        for e in self.entries.iter_mut().filter(|e| e.vault == vault) {
            e.active = false;
        }
        self.entries.push(WalletEntry { vault, key, active: true });
        self.revision += 1;
        Ok(())
    }

    /// Removes a (retired) key once nothing needs it. Returns whether it was there.
    pub fn remove_key(&mut self, vault: VaultId, id: KeyId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| !(e.vault == vault && e.key.id() == id));
        let removed = self.entries.len() != before;
        self.revision += u64::from(removed);
        removed
    }

    /// The key new files and names of `vault` are sealed with.
    pub fn active_key(&self, vault: VaultId) -> Option<&VaultKey> {
        self.entries.iter().find(|e| e.vault == vault && e.active).map(|e| &e.key)
    }

    /// The key of `vault` with id `id`, active or retired. A key of another vault
    /// is never returned, even if the id matches.
    pub fn key(&self, vault: VaultId, id: KeyId) -> Option<&VaultKey> {
        self.entries.iter().find(|e| e.vault == vault && e.key.id() == id).map(|e| &e.key)
    }

    /// All entries.
    pub fn entries(&self) -> &[WalletEntry] {
        &self.entries
    }

    /// The key of this user's local freshness state, if one was made.
    pub fn state_key(&self) -> Option<&StateKey> {
        self.state_key.as_ref()
    }

    /// Makes the freshness state key if there is none (drawing 32 bytes from
    /// `rng`); returns whether the wallet changed.
    pub fn ensure_state_key(&mut self, rng: &mut dyn RandomSource) -> Result<bool> {
        if self.state_key.is_some() {
            return Ok(false);
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut key[..])?;
        self.state_key = Some(StateKey(key));
        self.revision += 1;
        Ok(true)
    }

    /// The secret half of the user's key pair (opens shares sent to them).
    pub fn user_key(&self) -> Option<&UserSecret> {
        self.user_key.as_ref()
    }

    /// Makes the user's key pair if the wallet has none yet (drawing 32 bytes
    /// from `rng`); returns whether the wallet changed.
    pub fn ensure_user_key(&mut self, rng: &mut dyn RandomSource) -> Result<bool> {
        if self.user_key.is_some() {
            return Ok(false);
        }
        self.user_key = Some(UserSecret::generate(rng)?);
        self.revision += 1;
        Ok(true)
    }

    /// Whether every file of `vault` carries a manifest (so one without is
    /// refused rather than trusted as written by an older client).
    pub fn manifests_required(&self, vault: VaultId) -> bool {
        self.vault_flags.get(&vault).is_some_and(|f| f & FLAG_MANIFESTS_REQUIRED != 0)
    }

    /// Notes that every file of `vault` carries a manifest (a new vault, or
    /// one whose files all got one); returns whether the wallet changed.
    pub fn require_manifests(&mut self, vault: VaultId) -> bool {
        let flags = self.vault_flags.entry(vault).or_insert(0);
        if *flags & FLAG_MANIFESTS_REQUIRED != 0 {
            return false;
        }
        *flags |= FLAG_MANIFESTS_REQUIRED;
        self.revision += 1;
        true
    }

    /// Whether a recovery key opens this wallet once sealed.
    pub fn has_recovery(&self) -> bool {
        self.recovery.is_some()
    }

    /// Makes `key` the wallet's recovery key (replacing any earlier one:
    /// wallets sealed from now on open with it, not with the earlier one).
    pub fn set_recovery(&mut self, key: &RecoveryKey) {
        self.recovery = Some(key.public());
        self.revision += 1;
    }

    fn serialize(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(16 + self.entries.len() * (ENTRY_LEN + 5)));
        out.extend_from_slice(&self.revision.to_be_bytes());
        let count = self.entries.len()
            + usize::from(self.state_key.is_some())
            + self.vault_flags.len()
            + usize::from(self.user_key.is_some())
            + usize::from(self.recovery.is_some())
            + self.unknown.len();
        out.extend_from_slice(&(count as u32).to_be_bytes());
        let mut record = |kind: u8, body: &[u8]| {
            out.push(kind);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(body);
        };
        for e in &self.entries {
            let mut body = Zeroizing::new(Vec::with_capacity(ENTRY_LEN));
            body.extend_from_slice(e.vault.as_bytes());
            body.extend_from_slice(&e.key.id().0);
            body.push(if e.active { STATE_ACTIVE } else { STATE_RETIRED });
            body.extend_from_slice(e.key.secret());
            record(RECORD_VAULT_KEY, &body);
        }
        if let Some(key) = &self.state_key {
            record(RECORD_STATE_KEY, &key.0[..]);
        }
        for (vault, flags) in &self.vault_flags {
            let mut body = vault.as_bytes().to_vec();
            body.push(*flags);
            record(RECORD_VAULT_FLAGS, &body);
        }
        if let Some(key) = &self.user_key {
            record(RECORD_USER_KEY, key.secret());
        }
        if let Some(key) = &self.recovery {
            record(RECORD_RECOVERY, &key.0);
        }
        for (kind, body) in &self.unknown {
            record(*kind, body);
        }
        out
    }

    /// Parses version-2 and -3 contents: revision, count, typed records.
    pub(crate) fn deserialize(bytes: &[u8]) -> Result<Self> {
        let bad = || CryptoError::Malformed("wallet contents");
        if bytes.len() < 12 {
            return Err(bad());
        }
        let revision = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| bad())?);
        let count = u32::from_be_bytes(bytes[8..12].try_into().map_err(|_| bad())?) as usize;
        let mut rest = &bytes[12..];
        let mut w = Wallet { revision, ..Wallet::default() };
        for _ in 0..count {
            if rest.len() < 5 {
                return Err(bad());
            }
            let kind = rest[0];
            let len = u32::from_be_bytes(rest[1..5].try_into().map_err(|_| bad())?) as usize;
            if len > MAX_RECORD_LEN || rest.len() < 5 + len {
                return Err(bad());
            }
            let body = &rest[5..5 + len];
            rest = &rest[5 + len..];
            match kind {
                RECORD_VAULT_KEY if len == ENTRY_LEN => w.entries.push(parse_entry(body)?),
                RECORD_STATE_KEY if len == KEY_LEN && w.state_key.is_none() => {
                    let mut key = Zeroizing::new([0u8; KEY_LEN]);
                    key.copy_from_slice(body);
                    w.state_key = Some(StateKey(key));
                }
                RECORD_VAULT_FLAGS if len == ID_LEN + 1 => {
                    let vault = VaultId(body[..ID_LEN].try_into().map_err(|_| bad())?);
                    if w.vault_flags.insert(vault, body[ID_LEN]).is_some() {
                        return Err(bad());
                    }
                }
                RECORD_USER_KEY if len == USER_KEY_LEN && w.user_key.is_none() => {
                    w.user_key = Some(UserSecret::from_bytes(body)?);
                }
                RECORD_RECOVERY if len == RECOVERY_PUBLIC_LEN && w.recovery.is_none() => {
                    w.recovery = Some(RecoveryPublic::from_bytes(body)?);
                }
                RECORD_VAULT_KEY | RECORD_STATE_KEY | RECORD_VAULT_FLAGS | RECORD_USER_KEY
                | RECORD_RECOVERY => return Err(bad()),
                other => w.unknown.push((other, Zeroizing::new(body.to_vec()))),
            }
        }
        if !rest.is_empty() {
            return Err(bad());
        }
        Ok(w)
    }

    /// Parses version-1 contents: revision, count, fixed-size key entries.
    pub(crate) fn deserialize_v1(bytes: &[u8]) -> Result<Self> {
        let bad = || CryptoError::Malformed("wallet contents");
        if bytes.len() < 12 {
            return Err(bad());
        }
        let revision = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| bad())?);
        let count = u32::from_be_bytes(bytes[8..12].try_into().map_err(|_| bad())?) as usize;
        let body = &bytes[12..];
        if body.len() != count.checked_mul(ENTRY_LEN).ok_or_else(bad)? {
            return Err(bad());
        }
        let entries = body.chunks_exact(ENTRY_LEN).map(parse_entry).collect::<Result<Vec<_>>>()?;
        Ok(Wallet { revision, entries, ..Wallet::default() })
    }

    /// Seals the wallet under `passphrase` (and, if it has one, for its
    /// recovery key). Draws from `rng`, in order: salt (16 bytes), nonce
    /// (24), body key (32), the recovery slot's ephemeral key (32, only with
    /// a recovery key), body nonce (24).
    pub fn seal(&self, passphrase: &[u8], params: KdfParams, rng: &mut dyn RandomSource) -> Result<Vec<u8>> {
        params.validate()?;
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt)?;
        let mut nonce = [0u8; XNONCE_LEN];
        rng.fill(&mut nonce)?;
        let mut out = Vec::with_capacity(SLOT_COUNT_AT + 1 + RECOVERY_SLOT_LEN + 256);
        out.extend_from_slice(&WALLET_MAGIC);
        out.push(WALLET_FORMAT_VERSION);
        out.push(KDF_ARGON2ID_13);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&params.m_cost_kib.to_be_bytes());
        out.extend_from_slice(&params.t_cost.to_be_bytes());
        out.extend_from_slice(&params.p_cost.to_be_bytes());
        out.extend_from_slice(&salt);
        out.extend_from_slice(&nonce);
        debug_assert_eq!(out.len(), WALLET_HEADER_LEN);
        let mut body_key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut body_key[..])?;
        let wrap = params.derive(passphrase, &salt)?;
        let slot = aead::seal(&wrap.0, &nonce, &out, &body_key[..])?;
        out.extend_from_slice(&slot);
        match &self.recovery {
            None => out.push(0),
            Some(public) => {
                out.push(1);
                let slot = recovery::seal_slot(public, &body_key, &out, rng)?;
                out.extend_from_slice(&slot);
            }
        }
        let mut body_nonce = [0u8; XNONCE_LEN];
        rng.fill(&mut body_nonce)?;
        out.extend_from_slice(&body_nonce);
        let sealed = aead::seal(&body_key, &body_nonce, &out, &self.serialize())?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a sealed wallet (version 3, 2 or 1) with the passphrase,
    /// returning it with the parameters it was sealed with.
    pub fn open(blob: &[u8], passphrase: &[u8]) -> Result<(Wallet, KdfParams)> {
        let (params, salt, nonce) = parse_wallet_header(blob)?;
        let parts = if blob[4] == WALLET_FORMAT_VERSION { Some(V3Parts::split(blob)?) } else { None };
        let key = params.derive(passphrase, &salt)?;
        // The version is authenticated (the header is the AAD).
        let wallet = match parts {
            Some(parts) => {
                let slot = &blob[WALLET_HEADER_LEN..SLOT_COUNT_AT];
                let opened = aead::open(&key.0, &nonce, &blob[..WALLET_HEADER_LEN], slot)
                    .map_err(|_| CryptoError::WalletLocked)?;
                let mut body_key = Zeroizing::new([0u8; KEY_LEN]);
                body_key.copy_from_slice(&opened);
                parts.open_body(blob, &body_key)?
            }
            None => {
                let plain =
                    aead::open(&key.0, &nonce, &blob[..WALLET_HEADER_LEN], &blob[WALLET_HEADER_LEN..])
                        .map_err(|_| CryptoError::WalletLocked)?;
                match blob[4] {
                    WALLET_V1 => Wallet::deserialize_v1(&plain)?,
                    _ => Wallet::deserialize(&plain)?,
                }
            }
        };
        Ok((wallet, params))
    }

    /// Opens a sealed wallet with the user's recovery key instead of the
    /// passphrase (a version-3 wallet sealed after the key was made).
    pub fn open_with_recovery(blob: &[u8], key: &RecoveryKey) -> Result<(Wallet, KdfParams)> {
        let (params, _, _) = parse_wallet_header(blob)?;
        if blob[4] != WALLET_FORMAT_VERSION {
            return Err(CryptoError::Recovery(
                "this wallet was stored by an older vaultfs, before a recovery key was made: no recovery key opens it"
                    .into(),
            ));
        }
        let parts = V3Parts::split(blob)?;
        let Some(slot_at) = parts.recovery_slot else {
            return Err(CryptoError::Recovery(
                "the wallet has no recovery slot: no recovery key was made for it".into(),
            ));
        };
        let body_key =
            recovery::open_slot(key, &blob[slot_at..slot_at + RECOVERY_SLOT_LEN], &blob[..slot_at])?;
        let wallet = parts.open_body(blob, &body_key)?;
        // Sealed for this key, the wallet names it too.
        if wallet.recovery != Some(key.public()) {
            return Err(CryptoError::Recovery("the wallet names another recovery key".into()));
        }
        Ok((wallet, params))
    }
}

/// Where the parts of a version-3 wallet after its 60-byte header are.
struct V3Parts {
    /// Offset of the recovery slot, if there is one.
    recovery_slot: Option<usize>,
    /// Offset of the body nonce; the sealed entries follow it.
    body_nonce: usize,
}

impl V3Parts {
    fn split(blob: &[u8]) -> Result<Self> {
        let bad = || CryptoError::Malformed("wallet (slots)");
        let (recovery_slot, body_nonce) = match blob.get(SLOT_COUNT_AT) {
            Some(0) => (None, SLOT_COUNT_AT + 1),
            Some(1) => (Some(SLOT_COUNT_AT + 1), SLOT_COUNT_AT + 1 + RECOVERY_SLOT_LEN),
            _ => return Err(bad()),
        };
        if blob.len() < body_nonce + XNONCE_LEN + aead::TAG_LEN {
            return Err(bad());
        }
        Ok(V3Parts { recovery_slot, body_nonce })
    }

    /// The entries, opened with the body key; everything before them is the AAD.
    fn open_body(&self, blob: &[u8], body_key: &[u8; KEY_LEN]) -> Result<Wallet> {
        let sealed_at = self.body_nonce + XNONCE_LEN;
        let nonce: [u8; XNONCE_LEN] =
            blob[self.body_nonce..sealed_at].try_into().map_err(|_| CryptoError::Malformed("wallet"))?;
        // A slot opened, so the key was right: a body that does not open was
        // altered (not "wrong passphrase", which would invite starting over).
        let plain = aead::open(body_key, &nonce, &blob[..sealed_at], &blob[sealed_at..])
            .map_err(|_| CryptoError::Integrity(super::error::IntegrityFailure::Authentication))?;
        Wallet::deserialize(&plain)
    }
}

fn parse_entry(raw: &[u8]) -> Result<WalletEntry> {
    let bad = || CryptoError::Malformed("wallet contents");
    let vault = VaultId(raw[..ID_LEN].try_into().map_err(|_| bad())?);
    let id = KeyId(raw[ID_LEN..ID_LEN + KEY_ID_LEN].try_into().map_err(|_| bad())?);
    let active = match raw[ID_LEN + KEY_ID_LEN] {
        STATE_ACTIVE => true,
        STATE_RETIRED => false,
        _ => return Err(bad()),
    };
    let mut secret = [0u8; KEY_LEN];
    secret.copy_from_slice(&raw[ID_LEN + KEY_ID_LEN + 1..]);
    let key = VaultKey::from_bytes(id, secret);
    zeroize::Zeroize::zeroize(&mut secret);
    Ok(WalletEntry { vault, key, active })
}

fn parse_wallet_header(blob: &[u8]) -> Result<(KdfParams, [u8; SALT_LEN], [u8; XNONCE_LEN])> {
    let (version, min_len) = match blob.get(4) {
        Some(&v @ (WALLET_V1 | WALLET_V2)) => (v, WALLET_HEADER_LEN + aead::TAG_LEN),
        _ => (WALLET_FORMAT_VERSION, SLOT_COUNT_AT + 1 + XNONCE_LEN + aead::TAG_LEN),
    };
    check_prefix(blob, &WALLET_MAGIC, version, min_len, "wallet")?;
    if blob[5] != KDF_ARGON2ID_13 || blob[6..8] != [0, 0] {
        return Err(CryptoError::Malformed("wallet (unknown KDF or reserved bits)"));
    }
    let u32_at = |at: usize| u32::from_be_bytes([blob[at], blob[at + 1], blob[at + 2], blob[at + 3]]);
    let params = KdfParams { m_cost_kib: u32_at(8), t_cost: u32_at(12), p_cost: u32_at(16) };
    params.validate()?;
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&blob[20..36]);
    let mut nonce = [0u8; XNONCE_LEN];
    nonce.copy_from_slice(&blob[36..60]);
    Ok((params, salt, nonce))
}

/// The KDF parameters a sealed wallet names (unauthenticated until it is opened).
pub fn wallet_kdf_params(blob: &[u8]) -> Result<KdfParams> {
    parse_wallet_header(blob).map(|(p, _, _)| p)
}

/// Whether a sealed wallet carries a recovery slot (unauthenticated: for
/// what to tell a user or admin, never for a decision about keys).
pub fn wallet_has_recovery_slot(blob: &[u8]) -> bool {
    parse_wallet_header(blob).is_ok()
        && blob[4] == WALLET_FORMAT_VERSION
        && V3Parts::split(blob).is_ok_and(|p| p.recovery_slot.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::OsRandom;

    /// Cheap parameters so tests run fast; production uses [`KdfParams::DEFAULT`].
    const FAST: KdfParams = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

    fn key(n: u8) -> VaultKey {
        VaultKey::from_bytes(KeyId([n; 16]), [n.wrapping_add(100); 32])
    }

    #[test]
    fn seal_open_round_trip_keeps_keys_states_and_revision() {
        let v = VaultId([1; 16]);
        let mut w = Wallet::new();
        w.add_key(v, key(1)).unwrap();
        w.add_key(v, key(2)).unwrap();
        w.add_key(VaultId([9; 16]), key(3)).unwrap();
        let blob = w.seal(b"correct horse", FAST, &mut OsRandom).unwrap();
        let (opened, params) = Wallet::open(&blob, b"correct horse").unwrap();
        assert_eq!(params, FAST);
        assert_eq!(opened.revision(), 3);
        assert_eq!(opened.active_key(v).unwrap().id(), KeyId([2; 16]));
        assert_eq!(opened.key(v, KeyId([1; 16])).unwrap().secret(), &[101; 32]);
        assert!(opened.key(v, KeyId([3; 16])).is_none(), "key of another vault must not be found");
        assert_eq!(opened.entries().len(), 3);
    }

    #[test]
    fn wrong_passphrase_and_tampering_are_refused() {
        let mut w = Wallet::new();
        w.add_key(VaultId([1; 16]), key(1)).unwrap();
        let blob = w.seal(b"pass", FAST, &mut OsRandom).unwrap();
        assert!(matches!(Wallet::open(&blob, b"pasS"), Err(CryptoError::WalletLocked)));
        for at in [20, 40, 61] {
            let mut bad = blob.clone();
            bad[at] ^= 0x80;
            assert!(matches!(Wallet::open(&bad, b"pass"), Err(CryptoError::WalletLocked)), "byte {at}");
        }
        // The passphrase opens its slot: a changed body is an alteration, not
        // a wrong passphrase.
        for at in [SLOT_COUNT_AT + 1, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 0x80;
            assert!(matches!(Wallet::open(&bad, b"pass"), Err(CryptoError::Integrity(_))), "byte {at}");
        }
        let mut bad = blob.clone();
        bad[SLOT_COUNT_AT] = 2;
        assert!(matches!(Wallet::open(&bad, b"pass"), Err(CryptoError::Malformed(_))));
        // Neither Debug output shows a secret.
        let mut w = Wallet::new();
        w.add_key(VaultId([1; 16]), key(1)).unwrap();
        w.unknown.push((0x42, Zeroizing::new(vec![0xab; 4])));
        let shown = format!("{w:?}");
        for secret in ["101, 101", "65656565", "171, 171", "abababab"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("(66, 4)"), "{shown}");
        // Raising the cost parameters in the blob changes the derived key.
        let mut bad = blob.clone();
        bad[15] = 2; // t_cost 1 -> 2
        assert!(matches!(Wallet::open(&bad, b"pass"), Err(CryptoError::WalletLocked)));
    }

    #[test]
    fn hostile_parameters_are_refused_before_deriving() {
        let w = Wallet::new();
        let mut blob = w.seal(b"p", FAST, &mut OsRandom).unwrap();
        blob[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Wallet::open(&blob, b"p"), Err(CryptoError::KdfParams(_))));
        assert!(KdfParams { m_cost_kib: 64, t_cost: 0, p_cost: 1 }.validate().is_err());
        assert!(KdfParams { m_cost_kib: 7, t_cost: 1, p_cost: 1 }.validate().is_err());
        assert!(KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 17 }.validate().is_err());
        KdfParams::DEFAULT.validate().unwrap();
    }

    #[test]
    fn parameters_can_be_upgraded() {
        let mut w = Wallet::new();
        w.add_key(VaultId([1; 16]), key(1)).unwrap();
        let old = w.seal(b"p", FAST, &mut OsRandom).unwrap();
        let stronger = KdfParams { m_cost_kib: 256, t_cost: 2, p_cost: 1 };
        assert!(wallet_kdf_params(&old).unwrap().is_weaker_than(&stronger));
        let (w, _) = Wallet::open(&old, b"p").unwrap();
        let new = w.seal(b"p", stronger, &mut OsRandom).unwrap();
        assert_eq!(wallet_kdf_params(&new).unwrap(), stronger);
        assert!(!stronger.is_weaker_than(&stronger));
        assert_eq!(Wallet::open(&new, b"p").unwrap().0.entries().len(), 1);
    }

    #[test]
    fn keys_are_unique_and_removable() {
        let v = VaultId([1; 16]);
        let mut w = Wallet::new();
        w.add_key(v, key(1)).unwrap();
        assert!(w.add_key(v, key(1)).is_err());
        assert!(w.remove_key(v, KeyId([1; 16])));
        assert!(!w.remove_key(v, KeyId([1; 16])));
        assert!(w.active_key(v).is_none());
        assert_eq!(w.revision(), 2);
    }

    #[test]
    fn malformed_wallets() {
        assert!(matches!(Wallet::open(b"", b"p"), Err(CryptoError::Malformed(_))));
        assert!(matches!(Wallet::open(b"XXXX\x01", b"p"), Err(CryptoError::BadMagic(_))));
        assert!(matches!(Wallet::open(b"VLTW\x07", b"p"), Err(CryptoError::UnsupportedVersion { .. })));
        assert!(matches!(Wallet::open(b"VLTW\x01short", b"p"), Err(CryptoError::Malformed(_))));
        assert!(Wallet::deserialize(&[0; 11]).is_err());
        let mut one = vec![0u8; 12 + ENTRY_LEN];
        one[11] = 1;
        one[12 + ID_LEN + KEY_ID_LEN] = 7; // unknown state
        assert!(Wallet::deserialize_v1(&one).is_err());
        // Version 2: a record longer than what follows, a key record of the
        // wrong size, a second state key, bytes after the last record.
        let record = |kind: u8, body: &[u8]| [&[kind][..], &(body.len() as u32).to_be_bytes(), body].concat();
        let contents = |records: &[Vec<u8>]| {
            let mut out = 5u64.to_be_bytes().to_vec();
            out.extend_from_slice(&(records.len() as u32).to_be_bytes());
            records.iter().for_each(|r| out.extend_from_slice(r));
            out
        };
        let mut cut = contents(&[record(1, &[0; ENTRY_LEN])]);
        cut.pop();
        assert!(Wallet::deserialize(&cut).is_err());
        assert!(Wallet::deserialize(&contents(&[record(1, &[0; 10])])).is_err());
        assert!(Wallet::deserialize(&contents(&[record(2, &[1; 32]), record(2, &[2; 32])])).is_err());
        let mut extra = contents(&[record(2, &[1; 32])]);
        extra.push(0);
        assert!(Wallet::deserialize(&extra).is_err());
    }

    #[test]
    fn version_2_keeps_state_key_flags_and_records_it_does_not_know() {
        let v = VaultId([1; 16]);
        let mut w = Wallet::new();
        w.add_key(v, key(1)).unwrap();
        assert!(w.ensure_state_key(&mut OsRandom).unwrap());
        assert!(!w.ensure_state_key(&mut OsRandom).unwrap(), "made once");
        assert!(!w.manifests_required(v));
        assert!(w.require_manifests(v) && !w.require_manifests(v));
        w.unknown.push((0x42, Zeroizing::new(b"from a newer vaultfs".to_vec())));
        assert_eq!(w.revision(), 3);
        let blob = w.duplicate().seal(b"p", FAST, &mut OsRandom).unwrap();
        assert_eq!(blob[4], 3);
        let (back, _) = Wallet::open(&blob, b"p").unwrap();
        assert_eq!(back.revision(), 3);
        assert!(back.manifests_required(v) && !back.manifests_required(VaultId([2; 16])));
        assert_eq!(back.state_key().unwrap().secret(), w.state_key().unwrap().secret());
        assert_eq!(back.unknown.len(), 1);
        assert_eq!(&back.unknown[0].1[..], b"from a newer vaultfs");
        assert_eq!(back.active_key(v).unwrap().id(), KeyId([1; 16]));
        // A version-3 wallet relabelled as version 1 or 2 does not open.
        let mut relabelled = blob.clone();
        relabelled[4] = 1;
        assert!(Wallet::open(&relabelled, b"p").is_err());
        relabelled[4] = 2;
        assert!(Wallet::open(&relabelled, b"p").is_err());
    }

    #[test]
    fn a_recovery_key_opens_every_later_seal_and_nothing_else() {
        let v = VaultId([1; 16]);
        let mut w = Wallet::new();
        w.add_key(v, key(1)).unwrap();
        let before = w.seal(b"p", FAST, &mut OsRandom).unwrap();
        assert!(!wallet_has_recovery_slot(&before));
        let e =
            Wallet::open_with_recovery(&before, &RecoveryKey::generate(&mut OsRandom).unwrap()).unwrap_err();
        assert!(e.to_string().contains("no recovery key was made"), "{e}");

        let paper = RecoveryKey::generate(&mut OsRandom).unwrap();
        w.set_recovery(&paper);
        assert!(w.has_recovery());
        let blob = w.seal(b"p", FAST, &mut OsRandom).unwrap();
        assert!(wallet_has_recovery_slot(&blob));
        let (opened, params) = Wallet::open_with_recovery(&blob, &paper).unwrap();
        assert_eq!((params, opened.revision()), (FAST, 2));
        assert_eq!(opened.active_key(v).unwrap().secret(), &[101; 32]);
        assert!(opened.has_recovery());
        // The passphrase still opens it; sealed again under a new passphrase
        // (without the paper key at hand), the recovery key still opens it.
        let (again, _) = Wallet::open(&blob, b"p").unwrap();
        let changed = again.seal(b"new", FAST, &mut OsRandom).unwrap();
        assert!(Wallet::open(&changed, b"p").is_err());
        assert_eq!(Wallet::open_with_recovery(&changed, &paper).unwrap().0.entries().len(), 1);

        // Another recovery key, a replaced one, any altered byte: refused.
        let other = RecoveryKey::generate(&mut OsRandom).unwrap();
        let e = Wallet::open_with_recovery(&blob, &other).unwrap_err();
        assert!(e.to_string().contains("does not open the wallet"), "{e}");
        let mut replaced = Wallet::open(&blob, b"p").unwrap().0;
        replaced.set_recovery(&other);
        let replaced = replaced.seal(b"p", FAST, &mut OsRandom).unwrap();
        assert!(Wallet::open_with_recovery(&replaced, &paper).is_err());
        assert!(Wallet::open_with_recovery(&replaced, &other).is_ok());
        for at in (0..blob.len()).step_by(7).chain([SLOT_COUNT_AT, blob.len() - 1]) {
            let mut bad = blob.clone();
            bad[at] ^= 0x01;
            assert!(Wallet::open_with_recovery(&bad, &paper).is_err(), "byte {at}");
        }
        // The slot cannot be dropped: the passphrase's path authenticates the count.
        let mut stripped = blob[..SLOT_COUNT_AT].to_vec();
        stripped.push(0);
        stripped.extend_from_slice(&blob[SLOT_COUNT_AT + 1 + RECOVERY_SLOT_LEN..]);
        assert!(matches!(Wallet::open(&stripped, b"p"), Err(CryptoError::Integrity(_))));
    }

    /// A wallet whose slot the recovery key opens but which does not name
    /// that key (made by someone who had the public half) is refused.
    #[test]
    fn a_wallet_that_does_not_name_its_recovery_key_is_refused() {
        let paper = RecoveryKey::generate(&mut OsRandom).unwrap();
        let mut w = Wallet::new();
        w.set_recovery(&paper);
        let blob = w.seal(b"p", FAST, &mut OsRandom).unwrap();
        let parts = V3Parts::split(&blob).unwrap();
        let slot_at = parts.recovery_slot.unwrap();
        let body_key =
            recovery::open_slot(&paper, &blob[slot_at..slot_at + RECOVERY_SLOT_LEN], &blob[..slot_at])
                .unwrap();
        let sealed_at = parts.body_nonce + XNONCE_LEN;
        let nonce: [u8; XNONCE_LEN] = blob[parts.body_nonce..sealed_at].try_into().unwrap();
        let mut forged = blob[..sealed_at].to_vec();
        let sealed = aead::seal(&body_key, &nonce, &forged, &Wallet::new().serialize()).unwrap();
        forged.extend_from_slice(&sealed);
        let e = Wallet::open_with_recovery(&forged, &paper).unwrap_err();
        assert!(e.to_string().contains("names another recovery key"), "{e}");
    }

    /// Every byte a seal draws is where docs/FORMAT.md says, and nothing more.
    #[test]
    fn a_seal_draws_what_the_format_lists() {
        use crate::crypto::random::ReplayRandom;
        let mut w = Wallet::new();
        let mut rng = ReplayRandom::new(vec![3; 16 + 24 + 32 + 24]);
        w.seal(b"p", FAST, &mut rng).unwrap();
        assert_eq!(rng.remaining(), 0);
        w.set_recovery(&RecoveryKey::generate(&mut OsRandom).unwrap());
        let mut rng = ReplayRandom::new(vec![3; 16 + 24 + 32 + 32 + 24]);
        let blob = w.seal(b"p", FAST, &mut rng).unwrap();
        assert_eq!(rng.remaining(), 0);
        assert_eq!(&blob[20..36], &[3; 16], "salt");
        assert_eq!(blob[SLOT_COUNT_AT], 1);
    }

    #[test]
    fn the_user_key_is_made_once_and_kept() {
        let mut w = Wallet::new();
        assert!(w.user_key().is_none());
        assert!(w.ensure_user_key(&mut OsRandom).unwrap());
        assert!(!w.ensure_user_key(&mut OsRandom).unwrap(), "made once");
        let public = w.user_key().unwrap().public();
        let blob = w.seal(b"p", FAST, &mut OsRandom).unwrap();
        let (back, _) = Wallet::open(&blob, b"p").unwrap();
        assert_eq!(back.user_key().unwrap().public(), public);
        assert_eq!(back.revision(), 1);
        // Two user-key records, or one of the wrong size, are refused.
        let record =
            |body: &[u8]| [&[RECORD_USER_KEY][..], &(body.len() as u32).to_be_bytes(), body].concat();
        let contents = |records: &[Vec<u8>]| {
            let mut out = 1u64.to_be_bytes().to_vec();
            out.extend_from_slice(&(records.len() as u32).to_be_bytes());
            records.iter().for_each(|r| out.extend_from_slice(r));
            out
        };
        assert!(Wallet::deserialize(&contents(&[record(&[1; 32])])).is_ok());
        assert!(Wallet::deserialize(&contents(&[record(&[1; 32]), record(&[2; 32])])).is_err());
        assert!(Wallet::deserialize(&contents(&[record(&[1; 31])])).is_err());
    }
}
