//! Signature policy on pulls: images signed here in exactly cosign's formats with keys made
//! for the test, and a real cosign-signed manifest from the shared fixtures, served by the
//! fake upstream; regcache must serve what the policy's trust signed, refuse the rest with
//! `403 DENIED` naming why, keep its verdicts, work offline and take a reload.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::KeyPair as _;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{get, get_with, random_bytes, sha256, upstream_toml, wait_until, Process, TestProxy};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const ACCEPT: (&str, &str) = (
    "accept",
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
);

/// A cosign key pair made for one test.
pub struct CosignKey {
    pair: ring::signature::EcdsaKeyPair,
}

impl CosignKey {
    pub fn generate() -> CosignKey {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key generated");
        CosignKey {
            pair: ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key parsed"),
        }
    }

    /// `cosign.pub`: the public key as PEM SubjectPublicKeyInfo.
    pub fn public_pem(&self) -> String {
        const P256_SPKI: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
            0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let der = [&P256_SPKI[..], self.pair.public_key().as_ref()].concat();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.public_pem()).expect("key written");
        path
    }

    fn sign(&self, bytes: &[u8]) -> String {
        let rng = ring::rand::SystemRandom::new();
        let sig = self.pair.sign(&rng, bytes).expect("signed");
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    }

    /// cosign's legacy signature of `signed` (a manifest digest): the simple-signing payload,
    /// its config, and the `.sig` manifest with the signature annotation.
    pub fn legacy_signature(&self, reference: &str, signed: &str) -> LegacySignature {
        let payload = serde_json::to_vec(&serde_json::json!({
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": signed},
                "type": "cosign container image signature",
            },
            "optional": null,
        }))
        .unwrap();
        let payload_digest = sha256(&payload);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "", "os": "", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": sha256(&config)},
            "layers": [{
                "mediaType": SIMPLE_SIGNING, "size": payload.len(), "digest": payload_digest,
                "annotations": {"dev.cosignproject.cosign/signature": self.sign(&payload)},
            }],
        }))
        .unwrap();
        LegacySignature {
            tag: sig_tag(signed),
            manifest,
            blobs: vec![config, payload],
        }
    }
}

pub struct LegacySignature {
    pub tag: String,
    pub manifest: Vec<u8>,
    pub blobs: Vec<Vec<u8>>,
}

/// cosign's tag for the signatures of `digest`.
pub fn sig_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// Publishes `signature` beside the image in `repo`.
fn publish(up: &FakeUpstream, repo: &str, signature: &LegacySignature) {
    for blob in &signature.blobs {
        up.add_blob(blob);
    }
    up.add_manifest(repo, &signature.tag, OCI_MANIFEST, &signature.manifest);
}

/// An image at `repo:tag` over fresh blobs; returns (manifest digest, blob digests).
fn image(up: &FakeUpstream, repo: &str, tag: &str, seed: u64) -> (String, Vec<String>) {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let (m, c, l) = up.add_one_layer_image(repo, tag, &config, &random_bytes(10_000, seed));
    (m, vec![c, l])
}

fn policy_toml(mode: &str, keys: &[&Path]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("{:?}", k.display().to_string())).collect();
    format!(
        "[[policy]]\nname = \"library\"\nmatch = \"docker.io/library/*\"\nmode = \"{mode}\"\nkeys = [{}]\n",
        keys.join(", ")
    )
}

async fn proxy_with(up: &FakeUpstream, dir: &Path, tag_ttl: &str, policy: &str) -> TestProxy {
    proxy_with_keys(up, dir, tag_ttl, "", policy).await
}

/// [`proxy_with`] with extra `[cache]` keys.
async fn proxy_with_keys(up: &FakeUpstream, dir: &Path, tag_ttl: &str, cache_keys: &str, policy: &str) -> TestProxy {
    TestProxy::start_sections(
        &dir.join("cache"),
        "",
        cache_keys,
        policy,
        &upstream_toml("docker.io", &up.url(), true, tag_ttl),
    )
    .await
}

