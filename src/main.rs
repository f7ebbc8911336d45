//! The `regcache` command: `serve` and `check-config`; logging set-up, signals, exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides [server] listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides [cache] dir.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Validate a configuration and print it as regcache understands it.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::from_file(p)?,
        None => Config::embedded_default(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli.command) {
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
            let config = load(config.as_ref())?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            cache_dir,
        } => {
            let mut config = load(config.as_ref())?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(dir) = cache_dir {
                config.cache.dir = dir;
            }
            config.validate()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                // The cache opens (and cleans up after any crash) before the port is bound.
                let proxy = regcache::build(&config)
                    .with_context(|| format!("cannot open cache directory {}", config.cache.dir.display()))?;
                let listener = tokio::net::TcpListener::bind(config.server.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", config.server.listen))?;
                let admin = match config.admin.addr() {
                    Some(addr) => Some(
                        tokio::net::TcpListener::bind(addr)
                            .await
                            .with_context(|| format!("cannot listen on {addr} (admin.listen)"))?,
                    ),
                    None => None,
                };
                let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
                tracing::info!(
                    listen = %listener.local_addr()?,
                    admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
                    cache = %config.cache.dir.display(),
                    upstreams = config.upstreams.len(),
                    "regcache serving"
                );
                regcache::run(proxy, listener, admin, shutdown_signal()).await;
                Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: draining in-flight requests");
}
