//! Replicas on a real SeaweedFS cluster (one master, three volume servers keeping two
//! copies of every volume, a filer, the S3 gateway; all on 127.0.0.1), losing a volume
//! server in the middle of a herd: no client gets a corrupt byte, every pull completes or
//! fails cleanly (and then succeeds on retry), and the bucket holds only verified blobs.

use std::path::Path;
use std::time::Duration;

use http::Method;
use http_body_util::BodyExt as _;

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::{get, open, random_bytes, sha256, upstream_toml, wait_until, TestProxy};

const BUCKET: &str = "regcache";

struct Cluster {
    s3: String,
    dir: tempfile::TempDir,
    /// One shell per SeaweedFS process: each stops its process when this test process ends.
    watchdogs: Vec<std::process::Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let weed = crate::peers::require_binary("weed");
        let dir = tempfile::tempdir().expect("tempdir");
        // Below the kernel's ephemeral range and apart from `weed mini`'s ports; a block of
        // 70 of which none is taken (another SeaweedFS on the host would otherwise keep the
        // cluster from starting, or answer in its place).
        let base = (0..50u32)
            .map(|i| 29_000 + ((std::process::id() + i) % 50) as u16 * 70)
            .find(|base| (*base..base + 70).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()))
            .expect("a free block of 70 ports between 29000 and 32500");
        let master = format!("127.0.0.1:{base}.{}", base + 1);
        let local = "-ip=127.0.0.1 -ip.bind=127.0.0.1";
        let mut commands = vec![(
            "master".to_owned(),
            format!(
                "master {local} -port={base} -port.grpc={} -metricsPort={} -mdir={} -defaultReplication=001 -volumeSizeLimitMB=64",
                base + 1,
                base + 2,
                dir.path().join("master").display()
            ),
        )];
        for i in 1..=3u16 {
            let port = base + 10 * i;
            commands.push((
                format!("volume{i}"),
                format!(
                    "volume {local} -port={port} -port.grpc={} -metricsPort={} -dir={} -max=20 -mserver={master} -rack=r1",
                    port + 1,
                    port + 2,
                    dir.path().join(format!("volume{i}")).display()
                ),
            ));
        }
        let filer = base + 50;
        commands.push((
            "filer".to_owned(),
            format!(
                "filer {local} -port={filer} -port.grpc={} -metricsPort={} -master={master}",
                filer + 1,
                filer + 2
            ),
        ));
        let s3 = base + 60;
        commands.push((
            "s3".to_owned(),
            format!(
                "s3 -ip.bind=127.0.0.1 -filer=127.0.0.1:{filer}.{} -port={s3} -port.grpc={} -metricsPort={} -port.iceberg={} -port.lance={}",
                filer + 1,
                s3 + 1,
                s3 + 2,
                s3 + 3,
                s3 + 4
            ),
        ));
        let mut watchdogs = Vec::new();
        for (name, args) in &commands {
            let _ = std::fs::create_dir_all(dir.path().join(name));
            let script = format!(
                "cd {d}/{name} && {weed} {args} > {d}/{name}.log 2>&1 & w=$!; echo $w > {d}/{name}.pid; while kill -0 {me} 2>/dev/null && kill -0 $w 2>/dev/null; do sleep 1; done; kill $w 2>/dev/null; sleep 2; kill -9 $w 2>/dev/null",
                d = dir.path().display(),
                weed = weed.display(),
                me = std::process::id()
            );
            watchdogs.push(
                std::process::Command::new("sh")
                    .args(["-c", &script])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("weed starts"),
            );
        }
        let cluster = Cluster {
            s3: format!("http://127.0.0.1:{s3}"),
            dir,
            watchdogs,
        };
        // Up once the gateway creates the bucket (PUT /<bucket>, anonymous as SeaweedFS
        // allows without identities).
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while !creates_bucket(s3) {
            if std::time::Instant::now() > deadline {
                let logs: Vec<String> = ["master", "volume1", "filer", "s3"]
                    .iter()
                    .map(|n| format!("--- {n}:\n{}", cluster.log_tail(n)))
                    .collect();
                panic!("the SeaweedFS cluster did not start:\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        cluster
    }

    fn log_tail(&self, name: &str) -> String {
        let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        log.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills a volume server outright (SIGKILL), as a lost machine.
    fn kill_volume(&self, i: usize) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("volume{i}.pid"))).expect("pid file");
        let status = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "volume server {i} could not be killed");
    }

    /// Every blob key under `prefix`, with its bytes as the gateway serves them.
    async fn blobs(&self, prefix: &str) -> Vec<(String, bytes::Bytes)> {
        let list = get(&format!("{}/{BUCKET}?list-type=2&prefix={prefix}/v1/blobs/", self.s3)).await;
        assert_eq!(list.status, 200, "{list:?}");
        let text = String::from_utf8_lossy(list.bytes()).into_owned();
        let mut out = Vec::new();
        for key in text.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()) {
            let r = get(&format!("{}/{BUCKET}/{key}", self.s3)).await;
            assert_eq!(r.status, 200, "{key}");
            out.push((key.to_owned(), r.bytes().clone()));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.watchdogs {
            let _ = w.kill();
        }
        for name in ["master", "volume1", "volume2", "volume3", "filer", "s3"] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.path().join(format!("{name}.pid"))) {
                let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

fn creates_bucket(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("PUT /{BUCKET} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
    let mut head = [0u8; 12];
    c.write_all(request.as_bytes()).is_ok() && c.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

/// A replica of a cluster on `s3`, with its own peer URL and the cluster's secret.
async fn replica(up: &FakeUpstream, s3: &str, dir: &Path, secret: &Path) -> TestProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let peer = format!("http://{}", listener.local_addr().expect("addr"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n\
         [cache.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{s3}\"\nprefix = \"faults\"\naccess_key_id = \"any\"\n\
         secret_access_key_file = \"{}\"\npeer_url = \"{peer}\"\npeer_secret_file = \"{}\"\n{}",
        dir.display(),
        secret.display(),
        secret.display(),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let config = regcache::Config::from_toml(&text).expect("test config is valid");
    TestProxy::start_config_on(config, listener).await
}

/// A client's answer: the status and the body (or how it broke).
type Answer = (u16, Result<bytes::Bytes, String>);

/// One client's GET.
async fn pull(url: String) -> Answer {
    read(open(Method::GET, &url, &[]).await).await
}

async fn read(resp: http::Response<hyper::body::Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

/// Every answer is either the verified blob or a clean failure (an error status or an
/// aborted body, never a complete wrong one); a failed one succeeds when asked again.
async fn check_answers(answers: Vec<(String, Answer)>, digest: &str) -> usize {
    let mut complete = 0;
    for (url, (status, body)) in answers {
        match (status, body) {
            (200, Ok(b)) => {
                assert_eq!(sha256(&b), digest, "a complete 200 with the wrong bytes from {url}");
                complete += 1;
            }
            (status, body) => {
                assert!(status != 200 || body.is_err(), "{url}: {status}");
                let retry = get(&url).await;
                assert_eq!(
                    (retry.status.as_u16(), sha256(retry.bytes())),
                    (200, digest.to_owned()),
                    "retry of {url}"
                );
            }
        }
    }
    complete
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_volume_server_mid_herd_serves_no_corrupt_byte() {
    let cluster = Cluster::start();
    let up = FakeUpstream::start().await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "cluster-secret-for-tests\n").unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let data = random_bytes(24 << 20, 51);
    let digest = up.add_blob(&data);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(12 << 20, gate.clone())]);
    let a = replica(&up, &cluster.s3, dirs[0].path(), secret.path()).await;
    let b = replica(&up, &cluster.s3, dirs[1].path(), secret.path()).await;

    // A cold herd over two replicas: the lease holder streams from the upstream and
    // uploads to the bucket as it goes; the other streams from the holder.
    let (headers_in, mut all_in) = tokio::sync::mpsc::channel::<()>(8);
    let mut clients = Vec::new();
    for i in 0..8 {
        let url = [&a, &b][i % 2].url(&format!("/v2/library/app/blobs/{digest}"));
        let headers_in = headers_in.clone();
        clients.push(tokio::spawn(async move {
            let resp = open(Method::GET, &url, &[]).await;
            let _ = headers_in.send(()).await;
            (url.clone(), read(resp).await)
        }));
    }
    for _ in 0..8 {
        all_in.recv().await.unwrap();
    }
    // Half of the blob is in; its first part is going up. A volume server dies.
    cluster.kill_volume(1);
    gate.notify_one();
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    let complete = check_answers(answers, &digest).await;
    assert!(complete > 0, "no client of the cold herd completed");
    assert_eq!(
        up.count("GET", "/blobs/"),
        1,
        "the cluster fetched the blob more than once"
    );
    for p in [&a, &b] {
        let proxy = p.proxy.clone();
        wait_until(|| proxy.work_in_flight() == 0).await;
    }
    // Whatever reached the bucket is the verified blob, nothing else.
    let stored = cluster.blobs("faults").await;
    eprintln!(
        "cold herd: {complete}/8 complete; blobs in the bucket after the loss: {}",
        stored.len()
    );
    for (key, bytes) in stored {
        assert!(
            key.ends_with(digest.trim_start_matches("sha256:")),
            "unexpected key {key}"
        );
        assert_eq!(sha256(&bytes), digest, "{key} holds bytes that are not its blob");
    }

    // A fresh replica (empty local tier) serves a herd from the degraded cluster.
    let c = replica(&up, &cluster.s3, dirs[2].path(), secret.path()).await;
    let url = c.url(&format!("/v2/library/app/blobs/{digest}"));
    let herd: Vec<_> = (0..8).map(|_| tokio::spawn(pull(url.clone()))).collect();
    let mut answers = Vec::new();
    for h in herd {
        answers.push((url.clone(), h.await.unwrap()));
    }
    assert_eq!(
        check_answers(answers, &digest).await,
        8,
        "a warm herd failed on a cluster with two volume servers left"
    );
    for p in [a, b, c] {
        p.stop().await;
    }
}
