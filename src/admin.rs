//! The admin listener: `/` (the status page), `/metrics` (Prometheus text), `/healthz`
//! (the process answers) and `/readyz` (the cache is open, its disk takes data and lost no
//! blob's commit lately, and a shared bucket answers), on a port of its own. It starts
//! before the cache index is rebuilt, so liveness never waits for it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::http::body::Body;
use crate::proxy::Proxy;

/// The proxy, once the cache is open (its index may still be rebuilt in the background).
pub type Loaded = Arc<OnceLock<Arc<Proxy>>>;

const PLAIN: &str = "text/plain; charset=utf-8";

fn text(status: StatusCode, body: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// What the readiness probe writes: enough that a full disk says so (an empty file still
/// fits on one), small enough to cost nothing.
const PROBE_BYTES: usize = 64 * 1024;

/// How long a blob's failed commit keeps the instance unready: long enough for the
/// orchestrator to send clients elsewhere (Kubernetes needs three failed probes, 30 s by
/// default), short enough that a disk that was freed or extended takes traffic again soon.
const UNREADY_AFTER_FAILED_COMMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether the cache can take new content: no blob failed its commit lately, and data can
/// be written and made durable in its tmp dir. Runs on the blocking pool (it fsyncs).
async fn writable(proxy: &Proxy) -> Result<(), String> {
    if let Some(ago) = proxy.cache.store.failed_commit_within(UNREADY_AFTER_FAILED_COMMIT) {
        return Err(format!(
            "the cache disk could not make a verified blob durable {}s ago (a thin volume out of space, or a failing disk); blobs are relayed uncached",
            ago.as_secs()
        ));
    }
    let store = proxy.cache.store.clone();
    let probe = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let (path, mut file) = store.temp_file()?;
        let written = file.write_all(&[0u8; PROBE_BYTES]).and_then(|()| file.sync_all());
        drop(file);
        let removed = std::fs::remove_file(&path);
        written.and(removed)
    });
    match probe.await {
        Ok(result) => result.map_err(|e| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    }
    match &proxy.bucket {
        Some(bucket) => bucket
            .check()
            .await
            .map_err(|e| format!("shared bucket {}: {e}", bucket.name)),
        None => Ok(()),
    }
}

pub async fn handle<B>(loaded: Loaded, req: Request<B>) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n", PLAIN));
    }
    Ok(match (req.uri().path(), loaded.get()) {
        ("/healthz", _) => text(StatusCode::OK, "ok\n", PLAIN),
        ("/", Some(proxy)) => {
            let proxy = proxy.clone();
            match tokio::task::spawn_blocking(move || crate::status::render(&proxy)).await {
                Ok(page) => text(StatusCode::OK, page, "text/html; charset=utf-8"),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("status page failed: {e}\n"),
                    PLAIN,
                ),
            }
        }
        ("/" | "/metrics" | "/readyz", None) => text(StatusCode::SERVICE_UNAVAILABLE, "opening the cache\n", PLAIN),
        ("/metrics", Some(proxy)) => {
            proxy.refresh_metrics();
            text(
                StatusCode::OK,
                proxy.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        ("/readyz", Some(proxy)) => match writable(proxy).await {
            Ok(()) => text(StatusCode::OK, "ready\n", PLAIN),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cache not writable: {e}\n"),
                PLAIN,
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    })
}

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve(listener: TcpListener, loaded: Loaded, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let loaded = loaded.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(loaded.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
