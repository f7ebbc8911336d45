//! The shipped binary as a user runs it: every command, its flags, exit codes and messages,
//! startup failures (each must end the process at once with one line naming the cause),
//! signals, and the cache-dir lock. Every wait is bounded, so a hang is a failure.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::{ends_with_this_thread, get, open, random_bytes, write_process_config, Process};

/// Far longer than any of these commands needs; reaching it means the binary hung.
const HANG: Duration = Duration::from_secs(20);

fn regcache() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
    ends_with_this_thread(&mut cmd).env_remove("RUST_LOG");
    cmd
}

/// Runs to the end (stdin from `input`), or panics if it does not end within [`HANG`].
fn run(mut cmd: Command, input: &[u8]) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("regcache starts");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("stdin written");
    drop(stdin);
    wait_output(child, &what)
}

fn wait_output(mut child: Child, what: &str) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what} hung for {HANG:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failure: exit code 1, and its last stderr line is `regcache: …` containing `cause`.
fn assert_fails_naming(out: &Output, cause: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr:\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("regcache: ") && last.contains(cause),
        "last stderr line should name {cause:?}; stderr:\n{stderr}"
    );
}

/// A 1 MiB blob on the fake whose download stops after 256 KiB until the gate opens.
fn held_blob(up: &FakeUpstream, seed: u64) -> (String, Arc<tokio::sync::Notify>) {
    let digest = up.add_blob(&random_bytes(1 << 20, seed));
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(256 << 10, gate.clone())]);
    (digest, gate)
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("regcache.toml");
    std::fs::write(&path, body).expect("config written");
    path
}

#[test]
fn check_config_names_the_bad_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    for (body, cause) in [
        ("[cache]\nmax_size = \"lots\"\n", "max_size"),
        ("[cache]\nnot_a_key = 1\n", "not_a_key"),
        ("[server\n", "invalid config"),
        ("[limits]\nheader_read_timeout = \"soon\"\n", "header_read_timeout"),
    ] {
        let config = write_config(dir.path(), body);
        let mut cmd = regcache();
        cmd.args(["check-config", "--config"]).arg(&config);
        assert_fails_naming(&run(cmd, b""), cause);
    }
    let mut cmd = regcache();
    cmd.args(["check-config", "--config"])
        .arg(dir.path().join("missing.toml"));
    let out = run(cmd, b"");
    assert_fails_naming(&out, "missing.toml");
    // The cause once, not once from the message and again from the error's source chain.
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "stderr:\n{stderr}"
    );
}

/// A config without any `[[upstream]]` can serve nothing (every name is outside the closed
/// world): `serve` and `check-config` refuse it and say how to start from the defaults,
/// while the commands that only read the cache dir still take it.
#[test]
fn a_config_without_upstreams_is_refused_for_serving_but_not_for_reading_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = write_config(
        dir.path(),
        &format!("[cache]\ndir = {:?}\n", cache.display().to_string()),
    );
    for command in ["check-config", "serve"] {
        let mut cmd = regcache();
        cmd.args([command, "--config"]).arg(&config);
        let out = run(cmd, b"");
        assert_fails_naming(&out, "upstream");
        assert!(
            text(&out.stderr).contains("[[upstream]]"),
            "{command}: {}",
            text(&out.stderr)
        );
    }
    std::fs::create_dir_all(cache.join("v1")).unwrap();
    for command in ["du", "gc", "verify"] {
        let mut cmd = regcache();
        cmd.args([command, "--config"]).arg(&config);
        let out = run(cmd, b"");
        assert!(out.status.success(), "{command}: {}", text(&out.stderr));
    }
}

