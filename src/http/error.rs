//! The one mapping from domain errors to an HTTP status and an OCI error code, and the OCI
//! error JSON every failure is answered with.

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use super::body::Body;
use crate::cache::fill::FillError;
use crate::proxy::Error;
use crate::upstream::{self, RouteError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<String>,
    pub www_authenticate: Option<HeaderValue>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            www_authenticate: None,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]}).to_string();
        let len = body.len();
        let mut resp = Response::new(Body::full(body));
        resp.headers_mut().insert(header::CONTENT_LENGTH, len.into());
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(v) = self.retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(header::RETRY_AFTER, v);
        }
        if let Some(v) = self.www_authenticate {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        use StatusCode as S;
        let message = e.to_string();
        match e {
            Error::Route(RouteError::UnknownUpstream(_)) => ApiError::new(S::NOT_FOUND, "NAME_UNKNOWN", message),
            Error::Route(RouteError::NoDefault) => ApiError::new(S::NOT_FOUND, "NAME_UNKNOWN", message),
            Error::Route(RouteError::NameInvalid(_)) => ApiError::new(S::BAD_REQUEST, "NAME_INVALID", message),
            Error::ManifestUnknown(_) => ApiError::new(S::NOT_FOUND, "MANIFEST_UNKNOWN", message),
            Error::BlobUnknown(_) => ApiError::new(S::NOT_FOUND, "BLOB_UNKNOWN", message),
            Error::NameUnknown(_) => ApiError::new(S::NOT_FOUND, "NAME_UNKNOWN", message),
            Error::Upstream(u) => upstream_error(u),
            Error::BadContent { .. } => ApiError::new(S::BAD_GATEWAY, "UNAVAILABLE", message),
            Error::Fill(f) => match &*f {
                FillError::Source(u) => upstream_error(u.clone()),
                FillError::Io(_) => {
                    tracing::error!(error = %message, "cache storage failure");
                    ApiError::new(S::INTERNAL_SERVER_ERROR, "UNKNOWN", "cache storage failure")
                }
                _ => ApiError::new(S::BAD_GATEWAY, "UNAVAILABLE", message),
            },
            Error::Io(_) => {
                tracing::error!(error = %message, "cache storage failure");
                ApiError::new(S::INTERNAL_SERVER_ERROR, "UNKNOWN", "cache storage failure")
            }
            Error::Denied(_) => ApiError::new(S::FORBIDDEN, "DENIED", message),
            Error::Overloaded(_) => ApiError {
                retry_after: Some("1".into()),
                ..ApiError::new(S::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
            },
        }
    }
}

fn upstream_error(e: upstream::Error) -> ApiError {
    use StatusCode as S;
    let message = e.to_string();
    match e {
        upstream::Error::Status {
            status, retry_after, ..
        } => {
            let (status, code) = match status.as_u16() {
                401 => (S::UNAUTHORIZED, "UNAUTHORIZED"),
                403 => (S::FORBIDDEN, "DENIED"),
                404 => (S::NOT_FOUND, "NAME_UNKNOWN"),
                429 => (S::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
                _ => (S::BAD_GATEWAY, "UNAVAILABLE"),
            };
            ApiError {
                // A 401 must carry a challenge; this one says the upstream refused regcache's
                // own credentials, which the client cannot fix by sending its own.
                www_authenticate: (status == S::UNAUTHORIZED)
                    .then(|| HeaderValue::from_static("Basic realm=\"regcache (upstream refused its credentials)\"")),
                retry_after: if status == S::TOO_MANY_REQUESTS {
                    Some(retry_after.unwrap_or_else(|| "60".into()))
                } else {
                    None
                },
                ..ApiError::new(status, code, message)
            }
        }
        upstream::Error::Timeout { .. } => ApiError::new(S::GATEWAY_TIMEOUT, "UNAVAILABLE", message),
        upstream::Error::Down { .. } | upstream::Error::Offline { .. } => {
            ApiError::new(S::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
        }
        upstream::Error::Overloaded { .. } => ApiError {
            retry_after: Some("1".into()),
            ..ApiError::new(S::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
        },
        upstream::Error::Unreachable { .. } | upstream::Error::Protocol { .. } | upstream::Error::Refused { .. } => {
            ApiError::new(S::BAD_GATEWAY, "UNAVAILABLE", message)
        }
    }
}
