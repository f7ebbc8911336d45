//! Test harness: regcache in-process on 127.0.0.1:0 with a temp cache dir, and a small HTTP
//! client that reports a cut-short body as an error instead of hiding it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;

/// A running regcache. Dropping it stops the server.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: std::sync::Arc<regcache::proxy::Proxy>,
    pub app: std::sync::Arc<regcache::App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// One `[[upstream]]` table.
pub fn upstream_toml(name: &str, url: &str, default: bool, tag_ttl: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\ndefault = {default}\ntag_ttl = \"{tag_ttl}\"\n")
}

impl TestProxy {
    /// Starts regcache with cache dir `dir`, a disk budget, and the given upstream tables.
    pub async fn start(dir: &Path, max_size: &str, upstreams: &str) -> TestProxy {
        TestProxy::start_with(dir, &format!("max_size = \"{max_size}\""), upstreams).await
    }

    /// Starts regcache with extra `[cache]` keys (one per line) and the upstream tables.
    pub async fn start_with(dir: &Path, cache_keys: &str, upstreams: &str) -> TestProxy {
        TestProxy::start_sections(dir, "", cache_keys, "", upstreams).await
    }

    /// Starts regcache with extra keys for `[server]` and `[cache]`, other whole sections
    /// (`[limits]`, `[auth]`, `[server.tls]` …), and the upstream tables.
    pub async fn start_sections(
        dir: &Path,
        server_keys: &str,
        cache_keys: &str,
        sections: &str,
        upstreams: &str,
    ) -> TestProxy {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server_keys}\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{cache_keys}\n{sections}\n{upstreams}",
            dir.display()
        );
        let config = regcache::Config::from_toml(&text).expect("test config is valid");
        TestProxy::start_config(config).await
    }

    /// Starts regcache with this config (its listen address is ignored: 127.0.0.1:0).
    pub async fn start_config(config: regcache::Config) -> TestProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        TestProxy::start_config_on(config, listener).await
    }

    /// [`TestProxy::start_config`] on a listener bound beforehand (its address can then be
    /// in the config).
    pub async fn start_config_on(config: regcache::Config, listener: tokio::net::TcpListener) -> TestProxy {
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let app = regcache::build(&config).expect("cache opens");
        let proxy = app.proxy.clone();
        let served = app.clone();
        let task = tokio::spawn(async move {
            regcache::server::serve(listener, served, async {
                let _ = stopped.await;
            })
            .await;
        });
        TestProxy {
            addr,
            proxy,
            app,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The value of one metric sample, e.g. `regcache_fills_total{result="committed"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        self.proxy.refresh_metrics();
        let text = String::from_utf8(self.proxy.metrics.render()).unwrap();
        let found = text
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')));
        match found {
            Some(v) => v.trim().parse().unwrap(),
            // A labelled sample appears once first counted; its family must exist, though,
            // so that a renamed or missing metric fails instead of reading as 0.
            None => {
                let family = sample.split('{').next().unwrap_or(sample);
                let family = family.strip_suffix("_bucket").unwrap_or(family);
                assert!(
                    text.contains(&format!("# TYPE {family} ")),
                    "no metric family {family} (asked for {sample})"
                );
                0.0
            }
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // The test's cache dir goes right after this: a manifest or tag record still being
        // written meanwhile would make its removal fail half way and leave the dir behind.
        let started = std::time::Instant::now();
        while self.proxy.writes_in_flight() > 0 && started.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// An HTTP answer; `body` is `Err` when the body was cut short or the connection broke.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn bytes(&self) -> &Bytes {
        self.body.as_ref().expect("complete body")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).expect("JSON body")
    }
    /// The OCI error code of an error answer.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"].as_str().unwrap_or_default().to_owned()
    }
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// Far longer than any answer in these tests takes: reaching it means a hang, a failure.
pub const HANG: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends a request and returns as soon as the response headers are in.
pub async fn open(method: Method, url: &str, headers: &[(&str, &str)]) -> http::Response<hyper::body::Incoming> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(HANG, client().request(req.body(Empty::new()).expect("request")))
        .await
        .unwrap_or_else(|_| panic!("no response headers from {url} within {HANG:?}"))
        .expect("response headers")
}

pub async fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    let (parts, body) = open(method, url, headers).await.into_parts();
    let body = tokio::time::timeout(HANG, body.collect())
        .await
        .unwrap_or_else(|_| panic!("the body from {url} did not end within {HANG:?}"))
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Reply {
    request(Method::GET, url, &[]).await
}

pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    request(Method::GET, url, headers).await
}

pub async fn head(url: &str) -> Reply {
    request(Method::HEAD, url, &[]).await
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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

pub fn sha256(bytes: &[u8]) -> String {
    regcache::digest::Digest::sha256_of(bytes).to_string()
}

/// Files under `dir` (recursively), for asserting what the cache holds.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// regcache as a process of its own (the built binary), to kill it or send it signals.
/// Its cache lives in `<dir>/cache`; `server_keys` go into `[server]`.
pub struct Process {
    pub child: std::process::Child,
    pub addr: String,
}

/// A kernel CPU list (`0-3,6`) as the CPUs it names.
pub fn cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (from, to) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(from.parse::<usize>().expect("a CPU")..=to.parse::<usize>().expect("a CPU"));
    }
    cpus
}

/// Writes `<dir>/regcache.toml` for a regcache process of its own: cache in `<dir>/cache`,
/// `upstream` as the default docker.io, `server_keys` in `[server]`, `upstream_keys` in the
/// `[[upstream]]` table. Returns its path.
pub fn write_process_config(dir: &Path, upstream: &str, server_keys: &str, upstream_keys: &str) -> PathBuf {
    let config = dir.join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server_keys}\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}{upstream_keys}\n",
            dir.join("cache").display(),
            upstream_toml("docker.io", upstream, true, "5m")
        ),
    )
    .expect("config written");
    config
}

impl Process {
    pub fn start(dir: &Path, upstream: &str, server_keys: &str) -> Process {
        Process::start_with(dir, upstream, server_keys, "")
    }

    /// Like [`Process::start`], with extra keys for the `[[upstream]]` table.
    pub fn start_with(dir: &Path, upstream: &str, server_keys: &str, upstream_keys: &str) -> Process {
        Process::start_with_config(&write_process_config(dir, upstream, server_keys, upstream_keys))
    }

    /// Runs `regcache serve` with this config file (it must listen on 127.0.0.1:0).
    pub fn start_with_config(config: &Path) -> Process {
        use std::io::BufRead;
        let mut child = ends_with_this_thread(&mut std::process::Command::new(env!("CARGO_BIN_EXE_regcache")))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("regcache binary starts");
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = loop {
            let line = lines.next().expect("regcache logged its address").expect("log line");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(listen) = v["fields"]["listen"].as_str() {
                break listen.to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Process { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Each of its threads: name and the CPUs it may run on (`Cpus_allowed_list`).
    pub fn threads(&self) -> Vec<(String, Vec<usize>)> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("its /proc tasks");
        tasks
            .filter_map(Result::ok)
            .filter_map(|task| {
                let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                let status = std::fs::read_to_string(task.path().join("status")).ok()?;
                let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
                Some((name.trim().to_owned(), cpu_list(list.trim())))
            })
            .collect()
    }

    /// Its peak resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("its /proc status");
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM");
        kib * 1024
    }

    /// Sends a signal by name (`TERM`, `HUP`, …).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success());
    }
}

/// Makes the process `command` starts end (SIGKILL) when the thread that starts it does, so
/// that a test that dies before its guards run (a panic elsewhere, an abort, a killed test
/// binary) leaves no daemon behind. A test's thread ends with the test.
pub fn ends_with_this_thread(command: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes one prctl call and reads errno, and
    // touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// regcache in front of `up` (the default upstream, tag_ttl 5m) with extra sections
/// (`[limits]`, `[auth]` …).
pub async fn behind(up: &crate::fake_upstream::FakeUpstream, dir: &Path, sections: &str) -> TestProxy {
    TestProxy::start_sections(
        dir,
        "",
        "",
        sections,
        &upstream_toml("docker.io", &up.url(), true, "5m"),
    )
    .await
}

/// A fake upstream, a regcache in front of it with `tag_ttl`, and the cache's temp dir.
pub async fn setup(tag_ttl: &str) -> (crate::fake_upstream::FakeUpstream, TestProxy, CacheDir) {
    let up = crate::fake_upstream::FakeUpstream::start().await;
    let dir = CacheDir(Some(tempfile::tempdir().expect("tempdir")));
    let proxy = TestProxy::start(
        dir.path(),
        "1GiB",
        &upstream_toml("docker.io", &up.url(), true, tag_ttl),
    )
    .await;
    (up, proxy, dir)
}

/// A test's cache dir, removed when dropped even while its server still writes in it:
/// [`setup`]'s callers drop it before the server (the last binding of a tuple goes first),
/// and a removal that a late manifest or tag write makes fail half way is tried again.
pub struct CacheDir(Option<tempfile::TempDir>);

impl CacheDir {
    pub fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        let path = dir.keep();
        for _ in 0..200 {
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                _ => return,
            }
        }
    }
}

/// Polls `condition` until it holds; a condition never reached within the hang limit fails
/// the test.
pub async fn wait_until(mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < HANG, "condition not reached within {HANG:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
