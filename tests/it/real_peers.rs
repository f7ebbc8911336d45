//! regcache between real peers: the Distribution registry as the upstream, skopeo and
//! containerd's ctr as clients, all on 127.0.0.1. Each test has its own registry, cache
//! dir and client state. Assertions are on bytes, digests and the upstream's access log.

use std::path::Path;

use crate::harness::{self, TestProxy};
use crate::peers::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const NAME: &str = "library/testimg";

/// A registry seeded with `library/testimg:1` (three layers).
async fn seeded_registry(seed: u64) -> (Registry, PushedImage) {
    let registry = Registry::start().await;
    let image = push_image(&registry, NAME, "1", &[MIB, 2 * MIB, 300 * KIB], seed).await;
    (registry, image)
}

async fn start_proxy(cache_dir: &Path, registry_url: &str, default: bool) -> TestProxy {
    TestProxy::start(
        cache_dir,
        "1GiB",
        &harness::upstream_toml("docker.io", registry_url, default, "5m"),
    )
    .await
}

/// skopeo and ctr pull `library/testimg:1` through `proxy` and get `image` (skopeo's copy
/// byte for byte, ctr's image by its manifest digest).
async fn skopeo_and_ctr_pull(proxy: &TestProxy, dir: &Path, image: &PushedImage, how: &str) {
    let copied = dir.join("skopeo");
    let out = skopeo_copy(&format!("docker://{}/library/testimg:1", proxy.addr), &copied, &[]).await;
    assert_success(&out, &format!("skopeo copy, {how}"));
    assert_dir_copy(&copied, image);
    let containerd = Containerd::start().await;
    let hosts = containerd.scratch("hosts");
    write_hosts_toml(&hosts, "docker.io", proxy.addr);
    let reference = "docker.io/library/testimg:1";
    let out = containerd.ctr_pull(&hosts, reference).await;
    containerd.assert_success(&out, &format!("ctr images pull, {how}"));
    assert_eq!(
        containerd.image_digest(reference).await.as_deref(),
        Some(image.manifest_digest.as_str())
    );
}

