//! The `wan2gp` backend: text-to-video, image-to-video and text-to-image through
//! Wan2GP's (WanGP's) own in-process API, with the model kept loaded between jobs.
//!
//! The worker writes out a small Python bridge (`bridge.py`, embedded in the
//! binary so the install stays one file) and runs it with Wan2GP's Python. The
//! bridge holds one Wan2GP session; [`supervisor`] keeps it alive, watches it and
//! runs one job at a time on it; [`params`] maps Kiln's parameters to Wan2GP's and
//! sizes jobs with the VRAM table; [`progress`] turns Wan2GP's steps into Kiln
//! progress. The bridge protocol is in [`protocol`].
//!
//! Wan2GP is WanGP by DeepBeepMeep, under the WanGP Community License: outputs
//! name it in their `info.generator`, and paid or hosted access for third
//! parties needs the licensor's own licence (see the README).

pub mod params;
mod process;
mod progress;
pub mod protocol;
pub mod schema;
pub mod supervisor;

#[cfg(test)]
mod bridge_tests;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_config::Wan2gpConfig;
use kiln_protocol::job::media_type_for;
use kiln_protocol::worker::{GpuInfo, GpuSource, ModelEntry};
use kiln_protocol::{FailureKind, JobError, Task};
use serde_json::{json, Map, Value};

use crate::backend::*;
use params::{ModelFacts, PlanInput};
use supervisor::{JobEnd, QueryError, Supervisor};

/// The bridge script, written next to the worker's scratch space at start.
pub const BRIDGE_SCRIPT: &str = include_str!("bridge.py");

/// What Wan2GP is called in outputs, logs and the licence notice.
pub const GENERATOR: &str = "WanGP (Wan2GP) by DeepBeepMeep";

/// Why the backend cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("worker.wan2gp.root is not set: point it at a Wan2GP checkout")]
    NoRoot,
    #[error(
        "worker.wan2gp.root {0} has no shared/api.py: it is not a Wan2GP checkout, or one older \
         than the in-process API (March 2026)"
    )]
    NotWan2gp(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the wan2gp backend must be built inside a tokio runtime")]
    NoRuntime,
}

/// Where this worker is and which GPU it drives.
#[derive(Debug, Clone)]
pub struct Placement {
    pub worker_id: String,
    /// The worker's scratch space; the bridge script and default folders go here.
    pub work_dir: PathBuf,
    /// The GPU as probed at start, if it could be.
    pub gpu: Option<GpuInfo>,
    /// The configured GPU index (used for pinning when the UUID is unknown).
    pub gpu_index: u32,
}

