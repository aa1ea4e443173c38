use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use synapse_keys_worker::config::{Config, WorkerConfig};
use synapse_keys_worker::demo::Demo;
use synapse_keys_worker::{App, Server, shutdown_signal, telemetry};

/// jemalloc rather than glibc's malloc: about a tenth more throughput on the
/// query path, and a resident size that stays flat while cached users are
/// replaced (glibc's grew with every round; BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Serves Matrix `/keys/query` from a Synapse homeserver's database.
/// With no arguments at all, runs a self-contained demo on an SQLite
/// database, on loopback only.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// A Synapse config file (homeserver.yaml, worker.yaml, ...) or a
    /// directory of them (its `*.yaml` files, in sorted order, as Synapse
    /// reads `conf.d/`); repeat to layer them, later files overriding
    /// earlier top-level keys.
    #[arg(short = 'c', long = "config-path", value_name = "PATH")]
    config: Vec<PathBuf>,
    /// Address to listen on; wins over the config file and environment.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synapse-keys-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.config.is_empty() {
        // A command line with options but no config is a mistake (a
        // container's command replaced without `-c`), never the demo.
        if let Some(listen) = cli.listen {
            anyhow::bail!(
                "no config file given (-c FILE, e.g. -c /etc/matrix-synapse/homeserver.yaml) with --listen {listen}; the demo runs only without any argument"
            );
        }
        return run_demo().await;
    }
    let mut config = Config::load(&cli.config, std::env::vars())?;
    if let Some(listen) = cli.listen {
        config.worker.listen = listen;
    }
    telemetry::init(config.worker.log_json);
    let listen = config.worker.listen.clone();
    let config_mas = config.synapse.mas.clone();
    for limitation in App::limitations(&config) {
        tracing::warn!("{limitation}");
    }
    let app = App::from_config(config)?;
    let mut wait = std::time::Duration::from_millis(app.config.worker.db_acquire_timeout_ms.max(1000) * 2);
    if let Err(e) = app.store.ping().await {
        tracing::warn!(error = %e, "database not reachable yet; serving anyway (requests get 503 until it is)");
        wait = std::time::Duration::ZERO;
    }
    synapse_keys_worker::schema_window::check_at_start(std::sync::Arc::clone(&app.schema), app.store.clone(), wait)
        .await
        .map_err(anyhow::Error::msg)?;
    let server = Server::bind(std::sync::Arc::clone(&app), &listen).await?;
    // Said once the database answers; serving does not wait for it.
    tokio::spawn(async move {
        if let Some(line) = synapse_keys_worker::device_lists::repair_readiness(&app).await {
            tracing::warn!("{line}");
        }
    });
    if let Some(mas) = &config_mas {
        tracing::info!(endpoint = %mas.endpoint, "delegated auth: user tokens are introspected by Matrix Authentication Service");
    }
    tracing::info!(addr = %server.local_addr(), "synapse-keys-worker listening");
    server.run_until(shutdown_signal()).await?;
    Ok(())
}

async fn run_demo() -> anyhow::Result<()> {
    let worker = WorkerConfig::from_section(yaml_serde::Value::Null, std::env::vars())?;
    if !Demo::is_loopback(&worker.listen) {
        anyhow::bail!("the demo serves only on loopback, not on {}; to serve Synapse's users, give its config (-c FILE)", worker.listen);
    }
    // Only what a newcomer needs: no per-request lines (RUST_LOG brings
    // them back), no notes about federation the demo does not use.
    telemetry::init_with_default(worker.log_json, "warn");
    let listen = worker.listen.clone();
    let demo = Demo::create(worker).await?;
    let app = App::new(demo.config.clone(), demo.store.clone())?;
    let server = Server::bind(app, &listen).await?;
    println!("{}", demo.introduction(server.local_addr()));
    let result = server.run_until(shutdown_signal()).await;
    let _ = std::fs::remove_file(&demo.db_path);
    result?;
    Ok(())
}
