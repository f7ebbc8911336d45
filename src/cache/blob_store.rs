//! The on-disk content-addressed store: its layout, temp files, atomic commit and the
//! startup scan. A file at a final path is always complete and verified, because content
//! only ever reaches one by `rename` from `tmp/` after fsync.
//!
//! Layout under `<dir>/v1/`: `blobs/<algo>/<2 hex>/<hex>` (raw bytes),
//! `manifests/<algo>/<2 hex>/<hex>` (media type, `\n`, exact bytes), `tags/` (see
//! `tags.rs`) and `tmp/` (fills in progress; emptied at startup).
//!
//! A committed blob also carries its size in an extended attribute (`user.regcache.size`),
//! set before its fsync, so the startup scan can tell a file cut short or grown while
//! regcache was down from a whole one without reading it. (Manifests are hashed whenever
//! they are read from the disk and need no such record.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::digest::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Blob,
    Manifest,
    /// Not a file: budget held in the index for a fill in flight.
    Reserved,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
            Kind::Reserved => "reserved",
        }
    }
}

/// Where committed content lives under a cache's `v1` directory.
pub fn path_in(root: &Path, kind: Kind, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    root.join(kind.dir())
        .join(digest.algorithm().name())
        .join(&hex[..2])
        .join(hex)
}

/// Every committed file of `kind` under a cache's `v1` directory (none when its directory
/// is missing). Files that are not ours are reported and left alone.
///
/// The fan-out directories are read by several threads at once: from a cold page cache each
/// file's size costs an inode read, and on a virtual or network disk a deeper queue of those
/// reads finishes far sooner than one at a time.
pub fn scan_dir(root: &Path, kind: Kind, found: &mut Vec<Scanned>) -> io::Result<()> {
    let algos = match fs::read_dir(root.join(kind.dir())) {
        Ok(a) => a,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut fans = Vec::new();
    for algo in algos {
        let algo = algo?;
        if !algo.file_type()?.is_dir() {
            continue;
        }
        let algo_name = algo.file_name().to_string_lossy().into_owned();
        for fan in fs::read_dir(algo.path())? {
            let fan = fan?;
            if fan.file_type()?.is_dir() {
                fans.push((algo_name.clone(), fan.path()));
            }
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let scanned: Vec<io::Result<Vec<Scanned>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..SCAN_THREADS.min(fans.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let Some((algo, dir)) = fans.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(mine);
                        };
                        scan_fan(kind, algo, dir, &mut mine)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("cache scan thread panicked")))
            })
            .collect()
    });
    for part in scanned {
        found.extend(part?);
    }
    Ok(())
}

/// Threads reading one cache's fan-out directories at startup and in `ls`, `du`, `verify`.
const SCAN_THREADS: usize = 16;

fn scan_fan(kind: Kind, algo_name: &str, dir: &Path, found: &mut Vec<Scanned>) -> io::Result<()> {
    for file in fs::read_dir(dir)? {
        let file = file?;
        let name = file.file_name();
        let parsed = name
            .to_str()
            .and_then(|hex| format!("{algo_name}:{hex}").parse::<Digest>().ok());
        let meta = file.metadata()?;
        match parsed {
            Some(digest) if meta.is_file() => found.push(Scanned {
                kind,
                recorded: (kind == Kind::Blob).then(|| recorded_size(&file.path())).flatten(),
                digest,
                size: meta.len(),
                last_used: meta
                    .modified()
                    .unwrap_or(SystemTime::UNIX_EPOCH)
                    .max(meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH)),
            }),
            // Not ours (or a stray directory): never serve it, leave it be.
            _ => {
                tracing::warn!(path = %file.path().display(), "ignoring unexpected file in cache")
            }
        }
    }
    Ok(())
}

/// Creates `dir` and up to `levels - 1` of its missing parents, never more: a late write
/// must not bring back a cache dir that was removed under it (it fails instead).
pub fn make_dirs(dir: &Path, levels: usize) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && levels > 1 => {
            make_dirs(dir.parent().unwrap_or(dir), levels - 1)?;
            make_dirs(dir, 1)
        }
        Err(e) => Err(e),
    }
}

