//! `vaultfs policy check`: validates a policy file and prints the effective
//! policy for this user and machine (the system policy, or the file given, with
//! the user's config on top). The server's per-user limits bound the limits
//! further at mount time; they are not known without logging in.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::CliResult;
use crate::policy::{Policy, PolicyFile, SYSTEM_POLICY};
use crate::protocol::Limits;
use crate::remote::account::config_dir;

/// Environment variable overriding the system policy's path.
pub const POLICY_ENV: &str = "VAULTFS_POLICY";
/// The user's config file, in the config directory.
pub const USER_CONFIG: &str = "config.toml";

/// Where the policy files are (shared by `vaultfs mount` and `vaultfs policy`).
#[derive(Debug, Clone, Args)]
pub struct PolicyPaths {
    /// The system policy (must be owned by root and writable only by root).
    #[arg(long = "policy", env = POLICY_ENV, default_value = SYSTEM_POLICY)]
    pub system: PathBuf,
    /// The user's config [default: ~/.config/vaultfs/config.toml].
    #[arg(long = "user-config")]
    pub user: Option<PathBuf>,
}

impl PolicyPaths {
    /// The user's config path.
    pub fn user_path(&self) -> Option<PathBuf> {
        self.user.clone().or_else(|| config_dir().map(|d| d.join(USER_CONFIG)))
    }

    /// Reads both files; a mount must not start if this fails.
    pub fn load(&self) -> Result<Policy, crate::policy::PolicyError> {
        let admin = PolicyFile::load(&self.system, true)?;
        let user = match self.user_path() {
            Some(p) => PolicyFile::load(&p, false)?,
            None => PolicyFile::default(),
        };
        Ok(Policy { admin, user })
    }
}

/// `vaultfs policy`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file and print the effective policy.
    Check {
        /// The file to check in place of the system policy.
        file: Option<PathBuf>,
        /// The user's config [default: ~/.config/vaultfs/config.toml].
        #[arg(long = "user-config")]
        user: Option<PathBuf>,
    },
}

/// `vaultfs policy check`.
pub fn run(cmd: PolicyCommand) -> CliResult {
    let PolicyCommand::Check { file, user } = cmd;
    let system = file.clone().unwrap_or_else(|| {
        std::env::var_os(POLICY_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(SYSTEM_POLICY))
    });
    let paths = PolicyPaths { system: system.clone(), user };
    // A file named on the command line is being written: check its content
    // without the ownership rule, which applies when it is installed.
    let admin = PolicyFile::load(&system, file.is_none())?;
    let user_path = paths.user_path();
    let user = match &user_path {
        Some(p) => PolicyFile::load(p, false)?,
        None => PolicyFile::default(),
    };
    let policy = Policy { admin, user };
    let mut out = std::io::stdout().lock();
    writeln!(out, "# {} is valid.", system.display())?;
    if let Some(p) = &user_path {
        writeln!(out, "# user config: {}{}", p.display(), if p.exists() { "" } else { " (none)" })?;
    }
    writeln!(
        out,
        "# Effective policy. The server's limits for your user can only refuse more: a lower upload \
         limit, end-to-end files above its e2e limit refused (EFBIG), images reduced below max_edge \
         down to min_edge where reduction is on."
    )?;
    print_effective(&mut out, &policy)?;
    Ok(())
}

fn print_effective(out: &mut impl Write, policy: &Policy) -> std::io::Result<()> {
    // Without the server, bound only by the largest limits a server may set.
    let unbounded = Limits { upload_limit: u64::MAX, e2e_limit: u64::MAX, image_max_edge: u32::MAX };
    let m = policy.mount();
    writeln!(out, "\n[mount]")?;
    if m.allowed_mountpoints.is_empty() {
        writeln!(out, "allowed_mountpoints = anywhere")?;
    }
    for list in &m.allowed_mountpoints {
        let dirs: Vec<String> = list.iter().map(|d| format!("{:?}", d.display().to_string())).collect();
        writeln!(out, "allowed_mountpoints = [{}]", dirs.join(", "))?;
    }
    writeln!(out, "allow_other = {}", m.allow_other)?;
    writeln!(out, "default_permissions = {}", m.default_permissions)?;
    let who = |v: Option<u32>| v.map_or("the mounting user".to_string(), |v| v.to_string());
    writeln!(out, "uid = {}\ngid = {}", who(m.uid), who(m.gid))?;
    writeln!(out, "umask = \"{:03o}\"", m.umask)?;
    writeln!(out, "cache_budget = {}", m.cache_budget)?;
    let mut vaults = vec![(String::from("defaults"), String::new())];
    vaults.extend(policy.named_vaults().into_iter().map(|n| (format!("vaults.{:?}", n), n)));
    for (table, name) in vaults {
        let v = policy.vault(&name, &unbounded);
        let limit = |n: u64| if n == u64::MAX { "the server's".to_string() } else { n.to_string() };
        writeln!(out, "\n[{table}]")?;
        writeln!(out, "read_only = {}\nallow_delete = {}", v.read_only, v.allow_delete)?;
        let oversize = match v.oversize {
            crate::policy::Oversize::PassThrough => "pass-through",
            crate::policy::Oversize::Refuse => "refuse",
        };
        writeln!(out, "oversize = {oversize:?}")?;
        writeln!(out, "e2e_limit = {}\nupload_limit = {}", limit(v.e2e_limit), limit(v.upload_limit))?;
        let edge = v.images.max_edge.to_string();
        let formats: Vec<String> = v.images.formats.iter().map(|f| format!("{f:?}").to_lowercase()).collect();
        writeln!(
            out,
            "images = {{ reduce = {}, max_edge = {edge}, jpeg_quality = {}, formats = {:?} }}",
            v.images.reduce, v.images.jpeg_quality, formats
        )?;
    }
    Ok(())
}
