//! The mount helper: `vaultfs` run as `mount.vaultfs` or `mount.fuse.vaultfs`
//! (links to the binary), or by fuse3's `mount.fuse` as `vaultfs SOURCE
//! MOUNTPOINT -o OPTIONS`, which is how `mount -t fuse.vaultfs`, an fstab
//! line and a systemd mount unit start it.
//!
//! Data flow: the helper's arguments (`SOURCE MOUNTPOINT [-o opts] [-nsfv]`)
//! are turned into those of `vaultfs mount MOUNTPOINT ...` and parsed and
//! run as that command, so both take the same options the same way. SOURCE
//! is a label of the admin's choosing (the login names the server); each
//! `-o key=value` maps to the long option `--key value`. Options meant for
//! mount(8), fuse3 or systemd (`_netdev`, `noauto`, `user`, `nofail`,
//! `x-systemd.*`, ...) are accepted and left alone. An unknown option is an
//! error that names it, and nothing is mounted, unless `-s` (sloppy) asks
//! for unknown options to be ignored.
//!
//! mount(8) runs a root mount's helper with a bare environment (no `HOME`,
//! no `PATH`, no `XDG_*`), and a user mount's with the environment it was
//! given, whose `HOME` may be someone else's. So the helper finds the
//! user's login through `-o home=DIR`, else `HOME` if the user it runs as
//! owns it, else the home directory the password database gives that user
//! (root, or the user fuse3's `setuid=USER` or an fstab `user` mount runs
//! it as); a home every user may write to is refused. `vaultfs` must be on
//! the shell's default path (/usr/bin, where the package puts it) for
//! fuse3's mount.fuse to find it.

use std::ffi::OsString;
use std::path::Path;

use clap::Parser;

use super::{Cli, CliResult, Command};

/// Names the binary answers to as a mount helper.
const HELPER_NAMES: &[&str] = &["mount.vaultfs", "mount.fuse.vaultfs"];

/// Options that take a value, as `-o key=value`: the `vaultfs mount` option
/// each becomes.
const VALUED: &[(&str, &str)] = &[
    ("passphrase_file", "--passphrase-file"),
    ("passphrase_command", "--passphrase-command"),
    ("cache_mib", "--cache-mib"),
    ("threads", "--threads"),
    ("policy", "--policy"),
    ("user_config", "--user-config"),
];

/// The option naming the home directory whose login and state to use.
const HOME: &str = "home";

/// Options without a value that `vaultfs mount` takes.
const FLAGS: &[(&str, &str)] = &[
    ("foreground", "--foreground"),
    ("local_locks", "--local-locks"),
    ("no_passthrough", "--no-passthrough"),
];

/// Options for mount(8), fuse3's helper or systemd, which vaultfs accepts and
/// leaves to them (`x-*` and `comment=*` too). A FUSE mount is always
/// nodev and nosuid; vaultfs always mounts with noatime.
const LEFT_ALONE: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "atime",
    "noatime",
    "relatime",
    "nodiratime",
    "async",
    "sync",
];

/// If this process was started as a mount helper, the `vaultfs mount`
/// arguments it stands for (or why they are wrong); `None` for an ordinary
/// command line.
pub(super) fn helper_call(argv: &[OsString]) -> Option<Result<HelperCall, String>> {
    let name = argv.first().map(Path::new).and_then(Path::file_name)?.to_string_lossy().into_owned();
    let called_as_helper = HELPER_NAMES.contains(&name.as_str());
    // fuse3's mount.fuse runs the subtype's program as `vaultfs SOURCE
    // MOUNTPOINT -o OPTIONS` (mount(8) always passes options, `rw` at least):
    // a first word that is no command, an absolute directory, then `-o`. A
    // typo such as `vaultfs umount ~/dir` is none of that and stays an error.
    let from_mount_fuse = !called_as_helper
        && argv.len() >= 5
        && argv[1].to_str().is_some_and(|w| !w.starts_with('-') && !is_command(w))
        && Path::new(&argv[2]).is_absolute()
        && Path::new(&argv[2]).is_dir()
        && argv[3] == "-o";
    (called_as_helper || from_mount_fuse).then(|| translate(&argv[1..]))
}

