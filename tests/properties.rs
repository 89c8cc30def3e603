//! Property tests of the file format: whatever the length and however the
//! plaintext or ciphertext is split into writes, every reader returns exactly what
//! was written; and any range read through random access equals the same range of
//! the whole file.

mod support;

use proptest::prelude::*;
use support::{context, pattern, vault_key};
use vaultfs::crypto::{
    decrypt_file, encrypt_file, ChunkIndex, FileDecryptor, FileEncryptor, OsRandom, CHUNK_SIZE, HEADER_LEN,
};

const C: usize = CHUNK_SIZE as usize;
const H: usize = HEADER_LEN as usize;

/// Lengths around every interesting boundary, plus random ones.
fn interesting_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(C - 1),
        Just(C),
        Just(C + 1),
        Just(2 * C),
        Just(3 * C + 17),
        0usize..5 * C,
    ]
}

/// Splits `data` at the given (sorted, deduplicated) cut points.
fn pieces(data: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.retain(|&c| c <= data.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    for c in cuts {
        out.push(&data[last..c]);
        last = c;
    }
    out.push(&data[last..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn streaming_round_trip_with_arbitrary_write_sizes(
        len in interesting_len(),
        cuts in proptest::collection::vec(0usize..5 * C, 0..8),
        read_cuts in proptest::collection::vec(0usize..6 * C, 0..8),
    ) {
        let plain = pattern(len);
        let key = vault_key(3);
        let ctx = context(1, 2, 3);
        let (mut enc, header) = FileEncryptor::new(&key, &ctx, 9, len as u64, &mut OsRandom).unwrap();
        let mut blob = header.to_vec();
        for piece in pieces(&plain, cuts) {
            enc.update(piece, &mut blob).unwrap();
        }
        enc.finish(&mut blob).unwrap();

        let dec = FileDecryptor::open(&blob, &key, &ctx, 9).unwrap();
        prop_assert!(dec.check_ciphertext_len(blob.len() as u64).is_ok());
        let mut stream = dec.into_stream();
        let mut out = Vec::new();
        for piece in pieces(&blob[H..], read_cuts) {
            stream.update(piece, &mut out).unwrap();
        }
        stream.finish().unwrap();
        prop_assert_eq!(&out, &plain);

        let (_, one_shot) = decrypt_file(&blob, &key, &ctx, 0).unwrap();
        prop_assert_eq!(&one_shot[..], &plain[..]);
    }

    #[test]
    fn random_access_reads_match_the_whole_file(
        len in interesting_len(),
        offset in 0usize..5 * C,
        read_len in 0usize..2 * C + 5,
    ) {
        let plain = pattern(len);
        let key = vault_key(4);
        let ctx = context(4, 5, 6);
        let blob = encrypt_file(&key, &ctx, 1, &plain, &mut OsRandom).unwrap();
        let dec = FileDecryptor::open(&blob[..H], &key, &ctx, 1).unwrap();
        let layout = dec.layout();
        let chunks = layout.chunks_for(offset as u64, read_len as u64);
        let bytes = layout.cipher_range_for(chunks.clone());
        let mut out = Vec::new();
        dec.decrypt_chunks(ChunkIndex(chunks.start), &blob[bytes.start as usize..bytes.end as usize], &mut out)
            .unwrap();
        // The decrypted chunks start at the first chunk's plaintext offset.
        let base = (chunks.start as usize) * C;
        let want_start = offset.min(len);
        let want_end = (offset + read_len).min(len);
        let got = if want_start < want_end { &out[want_start - base..want_end - base] } else { &[][..] };
        prop_assert_eq!(got, &plain[want_start..want_end]);
    }

    #[test]
    fn every_upload_uses_fresh_key_material(len in 0usize..3 * C) {
        let plain = pattern(len);
        let key = vault_key(5);
        let ctx = context(1, 1, 1);
        let a = encrypt_file(&key, &ctx, 1, &plain, &mut OsRandom).unwrap();
        let b = encrypt_file(&key, &ctx, 1, &plain, &mut OsRandom).unwrap();
        // Same plaintext, key, context and generation: the nonce prefix, wrapped key
        // and every chunk still differ.
        prop_assert_ne!(&a[40..56], &b[40..56]);
        prop_assert_ne!(&a[80..H], &b[80..H]);
        for (ca, cb) in a[H..].chunks(C + 16).zip(b[H..].chunks(C + 16)) {
            prop_assert_ne!(ca, cb);
        }
    }
}
