//! A throwaway PostgreSQL cluster for tests that keep server metadata in
//! PostgreSQL (`VAULTFS_TEST_METADATA=postgres`).
//!
//! The test command starts one cluster for a whole run and names it in
//! `VAULTFS_TEST_PG` (`host:port:password-file`); without it, each test
//! server starts a cluster of its own (initdb + pg_ctl in a temp directory,
//! on a free loopback port, as the `postgres` user when run as root, since
//! initdb refuses root), stopped when the last server using it goes, also
//! when a test panics. Each test server gets a database of its own.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether test servers keep their metadata in PostgreSQL.
pub fn pg_mode() -> bool {
    std::env::var("VAULTFS_TEST_METADATA").is_ok_and(|v| v == "postgres")
}

/// PostgreSQL's programs (Debian's layout, newest version first).
fn pg_bin(program: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin").join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(program))
}

const SUPERUSER: &str = "vaultfs";

pub struct PgCluster {
    port: u16,
    password_file: PathBuf,
    /// Set when this process started the cluster (and stops it on drop).
    owned: Option<(tempfile::TempDir, PathBuf)>,
}

impl PgCluster {
    /// The run's cluster (`VAULTFS_TEST_PG`), or else this process's: one
    /// started for the first server that needs it, and stopped when the
    /// last one using it is dropped.
    pub fn get() -> std::sync::Arc<PgCluster> {
        if let Ok(spec) = std::env::var("VAULTFS_TEST_PG") {
            let mut parts = spec.splitn(2, ':');
            let port =
                parts.next().and_then(|p| p.parse().ok()).expect("VAULTFS_TEST_PG: port:password-file");
            let password_file = PathBuf::from(parts.next().expect("VAULTFS_TEST_PG: port:password-file"));
            return std::sync::Arc::new(PgCluster { port, password_file, owned: None });
        }
        static SHARED: std::sync::Mutex<std::sync::Weak<PgCluster>> =
            std::sync::Mutex::new(std::sync::Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cluster) = shared.upgrade() {
            return cluster;
        }
        let cluster = std::sync::Arc::new(Self::start());
        *shared = std::sync::Arc::downgrade(&cluster);
        cluster
    }

    /// Starts a cluster in a new temporary directory.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts a cluster that takes only TLS connections, with a certificate
    /// for 127.0.0.1 and localhost signed by a new authority, whose
    /// certificate is [`PgCluster::ca_file`].
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// The authority's certificate of a [`PgCluster::start_tls`] cluster.
    pub fn ca_file(&self) -> PathBuf {
        self.owned.as_ref().expect("a cluster of this test's").0.path().join("ca.pem")
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, "vaultfs-test-pg-password\n").unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            // The postgres user must reach the directory.
            std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            chown_postgres(dir.path());
            chown_postgres(&password_file);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let as_pg = |program: &str| {
            let mut c = if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(pg_bin(program));
                c
            } else {
                Command::new(pg_bin(program))
            };
            c.stdout(std::process::Stdio::null());
            c
        };
        let ok = as_pg("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "--no-sync", "-E", "UTF8", "--pwfile"])
            .arg(&password_file)
            .status()
            .expect("initdb (the test command installs postgresql)");
        assert!(ok.success(), "initdb failed");
        let mut options = String::new();
        if tls {
            write_certificates(dir.path(), &data);
            // TLS or nothing, from anywhere but the socket.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap();
            if root {
                for f in ["server.crt", "server.key", "pg_hba.conf"] {
                    chown_postgres(&data.join(f));
                }
            }
            options = " -c ssl=on".into();
        }
        let ok = as_pg("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300{options}",
                dir.path().display()
            ))
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "start"])
            .status()
            .expect("pg_ctl");
        assert!(
            ok.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        PgCluster { port, password_file, owned: Some((dir, data)) }
    }

    /// The database of the server on `data_dir` (one per data directory,
    /// so a server started again on it finds its metadata), made if it does
    /// not exist yet; its name.
    pub fn database_for(&self, data_dir: &Path) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data_dir.hash(&mut h);
        let name = format!("t{:016x}", h.finish());
        let password = std::fs::read_to_string(&self.password_file).unwrap();
        let out = Command::new(pg_bin("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, &name])
            .env("PGPASSWORD", password.trim())
            .output()
            .expect("createdb");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() || err.contains("already exists"), "createdb failed: {err}");
        name
    }

    /// Runs `sql` in `database` with psql; its output (unaligned, no headers).
    pub fn sql(&self, database: &str, sql: &str) -> String {
        let password = std::fs::read_to_string(&self.password_file).unwrap();
        let out = Command::new(pg_bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-At",
                "-c",
                sql,
                database,
            ])
            .env("PGPASSWORD", password.trim())
            .output()
            .expect("psql");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server configuration's [metadata] table for `database`.
    pub fn config(&self, database: &str) -> String {
        format!(
            "\n[metadata]\nbackend = \"postgres\"\n[metadata.postgres]\n\
             url = \"postgres://{SUPERUSER}@127.0.0.1:{}/{database}\"\npassword_file = \"{}\"\npool_size = 8\n",
            self.port,
            self.password_file.display()
        )
    }

    /// Connection parameters for `database` as the superuser (for
    /// tokio_postgres::connect, without TLS).
    pub fn conninfo(&self, database: &str) -> String {
        let password = std::fs::read_to_string(&self.password_file).unwrap();
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password={} dbname={database}",
            self.port,
            password.trim()
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

fn chown_postgres(path: &Path) {
    let ok = Command::new("chown").arg("postgres").arg(path).status().expect("chown");
    assert!(ok.success());
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some((dir, data)) = &self.owned {
            let root = unsafe { libc::geteuid() } == 0;
            let mut c = if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(pg_bin("pg_ctl"));
                c
            } else {
                Command::new(pg_bin("pg_ctl"))
            };
            let _ = c
                .arg("-D")
                .arg(data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(std::process::Stdio::null())
                .status();
            let _ = dir;
        }
    }
}

/// A new authority (`dir/ca.pem`) and the cluster's certificate and key
/// signed by it (`data/server.crt`, `data/server.key`).
fn write_certificates(dir: &Path, data: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "vaultfs test authority");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "vaultfs test database");
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
    let key_file = data.join("server.key");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}
