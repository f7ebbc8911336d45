//! The in-memory index of what the disk store holds, weighted by size, with LRU eviction
//! under the disk budget. Evicting an entry deletes its file on a background thread, unless
//! a newer commit of the same digest has replaced it since (a generation check under one
//! lock that only commits and that thread take; never fsync under it, never the request
//! path).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, Weak};

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::blob_store::{BlobStore, Kind};
use crate::digest::Digest;

type Key = (Kind, Digest);

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    generation: u64,
}

/// Which generation of each digest is on disk. Commits (rename) and deletions (unlink) take
/// this lock, so an old eviction can never delete a file that a newer fill has committed.
type Generations = Arc<Mutex<HashMap<Key, u64>>>;

pub struct Index {
    entries: moka::sync::Cache<Key, Entry>,
    generations: Generations,
    next_generation: AtomicU64,
    evictions: Arc<AtomicU64>,
    deleter: Arc<Mutex<Sender<Deletion>>>,
    budget: u64,
}

fn weight_kib(size: u64) -> u32 {
    // moka weighs in u32; KiB keeps a 4 TiB blob representable.
    u32::try_from(size.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
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
        let listener_deleter = deleter.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes / 1024)
            .weigher(|_k: &Key, e: &Entry| weight_kib(e.size))
            // TinyLFU (moka's default) may refuse a blob that was just downloaded; for a disk
            // cache that would throw the download away.
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<Key>, entry: Entry, cause| {
                if cause == RemovalCause::Replaced || key.0 == Kind::Reserved {
                    return;
                }
                let tx = listener_deleter.lock().unwrap_or_else(|p| p.into_inner());
                let _ = tx.send(Deletion::File((*key).clone(), entry.generation));
            })
            .build();
        Index {
            entries,
            generations,
            next_generation: AtomicU64::new(1),
            evictions,
            deleter,
            budget: max_bytes,
        }
    }

    /// The disk budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Holds `size` bytes of the budget for a fill in flight, so that what must be evicted
    /// to make room goes now, before the download fills the disk, not after its commit.
    pub fn reserve(&self, digest: &Digest, size: u64) {
        self.entries
            .insert((Kind::Reserved, digest.clone()), Entry { size, generation: 0 });
        self.entries.run_pending_tasks();
    }

    /// Gives a fill's reservation back (committed or not).
    pub fn release(&self, digest: &Digest) {
        self.entries.invalidate(&(Kind::Reserved, digest.clone()));
    }

    /// Evicts least recently used content worth `needed` bytes (all of it if it holds
    /// less) and waits until its files are deleted: for when the disk is fuller than the
    /// budget says (other files share the filesystem). Blocking.
    pub fn make_room(&self, needed: u64) {
        let held = self.total_bytes().min(self.budget);
        // An entry this heavy leaves room for only `held - needed` bytes of the rest, so the
        // least recently used go; it holds no file and is removed at once.
        let room = (self.budget - held).saturating_add(needed).min(self.budget);
        let key = (
            Kind::Reserved,
            Digest::sha256_of(b"regcache: making room on a full disk"),
        );
        self.entries.insert(
            key.clone(),
            Entry {
                size: room,
                generation: 0,
            },
        );
        self.entries.run_pending_tasks();
        self.entries.invalidate(&key);
        self.settle_deletions();
    }

    /// Waits until every file evicted so far is deleted (tests, shutdown).
    pub fn settle_deletions(&self) {
        self.entries.run_pending_tasks();
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
        let out = {
            let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            let out = place()?;
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            gens.insert((kind, digest.clone()), generation);
            self.entries.insert((kind, digest.clone()), Entry { size, generation });
            out
        };
        // Apply the budget now rather than at some later write.
        self.entries.run_pending_tasks();
        Ok(out)
    }

    /// Records content found on disk at startup; call [`Index::settle`] after the last one.
    pub fn restore(&self, kind: Kind, digest: &Digest, size: u64) {
        let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        gens.insert((kind, digest.clone()), generation);
        self.entries.insert((kind, digest.clone()), Entry { size, generation });
    }

    /// Applies the budget to everything inserted so far.
    pub fn settle(&self) {
        self.entries.run_pending_tasks();
    }

    /// Whether content is indexed; counts as a use for LRU.
    pub fn contains(&self, kind: Kind, digest: &Digest) -> bool {
        self.entries.get(&(kind, digest.clone())).is_some()
    }

    /// Whether content is indexed, without counting as a use.
    pub fn peek(&self, kind: Kind, digest: &Digest) -> bool {
        self.entries.contains_key(&(kind, digest.clone()))
    }

    /// The recorded size of indexed content; counts as a use for LRU.
    pub fn size(&self, kind: Kind, digest: &Digest) -> Option<u64> {
        self.entries.get(&(kind, digest.clone())).map(|e| e.size)
    }

    /// Forgets (and deletes) content that turned out to be missing or unreadable.
    pub fn invalidate(&self, kind: Kind, digest: &Digest) {
        self.entries.invalidate(&(kind, digest.clone()));
        self.entries.run_pending_tasks();
    }

    /// Forgets content without deleting its file (it was moved away, e.g. quarantined).
    pub fn forget(&self, kind: Kind, digest: &Digest) {
        let key = (kind, digest.clone());
        self.generations.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        self.entries.invalidate(&key);
        self.entries.run_pending_tasks();
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.iter().map(|(_, e)| e.size).sum()
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(index: &Index, store: &BlobStore, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let tmp = store.write_temp(&[data]).unwrap();
        index
            .commit(Kind::Blob, &d, data.len() as u64, || store.place(&tmp, Kind::Blob, &d))
            .unwrap();
        index.settle_deletions();
        d
    }

    #[test]
    fn evicts_least_recently_used_and_deletes_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap().0);
        let index = Index::new(store.clone(), 100 * 1024);
        let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 40 * 1024]).collect();
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
