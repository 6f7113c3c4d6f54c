//! Worker ⇄ broker messages on the backend ROUTER (default port 5556), and the
//! descriptions of workers, GPUs and models that clients can ask for.
//!
//! The conversation follows the Paranoid Pirate pattern: a worker registers, both
//! sides beat every second, and three missed beats declare the peer dead. Results
//! are acknowledged (`result_ack`) because a ZeroMQ send is not a delivery.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ErrorBody;
use crate::ids::JobId;
use crate::job::{Backend, JobError, JobSpec, Progress};
use crate::wire_message;

/// One attempt of one job: results and cancels name both, so a late message about
/// an earlier attempt can never be mistaken for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: JobId,
    pub attempt: u32,
}

/// Where a worker's GPU figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GpuSource {
    /// Read through NVML.
    Nvml,
    /// Declared in the worker's config (no NVIDIA library on this host).
    Config,
    /// Reported by the backend itself (ComfyUI's `/system_stats`).
    Backend,
    /// No GPU at all: a `sim` worker on a plain machine.
    #[default]
    None,
}

/// A GPU as a worker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    #[serde(default)]
    pub uuid: String,
    pub total_vram_mb: u64,
    pub free_vram_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Power draw in milliwatts (NVML `nvmlDeviceGetPowerUsage`); absent when the
    /// GPU or the driver cannot say, and from workers older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u32>,
    /// Memory shared with the CPU (DGX Spark GB10, Jetson): VRAM figures come from
    /// system memory.
    #[serde(default)]
    pub unified_memory: bool,
    #[serde(default)]
    pub source: GpuSource,
}

/// A model file or model type a backend has installed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    /// The folder or family: `checkpoints`, `diffusion_models`, `loras`, `vae`, a Wan2GP
    /// model type, …
    pub kind: String,
}

/// What one backend on a worker can do right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInventory {
    pub backend: Backend,
    pub healthy: bool,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The parameters the backend accepts, which the broker checks jobs against at
    /// submit. Absent from workers older than the contract (their jobs are checked
    /// only when they run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<crate::params::ParamSchema>,
}

/// A message from a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// Boxed: much larger than the messages that flow every second.
    Register(Box<Register>),
    Heartbeat(Heartbeat),
    Progress(ProgressReport),
    Upload(Upload),
    Finished(Finished),
    Refused(Refused),
    Goodbye(Goodbye),
}

wire_message!(WorkerMessage {
    "register" => Register,
    "heartbeat" => Heartbeat,
    "progress" => ProgressReport,
    "upload" => Upload,
    "finished" => Finished,
    "refused" => Refused,
    "goodbye" => Goodbye,
});

/// The first message of every worker connection, and again after any reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Stable name chosen by the operator, e.g. `box1-gpu0`.
    pub worker_id: String,
    /// Random per process, so the broker can tell a restart from a reconnect.
    pub instance: String,
    pub hostname: String,
    pub version: String,
    pub gpu: GpuInfo,
    pub backends: Vec<BackendInventory>,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_model: Option<String>,
    /// Every model resident in GPU memory now, most recently used first (a GPU
    /// with room keeps several); `loaded_model` is the first of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resident: Vec<String>,
    /// The attempt this worker is running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<JobRef>,
    /// An attempt this worker finished whose result the broker has not acknowledged;
    /// the worker sends it again after `registered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacked: Option<JobRef>,
    /// Further attempts this worker holds besides `current` and `unacked`, oldest
    /// first: results waiting their turn to upload, and assignments staged to start
    /// when the GPU is free (pipelined dispatch).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<JobRef>,
    /// How many assignments this worker will stage while it runs one (pipelined
    /// dispatch; 0 = one job at a time, as workers before pipelining).
    #[serde(default, skip_serializing_if = "crate::job::is_zero")]
    pub max_held: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub free_vram_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Power draw in milliwatts, as in [`GpuInfo::power_mw`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u32>,
    /// The oldest attempt this worker holds: running, or finished but not yet
    /// acknowledged. An assignment the worker does not name here or in `held`
    /// within two heartbeats was lost on the way and is requeued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<JobRef>,
    /// The attempts it holds after `current`, oldest first (pipelined dispatch: the
    /// next job, staged or already started while `current`'s result uploads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<JobRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_model: Option<String>,
    /// The models resident in GPU memory, most recently used first, sent when the
    /// set changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident: Option<Vec<String>>,
    /// False takes the worker out of scheduling until a later beat says true.
    pub healthy: bool,
    /// A refreshed inventory, sent only when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<BackendInventory>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub job_id: JobId,
    pub attempt: u32,
    #[serde(flatten)]
    pub progress: Progress,
}

