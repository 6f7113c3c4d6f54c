//! The `comfyui` backend: drives a ComfyUI server the way a careful operator
//! would, following `shared/reference/comfyui/API.md`.
//!
//! One job is one prompt:
//! 1. wait until the server answers and the worker's WebSocket is connected;
//! 2. upload the job's inputs through `/upload/image` and use the returned names;
//! 3. build the graph (template, built-in or the operator's, or a raw graph with
//!    overrides), set the seed, and check it against `/object_info`;
//! 4. post it with our own lowercase UUID and the worker's client id;
//! 5. follow its events into one monotone percentage, and reconcile over HTTP
//!    every `poll_ms` (and after every reconnect) since events can be lost;
//! 6. finish on `executing{node: null}` for our id (never on `execution_success`),
//!    read the verdict from the history and download every output through `/view`.
//!
//! A prompt that is neither queued nor in the history has vanished (the server
//! restarted): a retryable failure, so the broker runs the job again.
//!
//! A held attempt (pipelined dispatch) goes through steps 1–4 while the one
//! before it runs, so ComfyUI starts it from its own queue (see `attempt`).
//!
//! `degrade` (after running out of memory on the largest GPU) halves `width` and
//! `height` per level (multiples of 16, at least 64) and, for video, the frame
//! count (keeping 4n+1), wherever a template binds those parameters; raw graphs
//! are run as given.

