//! The login key: what the client proves to the server instead of a passphrase.
//!
//! `login key = SHA-256("vaultfs/login-key/v1" || Argon2id(passphrase, salt, params))`
//!
//! The server hands out the salt and parameters (`/v1/prelogin`) and stores only a
//! hash of the login key. The outer hash means that even a hostile server that
//! hands out the wallet's own salt and parameters learns only a one-way function
//! of the wallet key, never the key itself; and a client refuses parameters below
//! a floor, so a hostile server cannot make the login key cheap to brute-force.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::{CryptoError, Result};
use super::wallet::KdfParams;

const LOGIN_DOMAIN: &[u8] = b"vaultfs/login-key/v1";

/// Derives the login key. Refuses parameters weaker than `floor` or a salt shorter
/// than 16 bytes.
pub fn derive_login_key(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
    floor: KdfParams,
) -> Result<Zeroizing<[u8; 32]>> {
    if params.is_weaker_than(&floor) {
        return Err(CryptoError::KdfParams(format!(
            "the server asks for Argon2id with {} KiB and {} passes, below this client's minimum of {} KiB and {} passes",
            params.m_cost_kib, params.t_cost, floor.m_cost_kib, floor.t_cost
        )));
    }
    if salt.len() < 16 {
        return Err(CryptoError::KdfParams("login salt shorter than 16 bytes".into()));
    }
    let stretched = params.stretch(passphrase, salt)?;
    let mut h = Sha256::new();
    h.update(LOGIN_DOMAIN);
    h.update(&stretched[..]);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&h.finalize());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfParams = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

    #[test]
    fn deterministic_and_separated_from_the_wallet_key() {
        let salt = [7u8; 16];
        let a = derive_login_key(b"pass", &salt, CHEAP, CHEAP).unwrap();
        let b = derive_login_key(b"pass", &salt, CHEAP, CHEAP).unwrap();
        assert_eq!(a, b);
        assert_ne!(&a[..], &CHEAP.stretch(b"pass", &salt).unwrap()[..]);
        assert_ne!(a, derive_login_key(b"pasS", &salt, CHEAP, CHEAP).unwrap());
    }

    #[test]
    fn weak_parameters_and_short_salts_are_refused() {
        let floor = KdfParams::DEFAULT;
        let e = derive_login_key(b"p", &[0; 16], CHEAP, floor).unwrap_err();
        assert!(e.to_string().contains("below this client's minimum"), "{e}");
        assert!(derive_login_key(b"p", &[0; 8], CHEAP, CHEAP).is_err());
    }
}
