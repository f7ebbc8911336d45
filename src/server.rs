//! The accept loop: plain HTTP (HTTP/1.1 and h2c) or TLS (h2 and HTTP/1.1 by ALPN) on one
//! port, with the connection limit, the request-head limits against slow or huge clients,
//! a watchdog per connection (idle connections closed, stalled readers cut off), the
//! connection threads (one per core; pinned, each takes the connections whose packets arrive
//! on its CPU, and sends a client whose thread moved to another CPU to the thread there),
//! and the graceful drain on shutdown (in-flight responses and fills, within the grace).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::http::body::Body;
use crate::http::handlers::handle;
use crate::App;

/// How often the TLS files are checked for a renewed certificate.
const TLS_CHECK_INTERVAL: Duration = Duration::from_secs(10);

fn builder(app: &App) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head = app.limits.max_header_bytes.0.min(usize::MAX as u64) as usize;
    builder
        .http1()
        // Timed by the connection's watchdog instead (`Activity::head_since`): hyper's
        // timer arms and cancels a timer entry on every request, 6 % of a warm hit's
        // instructions.
        .header_read_timeout(None)
        .max_buf_size(head.max(8192))
        // Body chunks are queued and written as they are, never copied into a buffer:
        // mapped blob bytes must be read by the kernel only (cache/mapped.rs).
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head).unwrap_or(u32::MAX))
        .max_concurrent_streams(app.limits.max_streams_per_connection)
        .keep_alive_interval(Some(Duration::from_secs(60)));
    builder
}

/// One connection's traffic, as its watchdog sees it. Traffic is counted rather than
/// timed (a clock read on every read and write cost more than the count): the watchdog,
/// which wakes every `period`, notes when the count last changed.
struct Activity {
    epoch: Instant,
    /// Reads and writes that moved bytes, and responses finished.
    traffic: AtomicU64,
    /// `traffic` as the watchdog last saw it.
    seen: AtomicU64,
    /// When the watchdog last saw `traffic` change (milliseconds since `epoch`).
    last: AtomicU64,
    /// The watchdog's ticks so far: the clock of `head_since`.
    ticks: AtomicU64,
    /// The tick (+1) at which the client began sending a request head with no request in
    /// service; 0 when none is pending. An h2 connection carries frames between requests,
    /// so it is timed only until its first request (`h2`).
    head_since: AtomicU64,
    h2: std::sync::atomic::AtomicBool,
    /// When the current write started to block (+1, so 0 means "not blocked").
    write_blocked_since: AtomicU64,
    /// Responses started and not yet finished (their bodies are still being sent).
    in_flight: AtomicUsize,
    /// Set when the client now sends from another shard's CPU: its next HTTP/1.1 response
    /// says `Connection: close`, and it reconnects to the shard on its CPU ([`Home`]).
    leave: std::sync::atomic::AtomicBool,
    home: Option<Home>,
}

/// Requests between two looks at where a pinned connection's packets arrive (a system
/// call, made when the next request's bytes are read).
const MOVE_CHECK_REQUESTS: u64 = 64;

