//! Log output: `tracing` events formatted as text or JSON, written to stderr by
//! `tracing-appender`'s non-blocking worker, so a request never waits on a `write(2)` to a
//! slow pipe. When the worker falls far behind, lines are dropped rather than stalling
//! requests, and [`Logging::finish`] reports how many. The worker never holds the stderr
//! lock between lines, so `eprintln!` (the one-line error of a failing command) always
//! gets through.
//!
//! Async worker threads batch their lines (as nginx's `access_log … buffer=… flush=`): a
//! worker appends each line to its own buffer (its first park registers it,
//! [`batch_this_thread`]) and hands the buffer to the log worker when it reaches
//! [`BATCH_BYTES`]; a small thread hands over what every buffer holds each [`FLUSH_EVERY`].
//! A handful of channel messages and wake-ups a second instead of one per request (or per
//! park, thousands a second under load, each waking the log worker) is what lets request
//! logging stay on at tens of thousands of requests a second. Every other thread writes
//! line by line.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;

/// Lines (or batches) waiting to be written before new ones are dropped.
const QUEUE_LINES: usize = 65_536;
/// A worker's batch is handed over once it holds this much.
const BATCH_BYTES: usize = 32 * 1024;
/// And at the latest after this long.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

type Batch = Arc<Mutex<Vec<u8>>>;

/// Every batching thread's buffer, so that [`Logging::finish`] can write out what a worker
/// still holds (also when the process ends on a second signal, with workers still running).
static BATCHES: Mutex<Vec<Batch>> = Mutex::new(Vec::new());
/// The writer batches are handed to (set once by [`init`]).
static WRITER: Mutex<Option<NonBlocking>> = Mutex::new(None);
/// Lines lost inside batches the log worker had no room for (its own counter counts each
/// dropped batch as one).
static DROPPED_IN_BATCHES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THIS_THREAD: std::cell::RefCell<Option<(Batch, NonBlocking)>> =
        const { std::cell::RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands a batch to the log worker, counting its lines if the worker had no room.
fn send(writer: &mut NonBlocking, batch: &[u8]) {
    if batch.is_empty() {
        return;
    }
    let counter = writer.error_counter();
    let before = counter.dropped_lines();
    let _ = writer.write_all(batch);
    if counter.dropped_lines() > before {
        let lines = batch.iter().filter(|&&b| b == b'\n').count();
        DROPPED_IN_BATCHES.fetch_add(lines.saturating_sub(1), Ordering::Relaxed);
    }
}

/// Called by the runtime when an async worker goes idle: from then on this thread's lines
/// are batched (only async workers park, so only they batch).
pub fn batch_this_thread() {
    THIS_THREAD.with(|this| {
        let Ok(mut this) = this.try_borrow_mut() else {
            return;
        };
        if this.is_some() {
            return;
        }
        let Some(writer) = lock(&WRITER).clone() else {
            return;
        };
        let batch: Batch = Arc::new(Mutex::new(Vec::with_capacity(BATCH_BYTES * 2)));
        lock(&BATCHES).push(batch.clone());
        *this = Some((batch, writer));
    });
}

/// Held while batches are handed over, so that [`Logging::finish`] never misses one the
/// flusher has taken and not yet sent.
static FLUSHING: Mutex<()> = Mutex::new(());

/// Hands over what every batch holds; false once logging has finished.
fn flush_all() -> bool {
    let _flushing = lock(&FLUSHING);
    let Some(mut writer) = lock(&WRITER).clone() else {
        return false;
    };
    let batches: Vec<Batch> = lock(&BATCHES).clone();
    for batch in batches {
        let held = {
            let mut held = lock(&batch);
            if held.is_empty() {
                continue;
            }
            std::mem::replace(&mut *held, Vec::with_capacity(BATCH_BYTES * 2))
        };
        send(&mut writer, &held);
    }
    true
}

/// The subscriber's writer: into this thread's batch when it has one, else straight on.
struct Batching(NonBlocking);

struct LineWriter<'a>(&'a NonBlocking);

