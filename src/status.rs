//! The status page at the admin listener's `/`: the cache's fill against its budget, hit
//! ratio, upstream bytes saved, each upstream's state, the sync entries' last runs, the
//! signature policies and their decisions, the largest repositories and the pinned images. Server-rendered HTML from the metrics and
//! the cache itself, no script; every name in it is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::inventory::human_bytes;
use crate::proxy::Proxy;

/// `&`, `<`, `>`, `"` and `'` as entities.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Every sample of a family: label values (in label order) -> value.
fn samples(families: &[prometheus::proto::MetricFamily], name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let Some(family) = families.iter().find(|f| f.name() == name) else {
        return Vec::new();
    };
    family
        .get_metric()
        .iter()
        .map(|m| {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            // A sample is a counter or a gauge; the other reads 0.
            let value = m.get_counter().get_value() + m.get_gauge().get_value();
            (labels, value)
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str())
}

fn sum_where(families: &[prometheus::proto::MetricFamily], name: &str, key: &str, values: &[&str]) -> f64 {
    samples(families, name)
        .iter()
        .filter(|(l, _)| values.contains(&label(l, key)))
        .fold(0.0, |a, (_, v)| a + v)
}

/// The page. Blocking (it reads the cache's association log for repository sizes).
pub fn render(proxy: &Proxy) -> String {
    proxy.refresh_metrics();
    let families = proxy.metrics.registry.gather();
    let cache = &proxy.cache;
    let (used, budget) = (cache.index.total_bytes(), cache.index.budget());
    let hits = sum_where(
        &families,
        "regcache_cache_lookups_total",
        "result",
        &["hit", "coalesced", "stale", "bucket"],
    );
    let misses = sum_where(&families, "regcache_cache_lookups_total", "result", &["miss"]);
    // Float sums start from 0.0 here, not from -0.0 as Iterator::sum does.
    let total = |name: &str| samples(&families, name).iter().fold(0.0, |a, (_, v)| a + v);
    let (served, fetched) = (
        total("regcache_bytes_served_total"),
        total("regcache_upstream_bytes_total"),
    );
    let pct = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.1} %", 100.0 * a / b)
        } else {
            "–".into()
        }
    };

    let mut h = String::new();
    h.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>regcache status</title>\n");
    h.push_str("<style>body{font:15px system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}th{background:#f4f4f4}.bar{background:#eee;width:30em;height:1em}.fill{background:#3a7;height:1em}</style>\n");
    h.push_str("</head><body>\n<h1>regcache</h1>\n");
    let _ = writeln!(
        h,
        "<h2>Cache</h2>\n<p id=\"fill\">{} of {} used ({}), {} pinned, {} entries</p>",
        human_bytes(used),
        human_bytes(budget),
        pct(used as f64, budget as f64),
        human_bytes(cache.index.pinned_bytes()),
        cache.index.entry_count()
    );
    let width = (100 * used).checked_div(budget).unwrap_or(0).min(100);
    let _ = writeln!(
        h,
        "<div class=\"bar\"><div class=\"fill\" style=\"width:{width}%\"></div></div>"
    );
    let _ = writeln!(
        h,
        "<p id=\"hits\">Hit ratio {} ({hits:.0} of {:.0} lookups). Served {} to clients for {} from upstreams: {} saved.</p>",
        pct(hits, hits + misses),
        hits + misses,
        human_bytes(served as u64),
        human_bytes(fetched as u64),
        human_bytes((served - fetched).max(0.0) as u64)
    );

    h.push_str("<h2>Upstreams</h2>\n<table id=\"upstreams\"><tr><th>Upstream</th><th>URL</th><th>State</th><th>Rate limit left</th></tr>\n");
    let circuit = samples(&families, "regcache_upstream_circuit_open");
    let remaining = samples(&families, "regcache_upstream_ratelimit_remaining");
    let limit = samples(&families, "regcache_upstream_ratelimit_limit");
    for up in proxy.upstreams.iter() {
        let of = |s: &[(Vec<(String, String)>, f64)]| {
            s.iter().find(|(l, _)| label(l, "upstream") == up.name).map(|(_, v)| *v)
        };
        let state = if up.offline {
            "offline"
        } else if of(&circuit) == Some(1.0) {
            "down (circuit open)"
        } else {
            "up"
        };
        let headroom = match (of(&remaining), of(&limit)) {
            (Some(r), Some(l)) => format!("{r:.0} of {l:.0}"),
            _ => "–".into(),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{state}</td><td>{headroom}</td></tr>",
            escape(&up.name),
            escape(up.base_url())
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Sync</h2>\n");
    let runs = samples(&families, "regcache_sync_runs_total");
    if runs.is_empty() {
        h.push_str("<p>No <code>[[sync]]</code> entries have run.</p>\n");
    } else {
        h.push_str("<table id=\"sync\"><tr><th>Entry</th><th>Runs ok / failed</th><th>Images</th><th>Last success (UTC)</th></tr>\n");
        let mut entries: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (l, v) in &runs {
            let e = entries.entry(label(l, "sync").to_owned()).or_default();
            if label(l, "result") == "ok" {
                e.0 += v;
            } else {
                e.1 += v;
            }
        }
        let last = samples(&families, "regcache_sync_last_success_timestamp_seconds");
        let images = samples(&families, "regcache_sync_images");
        for (name, (ok, failed)) in entries {
            let of =
                |s: &[(Vec<(String, String)>, f64)]| s.iter().find(|(l, _)| label(l, "sync") == name).map(|(_, v)| *v);
            let when = of(&last).map_or("never".into(), |t| crate::logging::utc_time(t as u64));
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{ok:.0} / {failed:.0}</td><td>{:.0}</td><td>{when}</td></tr>",
                escape(&name),
                of(&images).unwrap_or(0.0)
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Signature policies</h2>\n");
    let policies = proxy.gate.policies();
    if policies.is_empty() {
        h.push_str("<p>No <code>[[policy]]</code>: signatures are not checked.</p>\n");
    } else {
        h.push_str("<table id=\"policies\"><tr><th>Policy</th><th>Match</th><th>Mode</th><th>Trusts</th><th>Verified</th><th>Warned</th><th>Denied (by reason)</th></tr>\n");
        let decisions = samples(&families, "regcache_policy_decisions_total");
        for p in policies.list() {
            let count = |decision: &str| -> f64 {
                decisions
                    .iter()
                    .filter(|(l, _)| label(l, "policy") == p.name && label(l, "decision") == decision)
                    .fold(0.0, |a, (_, v)| a + v)
            };
            let reasons: Vec<String> = decisions
                .iter()
                .filter(|(l, _)| label(l, "policy") == p.name && label(l, "decision") == "denied")
                .map(|(l, v)| format!("{} {v:.0}", label(l, "reason")))
                .collect();
            let mut trust: Vec<String> = p.trust.keys.iter().map(|k| format!("key {}", k.name)).collect();
            trust.extend(p.trust.identities.iter().map(|i| i.to_string()));
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}{}</td></tr>",
                escape(&p.name),
                escape(&p.pattern),
                crate::policy::mode_name(p.mode),
                escape(&trust.join(", ")),
                count("verified"),
                count("warned"),
                count("denied"),
                if reasons.is_empty() {
                    String::new()
                } else {
                    escape(&format!(" ({})", reasons.join(", ")))
                },
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Largest repositories</h2>\n<table id=\"repositories\"><tr><th>Repository</th><th>Size</th></tr>\n");
    let mut sizes: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((upstream, repo), digests) in cache.associations.by_pair() {
        let bytes = digests
            .iter()
            .filter_map(|d| {
                let blob = cache.index.size_of(crate::cache::blob_store::Kind::Blob, d);
                blob.or_else(|| cache.index.size_of(crate::cache::blob_store::Kind::Manifest, d))
            })
            .sum();
        sizes.insert((upstream, repo), bytes);
    }
    let mut top: Vec<_> = sizes.into_iter().filter(|(_, b)| *b > 0).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for ((upstream, repo), bytes) in top.iter().take(20) {
        let _ = writeln!(
            h,
            "<tr><td>{}/{}</td><td>{}</td></tr>",
            escape(upstream),
            escape(repo),
            human_bytes(*bytes)
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2>Pinned</h2>\n");
    let pins = cache.pins.patterns();
    if pins.is_empty() {
        h.push_str("<p>No pinned images.</p>\n");
    } else {
        h.push_str("<ul id=\"pinned\">\n");
        for p in pins {
            let _ = writeln!(h, "<li>{}</li>", escape(&p));
        }
        h.push_str("</ul>\n");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_what_html_gives_meaning() {
        assert_eq!(
            super::escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
