//! Keeping a mirror's cache sound: `regcache verify` finds flipped bytes in blobs and
//! manifests, quarantines them and (with `--repair`) fetches them again, standalone and
//! beside a running server.

use std::path::{Path, PathBuf};

use crate::fake_upstream::FakeUpstream;
use crate::harness::{get, sha256, write_process_config, Process};
use crate::prefetch::{blob_gets, multi_platform_image, run};

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
    let up = FakeUpstream::start().await;
    let image = multi_platform_image(&up);
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
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || run(&config, &["verify", "--repair"])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("repaired blob {config_layer}")), "{stdout}");
    assert_eq!(blob_gets(&up, config_layer), before + 1);
    let repaired = std::fs::read(cached_file(&cache, "blobs", config_layer)).unwrap();
    assert_eq!(sha256(&repaired), *config_layer);

    // Beside a running server: verify finds the damage, the server refetches it.
    let server = Process::start(dir.path(), &up.url(), "");
    let shared = &image.shared;
    flip_last_byte(&cached_file(&cache, "blobs", shared));
    let base = server.url("");
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || run(&config, &["verify", "--repair", "--server", &base])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("repaired blob {shared}")), "{stdout}");
    let served = get(&server.url(&format!("/v2/library/multi/blobs/{shared}"))).await;
    assert_eq!(sha256(served.bytes()), *shared);
}
