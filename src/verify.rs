//! `regcache verify`: re-hashes every committed blob and manifest of a cache dir and moves
//! each one whose bytes no longer match its name to `v1/quarantine/`, so it is never served
//! again and the next request fetches it anew. Safe beside a running server: content is
//! immutable and named by its digest, a rename is atomic, and a server that finds a file
//! gone forgets it and fetches it again.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Verifier};

/// A file whose bytes do not match its digest (or that cannot be read).
#[derive(Debug, Clone)]
pub struct Damaged {
    /// `blob` or `manifest`.
    pub kind: &'static str,
    pub digest: Digest,
    pub path: PathBuf,
    pub why: String,
    /// Where it was moved (`None` if it could not be).
    pub quarantined: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct Checked {
    pub files: usize,
    pub bytes: u64,
    pub damaged: Vec<Damaged>,
}

/// Every committed file: (kind, digest, path).
fn committed(root: &Path) -> io::Result<Vec<(&'static str, Digest, PathBuf)>> {
    use crate::cache::blob_store::{path_in, scan_dir, Kind};
    let mut out = Vec::new();
    for (name, kind) in [("blob", Kind::Blob), ("manifest", Kind::Manifest)] {
        let mut found = Vec::new();
        scan_dir(root, kind, &mut found)?;
        out.extend(
            found
                .into_iter()
                .map(|f| (name, f.digest.clone(), path_in(root, kind, &f.digest))),
        );
    }
    Ok(out)
}

/// Hashes one file: a blob whole, a manifest after its media-type line. Its size, or why it
/// does not match.
fn check_file(kind: &str, digest: &Digest, path: &Path) -> Result<u64, String> {
    let mut file = fs::File::open(path).map_err(|e| format!("unreadable: {e}"))?;
    let mut verifier = Verifier::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut header = kind == "manifest";
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("unreadable: {e}"))?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if header {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    chunk = &chunk[nl + 1..];
                    header = false;
                }
                None => continue,
            }
        }
        size += chunk.len() as u64;
        verifier.update(chunk);
    }
    if header {
        return Err("no media type line".into());
    }
    let got = verifier.finish();
    if got != *digest {
        return Err(format!("its bytes hash to {got}"));
    }
    Ok(size)
}

/// Checks every committed file under `dir` (the configured `cache.dir`) on `threads`
/// threads, quarantining the damaged ones.
pub fn check(dir: &Path, threads: usize) -> io::Result<Checked> {
    let root = dir.join("v1");
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} holds no regcache cache", dir.display()),
        ));
    }
    let files = committed(&root)?;
    let per_thread = files.len().div_ceil(threads.max(1)).max(1);
    let results: Vec<Checked> = std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(per_thread)
            .map(|chunk| {
                let root = &root;
                scope.spawn(move || {
                    let mut checked = Checked::default();
                    for (kind, digest, path) in chunk {
                        checked.files += 1;
                        match check_file(kind, digest, path) {
                            Ok(size) => checked.bytes += size,
                            // Evicted (or refetched) while we looked: nothing to check.
                            Err(_) if !path.exists() => checked.files -= 1,
                            Err(why) => checked.damaged.push(Damaged {
                                kind,
                                digest: digest.clone(),
                                path: path.clone(),
                                why,
                                quarantined: quarantine(root, kind, digest, path),
                            }),
                        }
                    }
                    checked
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let mut all = Checked::default();
    for r in results {
        all.files += r.files;
        all.bytes += r.bytes;
        all.damaged.extend(r.damaged);
    }
    all.damaged.sort_by_key(|d| d.digest.to_string());
    Ok(all)
}

fn quarantine(root: &Path, kind: &str, digest: &Digest, path: &Path) -> Option<PathBuf> {
    let dir = root.join("quarantine");
    let dest = dir.join(format!("{kind}s-{}-verify-{}", digest.hex(), std::process::id()));
    fs::create_dir_all(&dir).ok()?;
    fs::rename(path, &dest).ok()?;
    Some(dest)
}

/// The (upstream, repository) pairs recorded as holding `digest` (where to fetch it anew).
pub fn holders(dir: &Path, digest: &Digest) -> Vec<(String, String)> {
    let log = fs::read_to_string(dir.join("v1").join("associations")).unwrap_or_default();
    let mut pairs = Vec::new();
    for line in log.lines() {
        if let Some((d, upstream, repo)) = crate::cache::associations::parse_line(line) {
            if d == *digest && !pairs.contains(&(upstream.clone(), repo.clone())) {
                pairs.push((upstream, repo));
            }
        }
    }
    pairs
}
