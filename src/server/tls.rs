//! The server's TLS identity: a configured certificate, or a self-signed one made
//! on first start and kept in the data directory.
//!
//! Clients pin the SHA-256 fingerprint of the certificate (as ssh pins host keys),
//! so the server prints it at every start; `vaultfs login` shows it for comparison.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("{path}: not a usable PEM {what}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Certificate or key.
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// Generating or installing the certificate failed.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// `sha256:` followed by the lowercase hex SHA-256 of a certificate's DER bytes.
pub fn fingerprint(cert_der: &[u8]) -> String {
    format!("sha256:{}", crate::ids::hex_encode(&Sha256::digest(cert_der)))
}

/// The ring-based rustls crypto provider used on both sides.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Where the self-signed identity lives inside the data directory.
pub fn self_signed_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Creates a self-signed certificate for `hostnames` unless one exists.
/// Returns whether a new one was made.
pub fn ensure_self_signed(data_dir: &Path, hostnames: &[String]) -> Result<bool, TlsError> {
    let (cert_path, key_path) = self_signed_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok(false);
    }
    let dir = cert_path.parent().unwrap_or(data_dir);
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io { path: dir.to_path_buf(), source })?;
    let certified =
        rcgen::generate_simple_self_signed(hostnames.to_vec()).map_err(|e| TlsError::Setup(e.to_string()))?;
    // Key first, owner-only; the certificate is public.
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(&cert_path);
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// A rustls server configuration from PEM files, and the certificate's fingerprint.
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Arc<rustls::ServerConfig>, String), TlsError> {
    let pem = |path: &Path, what, detail: String| TlsError::Pem { path: path.to_path_buf(), what, detail };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| pem(cert_path, "certificate", e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert_path, "certificate", e.to_string()))?;
    let first =
        certs.first().ok_or_else(|| pem(cert_path, "certificate", "no certificate in file".into()))?;
    let fp = fingerprint(first);
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem(key_path, "private key", e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok((Arc::new(config), fp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_is_made_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_self_signed(dir.path(), &["localhost".into()]).unwrap());
        assert!(!ensure_self_signed(dir.path(), &["localhost".into()]).unwrap());
        let (cert, key) = self_signed_paths(dir.path());
        let mode = std::fs::metadata(&key).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let (_, fp1) = server_config(&cert, &key).unwrap();
        let (_, fp2) = server_config(&cert, &key).unwrap();
        assert_eq!(fp1, fp2);
        assert!(fp1.starts_with("sha256:") && fp1.len() == 7 + 64);
    }

    #[test]
    fn unreadable_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("cert.pem");
        std::fs::write(&bogus, "not pem").unwrap();
        let err = server_config(&bogus, &bogus).unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");
    }
}
