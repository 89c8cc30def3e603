//! `vaultfs admin`: users, limits and vaults, on the server machine.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{parse_size, CliResult};
use crate::protocol::{KdfWire, Limits};
use crate::server::config::{MetadataBackend, ServerConfig};
use crate::server::meta::MetaStore;
use crate::server::{admin, backup, META_FILE};

/// `vaultfs admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server's data directory (instead of the configuration's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The server's configuration file (for its data directory, blob store and default limits).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    #[command(flatten)]
    Database(DatabaseCommand),
    /// Copy the server's database and blobs into DIR (new or empty): a
    /// consistent snapshot, taken while the server runs.
    Backup {
        /// Where the backup goes.
        dir: PathBuf,
    },
    /// Restore the backup in DIR onto the server's data directory (new or
    /// empty, with an empty blob store), checking every byte.
    Restore {
        /// The backup.
        dir: PathBuf,
    },
}

/// The commands that change or list what the server's database holds.
#[derive(Debug, Subcommand)]
enum DatabaseCommand {
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// List every vault (by id; names are encrypted) with its members.
    Vaults,
}

#[derive(Debug, Args)]
struct LimitArgs {
    /// Largest upload, e.g. 300MB.
    #[arg(long, value_parser = parse_size)]
    upload_limit: Option<u64>,
    /// Largest end-to-end encrypted file, e.g. 30MB.
    #[arg(long, value_parser = parse_size)]
    e2e_limit: Option<u64>,
    /// Longest image edge in pixels before reduction.
    #[arg(long)]
    image_max_edge: Option<u32>,
}

