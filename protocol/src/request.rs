//! Client ⇄ broker messages on the frontend ROUTER (default port 5555).
//!
//! Every request carries a `req_id` that its reply echoes, so one DEALER can have
//! many requests in flight. Replies to requests that could not be decoded echo the
//! `req_id` when it could be read.

use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::ids::{ArtifactId, JobId};
use crate::job::{JobSnapshot, JobSpec, JobState, ListFilter};
use crate::limits::Limits;
use crate::wire_message;
use crate::worker::{HealthReport, ModelInfo, WorkerInfo};

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello(Hello),
    Submit(Submit),
    Get(Get),
    List(List),
    Cancel(Cancel),
    Resubmit(Resubmit),
    Fetch(Fetch),
    Workers(Simple),
    Models(Simple),
    Health(Simple),
    Ping(Simple),
}

wire_message!(Request {
    "hello" => Hello,
    "submit" => Submit,
    "get" => Get,
    "list" => List,
    "cancel" => Cancel,
    "resubmit" => Resubmit,
    "fetch" => Fetch,
    "workers" => Simple,
    "models" => Simple,
    "health" => Simple,
    "ping" => Simple,
});

impl Request {
    pub fn req_id(&self) -> u64 {
        match self {
            Request::Hello(m) => m.req_id,
            Request::Submit(m) => m.req_id,
            Request::Get(m) => m.req_id,
            Request::List(m) => m.req_id,
            Request::Cancel(m) => m.req_id,
            Request::Resubmit(m) => m.req_id,
            Request::Fetch(m) => m.req_id,
            Request::Workers(m) | Request::Models(m) | Request::Health(m) | Request::Ping(m) => {
                m.req_id
            }
        }
    }

    /// Sets the `req_id`, for clients that assign ids when sending.
    pub fn set_req_id(&mut self, id: u64) {
        match self {
            Request::Hello(m) => m.req_id = id,
            Request::Submit(m) => m.req_id = id,
            Request::Get(m) => m.req_id = id,
            Request::List(m) => m.req_id = id,
            Request::Cancel(m) => m.req_id = id,
            Request::Resubmit(m) => m.req_id = id,
            Request::Fetch(m) => m.req_id = id,
            Request::Workers(m) | Request::Models(m) | Request::Health(m) | Request::Ping(m) => {
                m.req_id = id
            }
        }
    }
}

/// Authenticates the connection. Required first when the broker has a client token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub req_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A name for fairness and `list` filters; defaults to the connection's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    pub req_id: u64,
    #[serde(deserialize_with = "JobSpec::deserialize_strict")]
    pub job: JobSpec,
    /// The name this connection said `hello` with, when it did. A broker that
    /// files the connection under another name (it restarted and forgot the
    /// login) answers `unauthenticated` instead of filing the job elsewhere, so
    /// the client says `hello` again and its idempotency keys keep matching.
    /// Older brokers ignore it (an unknown top-level key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Get {
    pub req_id: u64,
    pub job_id: JobId,
}

/// Lists jobs, newest first, a page at a time: a reply that stops short of the
/// matching jobs carries `next_cursor`, which the next `list` passes as `cursor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List {
    pub req_id: u64,
    #[serde(default, deserialize_with = "ListFilter::deserialize_strict")]
    pub filter: ListFilter,
    /// Where the previous page stopped (its `next_cursor`); absent for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    pub req_id: u64,
    pub job_id: JobId,
}

/// Submits a new job with the whole spec of `job_id` (prompt, parameters, model,
/// LoRAs, labels, limits, input files, workflow or template): what a client
/// that did not make the job (a dashboard, an operator) cannot rebuild from a
/// snapshot. The new job belongs to the requesting client and goes through every
/// check of `submit`; the earlier job's idempotency key is not copied, and
/// `idempotency_key` here gives the new job its own. Replied with `accepted`;
/// `not_found` when the broker no longer holds the job (past
/// `broker.retention`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resubmit {
    pub req_id: u64,
    pub job_id: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// As [`Submit::client`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// Reads up to `max_len` bytes of an artifact from `offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetch {
    pub req_id: u64,
    pub artifact_id: ArtifactId,
    /// Absent or `null` means 0.
    #[serde(default, deserialize_with = "crate::strict::null_default")]
    pub offset: u64,
    /// 1 to `Limits::max_chunk_bytes`; absent or `null` means `max_chunk_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
}

