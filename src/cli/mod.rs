//! Command-line interface: argument parsing and dispatch to the subsystems.

mod admin;
mod demo;
mod docs;
mod helper;
mod logring;
mod mount;
mod policy;
mod progress;
mod secret;
mod status;
mod user;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Mount end-to-end encrypted vaults from a vault server as an ordinary drive.
///
/// Files are decrypted on open into memory only, and encrypted
/// (XChaCha20-Poly1305) and uploaded on close; the server never sees plaintext,
/// keys or names.
#[derive(Debug, Parser)]
#[command(name = "vaultfs", version, propagate_version = true)]
pub struct Cli {
    /// How log lines are written to standard error: `text` for people, or
    /// `json`, one object per line (time, level, target, message and
    /// fields), for log collectors. Which lines: `VAULTFS_LOG` (say `debug`).
    #[arg(long, global = true, env = "VAULTFS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run vaultfs end to end on this machine with one command.
    ///
    /// Starts a vault server on loopback, creates a demo user and vault, mounts
    /// it (at MOUNTPOINT, or a new temporary directory) and says what to try.
    /// Ctrl-C saves, unmounts, stops the server and removes what it created.
    Demo(demo::DemoArgs),
    /// Run the vault server.
    Serve(ServeArgs),
    /// Administer a server: users, their limits, vaults (run on the server machine).
    Admin(admin::AdminArgs),
    /// Log in to a server and remember it (URL, user, pinned certificate).
    Login(user::LoginArgs),
    /// Create, list and share your vaults.
    #[command(subcommand)]
    Vault(user::VaultCommand),
    /// Show who you are logged in as, and your key's fingerprint (what others
    /// confirm when they share a vault with you).
    Whoami(user::WhoamiArgs),
    /// Confirm another user's key, after comparing its fingerprint with what
    /// `vaultfs whoami` shows them: vaults they share with you open from then
    /// on (until then they wait), and sharing with them asks no more.
    Trust(user::TrustArgs),
    /// Change your passphrase: the login and the wallet change together, and
    /// the old passphrase opens nothing from then on.
    Passphrase(user::PassphraseArgs),
    /// Make a recovery key: a paper key that restores your wallet and all
    /// your vaults after your admin resets your account.
    RecoveryKey(user::RecoveryKeyArgs),
    /// Mount your vaults as a directory tree.
    Mount(mount::MountArgs),
    /// Unmount a vaultfs mount point.
    Unmount(mount::UnmountArgs),
    /// Show running mounts: cache use and uploads in progress.
    Status(status::StatusArgs),
    /// Check mount policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Print the shell completion script for bash, zsh or fish.
    ///
    /// bash: `vaultfs completions bash > /etc/bash_completion.d/vaultfs`;
    /// zsh: into a directory on `$fpath` as `_vaultfs`; fish:
    /// `~/.config/fish/completions/vaultfs.fish`. The Debian package
    /// installs all three.
    Completions(docs::CompletionsArgs),
    /// Write the manual pages (vaultfs.1 and one per command) into a directory.
    Man(docs::ManArgs),
}

/// `vaultfs serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (see config/server.toml); defaults apply without one.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides the file), e.g. 127.0.0.1:8443; port 0 picks a free port.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory (overrides the file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Serve plain HTTP (only allowed on a loopback address).
    #[arg(long)]
    pub plain_http: bool,
}