impl LimitArgs {
    /// The limits given, the others from `base`. An end-to-end limit that was not
    /// given shrinks to a lowered upload limit (what "upload at most 1 MB" means).
    fn apply(&self, base: Limits) -> Limits {
        let upload_limit = self.upload_limit.unwrap_or(base.upload_limit);
        Limits {
            upload_limit,
            e2e_limit: self.e2e_limit.unwrap_or(base.e2e_limit.min(upload_limit)),
            image_max_edge: self.image_max_edge.unwrap_or(base.image_max_edge),
        }
    }
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user and print their one-time enrollment code.
    Add {
        /// Login name.
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List users and their limits.
    List,
    /// Remove a user.
    Remove {
        /// Login name.
        name: String,
    },
    /// Change a user's limits (options not given stay as they are).
    Limits {
        /// Login name.
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Issue a new enrollment code for a user who lost their passphrase (their
    /// recovery key, if they made one, then restores their vaults; says which).
    Reset {
        /// Login name.
        name: String,
    },
}

/// Runs an admin command.
pub fn run(args: AdminArgs) -> CliResult {
    let config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::default(),
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(|| config.data_dir.clone());
    if config.metadata.backend == MetadataBackend::Postgres
        && matches!(args.command, AdminCommand::Backup { .. } | AdminCommand::Restore { .. })
    {
        return Err("the metadata is in PostgreSQL: back it up with pg_dump (or the database's own backups) \
                    and the blobs with the bucket's versioning or replication, in that order; docs/SCALING.md \
                    says how"
            .into());
    }
    let command = match args.command {
        AdminCommand::Backup { dir } => return backup(ServerConfig { data_dir, ..config }, &dir),
        AdminCommand::Restore { dir } => return restore(ServerConfig { data_dir, ..config }, &dir),
        AdminCommand::Database(command) => command,
    };
    let postgres = config.metadata.backend == MetadataBackend::Postgres;
    if !postgres && !data_dir.join(crate::server::META_FILE).exists() {
        return Err(format!(
            "{}: no vaultfs server data here (start `vaultfs serve` once, or pass --data-dir)",
            data_dir.display()
        )
        .into());
    }
    let db = crate::server::open_metadata(&ServerConfig { data_dir, ..config.clone() })?;
    // One transaction for the whole command (run again if PostgreSQL
    // aborts it for a deadlock); what it says is printed once it committed.
    let (said, _) = db.run(|meta| database_command(meta, &command, &args.config, &config));
    print!("{}", said?);
    Ok(())
}

/// Runs `command` on the metadata store; returns what to print once it
/// committed (an enrollment code from a unit rolled back works nowhere).
fn database_command(
    meta: &mut dyn MetaStore,
    command: &DatabaseCommand,
    config_file: &Option<PathBuf>,
    config: &ServerConfig,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    use std::fmt::Write as _;
    let mut out = String::new();
    // With the server's config file, its values; without, what the server
    // recorded when it last started (so users match what the server announces).
    let recorded = admin::recorded_defaults(meta)?;
    let (defaults, kdf): (Limits, KdfWire) = match (config_file, recorded) {
        (None, Some(r)) => (r.limits, r.login_kdf),
        _ => (config.default_limits.into(), config.login_kdf.into()),
    };
    match command {
        DatabaseCommand::User(UserCommand::Add { name, limits }) => {
            let code = admin::add_user(meta, name, limits.apply(defaults), kdf)?;
            writeln!(out, "added user {name}")?;
            writeln!(out, "enrollment code (give it to {name}; it works once): {code}")?;
            writeln!(out, "they log in with: vaultfs login --server URL --user {name} --enroll {code}")?;
        }
        DatabaseCommand::User(UserCommand::List) => {
            writeln!(
                out,
                "{:<24} {:>14} {:>14} {:>10}  state",
                "user", "upload limit", "e2e limit", "image px"
            )?;
            for u in admin::users(meta)? {
                let state = if u.login_hash.is_some() { "active" } else { "awaiting enrollment" };
                writeln!(
                    out,
                    "{:<24} {:>14} {:>14} {:>10}  {state}",
                    u.name, u.limits.upload_limit, u.limits.e2e_limit, u.limits.image_max_edge
                )?;
            }
        }
        DatabaseCommand::User(UserCommand::Remove { name }) => {
            admin::remove_user(meta, name)?;
            writeln!(out, "removed user {name}")?;
        }
        DatabaseCommand::User(UserCommand::Limits { name, limits }) => {
            let current = admin::users(meta)?
                .into_iter()
                .find(|u| u.name == *name)
                .ok_or_else(|| format!("no user named {name}"))?;
            let new = limits.apply(current.limits);
            admin::set_limits(meta, name, new)?;
            writeln!(
                out,
                "{name}: upload limit {}, e2e limit {}, image edge {} px",
                new.upload_limit, new.e2e_limit, new.image_max_edge
            )?;
        }
        DatabaseCommand::User(UserCommand::Reset { name }) => {
            let (code, wallet) = admin::reset_user(meta, name)?;
            writeln!(out, "new enrollment code for {name}: {code}")?;
            let login = format!("vaultfs login --server URL --user {name} --enroll {code}");
            match wallet {
                admin::WalletAfterReset::Recoverable => writeln!(
                    out,
                    "{name} made a recovery key: `{login} --recovery-key` restores their wallet and all their \
                     vaults, under a new passphrase."
                )?,
                admin::WalletAfterReset::PassphraseOnly => writeln!(
                    out,
                    "{name} has no recovery key: with `{login} --start-over` they begin with an empty wallet; \
                     the vaults only they held keys for stay unreadable (a vault's other members can share \
                     it with them again). Their old wallet stays until then."
                )?,
                admin::WalletAfterReset::None => writeln!(out, "they log in with: {login}")?,
            }
        }
        DatabaseCommand::Vaults => {
            for (id, members) in admin::vaults(meta)? {
                let list: Vec<String> =
                    members.iter().map(|m| format!("{} ({})", m.user, m.rights.as_str())).collect();
                writeln!(out, "{id}  {}", list.join(", "))?;
            }
        }
    }
    Ok(out)
}

/// `vaultfs admin backup DIR`.
fn backup(config: ServerConfig, dir: &Path) -> CliResult {
    let bar = super::progress::bytes("backing up");
    let done = super::runtime()?.block_on(backup::backup(&config, dir, &bar));
    bar.finish_and_clear();
    let done = done?;
    println!(
        "backed up {} and {} file content(s), {}, into {}",
        META_FILE,
        done.blobs,
        super::status::human(done.bytes),
        dir.display()
    );
    if done.odd_lengths > 0 {
        println!(
            "WARNING: {} stored content(s) differ in length from what their files record: the store was \
             damaged before this backup (copied as they are; the warnings above name them)",
            done.odd_lengths
        );
    }
    Ok(())
}

/// `vaultfs admin restore DIR`.
fn restore(config: ServerConfig, dir: &Path) -> CliResult {
    let bar = super::progress::bytes("restoring");
    let done = super::runtime()?.block_on(backup::restore(&config, dir, &bar));
    bar.finish_and_clear();
    let done = done?;
    println!(
        "restored {} and {} file content(s), {}, into {}; every hash matched",
        META_FILE,
        done.blobs,
        super::status::human(done.bytes),
        config.data_dir.display()
    );
    println!("start the server on it: vaultfs serve (with the same configuration)");
    Ok(())
}
