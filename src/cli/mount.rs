//! `vaultfs mount` and `vaultfs unmount`.
//!
//! Without `--foreground`, `vaultfs mount` starts itself again in the foreground
//! as a detached child, hands it the passphrase through a pipe (never through the
//! environment or a file), waits until the child reports the mount ready (or
//! failed), and returns. The child flushes unsaved files and unmounts on SIGINT
//! or SIGTERM, or when the mount point is unmounted from outside.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use clap::Args;
use zeroize::Zeroizing;

use super::policy::PolicyPaths;
use super::secret::{read_passphrase_from, PASSPHRASE_COMMAND_ENV};
use super::user::{freshness_for, LOGIN_KDF_FLOOR, PASSPHRASE_FILE_ENV};
use super::CliResult;
use crate::fs::fuse::FuseAdapter;
use crate::fs::{FsOptions, VaultFs};
use crate::policy::{MountPolicy, Policy};
use crate::remote::account::{config_dir, Account, Unlocked, LOGIN_FILE};
use crate::remote::http::HttpRemote;

/// Line the foreground mount prints once the filesystem is mounted.
const READY: &str = "vaultfs mount: ready at ";

/// `vaultfs mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Where to mount (an empty directory).
    mountpoint: PathBuf,
    /// Stay in the foreground (logs to stderr; Ctrl-C unmounts).
    #[arg(long, short)]
    foreground: bool,
    /// Read the passphrase from this file instead of asking.
    #[arg(long, env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
    /// Run this command (with `sh -c`) and take what it prints as the
    /// passphrase, e.g. `pass show vaultfs`. Without this, a file, or a
    /// systemd credential `vaultfs-passphrase`, the passphrase is asked for
    /// (a passphrase file, if given too, wins).
    #[arg(long, env = PASSPHRASE_COMMAND_ENV)]
    passphrase_command: Option<String>,
    /// Plaintext cache budget in MiB (memory only; never written to disk); the
    /// policy's cache_budget, if lower, wins [default: the policy's, or 512].
    #[arg(long)]
    cache_mib: Option<usize>,
    /// Where the mount policies are.
    #[command(flatten)]
    policy: PolicyPaths,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Keep flock and fcntl locks on this machine only, as before vaultfs
    /// held them on the server: faster for a database only this machine
    /// writes, but other mounts of the vault do not see them.
    #[arg(long)]
    local_locks: bool,
    /// Read every file through the daemon, never from a backing file the
    /// kernel reads itself (passthrough, used where the kernel and the
    /// user allow it: Linux 6.9 or later, root).
    #[arg(long, env = "VAULTFS_NO_PASSTHROUGH", value_parser = clap::builder::FalseyValueParser::new())]
    no_passthrough: bool,
    /// Files on the mount cannot be executed (what an fstab line with
    /// `user` means unless `exec` follows it).
    #[arg(long)]
    noexec: bool,
    /// Show decrypted names in log lines (off by default: logs name objects by
    /// id, since a log may be kept on disk). For debugging only.
    #[arg(long, env = crate::fs::lognames::LOG_NAMES_ENV, value_parser = clap::builder::FalseyValueParser::new())]
    log_names: bool,
    /// Internal: read the passphrase from standard input (set by the parent process).
    #[arg(long, hide = true)]
    passphrase_stdin: bool,
}

/// `vaultfs unmount`.
#[derive(Debug, Args)]
pub struct UnmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
}

fn passphrase(args: &MountArgs, user: &str) -> Result<Zeroizing<String>, String> {
    if args.passphrase_stdin {
        // Room for all of it from the start: a string that grew would leave
        // unwiped copies behind in freed memory of this long-lived process.
        let mut text = Zeroizing::new(String::with_capacity(64 << 10));
        std::io::Read::take(std::io::stdin(), 64 << 10)
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        return Ok(Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    read_passphrase_from(
        args.passphrase_file.as_deref(),
        args.passphrase_command.as_deref(),
        &format!("Passphrase for {user}: "),
        false,
    )
}

fn check_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!("{}: not a directory", path.display()));
    }
    std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `vaultfs mount`.