#[test]
fn check_config_prints_the_config_it_understood() {
    let mut cmd = regcache();
    cmd.arg("check-config");
    let out = run(cmd, b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: toml::Value = toml::from_str(&text(&out.stdout)).expect("check-config prints TOML");
    assert!(printed.get("server").is_some() && printed.get("cache").is_some());
    // What it printed is itself a valid config.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &text(&out.stdout));
    let mut again = regcache();
    again.args(["check-config", "--config"]).arg(&config);
    assert!(run(again, b"").status.success());
}

#[test]
fn hash_password_prints_a_bcrypt_hash_of_stdin() {
    let mut cmd = regcache();
    cmd.args(["hash-password", "--cost", "4"]);
    let out = run(cmd, b"s3cret\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hash = text(&out.stdout).trim().to_owned();
    assert!(bcrypt::verify("s3cret", &hash).unwrap(), "{hash}");
    assert!(!bcrypt::verify("other", &hash).unwrap());

    let mut empty = regcache();
    empty.args(["hash-password", "--cost", "4"]);
    assert_fails_naming(&run(empty, b"\n"), "empty password");
    let mut bad_cost = regcache();
    bad_cost.args(["hash-password", "--cost", "99"]);
    assert_eq!(run(bad_cost, b"pw\n").status.code(), Some(1));
}

/// `--help` of every command says what each of its arguments and options is for: an entry
/// with nothing after its name leaves a user guessing (which file, which server, what input).
#[test]
fn every_argument_and_option_of_every_command_is_explained_in_its_help() {
    let mut cmd = regcache();
    cmd.arg("--help");
    let out = run(cmd, b"");
    assert!(out.status.success());
    let top = text(&out.stdout);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 10, "commands found: {commands:?}");
    let mut unexplained = Vec::new();
    for command in &commands {
        let mut cmd = regcache();
        cmd.args([command.as_str(), "--help"]);
        let out = run(cmd, b"");
        assert!(out.status.success(), "{command} --help");
        let help = text(&out.stdout);
        let mut section = "";
        for line in help.lines() {
            if !line.starts_with(' ') {
                section = line;
                continue;
            }
            // An entry starts with `-x`, `--name`, `<NAME>` or `[NAME]` at most six spaces
            // in (long options line up after the short ones); text further in continues
            // the entry above.
            let entry = line.trim_start();
            let indent = line.len() - entry.len();
            let starts_entry = indent <= 6 && entry.starts_with(['-', '<', '[']);
            if !starts_entry || !(section == "Options:" || section == "Arguments:") {
                continue;
            }
            let name_end = entry.find("  ").unwrap_or(entry.len());
            if entry[name_end..].trim().is_empty() {
                unexplained.push(format!("{command}: {}", entry.trim()));
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "entries without a description: {unexplained:#?}"
    );
}

#[test]
fn unknown_commands_and_flags_are_usage_errors() {
    let mut cmd = regcache();
    cmd.arg("frobnicate");
    let out = run(cmd, b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("frobnicate"));
    let mut cmd = regcache();
    cmd.args(["serve", "--listen", "not-an-address"]);
    assert_eq!(run(cmd, b"").status.code(), Some(2));
    let mut cmd = regcache();
    cmd.arg("--version");
    let out = run(cmd, b"");
    assert!(out.status.success());
    assert!(text(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn serve_startup_failures_exit_at_once_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // A bad config.
    let config = write_config(dir.path(), "[cache]\nmax_size = \"-1\"\n");
    let mut cmd = regcache();
    cmd.args(["serve", "--config"]).arg(&config);
    assert_fails_naming(&run(cmd, b""), "max_size");

    // The registry port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let config = write_process_config(dir.path(), "http://127.0.0.1:9", "", "");
    let mut cmd = regcache();
    cmd.args(["serve", "--config"]).arg(&config).args(["--listen", &port]);
    assert_fails_naming(&run(cmd, b""), &port);

    // The admin port is taken.
    let mut cmd = regcache();
    cmd.args(["serve", "--config"])
        .arg(&config)
        .args(["--admin-listen", &port]);
    assert_fails_naming(&run(cmd, b""), "admin.listen");

    // The cache dir cannot be a directory (a file is in the way).
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    let mut cmd = regcache();
    cmd.args(["serve", "--config"])
        .arg(&config)
        .arg("--cache-dir")
        .arg(&blocked);
    assert_fails_naming(&run(cmd, b""), "a-file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_cache_dir_refuses_and_leaves_the_first_alone() {
    let up = FakeUpstream::start().await;
    let (digest, gate) = held_blob(&up, 70);
    let dir = tempfile::tempdir().unwrap();
    let first = Process::start(dir.path(), &up.url(), "");
    // A fill in flight: its temp file is what a second process used to wipe.
    let resp = open(Method::GET, &first.url(&format!("/v2/library/x/blobs/{digest}")), &[]).await;
    assert_eq!(resp.status(), 200);
    let tmp = dir.path().join("cache/v1/tmp");
    assert_eq!(crate::harness::files_under(&tmp).len(), 1);

    let config = dir.path().join("regcache.toml");
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = regcache();
        cmd.args(["serve", "--config"]).arg(&config);
        run(cmd, b"")
    })
    .await
    .unwrap();
    assert_fails_naming(&out, &format!("in use by process {}", first.child.id()));
    assert_eq!(
        crate::harness::files_under(&tmp).len(),
        1,
        "the first one's fill is intact"
    );

    gate.notify_one();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("the first one's download completes");
    assert_eq!(crate::harness::sha256(&body.to_bytes()), digest);
    assert_eq!(get(&first.url("/v2/")).await.status, 200);
}

/// regcache serving on a port it reports, with every stderr line kept.
struct Logged {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Logged {
    /// `server_keys` go into `[server]`, `upstream_keys` into the one `[[upstream]]`.
    fn start(dir: &Path, upstream: &str, format: &str, rust_log: Option<&str>) -> Logged {
        Logged::start_with(dir, upstream, format, rust_log, "", "")
    }

    fn start_with(
        dir: &Path,
        upstream: &str,
        format: &str,
        rust_log: Option<&str>,
        server_keys: &str,
        upstream_keys: &str,
    ) -> Logged {
        let config = write_process_config(dir, upstream, server_keys, upstream_keys);
        let mut cmd = regcache();
        cmd.args(["--log-format", format, "serve", "--config"]).arg(&config);
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("regcache starts");
        let stderr = child.stderr.take().expect("stderr");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                // Both formats carry the address as `listen`.
                if let Some(rest) = line.split("listen").nth(1) {
                    let addr: String = rest
                        .trim_start_matches(['"', ':', '='])
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    if addr.contains(':') {
                        let _ = addr_tx.send(addr);
                    }
                }
                kept.lock().unwrap().push(line);
            }
            let _ = done_tx.send(());
        });
        let addr = addr_rx.recv_timeout(HANG).expect("regcache logged its address");
        Logged {
            child,
            addr,
            lines,
            done,
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success());
    }

    /// Waits for the exit (bounded) and returns its code and every stderr line.
    fn wait(mut self) -> (Option<i32>, Vec<String>) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > HANG {
                let lines = self.lines.lock().unwrap();
                let tail = &lines[lines.len().saturating_sub(10)..];
                panic!(
                    "regcache did not exit within {HANG:?}; its last lines:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.done.recv_timeout(HANG).expect("stderr closed");
        let lines = self.lines.lock().unwrap().clone();
        (status.code(), lines)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection that was opened and never used (a client's pre-connected pool) ends when
/// the server drains instead of holding the exit for the header timeout (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_the_drain() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &up.url(), "json", None);
    let mut silent = std::net::TcpStream::connect(&server.addr).unwrap();
    assert_eq!(get(&format!("http://{}/v2/", server.addr)).await.status, 200);
    server.signal("TERM");
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(0), "{lines:#?}");
    let mut rest = Vec::new();
    assert_eq!(
        silent.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed without an answer"
    );
}

/// Access lines are batched per worker: a line still arrives while the server is idle, and
/// none of a burst bigger than a batch is lost at exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_access_lines_arrive_when_idle_and_all_at_exit() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &up.url(), "json", None);
    let access_lines = |lines: &Arc<Mutex<Vec<String>>>, path: &str| {
        let needle = format!("\"path\":\"{path}\"");
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("regcache::access") && l.contains(&needle))
            .count()
    };
    assert_eq!(get(&format!("http://{}/v2/", server.addr)).await.status, 200);
    let started = Instant::now();
    while access_lines(&server.lines, "/v2/") == 0 {
        assert!(
            started.elapsed() < HANG,
            "the access line of an idle server never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let burst: Vec<_> = (0..400)
        .map(|i| {
            let client = client.clone();
            let uri = format!("http://{}/v2/nothing/burst{}", server.addr, i % 4);
            tokio::spawn(async move { client.get(uri.parse().unwrap()).await.map(|r| r.status()) })
        })
        .collect();
    for request in burst {
        request.await.unwrap().unwrap();
    }
    server.signal("TERM");
    let lines = server.lines.clone();
    let (code, _) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(0));
    let written: usize = (0..4)
        .map(|i| access_lines(&lines, &format!("/v2/nothing/burst{i}")))
        .sum();
    assert_eq!(written, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_rust_log_and_sigint() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &up.url(), "json", None);
    assert_eq!(get(&format!("http://{}/v2/", server.addr)).await.status, 200);
    server.signal("INT");
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(0), "{lines:#?}");
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(parsed
        .iter()
        .any(|v| v["target"] == "regcache::access" && v["fields"]["path"] == "/v2/"));
    assert!(parsed.iter().any(|v| v["fields"]["message"] == "stopped"));

    // RUST_LOG selects what is written: here the access log is off, the rest is on.
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &up.url(), "text", Some("info,regcache::access=off"));
    assert_eq!(get(&format!("http://{}/v2/", server.addr)).await.status, 200);
    server.signal("TERM");
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(0), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("regcache serving")), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("regcache::access")), "{lines:#?}");
    assert!(lines
        .iter()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_with_130() {
    let up = FakeUpstream::start().await;
    let (digest, gate) = held_blob(&up, 71);
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &up.url(), "text", None);
    // A download that cannot finish keeps the graceful drain waiting.
    let resp = open(
        Method::GET,
        &format!("http://{}/v2/library/x/blobs/{digest}", server.addr),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    server.signal("TERM");
    // The drain has begun once the listener is closed.
    let addr = server.addr.clone();
    let started = Instant::now();
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(started.elapsed() < HANG, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal("TERM");
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(130), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("second signal")), "{lines:#?}");
    drop(resp);
    gate.notify_one();
}

