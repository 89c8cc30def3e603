//! vaultfs: mount end-to-end encrypted vaults from a vault server as a drive.
//!
//! Layout: [`crypto`] is the pure vault format; [`fs`] is the mount (a thin
//! FUSE adapter over a core that knows nothing of FUSE) and [`cache`] holds
//! its plaintext in memory only; [`remote`] is the client the mount talks to
//! the server through, and [`server`] is `vaultfs serve`; [`policy`] holds the
//! mount policies; [`protocol`] and [`ids`] are shared by client and server;
//! [`cli`] parses the command line and dispatches; [`systemd`] tells systemd
//! how the daemons are doing. README.md says what works.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cli;
pub mod crypto;
pub mod fs;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod ids;
pub mod policy;
pub mod protocol;
pub mod remote;
pub mod server;
pub mod systemd;

/// An error with the causes under it, for people to read: libraries often
/// say only what failed ("error sending request", "creating a new object"),
/// and what a person needs is below (a certificate mismatch, a refused
/// password).
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
