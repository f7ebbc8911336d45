//! `[[sync]]`: images kept fresh in the cache on a schedule while the link is up. Each entry
//! runs on its own timer inside the server: it lists the repository's tags (when it names
//! one), keeps those its patterns match, and prefetches them through the server's own
//! loopback listener, so every byte takes the verified, coalesced fill path. Before each run
//! its tags are marked for revalidation: an unchanged tag costs one upstream `HEAD` (free on
//! Docker Hub), a moved one a `GET` of the new manifest and whatever blobs are new.

use std::sync::Arc;
use std::time::Duration;

use crate::config::SyncConfig;
use crate::prefetch::{parse_image, ImageRef, Options, Platform, Prefetcher};

/// Which tags of a repository an entry takes.
#[derive(Debug)]
enum TagPattern {
    Glob(String),
    Regex(regex_lite::Regex),
    Semver(semver::VersionReq),
}

impl TagPattern {
    fn parse(s: &str) -> Result<TagPattern, String> {
        if let Some(re) = s.strip_prefix("regex:") {
            return regex_lite::Regex::new(re)
                .map(TagPattern::Regex)
                .map_err(|e| format!("tag pattern {s:?}: {e}"));
        }
        if let Some(req) = s.strip_prefix("semver:") {
            return semver::VersionReq::parse(req.trim())
                .map(TagPattern::Semver)
                .map_err(|e| format!("tag pattern {s:?}: {e}"));
        }
        Ok(TagPattern::Glob(s.to_owned()))
    }

    fn matches(&self, tag: &str) -> bool {
        match self {
            TagPattern::Glob(g) => crate::access::glob_match(g, tag),
            TagPattern::Regex(re) => re.is_match(tag),
            TagPattern::Semver(req) => {
                semver::Version::parse(tag.strip_prefix('v').unwrap_or(tag)).is_ok_and(|v| req.matches(&v))
            }
        }
    }
}

/// A `[[sync]]` entry, checked.
#[derive(Debug)]
pub struct Job {
    pub name: String,
    images: Vec<ImageRef>,
    repository: Option<ImageRef>,
    patterns: Vec<TagPattern>,
    platforms: Vec<Platform>,
    all_platforms: bool,
    pub interval: Duration,
}

impl Job {
    /// The `index`-th entry (its default name), or what is wrong with it.
    pub fn new(index: usize, c: &SyncConfig) -> Result<Job, String> {
        let images = c.images.iter().map(|i| parse_image(i)).collect::<Result<Vec<_>, _>>()?;
        let repository = match &c.repository {
            Some(r) if r.rsplit('/').next().is_some_and(|last| last.contains(':')) || r.contains('@') => {
                return Err(format!("repository {r:?} names a tag or digest; put tags in `tags`"));
            }
            Some(r) => Some(parse_image(r)?),
            None => None,
        };
        if images.is_empty() && repository.is_none() {
            return Err("names neither images nor a repository".into());
        }
        if repository.is_some() && c.tags.is_empty() {
            return Err("a repository needs `tags` patterns (\"*\" for every tag)".into());
        }
        let patterns = c
            .tags
            .iter()
            .map(|t| TagPattern::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        let all_platforms = c.platforms.iter().any(|p| p == "all");
        let platforms = c
            .platforms
            .iter()
            .filter(|p| *p != "all")
            .map(|p| p.parse())
            .collect::<Result<Vec<Platform>, _>>()?;
        if c.interval.0 < Duration::from_secs(1) {
            return Err("interval must be at least 1s".into());
        }
        Ok(Job {
            name: c.name.clone().unwrap_or_else(|| format!("sync-{index}")),
            images,
            repository,
            patterns,
            platforms,
            all_platforms,
            interval: c.interval.0,
        })
    }

    /// The images of one run: the listed ones and the repository's matching tags.
    async fn images(&self, prefetcher: &Prefetcher) -> Result<Vec<ImageRef>, String> {
        let mut images = self.images.clone();
        if let Some(repo) = &self.repository {
            for tag in prefetcher.tags(repo).await? {
                if self.patterns.iter().any(|p| p.matches(&tag)) {
                    images.push(ImageRef {
                        reference: tag,
                        ..repo.clone()
                    });
                }
            }
        }
        Ok(images)
    }
}

/// Starts every entry's timer (the first run at once) against the server at `base`.
pub fn start(app: &Arc<crate::App>, jobs: Vec<Job>, base: String) {
    for job in jobs {
        let (app, base) = (app.clone(), base.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(job.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                run_once(&app, &job, &base).await;
            }
        });
    }
}

/// One run of an entry, recorded in the sync metrics.
async fn run_once(app: &crate::App, job: &Job, base: &str) {
    let m = &app.proxy.metrics;
    let options = Options {
        platforms: job.platforms.clone(),
        all_platforms: job.all_platforms,
        jobs: 4,
    };
    let prefetcher = match Prefetcher::new(base, options)
        .and_then(|p| p.with_header(crate::INTERNAL_HEADER, &app.internal_secret))
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(sync = %job.name, error = %e, "sync cannot start");
            return;
        }
    };
    let images = match job.images(&prefetcher).await {
        Ok(images) => images,
        Err(e) => {
            tracing::warn!(sync = %job.name, error = %e, "sync: cannot list the tags");
            m.sync_failures.with_label_values(&[&job.name]).inc();
            return;
        }
    };
    let (mut taken, mut failed) = (0, 0);
    for image in &images {
        // Asked again, not answered from the cache: a HEAD if unchanged.
        let (cache, image_ref) = (app.proxy.cache.clone(), image.clone());
        let _ = tokio::task::spawn_blocking(move || {
            cache
                .tags
                .expire(&image_ref.registry, &image_ref.repo, &image_ref.reference)
        })
        .await;
        match prefetcher.image(image).await {
            Ok(report) => {
                taken += 1;
                m.sync_bytes.with_label_values(&[&job.name]).inc_by(report.bytes);
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(sync = %job.name, %image, error = %e, "sync: image failed");
                m.sync_failures.with_label_values(&[&job.name]).inc();
            }
        }
    }
    m.sync_images.with_label_values(&[&job.name]).set(taken);
    // A pinned image the run took for the first time is pinned now, not at the next round.
    let cache = app.proxy.cache.clone();
    let _ = tokio::task::spawn_blocking(move || cache.apply_pins()).await;
    if failed == 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        m.sync_last_success.with_label_values(&[&job.name]).set(now as i64);
    }
    m.sync_runs
        .with_label_values(&[job.name.as_str(), if failed == 0 { "ok" } else { "failed" }])
        .inc();
    tracing::info!(sync = %job.name, images = taken, failed, "sync run done");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_patterns() {
        let glob = TagPattern::parse("v1.*").unwrap();
        assert!(glob.matches("v1.2") && !glob.matches("v2.0"));
        let re = TagPattern::parse("regex:^\\d+\\.\\d+$").unwrap();
        assert!(re.matches("3.20") && !re.matches("3.20-alpine"));
        let semver = TagPattern::parse("semver:>=1.2, <2").unwrap();
        assert!(semver.matches("v1.4.0") && semver.matches("1.2.0"));
        assert!(!semver.matches("2.0.0") && !semver.matches("latest"));
        assert!(TagPattern::parse("regex:(").is_err());
        assert!(TagPattern::parse("semver:>>1").is_err());
    }
}
