//! Who published a digest: verification of cosign's key-based image signatures, the first
//! piece of signature policy (issue 11). A legacy cosign signature is a `.sig` tag whose
//! layer is a "simple signing" payload naming the image's manifest digest, with the
//! signature over those exact bytes in the layer's `dev.cosignproject.cosign/signature`
//! annotation. This module checks one such signature against one public key; fetching
//! signatures and enforcing policies on pulls is not built yet.

use base64::Engine as _;

use crate::digest::Digest;

/// Why a signature does not vouch for a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the public key is not a PEM ECDSA P-256 key: {0}")]
    BadKey(String),
    #[error("the signature is not valid base64")]
    NotBase64,
    #[error("bad signature: it does not verify with the key")]
    BadSignature,
    #[error("the signed payload is not a cosign image signature: {0}")]
    BadPayload(String),
    #[error("digest mismatch: the signature is for {signed}, not {asked}")]
    DigestMismatch { signed: String, asked: String },
}

/// The DER SubjectPublicKeyInfo prefix of an uncompressed ECDSA P-256 key (id-ecPublicKey,
/// prime256v1, then a 66-byte BIT STRING), the only key type accepted here so far.
const P256_SPKI_PREFIX: [u8; 27] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
];

/// A cosign public key (`cosign.pub`): the uncompressed point of an ECDSA P-256 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(Vec<u8>);

impl PublicKey {
    pub fn from_pem(pem: &str) -> Result<PublicKey, Refusal> {
        let body: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN PUBLIC KEY-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if body.is_empty() {
            return Err(Refusal::BadKey("no PUBLIC KEY block".into()));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|e| Refusal::BadKey(e.to_string()))?;
        match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) if point.len() == 64 => Ok(PublicKey([&[0x04][..], point].concat())),
            _ => Err(Refusal::BadKey("only ECDSA P-256 keys are supported so far".into())),
        }
    }
}

/// Checks that `payload` (the `.sig` layer's bytes) is signed by `key` (`signature_b64` is
/// the layer's `dev.cosignproject.cosign/signature` annotation) and names `digest`.
pub fn verify_simple_signing(
    payload: &[u8],
    signature_b64: &str,
    key: &PublicKey,
    digest: &Digest,
) -> Result<(), Refusal> {
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| Refusal::NotBase64)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &key.0)
        .verify(payload, &signature)
        .map_err(|_| Refusal::BadSignature)?;
    let doc: serde_json::Value = serde_json::from_slice(payload).map_err(|e| Refusal::BadPayload(e.to_string()))?;
    let critical = &doc["critical"];
    if critical["type"] != "cosign container image signature" {
        return Err(Refusal::BadPayload(format!("type {}", critical["type"])));
    }
    let signed = critical["image"]["docker-manifest-digest"]
        .as_str()
        .ok_or_else(|| Refusal::BadPayload("no critical.image.docker-manifest-digest".into()))?;
    if signed != digest.to_string() {
        return Err(Refusal::DigestMismatch {
            signed: signed.to_owned(),
            asked: digest.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Against real cosign signatures (../shared/fixtures/sigstore/cosign-simplesigning,
    //! from containers/image's fixtures; SOURCES.md there says what each must give).
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sigstore/cosign-simplesigning")
    }

    fn read(path: &str) -> String {
        std::fs::read_to_string(fixtures().join(path)).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    /// (payload, signature, the manifest's digest) of a fixture image.
    fn image(dir: &str) -> (Vec<u8>, String, Digest) {
        let payload = std::fs::read(fixtures().join(dir).join("payload.json")).unwrap();
        let manifest = std::fs::read(fixtures().join(dir).join("manifest.json")).unwrap();
        (
            payload,
            read(&format!("{dir}/signature.b64")),
            Digest::sha256_of(&manifest),
        )
    }

    #[test]
    fn real_cosign_signatures_verify_under_their_key_and_fail_under_the_other() {
        let key1 = PublicKey::from_pem(&read("cosign.pub")).unwrap();
        let key2 = PublicKey::from_pem(&read("cosign2.pub")).unwrap();
        for (dir, right, wrong) in [
            ("dir-img-cosign-valid", &key1, &key2),
            ("dir-img-cosign-key-rekor-valid", &key2, &key1),
        ] {
            let (payload, sig, digest) = image(dir);
            assert_eq!(verify_simple_signing(&payload, &sig, right, &digest), Ok(()), "{dir}");
            assert_eq!(
                verify_simple_signing(&payload, &sig, wrong, &digest),
                Err(Refusal::BadSignature),
                "{dir}"
            );
        }
    }

    #[test]
    fn a_signature_for_another_digest_or_other_bytes_is_refused() {
        let key = PublicKey::from_pem(&read("cosign.pub")).unwrap();
        let (payload, sig, digest) = image("dir-img-cosign-valid");
        let other = Digest::sha256_of(b"another manifest");
        assert!(matches!(
            verify_simple_signing(&payload, &sig, &key, &other),
            Err(Refusal::DigestMismatch { signed, .. }) if signed == digest.to_string()
        ));
        let mut tampered = payload.clone();
        tampered[10] ^= 0x01;
        assert_eq!(
            verify_simple_signing(&tampered, &sig, &key, &digest),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify_simple_signing(&payload, "%%%", &key, &digest),
            Err(Refusal::NotBase64)
        );
        assert!(PublicKey::from_pem("not a key").is_err());
    }
}
