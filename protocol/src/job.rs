//! What a job is: its specification, its state, its outputs and its snapshot.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ProtocolError;
use crate::ids::{check_labels, check_simple_name, ArtifactId, JobId};
use crate::limits::{check, check_len, Limits};

/// Free-form job parameters (`prompt`, `seed`, `width`, `steps`, …) passed through to
/// the backend, which documents the ones it understands.
pub type Params = Map<String, Value>;

/// The generator a job runs on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Comfyui,
    Wan2gp,
    /// Kiln's built-in simulator: renders a PNG from prompt and seed, needs no GPU.
    Sim,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Comfyui, Backend::Wan2gp, Backend::Sim];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Comfyui => "comfyui",
            Backend::Wan2gp => "wan2gp",
            Backend::Sim => "sim",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Backend::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("unknown backend {s:?}; expected comfyui, wan2gp or sim"))
    }
}

/// What kind of generation a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    TextToImage,
    ImageToImage,
    TextToVideo,
    ImageToVideo,
    /// A raw ComfyUI API-format graph in `workflow`, or a named `template`.
    Workflow,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::TextToImage => "text_to_image",
            Task::ImageToImage => "image_to_image",
            Task::TextToVideo => "text_to_video",
            Task::ImageToVideo => "image_to_video",
            Task::Workflow => "workflow",
        }
    }

    pub fn is_video(self) -> bool {
        matches!(self, Task::TextToVideo | Task::ImageToVideo)
    }
}

/// A LoRA applied to the job's model. Unknown keys are refused everywhere: adding
/// one is a protocol change (docs/protocol.md, "Compatibility").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    /// The LoRA's file or model name, as the models list names it.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// How strongly it applies, -10 to 10; absent or `null` means 1.
    #[serde(default = "one", deserialize_with = "null_one")]
    #[schemars(range(min = -10.0, max = 10.0))]
    pub strength: f64,
}

impl std::str::FromStr for LoraRef {
    type Err = String;

    /// `name` or `name:strength`, as the command line takes it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, strength) = match s.rsplit_once(':') {
            Some((name, strength)) => (
                name,
                strength
                    .parse()
                    .map_err(|_| format!("LoRA strength in {s:?} is not a number"))?,
            ),
            None => (s, 1.0),
        };
        Ok(LoraRef {
            name: name.to_string(),
            strength,
        })
    }
}

fn one() -> f64 {
    1.0
}

fn null_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(1.0))
}

/// A file the job consumes, such as the init image of image-to-image. It travels
/// inside the submit message (msgpack bin), bounded by `Limits::max_input_bytes`.
/// Unknown keys are refused everywhere, like [`LoraRef`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    pub name: String,
    /// Absent or `null` means `application/octet-stream`.
    #[serde(default = "octet_stream", deserialize_with = "null_octet_stream")]
    pub media_type: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

fn octet_stream() -> String {
    "application/octet-stream".to_string()
}

fn null_octet_stream<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(octet_stream))
}

/// Everything a client says about a job.
///
/// In a `submit` request unknown keys are refused so that a typo (`priorty`) is an
/// error rather than silently ignored (see [`JobSpec::deserialize_strict`]); the
/// plain `Deserialize` used for stored records and `assign` ignores them, so a
/// broker rolled back one version still reads jobs a newer one stored. `null` is the
/// same as absent for every optional field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub backend: Backend,
    pub task: Task,
    #[serde(default, deserialize_with = "crate::strict::params")]
    pub params: Params,
    /// The model (checkpoint, Wan2GP model type) the job needs installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(
        default,
        deserialize_with = "crate::strict::null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub loras: Vec<LoraRef>,
    /// Smallest GPU memory, in MiB, the job can run in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_vram_mb: Option<u64>,
    /// Labels every eligible worker must carry.
    #[serde(
        default,
        deserialize_with = "crate::strict::null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub labels: Vec<String>,
    /// -10 (lowest) to 10 (highest); 0 by default.
    #[serde(default, deserialize_with = "crate::strict::null_default")]
    pub priority: i8,
    /// Fail the job if it waits longer than this in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_s: Option<u32>,
    /// Fail an attempt that runs longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout_s: Option<u32>,
    /// How many times the job may be started (worker loss, retryable failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u8>,
    #[serde(
        default,
        deserialize_with = "crate::strict::null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub inputs: Vec<InputFile>,
    /// A raw ComfyUI API-format graph, for `task = workflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<Value>,
    /// A named workflow template installed on the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A retry of a submit with the same key returns the first job instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// After running out of memory on the largest GPU, retry at a lower setting
    /// (smaller resolution or fewer frames) instead of failing.
    #[serde(
        default,
        deserialize_with = "crate::strict::null_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub allow_degrade: bool,
}