fn is_command(word: &str) -> bool {
    use clap::CommandFactory;
    Cli::command().get_subcommands().any(|c| c.get_name() == word || c.get_all_aliases().any(|a| a == word))
        || word == "help"
}

/// What a helper call asks for: `vaultfs mount`'s arguments (none for a fake
/// mount, `-f`, which does nothing) and the home directory to use, if named.
#[derive(Debug, PartialEq)]
pub(super) struct HelperCall {
    args: Vec<OsString>,
    home: Option<String>,
}

/// `SOURCE MOUNTPOINT [-o opts] [-n] [-s] [-f] [-v]` as a [`HelperCall`].
fn translate(args: &[OsString]) -> Result<HelperCall, String> {
    let usage = "usage: mount.vaultfs SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]";
    let mut words = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut sloppy, mut fake) = (false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_str().ok_or_else(|| format!("an argument is not UTF-8; {usage}"))?;
        match text {
            "-o" => {
                let opts = it.next().ok_or_else(|| format!("-o needs a value; {usage}"))?;
                options.push(opts.to_str().ok_or("the options are not UTF-8")?.to_string());
            }
            "-s" => sloppy = true,
            "-f" => fake = true,
            "-n" | "-v" => {}
            _ if text.starts_with("-o") && text.len() > 2 => options.push(text[2..].to_string()),
            _ if text.starts_with('-') => return Err(format!("unknown flag {text}; {usage}")),
            _ => words.push(arg.clone()),
        }
    }
    let [_source, mountpoint] = <[OsString; 2]>::try_from(words).map_err(|_| usage.to_string())?;
    let mut out: Vec<OsString> = vec!["vaultfs".into(), "mount".into(), mountpoint];
    let mut home = None;
    // `user` in fstab implies noexec, which mount(8) passes on unless an
    // `exec` follows; the last of the two wins.
    let mut noexec = false;
    for option in options.iter().flat_map(|o| split_options(o)) {
        let option = option.as_str();
        let (key, value) = match option.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (option, None),
        };
        if option == "noexec" || option == "exec" {
            noexec = option == "noexec";
        } else if key == HOME {
            let dir = value.filter(|v| !v.is_empty()).ok_or("mount option home needs a value")?;
            if !Path::new(dir).is_absolute() {
                return Err(format!("mount option home: {dir} is not an absolute path"));
            }
            home = Some(dir.to_string());
        } else if let Some((_, long)) = VALUED.iter().find(|(k, _)| *k == key) {
            let value =
                value.filter(|v| !v.is_empty()).ok_or_else(|| format!("mount option {key} needs a value"))?;
            out.push(format!("{long}={value}").into());
        } else if let Some((_, long)) = FLAGS.iter().find(|(k, _)| *k == key) {
            if value.is_some() {
                return Err(format!("mount option {key} takes no value"));
            }
            out.push(long.into());
        } else if option.is_empty() || LEFT_ALONE.contains(&key) || key.starts_with("x-") || key == "comment"
        {
        } else if key == "ro" {
            return Err("read-only mounts are not supported (mount option ro)".into());
        } else if !sloppy {
            let known: Vec<&str> =
                VALUED.iter().map(|(k, _)| *k).chain(FLAGS.iter().map(|(k, _)| *k)).collect();
            return Err(format!("unknown mount option {key} (vaultfs knows {})", known.join(", ")));
        }
    }
    if noexec {
        out.push("--noexec".into());
    }
    Ok(HelperCall { args: if fake { Vec::new() } else { out }, home })
}

