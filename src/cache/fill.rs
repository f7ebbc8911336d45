//! Fills: one upstream download per digest, however many clients ask at once.
//!
//! The first client to miss starts a fill task that is detached from every client: it
//! hashes and appends each chunk to a temp file and publishes how far it got on a `watch`.
//! Every client (the first one too) tails that file at its own pace with [`stream_file`],
//! holding back the last byte of its response until the digest is verified. At the end the
//! file is fsynced and renamed into place, or deleted when anything is wrong. A broken
//! upstream connection is resumed from where it broke with a new ranged request.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, watch};

use super::associations::Pair;
use super::blob_store::{self, BlobStore, Kind};
use super::index::Index;
use crate::digest::{Digest, Verifier};

pub type SourceBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// An upstream answer to "send me this blob from byte `offset` on".
pub struct Source {
    /// Length of the whole blob, when the upstream said.
    pub total: Option<u64>,
    /// Position in the blob of the body's first byte (0 when the upstream ignored a Range).
    pub offset: u64,
    pub body: SourceBody,
    /// Set when the body is another replica's fill (or blob): how to open it there again at
    /// an offset. Such a fill is relayed from memory, not written to this replica's disk.
    pub reopen: Option<Reopen>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Opens the upstream at a byte offset; called again to resume after a break.
pub type Opener<E> = Box<dyn Fn(u64) -> BoxFuture<Result<Source, E>> + Send + Sync>;
/// Opens a peer replica's copy of a blob at a byte offset.
pub type Reopen = Arc<dyn Fn(u64) -> BoxFuture<Result<Source, String>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum FillError<E> {
    #[error(transparent)]
    Source(E),
    #[error("upstream content hashed to {got}, not {expected}")]
    DigestMismatch { expected: Digest, got: Digest },
    #[error("upstream sent {got} bytes where it announced {expected}")]
    WrongLength { expected: u64, got: u64 },
    #[error("upstream transfer broke after {written} bytes and could not be resumed: {message}")]
    Broken { written: u64, message: String },
    #[error("cache disk error: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug)]
pub enum State<E> {
    Connecting,
    Streaming,
    Done,
    Failed(Arc<FillError<E>>),
}

impl<E> Clone for State<E> {
    fn clone(&self) -> Self {
        match self {
            State::Connecting => State::Connecting,
            State::Streaming => State::Streaming,
            State::Done => State::Done,
            State::Failed(e) => State::Failed(e.clone()),
        }
    }
}

#[derive(Debug)]
pub struct Progress<E> {
    /// Bytes received, hashed and readable (from the file, or from the relay past
    /// `relay.from`).
    pub written: u64,
    pub total: Option<u64>,
    pub state: State<E>,
    /// Set once the cache disk refused a write: bytes from its `from` on live only in
    /// memory, and the blob will not be cached.
    pub relay: Option<Arc<Relay>>,
    /// The last [`HEAD_BYTES`] written, also kept in memory: readers that keep up with the
    /// download (the usual case: one client, or a herd) are served from here, without
    /// reading back from the disk what was just written.
    pub head: Option<Arc<Relay>>,
}

impl<E> Clone for Progress<E> {
    fn clone(&self) -> Self {
        Progress {
            written: self.written,
            total: self.total,
            state: self.state.clone(),
            relay: self.relay.clone(),
            head: self.head.clone(),
        }
    }
}

/// Memory a fill keeps of what it wrote last, for readers at the head.
const HEAD_BYTES: u64 = 4 * 1024 * 1024;

/// The part of a fill that the disk could not take, kept in memory for the fill's readers:
/// a full disk degrades one blob to verified pass-through (same hold-back of the last
/// byte), instead of failing every client of it. Bounded: a reader that falls further
/// behind than [`RELAY_BYTES`] is aborted, except the anchored one (the upload to the
/// shared bucket), which the fill waits for instead.
pub struct Relay {
    /// Offset of the first byte not on disk.
    pub from: u64,
    chunks: Mutex<std::collections::VecDeque<(u64, Bytes)>>,
    /// Bytes kept for readers behind the newest.
    keep: u64,
    /// Where the reader that must get every byte is: nothing from there on is dropped.
    anchor: Mutex<Option<u64>>,
    anchor_moved: tokio::sync::Notify,
    /// The anchored reader stalled too long and was let go.
    anchor_cut: std::sync::atomic::AtomicBool,
    /// A fill streamed from a peer replica: how a reader left behind goes on from the peer.
    reopen: Option<Reopen>,
    /// Where each reader that paces a peer relay is, by reader id.
    followers: Mutex<HashMap<u64, u64>>,
    next_follower: std::sync::atomic::AtomicU64,
}

/// How long a relayed fill waits for its anchored reader to make room before letting it
/// go (its upload then fails cleanly): a stalled store must not stall every client.
const ANCHOR_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Memory one relaying fill may hold for readers that lag behind.
const RELAY_BYTES: u64 = 64 * 1024 * 1024;

/// What a fill streamed from a peer replica keeps for its readers. Such a fill waits (up to
/// [`PACE_WAIT`]) for its slowest reader to come within this distance; a reader left
/// further behind streams on from the peer itself.
const PEER_RELAY_BYTES: u64 = 48 * 1024 * 1024;
/// What a relay of a peer's copy keeps behind its newest byte once every reader is past it:
/// clients that join a moment after the others (a herd's stragglers) still share the
/// relay; without a reader behind, memory stays at this instead of [`PEER_RELAY_BYTES`].
const LATE_JOIN_BYTES: u64 = 8 * 1024 * 1024;
/// How long a peer relay waits for a lagging reader before leaving it behind: one slow
/// client must not set the pace of all the others.
const PACE_WAIT: Duration = Duration::from_millis(500);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("from", &self.from)
            .field("keep", &self.keep)
            .field("follows_peer", &self.follows_peer())
            .finish_non_exhaustive()
    }
}

impl Relay {
    fn new(from: u64, keep: u64) -> Relay {
        Relay {
            from,
            chunks: Mutex::default(),
            keep,
            anchor: Mutex::default(),
            anchor_moved: tokio::sync::Notify::new(),
            anchor_cut: std::sync::atomic::AtomicBool::new(false),
            reopen: None,
            followers: Mutex::default(),
            next_follower: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The relay of a fill that streams another replica's copy, from byte 0.
    fn of_peer(reopen: Reopen) -> Relay {
        Relay {
            reopen: Some(reopen),
            ..Relay::new(0, PEER_RELAY_BYTES)
        }
    }

    /// Whether this relays a peer replica's copy (a reader it left behind can follow the
    /// peer instead of failing).
    pub fn follows_peer(&self) -> bool {
        self.reopen.is_some()
    }

    /// A new reader at `pos` that the relay waits for (up to [`PACE_WAIT`] at a time).
    fn follow(&self, pos: u64) -> u64 {
        let id = self.next_follower.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.followers.lock().unwrap_or_else(|p| p.into_inner()).insert(id, pos);
        id
    }

    /// Reader `id` moved to `pos` (ignored once it was left behind or went away).
    fn followed_to(&self, id: u64, pos: u64) {
        if let Some(at) = self.followers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            *at = pos;
        }
        self.anchor_moved.notify_waiters();
    }

    fn unfollow(&self, id: u64) {
        self.followers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.anchor_moved.notify_waiters();
    }

    /// Waits until the relay can grow to `end` without dropping what a follower has yet to read.
    async fn followers_room_until(&self, end: u64) {
        loop {
            let moved = self.anchor_moved.notified();
            let slowest = self
                .followers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .min()
                .copied();
            if slowest.is_none_or(|a| end <= a + self.keep) {
                return;
            }
            moved.await;
        }
    }

    /// Stops waiting for the followers that growing to `end` leaves behind.
    fn leave_behind(&self, end: u64) {
        self.followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, at| end <= *at + self.keep);
    }

