//! `regcache prefetch`, run as users run it (the binary), on a cache dir and against a
//! running server: exact upstream fetches per platform, signatures and SBOMs carried by both
//! attachment schemes, a second run that fetches nothing, failures named, and the mirror
//! serving all of it afterwards with no upstream at all.

use std::path::Path;
use std::process::{Command, Output};

use crate::fake_upstream::FakeUpstream;
use crate::harness::{get, get_with, random_bytes, sha256, write_process_config, Process};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const REPO: &str = "library/multi";

pub struct Image {
    pub index: String,
    /// Blobs of each platform: (amd64, arm64), and the one layer both share.
    pub amd64: Vec<String>,
    pub arm64: Vec<String>,
    pub shared: String,
    /// Blobs of the signature attached as a referrer, and of the `.sbom` tag.
    referrer_blobs: Vec<String>,
    sbom_blobs: Vec<String>,
    /// Blobs of the signature under the `.sig` tag and of the SBOM attached as a referrer.
    pub sig_tag_blobs: Vec<String>,
    pub sbom_referrer_blobs: Vec<String>,
    referrer: String,
    sbom: String,
    /// The index, both platform manifests and all their blobs, each once.
    size: u64,
}

fn descriptor(media_type: &str, bytes: &[u8], digest: &str) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "size": bytes.len(), "digest": digest})
}

/// An image manifest over fresh blobs (plus `extra` layers already added); returns its
/// bytes and blob digests.
fn manifest(
    up: &FakeUpstream,
    seed: u64,
    extra: &[(String, usize)],
    artifact: Option<&str>,
) -> (Vec<u8>, Vec<String>, u64) {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = random_bytes(20_000 + seed as usize, seed);
    let (c, l) = (up.add_blob(&config), up.add_blob(&layer));
    let mut layers = vec![descriptor("application/vnd.oci.image.layer.v1.tar", &layer, &l)];
    for (d, size) in extra {
        layers.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": size, "digest": d}),
        );
    }
    let mut doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config, &c),
        "layers": layers,
    });
    if let Some(t) = artifact {
        doc["artifactType"] = t.into();
    }
    (
        serde_json::to_vec(&doc).unwrap(),
        vec![c, l],
        (config.len() + layer.len()) as u64,
    )
}

/// `library/multi:1`: an index of linux/amd64 and linux/arm64 (sharing one layer), signed by
/// a referrer and with an SBOM under cosign's tag scheme.
pub fn multi_platform_image(up: &FakeUpstream) -> Image {
    let shared_bytes = random_bytes(30_000, 900);
    let shared = up.add_blob(&shared_bytes);
    let extra = [(shared.clone(), shared_bytes.len())];
    let (amd, amd64, amd_blobs) = manifest(up, 1, &extra, None);
    let (arm, arm64, arm_blobs) = manifest(up, 2, &extra, None);
    let amd_digest = up.add_manifest(REPO, "amd64-only", OCI_MANIFEST, &amd);
    let arm_digest = up.add_manifest(REPO, "arm64-only", OCI_MANIFEST, &arm);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "size": amd.len(), "digest": amd_digest,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "size": arm.len(), "digest": arm_digest,
             "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }))
    .unwrap();
    let index_digest = up.add_manifest(REPO, "1", OCI_INDEX, &index);

    let size = (index.len() + amd.len() + arm.len() + shared_bytes.len()) as u64 + amd_blobs + arm_blobs;
    let (sig, referrer_blobs, _) = manifest(up, 3, &[], Some("application/vnd.dev.cosign.artifact.sig.v1+json"));
    let referrer = up.add_manifest(REPO, "sig-holder", OCI_MANIFEST, &sig);
    let mut d = descriptor(OCI_MANIFEST, &sig, &referrer);
    d["artifactType"] = "application/vnd.dev.cosign.artifact.sig.v1+json".into();
    up.add_referrer(REPO, &index_digest, d);
    let (sbom_bytes, sbom_blobs, _) = manifest(up, 4, &[], None);
    let sbom_tag = format!("sha256-{}.sbom", index_digest.trim_start_matches("sha256:"));
    let sbom = up.add_manifest(REPO, &sbom_tag, OCI_MANIFEST, &sbom_bytes);
    // And the other way round: a signature under cosign's tag, an SBOM as a referrer.
    let (sig_tagged, sig_tag_blobs, _) = manifest(up, 5, &[], None);
    up.add_manifest(
        REPO,
        &format!("sha256-{}.sig", index_digest.trim_start_matches("sha256:")),
        OCI_MANIFEST,
        &sig_tagged,
    );
    let (sbom_ref, sbom_referrer_blobs, _) = manifest(up, 6, &[], Some("application/spdx+json"));
    let sbom_ref_digest = up.add_manifest(REPO, "sbom-holder", OCI_MANIFEST, &sbom_ref);
    let mut d = descriptor(OCI_MANIFEST, &sbom_ref, &sbom_ref_digest);
    d["artifactType"] = "application/spdx+json".into();
    up.add_referrer(REPO, &index_digest, d);
    Image {
        index: index_digest,
        amd64,
        arm64,
        shared,
        referrer_blobs,
        sbom_blobs,
        sig_tag_blobs,
        sbom_referrer_blobs,
        referrer,
        sbom,
        size,
    }
}

