//! The library must reproduce every test vector in tests/data/ byte for byte, and
//! open what it produced. A failure here means the on-server format changed:
//! either a bug, or a deliberate change that needs a new format version.
//!
//! The vectors were written once by `cargo test --test vectors -- --ignored
//! write_vectors` and are never regenerated to make a test pass.

mod support;

use support::vectors::*;
use support::{hex, pattern, unhex};
use vaultfs::crypto::manifest::{LinkTarget, LEGACY_PERM};
use vaultfs::crypto::random::ReplayRandom;
use vaultfs::crypto::{
    decrypt_file, encrypt_file, open_manifest, open_name, seal_manifest, seal_name, ContentMode, FileContext,
    FileManifest, KdfParams, KeyId, NameContext, PieceTagger, RecoveryKey, VaultKey, Wallet,
};
use vaultfs::ids::{FileId, RecordId, VaultId};

fn arr<const N: usize>(s: &str) -> [u8; N] {
    unhex(s).try_into().unwrap_or_else(|_| panic!("expected {N} bytes: {s}"))
}

fn key_of(id: &str, secret: &str) -> VaultKey {
    VaultKey::from_bytes(KeyId(arr(id)), arr(secret))
}

fn file_ctx(v: &FileVector) -> FileContext {
    FileContext {
        vault: VaultId(arr(&v.vault_id)),
        record: RecordId(arr(&v.record_id)),
        file: FileId(arr(&v.file_id)),
    }
}

fn name_ctx(v: &NameVector) -> NameContext {
    let vault = VaultId(arr(&v.vault_id));
    let record = || RecordId(arr(v.record_id.as_deref().expect("record_id")));
    match v.kind.as_str() {
        "vault-name" => NameContext::VaultName { vault },
        "record-title" => NameContext::RecordTitle { vault, record: record() },
        "record-fields" => NameContext::RecordFields { vault, record: record() },
        "file-name" => NameContext::FileName {
            vault,
            record: record(),
            file: FileId(arr(v.file_id.as_deref().expect("file_id"))),
        },
        other => panic!("unknown name kind {other}"),
    }
}

#[test]
fn file_vectors_reproduce_and_open() {
    let vectors: FileVectors = load(FILE_VECTORS);
    assert!(vectors.vector.len() >= 7, "vector file lost entries");
    for v in &vectors.vector {
        let key = key_of(&v.vault_key_id, &v.vault_key);
        let plain = v.plaintext_bytes();
        let mut rng = ReplayRandom::new(unhex(&v.random));
        let blob = encrypt_file(&key, &file_ctx(v), v.generation, &plain, &mut rng).unwrap();
        assert_eq!(
            rng.remaining(),
            0,
            "{}: encryption must draw exactly the listed randomness",
            v.description
        );
        assert_file_output(v, &blob);
        let (info, opened) = decrypt_file(&blob, &key, &file_ctx(v), v.generation).unwrap();
        assert_eq!(info.generation, v.generation);
        assert_eq!(&opened[..], &plain[..], "{}", v.description);
    }
}

#[test]
fn name_vectors_reproduce_and_open() {
    let vectors: NameVectors = load(NAME_VECTORS);
    assert!(vectors.vector.len() >= 4);
    for v in &vectors.vector {
        let key = key_of(&v.vault_key_id, &v.vault_key);
        let mut rng = ReplayRandom::new(unhex(&v.random));
        let sealed = seal_name(&key, &name_ctx(v), v.name.as_bytes(), &mut rng).unwrap();
        assert_eq!(rng.remaining(), 0);
        assert_eq!(hex(&sealed), v.sealed, "{}", v.description);
        assert_eq!(&open_name(&key, &name_ctx(v), &sealed).unwrap()[..], v.name.as_bytes());
    }
}

fn wallet_of(v: &WalletVector) -> Wallet {
    let mut w = Wallet::new();
    for k in &v.keys {
        w.add_key(VaultId(arr(&k.vault_id)), key_of(&k.key_id, &k.key)).unwrap();
    }
    if let Some(state) = &v.state_key {
        w.ensure_state_key(&mut ReplayRandom::new(unhex(state))).unwrap();
    }
    for vault in v.manifests_required.iter().flatten() {
        w.require_manifests(VaultId(arr(vault)));
    }
    if let Some(paper) = &v.recovery_key {
        w.set_recovery(&paper.parse().unwrap());
    }
    w
}

