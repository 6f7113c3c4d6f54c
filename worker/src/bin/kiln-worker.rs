//! `kiln-worker`: drives one GPU for the broker.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Kiln worker: runs generation jobs on one GPU")]
struct Args {
    /// Config file(s), layered in order (default: $KILN_CONFIG or /etc/kiln/kiln.toml).
    #[arg(long = "config", short = 'c')]
    config: Vec<PathBuf>,
    /// Override `worker.gpu.index` (systemd passes the instance name).
    #[arg(long)]
    gpu: Option<u32>,
    /// Override `worker.id`.
    #[arg(long)]
    id: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    kiln_config::logging::init("info,zeromq=warn");
    // Signals first: a SIGTERM during start-up (a restart, a deploy) must stop the
    // worker before it registers and takes a job, not after.
    let shutdown = CancellationToken::new();
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        });
    }
    let args = Args::parse();
    let (mut cfg, _) = kiln_config::load_for_command_line(&args.config)?;
    if let Some(gpu) = args.gpu {
        cfg.worker.gpu.index = gpu;
    }
    if args.id.is_some() {
        cfg.worker.id = args.id;
    }
    let cfg = cfg.validated()?;
    let worker = kiln_worker::build(&cfg)?;
    // Bound before the GPU probe so a taken port fails the start at once.
    let _metrics = match cfg.worker.metrics_addr()? {
        Some(addr) => {
            let registry = worker.metrics().registry();
            Some(kiln_metrics::serve(addr, "worker.metrics_listen", registry).await?)
        }
        None => None,
    };
    let status = worker.status().await.context("probing the GPU")?;
    tracing::info!(
        worker = %worker.settings().worker_id,
        gpu = %status.gpu.name,
        total_vram_mb = status.gpu.total_vram_mb,
        unified = status.gpu.unified_memory,
        source = ?status.gpu.source,
        healthy = status.healthy,
        "worker ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    worker.run(status, shutdown).await?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    Ok(())
}
