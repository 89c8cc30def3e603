//! The server is the adversary: every way of altering a stored vault file or name
//! must fail with an integrity error and never yield plaintext.
//!
//! One test per attack listed in docs/SECURITY.md, so a regression names the
//! attack that got through.

mod support;

use support::{context, pattern, vault_key};
use vaultfs::crypto::random::ReplayRandom;
use vaultfs::crypto::{
    decrypt_file, encrypt_file, open_name, rewrap_header, seal_name, ChunkIndex, CryptoError, FileDecryptor,
    IntegrityFailure, Layout, NameContext, OsRandom, CHUNK_SIZE, HEADER_LEN,
};
use vaultfs::ids::{FileId, RecordId, VaultId};

const C: usize = CHUNK_SIZE as usize;
const T: usize = 16;
const H: usize = HEADER_LEN as usize;

/// A three-chunk file (64 KiB, 64 KiB, 100 bytes) at context (1, 2, 3), generation 5.
fn three_chunks() -> (Vec<u8>, Vec<u8>) {
    let plain = pattern(2 * C + 100);
    let blob = encrypt_file(&vault_key(1), &context(1, 2, 3), 5, &plain, &mut OsRandom).unwrap();
    (plain, blob)
}

fn chunk(blob: &[u8], i: usize) -> std::ops::Range<usize> {
    let start = H + i * (C + T);
    start..(start + C + T).min(blob.len())
}

#[track_caller]
fn assert_integrity(result: Result<impl Sized, CryptoError>) -> IntegrityFailure {
    match result {
        Err(CryptoError::Integrity(kind)) => kind,
        Err(other) => panic!("expected an integrity error, got {other}"),
        Ok(_) => panic!("tampered data was accepted"),
    }
}

fn open(blob: &[u8]) -> Result<impl Sized, CryptoError> {
    decrypt_file(blob, &vault_key(1), &context(1, 2, 3), 5)
}

/// Also decrypt chunk by chunk and as a stream, so the random-access and
/// streaming paths are held to the same standard as the one-shot path.
fn assert_every_reader_refuses(blob: &[u8]) {
    assert_integrity(open(blob));
    let Ok(dec) = FileDecryptor::open(blob, &vault_key(1), &context(1, 2, 3), 5) else {
        return; // the header itself was refused: nothing further to read
    };
    let layout = dec.layout();
    let mut any_chunk_failed = dec.check_ciphertext_len(blob.len() as u64).is_err();
    for i in 0..layout.chunk_count() {
        let range = layout.cipher_range_for(i..i + 1);
        let sealed = blob.get(range.start as usize..(range.end as usize).min(blob.len())).unwrap_or(&[]);
        any_chunk_failed |= dec.decrypt_chunk(ChunkIndex(i), sealed, &mut Vec::new()).is_err();
    }
    assert!(any_chunk_failed, "random access accepted every chunk of a tampered file");
    let mut stream = FileDecryptor::open(blob, &vault_key(1), &context(1, 2, 3), 5).unwrap().into_stream();
    let mut out = Vec::new();
    let streamed = stream.update(&blob[H..], &mut out).and_then(|()| stream.finish().map(|_| ()));
    assert_integrity(streamed);
}

#[test]
fn untampered_file_opens_every_way() {
    let (plain, blob) = three_chunks();
    let (_, out) = decrypt_file(&blob, &vault_key(1), &context(1, 2, 3), 5).unwrap();
    assert_eq!(&out[..], &plain[..]);
    let mut stream = FileDecryptor::open(&blob, &vault_key(1), &context(1, 2, 3), 5).unwrap().into_stream();
    let mut streamed = Vec::new();
    for piece in blob[H..].chunks(1000) {
        stream.update(piece, &mut streamed).unwrap();
    }
    stream.finish().unwrap();
    assert_eq!(streamed, plain);
}

