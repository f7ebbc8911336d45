//! The in-memory index of what the disk store holds, weighted by size, with LRU eviction
//! under the disk budget. Evicting an entry deletes its file on a background thread, unless
//! a newer commit of the same digest has replaced it since (a generation check under one
//! lock that only commits and that thread take; never fsync under it, never the request
//! path). Pinned entries count against the budget but are never evicted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, Weak};

use super::blob_store::{BlobStore, Kind};
use crate::digest::Digest;

pub type Key = (Kind, Digest);

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    generation: u64,
}

/// Which generation of each digest is on disk. Commits (rename) and deletions (unlink) take
/// this lock, so an old eviction can never delete a file that a newer fill has committed.
type Generations = Arc<Mutex<HashMap<Key, u64>>>;

/// Entries in least-recently-used order under a byte budget. Pinned entries are kept out
/// of the order, so eviction never sees them.
#[derive(Default)]
struct Lru {
    entries: HashMap<Key, (Entry, u64)>,
    /// Use tick -> key, oldest first (unpinned entries only).
    order: BTreeMap<u64, Key>,
    /// The last tick given (changed under the lock; read without it by
    /// [`Index::use_unless_latest`]).
    ticks: Arc<AtomicU64>,
    total: u64,
    capacity: u64,
    /// Pinned keys, present or not yet committed.
    pinned: HashSet<Key>,
}

