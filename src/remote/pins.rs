//! Pinned user keys: which public key this machine has accepted as whose.
//!
//! The server hands out users' public keys, and a hostile one could hand out a
//! key of its own instead of a colleague's: a share sealed for it would give the
//! server the vault key, and a share sealed with it would give a member a vault
//! of the server's making. So a key is used only once the user confirmed it
//! (compared its fingerprint with the colleague's `vaultfs whoami`): the
//! confirmation pins it, and a later different key is refused until the user
//! confirms that one. Nothing is pinned without the user. `pins.toml` (beside
//! `login.toml`, mode 0600) holds no secret: server identity, user name and
//! fingerprint; losing it only means being asked again. It is read afresh at
//! each check, so a running mount sees a key confirmed meanwhile.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::account::AccountError;
use crate::crypto::Fingerprint;

/// File name of the pins inside the config directory.
pub const PINS_FILE: &str = "pins.toml";

/// One pinned key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pin {
    /// The server identity (as the login is bound to it).
    server: String,
    /// The user on that server.
    user: String,
    /// Their key's fingerprint.
    fingerprint: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinsFile {
    #[serde(default, rename = "pin")]
    pins: Vec<Pin>,
}

/// How a key the server offers compares with what this machine pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCheck {
    /// The pinned key.
    Pinned,
    /// Nothing pinned for this user yet.
    New,
    /// Another key than the pinned one.
    Changed {
        /// What was pinned.
        pinned: Fingerprint,
    },
}

/// The pins of one server identity, loaded from `pins.toml` (or kept in
/// memory only, for tests and the demo).
#[derive(Debug)]
pub struct Pins {
    path: Option<PathBuf>,
    server: String,
    file: PinsFile,
}

impl Pins {
    /// Pins kept in memory only.
    pub fn in_memory(server: &str) -> Self {
        Pins { path: None, server: server.to_string(), file: PinsFile::default() }
    }

    /// Reads `path` (a missing file is no pins) for `server`.
    pub fn load(path: &Path, server: &str) -> Result<Self, AccountError> {
        let err = |message: String| AccountError::LoginFile { path: path.to_path_buf(), message };
        let file = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| err(e.to_string().trim_end().to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PinsFile::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        let pins = Pins { path: Some(path.to_path_buf()), server: server.to_string(), file };
        for p in &pins.file.pins {
            if p.fingerprint.parse::<Fingerprint>().is_err() {
                return Err(err(format!("the pin of {} holds no fingerprint: {:?}", p.user, p.fingerprint)));
            }
        }
        Ok(pins)
    }

    /// How `offered` compares with the pin of `user` (the file read afresh;
    /// if it cannot be read now, as it was when last read).
    pub fn check(&mut self, user: &str, offered: Fingerprint) -> PinCheck {
        if let Err(e) = self.reload() {
            tracing::warn!(error = %e, "cannot read the pinned keys again; using them as last read");
        }
        match self.get(user) {
            None => PinCheck::New,
            Some(fp) if fp == offered => PinCheck::Pinned,
            Some(pinned) => PinCheck::Changed { pinned },
        }
    }

    /// The fingerprint pinned for `user`.
    pub fn get(&self, user: &str) -> Option<Fingerprint> {
        self.file
            .pins
            .iter()
            .find(|p| p.server == self.server && p.user == user)
            .and_then(|p| p.fingerprint.parse().ok())
    }

    /// Pins `fingerprint` for `user` (replacing a pin) and writes the file
    /// (read afresh first, so pins another process made meanwhile stay).
    pub fn set(&mut self, user: &str, fingerprint: Fingerprint) -> Result<(), AccountError> {
        self.reload()?;
        let server = self.server.clone();
        self.file.pins.retain(|p| !(p.server == server && p.user == user));
        self.file.pins.push(Pin { server, user: user.to_string(), fingerprint: fingerprint.to_string() });
        self.save()
    }

    /// Forgets the pin of `user` (so their key counts as unconfirmed again)
    /// and writes the file; returns whether there was one.
    pub fn remove(&mut self, user: &str) -> Result<bool, AccountError> {
        self.reload()?;
        let server = self.server.clone();
        let before = self.file.pins.len();
        self.file.pins.retain(|p| !(p.server == server && p.user == user));
        let removed = self.file.pins.len() != before;
        if removed {
            self.save()?;
        }
        Ok(removed)
    }

    fn reload(&mut self) -> Result<(), AccountError> {
        if let Some(path) = self.path.clone() {
            *self = Pins::load(&path, &self.server)?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), AccountError> {
        let Some(path) = &self.path else { return Ok(()) };
        let err = |e: String| AccountError::LoginFile { path: path.clone(), message: e };
        let text = toml::to_string(&self.file).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        super::account::write_private(path, text.as_bytes()).map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_per_server_and_user_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.toml");
        let (a, b) = (Fingerprint([1; 15]), Fingerprint([2; 15]));
        let mut pins = Pins::load(&path, "tls-cert:sha256:aa").unwrap();
        assert_eq!(pins.check("bob", a), PinCheck::New);
        pins.set("bob", a).unwrap();
        let mut other = Pins::load(&path, "tls-cert:sha256:bb").unwrap();
        assert_eq!(other.check("bob", b), PinCheck::New, "another server's pins do not count");
        other.set("bob", b).unwrap();
        let mut again = Pins::load(&path, "tls-cert:sha256:aa").unwrap();
        assert_eq!(again.check("bob", a), PinCheck::Pinned);
        assert_eq!(again.check("bob", b), PinCheck::Changed { pinned: a });
        assert_eq!(Pins::load(&path, "tls-cert:sha256:bb").unwrap().check("bob", b), PinCheck::Pinned);
        // A pin another process wrote meanwhile is seen, and kept by a set.
        let mut first = Pins::load(&path, "tls-cert:sha256:aa").unwrap();
        let mut second = Pins::load(&path, "tls-cert:sha256:aa").unwrap();
        second.set("carol", b).unwrap();
        assert_eq!(first.check("carol", b), PinCheck::Pinned);
        first.set("dave", a).unwrap();
        assert_eq!(second.check("carol", b), PinCheck::Pinned);
        assert_eq!(second.check("dave", a), PinCheck::Pinned);
        // Removing a pin: that user's key is new again, others stay.
        assert!(second.remove("dave").unwrap() && !second.remove("dave").unwrap());
        assert_eq!(first.check("dave", a), PinCheck::New);
        assert_eq!(first.check("carol", b), PinCheck::Pinned);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "[[pin]]\nserver = \"x\"\nuser = \"bob\"\nfingerprint = \"nope\"\n").unwrap();
        let e = Pins::load(&path, "x").unwrap_err().to_string();
        assert!(e.contains("pins.toml") && e.contains("bob"), "{e}");
        std::fs::write(&path, "[[pin]]\nserver = \"x\"\nuser = \"bob\"\nfingerprnt = \"a\"\n").unwrap();
        let e = Pins::load(&path, "x").unwrap_err().to_string();
        assert!(e.contains("fingerprnt"), "{e}");
    }
}
