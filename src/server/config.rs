//! `vaultfs serve` configuration (TOML; the commented example is config/server.toml).
//!
//! Every key has a default, so an empty file (or none) gives a working local server.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::protocol::{KdfWire, Limits};

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Where metadata, blobs and the self-signed certificate live.
    pub data_dir: PathBuf,
    /// Serve plain HTTP instead of HTTPS. Refused unless `listen` is loopback.
    pub plain_http: bool,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Limits given to new users (each user's can be changed with `vaultfs admin`).
    pub default_limits: LimitsConfig,
    /// Session lifetime in seconds.
    pub session_ttl_secs: u64,
    /// How long a file lock lasts unless its mount renews it, in seconds: the
    /// longest a crashed machine's locks stay (mounts renew every third of it).
    pub lock_ttl_secs: u64,
    /// How long a shutdown waits for the requests in flight (uploads) to
    /// finish, in seconds, while readiness already fails.
    pub shutdown_grace_secs: u64,
    /// Argon2id parameters for new users' login keys (derived on the client).
    pub login_kdf: KdfConfig,
    /// Where file contents (blobs) are kept.
    pub storage: StorageConfig,
    /// Where the metadata (users, vaults, records, files) is kept.
    pub metadata: MetadataConfig,
    /// Prometheus metrics (off unless `listen` is given).
    pub metrics: MetricsConfig,
}

/// The metrics listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to serve `GET /metrics` on, in plain HTTP without
    /// authentication: a loopback address, or one only the monitoring
    /// network reaches. Absent: no metrics.
    pub listen: Option<SocketAddr>,
}

/// Where the metadata lives: SQLite in `data_dir` (the default, one
/// instance), or a PostgreSQL database several instances share.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    /// `sqlite` or `postgres`.
    pub backend: MetadataBackend,
    /// Settings of the `postgres` backend.
    pub postgres: PostgresConfig,
}

/// The metadata backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetadataBackend {
    /// `data_dir/meta.db`.
    #[default]
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// A PostgreSQL database. The password is never written here: it is read
/// from `password_file`, or else from the environment variable
/// `password_env` names, so the file can be shown and copied freely.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database`, or the `key=value` form
    /// (without a password).
    pub url: String,
    /// A file holding the password (its first line).
    pub password_file: Option<PathBuf>,
    /// The environment variable holding the password, if no file is given.
    pub password_env: String,
    /// Connections each instance keeps at most.
    pub pool_size: usize,
    /// `disable` (plain TCP: a private network or a tunnel) or `require`
    /// (TLS, the database's certificate checked against `ca_file`).
    pub tls: PgTls,
    /// The PEM certificates of the authorities that sign the database's
    /// certificate (with `tls = "require"`); its name must match the URL's host.
    pub ca_file: Option<PathBuf>,
}

/// TLS to PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgTls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS or no connection, with the certificate verified.
    Require,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            password_file: None,
            password_env: "VAULTFS_PG_PASSWORD".into(),
            pool_size: 16,
            tls: PgTls::Disable,
            ca_file: None,
        }
    }
}

impl PostgresConfig {
    /// The connection settings, with the password read from its file or
    /// variable (errors name the key, never the password).
    pub fn connection(&self) -> Result<tokio_postgres::Config, String> {
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|e| format!("key `metadata.postgres.url`: {e}"))?;
        if config.get_password().is_some() {
            return Err("key `metadata.postgres.url`: holds a password; put it in `password_file` or the \
                        variable `password_env` names instead"
                .into());
        }
        if config.get_hosts().is_empty() {
            return Err("key `metadata.postgres.url`: names no host".into());
        }
        // TLS is this file's `tls` key, so that it is never weaker than it
        // reads (tokio-postgres's `sslmode=require` does not verify).
        if config.get_ssl_mode() != tokio_postgres::config::SslMode::Prefer {
            return Err("key `metadata.postgres.url`: leave `sslmode` out and set `tls` instead".into());
        }
        config.ssl_mode(match self.tls {
            PgTls::Disable => tokio_postgres::config::SslMode::Disable,
            PgTls::Require => tokio_postgres::config::SslMode::Require,
        });
        let password = match &self.password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("key `metadata.postgres.password_file`: reading {}: {e}", path.display())
                })?;
                Some(text.lines().next().unwrap_or("").to_string())
            }
            None => std::env::var(&self.password_env).ok(),
        };
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            config.password(password);
        }
        if config.get_application_name().is_none() {
            config.application_name("vaultfs");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        Ok(config)
    }
}