pub mod api;
mod attempt;
pub mod events;
pub mod graph;
pub mod history;
pub mod progress;
pub mod schema;
pub mod supervisor;
pub mod uploads;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_config::{ComfyUiConfig, ComfyUiMode};
use kiln_protocol::job::safe_file_name;
use kiln_protocol::worker::{GpuInfo, ModelEntry};
use kiln_protocol::{FailureKind, JobError};
use serde_json::{Map, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use self::api::{Api, ApiError, QueuePlace};
use self::events::{EventStream, WsEvent};
use self::graph::{Prepared, Templates, Uploaded};
use self::supervisor::{Launch, ProcState, Supervisor, Timing};
use crate::backend::*;

pub use self::graph::TemplateError;

/// The tasks that run once the backend is first used inside the runtime.
struct Running {
    events: EventStream,
    supervisor: Option<Supervisor>,
}

pub struct ComfyUiBackend {
    cfg: ComfyUiConfig,
    api: Api,
    client_id: String,
    gpu_index: u32,
    templates: Templates,
    running: OnceLock<Running>,
    shutdown: CancellationToken,
    object_info: tokio::sync::Mutex<Option<Arc<Map<String, Value>>>>,
    loaded: Mutex<Option<String>>,
    /// `kiln-<worker id>-`: the client ids of every process of this worker.
    client_prefix: String,
    /// Set once the prompts left behind by an earlier process of this worker
    /// have been cancelled (see [`ComfyUiBackend::reap_predecessors`]).
    reaped: tokio::sync::OnceCell<()>,
    uploads: uploads::Uploads,
    /// Prompts of held attempts, queued ahead of their turn.
    staged: attempt::Staged,
}

fn failed(kind: FailureKind, message: impl Into<String>, retryable: bool) -> RunError {
    RunError::Failed(JobError::new(kind, message, retryable))
}

fn unreachable_failure(e: &ApiError) -> RunError {
    failed(FailureKind::Backend, e.to_string(), e.is_unreachable())
}

impl ComfyUiBackend {
    /// `worker_id` names the WebSocket client; `gpu_index` pins a managed server.
    pub fn new(
        cfg: ComfyUiConfig,
        gpu_index: u32,
        worker_id: &str,
    ) -> Result<ComfyUiBackend, TemplateError> {
        let templates = Templates::load(cfg.templates_dir.as_deref())?;
        let base = match cfg.mode {
            ComfyUiMode::Attach => cfg.url.clone(),
            ComfyUiMode::Managed => format!("http://127.0.0.1:{}", managed_port(&cfg, gpu_index)),
        };
        let api = Api::new(&base, Duration::from_secs(cfg.http_timeout_s));
        // One client id per worker process, so events of an earlier process's
        // prompts never reach this one.
        let client_prefix = format!("kiln-{worker_id}-");
        let client_id = format!("{client_prefix}{}", uuid::Uuid::new_v4().simple());
        Ok(ComfyUiBackend {
            api,
            client_id,
            gpu_index,
            templates,
            running: OnceLock::new(),
            shutdown: CancellationToken::new(),
            object_info: tokio::sync::Mutex::new(None),
            loaded: Mutex::new(None),
            client_prefix,
            reaped: tokio::sync::OnceCell::new(),
            uploads: uploads::Uploads::new(&cfg),
            staged: attempt::Staged::default(),
            cfg,
        })
    }

    /// The server's address.
    pub fn url(&self) -> &str {
        self.api.base()
    }

    fn running(&self) -> &Running {
        self.running.get_or_init(|| {
            let supervisor = (self.cfg.mode == ComfyUiMode::Managed).then(|| {
                let timing = Timing {
                    start_timeout: Duration::from_secs(self.cfg.start_timeout_s),
                    restart_min: Duration::from_secs(self.cfg.restart_min_s),
                    restart_max: Duration::from_secs(self.cfg.restart_max_s),
                };
                let port = managed_port(&self.cfg, self.gpu_index);
                Supervisor::spawn(
                    Launch::from_config(&self.cfg, self.gpu_index, port),
                    self.api.clone(),
                    timing,
                    self.gpu_index,
                )
            });
            let events = EventStream::spawn(
                self.api.ws_url(&self.client_id),
                self.shutdown.child_token(),
            );
            Running { events, supervisor }
        })
    }

    /// `/object_info`, fetched once and refreshed when `refresh` is set.
    async fn object_info(&self, refresh: bool) -> Result<Arc<Map<String, Value>>, ApiError> {
        let mut cached = self.object_info.lock().await;
        if let (Some(info), false) = (cached.as_ref(), refresh) {
            return Ok(info.clone());
        }
        let info = Arc::new(self.api.object_info().await?);
        *cached = Some(info.clone());
        Ok(info)
    }

    /// Waits until the server answers and the WebSocket is up, as long as
    /// `unreachable_timeout_s` allows (a managed server may be restarting).
    async fn wait_ready(
        &self,
        cancel: &CancellationToken,
        progress: &ProgressSink,
    ) -> Result<(), RunError> {
        let running = self.running();
        let deadline = Instant::now() + Duration::from_secs(self.cfg.unreachable_timeout_s);
        let mut said = false;
        loop {
            let http = self.api.system_stats().await;
            if http.is_ok()
                && running
                    .events
                    .wait_connected(Duration::from_millis(500))
                    .await
            {
                self.reaped.get_or_init(|| self.reap_predecessors()).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                let why = http.err().map_or_else(
                    || "its WebSocket does not connect".to_string(),
                    |e| e.to_string(),
                );
                return Err(failed(
                    FailureKind::Backend,
                    format!("ComfyUI is not available: {why}"),
                    true,
                ));
            }
            if !said {
                progress.stage(0.0, "waiting for ComfyUI");
                said = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(RunError::Cancelled),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    async fn upload_inputs(&self, job: &JobRun) -> Result<Vec<Uploaded>, RunError> {
        let mut uploaded = Vec::with_capacity(job.spec.inputs.len());
        let folder = uploads::upload_folder(job);
        for input in &job.spec.inputs {
            let stored = self
                .api
                .upload(&input.name, &input.media_type, input.data.clone(), &folder)
                .await
                .map_err(|e| unreachable_failure(&e))?;
            tracing::debug!(job = %job.job_id, name = %input.name, stored = %stored.input_path(), "uploaded an input");
            if uploaded.is_empty() {
                // Where this host sees it, if anywhere: see `uploads`.
                let stats = self.api.system_stats().await.ok();
                self.uploads
                    .locate(&stored, &input.data, stats.as_ref())
                    .await;
            }
            uploaded.push(Uploaded {
                name: input.name.clone(),
                path: stored.input_path(),
            });
        }
        Ok(uploaded)
    }

    fn prepare(&self, job: &JobRun, uploaded: &[Uploaded]) -> Result<(String, Prepared), RunError> {
        let spec = &job.spec;
        let prefix = format!("kiln/job{}-{}", job.job_id, job.attempt);
        if let Some(workflow) = &spec.workflow {
            return Ok((
                "workflow".into(),
                graph::from_raw(workflow, spec, uploaded)?,
            ));
        }
        let name = match (&spec.template, graph::task_template(spec.task)) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => t.to_string(),
            (None, None) => {
                return Err(failed(
                    FailureKind::InvalidInput,
                    "task `workflow` needs a `workflow` graph or a `template` name",
                    false,
                ))
            }
        };
        let template = self.templates.get(&name).ok_or_else(|| {
            let names: Vec<&str> = self.templates.names().collect();
            failed(
                FailureKind::InvalidInput,
                format!(
                    "job.template: no template {name:?} on this worker; installed: {}",
                    names.join(", ")
                ),
                false,
            )
        })?;
        Ok((
            name,
            graph::from_template(template, spec, &prefix, uploaded, job.degrade)?,
        ))
    }

    /// Checks the graph against `/object_info`, re-reading it once when a value
    /// is missing from a list or a class is unknown (new uploads, new models).
    ///
    /// Inputs `params.overrides` added must be declared by their node, and the
    /// graph may not have more output nodes than the broker keeps outputs
    /// (`max_outputs`): both are refused here, before anything is queued.
    async fn validate(
        &self,
        prepared: &Prepared,
        max_outputs: Option<u64>,
    ) -> Result<Arc<Map<String, Value>>, RunError> {
        let graph = &prepared.graph;
        let problems_with = |info: &Map<String, Value>| {
            let mut problems = validate::check(graph, info);
            problems.extend(validate::unknown_inputs(
                graph,
                &prepared.added_inputs,
                info,
            ));
            problems
        };
        let mut info = self
            .object_info(false)
            .await
            .map_err(|e| unreachable_failure(&e))?;
        let mut problems = problems_with(&info);
        let stale = problems.iter().any(|p| {
            matches!(
                p.kind,
                validate::ProblemKind::NotInList
                    | validate::ProblemKind::UnknownClass
                    | validate::ProblemKind::UnknownInput
            )
        });
        if stale {
            info = self
                .object_info(true)
                .await
                .map_err(|e| unreachable_failure(&e))?;
            problems = problems_with(&info);
        }
        if problems.is_empty() {
            let outputs = validate::output_nodes(graph, &info) as u64;
            if let Some(max) = max_outputs.filter(|max| outputs > *max) {
                return Err(failed(
                    FailureKind::InvalidInput,
                    kiln_protocol::limits::too_many_outputs(
                        &format!("the workflow has {outputs} output nodes"),
                        max,
                    ),
                    false,
                ));
            }
            return Ok(info);
        }
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        Err(failed(
            FailureKind::InvalidInput,
            format!(
                "the workflow does not fit this ComfyUI: {}",
                text.join("; ")
            ),
            false,
        ))
    }

    /// Follows `prompt_id` until it is over; returns its history entry.
    async fn follow(
        &self,
        prompt_id: &str,
        rx: &mut broadcast::Receiver<WsEvent>,
        tracker: &mut progress::Tracker,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Value, RunError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.cfg.prompt_timeout_s);
        let mut poll = tokio::time::interval(Duration::from_millis(self.cfg.poll_ms));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreachable_since: Option<Instant> = None;
        let mut events_open = true;
        loop {
            let check_now = tokio::select! {
                _ = cancel.cancelled() => return Err(self.cancel_prompt(prompt_id, rx).await),
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = self.cancel_prompt(prompt_id, rx).await;
                    return Err(failed(FailureKind::Backend, format!("the prompt did not finish within {} s (worker.comfyui.prompt_timeout_s)", self.cfg.prompt_timeout_s), false));
                }
                _ = poll.tick() => true,
                ev = rx.recv(), if events_open => match ev {
                    Ok(WsEvent::Json { kind, data }) => {
                        if data.get("prompt_id").and_then(Value::as_str) != Some(prompt_id) {
                            continue;
                        }
                        // Any event of this prompt means ComfyUI took it up
                        // (`execution_start` first, unless that one was lost).
                        progress.enter(Phase::Sampling);
                        if kind == "executing" && data.get("node").is_some_and(Value::is_null) {
                            // Over; the history entry is written before this event.
                            true
                        } else {
                            if let Some(p) = tracker.on_event(&kind, &data) {
                                progress.report(p);
                            }
                            false
                        }
                    }
                    // Events may have been lost: ask over HTTP now.
                    Ok(WsEvent::Connected) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Ok(_) => false,
                    // The socket task is gone (shutting down): polling alone decides.
                    Err(broadcast::error::RecvError::Closed) => {
                        events_open = false;
                        true
                    }
                },
            };
            if !check_now {
                continue;
            }
            match self.reconcile(prompt_id).await {
                Ok(Reconciled::Finished(entry)) => return Ok(entry),
                Ok(Reconciled::Waiting) => unreachable_since = None,
                Ok(Reconciled::Vanished) => {
                    return Err(failed(FailureKind::Backend, "ComfyUI lost the prompt: it is neither queued nor in the history (the server restarted?)", true));
                }
                Err(e) if e.is_unreachable() => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(self.cfg.unreachable_timeout_s) {
                        return Err(failed(
                            FailureKind::Backend,
                            format!("lost ComfyUI during the job: {e}"),
                            true,
                        ));
                    }
                }
                Err(e) => tracing::warn!(prompt_id, error = %e, "reconciling the prompt failed"),
            }
        }
    }

    /// API.md §10. The queue is read before the history so a prompt finishing
    /// in between is not taken for lost.
    async fn reconcile(&self, prompt_id: &str) -> Result<Reconciled, ApiError> {
        if self.api.queue_place(prompt_id).await? != QueuePlace::Absent {
            return Ok(Reconciled::Waiting);
        }
        Ok(match self.api.history(prompt_id).await? {
            Some(entry) => Reconciled::Finished(entry),
            None => Reconciled::Vanished,
        })
    }

    /// Cancels the prompts an earlier process of this worker left queued or
    /// running (it was killed before it could cancel them), so this process's
    /// first job does not wait behind work nobody will collect. Prompts of other
    /// workers on the same server are left alone.
    async fn reap_predecessors(&self) {
        // Client ids are `kiln-<worker id>-<32 hex digits>`; the exact shape
        // keeps worker `w1` off the prompts of worker `w1-b`.
        let earlier = |client: &str| {
            client != self.client_id
                && client
                    .strip_prefix(&self.client_prefix)
                    .is_some_and(|rest| {
                        rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit())
                    })
        };
        let ids = match self.api.queued_for_clients(earlier).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read ComfyUI's queue for abandoned prompts");
                return;
            }
        };
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            tracing::warn!(prompt_id = %id, "cancelling a prompt left behind by an earlier process of this worker");
            self.request_cancel(id).await;
        }
        let deadline = Instant::now() + Duration::from_secs(self.cfg.cancel_timeout_s);
        while Instant::now() < deadline {
            match self.api.queued_for_clients(earlier).await {
                Ok(left) if !left.iter().any(|id| ids.contains(id)) => return,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tracing::warn!("ComfyUI did not confirm the cancel of the abandoned prompts in time");
    }

    /// Asks ComfyUI to drop `prompt_id`, queued or running: the jobs API when the
    /// server has it, else `/queue` delete and `/interrupt` by prompt id.
    async fn request_cancel(&self, prompt_id: &str) {
        match self.api.cancel_job(prompt_id).await {
            Ok(Some(cancelled)) => {
                tracing::info!(prompt_id, cancelled, "cancelled through the jobs API")
            }
            other => {
                if let Err(e) = other {
                    tracing::debug!(prompt_id, error = %e, "jobs API cancel failed; falling back");
                }
                let deleted = self.api.delete_pending(prompt_id).await;
                let interrupted = self.api.interrupt(prompt_id).await;
                tracing::info!(
                    prompt_id,
                    deleted = deleted.is_ok(),
                    interrupted = interrupted.is_ok(),
                    "cancelled with /queue delete and /interrupt"
                );
            }
        }
    }

    /// API.md §11: the jobs API cancel when the server has it, else delete from
    /// the queue and interrupt by prompt id; then wait for ComfyUI to confirm.
    async fn cancel_prompt(
        &self,
        prompt_id: &str,
        rx: &mut broadcast::Receiver<WsEvent>,
    ) -> RunError {
        self.request_cancel(prompt_id).await;
        let confirm = async {
            let mut events_open = true;
            let mut poll = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    ev = rx.recv(), if events_open => {
                        if matches!(ev, Err(broadcast::error::RecvError::Closed)) {
                            events_open = false;
                        }
                        if let Ok(WsEvent::Json { kind, data }) = ev {
                            let ours = data.get("prompt_id").and_then(Value::as_str) == Some(prompt_id);
                            if ours && (kind == "execution_interrupted" || (kind == "executing" && data["node"].is_null())) {
                                return;
                            }
                        }
                    }
                    _ = poll.tick() => {
                        if matches!(self.api.queue_place(prompt_id).await, Ok(QueuePlace::Absent)) {
                            return;
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(self.cfg.cancel_timeout_s), confirm)
            .await
            .is_err()
        {
            tracing::warn!(prompt_id, "ComfyUI did not confirm the cancel in time");
        }
        RunError::Cancelled
    }

    async fn download(
        &self,
        job: &JobRun,
        entry: &Value,
        progress: &ProgressSink,
    ) -> Result<Vec<OutputFile>, RunError> {
        let produced = history::produced(&entry["outputs"]);
        let total = produced.files.len() as u32;
        if total > 0 {
            tokio::fs::create_dir_all(&job.work_dir)
                .await
                .map_err(|e| {
                    failed(
                        FailureKind::Internal,
                        format!("cannot create {}: {e}", job.work_dir.display()),
                        true,
                    )
                })?;
        }
        let mut outputs = Vec::new();
        for (i, (node, file)) in produced.files.iter().enumerate() {
            progress.step(
                i as u32,
                total,
                progress::RUN_SHARE,
                100.0,
                format!("downloading {}", file.filename),
            );
            let name = safe_file_name(&file.filename)
                .map_or_else(|| format!("{node}_output_{i}"), String::from);
            let dest = job.work_dir.join(format!("{i}_{name}"));
            let served = self
                .api
                .download(file, &dest)
                .await
                .map_err(|e| unreachable_failure(&e))?;
            let media_type = served
                .filter(|t| t != "application/octet-stream" && !t.is_empty())
                .unwrap_or_else(|| history::media_type_of(&file.filename).to_string());
            outputs.push(OutputFile {
                name,
                media_type,
                data: OutputData::File(dest),
            });
        }
        for (i, (node, text)) in produced.texts.iter().enumerate() {
            outputs.push(OutputFile {
                name: format!("{node}_text_{i}.txt"),
                media_type: "text/plain".into(),
                data: OutputData::Bytes(text.clone().into_bytes()),
            });
        }
        Ok(outputs)
    }
}

/// Where a prompt stands according to ComfyUI's HTTP API.
enum Reconciled {
    /// Queued or running.
    Waiting,
    /// Over, with its history entry.
    Finished(Value),
    /// Neither queued nor in the history: it will never finish.
    Vanished,
}

fn managed_port(cfg: &ComfyUiConfig, gpu_index: u32) -> u16 {
    if cfg.port != 0 {
        cfg.port
    } else {
        8188u16.saturating_add(gpu_index as u16)
    }
}

/// A server's 400 answer (or a 200 with `node_errors`) as one line naming each
/// node, its class and what is wrong with which input.
pub fn rejection_message(body: &Value) -> String {
    let mut parts = Vec::new();
    let err = &body["error"];
    if let Some(kind) = err.get("type").and_then(Value::as_str) {
        let details = err
            .get("details")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty());
        let message = err.get("message").and_then(Value::as_str).unwrap_or("");
        parts.push(match details {
            Some(d) => format!("{kind}: {message} ({d})"),
            None => format!("{kind}: {message}"),
        });
    }
    let nodes: BTreeMap<(u64, String), &Value> = body["node_errors"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| ((k.parse().unwrap_or(u64::MAX), k.clone()), v))
                .collect()
        })
        .unwrap_or_default();
    for ((_, id), node) in nodes {
        let class = node
            .get("class_type")
            .and_then(Value::as_str)
            .unwrap_or("?");
        for e in node
            .get("errors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = e.get("type").and_then(Value::as_str).unwrap_or("error");
            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
            let details = e.get("details").and_then(Value::as_str).unwrap_or("");
            parts.push(format!("node {id} ({class}): {kind}: {message}: {details}"));
        }
    }
    if parts.is_empty() {
        parts.push(body.to_string().chars().take(500).collect());
    }
    format!("ComfyUI refused the workflow: {}", parts.join("; "))
}

