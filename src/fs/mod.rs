//! The mount: vaults as directories, records as directories, files as files.
//!
//! `core/` is the filesystem itself, generic over [`crate::remote::Remote`] and
//! testable without FUSE (tests/fs_core.rs runs it against the in-memory remote;
//! `core/mod.rs` maps each step of a request to the file that owns it);
//! `fuse.rs` is a thin adapter that forwards each kernel request to the core on
//! the async runtime and turns results into replies and errors into errno
//! (`error.rs`, one exhaustive mapping).

pub mod core;
pub mod error;
pub mod freshness;
pub mod fuse;
pub mod lognames;
pub mod reduce;

pub use self::core::{Attr, FsOptions, Ino, Invalidation, Kind, ReadData, VaultFs, ROOT};
pub use self::error::FsError;
