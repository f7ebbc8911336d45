//! The `regcache` command: `serve`, `check-config`, `verify-image`, the air-gap tools
//! (`prefetch`, `ls`, `du`, `verify`, `export`, `import`, `gc`) and `hash-password`;
//! logging set-up, signals, exit codes.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::io::Write as _;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use regcache::Config;

#[derive(Parser)]
#[command(
    name = "regcache",
    version,
    about = "A pull-through caching proxy for OCI / Docker registries"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cache. Without --config it runs the embedded default configuration.
    Serve {
        #[command(flatten)]
        config: ConfigFile,
        /// Overrides [server] listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides [cache] dir.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Overrides [admin] listen ("" turns the admin listener off).
        #[arg(long)]
        admin_listen: Option<String>,
    },
    /// Validate a configuration and print it as regcache understands it (secrets redacted).
    CheckConfig {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Fill the cache with images ahead of need: the selected platforms' manifests, configs
    /// and layers, and their referrers and cosign signatures, attestations and SBOMs.
    /// Without --server it runs on the configured cache dir (no server may be using it).
    Prefetch {
        /// Images as Docker names them: alpine, docker.io/library/alpine:3.20,
        /// ghcr.io/org/app@sha256:…
        images: Vec<String>,
        /// A file with one image per line (`#` starts a comment).
        #[arg(long)]
        file: Option<PathBuf>,
        /// A platform to take from multi-platform images (repeatable); default: this
        /// machine's.
        #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
        platforms: Vec<regcache::prefetch::Platform>,
        /// Take every platform.
        #[arg(long)]
        all_platforms: bool,
        /// A running regcache to fill, by URL (http://mirror:5000), instead of the cache dir.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        config: ConfigFile,
        /// Blob downloads at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Pin the images: never evicted, tags served regardless of TTL (recorded in the
        /// cache dir of --config; a running server applies it within 30 s).
        #[arg(long)]
        pin: bool,
    },
    /// Print what a pull of IMAGE would be told under the configured signature policies,
    /// and why (each platform of an index too). Exits 1 if anything would be refused.
    /// Without --server it runs on the configured cache dir (no server may be using it).
    VerifyImage {
        /// The image as Docker names it: alpine:3.20, ghcr.io/org/app@sha256:…
        image: String,
        /// A running regcache to ask, by URL, instead of the cache dir.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// List the cached images: repository, tag, digest, size with everything it
    /// references, last use. Reads the cache dir only (a server may be running on it).
    Ls {
        /// Only repositories (or repository:tag) matching this pattern (`*` wildcards).
        pattern: Option<String>,
        #[command(flatten)]
        config: ConfigFile,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the cache's disk use per upstream and repository, against its budget.
    Du {
        #[command(flatten)]
        config: ConfigFile,
        /// One JSON document (the budget and the use per repository) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every cached blob and manifest; move damaged ones to v1/quarantine/ (they
    /// are fetched anew when next asked for). Safe beside a running server.
    Verify {
        #[command(flatten)]
        config: ConfigFile,
        /// Fetch each damaged file again now, through --server or (when no server runs on
        /// the cache dir) one started here.
        #[arg(long)]
        repair: bool,
        /// The running regcache on this cache dir, by URL, for --repair.
        #[arg(long)]
        server: Option<String>,
    },
    /// Write cached images, with their signatures, attestations, SBOMs and referrers, as
    /// an OCI image layout: a directory, or a tar when OUTPUT ends in .tar.
    Export {
        /// Images as Docker names them (tags are looked up in the cache).
        #[arg(required = true)]
        images: Vec<String>,
        /// A directory, FILE.tar, or FILE.tar.zst (zstd-compressed).
        #[arg(short, long)]
        output: PathBuf,
        /// Write the archive as numbered parts of at most this size (e.g. 4GiB), plus
        /// OUTPUT.sha256 listing them.
        #[arg(long)]
        split: Option<regcache::config::ByteSize>,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Load OCI image layouts (directories or tars: `regcache export`, `skopeo copy
    /// oci:`/`oci-archive:`, Docker 25+'s `docker save`) into the cache, every blob verified
    /// before anything is committed. Safe beside a running server.
    Import {
        /// OCI image layouts: directories, FILE.tar or FILE.tar.zst (a split export by that name).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Remove blobs no cached manifest references and temp files interrupted fills and
    /// imports left (only files unused for 10 minutes and 1 day). Safe beside a running server.
    Gc {
        #[command(flatten)]
        config: ConfigFile,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Read a password from standard input and print its bcrypt hash for [[auth.user]].
    HashPassword {
        /// bcrypt cost (4 to 31).
        #[arg(long, default_value_t = 12)]
        cost: u32,
    },
}

/// `--config`, which every command but `hash-password` takes.
#[derive(clap::Args)]
struct ConfigFile {
    /// The configuration file (TOML, as in config.example.toml); without it, the embedded
    /// default configuration.
    #[arg(long = "config", value_name = "FILE")]
    path: Option<PathBuf>,
}

impl ConfigFile {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(match &self.path {
            Some(p) => Config::from_file(p)?,
            None => Config::embedded_default(),
        })
    }
}

/// The log worker's handle, taken by whoever ends the process first (the end of `main`, or
/// a second signal) to write out what is queued.
static LOGGING: std::sync::Mutex<Option<regcache::logging::Logging>> = std::sync::Mutex::new(None);

fn finish_logging() {
    let taken = LOGGING.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(logging) = taken {
        logging.finish();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server logs what it does; a command says what it did, and logs only problems.
    let default_filter = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    let logging = regcache::logging::init(
        match cli.log_format {
            LogFormat::Text => regcache::logging::Format::Text,
            LogFormat::Json => regcache::logging::Format::Json,
        },
        default_filter,
    );
    *LOGGING.lock().unwrap_or_else(|p| p.into_inner()) = Some(logging);
    let result = run(cli.command);
    finish_logging();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { config } => {
            let config = config.load()?;
            config.servable()?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::HashPassword { cost } => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                anyhow::bail!("empty password");
            }
            println!("{}", bcrypt::hash(password, cost)?);
            Ok(())
        }
        Command::Ls { pattern, config, json } => {
            let config = config.load()?;
            let inventory = regcache::inventory::Inventory::read(&config.cache.dir)?;
            let pins = regcache::cache::pins::Pins::new(&config.cache.dir.join("v1"));
            pins.configure(
                config
                    .cache
                    .pinned
                    .iter()
                    .filter_map(|p| regcache::cache::pins::normalize(p).ok())
                    .collect(),
            );
            let rows = inventory.list(pattern.as_deref(), &pins);
            let mut out = std::io::stdout().lock();
            if json {
                for row in &rows {
                    writeln!(out, "{}", serde_json::to_string(row)?)?;
                }
                return Ok(());
            }
            writeln!(
                out,
                "{:<48} {:<24} {:<20} {:>10}  {:<19}  PINNED",
                "REPOSITORY", "TAG", "DIGEST", "SIZE", "LAST USED"
            )?;
            for r in &rows {
                let short = r.digest.get(..19).unwrap_or(&r.digest);
                writeln!(
                    out,
                    "{:<48} {:<24} {:<20} {:>10}  {:<19}  {}",
                    r.repository,
                    r.tag.as_deref().unwrap_or("-"),
                    short,
                    regcache::inventory::human_bytes(r.size),
                    regcache::logging::utc_time(r.last_used),
                    if r.pinned { "yes" } else { "" }
                )?;
            }
            Ok(())
        }
        Command::Du { config, json } => {
            let config = config.load()?;
            let usage = regcache::inventory::Inventory::read(&config.cache.dir)?.usage();
            let budget = config.cache.max_size.0;
            let mut out = std::io::stdout().lock();
            if json {
                let doc = serde_json::json!({"budget": budget, "usage": usage});
                writeln!(out, "{doc}")?;
                return Ok(());
            }
            for r in &usage.repositories {
                let name = format!("{}/{}", r.upstream, r.repository);
                writeln!(out, "{:>10}  {name}", regcache::inventory::human_bytes(r.bytes))?;
            }
            writeln!(
                out,
                "{:>10}  in all, {} files ({:.1} % of the {} budget; content shared by repositories counts once)",
                regcache::inventory::human_bytes(usage.total),
                usage.files,
                100.0 * usage.total as f64 / budget.max(1) as f64,
                regcache::inventory::human_bytes(budget)
            )?;
            if usage.damaged > 0 {
                writeln!(
                    out,
                    "damaged: {} (files cut or grown since their commit; set aside at the next start, or now by `regcache verify --repair`)",
                    usage.damaged
                )?;
            }
            Ok(())
        }
        Command::Export {
            images,
            output,
            split,
            config,
        } => {
            let config = config.load()?;
            let parsed = images
                .iter()
                .map(|i| regcache::prefetch::parse_image(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let r = regcache::layout::export(&config.cache.dir, &parsed, &output, split.map(|s| s.0))
                .map_err(anyhow::Error::msg)?;
            println!(
                "exported {} images and attachments ({} files, {:.1} MiB) to {}",
                r.entries,
                r.files,
                r.bytes as f64 / 1048576.0,
                output.display()
            );
            Ok(())
        }
        Command::Import { inputs, config } => {
            let config = config.load()?;
            let mut failed = 0;
            for input in &inputs {
                match regcache::layout::import(&config.cache.dir, input) {
                    Ok(r) => println!(
                        "imported {}: {} names recorded, {} files new ({:.1} MiB), {} already cached",
                        input.display(),
                        r.names,
                        r.new,
                        r.bytes as f64 / 1048576.0,
                        r.present
                    ),
                    Err(e) => {
                        eprintln!("regcache: {e}");
                        failed += 1;
                    }
                }
            }
            match failed {
                0 => Ok(()),
                n => anyhow::bail!("{n} of {} imports failed", inputs.len()),
            }
        }
        Command::Gc { config, dry_run } => {
            let config = config.load()?;
            let c = regcache::gc::collect(&config.cache.dir, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for (digest, size) in &c.blobs {
                println!("{verb} blob {digest} ({})", regcache::inventory::human_bytes(*size));
            }
            for p in &c.temps {
                println!("{verb} stale temp file {}", p.display());
            }
            let bytes: u64 = c.blobs.iter().map(|(_, s)| s).sum();
            println!(
                "{verb} {} unreferenced blobs ({}) and {} stale temp files",
                c.blobs.len(),
                regcache::inventory::human_bytes(bytes),
                c.temps.len()
            );
            Ok(())
        }
        Command::Verify { config, repair, server } => {
            let config = config.load()?;
            let checked = regcache::verify::check(&config.cache.dir, 2)?;
            println!(
                "checked {} files ({:.1} MiB): {} damaged",
                checked.files,
                checked.bytes as f64 / 1048576.0,
                checked.damaged.len()
            );
            for d in &checked.damaged {
                let moved = d
                    .quarantined
                    .as_ref()
                    .map_or("could not be moved aside".to_owned(), |q| {
                        format!("quarantined to {}", q.display())
                    });
                println!("damaged {} {}: {}; {moved}", d.kind, d.digest, d.why);
            }
            if checked.damaged.is_empty() {
                return Ok(());
            }
            if !repair {
                anyhow::bail!(
                    "{} damaged files quarantined; they are fetched again when next asked for (or now, with --repair)",
                    checked.damaged.len()
                );
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let dir = config.cache.dir.clone();
            let result = runtime.block_on(async {
                let repair = |base: String| async move {
                    let fetcher = regcache::prefetch::Prefetcher::new(
                        &base,
                        regcache::prefetch::Options {
                            platforms: Vec::new(),
                            all_platforms: false,
                            jobs: 1,
                        },
                    )
                    .map_err(anyhow::Error::msg)?;
                    let mut unrepaired = 0;
                    for d in &checked.damaged {
                        let mut done = false;
                        for (upstream, repo) in regcache::verify::holders(&dir, &d.digest) {
                            let image = regcache::prefetch::ImageRef {
                                registry: upstream,
                                repo,
                                reference: d.digest.to_string(),
                            };
                            match fetcher
                                .refetch(&image, &d.digest.to_string(), d.kind == "manifest")
                                .await
                            {
                                Ok(()) => {
                                    println!("repaired {} {} from {image}", d.kind, d.digest);
                                    done = true;
                                    break;
                                }
                                Err(e) => eprintln!("regcache: {e}"),
                            }
                        }
                        if !done {
                            eprintln!(
                                "regcache: {} {} not repaired (no repository it came from answered)",
                                d.kind, d.digest
                            );
                            unrepaired += 1;
                        }
                    }
                    match unrepaired {
                        0 => Ok(()),
                        n => Err(anyhow::anyhow!(
                            "{n} of {} damaged files not repaired",
                            checked.damaged.len()
                        )),
                    }
                };
                match server {
                    Some(url) => repair(url).await,
                    None => with_local_server(config, repair).await,
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::VerifyImage { image, server, config } => {
            let image = regcache::prefetch::parse_image(&image).map_err(anyhow::Error::msg)?;
            let loaded = config.load()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let result = runtime.block_on(async {
                let ask = |base: String| async move {
                    let options = regcache::prefetch::Options {
                        platforms: Vec::new(),
                        all_platforms: false,
                        jobs: 1,
                    };
                    let fetcher = regcache::prefetch::Prefetcher::new(&base, options).map_err(anyhow::Error::msg)?;
                    let answers = fetcher.policy_answers(&image).await.map_err(anyhow::Error::msg)?;
                    let mut refused = 0;
                    for (label, passed, said) in &answers {
                        println!("{label}: {}{said}", if *passed { "" } else { "refused: " });
                        refused += usize::from(!passed);
                    }
                    match refused {
                        0 => Ok(()),
                        n => Err(anyhow::anyhow!(
                            "{n} of {} manifests of {image} would be refused",
                            answers.len()
                        )),
                    }
                };
                match server {
                    Some(url) => ask(url).await,
                    None => with_local_server(loaded, ask).await,
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Prefetch {
            images,
            file,
            platforms,
            all_platforms,
            server,
            config,
            jobs,
            pin,
        } => {
            let mut images = images;
            if let Some(file) = file {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                images.extend(
                    text.lines()
                        .map(|l| l.split('#').next().unwrap_or("").trim())
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
            }
            if images.is_empty() {
                anyhow::bail!("no images to prefetch (name them, or give --file)");
            }
            let parsed = images
                .iter()
                .map(|i| regcache::prefetch::parse_image(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let options = regcache::prefetch::Options {
                platforms,
                all_platforms,
                jobs,
            };
            let loaded = config.load()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let result = runtime.block_on(async {
                match server {
                    Some(url) => prefetch(&url, &parsed, options).await,
                    None => prefetch_into_cache_dir(loaded.clone(), &parsed, options).await,
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            // Pinned only once all of them are in the cache.
            if pin && result.is_ok() {
                pin_images(&loaded, &parsed)?;
            }
            result
        }
        Command::Serve {
            config,
            listen,
            cache_dir,
            admin_listen,
        } => {
            let path = config.path.clone();
            let mut config = config.load()?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(dir) = cache_dir {
                config.cache.dir = dir;
            }
            if let Some(admin) = admin_listen {
                config.admin.listen = admin;
            }
            config.validate()?;
            config.servable()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_park(regcache::logging::batch_this_thread)
                .build()
                .context("starting the async runtime")?;
            let result = runtime.block_on(serve(config, path));
            // Whatever still runs (a blocking disk task, a probe) must not keep a failing
            // process from exiting.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
    }
}

/// Prefetches each image through the regcache at `base`, reporting one line per image;
/// fails naming every image that could not be taken, after trying all of them.
async fn prefetch(
    base: &str,
    images: &[regcache::prefetch::ImageRef],
    options: regcache::prefetch::Options,
) -> anyhow::Result<()> {
    // Bars on a terminal (indicatif draws nothing elsewhere); the lines below either way.
    let bars = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = |template: &str| {
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    };
    let bar = "{bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}";
    let image_bar = bars.add(indicatif::ProgressBar::new(0).with_style(style(&format!("{{msg:40!}} {bar}"))));
    let total_bar = bars.add(indicatif::ProgressBar::new(0).with_style(style(&format!("{{prefix:40!}} {bar}"))));
    let prefetcher = regcache::prefetch::Prefetcher::new(base, options)
        .map_err(anyhow::Error::msg)?
        .with_progress(image_bar.clone(), total_bar.clone());
    let mut failed = Vec::new();
    for (n, image) in images.iter().enumerate() {
        total_bar.set_prefix(format!("all: image {} of {}", n + 1, images.len()));
        match prefetcher.image(image).await {
            Ok(r) => bars.suspend(|| {
                println!(
                    "{image} {}: {} manifests, {} blobs ({:.1} MiB), {} attached",
                    r.digest,
                    r.manifests,
                    r.blobs,
                    r.bytes as f64 / 1048576.0,
                    r.referrers
                )
            }),
            Err(e) => {
                bars.suspend(|| eprintln!("regcache: {e}"));
                failed.push(image.to_string());
            }
        }
    }
    image_bar.finish_and_clear();
    total_bar.finish_and_clear();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} images failed: {}",
            failed.len(),
            images.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Records `images` as pinned in the cache dir, unless the pinned images would then need
/// more than the budget (an error that says so; nothing is recorded then).
fn pin_images(config: &Config, images: &[regcache::prefetch::ImageRef]) -> anyhow::Result<()> {
    use regcache::cache::pins::{normalize, Pins};
    let root = config.cache.dir.join("v1");
    let names: Vec<String> = images.iter().map(|i| i.to_string()).collect();
    let pins = Pins::new(&root);
    let mut patterns: Vec<String> = config.cache.pinned.iter().filter_map(|p| normalize(p).ok()).collect();
    patterns.extend(names.iter().cloned());
    pins.configure(patterns);
    let needed = pins.resolve().bytes;
    let budget = config.cache.max_size.0;
    if needed > budget {
        anyhow::bail!(
            "cannot pin {}: pinned images would need {:.1} MiB, more than the cache budget of {:.1} MiB (cache.max_size)",
            names.join(", "),
            needed as f64 / 1048576.0,
            budget as f64 / 1048576.0
        );
    }
    Pins::add(&root, &names).with_context(|| format!("recording pins in {}", root.display()))?;
    println!(
        "pinned {} ({:.1} MiB of pinned images, budget {:.1} MiB)",
        names.join(", "),
        needed as f64 / 1048576.0,
        budget as f64 / 1048576.0
    );
    Ok(())
}

/// Prefetch without a running server: through one started here on the cache dir.
async fn prefetch_into_cache_dir(
    config: Config,
    images: &[regcache::prefetch::ImageRef],
    options: regcache::prefetch::Options,
) -> anyhow::Result<()> {
    with_local_server(config, |base| async move { prefetch(&base, images, options).await }).await
}

/// Runs `work` against a server started in this process on the cache dir (taking its
/// lock), on a loopback port of its own and without client authentication; then drains it.
async fn with_local_server<F, Fut>(mut config: Config, work: F) -> anyhow::Result<()>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    config.auth = Default::default();
    config.server.tls = None;
    config.server.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.validate()?;
    let app = regcache::build(&config)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(regcache::run(app, listener, async move {
        let _ = stopped.await;
    }));
    let result = work(base).await;
    // The drain waits for whatever the server still writes (manifests, tag records).
    let _ = stop.send(());
    let _ = server.await;
    result
}

async fn serve(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // Liveness first: the admin port answers /healthz while the cache index is rebuilt.
    let loaded = regcache::admin::Loaded::default();
    let _admin = match config.admin.addr() {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin.listen)"))?;
            tracing::info!(admin = %listener.local_addr()?, "admin endpoints: /metrics /healthz /readyz");
            Some(regcache::start_admin(listener, loaded.clone()))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    // The cache opens (lock taken, leftovers of a crash removed) before anything is served;
    // its index is rebuilt meanwhile, so regcache answers at once whatever the cache holds.
    let app = regcache::build_loading_in_background(&config)?;
    let _ = loaded.set(app.proxy.clone());
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = app.tls.is_some(),
        cache = %config.cache.dir.display(),
        upstreams = config.upstreams.len(),
        "regcache serving"
    );
    let jobs = config
        .syncs
        .iter()
        .enumerate()
        .map(|(i, c)| regcache::sync::Job::new(i, c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let (stop_internal, internal_stopped) = tokio::sync::watch::channel(false);
    if !jobs.is_empty() {
        // Sync jobs go through a loopback listener of their own, like any client.
        let internal = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let base = format!("http://{}", internal.local_addr()?);
        let mut stopped = internal_stopped.clone();
        tokio::spawn(regcache::run_internal(app.clone(), internal, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        tracing::info!(entries = jobs.len(), "sync entries scheduled");
        regcache::sync::start(&app, jobs, base);
    }
    #[cfg(unix)]
    if let Some(path) = path {
        reload_policies_on_hangup(app.clone(), path);
    }
    regcache::run(app, listener, shutdown_signal()).await;
    let _ = stop_internal.send(true);
    tracing::info!("stopped");
    Ok(())
}

/// On SIGHUP, reads the config file again and puts its `[[policy]]` entries in force; a
/// file that does not validate changes nothing. (Other settings need a restart.)
#[cfg(unix)]
fn reload_policies_on_hangup(app: std::sync::Arc<regcache::App>, path: std::path::PathBuf) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let read = path.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                let config = Config::from_file(&read).map_err(|e| e.to_string())?;
                regcache::policy::Policies::from_config(&config.policies)
                    .map_err(|(key, e)| format!("invalid config: key `{key}`: {e}"))
            })
            .await;
            match loaded {
                Ok(Ok(policies)) => {
                    let n = policies.list().len();
                    app.proxy.gate.replace(policies);
                    tracing::info!(policies = n, config = %path.display(), "SIGHUP: signature policies reloaded");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "SIGHUP: config not reloaded; keeping the policies in force"),
                Err(e) => tracing::warn!(error = %e, "SIGHUP: config not reloaded"),
            }
        }
    });
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted(#[cfg(unix)] term: &mut Option<tokio::signal::unix::Signal>) {
    #[cfg(unix)]
    let terminated = regcache::server::next_signal(term);
    #[cfg(not(unix))]
    let terminated = std::future::pending::<Option<()>>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminated => {},
    }
}

/// The first SIGTERM or SIGINT starts the graceful drain; a second one exits at once.
async fn shutdown_signal() {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    interrupted(
        #[cfg(unix)]
        &mut term,
    )
    .await;
    tracing::info!("shutting down: draining in-flight requests (a second signal stops at once)");
    tokio::spawn(async move {
        interrupted(
            #[cfg(unix)]
            &mut term,
        )
        .await;
        tracing::warn!("second signal: exiting now");
        finish_logging();
        std::process::exit(130);
    });
}
