//! Keeping a mirror's cache sound: `regcache verify` finds flipped bytes in blobs and
//! manifests, quarantines them and (with `--repair`) fetches them again, standalone and
//! beside a running server.

use std::path::{Path, PathBuf};

use crate::fake_upstream::FakeUpstream;
use crate::harness::{get, sha256, write_process_config, Process};
use crate::prefetch::{blob_gets, multi_platform_image, prefetched, run, run_ok};

fn cached_file(cache: &Path, kind: &str, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join(format!("v1/{kind}/sha256/{}/{hex}", &hex[..2]))
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_quarantines_flipped_bytes_and_repairs_them() {
    let (up, image, dir, config) = prefetched().await;
    let cache = dir.path().join("cache");
    let out = run(&config, &["verify"]);
    assert!(
        out.status.success(),
        "a sound cache: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // One flipped byte in a layer and one in a manifest: both found, named and set aside.
    let layer = &image.amd64[1];
    flip_last_byte(&cached_file(&cache, "blobs", layer));
    flip_last_byte(&cached_file(&cache, "manifests", &image.index));
    let out = run(&config, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("2 damaged"), "{stdout}");
    assert!(stdout.contains(&format!("damaged blob {layer}")), "{stdout}");
    assert!(
        stdout.contains(&format!("damaged manifest {}", image.index)),
        "{stdout}"
    );
    assert!(!cached_file(&cache, "blobs", layer).exists());
    assert_eq!(crate::harness::files_under(&cache.join("v1/quarantine")).len(), 2);

    // --repair fetches a damaged blob again through a server started on the cache dir.
    let config_layer = &image.arm64[0];
    flip_last_byte(&cached_file(&cache, "blobs", config_layer));
    let before = blob_gets(&up, config_layer);
    let stdout = run_ok(&config, &["verify", "--repair"]).await;
    assert!(stdout.contains(&format!("repaired blob {config_layer}")), "{stdout}");
    assert_eq!(blob_gets(&up, config_layer), before + 1);
    let repaired = std::fs::read(cached_file(&cache, "blobs", config_layer)).unwrap();
    assert_eq!(sha256(&repaired), *config_layer);

    // Beside a running server: verify finds the damage, the server refetches it.
    let server = Process::start(dir.path(), &up.url(), "");
    let shared = &image.shared;
    flip_last_byte(&cached_file(&cache, "blobs", shared));
    let base = server.url("");
    let stdout = run_ok(&config, &["verify", "--repair", "--server", &base]).await;
    assert!(stdout.contains(&format!("repaired blob {shared}")), "{stdout}");
    let served = get(&server.url(&format!("/v2/library/multi/blobs/{shared}"))).await;
    assert_eq!(sha256(served.bytes()), *shared);
}

/// A cache config with a budget, on the fake upstream.
fn budget_config(dir: &Path, upstream: &str, max_size: &str) -> PathBuf {
    budget_config_ttl(dir, upstream, max_size, "5m")
}

fn budget_config_ttl(dir: &Path, upstream: &str, max_size: &str, tag_ttl: &str) -> PathBuf {
    let config = dir.join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\nmax_size = \"{max_size}\"\n{}",
            dir.join("cache").display(),
            crate::harness::upstream_toml("docker.io", upstream, true, tag_ttl)
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_survive_eviction_that_takes_everything_else() {
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let others: Vec<String> = (0..8)
        .map(|i| up.add_blob(&crate::harness::random_bytes(300_000, 500 + i)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // Tags expire at once here, except a pinned image's.
    let config = budget_config_ttl(dir.path(), &up.url(), "1MiB", "0s");
    let stdout = run_ok(&config, &["prefetch", "--pin", "--all-platforms", "library/multi:1"]).await;
    assert!(stdout.contains("pinned docker.io/library/multi:1"), "{stdout}");
    let out = run(&config, &["ls", "--json", "docker.io/library/multi:1"]);
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["pinned"], true, "{row}");

    // 2.4 MB of other blobs through a 1 MiB cache: everything unpinned is evicted in turn.
    let server = Process::start_with_config(&config);
    for d in &others {
        assert_eq!(
            sha256(get(&server.url(&format!("/v2/library/x/blobs/{d}"))).await.bytes()),
            *d
        );
    }
    let cache = dir.path().join("cache");
    let evicted = others
        .iter()
        .filter(|d| !cached_file(&cache, "blobs", d).exists())
        .count();
    assert!(evicted >= 4, "only {evicted} of the other blobs were evicted");
    for d in image.amd64.iter().chain(&image.arm64).chain([&image.shared]) {
        assert!(cached_file(&cache, "blobs", d).exists(), "pinned blob {d} was evicted");
    }
    assert!(cached_file(&cache, "manifests", &image.index).exists());
    // Its tag is answered without asking the upstream again, TTL or not.
    let asked = up.count("HEAD", "/manifests/1") + up.count("GET", "/manifests/1");
    let accept = [("Accept", "application/vnd.oci.image.index.v1+json")];
    let tag = crate::harness::get_with(&server.url("/v2/library/multi/manifests/1"), &accept).await;
    assert_eq!(sha256(tag.bytes()), image.index);
    assert_eq!(
        up.count("HEAD", "/manifests/1") + up.count("GET", "/manifests/1"),
        asked
    );
    drop(server);

    // A pin that cannot fit is refused, saying why, and not recorded.
    let layer = crate::harness::random_bytes(1_500_000, 600);
    let config_blob = b"{}".to_vec();
    let (l, c) = (up.add_blob(&layer), up.add_blob(&config_blob));
    let huge = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config_blob.len(), "digest": c},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": layer.len(), "digest": l}],
    });
    up.add_manifest(
        "library/huge",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&huge).unwrap(),
    );
    let small = tempfile::tempdir().unwrap();
    let config = budget_config(small.path(), &up.url(), "1MiB");
    let out = tokio::task::spawn_blocking(move || run(&config, &["prefetch", "--pin", "library/huge:1"]))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("more than the cache budget"), "{stderr}");
    assert!(!small.path().join("cache/v1/pins").exists());
}

