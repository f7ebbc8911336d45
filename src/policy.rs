//! Signature policy at the mirror (`[[policy]]`): which policy governs an (upstream, repo),
//! fetching an image's signatures through the cache (legacy `sha256-<hex>.sig` tags and
//! Sigstore bundles among its OCI referrers), the verdicts (kept per (digest, policy), so
//! a warm pull pays a map lookup), and the blobs that verified manifests admit.
//!
//! A manifest passes when it carries a valid signature by the policy's trust, or when an
//! index that passed lists it; its config and layers then pass too. Signatures and their
//! attachments themselves pass (they are what clients such as cosign fetch to check).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::cache::Manifest;
use crate::config::{PolicyConfig, PolicyMode};
use crate::digest::Digest;
use crate::oci::{AcceptSet, Reference};
use crate::proxy::{Error, Proxy};
use crate::signatures::{Identity, PublicKey, Refusal, Signature, Subject, Trust};
use crate::upstream::Target;

/// The artifact type and layer media type of a Sigstore bundle referrer (cosign v3).
pub const BUNDLE_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const SIMPLE_SIGNING_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Media types of what signers attach to an image: signatures, attestations, SBOMs.
const ATTACHMENT_TYPES: [&str; 7] = [
    SIMPLE_SIGNING_TYPE,
    BUNDLE_TYPE,
    "application/vnd.dev.sigstore.bundle+json",
    "application/vnd.dsse.envelope.v1+json",
    "application/vnd.in-toto+json",
    "text/spdx+json",
    "application/vnd.cyclonedx+json",
];
/// Largest signature, payload or bundle read.
const MAX_SIGNATURE_BYTES: u64 = 1 << 20;
/// How long a refusal is remembered: a signature may be pushed just after its image.
const REFUSAL_TTL: Duration = Duration::from_secs(30);

/// One `[[policy]]`.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    pub pattern: String,
    pub mode: PolicyMode,
    pub trust: Trust,
    /// Differs whenever the policy's text or the files it names change: verdicts are kept
    /// under it, so a changed policy judges afresh.
    pub generation: u64,
    /// Its `verified` counter, looked up once (a warm pull counts without a label lookup).
    verified: std::sync::OnceLock<prometheus::IntCounter>,
    /// How narrowly `pattern` matches (more literal characters: more narrowly; no `*`:
    /// most), to pick the most specific of the policies that match a name.
    specificity: usize,
}

impl Policy {
    fn verified(&self, metrics: &crate::metrics::Metrics) -> &prometheus::IntCounter {
        self.verified.get_or_init(|| {
            metrics
                .policy_decisions
                .with_label_values(&[&self.name, "verified", ""])
        })
    }

    pub fn describe(&self) -> String {
        let mut trust: Vec<String> = self.trust.keys.iter().map(|k| format!("key {}", k.name)).collect();
        trust.extend(self.trust.identities.iter().map(|i| i.to_string()));
        format!(
            "{} = {:?}, mode {}, trusts {}",
            self.name,
            self.pattern,
            mode_name(self.mode),
            if trust.is_empty() {
                "nothing".into()
            } else {
                trust.join(", ")
            }
        )
    }
}

pub fn mode_name(mode: PolicyMode) -> &'static str {
    match mode {
        PolicyMode::Enforce => "enforce",
        PolicyMode::Warn => "warn",
        PolicyMode::Off => "off",
    }
}

/// The configured policies.
#[derive(Debug, Default)]
pub struct Policies {
    list: Vec<Arc<Policy>>,
}

