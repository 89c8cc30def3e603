//! Running vaultfs the way other tools run: `mount -t fuse.vaultfs` (an fstab
//! line) with its options and passphrase sources, and `umount`; systemd's
//! notify protocol and unit checks; JSON logs; `status --watch`; metrics;
//! backups taken while a client writes, and their restores. Needs root and
//! /dev/fuse, as the other mount tests.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::mount::{MountSetup, TestMount};
use support::server::{vaultfs_bin, S3Server};

/// Runs `mount -t fuse.vaultfs vaults MOUNTPOINT -o OPTIONS` as from an
/// fstab line: mount(8) calls fuse3's mount.fuse, which runs `vaultfs` from
/// the shell's default path, with a bare environment (no HOME, PATH or XDG
/// variables: the `home` option names the test user's), plus `env`.
fn fstab_mount(m: &TestMount, options: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "fuse.vaultfs", "vaults"])
        .arg(&m.mountpoint)
        .arg("-o")
        .arg(format!("home={},{options}", m.home.display()))
        .env_remove("VAULTFS_PASSPHRASE_FILE")
        .env_remove("VAULTFS_PASSPHRASE_COMMAND")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running mount")
}

/// `vaultfs` on the shell's default path, as the package installs it: a
/// link to the binary under test in /usr/local/bin, removed when dropped.
/// One test at a time holds it.
struct OnDefaultPath(PathBuf, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

static DEFAULT_PATH: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl OnDefaultPath {
    fn link() -> Self {
        Self::link_to(Path::new(&vaultfs_bin()))
    }

    fn link_to(bin: &Path) -> Self {
        let held = DEFAULT_PATH.lock().unwrap_or_else(|p| p.into_inner());
        let link = PathBuf::from("/usr/local/bin/vaultfs");
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if !meta.file_type().is_symlink() => {
                panic!("{} is an installed vaultfs, which this test would shadow: remove it", link.display())
            }
            Ok(_) => std::fs::remove_file(&link).unwrap(), // a link left by an earlier run
            Err(_) => {}
        }
        std::os::unix::fs::symlink(bin, &link).unwrap();
        OnDefaultPath(link, held)
    }
}

impl Drop for OnDefaultPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The daemons mounted on `mountpoint` (found by their command line).
fn daemons(mountpoint: &Path) -> Vec<u32> {
    let out =
        Command::new("pgrep").arg("-f").arg(format!("mount {}", mountpoint.display())).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Unmounts with umount(8), as an admin would, and waits for the daemon to
/// save and exit.
fn umount(mountpoint: &Path) {
    let out = Command::new("umount").arg(mountpoint).output().unwrap();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    let start = Instant::now();
    while !daemons(mountpoint).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the daemon did not exit after umount");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mounted(mountpoint: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == mountpoint.to_str())
}

/// Leaves nothing behind when the test fails half way: the mount goes, and
/// the daemon exits on its own once it sees that.
struct Unmounted(PathBuf);

impl Drop for Unmounted {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn an_fstab_mount_takes_its_options_and_passphrase_and_umount_saves_every_file() {
    let mut m = TestMount::start();
    m.unmount();
    let _guard = Unmounted(m.mountpoint.clone());
    let _linked = OnDefaultPath::link();
    // The test user's login is in HOME/vaultfs (XDG_CONFIG_HOME=HOME); with
    // only HOME, vaultfs looks in HOME/.config/vaultfs.
    std::os::unix::fs::symlink(&m.home, m.home.join(".config")).unwrap();
    let pass = m.pass.display().to_string();

    // Bad inputs: a clear error each, and nothing mounted.
    let bad = [
        ("colour=blue", "unknown mount option colour"),
        ("passphrase_command=exit 7", "failed"),
        ("passphrase_command=true", "printed no passphrase"),
        ("passphrase_command=echo wrong passphrase", ""),
        ("ro", "read-only"),
    ];
    for (options, says) in bad {
        let out = fstab_mount(&m, options, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "-o {options}: {err}");
        assert!(!mounted(&m.mountpoint), "-o {options} mounted");
        assert!(!err.contains("mount test passphrase"), "the passphrase in an error: {err}");
    }

    // The options of an fstab line, the passphrase from a command.
    let options =
        format!("rw,_netdev,noauto,nofail,x-systemd.automount,passphrase_command=cat {pass},cache_mib=64");
    let out = fstab_mount(&m, &options, &[]);
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(mounted(&m.mountpoint));
    let pids = daemons(&m.mountpoint);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("mount test passphrase"));
    let files: Vec<(String, Vec<u8>)> =
        (0..20).map(|i| (format!("Family/fstab/f{i}"), vec![i as u8; 1000 + i * 4099])).collect();
    std::fs::create_dir_all(m.path("Family/fstab")).unwrap();
    for (name, data) in &files {
        std::fs::write(m.path(name), data).unwrap();
    }
    umount(&m.mountpoint);
    assert!(!mounted(&m.mountpoint));

    // Again with the passphrase from a systemd credential: every file is there.
    let creds = m.home.join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(&m.pass, creds.join("vaultfs-passphrase")).unwrap();
    let out = fstab_mount(&m, "defaults", &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    for (name, data) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *data, "{name} differs after umount and mount");
    }
    umount(&m.mountpoint);
}