#[test]
fn flipped_bit_in_the_header_is_detected() {
    let (_, blob) = three_chunks();
    for byte in 0..H {
        for bit in [0, 3, 7] {
            let mut bad = blob.clone();
            bad[byte] ^= 1 << bit;
            // Some header bytes are parsed before authentication (magic, version,
            // key id, length): those fail as malformed or wrong-key. None may succeed.
            match open(&bad) {
                Ok(_) => panic!("flip at header byte {byte} bit {bit} accepted"),
                Err(CryptoError::Integrity(_))
                | Err(CryptoError::BadMagic(_))
                | Err(CryptoError::UnsupportedVersion { .. })
                | Err(CryptoError::Malformed(_))
                | Err(CryptoError::WrongKey { .. }) => {}
                Err(other) => panic!("flip at header byte {byte}: unexpected {other}"),
            }
        }
    }
    // The fields that only the key wrap protects fail as integrity errors.
    for byte in [24, 31, 40, 55, 56, 79, 80, 127] {
        let mut bad = blob.clone();
        bad[byte] ^= 0x10;
        assert_integrity(open(&bad));
    }
}

#[test]
fn flipped_bit_in_any_chunk_is_detected() {
    let (_, blob) = three_chunks();
    // The edges of every chunk (first and last data byte, every tag byte) and a
    // spread of positions inside, including the short final chunk.
    let mut positions = Vec::new();
    for i in 0..3 {
        let r = chunk(&blob, i);
        positions.extend([r.start, r.start + 1, r.end - T - 1]);
        positions.extend(r.end - T..r.end);
        positions.extend((r.start..r.end).step_by(4099));
    }
    for at in positions {
        let mut bad = blob.clone();
        bad[at] ^= 0x01;
        assert_every_reader_refuses(&bad);
    }
}

#[test]
fn truncation_off_a_chunk_boundary_is_detected() {
    let (_, blob) = three_chunks();
    for cut in [1, 17, 99, 116] {
        assert_every_reader_refuses(&blob[..blob.len() - cut]);
    }
    let mid = chunk(&blob, 1).start + 1000;
    assert_every_reader_refuses(&blob[..mid]);
}

#[test]
fn truncation_exactly_at_a_chunk_boundary_is_detected() {
    let (_, blob) = three_chunks();
    for keep in [1, 2] {
        let cut = chunk(&blob, keep).start;
        assert_eq!(assert_integrity(open(&blob[..cut])), IntegrityFailure::Length);
        assert_every_reader_refuses(&blob[..cut]);
    }
}

#[test]
fn truncation_even_with_a_forged_length_is_detected_by_the_last_flag() {
    // Defense in depth: suppose an attacker had an authentic header that states a
    // shorter length for the *same* content key. We build one by replaying the same
    // key material for a one-chunk and a two-chunk file (never done for real data).
    // Chunk 0 of the two-chunk file was sealed as "not last", so under the
    // one-chunk header (where chunk 0 is last) it must not authenticate, even
    // though key, nonce prefix, index and plaintext are identical.
    let material: Vec<u8> = (0..72).collect();
    let key = vault_key(1);
    let ctx = context(1, 2, 3);
    let plain = pattern(2 * C);
    let long = encrypt_file(&key, &ctx, 5, &plain, &mut ReplayRandom::new(material.clone())).unwrap();
    let short = encrypt_file(&key, &ctx, 5, &plain[..C], &mut ReplayRandom::new(material)).unwrap();
    let mut spliced = short[..H].to_vec();
    spliced.extend_from_slice(&long[chunk(&long, 0)]);
    assert_eq!(spliced.len(), short.len());
    assert_eq!(assert_integrity(decrypt_file(&spliced, &key, &ctx, 5)), IntegrityFailure::Authentication);
}

#[test]
fn truncation_to_zero_chunks_is_detected() {
    let (_, blob) = three_chunks();
    assert_every_reader_refuses(&blob[..H]);
    // An empty file still carries one (empty) final chunk; dropping it is caught.
    let empty = encrypt_file(&vault_key(1), &context(1, 2, 3), 5, b"", &mut OsRandom).unwrap();
    assert_eq!(empty.len(), H + T);
    assert!(open(&empty).is_ok());
    assert_eq!(assert_integrity(open(&empty[..H])), IntegrityFailure::Length);
}

#[test]
fn truncation_inside_the_header_is_refused() {
    let (_, blob) = three_chunks();
    for len in [0, 4, 5, 60, H - 1] {
        assert!(open(&blob[..len]).is_err(), "header cut to {len} bytes accepted");
    }
}

