//! The memory-backed plaintext cache.
//!
//! Decrypted file contents live only here, in process memory: never in a temp
//! file, never spilled. Each file's plaintext is a [`PlainData`] behind its own
//! async mutex (held while it downloads, changes or uploads); the cache indexes
//! them by file id, counts their bytes against a budget, and when over budget
//! evicts the least recently used entries that are *clean* (uploaded) and *not
//! pinned* (no open handle). Open and dirty files are never evicted, so the
//! budget is soft for them: a user editing more than the budget at once is
//! allowed to, and a warning is logged. Evicted and dropped buffers are wiped
//! ([`SecretBuf`]) before their memory is returned.
//!
//! `harden.rs` keeps plaintext from reaching disk by other routes: core dumps are
//! disabled and memory is locked against swap where the system allows.

pub mod buf;
pub mod harden;

pub use buf::SecretBuf;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ids::FileId;

/// A file's plaintext in memory.
#[derive(Default)]
pub struct PlainData {
    /// The bytes; wiped on drop.
    pub bytes: SecretBuf,
    /// Changed since the last successful upload.
    pub dirty: bool,
    /// The server version these bytes correspond to (before local changes).
    pub version: u64,
    /// When the server last said `version` was its current one (the moment
    /// the question was sent, so never later than the answer).
    pub confirmed: Option<std::time::Instant>,
    /// Whether `bytes` holds the file's whole content (false until downloaded).
    pub loaded: bool,
    /// A download is decrypting into `bytes` (which then holds a prefix of the
    /// content, in a buffer reserved to the final size so it never moves).
    pub filling: bool,
    /// Changes made to `bytes` by the file's users (writes, truncations,
    /// writes through a map), counted.
    pub edits: u64,
    /// `edits` when a save was last asked for (a close, fsync or lock
    /// release, truncate(2) with no handle open, unmount): while the two
    /// are equal, `bytes` is a version its writer finished.
    pub closed: u64,
    /// A background retry of a failed save holds a pin of this entry (one
    /// per file: another failed close leaves it to that one).
    pub retrying: bool,
}

impl PlainData {
    /// Notes a change to `bytes` made by the file's users.
    pub fn edited(&mut self) {
        self.dirty = true;
        self.edits += 1;
    }

    /// Notes that what `bytes` holds now is a version its writer finished
    /// (a save was asked for).
    pub fn finished(&mut self) {
        self.closed = self.edits;
    }

    /// Whether `bytes` is a version its writer finished: changed by nobody
    /// since a save was last asked for.
    pub fn is_finished(&self) -> bool {
        self.closed == self.edits
    }
}

impl std::fmt::Debug for PlainData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainData")
            .field("len", &self.bytes.len())
            .field("dirty", &self.dirty)
            .field("version", &self.version)
            .field("loaded", &self.loaded)
            .field("filling", &self.filling)
            .field("edits", &self.edits)
            .field("closed", &self.closed)
            .field("retrying", &self.retrying)
            .finish()
    }
}

/// Shared handle to one file's plaintext.
pub type PlainHandle = Arc<tokio::sync::Mutex<PlainData>>;

struct Slot {
    data: PlainHandle,
    pins: usize,
    /// Bytes last accounted for this entry.
    bytes: usize,
}

struct Inner {
    slots: HashMap<FileId, Slot>,
    /// Recency order: the front is the least recently used.
    order: lru::LruCache<FileId, ()>,
    used: usize,
    /// Plaintext held outside the cache (the kernel's backing files), also
    /// counted against the budget.
    outside: usize,
}

/// Counters for `vaultfs status` and the logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of plaintext held.
    pub used: usize,
    /// The budget.
    pub budget: usize,
    /// Entries held.
    pub entries: usize,
    /// Entries with an open handle.
    pub pinned: usize,
}

/// The plaintext cache.
pub struct PlainCache {
    budget: usize,
    // Guards the index only; never held across an await or while a PlainData
    // lock is awaited.
    inner: Mutex<Inner>,
}

