//! Open directories: what each one lists, taken once per pass.
//!
//! Data flow. The kernel reads a directory in several calls, each starting
//! at the offset of the last entry it got, until one comes back empty. The
//! offset is a position, so it must mean the same list in every call: were
//! each call answered from the namespace as it is then, an entry sorting
//! earlier that appeared between two calls (a conflict copy, another
//! client's file arriving through the change feed) would shift the list and
//! the next call would repeat an entry, and one removed would make it skip
//! one. So an open directory keeps the names its read from position 0 took,
//! and later calls read positions in them. Each call answers with the entries
//! of those names that are still there, as they are now (a name another file
//! took over, as a rename over it does, lists that file; a removed entry is
//! not listed again, which readdirplus would otherwise put back into the
//! kernel's cache). A read from position 0 again
//! (rewinddir) takes the names anew, and releasedir lets them go. This is
//! what POSIX asks: an entry added or removed after opendir or rewinddir may
//! or may not be listed, and every other entry is listed once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{EntryPlus, Ino, Result, VaultFs};
use crate::remote::Remote;

/// The names one pass reads, in order (without `.` and `..`).
type Names = Arc<Vec<OsString>>;

/// Entries of a pass still in their directory, each after its position in
/// the pass (from 0).
pub type Listing = Vec<(usize, EntryPlus)>;

/// Most entries one call answers with; the kernel asks again for more.
const CALL_MOST: usize = 4096;

/// The open directories, by handle, and the listing each is reading.
#[derive(Default)]
pub(super) struct Listings {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// One open directory.
struct Open {
    ino: Ino,
    /// `None` until its first read.
    names: Option<Names>,
}

impl Listings {
    /// The names handle `fh` of directory `ino` reads from position `from`,
    /// if it has a pass to go on with (`None` at 0: a pass starts there).
    fn going_on(&self, ino: Ino, fh: u64, from: usize) -> Option<Names> {
        if from == 0 {
            return None;
        }
        let open = self.open.lock();
        open.get(&fh).filter(|o| o.ino == ino).and_then(|o| o.names.clone())
    }

    /// Remembers `names` as what handle `fh` of `ino` reads from now on.
    fn keep(&self, ino: Ino, fh: u64, names: &Names) {
        if let Some(o) = self.open.lock().get_mut(&fh).filter(|o| o.ino == ino) {
            o.names = Some(Arc::clone(names));
        }
    }
}

impl<R: Remote> VaultFs<R> {
    /// Opens directory `ino` for reading; the handle for
    /// [`VaultFs::listing`] and [`VaultFs::releasedir`].
    pub fn opendir(&self, ino: Ino) -> u64 {
        let fh = self.listings.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.listings.open.lock().insert(fh, Open { ino, names: None });
        fh
    }

    /// Closes an open directory.
    pub fn releasedir(&self, fh: u64) {
        self.listings.open.lock().remove(&fh);
    }

    /// The entries that open directory `fh` of `ino` reads from position
    /// `from` (`.` and `..` are not counted): those of the names its pass
    /// took that are still there. Position 0 starts a new pass (the first
    /// read, or a rewinddir).
    pub async fn listing(&self, ino: Ino, fh: u64, from: usize) -> Result<Listing> {
        let names = match self.listings.going_on(ino, fh, from) {
            Some(names) => names,
            None => {
                let names = Arc::new(self.readdir(ino).await?.into_iter().map(|e| e.2).collect());
                self.listings.keep(ino, fh, &names);
                names
            }
        };
        Ok(self.still_listed(ino, &names, from))
    }

    /// [`VaultFs::listing`] if it needs nothing from the server.
    pub fn listing_now(&self, ino: Ino, fh: u64, from: usize) -> Option<Result<Listing>> {
        let names = match self.listings.going_on(ino, fh, from) {
            Some(names) => names,
            None => {
                let names = match self.readdir_now(ino)? {
                    Ok(names) => Arc::new(names.into_iter().map(|e| e.2).collect()),
                    Err(e) => return Some(Err(e)),
                };
                self.listings.keep(ino, fh, &names);
                names
            }
        };
        Some(Ok(self.still_listed(ino, &names, from)))
    }

    /// Of `names` from position `from` on, the entries still in directory
    /// `ino`, as they are now (a name taken over by another file, as a rename
    /// over it does, lists that file), with their attributes (`None` for one
    /// that fails its check).
    fn still_listed(&self, ino: Ino, names: &[OsString], from: usize) -> Listing {
        let tree = self.tree.lock();
        let mut listed = Vec::new();
        for (at, name) in names.iter().enumerate().skip(from).take(CALL_MOST) {
            let Some((child, node)) = tree.child(ino, name).and_then(|c| Some((c, tree.node_unchecked(c)?)))
            else {
                continue;
            };
            let attr = tree.node(child).is_ok().then(|| self.attr_of(&tree, child, node));
            listed.push((at, (child, node.kind(), name.clone(), attr)));
        }
        listed
    }
}
