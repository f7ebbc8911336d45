//! TLS, both ways. Serving: a rustls server config whose certificate can be swapped while
//! running (SIGHUP, or the files changing), so renewing a certificate drops no connection.
//! Upstreams: the client config per upstream, with an extra CA file or, if asked for,
//! no verification at all.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The crypto provider of every TLS config regcache builds.
// rustls 0.23.48 deprecates its ring provider for lacking post-quantum key exchange. ring
// stays: it is the one crypto library of the whole binary (TLS both ways, the S3 client's
// signing, signature checks), and aws-lc-rs would add a C library build to every build.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
#[error("TLS {what} {path}: {message}")]
pub struct Error {
    what: &'static str,
    path: PathBuf,
    message: String,
}

fn load_key(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let err = |what, path: &Path, message: String| Error {
        what,
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err("certificate", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("certificate", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(err("certificate", cert, "no certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| err("key", key, e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| err("key", key, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| err("key", key, format!("does not match the certificate: {e}")))?;
    Ok(certified)
}

/// The serving certificate, swappable at run time.
#[derive(Debug)]
pub struct Reloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

impl ResolvesServerCert for Reloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }
}

fn modified(paths: [&Path; 2]) -> Option<SystemTime> {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

impl Reloader {
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Reloader>, Error> {
        let loaded = load_key(cert, key)?;
        Ok(Arc::new(Reloader {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new((Arc::new(loaded), modified([cert, key]))),
        }))
    }

    /// Re-reads the files; a bad new pair keeps the old one in service.
    pub fn reload(&self) -> Result<(), Error> {
        let loaded = load_key(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            (Arc::new(loaded), modified([&self.cert, &self.key]));
        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads if the files changed since the last load.
    pub fn reload_if_changed(&self) {
        let now = modified([&self.cert, &self.key]);
        let last = self.current.read().unwrap_or_else(|p| p.into_inner()).1;
        if now != last {
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "TLS files changed but cannot be loaded; keeping the old certificate");
            }
        }
    }

    /// The server config: this certificate, h2 and HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("ring supports the default TLS versions: {e}"))
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// The TLS client config for one upstream: the shared roots, plus `ca_file`'s certificates,
/// or no verification at all with `insecure_skip_verify`.
pub fn upstream_client_config(
    roots: &rustls::RootCertStore,
    ca_file: Option<&Path>,
    insecure_skip_verify: bool,
    upstream: &str,
) -> Result<rustls::ClientConfig, Error> {
    let mut roots = roots.clone();
    if let Some(ca) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| Error {
                what: "ca_file",
                path: ca.to_owned(),
                message: e.to_string(),
            })?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Error {
                what: "ca_file",
                path: ca.to_owned(),
                message: "no usable certificate in the file".into(),
            });
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("ring supports the default TLS versions: {e}"));
    if insecure_skip_verify {
        tracing::warn!(
            upstream,
            "insecure_skip_verify: this upstream's TLS certificate is NOT verified; anyone on the path can impersonate it"
        );
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth());
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The roots every upstream trusts: webpki's plus the system's.
pub fn default_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(native_roots = added, "TLS roots loaded");
    roots
}

/// Accepts any certificate (signatures are still checked, so the handshake is sound).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