impl Activity {
    fn new(home: Option<Home>) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            traffic: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            last: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            h2: std::sync::atomic::AtomicBool::new(false),
            write_blocked_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            leave: std::sync::atomic::AtomicBool::new(false),
            home,
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.traffic.fetch_add(1, Ordering::Relaxed);
    }

    /// The client sent bytes: with no request in service, a request head has begun.
    fn read(&self) {
        self.touch();
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
        {
            self.head_since
                .store(self.ticks.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// A request's head was read whole and its service called.
    fn request_started(&self, h2: bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        if let Some(home) = &self.home {
            if home.requests.fetch_add(1, Ordering::Relaxed) % MOVE_CHECK_REQUESTS == MOVE_CHECK_REQUESTS - 1
                && !self.leave.load(Ordering::Relaxed)
            {
                home.look.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The watchdog's tick: notes whether anything moved since the last one.
    fn tick(&self) {
        let traffic = self.traffic.load(Ordering::Relaxed);
        if self.seen.swap(traffic, Ordering::Relaxed) != traffic {
            self.last.store(self.now(), Ordering::Relaxed);
        }
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the watchdog found.
enum Verdict {
    Fine,
    Idle,
    Stalled,
    /// A request head has taken `header_read_timeout` and is not complete (slowloris).
    SlowHead,
}

/// The connection's state at a tick; `head_ticks` is `header_read_timeout` in ticks.
fn verdict(a: &Activity, idle: Duration, stall: Duration, head_ticks: u64) -> Verdict {
    a.tick();
    let now = a.now();
    let blocked = a.write_blocked_since.load(Ordering::Relaxed);
    if blocked != 0 && now.saturating_sub(blocked - 1) >= stall.as_millis() as u64 {
        return Verdict::Stalled;
    }
    // Begun during tick `since - 1`: whole ticks since then are a lower bound.
    let since = a.head_since.load(Ordering::Relaxed);
    if since != 0 && a.ticks.load(Ordering::Relaxed).saturating_sub(since) >= head_ticks {
        return Verdict::SlowHead;
    }
    let quiet = now.saturating_sub(a.last.load(Ordering::Relaxed));
    if a.in_flight.load(Ordering::Relaxed) == 0 && quiet >= idle.as_millis() as u64 {
        return Verdict::Idle;
    }
    Verdict::Fine
}

/// The socket, noting every byte through and every write the client leaves blocked.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
            if let Some(home) = &self.activity.home {
                if home.look.load(Ordering::Relaxed)
                    && home.look.swap(false, Ordering::Relaxed)
                    && home.client_moved(&self.inner)
                {
                    tracing::debug!("client moved to another shard's CPU; closing its connection");
                    self.activity.leave.store(true, Ordering::Relaxed);
                }
            }
        }
        polled
    }
}

impl Tracked {
    /// `moved` says whether bytes went out (a flush that finds nothing to do is no traffic).
    fn note_write<T>(&self, polled: &Poll<io::Result<T>>, moved: bool) {
        match polled {
            Poll::Pending => {
                let since = self.activity.now() + 1;
                let _ =
                    self.activity
                        .write_blocked_since
                        .compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
            }
            Poll::Ready(_) => {
                self.activity.write_blocked_since.store(0, Ordering::Relaxed);
                if moved {
                    self.activity.touch();
                }
            }
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        let moved = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        self.note_write(&polled, moved);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        let moved = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        self.note_write(&polled, moved);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(&polled, false);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that counts as in flight until it is finished or dropped.
struct Counted {
    body: Body,
    activity: Arc<Activity>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.activity.touch();
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves until `shutdown` resolves; then stops accepting, lets in-flight responses and
/// upstream fills finish within the shutdown grace, and removes what fills left behind.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    serve_as(listener, app, shutdown, false).await;
}

/// A request that came through regcache's own loopback listener with the process's secret
/// (its sync jobs): client authentication does not apply to it. Without the secret, that
/// listener is like the main one.
#[derive(Debug, Clone, Copy)]
pub struct Internal;

/// The next delivery of a signal; never, when it could not be registered.
#[cfg(unix)]
pub async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal.as_mut() {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// [`serve`]; `internal` marks every request as [`Internal`].
pub async fn serve_as(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>, internal: bool) {
    let builder = Arc::new(builder(&app));
    let (draining, drain) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(app.limits.max_connections));
    let acceptor = app
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config()));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // One core: the main runtime serves (its one worker is a shard already).
    let shards = (!internal && cores > 1)
        .then(|| Shards::start(cores, app.pin_threads))
        .flatten();
    let mut tls_check = tokio::time::interval(TLS_CHECK_INTERVAL);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(shutdown);
    loop {
        #[cfg(unix)]
        let hup = next_signal(&mut hangup);
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tls_check.tick(), if app.tls.is_some() => {
                if let Some(t) = &app.tls { t.reload_if_changed(); }
                continue;
            }
            _ = hup, if app.tls.is_some() => {
                if let Some(Err(e)) = app.tls.as_ref().map(|t| t.reload()) {
                    tracing::warn!(error = %e, "SIGHUP: cannot reload the TLS certificate; keeping the old one");
                }
                continue;
            }
            () = &mut shutdown => break,
        };
        let (stream, peer) = stream;
        // At the limit, one accepted connection waits here for a slot (visible as a gauge);
        // the rest wait in the listen backlog, holding no descriptor of ours.
        let metrics = &app.proxy.metrics;
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics.connections_waiting.set(1);
                let permit = tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.ok(),
                    () = &mut shutdown => None,
                };
                metrics.connections_waiting.set(0);
                match permit {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let open = OpenConnection::counted(metrics.connections_open.clone());
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let drain = drain.clone();
        let acceptor = acceptor.clone();
        let serve = move |stream: TcpStream, home: Option<Home>| async move {
            let _permit = permit;
            let _open = open;
            let connection = Peer {
                addr: peer,
                plain_tcp: acceptor.is_none(),
            };
            let tracked = Tracked {
                inner: stream,
                activity: Activity::new(home),
            };
            let serving = serve_connection(tracked, connection, app, &builder, acceptor, drain, internal);
            CONNECTION.scope(connection, serving).await;
        };
        let Some((shards, index)) = shards
            .as_ref()
            .and_then(|s| s.pick(|| crate::cpus::incoming(&stream)).map(|i| (s, i)))
        else {
            tokio::spawn(serve(stream, None));
            continue;
        };
        match stream.into_std() {
            // Registered with the shard's own reactor: `from_std` runs on the shard's thread.
            Ok(stream) => {
                let home = shards.home(index, &metrics.connections_moved);
                shards.shards[index].send(Box::pin(async move {
                    if let Ok(stream) = TcpStream::from_std(stream) {
                        serve(stream, home).await;
                    }
                }))
            }
            Err(e) => tracing::debug!(error = %e, "cannot hand the connection over"),
        }
    }
    drop(listener);
    let deadline = Instant::now() + app.shutdown_grace;
    let _ = draining.send(true);
    // Every connection holds a slot until it has ended: all slots back means all done.
    let all = u32::try_from(app.limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(app.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown: responses still in flight after {:?}", app.shutdown_grace);
    }
    // Fills and writes are detached from clients: give them the rest of the grace too.
    while app.proxy.work_in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if app.proxy.work_in_flight() > 0 {
        tracing::warn!(
            fills = app.proxy.fills_in_flight(),
            "shutdown: fills and writes cut short"
        );
    }
    app.proxy.cache.store.clear_tmp();
    // The last minute's uses, for the LRU order after a restart.
    let cache = app.proxy.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.note_recent_uses()).await;
}

/// Counts a connection in `regcache_connections_open` while it lives.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn counted(gauge: prometheus::IntGauge) -> OpenConnection {
        gauge.inc();
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The connection a request came on: see [`Peer::of`].
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's address (for trusted `X-Forwarded-*`).
    pub addr: std::net::SocketAddr,
    /// Plain TCP (no TLS), where a blob's bytes can go from the page cache to the socket
    /// without passing through user space (HTTP/1.1 only).
    pub plain_tcp: bool,
}

tokio::task_local! {
    /// The connection its task serves: set once per connection, so that an HTTP/1.1
    /// request costs no extension insert (a hash and an allocation each).
    static CONNECTION: Peer;
}

impl Peer {
    /// The connection `req` came on. HTTP/1.1 requests are served in their connection's
    /// task; h2 streams are spawned as tasks of their own, so they carry it as an extension.
    pub fn of<B>(req: &http::Request<B>) -> Option<Peer> {
        req.extensions()
            .get::<Peer>()
            .copied()
            .or_else(|| CONNECTION.try_with(|p| *p).ok())
    }
}

/// Serves one connection; run it in a [`CONNECTION`] scope of the same `connection`.
async fn serve_connection(
    tracked: Tracked,
    connection: Peer,
    app: Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    drain: watch::Receiver<bool>,
    internal: bool,
) {
    let activity = tracked.activity.clone();
    let handler = app.clone();
    let counted = activity.clone();
    let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        if req.version() >= http::Version::HTTP_2 {
            req.extensions_mut().insert(connection);
        }
        let secret = req.headers().get(crate::INTERNAL_HEADER).map(|v| v.as_bytes());
        if internal && secret == Some(handler.internal_secret.as_bytes()) {
            req.extensions_mut().insert(Internal);
        }
        let (app, activity) = (handler.clone(), counted.clone());
        let h2 = req.version() >= http::Version::HTTP_2;
        activity.request_started(h2);
        async move {
            let leave = !h2 && activity.leave.load(Ordering::Relaxed);
            // Counts from here, even if the request is dropped before it is answered.
            let mut counted = Counted {
                body: Body::empty(),
                activity,
            };
            let mut resp = handle(app, req).await?;
            if leave {
                resp.headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                counted.body = body;
                counted
            }))
        }
    });
    // hyper's header timeout starts with the first byte; a client that connects and
    // sends nothing (a pre-opened pooled connection) must hold a connection slot neither
    // forever nor through a drain.
    let mut drain = drain;
    if acceptor.is_none() {
        let mut first = [0u8; 1];
        let limit = app.limits.header_read_timeout.0;
        if !matches!(
            before_drain(&mut drain, limit, tracked.inner.peek(&mut first)).await,
            Some(Ok(1))
        ) {
            return;
        }
    }
    let result = match acceptor {
        None => {
            let conn = builder.serve_connection(TokioIo::new(tracked), service);
            watch_connection(conn, |c| c.graceful_shutdown(), &app, &activity, drain).await
        }
        Some(acceptor) => {
            let limit = app.limits.header_read_timeout.0;
            let tls = match before_drain(&mut drain, limit, acceptor.accept(tracked)).await {
                Some(Ok(tls)) => tls,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                None => return,
            };
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            watch_connection(conn, |c| c.graceful_shutdown(), &app, &activity, drain).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// `work`'s result, unless it takes longer than `limit` or the server starts draining first
/// (nothing has been asked on the connection yet, so there is nothing to finish).
async fn before_drain<T>(
    drain: &mut watch::Receiver<bool>,
    limit: Duration,
    work: impl Future<Output = T>,
) -> Option<T> {
    if *drain.borrow() {
        return None;
    }
    tokio::select! {
        done = tokio::time::timeout(limit, work) => done.ok(),
        _ = drain.wait_for(|draining| *draining) => None,
    }
}

/// Drives a connection until it ends: closed gracefully when idle or when the server
/// drains, dropped (its responses aborted) when the client stops taking bytes.
async fn watch_connection<C, E>(
    conn: C,
    shutdown_gracefully: impl Fn(Pin<&mut C>),
    app: &App,
    activity: &Activity,
    mut drain: watch::Receiver<bool>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let limits = &app.limits;
    let (idle, stall, head) = (
        limits.idle_timeout.0,
        limits.send_stall_timeout.0,
        limits.header_read_timeout.0,
    );
    let period = (idle.min(stall).min(head) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let head_ticks = head.as_nanos().div_ceil(period.as_nanos()) as u64;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(conn);
    let mut closing = *drain.borrow();
    if closing {
        shutdown_gracefully(conn.as_mut());
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = tick.tick() => match verdict(activity, idle, stall, head_ticks) {
                Verdict::Stalled => {
                    tracing::debug!(in_flight = activity.in_flight.load(Ordering::Relaxed),
                        "client stopped reading; closing its connection");
                    return Ok(());
                }
                Verdict::SlowHead => {
                    tracing::debug!("request head not complete within header_read_timeout; closing the connection");
                    return Ok(());
                }
                Verdict::Idle if !closing => {
                    closing = true;
                    shutdown_gracefully(conn.as_mut());
                }
                Verdict::Idle => {
                    // Asked to close gracefully an idle period ago and still open.
                    if activity.now().saturating_sub(activity.last.load(Ordering::Relaxed))
                        >= 2 * idle.as_millis() as u64
                    {
                        return Ok(());
                    }
                }
                Verdict::Fine if !closing && activity.h2.load(Ordering::Relaxed) && activity.leave.load(Ordering::Relaxed) => {
                    // GOAWAY: the client opens a new connection for its next streams.
                    closing = true;
                    shutdown_gracefully(conn.as_mut());
                }
                Verdict::Fine => {}
            },
            changed = drain.changed(), if !closing => {
                if changed.is_err() || *drain.borrow() {
                    closing = true;
                    shutdown_gracefully(conn.as_mut());
                }
            }
        }
    }
}

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Connections are served on one single-threaded runtime per core, each with its own
/// reactor, as nginx's workers are: on the work-stealing runtime, workers woke each other
/// to steal (a futex wake and an inter-processor interrupt, dear in a VM), and a warm hit
/// cost about a third more CPU than on one worker alone. What a request starts (a fill, a
/// body's streaming task) runs on its connection's shard; the heavy part of a fill, hashing
/// and writing, is on the blocking pool either way.
struct Shards {
    shards: Vec<Shard>,
    /// The CPU each shard's thread is pinned to, if they are.
    cpus: Option<Vec<usize>>,
}

/// Where a connection on a pinned shard is served, for noticing that its client moved. The
/// scheduler moves client threads that share the machine (a node's kubelet and containerd
/// pulling through a local mirror, a bench's wrk); their connections stay where they were
/// accepted, and each request then wakes this shard from across CPUs, an inter-processor
/// interrupt each. When two looks in a row, [`MOVE_CHECK_REQUESTS`] apart, find the
/// requests arriving on another shard's CPU, and that shard is no busier, the connection is
/// closed at its next response (`Connection: close`; h2: GOAWAY); the client's new
/// connection is accepted on the shard of its CPU. A remote client's packets arrive on the
/// CPU its NIC queue interrupts, which does not move, so this is for local clients.
struct Home {
    shard: usize,
    /// Each shard's CPU and load, as in [`Shards`].
    cpus: Vec<usize>,
    loads: Vec<Arc<AtomicUsize>>,
    /// Requests started on the connection.
    requests: AtomicU64,
    /// Set every [`MOVE_CHECK_REQUESTS`]: look where the next request's bytes arrive.
    look: std::sync::atomic::AtomicBool,
    /// Looks in a row that found the requests arriving on another shard's CPU.
    strikes: std::sync::atomic::AtomicU8,
    moved: prometheus::IntCounter,
}

impl Home {
    /// Whether the client has moved, from where `socket`'s latest packets arrived.
    fn client_moved(&self, socket: &TcpStream) -> bool {
        let there = crate::cpus::incoming(socket).and_then(|cpu| self.cpus.iter().position(|&c| c == cpu));
        self.note(there)
    }

    /// Notes one look (the shard whose CPU took the packets); true once, at the second look
    /// in a row that finds another shard, no busier than this one.
    fn note(&self, there: Option<usize>) -> bool {
        let load = |i: usize| self.loads.get(i).map_or(usize::MAX, |l| l.load(Ordering::Relaxed));
        match there {
            Some(there) if there != self.shard && load(there) <= load(self.shard) => {
                let moved = self.strikes.fetch_add(1, Ordering::Relaxed) == 1;
                if moved {
                    self.moved.inc();
                }
                moved
            }
            _ => {
                self.strikes.store(0, Ordering::Relaxed);
                false
            }
        }
    }
}

struct Shard {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    /// Connections this shard serves now, for placing the next one.
    load: Arc<AtomicUsize>,
}

impl Shard {
    fn send(&self, job: Job) {
        self.load.fetch_add(1, Ordering::Relaxed);
        // Counted down however the job ends (done, panicked, or dropped with its runtime).
        let served = Served(self.load.clone());
        let _ = self.jobs.send(Box::pin(async move {
            let _served = served;
            job.await;
        }));
    }
}

struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shards {
    /// `count` shards, each on a thread of its own; with `pin`, each thread on a CPU of its
    /// own when this process may run on exactly `count` CPUs (else a pinned thread could
    /// share its CPU with work the kernel cannot move away from it).
    fn start(count: usize, pin: bool) -> Option<Shards> {
        let allowed = if pin { crate::cpus::allowed() } else { None };
        let cpus = allowed.clone().filter(|all| all.len() == count);
        match (&cpus, &allowed) {
            (Some(cpus), _) => tracing::info!(?cpus, "connection threads pinned, one per CPU"),
            (None, Some(all)) => tracing::info!(
                cpus = all.len(),
                threads = count,
                "connection threads not pinned: regcache may use a share of more CPUs than it runs threads"
            ),
            (None, None) => {}
        }
        let mut shards = Vec::with_capacity(count);
        // Each thread says when it is on its CPU, so that no connection is served before.
        let (placed, on_cpus) = std::sync::mpsc::channel::<()>();
        for i in 0..count {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_all().on_thread_park(crate::logging::batch_this_thread);
            if let (Some(_), Some(all)) = (&cpus, &allowed) {
                // A blocking-pool thread is started by its shard's thread and would inherit
                // its one CPU: hashing and disk work must spread over all of them.
                let all = all.clone();
                builder.on_thread_start(move || {
                    let _ = crate::cpus::run_this_thread_on(&all);
                });
            }
            let pinned = cpus.as_ref().map(|c| c[i]);
            let runtime = match builder.build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a connection runtime; serving on the main one");
                    return None;
                }
            };
            let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
            let placed = placed.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("regcache-conn-{i}"))
                .spawn(move || {
                    if let Some(cpu) = pinned {
                        if let Err(e) = crate::cpus::run_this_thread_on(&[cpu]) {
                            tracing::warn!(error = %e, cpu, "cannot pin a connection thread");
                        }
                    }
                    drop(placed);
                    runtime.block_on(async {
                        while let Some(job) = queue.recv().await {
                            tokio::spawn(job);
                        }
                    });
                    // The server stopped (its drain is over): cut what is left.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a connection thread; serving on the main runtime");
                return None;
            }
            shards.push(Shard {
                jobs,
                load: Arc::new(AtomicUsize::new(0)),
            });
        }
        drop(placed);
        // Ends when every thread has dropped its sender: a wait of a thread start, once,
        // before the first accept.
        let _ = on_cpus.recv();
        Some(Shards { shards, cpus })
    }

    /// The shard pinned to the CPU the connection's packets arrive on (`incoming`, asked
    /// only when shards are pinned), unless it holds more than one connection beyond the
    /// least busy one; else the least busy. The slack of one keeps a single-queue NIC, whose
    /// packets all arrive on one CPU, from loading one shard.
    fn pick(&self, incoming: impl FnOnce() -> Option<usize>) -> Option<usize> {
        let load = |i: usize| self.shards[i].load.load(Ordering::Relaxed);
        let least = (0..self.shards.len()).min_by_key(|&i| load(i))?;
        let near = self.cpus.as_ref().and_then(|cpus| {
            let cpu = incoming()?;
            cpus.iter().position(|&c| c == cpu)
        });
        match near {
            Some(near) if load(near) <= load(least) + 1 => Some(near),
            _ => Some(least),
        }
    }

    /// What a connection on shard `index` needs to notice that its client moved to another
    /// shard's CPU (counted in `moved`); `None` when shards are not pinned.
    fn home(&self, index: usize, moved: &prometheus::IntCounter) -> Option<Home> {
        Some(Home {
            shard: index,
            cpus: self.cpus.clone()?,
            loads: self.shards.iter().map(|s| s.load.clone()).collect(),
            requests: AtomicU64::new(0),
            look: std::sync::atomic::AtomicBool::new(false),
            strikes: std::sync::atomic::AtomicU8::new(0),
            moved: moved.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_least_busy_shard_and_runs_on_its_thread() {
        let shards = Shards::start(2, false).expect("two shards");
        let (names, mut named) = tokio::sync::mpsc::unbounded_channel();
        let mut holds = Vec::new();
        for _ in 0..3 {
            let (hold, held) = tokio::sync::oneshot::channel::<()>();
            holds.push(hold);
            let names = names.clone();
            let shard = shards.pick(|| None).expect("a shard");
            shards.shards[shard].send(Box::pin(async move {
                let _ = names.send(std::thread::current().name().map(str::to_owned));
                let _ = held.await;
            }));
        }
        let mut seen: Vec<_> = (0..3).map(|_| named.blocking_recv().flatten()).collect();
        seen.sort();
        let conn = |i: usize| Some(format!("regcache-conn-{i}"));
        assert_eq!(seen, vec![conn(0), conn(0), conn(1)]);
        let loads: Vec<_> = shards.shards.iter().map(|s| s.load.load(Ordering::Relaxed)).collect();
        assert_eq!(loads, vec![2, 1]);
    }

    /// Holds a connection's place on `shard` until the returned sender is dropped.
    fn occupy(shard: &Shard) -> tokio::sync::oneshot::Sender<()> {
        let (hold, held) = tokio::sync::oneshot::channel::<()>();
        shard.send(Box::pin(async move {
            let _ = held.await;
        }));
        hold
    }

    #[test]
    fn a_connection_goes_to_the_shard_on_its_cpu_unless_that_one_is_busier() {
        let mut shards = Shards::start(2, false).expect("two shards");
        shards.cpus = Some(vec![4, 7]);
        assert_eq!(shards.pick(|| Some(7)), Some(1));
        assert_eq!(shards.pick(|| Some(5)), Some(0), "an unknown CPU: the least busy");
        let _first = occupy(&shards.shards[1]);
        assert_eq!(shards.pick(|| Some(7)), Some(1), "one more than the least busy");
        let _second = occupy(&shards.shards[1]);
        assert_eq!(shards.pick(|| Some(7)), Some(0), "two more: the least busy");
        shards.cpus = None;
        let mut asked = false;
        assert_eq!(
            shards.pick(|| {
                asked = true;
                Some(7)
            }),
            Some(0)
        );
        assert!(!asked, "unpinned shards do not ask the socket");
    }

    #[test]
    fn a_connection_is_moved_at_the_second_look_in_a_row_that_finds_its_client_on_a_no_busier_shard() {
        let mut shards = Shards::start(2, false).expect("two shards");
        let moved = prometheus::IntCounter::new("moved", "moved").expect("a counter");
        assert!(shards.home(0, &moved).is_none(), "unpinned shards move nothing");
        shards.cpus = Some(vec![4, 7]);
        let home = shards.home(0, &moved).expect("pinned");
        let looks = |seen: &[Option<usize>]| seen.iter().map(|&s| home.note(s)).collect::<Vec<_>>();
        assert_eq!(looks(&[Some(0), Some(0), Some(0)]), [false; 3], "where it is");
        assert_eq!(
            looks(&[Some(1), Some(0), Some(1), None]),
            [false; 4],
            "not twice in a row"
        );
        assert_eq!(moved.get(), 0);
        assert_eq!(looks(&[Some(1), Some(1)]), [false, true]);
        assert_eq!(moved.get(), 1);
        let home = shards.home(0, &moved).expect("pinned");
        let _busier = occupy(&shards.shards[1]);
        assert!(!home.note(Some(1)));
        assert!(!home.note(Some(1)), "the client's shard has more connections");
        assert_eq!(moved.get(), 1);
    }

    #[test]
    fn a_pinned_shard_runs_on_one_cpu_and_its_blocking_work_on_all() {
        let all = crate::cpus::allowed().expect("an affinity mask");
        assert!(all.len() > 1, "this test needs 2 CPUs; the machine has {all:?}");
        let shards = Shards::start(all.len(), true).expect("shards");
        assert_eq!(shards.cpus.as_ref(), Some(&all));
        let (seen, mut heard) = tokio::sync::mpsc::unbounded_channel();
        for shard in &shards.shards {
            let seen = seen.clone();
            shard.send(Box::pin(async move {
                let own = crate::cpus::allowed();
                let blocking = tokio::task::spawn_blocking(crate::cpus::allowed).await.ok().flatten();
                let _ = seen.send((own, blocking));
            }));
        }
        let mut own_cpus = Vec::new();
        for _ in &shards.shards {
            let (own, blocking) = heard.blocking_recv().expect("each shard answers");
            let own = own.expect("its mask");
            assert_eq!(own.len(), 1, "a connection thread on one CPU: {own:?}");
            own_cpus.push(own[0]);
            assert_eq!(blocking.as_ref(), Some(&all), "its blocking work may run anywhere");
        }
        own_cpus.sort();
        assert_eq!(own_cpus, all, "one thread per CPU");
    }
}
