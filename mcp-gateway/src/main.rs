//! `kiln-mcp`: serves Kiln to MCP clients over stdio (default) or streamable HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kiln_mcp::files::AllowedRoots;
use kiln_mcp::gateway::{client_options, Gateway};
use kiln_mcp::http::{self, HttpSettings};
use kiln_mcp::KilnMcp;
use kiln_protocol::Client;
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kiln-mcp",
    version,
    about = "Kiln's MCP gateway: image and video generation on a GPU fleet for AI assistants"
)]
struct Args {
    /// Config file(s), layered in order (default: $KILN_CONFIG or /etc/kiln/kiln.toml).
    #[arg(long = "config", short = 'c')]
    config: Vec<PathBuf>,
    /// Serve streamable HTTP instead of stdio, on this address (`mcp.http_bind`
    /// when given without a value).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    http: Option<String>,
}

fn main() -> std::process::ExitCode {
    // Logs go to stderr only: on stdio, stdout is the protocol channel.
    kiln_config::logging::init("info,zeromq=warn");
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-mcp: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Only the tables kiln-mcp reads: a broker-only key never stops the gateway.
    let (cfg, _) = kiln_config::load_tables_for_command_line(
        &args.config,
        &[kiln_config::Table::Client, kiln_config::Table::Mcp],
    )?;
    let roots = AllowedRoots::new(&cfg.mcp.allowed_roots).context("preparing mcp.allowed_roots")?;
    let client = Client::connect(client_options(&cfg)?);
    let gw = Arc::new(Gateway::new(client, cfg.mcp.clone(), roots));
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    match args.http {
        Some(addr) => {
            let bind: SocketAddr = if addr.is_empty() {
                cfg.mcp.http_bind.as_str()
            } else {
                addr.as_str()
            }
            .parse()
            .with_context(|| format!("--http {addr:?} is not an address like 127.0.0.1:8765"))?;
            let settings = HttpSettings {
                bind,
                path: cfg.mcp.http_path.clone(),
                token: cfg.mcp.resolved_token()?.map(|s| s.expose().to_string()),
                allowed_hosts: cfg.mcp.allowed_hosts.clone(),
                allowed_origins: cfg.mcp.allowed_origins.clone(),
            };
            // Jobs of calls still waiting keep running (see kiln_mcp::jobs).
            http::serve(gw.clone(), settings, shutdown).await?;
        }
        None => {
            tracing::info!(broker = %cfg.client.broker, "serving MCP over stdio");
            let (stdin, stdout) = rmcp::transport::stdio_pipes();
            let service = match KilnMcp::new(gw.clone())
                .serve(kiln_mcp::stdio::Stdio::new(stdin, stdout))
                .await
            {
                Ok(service) => service,
                // The client went away before `initialize` (a launcher probing the
                // command, an editor closing): nothing failed.
                Err(rmcp::service::ServerInitializeError::ConnectionClosed(why)) => {
                    tracing::info!(%why, "stdin closed before the session started");
                    return Ok(());
                }
                Err(e) => return Err(e).context("starting the stdio MCP session"),
            };
            // The client closing stdin or a signal ends the session; the jobs of
            // calls still waiting keep running (see kiln_mcp::jobs).
            tokio::select! {
                r = service.waiting() => { r.context("the stdio MCP session failed")?; }
                _ = shutdown.cancelled() => {}
            }
        }
    }
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
