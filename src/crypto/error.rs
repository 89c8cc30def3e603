//! The crypto module's one error type.
//!
//! Authentication failures are deliberately coarse: a caller learns *that* a
//! file was altered and roughly how (bad tag, wrong length, stale version), never
//! which byte, so error messages cannot serve as an oracle.

use super::keys::KeyId;

/// What kind of integrity failure was detected. All of them mean "do not trust
/// these bytes"; the distinction exists for log lines and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityFailure {
    /// An authentication tag did not verify: bits were flipped, chunks reordered,
    /// duplicated or taken from another file, or the ciphertext was bound to a
    /// different vault, record, file or name.
    Authentication,
    /// The ciphertext is shorter or longer than its authenticated header says
    /// (truncation or extension), or a chunk has an impossible length.
    Length,
    /// The file authenticates but is an older generation than the caller knows to
    /// exist: a replay of a previous version.
    Stale {
        /// Generation found in the (authentic) header.
        found: u64,
        /// The lowest generation the caller accepts.
        required: u64,
    },
}

impl std::fmt::Display for IntegrityFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IntegrityFailure::Authentication => f.write_str("authentication failed"),
            IntegrityFailure::Length => f.write_str("length does not match the authenticated header"),
            IntegrityFailure::Stale { found, required } => {
                write!(f, "stale version: generation {found}, expected at least {required}")
            }
        }
    }
}

/// Errors from sealing and opening vault files, names and wallets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CryptoError {
    /// The data was altered or replayed; never returned together with plaintext.
    #[error("integrity check failed: {0}")]
    Integrity(IntegrityFailure),
    /// The bytes do not start with the expected magic.
    #[error("not a vaultfs {0} (bad magic)")]
    BadMagic(&'static str),
    /// A format version this build does not understand (from a newer vaultfs).
    #[error("unsupported {what} format version {version}")]
    UnsupportedVersion {
        /// Which structure carried the version.
        what: &'static str,
        /// The version found.
        version: u8,
    },
    /// The data is too short or otherwise malformed before any key is involved.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The item was sealed with a key the caller did not supply.
    #[error("sealed with key {found}, not with the key supplied ({supplied})")]
    WrongKey {
        /// Key id named by the sealed item.
        found: KeyId,
        /// Key id of the key that was supplied.
        supplied: KeyId,
    },
    /// The wallet did not open: wrong passphrase, or the wallet blob was altered.
    #[error("wrong passphrase, or the wallet was altered")]
    WalletLocked,
    /// Key-derivation parameters outside the accepted range (refused before any
    /// work is done, so a hostile wallet blob cannot make us allocate gigabytes).
    #[error("key derivation parameters out of range: {0}")]
    KdfParams(String),
    /// A recovery key that is mistyped, or does not open the wallet.
    #[error("{0}")]
    Recovery(String),
    /// The API was used wrongly, e.g. more plaintext written than declared.
    #[error("crypto API misuse: {0}")]
    Misuse(&'static str),
    /// The cipher backend or the system random source failed.
    #[error("crypto backend failure: {0}")]
    Backend(String),
}

impl CryptoError {
    /// True for every failure that means "the stored data was tampered with".
    pub fn is_integrity(&self) -> bool {
        matches!(self, CryptoError::Integrity(_))
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, CryptoError>;

pub(crate) fn auth_failure() -> CryptoError {
    CryptoError::Integrity(IntegrityFailure::Authentication)
}

pub(crate) fn length_failure() -> CryptoError {
    CryptoError::Integrity(IntegrityFailure::Length)
}

/// Checks the `magic || version` prefix shared by files and wallets, then that at
/// least `min_len` bytes are present. Order matters for the error a user sees: a
/// file from a newer vaultfs says "unsupported version", not "too short".
pub(crate) fn check_prefix(
    bytes: &[u8],
    magic: &[u8; 4],
    version: u8,
    min_len: usize,
    what: &'static str,
) -> Result<()> {
    if bytes.len() < 5 {
        return Err(CryptoError::Malformed(what));
    }
    if bytes[..4] != magic[..] {
        return Err(CryptoError::BadMagic(what));
    }
    if bytes[4] != version {
        return Err(CryptoError::UnsupportedVersion { what, version: bytes[4] });
    }
    if bytes.len() < min_len {
        return Err(CryptoError::Malformed(what));
    }
    Ok(())
}
