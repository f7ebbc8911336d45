//! The HTTP side of client access control: the 401 challenge clients expect, and the token
//! endpoint (`GET /token`) of the registry token flow. Decisions are `access.rs`'s.

use http::header::{AUTHORIZATION, HOST, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};

use super::body::Body;
use super::error::ApiError;
use crate::access::{Decision, Identity};
use crate::App;

/// `WWW-Authenticate: Bearer realm="<this server>/token",service="regcache"[,scope=…]`.
fn challenge<B>(app: &App, req: &Request<B>, scope: Option<&str>) -> HeaderValue {
    // `X-Forwarded-*` only from a configured reverse proxy: anyone else could aim the
    // client's credentials at a realm of their choosing.
    let trusted =
        crate::server::Peer::of(req).is_some_and(|p| app.trusted_proxies.iter().any(|t| t.covers_addr(p.addr.ip())));
    let forwarded = |name: &str| {
        trusted
            .then(|| req.headers().get(name).and_then(|v| v.to_str().ok()))
            .flatten()
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let host = forwarded("x-forwarded-host")
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("localhost")
        .replace(['"', '\\'], "");
    let scheme = match forwarded("x-forwarded-proto") {
        Some("https") => "https",
        Some("http") => "http",
        _ if app.tls.is_some() => "https",
        _ => "http",
    };
    // Behind a TLS-terminating load balancer only the configured public URL is right.
    let base = match &app.public_url {
        Some(url) => url.replace(['"', '\\'], ""),
        None => format!("{scheme}://{host}"),
    };
    let mut value = format!("Bearer realm=\"{base}/token\",service=\"regcache\"");
    if let Some(scope) = scope {
        value.push_str(&format!(",scope=\"{}\"", scope.replace(['"', '\\'], "")));
    }
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Basic realm=\"regcache\""))
}

async fn identify<B>(app: &App, req: &Request<B>) -> Identity {
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let who = app.access.identify(header).await;
    if who == Identity::Invalid {
        app.proxy.metrics.auth_failures.inc();
    }
    who
}

/// Who is asking (anonymous when access is not enforced).
pub async fn identity<B>(app: &App, req: &Request<B>) -> Identity {
    if !app.access.enforced() {
        return Identity::Anonymous;
    }
    identify(app, req).await
}

/// Whether `who` may pull `upstream/repo` (always, when access is not enforced).
pub fn may_pull(app: &App, who: &Identity, upstream: &str, repo: &str) -> bool {
    !app.access.enforced() || app.access.authorize(who, Some((upstream, repo))) == Decision::Allow
}

/// Lets the request through, or answers 401 (with a challenge) or 403.
/// `target` is `(upstream, repository)`, or `None` for `/v2/` itself.
pub async fn check<B>(app: &App, req: &Request<B>, target: Option<(&str, &str)>) -> Result<(), ApiError> {
    if !app.access.enforced() || req.extensions().get::<crate::server::Internal>().is_some() {
        return Ok(());
    }
    let who = Box::pin(identify(app, req)).await;
    match app.access.authorize(&who, target) {
        Decision::Allow => Ok(()),
        Decision::Deny => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "DENIED",
            "requested access to the resource is denied",
        )),
        Decision::Challenge => {
            let scope = target.map(|(_, repo)| format!("repository:{repo}:pull"));
            Err(ApiError {
                www_authenticate: Some(challenge(app, req, scope.as_deref())),
                ..ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required")
            })
        }
    }
}

/// `GET /token`: a short-lived bearer token for valid Basic credentials (or for anonymous
/// clients where anonymous pulls are allowed).
pub async fn token_endpoint<B>(app: &App, req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET {
        // containerd tries an OAuth2 POST first and falls back to GET on 405.
        return ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "use GET").into_response();
    }
    let user = match identify(app, req).await {
        Identity::User(name) => name,
        Identity::Anonymous if app.access.authorize(&Identity::Anonymous, None) == Decision::Allow => String::new(),
        _ => {
            let mut resp =
                ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "valid credentials required").into_response();
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"regcache\""));
            return resp;
        }
    };
    let (token, expires_in) = app.access.issue_token(&user);
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": expires_in});
    let mut resp = Response::new(Body::full(body.to_string()));
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
