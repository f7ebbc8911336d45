//! Where an upstream may send regcache: redirect targets and token realms come from the
//! upstream's answers, so a hostile or compromised upstream must not be able to aim
//! regcache (which streams nearly all of a body to its client before the digest check) at
//! the cloud metadata endpoint, the admin port or anything else on an internal network.
//!
//! A target is refused when it downgrades https to http, or when any address it resolves
//! to is internal (loopback, link-local, private, shared, ULA, unspecified, multicast) —
//! unless the upstream itself is at that very address, or the host or address is in the
//! upstream's `redirect_allow` list. "Same registrable domain" is decided with the public
//! suffix list.
//!
//! The same rule is applied again when a connection is made ([`GuardedResolver`], the
//! resolver of each upstream's HTTP client), so a name that resolved to a public address
//! at the check and to an internal one at the connection (DNS rebinding) is still refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::Uri;

/// One `redirect_allow` entry: a host name, an address, or a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Host(String),
    Net(IpAddr, u8),
}

impl Allowed {
    pub fn parse(s: &str) -> Option<Allowed> {
        let s = s.trim().to_ascii_lowercase();
        if let Some((addr, bits)) = s.split_once('/') {
            let addr: IpAddr = addr.parse().ok()?;
            let bits: u8 = bits.parse().ok()?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            return (bits <= max).then_some(Allowed::Net(addr, bits));
        }
        if let Ok(addr) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            let bits = if addr.is_ipv4() { 32 } else { 128 };
            return Some(Allowed::Net(addr, bits));
        }
        (!s.is_empty() && crate::config::is_registry_host(&s)).then_some(Allowed::Host(s))
    }

    pub fn covers_addr(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Allowed::Net(IpAddr::V4(net), bits), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*bits)).unwrap_or(0);
                u32::from(*net) & mask == u32::from(ip) & mask
            }
            (Allowed::Net(IpAddr::V6(net), bits), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*bits)).unwrap_or(0);
                u128::from(*net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Whether an address is one no upstream may send regcache to on its own say.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local (ULA)
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated, still routed inside)
                || v6 == Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0xa9fe, 0xa9fe)
            // NAT64 metadata
        }
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local() // 169.254/16: the cloud metadata endpoint
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 shared address space
        || o[0] == 0
}

/// The registrable domain of a host by the public suffix list: `auth.docker.io` and
/// `registry-1.docker.io` share `docker.io`; `registry.example.co.uk` is under
/// `example.co.uk`, which `evil.co.uk` is not. IP addresses, single-label hosts and hosts
/// that are themselves a public suffix stand for themselves.
pub fn registrable_domain(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return host;
    }
    match psl::domain_str(&host) {
        Some(domain) => domain.to_owned(),
        None => host,
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} would downgrade https to http")]
    Downgrade(String),
    #[error("{host} resolves to the internal address {ip}, where the upstream is not (add it to redirect_allow if it is meant)")]
    Internal { host: String, ip: IpAddr },
    #[error("cannot resolve {host}: {message}")]
    Unresolvable { host: String, message: String },
    #[error("{0} has no host")]
    NoHost(String),
}

/// The rules of one upstream.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    base: Uri,
    allow: Vec<Allowed>,
}

fn host_of(uri: &Uri) -> Option<String> {
    uri.host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
}

fn port_of(uri: &Uri) -> u16 {
    uri.port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 })
}

async fn resolve(host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let found = tokio::net::lookup_host((host, port)).await.map_err(|e| e.to_string())?;
    Ok(found.map(|a| a.ip()).collect())
}

impl Egress {
    pub fn new(base: Uri, allow: Vec<Allowed>) -> Egress {
        Egress { base, allow }
    }

