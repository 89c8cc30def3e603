//! `vaultfs login` and `vaultfs vault`: a user's commands.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

pub(crate) use super::secret::{read_passphrase, PASSPHRASE_FILE_ENV};
use super::CliResult;
use crate::crypto::{Fingerprint, KdfParams, RecoveryKey};
use crate::fs::freshness::{state_dir, state_path, Freshness, FreshnessError};
use crate::remote::account::{config_dir, Account, AccountError, Unlocked, LOGIN_FILE};
use crate::remote::http::{parse_server_url, probe_fingerprint, HttpRemote, ServerAccess};
use crate::remote::pins::{PinCheck, Pins, PINS_FILE};
use crate::remote::tls::{normalize_fingerprint, Trust};

/// The weakest Argon2id this client accepts from a server for the login key
/// (OWASP's minimum for Argon2id): a hostile server cannot make it cheaper.
pub const LOGIN_KDF_FLOOR: KdfParams = KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 };

/// `vaultfs login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Server URL, e.g. https://vault.example.org:8443.
    #[arg(long)]
    server: String,
    /// Your user name on the server.
    #[arg(long)]
    user: String,
    /// The server certificate's fingerprint, as `vaultfs serve` printed it.
    #[arg(long, conflicts_with = "ca_file")]
    fingerprint: Option<String>,
    /// Verify the server with the CAs in this PEM file instead of pinning.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Pin whatever certificate the server presents now, without asking.
    #[arg(long, conflicts_with_all = ["fingerprint", "ca_file"])]
    trust_on_first_use: bool,
    /// The enrollment code from your admin: first login, sets your passphrase.
    #[arg(long)]
    enroll: Option<String>,
    /// Read the passphrase from this file instead of asking.
    #[arg(long, env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
    /// Restore your wallet, and all your vaults, with your recovery key
    /// (after your admin reset your account); it is asked for.
    #[arg(long)]
    recovery_key: bool,
    /// Read the recovery key from this file (implies --recovery-key).
    #[arg(long)]
    recovery_key_file: Option<PathBuf>,
    /// Begin with an empty wallet when yours does not open with this
    /// passphrase (after a reset, without a recovery key): the vaults only you
    /// held keys for stay unreadable to you.
    #[arg(long, conflicts_with_all = ["recovery_key", "recovery_key_file"])]
    start_over: bool,
    /// With --start-over: even if the wallet has a recovery key (which is
    /// lost too).
    #[arg(long, requires = "start_over")]
    discard_recoverable_wallet: bool,
    /// The server identity your login is bound to, if not the one this login
    /// derives (after the server's certificate was replaced: the `identity`
    /// in login.toml of a machine that logged in before).
    #[arg(long)]
    identity: Option<String>,
}

