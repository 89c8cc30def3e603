//! Encrypted names: vault names, record titles, record fields and file names.
//!
//! Names leave the client only sealed under the vault key. Each sealed name is
//! bound to what it names (its kind and the ids of its vault, record and file), so
//! the server can neither swap two names nor move a name onto another object. The
//! plaintext is padded to a multiple of [`NAME_PAD`] bytes so ciphertext lengths
//! reveal only a coarse bucket of the name's length.
//!
//! Layout (docs/FORMAT.md): `version (1) || key id (16) || nonce (24) || sealed`,
//! where `sealed` is XChaCha20-Poly1305 of `len (u32 BE) || name || zero padding`.

use zeroize::Zeroizing;

use super::aead::{self, TAG_LEN, XNONCE_LEN};
use super::error::{auth_failure, CryptoError, Result};
use super::keys::{KeyId, VaultKey, KEY_ID_LEN};
use super::random::RandomSource;
use crate::ids::{FileId, RecordId, VaultId, ID_LEN};

/// Version byte of sealed names.
pub const NAME_FORMAT_VERSION: u8 = 1;
/// Padding granularity: names are padded so their length shows only in 32-byte steps.
pub const NAME_PAD: usize = 32;
/// Longest name (or serialized field set) that can be sealed: 1 MiB. Bounds the
/// memory an untrusted blob can make us allocate.
pub const MAX_NAME_LEN: usize = 1 << 20;
const NAME_DOMAIN: &[u8] = b"vaultfs/name/v1";
const PREFIX_LEN: usize = 1 + KEY_ID_LEN + XNONCE_LEN;
const LEN_FIELD: usize = 4;

/// What a sealed name names. The variant and its ids are bound into the ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameContext {
    /// The display name of a vault.
    VaultName {
        /// The vault.
        vault: VaultId,
    },
    /// The title of a record.
    RecordTitle {
        /// The vault holding the record.
        vault: VaultId,
        /// The record.
        record: RecordId,
    },
    /// A record's fields, serialized by the caller into one byte string.
    RecordFields {
        /// The vault holding the record.
        vault: VaultId,
        /// The record.
        record: RecordId,
    },
    /// The name of a file linked to a record.
    FileName {
        /// The vault.
        vault: VaultId,
        /// The record the file is linked to.
        record: RecordId,
        /// The file.
        file: FileId,
    },
}

impl NameContext {
    fn aad(&self, key_id: &KeyId) -> Vec<u8> {
        let zero = [0u8; ID_LEN];
        let (kind, vault, record, file) = match self {
            NameContext::VaultName { vault } => (1u8, vault.as_bytes(), &zero, &zero),
            NameContext::RecordTitle { vault, record } => (2, vault.as_bytes(), record.as_bytes(), &zero),
            NameContext::RecordFields { vault, record } => (3, vault.as_bytes(), record.as_bytes(), &zero),
            NameContext::FileName { vault, record, file } => {
                (4, vault.as_bytes(), record.as_bytes(), file.as_bytes())
            }
        };
        let mut aad = Vec::with_capacity(NAME_DOMAIN.len() + 2 + KEY_ID_LEN + 3 * ID_LEN);
        aad.extend_from_slice(NAME_DOMAIN);
        aad.push(NAME_FORMAT_VERSION);
        aad.extend_from_slice(&key_id.0);
        aad.push(kind);
        aad.extend_from_slice(vault);
        aad.extend_from_slice(record);
        aad.extend_from_slice(file);
        aad
    }
}

