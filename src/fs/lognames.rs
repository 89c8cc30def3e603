//! Names in log lines: never, unless the user asks for them.
//!
//! The daemon's log goes to stderr, and from there often to journald, which
//! keeps it on disk: a decrypted file name, record title or vault name in a log
//! line would break the promise that names never touch persistent storage.
//! Log lines therefore name objects by id. Where a name would help someone
//! debugging, the line passes it through [`shown`], which prints
//! `<name hidden>` unless `vaultfs mount --log-names` (or `VAULTFS_LOG_NAMES=1`)
//! turned names on; turning them on says so in the log.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// Environment variable that turns names in log lines on.
pub const LOG_NAMES_ENV: &str = "VAULTFS_LOG_NAMES";

static SHOW: AtomicBool = AtomicBool::new(false);

/// Turns names in log lines on (for this process), and says so.
pub fn show_names() {
    if !SHOW.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "--log-names is on: decrypted names of vaults, records and files appear in this log, and in \
             whatever keeps it (journald writes it to disk); turn it off once done debugging"
        );
    }
}

/// Whether names are shown.
pub fn showing_names() -> bool {
    SHOW.load(Ordering::Relaxed)
}

/// A name for a log line: itself if names are on, else a stand-in.
pub fn shown(name: &OsStr) -> Shown<'_> {
    Shown(name)
}

/// See [`shown`].
pub struct Shown<'a>(&'a OsStr);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if showing_names() {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("<name hidden>")
        }
    }
}

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