type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VAULTFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(logring::Sink);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// The log format asked for in the environment, for a mount helper call
/// (which has no `--log-format`).
fn log_format_from_env() -> LogFormat {
    match std::env::var("VAULTFS_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// Parses `std::env::args` and runs the command.
pub fn main() -> ExitCode {
    tune_allocator();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(call) = helper::helper_call(&argv) {
        init_logging(log_format_from_env());
        return finish(call.map_err(Into::into).and_then(helper::run));
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result: CliResult = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Serve(args) => serve(args),
        Command::Admin(args) => admin::run(args),
        Command::Login(args) => runtime().map_err(Into::into).and_then(|rt| rt.block_on(user::login(args))),
        Command::Vault(cmd) => runtime().map_err(Into::into).and_then(|rt| rt.block_on(user::vault(cmd))),
        Command::Passphrase(args) => {
            runtime().map_err(Into::into).and_then(|rt| rt.block_on(user::passphrase(args)))
        }
        Command::RecoveryKey(args) => {
            runtime().map_err(Into::into).and_then(|rt| rt.block_on(user::recovery_key(args)))
        }
        Command::Trust(args) => runtime().map_err(Into::into).and_then(|rt| rt.block_on(user::trust(args))),
        Command::Whoami(args) => runtime().map_err(Into::into).and_then(|rt| rt.block_on(user::whoami(args))),
        Command::Mount(args) => mount::mount(args, cli.log_format),
        Command::Unmount(args) => mount::unmount(args),
        Command::Status(args) => status::run(args),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    };
    finish(result)
}

/// The exit code for `result`, with the error on stderr.
fn finish(result: CliResult) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vaultfs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Allocations of up to a few megabytes, and freed memory up to a bound, are
/// kept in the process for reuse instead of being mapped afresh and given
/// back each time. The server and the mount move network buffers of hundreds
/// of kilobytes and 1 MiB upload pieces through the allocator all the time;
/// with glibc's adaptive defaults they kept coming back as fresh pages, whose
/// page faults were about a fifth of the server's CPU time on a 30 MB upload
/// (perf). Measured after: the server's CPU for that upload fell from about
/// 72 to 63 ms (means of ten). The price is memory: up to 64 MiB
/// of freed heap may stay resident (part of the daemon's fixed overhead; a
/// larger bound, 256 MiB, added 20 MB to the peak of a 250 MB pass-through
/// read). Plaintext is not affected: it lives in buffers of its own, wiped
/// before release (`cache::SecretBuf`).
#[allow(unsafe_code)]
fn tune_allocator() {
    /// Allocations below this come from the heap, not from a fresh mapping.
    const MMAP_THRESHOLD: libc::c_int = 4 << 20;
    /// Free memory at the top of the heap kept before any is given back.
    const TRIM_THRESHOLD: libc::c_int = 64 << 20;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

fn serve(args: ServeArgs) -> CliResult {
    use std::io::Write;
    let mut config = match &args.config {
        Some(path) => crate::server::config::ServerConfig::load(path)?,
        None => crate::server::config::ServerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    config.plain_http |= args.plain_http;
    config.validate()?;
    let data_dir = config.data_dir.clone();
    runtime()?.block_on(crate::server::run(config, |started| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "vaultfs serve: listening on {}://{}", started.scheme, started.addr);
        if let Some(fp) = &started.fingerprint {
            let _ = writeln!(out, "vaultfs serve: certificate fingerprint {fp}");
        }
        let _ = writeln!(
            out,
            "vaultfs serve: data in {} (add a user: vaultfs admin --data-dir {} user add NAME)",
            data_dir.display(),
            data_dir.display()
        );
        let _ = out.flush();
    }))?;
    Ok(())
}

pub use crate::policy::parse_size;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_parse() {
        assert!(matches!(Cli::try_parse_from(["vaultfs", "demo"]).unwrap().command, Command::Demo(_)));
        assert!(matches!(
            Cli::try_parse_from(["vaultfs", "demo", "/mnt/x"]).unwrap().command,
            Command::Demo(_)
        ));
        let serve =
            Cli::try_parse_from(["vaultfs", "serve", "--listen", "127.0.0.1:0", "--plain-http"]).unwrap();
        assert!(matches!(serve.command, Command::Serve(ServeArgs { plain_http: true, .. })));
        assert!(Cli::try_parse_from(["vaultfs", "nonsense"]).is_err());
        assert!(Cli::try_parse_from(["vaultfs", "serve", "--listen", "nowhere"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_size("30MiB"), Ok(30 << 20));
        assert_eq!(parse_size("12"), Ok(12));
        assert_eq!(parse_size("2 GB"), Ok(2_000_000_000));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("99999999999999999999GB").is_err());
    }
}
