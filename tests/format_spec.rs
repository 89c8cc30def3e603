//! docs/FORMAT.md, implemented a second time from the text alone.
//!
//! This file uses none of vaultfs's crypto code: it builds headers, chunks, sealed
//! names and wallets with RustCrypto's `XChaCha20Poly1305` (a different AEAD
//! implementation from the one the library runs on) following the byte tables of
//! the spec, and must reproduce every test vector. If the spec and the code ever
//! disagree, this test says so. The wallet's recovery slot is HPKE, written out
//! here from RFC 9180 with HKDF, X25519 and ChaCha20-Poly1305 (the library
//! uses the `hpke` crate).

mod support;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use support::unhex;
use support::vectors::*;

fn xseal(key: &[u8], nonce: &[u8], aad: &[u8], msg: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new_from_slice(key)
        .unwrap()
        .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .unwrap()
}

/// FORMAT.md, "Vault files".
fn spec_encrypt_file(v: &FileVector) -> Vec<u8> {
    let random = unhex(&v.random);
    let (content_key, rest) = random.split_at(32);
    let (nonce_prefix, wrap_nonce) = rest.split_at(16);
    let plaintext = v.plaintext_bytes();

    let mut header = Vec::new();
    header.extend_from_slice(b"VLTF"); // magic
    header.push(1); // version
    header.push(16); // log2 chunk size
    header.extend_from_slice(&[0, 0]); // reserved
    header.extend_from_slice(&unhex(&v.vault_key_id));
    header.extend_from_slice(&v.generation.to_be_bytes());
    header.extend_from_slice(&(plaintext.len() as u64).to_be_bytes());
    header.extend_from_slice(nonce_prefix);
    header.extend_from_slice(wrap_nonce);
    assert_eq!(header.len(), 80);

    let mut aad = b"vaultfs/file-key/v1".to_vec();
    aad.extend_from_slice(&header);
    aad.extend_from_slice(&unhex(&v.vault_id));
    aad.extend_from_slice(&unhex(&v.record_id));
    aad.extend_from_slice(&unhex(&v.file_id));
    header.extend_from_slice(&xseal(&unhex(&v.vault_key), wrap_nonce, &aad, content_key));
    assert_eq!(header.len(), 128);

    let mut out = header;
    let chunks: Vec<&[u8]> = if plaintext.is_empty() { vec![&[]] } else { plaintext.chunks(65536).collect() };
    for (i, chunk) in chunks.iter().enumerate() {
        let mut nonce = nonce_prefix.to_vec();
        nonce.extend_from_slice(&(i as u64).to_be_bytes()[1..]);
        nonce.push(u8::from(i + 1 == chunks.len()));
        out.extend_from_slice(&xseal(content_key, &nonce, &[], chunk));
    }
    out
}

/// FORMAT.md, "Sealed names".
fn spec_seal_name(v: &NameVector) -> Vec<u8> {
    let kind: u8 = match v.kind.as_str() {
        "vault-name" => 1,
        "record-title" => 2,
        "record-fields" => 3,
        "file-name" => 4,
        other => panic!("kind {other}"),
    };
    let id_or_zero = |id: &Option<String>| id.as_deref().map_or(vec![0u8; 16], unhex);
    let mut aad = b"vaultfs/name/v1".to_vec();
    aad.push(1);
    aad.extend_from_slice(&unhex(&v.vault_key_id));
    aad.push(kind);
    aad.extend_from_slice(&unhex(&v.vault_id));
    aad.extend_from_slice(&id_or_zero(&v.record_id));
    aad.extend_from_slice(&id_or_zero(&v.file_id));

    let name = v.name.as_bytes();
    let mut padded = (name.len() as u32).to_be_bytes().to_vec();
    padded.extend_from_slice(name);
    padded.resize(padded.len().div_ceil(32) * 32, 0);

    let nonce = unhex(&v.random);
    let mut out = vec![1];
    out.extend_from_slice(&unhex(&v.vault_key_id));
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&xseal(&unhex(&v.vault_key), &nonce, &aad, &padded));
    out
}

/// FORMAT.md, "Wallet": the 60-byte header every version starts with.
fn spec_wallet_header(version: u8, v: &WalletVector, salt: &[u8], nonce: &[u8]) -> Vec<u8> {
    let mut header = b"VLTW".to_vec();
    header.extend_from_slice(&[version, 1, 0, 0]);
    header.extend_from_slice(&v.m_cost_kib.to_be_bytes());
    header.extend_from_slice(&v.t_cost.to_be_bytes());
    header.extend_from_slice(&v.p_cost.to_be_bytes());
    header.extend_from_slice(salt);
    header.extend_from_slice(nonce);
    header
}

