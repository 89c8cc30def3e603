//! `vaultfs login` and `vaultfs vault`: a user's commands.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::CliResult;
use crate::crypto::KdfParams;
use crate::fs::freshness::{state_dir, state_path, Freshness, FreshnessError};
use crate::remote::account::{config_dir, Account, Unlocked, LOGIN_FILE};
use crate::remote::http::{parse_server_url, probe_fingerprint, HttpRemote, ServerAccess};
use crate::remote::tls::{normalize_fingerprint, Trust};

/// The weakest Argon2id this client accepts from a server for the login key
/// (OWASP's minimum for Argon2id): a hostile server cannot make it cheaper.
pub const LOGIN_KDF_FLOOR: KdfParams = KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 };

/// Environment variable naming a file that holds the passphrase (for scripts).
pub const PASSPHRASE_FILE_ENV: &str = "VAULTFS_PASSPHRASE_FILE";

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
}

fn login_path() -> Result<PathBuf, String> {
    config_dir()
        .map(|d| d.join(LOGIN_FILE))
        .ok_or_else(|| "cannot find a config directory: set HOME or XDG_CONFIG_HOME".to_string())
}

/// Reads the passphrase from `file`, or asks on the terminal (twice if `confirm`).
pub(crate) fn read_passphrase(
    file: Option<&Path>,
    prompt: &str,
    confirm: bool,
) -> Result<Zeroizing<String>, String> {
    if let Some(path) = file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading passphrase from {}: {e}", path.display()))?,
        );
        let pass = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
        if pass.is_empty() {
            return Err(format!("{}: the passphrase file is empty", path.display()));
        }
        return Ok(pass);
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "no terminal to ask for the passphrase: pass --passphrase-file or set {PASSPHRASE_FILE_ENV}"
        ));
    }
    let first = Zeroizing::new(rpassword::prompt_password(prompt).map_err(|e| e.to_string())?);
    if first.is_empty() {
        return Err("empty passphrase".into());
    }
    if confirm {
        let second =
            Zeroizing::new(rpassword::prompt_password("Repeat the passphrase: ").map_err(|e| e.to_string())?);
        if *first != *second {
            return Err("the passphrases differ".into());
        }
    }
    Ok(first)
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
    let mut unlocked = match &args.enroll {
        Some(code) => {
            let pass = read_passphrase(file, "Choose your passphrase: ", true)?;
            let remote =
                HttpRemote::enroll(&access, &args.user, code, pass.as_bytes(), LOGIN_KDF_FLOOR).await?;
            Unlocked::create_wallet(remote, pass.as_bytes(), KdfParams::DEFAULT).await?
        }
        None => {
            let pass = read_passphrase(file, "Passphrase: ", false)?;
            let remote = HttpRemote::login(&access, &args.user, pass.as_bytes(), LOGIN_KDF_FLOOR).await?;
            Unlocked::open(remote, pass.as_bytes()).await?
        }
    };
    // A wallet older than one this machine saw is refused here too.
    freshness_for(&mut unlocked, &access.identity()?, &args.user).await?;
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
    Ok(())
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
    freshness.save()?;
    Ok(Arc::new(freshness))
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
                let done = unlocked.migrate_vault(v.info.id).await?;
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
        VaultCommand::List { passphrase_file } => {
            let (unlocked, _) = unlock(passphrase_file.as_deref()).await?;
            for v in unlocked.vaults().await? {
                let name = v.name.unwrap_or_else(|| "<name cannot be decrypted>".into());
                let flag = if v.info.e2e_required { "  e2e-required" } else { "" };
                println!("{name}\t{}\t{}{flag}", v.info.rights.as_str(), v.info.id);
            }
        }
    }
    Ok(())
}
