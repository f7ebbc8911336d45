//! Carrying images across the gap: `regcache export` to an OCI layout (directory and tar),
//! `regcache import` into an empty cache, and pulls with no upstream at all that get the
//! same digests; a damaged archive is refused whole; skopeo reads the export and writes
//! layouts regcache imports.

use std::path::Path;
use std::process::Command;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{files_under, get, get_with, sha256, write_process_config, Process};
use crate::prefetch::{multi_platform_image, ok, prefetched, run, Image};

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
const NAME: &str = "docker.io/library/multi:1";

/// A server on the cache under `cache_parent`, with no upstream at all.
fn offline_server(cache_parent: &Path) -> Process {
    Process::start_with(cache_parent, "http://127.0.0.1:9", "", "offline = true")
}

/// Everything the image is made of, served by `server`, as digests.
async fn pull_offline(server: &Process, image: &Image) {
    let index = get_with(&server.url("/v2/library/multi/manifests/1"), &[("Accept", ACCEPT_ALL)]).await;
    assert_eq!(
        (index.status.as_u16(), sha256(index.bytes())),
        (200, image.index.clone())
    );
    for d in image.amd64.iter().chain(&image.arm64).chain([&image.shared]) {
        let blob = get(&server.url(&format!("/v2/library/multi/blobs/{d}"))).await;
        assert_eq!((blob.status.as_u16(), sha256(blob.bytes())), (200, d.clone()));
    }
    let referrers = get(&server.url(&format!("/v2/library/multi/referrers/{}", image.index))).await;
    assert_eq!(referrers.status, 200);
    assert_eq!(referrers.json()["manifests"].as_array().map(Vec::len), Some(2));
    let sbom_tag = format!("sha256-{}.sbom", image.index.trim_start_matches("sha256:"));
    let sbom = get_with(
        &server.url(&format!("/v2/library/multi/manifests/{sbom_tag}")),
        &[("Accept", ACCEPT_ALL)],
    )
    .await;
    assert_eq!(sbom.status, 200);
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A fresh cache (its own dir and config, upstream unreachable).
fn empty_cache(root: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_process_config(&dir, "http://127.0.0.1:9", "", "offline = true");
    (dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_into_an_empty_cache_serves_identical_digests_offline() {
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let work = tempfile::tempdir().unwrap();
    let (source, config) = (work.path().join("source"), work.path().join("source.toml"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::rename(write_process_config(&source, &up.url(), "", ""), &config).unwrap();
    ok(&blocking({
        let config = config.clone();
        move || run(&config, &["prefetch", "--all-platforms", NAME])
    })
    .await);
    let (tar, layout) = (work.path().join("carry/multi.tar"), work.path().join("carry/layout"));
    for out in [&tar, &layout] {
        let stdout = ok(&run(&config, &["export", NAME, "-o", out.to_str().unwrap()]));
        // The image, its .sig and .sbom tags, and the referrers lists of the index and of
        // each platform (those two empty: still an answer offline).
        assert!(stdout.contains("exported 6 images and attachments"), "{stdout}");
    }

    // Across the gap: an empty cache, the archive, and no upstream.
    let (gap, gap_config) = empty_cache(work.path(), "gap");
    let stdout = ok(&run(&gap_config, &["import", tar.to_str().unwrap()]));
    assert!(stdout.contains("6 names recorded"), "{stdout}");
    let files = files_under(&gap.join("cache/v1"));
    // The same again changes nothing: no file, no record, no line of the log.
    let log = std::fs::read_to_string(gap.join("cache/v1/associations")).unwrap();
    let stdout = ok(&run(&gap_config, &["import", tar.to_str().unwrap()]));
    assert!(stdout.contains("0 names recorded, 0 files new"), "{stdout}");
    assert_eq!(files_under(&gap.join("cache/v1")), files);
    assert_eq!(std::fs::read_to_string(gap.join("cache/v1/associations")).unwrap(), log);
    pull_offline(&offline_server(&gap), &image).await;

    // A blob cut on the disk while no server ran: its size recorded at import gives it
    // away, and it is refused (nothing to fetch it from), never served short.
    let cut = &image.shared;
    let path = gap.join("cache/v1/blobs/sha256").join(&cut[7..9]).join(&cut[7..]);
    let full = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(full / 2)
        .unwrap();
    let server = offline_server(&gap);
    let blob = get(&server.url(&format!("/v2/library/multi/blobs/{cut}"))).await;
    assert_eq!(blob.status, 503, "{} bytes served", blob.bytes().len());
    assert_eq!(files_under(&gap.join("cache/v1/quarantine")).len(), 1);
    drop(server);

    // The directory form, imported into a running server's cache: served without a restart.
    let (gap2, gap2_config) = empty_cache(work.path(), "gap2");
    let server = offline_server(&gap2);
    let before = get_with(&server.url("/v2/library/multi/manifests/1"), &[("Accept", ACCEPT_ALL)]).await;
    assert_ne!(before.status, 200);
    ok(&run(&gap2_config, &["import", layout.to_str().unwrap()]));
    pull_offline(&server, &image).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_an_archive_is_refused_whole_and_names_the_blob() {
    let (_up, image, work, config) = prefetched().await;
    let (tar, layout) = (work.path().join("multi.tar"), work.path().join("layout"));
    ok(&run(&config, &["export", NAME, "-o", tar.to_str().unwrap()]));
    ok(&run(&config, &["export", NAME, "-o", layout.to_str().unwrap()]));
    let layer = &image.arm64[1];
    let layer_bytes =
        std::fs::read(layout.join(format!("blobs/sha256/{}", layer.trim_start_matches("sha256:")))).unwrap();

    // In the tar: one byte inside that layer.
    let mut archive = std::fs::read(&tar).unwrap();
    let at = archive
        .windows(64)
        .position(|w| w == &layer_bytes[..64])
        .expect("the layer is in the archive");
    archive[at + 100] ^= 0x01;
    std::fs::write(&tar, archive).unwrap();
    // In the directory: the same layer's file.
    let file = layout.join(format!("blobs/sha256/{}", layer.trim_start_matches("sha256:")));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();

    for (name, input) in [("from-tar", &tar), ("from-dir", &layout)] {
        let (gap, gap_config) = empty_cache(work.path(), name);
        let out = run(&gap_config, &["import", input.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("blob {layer}")) && stderr.contains("damaged"),
            "{stderr}"
        );
        // Nothing was committed: no blob, manifest or tag.
        for sub in ["blobs", "manifests", "tags"] {
            assert!(files_under(&gap.join("cache/v1").join(sub)).is_empty(), "{name}: {sub}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_reads_the_export_and_its_own_layout_imports() {
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
    let work = tempfile::tempdir().unwrap();
    let server = Process::start(work.path(), &up.url(), "");
    let base = server.url("");
    ok(&blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(["prefetch", "--all-platforms", "--server", &base, NAME])
            .output()
            .unwrap()
    })
    .await);
    drop(server);
    let config = work.path().join("regcache.toml");
    let export = work.path().join("export");
    ok(&run(&config, &["export", NAME, "-o", export.to_str().unwrap()]));

    // skopeo reads the export: the index as it was, and a whole platform image.
    let skopeo = |args: Vec<String>| move || Command::new("skopeo").args(args).output().expect("skopeo runs");
    let src = format!("oci:{}:{NAME}", export.display());
    let raw = ok(&blocking(skopeo(vec!["inspect".into(), "--raw".into(), src.clone()])).await);
    assert_eq!(sha256(raw.as_bytes()), image.index);
    let copied = work.path().join("copied");
    ok(&blocking(skopeo(vec![
        "copy".into(),
        "--override-arch=arm64".into(),
        src,
        format!("dir:{}", copied.display()),
    ]))
    .await);
    for d in &image.arm64 {
        assert!(copied.join(d.trim_start_matches("sha256:")).exists(), "{d}");
    }

    // skopeo writes a layout (from a regcache over plain HTTP) that regcache imports.
    let server = Process::start(work.path(), &up.url(), "");
    let from = format!("docker://{}/library/multi:1", server.addr);
    let written = work.path().join("skopeo-layout");
    ok(&blocking(skopeo(vec![
        "copy".into(),
        "--all".into(),
        "--preserve-digests".into(),
        "--src-tls-verify=false".into(),
        from,
        format!("oci:{}:{NAME}", written.display()),
    ]))
    .await);
    drop(server);
    let (gap, gap_config) = empty_cache(work.path(), "gap");
    ok(&run(&gap_config, &["import", written.to_str().unwrap()]));
    let offline = offline_server(&gap);
    let index = get_with(&offline.url("/v2/library/multi/manifests/1"), &[("Accept", ACCEPT_ALL)]).await;
    assert_eq!(
        (index.status.as_u16(), sha256(index.bytes())),
        (200, image.index.clone())
    );
    for d in image.amd64.iter().chain(&image.arm64) {
        let blob = get(&offline.url(&format!("/v2/library/multi/blobs/{d}"))).await;
        assert_eq!(sha256(blob.bytes()), *d);
    }
    // skopeo lists the mirror's tags, from the cache.
    let listed = ok(&blocking(skopeo(vec![
        "list-tags".into(),
        "--tls-verify=false".into(),
        format!("docker://{}/library/multi", offline.addr),
    ]))
    .await);
    let tags: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["1"]), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_split_archive_imports_and_a_damaged_part_is_named() {
    let (_up, image, work, config) = prefetched().await;
    let out = work.path().join("usb/multi.tar.zst");
    ok(&run(
        &config,
        &["export", NAME, "-o", out.to_str().unwrap(), "--split", "40KiB"],
    ));
    let list = std::fs::read_to_string(work.path().join("usb/multi.tar.zst.sha256")).unwrap();
    let parts: Vec<&str> = list.lines().map(|l| l.split("  ").nth(1).unwrap()).collect();
    assert!(parts.len() >= 3, "{list}");
    assert_eq!(parts[0], "multi.tar.zst.000");
    for part in &parts {
        let len = std::fs::metadata(work.path().join("usb").join(part)).unwrap().len();
        assert!(len <= 40 * 1024, "{part}: {len} bytes");
    }

    // Imported by its name (the parts are found through the list), then served offline.
    let (gap, gap_config) = empty_cache(work.path(), "gap");
    ok(&run(&gap_config, &["import", out.to_str().unwrap()]));
    pull_offline(&offline_server(&gap), &image).await;

    // One flipped byte in one part: refused, naming that part, nothing committed.
    let damaged = work.path().join("usb").join(parts[1]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&damaged, bytes).unwrap();
    let (gap2, gap2_config) = empty_cache(work.path(), "gap2");
    let result = run(&gap2_config, &["import", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(parts[1]) && stderr.contains("damaged"), "{stderr}");
    assert!(files_under(&gap2.join("cache/v1/blobs")).is_empty());
}

/// What Docker 25+'s `docker save` writes: an OCI layout whose index names the image in
/// `io.containerd.image.name` (ref.name holding only the tag), beside a `manifest.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_save_archive_imports_under_its_full_name() {
    let (_up, image, work, config) = prefetched().await;
    let layout = work.path().join("saved");
    ok(&run(&config, &["export", NAME, "-o", layout.to_str().unwrap()]));
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["digest"] == image.index.as_str())
        .unwrap()
        .clone();
    index["manifests"] = serde_json::json!([{
        "mediaType": entry["mediaType"], "digest": entry["digest"], "size": entry["size"],
        "annotations": {"io.containerd.image.name": NAME, "org.opencontainers.image.ref.name": "1"},
    }]);
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(layout.join("manifest.json"), b"[]").unwrap();
    let (gap, gap_config) = empty_cache(work.path(), "gap");
    let stdout = ok(&run(&gap_config, &["import", layout.to_str().unwrap()]));
    assert!(stdout.contains("1 names recorded"), "{stdout}");
    let server = offline_server(&gap);
    let index = get_with(&server.url("/v2/library/multi/manifests/1"), &[("Accept", ACCEPT_ALL)]).await;
    assert_eq!(
        (index.status.as_u16(), sha256(index.bytes())),
        (200, image.index.clone())
    );
}

/// With access rules, a running server serves content imported beside it to the
/// repositories the import recorded (it reads the new lines of the associations log), with
/// no upstream to confirm them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_access_rules_a_running_server_serves_what_was_imported_beside_it() {
    let (_up, image, work, config) = prefetched().await;
    let layout = work.path().join("layout");
    ok(&run(&config, &["export", NAME, "-o", layout.to_str().unwrap()]));
    let (gap, gap_config) = empty_cache(work.path(), "gap");
    let rules = "offline = true\n[auth]\nanonymous_allow = [\"docker.io/library/*\"]\n";
    let server = Process::start_with(&gap, "http://127.0.0.1:9", "", rules);
    let layer = &image.amd64[1];
    let url = server.url(&format!("/v2/library/multi/blobs/{layer}"));
    assert_ne!(get(&url).await.status, 200, "not there yet");
    ok(&run(&gap_config, &["import", layout.to_str().unwrap()]));
    let blob = get(&url).await;
    assert_eq!((blob.status.as_u16(), sha256(blob.bytes())), (200, layer.clone()));
    // Still only to the repository that holds it.
    let other = get(&server.url(&format!("/v2/library/other/blobs/{layer}"))).await;
    assert_ne!(other.status, 200);
}
