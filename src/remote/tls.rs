//! How the client decides to trust the server's certificate.
//!
//! Either the certificate's SHA-256 fingerprint is pinned (trust on first use,
//! as ssh does with host keys: `vaultfs login` shows the fingerprint and stores
//! it), or the certificate must chain to a CA from a PEM file and match the host
//! name. Pinning checks the exact certificate, so host name and expiry do not
//! matter; the TLS handshake signature is still verified, so only the holder of
//! the pinned certificate's key can complete it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::server::tls::{fingerprint, provider};

/// What the client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the certificate with this fingerprint (`sha256:<hex>`).
    Pinned(String),
    /// Certificates chaining to the CAs in this PEM file.
    CaFile(PathBuf),
}

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The CA file could not be read or holds no usable certificate.
    #[error("{path}: {detail}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The fingerprint is not of the form `sha256:` + 64 hex digits.
    #[error("invalid certificate fingerprint {0:?}: expected sha256: followed by 64 hex digits")]
    BadFingerprint(String),
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Normalizes a fingerprint as typed by a person (case, colons).
pub fn normalize_fingerprint(fp: &str) -> Result<String, TrustError> {
    let hex: String = fp.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
    let hex = hex.to_ascii_lowercase();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(format!("sha256:{hex}"))
    } else {
        Err(TrustError::BadFingerprint(fp.to_string()))
    }
}

#[derive(Debug)]
struct PinnedVerifier {
    pinned: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fp.clone());
        }
        match &self.pinned {
            // Probe mode: record the fingerprint, let the caller decide.
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) if *pin == fp => Ok(ServerCertVerified::assertion()),
            Some(pin) => Err(rustls::Error::General(format!(
                "server certificate {fp} does not match the pinned {pin}: the server's certificate changed, \
                 or someone is intercepting the connection"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn with_verifier(verifier: Arc<dyn ServerCertVerifier>) -> Result<rustls::ClientConfig, TrustError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn ca_config(path: &Path) -> Result<rustls::ClientConfig, TrustError> {
    let bad = |detail: String| TrustError::CaFile { path: path.to_path_buf(), detail };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in file".into()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TrustError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client TLS configuration enforcing `trust`.
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, TrustError> {
    match trust {
        Trust::Pinned(fp) => with_verifier(Arc::new(PinnedVerifier {
            pinned: Some(normalize_fingerprint(fp)?),
            seen: Arc::default(),
            provider: provider(),
        })),
        Trust::CaFile(path) => ca_config(path),
    }
}

/// Where the probe configuration records the fingerprint it saw.
pub type SeenFingerprint = Arc<Mutex<Option<String>>>;

/// A configuration that accepts any certificate and records its fingerprint, for
/// showing it to the user before pinning. Never used to send credentials.
pub fn probe_config() -> Result<(rustls::ClientConfig, SeenFingerprint), TrustError> {
    let seen = Arc::new(Mutex::new(None));
    let verifier = PinnedVerifier { pinned: None, seen: Arc::clone(&seen), provider: provider() };
    Ok((with_verifier(Arc::new(verifier))?, seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalized_and_checked() {
        let hex = "AB".repeat(32);
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{hex}")).unwrap(),
            format!("sha256:{}", "ab".repeat(32))
        );
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(normalize_fingerprint(&colons).unwrap(), format!("sha256:{}", "ab".repeat(32)));
        assert!(normalize_fingerprint("sha256:abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "").unwrap();
        let e = client_config(&Trust::CaFile(path)).unwrap_err().to_string();
        assert!(e.contains("ca.pem"), "{e}");
    }
}
