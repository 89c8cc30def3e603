//! The filesystem core's error type and its one mapping to errno.

use crate::crypto::CryptoError;
use crate::remote::RemoteError;

/// Errors of filesystem operations. [`FsError::errno`] maps every variant (no
/// catch-all arm), so a new variant cannot silently become EIO.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    /// No such entry.
    #[error("no such file or directory")]
    NotFound,
    /// The name is taken.
    #[error("file exists")]
    Exists,
    /// A directory (record) that is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A directory was expected.
    #[error("not a directory")]
    NotDir,
    /// A file was expected.
    #[error("is a directory")]
    IsDir,
    /// A move between vaults (each vault has its own key): `mv` falls back to copy.
    #[error("cross-vault move")]
    CrossDevice,
    /// A name the server cannot store, or an invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A name longer than the filesystem allows.
    #[error("name too long")]
    NameTooLong,
    /// Not permitted here (e.g. creating files at the top level).
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    /// The server refused for lack of rights.
    #[error("permission denied: {0}")]
    Access(String),
    /// Over the upload limit.
    #[error("file too large: {0}")]
    TooBig(String),
    /// The server's storage is full.
    #[error("no space left on the server")]
    NoSpace,
    /// The extended attribute does not exist.
    #[error("no such attribute")]
    NoAttr,
    /// The vault is read-only by policy.
    #[error("read-only vault")]
    ReadOnly,
    /// Setting extended attributes is not supported.
    #[error("not supported")]
    NotSupported,
    /// The stored data failed authentication: tampered with, swapped or replayed.
    #[error("integrity check failed for {what}: {source}")]
    Integrity {
        /// Which file or name.
        what: String,
        /// What the crypto layer found.
        source: CryptoError,
    },
    /// The file was replaced (by another writer) while this handle had it
    /// open: reopen it to read the new content.
    #[error("the file was replaced while open")]
    Stale,
    /// The vault is seen using a key this client was not given: nothing new
    /// is sealed in it until a share brings that key (EACCES; an upload is
    /// kept and retried).
    #[error("permission denied: {0}")]
    KeyBehind(String),
    /// Another owner holds a conflicting lock (a lock asked for without waiting).
    #[error("locked by another owner")]
    WouldBlock,
    /// A wait for a lock was interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
    /// A lock could not be taken or given up on the server (outage, refusal).
    #[error("lock not available: {0}")]
    NoLock(String),
    /// The server cannot be reached or failed.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// Any other failure that leaves the operation undone.
    #[error("I/O error: {0}")]
    Io(String),
}

impl FsError {
    /// The errno reported to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::CrossDevice => libc::EXDEV,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Access(_) | FsError::KeyBehind(_) => libc::EACCES,
            FsError::TooBig(_) => libc::EFBIG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NoAttr => libc::ENODATA,
            FsError::NotSupported => libc::ENOTSUP,
            FsError::ReadOnly => libc::EROFS,
            FsError::Integrity { .. } => libc::EIO,
            FsError::Stale => libc::ESTALE,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::Interrupted => libc::EINTR,
            FsError::NoLock(_) => libc::ENOLCK,
            FsError::Unavailable(_) => libc::EIO,
            FsError::Io(_) => libc::EIO,
        }
    }

    /// How loudly to log it: expected outcomes (a missing name) are not worth a
    /// warning; integrity failures always are.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            FsError::NotFound
                | FsError::Exists
                | FsError::NotEmpty
                | FsError::NotDir
                | FsError::IsDir
                | FsError::CrossDevice
                | FsError::NoAttr
                | FsError::NotSupported
                | FsError::NameTooLong
                | FsError::ReadOnly
                | FsError::WouldBlock
                | FsError::Interrupted
        )
    }
}

impl FsError {
    /// Whether trying the same operation again cannot succeed: a refusal by
    /// rule or right, not an outage.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            FsError::TooBig(_)
                | FsError::ReadOnly
                | FsError::Access(_)
                | FsError::NotPermitted(_)
                | FsError::Integrity { .. }
        )
    }
}

impl From<RemoteError> for FsError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::NotFound(_) => FsError::NotFound,
            RemoteError::Conflict { current } => {
                FsError::Io(format!("version conflict (server has {current:?})"))
            }
            RemoteError::Exists(_) => FsError::Exists,
            RemoteError::Refused(_) => FsError::NotEmpty,
            RemoteError::TooLarge(m) => FsError::TooBig(m),
            RemoteError::Forbidden(m) => FsError::Access(m),
            RemoteError::E2eRequired => {
                FsError::Access("the vault accepts only end-to-end encrypted files".into())
            }
            RemoteError::Unauthorized(m) => FsError::Access(m),
            RemoteError::StorageFull => FsError::NoSpace,
            RemoteError::BadRange => FsError::Invalid("range".into()),
            RemoteError::Unavailable(m) => FsError::Unavailable(m),
            RemoteError::Protocol(m) | RemoteError::Relist(m) => FsError::Io(m),
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_map_to_the_errno_a_user_expects() {
        let cases = [
            (RemoteError::NotFound("x".into()), libc::ENOENT),
            (RemoteError::TooLarge("x".into()), libc::EFBIG),
            (RemoteError::StorageFull, libc::ENOSPC),
            (RemoteError::Forbidden("x".into()), libc::EACCES),
            (RemoteError::Refused("x".into()), libc::ENOTEMPTY),
            (RemoteError::Unavailable("x".into()), libc::EIO),
        ];
        for (e, errno) in cases {
            assert_eq!(FsError::from(e.clone()).errno(), errno, "{e:?}");
        }
        assert_eq!(FsError::CrossDevice.errno(), libc::EXDEV);
    }
}