pub fn mount(args: MountArgs, log_format: super::LogFormat) -> CliResult {
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    // Before anything else: never mount on a policy that could not be read.
    let policy = args.policy.load()?;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    policy.mount().check_mountpoint(&mountpoint, home.as_deref())?;
    let login = config_dir().map(|d| d.join(LOGIN_FILE)).ok_or("cannot find a config directory: set HOME")?;
    let account = Account::load(&login)?;
    // Before the passphrase is read: no core dump, no other process of the
    // user reading this one's memory, memory locked where allowed.
    let budget = cache_budget(&args, &policy);
    if args.foreground {
        crate::cache::harden::harden_process(budget as u64);
    } else {
        crate::cache::harden::harden_command();
    }
    if args.foreground && args.log_names {
        crate::fs::lognames::show_names();
    }
    let pass = passphrase(&args, &account.user)?;
    if !args.foreground {
        return spawn_background(&args, &mountpoint, &pass, log_format);
    }
    run_foreground(&args, &mountpoint, (&account, &login), &pass, policy, budget)
}

/// The cache budget: the policy's, or the command line's if lower.
fn cache_budget(args: &MountArgs, policy: &Policy) -> usize {
    let asked = args.cache_mib.map_or(u64::MAX, |m| (m as u64).saturating_mul(1 << 20));
    policy.mount().cache_budget.min(asked) as usize
}

/// Starts `vaultfs mount --foreground` detached and waits for it to be ready.
fn spawn_background(
    args: &MountArgs,
    mountpoint: &Path,
    pass: &str,
    log_format: super::LogFormat,
) -> CliResult {
    let exe = std::env::current_exe()?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(exe)
            .arg("mount")
            .arg(mountpoint)
            .args(["--foreground", "--passphrase-stdin"])
            .args(["--threads", &args.threads.to_string()])
            .args(args.log_names.then_some("--log-names"))
            .args((log_format == super::LogFormat::Json).then_some("--log-format=json"))
            .args(args.local_locks.then_some("--local-locks"))
            .args(args.no_passthrough.then_some("--no-passthrough"))
            .args(args.noexec.then_some("--noexec"))
            .args(args.cache_mib.map(|c| format!("--cache-mib={c}")))
            .arg("--policy")
            .arg(&args.policy.system)
            .args(
                args.policy.user.iter().flat_map(|u| [std::ffi::OsStr::new("--user-config"), u.as_os_str()]),
            )
            .env_remove(PASSPHRASE_FILE_ENV)
            .env_remove(PASSPHRASE_COMMAND_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C in this terminal does not reach it.
            .process_group(0)
            .spawn()?
    };
    {
        let mut stdin = child.stdin.take().ok_or("no pipe to the mount process")?;
        stdin.write_all(pass.as_bytes())?;
    }
    let stdout = child.stdout.take().ok_or("no pipe from the mount process")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line.starts_with(READY) {
            println!(
                "mounted at {} (process {}); unmount with: vaultfs unmount {}",
                mountpoint.display(),
                child.id(),
                mountpoint.display()
            );
            return Ok(());
        }
    }
    let status = child.wait()?;
    Err(format!("the mount process exited ({status}) before the mount was ready").into())
}

fn run_foreground(
    args: &MountArgs,
    mountpoint: &Path,
    (account, login): (&Account, &Path),
    pass: &str,
    policy: Policy,
    budget: usize,
) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let access = account.access();
    let rules = policy.mount();
    let fs = rt.block_on(async {
        let remote = HttpRemote::login(&access, &account.user, pass.as_bytes(), LOGIN_KDF_FLOOR).await?;
        if let Err(e) = account.clone().remember_identity(login) {
            tracing::warn!(error = %e, "could not note the server identity the login is bound to");
        }
        let mut unlocked = Unlocked::open(remote, pass.as_bytes()).await?;
        let freshness = freshness_for(&mut unlocked, &access.identity()?, &account.user).await?;
        let options = FsOptions {
            cache_budget: budget,
            policy,
            freshness: Some(freshness),
            local_locks: args.local_locks,
            passthrough: !args.no_passthrough,
            ..FsOptions::default()
        };
        let fs = VaultFs::new(unlocked, options).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Arc::new(fs))
    })?;
    rt.spawn(Arc::clone(fs.freshness()).run_saver());
    let session = Session { threads: args.threads, noexec: args.noexec };
    let background = start_session(&fs, rt.handle(), mountpoint, &account.server, session, &rules)?;
    let _status = super::status::serve_status(rt.handle(), &fs, mountpoint, &account.server)
        .map_err(|e| tracing::warn!(error = %e, "vaultfs status will not see this mount"))
        .ok();
    println!("{READY}{}", mountpoint.display());
    let _ = std::io::stdout().flush();
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    crate::systemd::ready(&format!("mounted at {}", mountpoint.display()));
    // systemd's watchdog (a unit with WatchdogSec=) is pinged while the
    // runtime that answers the kernel's requests runs tasks.
    rt.spawn(crate::systemd::watchdog(|| async { true }));
    if args.passphrase_stdin {
        // Started in the background by `vaultfs mount`: let go of the caller's
        // terminal and pipes, or whoever waits for them to close waits forever.
        detach_stdio();
    }
    serve_until_stopped(&rt, &fs, background, mountpoint)
}