impl Policies {
    /// Reads the policies and the files they name; an error is (config key, why).
    pub fn from_config(configs: &[PolicyConfig]) -> Result<Policies, (String, String)> {
        let mut list = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let key = |k: &str| format!("policy[{i}].{k}");
            if c.pattern.is_empty() || !c.pattern.contains('/') {
                return Err((
                    key("match"),
                    format!("{:?} is not a pattern like \"docker.io/library/*\"", c.pattern),
                ));
            }
            let mut text = serde_json::to_vec(c).unwrap_or_default();
            let mut keys = Vec::new();
            for (j, path) in c.keys.iter().enumerate() {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| (format!("policy[{i}].keys[{j}]"), format!("{}: {e}", path.display())))?;
                let name = path
                    .file_name()
                    .map_or(path.display().to_string(), |n| n.to_string_lossy().into_owned());
                keys.push(
                    PublicKey::from_pem(&name, &pem)
                        .map_err(|e| (format!("policy[{i}].keys[{j}]"), format!("{}: {e}", path.display())))?,
                );
                text.extend_from_slice(pem.as_bytes());
            }
            let mut identities = Vec::new();
            for (j, id) in c.identities.iter().enumerate() {
                let subject = match (&id.subject, &id.subject_regex) {
                    (Some(s), None) => Subject::Exact(s.clone()),
                    (None, Some(r)) => Subject::Regex(
                        regex_lite::Regex::new(r)
                            .map_err(|e| (format!("policy[{i}].identities[{j}].subject_regex"), e.to_string()))?,
                    ),
                    _ => {
                        return Err((
                            format!("policy[{i}].identities[{j}]"),
                            "needs exactly one of subject and subject_regex".into(),
                        ))
                    }
                };
                identities.push(Identity {
                    issuer: id.issuer.clone(),
                    subject,
                });
            }
            let root = match &c.trusted_root {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| (key("trusted_root"), format!("{}: {e}", path.display())))?,
                ),
                None => None,
            };
            if c.mode != PolicyMode::Off && keys.is_empty() && identities.is_empty() {
                return Err((
                    key("keys"),
                    "an enforcing or warning policy needs keys or identities".into(),
                ));
            }
            text.extend_from_slice(root.as_deref().unwrap_or_default().as_bytes());
            let trust = Trust::new(keys, identities, root.as_deref()).map_err(|e| {
                let k = if e.contains("trusted_root") {
                    "identities"
                } else {
                    "trusted_root"
                };
                (key(k), e)
            })?;
            let digest = Digest::sha256_of(&text);
            let generation = u64::from_str_radix(&digest.hex()[..16], 16).unwrap_or_default();
            list.push(Arc::new(Policy {
                name: c.name.clone().unwrap_or_else(|| format!("policy-{i}")),
                pattern: c.pattern.clone(),
                mode: c.mode,
                trust,
                generation,
                verified: Default::default(),
                specificity: c.pattern.chars().filter(|c| *c != '*').count()
                    + usize::from(!c.pattern.contains('*')) * 10_000,
            }));
        }
        Ok(Policies { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn list(&self) -> &[Arc<Policy>] {
        &self.list
    }

    /// The most specific policy whose pattern matches `<upstream>/<repo>`.
    pub fn governing(&self, upstream: &str, repo: &str) -> Option<&Arc<Policy>> {
        self.list
            .iter()
            .filter(|p| crate::access::name_matches(&p.pattern, upstream, repo))
            .max_by_key(|p| p.specificity)
    }
}

/// The header a manifest answer under a policy carries: what the policy said
/// (`verified: key cosign.pub (policy library)`, or why it only warned).
pub const POLICY_HEADER: http::HeaderName = http::HeaderName::from_static("x-regcache-policy");

/// A manifest that passed, and by whom.
struct Passed {
    /// What its answers say (the [`POLICY_HEADER`] value), made once.
    detail: http::HeaderValue,
    /// Its answers' headers, the policy's among them, made at its first answer: a warm hit
    /// clones them rather than inserting one more header into a clone of the manifest's.
    headers: std::sync::OnceLock<http::HeaderMap>,
    /// Whether its config and layers were admitted (once, on its first use).
    blobs_admitted: AtomicBool,
}

impl Passed {
    fn new(signer: String, policy: &Policy) -> Arc<Passed> {
        let text = format!("verified: {signer} (policy {})", policy.name);
        Arc::new(Passed {
            detail: http::HeaderValue::from_str(&text).unwrap_or(http::HeaderValue::from_static("verified")),
            headers: std::sync::OnceLock::new(),
            blobs_admitted: AtomicBool::new(false),
        })
    }
}

/// `manifest`'s answer headers with the policy's `detail` added.
fn with_detail(manifest: &Manifest, detail: http::HeaderValue) -> http::HeaderMap {
    let mut headers = manifest.headers.clone();
    headers.insert(POLICY_HEADER, detail);
    headers
}

/// What a policy decided for one request, for its access-log field and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Verified,
    Warned,
    Denied,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Verified => "verified",
            Decision::Warned => "warned",
            Decision::Denied => "denied",
        }
    }
}

