//! Single-core throughput of the vault format against OpenSSL, in one run.
//!
//! `cargo bench --bench crypto` prints a markdown table: encrypt and decrypt of
//! whole files through the streaming API (64 KiB chunks), the pure-Rust RustCrypto
//! XChaCha20-Poly1305 on the same chunks for reference, and the machine's
//! `openssl speed -evp chacha20-poly1305` figure at 64 KiB, with ratios to it.
//! `-- --quick` runs a small, single-repetition version (a smoke test for CI).
//! Figures, not pass/fail: nothing here asserts a speed.

mod shared;

use std::time::Instant;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use vaultfs::crypto::{
    ChunkIndex, FileContext, FileDecryptor, FileEncryptor, KeyId, OsRandom, VaultKey, CHUNK_SIZE, HEADER_LEN,
};
use vaultfs::ids::{FileId, RecordId, VaultId};

struct Config {
    bytes: usize,
    reps: usize,
    openssl_seconds: u32,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Runs `f` once untimed (so first-touch page faults of fresh buffers are not
/// counted), then `reps` times over `bytes` bytes, and returns the median GB/s.
fn measure(cfg: &Config, mut f: impl FnMut()) -> f64 {
    f();
    let runs = (0..cfg.reps)
        .map(|_| {
            let t = Instant::now();
            f();
            cfg.bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(runs)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cfg = if quick {
        Config { bytes: 16 << 20, reps: 1, openssl_seconds: 1 }
    } else {
        Config { bytes: 256 << 20, reps: 7, openssl_seconds: 3 }
    };

    let key = VaultKey::from_bytes(KeyId([1; 16]), [2; 32]);
    let ctx = FileContext { vault: VaultId([3; 16]), record: RecordId([4; 16]), file: FileId([5; 16]) };
    let plain: Vec<u8> = (0..cfg.bytes).map(|i| i as u8).collect();
    let mut blob = Vec::with_capacity(cfg.bytes + cfg.bytes / 1000 + 4096);

    let encrypt = measure(&cfg, || {
        blob.clear();
        let (mut enc, header) = FileEncryptor::new(&key, &ctx, 1, plain.len() as u64, &mut OsRandom).unwrap();
        blob.extend_from_slice(&header);
        for piece in plain.chunks(CHUNK_SIZE as usize) {
            enc.update(piece, &mut blob).unwrap();
        }
        enc.finish(&mut blob).unwrap();
    });

    let mut out = Vec::with_capacity(cfg.bytes);
    let decrypt = measure(&cfg, || {
        out.clear();
        let dec = FileDecryptor::open(&blob, &key, &ctx, 1).unwrap();
        dec.decrypt_chunks(ChunkIndex(0), &blob[HEADER_LEN as usize..], &mut out).unwrap();
    });
    assert_eq!(out, plain, "benchmark decrypted wrong bytes");

    // In cache, like `openssl speed`: one 64 KiB plaintext chunk sealed again and
    // again through the format API into a reused buffer; then chunk 0 of a
    // multi-chunk file opened again and again.
    let chunks = cfg.bytes / CHUNK_SIZE as usize;
    let one_chunk = &plain[..CHUNK_SIZE as usize];
    let mut sink = Vec::with_capacity(2 * CHUNK_SIZE as usize);
    let encrypt_hot = measure(&cfg, || {
        let total = (chunks * CHUNK_SIZE as usize) as u64;
        let (mut enc, _) = FileEncryptor::new(&key, &ctx, 1, total, &mut OsRandom).unwrap();
        for _ in 0..chunks {
            sink.clear();
            enc.update(one_chunk, &mut sink).unwrap();
        }
        enc.finish(&mut sink).unwrap();
    });
    let dec = FileDecryptor::open(&blob, &key, &ctx, 1).unwrap();
    let first = dec.layout().cipher_range_for(0..1);
    let sealed_chunk = &blob[first.start as usize..first.end as usize];
    let decrypt_hot = measure(&cfg, || {
        for _ in 0..chunks {
            sink.clear();
            dec.decrypt_chunk(ChunkIndex(0), sealed_chunk, &mut sink).unwrap();
        }
    });

    let reference = XChaCha20Poly1305::new((&[2u8; 32]).into());
    let mut chunk = vec![0u8; CHUNK_SIZE as usize];
    let rustcrypto = measure(&cfg, || {
        for (i, piece) in plain.chunks(CHUNK_SIZE as usize).enumerate() {
            chunk.clear();
            chunk.extend_from_slice(piece);
            let mut nonce = [0u8; 24];
            nonce[16..].copy_from_slice(&(i as u64).to_be_bytes());
            reference.encrypt_in_place_detached(XNonce::from_slice(&nonce), b"", &mut chunk).unwrap();
        }
    });

    let openssl = shared::openssl_speed(cfg.openssl_seconds);
    let ratio = |x: f64| openssl.map_or("n/a".to_string(), |o| format!("{:.2}", x / o));
    println!(
        "\n## Single-core AEAD throughput, 64 KiB chunks ({} MiB x {} reps, median)\n",
        cfg.bytes >> 20,
        cfg.reps
    );
    println!("| what | GB/s | ratio to openssl speed |");
    println!("|---|---:|---:|");
    println!("| vaultfs encrypt, per 64 KiB chunk, in cache | {encrypt_hot:.2} | {} |", ratio(encrypt_hot));
    println!("| vaultfs decrypt, per 64 KiB chunk, in cache | {decrypt_hot:.2} | {} |", ratio(decrypt_hot));
    println!(
        "| vaultfs encrypt, whole {} MiB file streamed (memory-bound) | {encrypt:.2} | {} |",
        cfg.bytes >> 20,
        ratio(encrypt)
    );
    println!(
        "| vaultfs decrypt, whole {} MiB file (memory-bound) | {decrypt:.2} | {} |",
        cfg.bytes >> 20,
        ratio(decrypt)
    );
    println!(
        "| RustCrypto XChaCha20Poly1305 encrypt (pure Rust reference) | {rustcrypto:.2} | {} |",
        ratio(rustcrypto)
    );
    match openssl {
        Some(o) => println!("| `openssl speed -evp chacha20-poly1305`, 64 KiB | {o:.2} | 1.00 |"),
        None => println!("| `openssl speed -evp chacha20-poly1305` | could not run `openssl` | |"),
    }
}