/// Splits `-o` options at commas outside double quotes, dropping the quotes
/// (as libmount does): `passphrase_command="printf %s a,b"` is one option.
fn split_options(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Refuses a home directory that a user other than the one this runs as
/// owns, when this runs as root: the daemon writes its login and state files
/// there, and such a user could point those at any file of root's with a
/// link. Run the mount as that user instead (fuse3's `setuid=USER` option,
/// or an fstab `user` mount).
fn check_home_owner(home: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid only reads the process's effective user id.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    let meta = std::fs::metadata(home).map_err(|e| format!("home directory {}: {e}", home.display()))?;
    if meta.mode() & 0o002 != 0 {
        return Err(format!(
            "home directory {} is writable by every user, who could replace the login in it: pass -o \
             home=DIR with a directory only its owner writes",
            home.display()
        ));
    }
    if euid == 0 && meta.uid() != 0 {
        return Err(format!(
            "home directory {} belongs to uid {}, and this mount runs as root: mount as that user \
             instead (setuid=USER, or an fstab `user` mount)",
            home.display(),
            meta.uid()
        ));
    }
    Ok(())
}

/// Whether `path` belongs to the user this process runs as.
fn owned_by_me(path: &Path) -> bool {
    // SAFETY: geteuid only reads the process's effective user id.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    std::fs::canonicalize(path)
        .and_then(std::fs::metadata)
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == euid)
}

/// Runs the helper call: `vaultfs mount` with the translated arguments, in
/// the home directory named or the user's own.
pub(super) fn run(call: HelperCall) -> CliResult {
    if call.args.is_empty() {
        return Ok(()); // -f: a fake mount
    }
    // The home named, else HOME if it is this user's (mount(8) hands a
    // user mount, fstab `user`, the environment it was given, whose HOME
    // may be another user's: seen, root's under runuser), else the one the
    // password database gives. Used resolved (a link could be pointed
    // elsewhere once checked), and never with XDG variables, which could
    // name another user's directories.
    let named: OsString = match call.home {
        Some(home) => home.into(),
        None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(home) if owned_by_me(Path::new(&home)) => home,
            _ => home_of_this_user().ok_or(
                "no HOME of this user's, and no home directory in the password database: pass -o home=DIR",
            )?,
        },
    };
    let home = std::fs::canonicalize(&named)
        .map_err(|e| format!("home directory {}: {e}", Path::new(&named).display()))?;
    check_home_owner(&home)?;
    // Still one thread: nothing reads the environment meanwhile.
    std::env::set_var("HOME", &home);
    std::env::remove_var("XDG_CONFIG_HOME");
    std::env::remove_var("XDG_STATE_HOME");
    let cli = Cli::try_parse_from(call.args).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Mount(args) => super::mount::mount(args, cli.log_format),
        _ => unreachable!("translated to a mount"),
    }
}

