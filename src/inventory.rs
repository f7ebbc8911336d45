//! What a cache dir holds, read without changing anything and without the cache-dir lock
//! (so beside a running server): the view `regcache ls` and `regcache du` print. Built from
//! the files themselves: tag records, manifests (parsed for what they reference), blob
//! sizes and times, and the log of which (upstream, repository) pairs hold each digest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::cache::blob_store::Kind;
use crate::cache::tags::TagRecord;
use crate::digest::Digest;

/// One committed file: its size and when it was last used (atime or mtime, the later).
#[derive(Debug, Clone, Copy)]
struct File {
    size: u64,
    used: SystemTime,
}

pub struct Inventory {
    blobs: HashMap<String, File>,
    /// Manifest digest -> (file, digests it references: blobs and child manifests).
    manifests: HashMap<String, (File, Vec<String>)>,
    tags: Vec<TagRecord>,
    /// (upstream, repo) -> digests recorded under it.
    pairs: BTreeMap<(String, String), BTreeSet<String>>,
    /// Blob files whose size is not the one recorded at their commit.
    damaged: usize,
}

/// One line of `regcache ls`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub repository: String,
    /// The tag, or `None` for content cached by digest only.
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: String,
    /// The manifest and everything it references that is cached (child manifests of an
    /// index included), each counted once.
    pub size: u64,
    /// Unix seconds of the last use of any of those files.
    pub last_used: u64,
    /// Whether a pin (`[cache] pinned`, `prefetch --pin`) keeps it.
    pub pinned: bool,
}

/// `regcache du`: bytes per (upstream, repository) and in all, against the budget.
#[derive(Debug, Serialize)]
pub struct Usage {
    pub repositories: Vec<RepoUsage>,
    /// Every committed file once (content shared by repositories counts once here).
    pub total: u64,
    pub files: usize,
    /// Blob files cut or grown since their commit (while no regcache watched them): set
    /// aside at the next start, or now by `regcache verify --repair`.
    pub damaged: usize,
}

#[derive(Debug, Serialize)]
pub struct RepoUsage {
    pub upstream: String,
    pub repository: String,
    pub bytes: u64,
}

/// The committed files of `kind`, by digest, and how many of them are damaged.
fn committed(root: &Path, kind: Kind) -> io::Result<(Vec<(Digest, File)>, usize)> {
    let mut found = Vec::new();
    crate::cache::blob_store::scan_dir(root, kind, &mut found)?;
    let damaged = found.iter().filter(|f| f.damaged()).count();
    let files = found
        .into_iter()
        .map(|f| {
            (
                f.digest,
                File {
                    size: f.size,
                    used: f.last_used,
                },
            )
        })
        .collect();
    Ok((files, damaged))
}