#[test]
fn extension_is_detected() {
    let (_, blob) = three_chunks();
    let mut one_more = blob.clone();
    one_more.push(0);
    assert_eq!(assert_integrity(open(&one_more)), IntegrityFailure::Length);
    assert_every_reader_refuses(&one_more);
    // Appending a copy of a genuine chunk.
    let mut extended = blob.clone();
    extended.extend_from_slice(&blob[chunk(&blob, 0)]);
    assert_every_reader_refuses(&extended);
}

#[test]
fn reordered_chunks_are_detected() {
    let (_, blob) = three_chunks();
    let mut bad = blob.clone();
    let (c0, c1) = (blob[chunk(&blob, 0)].to_vec(), blob[chunk(&blob, 1)].to_vec());
    bad[chunk(&blob, 0)].copy_from_slice(&c1);
    bad[chunk(&blob, 1)].copy_from_slice(&c0);
    assert_every_reader_refuses(&bad);
}

#[test]
fn duplicated_chunks_are_detected() {
    let (_, blob) = three_chunks();
    let mut bad = blob.clone();
    let c0 = blob[chunk(&blob, 0)].to_vec();
    bad[chunk(&blob, 1)].copy_from_slice(&c0);
    assert_every_reader_refuses(&bad);
}

#[test]
fn chunks_swapped_between_two_files_are_detected() {
    let (_, a) = three_chunks();
    // Another file, and also another upload of the *same* file (same key, same
    // context, same generation): each upload has its own content key.
    let b_other =
        encrypt_file(&vault_key(1), &context(1, 2, 9), 5, &pattern(2 * C + 100), &mut OsRandom).unwrap();
    let (_, a_again) = three_chunks();
    for donor in [&b_other, &a_again] {
        for i in 0..3 {
            let mut bad = a.clone();
            bad[chunk(&a, i)].copy_from_slice(&donor[chunk(donor, i)]);
            assert_every_reader_refuses(&bad);
        }
    }
}

#[test]
fn whole_file_moved_to_another_name_is_detected() {
    let (_, blob) = three_chunks();
    // Another file id in the same record: what a swap of two files' names amounts to.
    assert_integrity(decrypt_file(&blob, &vault_key(1), &context(1, 2, 4), 5));
}

#[test]
fn whole_file_moved_to_another_record_is_detected() {
    let (_, blob) = three_chunks();
    assert_integrity(decrypt_file(&blob, &vault_key(1), &context(1, 7, 3), 5));
}

#[test]
fn whole_file_moved_to_another_vault_is_detected() {
    let (_, blob) = three_chunks();
    // Even if the other vault used the same key, the vault id is bound.
    assert_integrity(decrypt_file(&blob, &vault_key(1), &context(8, 2, 3), 5));
    // With the other vault's own key the header names a key that is not supplied.
    assert!(matches!(
        decrypt_file(&blob, &vault_key(8), &context(8, 2, 3), 5),
        Err(CryptoError::WrongKey { .. })
    ));
}

#[test]
fn header_of_one_file_on_the_chunks_of_another_is_detected() {
    let (_, a) = three_chunks();
    let (_, b) = three_chunks();
    let mut bad = b.clone();
    bad[..H].copy_from_slice(&a[..H]);
    assert_every_reader_refuses(&bad);
}

#[test]
fn replayed_older_version_is_detected() {
    let key = vault_key(1);
    let ctx = context(1, 2, 3);
    let v5 = encrypt_file(&key, &ctx, 5, b"version five", &mut OsRandom).unwrap();
    let _v6 = encrypt_file(&key, &ctx, 6, b"version six", &mut OsRandom).unwrap();
    // The caller knows generation 6 exists; the server serves 5.
    let failure = assert_integrity(decrypt_file(&v5, &key, &ctx, 6));
    assert_eq!(failure, IntegrityFailure::Stale { found: 5, required: 6 });
    // The generation cannot be edited upwards: it is authenticated.
    let mut forged = v5.clone();
    forged[24..32].copy_from_slice(&6u64.to_be_bytes());
    assert_eq!(assert_integrity(decrypt_file(&forged, &key, &ctx, 6)), IntegrityFailure::Authentication);
}

#[test]
fn random_access_with_a_wrong_index_is_detected() {
    let (_, blob) = three_chunks();
    let dec = FileDecryptor::open(&blob, &vault_key(1), &context(1, 2, 3), 5).unwrap();
    let c0 = &blob[chunk(&blob, 0)];
    assert!(dec.decrypt_chunk(ChunkIndex(0), c0, &mut Vec::new()).is_ok());
    assert_integrity(dec.decrypt_chunk(ChunkIndex(1), c0, &mut Vec::new()));
    assert_integrity(dec.decrypt_chunk(ChunkIndex(3), c0, &mut Vec::new()));
}

