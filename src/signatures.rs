//! Who published a digest: verification of one image signature against the trust a policy
//! names, offline. Two formats, as real signers publish them:
//! - cosign's legacy tag scheme: a `.sig` manifest whose layer is a "simple signing"
//!   payload naming the image's manifest digest, signed in the layer's
//!   `dev.cosignproject.cosign/signature` annotation, by a key or by a Fulcio certificate
//!   (`dev.sigstore.cosign/certificate`) with the Rekor promise in `dev.sigstore.cosign/bundle`;
//! - Sigstore bundles (cosign v3's referrers): checked by `sigstore-verify` (certificate
//!   chain at the signing time, identity, Rekor inclusion proof and checkpoint or promise,
//!   RFC 3161 timestamps) against a configured `trusted_root.json`, never online.
//!
//! All cryptography goes through ring, the provider TLS already uses ([`RingProvider`]).

use std::sync::Arc;

use base64::Engine as _;
use sigstore_verify::crypto::{CryptoProvider, HashContext, SigningScheme, VerificationKey};
use sigstore_verify::trust_root::TrustedRoot;
use sigstore_verify::types::{Bundle, DerPublicKey, HashAlgorithm, Sha256Hash, SignatureBytes};
use sigstore_verify::{PublicKeyVerificationPolicy, VerificationPolicy, Verifier};

use crate::digest::Digest;

/// The annotation keys of a legacy cosign signature layer.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
const REKOR_ANNOTATION: &str = "dev.sigstore.cosign/bundle";

/// Why a signature does not vouch for a digest. [`Refusal::reason`] is the short label
/// metrics and logs carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no signature")]
    NoSignature,
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("wrong identity: {0}")]
    WrongIdentity(String),
    #[error("digest mismatch: the signature is for {signed}, not {asked}")]
    DigestMismatch { signed: String, asked: String },
    #[error("not trusted: {0}")]
    Untrusted(String),
    #[error("malformed signature: {0}")]
    Malformed(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoSignature => "no_signature",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::WrongIdentity(_) => "wrong_identity",
            Refusal::DigestMismatch { .. } => "digest_mismatch",
            Refusal::Untrusted(_) => "untrusted",
            Refusal::Malformed(_) => "malformed",
        }
    }

    /// Which of two refusals says more about an image (the one a denial reports).
    pub fn weight(&self) -> u8 {
        match self {
            Refusal::NoSignature => 0,
            Refusal::Malformed(_) => 1,
            Refusal::Untrusted(_) => 2,
            Refusal::BadSignature(_) => 3,
            Refusal::WrongIdentity(_) => 4,
            Refusal::DigestMismatch { .. } => 5,
        }
    }
}

fn from_sigstore(e: sigstore_verify::Error, asked: &str) -> Refusal {
    use sigstore_verify::Error as E;
    match e {
        // The log entry's record of the artifact differs from the bundle's: the entry does
        // not vouch for this signature.
        E::ArtifactMismatch(ref m) if m.contains("entry") => Refusal::Untrusted(e.to_string()),
        E::IdentityMismatch { .. } | E::IssuerMismatch { .. } => Refusal::WrongIdentity(e.to_string()),
        E::SignatureInvalid(_) | E::Crypto(_) => Refusal::BadSignature(e.to_string()),
        E::ArtifactMismatch(_) => Refusal::DigestMismatch {
            signed: "another artifact".into(),
            asked: asked.to_owned(),
        },
        E::Certificate(_) | E::TransparencyLog(_) | E::Timestamp(_) | E::TrustRoot(_) | E::TrustedCertificate(_) => {
            Refusal::Untrusted(e.to_string())
        }
        _ => Refusal::Malformed(e.to_string()),
    }
}

/// A cosign public key (`cosign.pub`: ECDSA P-256 or P-384, Ed25519 or RSA, as PEM).
#[derive(Debug, Clone)]
pub struct PublicKey {
    /// What logs and denials call it (its file name).
    pub name: String,
    der: DerPublicKey,
}

impl PublicKey {
    pub fn from_pem(name: &str, pem: &str) -> Result<PublicKey, String> {
        install_provider();
        let der = DerPublicKey::from_pem(pem).map_err(|e| format!("not a PEM public key: {e}"))?;
        VerificationKey::from_spki(&der).map_err(|e| format!("unsupported public key: {e}"))?;
        Ok(PublicKey {
            name: name.to_owned(),
            der,
        })
    }
}

/// A keyless signer the policy accepts: the Fulcio certificate's OIDC issuer and subject.
#[derive(Debug, Clone)]
pub struct Identity {
    pub issuer: String,
    pub subject: Subject,
}

#[derive(Debug, Clone)]
pub enum Subject {
    Exact(String),
    Regex(regex_lite::Regex),
}