    /// Every chunk still held, in order.
    fn held(&self) -> Vec<(u64, Bytes)> {
        self.chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The anchored reader is at `pos` (`None`: it is gone); the fill may drop what lies
    /// before it.
    fn anchor_at(&self, pos: Option<u64>) {
        let cut = self.anchor_cut.load(std::sync::atomic::Ordering::Relaxed);
        *self.anchor.lock().unwrap_or_else(|p| p.into_inner()) = pos.filter(|_| !cut);
        self.anchor_moved.notify_waiters();
    }

    /// Lets the anchored reader go for good.
    fn cut_anchor(&self) {
        self.anchor_cut.store(true, std::sync::atomic::Ordering::Relaxed);
        self.anchor_at(None);
    }

    /// Waits until the relay can grow to `end` without dropping a byte the anchored reader
    /// has yet to read.
    async fn room_until(&self, end: u64) {
        loop {
            let moved = self.anchor_moved.notified();
            let anchor = *self.anchor.lock().unwrap_or_else(|p| p.into_inner());
            if anchor.is_none_or(|a| end <= a + self.keep) {
                return;
            }
            moved.await;
        }
    }

    fn push(&self, at: u64, data: Bytes) {
        // A reader of a peer's (or the bucket's) copy can read it there again: past the
        // slowest reader, only what a reader joining a moment late needs is kept.
        let slowest = match self.follows_peer() {
            true => self
                .followers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .min()
                .copied(),
            false => None,
        };
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        chunks.push_back((at, data));
        let end = at + chunks.back().map_or(0, |(_, d)| d.len() as u64);
        let keep_from = match slowest {
            Some(slowest) => slowest.min(end.saturating_sub(LATE_JOIN_BYTES)),
            None => 0,
        };
        while chunks.front().is_some_and(|(o, d)| {
            let chunk_end = o + d.len() as u64;
            end - chunk_end >= self.keep || chunk_end <= keep_from
        }) {
            chunks.pop_front();
        }
    }

    /// Whether byte `pos` can still be read from here (it was not dropped yet).
    pub fn holds(&self, pos: u64) -> bool {
        let chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        match chunks.front() {
            Some((first, _)) => *first <= pos,
            None => pos >= self.from,
        }
    }

    /// Up to `n` bytes at `pos` (several chunks' worth, as pieces), or `None` if they were
    /// already dropped (the reader lags) or not yet pushed.
    fn read_pieces(&self, pos: u64, n: usize) -> Option<Vec<Bytes>> {
        let chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let first = chunks.partition_point(|(o, d)| o + d.len() as u64 <= pos);
        let (offset, _) = chunks.get(first).filter(|(o, _)| *o <= pos)?;
        let mut at = *offset;
        let (mut pieces, mut left) = (Vec::new(), n);
        for (o, data) in chunks.range(first..) {
            if *o != at || left == 0 {
                break;
            }
            let skip = pos.saturating_sub(*o) as usize;
            let take = (data.len() - skip).min(left);
            pieces.push(data.slice(skip..skip + take));
            left -= take;
            at += data.len() as u64;
        }
        Some(pieces)
    }
}

/// A client's view of a fill: the growing file and its progress.
pub struct Fill<E> {
    pub file: Arc<File>,
    pub progress: watch::Receiver<Progress<E>>,
    /// The (upstream, repository) the fill downloads from: rights and failures are that
    /// pair's, not necessarily the joiner's.
    pub owner: Pair,
}

impl<E> Clone for Fill<E> {
    fn clone(&self) -> Self {
        Fill {
            file: self.file.clone(),
            progress: self.progress.clone(),
            owner: self.owner.clone(),
        }
    }
}

impl<E> Fill<E> {
    /// Waits until the upstream has answered: the total length is known, or the fill failed.
    pub async fn started(&mut self) -> Progress<E> {
        let _ = self.progress.wait_for(|p| !matches!(p.state, State::Connecting)).await;
        self.progress.borrow().clone()
    }

    /// Waits for the end of the fill.
    pub async fn finished(&mut self) -> Progress<E> {
        let _ = self
            .progress
            .wait_for(|p| matches!(p.state, State::Done | State::Failed(_)))
            .await;
        self.progress.borrow().clone()
    }
}

struct Shared<E> {
    file: Arc<File>,
    progress: watch::Receiver<Progress<E>>,
    owner: Pair,
}

/// What became of a verified fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Committed to this replica's cache.
    Committed,
    /// Relayed to its clients but not cached: the disk refused it, or it exceeds the budget.
    Relayed,
    /// Relayed to its clients from a peer replica, which holds it (and puts it in the bucket).
    AtPeer,
}

/// Told how a fill ended (with the number of resumes), before its clients hear of it.
type OnEnd<E> = Box<dyn FnOnce(&Result<Kept, Arc<FillError<E>>>, u32) + Send>;

/// What [`Fills::run`] got: the verified length and where the bytes went.
struct Filled {
    written: u64,
    /// All of it reached the disk.
    on_disk: bool,
    /// Relayed from a peer replica's copy.
    at_peer: bool,
}

/// How a fill ended well.
struct Ended {
    written: u64,
    kept: Kept,
}

/// Written this much further, a fill's temp file starts writing back what it wrote since.
const EARLY_SYNC_BYTES: u64 = 1 << 20;

/// Starts writing a fill's data back while it still downloads, so that the fsync before its
/// commit (which holds back every reader's last byte) finds little left to flush. Never more
/// than one at a time per fill, detached on the blocking pool: the download does not wait.
/// On Linux each start only queues the new range (`sync_file_range`), so it can come every
/// MiB: with an fdatasync every 8 MiB, as before, the commit's fsync still waited 1.6–5 ms
/// for the last of a layer (0.4–0.8 ms now, on this host's disk).
#[derive(Default)]
struct EarlySync {
    running: std::sync::atomic::AtomicBool,
    /// Bytes written when the last write-back started.
    started_at: std::sync::atomic::AtomicU64,
}

impl EarlySync {
    fn maybe_start(self: &Arc<Self>, file: &Arc<File>, written: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if written < self.started_at.load(Relaxed) + EARLY_SYNC_BYTES || self.running.swap(true, Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.running.store(false, Relaxed);
            return;
        };
        let from = self.started_at.swap(written, Relaxed);
        let (this, file) = (self.clone(), file.clone());
        runtime.spawn_blocking(move || {
            // Only a head start: the commit's own fsync is what makes the file durable.
            let _ = super::blob_store::start_writeback(&file, from, written - from);
            this.running.store(false, Relaxed);
        });
    }
}

/// One batch's hash and write: the hash state (kept even if the write failed), where the
/// batch started, and the write error with the bytes that did not reach the disk.
/// A fill's digest, computed in order on a blocking thread of its own while the batches it
/// is handed are written (hashing before each write made every batch wait for both).
struct Hasher {
    batches: tokio::sync::mpsc::Sender<Vec<Bytes>>,
    done: tokio::task::JoinHandle<Verifier>,
}

/// Batches the hash may fall behind the download before the download waits for it.
const HASH_QUEUE: usize = 1;