/// Where blobs live: `data_dir/blobs` (the default), or an S3-compatible store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `local` or `s3`.
    pub backend: StorageBackend,
    /// Settings of the `s3` backend.
    pub s3: S3Config,
}

/// The blob store backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Files under `data_dir/blobs`.
    #[default]
    Local,
    /// Objects in an S3-compatible bucket.
    S3,
}

/// An S3-compatible bucket. Anything not given here is taken from the usual
/// AWS environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
/// AWS_REGION, AWS_ENDPOINT, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket name (must exist).
    pub bucket: String,
    /// Endpoint URL for stores other than AWS, e.g. `https://minio.example:9000`.
    pub endpoint: Option<String>,
    /// Region (AWS); most other stores accept any value.
    pub region: Option<String>,
    /// Key prefix of the blobs, e.g. `vaultfs/blobs`.
    pub prefix: String,
    /// Access key id; with `secret_access_key`.
    pub access_key_id: Option<String>,
    /// Secret access key; with `access_key_id`.
    pub secret_access_key: Option<String>,
    /// Allow an `http://` endpoint (loopback test servers; the bucket then sees
    /// only ciphertext, but request signatures and metadata travel in the clear).
    pub allow_http: bool,
    /// `bucket.endpoint/key` addressing instead of `endpoint/bucket/key`.
    pub virtual_hosted_style: bool,
    /// Multipart part size in MiB (S3 allows 5 to 5120).
    pub part_size_mib: u64,
    /// Parts of one upload in flight at once.
    pub concurrency: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            endpoint: None,
            region: None,
            prefix: "blobs".into(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            virtual_hosted_style: false,
            part_size_mib: 8,
            concurrency: 2,
        }
    }
}

/// TLS settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key`. Absent: a self-signed certificate in
    /// `data_dir/tls/` is created on first start.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Host names and addresses the self-signed certificate is valid for.
    pub hostnames: Vec<String>,
}

/// Limits, as written in the file.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest upload in bytes.
    pub upload_limit: u64,
    /// Largest end-to-end encrypted file in bytes.
    pub e2e_limit: u64,
    /// Longest image edge in pixels before reduction.
    pub image_max_edge: u32,
}

/// Argon2id parameters, as written in the file.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdfConfig {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            data_dir: PathBuf::from("vaultfs-data"),
            plain_http: false,
            tls: TlsConfig::default(),
            default_limits: LimitsConfig::default(),
            session_ttl_secs: 12 * 3600,
            lock_ttl_secs: 30,
            shutdown_grace_secs: 60,
            login_kdf: KdfConfig::default(),
            storage: StorageConfig::default(),
            metadata: MetadataConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            hostnames: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = Limits::DEFAULT;
        LimitsConfig {
            upload_limit: d.upload_limit,
            e2e_limit: d.e2e_limit,
            image_max_edge: d.image_max_edge,
        }
    }
}

impl Default for KdfConfig {
    fn default() -> Self {
        let d = crate::crypto::KdfParams::DEFAULT;
        KdfConfig { m_cost_kib: d.m_cost_kib, t_cost: d.t_cost, p_cost: d.p_cost }
    }
}

impl From<LimitsConfig> for Limits {
    fn from(c: LimitsConfig) -> Self {
        Limits { upload_limit: c.upload_limit, e2e_limit: c.e2e_limit, image_max_edge: c.image_max_edge }
    }
}

impl From<KdfConfig> for KdfWire {
    fn from(c: KdfConfig) -> Self {
        KdfWire { m_cost_kib: c.m_cost_kib, t_cost: c.t_cost, p_cost: c.p_cost }
    }
}

