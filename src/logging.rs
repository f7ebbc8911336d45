//! Log output: `tracing` events formatted as text or JSON, written to stderr by
//! `tracing-appender`'s non-blocking worker, so a request never waits on a `write(2)` to a
//! slow pipe. When the worker falls far behind, lines are dropped rather than stalling
//! requests, and [`Logging::finish`] reports how many. The worker never holds the stderr
//! lock between lines, so `eprintln!` (the one-line error of a failing command) always
//! gets through.

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines waiting to be written before new ones are dropped.
const QUEUE_LINES: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Keeps the log worker alive; [`Logging::finish`] writes out what is queued.
pub struct Logging {
    guard: WorkerGuard,
    dropped: ErrorCounter,
}

impl Logging {
    /// Writes every queued line, then says on stderr how many were dropped (if any).
    /// Returns that number.
    pub fn finish(self) -> usize {
        drop(self.guard);
        let dropped = self.dropped.dropped_lines();
        if dropped > 0 {
            eprintln!("regcache: {dropped} log lines dropped (log output too slow)");
        }
        dropped
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), the given format,
/// and the non-blocking writer.
pub fn init(format: Format) -> Logging {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("log-writer")
        // The worker flushes after each batch it drains: one write(2) per batch, not per
        // line (a line per request at tens of thousands of requests a second).
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let dropped = writer.error_counter();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let installed = match format {
        Format::Text => builder.with_writer(writer).try_init(),
        Format::Json => builder.json().with_writer(writer).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("regcache: logging not set up: {e}");
    }
    Logging { guard, dropped }
}