impl Hasher {
    fn start(algorithm: crate::digest::Algorithm) -> Hasher {
        let (batches, mut queue) = tokio::sync::mpsc::channel::<Vec<Bytes>>(HASH_QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            let mut verifier = Verifier::new(algorithm);
            while let Some(batch) = queue.blocking_recv() {
                for data in &batch {
                    verifier.update(data);
                }
            }
            verifier
        });
        Hasher { batches, done }
    }

    async fn push(&self, batch: Vec<Bytes>) {
        // The receiver lives until `finish`; a send can only fail if its thread died,
        // which `finish` reports.
        let _ = self.batches.send(batch).await;
    }

    /// The digest of everything pushed.
    async fn finish(self) -> io::Result<Digest> {
        drop(self.batches);
        self.done.await.map(Verifier::finish).map_err(io::Error::other)
    }
}

struct Written {
    at: u64,
    failed: Option<(io::Error, Vec<Bytes>)>,
}

/// A verified fill whose commit failed (the fsync reported an I/O error, or a thin volume
/// ran out of space): the blob is relayed uncached to its clients instead of failing them
/// all. The file can no longer be trusted (pages whose write-back failed read back as
/// zeros once the kernel drops them), so what readers still need comes from memory: the
/// last [`RELAY_BYTES`] of the file, read back once and hashed whole against the digest,
/// or, if that read-back does not verify, the head window the fill still holds. A reader
/// behind what memory holds is aborted; nothing is read from the file any more.
async fn hand_over_from_memory<E>(
    tx: &watch::Sender<Progress<E>>,
    file: &Arc<File>,
    digest: &Digest,
    written: u64,
) -> Option<Ended> {
    let (file, expected) = (file.clone(), digest.clone());
    let read_back = tokio::task::spawn_blocking(move || -> io::Result<Option<Relay>> {
        let relay = Relay::new(0, RELAY_BYTES);
        let keep_from = written.saturating_sub(RELAY_BYTES);
        let mut verifier = Verifier::new(expected.algorithm());
        let mut pos = 0;
        while pos < written {
            let mut buf = vec![0; (written - pos).min(READ_CHUNK) as usize];
            file.read_exact_at(&mut buf, pos)?;
            verifier.update(&buf);
            let chunk = Bytes::from(buf);
            if pos + chunk.len() as u64 > keep_from {
                relay.push(
                    pos.max(keep_from),
                    chunk.slice(keep_from.saturating_sub(pos) as usize..),
                );
            }
            pos += chunk.len() as u64;
        }
        Ok((verifier.finish() == expected).then_some(relay))
    })
    .await;
    let relay = match read_back {
        Ok(Ok(Some(relay))) => Arc::new(relay),
        outcome => {
            tracing::warn!(?outcome, "the failed blob's file did not read back as verified");
            tx.borrow().head.clone()?
        }
    };
    tracing::warn!("the cache disk lost a verified blob at its commit; relaying it uncached to its clients");
    tx.send_modify(|p| p.relay = Some(relay));
    Some(Ended {
        written,
        kept: Kept::Relayed,
    })
}

/// Settles a fill exactly once, however its task ends: temp file removed (unless
/// committed), entry dropped so the next request starts afresh, the caller's `on_end` run,
/// and only then the outcome published. If the task dies (a panic), dropping this settles
/// the fill as failed, so its digest is never left stuck "in flight".
struct Settle<E: std::error::Error + Send + Sync + 'static> {
    fills: Arc<Fills<E>>,
    digest: Digest,
    tmp: std::path::PathBuf,
    tx: Arc<watch::Sender<Progress<E>>>,
    on_end: Option<OnEnd<E>>,
    resumes: u32,
}

impl<E: std::error::Error + Send + Sync + 'static> Settle<E> {
    fn finish(&mut self, result: Result<Ended, Arc<FillError<E>>>) {
        let Some(on_end) = self.on_end.take() else {
            return;
        };
        if !matches!(
            result,
            Ok(Ended {
                kept: Kept::Committed,
                ..
            })
        ) {
            let _ = std::fs::remove_file(&self.tmp);
        }
        self.fills.index.release(&self.digest);
        self.fills.lock().remove(&self.digest);
        let outcome = result.as_ref().map(|e| e.kept).map_err(Arc::clone);
        on_end(&outcome, self.resumes);
        self.tx.send_modify(|p| match &result {
            Ok(ended) => {
                p.total = Some(ended.written);
                p.state = State::Done;
            }
            Err(e) => p.state = State::Failed(e.clone()),
        });
    }
}

impl<E: std::error::Error + Send + Sync + 'static> Drop for Settle<E> {
    fn drop(&mut self) {
        if self.on_end.is_some() {
            let written = self.tx.borrow().written;
            tracing::error!(digest = %self.digest, "fill task ended without an outcome");
            self.finish(Err(Arc::new(FillError::Broken {
                written,
                message: "the fill task ended unexpectedly".into(),
            })));
        }
    }
}

pub struct Fills<E> {
    store: Arc<BlobStore>,
    index: Arc<Index>,
    inflight: Mutex<HashMap<Digest, Shared<E>>>,
    idle_timeout: Duration,
    /// Bytes per second below which a transfer counts as broken, measured over windows of
    /// `idle_timeout`: an upstream dripping a byte now and then must not hold a fill slot
    /// (and its clients) forever.
    min_rate: u64,
    max_resumes: u32,
    /// Upstream downloads at once; a fill waits for a slot before it contacts the upstream.
    slots: Arc<tokio::sync::Semaphore>,
}