impl<'a> MakeWriter<'a> for Batching {
    type Writer = LineWriter<'a>;
    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter(&self.0)
    }
}

/// Appends a line to this thread's batch if it has one (handing the batch over once full).
fn batch_line(line: &[u8]) -> bool {
    THIS_THREAD.with(|this| {
        let Ok(mut this) = this.try_borrow_mut() else {
            return false;
        };
        let Some((batch, writer)) = this.as_mut() else {
            return false;
        };
        let mut held = lock(batch);
        held.extend_from_slice(line);
        if held.len() >= BATCH_BYTES {
            let full = std::mem::take(&mut *held);
            drop(held);
            send(writer, &full);
        }
        true
    })
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if !batch_line(line) {
            self.0.clone().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the log worker alive; [`Logging::finish`] writes out what is queued.
pub struct Logging {
    guard: WorkerGuard,
    dropped: ErrorCounter,
}

impl Logging {
    /// Writes every batch and queued line, then says on stderr how many were dropped (if
    /// any). Returns that number.
    pub fn finish(self) -> usize {
        let _flushing = lock(&FLUSHING);
        if let Some(mut writer) = lock(&WRITER).take() {
            for batch in lock(&BATCHES).iter() {
                let held = std::mem::take(&mut *lock(batch));
                send(&mut writer, &held);
            }
        }
        drop(self.guard);
        let dropped = self.dropped.dropped_lines() + DROPPED_IN_BATCHES.load(Ordering::Relaxed);
        if dropped > 0 {
            eprintln!("regcache: {dropped} log lines dropped (log output too slow)");
        }
        dropped
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (else `default_filter`), the given
/// format, and the non-blocking writer.
pub fn init(format: Format, default_filter: &str) -> Logging {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("log-writer")
        // The worker flushes after each batch it drains: one write(2) per batch, not per
        // line. Smaller than a batch, so that a batch goes to write(2) as it is instead of
        // being copied into the buffer first.
        .finish(std::io::BufWriter::with_capacity(BATCH_BYTES / 4, std::io::stderr()));
    let dropped = writer.error_counter();
    *lock(&WRITER) = Some(writer.clone());
    let _ = std::thread::Builder::new().name("log-flusher".into()).spawn(|| {
        while flush_all() {
            std::thread::sleep(FLUSH_EVERY);
        }
    });
    FORMAT.store(
        match format {
            Format::Text => 1,
            Format::Json => 2,
        },
        Ordering::Relaxed,
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let installed = match format {
        Format::Text => builder.with_writer(Batching(writer)).try_init(),
        Format::Json => builder.json().with_writer(Batching(writer)).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("regcache: logging not set up: {e}");
    }
    Logging { guard, dropped }
}

/// How lines are formatted, once [`init`] has run (0: not set up, 1: text, 2: JSON).
static FORMAT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// One request of the access log (`regcache::access`).
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'static str,
    pub status: u16,
    pub bytes: &'a str,
    pub duration: std::time::Duration,
    pub cache: &'static str,
    /// What a signature policy decided (verified, warned, denied; "-" if none applied).
    pub policy: &'static str,
}

thread_local! {
    /// The formatted line's buffer, and the last second formatted ("2026-12-01T23:18:49").
    static ACCESS_SCRATCH: std::cell::RefCell<(Vec<u8>, u64, String)> =
        const { std::cell::RefCell::new((Vec::new(), u64::MAX, String::new())) };
}

/// Writes one access line in the same shape `tracing`'s formatter gives every other line,
/// formatted here by hand: at a line per request it is the costliest thing a warm hit does,
/// and this is a third of the formatter's work. `RUST_LOG` decides as for any event.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "regcache::access", tracing::Level::INFO) {
        return;
    }
    let format = FORMAT.load(Ordering::Relaxed);
    if format == 0 {
        tracing::info!(target: "regcache::access", method = line.method, path = line.path,
            route = line.route, status = line.status, bytes = line.bytes,
            duration_ms = line.duration.as_secs_f64() * 1000.0, cache = line.cache,
            policy = line.policy, "request");
        return;
    }
    ACCESS_SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return;
        };
        let (buf, second, stamp) = &mut *scratch;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if now.as_secs() != *second {
            *second = now.as_secs();
            *stamp = utc_second(now.as_secs());
        }
        buf.clear();
        let micros = now.subsec_micros();
        if format == 2 {
            access_json(buf, stamp, micros, line);
        } else {
            access_text(buf, stamp, micros, line);
        }
        if !batch_line(buf) {
            if let Some(mut writer) = lock(&WRITER).clone() {
                let _ = writer.write_all(buf);
            }
        }
    });
}

