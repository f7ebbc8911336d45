//! The deployment files (`deploy/`, `Dockerfile`): they parse, they agree with regcache (only
//! known config keys, probe paths, ports, metric names) and with each other (the config a
//! workload mounts is the config it is told to read, the cache volume is the cache dir, the
//! Service fronts the right container ports, the mirror host names the Service).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use regcache::Config;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const ADMIN_PORT: u64 = 9090;
const REGISTRY_PORT: u64 = 5000;
const CACHE_DIR: &str = "/var/cache/regcache";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse_config(what: &str, text: &str) -> Config {
    Config::from_toml(text).unwrap_or_else(|e| panic!("{what}: regcache rejects the config: {e}"))
}

/// What every deployment config must satisfy for the clients configured in deploy/.
fn check_common_config(what: &str, config: &Config) {
    let default: Vec<&str> = config
        .upstreams
        .iter()
        .filter(|u| u.default)
        .map(|u| u.name.as_str())
        .collect();
    // Docker's registry-mirrors sends bare names: they must go to Docker Hub.
    assert_eq!(default, ["docker.io"], "{what}: default upstream");
    let hub = &config.upstreams[config.upstreams.iter().position(|u| u.name == "docker.io").unwrap()];
    assert_eq!(hub.url, "https://registry-1.docker.io", "{what}");
    assert_eq!(
        config.server.listen.port() as u64,
        REGISTRY_PORT,
        "{what}: registry port"
    );
    assert!(
        config.cache.max_size.0 >= 1 << 30,
        "{what}: a cache budget under 1GiB is a mistake"
    );
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

fn kubernetes_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(
        files.iter().any(|p| p.ends_with("regcache.yaml")),
        "deploy/kubernetes/regcache.yaml is missing: {files:?}"
    );
    files
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Yaml> = serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{} document {i}: {e}", path.display())))
        .collect();
    assert!(!docs.is_empty(), "{}: no documents", path.display());
    for (i, doc) in docs.iter().enumerate() {
        assert!(
            doc.is_mapping(),
            "{} document {i} is empty or not a mapping",
            path.display()
        );
    }
    docs
}

fn str_at<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq_at<'a>(v: &'a Yaml, what: &str) -> &'a [Yaml] {
    v.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

/// A probe's or a Service's port: a number, or the name of one of the container's ports.
fn resolve_port(port: &Yaml, named: &BTreeMap<String, u64>, what: &str) -> u64 {
    match port {
        Yaml::Number(n) => n.as_u64().unwrap(),
        Yaml::String(name) => *named
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no container port named {name:?} in {named:?}")),
        other => panic!("{what}: bad port {other:?}"),
    }
}

struct Workload {
    kind: String,
    name: String,
    labels: serde_yaml::Mapping,
    named_ports: BTreeMap<String, u64>,
    container_ports: BTreeSet<u64>,
}

