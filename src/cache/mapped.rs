//! Read-only memory maps of committed cache files, so a cached blob reaches the socket with
//! one copy (page cache to socket), as with nginx's sendfile, instead of two (page cache to
//! a buffer, buffer to socket). The load bench measured the buffered path at ~0.7x nginx's
//! warm-blob throughput; this is the crate's only unsafe code.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use bytes::Bytes;

/// Maps a committed blob. Only for files at a final path: those are complete and never
/// written again (content reaches them by rename; eviction unlinks, which leaves a mapping
/// valid).
pub fn map(file: &File) -> io::Result<Bytes> {
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only and the file is never modified or truncated while
    // mapped: committed cache files are immutable (see above). Unlinking does not invalidate
    // it. What remains is an I/O error of the disk while a page is read, which the kernel
    // reports as SIGBUS, as it would for any mapped file.
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Bytes::from_owner(map))
}

/// Maps `len` bytes at `offset` of a fill's temp file that are already written. A fill
/// only appends: it writes each byte once, before publishing it as written, and never
/// rewrites, truncates or shortens the file (a failed fill is unlinked), so the range stays
/// exactly as mapped.
pub fn map_written(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: read-only, and the range is immutable for as long as the file exists (see
    // above); unlinking leaves the mapping valid.
    let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(file)? };
    Ok(Bytes::from_owner(map))
}
