//! The status page at the admin listener's `/`, loaded in headless Chromium (Debian's
//! `chromium`): what a person sees, names escaped, and a screenshot kept as a test artefact
//! (`target/test-artifacts/status-page.png`).

use std::io::BufRead;
use std::process::{Command, Stdio};

use crate::fake_upstream::FakeUpstream;
use crate::harness::{get, upstream_toml};
use crate::prefetch::multi_platform_image;

/// Runs headless Chromium on `url` with `args`; its stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs (apt package chromium)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_cache_upstreams_sync_and_pins_in_a_browser() {
    let up = FakeUpstream::start().await;
    let _image = multi_platform_image(&up);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[cache]\ndir = \"{}\"\nmax_size = \"1GiB\"\npinned = [\"docker.io/library/multi:1\"]\n{}\n\
             [[sync]]\nname = \"<b>nightly</b>\"\nimages = [\"docker.io/library/multi:1\"]\nplatforms = [\"all\"]\ninterval = \"1h\"\n",
            dir.path().join("cache").display(),
            upstream_toml("docker.io", &up.url(), true, "5m")
        ),
    )
    .unwrap();
    let mut child = crate::harness::ends_with_this_thread(&mut Command::new(env!("CARGO_BIN_EXE_regcache")))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let admin = loop {
        let line = lines.next().expect("regcache logged its admin address").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(a) = v["fields"]["admin"].as_str() {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let metrics = format!("http://{admin}/metrics");
    // The sync entry's first run takes the image.
    let mut ran = false;
    for _ in 0..2000 {
        let text = String::from_utf8_lossy(get(&metrics).await.bytes()).into_owned();
        if text.contains("regcache_sync_runs_total{result=\"ok\",sync=\"<b>nightly</b>\"} 1") {
            ran = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(ran, "the sync entry never ran");

    let url = format!("http://{admin}/");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    for expected in [
        "<h1>regcache</h1>",
        "Hit ratio 0.0 %",
        "of 1.0 GiB used",
        "<td>docker.io</td>",
        "<td>up</td>",
        "<td>docker.io/library/multi</td>",
        "<li>docker.io/library/multi:1</li>",
        "&lt;b&gt;nightly&lt;/b&gt;",
    ] {
        assert!(dom.contains(expected), "{expected:?} not in the page:\n{dom}");
    }
    assert!(!dom.contains("<b>nightly</b>"), "a name was not escaped:\n{dom}");

    let artefacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || chromium(&url, &[&arg, "--window-size=1200,1400"]))
        .await
        .unwrap();
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let _ = child.kill();
    let _ = child.wait();
}