/// Every key of a [`JobSpec`] map, for the strict decoding of `submit`.
pub const JOB_SPEC_FIELDS: &[&str] = &[
    "backend",
    "task",
    "params",
    "model",
    "loras",
    "min_vram_mb",
    "labels",
    "priority",
    "queue_timeout_s",
    "run_timeout_s",
    "max_attempts",
    "inputs",
    "workflow",
    "template",
    "idempotency_key",
    "allow_degrade",
];

impl JobSpec {
    /// Decodes a spec as a client sends it: a map (not an array) of known keys only.
    pub fn deserialize_strict<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::strict::strict(d, JOB_SPEC_FIELDS)
    }
}

impl JobSpec {
    /// A spec with only the required fields set.
    pub fn new(backend: Backend, task: Task) -> Self {
        JobSpec {
            backend,
            task,
            params: Params::new(),
            model: None,
            loras: Vec::new(),
            min_vram_mb: None,
            labels: Vec::new(),
            priority: 0,
            queue_timeout_s: None,
            run_timeout_s: None,
            max_attempts: None,
            inputs: Vec::new(),
            workflow: None,
            template: None,
            idempotency_key: None,
            allow_degrade: false,
        }
    }

    /// Sets one parameter; a builder for tests and tools.
    pub fn param(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.params.insert(key.to_string(), value.into());
        self
    }

    pub fn prompt(&self) -> Option<&str> {
        self.params.get("prompt").and_then(Value::as_str)
    }

    /// Checks every field against `limits`. Field names are given from the message
    /// root (`job.params.prompt`) so the error tells the client exactly what to fix.
    pub fn validate(&self, limits: &Limits) -> Result<(), ProtocolError> {
        check("job.params", self.params.len() as u64, limits.max_params)?;
        for key in ["prompt", "negative_prompt"] {
            match self.params.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => check(
                    &format!("job.params.{key}"),
                    s.chars().count() as u64,
                    limits.max_prompt_chars,
                )?,
                Some(_) => {
                    return Err(ProtocolError::invalid(
                        format!("job.params.{key}"),
                        "must be a string",
                    ))
                }
            }
        }
        if !self.params.is_empty() {
            let size = rmp_serde::to_vec_named(&self.params).map_or(u64::MAX, |v| v.len() as u64);
            check("job.params", size, limits.max_params_bytes)?;
        }
        if let Some(model) = &self.model {
            check_len("job.model", model, limits.max_name_len)?;
            if model.is_empty() {
                return Err(ProtocolError::invalid("job.model", "must not be empty"));
            }
        }
        check("job.loras", self.loras.len() as u64, limits.max_loras)?;
        for (i, lora) in self.loras.iter().enumerate() {
            let field = format!("job.loras[{i}].name");
            check_len(&field, &lora.name, limits.max_name_len)?;
            if lora.name.is_empty() {
                return Err(ProtocolError::invalid(field, "must not be empty"));
            }
            if !(lora.strength.is_finite() && (-10.0..=10.0).contains(&lora.strength)) {
                return Err(ProtocolError::out_of_range(
                    format!("job.loras[{i}].strength"),
                    -10,
                    10,
                    lora.strength,
                ));
            }
        }
        check_labels(
            "job.labels",
            &self.labels,
            limits.max_labels,
            limits.max_label_len,
        )?;
        if !(-10..=10).contains(&self.priority) {
            return Err(ProtocolError::out_of_range(
                "job.priority",
                -10,
                10,
                self.priority,
            ));
        }
        for (field, value) in [
            ("job.queue_timeout_s", self.queue_timeout_s),
            ("job.run_timeout_s", self.run_timeout_s),
        ] {
            if let Some(v) = value {
                if v == 0 || v as u64 > limits.max_timeout_s {
                    return Err(ProtocolError::out_of_range(
                        field,
                        1,
                        limits.max_timeout_s as i64,
                        v,
                    ));
                }
            }
        }
        if let Some(attempts) = self.max_attempts {
            if attempts == 0 || attempts as u64 > limits.max_attempts {
                return Err(ProtocolError::out_of_range(
                    "job.max_attempts",
                    1,
                    limits.max_attempts as i64,
                    attempts,
                ));
            }
        }
        check("job.inputs", self.inputs.len() as u64, limits.max_inputs)?;
        for (i, input) in self.inputs.iter().enumerate() {
            check_len(
                &format!("job.inputs[{i}].name"),
                &input.name,
                limits.max_name_len,
            )?;
            check(
                &format!("job.inputs[{i}].data"),
                input.data.len() as u64,
                limits.max_input_bytes,
            )?;
            if crate::job::safe_file_name(&input.name).is_none() {
                return Err(ProtocolError::invalid(
                    format!("job.inputs[{i}].name"),
                    "must be a plain file name without directories",
                ));
            }
        }
        if let Some(workflow) = &self.workflow {
            if !workflow.is_object() {
                return Err(ProtocolError::invalid(
                    "job.workflow",
                    "must be a ComfyUI API-format graph (a map of node id to node)",
                ));
            }
            let size = rmp_serde::to_vec_named(workflow).map_or(u64::MAX, |v| v.len() as u64);
            check("job.workflow", size, limits.max_workflow_bytes)?;
        }
        if let Some(template) = &self.template {
            check_simple_name("job.template", template, limits.max_name_len)?;
        }
        if self.task == Task::Workflow && self.workflow.is_none() && self.template.is_none() {
            return Err(ProtocolError::invalid(
                "job.workflow",
                "task `workflow` needs a `workflow` graph or a `template` name",
            ));
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                // An empty key would make every keyless-looking retry one job.
                return Err(ProtocolError::invalid(
                    "job.idempotency_key",
                    "must not be empty; omit it for a job without a key",
                ));
            }
            check_len("job.idempotency_key", key, limits.max_idempotency_key_len)?;
        }
        Ok(())
    }

    /// The attempts a job gets when it does not say.
    pub fn attempts_allowed(&self, default: u8) -> u8 {
        self.max_attempts.unwrap_or(default).max(1)
    }
}

