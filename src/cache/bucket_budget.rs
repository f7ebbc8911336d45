//! The shared bucket's size budget (`[cache.s3] max_size`) and its collection, across
//! replicas. Each replica notes in memory when it serves a blob and, every
//! `collect_every`, puts what it noted as one small object under `access/`. One replica at
//! a time, elected with a lease object (`leases/collector`, the same conditional puts as
//! the fill leases), collects: it folds the access notes into `access/merged.json`,
//! deletes blobs that no manifest in the bucket references, then the least recently used
//! ones until the blobs fit the budget. Never collected: what a pinned image is made of
//! (the pins are matched against the bucket's own tag records), what a fill lease holds,
//! and anything used within two intervals (an access not yet noted is at most one
//! interval old). A replica that still needs a collected blob fetches it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::bucket::Bucket;
use super::cluster::now_ms;
use super::pins::Pins;
use crate::digest::Digest;

const COLLECTOR_LEASE: &str = "collector";
const MERGED: &str = "access/merged.json";

/// Blob deletes a collection keeps in flight.
const DELETES_AT_ONCE: usize = 16;

pub struct BucketBudget {
    bucket: Arc<Bucket>,
    /// This replica, in its access notes and the collector lease.
    id: String,
    max_bytes: u64,
    every: Duration,
    /// Blob (hex) -> Unix milliseconds of its last use here, since the last note.
    touched: Mutex<HashMap<String, u64>>,
    /// Manifest (hex) -> what it references: manifests never change.
    references: Mutex<HashMap<String, References>>,
    /// Tag object -> what it said when last read.
    tags: Mutex<HashMap<String, TagSeen>>,
    metrics: BudgetMetrics,
}

/// A manifest's child manifests and blobs (hex).
struct References {
    children: Vec<String>,
    blobs: Vec<String>,
}

/// A tag record of the bucket: its ETag (read again when it changes), (upstream, repo,
/// tag), and the manifest it names.
#[derive(Clone)]
struct TagSeen {
    e_tag: Option<String>,
    names: (String, String, String),
    digest: String,
}

pub struct BudgetMetrics {
    pub bytes: prometheus::IntGauge,
    pub budget: prometheus::IntGauge,
    pub collected: prometheus::IntCounterVec,
}