impl<E: std::error::Error + Send + Sync + 'static> Fills<E> {
    pub fn new(
        store: Arc<BlobStore>,
        index: Arc<Index>,
        idle_timeout: Duration,
        min_rate: u64,
        max_concurrent: usize,
    ) -> Fills<E> {
        Fills {
            store,
            index,
            inflight: Mutex::default(),
            idle_timeout,
            min_rate,
            max_resumes: 3,
            slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1))),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Shared<E>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fill of `digest` if one runs (never starts one).
    pub fn running(&self, digest: &Digest) -> Option<Fill<E>> {
        self.lock().get(digest).map(|s| Fill {
            file: s.file.clone(),
            progress: s.progress.clone(),
            owner: s.owner.clone(),
        })
    }

    /// Joins the fill of `digest`, starting it (with the opener `make` builds) if none runs.
    /// Returns `Ok(None)` if the content was committed meanwhile: read it from the store.
    /// `on_end` runs once when a fill this call started ends, with the number of resumes.
    pub fn join(
        self: &Arc<Self>,
        digest: &Digest,
        owner: Pair,
        make: impl FnOnce() -> Opener<E>,
        on_end: impl FnOnce(&Result<Kept, Arc<FillError<E>>>, u32) + Send + 'static,
    ) -> io::Result<Option<Fill<E>>> {
        let mut inflight = self.lock();
        if let Some(s) = inflight.get(digest) {
            return Ok(Some(Fill {
                file: s.file.clone(),
                progress: s.progress.clone(),
                owner: s.owner.clone(),
            }));
        }
        // The fill that just ended may have committed it between the caller's miss and now.
        if self.index.contains(Kind::Blob, digest) {
            return Ok(None);
        }
        let (tmp, file) = self.store.temp_file()?;
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(Progress {
            written: 0,
            total: None,
            state: State::Connecting,
            relay: None,
            head: Some(Arc::new(Relay::new(0, HEAD_BYTES))),
        });
        let tx = Arc::new(tx);
        inflight.insert(
            digest.clone(),
            Shared {
                file: file.clone(),
                progress: rx.clone(),
                owner: owner.clone(),
            },
        );
        drop(inflight);

        let fills = self.clone();
        let opener = make();
        let task_file = file.clone();
        let mut settle = Settle {
            fills: self.clone(),
            digest: digest.clone(),
            tmp: tmp.clone(),
            tx: tx.clone(),
            on_end: Some(Box::new(on_end)),
            resumes: 0,
        };
        let digest = digest.clone();
        tokio::spawn(async move {
            let _slot = fills.slots.clone().acquire_owned().await;
            // Committed before clients get their last byte: a complete response means the
            // blob is in the cache (an offline pull right after works).
            let result = match fills.run(&digest, &task_file, &opener, &tx, &mut settle.resumes).await {
                Ok(Filled {
                    written, on_disk: true, ..
                }) => match fills.commit(&digest, &tmp, &task_file, written).await {
                    Ok(()) => Ok(Ended {
                        written,
                        kept: Kept::Committed,
                    }),
                    Err(e) => hand_over_from_memory(&tx, &task_file, &digest, written).await.ok_or(e),
                },
                // Verified, but not all on disk: the clients got it, this cache did not.
                Ok(Filled { written, at_peer, .. }) => Ok(Ended {
                    written,
                    kept: if at_peer { Kept::AtPeer } else { Kept::Relayed },
                }),
                Err(e) => Err(Arc::new(e)),
            };
            // Everything about the fill is settled (temp file gone or blob indexed, counters
            // updated) by the time its clients hear how it ended.
            settle.finish(result);
        });
        Ok(Some(Fill {
            file,
            progress: rx,
            owner,
        }))
    }

    /// Downloads into `file` (or, once the disk refuses, into the relay), hashing as it
    /// goes; returns the verified length and whether all of it is on disk.
    async fn run(
        &self,
        digest: &Digest,
        file: &Arc<File>,
        opener: &Opener<E>,
        tx: &Arc<watch::Sender<Progress<E>>>,
        resumes: &mut u32,
    ) -> Result<Filled, FillError<E>> {
        let source = opener(0).await.map_err(FillError::Source)?;
        let total = source.total;
        // Another replica's copy is relayed from memory: that replica holds the blob and
        // puts it in the shared bucket, a local copy would only cost a disk write (and the
        // readers' reads back). The local tier fills from the bucket on a later miss.
        let mut relay: Option<Arc<Relay>> = source.reopen.clone().map(|r| Arc::new(Relay::of_peer(r)));
        if let Some(t) = total.filter(|t| *t <= self.index.budget() && relay.is_none()) {
            self.index.reserve(digest, t);
        }
        tx.send_modify(|p| {
            p.total = total;
            p.state = State::Streaming;
            p.relay = relay.clone();
        });
        let mut batches = Batches::new(source, self.idle_timeout, self.min_rate);
        // One write runs on a blocking thread while the next batch is received, and the
        // hash on a thread of its own beside both, so that neither the download nor the
        // write waits for it. The write publishes its own progress when its bytes are on
        // disk; nothing is complete before the hash of every byte matches (below).
        let hasher = Hasher::start(digest.algorithm());
        let mut pending: Option<tokio::task::JoinHandle<Written>> = None;
        let made_room = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let early_sync = Arc::new(EarlySync::default());
        let mut written = 0u64;
        loop {
            // The previous batch's hash+write runs meanwhile: frames keep coming in until it
            // is done, so the next batch is a big one (hyper reads a body only as fast as it
            // is taken, and one small batch per blocking hand-off halved a cold fill's speed).
            let (next, finished) = batches.next(&mut pending).await;
            if let Some(done) = finished {
                self.settled(done, tx, &mut relay)?;
            }
            let broke = match next {
                Ok(Some(batch)) => Ok(batch),
                Ok(None) if total.is_some_and(|t| written < t) => Err("upstream closed early".to_string()),
                Ok(None) => break,
                Err(message) => Err(message),
            };
            let batch = match broke {
                Ok(batch) => batch,
                Err(message) => {
                    batches.source = self.resume(opener, written, message, resumes).await?;
                    self.take_over(digest, file, tx, total, &mut relay, &mut pending, &batches.source)
                        .await?;
                    continue;
                }
            };
            // A resumed source may start before what we have (upstream ignored Range).
            let mut parts = Vec::with_capacity(batch.len());
            for mut data in batch {
                let position = batches.source.offset;
                if position < written {
                    let skip = (written - position).min(data.len() as u64) as usize;
                    batches.source.offset += skip as u64;
                    data = data.slice(skip..);
                }
                batches.source.offset += data.len() as u64;
                if !data.is_empty() {
                    parts.push(data);
                }
            }
            let len: u64 = parts.iter().map(|d| d.len() as u64).sum();
            if len == 0 {
                continue;
            }
            if let Some(t) = total {
                if written + len > t {
                    return Err(FillError::WrongLength {
                        expected: t,
                        got: written + len,
                    });
                }
            }
            if let Some(previous) = pending.take() {
                self.settle_write(previous, tx, &mut relay).await?;
            }
            // Bigger than the whole cache (announced so, or found so when no length was
            // announced): relayed to its clients, never written only to be evicted at once.
            if relay.is_none() && written + len > self.index.budget() {
                tracing::warn!(%digest, budget = self.index.budget(), "blob larger than the cache budget; relaying it uncached");
                let r = Arc::new(Relay::new(written, RELAY_BYTES));
                relay = Some(r.clone());
                tx.send_modify(|p| p.relay = Some(r));
            }
            if let Some(r) = &relay {
                // The upload to the shared bucket must get every byte: it sets the pace.
                if tokio::time::timeout(ANCHOR_WAIT, r.room_until(written + len))
                    .await
                    .is_err()
                {
                    tracing::warn!(%digest, "the upload of a relayed blob stalled; relaying without it");
                    r.cut_anchor();
                }
                if r.follows_peer()
                    && tokio::time::timeout(PACE_WAIT, r.followers_room_until(written + len))
                        .await
                        .is_err()
                {
                    r.leave_behind(written + len);
                }
            }
            let (f, tx2, at, relaying) = (file.clone(), tx.clone(), written, relay.clone());
            let head = tx.borrow().head.clone();
            let (index, made_room, early_sync) = (self.index.clone(), made_room.clone(), early_sync.clone());
            hasher.push(parts.clone()).await;
            pending = Some(tokio::task::spawn_blocking(move || -> Written {
                let mut pos = at;
                if let Some(relay) = &relaying {
                    for data in parts {
                        let len = data.len() as u64;
                        relay.push(pos, data);
                        pos += len;
                    }
                    tx2.send_modify(|p| p.written = p.written.max(pos));
                    return Written { at, failed: None };
                }
                for (i, data) in parts.iter().enumerate() {
                    let mut wrote = f.write_all_at(data, pos);
                    // A full disk: evict the least recently used content once and try again,
                    // before falling back to relaying this blob uncached.
                    if matches!(&wrote, Err(e) if e.raw_os_error() == Some(ENOSPC))
                        && !made_room.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        let needed = total.map_or(0, |t| t.saturating_sub(pos)).max(MIN_ROOM);
                        tracing::warn!(
                            needed,
                            "the cache disk is full; evicting least recently used content to make room"
                        );
                        index.make_room(needed);
                        wrote = f.write_all_at(data, pos);
                    }
                    if let Err(e) = wrote {
                        // Hand what did not reach the disk to the relay, from here on.
                        return Written {
                            at: pos,
                            failed: Some((e, parts[i..].to_vec())),
                        };
                    }
                    pos += data.len() as u64;
                }
                if let Some(head) = &head {
                    let mut at = at;
                    for data in parts {
                        let len = data.len() as u64;
                        head.push(at, data);
                        at += len;
                    }
                }
                early_sync.maybe_start(&f, pos);
                tx2.send_modify(|p| p.written = p.written.max(pos));
                Written { at, failed: None }
            }));
            written += len;
        }
        if let Some(previous) = pending.take() {
            self.settle_write(previous, tx, &mut relay).await?;
        }
        let got = hasher.finish().await?;
        if got != *digest {
            return Err(FillError::DigestMismatch {
                expected: digest.clone(),
                got,
            });
        }
        Ok(Filled {
            written,
            on_disk: relay.is_none(),
            at_peer: relay.is_some_and(|r| r.follows_peer()) && batches.source.reopen.is_some(),
        })
    }

    /// After a resumption: if a fill that relayed a peer's copy now reads the upstream (the
    /// peer went away), this replica owns the blob. It goes to the disk from here on, with
    /// what the relay still holds from byte 0 written first, so that it can be committed
    /// and uploaded; a relay already past its start stays a relay (verified, uncached).
    #[allow(clippy::too_many_arguments)]
    async fn take_over(
        &self,
        digest: &Digest,
        file: &Arc<File>,
        tx: &Arc<watch::Sender<Progress<E>>>,
        total: Option<u64>,
        relay: &mut Option<Arc<Relay>>,
        pending: &mut Option<tokio::task::JoinHandle<Written>>,
        source: &Source,
    ) -> Result<(), FillError<E>> {
        let Some(r) = relay.clone().filter(|r| r.follows_peer() && source.reopen.is_none()) else {
            return Ok(());
        };
        if let Some(previous) = pending.take() {
            self.settle_write(previous, tx, relay).await?;
        }
        if !r.holds(0) {
            tracing::warn!(%digest, "took over a peer's download past what its relay keeps; relaying it uncached");
            return Ok(());
        }
        let (f, held) = (file.clone(), r.held());
        let wrote =
            tokio::task::spawn_blocking(move || held.iter().try_for_each(|(at, data)| f.write_all_at(data, *at)))
                .await
                .map_err(io::Error::other)?;
        if let Err(e) = wrote {
            tracing::warn!(%digest, error = %e, "took over a peer's download but cannot write it; relaying it uncached");
            return Ok(());
        }
        tracing::info!(%digest, "took over a peer's download; caching it here");
        if let Some(t) = total.filter(|t| *t <= self.index.budget()) {
            self.index.reserve(digest, t);
        }
        *relay = None;
        tx.send_modify(|p| p.relay = None);
        Ok(())
    }

    /// Waits for one batch's hash+write. A write the disk refused switches the fill to
    /// relaying (its bytes, and all later ones, go to readers from memory).
    async fn settle_write(
        &self,
        pending: tokio::task::JoinHandle<Written>,
        tx: &Arc<watch::Sender<Progress<E>>>,
        relay: &mut Option<Arc<Relay>>,
    ) -> Result<(), FillError<E>> {
        self.settled(pending.await, tx, relay)
    }

    /// [`Fills::settle_write`] once the batch's task has ended.
    fn settled(
        &self,
        ended: Result<Written, tokio::task::JoinError>,
        tx: &Arc<watch::Sender<Progress<E>>>,
        relay: &mut Option<Arc<Relay>>,
    ) -> Result<(), FillError<E>> {
        let done = ended.map_err(io::Error::other)?;
        if let Some((error, rest)) = done.failed {
            self.store.note_write_error();
            tracing::warn!(error = %error, at = done.at,
                "the cache disk refused a write; relaying this blob to its clients uncached");
            let r = Arc::new(Relay::new(done.at, RELAY_BYTES));
            let mut pos = done.at;
            for data in rest {
                let len = data.len() as u64;
                r.push(pos, data);
                pos += len;
            }
            *relay = Some(r.clone());
            tx.send_modify(|p| {
                p.relay = Some(r);
                p.written = p.written.max(pos);
            });
        }
        Ok(())
    }

    /// Makes the verified temp file durable, moves it into place and indexes it.
    async fn commit(
        &self,
        digest: &Digest,
        tmp: &Path,
        file: &Arc<File>,
        written: u64,
    ) -> Result<(), Arc<FillError<E>>> {
        let (store, index, file, tmp, digest) = (
            self.store.clone(),
            self.index.clone(),
            file.clone(),
            tmp.to_path_buf(),
            digest.clone(),
        );
        tokio::task::spawn_blocking(move || {
            blob_store::record_size(&file, written);
            // fsync first, with no lock held: a multi-GiB commit must not stall anyone else.
            store.make_durable(&file)?;
            // The blob takes its reservation's place in the budget (not both at once).
            index.release(&digest);
            index.commit(Kind::Blob, &digest, written, || store.place(&tmp, Kind::Blob, &digest))?;
            store.sync_parent(Kind::Blob, &digest)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map(|_| ())
        .map_err(|e| {
            self.store.note_write_error();
            self.store.note_failed_commit();
            tracing::error!(error = %e, "verified blob could not be committed to the cache");
            Arc::new(FillError::Io(e))
        })
    }

    async fn resume(
        &self,
        opener: &Opener<E>,
        written: u64,
        mut message: String,
        resumes: &mut u32,
    ) -> Result<Source, FillError<E>> {
        loop {
            if *resumes >= self.max_resumes {
                return Err(FillError::Broken { written, message });
            }
            *resumes += 1;
            tracing::warn!(written, attempt = *resumes, %message, "upstream transfer broke; resuming");
            tokio::time::sleep(Duration::from_millis(100) * 2u32.pow(*resumes - 1)).await;
            match opener(written).await {
                Ok(source) if source.offset <= written => return Ok(source),
                Ok(source) => message = format!("upstream resumed at {} instead of {written}", source.offset),
                Err(e) => message = e.to_string(),
            }
        }
    }
}

/// Upstream frames gathered into one disk write (and one hand-off to a blocking thread).
const WRITE_BATCH: usize = 1024 * 1024;

/// Reads a source in batches: one frame (waited for, up to the idle timeout) plus the
/// frames that come while the previous batch is still being written, up to `WRITE_BATCH`
/// bytes. An end or error met while gathering is kept for the next call, after the batch
/// before it.
struct Batches {
    source: Source,
    idle: Duration,
    later: Option<Result<(), String>>,
    /// The least a window of `idle` must bring, and the current window.
    min_per_window: u64,
    window: (std::time::Instant, u64),
}

impl Batches {
    fn new(source: Source, idle: Duration, min_rate: u64) -> Batches {
        Batches {
            source,
            idle,
            later: None,
            min_per_window: (min_rate as f64 * idle.as_secs_f64()) as u64,
            window: (std::time::Instant::now(), 0),
        }
    }

    /// Counts received bytes; an error once a whole window brought less than its minimum.
    fn note(&mut self, bytes: u64) -> Result<(), String> {
        self.window.1 += bytes;
        if self.window.0.elapsed() < self.idle {
            return Ok(());
        }
        let got = self.window.1;
        self.window = (std::time::Instant::now(), 0);
        if got < self.min_per_window {
            return Err(format!("only {got} bytes in {:?}, below the minimum rate", self.idle));
        }
        Ok(())
    }

    /// The next batch: `Ok(None)` at the end of the body, `Err` when it broke. While `busy`
    /// (the previous batch's hash+write) runs, frames are waited for too, so that the next
    /// batch is ready when it ends; its outcome is returned if it ended meanwhile (then
    /// `busy` is `None`). Without it, only frames already waiting join the first.
    async fn next(
        &mut self,
        busy: &mut Option<tokio::task::JoinHandle<Written>>,
    ) -> (
        Result<Option<Vec<Bytes>>, String>,
        Option<Result<Written, tokio::task::JoinError>>,
    ) {
        use std::task::Poll;
        if let Some(outcome) = self.later.take() {
            return (outcome.map(|()| None), None);
        }
        let first = match tokio::time::timeout(self.idle, self.source.body.frame()).await {
            Ok(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
            Ok(None) => return (Ok(None), None),
            Ok(Some(Err(e))) => return (Err(e.to_string()), None),
            Err(_) => return (Err(format!("no data for {:?}", self.idle)), None),
        };
        let mut size = first.len();
        let mut batch = vec![first];
        if let Err(e) = self.note(size as u64) {
            return (Err(e), None);
        }
        let mut ended = None;
        while size < WRITE_BATCH {
            let body = &mut self.source.body;
            let frame = match busy.as_mut() {
                Some(task) => tokio::select! {
                    biased;
                    done = &mut *task => {
                        *busy = None;
                        ended = Some(done);
                        None
                    }
                    frame = body.frame() => Some(frame),
                },
                None => {
                    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Pending => Poll::Ready(None),
                        Poll::Ready(frame) => Poll::Ready(Some(frame)),
                    })
                    .await
                }
            };
            match frame {
                None => break,
                Some(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        size += data.len();
                        self.window.1 += data.len() as u64;
                        batch.push(data);
                    }
                }
                Some(None) => {
                    self.later = Some(Ok(()));
                    break;
                }
                Some(Some(Err(e))) => {
                    self.later = Some(Err(e.to_string()));
                    break;
                }
            }
        }
        (Ok(Some(batch)), ended)
    }
}

