//! `vaultfs demo`: the whole system on one machine, with one command.
//!
//! Starts an embedded vault server on loopback (its data directory, which holds
//! only ciphertext, and its TLS key go into a private temporary directory),
//! creates a demo user and vault, mounts the vault, puts a welcome file in it,
//! says what to try, and on Ctrl-C saves, unmounts, stops the server and removes
//! everything it created. `--format-tour` instead walks through the vault format
//! in memory, without a server or a mount.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use super::mount::{serve_until_stopped, start_session};
use super::user::LOGIN_KDF_FLOOR;
use super::CliResult;
use crate::crypto::{
    self, decrypt_file, encrypt_file, open_name, seal_name, FileContext, KdfParams, NameContext, OsRandom,
    VaultKey, Wallet,
};
use crate::fs::{FsOptions, VaultFs, ROOT};
use crate::ids::{hex_encode, FileId, RecordId, VaultId};
use crate::remote::account::Unlocked;
use crate::remote::http::{HttpRemote, ServerAccess};
use crate::remote::tls::Trust;

/// Line printed when the demo mount is ready (tests wait for it).
pub const DEMO_READY: &str = "vaultfs demo: ready at ";

/// `vaultfs demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to mount the demo vault (default: a new temporary directory).
    mountpoint: Option<PathBuf>,
    /// Walk through the vault format in memory instead (no server, no mount).
    #[arg(long)]
    format_tour: bool,
}

const WELCOME: &str = "Welcome to vaultfs.

This file lives in the record \"Welcome\" of the vault \"Demo vault\". On the
server it is stored only as XChaCha20-Poly1305 ciphertext, and so is its name:
the server never sees plaintext, keys or names. Here it is decrypted in memory
only; nothing of it is written to this machine's disk.

Try: copy files in, make directories (records), edit, rename, delete. Then
look for your text in the server's data directory: it is not there.
";

/// Runs the demo.
pub fn run(args: DemoArgs) -> CliResult {
    if args.format_tour {
        return format_tour().map_err(Into::into);
    }
    let work = private_temp_dir()?;
    let result = run_in(&work, args.mountpoint);
    if let Err(e) = std::fs::remove_dir_all(&work) {
        eprintln!("vaultfs demo: could not remove {}: {e}", work.display());
    }
    result
}

