//! User keys and vault-key shares: how one user hands a vault's keys to another
//! through a server that must not learn them.
//!
//! ```text
//! wallet ──> user secret key (X25519) ──┐
//!                                       ├─ HPKE Auth mode (RFC 9180) ──> share ──> server (members.wrapped_key)
//! recipient's public key (pinned) ──────┘
//! share + sender's public key (pinned) + own secret key ──> keyring ──> vault keys
//! ```
//!
//! Each user has one key pair: the secret half lives in the wallet (a record of
//! its own), the public half on the server. A *share* seals a vault's
//! *keyring* (every key the vault has had, each with its epoch, and the vault's
//! flags) for one recipient, with HPKE in Auth mode: DHKEM(X25519,
//! HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305. Auth mode means the share opens
//! only with the sender's public key, so a server cannot hand a member a vault
//! key of its own making under a colleague's name. The HPKE `info` binds the
//! vault, the sender's and the recipient's names, so a share cannot be moved to
//! another vault or member. Public keys are checked by [`Fingerprint`]s short
//! enough to read aloud; who pins what is the caller's business.
//!
//! Byte layouts: docs/FORMAT.md "User keys and shares". Pure: no I/O; the
//! randomness comes from a [`RandomSource`].

use std::fmt;

use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::aead::KEY_LEN;
use super::error::{check_prefix, CryptoError, IntegrityFailure, Result};
use super::keys::{KeyId, VaultKey, KEY_ID_LEN};
use super::random::RandomSource;
use crate::ids::{VaultId, ID_LEN};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Length of a user public or secret key (X25519).
pub const USER_KEY_LEN: usize = 32;
/// First four bytes of a share.
pub const SHARE_MAGIC: [u8; 4] = *b"VLTK";
/// Share format version written by this build.
pub const SHARE_FORMAT_VERSION: u8 = 1;
/// Length of a fingerprint in bytes (120 bits: 24 base-32 characters).
pub const FINGERPRINT_LEN: usize = 15;
/// Most keys a keyring may hold (a bound on what a share makes us allocate).
pub const MAX_KEYRING_KEYS: usize = 4096;
/// Longest user name a share can carry.
pub const MAX_SHARE_NAME_LEN: usize = 255;
/// Keyring flag: every file of the vault carries a manifest (the wallet's
/// vault flag of the same name, handed on with the keys).
pub const KEYRING_MANIFESTS_REQUIRED: u8 = 1;
const KNOWN_FLAGS: u8 = KEYRING_MANIFESTS_REQUIRED;
const INFO_DOMAIN: &[u8] = b"vaultfs/share/v1";
const FINGERPRINT_DOMAIN: &[u8] = b"vaultfs/user-key/v1";
const KEYRING_ENTRY_LEN: usize = 4 + KEY_ID_LEN + KEY_LEN;
/// Encapsulated key (X25519 public key) and AEAD tag.
const ENC_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// A user's secret key: opens shares sent to them and authenticates shares
/// they send. `Debug` hides it.
pub struct UserSecret(Zeroizing<[u8; USER_KEY_LEN]>);

/// A user's public key, as the server hands it out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UserPublic([u8; USER_KEY_LEN]);

impl fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserSecret(public {})", self.public().fingerprint())
    }
}

impl fmt::Debug for UserPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserPublic({})", self.fingerprint())
    }
}

impl UserSecret {
    /// A fresh key pair from 32 random bytes (RFC 9180 DeriveKeyPair).
    pub fn generate(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut ikm = Zeroizing::new([0u8; USER_KEY_LEN]);
        rng.fill(&mut ikm[..])?;
        let (sk, _) = Kem::derive_keypair(&ikm[..]);
        let mut bytes = Zeroizing::new([0u8; USER_KEY_LEN]);
        bytes.copy_from_slice(&sk.to_bytes());
        Ok(UserSecret(bytes))
    }

    /// The key from its bytes (as the wallet stores them).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; USER_KEY_LEN] =
            bytes.try_into().map_err(|_| CryptoError::Malformed("user secret key (length)"))?;
        // Any 32 bytes are a valid X25519 scalar; parse to be sure.
        hpke_secret(&arr)?;
        Ok(UserSecret(Zeroizing::new(arr)))
    }

    /// The secret bytes (for the wallet).
    pub fn secret(&self) -> &[u8; USER_KEY_LEN] {
        &self.0
    }

    /// The matching public key.
    pub fn public(&self) -> UserPublic {
        let sk = hpke_secret(&self.0).expect("checked when made");
        let mut out = [0u8; USER_KEY_LEN];
        out.copy_from_slice(&Kem::sk_to_pk(&sk).to_bytes());
        UserPublic(out)
    }

    /// An explicit copy (the wallet keeps its own).
    pub fn duplicate(&self) -> Self {
        UserSecret(Zeroizing::new(*self.0))
    }
}