/// What a wallet vector says, checked against an opened wallet.
fn assert_wallet_matches(v: &WalletVector, opened: &Wallet) {
    assert_eq!(opened.revision(), v.revision, "{}", v.description);
    assert_eq!(opened.entries().len(), v.keys.len());
    for (k, e) in v.keys.iter().zip(opened.entries()) {
        assert_eq!((hex(&e.key.id().0), e.active), (k.key_id.clone(), k.active));
        assert_eq!(e.key.duplicate().id(), key_of(&k.key_id, &k.key).id());
    }
    assert_eq!(opened.state_key().map(|k| hex(k.secret())), v.state_key, "{}", v.description);
    for vault in v.manifests_required.iter().flatten() {
        assert!(opened.manifests_required(VaultId(arr(vault))), "{}", v.description);
    }
}

#[test]
fn wallet_vectors_reproduce_and_open() {
    // Versions 1 and 2 (frozen): this build writes version 3 now, so these
    // are only opened, as every release must.
    for file in [WALLET_VECTORS, WALLET_V2_VECTORS] {
        let vectors: WalletVectors = load(file);
        assert!(!vectors.vector.is_empty());
        for v in &vectors.vector {
            let params = KdfParams { m_cost_kib: v.m_cost_kib, t_cost: v.t_cost, p_cost: v.p_cost };
            let (opened, p) = Wallet::open(&unhex(&v.sealed), v.passphrase.as_bytes()).unwrap();
            assert_eq!(p, params);
            assert_wallet_matches(v, &opened);
            assert_eq!(wallet_of(v).revision(), v.revision);
        }
    }
    // Version 3: reproduced byte for byte, and opened with the passphrase
    // and with the recovery key.
    let vectors: WalletVectors = load(WALLET_V3_VECTORS);
    assert!(!vectors.vector.is_empty());
    for v in &vectors.vector {
        let params = KdfParams { m_cost_kib: v.m_cost_kib, t_cost: v.t_cost, p_cost: v.p_cost };
        let wallet = wallet_of(v);
        let mut rng = ReplayRandom::new(unhex(&v.random));
        let sealed = wallet.seal(v.passphrase.as_bytes(), params, &mut rng).unwrap();
        assert_eq!(rng.remaining(), 0);
        assert_eq!(hex(&sealed), v.sealed, "{}", v.description);
        let (opened, _) = Wallet::open(&sealed, v.passphrase.as_bytes()).unwrap();
        assert_wallet_matches(v, &opened);
        if let Some(paper) = &v.recovery_key {
            let key: RecoveryKey = paper.parse().unwrap();
            let (recovered, _) = Wallet::open_with_recovery(&sealed, &key).unwrap();
            assert_wallet_matches(v, &recovered);
        }
    }
}

/// Writes tests/data/wallet-v3-vectors.toml (versions 1 and 2 are frozen).
#[test]
#[ignore = "writes tests/data; run by hand only"]
fn write_wallet_v3_vectors() {
    let random =
        |seed: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect() };
    let mut v = WalletVector {
        description:
            "version 3: two vaults (one retired key), a state key, one vault flagged, a recovery key".into(),
        passphrase: "correct horse battery staple".into(),
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
        random: hex(&random(0x17, 16 + 24 + 32 + 32 + 24)),
        revision: 0,
        keys: vec![
            WalletKeyVector {
                vault_id: hex(&[0x25; 16]),
                key_id: hex(&[0x26; 16]),
                key: hex(&random(0x27, 32)),
                active: false,
            },
            WalletKeyVector {
                vault_id: hex(&[0x25; 16]),
                key_id: hex(&[0x28; 16]),
                key: hex(&random(0x29, 32)),
                active: true,
            },
        ],
        version: Some(3),
        state_key: Some(hex(&random(0x45, 32))),
        manifests_required: Some(vec![hex(&[0x25; 16])]),
        recovery_key: Some(
            RecoveryKey::generate(&mut ReplayRandom::new(random(0x55, 16))).unwrap().to_string(),
        ),
        sealed: String::new(),
    };
    let wallet = wallet_of(&v);
    v.revision = wallet.revision();
    let params = KdfParams { m_cost_kib: v.m_cost_kib, t_cost: v.t_cost, p_cost: v.p_cost };
    let sealed =
        wallet.seal(v.passphrase.as_bytes(), params, &mut ReplayRandom::new(unhex(&v.random))).unwrap();
    v.sealed = hex(&sealed);
    let header = "# Test vectors for the vaultfs wallet, version 3 (docs/FORMAT.md, \"Wallet\").\n\
                  # Generated once; never edit or regenerate to make a test pass.\n\n";
    let body = toml::to_string(&WalletVectors { vector: vec![v] }).unwrap();
    std::fs::write(data_path(WALLET_V3_VECTORS), format!("{header}{body}")).unwrap();
}

