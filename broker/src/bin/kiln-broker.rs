//! `kiln-broker`: the queue, the job table, the worker registry and the artifact
//! store, behind three ZeroMQ sockets.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kiln_broker::{Broker, BrokerSettings};

#[derive(Parser)]
#[command(
    version,
    about = "Kiln broker: dispatches generation jobs to per-GPU workers"
)]
struct Args {
    /// Config file(s), layered in order (default: $KILN_CONFIG or /etc/kiln/kiln.toml).
    #[arg(long = "config", short = 'c')]
    config: Vec<PathBuf>,
    /// Override `broker.state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Keep jobs in memory only (no store; for benchmarks and throwaway runs).
    #[arg(long)]
    in_memory: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln_config::logging::init("info,zeromq=warn");
    let args = Args::parse();
    let (mut cfg, _) = kiln_config::load_for_command_line(&args.config)?;
    if let Some(dir) = args.state_dir {
        cfg.broker.state_dir = dir;
    }
    if args.in_memory {
        cfg.broker.durable = false;
    }
    for (name, ep) in [
        ("frontend", &cfg.broker.frontend),
        ("backend", &cfg.broker.backend),
        ("events", &cfg.broker.events),
    ] {
        let curve =
            cfg.broker.curve_secret_key.is_some() || cfg.broker.curve_secret_key_file.is_some();
        if !kiln_config::is_loopback_endpoint(ep) && !curve {
            // Config validation let this through only with allow_insecure_network.
            tracing::warn!(
                "broker.{name} = {ep} is not loopback and CURVE is off (allow_insecure_network = true): anyone on that network can read and send jobs; keep it fenced (docs/security.md)"
            );
        }
    }
    let settings = BrokerSettings::from_config(&cfg)?;
    // Its own task, reading the registry: the broker's loop never serves it.
    let _metrics = match cfg.broker.metrics_addr()? {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "broker.metrics_listen is not loopback: anyone who reaches it can read the fleet's figures; fence it (broker.metrics_allowed_networks, `kiln config fence`)");
            }
            let registry = settings.metrics.registry();
            Some(kiln_metrics::serve(addr, "broker.metrics_listen", registry).await?)
        }
        None => None,
    };
    let mut broker = Broker::start(settings)
        .await
        .context("starting the broker")?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled();
    if let Some(interval) = watchdog {
        tracing::info!(?interval, "systemd watchdog enabled");
    }
    let mut tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            r = broker.wait() => return r.context("broker stopped"),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                // Pet the watchdog only while the core loop is turning.
                let stale = kiln_protocol::unix_ms().saturating_sub(broker.last_alive_ms());
                if watchdog.is_some() && stale < 5_000 {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
    }
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    broker.shutdown().await?;
    Ok(())
}