/// `vaultfs vault ...`.
#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Create a vault.
    Create {
        /// The vault's name (encrypted before it leaves this machine).
        name: String,
        /// Have the server refuse files that are not end-to-end encrypted.
        #[arg(long)]
        e2e_required: bool,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
    /// Give the files of vaults made by an older vaultfs a manifest (their
    /// authenticated mode, length and generation), then mark each vault so
    /// that a file without one is refused from then on.
    Migrate {
        /// Only this vault (by name); all vaults you can write to otherwise.
        name: Option<String>,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
    /// List your vaults.
    List {
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
    /// Share a vault with another user (or change their rights): its keys are
    /// sealed for their public key, which you confirm by its fingerprint.
    Share {
        /// The vault's name.
        vault: String,
        /// The user to share it with.
        user: String,
        /// What they may do: read, write (and delete), or admin (and share).
        #[arg(long, value_parser = ["read", "write", "admin"])]
        rights: String,
        /// Their key's fingerprint, as `vaultfs whoami` shows it to them: needed
        /// the first time (unless you confirm it when asked) and when their key
        /// changed.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
    /// Remove a member and rotate the vault's key: what is sealed from then on
    /// is sealed under a key they never had (any admin of the vault can).
    Unshare {
        /// The vault's name.
        vault: String,
        /// The member to remove.
        user: String,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
    /// Re-encrypt what is still under a vault's older keys (after `unshare`)
    /// under its newest one, a file at a time; run again to resume.
    Rekey {
        /// The vault's name.
        vault: String,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
    /// List the members of a vault, their rights and key fingerprints.
    Members {
        /// The vault's name.
        vault: String,
        /// Read the passphrase from this file instead of asking.
        #[arg(long, env = PASSPHRASE_FILE_ENV)]
        passphrase_file: Option<PathBuf>,
    },
}

/// `vaultfs passphrase`.
#[derive(Debug, Args)]
pub struct PassphraseArgs {
    /// Read the current passphrase from this file instead of asking.
    #[arg(long, env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
    /// Read the new passphrase from this file instead of asking (twice).
    #[arg(long)]
    new_passphrase_file: Option<PathBuf>,
}

/// `vaultfs recovery-key`.
#[derive(Debug, Args)]
pub struct RecoveryKeyArgs {
    /// Make a new one when there is one already (the old one then opens no
    /// wallet stored from then on).
    #[arg(long)]
    replace: bool,
    /// Read the passphrase from this file instead of asking.
    #[arg(long, env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
}

/// `vaultfs trust`.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The user whose key to confirm.
    user: String,
    /// Their key's fingerprint, as `vaultfs whoami` shows it to them (else
    /// it is shown, and you are asked).
    #[arg(long, conflicts_with = "remove")]
    fingerprint: Option<String>,
    /// Stop trusting their key on this machine instead (e.g. a member removed
    /// from a vault): what they share waits, and sharing with them asks again.
    #[arg(long)]
    remove: bool,
    /// Read the passphrase from this file instead of asking.
    #[arg(long, env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
}

/// `vaultfs whoami`.
#[derive(Debug, Args)]
pub struct WhoamiArgs {
    /// Read the passphrase from this file instead of asking.
    #[arg(long, env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
}

fn login_path() -> Result<PathBuf, String> {
    config_dir()
        .map(|d| d.join(LOGIN_FILE))
        .ok_or_else(|| "cannot find a config directory: set HOME or XDG_CONFIG_HOME".to_string())
}

/// Reads the recovery key from `file`, or asks on the terminal; a mistyped
/// one is refused here, before anything is sent.
fn read_recovery_key(file: Option<&Path>) -> Result<RecoveryKey, String> {
    let text = match file {
        Some(path) => Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading the recovery key from {}: {e}", path.display()))?,
        ),
        None if !std::io::stdin().is_terminal() => {
            return Err("no terminal to ask for the recovery key: pass --recovery-key-file".into())
        }
        None => Zeroizing::new(rpassword::prompt_password("Recovery key: ").map_err(|e| e.to_string())?),
    };
    text.trim().parse::<RecoveryKey>().map_err(|e| e.to_string())
}

fn ask_yes(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    matches!(answer.trim(), "y" | "Y" | "yes")
}

async fn decide_trust(args: &LoginArgs) -> Result<Option<Trust>, String> {
    let url = parse_server_url(&args.server).map_err(|e| e.to_string())?;
    if url.scheme() == "http" {
        eprintln!("warning: {} is plain HTTP (allowed on loopback only): nothing is pinned", args.server);
        return Ok(None);
    }
    if let Some(fp) = &args.fingerprint {
        return Ok(Some(Trust::Pinned(normalize_fingerprint(fp).map_err(|e| e.to_string())?)));
    }
    if let Some(ca) = &args.ca_file {
        return Ok(Some(Trust::CaFile(ca.clone())));
    }
    let seen = probe_fingerprint(&args.server).await.map_err(|e| e.to_string())?;
    println!("The server presents the certificate {seen}");
    println!("Compare it with the fingerprint `vaultfs serve` printed on the server.");
    if args.trust_on_first_use || ask_yes("Pin this certificate for all future connections?") {
        Ok(Some(Trust::Pinned(seen)))
    } else {
        Err("not pinned; run again with --fingerprint, --ca-file or --trust-on-first-use".into())
    }
}

/// `vaultfs login`.
pub async fn login(args: LoginArgs) -> CliResult {
    crate::cache::harden::harden_command();
    let trust = decide_trust(&args).await?;
    let path = login_path()?;
    // Logging in again to the same server as the same user keeps the identity
    // the login is bound to (the certificate may have been re-pinned).
    let remembered = Account::load(&path)
        .ok()
        .filter(|a| a.server == args.server && a.user == args.user)
        .and_then(|a| a.identity);
    let access = ServerAccess {
        url: args.server.clone(),
        trust: trust.clone(),
        identity: args.identity.clone().or(remembered),
    };
    let file = args.passphrase_file.as_deref();
    // The recovery key first: a mistyped one stops here, with the enrollment
    // code still unused.
    let recovery = match (&args.recovery_key_file, args.recovery_key) {
        (None, false) => None,
        (file, _) => Some(read_recovery_key(file.as_deref())?),
    };
    let (remote, pass) = match &args.enroll {
        Some(code) => {
            let pass = read_passphrase(file, "Choose your passphrase: ", true)?;
            (HttpRemote::enroll(&access, &args.user, code, pass.as_bytes(), LOGIN_KDF_FLOOR).await?, pass)
        }
        None => {
            let pass = read_passphrase(file, "Passphrase: ", false)?;
            (HttpRemote::login(&access, &args.user, pass.as_bytes(), LOGIN_KDF_FLOOR).await?, pass)
        }
    };
    let identity = access.identity()?;
    let opened = match &recovery {
        Some(key) => {
            let seen = |w: &crate::crypto::Wallet| seen_before(w, &identity, &args.user);
            Unlocked::recover(remote, key, pass.as_bytes(), KdfParams::DEFAULT, seen).await
        }
        None if args.start_over => {
            let discard = args.discard_recoverable_wallet;
            Unlocked::start_over(remote, pass.as_bytes(), KdfParams::DEFAULT, discard).await
        }
        None if args.enroll.is_some() => {
            Unlocked::open_or_create(remote, pass.as_bytes(), KdfParams::DEFAULT).await
        }
        None => Unlocked::open(remote, pass.as_bytes()).await,
    };
    let mut unlocked = opened.map_err(|e| match (&args.enroll, &e) {
        (Some(_), AccountError::WalletNotOpened { .. }) => e.to_string(),
        (Some(_), _) => format!(
            "{e} (you are enrolled with your new passphrase, and the code is used up: run `vaultfs login` \
             again without --enroll)"
        ),
        _ => e.to_string(),
    })?;
    if args.start_over {
        // This machine's record of the discarded wallet's revisions goes with it.
        if let Some(dir) = state_dir() {
            let _ = std::fs::remove_file(state_path(&dir, &identity, &args.user));
        }
    }
    // A wallet older than one this machine saw is refused here too.
    freshness_for(&mut unlocked, &identity, &args.user).await?;
    if recovery.is_some() {
        println!("your wallet is restored with your recovery key, sealed under your new passphrase");
        println!(
            "(it still opens with the same recovery key; if the key may have been seen, or your old passphrase \
             is known to someone, make a new one: `vaultfs recovery-key --replace`)"
        );
    } else if args.start_over {
        println!("you start over with an empty wallet: vaults only you held keys for stay unreadable to you");
    }
    let vaults = unlocked.vaults().await?.len();
    let account = Account {
        server: args.server.clone(),
        user: args.user.clone(),
        fingerprint: match &trust {
            Some(Trust::Pinned(fp)) => Some(fp.clone()),
            _ => None,
        },
        ca_file: match &trust {
            Some(Trust::CaFile(p)) => Some(p.clone()),
            _ => None,
        },
        identity: Some(access.identity()?),
    };
    account.save(&path)?;
    println!("logged in to {} as {}; {vaults} vault(s). Saved to {}", args.server, args.user, path.display());
    println!("the login is bound to the server identity {}", account.identity.as_deref().unwrap_or(""));
    if let Some(key) = unlocked.user_public() {
        println!(
            "your key's fingerprint (others confirm it to share vaults with you): {}",
            key.fingerprint()
        );
    }
    Ok(())
}

/// Whether this machine saw a newer wallet of `user` at `server` than `wallet`
/// (its freshness state, opened with the wallet's own state key): a restore
/// must not bring back an older wallet than one this machine used.
fn seen_before(wallet: &crate::crypto::Wallet, server: &str, user: &str) -> Result<(), String> {
    let Some(dir) = state_dir() else { return Ok(()) };
    let path = state_path(&dir, server, user);
    if !path.exists() {
        return Ok(());
    }
    let key = wallet.state_key().ok_or("the wallet holds no state key, but this machine has state for it")?;
    let fresh = Freshness::load(path, key.duplicate(), server, user).map_err(|e| e.to_string())?;
    fresh.check_wallet(wallet.revision()).map_err(|e| e.to_string())
}

/// What this machine remembers of the account at `server` (its identity):
/// loaded, checked against the wallet just opened (an older wallet than
/// remembered is refused), with the state key made first if the wallet has
/// none yet. A state file that exists while the wallet has no key, or that
/// does not open with it, stops the mount with what to do.
pub(crate) async fn freshness_for<R: crate::remote::Remote>(
    unlocked: &mut Unlocked<R>,
    server: &str,
    user: &str,
) -> Result<Arc<Freshness>, Box<dyn std::error::Error + Send + Sync>> {
    let dir = state_dir().ok_or("cannot find a state directory: set HOME or XDG_STATE_HOME")?;
    let path = state_path(&dir, server, user);
    if unlocked.wallet().state_key().is_none() {
        if path.exists() {
            return Err(FreshnessError::NoKey { path }.into());
        }
        unlocked.ensure_state_key().await?;
    }
    let key = unlocked.wallet().state_key().ok_or("the wallet holds no state key")?.duplicate();
    let freshness = Freshness::load(path, key, server, user)?;
    freshness.check_wallet(unlocked.wallet().revision())?;
    // Only a wallet that passed the check gets a key pair added (and is
    // stored again); the pins of other users' keys are this server's.
    unlocked.ensure_user_key().await?;
    freshness.check_wallet(unlocked.wallet().revision())?;
    freshness.save()?;
    if let Some(dir) = config_dir() {
        unlocked.set_pins(Pins::load(&dir.join(PINS_FILE), server)?);
    }
    let freshness = Arc::new(freshness);
    unlocked.set_key_memory(freshness.clone());
    Ok(freshness)
}

async fn unlock(
    passphrase_file: Option<&Path>,
) -> Result<(Unlocked<HttpRemote>, Arc<Freshness>), Box<dyn std::error::Error + Send + Sync>> {
    let path = login_path()?;
    let mut account = Account::load(&path)?;
    let pass = read_passphrase(passphrase_file, &format!("Passphrase for {}: ", account.user), false)?;
    let remote =
        HttpRemote::login(&account.access(), &account.user, pass.as_bytes(), LOGIN_KDF_FLOOR).await?;
    account.remember_identity(&path)?;
    let mut unlocked = Unlocked::open(remote, pass.as_bytes()).await?;
    // Never work on (and save back) a wallet older than one this machine saw.
    let freshness = freshness_for(&mut unlocked, &account.access().identity()?, &account.user).await?;
    Ok((unlocked, freshness))
}

/// After a command changed the wallet: this machine has seen its new revision.
fn note_wallet<R: crate::remote::Remote>(unlocked: &Unlocked<R>, freshness: &Freshness) -> CliResult {
    freshness.check_wallet(unlocked.wallet().revision())?;
    Ok(freshness.save()?)
}

/// `result`, once what this machine noted meanwhile (keys a listing showed
/// the vault using that this client lacks, say) is saved, also on failure.
fn saving<T>(result: Result<T, AccountError>, freshness: &Freshness) -> Result<T, AccountError> {
    if let Err(e) = freshness.save() {
        tracing::warn!(error = %e, "could not save the freshness state");
    }
    result
}

/// `vaultfs vault ...`.
pub async fn vault(cmd: VaultCommand) -> CliResult {
    crate::cache::harden::harden_command();
    match cmd {
        VaultCommand::Create { name, e2e_required, passphrase_file } => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!("invalid vault name {name:?}: it becomes a directory name").into());
            }
            let (mut unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let created = unlocked.create_vault(&name, e2e_required).await?;
            note_wallet(&unlocked, &freshness)?;
            println!("created vault {name} ({})", created.info.id);
        }
        VaultCommand::Migrate { name, passphrase_file } => {
            let (mut unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let mut found = false;
            for v in unlocked.vaults().await? {
                let label = v.name.clone().unwrap_or_else(|| v.info.id.to_string());
                if name.as_ref().is_some_and(|n| Some(n) != v.name.as_ref()) {
                    continue;
                }
                found = true;
                if v.info.rights < crate::protocol::Rights::Write {
                    println!("{label}: skipped (read rights only)");
                    continue;
                }
                let done = saving(unlocked.migrate_vault(v.info.id).await, &freshness)?;
                note_wallet(&unlocked, &freshness)?;
                println!(
                    "{label}: {} end-to-end and {} pass-through file(s) got a manifest, {} had one{}",
                    done.end_to_end,
                    done.pass_through,
                    done.had_one,
                    if done.flagged { "; files without one are refused from now on" } else { "" }
                );
                for why in &done.skipped {
                    println!("  left alone: {why}");
                }
            }
            if let (Some(n), false) = (&name, found) {
                return Err(format!("no vault named {n:?}").into());
            }
        }
        VaultCommand::Share { vault, user, rights, fingerprint, passphrase_file } => {
            let rights = match rights.as_str() {
                "read" => crate::protocol::Rights::Read,
                "write" => crate::protocol::Rights::Write,
                _ => crate::protocol::Rights::Admin,
            };
            let (unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let info = find_vault(&unlocked, &freshness, &vault).await?;
            if info.rights != crate::protocol::Rights::Admin {
                return Err(format!(
                    "you have {} rights in {vault}; sharing needs admin",
                    info.rights.as_str()
                )
                .into());
            }
            let key = confirm_key(&unlocked, &user, fingerprint.as_deref(), "nothing shared").await?;
            saving(unlocked.share_vault(&info, &user, rights, &key).await, &freshness)?;
            println!("shared {vault} with {user} ({} rights; key {})", rights.as_str(), key.fingerprint());
        }
        VaultCommand::Unshare { vault, user, passphrase_file } => {
            let (mut unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let info = find_vault(&unlocked, &freshness, &vault).await?;
            let done = saving(unlocked.unshare(&info, &user).await, &freshness)?;
            note_wallet(&unlocked, &freshness)?;
            println!(
                "removed {user} from {vault}; its key rotated (epoch {}): files and names sealed from now on are \
                 under a key {user} never had; {} remaining member(s) got it",
                done.epoch, done.reshared
            );
            for why in &done.not_reshared {
                println!("  not shared again (run `vaultfs vault share` for them): {why}");
            }
            let (older, all) = saving(unlocked.files_under_older_keys(info.id).await, &freshness)?;
            println!(
                "{older} of {all} file(s) are still under older keys: readable to {user} if they kept them \
                 (`vaultfs vault rekey {vault}` encrypts them again)"
            );
            println!(
                "If {user} should not be trusted any more: `vaultfs trust {user} --remove` on each member's \
                 machine (a server listing them as an admin could otherwise have their keys taken)"
            );
        }
        VaultCommand::Rekey { vault, passphrase_file } => {
            let (unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let info = find_vault(&unlocked, &freshness, &vault).await?;
            if info.rights < crate::protocol::Rights::Write {
                return Err(format!(
                    "you have {} rights in {vault}; rekeying needs write",
                    info.rights.as_str()
                )
                .into());
            }
            // What this machine saw: a replayed manifest is not sealed anew.
            let seen = |id| freshness.generation(id);
            let wrote = |id, generation| freshness.note(id, generation);
            let generations = crate::remote::rekey::Generations { seen: &seen, wrote: &wrote };
            let bar = super::progress::count("files", 0);
            let done = unlocked
                .rekey_vault_checked(info.id, &generations, |k, total| {
                    bar.set_length(total as u64);
                    bar.set_position(k as u64);
                })
                .await;
            bar.finish_and_clear();
            let done = saving(done, &freshness)?;
            println!(
                "{vault}: {} file(s) encrypted again, {} sealed afresh (manifest or name), {} already current, \
                 {} record(s) sealed afresh",
                done.reencrypted, done.resealed, done.current, done.records
            );
            for why in &done.skipped {
                println!("  left alone: {why}");
            }
            let (older, all) = saving(unlocked.files_under_older_keys(info.id).await, &freshness)?;
            println!(
                "files under older keys: {older} of {all}{}",
                if older > 0 { " (run again)" } else { "" }
            );
        }
        VaultCommand::Members { vault, passphrase_file } => {
            let (unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let info = find_vault(&unlocked, &freshness, &vault).await?;
            for m in unlocked.members(info.id).await? {
                let key = m.fingerprint.map_or_else(|| "no key published".to_string(), |f| f.to_string());
                let pin = match (m.user == unlocked.user(), m.pin) {
                    (true, _) => "you",
                    (false, Some(PinCheck::Pinned)) => "pinned here",
                    (false, Some(PinCheck::New)) => "not pinned here",
                    (false, Some(PinCheck::Changed { .. })) => "DIFFERS FROM THE KEY PINNED HERE",
                    (false, None) => "",
                };
                let share =
                    if m.has_share || m.user == unlocked.user() { "" } else { "  (no share: cannot read)" };
                println!("{}\t{}\t{key}\t{pin}{share}", m.user, m.rights.as_str());
            }
            let (older, all) = saving(unlocked.files_under_older_keys(info.id).await, &freshness)?;
            println!("files under older keys: {older} of {all}");
            if let Err(e) = unlocked.check_not_behind(info.id) {
                println!("WARNING: {e}");
            }
        }
        VaultCommand::List { passphrase_file } => {
            let (unlocked, freshness) = unlock(passphrase_file.as_deref()).await?;
            let vaults = unlocked.vaults().await?;
            // Keys from shares may have been stored in the wallet.
            note_wallet(&unlocked, &freshness)?;
            let pending = unlocked.pending_shares();
            for v in vaults {
                if pending.iter().any(|(id, _, _)| *id == v.info.id) {
                    continue; // waiting for its sender's key to be confirmed: below
                }
                let name = v.name.unwrap_or_else(|| "<name cannot be decrypted>".into());
                let flag = if v.info.e2e_required { "  e2e-required" } else { "" };
                let by = v.shared_by.map(|u| format!("  shared by {u}")).unwrap_or_default();
                println!("{name}\t{}\t{}{flag}{by}", v.info.rights.as_str(), v.info.id);
            }
            for (vault, user, offered) in pending {
                println!(
                    "(vault {vault}, shared by {user}: waits until you confirm their key; compare {offered} with \
                     what `vaultfs whoami` shows {user}, then `vaultfs trust {user} --fingerprint {offered}`)"
                );
            }
        }
    }
    Ok(())
}

/// The vault listed under `name`. The listing may store keys of shares in
/// the wallet: this machine notes the revision it saw.
async fn find_vault(
    unlocked: &Unlocked<HttpRemote>,
    freshness: &Freshness,
    name: &str,
) -> Result<crate::protocol::VaultInfo, Box<dyn std::error::Error + Send + Sync>> {
    let listed = unlocked.vaults().await?;
    note_wallet(unlocked, freshness)?;
    let mut found = listed.into_iter().filter(|v| v.name.as_deref() == Some(name));
    match (found.next(), found.next()) {
        (Some(v), None) => Ok(v.info),
        (Some(_), Some(_)) => Err(format!("two vaults are named {name:?}").into()),
        (None, _) => Err(format!("no vault named {name:?} (`vaultfs vault list` shows yours)").into()),
    }
}

/// `vaultfs whoami`: the user, the server and this user's key fingerprint.
pub async fn whoami(args: WhoamiArgs) -> CliResult {
    crate::cache::harden::harden_command();
    let (unlocked, _) = unlock(args.passphrase_file.as_deref()).await?;
    let account = Account::load(&login_path()?)?;
    let key = unlocked.user_public().ok_or("the wallet holds no key pair")?;
    println!("user:        {}", unlocked.user());
    println!("server:      {}", account.server);
    println!("fingerprint: {}", key.fingerprint());
    let recovery = if unlocked.wallet().has_recovery() {
        "made (it opens your wallet if you lose your passphrase)"
    } else {
        "none (`vaultfs recovery-key` makes one)"
    };
    println!("recovery key: {recovery}");
    println!("(others confirm this fingerprint when they share a vault with you)");
    Ok(())
}

/// `vaultfs recovery-key`: makes the paper key that opens the wallet when the
/// passphrase is lost, and shows it once.
pub async fn recovery_key(args: RecoveryKeyArgs) -> CliResult {
    crate::cache::harden::harden_command();
    let (mut unlocked, freshness) = unlock(args.passphrase_file.as_deref()).await?;
    if unlocked.wallet().has_recovery() && !args.replace {
        return Err("you have a recovery key already; --replace makes a new one (the old one then opens no \
                    wallet stored from then on)"
            .into());
    }
    let key = RecoveryKey::generate(&mut crate::crypto::OsRandom)?;
    // Shown (and, on a terminal, typed back) before the wallet is sealed for
    // it: a key nobody saw must never be the one that opens the wallet.
    let user = unlocked.user().to_string();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Your recovery key (shown once; write it down and keep it offline):\n\n    {key}\n\n\
         If you lose your passphrase, your admin runs `vaultfs admin user reset {user}`, and you run\n\
         `vaultfs login --server URL --user {user} --enroll CODE --recovery-key`: your wallet and all your\n\
         vaults come back, under a new passphrase. Whoever holds this key and your wallet (the server holds\n\
         it) can open your vaults: keep it as safe as what they hold."
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("cannot show the recovery key ({e}): nothing was changed"))?;
    drop(out);
    if std::io::stdin().is_terminal() {
        let typed = read_recovery_key(None).map_err(|e| format!("{e}: nothing was changed"))?;
        if typed.public() != key.public() {
            return Err(
                "that is not the key shown: nothing was changed; run `vaultfs recovery-key` again".into()
            );
        }
    }
    unlocked.set_recovery_key(&key).await?;
    note_wallet(&unlocked, &freshness)?;
    println!("the wallet opens with this recovery key from now on");
    Ok(())
}

/// Checks the key the server offers for `user` against this machine's pin,
/// and pins it once the user confirmed it (`confirmed`, or a yes at the
/// prompt): a key is used only once confirmed. `refused` starts the error
/// when it is not.
async fn confirm_key(
    unlocked: &Unlocked<HttpRemote>,
    user: &str,
    confirmed: Option<&str>,
    refused: &str,
) -> Result<crate::crypto::UserPublic, Box<dyn std::error::Error + Send + Sync>> {
    let confirmed = confirmed
        .map(|f| f.parse::<Fingerprint>().map_err(|e| format!("--fingerprint {f:?}: {e}")))
        .transpose()?;
    let (key, check) = unlocked.colleague_key(user).await?;
    let offered = key.fingerprint();
    let user = user.to_string();
    match (check, confirmed) {
        (_, Some(c)) if c != offered => {
            return Err(AccountError::NotConfirmed { user, offered, confirmed: c }.into());
        }
        (PinCheck::Pinned, _) => {}
        (PinCheck::New | PinCheck::Changed { .. }, Some(_)) => unlocked.pin(&user, offered)?,
        (PinCheck::Changed { pinned }, None) => {
            return Err(AccountError::KeyChanged { user, pinned, offered }.into());
        }
        (PinCheck::New, None) => {
            println!("The server offers this key for {user}: {offered}");
            println!(
                "Compare it with what `vaultfs whoami` shows {user} (read it aloud, or another channel)."
            );
            if !ask_yes(&format!("Is this {user}'s key?")) {
                return Err(
                    format!("{refused}; run again with --fingerprint (the one {user} reads you)").into()
                );
            }
            unlocked.pin(&user, offered)?;
        }
    }
    Ok(key)
}

/// `vaultfs trust`: confirms another user's key.
pub async fn trust(args: TrustArgs) -> CliResult {
    crate::cache::harden::harden_command();
    let (unlocked, freshness) = unlock(args.passphrase_file.as_deref()).await?;
    if args.remove {
        if !unlocked.unpin(&args.user)? {
            return Err(
                format!("{}'s key is not confirmed on this machine: nothing to remove", args.user).into()
            );
        }
        println!(
            "{}'s key is no longer confirmed on this machine: vaults they share wait, and sharing with them \
             asks again",
            args.user
        );
        return Ok(());
    }
    let key = confirm_key(&unlocked, &args.user, args.fingerprint.as_deref(), "not trusted").await?;
    println!("{}'s key {} is confirmed on this machine", args.user, key.fingerprint());
    let opened: Vec<String> = unlocked
        .vaults()
        .await?
        .into_iter()
        .filter(|v| v.shared_by.as_deref() == Some(args.user.as_str()))
        .map(|v| v.name.unwrap_or_else(|| v.info.id.to_string()))
        .collect();
    // Shares opened now had their keys stored in the wallet.
    note_wallet(&unlocked, &freshness)?;
    if !opened.is_empty() {
        println!("shared by {}: {}", args.user, opened.join(", "));
    }
    Ok(())
}

/// `vaultfs passphrase`: changes the passphrase (login and wallet together).
pub async fn passphrase(args: PassphraseArgs) -> CliResult {
    crate::cache::harden::harden_command();
    let (mut unlocked, freshness) = unlock(args.passphrase_file.as_deref()).await?;
    let new = read_passphrase(args.new_passphrase_file.as_deref(), "New passphrase: ", true)?;
    let account = Account::load(&login_path()?)?;
    unlocked.change_passphrase(&account.access(), new.as_bytes(), LOGIN_KDF_FLOOR).await?;
    note_wallet(&unlocked, &freshness)?;
    println!("passphrase changed: the old one opens neither the login nor the wallet from now on.");
    if unlocked.wallet().has_recovery() {
        println!(
            "Your recovery key still opens the wallet. If the old passphrase may be known to someone, also make \
             a new recovery key (`vaultfs recovery-key --replace`): with the old passphrase and an old copy of \
             the wallet, they could help a hostile server pass off a wallet of their making at a recovery."
        );
    }
    println!(
        "Your other sessions ended: mounts on other machines must be mounted again, with the new passphrase."
    );
    Ok(())
}
