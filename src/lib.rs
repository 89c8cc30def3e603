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