/// One committed file found by the startup scan.
#[derive(Debug)]
pub struct Scanned {
    pub kind: Kind,
    pub digest: Digest,
    pub size: u64,
    /// The size recorded on the file at its commit, where the filesystem keeps it.
    pub recorded: Option<u64>,
    /// When it was last used, as well as the filesystem can tell: the later of its commit
    /// (mtime) and its last read (atime, which `relatime` mounts update about daily), so a
    /// restart keeps the hot base layers and evicts the cold ones first.
    pub last_used: SystemTime,
}

impl Scanned {
    /// Cut short or grown since its commit (while no regcache watched it).
    pub fn damaged(&self) -> bool {
        self.recorded.is_some_and(|r| r != self.size)
    }
}

#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    tmp: PathBuf,
    next_tmp: AtomicU64,
    /// Damaged files set aside since the store was opened.
    quarantined: AtomicU64,
    /// Content the disk refused or lost since the store was opened.
    write_errors: AtomicU64,
    /// When a verified blob last failed its commit (milliseconds since `opened`, plus one;
    /// 0 for never), for readiness.
    failed_commit_at: AtomicU64,
    opened: Instant,
    /// Held (locked) for as long as the store is open: one process owns a cache dir.
    _lock: File,
}

/// The name of the lock file under `<dir>/v1/`.
pub const LOCK_FILE: &str = "lock";

/// Takes the cache dir's lock, or says which process holds it. The lock is the kernel's
/// (flock), so it is released however the owner dies; the pid inside is only for the message.
fn lock(root: &Path) -> io::Result<File> {
    let path = root.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_owned()
            } else {
                format!("process {holder}")
            };
            Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "it is in use by {who} (lock file {}); one regcache owns a cache dir",
                    path.display()
                ),
            ))
        }
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

impl BlobStore {
    /// Creates the layout under `dir/v1`, deletes leftovers of interrupted fills, and lists
    /// every committed file (names and sizes only: contents are never read here).
    pub fn open(dir: &Path) -> io::Result<(BlobStore, Vec<Scanned>)> {
        let store = BlobStore::open_unscanned(dir)?;
        let found = store.scan_all()?;
        Ok((store, found))
    }

