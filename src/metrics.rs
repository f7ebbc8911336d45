//! Prometheus metrics: every family regcache exports, registered in a `Registry` that is
//! passed in (no globals, so a test can run many instances in one process). Names follow
//! Prometheus conventions: `regcache_` prefix, base units, `_total` counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub cache_lookups: IntCounterVec,
    pub bytes_served: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub fills_in_flight: IntGauge,
    pub fills: IntCounterVec,
    pub fill_duration: HistogramVec,
    pub fill_resumes: IntCounter,
    pub layers_ahead: IntCounter,
    pub tokens_fetched: IntCounterVec,
    pub ratelimit_limit: IntGaugeVec,
    pub ratelimit_remaining: IntGaugeVec,
    pub circuit_open: IntGaugeVec,
    pub cache_size: IntGauge,
    pub cache_budget: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_pinned: IntGauge,
    pub cache_evictions: IntCounter,
    pub cache_quarantined: IntCounter,
    pub cache_write_errors: IntCounter,
    pub auth_failures: IntCounter,
    pub access_confirmations: IntCounterVec,
    pub connections_open: IntGauge,
    pub connections_moved: IntCounter,
    pub sync_runs: IntCounterVec,
    pub sync_last_success: IntGaugeVec,
    pub sync_images: IntGaugeVec,
    pub sync_bytes: IntCounterVec,
    pub sync_failures: IntCounterVec,
    pub connections_waiting: IntGauge,
    pub policy_decisions: IntCounterVec,
    pub lease_takeovers: IntCounter,
    pub bucket_size: IntGauge,
    pub bucket_budget: IntGauge,
    pub bucket_collected: IntCounterVec,
    hot: Hot,
}

/// The labelled series a warm cache bumps on nearly every request, resolved once: a label
/// lookup hashes the labels and takes a lock, three times per request.
struct Hot {
    /// `http_requests{status="200"}` and `http_duration`, by [`Hot::slot`].
    ok: [IntCounter; 4],
    duration: [Histogram; 4],
    /// `cache_lookups{result="hit"}` for manifest, tag, blob.
    hits: [IntCounter; 3],
}

