//! Persistent tag mappings: (upstream, repository, tag, accepted types) -> manifest digest,
//! with the time the upstream last confirmed it. One small JSON file per mapping, written
//! atomically, read lazily (startup reads none of them) and kept in a bounded memory cache.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagKey {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub accept: u8,
}

/// A tag key's parts, owned ([`TagKey`]) or borrowed ([`TagKeyRef`]): a warm hit looks its
/// record up in memory by the request's own strings, without building a key (three
/// allocations on every hit).
pub trait TagKeyParts {
    /// (upstream, repository, tag, Accept set bits).
    fn parts(&self) -> (&str, &str, &str, u8);
}

/// A tag key made of borrowed parts.
pub struct TagKeyRef<'a> {
    pub upstream: &'a str,
    pub repo: &'a str,
    pub tag: &'a str,
    pub accept: u8,
}

impl TagKeyParts for TagKey {
    fn parts(&self) -> (&str, &str, &str, u8) {
        (&self.upstream, &self.repo, &self.tag, self.accept)
    }
}

impl TagKeyParts for TagKeyRef<'_> {
    fn parts(&self) -> (&str, &str, &str, u8) {
        (self.upstream, self.repo, self.tag, self.accept)
    }
}

// A key and its parts hash and compare alike, so that either finds the same record.
impl std::hash::Hash for dyn TagKeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn TagKeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn TagKeyParts + '_ {}

impl std::hash::Hash for TagKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self as &dyn TagKeyParts).hash(state);
    }
}

impl<'a> std::borrow::Borrow<dyn TagKeyParts + 'a> for TagKey {
    fn borrow(&self) -> &(dyn TagKeyParts + 'a) {
        self
    }
}

impl TagKey {
    /// A name for the mapping that is safe as a file or object name: the hex of a hash of
    /// the key.
    pub fn id(&self) -> String {
        let id =
            Digest::sha256_of(format!("{}\n{}\n{}\n{}", self.upstream, self.repo, self.tag, self.accept).as_bytes());
        id.hex().to_owned()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagRecord {
    upstream: String,
    repo: String,
    tag: String,
    accept: u8,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Unix milliseconds of the last time the upstream confirmed this mapping.
    pub confirmed_ms: u64,
    /// `digest`, parsed once for the records kept in memory (a warm tag hit needs it).
    #[serde(skip)]
    parsed: Option<Digest>,
    /// The manifest this record was last answered with (see [`TagRecord::answered`]).
    #[serde(skip)]
    answered: Answered,
}

/// A weak hold on a tag's manifest: it upgrades while the manifest is still in memory (in
/// the manifest cache, which holds the only strong reference), so a warm tag hit costs one
/// cache lookup, as a hit by digest does, instead of two. A clone starts empty.
#[derive(Default)]
struct Answered(std::sync::Mutex<std::sync::Weak<super::Manifest>>);

impl Clone for Answered {
    fn clone(&self) -> Answered {
        Answered::default()
    }
}

impl std::fmt::Debug for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answered")
    }
}

impl TagRecord {
    pub fn new(key: &TagKey, digest: &Digest, media_type: &str, size: u64) -> TagRecord {
        TagRecord {
            upstream: key.upstream.clone(),
            repo: key.repo.clone(),
            tag: key.tag.clone(),
            accept: key.accept,
            digest: digest.to_string(),
            media_type: media_type.to_owned(),
            size,
            confirmed_ms: now_ms(),
            parsed: Some(digest.clone()),
            answered: Answered::default(),
        }
    }

    /// The manifest this record was last answered with, if it is still in memory.
    pub fn answered(&self) -> Option<Arc<super::Manifest>> {
        self.answered.0.lock().ok()?.upgrade()
    }

    /// Remembers `manifest` (this record's digest's) for [`TagRecord::answered`].
    pub fn answer_with(&self, manifest: &Arc<super::Manifest>) {
        if let Ok(mut slot) = self.answered.0.lock() {
            *slot = Arc::downgrade(manifest);
        }
    }

    /// The same mapping, confirmed by the upstream just now.
    pub fn reconfirmed(&self) -> TagRecord {
        TagRecord {
            confirmed_ms: now_ms(),
            ..self.clone()
        }
    }