/// Checks a Deployment or DaemonSet against the ConfigMap it mounts; returns what a Service
/// needs to be checked against it.
fn check_workload(file: &str, doc: &Yaml, config_maps: &BTreeMap<String, Yaml>, pvcs: &BTreeSet<String>) -> Workload {
    let kind = str_at(&doc["kind"], file).to_owned();
    let name = str_at(&doc["metadata"]["name"], file).to_owned();
    let what = format!("{file}: {kind} {name}");
    let template = &doc["spec"]["template"];
    let pod = &template["spec"];

    // The selector picks the pod template.
    let labels = template["metadata"]["labels"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: pod template without labels"))
        .clone();
    let selector = doc["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: no selector.matchLabels"));
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "{what}: selector {k:?} does not match the pod labels"
        );
    }

    let containers = seq_at(&pod["containers"], &what);
    let container = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("regcache"))
        .unwrap_or_else(|| panic!("{what}: no container named regcache"));
    assert!(!str_at(&container["image"], &what).is_empty(), "{what}: no image");

    // The config file the container is told to read is the ConfigMap key mounted there.
    let argv: Vec<&str> = seq_at(&container["command"], &what)
        .iter()
        .chain(seq_at(&container["args"], &what))
        .map(|a| str_at(a, &what))
        .collect();
    assert!(
        argv.windows(2).any(|w| w[0].ends_with("regcache") && w[1] == "serve"),
        "{what}: not `regcache serve`: {argv:?}"
    );
    let config_path = argv
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| Path::new(w[1]))
        .unwrap_or_else(|| panic!("{what}: no --config in {argv:?}"));
    let mounts = seq_at(&container["volumeMounts"], &what);
    let volumes = seq_at(&pod["volumes"], &what);
    let volume = |mount: &Yaml| -> &Yaml {
        let vname = &mount["name"];
        volumes
            .iter()
            .find(|v| &v["name"] == vname)
            .unwrap_or_else(|| panic!("{what}: volume {vname:?} is mounted but not defined"))
    };
    let config_mount = mounts
        .iter()
        .find(|m| Some(Path::new(str_at(&m["mountPath"], &what))) == config_path.parent())
        .unwrap_or_else(|| panic!("{what}: nothing mounted at the directory of {}", config_path.display()));
    assert_eq!(
        config_mount["readOnly"].as_bool(),
        Some(true),
        "{what}: config mount should be read-only"
    );
    let cm_name = str_at(&volume(config_mount)["configMap"]["name"], &what);
    let cm = config_maps
        .get(cm_name)
        .unwrap_or_else(|| panic!("{what}: ConfigMap {cm_name} is not in {file}"));
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let toml_text = str_at(&cm["data"][key], &format!("{what}: ConfigMap {cm_name} key {key}"));
    let config = parse_config(&format!("{file}: ConfigMap {cm_name}"), toml_text);
    check_common_config(&format!("{file}: ConfigMap {cm_name}"), &config);
    let admin: SocketAddr = config
        .admin
        .addr()
        .unwrap_or_else(|| panic!("{what}: the admin listener is off: no probes, no metrics"));
    assert_eq!(
        admin,
        SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT as u16)),
        "{what}: admin must listen on the pod IP"
    );

    // The cache directory is a writable volume that outlives the container.
    assert_eq!(config.cache.dir, Path::new(CACHE_DIR), "{what}");
    let cache_mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == config.cache.dir.to_str())
        .unwrap_or_else(|| panic!("{what}: nothing mounted at cache.dir {}", config.cache.dir.display()));
    assert_ne!(
        cache_mount["readOnly"].as_bool(),
        Some(true),
        "{what}: cache mount is read-only"
    );
    let cache_volume = volume(cache_mount);
    // Replicas of a shared bucket keep only a disposable local tier.
    let shared = config.cache.s3.is_some();
    if shared && !cache_volume["emptyDir"].is_null() {
    } else if let Some(claim) = cache_volume["persistentVolumeClaim"]["claimName"].as_str() {
        assert!(
            pvcs.contains(claim),
            "{what}: PersistentVolumeClaim {claim} is not in {file}"
        );
    } else {
        assert!(
            cache_volume["hostPath"]["path"].is_string(),
            "{what}: the cache volume is neither a PVC nor a hostPath: {cache_volume:?}"
        );
    }

    // Ports: registry and admin, matching the config.
    let mut named_ports = BTreeMap::new();
    let mut container_ports = BTreeSet::new();
    for p in seq_at(&container["ports"], &what) {
        let n = p["containerPort"].as_u64().unwrap();
        container_ports.insert(n);
        if let Some(pname) = p["name"].as_str() {
            named_ports.insert(pname.to_owned(), n);
        }
    }
    assert!(
        container_ports.contains(&(config.server.listen.port() as u64)),
        "{what}: registry port not declared"
    );
    assert!(container_ports.contains(&ADMIN_PORT), "{what}: admin port not declared");

    // Probes on the admin listener.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{what}: {probe} path");
        let port = resolve_port(&get["port"], &named_ports, &format!("{what}: {probe}"));
        assert_eq!(port, u64::from(admin.port()), "{what}: {probe} must use the admin port");
    }
    if !container["startupProbe"].is_null() {
        let get = &container["startupProbe"]["httpGet"];
        assert_eq!(get["path"].as_str(), Some("/healthz"), "{what}: startupProbe path");
        assert_eq!(
            resolve_port(&get["port"], &named_ports, &what),
            u64::from(admin.port()),
            "{what}: startupProbe port"
        );
    }

    // Prometheus scrape annotations on the pod template.
    let ann = &template["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"), "{what}");
    assert_eq!(
        ann["prometheus.io/port"].as_str(),
        Some(admin.port().to_string().as_str()),
        "{what}"
    );
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"), "{what}");

    // Non-root, read-only root file system, no privilege escalation.
    let pod_sc = &pod["securityContext"];
    let sc = &container["securityContext"];
    let non_root = sc["runAsNonRoot"].as_bool().or(pod_sc["runAsNonRoot"].as_bool());
    assert_eq!(non_root, Some(true), "{what}: runAsNonRoot");
    let uid = sc["runAsUser"].as_u64().or(pod_sc["runAsUser"].as_u64());
    assert!(matches!(uid, Some(u) if u != 0), "{what}: runAsUser {uid:?}");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{what}");

    // Resources and a grace period long enough to drain in-flight pulls after SIGTERM.
    let res = &container["resources"];
    assert!(
        !res["requests"]["cpu"].is_null() && !res["requests"]["memory"].is_null(),
        "{what}: requests"
    );
    assert!(!res["limits"]["memory"].is_null(), "{what}: memory limit");
    let grace = pod["terminationGracePeriodSeconds"].as_u64();
    assert!(
        matches!(grace, Some(g) if g >= 30),
        "{what}: terminationGracePeriodSeconds {grace:?}"
    );

    if let Some(s3) = config.cache.s3.as_ref().filter(|s| s.peer_url.is_some()) {
        // A cluster: replicas tell each other their pod IP, and show the peer secret mounted
        // from a Secret.
        assert!(doc["spec"]["replicas"].as_u64() >= Some(2), "{what}: a cluster of one");
        let peer_url = s3.peer_url.as_deref().unwrap_or_default();
        assert!(peer_url.contains("${POD_IP}"), "{what}: peer_url {peer_url}");
        let env = seq_at(&container["env"], &what);
        assert!(
            env.iter().any(|e| e["name"].as_str() == Some("POD_IP")
                && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("status.podIP")),
            "{what}: POD_IP from the downward API"
        );
        let secret = s3.peer_secret_file.as_ref().expect("peer_secret_file");
        let mount = mounts
            .iter()
            .find(|m| Some(Path::new(str_at(&m["mountPath"], &what))) == secret.parent())
            .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", secret.display()));
        assert!(
            !volume(mount)["secret"]["secretName"].is_null(),
            "{what}: the peer secret is not a Secret"
        );
    } else if kind == "Deployment" {
        // One process per cache directory: one replica, old pod gone before the new starts.
        assert_eq!(doc["spec"]["replicas"].as_u64(), Some(1), "{what}: replicas");
        assert_eq!(
            doc["spec"]["strategy"]["type"].as_str(),
            Some("Recreate"),
            "{what}: strategy"
        );
    }
    Workload {
        kind,
        name,
        labels,
        named_ports,
        container_ports,
    }
}