fn denial(reply: &crate::harness::Reply) -> String {
    assert_eq!(reply.status, 403, "expected a denial, got {reply:?}");
    assert_eq!(reply.error_code(), "DENIED");
    reply.json()["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn an_enforcing_policy_serves_what_its_key_signed_and_denies_the_rest_naming_why() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (CosignKey::generate(), CosignKey::generate());
    let key = ours.write(dir.path(), "cosign.pub");

    let (signed, signed_blobs) = image(&up, "library/signed", "1", 1);
    publish(
        &up,
        "library/signed",
        &ours.legacy_signature("docker.io/library/signed:1", &signed),
    );
    let (unsigned, unsigned_blobs) = image(&up, "library/unsigned", "1", 2);
    let (other, _) = image(&up, "library/otherkey", "1", 3);
    publish(
        &up,
        "library/otherkey",
        &theirs.legacy_signature("docker.io/library/otherkey:1", &other),
    );
    // A valid signature by our key, of another digest, stored as this image's.
    let (swapped, _) = image(&up, "library/swapped", "1", 4);
    let mut lie = ours.legacy_signature("docker.io/library/signed:1", &signed);
    lie.tag = sig_tag(&swapped);
    publish(&up, "library/swapped", &lie);
    let (elsewhere, _) = image(&up, "acme/app", "1", 5);

    let proxy = proxy_with(&up, dir.path(), "5m", &policy_toml("enforce", &[&key])).await;
    let ok = get_with(&proxy.url("/v2/library/signed/manifests/1"), &[ACCEPT]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(sha256(ok.bytes()), signed);
    let said = ok.header("x-regcache-policy").unwrap_or_default().to_owned();
    assert!(said.contains("key cosign.pub") && said.contains("library"), "{said}");
    for blob in &signed_blobs {
        let r = get(&proxy.url(&format!("/v2/library/signed/blobs/{blob}"))).await;
        assert_eq!(r.status, 200, "blob {blob} of the signed image");
    }
    let by_digest = get_with(&proxy.url(&format!("/v2/library/signed/manifests/{signed}")), &[ACCEPT]).await;
    assert_eq!(by_digest.status, 200);

    let m = denial(&get_with(&proxy.url("/v2/library/unsigned/manifests/1"), &[ACCEPT]).await);
    assert!(
        m.contains("policy \"library\"") && m.contains("no signature") && m.contains(&unsigned),
        "{m}"
    );
    let m = denial(&get(&proxy.url(&format!("/v2/library/unsigned/blobs/{}", unsigned_blobs[1]))).await);
    assert!(m.contains("no manifest that passed"), "{m}");
    let m = denial(&get_with(&proxy.url("/v2/library/otherkey/manifests/1"), &[ACCEPT]).await);
    assert!(m.contains("bad signature"), "{m}");
    let m = denial(&get_with(&proxy.url("/v2/library/swapped/manifests/1"), &[ACCEPT]).await);
    assert!(m.contains("digest mismatch") && m.contains(&signed), "{m}");
    // Outside the policy's pattern nothing is checked.
    let free = get_with(&proxy.url("/v2/acme/app/manifests/1"), &[ACCEPT]).await;
    assert_eq!((free.status.as_u16(), sha256(free.bytes())), (200, elsewhere));
    assert!(free.header("x-regcache-policy").is_none());

    // Verdicts are kept: pulling again asks the upstream for no signature.
    let sig_gets = up.count("GET", &sig_tag(&signed));
    assert_eq!(sig_gets, 1);
    for _ in 0..3 {
        assert_eq!(
            get_with(&proxy.url("/v2/library/signed/manifests/1"), &[ACCEPT])
                .await
                .status,
            200
        );
    }
    assert_eq!(up.count("GET", &sig_tag(&signed)), sig_gets);
    assert_eq!(
        proxy.metric("regcache_policy_decisions_total{decision=\"verified\",policy=\"library\",reason=\"\"}"),
        7.0
    );
    for (reason, n) in [("no_signature", 2.0), ("bad_signature", 1.0), ("digest_mismatch", 1.0)] {
        let sample =
            format!("regcache_policy_decisions_total{{decision=\"denied\",policy=\"library\",reason=\"{reason}\"}}");
        assert_eq!(proxy.metric(&sample), n, "{sample}");
    }
    // The status page says the same.
    let shown = proxy.proxy.clone();
    let page = tokio::task::spawn_blocking(move || regcache::status::render(&shown))
        .await
        .unwrap();
    let row = page
        .lines()
        .find(|l| l.starts_with("<tr><td>library</td>"))
        .unwrap_or_else(|| panic!("{page}"));
    assert!(
        row.contains("<td>enforce</td><td>key cosign.pub</td><td>7</td><td>0</td><td>4 ("),
        "{row}"
    );
    assert!(
        row.contains("no_signature 2") && row.contains("bad_signature 1"),
        "{row}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_tag_moved_to_an_unsigned_digest_is_denied_while_the_signed_digest_still_pulls() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ours = CosignKey::generate();
    let key = ours.write(dir.path(), "cosign.pub");
    let (signed, _) = image(&up, "library/app", "latest", 1);
    publish(
        &up,
        "library/app",
        &ours.legacy_signature("docker.io/library/app:latest", &signed),
    );
    let proxy = proxy_with(&up, dir.path(), "0s", &policy_toml("enforce", &[&key])).await;
    assert_eq!(
        get_with(&proxy.url("/v2/library/app/manifests/latest"), &[ACCEPT])
            .await
            .status,
        200
    );

    // The tag is hijacked: it now names content nobody signed.
    let (hijacked, _) = image(&up, "library/app", "latest", 2);
    let m = denial(&get_with(&proxy.url("/v2/library/app/manifests/latest"), &[ACCEPT]).await);
    assert!(m.contains(&hijacked) && m.contains("no signature"), "{m}");
    let old = get_with(&proxy.url(&format!("/v2/library/app/manifests/{signed}")), &[ACCEPT]).await;
    assert_eq!((old.status.as_u16(), sha256(old.bytes())), (200, signed));
    proxy.stop().await;
}

#[tokio::test]
async fn an_index_signed_at_the_top_admits_every_platform_and_its_blobs() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ours = CosignKey::generate();
    let key = ours.write(dir.path(), "cosign.pub");
    let (amd, amd_blobs) = image(&up, "library/multi", "amd64", 1);
    let (arm, arm_blobs) = image(&up, "library/multi", "arm64", 2);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "size": 1, "digest": amd, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "size": 1, "digest": arm, "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }))
    .unwrap();
    let index_digest = up.add_manifest("library/multi", "1", OCI_INDEX, &index);
    publish(
        &up,
        "library/multi",
        &ours.legacy_signature("docker.io/library/multi:1", &index_digest),
    );
    let proxy = proxy_with(&up, dir.path(), "5m", &policy_toml("enforce", &[&key])).await;

    assert_eq!(
        get_with(&proxy.url("/v2/library/multi/manifests/1"), &[ACCEPT])
            .await
            .status,
        200
    );
    for (platform, blobs) in [(&amd, &amd_blobs), (&arm, &arm_blobs)] {
        let r = get_with(
            &proxy.url(&format!("/v2/library/multi/manifests/{platform}")),
            &[ACCEPT],
        )
        .await;
        assert_eq!(r.status, 200, "platform manifest {platform}");
        assert!(r
            .header("x-regcache-policy")
            .unwrap_or_default()
            .contains(&index_digest));
        for blob in blobs {
            assert_eq!(
                get(&proxy.url(&format!("/v2/library/multi/blobs/{blob}"))).await.status,
                200
            );
        }
    }
    // Only the index's signature was looked for.
    assert_eq!(up.count("GET", &sig_tag(&amd)), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn warn_serves_unsigned_images_and_counts_them() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = CosignKey::generate().write(dir.path(), "cosign.pub");
    let (unsigned, blobs) = image(&up, "library/unsigned", "1", 1);
    let proxy = proxy_with(&up, dir.path(), "5m", &policy_toml("warn", &[&key])).await;
    let r = get_with(&proxy.url("/v2/library/unsigned/manifests/1"), &[ACCEPT]).await;
    assert_eq!((r.status.as_u16(), sha256(r.bytes())), (200, unsigned));
    assert!(r
        .header("x-regcache-policy")
        .unwrap_or_default()
        .starts_with("warned: no signature"));
    assert_eq!(
        get(&proxy.url(&format!("/v2/library/unsigned/blobs/{}", blobs[0])))
            .await
            .status,
        200
    );
    let warned = "regcache_policy_decisions_total{decision=\"warned\",policy=\"library\",reason=\"no_signature\"}";
    assert_eq!(proxy.metric(warned), 2.0);
    proxy.stop().await;
}

/// A fake upstream with `library/signed:1`, signed by a fresh key written to
/// `dir/cosign.pub`, and `library/unsigned:1`: (upstream, key file, signed digest, its blobs,
/// the unsigned image's blobs).
async fn signed_and_unsigned(dir: &Path) -> (FakeUpstream, PathBuf, String, Vec<String>, Vec<String>) {
    let up = FakeUpstream::start().await;
    let ours = CosignKey::generate();
    let key = ours.write(dir, "cosign.pub");
    let (signed, blobs) = image(&up, "library/signed", "1", 1);
    publish(
        &up,
        "library/signed",
        &ours.legacy_signature("docker.io/library/signed:1", &signed),
    );
    let (_, unsigned_blobs) = image(&up, "library/unsigned", "1", 2);
    (up, key, signed, blobs, unsigned_blobs)
}

/// A config file for the binary: `up` as docker.io, the cache in `dir/cache`, `policy`.
fn process_config(up: &FakeUpstream, dir: &Path, policy: &str) -> PathBuf {
    let config = crate::harness::write_process_config(dir, &up.url(), "", "");
    let base = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{base}{policy}")).unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_prefetch_verification_works_with_no_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (up, key, signed, blobs, _) = signed_and_unsigned(dir.path()).await;
    let policy = policy_toml("enforce", &[&key]);
    let config = process_config(&up, dir.path(), &policy);
    crate::prefetch::run_ok(&config, &["prefetch", "library/signed:1"]).await;
    // Prefetch goes through the policy too: an unsigned image is refused, and named.
    let refused = crate::prefetch::run(&config, &["prefetch", "library/unsigned:1"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("library/unsigned") && err.contains("no signature"),
        "{err}"
    );

    // A mirror with no upstream: the signature is judged again, from the cache.
    let before = up.total_requests();
    let offline = TestProxy::start_sections(
        &dir.path().join("cache"),
        "",
        "",
        &policy,
        &format!("{}offline = true\n", upstream_toml("docker.io", &up.url(), true, "5m")),
    )
    .await;
    let r = get_with(&offline.url("/v2/library/signed/manifests/1"), &[ACCEPT]).await;
    assert_eq!((r.status.as_u16(), sha256(r.bytes())), (200, signed.clone()));
    assert!(r
        .header("x-regcache-policy")
        .unwrap_or_default()
        .contains("key cosign.pub"));
    for blob in &blobs {
        assert_eq!(
            get(&offline.url(&format!("/v2/library/signed/blobs/{blob}")))
                .await
                .status,
            200
        );
    }
    assert_eq!(up.total_requests(), before, "an offline mirror asked its upstream");
    offline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_image_prints_what_a_pull_would_be_told() {
    let dir = tempfile::tempdir().unwrap();
    let (up, key, signed, _, _) = signed_and_unsigned(dir.path()).await;
    let config = process_config(&up, dir.path(), &policy_toml("enforce", &[&key]));
    let out = crate::prefetch::run_ok(&config, &["verify-image", "library/signed:1"]).await;
    assert_eq!(
        out.trim(),
        format!("docker.io/library/signed:1 ({signed}): verified: key cosign.pub (policy library)")
    );
    let refused = crate::prefetch::run(&config, &["verify-image", "library/unsigned:1"]);
    assert_eq!(refused.status.code(), Some(1));
    let out = String::from_utf8_lossy(&refused.stdout);
    assert!(
        out.starts_with("docker.io/library/unsigned:1: refused: 403 Forbidden: policy \"library\" refuses"),
        "{out}"
    );
    assert!(out.contains("no signature"), "{out}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("1 of 1 manifests"));
}

#[tokio::test]
async fn a_bundle_among_the_referrers_is_fetched_and_judged() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ours = CosignKey::generate();
    let key = ours.write(dir.path(), "cosign.pub");
    let (subject, _) = image(&up, "library/bundled", "1", 1);
    // A DSSE bundle by our key in cosign v3's shape, but with no transparency-log entry or
    // timestamp: Sigstore refuses it, and the denial must say so (not "no signature").
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "docker.io/library/bundled", "digest": {"sha256": subject.trim_start_matches("sha256:")}}],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    })
    .to_string();
    let t = "application/vnd.in-toto+json";
    let pae = format!("DSSEv1 {} {t} {} {statement}", t.len(), statement.len());
    let b64 = base64::engine::general_purpose::STANDARD;
    let bundle = serde_json::to_vec(&serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": "ours"}, "tlogEntries": []},
        "dsseEnvelope": {"payload": b64.encode(&statement), "payloadType": t,
            "signatures": [{"sig": ours.sign(pae.as_bytes()), "keyid": ""}]},
    }))
    .unwrap();
    let empty = b"{}".to_vec();
    let (bundle_digest, empty_digest) = (up.add_blob(&bundle), up.add_blob(&empty));
    let bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json";
    let referrer = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": bundle_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": empty_digest},
        "layers": [{"mediaType": bundle_type, "size": bundle.len(), "digest": bundle_digest}],
        "subject": {"mediaType": OCI_MANIFEST, "size": 1, "digest": subject},
    }))
    .unwrap();
    let referrer_digest = up.add_manifest("library/bundled", "bundle-holder", OCI_MANIFEST, &referrer);
    up.add_referrer(
        "library/bundled",
        &subject,
        serde_json::json!({"mediaType": OCI_MANIFEST, "size": referrer.len(), "digest": referrer_digest, "artifactType": bundle_type}),
    );
    let proxy = proxy_with(&up, dir.path(), "5m", &policy_toml("enforce", &[&key])).await;
    let m = denial(&get_with(&proxy.url("/v2/library/bundled/manifests/1"), &[ACCEPT]).await);
    assert!(m.contains("malformed signature") && m.contains("tlog entry"), "{m}");
    assert_eq!(up.count("GET", &format!("/blobs/{bundle_digest}")), 1);

    // A valid legacy signature beside it: any valid signature passes.
    publish(&up, "library/bundled", &ours.legacy_signature("x", &subject));
    let again = TestProxy::start_sections(
        &dir.path().join("cache2"),
        "",
        "",
        &policy_toml("enforce", &[&key]),
        &upstream_toml("docker.io", &up.url(), true, "5m"),
    )
    .await;
    assert_eq!(
        get_with(&again.url("/v2/library/bundled/manifests/1"), &[ACCEPT])
            .await
            .status,
        200
    );
    again.stop().await;
    proxy.stop().await;
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sigstore")
}

