//! Cache content as memory maps (a committed file, or the part of a fill's temp file already
//! written), for responses on plain HTTP/1.1 connections only: there the mapped bytes are
//! handed to the socket by the kernel (one copy, page cache to socket, as with nginx's
//! sendfile) and are never read by this process itself. Every other reader copies into a
//! buffer with pread (`fill::read_next`).
//!
//! Why that makes a map safe here: a page that cannot be read (a disk I/O error, a file
//! truncated from outside) raises SIGBUS only when user code touches it. When the kernel
//! touches it inside `write`, the fault is caught and the write fails with `EFAULT`,
//! which aborts one response. And the pages of each window are populated (read from disk
//! and mapped) on the blocking pool with `MADV_POPULATE_READ`, which reports an unreadable
//! page as an error rather than a signal, so the socket write on an async worker neither
//! blocks on the disk nor finds a hole it did not know of.
//!
//! Measured on the real disk of a 2-core Firecracker guest, warm 512 MiB blob, wrk 8
//! connections: pread into reused buffers 0.73x nginx's sendfile, this path 1.30x (2486 vs
//! 1918 MiB/s; 1.25x on another guest, 3146 vs 2522). This module is the crate's only unsafe
//! code.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

/// Cleared once the kernel turns `MADV_POPULATE_READ` down (before Linux 5.14): a map
/// whose pages are not known to be resident would fault inside an async worker's write.
static POPULATE_WORKS: AtomicBool = AtomicBool::new(true);

/// Maps `len` bytes of `file` at `offset` (committed, or written by a fill) and reads them
/// in. `Ok(None)` when this kernel cannot populate a map (the caller reads with pread
/// instead); `Err` when the bytes cannot be read (the file is damaged or shorter than
/// recorded).
///
/// Only for responses whose bytes no user code reads: plain TCP, HTTP/1.1 (hyper queues a
/// body's chunks for vectored writes as they are; TLS and h2 copy them in user space).
pub fn map_populated(file: &File, offset: u64, len: usize) -> io::Result<Option<Bytes>> {
    if len == 0 {
        return Ok(Some(Bytes::new()));
    }
    if !POPULATE_WORKS.load(Ordering::Relaxed) {
        return Ok(None);
    }
    // Past the end, the map would have no pages at all: a damaged file, not a map.
    if file.metadata()?.len() < offset + len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "cache file is shorter than recorded",
        ));
    }
    // SAFETY: the map is read-only and private to this response. Its bytes are read by the
    // kernel only (see the module's comment: a fault there is an `EFAULT`, never a signal),
    // and mapped bytes are never written again: a committed file is not written at all
    // (content reaches its final path by rename), and a fill writes each offset of its temp
    // file once, publishing an offset only after writing it. An outside truncation is the
    // fault case, caught as above.
    let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(file)? };
    if let Err(e) = map.advise(memmap2::Advice::PopulateRead) {
        if e.raw_os_error() == Some(EINVAL) {
            POPULATE_WORKS.store(false, Ordering::Relaxed);
            tracing::info!("this kernel has no MADV_POPULATE_READ: cached blobs are read into buffers");
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(Bytes::from_owner(map)))
}

const EINVAL: i32 = 22;