/// The policy generations a manifest passed, each with its verdict.
type Verdicts = Arc<[(u64, Arc<Passed>)]>;

/// Hands out [`Gate`] versions.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's copy of the policies in force, with the [`Gate`] version it is of.
    static IN_FORCE: std::cell::RefCell<Option<(u64, Arc<Policies>)>> = const { std::cell::RefCell::new(None) };
}

fn passed_in(verdicts: &Verdicts, generation: u64) -> Option<Arc<Passed>> {
    verdicts.iter().find(|(g, _)| *g == generation).map(|(_, p)| p.clone())
}

/// The verdict on one manifest, kept with its in-memory copy (the manifest's `verdicts`):
/// a warm hit under a policy reads it there, without a lookup in the gate's table and
/// without writing to memory other threads read (a lock or a reference count here bounced
/// between the CPUs on every hit). Set once, for the policy generation that first passed
/// the manifest; under another generation (after a reload changed the policy) hits go to
/// the table, which stays the record.
#[derive(Default)]
pub struct VerdictCopy(std::sync::OnceLock<(u64, Arc<Passed>)>);

impl std::fmt::Debug for VerdictCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("VerdictCopy")
            .field(&self.0.get().map(|(g, _)| *g))
            .finish()
    }
}

impl VerdictCopy {
    fn passed(&self, generation: u64) -> Option<&Passed> {
        self.0.get().filter(|(g, _)| *g == generation).map(|(_, p)| &**p)
    }

    fn keep(&self, generation: u64, passed: &Arc<Passed>) {
        let _ = self.0.set((generation, passed.clone()));
    }
}

/// The policies in force (replaced whole on a reload) and what they decided.
pub struct Gate {
    policies: RwLock<Arc<Policies>>,
    /// Which policies are in force, unique across gates and reloads (see [`IN_FORCE`]).
    version: AtomicU64,
    /// Quick test for the common case of no policy at all.
    any: AtomicBool,
    /// Manifests that passed, by digest: a verdict per generation of the policies in force
    /// that passed it (nearly always one). Keyed by the digest alone, so that a warm hit
    /// looks its verdict up without a copy of the digest, hashed the digest's cheap way.
    passed: moka::sync::Cache<Digest, Verdicts, crate::digest::DigestHashing>,
    refused: moka::sync::Cache<(Digest, u64), Refusal>,
    blobs: moka::sync::Cache<(Digest, u64), ()>,
    flights: crate::single_flight::SingleFlight<(Digest, u64), Result<String, Refusal>>,
}

impl Gate {
    pub fn new(policies: Policies) -> Gate {
        Gate {
            version: AtomicU64::new(NEXT_VERSION.fetch_add(1, Ordering::Relaxed)),
            any: AtomicBool::new(!policies.is_empty()),
            policies: RwLock::new(Arc::new(policies)),
            passed: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .build_with_hasher(crate::digest::DigestHashing),
            refused: moka::sync::Cache::builder()
                .max_capacity(1 << 16)
                .time_to_live(REFUSAL_TTL)
                .build(),
            blobs: moka::sync::Cache::new(1 << 22),
            flights: Default::default(),
        }
    }

