//! Key types of the hierarchy passphrase → wallet key → vault keys → content keys.
//!
//! Every secret lives in a `Zeroizing` buffer, so it is wiped when dropped, and no
//! key type prints its secret: `Debug` shows at most the public key id. None of them
//! implements `Clone` casually: copies of secrets are made only where a caller asks
//! for one explicitly (`VaultKey::duplicate`).

use std::fmt;

use zeroize::Zeroizing;

use super::aead::KEY_LEN;
use super::error::Result;
use super::random::RandomSource;
use crate::ids::hex_encode;

/// Length of a key id.
pub const KEY_ID_LEN: usize = 16;

/// Public name of a vault key. Stored in every header and sealed name so a reader
/// knows which key (current or retired) to use, and so keys can be rotated by
/// re-wrapping headers instead of re-encrypting content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

/// Domain of a key id derived from its key (docs/FORMAT.md "Key hierarchy").
const KEY_ID_DOMAIN: &[u8] = b"vaultfs/key-id/v1";

impl KeyId {
    /// The id of a key made by this version: the first 16 bytes of
    /// SHA-256("vaultfs/key-id/v1" || secret). Nobody can make another
    /// secret with the same id, so a key under a derived id is that key,
    /// whoever hands it over; keys made before ids were derived have random
    /// ids, which prove nothing.
    pub fn of_secret(secret: &[u8; KEY_LEN]) -> KeyId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new().chain_update(KEY_ID_DOMAIN).chain_update(secret).finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", hex_encode(&self.0))
    }
}

/// A vault key: wraps the content keys of the vault's files and seals its names.
pub struct VaultKey {
    id: KeyId,
    secret: Zeroizing<[u8; KEY_LEN]>,
}

impl VaultKey {
    /// A fresh random key, its id derived from it ([`KeyId::of_secret`]).
    pub fn generate(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut secret[..])?;
        Ok(VaultKey { id: KeyId::of_secret(&secret), secret })
    }

    /// Whether the key's id is derived from its secret: then no one can
    /// hand over another key under the same id.
    pub fn id_is_derived(&self) -> bool {
        self.id == KeyId::of_secret(&self.secret)
    }

    /// A key from known bytes (unwrapping from a wallet, test vectors).
    pub fn from_bytes(id: KeyId, secret: [u8; KEY_LEN]) -> Self {
        VaultKey { id, secret: Zeroizing::new(secret) }
    }

    /// The key's public id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// An explicit copy of the secret (for a second wallet, say). Deliberately not
    /// `Clone`, so copies are visible in code review.
    pub fn duplicate(&self) -> Self {
        VaultKey { id: self.id, secret: Zeroizing::new(*self.secret) }
    }

    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }
}

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A per-upload content key: fresh random bytes for every upload of every file,
/// so no (key, nonce) pair is ever used twice however often a file is rewritten.
pub(crate) struct ContentKey(pub(crate) Zeroizing<[u8; KEY_LEN]>);

impl ContentKey {
    pub(crate) fn generate(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut k[..])?;
        Ok(ContentKey(k))
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentKey(<redacted>)")
    }
}

/// The key derived from the user's passphrase by Argon2id; it opens the wallet.
pub(crate) struct WalletKey(pub(crate) Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for WalletKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WalletKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::ReplayRandom;

    #[test]
    fn debug_output_never_contains_secret_bytes() {
        let key = VaultKey::from_bytes(KeyId([0x11; 16]), [0xee; 32]);
        let shown = format!(
            "{key:?} {:?} {:?}",
            ContentKey(Zeroizing::new([0xee; 32])),
            WalletKey(Zeroizing::new([0xee; 32]))
        );
        assert!(!shown.contains("ee"), "{shown}");
        assert!(!shown.contains("238"), "{shown}"); // 0xee in decimal
        assert!(shown.contains("11111111"), "key id should be visible: {shown}");
    }

    /// SHA-256("vaultfs/key-id/v1" || 00 01 .. 1f), first 16 bytes, computed
    /// apart from this code (Python's hashlib).
    const KEY_ID_VECTOR: &str = "9043878944a262582ec0f0bf2c7c47e9";

    #[test]
    fn generate_draws_the_secret_from_the_rng_and_derives_the_id() {
        let mut rng = ReplayRandom::new((0..32).collect());
        let key = VaultKey::generate(&mut rng).unwrap();
        let secret: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(key.secret(), &secret);
        assert_eq!(key.duplicate().secret(), key.secret());
        // The vector docs/FORMAT.md gives ("Keys").
        assert_eq!(key.id().to_string(), KEY_ID_VECTOR);
        assert!(key.id_is_derived());
        assert!(
            !VaultKey::from_bytes(KeyId([0x11; 16]), secret).id_is_derived(),
            "a random id proves nothing"
        );
        let mut other = secret;
        other[31] ^= 1;
        assert!(!VaultKey::from_bytes(key.id(), other).id_is_derived(), "another secret under that id");
    }
}