/// No space left on device (Linux errno).
const ENOSPC: i32 = 28;
/// What a fill that hits a full disk evicts at least, when it does not know what is left.
const MIN_ROOM: u64 = 4 << 20;

/// How much one read takes (and one hand-off to the connection carries).
const READ_CHUNK: u64 = 1024 * 1024;
/// A reader of a fill waits up to this long for a full chunk before sending what there is,
/// so a fast fill is read in big pieces and a slow one still reaches clients promptly.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// A handle of its own on an open file (its own offset), even if the file has since been
/// renamed or unlinked. Linux: through /proc/self/fd.
fn private_handle(file: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Read buffers handed back once the connection has written them. A fresh 1 MiB buffer per
/// read costs page faults (the allocator returns such blocks to the kernel), which the
/// load bench showed as a fifth of the warm-blob CPU; reused ones are already mapped.
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// Buffers kept for reuse (64 MiB at most, shared by all connections).
const KEPT_BUFFERS: usize = 64;

/// A read buffer that goes back to [`BUFFERS`] when the bytes in it have been sent.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() == READ_CHUNK as usize {
            let mut kept = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() < KEPT_BUFFERS {
                kept.push(buf);
            }
        }
    }
}

/// Reads the next `n` bytes at the file's offset. `read_to_end` fills spare capacity
/// directly, so a buffer is never zeroed first (one pass over the bytes, not two). Fewer
/// bytes than asked for means the file is shorter than recorded: damaged.
fn read_next(file: &File, n: usize) -> io::Result<Bytes> {
    use std::io::Read;
    let reused = BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let mut buf = reused.unwrap_or_else(|| Vec::with_capacity(READ_CHUNK as usize));
    buf.clear();
    file.take(n as u64).read_to_end(&mut buf)?;
    if buf.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "cache file is shorter than recorded",
        ));
    }
    Ok(Bytes::from_owner(Pooled(buf)))
}