/// A piece of one output file. Pieces of one file arrive in order from offset 0;
/// the broker hashes them as they come and checks the total against `finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub job_id: JobId,
    pub attempt: u32,
    /// The output's position in the job's list of outputs.
    pub index: u16,
    pub name: String,
    pub media_type: String,
    pub offset: u64,
    /// The file's full size.
    pub total: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Describes one uploaded output in `finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMeta {
    pub index: u16,
    pub name: String,
    pub media_type: String,
    pub size: u64,
    pub sha256: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded {
        outputs: Vec<OutputMeta>,
        /// Backend facts about the result: `seed`, `model`, `load_ms`, `run_ms`, …
        #[serde(default)]
        info: Map<String, Value>,
    },
    Failed {
        error: JobError,
    },
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub job_id: JobId,
    pub attempt: u32,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_model: Option<String>,
}

/// The worker cannot take an assignment because it is still running another
/// attempt (one the broker may consider stale after a reconnect race). The broker
/// requeues the refused job without using up an attempt and treats the worker as
/// busy with `busy_with` until it reports that attempt's end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    pub job_id: JobId,
    pub attempt: u32,
    pub busy_with: JobRef,
}

/// A worker's polite exit: its job (if any) is requeued at once instead of after
/// the liveness window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodbye {
    #[serde(default)]
    pub reason: String,
}

/// A message from the broker to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BrokerMessage {
    Registered(Registered),
    Heartbeat(BrokerBeat),
    Assign(Assign),
    Cancel(JobRef),
    ResultAck(JobRef),
    /// The broker does not know this connection (it restarted, or declared the worker
    /// dead): register again.
    Reregister(BrokerBeat),
    Error(WorkerError),
}

wire_message!(BrokerMessage {
    "registered" => Registered,
    "heartbeat" => BrokerBeat,
    "assign" => Assign,
    "cancel" => JobRef,
    "result_ack" => JobRef,
    "reregister" => BrokerBeat,
    "error" => WorkerError,
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub heartbeat_ms: u64,
    pub liveness: u32,
    /// Upload chunk size the broker wants.
    pub chunk_bytes: u64,
    /// The most outputs the broker keeps of one job (`broker.limits.max_artifacts_per_job`),
    /// so a worker can refuse a job that would make more before spending GPU time on
    /// it, and refuse to upload more after the fact. Absent from brokers older than
    /// the contract (then only the broker checks, output by output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_outputs: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerBeat {}

/// Run this attempt of this job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    pub job_id: JobId,
    pub attempt: u32,
    pub job: Arc<JobSpec>,
    /// Run this many steps below the requested setting (after out-of-memory).
    #[serde(default)]
    pub degrade: u8,
    /// Hold this attempt and start it the moment the GPU is free, keeping the
    /// results still owed to the broker (pipelined dispatch). `false`: the broker
    /// counts the worker idle, so any result it has not acknowledged is stale.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerError {
    pub error: ErrorBody,
}

/// What a worker is doing, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Busy,
    /// Its backend reports unhealthy: no new jobs until it recovers.
    Unhealthy,
    /// Missed its heartbeats or said goodbye; remembered for scheduling checks.
    Offline,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Offline => "offline",
        }
    }
}

/// A worker as the `workers` request reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub hostname: String,
    pub state: WorkerState,
    pub gpu: GpuInfo,
    pub backends: Vec<BackendInventory>,
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_model: Option<String>,
    /// Every model resident in the GPU's memory, most recently used first, as the
    /// worker last reported it (a GPU with room keeps several; `loaded_model` is
    /// the first; a worker that reports only `loaded_model` gives that one).
    /// Absent when there is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resident: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<JobId>,
    pub jobs_done: u64,
    pub last_seen_ms: u64,
    pub version: String,
    /// Why an offline worker went away (`missed 3 heartbeats`, `said goodbye:
    /// shutting down`, …), as the broker saw it; absent while online, and for a
    /// worker the broker remembers only from its store since a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_reason: Option<String>,
}

/// A model and where it is, as the `models` request reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub kind: String,
    pub backend: Backend,
    /// Workers that have it installed.
    pub workers: Vec<String>,
    /// Workers that have it loaded right now.
    pub loaded_on: Vec<String>,
}

/// The broker's answer to `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub version: String,
    pub uptime_s: u64,
    pub durable: bool,
    pub workers_online: u64,
    pub workers_idle: u64,
    pub workers_busy: u64,
    pub workers_unhealthy: u64,
    pub queued: u64,
    pub running: u64,
    pub finished: u64,
    /// Messages refused for being malformed, oversized, unknown or unauthenticated.
    pub protocol_errors: u64,
}
