//! Which (upstream, repository) pairs are known to hold each digest. The store is shared by
//! digest, rights are not: with access rules configured, cached content is served to a pair
//! only when that pair is recorded here (by a fill or a manifest fetch under it, or an
//! upstream HEAD that confirmed it). Kept in memory, persisted as an append-only log
//! (`v1/associations`) written by a background thread; the log is compacted at startup.
//! Not fsynced: a record lost in a crash costs one confirming HEAD, never a wrong answer.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock};

use crate::digest::Digest;

/// An (upstream, repository) pair.
pub type Pair = (Arc<str>, Arc<str>);

pub struct Associations {
    known: RwLock<HashMap<Digest, Vec<Pair>>>,
    log: Mutex<Option<Sender<String>>>,
    path: PathBuf,
    /// How far the log has been read (lines appended later, by `regcache import`, are read
    /// by [`Associations::reread`]).
    read_to: Mutex<u64>,
    /// Appends the disk refused (a batch of lines each), for `regcache_cache_write_errors_total`.
    write_errors: Arc<std::sync::atomic::AtomicU64>,
}

const FILE: &str = "associations";

pub(crate) fn parse_line(line: &str) -> Option<(Digest, String, String)> {
    let mut parts = line.split(' ');
    let digest = parts.next()?.parse().ok()?;
    let upstream = parts.next()?;
    let repo = parts.next()?;
    if parts.next().is_some() || upstream.is_empty() || repo.is_empty() {
        return None;
    }
    Some((digest, upstream.to_owned(), repo.to_owned()))
}