/// FORMAT.md, "Wallet".
fn spec_seal_wallet(v: &WalletVector) -> Vec<u8> {
    let random = unhex(&v.random);
    let (salt, nonce) = random.split_at(16);
    let mut header = spec_wallet_header(1, v, salt, nonce);
    assert_eq!(header.len(), 60);

    let params = argon2::Params::new(v.m_cost_kib, v.t_cost, v.p_cost, Some(32)).unwrap();
    let mut wallet_key = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(v.passphrase.as_bytes(), salt, &mut wallet_key)
        .unwrap();

    let mut body = v.revision.to_be_bytes().to_vec();
    body.extend_from_slice(&(v.keys.len() as u32).to_be_bytes());
    for k in &v.keys {
        body.extend_from_slice(&unhex(&k.vault_id));
        body.extend_from_slice(&unhex(&k.key_id));
        body.push(if k.active { 1 } else { 2 });
        body.extend_from_slice(&unhex(&k.key));
    }
    let sealed = xseal(&wallet_key, nonce, &header, &body);
    header.extend_from_slice(&sealed);
    header
}

#[test]
fn spec_reproduces_the_file_vectors() {
    let vectors: FileVectors = load(FILE_VECTORS);
    for v in &vectors.vector {
        assert_file_output(v, &spec_encrypt_file(v));
    }
}

#[test]
fn spec_reproduces_the_name_vectors() {
    let vectors: NameVectors = load(NAME_VECTORS);
    for v in &vectors.vector {
        assert_eq!(support::hex(&spec_seal_name(v)), v.sealed, "{}", v.description);
    }
}

#[test]
fn spec_reproduces_the_wallet_vectors() {
    let vectors: WalletVectors = load(WALLET_VECTORS);
    for v in &vectors.vector {
        assert_eq!(support::hex(&spec_seal_wallet(v)), v.sealed, "{}", v.description);
    }
}

/// FORMAT.md, "File manifests": the tags of pass-through content, then the
/// body, sealed under the vault key.
fn spec_seal_manifest(v: &ManifestVector) -> (Option<Vec<u8>>, Vec<u8>) {
    let random = unhex(&v.random);
    let mut body = Vec::new();
    let mut tags_out = None;
    let nonce = match v.mode.as_str() {
        "e2e" => {
            body.push(1);
            body.extend_from_slice(&v.generation.to_be_bytes());
            body.extend_from_slice(&v.length.to_be_bytes());
            body.extend_from_slice(&unhex(v.upload.as_deref().unwrap()));
            &random[..24]
        }
        "plain" => {
            let (tag_key, nonce) = random.split_at(32);
            let plain = v.plaintext_bytes();
            let mut tags = Vec::new();
            for (i, piece) in plain.chunks(1 << 20).enumerate() {
                let mut piece_nonce = vec![0u8; 16];
                piece_nonce.extend_from_slice(&(i as u64).to_be_bytes()[1..]);
                piece_nonce.push(0);
                // Sealing nothing: the output is the 16-byte tag alone.
                tags.extend_from_slice(&xseal(tag_key, &piece_nonce, piece, &[]));
            }
            body.push(2);
            body.extend_from_slice(&v.generation.to_be_bytes());
            body.extend_from_slice(&v.length.to_be_bytes());
            body.push(20);
            body.extend_from_slice(tag_key);
            body.extend_from_slice(&tags);
            tags_out = Some(tags);
            nonce
        }
        other => panic!("mode {other}"),
    };
    let mut aad = b"vaultfs/file-meta/v1".to_vec();
    aad.push(1);
    aad.extend_from_slice(&unhex(&v.vault_key_id));
    aad.extend_from_slice(&unhex(&v.vault_id));
    aad.extend_from_slice(&unhex(&v.record_id));
    aad.extend_from_slice(&unhex(&v.file_id));
    let mut out = vec![1];
    out.extend_from_slice(&unhex(&v.vault_key_id));
    out.extend_from_slice(nonce);
    out.extend_from_slice(&xseal(&unhex(&v.vault_key), nonce, &aad, &body));
    (tags_out, out)
}

