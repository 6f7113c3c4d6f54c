//! A job as the broker keeps it: the client's spec plus everything that happened.
//! The durable state record is written positionally by [`super::record`]; the
//! serde form (fields marked `skip` are rebuilt) is the named record of earlier
//! releases, still read.

use std::borrow::Cow;
use std::sync::Arc;

use kiln_protocol::{
    ArtifactMeta, JobError, JobId, JobSnapshot, JobSpec, JobState, Progress, Transition,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::queue::{ClassId, Slot};

/// History entries kept per job; the oldest are dropped beyond this, so a job that
/// bounces between workers cannot grow without limit.
pub const MAX_HISTORY: usize = 64;

/// The serialized form is the job's durable *state* record, rewritten on every
/// transition; the spec never changes and is stored once, separately
/// ([`super::Record::Spec`]), so transitions stay small and cheap to encode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    #[serde(skip, default = "unset_spec")]
    pub spec: Arc<JobSpec>,
    pub client: Arc<str>,
    pub state: JobState,
    pub attempt: u32,
    pub max_attempts: u32,
    pub worker: Option<Arc<str>>,
    pub gpu: Option<Arc<str>>,
    pub seq: u64,
    pub error: Option<JobError>,
    pub artifacts: Vec<ArtifactMeta>,
    pub info: Map<String, Value>,
    pub cancel_requested: bool,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Global order of (re)queueing: FIFO within a client, and queue order on
    /// recovery.
    pub enqueue_seq: u64,
    /// The VRAM a worker must have; raised above a GPU that ran out of memory.
    pub min_vram_mb: u64,
    pub history: Vec<Transition>,
    /// Deadline of the queue timeout, fixed at submit.
    pub queue_deadline_ms: Option<u64>,
    /// Deadline of the current attempt's run timeout.
    pub run_deadline_ms: Option<u64>,
    /// Steps below the requested setting, raised after out-of-memory.
    #[serde(default)]
    pub degrade: u8,
    /// Assignments a busy worker refused; they do not use up attempts.
    #[serde(default)]
    pub refusals: u32,
    /// Assignments made, for `max_attempts` (the attempt *number* can jump, see
    /// `attempt_reserve`).
    #[serde(default)]
    pub tries: u32,
    /// Every stored record reserves the attempt numbers up to this, so that the
    /// broker may send an assignment before its record is on disk: after a crash,
    /// new attempts are numbered above the reservation and can never collide with
    /// one that was sent but not recorded.
    #[serde(default)]
    pub attempt_reserve: u32,
    /// Recovered jobs number their next attempt above this.
    #[serde(skip)]
    pub attempt_floor: u32,
    #[serde(skip)]
    pub progress: Option<Progress>,
    #[serde(skip)]
    pub slot: Option<Slot>,
    #[serde(skip)]
    pub class: ClassId,
    /// The worker reported success and the outputs are being verified.
    #[serde(skip)]
    pub finalizing: bool,
    /// Assigned to a busy worker that starts it when its current job ends
    /// (pipelined dispatch); the job is still `queued` and `worker` names the
    /// holder. Not stored: after a restart a held job is simply queued again.
    #[serde(skip)]
    pub held: bool,
    /// Its model was not warm on the worker of its current attempt when assigned
    /// (the attempt loads it): how its duration is read by [`super::costs`].
    #[serde(skip)]
    pub cold: bool,
    #[serde(skip)]
    pub uploads: Vec<Upload>,
}

/// An output being received for the current attempt.
#[derive(Debug, Clone)]
pub struct Upload {
    pub index: u16,
    pub name: String,
    pub media_type: String,
    pub total: u64,
    pub received: u64,
}

/// Placeholder until the stored spec is joined back in by [`Job::from_records`].
fn unset_spec() -> Arc<JobSpec> {
    Arc::new(JobSpec::new(
        kiln_protocol::Backend::Sim,
        kiln_protocol::Task::TextToImage,
    ))
}

impl Job {
    /// Attempts that count against `max_attempts`.
    pub fn attempts_used(&self) -> u32 {
        self.tries.saturating_sub(self.refusals)
    }

    /// A queued job with nothing happened yet: the start of a submitted job and
    /// of a decoded state record.
    pub fn new(id: JobId, spec: Arc<JobSpec>, client: Arc<str>) -> Job {
        Job {
            id,
            spec,
            client,
            state: JobState::Queued,
            attempt: 0,
            max_attempts: 0,
            worker: None,
            gpu: None,
            seq: 0,
            error: None,
            artifacts: Vec::new(),
            info: Map::new(),
            cancel_requested: false,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            enqueue_seq: 0,
            min_vram_mb: 0,
            history: Vec::new(),
            queue_deadline_ms: None,
            run_deadline_ms: None,
            degrade: 0,
            refusals: 0,
            tries: 0,
            attempt_reserve: 0,
            attempt_floor: 0,
            progress: None,
            slot: None,
            class: 0,
            finalizing: false,
            held: false,
            cold: false,
            uploads: Vec::new(),
        }
    }

    /// The state record of the job, in the positional encoding ([`super::record`]).
    pub fn state_record(&self) -> Vec<u8> {
        super::record::encode(self)
    }

    /// The state record in the named encoding of earlier releases (version 1).
    pub fn named_state_record(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("job records encode")
    }

    /// The spec record of the job.
    pub fn spec_record(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(&*self.spec).expect("job specs encode")
    }

    /// Rebuilds a job from its two stored records; the state record may be of any
    /// version this broker reads ([`super::record`]).
    pub fn from_records(state: &[u8], spec: &[u8]) -> Result<Job, super::record::RecordError> {
        super::record::decode(state, spec)
    }

    pub fn record(&mut self, at_ms: u64, note: Cow<'static, str>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(1); // keep the first entry: when it was submitted
        }
        if self.history.is_empty() {
            // Most jobs in a long queue have one entry; do not pay for four.
            self.history.reserve_exact(1);
        }
        self.history.push(Transition {
            at_ms,
            state: self.state,
            attempt: self.attempt,
            worker: self.worker.clone(),
            note,
        });
    }

    pub fn snapshot(&self, with_history: bool) -> JobSnapshot {
        JobSnapshot {
            job_id: self.id,
            seq: self.seq,
            state: self.state,
            backend: self.spec.backend,
            task: self.spec.task,
            model: self.spec.model.clone(),
            priority: self.spec.priority,
            client: self.client.to_string(),
            attempt: self.attempt,
            tries: self.attempts_used(),
            max_attempts: self.max_attempts,
            worker: self.worker.as_deref().map(str::to_string),
            gpu: self.gpu.as_deref().map(str::to_string),
            progress: self.progress.clone(),
            error: self.error.clone(),
            artifacts: self.artifacts.clone(),
            info: self.info.clone(),
            cancel_requested: self.cancel_requested,
            degrade: self.degrade,
            queue_position: None,
            waiting: None,
            created_ms: self.created_ms,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            history: if with_history {
                self.history.clone()
            } else {
                Vec::new()
            },
            params: with_history.then(|| self.spec.params.clone()),
            options: with_history.then(|| kiln_protocol::JobOptions::of(&self.spec)),
            template: self.spec.template.clone().filter(|_| with_history),
        }
    }
}
