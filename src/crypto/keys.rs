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
    /// A fresh random key with a fresh random id.
    pub fn generate(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut id = [0u8; KEY_ID_LEN];
        rng.fill(&mut id)?;
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut secret[..])?;
        Ok(VaultKey { id: KeyId(id), secret })
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

    #[test]
    fn generate_draws_id_and_secret_from_the_rng() {
        let mut rng = ReplayRandom::new((0..48).collect());
        let key = VaultKey::generate(&mut rng).unwrap();
        assert_eq!(key.id().0, core::array::from_fn(|i| i as u8));
        assert_eq!(key.secret(), &core::array::from_fn::<u8, 32, _>(|i| (i + 16) as u8));
        assert_eq!(key.duplicate().secret(), key.secret());
    }
}