#[test]
fn spec_reproduces_the_manifest_vectors() {
    let vectors: ManifestVectors = load(MANIFEST_VECTORS);
    for v in &vectors.vector {
        let (tags, sealed) = spec_seal_manifest(v);
        assert_eq!(tags.map(|t| support::hex(&t)), v.tags, "{}: tags", v.description);
        assert_eq!(support::hex(&sealed), v.sealed, "{}", v.description);
    }
}

/// FORMAT.md, "Wallet", version 2: typed records, written keys first, then
/// the state key, then vault flags (by vault id).
fn spec_seal_wallet_v2(v: &WalletVector) -> Vec<u8> {
    let random = unhex(&v.random);
    let (salt, nonce) = random.split_at(16);
    let mut header = spec_wallet_header(2, v, salt, nonce);
    let sealed = xseal(&spec_wallet_key(v, salt), nonce, &header, &spec_entries(v, None));
    header.extend_from_slice(&sealed);
    header
}

fn spec_wallet_key(v: &WalletVector, salt: &[u8]) -> [u8; 32] {
    let params = argon2::Params::new(v.m_cost_kib, v.t_cost, v.p_cost, Some(32)).unwrap();
    let mut wallet_key = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(v.passphrase.as_bytes(), salt, &mut wallet_key)
        .unwrap();
    wallet_key
}

/// The typed records of versions 2 and 3 (`recovery`: the type-05 body).
fn spec_entries(v: &WalletVector, recovery: Option<[u8; 32]>) -> Vec<u8> {
    let mut records: Vec<(u8, Vec<u8>)> = Vec::new();
    for k in &v.keys {
        let mut body = unhex(&k.vault_id);
        body.extend_from_slice(&unhex(&k.key_id));
        body.push(if k.active { 1 } else { 2 });
        body.extend_from_slice(&unhex(&k.key));
        records.push((1, body));
    }
    if let Some(state) = &v.state_key {
        records.push((2, unhex(state)));
    }
    let mut flagged: Vec<Vec<u8>> = v.manifests_required.iter().flatten().map(|id| unhex(id)).collect();
    flagged.sort();
    for vault in flagged {
        records.push((3, [vault, vec![1]].concat()));
    }
    if let Some(pk) = recovery {
        records.push((5, pk.to_vec()));
    }
    let mut body = v.revision.to_be_bytes().to_vec();
    body.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (kind, r) in records {
        body.push(kind);
        body.extend_from_slice(&(r.len() as u32).to_be_bytes());
        body.extend_from_slice(&r);
    }
    body
}

/// RFC 9180 for DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
mod rfc9180 {
    const KEM_SUITE: &[u8] = b"KEM\x00\x20";
    const HPKE_SUITE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";

    fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Vec<u8> {
        let input = [b"HPKE-v1", suite, label, ikm].concat();
        hkdf::Hkdf::<sha2::Sha256>::extract(Some(salt), &input).0.to_vec()
    }

    fn labeled_expand(suite: &[u8], prk: &[u8], label: &[u8], info: &[u8], len: u16) -> Vec<u8> {
        let info = [&len.to_be_bytes()[..], b"HPKE-v1", suite, label, info].concat();
        let mut out = vec![0u8; len as usize];
        hkdf::Hkdf::<sha2::Sha256>::from_prk(prk).unwrap().expand(&info, &mut out).unwrap();
        out
    }

    /// DeriveKeyPair: (secret, public).
    pub fn derive_key_pair(ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
        let prk = labeled_extract(KEM_SUITE, b"", b"dkp_prk", ikm);
        let sk: [u8; 32] = labeled_expand(KEM_SUITE, &prk, b"sk", b"", 32).try_into().unwrap();
        (sk, x25519_dalek::x25519(sk, x25519_dalek::X25519_BASEPOINT_BYTES))
    }