/// Parses and checks one Kubernetes file; returns the kinds it holds.
fn check_kubernetes_file(path: &Path) -> Vec<String> {
    let file = path.strip_prefix(repo()).unwrap().display().to_string();
    let docs = yaml_docs(path);
    let mut kinds = Vec::new();
    let mut config_maps = BTreeMap::new();
    let mut pvcs = BTreeSet::new();
    for (i, doc) in docs.iter().enumerate() {
        let what = format!("{file} document {i}");
        let api = str_at(&doc["apiVersion"], &format!("{what}: apiVersion"));
        let kind = str_at(&doc["kind"], &format!("{what}: kind"));
        assert!(!api.is_empty() && !kind.is_empty(), "{what}");
        assert!(!str_at(&doc["metadata"]["name"], &what).is_empty(), "{what}: name");
        assert!(
            doc["metadata"]["namespace"].is_null(),
            "{what}: the manifests are namespace-less"
        );
        let expected_api = match kind {
            "ConfigMap" | "Service" | "PersistentVolumeClaim" | "Secret" => "v1",
            "Deployment" | "DaemonSet" => "apps/v1",
            "PodDisruptionBudget" => "policy/v1",
            other => panic!("{what}: unexpected kind {other}"),
        };
        assert_eq!(api, expected_api, "{what}: apiVersion of {kind}");
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        match kind {
            "ConfigMap" => {
                config_maps.insert(name, doc.clone());
            }
            "PersistentVolumeClaim" => {
                assert!(
                    !doc["spec"]["resources"]["requests"]["storage"].is_null(),
                    "{what}: size"
                );
                pvcs.insert(name);
            }
            _ => {}
        }
        kinds.push(kind.to_owned());
    }
    let workloads: Vec<Workload> = docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")))
        .map(|d| check_workload(&file, d, &config_maps, &pvcs))
        .collect();
    for svc in docs.iter().filter(|d| d["kind"].as_str() == Some("Service")) {
        let what = format!("{file}: Service {}", svc["metadata"]["name"].as_str().unwrap());
        let selector = svc["spec"]["selector"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{what}: no selector"));
        let target = workloads
            .iter()
            .find(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{what}: selects no workload in the file"));
        let mut by_port = BTreeMap::new();
        for p in seq_at(&svc["spec"]["ports"], &what) {
            let port = p["port"].as_u64().unwrap();
            let target_port = if p["targetPort"].is_null() {
                port
            } else {
                resolve_port(&p["targetPort"], &target.named_ports, &what)
            };
            assert!(
                target.container_ports.contains(&target_port),
                "{what}: port {port} -> {target_port} is not a port of {} {}",
                target.kind,
                target.name
            );
            by_port.insert(port, target_port);
        }
        assert_eq!(
            by_port.get(&REGISTRY_PORT),
            Some(&REGISTRY_PORT),
            "{what}: registry port"
        );
        assert_eq!(by_port.get(&ADMIN_PORT), Some(&ADMIN_PORT), "{what}: metrics port");
    }
    kinds
}

#[test]
fn kubernetes_manifests_parse_and_agree_with_regcache() {
    let mut all = BTreeMap::new();
    for path in kubernetes_files() {
        let kinds = check_kubernetes_file(&path);
        all.insert(path.file_name().unwrap().to_str().unwrap().to_owned(), kinds);
    }
    let main: BTreeSet<&str> = all["regcache.yaml"].iter().map(String::as_str).collect();
    assert_eq!(
        main,
        BTreeSet::from(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"]),
        "regcache.yaml kinds"
    );
    if let Some(kinds) = all.get("cluster.yaml") {
        let kinds: BTreeSet<&str> = kinds.iter().map(String::as_str).collect();
        assert_eq!(
            kinds,
            BTreeSet::from(["Secret", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]),
            "cluster.yaml kinds"
        );
    }
    if let Some(kinds) = all.get("daemonset.yaml") {
        assert!(kinds.iter().any(|k| k == "DaemonSet"), "daemonset.yaml: {kinds:?}");
    }
}

#[test]
fn a_broken_manifest_is_caught() {
    // The checks above must be able to fail: a probe on the registry port, and a config with
    // an unknown key.
    let path = repo().join("deploy/kubernetes/regcache.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<Yaml> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).unwrap())
        .collect();
    let mut cms = BTreeMap::new();
    let mut pvcs = BTreeSet::new();
    for d in &docs {
        let name = d["metadata"]["name"].as_str().unwrap().to_owned();
        match d["kind"].as_str() {
            Some("ConfigMap") => {
                cms.insert(name, d.clone());
            }
            Some("PersistentVolumeClaim") => {
                pvcs.insert(name);
            }
            _ => {}
        }
    }
    let deployment = docs.iter().find(|d| d["kind"].as_str() == Some("Deployment")).unwrap();
    // Sound as shipped.
    check_workload("regcache.yaml", deployment, &cms, &pvcs);

    let mut bad_probe = deployment.clone();
    bad_probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
        Yaml::from("registry");
    let r = std::panic::catch_unwind(|| check_workload("regcache.yaml", &bad_probe, &cms, &pvcs));
    assert!(r.is_err(), "a readiness probe on the registry port must be rejected");

    let mut bad_cms = cms.clone();
    for cm in bad_cms.values_mut() {
        let toml = cm["data"]["config.toml"]
            .as_str()
            .unwrap()
            .replace("[cache]\n", "[cache]\ncompression = true\n");
        cm["data"]["config.toml"] = Yaml::from(toml);
    }
    let r = std::panic::catch_unwind(|| check_workload("regcache.yaml", deployment, &bad_cms, &pvcs));
    assert!(r.is_err(), "a config with an unknown key must be rejected");
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not key=value: {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

#[test]
fn systemd_unit_and_config_agree() {
    let config = parse_config("deploy/systemd/config.toml", &read("deploy/systemd/config.toml"));
    check_common_config("deploy/systemd/config.toml", &config);
    assert_eq!(config.cache.dir, Path::new(CACHE_DIR));

    let unit = unit_entries(&read("deploy/systemd/regcache.service"));
    let get = |key: &str| -> Vec<&str> { unit.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect() };
    assert_eq!(
        get("ExecStart"),
        ["/usr/local/bin/regcache serve --config /etc/regcache/config.toml"]
    );
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    assert!(
        get("DynamicUser") == ["yes"] || !get("User").is_empty(),
        "the service must not run as root"
    );
    // With ProtectSystem=strict only these are writable; cache.dir must be one of them.
    let mut writable: Vec<PathBuf> = Vec::new();
    for (key, base) in [("CacheDirectory", "/var/cache"), ("StateDirectory", "/var/lib")] {
        for v in get(key) {
            writable.extend(v.split_whitespace().map(|d| Path::new(base).join(d)));
        }
    }
    for v in get("ReadWritePaths") {
        writable.extend(
            v.split_whitespace()
                .map(|p| PathBuf::from(p.trim_start_matches(['-', '+']))),
        );
    }
    assert!(
        writable.iter().any(|w| config.cache.dir.starts_with(w)),
        "cache.dir {} is not writable under ProtectSystem=strict (writable: {writable:?})",
        config.cache.dir.display()
    );
    // The config file lives in the ConfigurationDirectory.
    assert_eq!(get("ConfigurationDirectory"), ["regcache"]);
}

// ---------------------------------------------------------------------------------------
// Docker daemon and Grafana (JSON)
// ---------------------------------------------------------------------------------------

#[test]
fn docker_daemon_json_names_a_mirror() {
    let v: Json = serde_json::from_str(&read("deploy/docker/daemon.json")).unwrap();
    let mirrors = v["registry-mirrors"].as_array().expect("registry-mirrors list");
    assert!(!mirrors.is_empty());
    for m in mirrors {
        let url: http::Uri = m.as_str().unwrap().parse().unwrap();
        assert!(matches!(url.scheme_str(), Some("http" | "https")), "{url}");
        // Docker requires a mirror URL without a path.
        assert!(matches!(url.path(), "" | "/"), "{url}: Docker mirror URLs take no path");
        assert_eq!(url.port_u16(), Some(REGISTRY_PORT as u16), "{url}");
    }
}

/// Every metric name in a PromQL expression: `regcache_[a-z_]+`, histogram series suffixes
/// stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("regcache_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "regcache_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_owned());
        }
        i = end;
    }
    names
}

fn all_panels(panels: &[Json], out: &mut Vec<Json>) {
    for p in panels {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            all_panels(inner, out);
        }
    }
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(regcache_http_request_duration_seconds_bucket{x="regcache_no"}[5m]))) / xregcache_nope"#
        ),
        BTreeSet::from([
            "regcache_http_request_duration_seconds".to_owned(),
            "regcache_no".to_owned()
        ])
    );
    assert!(metric_names("up").is_empty());
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let dash: Json = serde_json::from_str(&read("deploy/grafana/regcache-dashboard.json")).unwrap();
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert!(!dash["title"].as_str().unwrap().is_empty());
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"datasource"), "templating variables: {vars:?}");

    let mut panels = Vec::new();
    all_panels(dash["panels"].as_array().unwrap(), &mut panels);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let known: BTreeSet<&str> = regcache::metrics::NAMES.iter().copied().collect();
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.trim().is_empty(), "panel without a title: {p}");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: duplicate panel id {id}");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: datasource");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().unwrap().to_owned()),
                "{title}: duplicate refId"
            );
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr} uses no regcache metric");
            for n in names {
                assert!(
                    known.contains(n.as_str()),
                    "{title}: {n} is not exported by regcache (expr: {expr})"
                );
                used.insert(n);
            }
        }
    }
    for needed in [
        "regcache_cache_lookups_total",
        "regcache_upstream_requests_total",
        "regcache_bytes_served_total",
        "regcache_fills_total",
        "regcache_http_requests_total",
        "regcache_http_request_duration_seconds",
        "regcache_upstream_ratelimit_remaining",
        "regcache_upstream_ratelimit_limit",
        "regcache_upstream_circuit_open",
        "regcache_cache_size_bytes",
        "regcache_cache_budget_bytes",
        "regcache_cache_evictions_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

// ---------------------------------------------------------------------------------------
// containerd and containers/image (TOML)
// ---------------------------------------------------------------------------------------

/// The Service in regcache.yaml: (name, registry port).
fn kubernetes_service() -> (String, u64) {
    let docs = yaml_docs(&repo().join("deploy/kubernetes/regcache.yaml"));
    let svc = docs.iter().find(|d| d["kind"].as_str() == Some("Service")).unwrap();
    (svc["metadata"]["name"].as_str().unwrap().to_owned(), REGISTRY_PORT)
}

/// The upstream names of the cluster cache's config.
fn kubernetes_upstreams() -> BTreeSet<String> {
    let docs = yaml_docs(&repo().join("deploy/kubernetes/regcache.yaml"));
    let cm = docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap")).unwrap();
    let config = parse_config("regcache.yaml ConfigMap", cm["data"]["config.toml"].as_str().unwrap());
    config.upstreams.into_iter().map(|u| u.name).collect()
}

#[test]
fn containerd_hosts_toml_mirrors_docker_hub_through_the_service() {
    let v: toml::Value = toml::from_str(&read("deploy/containerd/hosts.toml")).unwrap();
    assert_eq!(v["server"].as_str(), Some("https://registry-1.docker.io"));
    let hosts = v["host"].as_table().expect("[host.\"...\"] tables");
    assert!(!hosts.is_empty());
    let (svc, port) = kubernetes_service();
    let mut found = false;
    for (url, host) in hosts {
        let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(uri.scheme_str(), Some("http"), "{url}: regcache serves plain HTTP");
        // A path would be put before /v2 by containerd.
        assert!(matches!(uri.path(), "" | "/"), "{url}: no path");
        let caps: Vec<&str> = host["capabilities"]
            .as_array()
            .unwrap_or_else(|| panic!("{url}: no capabilities"))
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(!caps.contains(&"push"), "{url}: regcache is read-only");
        if caps.contains(&"pull") && caps.contains(&"resolve") {
            found = true;
            // The host is the Service from regcache.yaml: <service>.<namespace>.svc:<port>.
            let host_name = uri.host().unwrap();
            assert_eq!(host_name.split('.').next(), Some(svc.as_str()), "{url}");
            assert!(
                host_name.ends_with(".svc") || host_name.ends_with(".svc.cluster.local"),
                "{url}"
            );
            assert_eq!(uri.port_u16().map(u64::from), Some(port), "{url}");
        }
    }
    assert!(found, "no host with pull and resolve capabilities");
    assert!(kubernetes_upstreams().contains("docker.io"));
}

#[test]
fn podman_registries_conf_mirrors_by_path_prefix() {
    let v: toml::Value = toml::from_str(&read("deploy/podman/registries.conf")).unwrap();
    let registries = v["registry"].as_array().expect("[[registry]] entries");
    let upstreams = kubernetes_upstreams();
    let mut prefixes = BTreeSet::new();
    for r in registries {
        let prefix = r["prefix"].as_str().unwrap();
        assert_eq!(r["location"].as_str(), Some(prefix), "{prefix}: location");
        assert!(
            upstreams.contains(prefix),
            "{prefix} is not an upstream of the cluster config, regcache would refuse it"
        );
        let mirrors = r["mirror"].as_array().unwrap_or_else(|| panic!("{prefix}: no mirror"));
        assert!(!mirrors.is_empty());
        for m in mirrors {
            let loc = m["location"].as_str().unwrap();
            // "<host:port>/<registry>": regcache takes the first path segment as the upstream.
            let (host, path) = loc.split_once('/').unwrap_or_else(|| panic!("{loc}: no registry path"));
            assert_eq!(path, prefix, "{loc}");
            assert!(host.ends_with(&format!(":{REGISTRY_PORT}")), "{loc}");
            assert_eq!(
                m["insecure"].as_bool(),
                Some(true),
                "{loc}: plain-HTTP mirror needs insecure = true"
            );
        }
        prefixes.insert(prefix);
    }
    for needed in ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"] {
        assert!(prefixes.contains(needed), "no mirror for {needed}");
    }
}

