//! Server administration: users and their limits, and an overview of vaults.
//!
//! These act directly on the metadata store in the data directory (SQLite lets
//! them run beside a live server), so being an admin means having access to the
//! server machine's data directory. An admin never learns a user's passphrase:
//! adding a user creates a one-time enrollment code, and the user picks their
//! passphrase when they first log in with it.

use sha2::{Digest, Sha256};

use super::meta::{MetaError, MetaStore, User};
use crate::ids::{hex_encode, VaultId};
use crate::protocol::{KdfWire, Limits, Member};

/// Settings key under which the running server records what new users get.
const NEW_USER_DEFAULTS: &str = "new_user_defaults";

/// Limits and login-key parameters given to new users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NewUserDefaults {
    /// Limits.
    pub limits: Limits,
    /// Argon2id parameters of the login key.
    pub login_kdf: KdfWire,
}

/// Records the server's configured defaults, so `vaultfs admin` run without the
/// server's config file still creates users exactly as the server would (and the
/// fake pre-login answers for unknown users stay indistinguishable).
pub fn record_defaults(meta: &mut dyn MetaStore, d: NewUserDefaults) -> Result<(), AdminError> {
    let json = serde_json::to_vec(&d).map_err(|e| AdminError::BadLimits(e.to_string()))?;
    Ok(meta.put_setting(NEW_USER_DEFAULTS, &json)?)
}

/// The defaults the server last recorded, if any.
pub fn recorded_defaults(meta: &dyn MetaStore) -> Result<Option<NewUserDefaults>, AdminError> {
    Ok(meta.setting(NEW_USER_DEFAULTS)?.and_then(|v| serde_json::from_slice(&v).ok()))
}

/// Errors of admin commands.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A user name that cannot be used.
    #[error("invalid user name {0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// Limits that contradict each other.
    #[error("{0}")]
    BadLimits(String),
    /// The store refused.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// No randomness.
    #[error("random source: {0}")]
    Random(String),
}

fn check_name(name: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(AdminError::BadName(name.to_string()))
    }
}

/// Checks limits for consistency.
pub fn check_limits(l: &Limits) -> Result<(), AdminError> {
    if l.e2e_limit > l.upload_limit {
        return Err(AdminError::BadLimits(format!(
            "the end-to-end limit ({}) must not exceed the upload limit ({})",
            l.e2e_limit, l.upload_limit
        )));
    }
    if l.image_max_edge == 0 {
        return Err(AdminError::BadLimits("the image edge limit must be positive".into()));
    }
    Ok(())
}

fn random<const N: usize>() -> Result<[u8; N], AdminError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| AdminError::Random(e.to_string()))?;
    Ok(b)
}

/// A one-time enrollment code: 128 random bits as four groups of eight hex digits.
fn enrollment_code() -> Result<String, AdminError> {
    let hex = hex_encode(&random::<16>()?);
    Ok(hex
        .as_bytes()
        .chunks(8)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-"))
}

fn code_hash(code: &str) -> [u8; 32] {
    Sha256::digest(code.as_bytes()).into()
}

/// Adds a user; returns the one-time enrollment code to hand to them.
pub fn add_user(
    meta: &mut dyn MetaStore,
    name: &str,
    limits: Limits,
    kdf: KdfWire,
) -> Result<String, AdminError> {
    check_name(name)?;
    check_limits(&limits)?;
    let code = enrollment_code()?;
    meta.create_user(name, limits, &random::<16>()?, kdf, &code_hash(&code))?;
    Ok(code)
}

/// What a reset leaves a user: their wallet is kept, sealed as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalletAfterReset {
    /// They never stored one (not enrolled yet).
    None,
    /// It has a recovery slot: their recovery key restores it.
    Recoverable,
    /// Only the lost passphrase opens it.
    PassphraseOnly,
}

/// Issues a new enrollment code for a user who lost their passphrase. Their
/// sessions end; their wallet stays as it was: their recovery key (if they
/// made one) restores it at enrollment, otherwise they start over and the
/// vaults only they held keys for stay unreadable.
pub fn reset_user(meta: &mut dyn MetaStore, name: &str) -> Result<(String, WalletAfterReset), AdminError> {
    let code = enrollment_code()?;
    meta.reset_enrollment(name, &code_hash(&code), &random::<16>()?)?;
    let id = meta.user_by_name(name)?.ok_or(MetaError::NotFound("user"))?.id;
    // The wallet's header says whether it has a recovery slot (the server
    // cannot check it; this only chooses what the admin is told).
    let wallet = match meta.wallet(id)? {
        None => WalletAfterReset::None,
        Some((blob, _)) if crate::crypto::wallet::wallet_has_recovery_slot(&blob) => {
            WalletAfterReset::Recoverable
        }
        Some(_) => WalletAfterReset::PassphraseOnly,
    };
    Ok((code, wallet))
}

/// Removes a user.
pub fn remove_user(meta: &mut dyn MetaStore, name: &str) -> Result<(), AdminError> {
    Ok(meta.remove_user(name)?)
}

/// Sets a user's limits.
pub fn set_limits(meta: &mut dyn MetaStore, name: &str, limits: Limits) -> Result<(), AdminError> {
    check_limits(&limits)?;
    Ok(meta.set_limits(name, limits)?)
}

/// All users.
pub fn users(meta: &dyn MetaStore) -> Result<Vec<User>, AdminError> {
    Ok(meta.users()?)
}

/// All vaults with their members (names stay sealed: the admin sees ids).
pub fn vaults(meta: &dyn MetaStore) -> Result<Vec<(VaultId, Vec<Member>)>, AdminError> {
    Ok(meta.all_vaults()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::meta::Meta;

    fn meta() -> Meta {
        Meta::open(std::path::Path::new(":memory:")).unwrap()
    }

    const KDF: KdfWire = KdfWire { m_cost_kib: 64, t_cost: 1, p_cost: 1 };

    #[test]
    fn users_are_added_listed_limited_and_removed() {
        let mut m = meta();
        let code = add_user(&mut m, "alice", Limits::DEFAULT, KDF).unwrap();
        assert_eq!(code.len(), 35);
        assert!(matches!(
            add_user(&mut m, "alice", Limits::DEFAULT, KDF),
            Err(AdminError::Meta(MetaError::Exists(_)))
        ));
        let small = Limits { upload_limit: 10, e2e_limit: 5, image_max_edge: 100 };
        set_limits(&mut m, "alice", small).unwrap();
        assert_eq!(users(&m).unwrap()[0].limits, small);
        assert!(reset_user(&mut m, "alice").unwrap().0 != code);
        remove_user(&mut m, "alice").unwrap();
        assert!(users(&m).unwrap().is_empty());
        assert!(remove_user(&mut m, "alice").is_err());
    }

    #[test]
    fn bad_names_and_limits_are_refused() {
        let mut m = meta();
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(
                matches!(add_user(&mut m, bad, Limits::DEFAULT, KDF), Err(AdminError::BadName(_))),
                "{bad:?}"
            );
        }
        let bad = Limits { upload_limit: 1, e2e_limit: 2, image_max_edge: 1 };
        assert!(matches!(add_user(&mut m, "bob", bad, KDF), Err(AdminError::BadLimits(_))));
    }
}