fn private_temp_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut suffix = [0u8; 6];
    getrandom::getrandom(&mut suffix).map_err(std::io::Error::other)?;
    let dir = std::env::temp_dir().join(format!("vaultfs-demo-{}", hex_encode(&suffix)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn run_in(work: &Path, mountpoint: Option<PathBuf>) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let data_dir = work.join("server-data");
    let mountpoint = match mountpoint {
        Some(m) => {
            std::fs::create_dir_all(&m)?;
            m
        }
        None => {
            let m = work.join("mnt");
            std::fs::create_dir(&m)?;
            m
        }
    };
    let mountpoint = std::fs::canonicalize(&mountpoint)?;

    // 1. The embedded server on a free loopback port.
    let config = crate::server::config::ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        data_dir: data_dir.clone(),
        ..Default::default()
    };
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(crate::server::run_until(
        config,
        move |s| {
            let _ = started_tx.send(s.clone());
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let started = started_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .map_err(|_| "the demo server did not start")?;
    let url = format!("{}://{}", started.scheme, started.addr);

    // 2. A demo user with a random passphrase, and a vault.
    let mut meta = crate::server::open_meta(&data_dir)?;
    let defaults = crate::server::admin::recorded_defaults(&meta)?.ok_or("server defaults missing")?;
    let code = crate::server::admin::add_user(&mut meta, "demo", defaults.limits, defaults.login_kdf)?;
    let colleague_code =
        crate::server::admin::add_user(&mut meta, "colleague", defaults.limits, defaults.login_kdf)?;
    drop(meta);
    let budget = FsOptions::default().cache_budget as u64;
    crate::cache::harden::harden_process(budget);
    let mut pass = [0u8; 16];
    getrandom::getrandom(&mut pass)?;
    let pass = zeroize::Zeroizing::new(hex_encode(&pass));
    let access = ServerAccess::new(url.clone(), started.fingerprint.clone().map(Trust::Pinned));
    let (fs, shared) = rt.block_on(async {
        let remote = HttpRemote::enroll(&access, "demo", &code, pass.as_bytes(), LOGIN_KDF_FLOOR).await?;
        let mut unlocked = Unlocked::create_wallet(remote, pass.as_bytes(), KdfParams::DEFAULT).await?;
        unlocked.ensure_user_key().await?;
        let vault = unlocked.create_vault("Demo vault", false).await?.info;
        // A second user, to whom the vault is shared read-only. Both are on
        // this machine, so the colleague's key is confirmed directly; on two
        // machines it is read aloud (`vaultfs whoami`, `vaultfs vault share`).
        let remote =
            HttpRemote::enroll(&access, "colleague", &colleague_code, pass.as_bytes(), LOGIN_KDF_FLOOR)
                .await?;
        let mut colleague = Unlocked::create_wallet(remote, pass.as_bytes(), KdfParams::DEFAULT).await?;
        let their_key = colleague.ensure_user_key().await?;
        unlocked.pin("colleague", their_key.fingerprint())?;
        let demo_key = unlocked.user_public().ok_or("the demo user has no key pair")?;
        colleague.pin("demo", demo_key.fingerprint())?;
        unlocked.share_vault(&vault, "colleague", crate::protocol::Rights::Read, &their_key).await?;
        let seen =
            colleague.vaults().await?.into_iter().find_map(|v| v.name.filter(|_| v.shared_by.is_some()));
        let shared = format!(
            "user \"colleague\" (key {}), read rights; their client opened the share and sees {:?}",
            their_key.fingerprint(),
            seen.as_deref().unwrap_or("nothing (the share did not open)")
        );
        let fs = Arc::new(VaultFs::new(unlocked, FsOptions::default()).await?);
        let vault = fs.lookup(ROOT, "Demo vault".as_ref()).await?;
        let record = fs.mkdir(vault.ino, "Welcome".as_ref()).await?;
        let (file, fh) = fs.create(record.ino, "README.txt".as_ref(), 0o644).await?;
        fs.write(fh, 0, WELCOME.as_bytes()).await?;
        fs.fsync(file.ino, fh).await?;
        fs.release(file.ino, fh).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((fs, shared))
    })?;

    // 3. The mount.
    let background = start_session(
        &fs,
        rt.handle(),
        &mountpoint,
        &url,
        super::mount::Session { threads: 4, noexec: false },
        &crate::policy::Policy::default().mount(),
    )?;
    let _status = super::status::serve_status(rt.handle(), &fs, &mountpoint, &url).ok();
    let vault_dir = mountpoint.join("Demo vault");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{DEMO_READY}{}", mountpoint.display())?;
    writeln!(out)?;
    writeln!(
        out,
        "  vault server   {url}  (certificate {})",
        started.fingerprint.as_deref().unwrap_or("none")
    )?;
    writeln!(out, "  server data    {}  (ciphertext only)", data_dir.display())?;
    writeln!(out, "  mounted at     {}", mountpoint.display())?;
    writeln!(out, "  shared with    {shared}")?;
    writeln!(out)?;
    writeln!(out, "Try, in another terminal:")?;
    writeln!(out, "  cat '{}/Welcome/README.txt'", vault_dir.display())?;
    writeln!(
        out,
        "  mkdir -p '{}/Projects/2026' && cp /etc/hostname '{}/Projects/2026/'",
        vault_dir.display(),
        vault_dir.display()
    )?;
    writeln!(
        out,
        "  getfattr -d '{}/Welcome/README.txt'    # end-to-end flag, sync state, version",
        vault_dir.display()
    )?;
    writeln!(
        out,
        "  grep -r 'Welcome to vaultfs' '{}' || echo 'not on the server in plaintext'",
        data_dir.display()
    )?;
    writeln!(out)?;
    writeln!(out, "Press Ctrl-C to stop: files are saved, the vault unmounted, the server stopped and its data removed.")?;
    out.flush()?;
    drop(out);

    let result = serve_until_stopped(&rt, &fs, background, &mountpoint);
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    println!("vaultfs demo: stopped and cleaned up");
    result
}

/// Walks through the vault format in memory.
fn format_tour() -> Result<(), crypto::CryptoError> {
    let mut rng = OsRandom;
    println!("vaultfs demo --format-tour: the vault format, in memory\n");

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
        "2. a {}-byte file sealed into {} bytes (128-byte header + {} chunks of 64 KiB, 16-byte tags)",
        plaintext.len(),
        blob.len(),
        crypto::Layout::new(plaintext.len() as u64).map_or(0, |l| l.chunk_count()),
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