#[test]
fn rewrapped_header_moves_the_file_and_the_old_location_rejects_it() {
    let (plain, blob) = three_chunks();
    let (old_key, new_key) = (vault_key(1), vault_key(2));
    let (old_ctx, new_ctx) = (context(1, 2, 3), context(1, 4, 3));
    let header = rewrap_header(&blob[..H], &old_key, &old_ctx, &new_key, &new_ctx, 6, &mut OsRandom).unwrap();
    let mut moved = header.to_vec();
    moved.extend_from_slice(&blob[H..]);
    let (info, out) = decrypt_file(&moved, &new_key, &new_ctx, 6).unwrap();
    assert_eq!((info.generation, &out[..]), (6, &plain[..]));
    // The re-wrapped file does not open at the old place or under the old key.
    assert!(decrypt_file(&moved, &old_key, &old_ctx, 0).is_err());
    assert_integrity(decrypt_file(&moved, &new_key, &old_ctx, 0));
    // And a forged re-wrap (wrong old key) is refused.
    assert!(rewrap_header(&blob[..H], &new_key, &old_ctx, &new_key, &new_ctx, 7, &mut OsRandom).is_err());
}

fn name_ctx(vault: u8, record: u8, file: u8) -> NameContext {
    NameContext::FileName {
        vault: VaultId([vault; 16]),
        record: RecordId([record; 16]),
        file: FileId([file; 16]),
    }
}

#[test]
fn tampered_names_are_detected() {
    let key = vault_key(1);
    let ctx = name_ctx(1, 2, 3);
    let sealed = seal_name(&key, &ctx, b"salaries.xlsx", &mut OsRandom).unwrap();
    assert_eq!(&open_name(&key, &ctx, &sealed).unwrap()[..], b"salaries.xlsx");
    for at in 17..sealed.len() {
        let mut bad = sealed.clone();
        bad[at] ^= 0x04;
        assert_integrity(open_name(&key, &ctx, &bad));
    }
    for len in [sealed.len() - 1, sealed.len() - 32] {
        assert!(open_name(&key, &ctx, &sealed[..len]).is_err());
    }
}

#[test]
fn names_swapped_between_files_records_vaults_and_kinds_are_detected() {
    let key = vault_key(1);
    let sealed = seal_name(&key, &name_ctx(1, 2, 3), b"a.txt", &mut OsRandom).unwrap();
    for other in [
        name_ctx(1, 2, 4),
        name_ctx(1, 9, 3),
        name_ctx(9, 2, 3),
        NameContext::RecordTitle { vault: VaultId([1; 16]), record: RecordId([2; 16]) },
        NameContext::RecordFields { vault: VaultId([1; 16]), record: RecordId([2; 16]) },
        NameContext::VaultName { vault: VaultId([1; 16]) },
    ] {
        assert_integrity(open_name(&key, &other, &sealed));
    }
    let title_ctx = NameContext::RecordTitle { vault: VaultId([1; 16]), record: RecordId([2; 16]) };
    let title = seal_name(&key, &title_ctx, b"Project X", &mut OsRandom).unwrap();
    let other_record = NameContext::RecordTitle { vault: VaultId([1; 16]), record: RecordId([5; 16]) };
    assert_integrity(open_name(&key, &other_record, &title));
}

#[test]
fn every_chunk_decrypts_on_its_own() {
    // Random access: any range needs only the header and the chunks it covers.
    let (plain, blob) = three_chunks();
    let dec = FileDecryptor::open(&blob[..H], &vault_key(1), &context(1, 2, 3), 5).unwrap();
    let layout: Layout = dec.layout();
    let wanted = layout.chunks_for(C as u64 + 10, C as u64);
    assert_eq!(wanted, 1..3);
    let bytes = layout.cipher_range_for(wanted.clone());
    let mut out = Vec::new();
    dec.decrypt_chunks(ChunkIndex(wanted.start), &blob[bytes.start as usize..bytes.end as usize], &mut out)
        .unwrap();
    assert_eq!(out, plain[C..]);
}
