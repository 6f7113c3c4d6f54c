//! Events the broker publishes on its PUB socket (default port 5557).
//!
//! Each event is `[topic, header, body]`. Topics are plain UTF-8 so a SUB can filter
//! by prefix: `job/` for every job, `job/j42/` for one job, `worker/` for workers.
//! PUB is lossy (slow joiners, full queues), so each job event carries a per-job
//! sequence number; a follower that sees a gap asks for a snapshot with `get`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::job::{ArtifactMeta, JobError, JobState, Progress};
use crate::wire_message;
use crate::worker::WorkerState;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    JobState(JobStateEvent),
    JobProgress(JobProgressEvent),
    WorkerState(WorkerStateEvent),
}

wire_message!(Event {
    "job_state" => JobStateEvent,
    "job_progress" => JobProgressEvent,
    "worker_state" => WorkerStateEvent,
});

/// A job changed state (or asked for cancel). The last one of a job is terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStateEvent {
    pub job_id: JobId,
    pub seq: u64,
    pub state: JobState,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactMeta>,
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub note: Cow<'static, str>,
    pub at_ms: u64,
}

/// A running attempt made progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobProgressEvent {
    pub job_id: JobId,
    pub seq: u64,
    pub attempt: u32,
    pub worker: Arc<str>,
    /// The worker's GPU name, for messages like `sampling 12/30 on gpu0 (RTX 4090)`.
    #[serde(default)]
    pub gpu: Arc<str>,
    #[serde(flatten)]
    pub progress: Progress,
}

/// A worker registered, changed state or went offline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStateEvent {
    pub worker_id: Arc<str>,
    pub state: WorkerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    pub at_ms: u64,
}

impl Event {
    /// The topic frame the event is published under.
    pub fn topic(&self) -> String {
        match self {
            Event::JobState(e) => Topic::job_state(e.job_id),
            Event::JobProgress(e) => Topic::job_progress(e.job_id),
            Event::WorkerState(e) => Topic::worker(&e.worker_id),
        }
    }

    pub fn job_id(&self) -> Option<JobId> {
        match self {
            Event::JobState(e) => Some(e.job_id),
            Event::JobProgress(e) => Some(e.job_id),
            Event::WorkerState(_) => None,
        }
    }

    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::JobState(e) => Some(e.seq),
            Event::JobProgress(e) => Some(e.seq),
            Event::WorkerState(_) => None,
        }
    }
}

/// Topic names and subscription prefixes.
pub struct Topic;

impl Topic {
    pub const ALL_JOBS: &'static str = "job/";
    pub const ALL_WORKERS: &'static str = "worker/";

    /// The prefix matching every event of one job (the trailing `/` keeps `j4`
    /// from matching `j42`).
    pub fn job(id: JobId) -> String {
        format!("job/{id}/")
    }
    pub fn job_state(id: JobId) -> String {
        format!("job/{id}/state")
    }
    pub fn job_progress(id: JobId) -> String {
        format!("job/{id}/progress")
    }
    pub fn worker(id: &str) -> String {
        format!("worker/{id}")
    }
}