/// A request with no arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Simple {
    pub req_id: u64,
}

/// A reply from the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Welcome(Welcome),
    Accepted(Accepted),
    /// Boxed: a snapshot is much larger than the other replies.
    Job(Box<JobReply>),
    Jobs(JobsReply),
    Cancelled(CancelReply),
    Chunk(Chunk),
    Workers(WorkersReply),
    Models(ModelsReply),
    Health(HealthReply),
    Pong(Simple),
    Error(ErrorReply),
}

wire_message!(Reply {
    "welcome" => Welcome,
    "accepted" => Accepted,
    "job" => JobReply,
    "jobs" => JobsReply,
    "cancelled" => CancelReply,
    "chunk" => Chunk,
    "workers" => WorkersReply,
    "models" => ModelsReply,
    "health" => HealthReply,
    "pong" => Simple,
    "error" => ErrorReply,
});

impl Reply {
    /// The `req_id` this reply answers (`None` only for errors about undecodable
    /// requests).
    pub fn req_id(&self) -> Option<u64> {
        Some(match self {
            Reply::Welcome(m) => m.req_id,
            Reply::Accepted(m) => m.req_id,
            Reply::Job(m) => m.req_id,
            Reply::Jobs(m) => m.req_id,
            Reply::Cancelled(m) => m.req_id,
            Reply::Chunk(m) => m.req_id,
            Reply::Workers(m) => m.req_id,
            Reply::Models(m) => m.req_id,
            Reply::Health(m) => m.req_id,
            Reply::Pong(m) => m.req_id,
            Reply::Error(m) => return m.req_id,
        })
    }

    pub fn error(req_id: Option<u64>, error: impl Into<ErrorBody>) -> Reply {
        Reply::Error(ErrorReply {
            req_id,
            error: error.into(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub req_id: u64,
    pub version: String,
    /// The client name the broker will use for this connection. Idempotency keys
    /// belong to this name.
    pub client: String,
    pub limits: Limits,
    /// Optional protocol features this broker supports (docs/protocol.md,
    /// "Compatibility"): a client sends a request field that is newer than the
    /// protocol version only when the broker lists its feature here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// The optional features this version of the broker announces in `welcome`.
pub const FEATURES: &[&str] = &[
    "idempotency_per_client",
    "list_cursor",
    "param_schemas",
    "resubmit",
];

/// The job is committed to the broker's store (when durable) and will run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub req_id: u64,
    pub job_id: JobId,
    /// True when the idempotency key matched an earlier submit: no new job was made.
    #[serde(default)]
    pub duplicate: bool,
    pub state: JobState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReply {
    pub req_id: u64,
    pub job: JobSnapshot,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsReply {
    pub req_id: u64,
    pub jobs: Vec<JobSnapshot>,
    /// Set when more jobs match than this page holds: pass it as the next `list`'s
    /// `cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The answer to `cancel`: a queued job is cancelled at once (`state = cancelled`); a
/// running one stays `running` with `cancel_requested` until its worker confirms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelReply {
    pub req_id: u64,
    pub job_id: JobId,
    pub state: JobState,
}

/// A piece of an artifact. `eof` is set on the chunk that reaches `total`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub req_id: u64,
    pub artifact_id: ArtifactId,
    pub offset: u64,
    pub total: u64,
    pub sha256: String,
    pub media_type: String,
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub eof: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkersReply {
    pub req_id: u64,
    pub workers: Vec<WorkerInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelsReply {
    pub req_id: u64,
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReply {
    pub req_id: u64,
    pub health: HealthReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    #[serde(default)]
    pub req_id: Option<u64>,
    pub error: ErrorBody,
}
