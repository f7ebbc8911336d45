//! Request line -> [`Route`]. Repository names contain `/`, so the endpoint is found from the
//! right. Nothing here is validated beyond its shape; names, tags and digests are checked
//! by the handlers before they reach anything else.

use http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`: the repositories this cache holds.
    Catalog,
    Manifest(&'a str),
    Blob(&'a str),
    TagsList,
    Referrers(&'a str),
    /// Push endpoints (`blobs/uploads/`): never supported by a pull-through cache.
    Upload,
}

/// Parts of the request path, borrowed from it: routing allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub name: &'a str,
    pub endpoint: Endpoint<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    MethodNotAllowed,
}

/// Parses a request path (without query); read methods only.
pub fn parse<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, RouteError> {
    let route = parse_path(path).ok_or(RouteError::NotFound)?;
    let read = *method == Method::GET || *method == Method::HEAD;
    if !read || route.endpoint == Endpoint::Upload {
        return Err(RouteError::MethodNotAllowed);
    }
    Ok(route)
}

fn parse_path(path: &str) -> Option<Route<'_>> {
    if path == "/v2/" || path == "/v2" {
        return Some(Route {
            name: "",
            endpoint: Endpoint::Base,
        });
    }
    if path == "/v2/_catalog" {
        return Some(Route {
            name: "",
            endpoint: Endpoint::Catalog,
        });
    }
    let rest = path.strip_prefix("/v2/")?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return named(name, Endpoint::TagsList);
    }
    // From the right, since names contain `/`. `memchr`'s searches take many bytes per
    // instruction (`str`'s char searches took a twentieth of a warm manifest answer).
    let last = memchr::memrchr(b'/', rest.as_bytes())?;
    let (front, reference) = (&rest[..last], &rest[last + 1..]);
    // `/blobs/uploads` anywhere is a push endpoint; it can only start at a `/` of `front`
    // (the reference holds none), so the digest after it is never scanned.
    for at in memchr::memchr_iter(b'/', front.as_bytes()) {
        if rest[at..].starts_with("/blobs/uploads") {
            return named(&rest[..at], Endpoint::Upload);
        }
    }
    let kind_start = memchr::memrchr(b'/', front.as_bytes())?;
    let (name, kind) = (&front[..kind_start], &front[kind_start + 1..]);
    if reference.is_empty() {
        return None;
    }
    match kind {
        "manifests" => named(name, Endpoint::Manifest(reference)),
        "blobs" => named(name, Endpoint::Blob(reference)),
        "referrers" => named(name, Endpoint::Referrers(reference)),
        _ => None,
    }
}

fn named<'a>(name: &'a str, endpoint: Endpoint<'a>) -> Option<Route<'a>> {
    (!name.is_empty()).then_some(Route { name, endpoint })
}

/// The value of one query parameter (first occurrence), percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn get(path: &str) -> Result<Route<'_>, RouteError> {
        parse(&Method::GET, path)
    }

    fn r<'a>(name: &'a str, endpoint: Endpoint<'a>) -> Result<Route<'a>, RouteError> {
        Ok(Route { name, endpoint })
    }

    #[test]
    fn endpoints() {
        assert_eq!(get("/v2/"), r("", Endpoint::Base));
        assert_eq!(
            get("/v2/library/alpine/manifests/3.19"),
            r("library/alpine", Endpoint::Manifest("3.19"))
        );
        assert_eq!(
            get("/v2/docker.io/library/alpine/blobs/sha256:ab"),
            r("docker.io/library/alpine", Endpoint::Blob("sha256:ab"))
        );
        assert_eq!(
            get("/v2/a/manifests/b/manifests/c"),
            r("a/manifests/b", Endpoint::Manifest("c"))
        );
        assert_eq!(get("/v2/org/app/tags/list"), r("org/app", Endpoint::TagsList));
        assert_eq!(
            get("/v2/org/app/referrers/sha256:ab"),
            r("org/app", Endpoint::Referrers("sha256:ab"))
        );
        assert_eq!(get("/v2/org/app/blobs/uploads/"), Err(RouteError::MethodNotAllowed));
        assert_eq!(
            parse(&Method::PUT, "/v2/a/manifests/1"),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(
            parse(&Method::DELETE, "/v2/a/blobs/sha256:x"),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(
            get("/v2/a/manifests/b/blobs/sha256:ab"),
            r("a/manifests/b", Endpoint::Blob("sha256:ab"))
        );
        assert_eq!(get("/v2/a/blobs/uploads"), Err(RouteError::MethodNotAllowed));
        assert_eq!(
            get("/v2/a/blobs/uploads/x/manifests/y"),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(get("/v2/a/manifests/"), Err(RouteError::NotFound));
        assert_eq!(get("/v2/a/manifests/x/"), Err(RouteError::NotFound));
        assert_eq!(get("/v2/a/tags/x"), Err(RouteError::NotFound));
        assert_eq!(get("/v2/manifests/x"), Err(RouteError::NotFound));
        assert_eq!(get("/v2//manifests/x"), Err(RouteError::NotFound));
        assert_eq!(get("/v3/a/manifests/x"), Err(RouteError::NotFound));
        assert_eq!(get("/metrics"), Err(RouteError::NotFound));
    }

    #[test]
    fn query() {
        assert_eq!(
            query_param(Some("ns=docker.io&n=2"), "ns").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            query_param(Some("ns=registry.lab%3A5000"), "ns").as_deref(),
            Some("registry.lab:5000")
        );
        assert_eq!(query_param(Some("n=2"), "ns"), None);
        assert_eq!(query_param(None, "ns"), None);
        assert_eq!(query_param(Some("x=%"), "x").as_deref(), Some("%"));
        assert_eq!(query_param(Some("x=%4"), "x").as_deref(), Some("%4"));
    }

    proptest! {
        #[test]
        fn never_panics(path in "\\PC{0,200}", q in "\\PC{0,50}") {
            let _ = parse(&Method::GET, &path);
            let _ = query_param(Some(&q), "ns");
        }

        #[test]
        fn every_read_path_parses_back(
            name in "[a-z0-9]{1,8}(/[a-z0-9._-]{1,8}){0,4}",
            reference in "[A-Za-z0-9_.:-]{1,80}",
            kind in 0usize..3,
        ) {
            let (word, endpoint) = [
                ("manifests", Endpoint::Manifest(&reference)),
                ("blobs", Endpoint::Blob(&reference)),
                ("referrers", Endpoint::Referrers(&reference)),
            ][kind].clone();
            let path = format!("/v2/{name}/{word}/{reference}");
            prop_assert_eq!(get(&path), r(&name, endpoint));
        }

        #[test]
        fn uploads_are_refused_whatever_follows(
            name in "[a-z0-9]{1,8}(/[a-z0-9._-]{1,8}){0,4}",
            rest in "(/[A-Za-z0-9_.:-]{0,20}){0,3}",
        ) {
            let path = format!("/v2/{name}/blobs/uploads{rest}");
            prop_assert_eq!(get(&path), Err(RouteError::MethodNotAllowed));
        }
    }
}
