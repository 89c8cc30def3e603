//! docs/FORMAT.md, implemented a second time from the text alone.
//!
//! This file uses none of vaultfs's crypto code: it builds headers, chunks, sealed
//! names and wallets with RustCrypto's `XChaCha20Poly1305` (a different AEAD
//! implementation from the one the library runs on) following the byte tables of
//! the spec, and must reproduce every test vector. If the spec and the code ever
//! disagree, this test says so.

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

/// FORMAT.md, "Wallet".
fn spec_seal_wallet(v: &WalletVector) -> Vec<u8> {
    let random = unhex(&v.random);
    let (salt, nonce) = random.split_at(16);
    let mut header = b"VLTW".to_vec();
    header.extend_from_slice(&[1, 1, 0, 0]);
    header.extend_from_slice(&v.m_cost_kib.to_be_bytes());
    header.extend_from_slice(&v.t_cost.to_be_bytes());
    header.extend_from_slice(&v.p_cost.to_be_bytes());
    header.extend_from_slice(salt);
    header.extend_from_slice(nonce);
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
    let mut header = b"VLTW".to_vec();
    header.extend_from_slice(&[2, 1, 0, 0]);
    header.extend_from_slice(&v.m_cost_kib.to_be_bytes());
    header.extend_from_slice(&v.t_cost.to_be_bytes());
    header.extend_from_slice(&v.p_cost.to_be_bytes());
    header.extend_from_slice(salt);
    header.extend_from_slice(nonce);
    let params = argon2::Params::new(v.m_cost_kib, v.t_cost, v.p_cost, Some(32)).unwrap();
    let mut wallet_key = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(v.passphrase.as_bytes(), salt, &mut wallet_key)
        .unwrap();
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
    let mut body = v.revision.to_be_bytes().to_vec();
    body.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (kind, r) in records {
        body.push(kind);
        body.extend_from_slice(&(r.len() as u32).to_be_bytes());
        body.extend_from_slice(&r);
    }
    let sealed = xseal(&wallet_key, nonce, &header, &body);
    header.extend_from_slice(&sealed);
    header
}

#[test]
fn spec_reproduces_the_wallet_v2_vectors() {
    let vectors: WalletVectors = load(WALLET_V2_VECTORS);
    for v in &vectors.vector {
        assert_eq!(support::hex(&spec_seal_wallet_v2(v)), v.sealed, "{}", v.description);
    }
}