    /// Checks a target the upstream named (a redirect `Location` reached from `from`, or a
    /// token realm).
    pub async fn check(&self, from: &Uri, target: &Uri) -> Result<(), Refused> {
        let shown = || {
            format!(
                "{}://{}",
                target.scheme_str().unwrap_or(""),
                target.authority().map_or("", |a| a.as_str())
            )
        };
        let https = |u: &Uri| u.scheme_str() == Some("https");
        if (https(from) || https(&self.base)) && !https(target) {
            return Err(Refused::Downgrade(shown()));
        }
        let host = host_of(target).ok_or_else(|| Refused::NoHost(shown()))?;
        if self.allow.iter().any(|a| a == &Allowed::Host(host.clone())) {
            return Ok(());
        }
        let addrs = resolve(&host, port_of(target))
            .await
            .map_err(|message| Refused::Unresolvable {
                host: host.clone(),
                message,
            })?;
        let internal: Vec<IpAddr> = addrs.into_iter().filter(|ip| is_internal(*ip)).collect();
        if internal.is_empty() {
            return Ok(());
        }
        // The upstream's own addresses are where it already is: nothing new is reached.
        let own = match host_of(&self.base) {
            Some(h) => resolve(&h, port_of(&self.base)).await.unwrap_or_default(),
            None => Vec::new(),
        };
        for ip in internal {
            if !own.contains(&ip) && !self.allow.iter().any(|a| a.covers_addr(ip)) {
                return Err(Refused::Internal { host, ip });
            }
        }
        Ok(())
    }
}

impl Egress {
    /// Of the addresses `host` resolved to, those this upstream may connect to: all of them
    /// for the upstream's own host or an allowed host; else the public ones, the upstream's
    /// own addresses and allowed ones.
    async fn permitted(&self, host: &str, addrs: Vec<std::net::SocketAddr>) -> Vec<std::net::SocketAddr> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host_of(&self.base).as_deref() == Some(host.as_str())
            || self.allow.iter().any(|a| a == &Allowed::Host(host.clone()))
        {
            return addrs;
        }
        if addrs.iter().all(|a| !is_internal(a.ip())) {
            return addrs;
        }
        let own = match host_of(&self.base) {
            Some(h) => resolve(&h, port_of(&self.base)).await.unwrap_or_default(),
            None => Vec::new(),
        };
        addrs
            .into_iter()
            .filter(|a| {
                let ip = a.ip();
                !is_internal(ip) || own.contains(&ip) || self.allow.iter().any(|n| n.covers_addr(ip))
            })
            .collect()
    }
}

/// The DNS resolver of an upstream's HTTP client: resolves like the system does, then
/// keeps only the addresses [`Egress`] permits (IP literals never reach a resolver; they are
/// checked before the request).
#[derive(Clone, Default)]
pub struct GuardedResolver {
    egress: std::sync::Arc<Egress>,
}

impl GuardedResolver {
    pub fn new(egress: Egress) -> GuardedResolver {
        GuardedResolver {
            egress: std::sync::Arc::new(egress),
        }
    }
}

