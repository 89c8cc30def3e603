//! vaultfs: mount end-to-end encrypted vaults from a vault server as a drive.
//!
//! Layout: [`crypto`] is the pure vault format; [`cli`] parses the command line
//! and dispatches. The mount daemon (`fs`, `cache`), the server and the remote
//! client land in later milestones; see README.md for what works today.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cli;
pub mod crypto;
pub mod fs;
#[doc(hidden)]
pub mod fuzz;
pub mod ids;
pub mod policy;
pub mod protocol;
pub mod remote;
pub mod server;