/// Returns `name` if it is safe as a file name inside a directory: no separators, no
/// `..`, no leading dot, no control characters, at most 255 bytes.
pub fn safe_file_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.chars().any(char::is_control);
    ok.then_some(name)
}

/// The media type of a file, guessed from its extension (generators name their
/// outputs `.png`, `.mp4`, …); `application/octet-stream` when unknown.
pub fn media_type_for(name: &str) -> &'static str {
    match name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mkv") => "video/x-matroska",
        Some("mov") => "video/quicktime",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("flac") => "audio/flac",
        Some("ogg" | "opus") => "audio/ogg",
        Some("txt") => "text/plain",
        Some("json") => "application/json",
        Some("glb") => "model/gltf-binary",
        _ => "application/octet-stream",
    }
}

/// Where a job is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt or a job failed, for clients to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The generator reported an error (bad workflow, missing node, exception).
    Backend,
    /// The GPU ran out of memory.
    OutOfMemory,
    /// The job's inputs were refused by the backend's own validation.
    InvalidInput,
    /// The worker disappeared (crash, network loss) while running the job.
    WorkerLost,
    /// The job waited in the queue longer than its queue timeout.
    QueueTimeout,
    /// The attempt ran longer than its run timeout.
    RunTimeout,
    /// The job used up its attempts; `message` names the last failure.
    MaxAttempts,
    /// No worker can run the job any more.
    Unschedulable,
    /// The broker could not store or verify the outputs.
    Artifact,
    /// Anything else inside Kiln.
    Internal,
}

/// A failure report: what kind, a message for people, and whether another attempt
/// could succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub kind: FailureKind,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
}

impl JobError {
    pub fn new(kind: FailureKind, message: impl Into<String>, retryable: bool) -> Self {
        JobError {
            kind,
            message: message.into(),
            retryable,
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// One stored output of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    pub id: ArtifactId,
    pub name: String,
    pub media_type: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// How far an attempt has come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// 0 to 100, never decreasing within an attempt.
    pub pct: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// A short human-readable stage, e.g. `KSampler 12/30`.
    #[serde(default)]
    pub stage: String,
}

/// One recorded change of a job's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub state: JobState,
    pub attempt: u32,
    /// Shared with the broker's worker table (an `Arc`, so recording costs no copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Arc<str>>,
    /// Why, when the state alone does not say (a requeue, a failure).
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub note: Cow<'static, str>,
}

/// Why a queued job has not started, for people watching it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub reason: WaitReason,
    /// The same in words, with the figures: "needs 40960 MiB; the largest GPU
    /// that could run it has 24576 MiB".
    pub detail: String,
}

