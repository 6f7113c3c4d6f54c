//! Turns job snapshots into what the assistant gets back: a line of text per job,
//! images inline (scaled to fit the configured budget), a resource link to every
//! full output, the path of the gateway's saved copy, and structured JSON with job
//! ids, seeds, timings and the worker/GPU that ran each job.

use base64::Engine;
use kiln_protocol::client::hex;
use kiln_protocol::{ArtifactMeta, JobSnapshot, JobState};
use rmcp::model::{CallToolResult, ContentBlock, Resource};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::ToolError;
use crate::files::write_atomic;
use crate::gateway::{Gateway, PostProcess};
use crate::imaging;
use crate::jobs::{Ended, Item};

/// At most this many images go inline in one result; the rest are links.
pub const MAX_INLINE_IMAGES: usize = 8;

/// The structured result of every job tool.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct JobsReport {
    /// One entry per job (per prompt for `generate_batch`), in the order asked.
    pub jobs: Vec<JobReport>,
    /// True when every job reached a final state.
    pub done: bool,
    pub succeeded: usize,
    pub failed: usize,
    /// Jobs still queued or running (after a timeout, or with `wait: false`).
    pub pending: usize,
    /// What to do next, when there is something to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One job as the assistant sees it.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct JobReport {
    /// The job id (absent when the broker refused the job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// queued, running, succeeded, failed, cancelled, or refused.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The seed that reproduces the result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The worker and its GPU, e.g. `gpu0 (RTX 4090)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// Starts that counted against `max_attempts` (2 after a retry). The
    /// broker's attempt number is left out: it is an identifier that jumps
    /// after a broker restart, not a count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Percent done, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Milliseconds spent queued, running, and in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReport>,
    /// What the backend reported about the result.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub info: Map<String, Value>,
    /// The job's other fields with a value (`priority`, `degrade`, and any the
    /// broker adds later), under the names the broker gives them.
    #[serde(flatten)]
    pub more: Map<String, Value>,
}

/// The snapshot fields a report presents in its own way (or leaves out: `seq`,
/// `history`, `params`); the others go into [`JobReport::more`].
const REPORT_PRESENTED: &[&str] = &[
    "job_id",
    "seq",
    "state",
    "backend",
    "task",
    "model",
    "client",
    "attempt",
    "tries",
    "max_attempts",
    "worker",
    "gpu",
    "progress",
    "queue_position",
    "error",
    "artifacts",
    "info",
    "cancel_requested",
    "created_ms",
    "started_ms",
    "finished_ms",
    "history",
    "params",
    // The Rust client gives every submit a random key (safe retries): noise here.
    "idempotency_key",
];

/// Why a job failed or was refused.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ErrorReport {
    pub kind: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub retryable: bool,
}

/// One output file of a job. When the gateway post-processes it (a sprite keyed
/// out to transparency, a pixel-art grid), `media_type`, `size` and `sha256` are
/// those of the processed file (the saved copy at `path` and the inline image);
/// the resource at `uri` is the generator's original.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct OutputReport {
    /// The artifact id, e.g. `j42.0`.
    pub artifact: String,
    /// The full file as an MCP resource.
    pub uri: String,
    pub name: String,
    pub media_type: String,
    pub size: u64,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Where the gateway saved its copy, when it has an output folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// True when an image of it is inline in this result.
    pub inline: bool,
}

pub fn artifact_uri(meta: &ArtifactMeta) -> String {
    format!("kiln://artifacts/{}", meta.id)
}

fn seed_of(s: &JobSnapshot) -> Option<u64> {
    s.info.get("seed").and_then(Value::as_u64)
}

/// A percentage to one decimal (a worker's 3.8000000000000003 is 3.8).
pub fn round_percent(pct: f64) -> f64 {
    (pct.clamp(0.0, 100.0) * 10.0).round() / 10.0
}