/// The home directory of the user this process runs as, from the password
/// database.
#[allow(unsafe_code)]
fn home_of_this_user() -> Option<OsString> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both ours and of the
    // sizes given, and sets `found` to `&pwd` or null.
    let rc = unsafe { libc::getpwuid_r(libc::getuid(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pwd.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir points at a NUL-terminated string inside `buf`.
    let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
    (!dir.to_bytes().is_empty()).then(|| std::ffi::OsStr::from_bytes(dir.to_bytes()).to_os_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(argv: &[&str]) -> Option<Result<Vec<String>, String>> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        helper_call(&argv).map(|r| r.map(|c| c.args.into_iter().map(|a| a.into_string().unwrap()).collect()))
    }

    #[test]
    fn options_become_mount_arguments() {
        let got = call(&[
            "/sbin/mount.vaultfs",
            "alice@vaults",
            "/mnt/v",
            "-o",
            "rw,_netdev,noauto,x-systemd.automount,passphrase_command=pass show v,cache_mib=64,local_locks",
            "-n",
        ]);
        assert_eq!(
            got,
            Some(Ok(vec![
                "vaultfs".into(),
                "mount".into(),
                "/mnt/v".into(),
                "--passphrase-command=pass show v".into(),
                "--cache-mib=64".into(),
                "--local-locks".into(),
            ]))
        );
        let parsed = Cli::try_parse_from(got.unwrap().unwrap()).unwrap();
        assert!(matches!(parsed.command, Command::Mount(_)));
        assert_eq!(call(&["mount.fuse.vaultfs", "x", "/m", "-f"]), Some(Ok(vec![])));
        let argv: Vec<OsString> =
            ["mount.vaultfs", "x", "/m", "-o", "home=/srv/h"].map(OsString::from).to_vec();
        assert_eq!(helper_call(&argv).unwrap().unwrap().home.as_deref(), Some("/srv/h"));
        assert!(home_of_this_user().is_some(), "the password database names this user's home");
        // An fstab `user` line: mount(8) passes noexec, and `exec` after it wins.
        let noexec = |o: &str| call(&["mount.vaultfs", "x", "/m", "-o", o]).unwrap().unwrap();
        assert_eq!(noexec("rw,noexec,nosuid,nodev").last().map(String::as_str), Some("--noexec"));
        assert!(!noexec("user,noexec,exec").contains(&"--noexec".to_string()));
    }

    #[test]
    fn bad_options_are_named_and_mount_nothing() {
        let e = call(&["mount.vaultfs", "x", "/m", "-o", "cache_mib=64,colour=blue"]).unwrap().unwrap_err();
        assert!(e.contains("unknown mount option colour"), "{e}");
        let sloppy = call(&["mount.vaultfs", "x", "/m", "-s", "-o", "colour=blue"]).unwrap().unwrap();
        assert_eq!(sloppy, ["vaultfs", "mount", "/m"]);
        assert!(call(&["mount.vaultfs", "x", "/m", "-o", "ro"]).unwrap().unwrap_err().contains("read-only"));
        assert!(call(&["mount.vaultfs", "x", "/m", "-o", "cache_mib"])
            .unwrap()
            .unwrap_err()
            .contains("needs a value"));
        assert!(call(&["mount.vaultfs", "x", "/m", "-o", "local_locks=1"])
            .unwrap()
            .unwrap_err()
            .contains("no value"));
        assert!(call(&["mount.vaultfs", "/m"]).unwrap().unwrap_err().contains("usage"));
        assert!(call(&["mount.vaultfs", "x", "/m", "--bogus"])
            .unwrap()
            .unwrap_err()
            .contains("unknown flag"));
    }

    #[test]
    fn ordinary_command_lines_are_not_helper_calls() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(call(&["vaultfs", "mount", d]), None);
        assert_eq!(call(&["vaultfs", "status", d]), None);
        assert_eq!(call(&["vaultfs", "--version"]), None);
        assert_eq!(call(&["vaultfs", "x", "/no/such/dir"]), None);
        // As fuse3's mount.fuse calls it: SOURCE, an absolute directory, -o.
        assert_eq!(call(&["vaultfs", "vaults", d, "-o", "cache_mib=8"]).unwrap().unwrap()[2], d);
        // Typos stay errors: no -o, or a relative directory.
        assert_eq!(call(&["vaultfs", "umount", d]), None);
        assert_eq!(call(&["vaultfs", "umount", ".", "-o", "rw"]), None);
        // A relative home, and a quoted value that keeps its commas.
        let e = call(&["mount.vaultfs", "x", "/m", "-o", "home=rel/dir"]).unwrap().unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let quoted =
            call(&["mount.vaultfs", "x", "/m", "-o", "passphrase_command=\"printf %s a,b\",local_locks"]);
        assert_eq!(
            quoted.unwrap().unwrap()[3..],
            ["--passphrase-command=printf %s a,b".to_string(), "--local-locks".to_string()]
        );
    }
}