/// The kinds of [`Waiting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// No registered worker has the backend, model and labels it needs.
    NoCapableWorker,
    /// Workers that could run it are offline or their backend is down.
    BackendDown,
    /// Every worker that could run it is busy.
    AllBusy,
    /// Only a GPU with more memory can run it (it needs more than the GPUs that
    /// are free, or than any GPU online).
    BiggerGpu,
    /// A busy worker holds it and starts it when its current job ends
    /// (pipelined dispatch).
    Held,
    /// GPUs that could run it are idle, but its model is loaded on others: loading
    /// it would cost more than waiting for those (load-aware placement).
    WarmGpu,
}

/// The whole observable state of a job at sequence number `seq`: what `get` returns,
/// and what a follower starts from after missing events (the Clone pattern).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSnapshot {
    pub job_id: JobId,
    /// The sequence number of the last event published for this job.
    pub seq: u64,
    pub state: JobState,
    pub backend: Backend,
    pub task: Task,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub priority: i8,
    pub client: String,
    /// The number of the current or last attempt (0 before the first start).
    /// Numbers jump after a broker restart; `tries` counts the starts.
    pub attempt: u32,
    /// Starts that count against `max_attempts`.
    #[serde(default)]
    pub tries: u32,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default)]
    pub artifacts: Vec<ArtifactMeta>,
    /// What the backend reported about the result (seed used, model loaded, timings).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub info: Map<String, Value>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// How many steps below the requested setting the job now runs, after running
    /// out of memory (see `JobSpec::allow_degrade`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub degrade: u8,
    /// Jobs ahead of this one that the same workers could take, when queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Why a queued job is waiting (in `get` replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Every state change, oldest first (omitted in `list` replies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Transition>,
    /// The spec's parameters, in `get` replies only (not in events or `list`):
    /// lets a client that did not submit the job see how it was asked for (the
    /// MCP gateway reads a sprite's `background` from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Params>,
    /// How the job was asked to run, in `get` replies only: the submitted spec's
    /// [`crate::JobOptions`] (LoRAs, GPU memory, labels, timeouts, requested
    /// attempts, idempotency key, `allow_degrade`), in the one shape every client
    /// builds them in. `model` and `priority` are repeated above for listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<crate::JobOptions>,
    /// The workflow template the job runs, in `get` replies only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

pub(crate) fn is_zero(n: &u8) -> bool {
    *n == 0
}

impl JobSnapshot {
    /// The fields a client does not present in its own way (`presented`, the
    /// names it shows or hides deliberately), with a value: absent, `null`, empty,
    /// zero and `false` are left out. Clients show these as they are, under their
    /// own names (`kiln status`, the MCP gateway's job reports), so a field added
    /// to the snapshot reaches every client without client code. The entries of
    /// `options` come up as fields of their own (`labels`, `min_vram_mb`, …),
    /// except those the snapshot itself has (`model`, `priority`, the effective
    /// `max_attempts`).
    pub fn other_fields(&self, presented: &[&str]) -> Map<String, Value> {
        let Ok(Value::Object(mut fields)) = serde_json::to_value(self) else {
            return Map::new();
        };
        if let Some(Value::Object(options)) = fields.remove("options") {
            for (k, v) in options {
                if !fields.contains_key(&k) {
                    fields.insert(k, v);
                }
            }
        }
        fields.retain(|k, v| {
            let blank = match v {
                Value::Null => true,
                Value::Bool(b) => !*b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
            };
            !blank && !presented.contains(&k.as_str())
        });
        fields
    }
}

/// Which jobs a `list` request wants. Unknown keys are refused in a request (see
/// [`ListFilter::deserialize_strict`]); `null` is the same as absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListFilter {
    /// Only jobs in these states (all when empty).
    #[serde(deserialize_with = "crate::strict::null_default")]
    pub states: Vec<JobState>,
    pub backend: Option<Backend>,
    pub client: Option<String>,
    pub worker: Option<String>,
    /// At most this many, newest first (capped by `Limits::max_list`).
    pub limit: Option<u64>,
}

/// Every key of a [`ListFilter`] map.
pub const LIST_FILTER_FIELDS: &[&str] = &["states", "backend", "client", "worker", "limit"];

impl ListFilter {
    /// Decodes a filter as a client sends it: `null` or a map of known keys only.
    pub fn deserialize_strict<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<StrictFilter>::deserialize(d)?.map_or_else(Default::default, |f| f.0))
    }
}

