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

pub use super::postgres::{pg_mode, PgCluster};

/// Cheap login-key parameters so tests do not spend seconds in Argon2id.
pub const TEST_KDF: KdfParams = KdfParams { m_cost_kib: 256, t_cost: 1, p_cost: 1 };

/// The vaultfs binary the tests run: this build's, unless a benchmark set
/// another ([`use_vaultfs_bin`]) to measure a baseline in the same run.
pub fn vaultfs_bin() -> String {
    BIN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_vaultfs").to_string())
}

static BIN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Runs servers, mounts and commands with `bin` from now on (`None`: this
/// build's again).
pub fn use_vaultfs_bin(bin: Option<String>) {
    *BIN.lock().unwrap_or_else(|p| p.into_inner()) = bin;
}

pub struct TestServer {
    child: Option<Child>,
    /// The S3 server holding this server's blobs (`VAULTFS_TEST_STORAGE=s3`).
    s3: Option<std::sync::Arc<S3Server>>,
    /// The PostgreSQL cluster and database holding this server's metadata
    /// (`VAULTFS_TEST_METADATA=postgres`).
    pg: Option<(std::sync::Arc<PgCluster>, String)>,
    config: PathBuf,
    /// The configuration file the server runs with (`config` and the
    /// backends' tables); `vaultfs admin` gets it too.
    effective: PathBuf,
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

    /// Starts a server on `data_dir` with exactly the configuration file
    /// `config` (whatever `VAULTFS_TEST_STORAGE` and `VAULTFS_TEST_METADATA`
    /// say: a test that sets the backends itself).
    pub fn start_exact(data_dir: &Path, config: &Path) -> Self {
        Self::spawn_on("127.0.0.1:0", data_dir, config, &[], None, None)
    }

    /// Starts a server on `data_dir` with the configuration file `config`.
    pub fn start_with_config(data_dir: &Path, config: &Path) -> Self {
        Self::spawn(data_dir, config, &[])
    }

    fn spawn(data_dir: &Path, config: &Path, extra: &[&str]) -> Self {
        let s3 = s3_mode().then(|| std::sync::Arc::new(S3Server::start(&data_dir.with_extension("s3"))));
        let pg = pg_mode().then(|| {
            let cluster = PgCluster::get();
            let database = cluster.database_for(data_dir);
            (cluster, database)
        });
        Self::spawn_on("127.0.0.1:0", data_dir, config, extra, s3, pg)
    }

    /// Starts the server again on the same address and data (after a kill).
    pub fn restart(&mut self) {
        self.kill_hard();
        let listen = self.url.rsplit("//").next().unwrap_or("").to_string();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let mut again = Self::spawn_on(
            &listen,
            &self.data_dir.clone(),
            &self.config.clone(),
            &extra,
            self.s3.clone(),
            self.pg.clone(),
        );
        self.child = again.child.take();
        assert_eq!(again.url, self.url, "restarted on another address");
    }

    /// Stops the server and starts it again on the same address with the
    /// data in `data_dir` (a restored backup, say), and the configuration
    /// file `config` if one is given.
    pub fn restart_on(&mut self, data_dir: &Path, config: Option<&Path>) {
        self.data_dir = data_dir.to_path_buf();
        if let Some(config) = config {
            self.config = config.to_path_buf();
        }
        self.restart();
    }

    fn spawn_on(
        listen: &str,
        data_dir: &Path,
        config: &Path,
        extra: &[&str],
        s3: Option<std::sync::Arc<S3Server>>,
        pg: Option<(std::sync::Arc<PgCluster>, String)>,
    ) -> Self {
        // On S3, the same configuration plus a [storage] table naming the
        // bucket; on PostgreSQL, plus a [metadata] table naming the database.
        let effective = if s3.is_some() || pg.is_some() {
            let mut text = std::fs::read_to_string(config).unwrap_or_default();
            if let Some(s3) = &s3 {
                text += &s3.config();
            }
            if let Some((cluster, database)) = &pg {
                text += &cluster.config(database);
            }
            let path = config.with_extension("effective.toml");
            std::fs::write(&path, text).expect("config");
            path
        } else {
            config.to_path_buf()
        };
        let mut child = Command::new(vaultfs_bin())
            .args(["serve", "--listen", listen, "--config"])
            .arg(&effective)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            // VAULTFS_TEST_SERVER_LOG: the server's log filter (say, to see each request).
            .env("VAULTFS_LOG", std::env::var("VAULTFS_TEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
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
            s3,
            pg,
            config: config.to_path_buf(),
            effective: effective.clone(),
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
        ServerAccess::new(self.url.clone(), self.fingerprint.clone().map(Trust::Pinned))
    }

    /// Runs `vaultfs admin --data-dir DIR ARGS...` and returns its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        // With the server's own configuration: where its metadata is.
        let mut admin = Command::new(vaultfs_bin());
        admin.arg("admin").arg("--data-dir").arg(&self.data_dir).arg("--config").arg(&self.effective);
        let out = admin.args(args).output().expect("run vaultfs admin");
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

impl TestServer {
    /// The stored blobs, as files: `blobs/` in the data directory, or the
    /// objects in the S3 server's bucket directory.
    pub fn stored_blobs(&self) -> Vec<PathBuf> {
        match &self.s3 {
            Some(s3) => walk_files(&s3.root.join(S3_BUCKET)),
            None => walk_files(&self.data_dir.join("blobs")),
        }
    }

    /// What an interrupted upload may leave: `tmp/` in the data directory; on
    /// S3 the journal of multipart uploads, and parts held by the S3 server.
    pub fn partial_uploads(&self) -> Vec<PathBuf> {
        match &self.s3 {
            Some(s3) => {
                let mut found = walk_files(&self.data_dir.join("s3-uploads"));
                found.extend(
                    std::fs::read_dir(&s3.root).into_iter().flatten().flatten().map(|e| e.path()).filter(
                        |p| {
                            let name = p.file_name().unwrap_or_default().to_string_lossy();
                            // Parts of multipart uploads (what S3's ListParts shows).
                            // s3s-fs's own `.tmp.*` files of a part request cut
                            // off mid-body are its housekeeping, not S3 state.
                            name.starts_with(".upload_id-")
                        },
                    ),
                );
                found
            }
            None => walk_files(&self.data_dir.join("tmp")),
        }
    }

    /// On S3: the bucket as an rclone connection string (`:s3,...:bucket`),
    /// for reading objects with another S3 client (the bench's figure of what
    /// the S3 server alone delivers).
    pub fn s3_rclone_remote(&self) -> Option<String> {
        self.s3.as_ref().map(|s3| {
            format!(
                ":s3,provider=Other,access_key_id={},secret_access_key={},\
                 endpoint='http://127.0.0.1:{}':{S3_BUCKET}",
                s3.key().0,
                s3.key().1,
                s3.port
            )
        })
    }

    /// The file that holds blob `hex` (in `blobs/` of the data directory,
    /// or the S3 server's bucket directory).
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        match &self.s3 {
            Some(s3) => s3.root.join(S3_BUCKET).join(hex),
            None => self.data_dir.join("blobs").join(&hex[..2]).join(hex),
        }
    }

    /// The directory without which the blob store is gone: `blobs/` in
    /// the data directory, or the S3 server's bucket directory.
    pub fn store_dir(&self) -> PathBuf {
        match &self.s3 {
            Some(s3) => s3.root.join(S3_BUCKET),
            None => self.data_dir.join("blobs"),
        }
    }

    /// The pid of the S3 server holding this server's blobs, if it has one.
    pub fn store_pid(&self) -> Option<u32> {
        self.s3.as_ref().map(|s3| s3.child.id())
    }

    /// Where blobs are kept on this machine (the S3 server's root on S3).
    pub fn blob_root(&self) -> PathBuf {
        match &self.s3 {
            Some(s3) => s3.root.clone(),
            None => self.data_dir.join("blobs"),
        }
    }
}

pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Whether test servers keep their blobs on S3 (`VAULTFS_TEST_STORAGE=s3`):
/// the test command runs the server and mount suites a second time so.
pub fn s3_mode() -> bool {
    std::env::var("VAULTFS_TEST_STORAGE").is_ok_and(|v| v == "s3")
}

const S3_BUCKET: &str = "vaultfs";
const S3_KEY: &str = "vaultfs-test";
const S3_SECRET: &str = "vaultfs-test-secret-key";
/// Garage's key format: "GK" and 24 hex digits, a secret of 64.
const GARAGE_KEY: &str = "GK0123456789abcdef01234567";
const GARAGE_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A real S3 server (s3s-fs, which checks SigV4 signatures) on a free
/// loopback port, storing under `root`; killed when dropped.
pub struct S3Server {
    child: Child,
    pub root: PathBuf,
    port: u16,
    garage: bool,
}

impl S3Server {
    pub fn start(root: &Path) -> Self {
        if let Some(garage) = std::env::var_os("VAULTFS_TEST_GARAGE") {
            return Self::start_garage(root, Path::new(&garage));
        }
        std::fs::create_dir_all(root.join(S3_BUCKET)).expect("S3 root");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|c| c.join("bin/s3s-fs"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("s3s-fs"));
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} (.ci/test installs it): {e}", bin.display()));
        // Made before the wait, so a panic there still stops the child.
        let server = S3Server { child, root: root.to_path_buf(), port, garage: false };
        wait_for_port(port, "s3s-fs");
        server
    }

    /// Garage (single node, no compression) instead of s3s-fs, for the
    /// benchmark's S3 column (`VAULTFS_TEST_GARAGE=path/to/garage`).
    fn start_garage(root: &Path, bin: &Path) -> Self {
        std::fs::create_dir_all(root).expect("S3 root");
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (port, rpc, admin) = (free(), free(), free());
        let conf = root.join("garage.toml");
        std::fs::write(
            &conf,
            format!(
                "metadata_dir = \"{0}/meta\"\ndata_dir = \"{0}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\ncompression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{1}\"\n[s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"127.0.0.1:{port}\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                root.display(),
                "ab".repeat(32)
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("garage.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        // Made before the setup, so a panic there still stops the child.
        let server = S3Server { child, root: root.to_path_buf(), port, garage: true };
        wait_for_port(port, "garage");
        let garage = |args: &[&str]| {
            let out = Command::new(bin).arg("-c").arg(&conf).args(args).output().unwrap();
            assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let node = garage(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        garage(&["layout", "assign", "-z", "dc1", "-c", "20G", &node]);
        garage(&["layout", "apply", "--version", "1"]);
        garage(&["key", "import", "--yes", "-n", "bench", GARAGE_KEY, GARAGE_SECRET]);
        garage(&["bucket", "create", S3_BUCKET]);
        garage(&["bucket", "allow", "--read", "--write", "--owner", S3_BUCKET, "--key", GARAGE_KEY]);
        server
    }

    /// The access key and its secret.
    fn key(&self) -> (&'static str, &'static str) {
        if self.garage {
            (GARAGE_KEY, GARAGE_SECRET)
        } else {
            (S3_KEY, S3_SECRET)
        }
    }

    /// The server configuration's [storage] table for this S3 server. Small
    /// parts (5 MiB, the S3 minimum) so multipart uploads happen in tests.
    pub fn config(&self) -> String {
        format!(
            "\n[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"{S3_BUCKET}\"\n\
             endpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"\nallow_http = true\n\
             access_key_id = \"{}\"\nsecret_access_key = \"{}\"\npart_size_mib = 5\n",
            self.port,
            self.key().0,
            self.key().1,
        )
    }
}

/// Waits (at most 20 s) until something listens on loopback port `port`.
fn wait_for_port(port: u16, what: &str) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