#[async_trait]
impl Backend for ComfyUiBackend {
    fn kind(&self) -> kiln_protocol::Backend {
        kiln_protocol::Backend::Comfyui
    }

    async fn inventory(&self) -> Vec<ModelEntry> {
        let mut models = Vec::new();
        for folder in &self.cfg.model_folders {
            match self.api.models_in(folder).await {
                Ok(Some(names)) => models.extend(names.into_iter().map(|name| ModelEntry {
                    name,
                    kind: folder.clone(),
                })),
                Ok(None) => {}
                Err(e) => tracing::debug!(folder, error = %e, "cannot list a model folder"),
            }
        }
        models.extend(self.templates.names().map(|name| ModelEntry {
            name: name.to_string(),
            kind: "workflow_template".into(),
        }));
        models
    }

    fn params(&self) -> Option<kiln_protocol::params::ParamSchema> {
        Some(schema::schema(&self.templates))
    }

    async fn health(&self) -> Health {
        let running = self.running();
        if let Some(sup) = &running.supervisor {
            match sup.state() {
                ProcState::Ready => {}
                ProcState::Starting => return Health::down("managed ComfyUI is starting"),
                ProcState::Down(why) => {
                    return Health::down(format!("managed ComfyUI is down ({why}); restarting"))
                }
                ProcState::Stopped => return Health::down("managed ComfyUI is stopped"),
            }
        }
        if let Err(e) = self.api.system_stats().await {
            return Health::down(e.to_string());
        }
        if !running.events.wait_connected(Duration::from_secs(2)).await {
            return Health::down(format!(
                "ComfyUI at {} answers HTTP but its WebSocket does not connect",
                self.api.base()
            ));
        }
        self.reaped.get_or_init(|| self.reap_predecessors()).await;
        Health::ok()
    }