/// A configuration error, naming the file and (from the TOML parser) line and key.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with line and column where known.
    pub message: String,
}

impl ServerConfig {
    /// Parses `text` read from `path`, then checks values that parse but make no sense.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError { path: path.to_path_buf(), message };
        let config: ServerConfig =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { path: path.to_path_buf(), message: e.to_string() })?;
        Self::parse(path, &text)
    }

    /// Checks combinations the types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.plain_http && !self.listen.ip().is_loopback() {
            return Err(format!(
                "key `plain_http`: plain HTTP is only allowed on a loopback address, not {}",
                self.listen.ip()
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("keys `tls.cert` and `tls.key`: give both or neither".into());
        }
        let l = self.default_limits;
        if l.e2e_limit > l.upload_limit {
            return Err("key `default_limits.e2e_limit`: must not exceed `upload_limit`".into());
        }
        let k = self.login_kdf;
        crate::crypto::KdfParams { m_cost_kib: k.m_cost_kib, t_cost: k.t_cost, p_cost: k.p_cost }
            .validate()
            .map_err(|e| format!("table `login_kdf`: {e}"))?;
        if self.session_ttl_secs == 0 {
            return Err("key `session_ttl_secs`: must be positive".into());
        }
        if !(3..=3600).contains(&self.lock_ttl_secs) {
            return Err("key `lock_ttl_secs`: must be between 3 and 3600".into());
        }
        if self.shutdown_grace_secs > 3600 {
            return Err("key `shutdown_grace_secs`: at most 3600".into());
        }
        if self.metrics.listen.is_some_and(|m| m == self.listen) {
            return Err(
                "key `metrics.listen`: must differ from `listen` (metrics have a listener of their own)"
                    .into(),
            );
        }
        if self.metadata.backend == MetadataBackend::Postgres {
            let pg = &self.metadata.postgres;
            if pg.url.trim().is_empty() {
                return Err(
                    "key `metadata.postgres.url`: required with `metadata.backend = \"postgres\"`".into()
                );
            }
            if pg.pool_size == 0 || pg.pool_size > 1000 {
                return Err("key `metadata.postgres.pool_size`: must be between 1 and 1000".into());
            }
            if pg.tls == PgTls::Require && pg.ca_file.is_none() {
                return Err(
                    "key `metadata.postgres.ca_file`: required with `tls = \"require\"` (the authority \
                            that signs the database's certificate)"
                        .into(),
                );
            }
            let mut without_password = pg.clone();
            without_password.password_file = None;
            without_password.password_env = String::new();
            without_password.connection()?;
        }
        if self.storage.backend == StorageBackend::S3 {
            let s3 = &self.storage.s3;
            if s3.bucket.trim().is_empty() {
                return Err("key `storage.s3.bucket`: required with `storage.backend = \"s3\"`".into());
            }
            if !(5..=5120).contains(&s3.part_size_mib) {
                return Err("key `storage.s3.part_size_mib`: must be between 5 and 5120".into());
            }
            if s3.concurrency == 0 || s3.concurrency > 64 {
                return Err("key `storage.s3.concurrency`: must be between 1 and 64".into());
            }
            if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
                return Err(
                    "keys `storage.s3.access_key_id` and `storage.s3.secret_access_key`: give both or neither".into()
                );
            }
            if s3.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) && !s3.allow_http {
                return Err("key `storage.s3.endpoint`: an http:// endpoint needs `allow_http = true`".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerConfig, String> {
        ServerConfig::parse(Path::new("server.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_s3_backend_is_checked() {
        let c = parse("[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\n").unwrap();
        assert_eq!(c.storage.backend, StorageBackend::S3);
        assert_eq!((c.storage.s3.part_size_mib, c.storage.s3.prefix.as_str()), (8, "blobs"));
        let e = parse("[storage]\nbackend = \"s3\"\n").unwrap_err();
        assert!(e.contains("storage.s3.bucket"), "{e}");
        let e = parse(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\n",
        )
        .unwrap_err();
        assert!(e.contains("allow_http"), "{e}");
        let e = parse("[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\npart_size_mib = 1\n")
            .unwrap_err();
        assert!(e.contains("part_size_mib"), "{e}");
        let e = parse("[storage]\nbackend = \"ftp\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("ftp"), "{e}");
        let e = parse("[storage.s3]\nbuckett = \"b\"\n").unwrap_err();
        assert!(e.contains("buckett"), "{e}");
    }

    #[test]
    fn the_postgres_backend_is_checked_and_its_password_never_in_the_file() {
        let c = parse("[metadata]\nbackend = \"postgres\"\n[metadata.postgres]\nurl = \"postgres://vaultfs@db:5432/v\"\n")
            .unwrap();
        assert_eq!((c.metadata.backend, c.metadata.postgres.pool_size), (MetadataBackend::Postgres, 16));
        let e = parse("[metadata]\nbackend = \"postgres\"\n").unwrap_err();
        assert!(e.contains("metadata.postgres.url"), "{e}");
        let e = parse(
            "[metadata]\nbackend = \"postgres\"\n[metadata.postgres]\nurl = \"postgres://v:hunter2@db/v\"\n",
        )
        .unwrap_err();
        assert!(e.contains("password_file") && !e.contains("hunter2"), "{e}");
        let pg = "[metadata]\nbackend = \"postgres\"\n[metadata.postgres]\nurl = \"postgres://v@db/v";
        let e = parse(&format!("{pg}\"\ntls = \"require\"\n")).unwrap_err();
        assert!(e.contains("ca_file"), "{e}");
        let e = parse(&format!("{pg}?sslmode=require\"\n")).unwrap_err();
        assert!(e.contains("sslmode") && e.contains("`tls`"), "{e}");
        let c = parse(&format!("{pg}\"\ntls = \"require\"\nca_file = \"/ca.pem\"\n")).unwrap();
        assert_eq!(
            c.metadata.postgres.connection().unwrap().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let e = parse("[metadata]\nbackend = \"mysql\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("mysql"), "{e}");
        // The password comes from the file named, first line only.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let pg = PostgresConfig {
            url: "postgres://vaultfs@db/v".into(),
            password_file: Some(file.clone()),
            ..PostgresConfig::default()
        };
        assert_eq!(pg.connection().unwrap().get_password(), Some(&b"s3cret"[..]));
        // Nor does the debug form of the settings show it.
        let shown = format!(
            "{:?}",
            crate::server::meta::postgres::PgSettings {
                config: pg.connection().unwrap(),
                pool_size: 1,
                tls: None
            }
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        std::fs::remove_file(&file).unwrap();
        let e = pg.connection().unwrap_err();
        assert!(e.contains("password_file") && e.contains("pw"), "{e}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(Limits::from(c.default_limits), Limits::DEFAULT);
    }

    #[test]
    fn unknown_keys_are_refused_with_file_line_and_key() {
        let e = parse("listen = \"127.0.0.1:1\"\nlisten_adress = 3\n").unwrap_err();
        assert!(e.starts_with("server.toml: "), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("listen_adress"), "{e}");
        let e = parse("[default_limits]\nupload_limt = 1\n").unwrap_err();
        assert!(e.contains("upload_limt"), "{e}");
    }

    #[test]
    fn wrong_types_and_bad_values_are_refused() {
        assert!(parse("listen = 5").unwrap_err().contains("listen"));
        let e = parse("listen = \"0.0.0.0:80\"\nplain_http = true").unwrap_err();
        assert!(e.contains("plain_http") && e.contains("loopback"), "{e}");
        assert!(parse("listen = \"127.0.0.1:80\"\nplain_http = true").is_ok());
        assert!(parse("[tls]\ncert = \"/x\"").unwrap_err().contains("tls.key"));
        assert!(parse("[default_limits]\ne2e_limit = 500000000").unwrap_err().contains("e2e_limit"));
        assert!(parse("[login_kdf]\nt_cost = 0").unwrap_err().contains("login_kdf"));
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/server.toml");
        ServerConfig::load(&path).unwrap();
    }
}
