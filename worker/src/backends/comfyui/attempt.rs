//! One attempt on ComfyUI, in two halves: handing the prompt to ComfyUI's queue
//! ([`ComfyUiBackend::queue_prompt`]) and following it to its outputs
//! ([`ComfyUiBackend::collect`]).
//!
//! The halves are apart so that a held attempt (pipelined dispatch) can be
//! queued while the one before it runs: ComfyUI then starts it the moment the
//! GPU is free, as it does with any queue of prompts, instead of after the
//! worker has collected the previous outputs and posted the next graph (about
//! 3 ms of idle GPU per job on the overhead bench, ComfyUI's own gap is 0.2 ms).
//! A staged prompt taken back is deleted from the queue (or interrupted, if
//! ComfyUI started it in the meantime) by [`ComfyUiBackend::unstage_prompt`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use kiln_protocol::{FailureKind, JobId};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::api::Submitted;
use super::events::WsEvent;
use super::graph::Prepared;
use super::history::{self, Verdict};
use super::{failed, progress, rejection_message, unreachable_failure, validate, ComfyUiBackend};
use crate::backend::*;

/// A prompt in ComfyUI's queue, with what following it needs.
pub(super) struct Queued {
    prompt_id: String,
    /// Subscribed before the prompt was posted, so no event of it is missed
    /// (a lagging receiver makes [`ComfyUiBackend::follow`] ask over HTTP).
    events: broadcast::Receiver<WsEvent>,
    tracker: progress::Tracker,
    prepared: Prepared,
    /// The template's name, or `workflow`.
    source: String,
    /// When the attempt began on this worker.
    started: Instant,
}

/// Staged attempts by job and attempt: the queued prompt, or why staging failed
/// (then [`Backend::run`] starts afresh and meets the error itself).
#[derive(Default)]
pub(super) struct Staged(Mutex<HashMap<(JobId, u32), Result<Queued, RunError>>>);

impl Staged {
    fn put(&self, job: &JobRun, staged: Result<Queued, RunError>) {
        self.lock().insert((job.job_id, job.attempt), staged);
    }

