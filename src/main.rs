//! The `corral` command: `run`, `validate`, `demo` (the demo is a module of this binary, [`demo`],
//! not of the library).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use corral::config::default_workers;
use corral::telemetry::{Telemetry, TelemetryConfig};
use corral::{Config, Instance};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

mod demo;

/// glibc's allocator showed up in the hit path's profile (consolidation, page faults); mimalloc's
/// per-thread free lists suit a server that allocates and frees small buffers per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "A stampede-protecting cache-aside HTTP proxy"
)]
struct Cli {
    /// Log line format.
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
    /// Serve the proxy.
    Run {
        /// The TOML config file.
        #[arg(long, env = "CORRAL_CONFIG")]
        config: PathBuf,
    },
    /// Check a config file; exits non-zero with the file, line and field at fault.
    Validate {
        /// The TOML config file to check.
        #[arg(long, env = "CORRAL_CONFIG")]
        config: PathBuf,
    },
    /// Run a stampede against a built-in slow backend and print what reached it.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    let result = match cli.command {
        Command::Validate { config } => {
            init_logs(format, false, None).and_then(|_| validate(&config))
        }
        // The config is read first: `server.workers` sizes the runtime, and logging starts once
        // it is read (its `[telemetry]` says where spans go).
        Command::Run { config } => {
            Config::load(&config)
                .map_err(anyhow::Error::from)
                .and_then(|config| {
                    runtime(config.server.workers).and_then(|rt| rt.block_on(run(config, format)))
                })
        }
        Command::Demo(args) => init_logs(format, true, None)
            .and_then(|_| runtime(None))
            .and_then(|rt| rt.block_on(demo::run(args))),
    };
    // The access lines still queued are written before the process ends (unless stderr blocks).
    let _ = corral::access::flush(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `outer: inner: …`, each cause once: our error types
/// already show their source in their own message (`cannot read config file: No such file…`),
/// so a cause whose text is already there is not repeated.
fn report(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

fn validate(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    for warning in config.warnings() {
        eprintln!("warning: {}: {warning}", path.display());
    }
    let routes = match config.routes.len() {
        1 => "1 route".to_owned(),
        n => format!("{n} routes"),
    };
    println!(
        "{}: ok ({routes}, {})",
        path.display(),
        if config.redis.is_some() {
            "fleet mode with redis"
        } else {
            "embedded mode"
        }
    );
    Ok(())
}

async fn run(config: Config, format: LogFormat) -> anyhow::Result<()> {
    let telemetry = init_logs(format, false, config.telemetry.as_ref())?;
    let mut instance = Instance::start(&config).await.context("starting corral")?;
    let terminator = instance.terminator();
    let stop = instance.stopper();
    let control = instance.control().clone();
    tokio::spawn(async move {
        signals(control.clone()).await;
        tracing::info!("shutting down");
        tokio::select! {
            () = terminator.terminate() => {}
            // An operator's second Ctrl-C (or SIGTERM) cuts server.shutdown_delay short.
            () = signals(control) => {
                tracing::info!("second signal: shutting down without waiting out shutdown_delay");
                let _ = stop.send(true);
            }
        }
    });
    instance.wait().await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT, reloading the configuration on each SIGHUP meanwhile.
async fn signals(control: std::sync::Arc<corral::control::Control>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    // The outcome is logged by reload itself.
                    let _ = control.reload();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = control;
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The multi-threaded runtime: `workers` threads, or Corral's default ([`default_workers`]: one
/// fewer than the cores the process may use, at least one).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.unwrap_or_else(default_workers))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Installs the log lines (stderr, `RUST_LOG`) and, with `[telemetry]`, the span export, which
/// must be flushed at the end ([`Telemetry::shutdown`]). The request path's spans never show in
/// the log lines ([`corral::trace::QUIET`]); without export they are not even built.
fn init_logs(
    format: LogFormat,
    quiet: bool,
    telemetry: Option<&TelemetryConfig>,
) -> anyhow::Result<Option<Telemetry>> {
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let filter = match corral::trace::QUIET.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    // Colours only for a person at a terminal: kubectl logs, journald and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let (lines, line_format) = match format {
        LogFormat::Text => (lines.boxed(), corral::access::LineFormat::Text),
        LogFormat::Json => (lines.json().boxed(), corral::access::LineFormat::Json),
    };
    let registry = tracing_subscriber::registry().with(lines.with_filter(filter));
    let telemetry = match telemetry {
        None => {
            registry.init();
            None
        }
        Some(config) => {
            let (telemetry, export) = Telemetry::start(config).context("starting span export")?;
            registry.with(export).init();
            tracing::info!(endpoint = %config.otlp_endpoint, "exporting spans (OTLP/HTTP)");
            Some(telemetry)
        }
    };
    // The access lines get their own writer thread, off the request path; without it they are
    // ordinary log lines.
    if let Err(err) = corral::access::install(line_format, Box::new(std::io::stderr())) {
        tracing::warn!(%err, "no access-log writer thread; access lines are written inline");
    }
    Ok(telemetry)
}