    /// SealBase with the ephemeral key derived from `ikm_e`: enc || ct.
    pub fn seal_base(pk_r: &[u8; 32], info: &[u8], aad: &[u8], pt: &[u8], ikm_e: &[u8]) -> Vec<u8> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let (sk_e, enc) = derive_key_pair(ikm_e);
        let dh = x25519_dalek::x25519(sk_e, *pk_r);
        let kem_context = [&enc[..], pk_r].concat();
        let eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", &dh);
        let shared = labeled_expand(KEM_SUITE, &eae_prk, b"shared_secret", &kem_context, 32);
        let psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info);
        let context = [&[0u8][..], &psk_id_hash, &info_hash].concat();
        let secret = labeled_extract(HPKE_SUITE, &shared, b"secret", b"");
        let key = labeled_expand(HPKE_SUITE, &secret, b"key", &context, 32);
        let nonce = labeled_expand(HPKE_SUITE, &secret, b"base_nonce", &context, 12);
        let ct = chacha20poly1305::ChaCha20Poly1305::new_from_slice(&key)
            .unwrap()
            .encrypt(chacha20poly1305::Nonce::from_slice(&nonce), Payload { msg: pt, aad })
            .unwrap();
        [&enc[..], &ct].concat()
    }
}

/// FORMAT.md, "Recovery key": the 16 secret bytes of a written key (checksum checked).
fn spec_read_recovery_key(written: &str) -> [u8; 16] {
    let alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut n: u128 = 0;
    let mut low: u16 = 0;
    let chars: Vec<char> = written.chars().filter(|c| *c != '-').collect();
    assert_eq!(chars.len(), 28);
    for c in chars {
        let d = alphabet.find(c).unwrap() as u128;
        // 140 bits: shift through (n, low) as one 140-bit number.
        n = (n << 5) | (u128::from(low) >> 7);
        low = ((low << 5) | d as u16) & 0x0fff;
    }
    let secret = n.to_be_bytes();
    use sha2::Digest;
    let digest =
        sha2::Sha256::new().chain_update(b"vaultfs/recovery-key/check/v1").chain_update(secret).finalize();
    assert_eq!(low, u16::from_be_bytes([digest[0], digest[1]]) >> 4, "checksum");
    secret
}

/// FORMAT.md, "Wallet", version 3: slots, then the entries under the body key.
fn spec_seal_wallet_v3(v: &WalletVector) -> Vec<u8> {
    let random = unhex(&v.random);
    let (salt, rest) = random.split_at(16);
    let (nonce, rest) = rest.split_at(24);
    let (body_key, rest) = rest.split_at(32);
    let mut out = spec_wallet_header(3, v, salt, nonce);
    let slot = xseal(&spec_wallet_key(v, salt), nonce, &out, body_key);
    out.extend_from_slice(&slot);
    let recovery = v.recovery_key.as_deref().map(|w| {
        let s = spec_read_recovery_key(w);
        rfc9180::derive_key_pair(&[&b"vaultfs/recovery-key/v1"[..], &s].concat()).1
    });
    let body_nonce = match recovery {
        None => {
            out.push(0);
            rest
        }
        Some(pk) => {
            out.push(1);
            let (ikm_e, rest) = rest.split_at(32);
            let slot = rfc9180::seal_base(&pk, b"vaultfs/wallet-recovery/v1", &out, body_key, ikm_e);
            out.extend_from_slice(&slot);
            rest
        }
    };
    assert_eq!(body_nonce.len(), 24);
    out.extend_from_slice(body_nonce);
    let sealed = xseal(body_key, body_nonce, &out, &spec_entries(v, recovery));
    out.extend_from_slice(&sealed);
    out
}

#[test]
fn spec_reproduces_the_wallet_v3_vectors() {
    let vectors: WalletVectors = load(WALLET_V3_VECTORS);
    assert!(vectors.vector.iter().any(|v| v.recovery_key.is_some()));
    for v in &vectors.vector {
        assert_eq!(support::hex(&spec_seal_wallet_v3(v)), v.sealed, "{}", v.description);
    }
}

/// FORMAT.md, "Recovery key": the pinned key and its public half.
#[test]
fn spec_derives_the_pinned_recovery_key() {
    let s = spec_read_recovery_key("000G-40R4-0M30-E209-185G-R38E-1YT6");
    assert_eq!(s, core::array::from_fn::<u8, 16, _>(|i| i as u8));
    let (_, pk) = rfc9180::derive_key_pair(&[&b"vaultfs/recovery-key/v1"[..], &s].concat());
    assert_eq!(support::hex(&pk), "b64c5bb37c90a4eda0d11f5da261a156ad918bb5a91a249785c98359dff4c755");
}

#[test]
fn spec_reproduces_the_wallet_v2_vectors() {
    let vectors: WalletVectors = load(WALLET_V2_VECTORS);
    for v in &vectors.vector {
        assert_eq!(support::hex(&spec_seal_wallet_v2(v)), v.sealed, "{}", v.description);
    }
}