pub struct Wan2gpBackend {
    cfg: Wan2gpConfig,
    sup: Supervisor,
    /// This GPU's row of the VRAM table.
    gpu_row: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Wan2gpBackend {
    /// Checks the install, writes the bridge script and starts supervising it.
    pub fn new(cfg: &Wan2gpConfig, place: &Placement) -> Result<Wan2gpBackend, SetupError> {
        tokio::runtime::Handle::try_current().map_err(|_| SetupError::NoRuntime)?;
        let (launch, gpu_row) = prepare(cfg, place)?;
        let secs = Duration::from_secs_f64;
        let sup = Supervisor::start(supervisor::Settings {
            launch,
            ready_timeout: secs(cfg.ready_timeout_s),
            heartbeat_timeout: secs(cfg.heartbeat_timeout_s),
            stall_timeout: secs(cfg.stall_timeout_s),
            cancel_grace: secs(cfg.cancel_grace_s),
            kill_grace: secs(cfg.kill_grace_s),
            query_timeout: Duration::from_secs(120),
            recycle_after_jobs: cfg.recycle_after_jobs,
            recycle_rss_mb: cfg.recycle_rss_mb,
            warmup_model: cfg.warmup_model.clone(),
        });
        Ok(Wan2gpBackend {
            cfg: cfg.clone(),
            sup,
            gpu_row,
        })
    }

    /// Everything [`params::plan`] needs to know about a model type, fresh from
    /// Wan2GP (LoRAs come and go).
    async fn facts(
        &self,
        model: &str,
        cancel: &CancellationToken,
    ) -> Result<(ModelFacts, bool), RunError> {
        let info = self
            .sup
            .query("model_info", json!({ "model_type": model }), cancel)
            .await
            .map_err(|e| match e {
                QueryError::Cancelled => RunError::Cancelled,
                QueryError::Refused(why) => RunError::Failed(JobError::new(
                    FailureKind::InvalidInput,
                    format!("job.model: Wan2GP does not know model type {model:?} ({why})"),
                    false,
                )),
                QueryError::Unavailable(why) => {
                    RunError::Failed(JobError::new(FailureKind::Backend, why, true))
                }
            })?;
        let object = |key: &str| {
            info.get(key)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        };
        let loras = info
            .get("loras")
            .filter(|l| l.get("supported").and_then(Value::as_bool) != Some(false))
            .and_then(|l| l.get("loras"))
            .and_then(Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            });
        let available = info
            .get("availability")
            .and_then(|a| a.get("available"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        Ok((
            ModelFacts {
                metadata: object("metadata"),
                defaults: object("defaults"),
                loras,
            },
            available,
        ))
    }

    /// Writes the job's start image where Wan2GP can read it (an absolute path).
    async fn write_input(&self, job: &JobRun) -> Result<Option<PathBuf>, RunError> {
        if job.spec.task != Task::ImageToVideo {
            return Ok(None);
        }
        let Some(input) = job.spec.inputs.first() else {
            return Err(invalid(
                "image_to_video needs the start image in job.inputs",
            ));
        };
        let is_image = input.media_type.starts_with("image/")
            || media_type_for(&input.name).starts_with("image/");
        if !is_image {
            return Err(invalid(format!(
                "job.inputs[0] ({}, {}) must be an image",
                input.name, input.media_type
            )));
        }
        let name = kiln_protocol::job::safe_file_name(&input.name)
            .ok_or_else(|| invalid("job.inputs[0].name must be a plain file name"))?;
        let dir = std::path::absolute(&job.work_dir).map_err(internal)?;
        tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
        let path = dir.join(format!("input_{name}"));
        tokio::fs::write(&path, &input.data)
            .await
            .map_err(internal)?;
        Ok(Some(path))
    }
}

/// Checks the install, writes the bridge script, and works out how to run it:
/// the command line (with the memory profile of this GPU's row unless the config
/// forces one), the environment (GPU pinning) and this GPU's row of the table.
fn prepare(cfg: &Wan2gpConfig, place: &Placement) -> Result<(process::Launch, usize), SetupError> {
    let root = cfg.root.clone().ok_or(SetupError::NoRoot)?;
    let root = std::path::absolute(&root).map_err(io_err(&root))?;
    if !root.join("shared").join("api.py").is_file() {
        return Err(SetupError::NotWan2gp(root));
    }
    let base =
        std::path::absolute(place.work_dir.join("wan2gp")).map_err(io_err(&place.work_dir))?;
    let config_dir = cfg
        .config_dir
        .clone()
        .unwrap_or_else(|| base.join("config"));
    let output_dir = cfg
        .output_dir
        .clone()
        .unwrap_or_else(|| base.join("outputs"));
    for dir in [&base, &config_dir, &output_dir] {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let script = base.join("kiln_wan2gp_bridge.py");
    std::fs::write(&script, BRIDGE_SCRIPT).map_err(io_err(&script))?;

    let table = cfg.vram_table.rows();
    let vram = place.gpu.as_ref().map(|g| g.total_vram_mb);
    let gpu_row = match vram.and_then(|mb| cfg.vram_table.row_index_for(mb)) {
        Some(i) => i,
        None => {
            tracing::warn!(
                vram_mb = ?vram,
                "this GPU is below every row of worker.wan2gp.vram_table (or unknown); using the smallest row"
            );
            table.len() - 1
        }
    };
    let row = &table[gpu_row];
    let mut cli_args = cfg.args.clone();
    if !cli_args
        .iter()
        .any(|a| a == "--profile" || a.starts_with("--profile="))
    {
        cli_args.extend(["--profile".to_string(), row.profile_arg()]);
    }
    let mut env = vec![("PYTHONUNBUFFERED".to_string(), "1".to_string())];
    if cfg.pin_gpu {
        let device = place
            .gpu
            .as_ref()
            .map(|g| g.uuid.clone())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| place.gpu_index.to_string());
        env.push(("CUDA_VISIBLE_DEVICES".into(), device));
        env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
    }
    env.extend(cfg.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut args: Vec<std::ffi::OsString> = vec![
        script.into(),
        "--root".into(),
        root.clone().into(),
        "--config-dir".into(),
        config_dir.into(),
        "--output-dir".into(),
        output_dir.into(),
        "--ipc-fd".into(),
        process::IPC_FD.to_string().into(),
        "--heartbeat-s".into(),
        cfg.heartbeat_s.to_string().into(),
        "--progress-interval-s".into(),
        cfg.progress_interval_s.to_string().into(),
        "--".into(),
    ];
    args.extend(cli_args.iter().map(Into::into));
    tracing::info!(
        root = %root.display(),
        python = %cfg.python.display(),
        profile = %row.profile,
        vram_row_mb = row.min_vram_mb,
        "starting the Wan2GP backend (uses {GENERATOR}; see its licence)"
    );
    let launch = process::Launch {
        python: cfg.python.clone(),
        args,
        env,
        log_prefix: format!("wan2gp {}", place.worker_id),
    };
    Ok((launch, gpu_row))
}

fn invalid(msg: impl Into<String>) -> RunError {
    RunError::Failed(JobError::new(FailureKind::InvalidInput, msg, false))
}

fn internal(e: std::io::Error) -> RunError {
    RunError::Failed(JobError::new(
        FailureKind::Internal,
        format!("job files: {e}"),
        true,
    ))
}

/// Moves an output out of Wan2GP's folder into the attempt's scratch space, so the
/// runner's clean-up removes it after upload.
async fn adopt(file: &Path, work_dir: &Path) -> Result<OutputFile, RunError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            invalid(format!(
                "Wan2GP reported an output without a file name: {}",
                file.display()
            ))
        })?;
    if !tokio::fs::try_exists(file).await.unwrap_or(false) {
        return Err(RunError::Failed(JobError::new(
            FailureKind::Backend,
            format!("Wan2GP reported {} but it does not exist", file.display()),
            true,
        )));
    }
    tokio::fs::create_dir_all(work_dir)
        .await
        .map_err(internal)?;
    let dest = work_dir.join(&name);
    if tokio::fs::rename(file, &dest).await.is_err() {
        tokio::fs::copy(file, &dest).await.map_err(internal)?;
        let _ = tokio::fs::remove_file(file).await;
    }
    Ok(OutputFile {
        media_type: media_type_for(&name).to_string(),
        name,
        data: OutputData::File(dest),
    })
}