/// What one collection found and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Bytes of blobs in the bucket before and after.
    pub before: u64,
    pub after: u64,
    pub unreferenced: usize,
    pub evicted: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    holder: String,
    expires_ms: u64,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl BucketBudget {
    pub fn new(bucket: Arc<Bucket>, max_bytes: u64, every: Duration, metrics: BudgetMetrics) -> BucketBudget {
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        metrics.budget.set(max_bytes as i64);
        for reason in ["unreferenced", "budget"] {
            metrics.collected.with_label_values(&[reason]);
        }
        BucketBudget {
            bucket,
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            max_bytes,
            every,
            touched: Mutex::default(),
            references: Mutex::default(),
            tags: Mutex::default(),
            metrics,
        }
    }

    /// Notes that a blob was served (a map insert; the note goes out with the next tick).
    pub fn touch(&self, digest: &Digest) {
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.insert(digest.hex().to_owned(), now_ms());
    }

    /// Notes and (when elected) collects every interval, until the runtime ends.
    pub fn start(self: &Arc<Self>, cache: Arc<super::Cache>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = this.note_access().await {
                    tracing::warn!(bucket = %this.bucket.name, error = %e, "cannot note blob accesses in the shared bucket");
                }
                if !this.elected().await {
                    continue;
                }
                match this.collect(&cache.pins).await {
                    Ok(c) if c.unreferenced + c.evicted > 0 => tracing::info!(
                        bucket = %this.bucket.name, before = c.before, after = c.after,
                        unreferenced = c.unreferenced, evicted = c.evicted, "collected the shared bucket"),
                    Ok(c) if c.after > this.max_bytes => tracing::warn!(
                        bucket = %this.bucket.name, bytes = c.after, budget = this.max_bytes,
                        "the shared bucket is over its budget with pinned, leased or recently used blobs only"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(bucket = %this.bucket.name, error = %e, "cannot collect the shared bucket")
                    }
                }
            }
        });
    }

    /// Puts what was served since the last note as `access/<replica>-<ms>.json`.
    async fn note_access(&self) -> Result<(), String> {
        let touched = std::mem::take(&mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()));
        if touched.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(&touched).map_err(|e| e.to_string())?;
        let name = format!("access/{}-{}.json", self.id, now_ms());
        self.bucket.put_key(&name, Bytes::from(body)).await
    }

    /// Whether this replica collects now: it holds (or just took) the collector lease.
    async fn elected(&self) -> bool {
        let ttl = 3 * self.every.as_millis() as u64;
        let body = |expires_ms| {
            Bytes::from(
                serde_json::to_vec(&LeaseBody {
                    holder: self.id.clone(),
                    expires_ms,
                })
                .unwrap_or_default(),
            )
        };
        match self.bucket.create_lease(COLLECTOR_LEASE, body(now_ms() + ttl)).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        let Ok(Some((current, version))) = self.bucket.read_lease(COLLECTOR_LEASE).await else {
            return false;
        };
        let lease = serde_json::from_slice::<LeaseBody>(&current).ok();
        let ours_or_expired = lease.is_none_or(|l| l.holder == self.id || l.expires_ms < now_ms());
        ours_or_expired
            && matches!(
                self.bucket
                    .replace_lease(COLLECTOR_LEASE, body(now_ms() + ttl), version)
                    .await,
                Ok(Some(_))
            )
    }

    /// One collection (the caller holds the collector lease).
    pub async fn collect(&self, pins: &Pins) -> Result<Collected, String> {
        let started = now_ms();
        let grace = 2 * self.every.as_millis() as u64;
        let (mut last_use, folded) = self.read_access().await?;
        let referenced = self.referenced().await?;
        let pinned = self.pinned(pins).await?;
        let leased: HashSet<String> = self
            .bucket
            .list_keys("leases/")
            .await?
            .into_iter()
            .filter_map(|m| m.location.filename().filter(|n| is_hex64(n)).map(str::to_owned))
            .collect();
        // (hex, size, last use)
        let mut blobs: Vec<(String, u64, u64)> = Vec::new();
        for meta in self.bucket.list_keys("blobs/sha256/").await? {
            let Some(hex) = meta.location.filename().filter(|n| is_hex64(n)).map(str::to_owned) else {
                continue;
            };
            let modified = meta.last_modified.timestamp_millis().max(0) as u64;
            let used = last_use.get(&hex).copied().unwrap_or(0).max(modified);
            blobs.push((hex, meta.size, used));
        }
        let mut present: HashSet<String> = blobs.iter().map(|b| b.0.clone()).collect();
        let before: u64 = blobs.iter().map(|b| b.1).sum();
        let mut total = before;
        let mut outcome = Collected {
            before,
            ..Default::default()
        };
        let collectable = |(hex, _, used): &(String, u64, u64)| {
            !pinned.contains(hex) && !leased.contains(hex) && used + grace < started
        };
        let (mut candidates, _kept): (Vec<_>, Vec<_>) = blobs.into_iter().partition(collectable);
        // Least recently used first.
        candidates.sort_by_key(|b| b.2);
        let mut doomed: Vec<(String, u64, &'static str)> = Vec::new();
        let mut planned = total;
        for (hex, size, _) in candidates {
            let reason = if !referenced.contains(&hex) {
                "unreferenced"
            } else if planned > self.max_bytes {
                "budget"
            } else {
                continue;
            };
            planned -= size;
            doomed.push((hex, size, reason));
        }
        // Several deletes at a time: each is a round trip to the store (and one more per
        // recorded pair), which one after another add up for a collection of thousands.
        let mut failed = None;
        let mut deleted = Vec::new();
        let mut queue = doomed.into_iter();
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < DELETES_AT_ONCE {
                let Some((hex, size, reason)) = queue.next() else {
                    break;
                };
                let bucket = self.bucket.clone();
                running.spawn(async move {
                    let result = bucket.delete_blob(&hex).await;
                    (hex, size, reason, result)
                });
            }
            match running.join_next().await {
                Some(Ok(done)) => deleted.push(done),
                Some(Err(e)) => {
                    failed.get_or_insert(e.to_string());
                }
                None => break,
            }
        }
        for (hex, size, reason, result) in deleted {
            if let Err(e) = result {
                failed.get_or_insert(e);
                continue;
            }
            present.remove(&hex);
            total -= size;
            self.metrics.collected.with_label_values(&[reason]).inc();
            match reason {
                "unreferenced" => outcome.unreferenced += 1,
                _ => outcome.evicted += 1,
            }
        }
        self.metrics.bytes.set(total as i64);
        if let Some(e) = failed {
            return Err(e);
        }
        outcome.after = total;
        // The merged notes keep only blobs still in the bucket (or uploaded since the listing).
        let pruned = last_use.len();
        last_use.retain(|hex, at| present.contains(hex) || *at + grace >= started);
        if !folded.is_empty() || last_use.len() != pruned {
            // Megabytes for a big bucket: encoded on the blocking pool, not an async worker.
            let body = tokio::task::spawn_blocking(move || serde_json::to_vec(&last_use))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            self.bucket.put_key(MERGED, Bytes::from(body)).await?;
            for name in folded {
                self.bucket.delete_key(&format!("access/{name}")).await;
            }
        }
        Ok(outcome)
    }

    /// Every replica's access notes folded into `access/merged.json`: blob (hex) -> last
    /// use (Unix ms), and the notes folded in (to delete once the merge is stored).
    async fn read_access(&self) -> Result<(HashMap<String, u64>, Vec<String>), String> {
        let mut merged: HashMap<String, u64> = match self.bucket.get_key(MERGED).await? {
            Some(bytes) => tokio::task::spawn_blocking(move || serde_json::from_slice(&bytes).unwrap_or_default())
                .await
                .unwrap_or_default(),
            None => HashMap::new(),
        };
        let mut folded = Vec::new();
        for meta in self.bucket.list_keys("access/").await? {
            let name = meta.location.filename().unwrap_or_default().to_owned();
            if name == "merged.json" {
                continue;
            }
            if let Some(bytes) = self.bucket.get_key(&format!("access/{name}")).await? {
                let note: HashMap<String, u64> = serde_json::from_slice(&bytes).unwrap_or_default();
                for (hex, at) in note {
                    let slot = merged.entry(hex).or_default();
                    *slot = (*slot).max(at);
                }
            }
            folded.push(name);
        }
        Ok((merged, folded))
    }

    /// Reads each manifest of the bucket not read before; returns every blob they reference.
    async fn referenced(&self) -> Result<HashSet<String>, String> {
        use futures_util::StreamExt as _;
        let unread: Vec<String> = {
            let listed = self.bucket.list_keys("manifests/sha256/").await?;
            let known = self.references.lock().unwrap_or_else(|p| p.into_inner());
            listed
                .into_iter()
                .filter_map(|m| m.location.filename().filter(|n| is_hex64(n)).map(str::to_owned))
                .filter(|hex| !known.contains_key(hex))
                .collect()
        };
        // A first collection on a big bucket reads every manifest: 16 at a time.
        let mut reads = futures_util::stream::iter(unread)
            .map(|hex| async move {
                let record = self.bucket.get_key(&format!("manifests/sha256/{hex}")).await;
                (hex, record)
            })
            .buffer_unordered(16);
        while let Some((hex, record)) = reads.next().await {
            let Some(record) = record? else { continue };
            // `<media type>\n<manifest>`
            let bytes = record.splitn(2, |b| *b == b'\n').nth(1).unwrap_or_default();
            let (children, blobs) = crate::layout::references(bytes);
            let hexes = |v: Vec<String>| {
                v.into_iter()
                    .filter_map(|d| d.strip_prefix("sha256:").map(str::to_owned))
                    .collect()
            };
            let entry = References {
                children: hexes(children),
                blobs: hexes(blobs.into_iter().map(|b| b.0).collect()),
            };
            self.references
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(hex, entry);
        }
        let references = self.references.lock().unwrap_or_else(|p| p.into_inner());
        Ok(references.values().flat_map(|r| r.blobs.iter().cloned()).collect())
    }

    /// Every blob of a pinned image, from the bucket's tag records and manifests.
    async fn pinned(&self, pins: &Pins) -> Result<HashSet<String>, String> {
        let patterns = pins.patterns();
        if patterns.is_empty() {
            return Ok(HashSet::new());
        }
        // (upstream, repo) -> tag -> manifest (hex)
        let mut by_repo: HashMap<(String, String), HashMap<String, String>> = HashMap::new();
        for meta in self.bucket.list_keys("tags/").await? {
            let name = meta.location.filename().unwrap_or_default().to_owned();
            let known = self.tags.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned();
            let (names, digest) = match known.filter(|k| k.e_tag.is_some() && k.e_tag == meta.e_tag) {
                Some(seen) => (seen.names, seen.digest),
                None => {
                    let Some(bytes) = self.bucket.get_key(&format!("tags/{name}")).await? else {
                        continue;
                    };
                    let Ok(record) = serde_json::from_slice::<super::tags::TagRecord>(&bytes) else {
                        continue;
                    };
                    let (u, r, t) = record.names();
                    let names = (u.to_owned(), r.to_owned(), t.to_owned());
                    let digest = record.digest.clone();
                    self.tags.lock().unwrap_or_else(|p| p.into_inner()).insert(
                        name,
                        TagSeen {
                            e_tag: meta.e_tag.clone(),
                            names: names.clone(),
                            digest: digest.clone(),
                        },
                    );
                    (names, digest)
                }
            };
            let (u, r, t) = names;
            if let Some(hex) = digest.strip_prefix("sha256:") {
                by_repo.entry((u, r)).or_default().insert(t, hex.to_owned());
            }
        }
        let mut roots: Vec<((String, String), String)> = Vec::new();
        for (pair, tags) in &by_repo {
            for (tag, hex) in tags {
                if pins.matches(&pair.0, &pair.1, tag) || pins.covers_digest(&pair.0, &pair.1, &format!("sha256:{hex}"))
                {
                    roots.push((pair.clone(), hex.clone()));
                }
            }
        }
        for p in &patterns {
            if let (false, Some((name, digest))) = (p.contains('*'), p.split_once('@')) {
                if let (Some((u, r)), Some(hex)) = (name.split_once('/'), digest.strip_prefix("sha256:")) {
                    roots.push(((u.to_owned(), r.to_owned()), hex.to_owned()));
                }
            }
        }
        let references = self.references.lock().unwrap_or_else(|p| p.into_inner());
        let (mut pinned, mut seen) = (HashSet::new(), HashSet::new());
        for (pair, root) in roots {
            let mut stack = vec![root];
            while let Some(hex) = stack.pop() {
                if !seen.insert(hex.clone()) {
                    continue;
                }
                if let Some(r) = references.get(&hex) {
                    pinned.extend(r.blobs.iter().cloned());
                    stack.extend(r.children.iter().cloned());
                }
                // Its signatures and attestations (cosign's tags) stay with it.
                if let Some(tags) = by_repo.get(&pair) {
                    for suffix in ["sig", "att", "sbom"] {
                        if let Some(a) = tags.get(&format!("sha256-{hex}.{suffix}")) {
                            stack.push(a.clone());
                        }
                    }
                }
            }
        }
        Ok(pinned)
    }
}