impl Subject {
    fn matches(&self, value: &str) -> bool {
        match self {
            Subject::Exact(s) => s == value,
            Subject::Regex(r) => r.is_match(value),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.subject {
            Subject::Exact(s) => write!(f, "{s} from {}", self.issuer),
            Subject::Regex(r) => write!(f, "/{}/ from {}", r.as_str(), self.issuer),
        }
    }
}

/// What one policy trusts: keys, keyless identities, and the Sigstore root that anchors
/// certificates and transparency logs.
pub struct Trust {
    pub keys: Vec<PublicKey>,
    pub identities: Vec<Identity>,
    verifier: Verifier,
    /// Whether a real trusted root was configured (without one, key signatures are checked
    /// without their transparency-log entries, and keyless ones cannot be).
    rooted: bool,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("keys", &self.keys)
            .field("identities", &self.identities)
            .field("rooted", &self.rooted)
            .finish()
    }
}

/// A trusted root with nothing in it: key signatures need no authority.
const EMPTY_ROOT: &str = r#"{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1","tlogs":[],"certificateAuthorities":[],"ctlogs":[],"timestampAuthorities":[]}"#;

impl Trust {
    /// `trusted_root` is the JSON of a `trusted_root.json`.
    pub fn new(keys: Vec<PublicKey>, identities: Vec<Identity>, trusted_root: Option<&str>) -> Result<Trust, String> {
        install_provider();
        if !identities.is_empty() && trusted_root.is_none() {
            return Err("keyless identities need a trusted_root".into());
        }
        let root = TrustedRoot::from_json(trusted_root.unwrap_or(EMPTY_ROOT))
            .map_err(|e| format!("not a Sigstore trusted root: {e}"))?;
        let verifier = Verifier::new(&root).map_err(|e| format!("unusable trusted root: {e}"))?;
        Ok(Trust {
            keys,
            identities,
            verifier,
            rooted: trusted_root.is_some(),
        })
    }

    /// Checks one signature of `digest`. The answer names the signer that passed.
    pub fn verify(&self, signature: &Signature<'_>, digest: &Digest) -> Result<String, Refusal> {
        match signature {
            Signature::SimpleSigning { payload, annotations } => self.simple_signing(payload, annotations, digest),
            Signature::Bundle(json) => {
                let text = std::str::from_utf8(json).map_err(|_| Refusal::Malformed("bundle is not UTF-8".into()))?;
                let bundle = Bundle::from_json(text).map_err(|e| Refusal::Malformed(format!("bundle: {e}")))?;
                let sha = Sha256Hash::from_hex(digest.hex()).map_err(|e| Refusal::Malformed(e.to_string()))?;
                self.bundle(
                    &bundle,
                    sigstore_verify::types::Artifact::from_digest(sha),
                    &digest.to_string(),
                )
            }
        }
    }

    /// A bundle over `artifact`, by any trusted key or identity.
    /// `asked` names the artifact in a refusal.
    fn bundle(
        &self,
        bundle: &Bundle,
        artifact: sigstore_verify::types::Artifact<'_>,
        asked: &str,
    ) -> Result<String, Refusal> {
        use sigstore_verify::types::bundle::VerificationMaterialContent;
        let keyed = matches!(
            bundle.verification_material.content,
            VerificationMaterialContent::PublicKey { .. }
        );
        let mut best: Option<Refusal> = None;
        let mut keep = |r: Refusal| {
            if best.as_ref().is_none_or(|b| r.weight() > b.weight()) {
                best = Some(r);
            }
        };
        if keyed {
            if self.keys.is_empty() {
                return Err(Refusal::Untrusted(
                    "signed by a key, and the policy names no keys".into(),
                ));
            }
            for key in &self.keys {
                let mut policy = PublicKeyVerificationPolicy::new(key.der.clone());
                if !self.rooted {
                    policy = policy.skip_tlog_unsafe();
                }
                match self.verifier.verify(artifact.clone(), bundle, &policy) {
                    Ok(_) => return Ok(format!("key {}", key.name)),
                    Err(e) => keep(from_sigstore(e, asked)),
                }
            }
        } else {
            if self.identities.is_empty() {
                return Err(Refusal::Untrusted(
                    "signed keyless, and the policy names no identities".into(),
                ));
            }
            for identity in &self.identities {
                let policy = VerificationPolicy::any_identity().require_issuer(identity.issuer.clone());
                match self.verifier.verify(artifact.clone(), bundle, &policy) {
                    Ok(result) => {
                        let subject = result.identity().map(|s| s.as_str().to_owned()).unwrap_or_default();
                        if identity.subject.matches(&subject) {
                            return Ok(format!("{subject} from {}", identity.issuer));
                        }
                        keep(Refusal::WrongIdentity(format!(
                            "signed by {subject}, the policy wants {identity}"
                        )));
                    }
                    Err(e) => keep(from_sigstore(e, asked)),
                }
            }
        }
        Err(best.unwrap_or(Refusal::NoSignature))
    }

