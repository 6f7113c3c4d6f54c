//! The Kiln worker: one process per GPU.
//!
//! - [`gpu`]: what the GPU is, through NVML behind a trait, with config fallbacks.
//! - [`backend`]: the trait every generator implements.
//! - [`backends`]: sim (built in), ComfyUI, Wan2GP.
//! - [`runner`]: the broker connection, heartbeats, one job at a time, uploads.
//! - [`metrics`]: the worker's Prometheus metrics (GPU, backends, job phases).

pub mod backend;
pub mod backends;
pub mod gpu;
pub mod held;
pub mod metrics;
pub mod progress;
pub mod runner;

use std::sync::Arc;
use std::time::Duration;

use kiln_config::{ConfigError, KilnConfig};
use kiln_protocol::Backend as Kind;

pub use runner::{Status, Worker, WorkerSettings};

/// Why a worker cannot be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("worker.comfyui: {0}")]
    ComfyUiTemplates(#[from] backends::comfyui::TemplateError),
    #[error(transparent)]
    Wan2gp(#[from] backends::wan2gp::SetupError),
}

/// Builds a worker and its backends from the config.
pub fn build(cfg: &KilnConfig) -> Result<Worker, BuildError> {
    let w = &cfg.worker;
    let worker_id =
        w.id.clone()
            .unwrap_or_else(|| format!("{}-gpu{}", runner::hostname(), w.gpu.index));
    let sim_only = w.backends.iter().all(|b| *b == Kind::Sim);
    let probe = gpu::GpuProbe::from_config(&w.gpu, sim_only);
    let work_dir = w
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("kiln-worker-{worker_id}")));
    let mut backends: Vec<Arc<dyn backend::Backend>> = Vec::new();
    for kind in &w.backends {
        match kind {
            Kind::Sim => backends.push(Arc::new(backends::sim::SimBackend::new(w.sim.clone()))),
            Kind::Comfyui => backends.push(Arc::new(backends::comfyui::ComfyUiBackend::new(
                w.comfyui.clone(),
                w.gpu.index,
                &worker_id,
            )?)),
            Kind::Wan2gp => {
                let place = backends::wan2gp::Placement {
                    worker_id: worker_id.clone(),
                    work_dir: work_dir.clone(),
                    gpu: probe.probe().ok(),
                    gpu_index: w.gpu.index,
                };
                backends.push(Arc::new(backends::wan2gp::Wan2gpBackend::new(
                    &w.wan2gp, &place,
                )?));
            }
        }
    }
    if let Some(why) = probe.nvml_unavailable() {
        if !w.gpu.nvml {
            tracing::info!("NVML disabled in the config; using the GPU declared in [worker.gpu]");
        } else if w.gpu.name.is_some() && w.gpu.total_vram_mb.is_some() {
            tracing::warn!("NVML is not available ({why}); using the GPU declared in [worker.gpu]");
        } else if sim_only {
            tracing::info!(
                "NVML is not available ({why}); this sim-only worker reports a simulated GPU"
            );
        } else {
            tracing::warn!("NVML is not available ({why}) and no GPU is declared in [worker.gpu]");
        }
    }
    let settings = WorkerSettings {
        worker_id,
        broker: w.broker.clone(),
        token: cfg.worker_token()?.map(|s| s.expose().to_string()),
        heartbeat_ms: w.heartbeat_ms,
        liveness: w.liveness,
        pipeline_depth: w.pipeline_depth,
        labels: w.labels.clone(),
        work_dir,
        reconnect_min: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(32),
        transport: w.transport,
        curve: cfg.worker_curve()?,
    };
    Ok(Worker::new(settings, backends, probe))
}