    fn take(&self, job: &JobRun) -> Option<Result<Queued, RunError>> {
        self.lock().remove(&(job.job_id, job.attempt))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(JobId, u32), Result<Queued, RunError>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ComfyUiBackend {
    /// [`Backend::stage`]: queues the held attempt's prompt now; no progress is
    /// reported (the job is not running yet).
    pub(super) async fn stage_prompt(&self, job: &JobRun, cancel: CancellationToken) {
        let (quiet, _feed) = ProgressSink::new();
        let staged = self.queue_prompt(job, &quiet, &cancel).await;
        match &staged {
            Ok(q) => {
                tracing::info!(job = %job.job_id, attempt = job.attempt, prompt_id = %q.prompt_id, "staged a held job in ComfyUI's queue")
            }
            Err(e) => {
                tracing::debug!(job = %job.job_id, attempt = job.attempt, error = ?e, "staging failed; the job starts afresh in its turn")
            }
        }
        self.staged.put(job, staged);
    }

    /// [`Backend::unstage`]: the staged prompt leaves ComfyUI's queue (or is
    /// interrupted, if ComfyUI has started it) and its uploads go.
    pub(super) async fn unstage_prompt(&self, job: &JobRun) {
        if let Some(Ok(mut q)) = self.staged.take(job) {
            tracing::info!(job = %job.job_id, attempt = job.attempt, prompt_id = %q.prompt_id, "taking a staged job back from ComfyUI");
            let _ = self.cancel_prompt(&q.prompt_id, &mut q.events).await;
        }
        if !job.spec.inputs.is_empty() {
            self.uploads.remove(job).await;
        }
    }

    /// One attempt: [`Backend::run`] without the clean-up of its uploads. Takes
    /// over the prompt staged for it, if any.
    pub(super) async fn attempt(
        &self,
        job: &JobRun,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<RunOutput, RunError> {
        let queued = match self.staged.take(job) {
            Some(Ok(q)) => q,
            // Staging failed (or found ComfyUI away): this run meets it itself.
            Some(Err(_)) | None => self.queue_prompt(job, progress, cancel).await?,
        };
        self.collect(job, queued, progress, cancel).await
    }

    /// Waits for ComfyUI, uploads the inputs, builds and checks the graph and
    /// posts it: the prompt is in ComfyUI's queue when this returns.
    async fn queue_prompt(
        &self,
        job: &JobRun,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Queued, RunError> {
        let started = Instant::now();
        self.wait_ready(cancel, progress).await?;
        progress.stage(0.0, "preparing the workflow");
        if !job.spec.inputs.is_empty() {
            progress.enter(Phase::Upload);
        }
        let uploaded = self.upload_inputs(job).await?;
        progress.leave();
        let (source, prepared) = self.prepare(job, &uploaded)?;
        for p in &prepared.ignored {
            tracing::debug!(job = %job.job_id, param = %p, "parameter not used by {source}");
        }
        let info = self.validate(&prepared, job.max_outputs).await?;
        if cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        let graph = Value::Object(prepared.graph.clone());
        let tracker =
            progress::Tracker::new(&graph, validate::nodes_to_run(&prepared.graph, &info));
        // Subscribe before posting: events can arrive before the HTTP answer.
        let mut events = self.running().events.subscribe();
        let prompt_id = uuid::Uuid::new_v4().hyphenated().to_string();
        match self.api.submit(&graph, &prompt_id, &self.client_id).await {
            Ok(Submitted::Queued { node_errors, .. }) if !node_errors.is_empty() => {
                // Partly accepted: the rest would run without the failing outputs.
                let _ = self.cancel_prompt(&prompt_id, &mut events).await;
                let body = json!({"node_errors": node_errors});
                return Err(failed(
                    FailureKind::InvalidInput,
                    rejection_message(&body),
                    false,
                ));
            }
            Ok(Submitted::Queued { .. }) => {}
            Ok(Submitted::Rejected(body)) => {
                return Err(failed(
                    FailureKind::InvalidInput,
                    rejection_message(&body),
                    false,
                ))
            }
            Err(e) => return Err(unreachable_failure(&e)),
        }
        tracing::info!(job = %job.job_id, prompt_id, source, "queued on ComfyUI");
        Ok(Queued {
            prompt_id,
            events,
            tracker,
            prepared,
            source,
            started,
        })
    }

    /// Follows a queued prompt to its end and brings its outputs home.
    async fn collect(
        &self,
        job: &JobRun,
        queued: Queued,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<RunOutput, RunError> {
        let Queued {
            prompt_id,
            mut events,
            mut tracker,
            prepared,
            source,
            started,
        } = queued;
        progress.stage(0.0, "queued in ComfyUI");
        progress.enter(Phase::Queued);
        let entry = self
            .follow(&prompt_id, &mut events, &mut tracker, progress, cancel)
            .await?;
        match history::verdict(&entry) {
            Verdict::Success => {}
            Verdict::Error(payload) => {
                return Err(RunError::Failed(history::runtime_failure(&payload)))
            }
            Verdict::Interrupted if cancel.is_cancelled() => return Err(RunError::Cancelled),
            Verdict::Interrupted => {
                return Err(failed(
                    FailureKind::Backend,
                    "the prompt was interrupted by someone else on the ComfyUI server",
                    true,
                ))
            }
            Verdict::Unknown(status) => {
                return Err(failed(
                    FailureKind::Backend,
                    format!("ComfyUI finished the prompt with status {status:?}"),
                    false,
                ))
            }
        }
        if let Some(model) = &prepared.model {
            *self.loaded.lock().expect("not poisoned") = Some(model.clone());
        }
        progress.enter(Phase::Download);
        let outputs = self.download(job, &entry, progress).await?;
        progress.leave();
        if outputs.is_empty() {
            return Err(failed(
                FailureKind::Backend,
                "the workflow finished without any output (no saved file, preview or text)",
                false,
            ));
        }
        progress.stage(100.0, "done");
        let mut info = Map::new();
        info.insert("prompt_id".into(), prompt_id.into());
        info.insert("workflow".into(), source.into());
        if let Some(seed) = prepared.seed {
            info.insert("seed".into(), seed.into());
        }
        if let Some(model) = prepared.model {
            info.insert("model".into(), model.into());
        }
        if !prepared.ignored.is_empty() {
            info.insert("ignored_params".into(), prepared.ignored.into());
        }
        info.insert("degrade".into(), job.degrade.into());
        info.insert(
            "run_ms".into(),
            (started.elapsed().as_millis() as u64).into(),
        );
        Ok(RunOutput { outputs, info })
    }
}