    pub fn policies(&self) -> Arc<Policies> {
        self.policies.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts new policies in force; verdicts of unchanged policies stay valid (same
    /// generation), the others are judged afresh.
    pub fn replace(&self, policies: Policies) {
        self.any.store(!policies.is_empty(), Ordering::Relaxed);
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policies);
        self.version
            .store(NEXT_VERSION.fetch_add(1, Ordering::Relaxed), Ordering::Release);
        self.refused.invalidate_all();
    }

    /// Runs `f` on the policies in force, from this thread's copy of them: a warm hit reads
    /// one counter that only a reload writes, instead of taking the lock and a reference.
    /// `f` must not come back here (the copy is borrowed while it runs).
    fn with_in_force<T>(&self, f: impl FnOnce(&Policies) -> T) -> T {
        // Read before the policies: `replace` writes them before it moves the version on,
        // so a copy is never older than the version it is filed under.
        let version = self.version.load(Ordering::Acquire);
        IN_FORCE.with(|copy| {
            let mut copy = copy.borrow_mut();
            if copy.as_ref().is_some_and(|(v, _)| *v != version) {
                *copy = None;
            }
            let (_, policies) = copy.get_or_insert_with(|| (version, self.policies()));
            f(policies)
        })
    }

    /// The verdict that `digest` passed `generation`, if it did.
    fn passed(&self, digest: &Digest, generation: u64) -> Option<Arc<Passed>> {
        passed_in(&self.passed.get(digest)?, generation)
    }

    /// Keeps that `digest` passed `generation`; the verdict kept (an earlier one, if another
    /// flight got there first). Verdicts of generations no longer in force are dropped.
    fn keep_passed(&self, digest: Digest, generation: u64, passed: Arc<Passed>) -> Arc<Passed> {
        if let Some(earlier) = self.passed(&digest, generation) {
            return earlier;
        }
        let in_force = self.policies();
        let mut verdicts: Vec<(u64, Arc<Passed>)> = self
            .passed
            .get(&digest)
            .map(|v| {
                v.iter()
                    .filter(|(g, _)| in_force.list.iter().any(|p| p.generation == *g))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        verdicts.push((generation, passed.clone()));
        self.passed.insert(digest, verdicts.into());
        passed
    }

    fn governing(&self, target: &Target) -> Option<Arc<Policy>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let policies = self.policies();
        policies
            .governing(&target.upstream.name, target.repo.as_str())
            .filter(|p| p.mode != PolicyMode::Off)
            .cloned()
    }
}

/// The outcome of a check, as a manifest response reports it.
pub struct Admission {
    pub decision: Decision,
    /// A manifest answer's headers, with what the policy said in [`POLICY_HEADER`]
    /// (`verified: key cosign.pub (policy library)` and the like); `None` for a blob.
    pub headers: Option<http::HeaderMap>,
}

impl Proxy {
    /// Whether `manifest`, asked for under `target`, may be served under the policy that
    /// governs the target. `Ok(None)`: no policy applies.
    pub async fn admit_manifest(&self, target: &Target, manifest: &Arc<Manifest>) -> Result<Option<Admission>, Error> {
        if !self.gate.any.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // A warm hit: the verdict kept with the manifest, under the policy in force.
        let judged = self.gate.with_in_force(|policies| {
            let policy = policies
                .governing(&target.upstream.name, target.repo.as_str())
                .filter(|p| p.mode != PolicyMode::Off)?;
            Some(match manifest.verdicts.passed(policy.generation) {
                Some(passed) => Ok(self.admitted(policy, passed, manifest)),
                None => Err(policy.clone()),
            })
        });
        let policy = match judged {
            None => return Ok(None),
            Some(Ok(admission)) => return Ok(Some(admission)),
            Some(Err(policy)) => policy,
        };
        let verdict = match self.gate.passed(&manifest.digest, policy.generation) {
            Some(passed) => Ok(passed),
            None => match self.gate.refused.get(&(manifest.digest.clone(), policy.generation)) {
                Some(refusal) => Err(refusal),
                None => Box::pin(self.judge(target, &policy, manifest)).await,
            },
        };
        match verdict {
            Ok(passed) => {
                manifest.verdicts.keep(policy.generation, &passed);
                Ok(Some(self.admitted(&policy, &passed, manifest)))
            }
            Err(refusal) => self.refuse(
                &policy,
                target,
                &format!("{}@{}", target.repo, manifest.digest),
                &refusal,
                Some(manifest),
            ),
        }
    }

    /// A manifest that passed `policy`, served: counted, its parts admitted (once), and its
    /// answer's headers saying so.
    fn admitted(&self, policy: &Policy, passed: &Passed, manifest: &Manifest) -> Admission {
        // Read before written: a flag every hit swapped would bounce between the CPUs.
        if !passed.blobs_admitted.load(Ordering::Relaxed) && !passed.blobs_admitted.swap(true, Ordering::Relaxed) {
            self.admit_parts(policy, manifest);
        }
        policy.verified(&self.metrics).inc();
        let headers = passed
            .headers
            .get_or_init(|| with_detail(manifest, passed.detail.clone()));
        Admission {
            decision: Decision::Verified,
            headers: Some(headers.clone()),
        }
    }

    /// Whether blob `digest` may be served under `target`'s policy: only as part of a
    /// manifest that passed it.
    pub fn admit_blob(&self, target: &Target, digest: &Digest) -> Result<Option<Admission>, Error> {
        let Some(policy) = self.gate.governing(target) else {
            return Ok(None);
        };
        if self.gate.blobs.contains_key(&(digest.clone(), policy.generation)) {
            policy.verified(&self.metrics).inc();
            return Ok(Some(Admission {
                decision: Decision::Verified,
                headers: None,
            }));
        }
        let refusal = Refusal::NoSignature;
        let what =
            format!("blob {digest} (no manifest that passed lists it; pull the image by its tag or digest first)");
        self.refuse(&policy, target, &what, &refusal, None)
    }

    /// Denies `what`, or under a warning policy serves it, with the reason in `manifest`'s
    /// answer headers (a blob's answer has none).
    fn refuse(
        &self,
        policy: &Policy,
        target: &Target,
        what: &str,
        refusal: &Refusal,
        manifest: Option<&Manifest>,
    ) -> Result<Option<Admission>, Error> {
        let message = format!(
            "policy {:?} refuses {}/{what}: {refusal}",
            policy.name, target.upstream.name
        );
        match policy.mode {
            PolicyMode::Warn => {
                self.metrics
                    .policy_decisions
                    .with_label_values(&[&policy.name, "warned", refusal.reason()])
                    .inc();
                tracing::warn!(policy = %policy.name, reason = refusal.reason(), "{message} (mode warn: served)");
                let detail = http::HeaderValue::from_str(&format!("warned: {refusal} (policy {})", policy.name)).ok();
                Ok(Some(Admission {
                    decision: Decision::Warned,
                    headers: manifest.zip(detail).map(|(m, detail)| with_detail(m, detail)),
                }))
            }
            _ => {
                self.metrics
                    .policy_decisions
                    .with_label_values(&[&policy.name, "denied", refusal.reason()])
                    .inc();
                tracing::info!(policy = %policy.name, reason = refusal.reason(), "{message}");
                Err(Error::Denied(message))
            }
        }
    }

    /// Verifies a manifest not judged yet (one flight per (digest, policy)) and keeps the
    /// verdict.
    async fn judge(
        &self,
        target: &Target,
        policy: &Arc<Policy>,
        manifest: &Arc<Manifest>,
    ) -> Result<Arc<Passed>, Refusal> {
        let key = (manifest.digest.clone(), policy.generation);
        let verdict = self
            .gate
            .flights
            .run(key.clone(), || async {
                // The signatures' own fetches are not what the client's request did.
                let outer = crate::proxy::current_lookup_result();
                let verdict = self.verify(target, policy, manifest).await;
                crate::proxy::restore_lookup_result(outer);
                verdict
            })
            .await;
        match verdict {
            Ok(signer) => {
                // Another flight may already have admitted it.
                let (digest, generation) = key;
                Ok(self.gate.keep_passed(digest, generation, Passed::new(signer, policy)))
            }
            Err(refusal) => {
                self.gate.refused.insert(key, refusal.clone());
                Err(refusal)
            }
        }
    }

    async fn verify(&self, target: &Target, policy: &Arc<Policy>, manifest: &Arc<Manifest>) -> Result<String, Refusal> {
        let doc: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap_or_default();
        if is_attachment(&doc) {
            return Ok("an attachment (signature, attestation or SBOM)".into());
        }
        let digest = &manifest.digest;
        let (found, unavailable) = self.signatures_of(target, policy, digest).await;
        if found.is_empty() {
            return Err(match unavailable {
                Some(why) => Refusal::Untrusted(format!("no signature could be fetched ({why})")),
                None => Refusal::NoSignature,
            });
        }
        let (policy2, digest2) = (policy.clone(), digest.clone());
        let verdict = tokio::task::spawn_blocking(move || {
            let mut best: Option<Refusal> = None;
            for sig in &found {
                let checked = match sig {
                    Found::SimpleSigning { payload, annotations } => policy2
                        .trust
                        .verify(&Signature::SimpleSigning { payload, annotations }, &digest2),
                    Found::Bundle(json) => policy2.trust.verify(&Signature::Bundle(json), &digest2),
                };
                match checked {
                    Ok(signer) => return Ok(signer),
                    Err(r) => {
                        if best.as_ref().is_none_or(|b| r.weight() > b.weight()) {
                            best = Some(r);
                        }
                    }
                }
            }
            Err(best.unwrap_or(Refusal::NoSignature))
        })
        .await
        .unwrap_or_else(|e| Err(Refusal::Malformed(format!("verification failed: {e}"))))?;
        // An index that passed vouches for the manifests it lists.
        for (_, child) in descriptors(&doc, "manifests") {
            let passed = Passed::new(format!("listed by {digest}, {verdict}"), policy);
            self.gate.keep_passed(child, policy.generation, passed);
        }
        Ok(verdict)
    }

    /// Admits the config and layers of a manifest that passed.
    fn admit_parts(&self, policy: &Policy, manifest: &Manifest) {
        let doc: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap_or_default();
        let config = doc["config"]["digest"].as_str().and_then(|d| d.parse::<Digest>().ok());
        for d in config.into_iter().chain(descriptors(&doc, "layers").map(|(_, d)| d)) {
            self.gate.blobs.insert((d, policy.generation), ());
        }
    }

    /// The signatures of `digest` in `target`'s repository, fetched through the cache:
    /// the legacy `.sig` tag's layers and the Sigstore bundles among its referrers. The
    /// second value says why some could not be fetched.
    async fn signatures_of(&self, target: &Target, policy: &Policy, digest: &Digest) -> (Vec<Found>, Option<String>) {
        let mut found = Vec::new();
        let mut unavailable = None;
        let tag = Reference::Tag(format!("{}-{}.sig", digest.algorithm().name(), digest.hex()));
        match self.manifest(target, &tag, AcceptSet::ALL).await {
            Ok(answer) => {
                // The signature manifest and its layers are what a client checks, too.
                self.admit_parts(policy, &answer.manifest);
                let doc: serde_json::Value = serde_json::from_slice(&answer.manifest.bytes).unwrap_or_default();
                for (layer, d) in descriptors(&doc, "layers") {
                    if layer["mediaType"] != SIMPLE_SIGNING_TYPE {
                        continue;
                    }
                    match self.small_blob(target, &d).await {
                        Ok(payload) => found.push(Found::SimpleSigning {
                            payload,
                            annotations: layer["annotations"].as_object().cloned().unwrap_or_default(),
                        }),
                        Err(e) => unavailable = Some(e.to_string()),
                    }
                }
            }
            Err(Error::ManifestUnknown(_)) => {}
            Err(e) => unavailable = Some(e.to_string()),
        }
        match self.referrers(target, digest, Some(BUNDLE_TYPE)).await {
            Ok(answer) => {
                let doc: serde_json::Value = serde_json::from_slice(&answer.manifest.bytes).unwrap_or_default();
                for (referrer, d) in descriptors(&doc, "manifests") {
                    if referrer["artifactType"] != BUNDLE_TYPE {
                        continue;
                    }
                    let m = match self.manifest(target, &Reference::Digest(d), AcceptSet::ALL).await {
                        Ok(m) => m.manifest,
                        Err(e) => {
                            unavailable = Some(e.to_string());
                            continue;
                        }
                    };
                    self.admit_parts(policy, &m);
                    let doc: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
                    for (layer, d) in descriptors(&doc, "layers") {
                        if !layer["mediaType"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("application/vnd.dev.sigstore.bundle"))
                        {
                            continue;
                        }
                        match self.small_blob(target, &d).await {
                            Ok(json) => found.push(Found::Bundle(json)),
                            Err(e) => unavailable = Some(e.to_string()),
                        }
                    }
                }
            }
            Err(Error::ManifestUnknown(_) | Error::NameUnknown(_)) => {}
            Err(e) => unavailable = Some(e.to_string()),
        }
        (found, unavailable)
    }

    /// A small blob's bytes, fetched and verified through the cache like any other.
    async fn small_blob(&self, target: &Target, digest: &Digest) -> Result<Vec<u8>, Error> {
        use crate::proxy::BlobAnswer;
        let (file, progress) = match self.blob(target, digest, crate::proxy::Want::Whole).await? {
            BlobAnswer::File { file, progress, .. } => (file, progress),
            BlobAnswer::PassThrough(_) => return Err(Error::Overloaded("the cache disk cannot take data".into())),
            BlobAnswer::Bucket { bucket, total } => {
                if total > MAX_SIGNATURE_BYTES {
                    return Err(Error::BadContent {
                        upstream: String::new(),
                        message: format!("signature blob {digest} is {total} bytes"),
                    });
                }
                let unreadable = |e: String| Error::Overloaded(format!("the shared bucket failed: {e}"));
                let bytes = bucket
                    .get_bytes(crate::cache::blob_store::Kind::Blob, digest)
                    .await
                    .map_err(unreadable)?
                    .ok_or_else(|| Error::BlobUnknown(digest.to_string()))?;
                if !digest.matches(&bytes) {
                    return Err(Error::BlobUnknown(digest.to_string()));
                }
                return Ok(bytes.to_vec());
            }
        };
        let mut total = None;
        if let Some(mut progress) = progress {
            use crate::cache::fill::State;
            let done = progress
                .wait_for(|p| matches!(p.state, State::Done | State::Failed(_)))
                .await
                .map(|p| (p.total, matches!(p.state, State::Done)));
            match done {
                Ok((t, true)) => total = t,
                _ => return Err(Error::BlobUnknown(digest.to_string())),
            }
        }
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            let len = match total {
                Some(t) => t,
                None => file.metadata()?.len(),
            };
            if len > MAX_SIGNATURE_BYTES {
                return Err(Error::BadContent {
                    upstream: String::new(),
                    message: format!("signature blob {digest} is {len} bytes"),
                });
            }
            let mut bytes = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, 0)?;
            if !digest.matches(&bytes) {
                return Err(Error::BlobUnknown(digest.to_string()));
            }
            Ok(bytes)
        })
        .await
        .unwrap_or_else(|e| Err(Error::Overloaded(e.to_string())))
    }
}