/// How far a reader may read into a fill: everything written, except that the response's
/// last byte waits for verification.
fn readable_until<E>(p: &Progress<E>, end: Option<u64>) -> u64 {
    match (&p.state, end) {
        (State::Done, Some(e)) => e,
        (State::Done, None) => p.total.unwrap_or(p.written),
        (_, Some(e)) => p.written.min(e.saturating_sub(1)),
        (_, None) => p.written.saturating_sub(1),
    }
}

/// An anchored reader's hold on a relayed fill, let go however the reader ends.
struct Anchor(Option<Arc<Relay>>);

impl Anchor {
    fn at(&mut self, relay: Option<&Arc<Relay>>, pos: u64) {
        if let Some(relay) = relay {
            relay.anchor_at(Some(pos));
            self.0 = Some(relay.clone());
        }
    }
}

impl Drop for Anchor {
    fn drop(&mut self) {
        if let Some(relay) = &self.0 {
            relay.anchor_at(None);
        }
    }
}

/// A reader's place among a peer relay's followers, given up however the reader ends.
#[derive(Default)]
struct Follower(Option<(Arc<Relay>, u64)>);

impl Follower {
    fn at(&mut self, relay: &Arc<Relay>, pos: u64) {
        match &self.0 {
            Some((r, id)) if Arc::ptr_eq(r, relay) => r.followed_to(*id, pos),
            _ => {
                self.leave();
                self.0 = Some((relay.clone(), relay.follow(pos)));
            }
        }
    }