fn manifest_ctx(v: &ManifestVector) -> FileContext {
    FileContext {
        vault: VaultId(arr(&v.vault_id)),
        record: RecordId(arr(&v.record_id)),
        file: FileId(arr(&v.file_id)),
    }
}

/// The manifest a vector describes, made as a writer makes it (the tag key
/// drawn from the vector's random bytes).
fn manifest_of(v: &ManifestVector, rng: &mut ReplayRandom) -> FileManifest {
    let mode = match v.mode.as_str() {
        "e2e" => ContentMode::EndToEnd { upload: arr(v.upload.as_deref().expect("upload")) },
        "plain" => {
            let mut tagger = PieceTagger::new(rng).unwrap();
            let plain = v.plaintext_bytes();
            for piece in plain.chunks(100_000) {
                tagger.update(piece).unwrap();
            }
            ContentMode::Plain(tagger.finish().unwrap())
        }
        "link" => ContentMode::Link(LinkTarget::new(&unhex(v.target.as_deref().expect("target"))).unwrap()),
        other => panic!("unknown mode {other}"),
    };
    FileManifest {
        generation: v.generation,
        length: v.length,
        mode,
        // Version 1 states neither.
        content_generation: v.content_generation.unwrap_or(v.generation),
        perm: v.perm.unwrap_or(LEGACY_PERM),
    }
}

/// Checks each manifest vector of `file`: tags, and that the sealed bytes
/// open to the manifest described; `reproduce`: sealing it again gives
/// those bytes (the current version only: older ones are opened only).
fn check_manifest_vectors(file: &str, at_least: usize, reproduce: bool) {
    let vectors: ManifestVectors = load(file);
    assert!(vectors.vector.len() >= at_least, "vector file lost entries");
    for v in &vectors.vector {
        let key = key_of(&v.vault_key_id, &v.vault_key);
        let mut rng = ReplayRandom::new(unhex(&v.random));
        let m = manifest_of(v, &mut rng);
        if let ContentMode::Plain(tags) = &m.mode {
            let joined: Vec<u8> = tags.tags().iter().flatten().copied().collect();
            assert_eq!(Some(hex(&joined)), v.tags, "{}: tags", v.description);
            let plain = v.plaintext_bytes();
            for (i, piece) in plain.chunks(1 << 20).enumerate() {
                tags.verifier().verify(i as u64, [piece]).unwrap();
            }
        }
        if reproduce {
            let sealed = seal_manifest(&key, &manifest_ctx(v), &m, &mut rng).unwrap();
            assert_eq!(hex(&sealed), v.sealed, "{}: sealed", v.description);
        }
        assert_eq!(open_manifest(&key, &manifest_ctx(v), &unhex(&v.sealed)).unwrap(), m, "{}", v.description);
    }
}

#[test]
fn manifest_v1_vectors_still_open() {
    check_manifest_vectors(MANIFEST_VECTORS, 7, false);
}

#[test]
fn manifest_v2_vectors_reproduce_and_open() {
    check_manifest_vectors(MANIFEST_V2_VECTORS, 6, true);
}

// manifest-vectors.toml (version 1) was written by the version before
// manifest version 2; it is frozen, and only opened now.