/// A signature as fetched, owned, for the blocking pool.
enum Found {
    SimpleSigning {
        payload: Vec<u8>,
        annotations: serde_json::Map<String, serde_json::Value>,
    },
    Bundle(Vec<u8>),
}

/// The descriptors of a manifest's `key` list (`layers`, `manifests`) with a valid digest.
fn descriptors<'a>(doc: &'a serde_json::Value, key: &str) -> impl Iterator<Item = (&'a serde_json::Value, Digest)> {
    doc[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d, d["digest"].as_str()?.parse::<Digest>().ok()?)))
}

/// A manifest that holds only signatures, attestations or SBOMs: nothing to run.
fn is_attachment(doc: &serde_json::Value) -> bool {
    if doc.get("manifests").is_some() {
        return false;
    }
    if doc["artifactType"]
        .as_str()
        .is_some_and(|t| ATTACHMENT_TYPES.contains(&t))
    {
        return true;
    }
    match doc["layers"].as_array() {
        Some(layers) if !layers.is_empty() => layers
            .iter()
            .all(|l| l["mediaType"].as_str().is_some_and(|t| ATTACHMENT_TYPES.contains(&t))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdentityConfig;

    fn key_file() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/sigstore/cosign-simplesigning/cosign.pub")
    }

    fn config(pattern: &str, mode: PolicyMode) -> PolicyConfig {
        PolicyConfig {
            name: None,
            pattern: pattern.into(),
            mode,
            keys: vec![key_file()],
            identities: vec![],
            trusted_root: None,
        }
    }

    #[test]
    fn the_most_specific_policy_governs() {
        let p = Policies::from_config(&[
            config("docker.io/*", PolicyMode::Warn),
            config("docker.io/library/*", PolicyMode::Enforce),
            config("docker.io/library/busybox", PolicyMode::Off),
        ])
        .unwrap();
        assert_eq!(p.governing("docker.io", "library/alpine").unwrap().name, "policy-1");
        assert_eq!(p.governing("docker.io", "acme/app").unwrap().name, "policy-0");
        assert_eq!(p.governing("docker.io", "library/busybox").unwrap().name, "policy-2");
        assert!(p.governing("ghcr.io", "library/alpine").is_none());
    }

    #[test]
    fn bad_policies_name_their_key() {
        let mut c = config("docker.io/*", PolicyMode::Enforce);
        c.keys = vec!["/nonexistent/cosign.pub".into()];
        assert_eq!(Policies::from_config(&[c]).unwrap_err().0, "policy[0].keys[0]");
        let mut c = config("docker.io/*", PolicyMode::Enforce);
        c.keys.clear();
        assert_eq!(Policies::from_config(&[c]).unwrap_err().0, "policy[0].keys");
        let mut c = config("docker.io/*", PolicyMode::Enforce);
        c.identities = vec![IdentityConfig {
            issuer: "https://accounts.google.com".into(),
            subject: Some("me@example.com".into()),
            subject_regex: None,
        }];
        assert_eq!(Policies::from_config(&[c]).unwrap_err().0, "policy[0].identities");
        assert_eq!(
            Policies::from_config(&[config("alpine", PolicyMode::Enforce)])
                .unwrap_err()
                .0,
            "policy[0].match"
        );
    }

    #[test]
    fn a_changed_policy_has_a_new_generation() {
        let a = Policies::from_config(&[config("docker.io/*", PolicyMode::Enforce)]).unwrap();
        let b = Policies::from_config(&[config("docker.io/*", PolicyMode::Enforce)]).unwrap();
        let c = Policies::from_config(&[config("docker.io/*", PolicyMode::Warn)]).unwrap();
        assert_eq!(a.list[0].generation, b.list[0].generation);
        assert_ne!(a.list[0].generation, c.list[0].generation);
    }

    #[test]
    fn only_signature_and_attestation_manifests_are_attachments() {
        let sig = serde_json::json!({"layers": [{"mediaType": SIMPLE_SIGNING_TYPE}]});
        let bundle = serde_json::json!({"artifactType": BUNDLE_TYPE, "layers": [{"mediaType": BUNDLE_TYPE}]});
        let image = serde_json::json!({"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}, {"mediaType": SIMPLE_SIGNING_TYPE}]});
        let empty = serde_json::json!({"layers": []});
        let index = serde_json::json!({"manifests": [], "artifactType": BUNDLE_TYPE});
        assert!(is_attachment(&sig) && is_attachment(&bundle));
        assert!(!is_attachment(&image) && !is_attachment(&empty) && !is_attachment(&index));
    }
}
