//! `vaultfs demo`: the vault format, end to end, in memory.

use crate::crypto::{
    self, decrypt_file, encrypt_file, open_name, seal_name, FileContext, KdfParams, NameContext, OsRandom,
    VaultKey, Wallet,
};
use crate::ids::{hex_encode, FileId, RecordId, VaultId};

/// Walks through the vault format in memory.
pub fn run() -> Result<(), crypto::CryptoError> {
    let mut rng = OsRandom;
    println!("vaultfs demo: the vault format, in memory (no server or mount yet)\n");
    println!("Coming in the next milestones: `vaultfs serve` (a vault server on loopback),");
    println!("`vaultfs mount` (vaults as directories), and this demo running both together.\n");

    let vault = VaultId([0x5a; 16]);
    let ctx = FileContext { vault, record: RecordId([0x7e; 16]), file: FileId([0x42; 16]) };

    let started = std::time::Instant::now();
    let mut wallet = Wallet::new();
    wallet.add_key(vault, VaultKey::generate(&mut rng)?)?;
    let sealed_wallet = wallet.seal(b"demo passphrase", KdfParams::DEFAULT, &mut rng)?;
    let (wallet, params) = Wallet::open(&sealed_wallet, b"demo passphrase")?;
    println!(
        "1. wallet sealed with Argon2id ({} MiB, t={}) and reopened from the passphrase: {} bytes, {:.2} s",
        params.m_cost_kib / 1024,
        params.t_cost,
        sealed_wallet.len(),
        started.elapsed().as_secs_f64()
    );
    let key = wallet.active_key(vault).ok_or(crypto::CryptoError::Misuse("no vault key"))?;

    let plaintext: Vec<u8> = b"The quick brown fox. ".iter().copied().cycle().take(200_000).collect();
    let blob = encrypt_file(key, &ctx, 1, &plaintext, &mut rng)?;
    println!(
        "2. a {}-byte file sealed into {} bytes (128-byte header + {} chunks of 64 KiB, 16-byte tags); header starts {}",
        plaintext.len(),
        blob.len(),
        crypto::Layout::new(plaintext.len() as u64).map_or(0, |l| l.chunk_count()),
        hex_encode(&blob[..8])
    );
    let (_, opened) = decrypt_file(&blob, key, &ctx, 1)?;
    println!("3. opened again: plaintext matches = {}", opened[..] == plaintext[..]);

    let mut tampered = blob.clone();
    tampered[100_000] ^= 1;
    match decrypt_file(&tampered, key, &ctx, 1) {
        Err(e) => println!("4. one flipped bit in the middle: refused ({e})"),
        Ok(_) => println!("4. ERROR: tampering was not detected"),
    }
    let other = FileContext { file: FileId([0x43; 16]), ..ctx };
    match decrypt_file(&blob, key, &other, 1) {
        Err(e) => println!("5. the same blob presented as another file: refused ({e})"),
        Ok(_) => println!("5. ERROR: a swapped file was accepted"),
    }
    let name_ctx = NameContext::FileName { vault, record: ctx.record, file: ctx.file };
    let sealed_name = seal_name(key, &name_ctx, "tax return 2026.pdf".as_bytes(), &mut rng)?;
    let name = open_name(key, &name_ctx, &sealed_name)?;
    println!(
        "6. file name sealed to {} opaque bytes and opened again: {:?}",
        sealed_name.len(),
        String::from_utf8_lossy(&name)
    );
    Ok(())
}