/// Every blob of `image` was fetched from the registry exactly once.
async fn assert_one_upstream_get_per_blob(registry: &Registry, image: &PushedImage) {
    for (digest, _) in image.blobs() {
        let gets = registry
            .count_requests("GET", &format!("/v2/{}/blobs/{digest}", image.name))
            .await;
        assert_eq!(
            gets,
            1,
            "upstream GETs of blob {digest}; registry access log:\n{}",
            registry.access_log_text().await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_bare_name_cold_then_warm() {
    let (registry, image) = seeded_registry(1).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&dir.path().join("cache"), &registry.url(), true).await;
    assert_eq!(registry.count_requests("GET", "/blobs/").await, 0);

    let src = format!("docker://{}/library/testimg:1", proxy.addr);
    let cold = dir.path().join("cold");
    let out = skopeo_copy(&src, &cold, &[]).await;
    assert_success(&out, "cold skopeo copy through regcache");
    assert_dir_copy(&cold, &image);
    assert_one_upstream_get_per_blob(&registry, &image).await;
    let blob_gets = registry.count_requests("GET", "/blobs/").await;
    assert_eq!(blob_gets, image.blobs().len());

    let warm = dir.path().join("warm");
    let out = skopeo_copy(&src, &warm, &[]).await;
    assert_success(&out, "warm skopeo copy through regcache");
    assert_dir_copy(&warm, &image);
    assert_eq!(
        registry.count_requests("GET", "/blobs/").await,
        blob_gets,
        "a warm pull must not fetch any blob upstream; registry access log:\n{}",
        registry.access_log_text().await
    );
    assert_one_upstream_get_per_blob(&registry, &image).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_registries_conf_mirror_path_prefix() {
    let (registry, image) = seeded_registry(2).await;
    let dir = tempfile::tempdir().unwrap();
    // No default upstream: only the `docker.io/` path prefix can route these requests.
    let proxy = start_proxy(&dir.path().join("cache"), &registry.url(), false).await;

    // The primary location is a closed loopback port, so if the mirror is not used (or
    // fails) skopeo's fallback fails too, and nothing ever resolves a public name.
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = []\n\n\
             [[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:{closed}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{proxy}/docker.io\"\ninsecure = true\n",
            closed = closed_port(),
            proxy = proxy.addr,
        ),
    )
    .unwrap();
    let conf = conf.to_string_lossy().into_owned();

    let out_dir = dir.path().join("out");
    let out = skopeo_copy(
        "docker://docker.io/library/testimg:1",
        &out_dir,
        &["--registries-conf", &conf],
    )
    .await;
    assert_success(&out, "skopeo copy of docker.io/library/testimg:1 via the mirror");
    assert_dir_copy(&out_dir, &image);
    // Served by regcache: the registry saw regcache fetch the tag and each blob once.
    assert!(
        registry.count_requests("GET", "/v2/library/testimg/manifests/1").await >= 1,
        "registry access log:\n{}",
        registry.access_log_text().await
    );
    assert_one_upstream_get_per_blob(&registry, &image).await;

    // The same config against a mirror that does not serve the image makes skopeo fail:
    // the test above cannot pass without the mirror.
    let broken = dir.path().join("broken.conf");
    std::fs::write(
        &broken,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:{}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:{}/docker.io\"\ninsecure = true\n",
            closed_port(),
            closed_port(),
        ),
    )
    .unwrap();
    let broken = broken.to_string_lossy().into_owned();
    let out = skopeo_copy(
        "docker://docker.io/library/testimg:1",
        &dir.path().join("never"),
        &["--registries-conf", &broken],
    )
    .await;
    assert!(!out.status.success(), "skopeo must fail without a working mirror");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connection refused"),
        "skopeo failed for another reason:\n{stderr}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pull_via_hosts_toml_ns() {
    let (registry, image) = seeded_registry(3).await;
    let containerd = Containerd::start().await;
    let dir = tempfile::tempdir().unwrap();
    // No default upstream: only `?ns=docker.io` can route containerd's requests.
    let proxy = start_proxy(&dir.path().join("cache"), &registry.url(), false).await;
    let hosts = containerd.scratch("hosts");
    write_hosts_toml(&hosts, "docker.io", proxy.addr);

    let reference = "docker.io/library/testimg:1";
    let out = containerd.ctr_pull(&hosts, reference).await;
    containerd.assert_success(&out, "ctr images pull through regcache");
    assert_eq!(
        containerd.image_digest(reference).await.as_deref(),
        Some(image.manifest_digest.as_str()),
        "digest of the pulled image"
    );
    let check = containerd.ctr(&["-n", "test", "images", "check"]).await;
    assert_success(&check, "ctr images check");
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.contains(reference) && check.contains("complete"),
        "ctr images check:\n{check}"
    );
    for (digest, bytes) in image.blobs() {
        assert_eq!(containerd.content(&digest).await, bytes, "content {digest}");
    }
    assert_eq!(containerd.content(&image.manifest_digest).await, image.manifest_bytes);
    assert_one_upstream_get_per_blob(&registry, &image).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pull_multi_platform_index_fetches_only_this_platform() {
    let registry = Registry::start().await;
    let other_arch = if host_arch() == "arm64" { "amd64" } else { "arm64" };
    let index = push_index(
        &registry,
        "library/multi",
        "2",
        &[("linux", host_arch()), ("linux", other_arch)],
        &[512 * KIB, 64 * KIB],
        4,
    )
    .await;
    let (mine, other) = (&index.images[0], &index.images[1]);
    let containerd = Containerd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&dir.path().join("cache"), &registry.url(), false).await;
    let hosts = containerd.scratch("hosts");
    write_hosts_toml(&hosts, "docker.io", proxy.addr);

    let reference = "docker.io/library/multi:2";
    let out = containerd.ctr_pull(&hosts, reference).await;
    containerd.assert_success(&out, "ctr images pull of a multi-platform image");
    assert_eq!(
        containerd.image_digest(reference).await.as_deref(),
        Some(index.index_digest.as_str()),
        "the image's target is the index"
    );
    assert_eq!(containerd.content(&index.index_digest).await, index.index_bytes);
    for (digest, bytes) in mine.blobs() {
        assert_eq!(containerd.content(&digest).await, bytes, "content {digest}");
    }
    assert_one_upstream_get_per_blob(&registry, mine).await;
    for (digest, _) in other.blobs() {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{digest}")).await,
            0,
            "the other platform's blob {digest} must not be fetched"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_all_platforms_of_index() {
    let registry = Registry::start().await;
    let index = push_index(
        &registry,
        "library/multi",
        "2",
        &[("linux", "amd64"), ("linux", "arm64")],
        &[256 * KIB],
        5,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy(&dir.path().join("cache"), &registry.url(), true).await;
    let out_dir = dir.path().join("out");
    let out = skopeo_copy(
        &format!("docker://{}/library/multi:2", proxy.addr),
        &out_dir,
        &["--all"],
    )
    .await;
    assert_success(&out, "skopeo copy --all through regcache");
    let top = std::fs::read(out_dir.join("manifest.json")).unwrap();
    assert_eq!(top, index.index_bytes, "the index, byte for byte");
    for image in &index.images {
        let hex = image.manifest_digest.trim_start_matches("sha256:");
        let manifest = std::fs::read(out_dir.join(format!("{hex}.manifest.json"))).unwrap();
        assert_eq!(manifest, image.manifest_bytes);
        for (digest, bytes) in image.blobs() {
            let got = std::fs::read(out_dir.join(digest.trim_start_matches("sha256:"))).unwrap();
            assert_eq!(harness::sha256(&got), digest);
            assert_eq!(got, bytes);
        }
        assert_one_upstream_get_per_blob(&registry, image).await;
    }
    proxy.stop().await;
}

/// Cold pull, then regcache and the registry both stop; a new regcache on the same cache
/// dir serves the image by digest from disk alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_upstream_gone_serves_by_digest() {
    let (registry, image) = seeded_registry(6).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let registry_url = registry.url();
    let proxy = start_proxy(&cache, &registry_url, true).await;
    let cold = dir.path().join("cold");
    let out = skopeo_copy(&format!("docker://{}/library/testimg:1", proxy.addr), &cold, &[]).await;
    assert_success(&out, "cold skopeo copy");
    assert_dir_copy(&cold, &image);
    assert_one_upstream_get_per_blob(&registry, &image).await;

    proxy.stop().await;
    registry.stop();
    // The upstream's port is now closed: nothing can come from there.
    let proxy = start_proxy(&cache, &registry_url, true).await;
    let again = dir.path().join("again");
    let out = skopeo_copy(
        &format!("docker://{}/library/testimg@{}", proxy.addr, image.manifest_digest),
        &again,
        &[],
    )
    .await;
    assert_success(&out, "skopeo copy by digest from the restarted cache, upstream gone");
    assert_dir_copy(&again, &image);

    // The tag, confirmed less than its 5m TTL ago, is served from disk as well.
    let by_tag = dir.path().join("by-tag");
    let out = skopeo_copy(&format!("docker://{}/library/testimg:1", proxy.addr), &by_tag, &[]).await;
    assert_success(&out, "skopeo copy by tag from the restarted cache, upstream gone");
    assert_dir_copy(&by_tag, &image);
    proxy.stop().await;
}

/// With a zero tag TTL every tag request wants the upstream; when the upstream is gone, a
/// restarted regcache still answers skopeo and containerd with the stale tag from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gone_serves_stale_tag_to_skopeo_and_ctr() {
    let (registry, image) = seeded_registry(7).await;
    let containerd = Containerd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let upstreams = harness::upstream_toml("docker.io", &registry.url(), true, "0s");
    let proxy = TestProxy::start(&cache, "1GiB", &upstreams).await;
    let hosts = containerd.scratch("hosts");
    write_hosts_toml(&hosts, "docker.io", proxy.addr);
    let reference = "docker.io/library/testimg:1";
    let out = containerd.ctr_pull(&hosts, reference).await;
    containerd.assert_success(&out, "cold ctr pull");
    let cold = dir.path().join("cold");
    let out = skopeo_copy(&format!("docker://{}/library/testimg:1", proxy.addr), &cold, &[]).await;
    assert_success(&out, "skopeo copy");
    assert_dir_copy(&cold, &image);
    assert_one_upstream_get_per_blob(&registry, &image).await;

    proxy.stop().await;
    registry.stop();
    let proxy = TestProxy::start(&cache, "1GiB", &upstreams).await;

    let stale = dir.path().join("stale");
    let out = skopeo_copy(&format!("docker://{}/library/testimg:1", proxy.addr), &stale, &[]).await;
    assert_success(&out, "skopeo copy of a stale tag, upstream gone");
    assert_dir_copy(&stale, &image);

    let rm = containerd
        .ctr(&["-n", "test", "images", "rm", "--sync", reference])
        .await;
    assert_success(&rm, "ctr images rm --sync");
    // The restarted regcache listens on a new port.
    let hosts = containerd.scratch("hosts-after-restart");
    write_hosts_toml(&hosts, "docker.io", proxy.addr);
    let out = containerd.ctr_pull(&hosts, reference).await;
    containerd.assert_success(&out, "ctr pull of a stale tag, upstream gone");
    assert_eq!(
        containerd.image_digest(reference).await.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    proxy.stop().await;
}

/// The edge mirror's promise with real clients: `regcache prefetch` while the upstream is
/// there, then the upstream gone and `offline = true`, and skopeo, ctr and podman pull the
/// image by tag with its real digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_prefetch_skopeo_ctr_and_podman_pull_by_tag_with_no_upstream() {
    let (registry, image) = seeded_registry(11).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = dir.path().join("prefetch.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n{}",
            cache.display(),
            harness::upstream_toml("docker.io", &registry.url(), true, "5m")
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .arg("prefetch")
        .arg("--config")
        .arg(&config)
        .arg("docker.io/library/testimg:1")
        .output()
        .await
        .unwrap();
    assert_success(&out, "regcache prefetch");
    registry.stop();

    let upstreams = format!(
        "{}offline = true\n",
        harness::upstream_toml("docker.io", "http://127.0.0.1:9", true, "5m")
    );
    let proxy = TestProxy::start(&cache, "1GiB", &upstreams).await;
    skopeo_and_ctr_pull(&proxy, dir.path(), &image, "offline").await;
    let reference = "docker.io/library/testimg:1";

    let podman = dir.path().join("podman");
    std::fs::create_dir_all(&podman).unwrap();
    let registries = podman.join("registries.conf");
    std::fs::write(
        &registries,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"{}/docker.io\"\ninsecure = true\n",
            proxy.addr
        ),
    )
    .unwrap();
    let policy = podman.join("policy.json");
    std::fs::write(&policy, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    let podman_cmd = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(require_binary("podman"));
        cmd.arg("--root")
            .arg(podman.join("root"))
            .arg("--runroot")
            .arg(podman.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", &registries);
        cmd
    };
    let mut pull = podman_cmd(&["pull", "--arch", host_arch()]);
    pull.arg("--signature-policy").arg(&policy).arg(reference);
    let out = run_command(pull).await;
    assert_success(&out, "podman pull, offline");
    let out = run_command(podman_cmd(&["image", "inspect", "--format", "{{.Digest}}", reference])).await;
    assert_success(&out, "podman image inspect");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), image.manifest_digest);
    proxy.stop().await;
}

/// Under an enforcing signature policy, an image signed in cosign's format (by a key made
/// here, pushed to the real registry as cosign does) pulls with skopeo and ctr with its
/// real digest; an unsigned one in the same repository space is refused to skopeo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_ctr_pull_a_signed_image_under_enforce_and_skopeo_is_refused_an_unsigned_one() {
    use crate::signed_pulls::CosignKey;
    let (registry, image) = seeded_registry(41).await;
    let unsigned = push_image(&registry, "library/unsigned", "1", &[300 * KIB], 42).await;
    let key = CosignKey::generate();
    let signature = key.legacy_signature("docker.io/library/testimg:1", &image.manifest_digest);
    for blob in &signature.blobs {
        push_blob(&registry, NAME, blob).await;
    }
    push_manifest(
        &registry,
        NAME,
        &signature.tag,
        "application/vnd.oci.image.manifest.v1+json",
        &signature.manifest,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = key.write(dir.path(), "cosign.pub");
    let policy = format!(
        "[[policy]]\nname = \"hub\"\nmatch = \"docker.io/library/*\"\nkeys = [{:?}]\n",
        key_file.display().to_string()
    );
    let proxy = TestProxy::start_sections(
        &dir.path().join("cache"),
        "",
        "",
        &policy,
        &harness::upstream_toml("docker.io", &registry.url(), true, "5m"),
    )
    .await;

    skopeo_and_ctr_pull(&proxy, dir.path(), &image, "under enforce").await;

    let refused = dir.path().join("refused");
    let out = skopeo_copy(&format!("docker://{}/library/unsigned:1", proxy.addr), &refused, &[]).await;
    assert!(!out.status.success(), "skopeo copied an unsigned image under enforce");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("denied") && err.contains("no signature"), "{err}");
    assert_eq!(
        registry
            .count_requests(
                "GET",
                &format!("/v2/library/unsigned/blobs/{}", unsigned.layer_digests[0])
            )
            .await,
        0,
        "a layer of a refused image was fetched"
    );
    proxy.stop().await;
}

/// `[cache] layers_ahead = 4` with real clients: skopeo and ctr get the image byte for byte
/// while the manifest miss fetches its blobs ahead of them, and the registry sees each blob
/// once (the clients' requests join those fetches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_ctr_pull_with_layers_fetched_ahead() {
    let (registry, image) = seeded_registry(71).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(
        &dir.path().join("cache"),
        "layers_ahead = 4",
        &harness::upstream_toml("docker.io", &registry.url(), true, "5m"),
    )
    .await;
    skopeo_and_ctr_pull(&proxy, dir.path(), &image, "layers fetched ahead").await;
    harness::wait_until(|| proxy.proxy.fills_in_flight() == 0).await;
    assert_one_upstream_get_per_blob(&registry, &image).await;
    let ahead = proxy.metric("regcache_layers_ahead_total");
    assert!((1.0..=4.0).contains(&ahead), "{ahead} fetches ahead");
}
