//! `kiln up`: a broker and one worker per GPU on this box, in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kiln_broker::{Broker, BrokerSettings};
use kiln_config::KilnConfig;
use kiln_metrics::prometheus_client::registry::Registry;
use kiln_protocol::Backend;
use kiln_worker::gpu::GpuProbe;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct UpArgs {
    /// Run this many sim workers instead of one per GPU (no GPU needed).
    #[arg(long)]
    sim: Option<u32>,
    /// Only these GPU indices (comma-separated).
    #[arg(long, value_delimiter = ',')]
    gpus: Vec<u32>,
}

/// A broker and its workers running in this process.
pub struct Local {
    pub broker: Broker,
    pub workers: Vec<JoinHandle<()>>,
    pub stop: CancellationToken,
    /// Each worker's metrics and where its config says to serve them.
    pub worker_metrics: Vec<(Option<SocketAddr>, Arc<Registry>)>,
}

impl Local {
    /// Starts a broker from `cfg.broker` and one worker per config in `workers`
    /// (their `broker` endpoint is pointed at the new broker).
    pub async fn start(cfg: &KilnConfig, workers: Vec<KilnConfig>) -> anyhow::Result<Local> {
        let broker = Broker::start(BrokerSettings::from_config(cfg)?)
            .await
            .context("starting the broker")?;
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut worker_metrics = Vec::new();
        for mut wcfg in workers {
            wcfg.worker.broker = broker.endpoints().backend.clone();
            let worker = kiln_worker::build(&wcfg)?;
            worker_metrics.push((wcfg.worker.metrics_addr()?, worker.metrics().registry()));
            let status = worker
                .status()
                .await
                .with_context(|| format!("probing GPU {}", wcfg.worker.gpu.index))?;
            let stop = stop.clone();
            let id = worker.settings().worker_id.clone();
            handles.push(tokio::spawn(async move {
                if let Err(e) = worker.run(status, stop).await {
                    tracing::error!(worker = %id, error = %e, "worker stopped");
                }
            }));
        }
        Ok(Local {
            broker,
            workers: handles,
            stop,
            worker_metrics,
        })
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for h in self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        self.broker.shutdown().await?;
        Ok(())
    }
}

/// The worker configs for this box: one per GPU NVML sees (or `--gpus`), or one for
/// the declared GPU, or sim workers.
fn plan(cfg: &KilnConfig, args: &UpArgs) -> anyhow::Result<Vec<KilnConfig>> {
    let host = kiln_worker::runner::hostname();
    let with = |index: u32, sim: bool| {
        let mut c = cfg.clone();
        c.worker.gpu.index = index;
        if sim {
            c.worker.backends = vec![Backend::Sim];
            c.worker.id = Some(format!("{host}-sim{index}"));
        } else if cfg.worker.id.is_none() || index > 0 {
            c.worker.id = Some(format!("{host}-gpu{index}"));
        }
        c
    };
    if let Some(n) = args.sim {
        return Ok((0..n).map(|i| with(i, true)).collect());
    }
    if !args.gpus.is_empty() {
        return Ok(args.gpus.iter().map(|i| with(*i, false)).collect());
    }
    let sim_only = cfg.worker.backends.iter().all(|b| *b == Backend::Sim);
    let probe = GpuProbe::from_config(&cfg.worker.gpu, sim_only);
    let declared = cfg.worker.gpu.name.is_some() || cfg.worker.gpu.total_vram_mb.is_some();
    match probe.device_count() {
        Ok(n) if n > 0 => Ok((0..n).map(|i| with(i, false)).collect()),
        _ if sim_only && !declared => {
            // Say so rather than pass a simulator off as this box's GPU.
            eprintln!(
                "kiln up: no GPU found ({}); running 1 sim worker, the built-in simulator. \
                 Use `kiln up --sim N` to choose how many, or declare the GPU in [worker.gpu].",
                probe.nvml_unavailable().unwrap_or("NVML sees no devices")
            );
            Ok(vec![with(0, true)])
        }
        _ => {
            if probe.probe().is_ok() {
                Ok(vec![with(cfg.worker.gpu.index, false)])
            } else {
                bail!(
                    "no GPU found ({}); declare one in [worker.gpu] or use `kiln up --sim 2`",
                    probe.nvml_unavailable().unwrap_or("NVML sees no devices")
                )
            }
        }
    }
}

pub async fn run(cfg: KilnConfig, args: UpArgs) -> anyhow::Result<()> {
    let workers = plan(&cfg, &args)?;
    let n = workers.len();
    let local = match Local::start(&cfg, workers).await {
        Ok(local) => local,
        Err(e) if format!("{e:#}").contains("already open") => {
            let store = cfg.broker.state_dir.join("jobs.redb");
            let who = holder_of(&store)
                .map(|pid| format!("another broker (pid {pid})"))
                .unwrap_or_else(|| "another broker".into());
            bail!(
                "{who} holds the job store {}: stop it, or give this one its own \
                 `broker.state_dir`",
                store.display()
            );
        }
        Err(e) => return Err(e),
    };
    let ep = local.broker.endpoints().clone();
    println!(
        "kiln up: broker on {} (clients), {} (workers), {} (events); {n} worker(s)",
        ep.frontend,
        ep.backend,
        ep.events.as_deref().unwrap_or("closed")
    );
    // Prometheus metrics, as the daemons serve them (docs/metrics.md).
    let mut servers = Vec::new();
    if let Some(addr) = cfg.broker.metrics_addr()? {
        let registry = local.broker.metrics().registry();
        servers.push(kiln_metrics::serve(addr, "broker.metrics_listen", registry).await?);
    }
    for (addr, registry) in &local.worker_metrics {
        if let Some(addr) = addr {
            servers
                .push(kiln_metrics::serve(*addr, "worker.metrics_listen", registry.clone()).await?);
        }
    }
    if !servers.is_empty() {
        let urls: Vec<String> = servers
            .iter()
            .map(|s| format!("http://{}/metrics", s.addr()))
            .collect();
        println!("metrics: {}", urls.join(" "));
    }
    println!("press Ctrl-C to stop");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    local.shutdown().await
}

/// The process that has `file` open, found through /proc (Linux); `None` when it
/// cannot be told (another user's process, no /proc).
fn holder_of(file: &std::path::Path) -> Option<u32> {
    let file = file.canonicalize().ok()?;
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == file))
        {
            return Some(pid);
        }
    }
    None
}
