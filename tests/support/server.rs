//! A real `vaultfs serve` process for integration tests.
//!
//! Each server gets its own temporary data directory and a free port (port 0),
//! and is killed when the handle is dropped, also when a test panics, so no
//! server outlives its test.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vaultfs::crypto::KdfParams;
use vaultfs::remote::http::{HttpRemote, ServerAccess};
use vaultfs::remote::tls::Trust;

/// Cheap login-key parameters so tests do not spend seconds in Argon2id.
pub const TEST_KDF: KdfParams = KdfParams { m_cost_kib: 256, t_cost: 1, p_cost: 1 };

pub fn vaultfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vaultfs")
}

pub struct TestServer {
    child: Option<Child>,
    config: PathBuf,
    extra: Vec<String>,
    pub data_dir: PathBuf,
    pub url: String,
    pub fingerprint: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server over TLS in a fresh temporary directory.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut s = Self::start_in(&data, &[]);
        s._dir = Some(dir);
        s
    }

    /// Starts a server on `data_dir` (kept by the caller), with extra arguments.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Self {
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, "[login_kdf]\nm_cost_kib = 256\nt_cost = 1\np_cost = 1\n").expect("config");
        Self::spawn(data_dir, &config, extra)
    }

    /// Starts a server on `data_dir` with the configuration file `config`.
    pub fn start_with_config(data_dir: &Path, config: &Path) -> Self {
        Self::spawn(data_dir, config, &[])
    }

    fn spawn(data_dir: &Path, config: &Path, extra: &[&str]) -> Self {
        Self::spawn_on("127.0.0.1:0", data_dir, config, extra)
    }

    /// Starts the server again on the same address and data (after a kill).
    pub fn restart(&mut self) {
        self.kill_hard();
        let listen = self.url.rsplit("//").next().unwrap_or("").to_string();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut again = Self::spawn_on(&listen, &self.data_dir.clone(), &self.config.clone(), &extra);
        self.child = again.child.take();
        assert_eq!(again.url, self.url, "restarted on another address");
    }

    fn spawn_on(listen: &str, data_dir: &Path, config: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(vaultfs_bin())
            .args(["serve", "--listen", listen, "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("VAULTFS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vaultfs serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = TestServer {
            child: Some(child),
            config: config.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            data_dir: data_dir.to_path_buf(),
            url: String::new(),
            fingerprint: None,
            _dir: None,
        };
        // Wait for the "data in" line, which comes after address and fingerprint.
        loop {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => l,
                Err(e) => panic!("vaultfs serve did not start: {e}"),
            };
            if let Some(rest) = line.strip_prefix("vaultfs serve: listening on ") {
                server.url = rest.trim().to_string();
            } else if let Some(rest) = line.strip_prefix("vaultfs serve: certificate fingerprint ") {
                server.fingerprint = Some(rest.trim().to_string());
            } else if line.starts_with("vaultfs serve: data in ") {
                break;
            }
        }
        assert!(!server.url.is_empty(), "no listen address printed");
        server
    }

    pub fn access(&self) -> ServerAccess {
        ServerAccess { url: self.url.clone(), trust: self.fingerprint.clone().map(Trust::Pinned) }
    }

    /// Runs `vaultfs admin --data-dir DIR ARGS...` and returns its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(vaultfs_bin())
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .expect("run vaultfs admin");
        assert!(
            out.status.success(),
            "vaultfs admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds a user with the given extra admin options; returns the enrollment code.
    pub fn add_user(&self, name: &str, options: &[&str]) -> String {
        let mut args = vec!["user", "add", name];
        args.extend_from_slice(options);
        let out = self.admin(&args);
        out.lines()
            .find_map(|l| l.strip_prefix("enrollment code (give it to ").and_then(|r| r.split(": ").nth(1)))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|| panic!("no enrollment code in {out}"))
    }

    /// Adds, enrolls and logs in a user.
    pub async fn user(&self, name: &str, options: &[&str]) -> HttpRemote {
        let code = self.add_user(name, options);
        HttpRemote::enroll(&self.access(), name, &code, format!("{name} passphrase").as_bytes(), TEST_KDF)
            .await
            .expect("enroll")
    }

    /// Kills the server with SIGKILL (no chance to clean up), and waits for it.
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("server not running")
    }

    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