/// How the FUSE session is set up, besides the policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    /// FUSE worker threads.
    pub threads: usize,
    /// Mounted noexec.
    pub noexec: bool,
}

/// Mounts `fs` at `mountpoint` with FUSE worker threads.
pub(crate) fn start_session<R: crate::remote::Remote>(
    fs: &Arc<VaultFs<R>>,
    rt: &tokio::runtime::Handle,
    mountpoint: &Path,
    source: &str,
    session: Session,
    rules: &MountPolicy,
) -> Result<fuser::BackgroundSession, String> {
    // SAFETY: getuid/getgid/geteuid only read the process's ids; access
    // reads the NUL-terminated path, a constant.
    #[allow(unsafe_code)]
    let (uid, gid, root, fuse_open) = unsafe {
        (
            libc::getuid(),
            libc::getgid(),
            libc::geteuid() == 0,
            libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) == 0,
        )
    };
    if !root && !fuse_open {
        // fuser opens it as this user before fusermount3 mounts (a bare
        // "Permission denied" otherwise).
        return Err("/dev/fuse cannot be opened by this user: a mount by a user other than root needs it \
                    readable and writable by all (mode 0666, as distributions make it); ask an admin, or \
                    mount as root"
            .into());
    }
    let (uid, gid) = (rules.uid.unwrap_or(uid), rules.gid.unwrap_or(gid));
    let adapter = FuseAdapter::new(Arc::clone(fs), rt.clone(), uid, gid, rules.umask);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("vaultfs:{source}")),
        fuser::MountOption::Subtype("vaultfs".into()),
        fuser::MountOption::NoAtime,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if session.noexec {
        config.mount_options.push(fuser::MountOption::NoExec);
    }
    if rules.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    if rules.default_permissions {
        config.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    config.n_threads = Some(session.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(adapter, mountpoint, &config)
        .map_err(|e| format!("mounting {}: {e}", mountpoint.display()))?;
    // What the kernel must forget (other clients' changes, a reduced image)
    // goes to it from a thread of its own, from the first request on.
    fs.set_invalidator(crate::fs::fuse::notifier_thread(session.notifier()));
    let background = session.spawn().map_err(|e| format!("starting the FUSE session: {e}"))?;
    raise_readahead(mountpoint);
    // The server's changes, followed while mounted.
    rt.spawn(fs.follow());
    rt.spawn(fs.keep_locks());
    Ok(background)
}

/// The kernel's read-ahead for the mount, in KiB: as large as the largest
/// request the daemon takes (`fs::fuse::MAX_WRITE`).
const READ_AHEAD_KIB: u32 = crate::fs::fuse::MAX_WRITE / 1024;

/// Raises the kernel's read-ahead on the new mount from the 128 KiB a FUSE
/// mount starts with (which the daemon cannot raise at INIT) to
/// [`READ_AHEAD_KIB`]: a file read front to back then reaches the daemon as
/// 1 MiB requests instead of 128 KiB ones, and a 30 MB cold read took about
/// 10% less time (115 ms against 129 ms, means of ten). The setting lives in
/// sysfs, so only root can change it; for anyone else the mount keeps the
/// default and says so at debug level. Found through /proc/self/mountinfo,
/// not stat(2), which would ask this very daemon.
fn raise_readahead(mountpoint: &Path) {
    let target = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    // Fields: id, parent, major:minor, root, mount point, ... (proc(5)).
    let device = info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4).copied() == target.to_str()).then(|| fields.get(2).map(|d| d.to_string())).flatten()
    });
    let Some(device) = device else { return };
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    let current: Option<u32> = std::fs::read_to_string(&knob).ok().and_then(|v| v.trim().parse().ok());
    if current.is_some_and(|kib| kib >= READ_AHEAD_KIB) {
        return;
    }
    match std::fs::write(&knob, READ_AHEAD_KIB.to_string()) {
        Ok(()) => tracing::debug!(device, kib = READ_AHEAD_KIB, "raised the kernel's read-ahead"),
        Err(e) => tracing::debug!(device, error = %e, "kept the kernel's default read-ahead"),
    }
}

