//! Where a command gets the user's passphrase, in this order:
//!
//! 1. a file (`--passphrase-file`, or `VAULTFS_PASSPHRASE_FILE`);
//! 2. a program (`--passphrase-command` where a command takes it, or
//!    `VAULTFS_PASSPHRASE_COMMAND`), run with `sh -c`: what it prints, without
//!    the trailing line end, is the passphrase, as restic's
//!    `--password-command` and borg's `BORG_PASSCOMMAND` do. Its standard
//!    error and input stay the caller's, so a program that asks (pinentry, a
//!    password manager) can;
//! 3. a systemd credential named `vaultfs-passphrase`
//!    (`LoadCredential=`/`SetCredentialEncrypted=` in a unit), read from
//!    `$CREDENTIALS_DIRECTORY`;
//! 4. the terminal.
//!
//! The passphrase never goes on a command line or into the environment, and
//! is held in wiped memory. Errors name the source, never the bytes.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

/// Environment variable naming a file that holds the passphrase (for scripts).
pub const PASSPHRASE_FILE_ENV: &str = "VAULTFS_PASSPHRASE_FILE";

/// Environment variable holding a command that prints the passphrase.
pub const PASSPHRASE_COMMAND_ENV: &str = "VAULTFS_PASSPHRASE_COMMAND";

/// The systemd credential a unit passes the passphrase as.
pub const CREDENTIAL: &str = "vaultfs-passphrase";

/// More than any passphrase: a program that prints without end is cut off
/// here rather than filling memory.
const MOST: u64 = 64 << 10;

/// Reads the passphrase from `file`, `command` (or the environment's), a
/// systemd credential, or the terminal (asking twice if `confirm`).
pub(crate) fn read_passphrase(
    file: Option<&Path>,
    prompt: &str,
    confirm: bool,
) -> Result<Zeroizing<String>, String> {
    read_passphrase_from(file, None, prompt, confirm)
}

/// [`read_passphrase`] with a command given on the command line, which wins
/// over the environment's.
pub(crate) fn read_passphrase_from(
    file: Option<&Path>,
    command: Option<&str>,
    prompt: &str,
    confirm: bool,
) -> Result<Zeroizing<String>, String> {
    if let Some(path) = file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading passphrase from {}: {e}", path.display()))?,
        );
        return trimmed(&text).ok_or_else(|| format!("{}: the passphrase file is empty", path.display()));
    }
    // A new passphrase (confirm) comes from a file or the terminal only: the
    // command and the credential give the current one.
    let from_env = std::env::var(PASSPHRASE_COMMAND_ENV).ok().filter(|c| !c.trim().is_empty() && !confirm);
    if let Some(command) = command.filter(|_| !confirm).map(str::to_string).or(from_env) {
        return run_command(&command);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty() && !confirm) {
        let path = Path::new(&dir).join(CREDENTIAL);
        if path.exists() {
            let text = Zeroizing::new(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading the systemd credential {CREDENTIAL}: {e}"))?,
            );
            return trimmed(&text).ok_or_else(|| format!("the systemd credential {CREDENTIAL} is empty"));
        }
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "no terminal to ask for the passphrase: pass --passphrase-file, set {PASSPHRASE_FILE_ENV} or \
             {PASSPHRASE_COMMAND_ENV}, or give a systemd credential {CREDENTIAL}"
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

/// The text without its trailing line end; `None` if nothing is left.
fn trimmed(text: &str) -> Option<Zeroizing<String>> {
    let pass = text.trim_end_matches(['\n', '\r']);
    (!pass.is_empty()).then(|| Zeroizing::new(pass.to_string()))
}

/// Runs `command` with `sh -c` and takes what it prints. Errors do not repeat
/// the command, which may hold a secret of its own.
fn run_command(command: &str) -> Result<Zeroizing<String>, String> {
    let failed = |why: String| format!("the passphrase command {why}");
    let mut child = Command::new("/bin/sh")
        .args(["-c", command])
        .stdout(Stdio::piped())
        // What a mount helper or the daemon passes on must not reach it.
        .env_remove(PASSPHRASE_COMMAND_ENV)
        .spawn()
        .map_err(|e| failed(format!("could not start: {e}")))?;
    // Room for all of it from the start: a vector that grew would leave
    // unwiped copies of the passphrase behind in freed memory.
    let mut out = Zeroizing::new(Vec::with_capacity(MOST as usize + 1));
    let read = child.stdout.take().map(|s| s.take(MOST).read_to_end(&mut out));
    let status = child.wait().map_err(|e| failed(format!("could not be waited for: {e}")))?;
    if !status.success() {
        return Err(failed(format!("failed ({status})")));
    }
    if let Some(Err(e)) = read {
        return Err(failed(format!("could not be read: {e}")));
    }
    let text = Zeroizing::new(
        String::from_utf8(out.to_vec()).map_err(|_| failed("printed bytes that are not UTF-8".into()))?,
    );
    trimmed(&text).ok_or_else(|| failed("printed no passphrase".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_gives_what_it_prints_and_its_failures_are_named() {
        let got = read_passphrase_from(None, Some("printf 'secret one\\r\\n'"), "", false).unwrap();
        assert_eq!(&*got, "secret one");
        let e = read_passphrase_from(None, Some("exit 3"), "", false).unwrap_err();
        assert!(e.contains("command failed") && e.contains('3') && !e.contains("exit 3"), "{e}");
        let e = read_passphrase_from(None, Some("true"), "", false).unwrap_err();
        assert!(e.contains("printed no passphrase"), "{e}");
        let e = read_passphrase_from(None, Some("echo"), "", false).unwrap_err();
        assert!(e.contains("printed no passphrase"), "{e}");
        // A file wins over a command.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pass");
        std::fs::write(&file, "from the file\n").unwrap();
        assert_eq!(
            &*read_passphrase_from(Some(&file), Some("echo other"), "", false).unwrap(),
            "from the file"
        );
        // A new passphrase (confirm) never comes from a command.
        let e = read_passphrase_from(None, Some("echo current"), "", true).unwrap_err();
        assert!(!e.contains("current") && e.contains("no terminal"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_passphrase_from(Some(&file), None, "", false).unwrap_err().contains("is empty"));
    }
}
