//! Read-only views of the fleet, shared by the list tools and the `kiln://`
//! resources so both always say the same thing.

use kiln_config::McpConfig;
use kiln_protocol::worker::{ModelInfo, WorkerInfo, WorkerState};
use kiln_protocol::{Backend, JobState, ListFilter};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::ToolError;
use crate::gateway::Gateway;
use crate::render::job_report;

/// True for LoRA entries (ComfyUI's `loras` folder, Wan2GP's LoRA lists).
pub fn is_lora(m: &ModelInfo) -> bool {
    m.kind.to_ascii_lowercase().starts_with("lora")
}

/// Installed models (or LoRAs), optionally of one backend.
pub async fn models(
    gw: &Gateway,
    backend: Option<Backend>,
    loras: bool,
) -> Result<Value, ToolError> {
    let list: Vec<ModelInfo> = gw
        .client
        .models()
        .await?
        .into_iter()
        .filter(|m| is_lora(m) == loras && backend.is_none_or(|b| m.backend == b))
        .collect();
    let key = if loras { "loras" } else { "models" };
    Ok(json!({ key: list }))
}

/// One GPU worker as the assistant sees it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WorkerView {
    pub name: String,
    pub host: String,
    /// idle, busy, unhealthy or offline.
    pub state: String,
    pub gpu: String,
    pub vram_free_mb: u64,
    pub vram_total_mb: u64,
    /// GPU memory is shared with the CPU (figures are system memory).
    pub unified_memory: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_model: Option<String>,
    /// Every model in the GPU's memory, most recently used first (a job of one
    /// of these starts without a model load).
    pub resident: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
    pub backends: Vec<String>,
    pub labels: Vec<String>,
    pub jobs_done: u64,
}

fn worker_view(w: WorkerInfo) -> WorkerView {
    WorkerView {
        name: w.worker_id,
        host: w.hostname,
        state: w.state.as_str().into(),
        gpu: w.gpu.name,
        vram_free_mb: w.gpu.free_vram_mb,
        vram_total_mb: w.gpu.total_vram_mb,
        unified_memory: w.gpu.unified_memory,
        utilization_pct: w.gpu.utilization_pct,
        temperature_c: w.gpu.temperature_c,
        loaded_model: w.loaded_model,
        resident: w.resident,
        current_job: w.current_job.map(|j| j.to_string()),
        backends: w
            .backends
            .iter()
            .filter(|b| b.healthy)
            .map(|b| b.backend.to_string())
            .collect(),
        labels: w.labels,
        jobs_done: w.jobs_done,
    }
}

pub async fn workers(gw: &Gateway) -> Result<Value, ToolError> {
    let list: Vec<WorkerView> = gw
        .client
        .workers()
        .await?
        .into_iter()
        .map(worker_view)
        .collect();
    Ok(json!({ "workers": list }))
}

pub async fn health(gw: &Gateway) -> Result<Value, ToolError> {
    let h = gw.client.health().await?;
    Ok(
        json!({ "broker": h, "gateway": { "version": env!("CARGO_PKG_VERSION"), "client_name": gw.client_name } }),
    )
}

/// Jobs matching `filter`, newest first, as reports.
pub async fn jobs(gw: &Gateway, filter: ListFilter) -> Result<Value, ToolError> {
    let list = gw.client.list(filter).await?;
    let reports: Vec<_> = list.iter().map(|s| job_report(s, None)).collect();
    Ok(json!({ "jobs": reports }))
}

/// The queue: jobs waiting or running.
pub async fn queue(gw: &Gateway) -> Result<Value, ToolError> {
    jobs(
        gw,
        ListFilter {
            states: vec![JobState::Queued, JobState::Running],
            limit: Some(1000),
            ..ListFilter::default()
        },
    )
    .await
}

/// The gateway's settings with the default backends made what the fleet offers:
/// a call that names no backend runs on `mcp.image_backend`/`mcp.video_backend`
/// when an online worker has that backend healthy, and otherwise on the first one
/// the fleet has (images: ComfyUI, then sim; videos: Wan2GP, ComfyUI, then sim).
/// A sim-only fleet (`kiln up --sim 2`) thus works without `backend: "sim"`.
/// With no worker online, or the broker unreachable, the configured defaults stand
/// (the job waits in the queue for a worker).
pub async fn defaults_for_fleet(gw: &Gateway) -> McpConfig {
    let mut cfg = gw.cfg.clone();
    let Ok(workers) = gw.client.workers().await else {
        return cfg;
    };
    let offered: Vec<Backend> = workers
        .iter()
        .filter(|w| w.state != WorkerState::Offline)
        .flat_map(|w| w.backends.iter())
        .filter(|b| b.healthy)
        .map(|b| b.backend)
        .collect();
    let pick = |configured: Backend, order: &[Backend]| {
        std::iter::once(configured)
            .chain(order.iter().copied())
            .find(|b| offered.contains(b))
            .unwrap_or(configured)
    };
    cfg.image_backend = pick(cfg.image_backend, &[Backend::Comfyui, Backend::Sim]);
    cfg.video_backend = pick(
        cfg.video_backend,
        &[Backend::Wan2gp, Backend::Comfyui, Backend::Sim],
    );
    cfg
}