/// The report of one snapshot, without outputs.
pub fn job_report(s: &JobSnapshot, prompt: Option<String>) -> JobReport {
    let run_ms = match (s.started_ms, s.finished_ms) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    JobReport {
        job_id: Some(s.job_id.to_string()),
        state: s.state.to_string(),
        prompt,
        backend: Some(s.backend.to_string()),
        task: Some(s.task.as_str().to_string()),
        model: s.model.clone().or_else(|| {
            s.info
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string)
        }),
        seed: seed_of(s),
        worker: s.worker.clone(),
        gpu: s.gpu.clone(),
        tries: (s.tries > 0).then_some(s.tries),
        max_attempts: Some(s.max_attempts),
        progress: (s.state == JobState::Running)
            .then(|| round_percent(s.progress.as_ref().map_or(0.0, |p| p.pct))),
        stage: s
            .progress
            .as_ref()
            .map(|p| p.stage.clone())
            .filter(|st| !st.is_empty() && !s.state.is_terminal()),
        queue_position: s.queue_position.filter(|_| s.state == JobState::Queued),
        queued_ms: s.started_ms.map(|st| st.saturating_sub(s.created_ms)),
        run_ms,
        total_ms: s.finished_ms.map(|f| f.saturating_sub(s.created_ms)),
        outputs: Vec::new(),
        error: s.error.as_ref().map(|e| ErrorReport {
            kind: serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            message: e.message.clone(),
            field: None,
            retryable: e.retryable,
        }),
        info: s.info.clone(),
        more: s.other_fields(REPORT_PRESENTED),
    }
}

fn refused_report(e: &ToolError, prompt: Option<String>) -> JobReport {
    JobReport {
        job_id: None,
        state: "refused".into(),
        prompt,
        backend: None,
        task: None,
        model: None,
        seed: None,
        worker: None,
        gpu: None,
        tries: None,
        max_attempts: None,
        progress: None,
        stage: None,
        queue_position: None,
        queued_ms: None,
        run_ms: None,
        total_ms: None,
        outputs: Vec::new(),
        error: Some(ErrorReport {
            kind: e.kind().into(),
            message: e.to_string(),
            field: e.field().map(str::to_string),
            retryable: false,
        }),
        info: Map::new(),
        more: Map::new(),
    }
}

/// One line about a job for clients that read only text.
fn summary(r: &JobReport) -> String {
    let id = r.job_id.clone().unwrap_or_else(|| "job".into());
    let mut line = match r.state.as_str() {
        "succeeded" => {
            let place = crate::progress::place(r.worker.as_deref(), r.gpu.as_deref());
            let time = r
                .run_ms
                .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
                .unwrap_or_default();
            let seed = r.seed.map(|s| format!(", seed {s}")).unwrap_or_default();
            format!("{id} succeeded{place}{time}{seed}")
        }
        "failed" | "refused" | "cancelled" => {
            let why = r
                .error
                .as_ref()
                .map(|e| format!(": {}", e.message))
                .unwrap_or_default();
            format!("{id} {}{why}", r.state)
        }
        "running" => format!(
            "{id} running ({:.0}%{})",
            r.progress.unwrap_or(0.0),
            r.stage
                .as_ref()
                .map(|s| format!(", {s}"))
                .unwrap_or_default()
        ),
        other => format!("{id} {other}"),
    };
    if let Some(p) = &r.prompt {
        line = format!("{line} — {p:?}");
    }
    for o in &r.outputs {
        line.push_str(&format!(
            "\n  {} ({}, {} bytes)",
            o.uri, o.media_type, o.size
        ));
        if let Some(path) = &o.path {
            line.push_str(&format!(" saved to {path}"));
        }
    }
    line
}

/// Applies the gateway's post-processing to one image.
pub fn post_process(
    data: Vec<u8>,
    media_type: &str,
    post: PostProcess,
) -> Result<(Vec<u8>, String), ToolError> {
    if post.is_none() || !imaging::is_still_image(media_type) {
        return Ok((data, media_type.to_string()));
    }
    let mut data = data;
    let mut media_type = media_type.to_string();
    if let Some(cell) = post.pixel_cell {
        data = imaging::pixelate(&data, &media_type, cell)?;
        media_type = "image/png".into();
    }
    if post.remove_background {
        data = imaging::remove_background(&data, &media_type)?;
        media_type = "image/png".into();
    }
    Ok((data, media_type))
}

