//! Log output: `tracing` events formatted as text or JSON and written to stderr by a
//! background thread every few milliseconds, so a request never waits on a `write(2)` to a
//! pipe, the stderr lock, or a thread wake-up. Lines are kept in order; if the writer falls far behind, new lines are dropped
//! (and counted in a final note) rather than stalling requests.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting to be written before new ones are dropped.
const QUEUE_LINES: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

enum Message {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(SyncSender<()>),
}

/// Hands formatted lines to the writer thread.
#[derive(Clone)]
pub struct Background {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

static SINK: std::sync::OnceLock<Background> = std::sync::OnceLock::new();

/// Waits until every line logged so far is written (before the process exits).
pub fn flush() {
    if let Some(sink) = SINK.get() {
        let (done, wait) = sync_channel(1);
        if sink.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// One event's bytes; sent as a whole when the formatter is done with it.
pub struct Line {
    buf: Vec<u8>,
    sink: Background,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.buf);
        if line.is_empty() {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.sink.tx.try_send(Message::Line(line)) {
            self.sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> MakeWriter<'a> for Background {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::with_capacity(256),
            sink: self.clone(),
        }
    }
}

/// How often the writer thread wakes to write what was logged. Polling (instead of waiting
/// on the queue) means a request that logs never wakes another thread: at tens of thousands
/// of requests a second, one wake-up per line cost more than formatting it.
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

fn write_out(rx: Receiver<Message>, dropped: Arc<AtomicU64>) {
    let stderr = std::io::stderr();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stderr.lock());
    let mut waiting = Vec::new();
    loop {
        std::thread::sleep(WRITE_INTERVAL);
        loop {
            match rx.try_recv() {
                Ok(Message::Line(line)) => {
                    let _ = out.write_all(&line);
                }
                Ok(Message::Flush(done)) => waiting.push(done),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(out, "regcache: {lost} log lines dropped (log output too slow)");
        }
        let _ = out.flush();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), the given format,
/// and the background writer.
pub fn init(format: Format) {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer_dropped = dropped.clone();
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_out(rx, writer_dropped));
    let sink = Background { tx, dropped };
    let _ = SINK.set(sink.clone());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    match (format, spawned.is_ok()) {
        (Format::Text, true) => builder.with_writer(sink).init(),
        (Format::Json, true) => builder.json().with_writer(sink).init(),
        // No thread: write directly.
        (Format::Text, false) => builder.with_writer(std::io::stderr).init(),
        (Format::Json, false) => builder.json().with_writer(std::io::stderr).init(),
    }
}