/// A real cosign-signed manifest of the shared fixtures (containers/image's
/// `cosign-simplesigning/<fixture>`) at `repo:latest`, with its real signature (and, for
/// keyless, certificate and Rekor bundle) as the layer annotations of a `.sig` manifest.
fn publish_real_fixture(up: &FakeUpstream, fixture: &str, repo: &str) -> String {
    let dir = fixtures().join("cosign-simplesigning").join(fixture);
    let manifest = std::fs::read(dir.join("manifest.json")).expect("fixture manifest");
    let media_type = serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()["mediaType"]
        .as_str()
        .unwrap_or(OCI_MANIFEST)
        .to_owned();
    let digest = up.add_manifest(repo, "latest", &media_type, &manifest);
    let payload = std::fs::read(dir.join("payload.json")).unwrap();
    let mut annotations = serde_json::Map::new();
    let signature = std::fs::read_to_string(dir.join("signature.b64")).unwrap();
    annotations.insert("dev.cosignproject.cosign/signature".into(), signature.into());
    for (file, key) in [
        ("cert.pem", "dev.sigstore.cosign/certificate"),
        ("rekor-bundle.json", "dev.sigstore.cosign/bundle"),
    ] {
        if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
            annotations.insert(key.into(), value.into());
        }
    }
    let config = b"{}".to_vec();
    let sig_manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": up.add_blob(&config)},
        "layers": [{"mediaType": SIMPLE_SIGNING, "size": payload.len(), "digest": up.add_blob(&payload),
            "annotations": annotations}],
    }))
    .unwrap();
    up.add_manifest(repo, &sig_tag(&digest), OCI_MANIFEST, &sig_manifest);
    digest
}