// ---------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------

/// The `s|^FROM$|TO|` substitutions the Dockerfile's sed applies to config.example.toml.
fn dockerfile_substitutions(dockerfile: &str) -> Vec<(String, String)> {
    let mut subs = Vec::new();
    let mut rest = dockerfile;
    while let Some(at) = rest.find("'s|^") {
        let body = &rest[at + 4..];
        let end = body.find("|'").expect("unterminated sed expression");
        let (from, to) = body[..end].split_once('|').expect("s|from|to|");
        let from = from.strip_suffix('$').expect("anchored pattern");
        let to = to.strip_suffix('|').unwrap_or(to);
        subs.push((from.to_owned(), to.to_owned()));
        rest = &body[end..];
    }
    subs
}

#[test]
fn dockerfile_builds_a_non_root_image_with_a_container_config() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let froms: Vec<&str> = lines.iter().filter(|l| l.starts_with("FROM ")).copied().collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].contains("bookworm") && froms[0].ends_with(" AS builder"));
    assert!(froms[1].contains("distroless/cc-debian12:nonroot"), "{}", froms[1]);
    assert!(dockerfile.contains("cargo build --release --locked"));
    let user = lines.iter().rev().find_map(|l| l.strip_prefix("USER ")).expect("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "USER {user}");
    let expose: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace())
        .collect();
    assert_eq!(expose, BTreeSet::from(["5000", "9090"]));
    let entry = lines
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("exec-form ENTRYPOINT");
    assert_eq!(entry, ["/usr/local/bin/regcache", "serve"]);
    let cmd = lines.iter().find_map(|l| l.strip_prefix("CMD ")).expect("CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("exec-form CMD");
    assert_eq!(cmd, ["--config", "/etc/regcache/config.toml"]);

    // The image's config is config.example.toml with the sed substitutions applied: each must
    // hit exactly one line, and the result must be what a container needs.
    let subs = dockerfile_substitutions(&dockerfile);
    assert_eq!(subs.len(), 2, "{subs:?}");
    let mut config_text = read("config.example.toml");
    for (from, to) in &subs {
        let hits = config_text.lines().filter(|l| l == from).count();
        assert_eq!(
            hits, 1,
            "sed pattern {from:?} must match exactly one line of config.example.toml"
        );
        config_text = config_text
            .lines()
            .map(|l| if l == from { to.as_str() } else { l })
            .collect::<Vec<_>>()
            .join("\n");
    }
    let config = parse_config("the image's config", &config_text);
    check_common_config("the image's config", &config);
    assert_eq!(
        config.admin.addr(),
        Some(SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT as u16)))
    );
    assert_eq!(config.cache.dir, Path::new(CACHE_DIR));
    assert!(dockerfile.contains(&format!("VOLUME [\"{CACHE_DIR}\"]")));

    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_owned())
        .collect();
    for needed in ["target", ".git"] {
        assert!(ignore.iter().any(|l| l == needed), ".dockerignore lacks {needed}");
    }
}