impl UserPublic {
    /// The key from the 32 bytes the server sent. Refuses a wrong length; a
    /// low-order point is refused when a share is sealed or opened with it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; USER_KEY_LEN] =
            bytes.try_into().map_err(|_| CryptoError::Malformed("user public key (length)"))?;
        Ok(UserPublic(arr))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; USER_KEY_LEN] {
        &self.0
    }

    /// What people compare to know it is this key.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(FINGERPRINT_DOMAIN);
        h.update(self.0);
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&h.finalize()[..FINGERPRINT_LEN]);
        Fingerprint(out)
    }
}

fn hpke_secret(bytes: &[u8; USER_KEY_LEN]) -> Result<<Kem as hpke::Kem>::PrivateKey> {
    <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes).map_err(|_| CryptoError::Malformed("user secret key"))
}

fn hpke_public(key: &UserPublic) -> Result<<Kem as hpke::Kem>::PublicKey> {
    <Kem as hpke::Kem>::PublicKey::from_bytes(&key.0).map_err(|_| CryptoError::Malformed("user public key"))
}

/// The first 120 bits of SHA-256("vaultfs/user-key/v1" || public key), written
/// as 24 characters of Crockford's base 32 in six groups of four
/// (`7kq2-m9xd-…`): short enough to read aloud, too long to forge (a server
/// would need about 2^120 key pairs to match a given one).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; FINGERPRINT_LEN]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&super::base32::encode(&self.0, FINGERPRINT_LEN * 8 / 5, 4))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = CryptoError;

    /// Reads a fingerprint as people type it: any case, with or without the
    /// dashes or spaces, and Crockford's look-alikes (`o` for 0, `i`/`l` for 1).
    fn from_str(text: &str) -> Result<Self> {
        let bad = || CryptoError::Malformed("fingerprint (24 characters of 0-9 and a-z without i, l, o, u)");
        match super::base32::decode(text) {
            Ok((bytes, chars)) if chars == FINGERPRINT_LEN * 8 / 5 => {
                bytes.try_into().map(Fingerprint).map_err(|_| bad())
            }
            _ => Err(bad()),
        }
    }
}

/// One key of a vault's keyring.
#[derive(Debug)]
pub struct EpochKey {
    /// Its place in the vault's history: 0 for the key the vault was made
    /// with, one more for each rotation.
    pub epoch: u32,
    /// The key.
    pub key: VaultKey,
}

/// Every key a vault has had, oldest first, and the vault's flags.
#[derive(Debug, Default)]
pub struct Keyring {
    /// The keys, in strictly increasing epochs.
    pub keys: Vec<EpochKey>,
    /// `KEYRING_*` flags.
    pub flags: u8,
}

impl Keyring {
    /// The newest key: the one new files and names are sealed with.
    pub fn current(&self) -> Option<&EpochKey> {
        self.keys.last()
    }

    /// Whether every file of the vault carries a manifest.
    pub fn manifests_required(&self) -> bool {
        self.flags & KEYRING_MANIFESTS_REQUIRED != 0
    }

    fn serialize(&self) -> Result<Zeroizing<Vec<u8>>> {
        self.check()?;
        let mut out = Zeroizing::new(Vec::with_capacity(3 + self.keys.len() * KEYRING_ENTRY_LEN));
        out.push(self.flags);
        out.extend_from_slice(&(self.keys.len() as u16).to_be_bytes());
        for k in &self.keys {
            out.extend_from_slice(&k.epoch.to_be_bytes());
            out.extend_from_slice(&k.key.id().0);
            out.extend_from_slice(k.key.secret());
        }
        Ok(out)
    }