/// Writes tests/data/manifest-v2-vectors.toml (manifest version 2: modes,
/// content generations, symbolic links).
#[test]
#[ignore = "writes tests/data; run by hand only"]
fn write_manifest_v2_vectors() {
    let random =
        |seed: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect() };
    // (mode, length, content generation below the generation, perm, target, description)
    type Case<'a> = (&'a str, u64, u64, u16, &'a [u8], &'a str);
    let cases: [Case; 7] = [
        ("e2e", 100, 0, 0o644, b"", "end-to-end, 100 bytes, 0644"),
        ("e2e", 100, 2, 0o755, b"", "end-to-end, chmodded to 0755 twice since its content"),
        ("e2e", 0, 0, 0o600, b"", "end-to-end, created empty with 0600, nothing uploaded"),
        ("plain", 1, 0, 0o4750, b"", "pass-through, 1 byte, setuid 0750"),
        ("plain", (1 << 20) + 1, 1, 0o640, b"", "pass-through, one piece and one byte, chmodded"),
        ("link", 0, 0, 0o777, b"../shared/notes.txt", "symbolic link, relative target"),
        ("link", 0, 0, 0o777, &[b'x'; 64], "symbolic link, 64-byte target (one padding bucket)"),
    ];
    let mut out = Vec::new();
    for (n, (mode, length, behind, perm, target, description)) in cases.into_iter().enumerate() {
        let n = n as u8;
        let plain = mode == "plain";
        let length = if mode == "link" { target.len() as u64 } else { length };
        let generation = u64::from(n) * 3 + 3;
        let upload = match (mode, length) {
            ("e2e", 0) => Some(hex(&[0; 16])),
            ("e2e", _) => Some(hex(&random(0x32 + n, 16))),
            _ => None,
        };
        let mut v = ManifestVector {
            description: description.into(),
            vault_key_id: hex(&[0x12 + n; 16]),
            vault_key: hex(&random(0x22 + n, 32)),
            vault_id: hex(&[0x42 + n; 16]),
            record_id: hex(&[0x52 + n; 16]),
            file_id: hex(&[0x62 + n; 16]),
            mode: mode.into(),
            generation,
            length,
            upload,
            plaintext: (plain && length <= 1).then(|| hex(&pattern(length as usize))),
            random: hex(&random(0x72 + n, if plain { 56 } else { 24 })),
            tags: None,
            content_generation: Some(generation - behind),
            perm: Some(perm),
            target: (mode == "link").then(|| hex(target)),
            sealed: String::new(),
        };
        let key = key_of(&v.vault_key_id, &v.vault_key);
        let mut rng = ReplayRandom::new(unhex(&v.random));
        let m = manifest_of(&v, &mut rng);
        if let ContentMode::Plain(tags) = &m.mode {
            v.tags = Some(hex(&tags.tags().iter().flatten().copied().collect::<Vec<u8>>()));
        }
        v.sealed = hex(&seal_manifest(&key, &manifest_ctx(&v), &m, &mut rng).unwrap());
        out.push(v);
    }
    let header =
        "# Test vectors for vaultfs file manifests, version 2 (docs/FORMAT.md, \"File manifests\").\n\
                  # Generated once; never edit or regenerate to make a test pass.\n\n";
    let body = toml::to_string(&ManifestVectors { vector: out }).unwrap();
    std::fs::write(data_path(MANIFEST_V2_VECTORS), format!("{header}{body}")).unwrap();
}