    pub fn digest(&self) -> Option<Digest> {
        self.parsed.clone().or_else(|| self.digest.parse().ok())
    }

    /// The digest without parsing it again (records in memory have it parsed).
    pub fn parsed_digest(&self) -> Option<std::borrow::Cow<'_, Digest>> {
        match &self.parsed {
            Some(d) => Some(std::borrow::Cow::Borrowed(d)),
            None => self.digest.parse().ok().map(std::borrow::Cow::Owned),
        }
    }

    fn with_parsed(mut self) -> TagRecord {
        if self.parsed.is_none() {
            self.parsed = self.digest.parse().ok();
        }
        self
    }

    /// (upstream, repository, tag).
    pub fn names(&self) -> (&str, &str, &str) {
        (&self.upstream, &self.repo, &self.tag)
    }

    /// Marked by [`TagStore::expire`]: to be revalidated whatever its TTL or pin.
    pub fn expired(&self) -> bool {
        self.confirmed_ms == 0
    }

    /// How long ago the upstream last confirmed the mapping.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.confirmed_ms))
    }

    pub fn key(&self) -> TagKey {
        TagKey {
            upstream: self.upstream.clone(),
            repo: self.repo.clone(),
            tag: self.tag.clone(),
            accept: self.accept,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct TagStore {
    dir: PathBuf,
    tmp: PathBuf,
    memory: moka::sync::Cache<TagKey, Arc<TagRecord>>,
    next_tmp: AtomicU64,
}

impl TagStore {
    pub fn new(v1: &std::path::Path) -> TagStore {
        TagStore {
            dir: v1.join("tags"),
            tmp: v1.join("tmp"),
            memory: moka::sync::Cache::new(100_000),
            next_tmp: AtomicU64::new(0),
        }
    }

    fn path(&self, key: &TagKey) -> PathBuf {
        let hex = key.id();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The record if it is in memory (never touches the disk).
    pub fn in_memory(&self, key: &dyn TagKeyParts) -> Option<Arc<TagRecord>> {
        self.memory.get(key)
    }

    /// Marks a tag's records (every Accept set) for revalidation: the next request asks the
    /// upstream, pinned or within its TTL. Reads their files if need be. Blocking.
    pub fn expire(&self, upstream: &str, repo: &str, tag: &str) {
        for accept in 0..=crate::oci::AcceptSet::ALL.bits() {
            let key = TagKey {
                upstream: upstream.to_owned(),
                repo: repo.to_owned(),
                tag: tag.to_owned(),
                accept,
            };
            if let Some(r) = self.get(&key) {
                self.remember(TagRecord {
                    confirmed_ms: 0,
                    ..(*r).clone()
                });
            }
        }
    }

    /// The record, from memory or from its file. Blocking.
    pub fn get(&self, key: &TagKey) -> Option<Arc<TagRecord>> {
        if let Some(r) = self.memory.get(key) {
            return Some(r);
        }
        let text = fs::read(self.path(key)).ok()?;
        let record: TagRecord = serde_json::from_slice(&text).ok()?;
        if record.key() != *key {
            return None;
        }
        let record = Arc::new(record.with_parsed());
        self.memory.insert(key.clone(), record.clone());
        Some(record)
    }

    /// Keeps a mapping in memory, where it is answered from at once (even if its file
    /// cannot be written).
    pub fn remember(&self, record: TagRecord) -> Arc<TagRecord> {
        let record = Arc::new(record.with_parsed());
        self.memory.insert(record.key(), record.clone());
        record
    }

    /// Keeps a mapping in memory and stores it (temp file + rename, with an fsync first
    /// when `durable`). Blocking.
    pub fn put(&self, record: TagRecord, durable: bool) -> io::Result<Arc<TagRecord>> {
        let record = self.remember(record);
        self.persist(&record, durable)?;
        Ok(record)
    }

    /// Writes a remembered mapping's file. Blocking.
    pub fn persist(&self, record: &TagRecord, durable: bool) -> io::Result<()> {
        let key = record.key();
        let path = self.path(&key);
        let body = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("tag-{}-{n}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            if durable {
                f.sync_all()?;
            }
            if let Some(parent) = path.parent() {
                super::blob_store::make_dirs(parent, 2)?;
            }
            fs::rename(&tmp, &path)
        };
        write().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

impl TagStore {
    /// The tags recorded for a repository whose manifests are still cached, sorted: what a
    /// tags/list is answered with when the upstream cannot be asked. Reads every record
    /// file. Blocking.
    pub fn tags_of(&self, upstream: &str, repo: &str, cached: impl Fn(&Digest) -> bool) -> Vec<String> {
        let mut tags = std::collections::BTreeSet::new();
        self.each_record(|_, record| {
            let Some(record) = record else { return };
            // Referrers answers are kept as records too; they are not tags.
            if record.upstream == upstream
                && record.repo == repo
                && crate::oci::is_valid_tag(&record.tag)
                && record.digest().is_some_and(|d| cached(&d))
            {
                tags.insert(record.tag);
            }
        });
        tags.into_iter().collect()
    }

    /// Every record file: its path and what it holds (`None` when unreadable). Blocking.
    pub fn each_record(&self, mut f: impl FnMut(&std::path::Path, Option<TagRecord>)) {
        let Ok(fans) = fs::read_dir(&self.dir) else { return };
        for fan in fans.flatten() {
            let Ok(files) = fs::read_dir(fan.path()) else { continue };
            for file in files.flatten() {
                let path = file.path();
                let record = fs::read(&path).ok().and_then(|t| serde_json::from_slice(&t).ok());
                f(&path, record);
            }
        }
    }

    /// Deletes the records whose manifest is no longer cached (`cached` says which are):
    /// a record outlives its manifest only until the next collection, so records stay
    /// bounded by what the cache holds. Blocking: a background thread's work.
    pub fn collect(&self, cached: impl Fn(&Digest) -> bool) -> usize {
        let mut removed = 0;
        self.each_record(|path, record| {
            let keep = record.as_ref().and_then(TagRecord::digest).is_some_and(|d| cached(&d));
            if !keep && fs::remove_file(path).is_ok() {
                if let Some(r) = record {
                    self.memory.invalidate(&r.key());
                }
                removed += 1;
            }
        });
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker.io/library/alpine:3` for any client's Accept list.
    fn alpine_3() -> TagKey {
        TagKey {
            upstream: "docker.io".into(),
            repo: "library/alpine".into(),
            tag: "3".into(),
            accept: 15,
        }
    }

    fn index_record(key: &TagKey, digest: &Digest) -> TagRecord {
        TagRecord::new(key, digest, "application/vnd.oci.image.index.v1+json", 1)
    }

    #[test]
    fn a_record_kept_under_its_key_is_found_by_the_key_s_borrowed_parts_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = TagStore::new(dir.path());
        let (key, d) = (alpine_3(), Digest::sha256_of(b"m"));
        store.remember(index_record(&key, &d));
        let parts = |upstream, repo, tag, accept| TagKeyRef {
            upstream,
            repo,
            tag,
            accept,
        };
        let found = store.in_memory(&parts("docker.io", "library/alpine", "3", 15));
        assert_eq!(found.and_then(|r| r.digest()), Some(d));
        for other in [
            parts("docker.io", "library/alpine", "3", 1),
            parts("docker.io", "library/alpine", "4", 15),
            parts("docker.io", "library/alpin", "e/3", 15),
            parts("ghcr.io", "library/alpine", "3", 15),
        ] {
            assert!(store.in_memory(&other).is_none(), "{:?}", other.parts());
        }
    }

    #[test]
    fn put_then_get_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let (key, d) = (alpine_3(), Digest::sha256_of(b"m"));
        TagStore::new(dir.path()).put(index_record(&key, &d), true).unwrap();
        let again = TagStore::new(dir.path());
        let r = again.get(&key).unwrap();
        assert_eq!(r.digest(), Some(d.clone()));
        assert!(r.age() < Duration::from_secs(60));
        let other = TagKey {
            accept: 1,
            ..key.clone()
        };
        assert!(again.get(&other).is_none());

        // Collected once its manifest is gone, kept while it is cached.
        assert_eq!(again.collect(|digest| *digest == d), 0);
        assert!(again.get(&key).is_some());
        assert_eq!(again.collect(|_| false), 1);
        assert!(again.get(&key).is_none());
        assert!(TagStore::new(dir.path()).get(&key).is_none());
    }
}