    fn deserialize(bytes: &[u8]) -> Result<Self> {
        let bad = || CryptoError::Malformed("keyring");
        if bytes.len() < 3 {
            return Err(bad());
        }
        let flags = bytes[0];
        let count = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
        let body = &bytes[3..];
        if body.len() != count * KEYRING_ENTRY_LEN {
            return Err(bad());
        }
        let keys = body
            .chunks_exact(KEYRING_ENTRY_LEN)
            .map(|raw| {
                let epoch = u32::from_be_bytes(raw[..4].try_into().map_err(|_| bad())?);
                let id = KeyId(raw[4..4 + KEY_ID_LEN].try_into().map_err(|_| bad())?);
                let mut secret = Zeroizing::new([0u8; KEY_LEN]);
                secret.copy_from_slice(&raw[4 + KEY_ID_LEN..]);
                Ok(EpochKey { epoch, key: VaultKey::from_bytes(id, *secret) })
            })
            .collect::<Result<Vec<_>>>()?;
        let ring = Keyring { keys, flags };
        ring.check()?;
        Ok(ring)
    }

    /// At least one key, at most [`MAX_KEYRING_KEYS`], epochs strictly
    /// increasing, key ids distinct, no flag this build does not know.
    fn check(&self) -> Result<()> {
        let n = self.keys.len();
        if n == 0 || n > MAX_KEYRING_KEYS {
            return Err(CryptoError::Malformed("keyring (no keys, or too many)"));
        }
        if self.keys.windows(2).any(|w| w[0].epoch >= w[1].epoch) {
            return Err(CryptoError::Malformed("keyring (epochs out of order)"));
        }
        let mut ids: Vec<KeyId> = self.keys.iter().map(|k| k.key.id()).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(CryptoError::Malformed("keyring (a key id twice)"));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(CryptoError::UnsupportedVersion { what: "keyring flags", version: self.flags });
        }
        Ok(())
    }
}

/// Who a share is from and to, for which vault: bound into the share (HPKE
/// `info`), so it opens only in the place it was made for.
#[derive(Debug, Clone, Copy)]
pub struct ShareContext<'a> {
    /// The vault whose keys it carries.
    pub vault: VaultId,
    /// The user who sealed it.
    pub sender: &'a str,
    /// The user it is for.
    pub recipient: &'a str,
}

impl ShareContext<'_> {
    fn info(&self) -> Result<Vec<u8>> {
        let mut info = Vec::with_capacity(INFO_DOMAIN.len() + ID_LEN + 2 + 2 * MAX_SHARE_NAME_LEN);
        info.extend_from_slice(INFO_DOMAIN);
        info.extend_from_slice(self.vault.as_bytes());
        for name in [self.sender, self.recipient] {
            info.push(name_len(name)?);
            info.extend_from_slice(name.as_bytes());
        }
        Ok(info)
    }
}

fn name_len(name: &str) -> Result<u8> {
    match name.len() {
        1..=MAX_SHARE_NAME_LEN => Ok(name.len() as u8),
        _ => Err(CryptoError::Misuse("a user name in a share must be 1 to 255 bytes")),
    }
}

/// Seals `ring` for `recipient` (whose public key is `to`), authenticated as
/// `ctx.sender` holding `from`. Draws 32 bytes (the ephemeral key) from `rng`.
pub fn seal_share(
    ring: &Keyring,
    ctx: &ShareContext<'_>,
    from: &UserSecret,
    to: &UserPublic,
    rng: &mut dyn RandomSource,
) -> Result<Vec<u8>> {
    let plain = ring.serialize()?;
    let info = ctx.info()?;
    let mut header = Vec::with_capacity(6 + ctx.sender.len());
    header.extend_from_slice(&SHARE_MAGIC);
    header.push(SHARE_FORMAT_VERSION);
    header.push(name_len(ctx.sender)?);
    header.extend_from_slice(ctx.sender.as_bytes());
    let sender_pair = (hpke_secret(&from.0)?, hpke_public(&from.public())?);
    let mode = OpModeS::Auth(sender_pair);
    let mut ephemeral = Replayed::draw(rng)?;
    let (enc, sealed) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
        &mode,
        &hpke_public(to)?,
        &info,
        &plain,
        &header,
        &mut ephemeral,
    )
    .map_err(|e| CryptoError::Backend(format!("HPKE seal: {e}")))?;
    ephemeral.check_used()?;
    let mut out = header;
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The sender a share names (unauthenticated until it opens: look up and check
/// that user's public key, then [`open_share`]).
pub fn share_sender(share: &[u8]) -> Result<&str> {
    Ok(parse_share(share)?.1)
}

/// Opens a share sent to `ctx.recipient` (who holds `me`) by `ctx.sender`
/// (whose public key is `from`). Fails unless the share was sealed by the holder
/// of `from`, for exactly this vault, sender and recipient, and is unaltered.
pub fn open_share(
    share: &[u8],
    ctx: &ShareContext<'_>,
    me: &UserSecret,
    from: &UserPublic,
) -> Result<Keyring> {
    let (header_len, sender, enc, sealed) = parse_share(share)?;
    if sender != ctx.sender {
        return Err(CryptoError::Integrity(IntegrityFailure::Authentication));
    }
    let info = ctx.info()?;
    let enc =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| CryptoError::Malformed("share"))?;
    let mode = OpModeR::Auth(hpke_public(from)?);
    let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let tag = hpke::aead::AeadTag::<Aead>::from_bytes(tag).map_err(|_| CryptoError::Malformed("share"))?;
    let mut plain = Zeroizing::new(ciphertext.to_vec());
    hpke::single_shot_open_in_place_detached::<Aead, Kdf, Kem>(
        &mode,
        &hpke_secret(&me.0)?,
        &enc,
        &info,
        &mut plain,
        &share[..header_len],
        &tag,
    )
    .map_err(|_| CryptoError::Integrity(IntegrityFailure::Authentication))?;
    Keyring::deserialize(&plain)
}