/// Writes the vector files from the cases below. Run by hand, only when adding
/// vectors or deliberately introducing a new format version.
#[test]
#[ignore = "writes tests/data; run by hand only"]
fn write_vectors() {
    let random =
        |seed: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect() };
    let mut files = Vec::new();
    for (n, len) in [0u64, 1, 100, 65535, 65536, 65537, 200_000].into_iter().enumerate() {
        let n = n as u8;
        let mut v = FileVector {
            description: format!("{len}-byte file"),
            vault_key_id: hex(&[0x10 + n; 16]),
            vault_key: hex(&random(0x20 + n, 32)),
            vault_id: hex(&[0x30 + n; 16]),
            record_id: hex(&[0x40 + n; 16]),
            file_id: hex(&[0x50 + n; 16]),
            generation: u64::from(n) + 1,
            random: hex(&random(0x60 + n, 72)),
            plaintext_len: len,
            plaintext: (len <= 100).then(|| hex(&pattern(len as usize))),
            ciphertext_len: 0,
            ciphertext_sha256: String::new(),
            ciphertext: None,
        };
        let key = key_of(&v.vault_key_id, &v.vault_key);
        let blob = encrypt_file(
            &key,
            &file_ctx(&v),
            v.generation,
            &v.plaintext_bytes(),
            &mut ReplayRandom::new(unhex(&v.random)),
        )
        .unwrap();
        v.ciphertext_len = blob.len() as u64;
        v.ciphertext_sha256 = sha256_hex(&blob);
        v.ciphertext = (blob.len() <= 1024).then(|| hex(&blob));
        files.push(v);
    }

    let mut names = Vec::new();
    for (n, (kind, name)) in [
        ("vault-name", "Family"),
        ("record-title", "Tax 2026"),
        ("record-fields", "{\"account\":\"CZ65 0800 0000 1920 0014 5399\"}"),
        ("file-name", "scan 0001.pdf"),
        ("file-name", "ünïcödé and a name long enough to need a second 32-byte padding block.txt"),
    ]
    .into_iter()
    .enumerate()
    {
        let n = n as u8;
        let mut v = NameVector {
            description: format!("{kind}: {name}"),
            vault_key_id: hex(&[0x70 + n; 16]),
            vault_key: hex(&random(0x80 + n, 32)),
            kind: kind.into(),
            vault_id: hex(&[0x90 + n; 16]),
            record_id: (kind != "vault-name").then(|| hex(&[0xa0 + n; 16])),
            file_id: (kind == "file-name").then(|| hex(&[0xb0 + n; 16])),
            random: hex(&random(0xc0 + n, 24)),
            name: name.into(),
            sealed: String::new(),
        };
        let key = key_of(&v.vault_key_id, &v.vault_key);
        let sealed =
            seal_name(&key, &name_ctx(&v), name.as_bytes(), &mut ReplayRandom::new(unhex(&v.random)))
                .unwrap();
        v.sealed = hex(&sealed);
        names.push(v);
    }

    let mut wallet = WalletVector {
        description: "two vaults, one with a retired key; cheap Argon2id parameters".into(),
        passphrase: "correct horse battery staple".into(),
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
        random: hex(&random(0xd0, 40)),
        revision: 3,
        version: None,
        state_key: None,
        manifests_required: None,
        recovery_key: None,
        keys: vec![
            WalletKeyVector {
                vault_id: hex(&[0xe0; 16]),
                key_id: hex(&[0xe1; 16]),
                key: hex(&random(0xe2, 32)),
                active: false,
            },
            WalletKeyVector {
                vault_id: hex(&[0xe0; 16]),
                key_id: hex(&[0xe3; 16]),
                key: hex(&random(0xe4, 32)),
                active: true,
            },
            WalletKeyVector {
                vault_id: hex(&[0xf0; 16]),
                key_id: hex(&[0xf1; 16]),
                key: hex(&random(0xf2, 32)),
                active: true,
            },
        ],
        sealed: String::new(),
    };
    let params = KdfParams { m_cost_kib: wallet.m_cost_kib, t_cost: wallet.t_cost, p_cost: wallet.p_cost };
    let sealed = wallet_of(&wallet)
        .seal(wallet.passphrase.as_bytes(), params, &mut ReplayRandom::new(unhex(&wallet.random)))
        .unwrap();
    wallet.sealed = hex(&sealed);

    let header = "# Test vectors for the vaultfs format (docs/FORMAT.md). Generated once; never\n\
                  # edit or regenerate to make a test pass: a mismatch is a format change.\n\n";
    let write =
        |name: &str, body: String| std::fs::write(data_path(name), format!("{header}{body}")).unwrap();
    write(FILE_VECTORS, toml::to_string(&FileVectors { vector: files }).unwrap());
    write(NAME_VECTORS, toml::to_string(&NameVectors { vector: names }).unwrap());
    write(WALLET_VECTORS, toml::to_string(&WalletVectors { vector: vec![wallet] }).unwrap());
}