const FIXTURE_ACCEPT: (&str, &str) = (
    "accept",
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
);

#[tokio::test]
async fn a_real_cosign_signed_manifest_passes_under_its_key_and_fails_under_the_other() {
    let up = FakeUpstream::start().await;
    let digest = publish_real_fixture(&up, "dir-img-cosign-valid", "library/cosign-signed");
    let keys = fixtures().join("cosign-simplesigning");
    for (key, expect) in [("cosign.pub", 200), ("cosign2.pub", 403)] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxy_with(&up, dir.path(), "5m", &policy_toml("enforce", &[&keys.join(key)])).await;
        let r = get_with(
            &proxy.url("/v2/library/cosign-signed/manifests/latest"),
            &[FIXTURE_ACCEPT],
        )
        .await;
        assert_eq!(r.status, expect, "under {key}: {r:?}");
        if expect == 200 {
            assert_eq!(sha256(r.bytes()), digest);
        } else {
            assert!(denial(&r).contains("bad signature"));
        }
        proxy.stop().await;
    }
}

/// Keyless: the real Fulcio-certified signature passes for its signer's identity under the
/// production trusted root, and is refused for another identity and under the staging root.
#[tokio::test]
async fn a_real_keyless_signature_passes_for_its_identity_only() {
    let up = FakeUpstream::start().await;
    let digest = publish_real_fixture(&up, "dir-img-cosign-fulcio-rekor-valid", "library/keyless");
    let root = |name: &str| fixtures().join(format!("trusted_root/{name}.trusted_root.json"));
    for (subject, root_name, expect, reason) in [
        ("mitr@redhat.com", "production", 200, ""),
        ("someone@example.com", "production", 403, "wrong identity"),
        ("mitr@redhat.com", "staging", 403, "not trusted"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let policy = format!(
            "[[policy]]\nname = \"keyless\"\nmatch = \"docker.io/library/*\"\ntrusted_root = {:?}\n\
             identities = [{{ issuer = \"https://github.com/login/oauth\", subject = \"{subject}\" }}]\n",
            root(root_name).display().to_string()
        );
        let proxy = proxy_with(&up, dir.path(), "5m", &policy).await;
        let r = get_with(&proxy.url("/v2/library/keyless/manifests/latest"), &[FIXTURE_ACCEPT]).await;
        assert_eq!(r.status, expect, "{subject} under {root_name}: {r:?}");
        if expect == 200 {
            assert_eq!(sha256(r.bytes()), digest);
            let said = r.header("x-regcache-policy").unwrap_or_default();
            assert!(
                said.contains("mitr@redhat.com from https://github.com/login/oauth"),
                "{said}"
            );
        } else {
            let m = denial(&r);
            assert!(m.contains(reason), "{subject} under {root_name}: {m}");
        }
        proxy.stop().await;
    }
}

/// Asks `url` until it answers `status` (after a reload), at most 10 s; the last answer.
async fn until_status(url: &str, status: u16, what: &str) -> crate::harness::Reply {
    let started = std::time::Instant::now();
    loop {
        let reply = get_with(url, &[ACCEPT]).await;
        if reply.status.as_u16() == status {
            return reply;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{what} never took effect: {reply:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The binary: `[[policy]]` edits take effect on SIGHUP.
#[tokio::test]
async fn a_policy_change_takes_effect_on_sighup() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = CosignKey::generate().write(dir.path(), "cosign.pub");
    image(&up, "library/unsigned", "1", 1);
    let config = crate::harness::write_process_config(dir.path(), &up.url(), "", "");
    let base = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{base}{}", policy_toml("warn", &[&key]))).unwrap();
    let server = Process::start_with_config(&config);
    let url = server.url("/v2/library/unsigned/manifests/1");
    assert_eq!(get_with(&url, &[ACCEPT]).await.status, 200);

    std::fs::write(&config, format!("{base}{}", policy_toml("enforce", &[&key]))).unwrap();
    server.signal("HUP");
    until_status(&url, 403, "the reload").await;
    std::fs::write(&config, format!("{base}{}", policy_toml("off", &[&key]))).unwrap();
    server.signal("HUP");
    until_status(&url, 200, "the last reload").await;
}

/// The binary: a manifest that passed is judged again when a reload changes the policy's
/// keys (its verdict, kept with the manifest for warm hits, belongs to the policy as it
/// was), and passes again once its key is back.
#[tokio::test]
async fn a_manifest_that_passed_is_judged_again_under_a_reloaded_policy() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (CosignKey::generate(), CosignKey::generate());
    let (our_key, their_key) = (
        ours.write(dir.path(), "cosign.pub"),
        theirs.write(dir.path(), "other.pub"),
    );
    let (signed, _) = image(&up, "library/signed", "1", 1);
    publish(
        &up,
        "library/signed",
        &ours.legacy_signature("docker.io/library/signed:1", &signed),
    );
    let config = crate::harness::write_process_config(dir.path(), &up.url(), "", "");
    let base = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{base}{}", policy_toml("enforce", &[&our_key]))).unwrap();
    let server = Process::start_with_config(&config);
    for reference in ["1".to_owned(), signed.clone()] {
        let url = server.url(&format!("/v2/library/signed/manifests/{reference}"));
        for _ in 0..3 {
            let ok = get_with(&url, &[ACCEPT]).await;
            assert_eq!(ok.status, 200, "{ok:?}");
            let said = ok.header("x-regcache-policy").unwrap_or_default();
            assert!(said.contains("key cosign.pub"), "{said}");
        }
    }

    std::fs::write(&config, format!("{base}{}", policy_toml("enforce", &[&their_key]))).unwrap();
    server.signal("HUP");
    for reference in ["1".to_owned(), signed.clone()] {
        let url = server.url(&format!("/v2/library/signed/manifests/{reference}"));
        let m = denial(&until_status(&url, 403, "the reload to the other key").await);
        assert!(m.contains(&signed), "{m}");
    }

    std::fs::write(&config, format!("{base}{}", policy_toml("enforce", &[&our_key]))).unwrap();
    server.signal("HUP");
    let back = until_status(&server.url("/v2/library/signed/manifests/1"), 200, "the reload back").await;
    let said = back.header("x-regcache-policy").unwrap_or_default();
    assert!(said.contains("key cosign.pub"), "{said}");
}

/// `check-config` names a bad policy's key.
#[test]
fn check_config_names_a_bad_policy() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[policy]]\nmatch = \"docker.io/library/*\"\nkeys = [\"/nonexistent/cosign.pub\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy[0].keys[0]") && err.contains("/nonexistent/cosign.pub"),
        "{err}"
    );
}

