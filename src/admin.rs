//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (the cache directory is writable), on a port of its own.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::http::body::Body;
use crate::proxy::Proxy;

fn text(status: StatusCode, body: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Whether the cache can take new content: a file can be created and removed in its tmp dir.
fn ready(proxy: &Proxy) -> Result<(), String> {
    let (path, file) = proxy.cache.store.temp_file().map_err(|e| e.to_string())?;
    drop(file);
    std::fs::remove_file(path).map_err(|e| e.to_string())
}

pub async fn handle<B>(proxy: Arc<Proxy>, req: Request<B>) -> Result<Response<Body>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n", PLAIN));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            proxy.refresh_metrics();
            text(
                StatusCode::OK,
                proxy.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" => match ready(&proxy) {
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
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(proxy.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