/// Renders a call's items. Succeeded jobs' outputs are fetched: images go inline
/// within the budget, every output gets a link, and a copy is saved when the gateway
/// has an output folder.
///
/// The result is an error (`isError`) only for a generate call whose every job
/// failed; looking at or waiting for a job that failed or was cancelled worked,
/// so `get_job` and `wait_for_job` report it as a success.
pub async fn render(
    gw: &Gateway,
    mut items: Vec<Item>,
    prompts: Option<Vec<String>>,
    ended: Ended,
) -> CallToolResult {
    // Follow events carry no queue position; the broker's `get` does.
    for s in items.iter_mut().flatten() {
        if s.state == JobState::Queued && s.queue_position.is_none() {
            if let Ok(fresh) = gw.client.get(s.job_id).await {
                *s = fresh;
            }
        }
    }
    let n_images: usize = items
        .iter()
        .flatten()
        .filter(|s| s.state == JobState::Succeeded)
        .flat_map(|s| &s.artifacts)
        .filter(|a| imaging::is_still_image(&a.media_type))
        .count()
        .clamp(1, MAX_INLINE_IMAGES);
    let budget = gw.cfg.inline_image_max_bytes as usize / n_images;
    let mut inlined = 0;
    let mut content = Vec::new();
    let mut images = Vec::new();
    let mut reports = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prompt = prompts.as_ref().and_then(|p| p.get(i).cloned());
        let mut report = match item {
            Ok(s) => job_report(s, prompt),
            Err(e) => refused_report(e, prompt),
        };
        if let Ok(s) = item {
            if s.state == JobState::Succeeded {
                for meta in &s.artifacts {
                    let (output, blocks) = render_output(gw, s, meta, budget, &mut inlined).await;
                    report.outputs.push(output);
                    images.extend(blocks);
                }
            }
        }
        reports.push(report);
    }
    let count = |state: &str| reports.iter().filter(|r| r.state == state).count();
    let succeeded = count("succeeded");
    let failed = count("failed") + count("refused") + count("cancelled");
    let pending = reports.len() - succeeded - failed;
    let note = match ended {
        Ended::TimedOut if pending > 0 => Some(format!(
            "Stopped waiting; {pending} job(s) still queued or running and they keep going. Call wait_for_job with each job_id to continue waiting (get_job to look, cancel_job to stop)."
        )),
        Ended::NotWaited => Some("Submitted without waiting. Use wait_for_job or get_job with the job ids.".into()),
        _ if inlined == MAX_INLINE_IMAGES && images.len() < reports.iter().map(|r| r.outputs.len()).sum::<usize>() => {
            Some(format!("Only the first {MAX_INLINE_IMAGES} images are inline; the others are resource links."))
        }
        _ => None,
    };
    let report = JobsReport {
        done: pending == 0,
        jobs: reports,
        succeeded,
        failed,
        pending,
        note,
    };
    let mut text: Vec<String> = report.jobs.iter().map(summary).collect();
    if let Some(note) = &report.note {
        text.push(note.clone());
    }
    content.push(ContentBlock::text(text.join("\n")));
    content.extend(images);
    let all_failed = report.succeeded == 0
        && report.pending == 0
        && report.failed > 0
        && matches!(ended, Ended::Finished | Ended::NotWaited);
    let mut result = if all_failed {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    result.structured_content = serde_json::to_value(&report).ok();
    result
}

