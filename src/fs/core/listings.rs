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

/// Most entries one call answers with (more than a reply holds: the kernel
/// asks with a page, about 170 plain entries or 25 with attributes, and asks
/// again for more).
const CALL_MOST: usize = 512;

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

/// Where a read of an open directory starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// A new pass: the first read, or one after a rewinddir.
    Start,
    /// Position `n` of the pass (from 0; `.` and `..` are not counted).
    At(usize),
}

impl Listings {
    /// The names handle `fh` of directory `ino` took at the start of its pass.
    fn going_on(&self, ino: Ino, fh: u64) -> Option<Names> {
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

    /// The entries that open directory `fh` of `ino` reads from `from`:
    /// those of the names its pass took that are still there, once the
    /// directory's listing is fresh.
    pub async fn listing(&self, ino: Ino, fh: u64, from: ReadFrom) -> Result<Listing> {
        self.answer(ino, || self.read_pass(ino, fh, from)).await
    }

    /// [`VaultFs::listing`] if it needs nothing from the server.
    pub fn listing_now(&self, ino: Ino, fh: u64, from: ReadFrom) -> Option<Result<Listing>> {
        self.answer_now(ino, || self.read_pass(ino, fh, from))
    }

    fn read_pass(&self, ino: Ino, fh: u64, from: ReadFrom) -> Result<Listing> {
        let (names, at) = match from {
            ReadFrom::At(at) => match self.listings.going_on(ino, fh) {
                Some(names) => (names, at),
                None => (self.start_pass(ino, fh)?, at),
            },
            ReadFrom::Start => (self.start_pass(ino, fh)?, 0),
        };
        Ok(self.still_listed(ino, &names, at))
    }

    /// Takes the names handle `fh` of directory `ino` reads in a new pass.
    fn start_pass(&self, ino: Ino, fh: u64) -> Result<Names> {
        let names: Names =
            Arc::new(self.tree.lock().entries(ino)?.map(|(name, _, _)| name.clone()).collect());
        self.listings.keep(ino, fh, &names);
        Ok(names)
    }

    /// Of `names` from position `from` on, the entries still in directory
    /// `ino`, as they are now (a name taken over by another file, as a rename
    /// over it does, lists that file), with their attributes (`None` for one
    /// that fails its check).
    fn still_listed(&self, ino: Ino, names: &[OsString], from: usize) -> Listing {
        let tree = self.tree.lock();
        let still = names.iter().enumerate().skip(from).filter_map(|(at, name)| {
            let child = tree.child(ino, name)?;
            let node = tree.node_unchecked(child)?;
            let attr = tree.node(child).is_ok().then(|| self.attr_of(&tree, child, node));
            Some((at, (child, node.kind(), name.clone(), attr)))
        });
        still.take(CALL_MOST).collect()
    }
}