#[test]
fn embedded_default_serves_with_overrides() {
    // `regcache serve` with no config runs the embedded default; the flags override it.
    let dir = tempfile::tempdir().unwrap();
    let mut child = regcache()
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "",
        ])
        .arg("--cache-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains("regcache serving") {
        assert!(started.elapsed() < HANG, "no start line: {seen}");
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "regcache exited: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(dir.path().join("v1/lock").exists());
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_threads_are_pinned_one_per_cpu_when_asked() {
    let up = FakeUpstream::start().await;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = crate::harness::cpu_list(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim(),
    );
    let threads = std::thread::available_parallelism().unwrap().get();
    assert!(
        threads > 1,
        "connection threads need 2 CPUs; this machine has {threads}"
    );
    // Pinned only where regcache owns exactly the CPUs it runs threads for.
    let owned = allowed.len() == threads;
    for (pin, key) in [
        (true, "pin_threads = true"),
        (false, "pin_threads = false"),
        (false, ""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = Process::start(dir.path(), &up.url(), key);
        assert_eq!(get(&server.url("/v2/")).await.status, 200);
        let all = server.threads();
        let of = |prefix: &str| -> Vec<Vec<usize>> {
            all.iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|(_, cpus)| cpus.clone())
                .collect()
        };
        let connection = of("regcache-conn-");
        assert_eq!(connection.len(), threads, "{all:?}");
        if pin && owned {
            let mut each: Vec<usize> = connection.iter().flatten().copied().collect();
            each.sort();
            assert_eq!(each, allowed, "one connection thread on each CPU: {all:?}");
        } else {
            assert!(connection.iter().all(|c| *c == allowed), "{key:?}: {all:?}");
        }
        assert!(
            all.iter()
                .filter(|(name, _)| !name.starts_with("regcache-conn-"))
                .all(|(_, c)| *c == allowed),
            "every other thread may run anywhere: {all:?}"
        );
    }
}

/// Two CPUs for a client to move between, where regcache pins its threads (it may run on
/// exactly as many CPUs as it runs connection threads).
fn two_cpus_of_our_own() -> (usize, usize) {
    let allowed = regcache::cpus::allowed().expect("an affinity mask");
    assert!(
        allowed.len() > 1 && allowed.len() == std::thread::available_parallelism().unwrap().get(),
        "pinning needs 2 CPUs, all of them regcache's: {allowed:?}"
    );
    (allowed[0], allowed[1])
}

/// With pinned connection threads, a client whose thread the scheduler moves to another CPU
/// is asked (`Connection: close`) to reconnect, so that its new connection is accepted by the
/// thread on its new CPU; a client that stays, and the new connection, are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moved_to_another_cpu_is_asked_to_reconnect_to_the_thread_there() {
    let up = FakeUpstream::start().await;
    let (first, other) = two_cpus_of_our_own();
    let dir = tempfile::tempdir().unwrap();
    let server = Process::start(dir.path(), &up.url(), "pin_threads = true");
    let addr = server.addr.clone();
    let asked = tokio::task::spawn_blocking(move || {
        // `Connection: close` on each of up to `n` keep-alive GETs of /v2/ on `conn`, which
        // ends at the first one so marked.
        let closes = |conn: &mut std::net::TcpStream, n: usize| -> Vec<bool> {
            let mut reader = std::io::BufReader::new(conn.try_clone().expect("a second handle"));
            let mut seen = Vec::new();
            while seen.len() < n && !seen.last().copied().unwrap_or(false) {
                seen.push({
                    conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: regcache\r\n\r\n")
                        .expect("request sent");
                    let (mut close, mut length) = (false, 0usize);
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).expect("a response line");
                        let line = line.trim_end().to_ascii_lowercase();
                        if line.is_empty() {
                            break;
                        }
                        close |= line == "connection: close";
                        if let Some(n) = line.strip_prefix("content-length: ") {
                            length = n.parse().expect("a length");
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).expect("the body");
                    close
                });
            }
            seen
        };
        let connect = || {
            let conn = std::net::TcpStream::connect(&addr).expect("connected");
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            conn
        };
        regcache::cpus::run_this_thread_on(&[first]).expect("client on the first CPU");
        let mut conn = connect();
        let staying = closes(&mut conn, 300);
        regcache::cpus::run_this_thread_on(&[other]).expect("client on the other CPU");
        let moved = closes(&mut conn, 200);
        let mut again = connect();
        let after = closes(&mut again, 300);
        (staying, moved, after)
    });
    let (staying, moved, after) = tokio::time::timeout(Duration::from_secs(60), asked)
        .await
        .expect("the client finished")
        .expect("the client thread");
    assert!(
        staying.iter().all(|c| !c),
        "asked to leave while on its CPU: {staying:?}"
    );
    let at = moved.iter().position(|c| *c);
    assert!(
        at.is_some_and(|at| at <= 2 * 64 + 1),
        "from the other CPU, asked to reconnect at request {at:?} of {}",
        moved.len()
    );
    assert_eq!(staying.len(), 300);
    assert_eq!(after.len(), 300);
    assert!(after.iter().all(|c| !c), "the new connection was asked to leave too");
}

