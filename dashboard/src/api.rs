//! The JSON API the pages use (and scripts may): the live view and its event
//! stream, the queue, jobs, and the actions. Every error is `{"error": "...",
//! "field": "..."}` with an HTTP status that says whose fault it is.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use kiln_protocol::request::{Accepted, CancelReply};
use kiln_protocol::{Backend, ClientError, ErrorCode, JobId, JobSnapshot, JobState, ListFilter};
use serde::{Deserialize, Serialize};

use crate::form::{self, FormError, TestJobForm};
use crate::http::App;

/// An error answer: `{"error": message, "field": field}`.
pub fn error_response(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        field: Option<&'a str>,
    }
    (
        status,
        Json(Body {
            error: message,
            field,
        }),
    )
        .into_response()
}

/// A broker error as an HTTP answer, with the broker's field when it named one.
pub fn client_error(e: &ClientError) -> Response {
    let status = match e.code() {
        Some(ErrorCode::NotFound) => StatusCode::NOT_FOUND,
        Some(
            ErrorCode::InvalidField
            | ErrorCode::FieldTooLarge
            | ErrorCode::Unschedulable
            | ErrorCode::Malformed,
        ) => StatusCode::UNPROCESSABLE_ENTITY,
        Some(ErrorCode::InvalidState | ErrorCode::IdempotencyConflict) => StatusCode::CONFLICT,
        Some(ErrorCode::QueueFull) => StatusCode::TOO_MANY_REQUESTS,
        Some(ErrorCode::Unauthenticated) => StatusCode::BAD_GATEWAY,
        Some(_) => StatusCode::BAD_GATEWAY,
        None => StatusCode::SERVICE_UNAVAILABLE,
    };
    let field = match e {
        ClientError::Broker(body) => body.field.as_deref().map(form::form_field),
        _ => None,
    };
    error_response(status, &e.to_string(), field)
}

fn json_of(body: Arc<str>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `GET /api/live`: the latest live view (see [`crate::live::LiveView`]).
pub async fn live(State(app): State<Arc<App>>) -> Response {
    json_of(app.live.borrow().clone())
}

/// `GET /api/events`: server-sent events, one `live` event with the whole view
/// at once and after every change. Ends when the server shuts down.
pub async fn events(
    State(app): State<Arc<App>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut rx = app.live.clone();
    rx.mark_changed();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let data = rx.borrow_and_update().clone();
        Some((Ok(SseEvent::default().event("live").data(&*data)), rx))
    })
    .take_until(app.shutdown.clone().cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The queue as the Queue page shows it.
#[derive(Debug, Serialize)]
pub struct QueueView {
    /// How many jobs this answer lists (the broker's total is `queue.queued` in
    /// the live view).
    pub shown: usize,
    /// Waiting jobs, highest priority first, then oldest first; each with
    /// `queue_position` and `waiting` when the broker reports them.
    pub jobs: Vec<JobSnapshot>,
    /// True when there are more queued jobs than `dashboard.queue_limit`.
    pub truncated: bool,
}

/// `GET /api/queue`.
pub async fn queue(State(app): State<Arc<App>>) -> Response {
    let limit = app.settings.queue_limit;
    let filter = ListFilter {
        states: vec![JobState::Queued],
        limit: Some(limit + 1),
        ..ListFilter::default()
    };
    let mut jobs = match app.client.list(filter).await {
        Ok(j) => j,
        Err(e) => return client_error(&e),
    };
    let truncated = jobs.len() as u64 > limit;
    jobs.truncate(limit as usize);
    jobs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_ms.cmp(&b.created_ms))
            .then(a.job_id.cmp(&b.job_id))
    });
    // Why each waits is in `get` replies: ask for the head of the queue at once.
    let detail = app.settings.waiting_detail_limit as usize;
    let fetched =
        futures::future::join_all(jobs.iter().take(detail).map(|j| app.client.get(j.job_id))).await;
    for (job, full) in jobs.iter_mut().zip(fetched) {
        if let Ok(mut full) = full {
            if full.state == JobState::Queued {
                full.history.clear();
                *job = full;
            }
        }
    }
    Json(QueueView {
        shown: jobs.len(),
        jobs,
        truncated,
    })
    .into_response()
}

/// Filters of `GET /api/jobs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// Comma-separated states.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub worker: Option<String>,
    /// Text to find in the id, client, model, worker, task, state or error.
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub limit: Option<u64>,
}