struct StrictFilter(ListFilter);

impl<'de> Deserialize<'de> for StrictFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::strict::strict(d, LIST_FILTER_FIELDS).map(StrictFilter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec::new(Backend::Sim, Task::TextToImage).param("prompt", "a kiln at dusk")
    }

    #[test]
    fn a_plain_spec_validates() {
        spec().validate(&Limits::default()).unwrap();
    }

    #[test]
    fn each_limit_names_its_field() {
        let limits = Limits {
            max_prompt_chars: 4,
            ..Limits::default()
        };
        let err = spec().validate(&limits).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FieldTooLarge {
                field: "job.params.prompt".into(),
                limit: 4,
                actual: 14
            }
        );
        let mut s = spec();
        s.priority = 11;
        assert_eq!(
            s.validate(&Limits::default())
                .unwrap_err()
                .to_body()
                .field
                .as_deref(),
            Some("job.priority")
        );
        let mut s = spec();
        s.inputs.push(InputFile {
            name: "../../etc/passwd".into(),
            media_type: "image/png".into(),
            data: vec![1],
        });
        assert_eq!(
            s.validate(&Limits::default())
                .unwrap_err()
                .to_body()
                .field
                .as_deref(),
            Some("job.inputs[0].name")
        );
        let mut s = spec();
        s.labels.push("has space".into());
        assert!(s.validate(&Limits::default()).is_err());
    }

    #[test]
    fn the_field_lists_name_every_key() {
        let mut s = spec();
        s.model = Some("m".into());
        s.loras = vec![LoraRef {
            name: "l".into(),
            strength: 1.0,
        }];
        s.min_vram_mb = Some(1);
        s.labels = vec!["a".into()];
        s.queue_timeout_s = Some(1);
        s.run_timeout_s = Some(1);
        s.max_attempts = Some(1);
        s.inputs = vec![InputFile {
            name: "a.png".into(),
            media_type: "image/png".into(),
            data: vec![],
        }];
        s.workflow = Some(serde_json::json!({}));
        s.template = Some("t".into());
        s.idempotency_key = Some("k".into());
        s.allow_degrade = true;
        let keys = |v: Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let sorted = |f: &[&str]| {
            let mut f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            f.sort();
            f
        };
        assert_eq!(
            keys(serde_json::to_value(&s).unwrap()),
            sorted(JOB_SPEC_FIELDS)
        );
        let filter = ListFilter {
            states: vec![JobState::Queued],
            backend: Some(Backend::Sim),
            client: Some("c".into()),
            worker: Some("w".into()),
            limit: Some(1),
        };
        assert_eq!(
            keys(serde_json::to_value(&filter).unwrap()),
            sorted(LIST_FILTER_FIELDS)
        );
    }

    #[test]
    fn other_snapshot_fields_are_those_not_presented_with_a_value() {
        let snap: JobSnapshot = serde_json::from_value(serde_json::json!({
            "job_id": "j1", "seq": 4, "state": "queued", "backend": "sim",
            "task": "text_to_image", "priority": 0, "client": "c", "attempt": 0,
            "max_attempts": 3, "degrade": 2, "created_ms": 1,
            "options": {"labels": ["fast"], "max_attempts": 2, "allow_degrade": true}
        }))
        .unwrap();
        let other = snap.other_fields(&["job_id", "seq", "state", "backend", "task", "client"]);
        let mut keys: Vec<&str> = other.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "allow_degrade",
                "created_ms",
                "degrade",
                "labels",
                "max_attempts"
            ]
        );
        assert_eq!(
            other["max_attempts"], 3,
            "the snapshot's own (effective) value"
        );
        assert_eq!(other["labels"], serde_json::json!(["fast"]));
    }

    #[test]
    fn file_names_cannot_escape() {
        for bad in ["", "..", "../x", "a/b", "a\\b", ".hidden", "a\0b", "a\nb"] {
            assert!(safe_file_name(bad).is_none(), "{bad:?}");
        }
        assert_eq!(safe_file_name("out_00001_.png"), Some("out_00001_.png"));
    }

    #[test]
    fn media_types_follow_the_extension() {
        assert_eq!(media_type_for("j1-1.MP4"), "video/mp4");
        assert_eq!(media_type_for("a.b.jpeg"), "image/jpeg");
        assert_eq!(media_type_for("README"), "application/octet-stream");
    }
}
