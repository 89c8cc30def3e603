//! The login key: what the client proves to the server instead of a passphrase.
//!
//! ```text
//! login key = SHA-256("vaultfs/login-key/v2" || len(server) || server || len(user) || user
//!                     || Argon2id(passphrase, salt, params))
//! ```
//!
//! The server hands out the salt and parameters (`/v1/prelogin`) and stores only a
//! hash of the login key. The outer hash means that even a hostile server that
//! hands out the wallet's own salt and parameters learns only a one-way function
//! of the wallet key, never the key itself; and a client refuses parameters below
//! a floor, so a hostile server cannot make the login key cheap to brute-force.
//!
//! Version 2 binds the key to the server the client verified and to the user
//! name. Salt and parameters come from the server and prove nothing, so without
//! the binding a hostile server could relay another server's pre-login answer
//! for the same user name and collect a login key that works there (for a user
//! who reuses the passphrase). The server identity is what the client checks
//! the server by ([`crate::remote::http::ServerAccess::identity`]: the pinned
//! certificate, or the origin a CA vouches for), which another server cannot
//! present. Version 1 (no binding) is derived only to upgrade an old login.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::{CryptoError, Result};
use super::wallet::KdfParams;

const LOGIN_DOMAIN_V1: &[u8] = b"vaultfs/login-key/v1";
const LOGIN_DOMAIN_V2: &[u8] = b"vaultfs/login-key/v2";
/// The login-key version this build derives for new logins.
pub const LOGIN_KEY_VERSION: u8 = 2;
/// Longest server identity or user name bound into a login key.
const MAX_BOUND_LEN: usize = u16::MAX as usize;

/// What a version-2 login key is bound to.
#[derive(Debug, Clone, Copy)]
pub struct LoginBinding<'a> {
    /// The server's identity as this client verifies it.
    pub server: &'a str,
    /// The user name.
    pub user: &'a str,
}

/// Argon2id of the passphrase with the server's salt and parameters, checked
/// against the client's floor: the costly step, shared by the login-key
/// versions (an upgrade from version 1 derives both from one run).
pub struct LoginStretch(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for LoginStretch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginStretch(<redacted>)")
    }
}

impl LoginStretch {
    /// Stretches `passphrase`. Refuses parameters weaker than `floor` or a salt
    /// shorter than 16 bytes, before any work.
    pub fn new(passphrase: &[u8], salt: &[u8], params: KdfParams, floor: KdfParams) -> Result<Self> {
        if params.is_weaker_than(&floor) {
            return Err(CryptoError::KdfParams(format!(
                "the server asks for Argon2id with {} KiB and {} passes, below this client's minimum of {} KiB and {} passes",
                params.m_cost_kib, params.t_cost, floor.m_cost_kib, floor.t_cost
            )));
        }
        if salt.len() < 16 {
            return Err(CryptoError::KdfParams("login salt shorter than 16 bytes".into()));
        }
        Ok(LoginStretch(params.stretch(passphrase, salt)?))
    }

    /// The version-2 login key, bound to `binding`.
    pub fn key(&self, binding: LoginBinding<'_>) -> Result<Zeroizing<[u8; 32]>> {
        if binding.server.len() > MAX_BOUND_LEN || binding.user.len() > MAX_BOUND_LEN {
            return Err(CryptoError::Misuse("server identity or user name too long"));
        }
        let mut h = Sha256::new();
        h.update(LOGIN_DOMAIN_V2);
        for part in [binding.server, binding.user] {
            h.update((part.len() as u16).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.update(&self.0[..]);
        Ok(finish(h))
    }

    /// The version-1 login key (bound to nothing): only to log in once with a
    /// login made by an older vaultfs and replace it with a version-2 key.
    pub fn legacy_key(&self) -> Zeroizing<[u8; 32]> {
        let mut h = Sha256::new();
        h.update(LOGIN_DOMAIN_V1);
        h.update(&self.0[..]);
        finish(h)
    }
}

fn finish(h: Sha256) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&h.finalize());
    out
}

/// Derives the (version 2) login key, bound to `binding`. Refuses parameters
/// weaker than `floor` or a salt shorter than 16 bytes.
pub fn derive_login_key(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
    floor: KdfParams,
    binding: LoginBinding<'_>,
) -> Result<Zeroizing<[u8; 32]>> {
    LoginStretch::new(passphrase, salt, params, floor)?.key(binding)
}

/// Derives a version-1 login key (see [`LoginStretch::legacy_key`]).
pub fn derive_legacy_login_key(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
    floor: KdfParams,
) -> Result<Zeroizing<[u8; 32]>> {
    Ok(LoginStretch::new(passphrase, salt, params, floor)?.legacy_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfParams = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };
    const A: LoginBinding<'static> = LoginBinding { server: "tls-cert:sha256:aa", user: "alice" };

    #[test]
    fn deterministic_and_separated_from_the_wallet_key() {
        let salt = [7u8; 16];
        let a = derive_login_key(b"pass", &salt, CHEAP, CHEAP, A).unwrap();
        let b = derive_login_key(b"pass", &salt, CHEAP, CHEAP, A).unwrap();
        assert_eq!(a, b);
        assert_ne!(&a[..], &CHEAP.stretch(b"pass", &salt).unwrap()[..]);
        assert_ne!(a, derive_login_key(b"pasS", &salt, CHEAP, CHEAP, A).unwrap());
        assert_ne!(a, derive_legacy_login_key(b"pass", &salt, CHEAP, CHEAP).unwrap());
    }

    /// The same passphrase, salt and parameters give another key for another
    /// server or user, so a key collected by one server opens nothing elsewhere;
    /// the length prefixes keep ("ab", "c") and ("a", "bc") apart.
    #[test]
    fn the_key_is_bound_to_the_server_and_the_user() {
        let salt = [7u8; 16];
        let key =
            |server, user| derive_login_key(b"pass", &salt, CHEAP, CHEAP, LoginBinding { server, user });
        let base = key("tls-cert:sha256:aa", "alice").unwrap();
        assert_ne!(base, key("tls-cert:sha256:bb", "alice").unwrap());
        assert_ne!(base, key("tls-cert:sha256:aa", "alicf").unwrap());
        assert_ne!(key("ab", "c").unwrap(), key("a", "bc").unwrap());
        // A fixed vector (the same text as docs/FORMAT.md "Login key").
        let known = derive_login_key(b"pass", &[1; 16], CHEAP, CHEAP, A).unwrap();
        let mut h = Sha256::new();
        h.update(b"vaultfs/login-key/v2\x00\x12tls-cert:sha256:aa\x00\x05alice");
        h.update(&CHEAP.stretch(b"pass", &[1; 16]).unwrap()[..]);
        assert_eq!(&known[..], &h.finalize()[..]);
    }

    #[test]
    fn weak_parameters_and_short_salts_are_refused() {
        let floor = KdfParams::DEFAULT;
        let e = derive_login_key(b"p", &[0; 16], CHEAP, floor, A).unwrap_err();
        assert!(e.to_string().contains("below this client's minimum"), "{e}");
        assert!(derive_login_key(b"p", &[0; 8], CHEAP, CHEAP, A).is_err());
        assert!(derive_legacy_login_key(b"p", &[0; 16], CHEAP, floor).is_err());
    }
}