impl JobsQuery {
    /// The broker filter, or the name of the bad parameter and why.
    pub fn filter(&self) -> Result<ListFilter, FormError> {
        let mut filter = ListFilter {
            limit: Some(self.limit.unwrap_or(200).clamp(1, 1000)),
            ..ListFilter::default()
        };
        if let Some(states) = self.state.as_deref().filter(|s| !s.is_empty()) {
            let mut seen = HashSet::new();
            for s in states.split(',') {
                let state: JobState = serde_json::from_value(serde_json::Value::String(
                    s.trim().to_string(),
                ))
                .map_err(|_| {
                    FormError::new(
                        "state",
                        format!("unknown state {s:?}; expected queued, running, succeeded, failed or cancelled"),
                    )
                })?;
                if seen.insert(state) {
                    filter.states.push(state);
                }
            }
        }
        if let Some(b) = self.backend.as_deref().filter(|s| !s.is_empty()) {
            filter.backend = Some(
                b.parse::<Backend>()
                    .map_err(|e| FormError::new("backend", e))?,
            );
        }
        filter.client = self.client.clone().filter(|s| !s.is_empty());
        filter.worker = self.worker.clone().filter(|s| !s.is_empty());
        Ok(filter)
    }
}

/// Whether a listed job matches the search text (case-insensitive).
pub fn matches(job: &JobSnapshot, q: &str) -> bool {
    let q = q.trim().to_lowercase();
    if q.is_empty() {
        return true;
    }
    let fields = [
        job.job_id.to_string(),
        job.client.clone(),
        job.model.clone().unwrap_or_default(),
        job.worker.clone().unwrap_or_default(),
        job.task.as_str().to_string(),
        job.backend.as_str().to_string(),
        job.state.as_str().to_string(),
        job.error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
    ];
    fields.iter().any(|f| f.to_lowercase().contains(&q))
}

/// `GET /api/jobs?state=&backend=&client=&worker=&q=&limit=`: newest first.
pub async fn jobs(
    State(app): State<Arc<App>>,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.body_text(), None),
    };
    let filter = match query.filter() {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    match app.client.list(filter).await {
        Ok(jobs) => {
            let q = query.q.unwrap_or_default();
            let jobs: Vec<JobSnapshot> = jobs.into_iter().filter(|j| matches(j, &q)).collect();
            Json(serde_json::json!({ "jobs": jobs })).into_response()
        }
        Err(e) => client_error(&e),
    }
}

fn job_id(raw: &str) -> Result<JobId, FormError> {
    raw.parse::<JobId>()
        .map_err(|e| FormError::new("job_id", e.to_string()))
}

/// `GET /api/jobs/{id}`: the whole snapshot, history and parameters included.
pub async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let id = match job_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match app.client.get(id).await {
        Ok(job) => Json(job).into_response(),
        Err(e) => client_error(&e),
    }
}

/// What an action answers.
#[derive(Debug, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ActionResult {
    Cancel(CancelReply),
    Resubmit { from: JobId, accepted: Accepted },
    Submit(Accepted),
}

/// `POST /api/jobs/{id}/cancel`.
pub async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let id = match job_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match app.client.cancel(id).await {
        Ok(reply) => Json(ActionResult::Cancel(reply)).into_response(),
        Err(e) => client_error(&e),
    }
}

/// `POST /api/jobs/{id}/resubmit`: a new job with the whole spec of `id`, made by
/// the broker (`resubmit`, so input files, workflows and every option come
/// along). A broker without the `resubmit` feature gets a new job built from the
/// snapshot instead ([`form::resubmission`]), which refuses what a snapshot lacks.
pub async fn resubmit(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let id = match job_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let accepted = match app.client.resubmit(id, None).await {
        // The client checks the broker's features before sending `resubmit`.
        Err(ClientError::Unsupported { .. }) => {
            let job = match app.client.get(id).await {
                Ok(job) => job,
                Err(e) => return client_error(&e),
            };
            match form::resubmission(&job) {
                Ok(spec) => app.client.submit(spec).await,
                Err(e) => return e.into_response(),
            }
        }
        answered => answered,
    };
    match accepted {
        Ok(accepted) => Json(ActionResult::Resubmit { from: id, accepted }).into_response(),
        Err(e) => client_error(&e),
    }
}

/// `POST /api/submit`: the test-job form.
pub async fn submit(
    State(app): State<Arc<App>>,
    body: Result<Json<TestJobForm>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(form) = match body {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.body_text(), None),
    };
    let limits = app.client.welcome().map(|w| w.limits).unwrap_or_default();
    let spec = match form.to_spec(&limits) {
        Ok(spec) => spec,
        Err(e) => return e.into_response(),
    };
    match app.client.submit(spec).await {
        Ok(accepted) => Json(ActionResult::Submit(accepted)).into_response(),
        Err(e) => client_error(&e),
    }
}
