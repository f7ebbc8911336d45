//! Pinned images: `[cache] pinned` patterns and the images `regcache prefetch --pin` took
//! (recorded in `v1/pins`). Every manifest, blob and attachment (cosign tags, referrers
//! lists) of a pinned image is pinned in the index: counted against the budget, never
//! evicted; and its tags are served regardless of their TTL.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::blob_store::Kind;
use super::index::Key;
use crate::access::glob_match;
use crate::digest::Digest;

const FILE: &str = "pins";

/// A pattern as users write it, normalized like an image name: `alpine:3.20` is
/// `docker.io/library/alpine:3.20`, `ghcr.io/org/app` (every tag) stays a repository, and
/// patterns with `*` are taken as written.
pub fn normalize(pattern: &str) -> Result<String, String> {
    if pattern.contains('*') {
        return Ok(pattern.to_owned());
    }
    let last = pattern.rsplit('/').next().unwrap_or(pattern);
    let names_a_version = pattern.contains('@') || last.contains(':');
    let image = crate::prefetch::parse_image(pattern)?;
    Ok(if names_a_version {
        image.to_string()
    } else {
        format!("{}/{}", image.registry, image.repo)
    })
}

pub struct Pins {
    root: PathBuf,
    configured: RwLock<Vec<String>>,
    patterns: RwLock<Vec<String>>,
}

/// What the pinned images need: the keys to pin, and their bytes by their descriptors
/// (also for content not cached yet).
#[derive(Debug, Default)]
pub struct Resolved {
    pub keys: HashSet<Key>,
    pub bytes: u64,
}

impl Pins {
    pub fn new(root: &Path) -> Pins {
        Pins {
            root: root.to_path_buf(),
            configured: RwLock::default(),
            patterns: RwLock::default(),
        }
    }

    /// Sets the configured patterns (already normalized) and reloads.
    pub fn configure(&self, patterns: Vec<String>) {
        *self.configured.write().unwrap_or_else(|p| p.into_inner()) = patterns;
        self.reload();
    }