/// Fetches one output and returns its report with the content blocks it adds: the
/// inline image (if it fits and the inline quota is not used up) and its link.
async fn render_output(
    gw: &Gateway,
    s: &JobSnapshot,
    meta: &ArtifactMeta,
    budget: usize,
    inlined: &mut usize,
) -> (OutputReport, Vec<ContentBlock>) {
    let mut report = OutputReport {
        artifact: meta.id.to_string(),
        uri: artifact_uri(meta),
        name: meta.name.clone(),
        media_type: meta.media_type.clone(),
        size: meta.size,
        sha256: meta.sha256.clone(),
        width: None,
        height: None,
        path: None,
        inline: false,
    };
    let mut blocks = Vec::new();
    let want_inline = imaging::is_still_image(&meta.media_type) && *inlined < MAX_INLINE_IMAGES;
    let want_bytes = want_inline || gw.cfg.output_dir.is_some() || meta.media_type == "image/apng";
    if want_bytes {
        match gw.client.fetch_artifact(meta.id).await {
            Ok(artifact) => {
                let (w, h) = imaging::dimensions(&artifact.data, &meta.media_type).unzip();
                report.width = w;
                report.height = h;
                let post = gw.post_process(s);
                match post_process(artifact.data, &meta.media_type, post) {
                    Ok((data, media_type)) => {
                        if !post.is_none() {
                            // The copy and the inline image are the processed file:
                            // report its own size, digest and type.
                            report.size = data.len() as u64;
                            report.sha256 = hex(&Sha256::digest(&data));
                            report.media_type = media_type.clone();
                        }
                        if let Some(dir) = &gw.cfg.output_dir {
                            report.path = save_copy(dir, meta, &data, &media_type);
                        }
                        if want_inline {
                            match imaging::fit_inline(&data, &media_type, budget) {
                                Ok(Some(img)) => {
                                    let b64 =
                                        base64::engine::general_purpose::STANDARD.encode(&img.data);
                                    blocks.push(ContentBlock::image(b64, img.media_type));
                                    report.inline = true;
                                    *inlined += 1;
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    tracing::warn!(artifact = %meta.id, error = %e, "cannot inline image")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(artifact = %meta.id, error = %e, "post-processing failed")
                    }
                }
            }
            Err(e) => tracing::warn!(artifact = %meta.id, error = %e, "cannot fetch artifact"),
        }
    }
    let mut link = Resource::new(report.uri.clone(), meta.name.clone())
        .with_mime_type(meta.media_type.clone())
        .with_size(meta.size);
    if let Some(path) = &report.path {
        link = link.with_description(format!("saved to {path}"));
    }
    blocks.push(ContentBlock::resource_link(link));
    (report, blocks)
}

/// Saves the gateway's copy of an output as `<output_dir>/<artifact id>-<name>`.
fn save_copy(
    dir: &std::path::Path,
    meta: &ArtifactMeta,
    data: &[u8],
    media_type: &str,
) -> Option<String> {
    let mut name = kiln_protocol::job::safe_file_name(&meta.name)
        .unwrap_or("output")
        .to_string();
    if media_type == "image/png" && !name.ends_with(".png") {
        name = format!(
            "{}.png",
            name.rsplit_once('.')
                .map_or(name.as_str(), |(stem, _)| stem)
        );
    }
    let path = dir.join(format!("{}-{name}", meta.id));
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| ToolError::Io(e.to_string()))
        .and_then(|_| write_atomic(&path, data));
    match written {
        Ok(()) => Some(path.display().to_string()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot save output copy");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot field the report has no code for reaches the assistant under
    /// its own name.
    #[test]
    fn snapshot_fields_without_code_of_their_own_are_reported() {
        let snap: JobSnapshot = serde_json::from_value(serde_json::json!({
            "job_id": "j7", "seq": 4, "state": "queued", "backend": "sim",
            "task": "text_to_image", "priority": -2, "client": "c", "attempt": 0,
            "max_attempts": 3, "degrade": 1, "created_ms": 1
        }))
        .unwrap();
        let report = serde_json::to_value(job_report(&snap, None)).unwrap();
        assert_eq!(report["degrade"], 1);
        assert_eq!(report["priority"], -2);
        assert!(report.get("seq").is_none() && report.get("client").is_none());
    }

    /// After a broker restart the attempt number jumps (66 here); the report
    /// counts tries against the maximum instead.
    #[test]
    fn a_report_counts_tries_not_attempt_numbers() {
        let snap: JobSnapshot = serde_json::from_value(serde_json::json!({
            "job_id": "j7", "seq": 4, "state": "running", "backend": "sim",
            "task": "text_to_image", "priority": 0, "client": "c", "attempt": 66,
            "tries": 2, "max_attempts": 3, "created_ms": 1, "started_ms": 2
        }))
        .unwrap();
        let report = serde_json::to_value(job_report(&snap, None)).unwrap();
        assert_eq!(
            (report["tries"].clone(), report["max_attempts"].clone()),
            (2.into(), 3.into())
        );
        assert!(report.get("attempt").is_none(), "{report}");
    }
}
