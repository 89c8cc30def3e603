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
    /// Argon2id parameters for new users' login keys (derived on the client).
    pub login_kdf: KdfConfig,
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
            login_kdf: KdfConfig::default(),
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
