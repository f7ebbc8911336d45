//! The accept loop: plain HTTP (HTTP/1.1 and h2c) or TLS (h2 and HTTP/1.1 by ALPN) on one
//! port, with the connection limit, the request-head limits against slow or huge clients,
//! and the graceful drain on shutdown (in-flight responses and fills, within the grace).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::http::handlers::handle;
use crate::App;

/// How often the TLS files are checked for a renewed certificate.
const TLS_CHECK_INTERVAL: Duration = Duration::from_secs(10);

fn builder(app: &App) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head = app.limits.max_header_bytes.0.min(usize::MAX as u64) as usize;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.limits.header_read_timeout.0)
        .max_buf_size(head.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(60)));
    builder
}

/// Serves until `shutdown` resolves; then stops accepting, lets in-flight responses and
/// upstream fills finish within the shutdown grace, and removes what fills left behind.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let builder = Arc::new(builder(&app));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(app.limits.max_connections));
    let acceptor = app
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config()));
    let mut tls_check = tokio::time::interval(TLS_CHECK_INTERVAL);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(shutdown);
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, app, &builder, acceptor, watcher).await;
        });
    }
    drop(listener);
    let deadline = Instant::now() + app.shutdown_grace;
    if tokio::time::timeout(app.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: responses still in flight after {:?}", app.shutdown_grace);
    }
    // Fills are detached from clients: give them the rest of the grace too.
    while app.proxy.fills_in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if app.proxy.fills_in_flight() > 0 {
        tracing::warn!(fills = app.proxy.fills_in_flight(), "shutdown: fills cut short");
    }
    app.proxy.cache.store.clear_tmp();
}

async fn serve_connection(
    stream: TcpStream,
    app: Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let handler = app.clone();
    let service = hyper::service::service_fn(move |req| handle(handler.clone(), req));
    let result = match acceptor {
        None => {
            // hyper's header timeout starts with the first byte; a client that connects and
            // sends nothing must not hold a connection slot forever either.
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(app.limits.header_read_timeout.0, stream.peek(&mut first)).await,
                Ok(Ok(1))
            ) {
                return;
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(conn.into_owned()).await
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(app.limits.header_read_timeout.0, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            watcher.watch(conn.into_owned()).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