/// Longest share: the longest name and the largest keyring.
const MAX_SHARE_LEN: usize =
    6 + MAX_SHARE_NAME_LEN + ENC_LEN + 3 + MAX_KEYRING_KEYS * KEYRING_ENTRY_LEN + TAG_LEN;

/// Splits a share into (header length, sender, encapsulated key, sealed
/// keyring). The sender must look like a user name (1 to 64 letters, digits,
/// '.', '_' or '-', as the server allows), so a name read from an unopened
/// share can be shown and looked up safely.
fn parse_share(share: &[u8]) -> Result<(usize, &str, &[u8], &[u8])> {
    check_prefix(share, &SHARE_MAGIC, SHARE_FORMAT_VERSION, 6 + 1 + ENC_LEN + TAG_LEN, "share")?;
    let n = share[5] as usize;
    let header_len = 6 + n;
    if n == 0 || share.len() < header_len + ENC_LEN + TAG_LEN + 3 || share.len() > MAX_SHARE_LEN {
        return Err(CryptoError::Malformed("share"));
    }
    let sender = &share[6..header_len];
    if n > 64 || !sender.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(CryptoError::Malformed("share (sender is not a user name)"));
    }
    let sender = std::str::from_utf8(sender).map_err(|_| CryptoError::Malformed("share"))?;
    let (enc, sealed) = share[header_len..].split_at(ENC_LEN);
    Ok((header_len, sender, enc, sealed))
}

/// Hands HPKE the 32 bytes of its ephemeral key, drawn beforehand from a
/// [`RandomSource`] (which test vectors replay); any further request is an
/// error noticed after the call, never silent reuse.
pub(super) struct Replayed {
    bytes: Zeroizing<[u8; 32]>,
    used: usize,
    overdrawn: bool,
}

impl Replayed {
    pub(super) fn draw(rng: &mut dyn RandomSource) -> Result<Self> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill(&mut bytes[..])?;
        Ok(Replayed { bytes, used: 0, overdrawn: false })
    }

    pub(super) fn check_used(&self) -> Result<()> {
        if self.overdrawn || self.used != 32 {
            return Err(CryptoError::Backend("HPKE drew an unexpected amount of randomness".into()));
        }
        Ok(())
    }
}

impl hpke::rand_core::RngCore for Replayed {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.used + dest.len();
        if end > self.bytes.len() {
            self.overdrawn = true;
            dest.fill(0);
            return;
        }
        dest.copy_from_slice(&self.bytes[self.used..end]);
        self.used = end;
    }
}

impl hpke::rand_core::CryptoRng for Replayed {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random::ReplayRandom;
    use crate::crypto::OsRandom;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn ring(n: u32) -> Keyring {
        let keys =
            (0..n).map(|epoch| EpochKey { epoch, key: VaultKey::generate(&mut OsRandom).unwrap() }).collect();
        Keyring { keys, flags: KEYRING_MANIFESTS_REQUIRED }
    }