    fn simple_signing(
        &self,
        payload: &[u8],
        annotations: &serde_json::Map<String, serde_json::Value>,
        digest: &Digest,
    ) -> Result<String, Refusal> {
        let text = |key: &str| annotations.get(key).and_then(|v| v.as_str());
        let signature_b64 = text(SIGNATURE_ANNOTATION)
            .ok_or_else(|| Refusal::Malformed(format!("no {SIGNATURE_ANNOTATION} annotation")))?;
        let signer = match text(CERTIFICATE_ANNOTATION) {
            // Keyless: the certificate, the signature and the Rekor promise make a v0.1
            // bundle over the payload's bytes, checked like any other.
            Some(cert) => {
                let bundle = legacy_bundle(payload, signature_b64, Some(cert), text(REKOR_ANNOTATION))?;
                self.bundle(
                    &bundle,
                    sigstore_verify::types::Artifact::from_blob(payload),
                    &digest.to_string(),
                )?
            }
            // By a key, under a trusted root: its Rekor entry must verify too (as `cosign
            // verify --key` asks by default), through the same bundle check.
            None if self.rooted => {
                if text(REKOR_ANNOTATION).is_none() {
                    return Err(Refusal::Untrusted(
                        "signed by a key without a transparency-log entry, and the policy has a trusted_root".into(),
                    ));
                }
                let bundle = legacy_bundle(payload, signature_b64, None, text(REKOR_ANNOTATION))?;
                self.bundle(
                    &bundle,
                    sigstore_verify::types::Artifact::from_blob(payload),
                    &digest.to_string(),
                )?
            }
            None => {
                let signature = base64::engine::general_purpose::STANDARD
                    .decode(signature_b64.trim())
                    .map_err(|_| Refusal::Malformed("the signature is not base64".into()))?;
                let signature = SignatureBytes::new(signature);
                if self.keys.is_empty() {
                    return Err(Refusal::Untrusted(
                        "signed by a key, and the policy names no keys".into(),
                    ));
                }
                self.keys
                    .iter()
                    .find(|k| VerificationKey::from_spki(&k.der).is_ok_and(|v| v.verify(payload, &signature).is_ok()))
                    .map(|k| format!("key {}", k.name))
                    .ok_or_else(|| Refusal::BadSignature("it does not verify with any key of the policy".into()))?
            }
        };
        let signed = signed_digest(payload)?;
        if signed != digest.to_string() {
            return Err(Refusal::DigestMismatch {
                signed,
                asked: digest.to_string(),
            });
        }
        Ok(signer)
    }
}

/// The digest a simple-signing payload vouches for.
fn signed_digest(payload: &[u8]) -> Result<String, Refusal> {
    let doc: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| Refusal::Malformed(format!("payload: {e}")))?;
    let critical = &doc["critical"];
    if critical["type"] != "cosign container image signature" {
        return Err(Refusal::Malformed(format!("payload type {}", critical["type"])));
    }
    critical["image"]["docker-manifest-digest"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Refusal::Malformed("no critical.image.docker-manifest-digest".into()))
}

/// A v0.1 Sigstore bundle made of a legacy signature's annotations: its Fulcio
/// certificate (keyless) or a key hint (the policy's keys are then tried), and its Rekor
/// entry with the signed entry timestamp.
fn legacy_bundle(
    payload: &[u8],
    signature_b64: &str,
    cert_pem: Option<&str>,
    rekor: Option<&str>,
) -> Result<Bundle, Refusal> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let material = match cert_pem {
        Some(pem) => {
            let cert_body: String = pem
                .lines()
                .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
                .skip(1)
                .take_while(|l| !l.starts_with("-----END"))
                .collect();
            if cert_body.is_empty() {
                return Err(Refusal::Malformed(
                    "the certificate annotation holds no PEM certificate".into(),
                ));
            }
            serde_json::json!({ "certificates": [ { "rawBytes": cert_body } ] })
        }
        None => serde_json::Value::Null,
    };
    let rekor = rekor.ok_or_else(|| Refusal::Untrusted("signature without a Rekor entry".into()))?;
    let rekor: serde_json::Value =
        serde_json::from_str(rekor).map_err(|e| Refusal::Malformed(format!("Rekor bundle: {e}")))?;
    let entry = &rekor["Payload"];
    let log_id = entry["logID"].as_str().unwrap_or_default();
    let log_id: Vec<u8> = (0..log_id.len() / 2)
        .filter_map(|i| u8::from_str_radix(log_id.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let mut bundle = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.1",
        "verificationMaterial": {
            "tlogEntries": [ {
                "logIndex": entry["logIndex"].as_u64().unwrap_or_default().to_string(),
                "logId": { "keyId": b64.encode(log_id) },
                "kindVersion": { "kind": "hashedrekord", "version": "0.0.1" },
                "integratedTime": entry["integratedTime"].as_u64().unwrap_or_default().to_string(),
                "inclusionPromise": { "signedEntryTimestamp": rekor["SignedEntryTimestamp"] },
                "canonicalizedBody": entry["body"],
            } ],
        },
        "messageSignature": {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": b64.encode(ring::digest::digest(&ring::digest::SHA256, payload)),
            },
            "signature": signature_b64.trim(),
        },
    });
    let (field, value) = match material {
        serde_json::Value::Null => ("publicKey", serde_json::json!({ "hint": "" })),
        chain => ("x509CertificateChain", chain),
    };
    bundle["verificationMaterial"][field] = value;
    Bundle::from_json(&bundle.to_string()).map_err(|e| Refusal::Malformed(format!("legacy signature: {e}")))
}

