//! The cache: what regcache has on disk and in memory, and the fills that add to it.
//! Knows nothing of upstreams: the proxy hands it bytes and upstream bodies.

pub mod associations;
pub mod blob_store;
pub mod bucket;
pub mod bucket_budget;
pub mod cluster;
pub mod fill;
pub mod index;
mod mapped;
pub mod pins;
pub mod tags;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::digest::Digest;
use blob_store::{BlobStore, Kind};
use index::Index;
use tags::{TagKey, TagRecord, TagStore};

/// A manifest: its exact bytes, media type and digest.
#[derive(Debug)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
    /// The answer's headers (`Content-Type`, `Content-Length`, `Docker-Content-Digest`, the
    /// API version), made once: every warm hit sends a clone, which costs a third of
    /// inserting them one by one (each value's clone is a reference count).
    pub headers: http::HeaderMap,
    /// The index's tick of its last use (see [`Index::use_unless_latest`]).
    used: std::sync::atomic::AtomicU64,
    /// What signature policies decided about it (see `policy`).
    pub verdicts: crate::policy::VerdictCopy,
}

impl Clone for Manifest {
    fn clone(&self) -> Manifest {
        Manifest::new(self.bytes.clone(), self.media_type.clone(), self.digest.clone())
    }
}

impl Manifest {
    pub fn new(bytes: Bytes, media_type: String, digest: Digest) -> Manifest {
        use crate::http::handlers::{API_VERSION, DOCKER_CONTENT_DIGEST};
        let mut headers = http::HeaderMap::with_capacity(4);
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_str(&media_type)
                .unwrap_or(http::HeaderValue::from_static(crate::oci::OCI_MANIFEST)),
        );
        headers.insert(http::header::CONTENT_LENGTH, bytes.len().into());
        headers.insert(
            DOCKER_CONTENT_DIGEST,
            http::HeaderValue::from_str(&digest.to_string()).unwrap_or(http::HeaderValue::from_static("")),
        );
        headers.insert(API_VERSION, crate::http::handlers::api_version());
        Manifest {
            bytes,
            media_type,
            digest,
            headers,
            used: std::sync::atomic::AtomicU64::new(0),
            verdicts: Default::default(),
        }
    }
}

pub struct Cache {
    pub store: Arc<BlobStore>,
    pub index: Arc<Index>,
    pub tags: Arc<TagStore>,
    pub associations: associations::Associations,
    pub pins: pins::Pins,
    manifests: moka::sync::Cache<Digest, Arc<Manifest>, crate::digest::DigestHashing>,
    loading: std::sync::atomic::AtomicBool,
}

impl Cache {
    /// Opens the store, removes leftovers of interrupted fills, and rebuilds the index
    /// from file names and sizes, least recently used first (by commit and access times), so
    /// LRU order survives a restart roughly.
    pub fn open(dir: &Path, max_bytes: u64, memory_manifest_bytes: u64) -> io::Result<Cache> {
        let cache = Cache::open_unindexed(dir, max_bytes, memory_manifest_bytes)?;
        cache.load_index()?;
        Ok(cache)
    }

