//! Invariant: any signature a registry serves (a Sigstore bundle, or a cosign `.sig`
//! layer's payload and annotations) is verified or refused, never a panic, under a policy
//! that trusts the fixtures' keys and signers (so that the real signatures used as seeds
//! reach the deepest checks).
//!
//! Input: one byte, then the rest. Bit 0 of the byte picks the format (0: the rest is a
//! bundle's JSON; 1: the rest is the payload, signature, certificate and Rekor bundle
//! annotations, split at 0xFF bytes, an empty part being an absent annotation); bit 1 the
//! policy (0: keys and signers under the production trusted root; 1: keys alone, no root);
//! the other bits the digest asked about, among the fixtures' signed digests.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use regcache::digest::Digest;
use regcache::signatures::{Identity, PublicKey, Signature, Subject, Trust, SIGNATURE_ANNOTATION};

struct Setup {
    rooted: Trust,
    keys_only: Trust,
    digests: Vec<Digest>,
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/sigstore")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(fixture(path)).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let keys = || {
            ["cosign.pub", "cosign2.pub"]
                .map(|k| {
                    let path = format!("cosign-simplesigning/{k}");
                    PublicKey::from_pem(k, &read(&path)).expect("fixture key")
                })
                .to_vec()
        };
        let identities = [
            ("https://token.actions.githubusercontent.com", "https://github.com/kubewarden/kubewarden-controller/.github/workflows/release.yml@refs/tags/v1.34.0"),
            ("https://github.com/login/oauth", "cody@soyland.com"),
            ("https://github.com/login/oauth", "mitr@redhat.com"),
        ]
        .map(|(issuer, subject)| Identity {
            issuer: issuer.into(),
            subject: Subject::Exact(subject.into()),
        })
        .to_vec();
        let root = read("trusted_root/production.trusted_root.json");
        let rooted = Trust::new(keys(), identities, Some(&root)).expect("fixture trusted root");
        let keys_only = Trust::new(keys(), vec![], None).expect("keys");
        let mut digests: Vec<Digest> = [
            "sha256:c811d58de79c92f03214e63aa339484e488d694ae8a6283b5f3f17a9faf50172",
            "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4",
        ]
        .iter()
        .map(|d| d.parse().expect("digest"))
        .collect();
        for dir in ["dir-img-cosign-valid", "dir-img-cosign-key-rekor-valid", "dir-img-cosign-fulcio-rekor-valid"] {
            let manifest = std::fs::read(fixture(&format!("cosign-simplesigning/{dir}/manifest.json"))).expect("fixture");
            digests.push(Digest::sha256_of(&manifest));
        }
        Setup {
            rooted,
            keys_only,
            digests,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let setup = setup();
    let trust = match choice & 2 {
        0 => &setup.rooted,
        _ => &setup.keys_only,
    };
    let digest = &setup.digests[usize::from(choice >> 2) % setup.digests.len()];
    if choice & 1 == 0 {
        let _ = trust.verify(&Signature::Bundle(rest), digest);
        return;
    }
    let mut parts = rest.split(|b| *b == 0xFF);
    let payload = parts.next().unwrap_or_default();
    let mut annotations = serde_json::Map::new();
    for key in [
        SIGNATURE_ANNOTATION,
        "dev.sigstore.cosign/certificate",
        "dev.sigstore.cosign/bundle",
    ] {
        if let Some(value) = parts.next().filter(|v| !v.is_empty()) {
            annotations.insert(key.into(), String::from_utf8_lossy(value).into_owned().into());
        }
    }
    let _ = trust.verify(&Signature::SimpleSigning { payload, annotations: &annotations }, digest);
});
