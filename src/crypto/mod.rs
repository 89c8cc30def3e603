//! End-to-end encryption of vault files, names and the key wallet.
//!
//! Data flow: the user's passphrase is stretched by Argon2id into the wallet key,
//! which opens the [`Wallet`]; the wallet holds [`VaultKey`]s; each vault key wraps
//! a fresh random content key per upload in the 128-byte header of the file
//! ([`file`]) and seals names ([`names`]). File bodies are 64 KiB chunks of
//! XChaCha20-Poly1305 ([`aead`]), so any range decrypts after fetching only the
//! chunks it covers ([`offsets`] does the arithmetic). The wallet also holds
//! the user's key pair, with which a vault's keys are sealed for other members
//! and opened from them ([`share`]); a paper [`RecoveryKey`] opens the wallet
//! when the passphrase is lost ([`recovery`]).
//!
//! The module is pure: no file or network I/O and no `unsafe`. The only system
//! call is getrandom(2) behind [`RandomSource`], which tests replace to reproduce
//! the test vectors in tests/data/. The byte-level specification is docs/FORMAT.md;
//! the threat model is docs/SECURITY.md.
#![forbid(unsafe_code)]

pub mod aead;
mod base32;
pub mod error;
pub mod file;
pub mod keys;
pub mod login;
pub mod manifest;
pub mod names;
pub mod offsets;
pub mod random;
pub mod recovery;
pub mod share;
pub mod state;
pub mod wallet;

pub use aead::Sink;
pub use error::{CryptoError, IntegrityFailure};
pub use file::{
    decrypt_file, encrypt_file, peek_header, rewrap_header, FileContext, FileDecryptor, FileEncryptor,
    HeaderInfo, StreamDecryptor,
};
pub use keys::{KeyId, VaultKey};
pub use manifest::{open_manifest, seal_manifest, ContentMode, FileManifest, PieceTagger, PieceVerifier};
pub use names::{open_name, seal_name, NameContext};
pub use offsets::{ChunkIndex, Layout, CHUNK_SIZE, HEADER_LEN};
pub use random::{OsRandom, RandomSource};
pub use recovery::RecoveryKey;
pub use share::{Fingerprint, UserPublic, UserSecret};
pub use wallet::{KdfParams, StateKey, Wallet};
