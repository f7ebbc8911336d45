//! `regcache gc`: removes blobs that no cached manifest references (fetched by digest
//! alone, or left behind by an evicted manifest) and temp files that interrupted fills and
//! imports left. Safe beside a running server: only files last used before the collection
//! started, less a grace period, are candidates, so a pull in progress (whose manifest may
//! be committed after the scan) keeps its blobs; a server that finds a blob gone fetches it
//! again.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::digest::Digest;

/// How recent a file may be and still be collected.
pub const GRACE: Duration = Duration::from_secs(600);
/// Temp files untouched this long belong to no live fill or import.
pub const STALE_TEMP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Default)]
pub struct Collected {
    /// (digest, size) of each unreferenced blob removed (or, dry, to remove).
    pub blobs: Vec<(String, u64)>,
    /// Stale temp files and import staging directories.
    pub temps: Vec<std::path::PathBuf>,
}

fn stale(path: &Path, before: SystemTime) -> bool {
    fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t < before)
}

/// Collects in the cache under `dir`; with `dry_run` only says what it would remove.
pub fn collect(dir: &Path, dry_run: bool) -> io::Result<Collected> {
    let started = SystemTime::now();
    let root = dir.join("v1");
    let inventory = crate::inventory::Inventory::read(dir)?;
    let mut collected = Collected {
        blobs: inventory.unreferenced_blobs(started - GRACE),
        temps: Vec::new(),
    };
    for sub in ["tmp", "import"] {
        let Ok(entries) = fs::read_dir(root.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            if stale(&e.path(), started - STALE_TEMP) {
                collected.temps.push(e.path());
            }
        }
    }
    if dry_run {
        return Ok(collected);
    }
    collected.blobs.retain(|(digest, _)| {
        let Ok(d) = digest.parse::<Digest>() else { return false };
        let path = crate::cache::blob_store::path_in(&root, crate::cache::blob_store::Kind::Blob, &d);
        // Looked at again: used since the scan means a client wants it.
        stale(&path, started - GRACE) && fs::remove_file(&path).is_ok()
    });
    collected.temps.retain(|p| {
        if p.is_dir() {
            fs::remove_dir_all(p).is_ok()
        } else {
            fs::remove_file(p).is_ok()
        }
    });
    Ok(collected)
}