/// The slot holding `data`: under `seen_as` if it is there, else found
/// among all (a slot renamed since).
fn slot_of<'a>(inner: &'a mut Inner, seen_as: Option<FileId>, data: &PlainHandle) -> Option<&'a mut Slot> {
    let at_id = seen_as.is_some_and(|id| inner.slots.get(&id).is_some_and(|s| Arc::ptr_eq(&s.data, data)));
    match seen_as {
        Some(id) if at_id => inner.slots.get_mut(&id),
        _ => inner.slots.values_mut().find(|s| Arc::ptr_eq(&s.data, data)),
    }
}

impl PlainCache {
    /// A cache that tries to hold at most `budget` bytes of plaintext.
    pub fn new(budget: usize) -> Self {
        PlainCache {
            budget,
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                order: lru::LruCache::unbounded(),
                used: 0,
                outside: 0,
            }),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        // Not poisoned by a panic elsewhere: this lock guards only bookkeeping.
        self.inner.lock()
    }

    /// The entry for `id`, created empty if absent, and pinned (an open handle).
    pub fn pin(&self, id: FileId) -> PlainHandle {
        let mut inner = self.lock();
        inner.order.put(id, ());
        let slot =
            inner.slots.entry(id).or_insert_with(|| Slot { data: PlainHandle::default(), pins: 0, bytes: 0 });
        slot.pins += 1;
        Arc::clone(&slot.data)
    }

    /// The entry for `id` if cached, without pinning (e.g. for `stat` of a dirty file).
    pub fn peek(&self, id: FileId) -> Option<PlainHandle> {
        let inner = self.lock();
        inner.slots.get(&id).map(|s| Arc::clone(&s.data))
    }

    /// Releases one pin of the entry `data`, under whatever id it has now
    /// (a move to another record renames it while its users wait on its
    /// lock); `seen_as`: the id it was pinned under, looked at first.
    pub fn unpin(&self, seen_as: Option<FileId>, data: &PlainHandle) {
        let mut inner = self.lock();
        if let Some(slot) = slot_of(&mut inner, seen_as, data) {
            slot.pins = slot.pins.saturating_sub(1);
        }
    }

    /// How many pins the entry `data` holds, under whatever id it has now
    /// (0 if the cache no longer holds it).
    pub fn pins_of(&self, data: &PlainHandle) -> usize {
        slot_of(&mut self.lock(), None, data).map_or(0, |s| s.pins)
    }

    /// Records the current size of `id`'s plaintext (after a load or a write)
    /// and evicts what the budget requires.
    pub fn account(&self, id: FileId, bytes: usize) {
        let mut inner = self.lock();
        let Some(slot) = inner.slots.get_mut(&id) else { return };
        let old = std::mem::replace(&mut slot.bytes, bytes);
        inner.used = inner.used.saturating_sub(old) + bytes;
        inner.order.get(&id);
        Self::evict(&mut inner, self.budget);
    }

    /// Forgets `id` entirely (the file was deleted). Its bytes are wiped when the
    /// last handle drops.
    pub fn remove(&self, id: FileId) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.remove(&id) {
            inner.used = inner.used.saturating_sub(slot.bytes);
            inner.order.pop(&id);
        }
    }

    /// Moves an entry to a new id (a file re-created under another id).
    pub fn rename(&self, from: FileId, to: FileId) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.remove(&from) {
            inner.order.pop(&from);
            inner.order.put(to, ());
            inner.slots.insert(to, slot);
        }
    }

    /// Sets the plaintext held outside the cache that counts against its
    /// budget, evicting to make room.
    pub fn set_outside(&self, bytes: usize) {
        let mut inner = self.lock();
        inner.outside = bytes;
        Self::evict(&mut inner, self.budget);
    }

    fn evict(inner: &mut Inner, budget: usize) {
        let budget = budget.saturating_sub(inner.outside);
        if inner.used <= budget {
            return;
        }
        let candidates: Vec<FileId> = inner.order.iter().rev().map(|(id, _)| *id).collect();
        for id in candidates {
            if inner.used <= budget {
                break;
            }
            let Some(slot) = inner.slots.get(&id) else { continue };
            if slot.pins > 0 {
                continue;
            }
            // Only clean, idle entries go; an entry someone is using is skipped.
            let Ok(mut data) = slot.data.try_lock() else { continue };
            if data.dirty || data.filling {
                continue;
            }
            // Wipe now, rather than when the last Arc drops.
            *data = PlainData::default();
            drop(data);
            let bytes = slot.bytes;
            inner.slots.remove(&id);
            inner.order.pop(&id);
            inner.used = inner.used.saturating_sub(bytes);
        }
        if inner.used > budget {
            tracing::warn!(
                used = inner.used,
                budget,
                "plaintext cache over budget: all entries are open or unsaved"
            );
        }
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            used: inner.used,
            budget: self.budget,
            entries: inner.slots.len(),
            pinned: inner.slots.values().filter(|s| s.pins > 0).count(),
        }
    }

    /// Ids of entries holding unsaved changes.
    pub fn dirty_ids(&self) -> Vec<(FileId, PlainHandle)> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|(_, s)| s.data.try_lock().map_or(true, |d| d.dirty))
            .map(|(id, s)| (*id, Arc::clone(&s.data)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> FileId {
        FileId([n; 16])
    }

    async fn fill(cache: &PlainCache, n: u8, len: usize, dirty: bool) -> PlainHandle {
        let h = cache.pin(id(n));
        {
            let mut d = h.lock().await;
            d.bytes = SecretBuf::from_vec(vec![n; len]);
            d.loaded = true;
            d.dirty = dirty;
        }
        cache.account(id(n), len);
        h
    }

    #[tokio::test]
    async fn evicts_least_recently_used_clean_unpinned_entries() {
        let cache = PlainCache::new(250);
        for n in 1..=3 {
            let h = fill(&cache, n, 100, false).await;
            cache.unpin(Some(id(n)), &h);
        }
        // 300 > 250: the least recently used (1) went.
        let s = cache.stats();
        assert_eq!((s.used, s.entries), (200, 2));
        assert!(cache.peek(id(1)).is_none());
        assert!(cache.peek(id(2)).is_some() && cache.peek(id(3)).is_some());
    }

    #[tokio::test]
    async fn pinned_and_dirty_entries_stay_even_over_budget() {
        let cache = PlainCache::new(100);
        let _open = fill(&cache, 1, 100, false).await; // pinned
        let h = fill(&cache, 2, 100, true).await;
        cache.unpin(Some(id(2)), &h); // unpinned but dirty
        let h = fill(&cache, 3, 100, false).await;
        cache.unpin(Some(id(3)), &h); // clean and idle: the only candidate
        cache.account(id(3), 100);
        let s = cache.stats();
        assert_eq!(s.entries, 2, "{s:?}");
        assert!(cache.peek(id(3)).is_none());
        assert_eq!(cache.dirty_ids().len(), 1);
    }

    #[tokio::test]
    async fn evicted_bytes_are_wiped_even_if_someone_kept_the_handle() {
        let cache = PlainCache::new(10);
        let h = fill(&cache, 1, 100, false).await;
        cache.unpin(Some(id(1)), &h);
        cache.account(id(1), 100);
        let d = h.lock().await;
        assert!(d.bytes.is_empty() && !d.loaded, "evicted data must be cleared: {d:?}");
    }

    /// A pin taken under one id goes from the entry after a rename (a
    /// file moved to another record while its user waited on its lock).
    #[tokio::test]
    async fn a_pin_goes_from_its_entry_after_a_rename() {
        let cache = PlainCache::new(1000);
        let h = fill(&cache, 1, 100, false).await;
        cache.rename(id(1), id(2));
        assert_eq!(cache.pins_of(&h), 1);
        cache.unpin(Some(id(1)), &h);
        assert_eq!(cache.pins_of(&h), 0);
    }

    #[tokio::test]
    async fn remove_and_rename_keep_the_accounting_right() {
        let cache = PlainCache::new(1000);
        fill(&cache, 1, 100, false).await;
        fill(&cache, 2, 50, false).await;
        cache.rename(id(1), id(9));
        assert!(cache.peek(id(9)).is_some() && cache.peek(id(1)).is_none());
        cache.remove(id(9));
        assert_eq!(cache.stats().used, 50);
        cache.account(id(2), 10);
        assert_eq!(cache.stats().used, 10);
    }
}
