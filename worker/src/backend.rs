//! What a generator looks like to the worker.
//!
//! Each backend (sim, ComfyUI, Wan2GP) implements [`Backend`]; the runner knows
//! nothing else about them. A job gets a [`ProgressSink`] to report into and a
//! [`CancellationToken`] to honour, and returns its outputs as files or bytes.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_protocol::worker::{GpuInfo, ModelEntry};
use kiln_protocol::{JobError, JobId, JobSpec};
use serde_json::{Map, Value};
pub use tokio_util::sync::CancellationToken;

pub use crate::progress::ProgressSink;

/// One attempt of one job, as handed to a backend.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub job_id: JobId,
    pub attempt: u32,
    pub spec: Arc<JobSpec>,
    /// Run this many settings below what the spec asks (the broker lowers it after
    /// the job ran out of memory on the largest GPU); each backend documents what
    /// a level means for it.
    pub degrade: u8,
    /// Scratch space for this attempt, created by the backend that writes to it
    /// (most jobs of the sim backend need none); removed after its result is
    /// acknowledged.
    pub work_dir: PathBuf,
    /// The most outputs the broker keeps of one job (its `registered` says; `None`
    /// from an older broker). A backend that can count a job's outputs before
    /// running it refuses one that would make more; the runner refuses to upload
    /// more after any run.
    pub max_outputs: Option<u64>,
}

/// Where an output's bytes are.
#[derive(Debug, Clone)]
pub enum OutputData {
    Bytes(Vec<u8>),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct OutputFile {
    /// A plain file name (no directories).
    pub name: String,
    pub media_type: String,
    pub data: OutputData,
}

/// A successful attempt.
#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    pub outputs: Vec<OutputFile>,
    /// Facts for the client: `seed`, `model`, `width`, `run_ms`, …
    pub info: Map<String, Value>,
}

/// How an attempt ended without success.
#[derive(Debug, Clone, PartialEq)]
pub enum RunError {
    /// The cancel token fired and the backend stopped.
    Cancelled,
    Failed(JobError),
}

impl From<JobError> for RunError {
    fn from(e: JobError) -> Self {
        RunError::Failed(e)
    }
}

/// Whether a backend can take jobs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub detail: Option<String>,
}

impl Health {
    pub fn ok() -> Health {
        Health {
            healthy: true,
            detail: None,
        }
    }

    pub fn down(detail: impl Into<String>) -> Health {
        Health {
            healthy: false,
            detail: Some(detail.into()),
        }
    }
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> kiln_protocol::Backend;

    /// Installed models (checkpoints, LoRAs, model types) by kind.
    async fn inventory(&self) -> Vec<ModelEntry>;

    async fn health(&self) -> Health;

    /// Runs one attempt. Must return promptly with [`RunError::Cancelled`] once
    /// `cancel` fires.
    async fn run(
        &self,
        job: JobRun,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<RunOutput, RunError>;

    /// Whether [`Backend::stage`] hands held attempts to the generator ahead of
    /// their turn. The runner stages nothing for a backend that does not.
    fn stages_ahead(&self) -> bool {
        false
    }

    /// Pipelined dispatch: hands an attempt the worker holds to the generator's
    /// own queue while another one runs, so the generator starts it the moment
    /// it is free, with no request in between. The runner calls it once the
    /// attempt before this one is in the generator's queue (or over), and calls
    /// [`Backend::run`] for the same attempt only after `stage` returned; `run`
    /// then takes over what `stage` queued (or starts afresh if staging failed).
    /// `cancel` fires when the attempt is taken back while staging. Reports no
    /// progress: a held job is not running yet.
    async fn stage(&self, _job: &JobRun, _cancel: CancellationToken) {}

    /// Takes back a staged attempt that will not run here (cancelled, or taken
    /// back by the broker): the generator drops it, and what staging uploaded
    /// goes. Called after [`Backend::stage`] returned.
    async fn unstage(&self, _job: &JobRun) {}

    /// The parameters this backend accepts, sent to the broker in the inventory so
    /// that it refuses a job no worker would accept at submit, naming the field.
    /// `None` leaves all checking to [`Backend::run`].
    fn params(&self) -> Option<kiln_protocol::params::ParamSchema> {
        None
    }

    /// The model currently loaded on the GPU, for the broker's affinity.
    fn loaded_model(&self) -> Option<String> {
        None
    }

    /// Every model resident in GPU memory, most recently used first, for
    /// placement that counts load costs. By default just the loaded one.
    fn resident_models(&self) -> Vec<String> {
        self.loaded_model().into_iter().collect()
    }

    /// GPU figures the backend itself can report, used when NVML cannot.
    async fn gpu_hint(&self) -> Option<GpuInfo> {
        None
    }

    /// Stops whatever the backend started (a managed ComfyUI, a bridge process).
    async fn shutdown(&self) {}
}

/// A stretch of an attempt on the generator, timed for the worker's
/// `kiln_worker_job_phase_seconds` metric. A backend marks the phases it has
/// ([`ProgressSink::enter`]); time outside any phase (preparing, checking the
/// workflow, encoding the sim's PNG) is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Sending the job's inputs to the generator (ComfyUI's `/upload/image`).
    Upload,
    /// Waiting in the generator's own queue until it starts the job.
    Queued,
    /// The generator runs the job: model loads and sampling steps.
    Sampling,
    /// Fetching the outputs from the generator (ComfyUI's `/view`).
    Download,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Upload,
        Phase::Queued,
        Phase::Sampling,
        Phase::Download,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Upload => "upload",
            Phase::Queued => "queued",
            Phase::Sampling => "sampling",
            Phase::Download => "download",
        }
    }
}

/// Reads an integer parameter, checking its range; the error names the field.
pub fn int_param(
    spec: &JobSpec,
    key: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, JobError> {
    match spec.params.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(JobError::new(
                kiln_protocol::FailureKind::InvalidInput,
                format!("params.{key} must be an integer from {min} to {max}, got {v}"),
                false,
            )),
        },
    }
}

/// Reads a string parameter.
pub fn str_param<'a>(spec: &'a JobSpec, key: &str) -> Result<Option<&'a str>, JobError> {
    match spec.params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(JobError::new(
            kiln_protocol::FailureKind::InvalidInput,
            format!("params.{key} must be a string, got {v}"),
            false,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_timed_in_order_and_reentering_one_is_a_no_op() {
        let (sink, _rx) = ProgressSink::new();
        sink.enter(Phase::Upload);
        sink.enter(Phase::Queued);
        sink.enter(Phase::Queued);
        sink.enter(Phase::Sampling);
        sink.leave();
        sink.leave();
        sink.enter(Phase::Download);
        let phases: Vec<Phase> = sink.take_phases().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            phases,
            [
                Phase::Upload,
                Phase::Queued,
                Phase::Sampling,
                Phase::Download
            ]
        );
        assert!(sink.take_phases().is_empty(), "taken once");
    }
}