impl Associations {
    /// Appends of this log the disk refused since it opened.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads `root/associations` (compacting it when it holds duplicates) and starts the
    /// writer thread.
    pub fn open(root: &Path) -> io::Result<Associations> {
        let path = root.join(FILE);
        let mut known: HashMap<Digest, Vec<Pair>> = HashMap::new();
        let mut lines = 0usize;
        let mut unique = 0usize;
        let mut interned: HashSet<Arc<str>> = HashSet::new();
        let mut intern = |s: String| -> Arc<str> {
            if let Some(i) = interned.get(s.as_str()) {
                return i.clone();
            }
            let a: Arc<str> = Arc::from(s);
            interned.insert(a.clone());
            a
        };
        match File::open(&path) {
            Ok(f) => {
                for line in io::BufReader::new(f).lines() {
                    let line = line?;
                    lines += 1;
                    // A torn last line (crash mid-append) is skipped, not fatal.
                    let Some((digest, upstream, repo)) = parse_line(&line) else {
                        continue;
                    };
                    let pair = (intern(upstream), intern(repo));
                    let pairs = known.entry(digest).or_default();
                    if !pairs.contains(&pair) {
                        pairs.push(pair);
                        unique += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if lines > unique {
            let tmp = root.join(format!("{FILE}.compact"));
            let mut out = BufWriter::new(File::create(&tmp)?);
            for (digest, pairs) in &known {
                for (upstream, repo) in pairs {
                    writeln!(out, "{digest} {upstream} {repo}")?;
                }
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs::rename(&tmp, &path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let read_to = file.metadata()?.len();
        let (tx, rx) = channel::<String>();
        let write_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = write_errors.clone();
        std::thread::Builder::new().name("associations".into()).spawn(move || {
            let mut out = BufWriter::new(file);
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(line.as_bytes());
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(more.as_bytes());
                }
                if let Err(e) = out.flush() {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot record which repositories hold a digest");
                }
            }
        })?;
        Ok(Associations {
            known: RwLock::new(known),
            log: Mutex::new(Some(tx)),
            path,
            read_to: Mutex::new(read_to),
            write_errors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `upstream`/`repo` is known to hold `digest`.
    pub fn contains(&self, digest: &Digest, upstream: &str, repo: &str) -> bool {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        known
            .get(digest)
            .is_some_and(|pairs| pairs.iter().any(|(u, r)| &**u == upstream && &**r == repo))
    }

    /// Takes in the whole lines appended to the log since it was last read (by another
    /// process: `regcache import` beside this server; this one's own are known already).
    /// Blocking.
    pub fn reread(&self) {
        use std::io::{Read, Seek, SeekFrom};
        let mut read_to = self.read_to.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(mut file) = File::open(&self.path) else { return };
        if file.seek(SeekFrom::Start(*read_to)).is_err() {
            return;
        }
        let mut tail = Vec::new();
        if file.read_to_end(&mut tail).is_err() {
            return;
        }
        // A line still being written is read next time.
        let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        *read_to += end as u64 + 1;
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for line in String::from_utf8_lossy(&tail[..end]).lines() {
            if let Some((digest, upstream, repo)) = parse_line(line) {
                let pairs = known.entry(digest).or_default();
                if !pairs.iter().any(|(u, r)| **u == *upstream && **r == *repo) {
                    pairs.push((Arc::from(upstream), Arc::from(repo)));
                }
            }
        }
    }

    /// Records that `upstream`/`repo` holds `digest` (a no-op when already known).
    /// Records that (upstream, repo) holds `digest`; true if it was not known yet.
    pub fn record(&self, digest: &Digest, upstream: &str, repo: &str) -> bool {
        if self.contains(digest, upstream, repo) {
            return false;
        }
        {
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            let pairs = known.entry(digest.clone()).or_default();
            if pairs.iter().any(|(u, r)| &**u == upstream && &**r == repo) {
                return false;
            }
            pairs.push((Arc::from(upstream), Arc::from(repo)));
        }
        if let Some(tx) = &*self.log.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(format!("{digest} {upstream} {repo}\n"));
        }
        true
    }

    /// Every pair that holds at least one digest `cached` says is still there.
    pub fn pairs_holding(&self, cached: impl Fn(&Digest) -> bool) -> std::collections::BTreeSet<(String, String)> {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut pairs = std::collections::BTreeSet::new();
        for (digest, holders) in known.iter() {
            if holders
                .iter()
                .all(|(u, r)| pairs.contains(&(u.to_string(), r.to_string())))
                || !cached(digest)
            {
                continue;
            }
            pairs.extend(holders.iter().map(|(u, r)| (u.to_string(), r.to_string())));
        }
        pairs
    }

    /// Every pair with the digests recorded under it.
    pub fn by_pair(&self) -> std::collections::BTreeMap<(String, String), Vec<Digest>> {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut pairs: std::collections::BTreeMap<(String, String), Vec<Digest>> = Default::default();
        for (digest, holders) in known.iter() {
            for (u, r) in holders {
                pairs
                    .entry((u.to_string(), r.to_string()))
                    .or_default()
                    .push(digest.clone());
            }
        }
        pairs
    }

    pub fn len(&self) -> usize {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        known.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn log_lines_never_panic(s in "\\PC{0,200}") {
            let _ = parse_line(&s);
        }
    }

    #[test]
    fn records_survive_a_reopen_and_the_log_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"layer");
        {
            let a = Associations::open(dir.path()).unwrap();
            assert!(!a.contains(&d, "docker.io", "library/alpine"));
            a.record(&d, "docker.io", "library/alpine");
            a.record(&d, "docker.io", "library/alpine");
            a.record(&d, "ghcr.io", "acme/app");
            assert!(a.contains(&d, "docker.io", "library/alpine"));
            assert!(!a.contains(&d, "docker.io", "library/busybox"));
            assert_eq!(a.len(), 2);
        }
        // The writer thread flushes once its channel is closed; wait for the lines to land.
        let path = dir.path().join(FILE);
        let mut text = String::new();
        for _ in 0..500 {
            text = fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(text.lines().count(), 2, "{text}");
        // A duplicate and a torn line, as a crash could leave them.
        fs::write(&path, format!("{text}{d} ghcr.io acme/app\n{d} ghcr")).unwrap();
        let a = Associations::open(dir.path()).unwrap();
        assert!(a.contains(&d, "ghcr.io", "acme/app"));
        assert_eq!(a.len(), 2);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
