//! A real `vaultfs mount` over a real `vaultfs serve`, for mount tests.
//!
//! Everything lives in a temporary directory: server data, the user's config
//! (XDG_CONFIG_HOME), and the mount point. Dropping the handle stops the mount
//! process (SIGTERM, so it flushes and unmounts), forces an unmount if it is still
//! mounted, and then stops the server, also when the test panicked.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server::{vaultfs_bin, TestServer};

/// How a [`TestMount`] is set up; `..Default::default()` for the rest.
#[derive(Default)]
pub struct MountSetup<'a> {
    /// The system policy (none if empty).
    pub policy: &'a str,
    /// Vaults created next to "Family".
    pub vaults: &'a [&'a str],
    /// Where the server keeps its data (a fresh directory if `None`).
    pub data: Option<&'a Path>,
    /// Options of `vaultfs admin user add` (limits).
    pub user: &'a [&'a str],
    /// The daemon's `VAULTFS_LOG` (default: `VAULTFS_TEST_LOG`, else "info").
    pub log: Option<&'a str>,
    /// More arguments of `vaultfs mount`.
    pub mount_args: &'a [&'a str],
    /// More lines of the server's config/server.toml (top-level keys).
    pub server_toml: &'a str,
    /// A server already running, to use instead of starting one.
    pub server: Option<TestServer>,
}

pub struct TestMount {
    pub mountpoint: PathBuf,
    pub home: PathBuf,
    pub pass: PathBuf,
    /// The system policy this mount reads (absent unless a test writes one).
    pub policy: PathBuf,
    child: Option<Child>,
    log_level: String,
    mount_args: Vec<String>,
    /// The daemon's stderr, collected in memory (a log *file* would be a regular
    /// file open for writing in the daemon, which the canary test forbids).
    stderr_log: std::sync::Arc<std::sync::Mutex<String>>,
    pub server: TestServer,
    _dir: tempfile::TempDir,
}

fn is_mounted(path: &Path) -> bool {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap_or(""))))
        .unwrap_or(false)
}

/// Whether this machine can run mount tests at all.
pub fn fuse_available() -> bool {
    Path::new("/dev/fuse").exists()
}

impl TestMount {
    /// A server with user "alice" (vault "Family"), mounted.
    pub fn start() -> Self {
        Self::start_with("", &[])
    }

    /// Like [`TestMount::start`], with `policy` as the system policy and the
    /// vaults `more` next to "Family".
    pub fn start_with(policy: &str, more: &[&str]) -> Self {
        Self::start_full(policy, more, None, &[])
    }

    /// Like [`TestMount::start`], with the server's data in `data` (say, a
    /// small tmpfs the caller mounted, to fill it up), and `user` as options of
    /// `vaultfs admin user add` (limits).
    pub fn start_on(data: &Path, user: &[&str]) -> Self {
        Self::start_full("", &[], Some(data), user)
    }

    fn start_full(policy: &str, vaults: &[&str], data: Option<&Path>, user: &[&str]) -> Self {
        Self::start_setup(MountSetup { policy, vaults, data, user, ..Default::default() })
    }

    /// A server with user "alice" and vault "Family", set up as `setup` says, mounted.
    pub fn start_setup(setup: MountSetup<'_>) -> Self {
        let MountSetup { policy, vaults: more, data, user, log, mount_args, server_toml, server } = setup;
        assert!(fuse_available(), "/dev/fuse is missing: mount tests need FUSE (CI installs fuse3)");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("server.toml");
        let toml = format!("{server_toml}\n[login_kdf]\nm_cost_kib = 19456\nt_cost = 2\np_cost = 1\n");
        std::fs::write(&config, toml).unwrap();
        let data = data.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("data"));
        let server = server.unwrap_or_else(|| TestServer::start_with_config(&data, &config));
        let home = dir.path().join("home");
        let pass = dir.path().join("pass");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(&pass, "mount test passphrase").unwrap();
        let code = server.add_user("alice", user);
        let run = |args: &[&str]| {
            let out = Command::new(vaultfs_bin())
                .args(args)
                .env("XDG_CONFIG_HOME", &home)
                .env("VAULTFS_PASSPHRASE_FILE", &pass)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let fp = server.fingerprint.clone().unwrap();
        run(&["login", "--server", &server.url, "--user", "alice", "--fingerprint", &fp, "--enroll", &code]);
        run(&["vault", "create", "Family"]);
        for v in more {
            run(&["vault", "create", v]);
        }
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let policy_path = dir.path().join("policy.toml");
        if !policy.is_empty() {
            std::fs::write(&policy_path, policy).unwrap();
        }
        let stderr_log = Default::default();
        let log_level = log
            .map(str::to_string)
            .unwrap_or_else(|| std::env::var("VAULTFS_TEST_LOG").unwrap_or_else(|_| "info".into()));
        let mut m = TestMount {
            mountpoint,
            home,
            pass,
            policy: policy_path,
            child: None,
            log_level,
            mount_args: mount_args.iter().map(|a| a.to_string()).collect(),
            stderr_log,
            server,
            _dir: dir,
        };
        m.mount();
        m
    }