/// A datagram socket standing in for systemd's notify socket.
struct Notify {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Notify { socket, path, _dir: dir }
    }

    /// Waits up to `limit` for a message holding `line`; returns it.
    fn wait_for(&self, line: &str, limit: Duration) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < limit {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == line) {
                    return msg;
                }
                seen.push(msg);
            }
        }
        panic!("no {line} within {limit:?}; got {seen:?}");
    }
}

/// Kills and reaps a child left running by a failed test.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &std::process::Child) {
    assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
}

fn exits(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Type=notify` and `WatchdogSec=`, as systemd runs the shipped units: the
/// server says it is ready once it listens, pings the watchdog while its
/// metadata store answers, and says it is stopping at SIGTERM; the mount
/// says ready once mounted, pings, and says stopping while it saves.
#[test]
fn the_daemons_tell_systemd_they_are_ready_alive_and_stopping() {
    let notify = Notify::new();
    let data = tempfile::tempdir().unwrap();
    let server = Command::new(vaultfs_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--plain-http", "--data-dir"])
        .arg(data.path())
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Reaped(server);
    let ready = notify.wait_for("READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=listening on http://127.0.0.1:"), "{ready}");
    for _ in 0..2 {
        notify.wait_for("WATCHDOG=1", Duration::from_secs(2));
    }
    sigterm(&server.0);
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(exits(&mut server.0, Duration::from_secs(15)).success());

    let mut m = TestMount::start();
    m.unmount();
    let notify = Notify::new();
    let mount = Command::new(vaultfs_bin())
        .arg("mount")
        .arg(&m.mountpoint)
        .arg("--foreground")
        .env("XDG_CONFIG_HOME", &m.home)
        .env("XDG_STATE_HOME", m.home.join("state"))
        .env("VAULTFS_PASSPHRASE_FILE", &m.pass)
        .env("VAULTFS_POLICY", &m.policy)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut mount = Reaped(mount);
    let _guard = Unmounted(m.mountpoint.clone());
    let ready = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=mounted at"), "{ready}");
    assert!(mounted(&m.mountpoint));
    std::fs::create_dir_all(m.path("Family/a-record")).unwrap();
    std::fs::write(m.path("Family/a-record/x"), b"saved before it stops").unwrap();
    notify.wait_for("WATCHDOG=1", Duration::from_secs(2));
    sigterm(&mount.0);
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(exits(&mut mount.0, Duration::from_secs(30)).success());
    assert!(!mounted(&m.mountpoint));
}

/// The shipped units pass `systemd-analyze verify` (with the binary under
/// test as ExecStart and its own manual pages on MANPATH, which verify
/// checks Documentation= against), with no warning at all; the sysusers
/// file makes the server's user.
#[test]
fn the_shipped_systemd_units_verify_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let man = dir.path().join("man");
    let out = Command::new(vaultfs_bin()).arg("man").arg(man.join("man1")).output().unwrap();
    assert!(out.status.success(), "vaultfs man: {}", String::from_utf8_lossy(&out.stderr));
    let runtime = dir.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    for (unit, user) in [("vaultfs-server.service", false), ("vaultfs-mount@.service", true)] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/vaultfs "), "{unit} runs the installed binary");
        std::fs::write(dir.path().join(unit), text.replace("/usr/bin/vaultfs", &vaultfs_bin())).unwrap();
        let name = if user { "vaultfs-mount@Vaults.service" } else { unit };
        if user {
            std::os::unix::fs::symlink(dir.path().join(unit), dir.path().join(name)).unwrap();
        }
        let out = Command::new("systemd-analyze")
            .args(user.then_some("--user"))
            .arg("verify")
            .arg(dir.path().join(name))
            .env("MANPATH", &man)
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .expect("systemd-analyze (the test command installs systemd)");
        let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(format!("--root={}", root.display()))
        .arg(units.join("vaultfs.sysusers"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("Creating user 'vaultfs'"), "{said}");
}

/// `--log-format json`: every line the server logs is one JSON object with
/// a time, a level, a target and a message (here: a request logged at debug
/// level, and the shutdown).
#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, Read, Write};
    let data = tempfile::tempdir().unwrap();
    let server = Command::new(vaultfs_bin())
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0", "--plain-http", "--data-dir"])
        .arg(data.path())
        .env("VAULTFS_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Reaped(server);
    let mut stdout = std::io::BufReader::new(server.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    sigterm(&server.0);
    assert!(exits(&mut server.0, Duration::from_secs(15)).success());
    let mut logged = String::new();
    server.0.stderr.take().unwrap().read_to_string(&mut logged).unwrap();
    let lines: Vec<&str> = logged.lines().collect();
    assert!(lines.len() >= 2, "{logged}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for key in ["timestamp", "level", "target"] {
            assert!(v.get(key).is_some_and(|x| x.is_string()), "no {key}: {l}");
        }
        assert!(v["fields"]["message"].is_string(), "no message: {l}");
    }
    assert!(logged.contains("/v1/health") && logged.contains("shutting down"), "{logged}");
}

/// `vaultfs status --watch`: plain blocks with the time when not on a
/// terminal, progress bars on one (run under script(1)); both end when the
/// mount they watch does. Bad intervals are refused.
#[test]
fn status_watch_redraws_until_the_mount_ends() {
    let mut m = TestMount::start();
    std::fs::create_dir_all(m.path("Family/w")).unwrap();
    std::fs::write(m.path("Family/w/f"), vec![7u8; 3 << 20]).unwrap();
    let mountpoint = m.mountpoint.display().to_string();
    let watch = |under_script: bool| {
        let mut cmd = if under_script {
            let mut c = Command::new("script");
            c.args([
                "-qfec",
                &format!("{} status --watch --interval 0.2 {mountpoint}", vaultfs_bin()),
                "/dev/null",
            ]);
            c
        } else {
            let mut c = Command::new(vaultfs_bin());
            c.args(["status", "--watch", "--interval", "0.2", &mountpoint]);
            c
        };
        cmd.env("XDG_CONFIG_HOME", &m.home)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let plain = Reaped(watch(false));
    let tty = Reaped(watch(true));
    std::thread::sleep(Duration::from_millis(1200));
    m.unmount();
    let mut outputs = Vec::new();
    for mut w in [plain, tty] {
        assert!(exits(&mut w.0, Duration::from_secs(10)).success(), "the watch did not end with the mount");
        let mut text = String::new();
        std::io::Read::read_to_string(w.0.stdout.as_mut().unwrap(), &mut text).unwrap();
        outputs.push(text);
    }
    let (plain, tty) = (&outputs[0], &outputs[1]);
    assert!(plain.matches("\n-- ").count() + plain.starts_with("-- ") as usize >= 3, "{plain}");
    assert!(plain.contains("  cache      ") && plain.contains("is not a running vaultfs mount"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "terminal codes in plain output: {plain}");
    assert!(tty.contains("cache     [") && tty.contains(" of ") && tty.contains('\u{1b}'), "{tty}");
    for bad in ["0", "x", "7200"] {
        let out =
            Command::new(vaultfs_bin()).args(["status", "--watch", "--interval", bad]).output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("seconds from 0.1"));
    }
    let out = Command::new(vaultfs_bin()).args(["status", "--interval", "2"]).output().unwrap();
    assert!(!out.status.success(), "--interval without --watch");
}

/// One plain HTTP/1.1 request; the answer's status and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body.as_bytes()).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The head of the answer to `GET path` (status line and headers, lower case).
fn http_head(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer.split("\r\n\r\n").next().unwrap_or_default().to_lowercase()
}

/// TCP ports process `pid` listens on (from /proc: its socket inodes in the
/// kernel's LISTEN table).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports.sort();
    ports
}

/// The value of metric `name{labels}` in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Metrics: no listener unless configured; when configured, a known sequence
/// of requests is counted by route and status, with failed logins, bytes and
/// latencies; a bad metrics address is refused by name.
#[test]
fn metrics_are_off_by_default_and_count_requests_when_on() {
    let start = |config: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(vaultfs_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--plain-http", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
            .unwrap();
        let addr = line.trim().rsplit("http://").next().unwrap().to_string();
        (Reaped(child), addr, dir)
    };
    let (off, addr, _d) = start("");
    assert_eq!(http(&addr, "GET", "/v1/health", "").0, 200);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(listening_ports(off.0.id()), vec![port], "a listener besides the API without [metrics]");
    drop(off);

    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    drop(std::net::TcpListener::bind(free).unwrap());
    let (on, addr, _d2) = start(&format!("[metrics]\nlisten = \"{free}\"\n"));
    assert_eq!(listening_ports(on.0.id()).len(), 2, "the API and the metrics listener");
    let m = free.to_string();
    for _ in 0..3 {
        assert_eq!(http(&addr, "GET", "/v1/health", "").0, 200);
    }
    // Paths and methods no route knows share one label each, however many.
    for i in 0..5 {
        assert_eq!(http(&addr, "GET", &format!("/v1/no-such-thing-{i}/alice"), "").0, 404);
    }
    assert!(http(&addr, "BREW", "/v1/health", "").0 >= 400);
    let refused = http(
        &addr,
        "POST",
        "/v1/login",
        r#"{"user":"nobody","login_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
    );
    assert!(refused.0 == 401 || refused.0 == 403, "{refused:?}");
    let (status, text) = http(&m, "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    assert_eq!(metric(&text, r#"vaultfs_requests_total{method="GET",route="/v1/health",status="200"}"#), 3.0);
    assert_eq!(metric(&text, r#"vaultfs_requests_total{method="GET",route="unmatched",status="404"}"#), 5.0);
    assert!(text.contains(r#"method="OTHER""#), "{text}");
    assert!(!text.contains("no-such-thing") && !text.contains("alice") && !text.contains("BREW"), "{text}");
    assert_eq!(metric(&text, "vaultfs_login_failures_total"), 1.0);
    // Three GETs and the BREW, which matched the route and got a 405.
    assert_eq!(metric(&text, r#"vaultfs_request_duration_seconds_count{route="/v1/health"}"#), 4.0);
    assert!(metric(&text, "vaultfs_received_bytes_total") >= 50.0, "the login body");
    assert!(metric(&text, "vaultfs_sent_bytes_total") >= 3.0 * 15.0, "three health answers");
    assert_eq!(metric(&text, "vaultfs_uploads_in_flight"), 0.0);
    assert_eq!(metric(&text, "vaultfs_stored_bytes"), 0.0);
    assert_eq!(http(&m, "GET", "/v1/health", "").0, 404, "the API is not on the metrics listener");
    // Counting the bytes keeps the answers as they were (a length, not chunks).
    let head = http_head(&addr, "/v1/health");
    assert!(head.contains("content-length:") && !head.contains("chunked"), "{head}");
    drop(on);

    // The metrics address must not be the API's.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:18443\"\n[metrics]\nlisten = \"127.0.0.1:18443\"\n").unwrap();
    let out = Command::new(vaultfs_bin()).args(["serve", "--config"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("metrics.listen"), "{err}");
}

/// `vaultfs admin --data-dir DIR ARGS...`, as it ends.
fn admin(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(vaultfs_bin()).arg("admin").arg("--data-dir").arg(data_dir).args(args).output().unwrap()
}

/// What the backup test writes as `name`'s content in its `generation`:
/// the name and generation first, so a file read back says which it is.
fn generation_of(name: &str, generation: u32, len: usize) -> Vec<u8> {
    let mut data = format!("{name} generation {generation}\n").into_bytes();
    data.resize(len, (generation % 251) as u8);
    data
}

/// What the backup test does to a copy of a backup.
type Damage = dyn Fn(&Path);

/// The files under `dir`, by path, with their contents.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    support::server::walk_files(dir).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn a_backup_taken_while_a_client_writes_restores_every_committed_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut m = TestMount::start();
    let dir = tempfile::tempdir().unwrap();
    let root = m.path("Family/backup");
    std::fs::create_dir_all(&root).unwrap();
    // Written (so committed: a close returns once the server stored it)
    // before any backup; `stable` is never touched again, `churn` is
    // written again and again while the backups run, which lets their
    // earlier blobs go on the server.
    let stable: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| {
            let name = format!("s{i}");
            let data = generation_of(&name, 0, 100_000 + i * 37_001);
            (name, data)
        })
        .collect();
    for (name, data) in &stable {
        std::fs::write(root.join(name), data).unwrap();
    }
    const CHURN_LEN: usize = 1_500_000;
    let churn: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    for name in &churn {
        std::fs::write(root.join(name), generation_of(name, 0, CHURN_LEN)).unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    let writer = std::thread::spawn({
        let (stop, created, root, churn) =
            (Arc::clone(&stop), Arc::clone(&created), root.clone(), churn.clone());
        move || {
            let mut generation = 1;
            while !stop.load(Ordering::Relaxed) {
                for name in &churn {
                    std::fs::write(root.join(name), generation_of(name, generation, CHURN_LEN)).unwrap();
                }
                let name = format!("n{generation}");
                std::fs::write(root.join(&name), generation_of(&name, 0, 50_000)).unwrap();
                created.lock().unwrap().push(name);
                generation += 1;
            }
            generation
        }
    });
    // Each backup must finish whole while the blobs it copies are being
    // replaced (without the hold on their deletion, one goes first).
    let data = m.server.data_dir.clone();
    let mut committed_before = Vec::new();
    let started = Instant::now();
    for k in 0..3 {
        committed_before.push(created.lock().unwrap().len());
        let out = admin(&data, &["backup", dir.path().join(format!("b{k}")).to_str().unwrap()]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "backup {k}: {stderr}");
        assert!(stdout.contains("backed up meta.sqlite3 and"), "{stdout}");
        assert!(stderr.is_empty(), "a progress bar off a terminal, or a warning: {stderr}");
    }
    let backing_up = started.elapsed();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("b0")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "a backup others can read");
    stop.store(true, Ordering::Relaxed);
    let generations = writer.join().unwrap();
    // No save failed meanwhile (`fs::write` does not report a failed
    // close, so the mount's log says it): a backup is no outage.
    let log = m.log();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("upload failed")).collect();
    assert!(failed.is_empty(), "saves failed during the backups:\n{}", failed.join("\n"));
    let created = created.lock().unwrap().clone();
    assert!(
        generations >= 3,
        "the writer wrote {generations} generations in {backing_up:?}: no overlap to test"
    );
    // What the server held back for the backups went as each ended: one
    // blob per file, none left over.
    let files = stable.len() + churn.len() + created.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.server.stored_blobs().len() != files && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        m.server.stored_blobs().len(),
        files,
        "blobs held for the backups were not deleted after them"
    );

    // Bad inputs: a clear error, nothing changed.
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    for args in [["backup", full.to_str().unwrap()], ["restore", dir.path().join("b0").to_str().unwrap()]] {
        let target = if args[0] == "backup" { data.clone() } else { full.clone() };
        let out = admin(&target, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("not empty"), "{args:?}: {err}");
        assert_eq!(contents(&full), vec![(full.join("keep"), b"mine".to_vec())], "{args:?} changed it");
    }
    // A backup inside the data directory (its tmp/ is empty when idle), or
    // a restore into a directory inside the backup.
    let inside = [
        (data.clone(), vec!["backup".to_string(), data.join("tmp").display().to_string()]),
        (dir.path().join("b0/new"), vec!["restore".to_string(), dir.path().join("b0").display().to_string()]),
    ];
    for (target, args) in inside {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = admin(&target, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("overlaps"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("b0/new").exists());
    let damages: [(&str, &Damage); 5] = [
        ("a blob's byte changed", &|b| {
            let blob = &support::server::walk_files(&b.join("blobs"))[3];
            let mut bytes = std::fs::read(blob).unwrap();
            bytes[1000] ^= 1;
            std::fs::write(blob, bytes).unwrap();
        }),
        ("a blob removed", &|b| {
            std::fs::remove_file(&support::server::walk_files(&b.join("blobs"))[5]).unwrap()
        }),
        ("no manifest", &|b| std::fs::remove_file(b.join("vaultfs-backup.json")).unwrap()),
        ("the database cut short", &|b| {
            let db = b.join("meta.sqlite3");
            let len = std::fs::metadata(&db).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 2).unwrap();
        }),
        ("a file outside the backup named", &|b| {
            let manifest = b.join("vaultfs-backup.json");
            let text = std::fs::read_to_string(&manifest).unwrap().replace("tls/key.pem", "../key.pem");
            std::fs::write(&manifest, text).unwrap();
        }),
    ];
    for (i, (what, damage)) in damages.iter().enumerate() {
        let copy = dir.path().join(format!("damaged{i}"));
        assert!(Command::new("cp")
            .arg("-a")
            .arg(dir.path().join("b0"))
            .arg(&copy)
            .status()
            .unwrap()
            .success());
        damage(&copy);
        // Into a directory that is not there, and into an empty one.
        let (absent, empty) = (dir.path().join(format!("absent{i}")), dir.path().join(format!("empty{i}")));
        std::fs::create_dir(&empty).unwrap();
        for target in [&absent, &empty] {
            let out = admin(target, &["restore", copy.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains("damaged backup"), "{what}: {err}");
        }
        assert!(!absent.exists(), "{what}: a failed restore left {absent:?}");
        assert!(contents(&empty).is_empty() && empty.is_dir(), "{what}: a failed restore left files");
    }

    // The last backup, restored into a new data directory, served by a
    // server at the same address (it kept its TLS key, so the pinned
    // fingerprint holds).
    let restored = dir.path().join("restored");
    let out = admin(&restored, &["restore", dir.path().join("b2").to_str().unwrap()]);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("every hash matched"));
    m.unmount();
    m.server.restart_on(&restored, None);
    // This machine saw newer versions of the churned files than the
    // backup holds: to it the restored server rolled them back, and it
    // refuses them as it would any server's.
    m.mount();
    let rolled_back = churn.iter().filter(|c| std::fs::read(root.join(c)).is_err()).count();
    assert!(rolled_back > 0, "no rolled-back file was refused");
    m.unmount();
    // The admin who restored it tells the machines to forget what they saw.
    std::fs::remove_dir_all(m.home.join("state/vaultfs")).unwrap();
    m.mount();
    for (name, data) in &stable {
        assert!(std::fs::read(root.join(name)).unwrap() == *data, "{name} differs after the restore");
    }
    for name in &churn {
        let got = std::fs::read(root.join(name)).unwrap();
        let generation: u32 = String::from_utf8_lossy(&got[..40])
            .strip_prefix(&format!("{name} generation "))
            .and_then(|r| r.split('\n').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name}: not a version the client wrote"));
        assert!(got == generation_of(name, generation, CHURN_LEN), "{name}: not whole");
    }
    for name in &created[..committed_before[2]] {
        assert!(
            std::fs::read(root.join(name)).unwrap() == generation_of(name, 0, 50_000),
            "{name}, committed before the backup, differs or is missing"
        );
    }
}

/// The same from a server whose blobs are in S3: the backup reads them from
/// the bucket, and restores onto local blobs (a way off S3); a restore onto
/// a bucket that holds blobs is refused.
#[test]
fn a_backup_of_an_s3_server_restores_onto_local_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3"));
    let mut m = TestMount::start_setup(MountSetup { server_toml: &s3.config(), ..Default::default() });
    std::fs::create_dir_all(m.path("Family/s3")).unwrap();
    // One larger than a part of a ranged S3 read (8 MiB).
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let name = format!("Family/s3/f{i}");
            let data = generation_of(&name, 0, 1000 + i * 2_500_001);
            (name, data)
        })
        .collect();
    for (name, data) in &files {
        std::fs::write(m.path(name), data).unwrap();
    }
    let s3_config = dir.path().join("s3.toml");
    std::fs::write(&s3_config, s3.config()).unwrap();
    let data = m.server.data_dir.clone();
    let backup = dir.path().join("backup");
    let out = Command::new(vaultfs_bin())
        .args(["admin", "--config", s3_config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
        .args(["backup", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(support::server::walk_files(&backup.join("blobs")).len(), files.len());

    let onto_bucket = dir.path().join("onto-bucket");
    let out = Command::new(vaultfs_bin())
        .args(["admin", "--config", s3_config.to_str().unwrap(), "--data-dir", onto_bucket.to_str().unwrap()])
        .args(["restore", backup.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already holds"), "{err}");
    assert!(!onto_bucket.exists(), "a refused restore left {onto_bucket:?}");

    let restored = dir.path().join("restored");
    let out = admin(&restored, &["restore", backup.to_str().unwrap()]);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    m.unmount();
    let local = dir.path().join("local.toml");
    std::fs::write(&local, "").unwrap();
    m.server.restart_on(&restored, Some(&local));
    m.mount();
    for (name, data) in &files {
        assert!(std::fs::read(m.path(name)).unwrap() == *data, "{name} differs after the restore");
    }
    assert_eq!(support::server::walk_files(&restored.join("blobs")).len(), files.len(), "not on local blobs");
}

/// A system user made for a test, removed (with anything it still runs)
/// when dropped.
struct SystemUser(String);

impl SystemUser {
    fn add(name: &str, home: &Path) -> Self {
        // One left by a run that was killed goes first.
        let _ = Command::new("userdel").args(["-f", name]).output();
        let out = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", "-d"])
            .arg(home)
            .arg(name)
            .output()
            .expect("useradd (passwd package)");
        assert!(out.status.success(), "useradd: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::create_dir_all(home).unwrap();
        assert!(Command::new("chown").arg(format!("{name}:")).arg(home).status().unwrap().success());
        SystemUser(name.to_string())
    }

    fn uid(&self) -> u32 {
        let out = Command::new("id").args(["-u", &self.0]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn owns(&self, path: &Path, mode: u32) {
        assert!(Command::new("chown").arg(format!("{}:", self.0)).arg(path).status().unwrap().success());
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-u", &self.0]).output();
        let _ = Command::new("userdel").args(["-f", &self.0]).output();
    }
}

/// /etc/fstab with one more line, as it was again when dropped.
struct FstabLine(String);

/// Marks the lines a test adds to /etc/fstab, so that one left by a run
/// that was killed goes at the next.
const FSTAB_MARK: &str = "# added by vaultfs tests/operate.rs";

impl FstabLine {
    fn add(line: &str) -> Self {
        // (A marker line, and the entry after it.)
        let mut before = String::new();
        let mut skip = false;
        for l in std::fs::read_to_string("/etc/fstab").unwrap_or_default().split_inclusive('\n') {
            if l.starts_with(FSTAB_MARK) {
                skip = true;
            } else if std::mem::take(&mut skip) {
            } else {
                before.push_str(l);
            }
        }
        let mut after = before.clone();
        if !after.is_empty() && !after.ends_with('\n') {
            after.push('\n');
        }
        after.push_str(FSTAB_MARK);
        after.push('\n');
        after.push_str(line);
        after.push('\n');
        std::fs::write("/etc/fstab", after).unwrap();
        FstabLine(before)
    }
}

impl Drop for FstabLine {
    fn drop(&mut self) {
        let _ = std::fs::write("/etc/fstab", &self.0);
    }
}

/// /dev/fuse readable and writable by all, as distributions make it (some
/// containers keep it root's), its mode as it was again when dropped.
struct FuseOpenToAll(u32);

impl FuseOpenToAll {
    fn set() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode | 0o666)).unwrap();
        FuseOpenToAll(mode)
    }
}

impl Drop for FuseOpenToAll {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

#[test]
fn a_user_mounts_an_fstab_line_marked_user_and_unmounts_it_as_itself() {
    use std::os::unix::fs::PermissionsExt;
    let mut m = TestMount::start();
    m.unmount();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = "vaultfs-test-user";
    let home = dir.path().join("home");
    let user = SystemUser::add(name, &home);
    user.owns(&home, 0o700);
    // The binary it runs: a copy it can reach (a build tree may lie under a
    // home only root enters), on the default path mount(8)'s helpers use.
    let bin = dir.path().join("vaultfs");
    std::fs::copy(vaultfs_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _path = OnDefaultPath::link_to(&bin);
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "user mount passphrase").unwrap();
    user.owns(&pass, 0o600);
    let as_user = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", name, "--", "env"])
            .arg(format!("HOME={}", home.display()))
            .arg(format!("VAULTFS_PASSPHRASE_FILE={}", pass.display()))
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = as_user(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let code = m.server.add_user("bob", &[]);
    let fp = m.server.fingerprint.clone().unwrap();
    ok(&[
        "vaultfs",
        "login",
        "--server",
        &m.server.url,
        "--user",
        "bob",
        "--fingerprint",
        &fp,
        "--enroll",
        &code,
    ]);
    ok(&["vaultfs", "vault", "create", "Family"]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    user.owns(&mnt, 0o755);
    let mnt_s = mnt.to_str().unwrap();
    let _fstab = FstabLine::add(&format!(
        "vaults {mnt_s} fuse.vaultfs noauto,user,passphrase_file={} 0 0",
        pass.display()
    ));
    let _gone = Unmounted(mnt.clone());

    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/dev/fuse").unwrap().mode() & 0o006 != 0o006 {
        // Where /dev/fuse is root's alone, a user mount says so.
        let out = as_user(&["mount", mnt_s]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("/dev/fuse cannot be opened by this user"), "{err}");
    }
    let _fuse = FuseOpenToAll::set();
    ok(&["mount", mnt_s]);
    assert!(mounted(&mnt));
    let pids = daemons(&mnt);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().next().unwrap();
    assert_eq!(uid, user.uid().to_string(), "the daemon runs as the user");
    let line = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mnt_s))
        .unwrap()
        .to_string();
    assert!(line.contains("noexec") && line.contains("nosuid"), "a `user` mount is noexec: {line}");

    // Files written as the user, saved by its own fusermount3 -u.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..5 {
        std::fs::write(src.join(format!("f{i}")), generation_of("user", i, 10_000 + i as usize * 300_007))
            .unwrap();
    }
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(&["cp", "-r", src.to_str().unwrap(), &format!("{mnt_s}/Family/")]);
    ok(&["fusermount3", "-u", mnt_s]);
    let start = Instant::now();
    while !daemons(&mnt).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the daemon did not exit after fusermount3 -u");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!mounted(&mnt));
    ok(&["mount", mnt_s]);
    for i in 0..5 {
        ok(&["cmp", src.join(format!("f{i}")).to_str().unwrap(), &format!("{mnt_s}/Family/src/f{i}")]);
    }
    ok(&["umount", mnt_s]);
    let start = Instant::now();
    while !daemons(&mnt).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the daemon did not exit after umount");
        std::thread::sleep(Duration::from_millis(50));
    }
}