impl Lru {
    fn tick(&mut self) -> u64 {
        self.ticks.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The entry, now the most recently used.
    fn touch(&mut self, key: &Key) -> Option<Entry> {
        let next = self.ticks.load(Ordering::Relaxed) + 1;
        let (entry, tick) = self.entries.get_mut(key)?;
        let entry = *entry;
        if !self.pinned.contains(key) {
            self.order.remove(tick);
            *tick = next;
            self.order.insert(next, key.clone());
        }
        self.ticks.store(next, Ordering::Relaxed);
        Some(entry)
    }

    /// Inserts or replaces; returns what had to be evicted to stay under the budget.
    fn insert(&mut self, key: Key, entry: Entry) -> Vec<(Key, Entry)> {
        self.remove(&key);
        let tick = self.tick();
        if !self.pinned.contains(&key) {
            self.order.insert(tick, key.clone());
        }
        self.total += entry.size;
        self.entries.insert(key, (entry, tick));
        self.evict()
    }

    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let (entry, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        self.total -= entry.size;
        Some(entry)
    }

    fn evict(&mut self) -> Vec<(Key, Entry)> {
        let mut evicted = Vec::new();
        while self.total > self.capacity {
            let Some((_, key)) = self.order.pop_first() else { break };
            if let Some((entry, _)) = self.entries.remove(&key) {
                self.total -= entry.size;
                evicted.push((key, entry));
            }
        }
        evicted
    }

    /// Replaces the pinned set; entries that leave it rejoin the order as just used.
    fn pin(&mut self, keys: HashSet<Key>) -> Vec<(Key, Entry)> {
        let old = std::mem::replace(&mut self.pinned, keys);
        let released: Vec<Key> = old.difference(&self.pinned).cloned().collect();
        for key in released {
            if self.entries.contains_key(&key) {
                let tick = self.tick();
                if let Some((_, t)) = self.entries.get_mut(&key) {
                    *t = tick;
                }
                self.order.insert(tick, key);
            }
        }
        let newly: Vec<Key> = self.pinned.difference(&old).cloned().collect();
        for key in newly {
            if let Some((_, tick)) = self.entries.get(&key) {
                self.order.remove(tick);
            }
        }
        self.evict()
    }

    fn pinned_bytes(&self) -> u64 {
        self.pinned
            .iter()
            .filter_map(|k| self.entries.get(k))
            .map(|(e, _)| e.size)
            .sum()
    }
}

pub struct Index {
    lru: Mutex<Lru>,
    /// The LRU's tick counter, shared.
    ticks: Arc<AtomicU64>,
    generations: Generations,
    next_generation: AtomicU64,
    evictions: Arc<AtomicU64>,
    deleter: Arc<Mutex<Sender<Deletion>>>,
    budget: u64,
    /// The tick up to which uses have been handed to [`Index::take_recent_uses`].
    noted: AtomicU64,
}

enum Deletion {
    File(Key, u64),
    /// Answered once every deletion sent before it is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Deletes evicted files, one at a time, off every request path.
/// It holds the store weakly: a closed cache (and its cache-dir lock) must not outlive its
/// index just because this thread has not noticed yet.
fn start_deleter(store: Weak<BlobStore>, generations: Generations, evictions: Arc<AtomicU64>) -> Sender<Deletion> {
    let (tx, rx) = channel::<Deletion>();
    let spawned = std::thread::Builder::new().name("cache-deleter".into()).spawn(move || {
        while let Ok(job) = rx.recv() {
            let (key, generation) = match job {
                Deletion::File(key, generation) => (key, generation),
                Deletion::Barrier(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            // Unlinked under the lock: a commit of the same digest cannot slip in between
            // the generation check and the unlink.
            let Some(store) = store.upgrade() else {
                return;
            };
            let mut gens = generations.lock().unwrap_or_else(|p| p.into_inner());
            if gens.get(&key) == Some(&generation) {
                gens.remove(&key);
                store.remove(key.0, &key.1);
                evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the cache deleter thread; evicted files stay on disk");
    }
    tx
}

impl Index {
    pub fn new(store: Arc<BlobStore>, max_bytes: u64) -> Index {
        let generations: Generations = Arc::default();
        let evictions = Arc::new(AtomicU64::new(0));
        let deleter = Arc::new(Mutex::new(start_deleter(
            Arc::downgrade(&store),
            generations.clone(),
            evictions.clone(),
        )));
        let ticks = Arc::new(AtomicU64::new(0));
        Index {
            ticks: ticks.clone(),
            lru: Mutex::new(Lru {
                capacity: max_bytes,
                ticks,
                ..Lru::default()
            }),
            generations,
            next_generation: AtomicU64::new(1),
            evictions,
            deleter,
            budget: max_bytes,
            noted: AtomicU64::new(0),
        }
    }

    /// What was used (or committed) since the last call, least recently used first, and
    /// marks it noted. Pinned entries are left out: they are never evicted.
    pub fn take_recent_uses(&self) -> Vec<Key> {
        let lru = self.lru();
        let now = self.ticks.load(Ordering::Relaxed);
        let since = self.noted.swap(now, Ordering::Relaxed);
        lru.order.range(since + 1..).map(|(_, key)| key.clone()).collect()
    }

    /// Counts everything indexed so far as noted: the startup rebuild's entries are not
    /// uses (their files already say when they were last used).
    pub fn note_all(&self) {
        let _lru = self.lru();
        self.noted.store(self.ticks.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn lru_ticks(&self) -> &AtomicU64 {
        &self.ticks
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands evicted (or removed) files to the deleter; reservations hold no file.
    fn delete(&self, gone: Vec<(Key, Entry)>) {
        if gone.is_empty() {
            return;
        }
        let tx = self.deleter.lock().unwrap_or_else(|p| p.into_inner());
        for (key, entry) in gone {
            if key.0 != Kind::Reserved {
                let _ = tx.send(Deletion::File(key, entry.generation));
            }
        }
    }

    /// The disk budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Holds `size` bytes of the budget for a fill in flight, so that what must be evicted
    /// to make room goes now, before the download fills the disk, not after its commit.
    pub fn reserve(&self, digest: &Digest, size: u64) {
        let gone = self
            .lru()
            .insert((Kind::Reserved, digest.clone()), Entry { size, generation: 0 });
        self.delete(gone);
    }

    /// Gives a fill's reservation back (committed or not).
    pub fn release(&self, digest: &Digest) {
        self.lru().remove(&(Kind::Reserved, digest.clone()));
    }

    /// Evicts least recently used content worth `needed` bytes (all of it if it holds
    /// less) and waits until its files are deleted: for when the disk is fuller than the
    /// budget says (other files share the filesystem). Blocking.
    pub fn make_room(&self, needed: u64) {
        let gone = {
            let mut lru = self.lru();
            let capacity = lru.capacity;
            lru.capacity = lru.total.saturating_sub(needed).min(capacity);
            let gone = lru.evict();
            lru.capacity = capacity;
            gone
        };
        self.delete(gone);
        self.settle_deletions();
    }

    /// Waits until every file evicted so far is deleted (tests, shutdown).
    pub fn settle_deletions(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let sent = self
            .deleter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Deletion::Barrier(done));
        if sent.is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(10));
        }
    }

    /// Records content as on disk. `place` puts the already durable file at its final path
    /// (a rename); it runs under the generation lock, with the generation taken under that
    /// lock too, so commits of one digest are ordered and no eviction of an older copy can
    /// interleave. Whatever is slow (fsync) belongs before this call.
    pub fn commit<T>(
        &self,
        kind: Kind,
        digest: &Digest,
        size: u64,
        place: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let (out, gone) = {
            let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            let out = place()?;
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            gens.insert((kind, digest.clone()), generation);
            let gone = self.lru().insert((kind, digest.clone()), Entry { size, generation });
            (out, gone)
        };
        self.delete(gone);
        Ok(out)
    }

    /// Records content found on disk at startup (or by a lookup that found it there).
    pub fn restore(&self, kind: Kind, digest: &Digest, size: u64) {
        let gone = {
            let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            gens.insert((kind, digest.clone()), generation);
            self.lru().insert((kind, digest.clone()), Entry { size, generation })
        };
        self.delete(gone);
    }

    /// Applies the budget to everything inserted so far (each insert already has).
    pub fn settle(&self) {}

    /// Whether content is indexed; counts as a use for LRU.
    pub fn contains(&self, kind: Kind, digest: &Digest) -> bool {
        self.lru().touch(&(kind, digest.clone())).is_some()
    }

    /// [`Index::contains`] for a hot entry that remembers its last use in `seen`: when
    /// nothing was used since, it is still the most recent and nothing changes, so a warm
    /// hit on one manifest takes no lock.
    pub fn use_unless_latest(&self, kind: Kind, digest: &Digest, seen: &AtomicU64) {
        let latest = self.lru_ticks().load(Ordering::Relaxed);
        if latest != 0 && seen.load(Ordering::Relaxed) == latest {
            return;
        }
        let mut lru = self.lru();
        if lru.touch(&(kind, digest.clone())).is_some() {
            seen.store(lru.ticks.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Whether content is indexed, without counting as a use.
    pub fn peek(&self, kind: Kind, digest: &Digest) -> bool {
        self.lru().entries.contains_key(&(kind, digest.clone()))
    }

    /// The recorded size of indexed content; counts as a use for LRU.
    pub fn size(&self, kind: Kind, digest: &Digest) -> Option<u64> {
        self.lru().touch(&(kind, digest.clone())).map(|e| e.size)
    }

    /// The recorded size of indexed content, without counting as a use.
    pub fn size_of(&self, kind: Kind, digest: &Digest) -> Option<u64> {
        self.lru().entries.get(&(kind, digest.clone())).map(|(e, _)| e.size)
    }

    /// Forgets (and deletes) content that turned out to be missing or unreadable.
    pub fn invalidate(&self, kind: Kind, digest: &Digest) {
        let key = (kind, digest.clone());
        let gone = self.lru().remove(&key).map(|e| (key, e));
        self.delete(gone.into_iter().collect());
    }

    /// Forgets content without deleting its file (it was moved away, e.g. quarantined).
    pub fn forget(&self, kind: Kind, digest: &Digest) {
        let key = (kind, digest.clone());
        self.generations.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        self.lru().remove(&key);
    }

    /// Pins exactly `keys` (content not committed yet is pinned when it is); what leaves the
    /// set becomes evictable again. Returns the pinned bytes now held.
    pub fn pin(&self, keys: HashSet<Key>) -> u64 {
        let (gone, bytes) = {
            let mut lru = self.lru();
            let gone = lru.pin(keys);
            (gone, lru.pinned_bytes())
        };
        self.delete(gone);
        bytes
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.lru().pinned_bytes()
    }

    pub fn total_bytes(&self) -> u64 {
        self.lru().total
    }

    pub fn entry_count(&self) -> u64 {
        self.lru().entries.len() as u64
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uses are handed out once each, oldest first, and the startup rebuild is not a use.
    #[test]
    fn recent_uses_are_taken_once_in_order_of_use() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BlobStore::open(dir.path()).unwrap();
        let index = Index::new(Arc::new(store), 1 << 20);
        let d: Vec<Digest> = (0..3u8).map(|i| Digest::sha256_of(&[i])).collect();
        for x in &d {
            index.restore(Kind::Blob, x, 10);
        }
        index.note_all();
        assert!(index.take_recent_uses().is_empty());
        index.size(Kind::Blob, &d[2]);
        index.size(Kind::Blob, &d[0]);
        let used: Vec<Digest> = index.take_recent_uses().into_iter().map(|(_, x)| x).collect();
        assert_eq!(used, vec![d[2].clone(), d[0].clone()]);
        assert!(index.take_recent_uses().is_empty());
    }

    fn put(index: &Index, store: &BlobStore, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let tmp = store.write_temp(&[data]).unwrap();
        index
            .commit(Kind::Blob, &d, data.len() as u64, || store.place(&tmp, Kind::Blob, &d))
            .unwrap();
        index.settle_deletions();
        d
    }

    /// An index of 100 KiB and three 40 KiB blobs (not yet put): the third evicts one.
    fn three_blobs_over_budget() -> (tempfile::TempDir, Arc<BlobStore>, Index, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap().0);
        let index = Index::new(store.clone(), 100 * 1024);
        let blobs = (0..3u8).map(|i| vec![i; 40 * 1024]).collect();
        (dir, store, index, blobs)
    }

    #[test]
    fn evicts_least_recently_used_and_deletes_files() {
        let (_dir, store, index, blobs) = three_blobs_over_budget();
        let a = put(&index, &store, &blobs[0]);
        let b = put(&index, &store, &blobs[1]);
        assert!(index.contains(Kind::Blob, &a)); // a is now more recent than b
        let c = put(&index, &store, &blobs[2]);
        assert!(index.total_bytes() <= 100 * 1024);
        assert!(index.contains(Kind::Blob, &a) && index.contains(Kind::Blob, &c));
        assert!(!index.contains(Kind::Blob, &b));
        index.settle_deletions();
        assert!(store.open_file(Kind::Blob, &b).unwrap().is_none());
        assert!(store.open_file(Kind::Blob, &a).unwrap().is_some());
        assert_eq!(index.evictions(), 1);
    }

    #[test]
    fn pinned_content_is_never_evicted_and_counts_against_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap().0);
        let index = Index::new(store.clone(), 100 * 1024);
        let pinned = Digest::sha256_of(&vec![9u8; 40 * 1024]);
        // Pinned before it is committed: it is pinned as it arrives.
        assert_eq!(index.pin(HashSet::from([(Kind::Blob, pinned.clone())])), 0);
        assert_eq!(put(&index, &store, &vec![9u8; 40 * 1024]), pinned);
        let others: Vec<Digest> = (0..4u8).map(|i| put(&index, &store, &vec![i; 40 * 1024])).collect();
        assert!(index.contains(Kind::Blob, &pinned), "the oldest, yet kept");
        assert_eq!(index.pinned_bytes(), 40 * 1024);
        assert!(index.total_bytes() <= 100 * 1024);
        // The 60 KiB left hold one other blob: the newest.
        assert!(index.contains(Kind::Blob, &others[3]));
        assert!(!index.contains(Kind::Blob, &others[2]));
        // Unpinned, it is evictable again (as if just used).
        index.pin(HashSet::new());
        put(&index, &store, &vec![7u8; 40 * 1024]);
        put(&index, &store, &vec![8u8; 40 * 1024]);
        assert!(!index.contains(Kind::Blob, &pinned));
        index.settle_deletions();
        assert!(store.open_file(Kind::Blob, &pinned).unwrap().is_none());
    }

    #[test]
    fn a_use_skipped_as_the_latest_still_keeps_exact_lru_order() {
        let (_dir, store, index, blobs) = three_blobs_over_budget();
        let a = put(&index, &store, &blobs[0]);
        let b = put(&index, &store, &blobs[1]);
        let seen = AtomicU64::new(0);
        index.use_unless_latest(Kind::Blob, &a, &seen); // a is now the most recent
        index.use_unless_latest(Kind::Blob, &a, &seen); // still is: no lock, no change
        assert!(index.contains(Kind::Blob, &b)); // b is now the most recent
        index.use_unless_latest(Kind::Blob, &a, &seen); // so this must count
        put(&index, &store, &blobs[2]);
        assert!(index.peek(Kind::Blob, &a), "a was used last before c came");
        assert!(!index.peek(Kind::Blob, &b), "b is the least recently used");
    }

    #[test]
    fn recommit_of_the_same_digest_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap().0);
        let index = Index::new(store.clone(), 1024 * 1024);
        let a = put(&index, &store, b"same");
        let a2 = put(&index, &store, b"same");
        assert_eq!(a, a2);
        assert!(store.open_file(Kind::Blob, &a).unwrap().is_some());
        assert_eq!(index.entry_count(), 1);
    }
}

#[cfg(test)]
mod races {
    use super::*;

    /// Two commits of one digest at once: whichever wins, the file on disk is the one the
    /// index accounts for, and evicting it deletes it (nothing left outside the budget).
    #[test]
    fn concurrent_commits_of_one_digest_leave_no_file_outside_the_budget() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(BlobStore::open(dir.path()).unwrap().0);
            let index = Arc::new(Index::new(store.clone(), 1024 * 1024));
            let data = vec![7u8; 10_000];
            let d = Digest::sha256_of(&data);
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (store, index, data, d) = (store.clone(), index.clone(), data.clone(), d.clone());
                    std::thread::spawn(move || {
                        let tmp = store.write_temp(&[&data]).unwrap();
                        index
                            .commit(Kind::Blob, &d, data.len() as u64, || store.place(&tmp, Kind::Blob, &d))
                            .unwrap();
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            index.invalidate(Kind::Blob, &d);
            index.settle_deletions();
            assert!(
                store.open_file(Kind::Blob, &d).unwrap().is_none(),
                "evicted file left on disk"
            );
        }
    }
}