/// One signature as the registry holds it.
pub enum Signature<'a> {
    /// A `.sig` layer's bytes and annotations.
    SimpleSigning {
        payload: &'a [u8],
        annotations: &'a serde_json::Map<String, serde_json::Value>,
    },
    /// A Sigstore bundle's JSON (a referrer's layer).
    Bundle(&'a [u8]),
}

/// sigstore-verify's cryptography on ring, so that one crypto library serves TLS and
/// signatures (its default, aws-lc-rs, would be a second one with a C build).
#[derive(Debug)]
struct RingProvider;

struct RingHash(ring::digest::Context);

impl HashContext for RingHash {
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn finalize(self: Box<Self>) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
}

impl CryptoProvider for RingProvider {
    fn hash(&self, algorithm: HashAlgorithm) -> sigstore_verify::crypto::Result<Box<dyn HashContext>> {
        let algorithm = match algorithm {
            HashAlgorithm::Sha2256 => &ring::digest::SHA256,
            HashAlgorithm::Sha2384 => &ring::digest::SHA384,
            HashAlgorithm::Sha2512 => &ring::digest::SHA512,
            other => {
                return Err(sigstore_verify::crypto::Error::UnsupportedAlgorithm(format!(
                    "{other} digests"
                )))
            }
        };
        Ok(Box::new(RingHash(ring::digest::Context::new(algorithm))))
    }

    fn verify_raw(
        &self,
        scheme: SigningScheme,
        public_key: &[u8],
        data: &[u8],
        signature: &[u8],
    ) -> sigstore_verify::crypto::Result<()> {
        use ring::signature as s;
        let algorithm: &dyn s::VerificationAlgorithm = match scheme {
            SigningScheme::EcdsaP256Sha256 => &s::ECDSA_P256_SHA256_ASN1,
            SigningScheme::EcdsaP256Sha384 => &s::ECDSA_P256_SHA384_ASN1,
            SigningScheme::EcdsaP384Sha256 => &s::ECDSA_P384_SHA256_ASN1,
            SigningScheme::EcdsaP384Sha384 => &s::ECDSA_P384_SHA384_ASN1,
            SigningScheme::Ed25519 => &s::ED25519,
            SigningScheme::RsaPssSha256 => &s::RSA_PSS_2048_8192_SHA256,
            SigningScheme::RsaPssSha384 => &s::RSA_PSS_2048_8192_SHA384,
            SigningScheme::RsaPssSha512 => &s::RSA_PSS_2048_8192_SHA512,
            SigningScheme::RsaPkcs1Sha256 => &s::RSA_PKCS1_2048_8192_SHA256,
            SigningScheme::RsaPkcs1Sha384 => &s::RSA_PKCS1_2048_8192_SHA384,
            SigningScheme::RsaPkcs1Sha512 => &s::RSA_PKCS1_2048_8192_SHA512,
            other => {
                return Err(sigstore_verify::crypto::Error::UnsupportedAlgorithm(format!(
                    "{} signatures",
                    other.name()
                )))
            }
        };
        s::UnparsedPublicKey::new(algorithm, public_key)
            .verify(data, signature)
            .map_err(|_| sigstore_verify::crypto::Error::Verification(format!("{} signature invalid", scheme.name())))
    }

    /// ECDSA over a digest (a hashedrekord's message signature is checked against the
    /// artifact's digest): ring verifies messages only, so RustCrypto's curves do this.
    fn verify_prehashed(
        &self,
        scheme: SigningScheme,
        public_key: &[u8],
        digest: &[u8],
        signature: &[u8],
    ) -> sigstore_verify::crypto::Result<()> {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let invalid = || sigstore_verify::crypto::Error::Verification(format!("{} signature invalid", scheme.name()));
        match scheme {
            SigningScheme::EcdsaP256Sha256 | SigningScheme::EcdsaP256Sha384 => {
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| invalid())?;
                let sig = p256::ecdsa::Signature::from_der(signature).map_err(|_| invalid())?;
                key.verify_prehash(digest, &sig).map_err(|_| invalid())
            }
            SigningScheme::EcdsaP384Sha256 | SigningScheme::EcdsaP384Sha384 => {
                let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| invalid())?;
                let sig = p384::ecdsa::Signature::from_der(signature).map_err(|_| invalid())?;
                key.verify_prehash(digest, &sig).map_err(|_| invalid())
            }
            other => Err(sigstore_verify::crypto::Error::UnsupportedAlgorithm(format!(
                "prehashed {} signatures",
                other.name()
            ))),
        }
    }
}

static RING: RingProvider = RingProvider;

fn install_provider() {
    // Already installed (by an earlier call) is fine.
    let _ = sigstore_verify::crypto::install_default_provider(&RING);
}

/// Keeps a [`Trust`] shareable between the policies that name the same files.
pub type SharedTrust = Arc<Trust>;

#[cfg(test)]
mod tests {
    //! Against real artefacts (../shared/fixtures/sigstore; SOURCES.md there says where
    //! each comes from and what it must give).
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn fixture(path: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/sigstore")
            .join(path)
    }