/// A stored manifest: its own size and the digests it references (blobs and child
/// manifests).
fn references(root: &Path, digest: &Digest) -> (u64, Vec<String>) {
    let Some((_, bytes)) = crate::layout::cached_manifest(root, digest) else {
        return (0, Vec::new());
    };
    let (children, blobs) = crate::layout::references(&bytes);
    let refs = children.into_iter().chain(blobs.into_iter().map(|(d, _)| d)).collect();
    (bytes.len() as u64, refs)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Inventory {
    /// Reads the cache under `dir` (the configured `cache.dir`).
    pub fn read(dir: &Path) -> io::Result<Inventory> {
        let root = dir.join("v1");
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} holds no regcache cache", dir.display()),
            ));
        }
        let (blobs, damaged) = committed(&root, Kind::Blob)?;
        let blobs = blobs.into_iter().map(|(d, f)| (d.to_string(), f)).collect();
        let manifests = committed(&root, Kind::Manifest)?
            .0
            .into_iter()
            .map(|(d, f)| {
                let (size, refs) = references(&root, &d);
                (d.to_string(), (File { size, ..f }, refs))
            })
            .collect();
        let mut tags = Vec::new();
        crate::cache::tags::TagStore::new(&root).each_record(|_, r| tags.extend(r));
        let mut pairs: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        if let Ok(log) = fs::read_to_string(root.join("associations")) {
            for line in log.lines() {
                if let Some((digest, upstream, repo)) = crate::cache::associations::parse_line(line) {
                    pairs.entry((upstream, repo)).or_default().insert(digest.to_string());
                }
            }
        }
        Ok(Inventory {
            blobs,
            manifests,
            tags,
            pairs,
            damaged,
        })
    }

    /// The manifest, and everything under it that is cached, each once: (bytes, last use).
    fn closure(&self, digest: &str) -> (u64, SystemTime) {
        let mut seen = BTreeSet::new();
        let mut stack = vec![digest.to_owned()];
        let (mut size, mut used) = (0, SystemTime::UNIX_EPOCH);
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if let Some((f, refs)) = self.manifests.get(&d) {
                size += f.size;
                used = used.max(f.used);
                stack.extend(refs.iter().cloned());
            } else if let Some(f) = self.blobs.get(&d) {
                size += f.size;
                used = used.max(f.used);
            }
        }
        (size, used)
    }

    /// Cached images: every tag whose manifest is cached, and manifests cached by digest
    /// under a repository without a tag pointing at them; `pattern` (with `*`) is matched
    /// against `<upstream>/<repo>` and `<upstream>/<repo>:<tag>`.
    pub fn list(&self, pattern: Option<&str>, pins: &crate::cache::pins::Pins) -> Vec<Listed> {
        let matches = |repo: &str, tag: Option<&str>| match pattern {
            None => true,
            Some(p) => {
                crate::access::glob_match(p, repo)
                    || tag.is_some_and(|t| crate::access::glob_match(p, &format!("{repo}:{t}")))
            }
        };
        let mut out = Vec::new();
        let mut tagged: BTreeSet<(String, String)> = BTreeSet::new();
        for r in &self.tags {
            let (upstream, repo, tag) = r.names();
            if !crate::oci::is_valid_tag(tag) || !self.manifests.contains_key(&r.digest) {
                continue; // referrers answers, or a manifest evicted since
            }
            let repository = format!("{upstream}/{repo}");
            tagged.insert((repository.clone(), r.digest.clone()));
            if !matches(&repository, Some(tag)) {
                continue;
            }
            let (size, used) = self.closure(&r.digest);
            out.push(Listed {
                pinned: pins.matches(upstream, repo, tag),
                repository,
                tag: Some(tag.to_owned()),
                digest: r.digest.clone(),
                media_type: r.media_type.clone(),
                size,
                last_used: unix(used),
            });
        }
        // A tag is recorded once per Accept set; one line per (repository, tag, digest).
        out.sort_by(|a, b| (&a.repository, &a.tag, &a.digest).cmp(&(&b.repository, &b.tag, &b.digest)));
        out.dedup_by(|a, b| (&a.repository, &a.tag, &a.digest) == (&b.repository, &b.tag, &b.digest));
        let children: BTreeSet<&String> = self.manifests.values().flat_map(|(_, refs)| refs).collect();
        for ((upstream, repo), digests) in &self.pairs {
            let repository = format!("{upstream}/{repo}");
            if !matches(&repository, None) {
                continue;
            }
            for d in digests {
                // Platform manifests of a listed index are part of its line.
                if !self.manifests.contains_key(d)
                    || tagged.contains(&(repository.clone(), d.clone()))
                    || children.contains(d)
                {
                    continue;
                }
                let (size, used) = self.closure(d);
                out.push(Listed {
                    pinned: pins.covers_digest(upstream, repo, d),
                    repository: repository.clone(),
                    tag: None,
                    digest: d.clone(),
                    media_type: String::new(),
                    size,
                    last_used: unix(used),
                });
            }
        }
        out
    }

    /// Blobs no cached manifest references (as config, layer or blob), last used before
    /// `before`: (digest, size).
    pub fn unreferenced_blobs(&self, before: SystemTime) -> Vec<(String, u64)> {
        let referenced: BTreeSet<&String> = self.manifests.values().flat_map(|(_, refs)| refs).collect();
        let mut out: Vec<(String, u64)> = self
            .blobs
            .iter()
            .filter(|(d, f)| !referenced.contains(d) && f.used < before)
            .map(|(d, f)| (d.clone(), f.size))
            .collect();
        out.sort();
        out
    }

    /// Bytes per repository (what its recorded digests take) and in all.
    pub fn usage(&self) -> Usage {
        let mut repositories: Vec<RepoUsage> = self
            .pairs
            .iter()
            .map(|((upstream, repo), digests)| RepoUsage {
                upstream: upstream.clone(),
                repository: repo.clone(),
                bytes: digests
                    .iter()
                    .filter_map(|d| self.blobs.get(d).or(self.manifests.get(d).map(|m| &m.0)))
                    .map(|f| f.size)
                    .sum(),
            })
            .collect();
        repositories.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.repository.cmp(&b.repository)));
        Usage {
            total: self
                .blobs
                .values()
                .chain(self.manifests.values().map(|m| &m.0))
                .map(|f| f.size)
                .sum(),
            files: self.blobs.len() + self.manifests.len(),
            damaged: self.damaged,
            repositories,
        }
    }
}

/// Bytes as people read them (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
