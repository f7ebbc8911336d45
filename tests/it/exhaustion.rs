//! Resource exhaustion: what a flood of bad logins, idle h2 connections or slow readers
//! may cost. Each check counts work or resources; none measures time.

use std::sync::Arc;

use crate::fake_upstream::{basic, FakeUpstream};
use crate::harness::{behind, get, get_with, TestProxy};

async fn with_user(up: &FakeUpstream, dir: &std::path::Path, hash: &str) -> TestProxy {
    behind(
        up,
        dir,
        &format!("[auth]\n[[auth.user]]\nname = \"ci\"\npassword_hash = \"{hash}\"\n"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_run_bcrypt_once_per_pair_and_are_remembered() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Arc::new(with_user(&up, dir.path(), &bcrypt::hash("right", 4).unwrap()).await);
    let access = &proxy.app.access;

    // 20 concurrent requests with one wrong pair: one bcrypt check.
    let wrong = basic("ci", "wrong");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (proxy, wrong) = (proxy.clone(), wrong.clone());
        tasks.push(tokio::spawn(async move {
            get_with(&proxy.url("/v2/"), &[("authorization", wrong.as_str())])
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 401);
    }
    assert_eq!(access.bcrypt_runs(), 1);
    // Asked again: remembered, no bcrypt.
    let r = get_with(&proxy.url("/v2/"), &[("authorization", wrong.as_str())]).await;
    assert_eq!(r.status, 401);
    assert_eq!(access.bcrypt_runs(), 1);
    // Distinct pairs each cost one check; the right one is then remembered too.
    for pw in ["a", "b", "right", "right"] {
        let _ = get_with(&proxy.url("/v2/"), &[("authorization", basic("ci", pw).as_str())]).await;
    }
    assert_eq!(access.bcrypt_runs(), 4);
    assert_eq!(proxy.metric("regcache_auth_failures_total"), 23.0);
}

/// One async worker only: if bcrypt ran on it, nothing else could be answered meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn bcrypt_never_runs_on_the_async_workers() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Cost 12: a quarter of a second of CPU per check, far longer than answering /v2/.
    let proxy = with_user(&up, dir.path(), &bcrypt::hash("right", 12).unwrap()).await;
    let (url, wrong) = (proxy.url("/v2/"), basic("ci", "wrong"));
    let headers = [("authorization", wrong.as_str())];
    let slow = get_with(&url, &headers);
    tokio::pin!(slow);
    // Let the bad login reach its bcrypt check first.
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = &mut slow => panic!("the bcrypt check finished before it could be observed"),
            _ = tokio::task::yield_now() => {}
        }
        if proxy.app.access.bcrypt_runs() == 1 {
            break;
        }
        assert!(
            started.elapsed() < crate::harness::HANG,
            "the bad login never reached bcrypt"
        );
    }
    // While it runs, another client (anonymous: answered with a challenge, no bcrypt) is
    // answered.
    tokio::select! {
        biased;
        r = get(&url) => assert_eq!(r.status, 401),
        _ = &mut slow => panic!("the bad login was answered first: bcrypt held the only async worker"),
    }
    assert_eq!(slow.await.status, 401);
    assert_eq!(proxy.app.access.bcrypt_runs(), 1);
}

async fn with_limits(up: &FakeUpstream, dir: &std::path::Path, limits: &str) -> TestProxy {
    behind(up, dir, &format!("[limits]\n{limits}\n")).await
}

/// Reads until the server closes the connection (bounded by the harness's hang limit).
async fn until_closed(stream: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(crate::harness::HANG, stream.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the server never closed the {what} connection: got {got:?}"
    );
    got
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_http1_and_h2() {
    use tokio::io::AsyncWriteExt;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = with_limits(&up, dir.path(), "idle_timeout = \"200ms\"").await;

    // HTTP/1.1 keep-alive: answered, then closed once idle.
    let mut h1 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h1.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let got = until_closed(&mut h1, "HTTP/1.1").await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));

    // h2 with prior knowledge, no request at all: GOAWAY, then closed.
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(H2_PREFACE).await.unwrap();
    h2.write_all(H2_SETTINGS).await.unwrap();
    let got = until_closed(&mut h2, "h2").await;
    let frames = h2_frames(&got);
    assert!(frames.iter().any(|(kind, _)| *kind == 7), "a GOAWAY frame: {frames:?}");
}

/// (type, payload) of each whole frame in `bytes`.
fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            break;
        }
        out.push((bytes[3], bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_get_a_low_stream_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = with_limits(&up, dir.path(), "max_streams_per_connection = 16").await;
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(H2_PREFACE).await.unwrap();
    h2.write_all(H2_SETTINGS).await.unwrap();
    let mut got = vec![0u8; 9];
    tokio::time::timeout(crate::harness::HANG, h2.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    let len = (usize::from(got[0]) << 16) | (usize::from(got[1]) << 8) | usize::from(got[2]);
    assert_eq!(got[3], 4, "the server's first frame is SETTINGS");
    let mut payload = vec![0u8; len];
    h2.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        settings.contains(&(3, 16)),
        "SETTINGS_MAX_CONCURRENT_STREAMS = 16: {settings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let data = crate::harness::random_bytes(64 << 20, 95);
    let digest = up.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = with_limits(&up, dir.path(), "max_connections = 1\nsend_stall_timeout = \"300ms\"").await;
    // Cached first, so the stalled response is a plain cache read.
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    assert_eq!(crate::harness::sha256(get(&url).await.bytes()), digest);

    // A client that asks for 64 MiB and reads only the first few bytes.
    let mut stalled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("GET /v2/library/x/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // It holds the only connection slot until regcache gives up on it; then another
    // client is served.
    assert_eq!(get(&proxy.url("/v2/")).await.status, 200);
    drop(stalled);
}

/// `max_connections` holds the next connection: accepted, waiting for a slot (the
/// `regcache_connections_waiting` gauge) and unanswered until a slot frees, then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_past_the_limit_waits_for_a_slot() {
    use std::io::{Read, Write};
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = with_limits(&up, dir.path(), "max_connections = 8").await;
    let ask = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut c = std::net::TcpStream::connect(proxy.addr).unwrap();
        c.write_all(ask).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        held.push(c); // kept alive: each holds a slot
    }
    assert_eq!(proxy.metric("regcache_connections_open"), 8.0);
    let mut ninth = std::net::TcpStream::connect(proxy.addr).unwrap();
    ninth.write_all(ask).unwrap();
    crate::harness::wait_until(|| proxy.metric("regcache_connections_waiting") == 1.0).await;
    // Accepted but not served: nothing can have been answered yet.
    ninth.set_nonblocking(true).unwrap();
    let mut head = [0u8; 12];
    let early = ninth.read(&mut head);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{early:?}"
    );
    ninth.set_nonblocking(false).unwrap();
    drop(held.pop());
    tokio::task::spawn_blocking(move || {
        ninth.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
    })
    .await
    .unwrap();
    assert_eq!(proxy.metric("regcache_connections_waiting"), 0.0);
}
