//! Command-line interface: argument parsing and dispatch to the subsystems.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::crypto::{
    self, decrypt_file, encrypt_file, open_name, seal_name, FileContext, KdfParams, NameContext, OsRandom,
    VaultKey, Wallet,
};
use crate::ids::{hex_encode, FileId, RecordId, VaultId};

/// Mount end-to-end encrypted vaults from a vault server as an ordinary drive.
///
/// Files are decrypted on open into memory only, and encrypted
/// (XChaCha20-Poly1305) and uploaded on close; the server never sees plaintext,
/// keys or names.
#[derive(Debug, Parser)]
#[command(name = "vaultfs", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run vaultfs end to end on this machine with one command.
    ///
    /// Today this walks through the vault format in memory: a wallet unlocked by a
    /// passphrase, a file sealed and opened, a name sealed, and tampering caught.
    /// The server, the mount and their demo land in the next milestones.
    Demo,
}

/// Parses `std::env::args` and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vaultfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<(), crypto::CryptoError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn demo_subcommand_parses() {
        let cli = Cli::try_parse_from(["vaultfs", "demo"]).unwrap();
        assert!(matches!(cli.command, Command::Demo));
        assert!(Cli::try_parse_from(["vaultfs", "nonsense"]).is_err());
    }
}