    fn ctx(vault: VaultId) -> ShareContext<'static> {
        ShareContext { vault, sender: "alice", recipient: "bob" }
    }

    /// RFC 9180 A.2.3 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
    /// ChaCha20-Poly1305, Auth mode): the suite and mode shares use are the
    /// standard's, byte for byte.
    #[test]
    fn the_hpke_suite_is_rfc_9180_auth_mode() {
        let (sk_r, pk_r) =
            Kem::derive_keypair(&hex("64835d5ee64aa7aad57c6f2e4f758f7696617f8829e70bc9ac7a5ef95d1c756c"));
        let (sk_s, pk_s) =
            Kem::derive_keypair(&hex("9d8f94537d5a3ddef71234c0baedfad4ca6861634d0b94c3007fed557ad17df6"));
        assert_eq!(
            pk_r.to_bytes().to_vec(),
            hex("1a478716d63cb2e16786ee93004486dc151e988b34b475043d3e0175bdb01c44")
        );
        let mut rng = Replayed::draw(&mut ReplayRandom::new(hex(
            "938d3daa5a8904540bc24f48ae90eed3f4f7f11839560597b55e7c9598c996c0",
        )))
        .unwrap();
        let info = hex("4f6465206f6e2061204772656369616e2055726e");
        let pt = hex("4265617574792069732074727574682c20747275746820626561757479");
        let aad = hex("436f756e742d30");
        let (enc, ct) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
            &OpModeS::Auth((sk_s, pk_s.clone())),
            &pk_r,
            &info,
            &pt,
            &aad,
            &mut rng,
        )
        .unwrap();
        rng.check_used().unwrap();
        assert_eq!(
            enc.to_bytes().to_vec(),
            hex("f7674cc8cd7baa5872d1f33dbaffe3314239f6197ddf5ded1746760bfc847e0e")
        );
        assert_eq!(
            ct,
            hex("ab1a13c9d4f01a87ec3440dbd756e2677bd2ecf9df0ce7ed73869b98e00c09be111cb9fdf077347aeb88e61bdf")
        );
        let back =
            hpke::single_shot_open::<Aead, Kdf, Kem>(&OpModeR::Auth(pk_s), &sk_r, &enc, &info, &ct, &aad)
                .unwrap();
        assert_eq!(back, pt);
    }

    #[test]
    fn a_share_opens_for_its_recipient_with_the_senders_key() {
        let (alice, bob) =
            (UserSecret::generate(&mut OsRandom).unwrap(), UserSecret::generate(&mut OsRandom).unwrap());
        let vault = VaultId([3; ID_LEN]);
        let original = ring(3);
        let share = seal_share(&original, &ctx(vault), &alice, &bob.public(), &mut OsRandom).unwrap();
        assert_eq!(share_sender(&share).unwrap(), "alice");
        let opened = open_share(&share, &ctx(vault), &bob, &alice.public()).unwrap();
        assert_eq!(opened.keys.len(), 3);
        assert!(opened.manifests_required());
        for (a, b) in original.keys.iter().zip(&opened.keys) {
            assert_eq!((a.epoch, a.key.id(), a.key.secret()), (b.epoch, b.key.id(), b.key.secret()));
        }
        assert_eq!(opened.current().unwrap().epoch, 2);
    }

    /// What a hostile server could try: a key pair of its own in place of the
    /// sender's, the share moved to another vault or member, a byte changed, a
    /// share opened by someone it was not sealed for.
    #[test]
    fn a_share_refuses_every_other_sender_place_or_byte() {
        let alice = UserSecret::generate(&mut OsRandom).unwrap();
        let bob = UserSecret::generate(&mut OsRandom).unwrap();
        let mallory = UserSecret::generate(&mut OsRandom).unwrap();
        let vault = VaultId([3; ID_LEN]);
        let share = seal_share(&ring(1), &ctx(vault), &alice, &bob.public(), &mut OsRandom).unwrap();
        let fails = |r: Result<Keyring>| assert!(matches!(r, Err(CryptoError::Integrity(_))), "{r:?}");
        // Sealed by mallory under alice's name: opened with alice's key, it fails.
        let forged = seal_share(&ring(1), &ctx(vault), &mallory, &bob.public(), &mut OsRandom).unwrap();
        fails(open_share(&forged, &ctx(vault), &bob, &alice.public()));
        fails(open_share(&share, &ctx(VaultId([4; ID_LEN])), &bob, &alice.public()));
        fails(open_share(&share, &ShareContext { recipient: "carol", ..ctx(vault) }, &bob, &alice.public()));
        fails(open_share(&share, &ctx(vault), &mallory, &alice.public()));
        fails(open_share(&share, &ShareContext { sender: "alicf", ..ctx(vault) }, &bob, &alice.public()));
        for i in 0..share.len() {
            let mut bad = share.clone();
            bad[i] ^= 1;
            assert!(open_share(&bad, &ctx(vault), &bob, &alice.public()).is_err(), "byte {i}");
        }
        assert!(open_share(&share[..share.len() - 1], &ctx(vault), &bob, &alice.public()).is_err());
    }

    #[test]
    fn keyrings_out_of_order_empty_or_with_unknown_flags_are_not_sealed() {
        let (alice, bob) =
            (UserSecret::generate(&mut OsRandom).unwrap(), UserSecret::generate(&mut OsRandom).unwrap());
        let c = ctx(VaultId([1; ID_LEN]));
        let mut r = ring(2);
        r.keys.swap(0, 1);
        assert!(seal_share(&r, &c, &alice, &bob.public(), &mut OsRandom).is_err());
        assert!(seal_share(&Keyring::default(), &c, &alice, &bob.public(), &mut OsRandom).is_err());
        let mut r = ring(1);
        r.flags = 0x80;
        assert!(seal_share(&r, &c, &alice, &bob.public(), &mut OsRandom).is_err());
        let long = "x".repeat(256);
        assert!(seal_share(
            &ring(1),
            &ShareContext { sender: &long, ..c },
            &alice,
            &bob.public(),
            &mut OsRandom
        )
        .is_err());
    }

    #[test]
    fn fingerprints_print_in_groups_and_read_back_as_typed() {
        let fp = Fingerprint([0xff; FINGERPRINT_LEN]);
        assert_eq!(fp.to_string(), "zzzz-zzzz-zzzz-zzzz-zzzz-zzzz");
        let key = UserSecret::generate(&mut OsRandom).unwrap().public();
        let shown = key.fingerprint().to_string();
        assert_eq!(shown.len(), 29);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), key.fingerprint());
        let typed = shown.replace('-', " ").to_uppercase().replace('0', "O").replace('1', "l");
        assert_eq!(typed.parse::<Fingerprint>().unwrap(), key.fingerprint());
        assert!(shown[..28].parse::<Fingerprint>().is_err());
        assert!("uuuu-uuuu-uuuu-uuuu-uuuu-uuuu".parse::<Fingerprint>().is_err());
        assert_ne!(UserSecret::generate(&mut OsRandom).unwrap().public().fingerprint(), key.fingerprint());
    }

    /// A fixed vector (docs/FORMAT.md "User keys and shares"): key pairs from
    /// known bytes, a fingerprint, and a share sealed with a known ephemeral key.
    #[test]
    fn a_known_share_vector() {
        let alice = UserSecret::generate(&mut ReplayRandom::new(vec![0x11; 32])).unwrap();
        let bob = UserSecret::generate(&mut ReplayRandom::new(vec![0x22; 32])).unwrap();
        let key = VaultKey::from_bytes(KeyId([0x33; KEY_ID_LEN]), [0x44; KEY_LEN]);
        let r = Keyring { keys: vec![EpochKey { epoch: 0, key }], flags: KEYRING_MANIFESTS_REQUIRED };
        let c = ctx(VaultId([0x55; ID_LEN]));
        let share =
            seal_share(&r, &c, &alice, &bob.public(), &mut ReplayRandom::new(vec![0x66; 32])).unwrap();
        let again =
            seal_share(&r, &c, &alice, &bob.public(), &mut ReplayRandom::new(vec![0x66; 32])).unwrap();
        assert_eq!(share, again, "deterministic given the randomness");
        // Pinned bytes: the format must not drift. The fingerprint was
        // checked independently (Python: hashlib + Crockford base 32).
        assert_eq!(
            crate::ids::hex_encode(alice.public().as_bytes()),
            "1a239249ea74403babc01f32df9931a16f71ac8972c461d69fed15640e310639"
        );
        assert_eq!(alice.public().fingerprint().to_string(), "2458-030s-g80g-a7qf-fwka-c5ns");
        assert_eq!(
            crate::ids::hex_encode(&share),
            "564c544b0105616c696365840e0eae611c970a92cea2e745c9f3f6ae69b67d75bac5eba11add350cd58f68eab8\
             0a5d44a02d1eae727a80668653fe30478788d14f28db098d9e0bcd70d1b8adf16d50196f9c6203c157872bc4a9\
             fbb2bd47d2b417638f7a99c18eb99fe29a0abfc35260ff48"
        );
        assert_eq!(share.len(), 6 + 5 + ENC_LEN + 3 + KEYRING_ENTRY_LEN + TAG_LEN);
        assert_eq!(&share[..11], b"VLTK\x01\x05alice");
        let opened = open_share(&share, &c, &bob, &alice.public()).unwrap();
        assert_eq!(opened.keys[0].key.secret(), &[0x44; KEY_LEN]);
    }
}