    /// Arguments of `vaultfs mount` for the next [`TestMount::mount`].
    pub fn set_mount_args(&mut self, args: &[&str]) {
        self.mount_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// Starts the mount process and waits until it is ready.
    pub fn mount(&mut self) {
        let child = self.spawn_daemon(&self.mountpoint, &self.stderr_log);
        self.child = Some(child);
    }

    /// A second daemon of the same user on another mount point (its own
    /// cache, as on another machine), ready when this returns.
    pub fn second_mount(&self) -> ExtraMount {
        self.extra_mount("mnt2")
    }

    /// Like [`TestMount::second_mount`], on mount point `name` next to this one.
    pub fn extra_mount(&self, name: &str) -> ExtraMount {
        let mountpoint = self.mountpoint.with_file_name(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        let log = Default::default();
        let child = self.spawn_daemon(&mountpoint, &log);
        ExtraMount { mountpoint, child: Some(child), log }
    }

    /// A second daemon of the same user on mount point `name` that talks to
    /// the server at `url` instead (another instance, with the same
    /// certificate): a machine whose login is a copy of this one's but for
    /// the address, with a state of its own.
    pub fn mount_via(&self, name: &str, url: &str) -> ExtraMount {
        let home = self.mountpoint.with_file_name(format!("home-{name}"));
        copy_tree(&self.home.join("vaultfs"), &home.join("vaultfs"));
        let login = home.join("vaultfs").join("login.toml");
        let text = std::fs::read_to_string(&login).unwrap();
        assert!(text.contains(&self.server.url), "login.toml names the server:\n{text}");
        std::fs::write(&login, text.replace(&self.server.url, url)).unwrap();
        let mountpoint = self.mountpoint.with_file_name(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        let log = Default::default();
        let child = spawn_daemon(
            &home,
            &self.pass,
            &self.policy,
            &self.mount_args,
            &self.log_level,
            &mountpoint,
            &log,
        );
        ExtraMount { mountpoint, child: Some(child), log }
    }

    /// Another user of the same server, enrolled and logged in from a home
    /// of their own (as on their own machine).
    pub fn other_user(&self, name: &str) -> OtherUser {
        let home = self.mountpoint.with_file_name(format!("home-{name}"));
        let pass = self.mountpoint.with_file_name(format!("pass-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(&pass, format!("passphrase of {name}")).unwrap();
        let code = self.server.add_user(name, &[]);
        let user = OtherUser { name: name.to_string(), home, pass, policy: self.policy.clone() };
        let fp = self.server.fingerprint.clone().unwrap();
        user.ok(&[
            "login",
            "--server",
            &self.server.url,
            "--user",
            name,
            "--fingerprint",
            &fp,
            "--enroll",
            &code,
        ]);
        user
    }

    /// Runs `vaultfs ARGS` as this mount's user; returns the output.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        run_as(&self.home, &self.pass, args)
    }

    /// Runs `vaultfs ARGS` as this mount's user; panics unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        ok_as(&self.home, &self.pass, args)
    }

    /// Starts `vaultfs mount` on `mountpoint`, collecting its stderr into `log`,
    /// and waits until it says it is ready.
    fn spawn_daemon(&self, mountpoint: &Path, log: &std::sync::Arc<std::sync::Mutex<String>>) -> Child {
        spawn_daemon(&self.home, &self.pass, &self.policy, &self.mount_args, &self.log_level, mountpoint, log)
    }

    /// Reaps a mount process that was killed from outside.
    pub fn forget_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        self.stderr_log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What [`TestMount::log`] returns, readable without borrowing the mount.
    pub fn log_reader(&self) -> impl Fn() -> String + use<> {
        let log = std::sync::Arc::clone(&self.stderr_log);
        move || log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Pid of the mount daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Stops the daemon with SIGTERM (it flushes and unmounts) and waits.
    pub fn unmount(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.take()?;
        stop_daemon(Some(child), &self.mountpoint)
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mountpoint)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.unmount();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// Starts `vaultfs mount` on `mountpoint` as the user whose config is in
/// `home`, collecting its stderr into `log`, and waits until it says it is ready.
fn spawn_daemon(
    home: &Path,
    pass: &Path,
    policy: &Path,
    mount_args: &[String],
    log_level: &str,
    mountpoint: &Path,
    log: &std::sync::Arc<std::sync::Mutex<String>>,
) -> Child {
    let mut child = Command::new(vaultfs_bin())
        .arg("mount")
        .arg(mountpoint)
        .arg("--foreground")
        .env("XDG_CONFIG_HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .env("VAULTFS_PASSPHRASE_FILE", pass)
        .env("VAULTFS_POLICY", policy)
        .args(mount_args)
        .env("VAULTFS_LOG", log_level)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vaultfs mount");
    let stderr = child.stderr.take().unwrap();
    let sink = std::sync::Arc::clone(log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.push_str(&line);
            s.push('\n');
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) if line.starts_with("vaultfs mount: ready") => child,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            stop_daemon(None, mountpoint);
            panic!("mount did not become ready: {other:?}\n{}", log.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }
}

fn run_as(home: &Path, pass: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vaultfs_bin())
        .args(args)
        .env("XDG_CONFIG_HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .env("VAULTFS_PASSPHRASE_FILE", pass)
        .output()
        .unwrap()
}

fn ok_as(home: &Path, pass: &Path, args: &[&str]) -> String {
    let out = run_as(home, pass, args);
    assert!(
        out.status.success(),
        "vaultfs {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Another user of a [`TestMount`]'s server (see [`TestMount::other_user`]).
pub struct OtherUser {
    pub name: String,
    pub home: PathBuf,
    pub pass: PathBuf,
    policy: PathBuf,
}

impl OtherUser {
    /// Runs `vaultfs ARGS` as this user; returns the output.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        run_as(&self.home, &self.pass, args)
    }

    /// Runs `vaultfs ARGS` as this user; panics unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        ok_as(&self.home, &self.pass, args)
    }

    /// This user's key fingerprint, as `vaultfs whoami` shows it.
    pub fn fingerprint(&self) -> String {
        let out = self.ok(&["whoami"]);
        let line = out.lines().find(|l| l.starts_with("fingerprint:")).expect("whoami shows a fingerprint");
        line.trim_start_matches("fingerprint:").trim().to_string()
    }

    /// Mounts this user's vaults on a mount point of their own, ready when
    /// this returns. Drop it before the [`TestMount`] whose server it uses.
    pub fn mount(&self) -> ExtraMount {
        let mountpoint = self.home.with_file_name(format!("mnt-{}", self.name));
        std::fs::create_dir_all(&mountpoint).unwrap();
        let log = Default::default();
        let level = std::env::var("VAULTFS_TEST_LOG").unwrap_or_else(|_| "info".into());
        let child = spawn_daemon(&self.home, &self.pass, &self.policy, &[], &level, &mountpoint, &log);
        ExtraMount { mountpoint, child: Some(child), log }
    }
}

/// Stops a daemon with SIGTERM (it flushes and unmounts), waits up to 30 s,
/// then kills it; lazily unmounts whatever is still mounted.
fn stop_daemon(child: Option<Child>, mountpoint: &Path) -> Option<std::process::ExitStatus> {
    let status = child.and_then(|mut child| {
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    if is_mounted(mountpoint) {
        let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
    }
    status
}

/// Another mount of the same user (see [`TestMount::second_mount`]); stopped
/// and unmounted when dropped. Drop it before the [`TestMount`] whose server it uses.
pub struct ExtraMount {
    pub mountpoint: PathBuf,
    child: Option<Child>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ExtraMount {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Pid of the mount daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for ExtraMount {
    fn drop(&mut self) {
        stop_daemon(self.child.take(), &self.mountpoint);
    }
}

/// Copies the directory `from` (files and directories) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}