type Resolving = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::io::Result<std::vec::IntoIter<std::net::SocketAddr>>> + Send>,
>;

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for GuardedResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Resolving {
        let egress = self.egress.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted = egress.permitted(&host, found).await;
            if permitted.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to internal addresses this upstream may not use"),
                ));
            }
            Ok(permitted.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_domains_follow_the_public_suffix_list() {
        assert_eq!(registrable_domain("auth.docker.io"), "docker.io");
        assert_eq!(registrable_domain("registry-1.docker.io"), "docker.io");
        assert_eq!(registrable_domain("ghcr.io"), "ghcr.io");
        assert_eq!(registrable_domain("registry.example.co.uk"), "example.co.uk");
        assert_eq!(registrable_domain("evil.co.uk"), "evil.co.uk");
        assert_ne!(
            registrable_domain("evil.co.uk"),
            registrable_domain("registry.example.co.uk")
        );
        assert_eq!(registrable_domain("co.uk"), "co.uk");
        assert_eq!(registrable_domain("127.0.0.1"), "127.0.0.1");
        assert_eq!(registrable_domain("localhost"), "localhost");
        // Separate tenants of a shared hosting suffix are separate domains.
        assert_ne!(registrable_domain("a.github.io"), registrable_domain("b.github.io"));
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "127.0.0.2",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "172.32.0.1", "100.128.0.1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allow_entries() {
        let net = Allowed::parse("10.0.0.0/8").unwrap();
        assert!(net.covers_addr("10.200.1.1".parse().unwrap()));
        assert!(!net.covers_addr("11.0.0.1".parse().unwrap()));
        assert!(Allowed::parse("127.0.0.2")
            .unwrap()
            .covers_addr("127.0.0.2".parse().unwrap()));
        assert_eq!(
            Allowed::parse("minio.internal"),
            Some(Allowed::Host("minio.internal".into()))
        );
        assert_eq!(Allowed::parse("10.0.0.0/99"), None);
        assert_eq!(Allowed::parse("a b"), None);
        assert!(Allowed::parse("fd00::/8")
            .unwrap()
            .covers_addr("fd12::1".parse().unwrap()));
    }

    proptest::proptest! {
        #[test]
        fn allow_entries_and_domains_never_panic(s in "\\PC{0,80}", ip in proptest::prelude::any::<u128>()) {
            let _ = Allowed::parse(&s);
            let _ = registrable_domain(&s);
            let _ = is_internal(IpAddr::V6(Ipv6Addr::from(ip)));
            let _ = is_internal(IpAddr::V4(Ipv4Addr::from(ip as u32)));
        }
    }

    #[tokio::test]
    async fn targets() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let up = Egress::new(uri("http://127.0.0.1:5000"), vec![Allowed::parse("127.0.0.3").unwrap()]);
        let from = uri("http://127.0.0.1:5000/v2/x/blobs/y");
        // The upstream's own address, any port: allowed.
        assert_eq!(up.check(&from, &uri("http://127.0.0.1:9999/cdn")).await, Ok(()));
        assert!(matches!(
            up.check(&from, &uri("http://127.0.0.2:9999/cdn")).await,
            Err(Refused::Internal { .. })
        ));
        assert!(matches!(
            up.check(&from, &uri("http://169.254.169.254/latest/meta-data/")).await,
            Err(Refused::Internal { .. })
        ));
        assert_eq!(up.check(&from, &uri("http://127.0.0.3:1/")).await, Ok(()));
        assert_eq!(up.check(&from, &uri("http://8.8.8.8/")).await, Ok(()));
        let tls = Egress::new(uri("https://registry.example.com"), vec![]);
        let from = uri("https://registry.example.com/v2/");
        assert!(matches!(
            tls.check(&from, &uri("http://8.8.8.8/")).await,
            Err(Refused::Downgrade(_))
        ));
        assert_eq!(tls.check(&from, &uri("https://8.8.8.8/")).await, Ok(()));
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_permitted_addresses() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let sock = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let up = Egress::new(
            uri("http://127.0.0.1:5000"),
            vec![Allowed::parse("10.9.0.0/16").unwrap()],
        );
        // A name that answers with the metadata endpoint and a public address: only the latter.
        let got = up
            .permitted("cdn.example", vec![sock("169.254.169.254:0"), sock("8.8.8.8:0")])
            .await;
        assert_eq!(got, vec![sock("8.8.8.8:0")]);
        // The upstream's own address and allowed blocks are kept.
        let got = up
            .permitted(
                "x.example",
                vec![sock("127.0.0.1:0"), sock("10.9.1.1:0"), sock("10.8.1.1:0")],
            )
            .await;
        assert_eq!(got, vec![sock("127.0.0.1:0"), sock("10.9.1.1:0")]);
        // The upstream's own host name may be anywhere (a private registry on the LAN).
        let lan = Egress::new(uri("https://registry.lan:5000"), vec![]);
        assert_eq!(
            lan.permitted("registry.lan", vec![sock("10.0.0.5:0")]).await,
            vec![sock("10.0.0.5:0")]
        );
    }
}
