//! Recovery keys: a paper key that opens the wallet when the passphrase is lost.
//!
//! ```text
//! recovery key (128 random bits, written down) ──DeriveKeyPair──> X25519 pair
//!   public half ──> wallet record (sealed; never sent to the server)
//! every seal of the wallet: body key ──HPKE Base mode to the public half──> recovery slot
//! recovery: recovery key ──> secret half ──opens the slot──> body key ──> wallet
//! ```
//!
//! The wallet's body is sealed under a fresh random key each time; the
//! passphrase slot wraps that key under Argon2id(passphrase), the recovery slot
//! seals it to the recovery key's public half (super::wallet). Sealing needs
//! only the public half, so every later seal (a new vault, a passphrase
//! change) stays recoverable without the paper key at hand, and someone who
//! once knew an old passphrase learns from an old wallet the public half only,
//! which opens nothing. The public half is kept inside the sealed wallet and
//! never shown: HPKE Base mode authenticates nobody, so whoever held it could
//! seal a wallet the recovery key opens (docs/SECURITY.md).
//!
//! Written as 28 characters of Crockford's base 32 in seven groups of four:
//! the 128 secret bits, then 12 bits of SHA-256 over them, so a mistyped
//! character is caught (all but one in 4096) before anything is sent.
//! Byte layouts: docs/FORMAT.md "Recovery key". Pure: no I/O.

use std::fmt;

use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::aead::KEY_LEN;
use super::error::{CryptoError, Result};
use super::random::RandomSource;
use super::share::Replayed;

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Secret bits of a recovery key, in bytes.
pub const RECOVERY_SECRET_LEN: usize = 16;
/// Characters of a written recovery key (without dashes).
pub const RECOVERY_KEY_CHARS: usize = 28;
/// Length of a recovery public key (X25519).
pub const RECOVERY_PUBLIC_LEN: usize = 32;
/// Length of a recovery slot: encapsulated key, sealed body key, tag.
pub const RECOVERY_SLOT_LEN: usize = 32 + KEY_LEN + 16;
const CHECK_BITS: u32 = 12;
const CHECK_DOMAIN: &[u8] = b"vaultfs/recovery-key/check/v1";
const DERIVE_DOMAIN: &[u8] = b"vaultfs/recovery-key/v1";
const SLOT_INFO: &[u8] = b"vaultfs/wallet-recovery/v1";

/// A recovery key. `Display` writes it for paper (`ABCD-EFGH-…`); parsing
/// reads it back as typed and checks its checksum. `Debug` hides it.
pub struct RecoveryKey(Zeroizing<[u8; RECOVERY_SECRET_LEN]>);

/// The public half of a recovery key, as the wallet keeps it. Not secret in
/// the cryptographic sense, but kept from the server (module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecoveryPublic(pub(super) [u8; RECOVERY_PUBLIC_LEN]);

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryKey(<redacted>)")
    }
}

impl fmt::Debug for RecoveryPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryPublic(<kept in the wallet>)")
    }
}

fn check_bits(secret: &[u8; RECOVERY_SECRET_LEN]) -> u16 {
    let digest = Sha256::new().chain_update(CHECK_DOMAIN).chain_update(secret).finalize();
    u16::from_be_bytes([digest[0], digest[1]]) >> (16 - CHECK_BITS)
}

/// The secret followed by its check bits, as the written form encodes them.
fn written_bits(secret: &[u8; RECOVERY_SECRET_LEN]) -> Zeroizing<Vec<u8>> {
    let check = check_bits(secret) << (16 - CHECK_BITS);
    let mut bits = Zeroizing::new(Vec::with_capacity(RECOVERY_SECRET_LEN + 2));
    bits.extend_from_slice(secret);
    bits.extend_from_slice(&check.to_be_bytes());
    bits
}

impl RecoveryKey {
    /// A new recovery key from 16 random bytes.
    pub fn generate(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut secret = Zeroizing::new([0u8; RECOVERY_SECRET_LEN]);
        rng.fill(&mut secret[..])?;
        Ok(RecoveryKey(secret))
    }