    /// The configured patterns and those in `v1/pins`. Blocking.
    pub fn reload(&self) {
        let mut all = self.configured.read().unwrap_or_else(|p| p.into_inner()).clone();
        let file = fs::read_to_string(self.root.join(FILE)).unwrap_or_default();
        all.extend(file.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned));
        all.sort();
        all.dedup();
        *self.patterns.write().unwrap_or_else(|p| p.into_inner()) = all;
    }

    /// Records images as pinned in `v1/pins` of the cache under `root` (lines not there yet).
    pub fn add(root: &Path, names: &[String]) -> io::Result<()> {
        let path = root.join(FILE);
        let existing = fs::read_to_string(&path).unwrap_or_default();
        let have: HashSet<&str> = existing.lines().collect();
        let new: String = names
            .iter()
            .filter(|n| !have.contains(n.as_str()))
            .map(|n| format!("{n}\n"))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut f = fs::OpenOptions::new().create(true).append(true).open(&path)?;
        f.write_all(new.as_bytes())?;
        f.sync_all()
    }

    /// The patterns in force (configured and recorded).
    pub fn patterns(&self) -> Vec<String> {
        self.patterns.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Whether a tag belongs to a pinned image.
    pub fn matches(&self, upstream: &str, repo: &str, tag: &str) -> bool {
        let patterns = self.patterns.read().unwrap_or_else(|p| p.into_inner());
        if patterns.is_empty() {
            return false;
        }
        let repository = format!("{upstream}/{repo}");
        let full = format!("{repository}:{tag}");
        patterns
            .iter()
            .any(|p| glob_match(p, &full) || glob_match(p, &repository))
    }

    /// Whether an image cached by digest is pinned (by its digest or its repository).
    pub fn covers_digest(&self, upstream: &str, repo: &str, digest: &str) -> bool {
        let repository = format!("{upstream}/{repo}");
        let by_digest = format!("{repository}@{digest}");
        self.patterns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|p| glob_match(p, &by_digest) || glob_match(p, &repository))
    }

    /// Everything the pinned images are made of, from the tag records and manifests on
    /// disk. Blocking.
    pub fn resolve(&self) -> Resolved {
        let mut resolved = Resolved::default();
        if self.is_empty() {
            return resolved;
        }
        // (upstream, repo) -> tag -> digest, from every record.
        let mut tags: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
        super::tags::TagStore::new(&self.root).each_record(|_, r| {
            if let Some(r) = r {
                let (upstream, repo, tag) = r.names();
                tags.entry((upstream.to_owned(), repo.to_owned()))
                    .or_default()
                    .insert(tag.to_owned(), r.digest.clone());
            }
        });
        let mut roots: Vec<((String, String), String)> = Vec::new();
        for ((upstream, repo), by_tag) in &tags {
            for (tag, digest) in by_tag {
                if crate::oci::is_valid_tag(tag) && self.matches(upstream, repo, tag) {
                    roots.push(((upstream.clone(), repo.clone()), digest.clone()));
                }
            }
        }
        for p in self.patterns.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if let (false, Some((name, digest))) = (p.contains('*'), p.split_once('@')) {
                if let Some((upstream, repo)) = name.split_once('/') {
                    roots.push(((upstream.to_owned(), repo.to_owned()), digest.to_owned()));
                }
            }
        }
        let mut seen = HashSet::new();
        for (pair, digest) in roots {
            self.take(&pair, &digest, &tags, &mut seen, &mut resolved);
        }
        resolved
    }

    /// A manifest's closure with what is attached to each of its manifests.
    fn take(
        &self,
        pair: &(String, String),
        digest: &str,
        tags: &BTreeMap<(String, String), BTreeMap<String, String>>,
        seen: &mut HashSet<String>,
        resolved: &mut Resolved,
    ) {
        let mut stack = vec![digest.to_owned()];
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let Ok(parsed) = d.parse::<Digest>() else { continue };
            resolved.keys.insert((Kind::Manifest, parsed.clone()));
            let Some((media_type, bytes)) = crate::layout::cached_manifest(&self.root, &parsed) else {
                continue; // pinned as it arrives; its size is not known yet
            };
            resolved.bytes += (media_type.len() + 1 + bytes.len()) as u64;
            let (children, blobs) = crate::layout::references(&bytes);
            for (blob, size) in blobs {
                if let Ok(b) = blob.parse::<Digest>() {
                    if resolved.keys.insert((Kind::Blob, b)) {
                        resolved.bytes += size;
                    }
                }
            }
            stack.extend(children);
            let attached = tags.get(pair);
            if let (Some(attached), Some(hex)) = (attached, d.strip_prefix("sha256:")) {
                for suffix in ["sig", "att", "sbom"] {
                    if let Some(a) = attached.get(&format!("sha256-{hex}.{suffix}")) {
                        stack.push(a.clone());
                    }
                }
            }
            if let Some(list) = attached.and_then(|a| a.get(&format!("referrers/{d}"))) {
                stack.push(list.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_normalized_like_image_names() {
        assert_eq!(normalize("alpine:3.20").unwrap(), "docker.io/library/alpine:3.20");
        assert_eq!(normalize("ghcr.io/org/app").unwrap(), "ghcr.io/org/app");
        assert_eq!(normalize("ghcr.io/org/*").unwrap(), "ghcr.io/org/*");
        assert!(normalize("Not Valid").is_err());
        let pins = Pins::new(Path::new("/nonexistent"));
        pins.configure(vec!["docker.io/library/alpine:3.20".into(), "ghcr.io/org/*".into()]);
        assert!(pins.matches("docker.io", "library/alpine", "3.20"));
        assert!(!pins.matches("docker.io", "library/alpine", "3.19"));
        assert!(pins.matches("ghcr.io", "org/app", "anything"));
        assert!(!pins.matches("ghcr.io", "other/app", "1"));
    }
}