// The two formatters push bytes instead of going through `core::fmt` (a sixth of a warm
// manifest answer's user time went to `write!` here). They write exactly what
// `tracing_subscriber`'s JSON and text formatters write for the same event.

fn access_json(buf: &mut Vec<u8>, stamp: &str, micros: u32, line: &AccessLine<'_>) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    buf.extend_from_slice(stamp.as_bytes());
    push_fraction(buf, micros, 6);
    buf.extend_from_slice(b"Z\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":");
    push_quoted::<true>(buf, line.method);
    push_fields::<true>(buf, line);
    buf.extend_from_slice(b"},\"target\":\"regcache::access\"}\n");
}

fn access_text(buf: &mut Vec<u8>, stamp: &str, micros: u32, line: &AccessLine<'_>) {
    buf.extend_from_slice(stamp.as_bytes());
    push_fraction(buf, micros, 6);
    buf.extend_from_slice(b"Z  INFO regcache::access: request method=");
    buf.extend_from_slice(line.method.as_bytes());
    push_fields::<false>(buf, line);
    buf.push(b'\n');
}

enum Field<'a> {
    Str(&'a str),
    /// One of regcache's own names (`&'static`): printable ASCII, never escaped.
    Label(&'static str),
    Status(u16),
    Millis(std::time::Duration),
}

/// The fields after `method`, as `,"name":value` (JSON) or ` name=value` (text); `JSON` is
/// a constant so that each format gets its own unrolled copy.
fn push_fields<const JSON: bool>(buf: &mut Vec<u8>, line: &AccessLine<'_>) {
    let fields = [
        ("path", Field::Str(line.path)),
        ("route", Field::Label(line.route)),
        ("status", Field::Status(line.status)),
        ("bytes", Field::Str(line.bytes)),
        ("duration_ms", Field::Millis(line.duration)),
        ("cache", Field::Label(line.cache)),
        ("policy", Field::Label(line.policy)),
    ];
    for (name, value) in fields {
        buf.extend_from_slice(if JSON { b",\"" } else { b" " });
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(if JSON { b"\":" } else { b"=" });
        match value {
            Field::Str(s) => push_quoted::<JSON>(buf, s),
            Field::Label(s) => push_plain(buf, s),
            Field::Status(n) => buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            Field::Millis(d) => push_millis(buf, d),
        }
    }
}

/// `.` and `value` with `digits` digits, zero-padded (`value` < 10^digits).
fn push_fraction(buf: &mut Vec<u8>, value: u32, digits: usize) {
    let mut itoa = itoa::Buffer::new();
    let text = itoa.format(value);
    buf.push(b'.');
    buf.extend(std::iter::repeat_n(b'0', digits.saturating_sub(text.len())));
    buf.extend_from_slice(text.as_bytes());
}

/// Milliseconds with three decimals, as `{:.3}` of the float would print them (to the
/// microsecond, truncated).
fn push_millis(buf: &mut Vec<u8>, duration: std::time::Duration) {
    let micros = duration.as_micros();
    buf.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    push_fraction(buf, (micros % 1000) as u32, 3);
}

/// Whether a string needs no escaping, JSON or Rust `Debug`: printable ASCII without `"`
/// and `\\`. Request paths nearly always are. Branch-free over the whole string, so that the
/// compiler checks many bytes per instruction: this looks at every byte of every path logged.
fn plain(s: &str) -> bool {
    s.bytes().fold(true, |ok, b| {
        ok & (b.wrapping_sub(0x20) < 0x5f) & (b != b'"') & (b != b'\\')
    })
}

/// `s` quoted, escaped as JSON or as Rust's `{:?}` (the text format's quoting).
fn push_quoted<const JSON: bool>(buf: &mut Vec<u8>, s: &str) {
    if plain(s) {
        push_plain(buf, s);
    } else if JSON {
        let _ = serde_json::to_writer(&mut *buf, s);
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

/// `s` in quotes, as it is: for strings [`plain`] passes.
fn push_plain(buf: &mut Vec<u8>, s: &str) {
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    buf.extend_from_slice(s.as_bytes());
    buf.push(b'"');
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time, in UTC (for people).
pub fn utc_time(unix: u64) -> String {
    utc_second(unix).replacen('T', " ", 1)
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time, in UTC.
fn utc_second(unix: u64) -> String {
    // Civil-from-days (H. Hinnant's algorithm), valid for every date after 1970.
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::{access_json, access_text, utc_second, AccessLine};

    #[test]
    fn utc_seconds_match_the_calendar() {
        for (unix, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_210_096, "2024-02-29T12:34:56"),
            (1_764_630_000, "2025-12-01T23:00:00"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ] {
            assert_eq!(utc_second(unix), want);
        }
    }

    fn line(path: &str) -> AccessLine<'_> {
        AccessLine {
            method: "GET",
            path,
            route: "manifest",
            status: 200,
            bytes: "1234",
            duration: std::time::Duration::from_micros(12_034),
            cache: "hit",
            policy: "-",
        }
    }

    #[test]
    fn json_access_lines_are_json_with_every_field() {
        for path in ["/v2/library/alpine/manifests/3.20", "/v2/\"a\\b\u{1}\u{e9}/x"] {
            let mut buf = Vec::new();
            access_json(&mut buf, "2026-12-04T18:00:01", 42, &line(path));
            assert_eq!(buf.last(), Some(&b'\n'));
            let v: serde_json::Value = serde_json::from_slice(&buf).expect("one JSON object");
            assert_eq!(v["timestamp"], "2026-12-04T18:00:01.000042Z");
            assert_eq!(v["level"], "INFO");
            assert_eq!(v["target"], "regcache::access");
            let f = &v["fields"];
            assert_eq!(f["message"], "request");
            assert_eq!(f["method"], "GET");
            assert_eq!(f["path"], path);
            assert_eq!(f["route"], "manifest");
            assert_eq!(f["status"], 200);
            assert_eq!(f["bytes"], "1234");
            assert_eq!(f["duration_ms"], 12.034);
            assert_eq!(f["cache"], "hit");
            assert_eq!(f["policy"], "-");
        }
    }

    #[test]
    fn text_access_lines_quote_as_debug_does() {
        let path = "/v2/\"a\\b\u{1}/x";
        let mut buf = Vec::new();
        access_text(&mut buf, "2026-12-04T18:00:01", 123_456, &line(path));
        let text = String::from_utf8(buf).expect("utf-8");
        assert_eq!(
            text,
            format!(
                "2026-12-04T18:00:01.123456Z  INFO regcache::access: request method=GET path={path:?} \
                 route=\"manifest\" status=200 bytes=\"1234\" duration_ms=12.034 cache=\"hit\" policy=\"-\"\n"
            )
        );
    }
}