/// The same over h2c, where a response cannot say `Connection: close`: the connection gets a
/// GOAWAY at its watchdog's next tick, and the client opens a new one for its next streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_moved_to_another_cpu_is_sent_goaway() {
    let up = FakeUpstream::start().await;
    let (first, other) = two_cpus_of_our_own();
    let dir = tempfile::tempdir().unwrap();
    // The watchdog ticks every quarter of the shortest limit: 50 ms.
    let keys = "pin_threads = true\n[limits]\nheader_read_timeout = \"200ms\"";
    let server = Process::start(dir.path(), &up.url(), keys);
    let addr = server.addr.clone();
    let client = tokio::task::spawn_blocking(move || {
        regcache::cpus::run_this_thread_on(&[first]).expect("client on the first CPU");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.expect("connected");
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .expect("h2 handshake");
            let conn = tokio::spawn(conn);
            // One GET of /v2/ on the connection: whether it was answered.
            let mut get = async move || {
                let req = http::Request::get("http://regcache/v2/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                match sender.send_request(req).await {
                    Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
                    Err(_) => false,
                }
            };
            // Staying: 300 requests over at least 6 ticks, all answered, the connection open.
            let since = Instant::now();
            let mut staying = 0;
            while staying < 300 || since.elapsed() < Duration::from_millis(300) {
                assert!(get().await, "request {staying} on the first CPU failed");
                assert!(!conn.is_finished(), "the connection ended while its client stayed");
                staying += 1;
            }
            regcache::cpus::run_this_thread_on(&[other]).expect("client on the other CPU");
            let mut moved = 0;
            while moved < 20_000 && get().await && !conn.is_finished() {
                moved += 1;
            }
            if moved == 20_000 {
                return (moved, false);
            }
            let ended = conn.await.expect("the connection task");
            (moved, ended.is_ok())
        })
    });
    let (moved, graceful) = tokio::time::timeout(Duration::from_secs(30), client)
        .await
        .expect("the connection was sent away")
        .expect("the client thread");
    assert!(moved < 20_000, "still served after {moved} requests from the other CPU");
    assert!(graceful, "GOAWAY ends the connection gracefully");
    assert!(moved >= 64, "sent away after {moved} requests, before two looks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_json_logs_even_at_trace_level() {
    use crate::fake_upstream::AuthMode;
    let up = FakeUpstream::start().await;
    up.require_auth(AuthMode::Token {
        realm: format!("{}/token", up.url()),
    });
    up.serve_tokens(Some(("bob".into(), "hunter2-very-secret".into())), None);
    let digest = up.add_blob(&random_bytes(10_000, 72));
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start_with(
        dir.path(),
        &up.url(),
        "json",
        Some("trace"),
        "",
        "username = \"bob\"\npassword = \"hunter2-very-secret\"",
    );
    let r = get(&format!("http://{}/v2/library/x/blobs/{digest}", server.addr)).await;
    assert_eq!(r.status, 200);
    // The token the upstream issued is a secret too.
    let token = up
        .seen()
        .into_iter()
        .find_map(|s| {
            s.headers
                .get("authorization")
                .and_then(|v| v.to_str().ok()?.strip_prefix("Bearer ").map(str::to_owned))
        })
        .expect("regcache used a bearer token");
    server.signal("TERM");
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(lines.len() > 5, "trace logging wrote lines: {lines:#?}");
    for line in &lines {
        assert!(!line.contains("hunter2-very-secret"), "password in a log line: {line}");
        assert!(!line.contains(&token), "token in a log line: {line}");
        assert!(
            !line.contains("Ym9iOmh1bnRlcjIt"),
            "Basic credentials in a log line: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_runs_out_the_drain_ends_and_leaves_no_temp_file() {
    let up = FakeUpstream::start().await;
    let (digest, gate) = held_blob(&up, 73);
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start_with(dir.path(), &up.url(), "text", None, "shutdown_grace = \"500ms\"", "");
    let resp = open(
        Method::GET,
        &format!("http://{}/v2/library/x/blobs/{digest}", server.addr),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(crate::harness::files_under(&dir.path().join("cache/v1/tmp")).len(), 1);
    server.signal("TERM");
    // The download never finishes: the grace runs out, and regcache exits cleanly anyway.
    let (code, lines) = tokio::task::spawn_blocking(move || server.wait()).await.unwrap();
    assert_eq!(code, Some(0), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("still in flight") || l.contains("cut short")),
        "{lines:#?}"
    );
    assert!(crate::harness::files_under(&dir.path().join("cache/v1/tmp")).is_empty());
    assert!(
        resp.into_body().collect().await.is_err(),
        "the cut-short download is not complete"
    );
    gate.notify_one();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served_on_the_plain_port() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(300_000, 74);
    let digest = up.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let server = Logged::start(dir.path(), &up.url(), "text", None);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let url = format!("http://{}/v2/library/x/blobs/{digest}", server.addr);
    let resp = client
        .request(http::Request::get(&url).body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(crate::harness::sha256(&body), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_a_blob_miss_is_refused_not_passed_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let digest = up.add_blob(&random_bytes(100_000, 75));
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), &up.url(), "", "");
    // A small descriptor limit, set on the process itself.
    let mut child = ends_with_this_thread(&mut Command::new("prlimit"))
        .arg("--nofile=64:64")
        .arg(env!("CARGO_BIN_EXE_regcache"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit runs regcache");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("regcache logged its address").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(listen) = v["fields"]["listen"].as_str() {
            break listen.to_owned();
        }
    };
    let (accept_failed_tx, accept_failed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("accept failed") {
                let _ = accept_failed_tx.send(());
            }
        }
    });
    // One client connects first (and is served by its own descriptor) ...
    let mut client = tokio::net::TcpStream::connect(&addr).await.unwrap();
    client.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // ... then idle connections use up every descriptor the process may have.
    let mut idle = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"G").await.unwrap();
        idle.push(c);
    }
    // The server has taken every descriptor once it cannot accept another connection.
    accept_failed
        .recv_timeout(crate::harness::HANG)
        .expect("the server ran out of descriptors");
    // A cold blob now cannot get a temp file: 503 with Retry-After, never an uncoalesced
    // stream that would need one more upstream connection per client.
    let request = format!("GET /v2/library/x/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(crate::harness::HANG, client.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert_eq!(up.count("GET", "/blobs/"), 0, "nothing was streamed from the upstream");
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
}

/// A regcache that a test started ends with the test's thread even when the test never got to
/// drop its guard (a panic on another thread, an abort, a killed test binary): no daemon is
/// left running after the suite.
#[test]
fn a_regcache_a_test_started_ends_with_the_thread_that_started_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let pid = std::thread::spawn(move || {
        let server = Process::start_with(&path, "http://127.0.0.1:9", "", "offline = true");
        let pid = server.child.id();
        // As if the test had died before its guards ran.
        std::mem::forget(server);
        pid
    })
    .join()
    .unwrap();
    let stat = format!("/proc/{pid}/stat");
    let started = Instant::now();
    let ended = loop {
        // Ended: reaped by nobody (a zombie of this process) or gone.
        let state = std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()));
        if matches!(state, None | Some('Z')) {
            break true;
        }
        if started.elapsed() > HANG {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(ended, "regcache {pid} outlived the thread that started it");
}