fn prefetch(config: &Path, args: &[&str]) -> Output {
    run(config, &[&["prefetch"], args].concat())
}

/// `regcache <command> --config <config> <args…>`.
pub fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regcache"))
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .output()
        .expect("regcache runs")
}

/// `regcache <args…>` on the blocking pool; it must succeed. Its stdout.
pub async fn run_ok(config: &Path, args: &[&str]) -> String {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&config, &args)
    })
    .await
    .unwrap();
    ok(&out)
}

/// A command's stdout; it must have succeeded (else its output is the failure message).
pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A fake upstream with [`multi_platform_image`], and a cache dir (`dir/cache`, config
/// `dir/regcache.toml`) into which `regcache prefetch --all-platforms` took all of it.
pub async fn prefetched() -> (FakeUpstream, Image, tempfile::TempDir, std::path::PathBuf) {
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), &up.url(), "", "");
    run_ok(&config, &["prefetch", "--all-platforms", "library/multi:1"]).await;
    (up, image, dir, config)
}

pub fn blob_gets(up: &FakeUpstream, digest: &str) -> usize {
    up.count("GET", &format!("/blobs/{digest}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_takes_the_chosen_platforms_and_attachments_once_then_serves_them_offline() {
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), &up.url(), "", "");

    // One platform: its blobs (the shared layer once), the signature's and the SBOM's.
    let stdout = run_ok(&config, &["prefetch", "--platform", "linux/arm64", "library/multi:1"]).await;
    assert!(
        stdout.contains(&format!("docker.io/library/multi:1 {}", image.index)),
        "{stdout}"
    );
    let attached = image.referrer_blobs.iter().chain(&image.sbom_blobs);
    let attached = attached.chain(&image.sig_tag_blobs).chain(&image.sbom_referrer_blobs);
    for d in image.arm64.iter().chain(attached) {
        assert_eq!(blob_gets(&up, d), 1, "{d}");
    }
    assert_eq!(blob_gets(&up, &image.shared), 1);
    for d in &image.amd64 {
        assert_eq!(blob_gets(&up, d), 0, "amd64 was not asked for");
    }

    // Every platform: only what is new; then again: nothing at all.
    let all = |config: std::path::PathBuf| move || prefetch(&config, &["--all-platforms", "docker.io/library/multi:1"]);
    let out = tokio::task::spawn_blocking(all(config.clone())).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for d in image.amd64.iter().chain(&image.arm64).chain([&image.shared]) {
        assert_eq!(blob_gets(&up, d), 1, "{d}");
    }
    let before = up.count("GET", "/blobs/");
    let out = tokio::task::spawn_blocking(all(config.clone())).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(up.count("GET", "/blobs/"), before, "a second run fetches no blob");

    // What the cache holds, listed and totalled (read while nothing runs on it).
    let out = run(&config, &["ls", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tag1 = rows.iter().find(|r| r["tag"] == "1").expect("a line for tag 1");
    assert_eq!(tag1["repository"], "docker.io/library/multi");
    assert_eq!(tag1["digest"], image.index.as_str());
    assert_eq!(
        tag1["size"], image.size,
        "the index, its platforms and their blobs, once each"
    );
    let out = run(&config, &["ls", "docker.io/library/multi:sha256-*.sbom"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 2, "a header and the SBOM tag: {table}");
    assert!(table.contains(".sbom"), "{table}");
    let out = run(&config, &["du", "--json"]);
    let du: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let repos = du["usage"]["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 1, "{du}");
    assert_eq!(
        (repos[0]["upstream"].as_str(), repos[0]["repository"].as_str()),
        (Some("docker.io"), Some(REPO))
    );
    assert!(du["usage"]["total"].as_u64().unwrap() >= image.size);
    assert!(du["budget"].as_u64().unwrap() > 0);

    // No upstream at all: the mirror serves the image, its referrers and its SBOM tag.
    let dead = "http://127.0.0.1:9";
    let server = Process::start_with(dir.path(), dead, "", "offline = true");
    let accept = [(
        "Accept",
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
    )];
    let index = get_with(&server.url("/v2/library/multi/manifests/1"), &accept).await;
    assert_eq!(index.status, 200);
    assert_eq!(sha256(index.bytes()), image.index);
    let referrers = get(&server.url(&format!("/v2/library/multi/referrers/{}", image.index))).await;
    assert_eq!(referrers.status, 200, "{:?}", referrers.bytes());
    let listed = referrers.json()["manifests"].clone();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(listed[0]["digest"], image.referrer.as_str());
    let sig_tag = format!("sha256-{}.sig", image.index.trim_start_matches("sha256:"));
    let sig = get_with(&server.url(&format!("/v2/library/multi/manifests/{sig_tag}")), &accept).await;
    assert_eq!(sig.status, 200);
    for d in image.sig_tag_blobs.iter().chain(&image.sbom_referrer_blobs) {
        let blob = get(&server.url(&format!("/v2/library/multi/blobs/{d}"))).await;
        assert_eq!((blob.status.as_u16(), sha256(blob.bytes())), (200, d.clone()));
    }
    let sbom_tag = format!("sha256-{}.sbom", image.index.trim_start_matches("sha256:"));
    let sbom = get_with(&server.url(&format!("/v2/library/multi/manifests/{sbom_tag}")), &accept).await;
    assert_eq!((sbom.status.as_u16(), sha256(sbom.bytes())), (200, image.sbom.clone()));
    for d in image.amd64.iter().chain(&image.arm64).chain(&image.sbom_blobs) {
        let blob = get(&server.url(&format!("/v2/library/multi/blobs/{d}"))).await;
        assert_eq!((blob.status.as_u16(), sha256(blob.bytes())), (200, d.clone()));
    }

    // The catalog lists the repository under both names clients use, a page at a time.
    let page = get(&server.url("/v2/_catalog?n=1")).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.json()["repositories"],
        serde_json::json!(["docker.io/library/multi"])
    );
    let next = page.header("link").expect("a Link to the next page").to_owned();
    assert_eq!(next, "</v2/_catalog?n=1&last=docker.io/library/multi>; rel=\"next\"");
    let page = get(&server.url(next.trim_start_matches('<').split('>').next().unwrap())).await;
    assert_eq!(page.json()["repositories"], serde_json::json!(["library/multi"]));
    assert!(page.header("link").is_none());
    // And its tags, from the cache (the upstream is gone).
    let tags = get(&server.url("/v2/library/multi/tags/list")).await;
    assert_eq!(tags.status, 200);
    assert_eq!(tags.json()["tags"], serde_json::json!(["1", sbom_tag, sig_tag]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fills_a_running_server_and_names_each_image_that_failed() {
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let dir = tempfile::tempdir().unwrap();
    let server = Process::start(dir.path(), &up.url(), "");
    let base = server.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(["prefetch", "--server", &base, "--platform", "linux/amd64"])
            .args(["library/missing:1", "library/multi:1", "ghcr.io/not/configured:1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    // The good image was taken in between, and both bad ones are named at the end.
    assert!(stdout.contains("docker.io/library/multi:1"), "{stdout}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("2 of 3 images failed")
            && last.contains("docker.io/library/missing:1")
            && last.contains("ghcr.io/not/configured:1"),
        "{stderr}"
    );
    for d in &image.amd64 {
        assert_eq!(blob_gets(&up, d), 1);
    }
    // The running server has them now: a client's pull costs no upstream blob GET.
    let before = up.count("GET", "/blobs/");
    for d in &image.amd64 {
        assert_eq!(
            sha256(get(&server.url(&format!("/v2/library/multi/blobs/{d}"))).await.bytes()),
            *d
        );
    }
    assert_eq!(up.count("GET", "/blobs/"), before);
}

#[test]
fn prefetch_refuses_bad_references_and_no_images() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "http://127.0.0.1:9", "", "");
    let out = prefetch(&config, &["Not A Reference"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an image reference"));
    let out = prefetch(&config, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no images to prefetch"));
    let out = prefetch(&config, &["--platform", "linux", "alpine"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    // Nothing was created for a run that never started.
    assert!(!dir.path().join("cache").exists());
}

/// A `[[sync]]` entry takes the matching tags of a repository, picks up a tag pushed later,
/// and keeps an unchanged one with a HEAD only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_entry_picks_up_new_tags_and_revalidates_unchanged_ones_with_a_head() {
    let up = FakeUpstream::start().await;
    let tagged = |tag: &str, seed: u64| {
        let (bytes, blobs, _) = manifest(&up, seed, &[], None);
        up.add_manifest("library/app", tag, OCI_MANIFEST, &bytes);
        blobs
    };
    let v10 = tagged("v1.0", 40);
    let v11 = tagged("v1.1", 41);
    let latest = tagged("latest", 42);
    let dir = tempfile::tempdir().unwrap();
    let sync =
        "\n[[sync]]\nname = \"app\"\nrepository = \"docker.io/library/app\"\ntags = [\"v1.*\"]\ninterval = \"1s\"\n";
    let _server = Process::start_with(dir.path(), &up.url(), "", sync);
    let taken = |blobs: &[String]| blobs.iter().all(|d| blob_gets(&up, d) == 1);
    crate::harness::wait_until(|| taken(&v10) && taken(&v11)).await;
    assert!(
        latest.iter().all(|d| blob_gets(&up, d) == 0),
        "latest does not match v1.*"
    );

    // A tag pushed later is taken by a later run; the unchanged one cost HEADs only.
    let v12 = tagged("v1.2", 43);
    crate::harness::wait_until(|| taken(&v12)).await;
    crate::harness::wait_until(|| up.count("HEAD", "/manifests/v1.0") >= 1).await;
    assert_eq!(
        up.count("GET", "/manifests/v1.0"),
        1,
        "fetched once, then revalidated by HEAD"
    );
    assert!(taken(&v10) && taken(&v11), "nothing fetched twice");
}