/// The bridge's `inventory` answer as the broker's model list: model types whose
/// weights are present (`model_type`), with `download_missing` also those that
/// are not (`model_type:not_downloaded`), and LoRAs (`lora`).
pub fn inventory_entries(inventory: &Value, download_missing: bool) -> Vec<ModelEntry> {
    let mut out = Vec::new();
    for m in inventory
        .get("models")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = m.get("model_type").and_then(Value::as_str) else {
            continue;
        };
        let present = m.get("available").and_then(Value::as_bool).unwrap_or(false);
        if present {
            out.push(ModelEntry {
                name: name.into(),
                kind: "model_type".into(),
            });
        } else if download_missing {
            out.push(ModelEntry {
                name: name.into(),
                kind: "model_type:not_downloaded".into(),
            });
        }
    }
    // A LoRA's id is relative to its family's folder, so the family is part of
    // what it is: kind `lora:<family>`.
    for l in inventory
        .get("loras")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = l.get("name").and_then(Value::as_str);
        let family = l.get("family").and_then(Value::as_str);
        if let (Some(name), Some(family)) = (name, family) {
            out.push(ModelEntry {
                name: name.into(),
                kind: format!("lora:{family}"),
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

#[async_trait]
impl Backend for Wan2gpBackend {
    fn kind(&self) -> kiln_protocol::Backend {
        kiln_protocol::Backend::Wan2gp
    }

    async fn inventory(&self) -> Vec<ModelEntry> {
        self.sup
            .snapshot()
            .inventory
            .map(|inv| inventory_entries(&inv, self.cfg.download_missing))
            .unwrap_or_default()
    }

    fn params(&self) -> Option<kiln_protocol::params::ParamSchema> {
        Some(schema::schema())
    }

    async fn health(&self) -> Health {
        self.sup.snapshot().health
    }

    fn loaded_model(&self) -> Option<String> {
        self.sup.snapshot().loaded_model
    }

    async fn gpu_hint(&self) -> Option<GpuInfo> {
        let ready = self.sup.snapshot().ready?;
        let total = ready.vram_total_mb?;
        Some(GpuInfo {
            name: ready
                .cuda_device_name
                .unwrap_or_else(|| "CUDA device".into()),
            total_vram_mb: total,
            free_vram_mb: total,
            source: GpuSource::Backend,
            ..GpuInfo::default()
        })
    }

    async fn run(
        &self,
        job: JobRun,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<RunOutput, RunError> {
        let started = Instant::now();
        let spec = job.spec.clone();
        let model = params::model_type(&spec, &self.cfg.default_models)?;
        progress.stage(0.0, format!("preparing {model}"));
        let (facts, available) = self.facts(&model, &cancel).await?;
        if !available && !self.cfg.download_missing {
            return Err(RunError::Failed(JobError::new(
                FailureKind::InvalidInput,
                format!(
                    "job.model: the weights of Wan2GP model {model} are not downloaded on this worker \
                     (worker.wan2gp.download_missing is off)"
                ),
                false,
            )));
        }
        if !job.spec.inputs.is_empty() {
            progress.enter(Phase::Upload);
        }
        let image = self.write_input(&job).await?;
        progress.leave();
        let key = format!("{}-{}", job.job_id, job.attempt);
        let plan = params::plan(&PlanInput {
            spec: &spec,
            model_type: &model,
            facts: &facts,
            table: &self.cfg.vram_table,
            gpu_row: self.gpu_row,
            degrade: job.degrade,
            job_key: &key,
            image_start: image.as_deref(),
            random_seed: uuid::Uuid::new_v4().as_u128() as u32,
        })?;
        if let Some(note) = plan.info.get("adjusted").and_then(Value::as_str) {
            tracing::info!(job = %job.job_id, "{note}");
        }
        // Queued in the bridge until its first progress event (the mapper moves
        // the phase on from there).
        progress.enter(Phase::Queued);
        let end = self
            .sup
            .run_job(key, plan.settings, progress.clone(), cancel)
            .await;
        progress.leave();
        let finished = match end {
            JobEnd::Done(f) => f,
            JobEnd::Failed(e) => return Err(RunError::Failed(e)),
            JobEnd::Cancelled => return Err(RunError::Cancelled),
        };
        if finished.files.is_empty() {
            return Err(RunError::Failed(JobError::new(
                FailureKind::Backend,
                "Wan2GP reported success but wrote no file",
                false,
            )));
        }
        let work_dir = std::path::absolute(&job.work_dir).map_err(internal)?;
        let mut outputs = Vec::with_capacity(finished.files.len());
        for file in &finished.files {
            outputs.push(adopt(file, &work_dir).await?);
        }
        let mut info: Map<String, Value> = plan.info;
        let version = self.sup.snapshot().ready.and_then(|r| r.wangp_version);
        info.insert(
            "generator".into(),
            match version {
                Some(v) => format!("{GENERATOR} v{v}"),
                None => GENERATOR.to_string(),
            }
            .into(),
        );
        info.insert("model_load".into(), finished.loaded_model.into());
        info.insert(
            "generation_s".into(),
            json!((finished.elapsed_s * 1000.0).round() / 1000.0),
        );
        info.insert("bridge_pid".into(), finished.bridge_pid.into());
        info.insert(
            "run_ms".into(),
            (started.elapsed().as_millis() as u64).into(),
        );
        progress.stage(100.0, "done");
        Ok(RunOutput { outputs, info })
    }

    async fn shutdown(&self) {
        self.sup.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_lists_present_weights_and_loras() {
        let inv = json!({
            "models": [
                {"model_type": "t2v_2_2", "available": true},
                {"model_type": "ltx2_22B", "available": false},
            ],
            "loras": [
                {"family": "flux", "name": "anime/kiln_ink.safetensors"},
                {"family": "wan", "name": "anime/kiln_ink.safetensors"},
            ],
        });
        let names = |entries: Vec<ModelEntry>| {
            entries
                .into_iter()
                .map(|e| format!("{}={}", e.name, e.kind))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(inventory_entries(&inv, false)),
            [
                "anime/kiln_ink.safetensors=lora:flux",
                "anime/kiln_ink.safetensors=lora:wan",
                "t2v_2_2=model_type"
            ]
        );
        assert!(names(inventory_entries(&inv, true))
            .contains(&"ltx2_22B=model_type:not_downloaded".to_string()));
    }
}