/// Seals `name` for `ctx` under `key`. Draws a 24-byte nonce from `rng`.
pub fn seal_name(
    key: &VaultKey,
    ctx: &NameContext,
    name: &[u8],
    rng: &mut dyn RandomSource,
) -> Result<Vec<u8>> {
    if name.len() > MAX_NAME_LEN {
        return Err(CryptoError::Misuse("name longer than MAX_NAME_LEN"));
    }
    let padded_len = (LEN_FIELD + name.len()).div_ceil(NAME_PAD) * NAME_PAD;
    let mut padded = Zeroizing::new(Vec::with_capacity(padded_len));
    padded.extend_from_slice(&(name.len() as u32).to_be_bytes());
    padded.extend_from_slice(name);
    padded.resize(padded_len, 0);

    let mut nonce = [0u8; XNONCE_LEN];
    rng.fill(&mut nonce)?;
    let key_id = key.id();
    let sealed = aead::seal(key.secret(), &nonce, &ctx.aad(&key_id), &padded)?;
    let mut out = Vec::with_capacity(PREFIX_LEN + sealed.len());
    out.push(NAME_FORMAT_VERSION);
    out.extend_from_slice(&key_id.0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The id of the key a sealed name needs (unauthenticated; for key lookup only).
pub fn name_key_id(blob: &[u8]) -> Result<KeyId> {
    if blob.is_empty() {
        return Err(CryptoError::Malformed("sealed name (empty)"));
    }
    if blob[0] != NAME_FORMAT_VERSION {
        return Err(CryptoError::UnsupportedVersion { what: "name", version: blob[0] });
    }
    if blob.len() < PREFIX_LEN + NAME_PAD + TAG_LEN {
        return Err(CryptoError::Malformed("sealed name (too short)"));
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&blob[1..1 + KEY_ID_LEN]);
    Ok(KeyId(id))
}

/// Opens a sealed name for `ctx`. Fails with an integrity error if the name was
/// altered or belongs to another object.
pub fn open_name(key: &VaultKey, ctx: &NameContext, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let key_id = name_key_id(blob)?;
    if key_id != key.id() {
        return Err(CryptoError::WrongKey { found: key_id, supplied: key.id() });
    }
    let body_len = blob.len() - PREFIX_LEN - TAG_LEN;
    if body_len % NAME_PAD != 0 || body_len > MAX_NAME_LEN + NAME_PAD {
        return Err(CryptoError::Malformed("sealed name (length)"));
    }
    let mut nonce = [0u8; XNONCE_LEN];
    nonce.copy_from_slice(&blob[1 + KEY_ID_LEN..PREFIX_LEN]);
    let padded = aead::open(key.secret(), &nonce, &ctx.aad(&key_id), &blob[PREFIX_LEN..])?;
    // The padding is authenticated, so a bad frame here means a buggy writer, but
    // we still refuse rather than guess.
    let len = u32::from_be_bytes([padded[0], padded[1], padded[2], padded[3]]) as usize;
    let end = LEN_FIELD.checked_add(len).filter(|&e| e <= padded.len()).ok_or_else(auth_failure)?;
    if padded[end..].iter().any(|&b| b != 0) || padded.len() - end >= NAME_PAD {
        return Err(auth_failure());
    }
    Ok(Zeroizing::new(padded[LEN_FIELD..end].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::OsRandom;

    fn key() -> VaultKey {
        VaultKey::from_bytes(KeyId([5; 16]), [6; 32])
    }

    #[test]
    fn round_trip_and_padding_buckets() {
        let ctx = NameContext::VaultName { vault: VaultId([1; 16]) };
        for (name, sealed_body) in [(&b""[..], 32), (b"a", 32), (&[b'x'; 28], 32), (&[b'x'; 29], 64)] {
            let blob = seal_name(&key(), &ctx, name, &mut OsRandom).unwrap();
            assert_eq!(blob.len(), PREFIX_LEN + sealed_body + TAG_LEN, "len {}", name.len());
            assert_eq!(&open_name(&key(), &ctx, &blob).unwrap()[..], name);
        }
    }

    #[test]
    fn malformed_blobs_are_refused_before_decryption() {
        let ctx = NameContext::VaultName { vault: VaultId([1; 16]) };
        assert!(matches!(open_name(&key(), &ctx, &[]), Err(CryptoError::Malformed(_))));
        assert!(matches!(open_name(&key(), &ctx, &[9; 100]), Err(CryptoError::UnsupportedVersion { .. })));
        assert!(matches!(open_name(&key(), &ctx, &[1; 20]), Err(CryptoError::Malformed(_))));
        let mut blob = seal_name(&key(), &ctx, b"n", &mut OsRandom).unwrap();
        blob.push(0);
        assert!(matches!(open_name(&key(), &ctx, &blob), Err(CryptoError::Malformed(_))));
    }

    #[test]
    fn too_long_names_are_refused() {
        let ctx = NameContext::VaultName { vault: VaultId([1; 16]) };
        let long = vec![0u8; MAX_NAME_LEN + 1];
        assert!(matches!(seal_name(&key(), &ctx, &long, &mut OsRandom), Err(CryptoError::Misuse(_))));
    }
}