impl Hot {
    const ROUTES: [&'static str; 2] = ["manifest", "blob"];
    const METHODS: [&'static str; 2] = ["GET", "HEAD"];
    const KINDS: [&'static str; 3] = ["manifest", "tag", "blob"];

    fn new(requests: &IntCounterVec, duration: &HistogramVec, lookups: &IntCounterVec) -> Hot {
        let pairs = || {
            Hot::ROUTES
                .iter()
                .flat_map(|r| Hot::METHODS.iter().map(move |m| [*r, *m]))
        };
        let ok: Vec<_> = pairs()
            .map(|[r, m]| requests.with_label_values(&[r, m, "200"]))
            .collect();
        let duration: Vec<_> = pairs().map(|l| duration.with_label_values(&l)).collect();
        let hits: Vec<_> = Hot::KINDS
            .iter()
            .map(|k| lookups.with_label_values(&[k, "hit"]))
            .collect();
        Hot {
            ok: ok.try_into().unwrap_or_else(|_| unreachable!("four pairs")),
            duration: duration.try_into().unwrap_or_else(|_| unreachable!("four pairs")),
            hits: hits.try_into().unwrap_or_else(|_| unreachable!("three kinds")),
        }
    }

    fn slot(route: &str, method: &str) -> Option<usize> {
        let r = Hot::ROUTES.iter().position(|r| *r == route)?;
        let m = Hot::METHODS.iter().position(|m| *m == method)?;
        Some(r * Hot::METHODS.len() + m)
    }
}

/// Every metric name regcache exports (the dashboard test checks its queries against it).
pub const NAMES: &[&str] = &[
    "regcache_http_requests_total",
    "regcache_http_request_duration_seconds",
    "regcache_cache_lookups_total",
    "regcache_bytes_served_total",
    "regcache_upstream_requests_total",
    "regcache_upstream_bytes_total",
    "regcache_upstream_request_duration_seconds",
    "regcache_fills_in_flight",
    "regcache_fills_total",
    "regcache_fill_duration_seconds",
    "regcache_fill_resumes_total",
    "regcache_layers_ahead_total",
    "regcache_upstream_tokens_fetched_total",
    "regcache_upstream_ratelimit_limit",
    "regcache_upstream_ratelimit_remaining",
    "regcache_upstream_circuit_open",
    "regcache_cache_size_bytes",
    "regcache_cache_budget_bytes",
    "regcache_cache_entries",
    "regcache_cache_pinned_bytes",
    "regcache_cache_evictions_total",
    "regcache_cache_quarantined_total",
    "regcache_cache_write_errors_total",
    "regcache_auth_failures_total",
    "regcache_access_confirmations_total",
    "regcache_connections_open",
    "regcache_connections_moved_total",
    "regcache_sync_runs_total",
    "regcache_sync_last_success_timestamp_seconds",
    "regcache_sync_images",
    "regcache_sync_bytes_total",
    "regcache_sync_failures_total",
    "regcache_connections_waiting",
    "regcache_policy_decisions_total",
    "regcache_cluster_lease_takeovers_total",
    "regcache_bucket_size_bytes",
    "regcache_bucket_budget_bytes",
    "regcache_bucket_collected_total",
];

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

impl Metrics {
    pub fn new(registry: Registry) -> Metrics {
        let r = &registry;
        let http_requests = counter_vec(
            r,
            "regcache_http_requests_total",
            "Registry API requests answered, by route, method and status.",
            &["route", "method", "status"],
        );
        let http_duration = histogram_vec(
            r,
            "regcache_http_request_duration_seconds",
            "Time to the response headers of registry API requests.",
            &["route", "method"],
        );
        let cache_lookups = counter_vec(r, "regcache_cache_lookups_total", "Cache lookups by kind (blob, manifest, tag) and result (hit, miss, coalesced, stale, bucket: from the shared bucket).", &["kind", "result"]);
        Metrics {
            bytes_served: counter_vec(r, "regcache_bytes_served_total", "Blob bytes sent to clients, by source (cache, fill, upstream = passed through uncached).", &["source"]),
            upstream_requests: counter_vec(r, "regcache_upstream_requests_total", "Requests sent to upstream registries, by upstream, method and status (or error).", &["upstream", "method", "status"]),
            upstream_bytes: counter_vec(r, "regcache_upstream_bytes_total", "Blob bytes received from upstream registries.", &["upstream"]),
            upstream_duration: histogram_vec(r, "regcache_upstream_request_duration_seconds", "Time to the response headers of upstream requests.", &["upstream", "method"]),
            fills_in_flight: gauge(r, "regcache_fills_in_flight", "Blob downloads from upstreams in progress."),
            fills: counter_vec(r, "regcache_fills_total", "Finished blob downloads, by result (committed, relayed = verified and served but not cached, at_peer = relayed from the replica that holds it, from_bucket = relayed from the shared bucket by a replica without a local tier, digest_mismatch, truncated, upstream_error, disk_error).", &["result"]),
            fill_duration: histogram_vec(r, "regcache_fill_duration_seconds", "Time from the start of a blob download to its commit or failure, by result.", &["result"]),
            fill_resumes: counter(r, "regcache_fill_resumes_total", "Broken upstream transfers resumed with a Range request."),
            layers_ahead: counter(r, "regcache_layers_ahead_total", "Blob downloads started before any client asked for the blob, once a client asked for another layer of its image ([cache] layers_ahead)."),
            tokens_fetched: counter_vec(r, "regcache_upstream_tokens_fetched_total", "Bearer tokens fetched from upstream token services.", &["upstream"]),
            ratelimit_limit: gauge_vec(r, "regcache_upstream_ratelimit_limit", "The upstream's announced pull limit per window (ratelimit-limit).", &["upstream"]),
            ratelimit_remaining: gauge_vec(r, "regcache_upstream_ratelimit_remaining", "Pulls left in the upstream's window (ratelimit-remaining).", &["upstream"]),
            circuit_open: gauge_vec(r, "regcache_upstream_circuit_open", "1 while an upstream is considered down and not contacted, else 0.", &["upstream"]),
            cache_size: gauge(r, "regcache_cache_size_bytes", "Bytes of content in the disk cache."),
            cache_budget: gauge(r, "regcache_cache_budget_bytes", "The disk cache budget (cache.max_size)."),
            cache_entries: gauge(r, "regcache_cache_entries", "Blobs and manifests in the disk cache."),
            cache_pinned: gauge(r, "regcache_cache_pinned_bytes", "Bytes of pinned images in the disk cache (never evicted; part of cache_size_bytes)."),
            cache_evictions: counter(r, "regcache_cache_evictions_total", "Cache entries evicted to stay under the budget."),
            cache_quarantined: counter(r, "regcache_cache_quarantined_total", "Damaged cache files set aside in <dir>/v1/quarantine (wrong size or digest); each is fetched anew when asked for. A failing disk shows here first."),
            cache_write_errors: counter(r, "regcache_cache_write_errors_total", "Blobs, manifests, tag records and repository records the cache disk refused to write or lost at the fsync before their commit (full, thin-provisioned and out of space, failing). Content is still served, uncached."),
            auth_failures: counter(r, "regcache_auth_failures_total", "Client requests refused for missing or wrong credentials."),
            lease_takeovers: counter(r, "regcache_cluster_lease_takeovers_total", "Leases of a fetch taken over from a replica that stopped renewing them."),
            bucket_size: gauge(r, "regcache_bucket_size_bytes", "Bytes of blobs in the shared bucket, as the last collection on this replica counted them."),
            bucket_budget: gauge(r, "regcache_bucket_budget_bytes", "The shared bucket's budget for blobs ([cache.s3] max_size; 0 when unset)."),
            bucket_collected: counter_vec(r, "regcache_bucket_collected_total", "Blobs this replica removed from the shared bucket, by reason: unreferenced, budget.", &["reason"]),
            policy_decisions: counter_vec(r, "regcache_policy_decisions_total", "Manifest and blob requests a signature policy decided, by policy, decision (verified, warned, denied) and reason (no_signature, bad_signature, wrong_identity, digest_mismatch, untrusted, malformed; empty when verified).", &["policy", "decision", "reason"]),
            access_confirmations: counter_vec(r, "regcache_access_confirmations_total", "Cached content asked for under a repository not yet known to hold it, checked with an upstream HEAD first, by result (confirmed, refused).", &["result"]),
            sync_runs: counter_vec(r, "regcache_sync_runs_total", "Runs of each [[sync]] entry, by result (ok, failed).", &["sync", "result"]),
            sync_last_success: gauge_vec(r, "regcache_sync_last_success_timestamp_seconds", "Unix time of each [[sync]] entry's last run in which every image succeeded.", &["sync"]),
            sync_images: gauge_vec(r, "regcache_sync_images", "Images each [[sync]] entry took in its last run.", &["sync"]),
            sync_bytes: counter_vec(r, "regcache_sync_bytes_total", "Blob bytes each [[sync]] entry went through (cached or fetched).", &["sync"]),
            sync_failures: counter_vec(r, "regcache_sync_failures_total", "Images (or tag listings) a [[sync]] entry could not take.", &["sync"]),
            connections_open: gauge(r, "regcache_connections_open", "Client connections being served (at most limits.max_connections)."),
            connections_moved: counter(r, "regcache_connections_moved_total", "Client connections asked to reconnect (Connection: close, or GOAWAY on h2) because their requests now arrive on another pinned connection thread's CPU ([server] pin_threads)."),
            connections_waiting: gauge(r, "regcache_connections_waiting", "1 while an accepted connection waits for a slot because limits.max_connections are open (the rest wait in the listen backlog)."),
            hot: Hot::new(&http_requests, &http_duration, &cache_lookups),
            http_requests,
            http_duration,
            cache_lookups,
            registry,
        }
    }

    /// Counts an answered request in `http_requests` and `http_duration`.
    pub fn answered(&self, route: &str, method: &str, status: http::StatusCode, seconds: f64) {
        let slot = Hot::slot(route, method);
        match slot {
            Some(i) if status == http::StatusCode::OK => self.hot.ok[i].inc(),
            _ => self
                .http_requests
                .with_label_values(&[route, method, status.as_str()])
                .inc(),
        }
        match slot {
            Some(i) => self.hot.duration[i].observe(seconds),
            None => self.http_duration.with_label_values(&[route, method]).observe(seconds),
        }
    }

    /// Counts a cache lookup in `cache_lookups`.
    pub fn looked_up(&self, kind: &str, result: &str) {
        match Hot::KINDS.iter().position(|k| *k == kind) {
            Some(i) if result == "hit" => self.hot.hits[i].inc(),
            _ => self.cache_lookups.with_label_values(&[kind, result]).inc(),
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_lookups_land_in_their_own_labelled_series() {
        let m = Metrics::new(Registry::new());
        let mut n = 0;
        for route in ["manifest", "blob", "tags_list"] {
            for method in ["GET", "HEAD", "other"] {
                for status in [http::StatusCode::OK, http::StatusCode::NOT_FOUND] {
                    n += 1;
                    for _ in 0..n {
                        m.answered(route, method, status, 0.5);
                    }
                    let counted = m
                        .http_requests
                        .with_label_values(&[route, method, status.as_str()])
                        .get();
                    assert_eq!(counted, n, "{route} {method} {status}");
                }
                let timed = m.http_duration.with_label_values(&[route, method]).get_sample_count();
                assert_eq!(timed, n - 1 + n, "{route} {method}");
            }
        }
        for (i, kind) in ["manifest", "tag", "blob"].into_iter().enumerate() {
            for _ in 0..=i {
                m.looked_up(kind, "hit");
            }
            m.looked_up(kind, "miss");
            assert_eq!(
                m.cache_lookups.with_label_values(&[kind, "hit"]).get(),
                i as u64 + 1,
                "{kind}"
            );
            assert_eq!(m.cache_lookups.with_label_values(&[kind, "miss"]).get(), 1, "{kind}");
        }
    }

    #[test]
    fn every_family_is_listed_and_rendered() {
        let m = Metrics::new(Registry::new());
        // Touch the labelled families so they appear in the output.
        m.http_requests.with_label_values(&["blob", "GET", "200"]).inc();
        m.http_duration.with_label_values(&["blob", "GET"]).observe(0.1);
        m.cache_lookups.with_label_values(&["blob", "hit"]).inc();
        m.bytes_served.with_label_values(&["cache"]).inc();
        m.upstream_requests
            .with_label_values(&["docker.io", "GET", "200"])
            .inc();
        m.upstream_bytes.with_label_values(&["docker.io"]).inc();
        m.upstream_duration
            .with_label_values(&["docker.io", "GET"])
            .observe(0.1);
        m.fills.with_label_values(&["committed"]).inc();
        m.fill_duration.with_label_values(&["committed"]).observe(1.0);
        m.tokens_fetched.with_label_values(&["docker.io"]).inc();
        m.ratelimit_limit.with_label_values(&["docker.io"]).set(100);
        m.ratelimit_remaining.with_label_values(&["docker.io"]).set(99);
        m.circuit_open.with_label_values(&["docker.io"]).set(0);
        m.access_confirmations.with_label_values(&["confirmed"]).inc();
        m.sync_runs.with_label_values(&["s", "ok"]).inc();
        m.sync_last_success.with_label_values(&["s"]).set(1);
        m.sync_images.with_label_values(&["s"]).set(1);
        m.sync_bytes.with_label_values(&["s"]).inc();
        m.sync_failures.with_label_values(&["s"]).inc();
        m.policy_decisions.with_label_values(&["p", "verified", ""]).inc();
        m.bucket_collected.with_label_values(&["budget"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        assert_eq!(m.registry.gather().len(), NAMES.len());
    }
}
