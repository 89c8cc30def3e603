//! `vaultfs completions SHELL` and `vaultfs man DIR`: shell completions and
//! manual pages generated from the command-line definition itself
//! (clap_complete, clap_mangen), so they never drift from it. The Debian
//! package runs both at build time (dist/build-deb).

use std::path::PathBuf;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, CliResult};

/// `vaultfs completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    shell: Shell,
}

/// `vaultfs man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The directory to write the pages into (made if missing): vaultfs.1
    /// and one page per command (vaultfs-mount.1, ...).
    dir: PathBuf,
}

/// Prints the completion script for a shell on standard output.
pub fn completions(args: CompletionsArgs) -> CliResult {
    clap_complete::generate(args.shell, &mut Cli::command(), "vaultfs", &mut std::io::stdout());
    Ok(())
}

/// Writes the manual pages into a directory.
pub fn man(args: ManArgs) -> CliResult {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    clap_mangen::generate_to(Cli::command(), &args.dir)
        .map_err(|e| format!("{}: {e}", args.dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_a_page_and_completions_name_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        man(ManArgs { dir: dir.path().join("man1") }).unwrap();
        for page in
            ["vaultfs.1", "vaultfs-mount.1", "vaultfs-serve.1", "vaultfs-admin.1", "vaultfs-completions.1"]
        {
            let text = std::fs::read_to_string(dir.path().join("man1").join(page)).unwrap_or_default();
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}: {text:.80}");
        }
        let mount = std::fs::read_to_string(dir.path().join("man1/vaultfs-mount.1")).unwrap();
        assert!(mount.contains("passphrase\\-command"), "the mount page names its options");
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vaultfs", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("mount") && text.contains("passphrase-command"), "{shell}");
        }
    }
}
