//! The test-vector files in tests/data/: their schema, and how to load them.
//!
//! Each file holds an array of vectors with known keys, ids and "random" bytes and
//! the exact output they must produce. They freeze the format: any change to the
//! bytes we write fails tests/vectors.rs, and tests/format_spec.rs re-derives the
//! same bytes from docs/FORMAT.md with an independent AEAD implementation.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A whole-file encryption vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileVector {
    pub description: String,
    pub vault_key_id: String,
    pub vault_key: String,
    pub vault_id: String,
    pub record_id: String,
    pub file_id: String,
    pub generation: u64,
    /// content key (32) || chunk nonce prefix (16) || wrap nonce (24), in the
    /// order the encryptor draws them.
    pub random: String,
    pub plaintext_len: u64,
    /// Hex plaintext; absent means byte i is i mod 251.
    pub plaintext: Option<String>,
    pub ciphertext_len: u64,
    pub ciphertext_sha256: String,
    /// Full hex ciphertext, for the small vectors.
    pub ciphertext: Option<String>,
}

/// A sealed-name vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NameVector {
    pub description: String,
    pub vault_key_id: String,
    pub vault_key: String,
    /// vault-name, record-title, record-fields or file-name.
    pub kind: String,
    pub vault_id: String,
    pub record_id: Option<String>,
    pub file_id: Option<String>,
    /// The 24-byte nonce.
    pub random: String,
    pub name: String,
    pub sealed: String,
}

/// One key in a wallet vector, in the order it was added.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WalletKeyVector {
    pub vault_id: String,
    pub key_id: String,
    pub key: String,
    pub active: bool,
}

/// A sealed-wallet vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WalletVector {
    pub description: String,
    pub passphrase: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    /// Every byte the seal draws, in order (docs/FORMAT.md "Wallet").
    pub random: String,
    pub revision: u64,
    pub keys: Vec<WalletKeyVector>,
    /// Format version (absent: 1).
    pub version: Option<u8>,
    /// Version 2: the local-state key.
    pub state_key: Option<String>,
    /// Version 2: vaults flagged "manifests required".
    pub manifests_required: Option<Vec<String>>,
    /// Version 3: the recovery key, as written for the user.
    pub recovery_key: Option<String>,
    pub sealed: String,
}

/// A sealed file-manifest vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestVector {
    pub description: String,
    pub vault_key_id: String,
    pub vault_key: String,
    pub vault_id: String,
    pub record_id: String,
    pub file_id: String,
    /// "e2e", "plain" or (version 2) "link".
    pub mode: String,
    pub generation: u64,
    pub length: u64,
    /// For "e2e": the upload id (chunk nonce prefix) named.
    pub upload: Option<String>,
    /// For "plain": hex content; absent means byte i is i mod 251.
    pub plaintext: Option<String>,
    /// What the writer draws, in order: for "plain" the tag key (32), then for
    /// both the sealing nonce (24).
    pub random: String,
    /// For "plain": the piece tags, 16 bytes each, concatenated.
    pub tags: Option<String>,
    /// Version 2: the content's generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_generation: Option<u64>,
    /// Version 2: the permission bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm: Option<u16>,
    /// Version 2, "link": the target, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub sealed: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ManifestVectors {
    pub vector: Vec<ManifestVector>,
}

impl ManifestVector {
    pub fn plaintext_bytes(&self) -> Vec<u8> {
        match &self.plaintext {
            Some(h) => super::unhex(h),
            None => super::pattern(self.length as usize),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileVectors {
    pub vector: Vec<FileVector>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NameVectors {
    pub vector: Vec<NameVector>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WalletVectors {
    pub vector: Vec<WalletVector>,
}

pub const FILE_VECTORS: &str = "file-vectors.toml";
pub const NAME_VECTORS: &str = "name-vectors.toml";
pub const WALLET_VECTORS: &str = "wallet-vectors.toml";
pub const MANIFEST_VECTORS: &str = "manifest-vectors.toml";
pub const MANIFEST_V2_VECTORS: &str = "manifest-v2-vectors.toml";
pub const WALLET_V2_VECTORS: &str = "wallet-v2-vectors.toml";
pub const WALLET_V3_VECTORS: &str = "wallet-v3-vectors.toml";

pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

pub fn load<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = data_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl FileVector {
    pub fn plaintext_bytes(&self) -> Vec<u8> {
        match &self.plaintext {
            Some(h) => super::unhex(h),
            None => super::pattern(self.plaintext_len as usize),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    super::hex(&sha2::Sha256::digest(bytes))
}

/// Checks a produced ciphertext against a file vector's expectations.
#[track_caller]
pub fn assert_file_output(v: &FileVector, produced: &[u8]) {
    assert_eq!(produced.len() as u64, v.ciphertext_len, "{}: length", v.description);
    if let Some(full) = &v.ciphertext {
        assert_eq!(super::hex(produced), *full, "{}: bytes", v.description);
    }
    assert_eq!(sha256_hex(produced), v.ciphertext_sha256, "{}: sha256", v.description);
}
