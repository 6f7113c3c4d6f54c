//! `kiln-dashboard`: serves the web dashboard of a Kiln fleet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kiln_dashboard::http::{self, App, HttpSettings};
use kiln_dashboard::live::{self, FeedSettings};
use kiln_protocol::Client;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kiln-dashboard",
    version,
    about = "Kiln's web dashboard: the GPU fleet, the queue and the jobs, live in a browser"
)]
struct Args {
    /// Config file(s), layered in order (default: $KILN_CONFIG or /etc/kiln/kiln.toml).
    #[arg(long = "config", short = 'c')]
    config: Vec<PathBuf>,
    /// Serve on this address instead of `dashboard.bind`.
    #[arg(long)]
    bind: Option<String>,
}

fn main() -> std::process::ExitCode {
    kiln_config::logging::init("info,zeromq=warn");
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-dashboard: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Only the tables the dashboard reads: a broker-only key never stops it.
    let (cfg, _) = kiln_config::load_tables_for_command_line(
        &args.config,
        &[kiln_config::Table::Client, kiln_config::Table::Dashboard],
    )?;
    let d = &cfg.dashboard;
    let bind: SocketAddr = args
        .bind
        .as_deref()
        .unwrap_or(&d.bind)
        .parse()
        .with_context(|| {
            format!(
                "--bind {:?} is not an address like 127.0.0.1:8790",
                args.bind
            )
        })?;
    let mut opts = cfg.client_options()?;
    opts.name.get_or_insert_with(|| "kiln-dashboard".into());
    let client = Client::connect(opts);
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let live = live::start(
        client.clone(),
        FeedSettings {
            poll: Duration::from_millis(d.poll_ms),
        },
        shutdown.clone(),
    );
    let app = Arc::new(App {
        client,
        live,
        settings: HttpSettings {
            bind,
            token: d.resolved_token()?.map(|s| s.expose().to_string()),
            allowed_hosts: d.allowed_hosts.clone(),
            queue_limit: d.queue_limit,
            waiting_detail_limit: d.waiting_detail_limit,
        },
        shutdown,
    });
    tracing::info!(broker = %cfg.client.broker, events = %cfg.client.events, "kiln-dashboard starting");
    http::serve(app).await?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
