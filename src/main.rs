//! The `bulkhead` command: arguments, logging and signals. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use std::sync::Arc;

use bulkhead::{Bulkhead, Config};

/// A resilient PostgreSQL connection proxy.
///
/// `bulkhead --config FILE` runs it; `bulkhead status` shows a running one; `bulkhead demo`
/// starts a throwaway primary and standby with a bulkhead in front, to try it.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The TOML configuration file.
    #[arg(long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 if it is valid, 1 if not.
    #[arg(long)]
    check: bool,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Show a running bulkhead's hosts, circuits, pools and busiest sessions (from its health
    /// port).
    Status {
        /// The health port to read, host:port.
        #[arg(
            long,
            value_name = "ADDR",
            default_value = "127.0.0.1:9930",
            conflicts_with = "config"
        )]
        health: String,
        /// Read the health port's address from this configuration file instead.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Redraw every interval (e.g. 1s, 500ms) until interrupted.
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = humantime::parse_duration)]
        watch: Option<std::time::Duration>,
        /// Sessions listed at most, the longest-running first.
        #[arg(long, default_value_t = 20)]
        sessions: usize,
    },
    /// Start a throwaway primary and streaming standby with bulkhead in front of them, and
    /// optionally play one of the incidents bulkhead exists for. Ctrl-C removes everything.
    Demo(bulkhead::demo::Options),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Status {
            health,
            config,
            watch,
            sessions,
        }) => {
            let health = match config {
                None => health,
                Some(path) => match Config::load(&path) {
                    Ok(c) => c.health.address.to_string(),
                    Err(e) => {
                        eprintln!("bulkhead: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let options = bulkhead::status::Options {
                health,
                watch,
                sessions,
            };
            return if bulkhead::status::run(&options) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Command::Demo(options)) => return bulkhead::demo::run(options),
        None => {}
    }
    let path = args
        .config
        .expect("clap requires --config without a subcommand");
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The TLS files are read here too, so --check catches a missing or mismatched one.
    if let Err(e) = bulkhead::tls::Tls::load(&config) {
        eprintln!("bulkhead: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if args.check {
        println!("{}: valid", path.display());
        return ExitCode::SUCCESS;
    }
    // This runtime accepts, probes and keeps house; sessions run on the worker threads that
    // `Bulkhead::serve` starts (one per core, or BULKHEAD_WORKERS).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, path))
}

async fn serve(config: Config, path: PathBuf) -> ExitCode {
    let descriptors = bulkhead::fds::raise_limit(config.limits.max_clients);
    let listener = match tokio::net::TcpListener::bind(config.listen.address).await {
        Ok(l) => l,
        Err(e) => {
            error!(address = %config.listen.address, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let readonly = match config.listen_readonly.address {
        None => None,
        Some(address) => match tokio::net::TcpListener::bind(address).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(%address, error = %e, "cannot listen for read-only sessions");
                return ExitCode::FAILURE;
            }
        },
    };
    let health_listener = match std::net::TcpListener::bind(config.health.address) {
        Ok(l) => l,
        Err(e) => {
            error!(address = %config.health.address, error = %e, "cannot listen for health checks");
            return ExitCode::FAILURE;
        }
    };
    info!(address = %config.listen.address, readonly = ?config.listen_readonly.address, health = %config.health.address, hosts = ?config.database.hosts, "listening");
    let proxy = match Bulkhead::new(config) {
        Ok(proxy) => Arc::new(proxy),
        Err(e) => {
            error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    if descriptors > 0 {
        proxy.limit_clients_by_descriptors(bulkhead::fds::session_capacity(descriptors));
    }
    let _health = match proxy.start_health(health_listener) {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot start the health server");
            return ExitCode::FAILURE;
        }
    };
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let reloader = proxy.clone();
    let shutdown = async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: draining"); return; }
                _ = int.recv() => { info!("SIGINT: draining"); return; }
                _ = hup.recv() => reload(&reloader, &path),
            }
        }
    };
    match proxy
        .serve_with_readonly(listener, readonly, shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "stopped");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: read the file again; apply what can change live, say what needs a restart.
fn reload(proxy: &Bulkhead, path: &std::path::Path) {
    match Config::load(path) {
        Ok(config) => {
            let needs_restart = proxy.reload(config);
            if needs_restart.is_empty() {
                info!("SIGHUP: configuration reloaded");
            } else {
                warn!(
                    sections = ?needs_restart,
                    "SIGHUP: timeouts, circuit and limits reloaded; changes to these sections need a restart"
                );
            }
        }
        Err(e) => error!(error = %e, "SIGHUP: configuration rejected; keeping the running one"),
    }
}