    fn read(path: &str) -> String {
        std::fs::read_to_string(fixture(path)).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    fn key(path: &str) -> PublicKey {
        PublicKey::from_pem(path, &read(path)).unwrap()
    }

    fn beacon() -> Identity {
        Identity {
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: Subject::Exact("https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main".into()),
        }
    }

    /// The signer of the cosign v3 image bundle fixture ([`image_bundle`]).
    fn kubewarden() -> Identity {
        Identity {
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: Subject::Regex(
                regex_lite::Regex::new(r"^https://github\.com/kubewarden/kubewarden-controller/").unwrap(),
            ),
        }
    }

    /// The signer of the legacy keyless fixture, `dir-img-cosign-fulcio-rekor-valid`.
    fn mitr() -> Identity {
        Identity {
            issuer: "https://github.com/login/oauth".into(),
            subject: Subject::Exact("mitr@redhat.com".into()),
        }
    }

    /// A real cosign v3 image signature (a Sigstore bundle) and the digest it signs.
    fn image_bundle() -> (Vec<u8>, Digest) {
        let json = std::fs::read(fixture(
            "cosign-v3-image-bundle/kubewarden-controller-v1.34.0.sigstore.json",
        ))
        .unwrap();
        let digest = "sha256:c811d58de79c92f03214e63aa339484e488d694ae8a6283b5f3f17a9faf50172"
            .parse()
            .unwrap();
        (json, digest)
    }

    fn trust(keys: Vec<PublicKey>, identities: Vec<Identity>, root: &str) -> Trust {
        Trust::new(
            keys,
            identities,
            Some(&read(&format!("trusted_root/{root}.trusted_root.json"))),
        )
        .unwrap()
    }

    /// A conformance case over a.txt, as its README says to verify it.
    fn conformance(case: &str, root: &str) -> Result<String, Refusal> {
        let dir = format!("conformance/{case}");
        let keys = if fixture(&format!("{dir}/key.pub")).exists() {
            vec![key(&format!("{dir}/key.pub"))]
        } else {
            vec![]
        };
        let identity = if fixture(&format!("{dir}/identity")).exists() {
            Identity {
                issuer: read(&format!("{dir}/issuer")).trim().to_owned(),
                subject: Subject::Exact(read(&format!("{dir}/identity")).trim().to_owned()),
            }
        } else {
            beacon()
        };
        let trust = trust(keys, vec![identity], root);
        let bundle = Bundle::from_json(&read(&format!("{dir}/bundle.sigstore.json")))
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        let artifact = std::fs::read(fixture("conformance/a.txt")).unwrap();
        trust.bundle(&bundle, sigstore_verify::types::Artifact::from_blob(&artifact), "a.txt")
    }

    #[test]
    fn every_positive_conformance_bundle_verifies() {
        for (case, root) in [
            ("happy-path-v0.3-new-mediaType", "production"),
            ("happy-path-intoto-in-dsse-v3", "production"),
            ("managed-key-happy-path", "production"),
            ("rekor2-happy-path", "staging"),
            ("bundle-from-wrong-instance_fail", "staging"),
        ] {
            let signer = conformance(case, root).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(!signer.is_empty(), "{case}");
        }
    }

    #[test]
    fn every_negative_conformance_bundle_is_refused_for_its_reason() {
        for (case, reason) in [
            ("signature-mismatch_fail", "bad_signature"),
            ("message-digest-mismatch_fail", "digest_mismatch"),
            ("wrong-hashedrekord-artifact_fail", "untrusted"),
            ("dsse-invalid-sig_fail", "bad_signature"),
            ("set-invalid-signature_fail", "untrusted"),
            ("inclusion-proof-corrupted-hash_fail", "untrusted"),
            ("integrated-time-in-future_fail", "untrusted"),
            ("bundle-from-wrong-instance_fail", "untrusted"),
        ] {
            match conformance(case, "production") {
                Ok(signer) => panic!("{case} verified (as {signer})"),
                Err(e) => assert_eq!(e.reason(), reason, "{case}: {e}"),
            }
        }
    }

    #[test]
    fn a_real_cosign_v3_image_bundle_verifies_for_its_digest_only() {
        let trust = trust(vec![], vec![kubewarden()], "production");
        let (json, digest) = image_bundle();
        let signer = trust.verify(&Signature::Bundle(&json), &digest).unwrap();
        assert!(signer.contains("kubewarden-controller"), "{signer}");
        let other = Digest::sha256_of(b"another manifest");
        assert_eq!(
            trust.verify(&Signature::Bundle(&json), &other).unwrap_err().reason(),
            "digest_mismatch"
        );
        // The right bundle, the wrong signer.
        let stranger = Trust::new(
            vec![],
            vec![beacon()],
            Some(&read("trusted_root/production.trusted_root.json")),
        )
        .unwrap();
        assert_eq!(
            stranger
                .verify(&Signature::Bundle(&json), &digest)
                .unwrap_err()
                .reason(),
            "wrong_identity"
        );
    }

    #[test]
    fn a_real_cosign_attestation_bundle_verifies_for_its_digest() {
        let identity = Identity {
            issuer: "https://github.com/login/oauth".into(),
            subject: Subject::Exact("cody@soyland.com".into()),
        };
        let trust = trust(vec![], vec![identity], "production");
        let json = std::fs::read(fixture("cosign-oci-attestation/oci-attestation.sigstore.json")).unwrap();
        let digest: Digest = "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"
            .parse()
            .unwrap();
        trust.verify(&Signature::Bundle(&json), &digest).unwrap();
        let other = Digest::sha256_of(b"another manifest");
        assert_eq!(
            trust.verify(&Signature::Bundle(&json), &other).unwrap_err().reason(),
            "digest_mismatch"
        );
    }

    /// (payload, annotations, the manifest's digest) of a legacy fixture image.
    fn legacy(dir: &str) -> (Vec<u8>, serde_json::Map<String, serde_json::Value>, Digest) {
        let dir = format!("cosign-simplesigning/{dir}");
        let payload = std::fs::read(fixture(&format!("{dir}/payload.json"))).unwrap();
        let manifest = std::fs::read(fixture(&format!("{dir}/manifest.json"))).unwrap();
        let mut annotations = serde_json::Map::new();
        annotations.insert(
            SIGNATURE_ANNOTATION.into(),
            read(&format!("{dir}/signature.b64")).into(),
        );
        for (file, key) in [
            ("cert.pem", CERTIFICATE_ANNOTATION),
            ("rekor-bundle.json", REKOR_ANNOTATION),
        ] {
            if let Ok(value) = std::fs::read_to_string(fixture(&format!("{dir}/{file}"))) {
                annotations.insert(key.into(), value.into());
            }
        }
        (payload, annotations, Digest::sha256_of(&manifest))
    }

    #[test]
    fn real_legacy_cosign_signatures_verify_under_their_key_and_fail_under_the_other() {
        let (key1, key2) = (
            key("cosign-simplesigning/cosign.pub"),
            key("cosign-simplesigning/cosign2.pub"),
        );
        for (dir, right, wrong) in [
            ("dir-img-cosign-valid", &key1, &key2),
            ("dir-img-cosign-key-rekor-valid", &key2, &key1),
        ] {
            let (payload, annotations, digest) = legacy(dir);
            let sig = Signature::SimpleSigning {
                payload: &payload,
                annotations: &annotations,
            };
            let good = Trust::new(vec![right.clone()], vec![], None).unwrap();
            assert!(good.verify(&sig, &digest).is_ok(), "{dir}");
            let bad = Trust::new(vec![wrong.clone()], vec![], None).unwrap();
            assert_eq!(
                bad.verify(&sig, &digest).unwrap_err().reason(),
                "bad_signature",
                "{dir}"
            );
        }
    }

    #[test]
    fn under_a_trusted_root_a_key_signature_needs_its_rekor_entry() {
        let (payload, annotations, digest) = legacy("dir-img-cosign-key-rekor-valid");
        let sig = Signature::SimpleSigning {
            payload: &payload,
            annotations: &annotations,
        };
        let rooted = |k: &str| trust(vec![key(k)], vec![], "production");
        assert_eq!(
            rooted("cosign-simplesigning/cosign2.pub").verify(&sig, &digest),
            Ok("key cosign-simplesigning/cosign2.pub".into())
        );
        assert_eq!(
            rooted("cosign-simplesigning/cosign.pub")
                .verify(&sig, &digest)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        // The promise of another entry does not vouch for this one.
        let mut forged = annotations.clone();
        let mut rekor: serde_json::Value = serde_json::from_str(forged[REKOR_ANNOTATION].as_str().unwrap()).unwrap();
        rekor["Payload"]["integratedTime"] = (rekor["Payload"]["integratedTime"].as_u64().unwrap() + 1).into();
        forged.insert(REKOR_ANNOTATION.into(), rekor.to_string().into());
        let sig = Signature::SimpleSigning {
            payload: &payload,
            annotations: &forged,
        };
        assert_eq!(
            rooted("cosign-simplesigning/cosign2.pub")
                .verify(&sig, &digest)
                .unwrap_err()
                .reason(),
            "untrusted"
        );
        // No Rekor entry at all: refused under a root, accepted by the key alone without one.
        let (payload, annotations, digest) = legacy("dir-img-cosign-valid");
        let sig = Signature::SimpleSigning {
            payload: &payload,
            annotations: &annotations,
        };
        let reason = rooted("cosign-simplesigning/cosign.pub")
            .verify(&sig, &digest)
            .unwrap_err();
        assert!(
            matches!(&reason, Refusal::Untrusted(m) if m.contains("transparency-log")),
            "{reason}"
        );
        let keyed = Trust::new(vec![key("cosign-simplesigning/cosign.pub")], vec![], None).unwrap();
        assert!(keyed.verify(&sig, &digest).is_ok());
    }

    #[test]
    fn a_real_legacy_keyless_signature_verifies_with_its_identity_only() {
        let (payload, annotations, digest) = legacy("dir-img-cosign-fulcio-rekor-valid");
        let sig = Signature::SimpleSigning {
            payload: &payload,
            annotations: &annotations,
        };
        let signer = trust(vec![], vec![mitr()], "production").verify(&sig, &digest).unwrap();
        assert_eq!(signer, "mitr@redhat.com from https://github.com/login/oauth");
        assert_eq!(
            trust(vec![], vec![beacon()], "production")
                .verify(&sig, &digest)
                .unwrap_err()
                .reason(),
            "wrong_identity"
        );
        // Under the staging root its chain and log key are unknown.
        assert_eq!(
            trust(vec![], vec![mitr()], "staging")
                .verify(&sig, &digest)
                .unwrap_err()
                .reason(),
            "untrusted"
        );
    }

    #[test]
    fn a_signature_for_another_digest_or_other_bytes_is_refused() {
        let trust = Trust::new(vec![key("cosign-simplesigning/cosign.pub")], vec![], None).unwrap();
        let (payload, annotations, digest) = legacy("dir-img-cosign-valid");
        let sig = |p: &[u8]| -> Result<String, Refusal> {
            let s = Signature::SimpleSigning {
                payload: p,
                annotations: &annotations,
            };
            trust.verify(&s, &digest)
        };
        assert!(sig(&payload).is_ok());
        let other = Digest::sha256_of(b"another manifest");
        let s = Signature::SimpleSigning {
            payload: &payload,
            annotations: &annotations,
        };
        assert!(matches!(
            trust.verify(&s, &other),
            Err(Refusal::DigestMismatch { signed, .. }) if signed == digest.to_string()
        ));
        let mut tampered = payload.clone();
        tampered[10] ^= 0x01;
        assert_eq!(sig(&tampered).unwrap_err().reason(), "bad_signature");
        assert!(PublicKey::from_pem("x", "not a key").is_err());
    }

    /// The fixtures' real signatures, each with the policy and digest it verifies under and
    /// the signer that policy names.
    struct RealSignature {
        trust: Trust,
        /// The bundle's JSON, or the `.sig` layer's payload.
        bytes: Vec<u8>,
        /// A `.sig` layer's annotations; `None` for a bundle.
        annotations: Option<serde_json::Map<String, serde_json::Value>>,
        digest: Digest,
        signer: String,
    }

    fn real_signatures() -> Vec<RealSignature> {
        let (image, image_digest) = image_bundle();
        let (keyless, keyless_annotations, keyless_digest) = legacy("dir-img-cosign-fulcio-rekor-valid");
        let (keyed, keyed_annotations, keyed_digest) = legacy("dir-img-cosign-key-rekor-valid");
        vec![
            RealSignature {
                trust: trust(vec![], vec![kubewarden()], "production"),
                bytes: image,
                annotations: None,
                digest: image_digest,
                signer: "https://github.com/kubewarden/kubewarden-controller/.github/workflows/release.yml@refs/tags/v1.34.0 from https://token.actions.githubusercontent.com".into(),
            },
            RealSignature {
                trust: trust(vec![], vec![mitr()], "production"),
                bytes: keyless,
                annotations: Some(keyless_annotations),
                digest: keyless_digest,
                signer: "mitr@redhat.com from https://github.com/login/oauth".into(),
            },
            RealSignature {
                trust: trust(vec![key("cosign-simplesigning/cosign2.pub")], vec![], "production"),
                bytes: keyed,
                annotations: Some(keyed_annotations),
                digest: keyed_digest,
                signer: "key cosign-simplesigning/cosign2.pub".into(),
            },
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A registry can serve any bytes as a signature. A real one with a few bytes
        /// changed (in the bundle, the payload, or an annotation) is refused or still names
        /// its own signer, never another, and never panics the verifier.
        #[test]
        fn a_real_signature_with_bytes_changed_is_refused_or_names_its_own_signer(
            which in 0..3usize,
            part in 0..4usize,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let RealSignature { trust, mut bytes, mut annotations, digest, signer } = real_signatures().swap_remove(which);
            let keys = [SIGNATURE_ANNOTATION, CERTIFICATE_ANNOTATION, REKOR_ANNOTATION];
            let edit = |target: &mut Vec<u8>| {
                for (at, byte) in &edits {
                    if !target.is_empty() {
                        let i = at.index(target.len());
                        target[i] = *byte;
                    }
                }
            };
            match annotations.as_mut().filter(|_| part > 0) {
                Some(map) => {
                    if let Some(value) = map.get_mut(keys[part - 1]) {
                        let mut text = value.as_str().unwrap_or_default().as_bytes().to_vec();
                        edit(&mut text);
                        *value = String::from_utf8_lossy(&text).into_owned().into();
                    }
                }
                None => edit(&mut bytes),
            }
            let signature = match &annotations {
                Some(annotations) => Signature::SimpleSigning { payload: &bytes, annotations },
                None => Signature::Bundle(&bytes),
            };
            if let Ok(named) = trust.verify(&signature, &digest) {
                prop_assert_eq!(named, signer);
            }
        }
    }
}

#[cfg(test)]
mod own_bundles {
    //! Bundles in cosign v3's format made here with a fresh key.
    use super::*;

    fn pem(public: &[u8]) -> String {
        let prefix: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
            0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let der = [&prefix[..], public].concat();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    }

    #[test]
    fn a_key_signed_bundle_without_a_log_entry_or_timestamp_is_refused_as_malformed() {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let digest = Digest::sha256_of(b"a manifest");
        let statement = serde_json::json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "registry/repo", "digest": {"sha256": digest.hex()}}],
            "predicateType": "https://sigstore.dev/cosign/sign/v1",
            "predicate": {},
        })
        .to_string();
        let t = "application/vnd.in-toto+json";
        let pae = format!("DSSEv1 {} {t} {} {statement}", t.len(), statement.len());
        let sig = pair.sign(&rng, pae.as_bytes()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let bundle = serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": "own"}, "tlogEntries": []},
            "dsseEnvelope": {"payload": b64.encode(&statement), "payloadType": t,
                "signatures": [{"sig": b64.encode(sig.as_ref()), "keyid": ""}]},
        })
        .to_string();
        let key = PublicKey::from_pem("own.pub", &pem(pair.public_key().as_ref())).unwrap();
        let trust = Trust::new(vec![key], vec![], None).unwrap();
        // Sigstore requires proof of when it was signed; without one nothing vouches for it.
        let r = trust.verify(&Signature::Bundle(bundle.as_bytes()), &digest);
        assert!(
            matches!(&r, Err(Refusal::Malformed(m)) if m.contains("tlog entry")),
            "{r:?}"
        );
    }

    fn spki_pem(der: &[u8]) -> String {
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    }

    /// A cosign simple-signing payload for `digest`, and its annotations with `signature`.
    fn simple_signed(
        digest: &Digest,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> (Vec<u8>, serde_json::Map<String, serde_json::Value>) {
        let payload = serde_json::json!({
            "critical": {
                "identity": {"docker-reference": "registry.example/acme/app"},
                "image": {"docker-manifest-digest": digest.to_string()},
                "type": "cosign container image signature",
            },
            "optional": null,
        })
        .to_string()
        .into_bytes();
        let mut annotations = serde_json::Map::new();
        let signature = base64::engine::general_purpose::STANDARD.encode(sign(&payload));
        annotations.insert(SIGNATURE_ANNOTATION.into(), signature.into());
        (payload, annotations)
    }

    /// Checks that `right` verifies the signature made by `sign` and `wrong` refuses it.
    fn verifies_only_with(right: PublicKey, wrong: PublicKey, sign: impl Fn(&[u8]) -> Vec<u8>) {
        let digest = Digest::sha256_of(b"a manifest");
        let (payload, annotations) = simple_signed(&digest, sign);
        let sig = Signature::SimpleSigning {
            payload: &payload,
            annotations: &annotations,
        };
        let name = right.name.clone();
        let good = Trust::new(vec![wrong.clone(), right], vec![], None).unwrap();
        assert_eq!(good.verify(&sig, &digest), Ok(format!("key {name}")));
        let bad = Trust::new(vec![wrong], vec![], None).unwrap();
        assert_eq!(bad.verify(&sig, &digest).unwrap_err().reason(), "bad_signature");
        // The same signature does not vouch for another digest.
        let other = Digest::sha256_of(b"another manifest");
        assert_eq!(good.verify(&sig, &other).unwrap_err().reason(), "digest_mismatch");
    }

    #[test]
    fn an_ed25519_key_verifies_its_simple_signing_signature() {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pair = || {
            let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
        };
        // SubjectPublicKeyInfo of an Ed25519 key (RFC 8410): this prefix, then the 32 bytes.
        let prefix = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        let public = |p: &ring::signature::Ed25519KeyPair| spki_pem(&[&prefix[..], p.public_key().as_ref()].concat());
        let (signer, stranger) = (pair(), pair());
        verifies_only_with(
            PublicKey::from_pem("ed25519.pub", &public(&signer)).unwrap(),
            PublicKey::from_pem("other.pub", &public(&stranger)).unwrap(),
            |payload| signer.sign(payload).as_ref().to_vec(),
        );
    }

    /// RSA keys come from `openssl` (ring verifies and signs RSA but does not make keys).
    fn openssl_rsa_key(dir: &std::path::Path, name: &str) -> (ring::signature::RsaKeyPair, PublicKey) {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| panic!("openssl (scripts/test installs it): {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (key, private, public) = (format!("{name}.pem"), format!("{name}.pk8"), format!("{name}.pub"));
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &key,
        ]);
        // The PKCS #8 v1 DER that ring reads (as its documentation makes it).
        run(&[
            "pkcs8", "-topk8", "-nocrypt", "-in", &key, "-outform", "DER", "-out", &private,
        ]);
        run(&["pkey", "-in", &key, "-pubout", "-out", &public]);
        let pkcs8 = std::fs::read(dir.join(&private)).unwrap();
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
        let pem = std::fs::read_to_string(dir.join(&public)).unwrap();
        (pair, PublicKey::from_pem(&public, &pem).unwrap())
    }

    #[test]
    fn an_rsa_key_verifies_its_simple_signing_signature() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, right) = openssl_rsa_key(dir.path(), "rsa");
        let (_, wrong) = openssl_rsa_key(dir.path(), "other");
        let rng = ring::rand::SystemRandom::new();
        // cosign signs with an RSA key as PKCS #1 v1.5 over SHA-256.
        verifies_only_with(right, wrong, |payload| {
            let mut sig = vec![0; signer.public().modulus_len()];
            signer
                .sign(&ring::signature::RSA_PKCS1_SHA256, &rng, payload, &mut sig)
                .unwrap();
            sig
        });
    }
}
