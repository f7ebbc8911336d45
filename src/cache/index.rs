//! The in-memory index of what the disk store holds, weighted by size, with LRU eviction
//! under the disk budget. Evicting an entry deletes its file, unless a newer commit of the
//! same digest has replaced it since (a generation check under one lock).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Which generation of each digest is on disk. Commits and evictions both take this lock,
/// so an old eviction can never delete a file that a newer fill has just committed.
type Generations = Arc<Mutex<HashMap<Key, u64>>>;

pub struct Index {
    entries: moka::sync::Cache<Key, Entry>,
    generations: Generations,
    next_generation: AtomicU64,
    evictions: Arc<AtomicU64>,
}

fn weight_kib(size: u64) -> u32 {
    // moka weighs in u32; KiB keeps a 4 TiB blob representable.
    u32::try_from(size.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl Index {
    pub fn new(store: Arc<BlobStore>, max_bytes: u64) -> Index {
        let generations: Generations = Arc::default();
        let evictions = Arc::new(AtomicU64::new(0));
        let listener_generations = generations.clone();
        let listener_evictions = evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes / 1024)
            .weigher(|_k: &Key, e: &Entry| weight_kib(e.size))
            // TinyLFU (moka's default) may refuse a blob that was just downloaded; for a disk
            // cache that would throw the download away.
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<Key>, entry: Entry, cause| {
                if cause == RemovalCause::Replaced {
                    return;
                }
                let mut gens = listener_generations.lock().unwrap_or_else(|p| p.into_inner());
                if gens.get(&*key) == Some(&entry.generation) {
                    gens.remove(&*key);
                    store.remove(key.0, &key.1);
                    listener_evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Index {
            entries,
            generations,
            next_generation: AtomicU64::new(1),
            evictions,
        }
    }

    /// Records content as on disk. `place` puts the file at its final path; it runs under
    /// the generation lock so that no eviction of an older copy can interleave with it.
    pub fn commit<T>(
        &self,
        kind: Kind,
        digest: &Digest,
        size: u64,
        place: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let out = {
            let mut gens = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            let out = place()?;
            gens.insert((kind, digest.clone()), generation);
            out
        };
        self.entries.insert((kind, digest.clone()), Entry { size, generation });
        // Apply the budget now rather than at some later write.
        self.entries.run_pending_tasks();
        Ok(out)
    }

    /// Records content found on disk at startup; call [`Index::settle`] after the last one.
    pub fn restore(&self, kind: Kind, digest: &Digest, size: u64) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((kind, digest.clone()), generation);
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

    /// Forgets (and deletes) content that turned out to be missing or unreadable.
    pub fn invalidate(&self, kind: Kind, digest: &Digest) {
        self.entries.invalidate(&(kind, digest.clone()));
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
        index
            .commit(Kind::Blob, &d, data.len() as u64, || {
                store.write_small(Kind::Blob, &d, &[data])
            })
            .unwrap();
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