/// A real Sigstore bundle (cosign's attestation of go-containerregistry's empty image, in
/// the shared fixtures) attached as an OCI referrer of that image, which the fake upstream
/// serves byte for byte: it verifies, offline, for its signer's identity only.
#[tokio::test]
async fn a_real_sigstore_bundle_among_the_referrers_verifies_the_image() {
    let up = FakeUpstream::start().await;
    // go-containerregistry's `empty.Image`, whose digest the bundle's subject names.
    let config = br#"{"architecture":"","created":"0001-01-01T00:00:00Z","os":"","rootfs":{"type":"layers","diff_ids":null},"config":{}}"#;
    let config_digest = up.add_blob(config);
    let docker = "application/vnd.docker.distribution.manifest.v2+json";
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{docker}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{},"digest":"{config_digest}"}},"layers":[]}}"#,
        config.len()
    );
    let subject = up.add_manifest("library/empty", "latest", docker, manifest.as_bytes());
    assert_eq!(
        subject,
        "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"
    );
    let bundle = std::fs::read(fixtures().join("cosign-oci-attestation/oci-attestation.sigstore.json")).unwrap();
    let bundle_type = "application/vnd.dev.sigstore.bundle.v0.3+json";
    let empty = up.add_blob(b"{}");
    let referrer = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": bundle_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": empty},
        "layers": [{"mediaType": bundle_type, "size": bundle.len(), "digest": up.add_blob(&bundle)}],
        "subject": {"mediaType": docker, "size": manifest.len(), "digest": subject},
    }))
    .unwrap();
    let referrer_digest = up.add_manifest("library/empty", "bundle-holder", OCI_MANIFEST, &referrer);
    up.add_referrer(
        "library/empty",
        &subject,
        serde_json::json!({"mediaType": OCI_MANIFEST, "size": referrer.len(), "digest": referrer_digest, "artifactType": bundle_type}),
    );
    let root = fixtures().join("trusted_root/production.trusted_root.json");
    for (subject_name, expect) in [("cody@soyland.com", 200), ("someone@example.com", 403)] {
        let dir = tempfile::tempdir().unwrap();
        let policy = format!(
            "[[policy]]\nname = \"keyless\"\nmatch = \"docker.io/library/*\"\ntrusted_root = {:?}\n\
             identities = [{{ issuer = \"https://github.com/login/oauth\", subject = \"{subject_name}\" }}]\n",
            root.display().to_string()
        );
        let proxy = proxy_with(&up, dir.path(), "5m", &policy).await;
        let r = get_with(&proxy.url("/v2/library/empty/manifests/latest"), &[FIXTURE_ACCEPT]).await;
        assert_eq!(r.status, expect, "{subject_name}: {r:?}");
        if expect == 200 {
            assert_eq!(sha256(r.bytes()), subject);
            let said = r.header("x-regcache-policy").unwrap_or_default();
            assert!(
                said.contains("cody@soyland.com from https://github.com/login/oauth"),
                "{said}"
            );
            assert_eq!(
                get(&proxy.url(&format!("/v2/library/empty/blobs/{config_digest}")))
                    .await
                    .status,
                200
            );
        } else {
            assert!(denial(&r).contains("wrong identity"));
        }
        proxy.stop().await;
    }
}