    fn leave(&mut self) {
        if let Some((r, id)) = self.0.take() {
            r.unfollow(id);
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.leave();
    }
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streamed {
    /// Bytes handed to the client.
    pub sent: u64,
    /// The committed file could not be read as recorded (short, or an I/O error): the
    /// response was aborted, and the file must be quarantined and fetched anew.
    pub damaged: bool,
}

/// Who reads a [`stream_file`], which decides how its bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// A client: bytes are read into buffers on the blocking pool.
    Client,
    /// A client on plain HTTP/1.1, whose bytes only the kernel reads: what is on disk (a
    /// committed file, or what a fill wrote) is mapped instead (see `mapped`), one copy fewer.
    Mapped,
    /// The upload to the shared bucket, which a relayed fill waits for.
    Anchored,
}

/// Streams `file[start..end)` into `tx` with positioned reads on the blocking pool, or maps
/// for a [`Reader::Mapped`] (either way a disk error or an outside truncation costs one
/// aborted response, not the process). With `progress` (a fill), it follows the growing
/// file, and sends the last byte only once the fill is verified and committed; on failure
/// it sends an error so that the response is aborted, never completed. `end` is `None`
/// when the fill's total length is still unknown. A [`Reader::Anchored`] (the upload to
/// the shared bucket) is never dropped by a relayed fill: the fill waits for it.
pub async fn stream_file<E: std::error::Error + Send + Sync + 'static>(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    mut progress: Option<watch::Receiver<Progress<E>>>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    reader: Reader,
) -> Streamed {
    let anchored = reader == Reader::Anchored;
    let mapped = reader == Reader::Mapped;
    use std::io::{Seek, SeekFrom};
    let committed = progress.is_none();
    let ended = |pos: u64, damaged: bool| Streamed {
        sent: pos - start,
        damaged,
    };
    // A fill's file is shared by all its readers: each needs its own offset. A committed
    // file was opened for this response alone.
    let file = match committed {
        true => Ok(file),
        false => private_handle(&file).map(Arc::new),
    };
    let file = match file.and_then(|f| (&*f).seek(SeekFrom::Start(start)).map(|_| f)) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot read cached content");
            let _ = tx.send(Err(e)).await;
            return ended(start, committed);
        }
    };
    let mut pos = start;
    // Where the file's own offset is (reads from memory do not move it).
    let mut file_at = start;
    let mut anchor = Anchor(None);
    let mut follower = Follower::default();
    loop {
        let limit = match &mut progress {
            None => end.unwrap_or(pos),
            Some(rx) => {
                let cap = end.map_or(u64::MAX, |e| e.saturating_sub(1));
                let want = (pos + READ_CHUNK).min(cap);
                let terminal = |p: &Progress<E>| matches!(p.state, State::Done | State::Failed(_));
                let batched = rx.wait_for(|p| terminal(p) || readable_until(p, end) >= want.max(pos + 1));
                if tokio::time::timeout(BATCH_WAIT, batched).await.is_err() {
                    let _ = rx.wait_for(|p| terminal(p) || readable_until(p, end) > pos).await;
                }
                let p = rx.borrow_and_update().clone();
                if let State::Failed(e) = &p.state {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return ended(pos, false);
                }
                if !terminal(&p) && readable_until(&p, end) <= pos {
                    // The fill task went away without an outcome.
                    let _ = tx.send(Err(io::Error::other("fill ended unexpectedly"))).await;
                    return ended(pos, false);
                }
                readable_until(&p, end)
            }
        };
        if pos >= limit {
            return ended(pos, false);
        }
        let relay = progress.as_ref().and_then(|rx| rx.borrow().relay.clone());
        if anchored {
            anchor.at(relay.as_ref(), pos);
        }
        if let Some(relay) = relay.filter(|r| pos >= r.from) {
            if relay.follows_peer() && !anchored {
                follower.at(&relay, pos);
            }
            let n = (limit - pos).min(READ_CHUNK) as usize;
            let Some(pieces) = relay.read_pieces(pos, n).filter(|p| !p.is_empty()) else {
                if let (Some(reopen), Some(rx)) = (&relay.reopen, &mut progress) {
                    follower.leave();
                    let pos = follow_peer(reopen, pos, end, rx, &tx).await;
                    return ended(pos, false);
                }
                let _ = tx
                    .send(Err(io::Error::other("fell too far behind a relayed download")))
                    .await;
                return ended(pos, false);
            };
            if !send_pieces(&tx, pieces, &mut pos).await {
                return ended(pos, false); // the client went away
            }
            continue;
        }
        let on_disk_until = progress
            .as_ref()
            .and_then(|rx| rx.borrow().relay.as_ref().map(|r| r.from))
            .unwrap_or(u64::MAX);
        let n = (limit.min(on_disk_until) - pos).min(READ_CHUNK) as usize;
        // Just written by the fill: still in its memory.
        let head = progress.as_ref().and_then(|rx| rx.borrow().head.clone());
        if let Some(pieces) = head.and_then(|h| h.read_pieces(pos, n)).filter(|p| !p.is_empty()) {
            if !send_pieces(&tx, pieces, &mut pos).await {
                return ended(pos, false); // the client went away
            }
            continue;
        }
        let f = file.clone();
        let skip_to = (file_at != pos).then_some(pos);
        let read = tokio::task::spawn_blocking(move || {
            if mapped {
                if let Some(bytes) = super::mapped::map_populated(&f, pos, n)? {
                    return Ok((bytes, false));
                }
            }
            if let Some(at) = skip_to {
                (&*f).seek(SeekFrom::Start(at))?;
            }
            read_next(&f, n).map(|bytes| (bytes, true))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let (read, moved) = match read {
            Ok((bytes, moved)) => (Ok(bytes), moved),
            Err(e) => (Err(e), false),
        };
        let len = match &read {
            Ok(bytes) => bytes.len() as u64,
            Err(e) => {
                tracing::error!(error = %e, offset = pos, "reading cached content failed; response aborted");
                let _ = tx.send(read).await;
                return ended(pos, committed);
            }
        };
        if tx.send(read).await.is_err() {
            return ended(pos, false); // the client went away
        }
        pos += len;
        if moved {
            file_at = pos;
        }
    }
}

/// Sends pieces held in memory, moving `pos` past each one sent; false once the client is
/// gone.
async fn send_pieces(tx: &mpsc::Sender<io::Result<Bytes>>, pieces: Vec<Bytes>, pos: &mut u64) -> bool {
    for data in pieces {
        let len = data.len() as u64;
        if tx.send(Ok(data)).await.is_err() {
            return false;
        }
        *pos += len;
    }
    true
}

/// A reader that a peer relay left behind: streams on from the peer's own copy, from `pos`
/// to `end` (the whole blob when `None`), holding back its last byte until this replica's
/// fill of the same bytes is verified, and aborting if that fill fails. Returns where the
/// reader got to.
async fn follow_peer<E: std::error::Error + Send + Sync + 'static>(
    reopen: &Reopen,
    mut pos: u64,
    end: Option<u64>,
    rx: &mut watch::Receiver<Progress<E>>,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> u64 {
    let failed = |p: &Progress<E>| matches!(p.state, State::Failed(_));
    let mut source = match reopen(pos).await {
        Ok(source) if source.offset == pos => source,
        Ok(source) => {
            let message = format!("the peer resumed at {} instead of {pos}", source.offset);
            let _ = tx.send(Err(io::Error::other(message))).await;
            return pos;
        }
        Err(e) => {
            let _ = tx.send(Err(io::Error::other(e))).await;
            return pos;
        }
    };
    let mut held: Option<Bytes> = None;
    // Until the fill's task is gone (its outcome then stays readable).
    let mut watching = true;
    loop {
        let frame = tokio::select! {
            frame = source.body.frame() => frame,
            found = rx.wait_for(failed), if watching => match found {
                Ok(_) => None,
                Err(_) => {
                    watching = false;
                    continue;
                }
            },
        };
        let mut data = match frame {
            Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            Some(Err(e)) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                return pos;
            }
            None => break,
        };
        let at = pos + held.as_ref().map_or(0, |h| h.len() as u64);
        if let Some(e) = end {
            data.truncate(e.saturating_sub(at).min(data.len() as u64) as usize);
        }
        if data.is_empty() {
            if end.is_some_and(|e| at >= e) {
                break;
            }
            continue;
        }
        if let Some(previous) = held.replace(data) {
            let len = previous.len() as u64;
            if tx.send(Ok(previous)).await.is_err() {
                return pos;
            }
            pos += len;
        }
    }
    let ended = rx
        .wait_for(|p| matches!(p.state, State::Done | State::Failed(_)))
        .await
        .map(|p| p.clone());
    let p = match ended {
        Ok(p) => p,
        Err(_) => {
            let _ = tx.send(Err(io::Error::other("fill ended unexpectedly"))).await;
            return pos;
        }
    };
    let last = pos + held.as_ref().map_or(0, |h| h.len() as u64);
    let expected = end.or(p.total).unwrap_or(p.written);
    match (p.state, held) {
        (State::Done, Some(h)) if last == expected => {
            if tx.send(Ok(h)).await.is_ok() {
                pos = last;
            }
        }
        (State::Failed(e), _) => {
            let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
        }
        _ => {
            let _ = tx.send(Err(io::Error::other("the peer's copy ended short"))).await;
        }
    }
    pos
}