    /// The key pair derived from the secret (RFC 9180 DeriveKeyPair).
    fn pair(&self) -> (<Kem as hpke::Kem>::PrivateKey, <Kem as hpke::Kem>::PublicKey) {
        let mut ikm = Zeroizing::new(Vec::with_capacity(DERIVE_DOMAIN.len() + RECOVERY_SECRET_LEN));
        ikm.extend_from_slice(DERIVE_DOMAIN);
        ikm.extend_from_slice(&self.0[..]);
        Kem::derive_keypair(&ikm)
    }

    /// The public half, for the wallet.
    pub fn public(&self) -> RecoveryPublic {
        let mut out = [0u8; RECOVERY_PUBLIC_LEN];
        out.copy_from_slice(&self.pair().1.to_bytes());
        RecoveryPublic(out)
    }
}

impl fmt::Display for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written =
            Zeroizing::new(super::base32::encode(&written_bits(&self.0), RECOVERY_KEY_CHARS, 4));
        written.make_ascii_uppercase();
        f.write_str(&written)
    }
}

impl std::str::FromStr for RecoveryKey {
    type Err = CryptoError;

    /// Reads a recovery key as typed (any case, dashes or spaces, `O` for 0,
    /// `I`/`L` for 1), refusing a wrong length, a character that cannot be in
    /// one, or a checksum that does not match.
    fn from_str(text: &str) -> Result<Self> {
        let (bits, chars) = super::base32::decode(text).map_err(|c| {
            CryptoError::Recovery(format!(
                "{c:?} cannot be in a recovery key (digits and letters other than U)"
            ))
        })?;
        let bits = Zeroizing::new(bits);
        if chars != RECOVERY_KEY_CHARS {
            return Err(CryptoError::Recovery(format!(
                "a recovery key has {RECOVERY_KEY_CHARS} characters (7 groups of 4), this has {chars}"
            )));
        }
        let mut secret = Zeroizing::new([0u8; RECOVERY_SECRET_LEN]);
        secret.copy_from_slice(&bits[..RECOVERY_SECRET_LEN]);
        let typed = u16::from_be_bytes([bits[RECOVERY_SECRET_LEN], bits[RECOVERY_SECRET_LEN + 1]]);
        if typed >> (16 - CHECK_BITS) != check_bits(&secret) {
            return Err(CryptoError::Recovery(
                "the recovery key's checksum does not match: a character is mistyped".into(),
            ));
        }
        Ok(RecoveryKey(secret))
    }
}

/// Seals the wallet's body key to `to` (HPKE Base mode, `aad` the wallet
/// bytes before the slot). Draws 32 bytes (the ephemeral key) from `rng`.
pub(super) fn seal_slot(
    to: &RecoveryPublic,
    body_key: &[u8; KEY_LEN],
    aad: &[u8],
    rng: &mut dyn RandomSource,
) -> Result<Vec<u8>> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&to.0)
        .map_err(|_| CryptoError::Malformed("recovery public key"))?;
    let mut ephemeral = Replayed::draw(rng)?;
    let (enc, sealed) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
        &OpModeS::Base,
        &pk,
        SLOT_INFO,
        body_key,
        aad,
        &mut ephemeral,
    )
    .map_err(|e| CryptoError::Backend(format!("HPKE seal: {e}")))?;
    ephemeral.check_used()?;
    let mut slot = enc.to_bytes().to_vec();
    slot.extend_from_slice(&sealed);
    debug_assert_eq!(slot.len(), RECOVERY_SLOT_LEN);
    Ok(slot)
}

/// Opens a recovery slot with `key`: the wallet's body key.
pub(super) fn open_slot(key: &RecoveryKey, slot: &[u8], aad: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let refused = || {
        CryptoError::Recovery(
            "this recovery key does not open the wallet (another recovery key, or the wallet was altered)"
                .into(),
        )
    };
    if slot.len() != RECOVERY_SLOT_LEN {
        return Err(CryptoError::Malformed("wallet recovery slot"));
    }
    let (enc, sealed) = slot.split_at(32);
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| refused())?;
    let plain = Zeroizing::new(
        hpke::single_shot_open::<Aead, Kdf, Kem>(&OpModeR::Base, &key.pair().0, &enc, SLOT_INFO, sealed, aad)
            .map_err(|_| refused())?,
    );
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if plain.len() != KEY_LEN {
        return Err(refused());
    }
    out.copy_from_slice(&plain);
    Ok(out)
}