/// `[cache] layers_ahead` under an enforcing policy: the blobs of a manifest the policy
/// admitted are fetched ahead once its layer is asked for; those of a denied one are never
/// fetched.
#[tokio::test]
async fn only_an_admitted_manifest_has_its_layers_fetched_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (up, key, _, signed_blobs, unsigned_blobs) = signed_and_unsigned(dir.path()).await;
    let proxy = proxy_with_keys(
        &up,
        dir.path(),
        "5m",
        "layers_ahead = 4",
        &policy_toml("enforce", &[&key]),
    )
    .await;
    denial(&get_with(&proxy.url("/v2/library/unsigned/manifests/1"), &[ACCEPT]).await);
    let ok = get_with(&proxy.url("/v2/library/signed/manifests/1"), &[ACCEPT]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let fetched = |blobs: &[String]| {
        blobs
            .iter()
            .map(|b| up.count("GET", &format!("/blobs/{b}")))
            .sum::<usize>()
    };
    let layer = get(&proxy.url(&format!("/v2/library/signed/blobs/{}", signed_blobs[1]))).await;
    assert_eq!(layer.status, 200);
    // The config, which nobody asked for, is fetched ahead.
    wait_until(|| fetched(&signed_blobs) == 2 && proxy.proxy.fills_in_flight() == 0).await;
    assert_eq!(fetched(&unsigned_blobs), 0, "a denied image's blobs were fetched");
    assert_eq!(proxy.metric("regcache_layers_ahead_total"), 1.0);
}