/// Streams an upstream body straight to a client, for when the cache disk cannot take it:
/// the bytes are hashed on the way, and the last chunk is held back until the digest
/// matches, so bad content never arrives complete. Returns the bytes handed over.
pub async fn stream_verified(mut source: Source, digest: Digest, tx: mpsc::Sender<io::Result<Bytes>>) -> u64 {
    let mut verifier = Verifier::new(digest.algorithm());
    let mut held: Option<Bytes> = None;
    let mut sent = 0u64;
    loop {
        match source.body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                verifier.update(&data);
                if let Some(previous) = held.replace(data) {
                    sent += previous.len() as u64;
                    if tx.send(Ok(previous)).await.is_err() {
                        return sent;
                    }
                }
            }
            Some(Err(e)) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                return sent;
            }
            None => break,
        }
    }
    let got = verifier.finish();
    if got != digest {
        tracing::warn!(%digest, %got, "pass-through content does not match its digest; response aborted");
        let _ = tx.send(Err(io::Error::other("digest mismatch"))).await;
        return sent;
    }
    if let Some(last) = held {
        sent += last.len() as u64;
        let _ = tx.send(Ok(last)).await;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay of a peer's copy keeps what its slowest reader has yet to read, and past
    /// that only the last [`LATE_JOIN_BYTES`]; with no reader yet, up to its full window.
    #[test]
    fn a_peer_relay_keeps_only_what_its_slowest_reader_and_late_joiners_need() {
        let mib = 1 << 20;
        let reopen: Reopen = Arc::new(|_| Box::pin(async { Err("unused".to_owned()) }));
        let relay = Relay::of_peer(reopen);
        let push_to = |relay: &Relay, from: u64, to: u64| {
            for at in (from..to).step_by(mib as usize) {
                relay.push(at, Bytes::from(vec![0u8; mib as usize]));
            }
        };
        push_to(&relay, 0, 40 * mib);
        assert!(relay.holds(0), "no reader yet: the window keeps the start");
        let slow = relay.follow(10 * mib);
        push_to(&relay, 40 * mib, 41 * mib);
        assert!(!relay.holds(10 * mib - 1), "kept what no reader needs");
        assert!(relay.holds(10 * mib), "dropped what the slowest reader has yet to read");
        relay.followed_to(slow, 39 * mib);
        push_to(&relay, 41 * mib, 42 * mib);
        assert!(
            relay.holds(42 * mib - LATE_JOIN_BYTES),
            "dropped what a late joiner reads"
        );
        assert!(!relay.holds(42 * mib - LATE_JOIN_BYTES - 1));
        relay.unfollow(slow);
        push_to(&relay, 42 * mib, 43 * mib);
        assert!(
            relay.holds(43 * mib - LATE_JOIN_BYTES - mib),
            "once no reader is left, only the window drops bytes"
        );
    }

    /// A reader that moves from the disk to the fill's memory and back to the disk (it fell
    /// behind again) gets every byte in order, and the last one only once the fill is done.
    #[tokio::test]
    async fn a_reader_switching_between_disk_and_memory_gets_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..5 * READ_CHUNK as usize).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.path().join("fill");
        std::fs::write(&path, &content).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        // In memory: only the third MiB (as if the reader had caught up there once).
        let head = Arc::new(Relay::new(0, 8 * READ_CHUNK));
        let mib = READ_CHUNK as usize;
        for at in (2 * mib..3 * mib).step_by(64 * 1024) {
            head.push(at as u64, Bytes::copy_from_slice(&content[at..at + 64 * 1024]));
        }
        let (ptx, prx) = watch::channel(Progress::<io::Error> {
            written: content.len() as u64,
            total: Some(content.len() as u64),
            state: State::Streaming,
            relay: None,
            head: Some(head),
        });
        let (tx, mut rx) = mpsc::channel(4);
        let reader = tokio::spawn(stream_file(file, 0, None, Some(prx), tx, Reader::Client));
        let mut got = Vec::new();
        while got.len() < content.len() - 1 {
            got.extend_from_slice(&rx.recv().await.unwrap().unwrap());
        }
        assert_eq!(got.len(), content.len() - 1, "the last byte is held back");
        ptx.send_modify(|p| p.state = State::Done);
        while let Some(chunk) = rx.recv().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(reader.await.unwrap().sent, content.len() as u64);
        assert!(got == content, "bytes differ");
    }

    #[test]
    fn the_head_window_gives_contiguous_bytes_across_chunks_and_forgets_old_ones() {
        let w = Relay::new(0, 10);
        w.push(0, Bytes::from_static(b"abcd"));
        w.push(4, Bytes::from_static(b"efgh"));
        w.push(8, Bytes::from_static(b"ij"));
        let joined = |p: Vec<Bytes>| p.iter().flat_map(|b| b.to_vec()).collect::<Vec<u8>>();
        assert_eq!(joined(w.read_pieces(2, 5).unwrap()), b"cdefg");
        assert_eq!(joined(w.read_pieces(6, 100).unwrap()), b"ghij");
        assert!(w.read_pieces(10, 4).is_none(), "not written yet");
        w.push(10, Bytes::from_static(b"klmnopq")); // 17 bytes: the first chunks go
        assert!(w.read_pieces(1, 2).is_none(), "forgotten: read it from the disk");
        assert_eq!(joined(w.read_pieces(9, 3).unwrap()), b"jkl");
    }

    /// A relay grows past its anchored reader's position plus what it keeps only once the
    /// reader moves on; a reader let go (stalled) holds it back no more.
    #[tokio::test]
    async fn a_relay_waits_for_its_anchored_reader_until_that_reader_is_cut() {
        use futures_util::FutureExt as _;
        let r = Arc::new(Relay::new(0, 10));
        r.anchor_at(Some(0));
        assert!(r.room_until(10).now_or_never().is_some(), "within what it keeps");
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.room_until(25).await }
        });
        r.anchor_at(Some(14));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "14 + 10 < 25: still waiting");
        r.anchor_at(Some(15));
        waiting.await.unwrap();
        r.cut_anchor();
        r.anchor_at(Some(0)); // the reader, unaware, anchors again: ignored
        assert!(r.room_until(1000).now_or_never().is_some());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("test source error")]
    struct TestError;

    fn pair() -> Pair {
        (Arc::from("docker.io"), Arc::from("library/x"))
    }

    fn body_of(data: &'static [u8]) -> SourceBody {
        use http_body_util::{BodyExt, Full};
        Full::new(Bytes::from_static(data))
            .map_err(|e: std::convert::Infallible| -> Box<dyn std::error::Error + Send + Sync> { match e {} })
            .boxed()
    }

    #[tokio::test]
    async fn a_fill_task_that_dies_settles_as_failed_and_the_next_join_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap().0);
        let index = Arc::new(Index::new(store.clone(), 1 << 30));
        let fills: Arc<Fills<TestError>> = Arc::new(Fills::new(store, index.clone(), Duration::from_secs(5), 0, 4));
        let data: &'static [u8] = b"content";
        let digest = Digest::sha256_of(data);

        let ended = Arc::new(Mutex::new(Vec::new()));
        let seen = ended.clone();
        let panicking: Opener<TestError> = Box::new(|_| Box::pin(async { panic!("opener blew up") }));
        let mut fill = fills
            .join(
                &digest,
                pair(),
                || panicking,
                move |r, _| seen.lock().unwrap().push(r.is_ok()),
            )
            .unwrap()
            .unwrap();
        let end = fill.finished().await;
        assert!(matches!(end.state, State::Failed(_)), "{:?}", end.state);
        assert_eq!(*ended.lock().unwrap(), vec![false], "on_end ran once");
        assert_eq!(fills.in_flight(), 0, "the digest is not left in flight");
        assert_eq!(std::fs::read_dir(dir.path().join("v1/tmp")).unwrap().count(), 0);

        let working: Opener<TestError> = Box::new(move |_| {
            Box::pin(async move {
                Ok(Source {
                    total: Some(data.len() as u64),
                    offset: 0,
                    body: body_of(data),
                    reopen: None,
                })
            })
        });
        let mut fill = fills.join(&digest, pair(), || working, |_, _| {}).unwrap().unwrap();
        assert!(matches!(fill.finished().await.state, State::Done));
        assert!(index.contains(Kind::Blob, &digest));
    }
}