impl RecoveryPublic {
    /// The key from the wallet's record.
    pub(super) fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; RECOVERY_PUBLIC_LEN] =
            bytes.try_into().map_err(|_| CryptoError::Malformed("recovery public key (length)"))?;
        Ok(RecoveryPublic(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::ReplayRandom;
    use crate::crypto::OsRandom;

    #[test]
    fn written_keys_read_back_as_typed() {
        let key = RecoveryKey::generate(&mut OsRandom).unwrap();
        let shown = key.to_string();
        assert_eq!(shown.len(), RECOVERY_KEY_CHARS + 6, "{shown}");
        assert_eq!(shown.matches('-').count(), 6);
        let back: RecoveryKey = shown.parse().unwrap();
        assert_eq!(back.public(), key.public());
        let typed = shown.replace('-', " ").to_lowercase().replace('0', "o").replace('1', "L");
        assert_eq!(typed.parse::<RecoveryKey>().unwrap().public(), key.public());
    }

    #[test]
    fn a_mistyped_short_or_foreign_key_is_refused_with_why() {
        let key = RecoveryKey::generate(&mut ReplayRandom::new(vec![7; 16])).unwrap();
        let shown = key.to_string();
        let msg = |text: &str| text.parse::<RecoveryKey>().unwrap_err().to_string();
        assert!(msg(&shown[..shown.len() - 1]).contains("28 characters"), "{}", msg(&shown[..30]));
        assert!(msg(&format!("{shown}A")).contains("this has 29"));
        assert!(msg(&shown.replacen(&shown[..1], "U", 1)).contains("cannot be in a recovery key"));
        // Every single-character change of every position is caught, bar
        // the one-in-4096 the 12 check bits leave (none for this key).
        let mut missed = 0;
        let alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        for (i, c) in shown.char_indices().filter(|(_, c)| *c != '-') {
            for other in alphabet.chars().filter(|&o| o != c) {
                let mut typo = shown.clone();
                typo.replace_range(i..i + 1, &other.to_string());
                match typo.parse::<RecoveryKey>() {
                    Err(e) => assert!(e.to_string().contains("mistyped"), "{e}"),
                    Ok(_) => missed += 1,
                }
            }
        }
        assert!(missed <= 1, "{missed} typos passed the checksum");
    }

    #[test]
    fn a_slot_opens_with_its_key_only() {
        let key = RecoveryKey::generate(&mut OsRandom).unwrap();
        let other = RecoveryKey::generate(&mut OsRandom).unwrap();
        let body = [9u8; KEY_LEN];
        let slot = seal_slot(&key.public(), &body, b"header", &mut OsRandom).unwrap();
        assert_eq!(slot.len(), RECOVERY_SLOT_LEN);
        assert_eq!(*open_slot(&key, &slot, b"header").unwrap(), body);
        assert!(open_slot(&other, &slot, b"header").is_err());
        assert!(open_slot(&key, &slot, b"headex").is_err(), "bound to the wallet's header");
        for i in 0..slot.len() {
            let mut bad = slot.clone();
            bad[i] ^= 1;
            assert!(open_slot(&key, &bad, b"header").is_err(), "byte {i}");
        }
    }

    /// Pinned: the written form, and the public half, of a key from known
    /// bytes (docs/FORMAT.md "Recovery key").
    #[test]
    fn a_known_recovery_key() {
        let key = RecoveryKey::generate(&mut ReplayRandom::new((0..16).collect())).unwrap();
        let shown = key.to_string();
        assert_eq!(&shown[..9], "000G-40R4", "{shown}");
        assert_eq!(shown, KNOWN_WRITTEN);
        assert_eq!(crate::ids::hex_encode(&key.public().0), KNOWN_PUBLIC);
    }

    // Computed independently (Python: hashlib, hmac and RFC 7748's ladder;
    // the same script reproduces RFC 9180 A.2.3's public key).
    const KNOWN_WRITTEN: &str = "000G-40R4-0M30-E209-185G-R38E-1YT6";
    const KNOWN_PUBLIC: &str = "b64c5bb37c90a4eda0d11f5da261a156ad918bb5a91a249785c98359dff4c755";
}