    /// Opens the store (lock, `tmp/` emptied) with an empty index: call
    /// [`Cache::load_index`] next, on a thread of its own to serve meanwhile. Until it is
    /// done, content missing from the index is looked for on disk (and indexed when found),
    /// so a lookup during the rebuild is answered as after it.
    pub fn open_unindexed(dir: &Path, max_bytes: u64, memory_manifest_bytes: u64) -> io::Result<Cache> {
        let store = Arc::new(BlobStore::open_unscanned(dir)?);
        let index = Arc::new(Index::new(store.clone(), max_bytes));
        let tags = Arc::new(TagStore::new(store.root()));
        let associations = associations::Associations::open(store.root())?;
        let pins = pins::Pins::new(store.root());
        let manifests = moka::sync::Cache::builder()
            .max_capacity(memory_manifest_bytes)
            .weigher(|_, m: &Arc<Manifest>| u32::try_from(m.bytes.len() + m.media_type.len()).unwrap_or(u32::MAX))
            .build_with_hasher(crate::digest::DigestHashing);
        Ok(Cache {
            store,
            index,
            tags,
            associations,
            pins,
            manifests,
            loading: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Rebuilds the index from the files on disk, least recently used first (by commit and
    /// access times), so LRU order survives a restart roughly. Blocking.
    pub fn load_index(&self) -> io::Result<()> {
        self.index_scanned(self.store.scan_all()?);
        Ok(())
    }

    /// The second half of [`Cache::load_index`]: indexes what the scan found, setting aside
    /// blobs whose size changed since their commit.
    fn index_scanned(&self, mut found: Vec<blob_store::Scanned>) {
        found.sort_by_key(|s| s.last_used);
        for s in found {
            // Indexed meanwhile (asked for, or refetched and committed, while the scan ran):
            // that entry is current, and more recently used than the scan can tell.
            if self.index.peek(s.kind, &s.digest) {
                continue;
            }
            if s.damaged() {
                tracing::warn!(digest = %s.digest, recorded = s.recorded, found = s.size, "cached blob changed size while regcache was down");
                self.store.quarantine(s.kind, &s.digest);
                continue;
            }
            self.index.restore(s.kind, &s.digest, s.size);
        }
        self.index.settle();
        self.index.note_all();
        self.loading.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Writes when content used since the last call was last used into its file's access
    /// time, in the order of use, so LRU order survives a restart also where the kernel
    /// keeps no access times (`noatime` mounts) or keeps them a day late (`relatime`).
    /// Returns how many files it noted. Blocking.
    pub fn note_recent_uses(&self) -> usize {
        let used = self.index.take_recent_uses();
        let now = std::time::SystemTime::now();
        let mut noted = 0;
        for (i, (kind, digest)) in used.iter().enumerate() {
            if *kind == Kind::Reserved {
                continue;
            }
            // A microsecond apart, oldest first: the order of use is what a restart reads.
            let before = std::time::Duration::from_micros((used.len() - i) as u64);
            let at = now.checked_sub(before).unwrap_or(now);
            let set = std::fs::File::open(self.store.path(*kind, digest))
                .and_then(|f| f.set_times(std::fs::FileTimes::new().set_accessed(at)));
            noted += usize::from(set.is_ok());
        }
        noted
    }

    /// Starts the thread that notes uses (see [`Cache::note_recent_uses`]) every `period`.
    /// It stops after the cache is dropped.
    pub fn start_noting_uses(self: &Arc<Self>, period: std::time::Duration) {
        let cache = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("use-notes".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                let Some(cache) = cache.upgrade() else { return };
                cache.note_recent_uses();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that notes uses");
        }
    }

    /// Whether the index is still being rebuilt.
    pub fn loading(&self) -> bool {
        self.loading.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Content on disk but not indexed (not yet reached by the rebuild, or written by
    /// `regcache import` beside this server) is indexed now. A miss costs one more open.
    fn index_from_disk(&self, kind: Kind, digest: &Digest) -> Option<u64> {
        let (_, len) = self.store.open_file(kind, digest).ok()??;
        if kind == Kind::Blob {
            let recorded = blob_store::recorded_size(&self.store.path(kind, digest));
            if recorded.is_some_and(|r| r != len) {
                tracing::warn!(%digest, recorded, found = len, "cached blob has the wrong size");
                self.quarantine(kind, digest);
                return None;
            }
        }
        self.index.restore(kind, digest, len);
        Some(len)
    }

    /// Reads the pins again and pins what the pinned images are made of. Returns (pinned
    /// bytes held, bytes the pinned images need). Blocking.
    pub fn apply_pins(&self) -> (u64, u64) {
        self.pins.reload();
        let resolved = self.pins.resolve();
        let held = self.index.pin(resolved.keys);
        (held, resolved.bytes)
    }

    /// Starts the thread that applies the pins now and then every `period` (so images
    /// pinned by `prefetch --pin` beside this server are pinned within it), saying so
    /// when they need more than the budget. It stops after the cache is dropped.
    pub fn start_pinning(self: &Arc<Self>, period: std::time::Duration) {
        let cache = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("pins".into()).spawn(move || {
            let mut last = (u64::MAX, u64::MAX);
            loop {
                let Some(cache) = cache.upgrade() else { return };
                let (held, needed) = cache.apply_pins();
                let budget = cache.index.budget();
                if (held, needed) != last {
                    if needed > budget {
                        tracing::error!(
                            needed,
                            budget,
                            "pinned images need more than the cache budget (cache.max_size); raise it or pin less"
                        );
                    } else if needed > 0 {
                        tracing::info!(pinned_bytes = held, needed, "pinned images applied");
                    }
                    last = (held, needed);
                }
                drop(cache);
                std::thread::sleep(period);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the pinning thread");
        }
    }

    /// Starts the background thread that collects tag records whose manifests are gone:
    /// once now, then every `period`. It stops after the cache is dropped.
    pub fn start_collector(&self, period: std::time::Duration) {
        // Neither holds the store (nor its cache-dir lock): a closed cache stays closed.
        let (index, tags) = (Arc::downgrade(&self.index), self.tags.clone());
        let root = self.store.root().to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("tag-collector".into())
            .spawn(move || loop {
                let Some(index) = index.upgrade() else { return };
                // Imported beside this server and not asked for yet: on disk, not indexed.
                let removed = tags.collect(|d| {
                    index.peek(Kind::Manifest, d) || blob_store::path_in(&root, Kind::Manifest, d).exists()
                });
                if removed > 0 {
                    tracing::info!(removed, "collected tag records of manifests no longer cached");
                }
                drop(index);
                std::thread::sleep(period);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the tag record collector");
        }
    }

    /// [`Cache::manifest`] for async callers: a memory hit at once, the disk read on the
    /// blocking pool.
    pub async fn load_manifest(self: &Arc<Self>, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.manifests.get(digest) {
            self.index.use_unless_latest(Kind::Manifest, digest, &m.used);
            return Some(m);
        }
        let (cache, digest) = (self.clone(), digest.clone());
        tokio::task::spawn_blocking(move || cache.manifest(&digest))
            .await
            .ok()
            .flatten()
    }

    /// A tag's record and its manifest: from memory at once, else read from disk on the
    /// blocking pool.
    pub async fn load_tag(self: &Arc<Self>, key: &TagKey) -> Option<(Arc<TagRecord>, Arc<Manifest>)> {
        if let Some(found) = self.tag_in_memory(key) {
            return Some(found);
        }
        let (cache, key) = (self.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let record = cache.tags.get(&key)?;
            let manifest = cache.manifest(&record.digest()?)?;
            Some((record, manifest))
        })
        .await
        .ok()
        .flatten()
    }

    /// A tag's record and manifest when both are in memory (never touches the disk).
    pub fn tag_in_memory(&self, key: &dyn tags::TagKeyParts) -> Option<(Arc<TagRecord>, Arc<Manifest>)> {
        let record = self.tags.in_memory(key)?;
        let m = match record.answered() {
            Some(m) => m,
            None => {
                let m = record.parsed_digest().and_then(|d| self.manifests.get(&*d))?;
                record.answer_with(&m);
                m
            }
        };
        self.index.use_unless_latest(Kind::Manifest, &m.digest, &m.used);
        Some((record, m))
    }

    /// [`Cache::open_blob`] on the blocking pool (an open and a stat can wait on the disk).
    pub async fn load_blob(self: &Arc<Self>, digest: &Digest) -> io::Result<Option<(Arc<File>, u64)>> {
        let (cache, digest) = (self.clone(), digest.clone());
        tokio::task::spawn_blocking(move || cache.open_blob(&digest))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// A cached blob, opened, with its length. A file whose size is not the size recorded
    /// at commit (truncated or grown from outside) is quarantined and reported as not
    /// cached, so the blob is fetched anew instead of served wrong.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(Arc<File>, u64)>> {
        let Some(recorded) = self
            .index
            .size(Kind::Blob, digest)
            .or_else(|| self.index_from_disk(Kind::Blob, digest))
        else {
            return Ok(None);
        };
        match self.store.open_file(Kind::Blob, digest)? {
            Some((f, len)) if len == recorded => Ok(Some((Arc::new(f), len))),
            Some((_, len)) => {
                tracing::warn!(%digest, recorded, found = len, "cached blob has the wrong size");
                self.quarantine(Kind::Blob, digest);
                Ok(None)
            }
            None => {
                self.index.invalidate(Kind::Blob, digest);
                Ok(None)
            }
        }
    }

    /// Takes a blob out of the local tier: its file goes (on the deleter thread), readers
    /// that have it open keep reading.
    pub fn drop_blob(&self, digest: &Digest) {
        self.index.invalidate(Kind::Blob, digest);
    }

    /// Takes damaged content out of service: moved aside and forgotten, so the next
    /// request fetches it anew.
    pub fn quarantine(&self, kind: Kind, digest: &Digest) {
        self.quarantine_then(kind, digest, || {});
    }

    /// [`Cache::quarantine`], running `meanwhile` between its two steps (for a test).
    fn quarantine_then(&self, kind: Kind, digest: &Digest, meanwhile: impl FnOnce()) {
        // The file goes first: a lookup meanwhile finds the recorded size and no file, a
        // miss. Forgotten first, a lookup meanwhile indexed the damaged file again from the
        // disk at its current size and served it as a complete (wrong) 200.
        self.store.quarantine(kind, digest);
        meanwhile();
        self.index.forget(kind, digest);
        if kind == Kind::Manifest {
            self.manifests.invalidate(digest);
        }
    }

    /// A cached manifest: from memory, else from disk (verified, then kept in memory).
    pub fn manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        if let Some(m) = self.manifests.get(digest) {
            self.index.contains(Kind::Manifest, digest); // keep its disk copy recent too
            return Some(m);
        }
        if !self.index.contains(Kind::Manifest, digest) && self.index_from_disk(Kind::Manifest, digest).is_none() {
            return None;
        }
        let raw = std::fs::read(self.store.path(Kind::Manifest, digest)).ok();
        let parsed = raw.and_then(|raw| {
            let nl = raw.iter().position(|&b| b == b'\n')?;
            let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
            let bytes = Bytes::copy_from_slice(&raw[nl + 1..]);
            digest
                .matches(&bytes)
                .then(|| Manifest::new(bytes, media_type, digest.clone()))
        });
        match parsed {
            Some(m) => {
                let m = Arc::new(m);
                self.manifests.insert(digest.clone(), m.clone());
                Some(m)
            }
            None => {
                tracing::warn!(%digest, "cached manifest unreadable or corrupt");
                self.quarantine(Kind::Manifest, digest);
                None
            }
        }
    }

    /// Keeps a verified manifest in memory, where it is answered from at once.
    pub fn remember_manifest(&self, m: Arc<Manifest>) {
        self.manifests.insert(m.digest.clone(), m);
    }

    /// Keeps a verified manifest in memory at once (so it is answered even if the disk
    /// cannot take it) and stores it on disk. Blocking: call it off the async workers.
    pub fn put_manifest(&self, m: Arc<Manifest>) -> io::Result<()> {
        self.remember_manifest(m.clone());
        let size = (m.media_type.len() + 1 + m.bytes.len()) as u64;
        let tmp = self
            .store
            .write_temp(&[m.media_type.as_bytes(), b"\n", &m.bytes])
            .inspect_err(|_| self.store.note_write_error())?;
        let placed = self.index.commit(Kind::Manifest, &m.digest, size, || {
            self.store.place(&tmp, Kind::Manifest, &m.digest)
        });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.store.sync_parent(Kind::Manifest, &m.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(body: &'static [u8]) -> Arc<Manifest> {
        let media_type = "application/vnd.oci.image.manifest.v1+json".to_owned();
        Arc::new(Manifest::new(
            Bytes::from_static(body),
            media_type,
            Digest::sha256_of(body),
        ))
    }

    /// Cuts a file short from outside, as a failing disk or a stray tool would.
    fn cut(path: &std::path::Path, len: u64) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(len).unwrap();
    }

    /// A lookup while a damaged blob is being quarantined never finds it (else it is indexed
    /// again from the disk at its damaged size and served as a complete, wrong 200).
    #[test]
    fn a_blob_being_quarantined_is_not_found_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 30, 1 << 20).unwrap();
        let data = vec![7u8; 64 * 1024];
        let digest = Digest::sha256_of(&data);
        let path = cache.store.path(Kind::Blob, &digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        assert_eq!(cache.open_blob(&digest).unwrap().map(|(_, len)| len), Some(64 * 1024));
        cut(&path, 4096);
        cache.quarantine_then(Kind::Blob, &digest, || {
            let found = cache.open_blob(&digest).unwrap().map(|(_, len)| len);
            assert_eq!(found, None, "a damaged blob was found while it was quarantined");
        });
        assert_eq!(cache.open_blob(&digest).unwrap().map(|(_, len)| len), None);
    }

    /// A lookup that reaches the disk before the index is rebuilt checks the size recorded
    /// at commit too: a file cut while regcache was down is set aside, never served.
    #[test]
    fn a_blob_cut_while_down_is_not_served_before_the_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![9u8; 64 * 1024];
        let digest = Digest::sha256_of(&data);
        {
            let cache = Cache::open(dir.path(), 1 << 30, 1 << 20).unwrap();
            let (tmp, mut file) = cache.store.temp_file().unwrap();
            std::io::Write::write_all(&mut file, &data).unwrap();
            blob_store::record_size(&file, data.len() as u64);
            cache.store.place(&tmp, Kind::Blob, &digest).unwrap();
            let path = cache.store.path(Kind::Blob, &digest);
            assert_eq!(
                blob_store::recorded_size(&path),
                Some(64 * 1024),
                "this disk keeps user attributes"
            );
            cut(&path, 4096);
        }
        let cache = Cache::open_unindexed(dir.path(), 1 << 30, 1 << 20).unwrap();
        assert!(cache.loading());
        assert_eq!(cache.open_blob(&digest).unwrap().map(|(_, len)| len), None);
        assert!(
            !cache.store.path(Kind::Blob, &digest).exists(),
            "the cut file stays in place"
        );
    }

    /// A blob found cut by the startup scan, then refetched and committed by a request
    /// before the scan's results are indexed: the new, whole file stays.
    #[test]
    fn a_blob_refetched_during_the_startup_scan_is_not_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![5u8; 64 * 1024];
        let digest = Digest::sha256_of(&data);
        let commit = |cache: &Cache| {
            let (tmp, mut file) = cache.store.temp_file().unwrap();
            std::io::Write::write_all(&mut file, &data).unwrap();
            blob_store::record_size(&file, data.len() as u64);
            cache.index.commit(Kind::Blob, &digest, data.len() as u64, || {
                cache.store.place(&tmp, Kind::Blob, &digest)
            })
        };
        {
            let cache = Cache::open(dir.path(), 1 << 30, 1 << 20).unwrap();
            commit(&cache).unwrap();
            cut(&cache.store.path(Kind::Blob, &digest), 4096);
        }
        let cache = Cache::open_unindexed(dir.path(), 1 << 30, 1 << 20).unwrap();
        let scanned = cache.store.scan_all().unwrap();
        assert!(scanned.iter().any(|s| s.digest == digest && s.damaged()));
        // A request meanwhile: the cut file is set aside and the blob fetched again.
        assert!(cache.open_blob(&digest).unwrap().is_none());
        commit(&cache).unwrap();
        cache.index_scanned(scanned);
        assert_eq!(cache.open_blob(&digest).unwrap().map(|(_, len)| len), Some(64 * 1024));
    }

    #[tokio::test]
    async fn a_warm_tag_hit_answers_its_own_records_manifest_and_falls_back_when_it_left_memory() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), 1 << 30, 1 << 20).unwrap());
        let key = TagKey {
            upstream: "docker.io".into(),
            repo: "library/app".into(),
            tag: "latest".into(),
            accept: 15,
        };
        let point = |m: &Arc<Manifest>| {
            cache.put_manifest(m.clone()).unwrap();
            cache
                .tags
                .remember(TagRecord::new(&key, &m.digest, &m.media_type, m.bytes.len() as u64));
        };
        let (a, b) = (manifest(b"{\"a\":1}"), manifest(b"{\"b\":2}"));
        point(&a);
        for _ in 0..2 {
            assert_eq!(cache.load_tag(&key).await.unwrap().1.digest, a.digest);
        }
        // Moved: the new record answers with its own manifest, never the old one's.
        point(&b);
        assert_eq!(cache.load_tag(&key).await.unwrap().1.digest, b.digest);
        // Out of memory (and held by no one): read from the disk again.
        let b_digest = b.digest.clone();
        drop((a, b));
        cache.manifests.invalidate(&b_digest);
        let (_, again) = cache.load_tag(&key).await.unwrap();
        assert_eq!(again.digest, b_digest);
        assert_eq!(again.bytes.as_ref(), b"{\"b\":2}");
    }
}