/// Sets a file's access and modification times `ago` into the past.
fn age(path: &Path, ago: std::time::Duration) {
    let then = std::time::SystemTime::now() - ago;
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_accessed(then).set_modified(then))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_only_unreferenced_blobs_while_a_pull_runs() {
    use http_body_util::BodyExt;
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let orphan = up.add_blob(&crate::harness::random_bytes(50_000, 700));
    let in_flight_bytes = crate::harness::random_bytes(3 << 20, 701);
    let in_flight = up.add_blob(&in_flight_bytes);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.fault(&in_flight, [crate::fake_upstream::Fault::Gate(1 << 20, gate.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), &up.url(), "", "");
    let cache = dir.path().join("cache");
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || run(&config, &["prefetch", "--all-platforms", "library/multi:1"])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = Process::start(dir.path(), &up.url(), "");
    // A blob fetched by digest alone: no cached manifest references it.
    assert_eq!(
        sha256(get(&server.url(&format!("/v2/library/x/blobs/{orphan}"))).await.bytes()),
        orphan
    );
    // Everything cached so far is an hour old; one temp file two days old.
    for f in crate::harness::files_under(&cache.join("v1/blobs"))
        .iter()
        .chain(&crate::harness::files_under(&cache.join("v1/manifests")))
    {
        age(f, std::time::Duration::from_secs(3600));
    }
    let stale = cache.join("v1/tmp/left-by-a-crash");
    std::fs::write(&stale, b"partial").unwrap();
    age(&stale, std::time::Duration::from_secs(2 * 86_400));
    // A pull in progress: its temp file is being written.
    let pulling = crate::harness::open(
        http::Method::GET,
        &server.url(&format!("/v2/library/x/blobs/{in_flight}")),
        &[],
    )
    .await;
    assert_eq!(pulling.status(), 200);

    let out = run(&config, &["gc", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(&format!("would remove blob {orphan}")), "{stdout}");
    assert!(stdout.contains("would remove 1 unreferenced blobs"), "{stdout}");
    assert!(
        cached_file(&cache, "blobs", &orphan).exists() && stale.exists(),
        "a dry run removes nothing"
    );

    let out = run(&config, &["gc"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("removed 1 unreferenced blobs") && stdout.contains("1 stale temp files"),
        "{stdout}"
    );
    assert!(!cached_file(&cache, "blobs", &orphan).exists() && !stale.exists());
    for d in image.amd64.iter().chain(&image.arm64).chain([&image.shared]) {
        assert!(
            cached_file(&cache, "blobs", d).exists(),
            "referenced blob {d} was removed"
        );
    }
    // The pull in progress completes, verified; the removed blob is simply fetched again.
    gate.notify_one();
    let body = pulling.into_body().collect().await.expect("a complete body").to_bytes();
    assert_eq!(sha256(&body), in_flight);
    let before = blob_gets(&up, &orphan);
    assert_eq!(
        sha256(get(&server.url(&format!("/v2/library/x/blobs/{orphan}"))).await.bytes()),
        orphan
    );
    assert_eq!(blob_gets(&up, &orphan), before + 1);
}