    /// Creates the layout, takes the lock and empties `tmp/`, without listing the content
    /// (see [`BlobStore::scan_all`]): for serving before the index is rebuilt.
    pub fn open_unscanned(dir: &Path) -> io::Result<BlobStore> {
        let root = dir.join("v1");
        let tmp = root.join("tmp");
        for sub in ["blobs", "manifests", "tags"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let lock = lock(&root)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(BlobStore {
            root,
            tmp,
            next_tmp: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            failed_commit_at: AtomicU64::new(0),
            opened: Instant::now(),
            _lock: lock,
        })
    }

    /// Every committed file (names and sizes only: contents are never read).
    pub fn scan_all(&self) -> io::Result<Vec<Scanned>> {
        let mut found = Vec::new();
        for kind in [Kind::Blob, Kind::Manifest] {
            self.scan(kind, &mut found)?;
        }
        Ok(found)
    }

    /// Removes whatever interrupted fills left in `tmp/` (at shutdown, when none runs).
    pub fn clear_tmp(&self) {
        if let Ok(entries) = fs::read_dir(&self.tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn scan(&self, kind: Kind, found: &mut Vec<Scanned>) -> io::Result<()> {
        scan_dir(&self.root, kind, found)
    }

    pub fn path(&self, kind: Kind, digest: &Digest) -> PathBuf {
        path_in(&self.root, kind, digest)
    }

    /// A new, empty file in `tmp/`, open for reading and writing.
    pub fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}", std::process::id()));
        let open = || OpenOptions::new().read(true).write(true).create_new(true).open(&path);
        let file = match open() {
            // `tmp/` removed by an operator: made again, as `place` does `blobs/`.
            Err(e) if e.kind() == io::ErrorKind::NotFound => make_dirs(&self.tmp, 1).and_then(|()| open())?,
            opened => opened?,
        };
        Ok((path, file))
    }

    /// Makes a fully written temp file durable (fsync): before [`BlobStore::place`], and
    /// never under a lock that anything else waits on.
    pub fn make_durable(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }

    /// Moves a durable temp file to its final path (a rename: atomic, and quick).
    pub fn place(&self, tmp: &Path, kind: Kind, digest: &Digest) -> io::Result<PathBuf> {
        let dest = self.path(kind, digest);
        // Up to `blobs/` or `manifests/` (an operator may have removed one), never `v1/`.
        make_dirs(dest.parent().unwrap_or(&self.root), 3)?;
        fs::rename(tmp, &dest)?;
        Ok(dest)
    }

    /// Makes a [`BlobStore::place`] itself survive a crash (fsync of the directory).
    pub fn sync_parent(&self, kind: Kind, digest: &Digest) -> io::Result<()> {
        let dest = self.path(kind, digest);
        File::open(dest.parent().unwrap_or(&self.root))?.sync_all()
    }

    /// Writes small content (a manifest) to a durable temp file, ready to be placed.
    pub fn write_temp(&self, parts: &[&[u8]]) -> io::Result<PathBuf> {
        let (tmp, mut file) = self.temp_file()?;
        let result = (|| {
            for part in parts {
                file.write_all(part)?;
            }
            self.make_durable(&file)
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Moves damaged content out of the store (to `quarantine/`, for inspection) so that it
    /// is never served again and the next request fetches it anew.
    pub fn quarantine(&self, kind: Kind, digest: &Digest) {
        let path = self.path(kind, digest);
        let dir = self.root.join("quarantine");
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let dest = dir.join(format!("{}-{}-{n}", kind.dir(), digest.hex()));
        let moved = make_dirs(&dir, 1).and_then(|()| fs::rename(&path, &dest));
        match moved {
            Ok(()) => tracing::warn!(%digest, to = %dest.display(), "damaged cache file quarantined"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot quarantine a damaged cache file; deleting it");
                let _ = fs::remove_file(&path);
            }
        }
        self.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    /// Damaged files set aside (or deleted, where they could not be moved) since it opened.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Counts content the disk refused (a write) or lost (the fsync before its commit).
    pub fn note_write_error(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Content the disk refused or lost since the store opened (see `note_write_error`).
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// A verified blob could not be made durable or put in place (its fsync failed: a thin
    /// volume out of space, a failing disk). Such a disk may still take a small write, so
    /// this, not only a probe, is what readiness goes by.
    pub fn note_failed_commit(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.failed_commit_at.store(now.saturating_add(1), Ordering::Relaxed);
    }

    /// How long ago a blob last failed its commit, if it did within `window`.
    pub fn failed_commit_within(&self, window: Duration) -> Option<Duration> {
        let at = self.failed_commit_at.load(Ordering::Relaxed).checked_sub(1)?;
        let ago = self.opened.elapsed().saturating_sub(Duration::from_millis(at));
        (ago < window).then_some(ago)
    }

    pub fn remove(&self, kind: Kind, digest: &Digest) {
        let path = self.path(kind, digest);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete evicted cache file");
            }
        }
    }

    /// Opens committed content; `None` when it is not there (never cached, or evicted).
    pub fn open_file(&self, kind: Kind, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.path(kind, digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Starts writing `len` bytes of `file` from `offset` back to the disk without waiting for
/// them (Linux `sync_file_range` with `SYNC_FILE_RANGE_WRITE`), so that a later fsync finds
/// them on their way or done. Elsewhere an fdatasync, which waits.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: the descriptor is open for the whole call (borrowed from `file`), and the call
    // reads and writes no memory of this process: it only queues the file's pages for I/O.
    let done = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The extended attribute that holds a committed blob's size.
#[cfg(target_os = "linux")]
const SIZE_ATTRIBUTE: &std::ffi::CStr = c"user.regcache.size";

/// Records a blob's size on its temp file, before the fsync that makes both durable. Best
/// effort: where the filesystem keeps no user attributes (tmpfs before Linux 6.6, some
/// network filesystems), the file's own size is trusted as before.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn record_size(file: &File, size: u64) {
    use std::os::fd::AsRawFd as _;
    let mut text = itoa::Buffer::new();
    let value = text.format(size).as_bytes();
    // SAFETY: the descriptor is open for the whole call (borrowed from `file`), the name is a
    // NUL-terminated static, and `value` is a live buffer of `value.len()` bytes that the
    // kernel only reads.
    let done = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            SIZE_ATTRIBUTE.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if done != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot record a blob's size on its file");
    }
}

/// The size [`record_size`] left on a committed blob, if any.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn recorded_size(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut value = [0u8; 24];
    // SAFETY: the path and the name are NUL-terminated and live for the call, and `value` is
    // writable for its whole length, which is all the kernel may write.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            SIZE_ATTRIBUTE.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    std::str::from_utf8(value.get(..n)?).ok()?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
pub fn record_size(_file: &File, _size: u64) {}

#[cfg(not(target_os = "linux"))]
pub fn recorded_size(_path: &Path) -> Option<u64> {
    None
}

#[cfg(not(target_os = "linux"))]
pub fn start_writeback(file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeback_starts_on_a_written_range_and_leaves_the_bytes_alone() {
        use std::os::unix::fs::FileExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BlobStore::open(dir.path()).unwrap();
        let (_path, file) = store.temp_file().unwrap();
        file.write_all_at(&[7u8; 3 << 20], 0).unwrap();
        start_writeback(&file, 1 << 20, 2 << 20).unwrap();
        start_writeback(&file, 3 << 20, 0).unwrap();
        let mut back = vec![0u8; 3 << 20];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|b| *b == 7));
    }

    #[test]
    fn a_failed_commit_is_remembered_for_its_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BlobStore::open(dir.path()).unwrap();
        let minute = Duration::from_secs(60);
        assert_eq!(store.failed_commit_within(minute), None, "none yet");
        store.note_failed_commit();
        assert!(store.failed_commit_within(minute).is_some_and(|ago| ago < minute));
        assert_eq!(store.failed_commit_within(Duration::ZERO), None, "past its window");
    }

    /// A commit that lands after the cache dir was removed fails; it does not bring the dir
    /// back (the suite used to leave such dirs behind in /tmp).
    #[test]
    fn a_commit_makes_missing_store_dirs_but_never_a_removed_cache_dir() {
        // A removed `blobs/` or `tmp/` alone is made again: the cache dir is still there.
        let kept_dir = tempfile::tempdir().unwrap();
        let (kept_store, _) = BlobStore::open(kept_dir.path()).unwrap();
        fs::remove_dir_all(kept_store.root().join("blobs")).unwrap();
        fs::remove_dir_all(kept_store.root().join("tmp")).unwrap();
        let tmp = kept_store.write_temp(&[b"late"]).unwrap();
        assert!(kept_store.place(&tmp, Kind::Blob, &Digest::sha256_of(b"late")).is_ok());

        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BlobStore::open(dir.path()).unwrap();
        let tmp = store.write_temp(&[b"late"]).unwrap();
        let kept = dir.path().join("kept");
        fs::rename(&tmp, &kept).unwrap();
        fs::remove_dir_all(store.root()).unwrap();
        assert!(store.place(&kept, Kind::Blob, &Digest::sha256_of(b"late")).is_err());
        assert!(store.temp_file().is_err());
        assert!(!store.root().exists(), "the removed cache dir came back");
    }

    #[test]
    fn commit_scan_and_tmp_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let (store, found) = BlobStore::open(dir.path()).unwrap();
        assert!(found.is_empty());
        let d = Digest::sha256_of(b"hello");
        let tmp = store.write_temp(&[b"hel", b"lo"]).unwrap();
        store.place(&tmp, Kind::Blob, &d).unwrap();
        let (_leftover, mut f) = store.temp_file().unwrap();
        f.write_all(b"partial").unwrap();
        drop(store);

        let (store, found) = BlobStore::open(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].kind, &found[0].digest, found[0].size), (Kind::Blob, &d, 5));
        assert_eq!(fs::read_dir(dir.path().join("v1/tmp")).unwrap().count(), 0);
        let (_, len) = store.open_file(Kind::Blob, &d).unwrap().unwrap();
        assert_eq!(len, 5);
        assert!(store.open_file(Kind::Manifest, &d).unwrap().is_none());
        store.remove(Kind::Blob, &d);
        assert!(store.open_file(Kind::Blob, &d).unwrap().is_none());
    }
}
