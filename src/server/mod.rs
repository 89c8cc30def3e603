//! `vaultfs serve`: the vault server (docs/API.md).
pub mod blob;
pub mod meta;