    fn loaded_model(&self) -> Option<String> {
        self.loaded.lock().ok()?.clone()
    }

    async fn gpu_hint(&self) -> Option<GpuInfo> {
        let stats = self.api.system_stats().await.ok()?;
        let dev = stats.get("devices")?.get(0)?;
        let mb = |k: &str| {
            dev.get(k)
                .and_then(Value::as_u64)
                .map(|b| b / (1024 * 1024))
        };
        Some(GpuInfo {
            index: self.gpu_index,
            name: dev
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("ComfyUI device")
                .to_string(),
            total_vram_mb: mb("vram_total")?,
            free_vram_mb: mb("vram_free")?,
            unified_memory: dev.get("type").and_then(Value::as_str) == Some("cpu"),
            ..GpuInfo::default()
        })
    }

    async fn run(
        &self,
        job: JobRun,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<RunOutput, RunError> {
        let result = self.attempt(&job, &progress, &cancel).await;
        if !job.spec.inputs.is_empty() {
            self.uploads.remove(&job).await;
        }
        result
    }

    fn stages_ahead(&self) -> bool {
        true
    }

    async fn stage(&self, job: &JobRun, cancel: CancellationToken) {
        self.stage_prompt(job, cancel).await;
    }

    async fn unstage(&self, job: &JobRun) {
        self.unstage_prompt(job).await;
    }

    async fn shutdown(&self) {
        self.shutdown.cancel();
        if let Some(sup) = self.running.get().and_then(|r| r.supervisor.as_ref()) {
            sup.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_name_node_class_and_details() {
        let cases: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/comfyui/traces/invalid_prompts.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let by_case = |name: &str| {
            cases
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["case"] == name)
                .unwrap()["response"]
                .clone()
        };
        let msg = rejection_message(&by_case("return type mismatch (LATENT into IMAGE)"));
        assert!(msg.contains("node 3 (SaveImage): return_type_mismatch: Return type mismatch between linked nodes: images, received_type(LATENT) mismatch input_type(IMAGE)"), "{msg}");
        let msg = rejection_message(&by_case("unknown node class"));
        assert!(
            msg.contains("missing_node_type: Node 'NoSuchNode' not found"),
            "{msg}"
        );
        let msg = rejection_message(&by_case("combo value not in list + self-cycle"));
        assert!(
            msg.contains("upscale_method: 'bogus' not in ['nearest-exact'"),
            "{msg}"
        );
    }
}