/// Waits for SIGINT/SIGTERM (or an unmount from outside), saves every unsaved
/// file, and unmounts: lazily if files are still open.
pub(crate) fn serve_until_stopped<R: crate::remote::Remote>(
    rt: &tokio::runtime::Runtime,
    fs: &Arc<VaultFs<R>>,
    background: fuser::BackgroundSession,
    mountpoint: &Path,
) -> CliResult {
    // Until a signal, or until someone unmounts the mount point from outside.
    let session_ended = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let ended = async {
            while !background.guard.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let outcome = tokio::select! {
            _ = int.recv() => false,
            _ = term.recv() => false,
            _ = ended => true,
        };
        Ok::<_, std::io::Error>(outcome)
    })?;
    crate::systemd::stopping("saving files and unmounting");
    let failed = rt.block_on(fs.flush_all());
    if failed > 0 {
        tracing::error!(failed, "some files or new directories could not be saved before unmounting");
    }
    if let Err(e) = fs.freshness().save() {
        tracing::error!(error = %e, "could not save which versions this machine saw");
    }
    if session_ended {
        join_session(background)?;
    } else {
        match unmount_path(mountpoint, false) {
            Ok(()) => {
                join_session(background)?;
                tracing::info!("unmounted");
            }
            Err(e) => {
                // Files are still open (a shell sitting in the mount, say). Everything
                // is saved, so detach the mount and leave; those handles get errors.
                tracing::warn!(error = %e, "mount busy; detaching it (open files lose access)");
                unmount_path(mountpoint, true)
                    .map_err(|e| format!("unmounting {}: {e}", mountpoint.display()))?;
                if failed > 0 {
                    return Err(format!("{failed} file(s) or new directories could not be saved").into());
                }
                return Ok(());
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} file(s) or new directories could not be saved").into());
    }
    Ok(())
}

/// Waits for the FUSE session's thread to end, without letting fuser unmount
/// the mount point once more afterwards. By then the mount is gone (we
/// unmounted it, or someone did from outside), and fuser's own unmount on drop
/// goes by path after a check that did not notice: it unmounted whatever had
/// been mounted there since, so a `vaultfs mount` started right after the
/// previous one stopped lost its mount about 70 ms later.
fn join_session(background: fuser::BackgroundSession) -> std::io::Result<()> {
    let background = std::mem::ManuallyDrop::new(background);
    // SAFETY: the handle is read out of a value that is never dropped or used
    // again, so it is owned exactly once. What stays behind (the device's file
    // descriptor) is released when the process exits, right after this.
    #[allow(unsafe_code)]
    let guard = unsafe { std::ptr::read(&background.guard) };
    guard.join().map_err(|_| std::io::Error::other("the FUSE session thread panicked"))?
}

/// Points stdin, stdout and stderr at /dev/null.
fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") else { return };
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&null);
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors with a valid open fd.
        #[allow(unsafe_code)]
        unsafe {
            libc::dup2(fd, target);
        }
    }
}

/// Unmounts `path` (lazily: detached even while files are open): umount2(2) as
/// root, else `fusermount3 -u` (`-z` for lazy), as unprivileged FUSE requires.
fn unmount_path(path: &Path, lazy: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 reads the NUL-terminated path we own for the call's duration.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::umount2(c_path.as_ptr(), flags) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let mut cmd = Command::new("fusermount3");
    cmd.arg(if lazy { "-uz" } else { "-u" }).arg(path);
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(std::io::Error::other(format!("fusermount3 exited with {s}"))),
        Err(e) => Err(e),
    }
}

/// `vaultfs unmount`: the same as `fusermount3 -u`, falling back to umount(8).
pub fn unmount(args: UnmountArgs) -> CliResult {
    let path = &args.mountpoint;
    for (cmd, cmd_args) in [("fusermount3", &["-u"][..]), ("fusermount", &["-u"][..]), ("umount", &[][..])] {
        match Command::new(cmd).args(cmd_args).arg(path).status() {
            Ok(s) if s.success() => {
                println!("unmounted {}", path.display());
                return Ok(());
            }
            Ok(_) | Err(_) => continue,
        }
    }
    Err(format!("could not unmount {} (is it mounted?)", path.display()).into())
}
