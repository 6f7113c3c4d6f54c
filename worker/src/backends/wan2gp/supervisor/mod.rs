//! Keeps one Wan2GP bridge alive and runs jobs on it, one at a time.
//!
//! A single task (the actor) owns the bridge process; the backend talks to it
//! through a channel, so nothing about the process is shared or locked. States:
//! starting (waiting for `ready`, bounded by `ready_timeout`) → idle ⇄ busy →
//! down → starting again. The watchdogs:
//!
//! - **heartbeat**: no message at all for `heartbeat_timeout` means the bridge is
//!   wedged: its process group is killed and it restarts;
//! - **stalled progress**: a running job that reports no progress, status or info
//!   for `stall_timeout` is failed (retryable) and the bridge killed;
//! - **cancel escalation**: a cancel is passed to Wan2GP; if no terminal message
//!   follows within `cancel_grace`, SIGTERM to the group, SIGKILL after
//!   `kill_grace`, then a restart (model loads and VAE decoding cannot be
//!   interrupted, so the grace is long by default);
//! - **protocol hygiene**: lines on the channel that are not messages are
//!   counted; too many mean it is polluted, and the bridge restarts.
//!
//! The actor lives in three files beside this one: `bridge.rs` (starting,
//! stopping, killing and reaping the process, queries, inventory, recycling),
//! `job.rs` (one job from submit to its end, and how Wan2GP's failures become
//! Kiln's) and `watchdog.rs` (the clocks a running job is watched by).
//!
//! A crash or a fatal CUDA error fails the running job as a retryable
//! infrastructure error and restarts the bridge at once (with a backoff when it
//! keeps crashing right after start). The bridge is also recycled after a number
//! of jobs or past a memory size, between jobs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::{FailureKind, JobError};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{CancellationToken, Health, ProgressSink};

use self::bridge::INVENTORY_EVERY;
use super::process::{Incoming, Launch, Process};
use super::protocol::Ready;

mod bridge;
mod job;
mod watchdog;

pub use job::{job_error, unrepr};

/// How the supervisor runs the bridge.
#[derive(Debug, Clone)]
pub struct Settings {
    pub launch: Launch,
    pub ready_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub stall_timeout: Duration,
    pub cancel_grace: Duration,
    pub kill_grace: Duration,
    /// Longest wait for the answer to a discovery query.
    pub query_timeout: Duration,
    pub recycle_after_jobs: u32,
    pub recycle_rss_mb: u64,
    /// Loaded with a one-step generation after every start.
    pub warmup_model: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    Done(Finished),
    Failed(JobError),
    Cancelled,
}

/// A successful job.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Absolute paths Wan2GP wrote.
    pub files: Vec<PathBuf>,
    pub elapsed_s: f64,
    /// Wan2GP loaded a model during this job (it was not warm).
    pub loaded_model: bool,
    pub bridge_pid: u32,
}

/// What the supervisor knows, for health, affinity and inventory.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub health: Health,
    pub ready: Option<Ready>,
    pub loaded_model: Option<String>,
    /// The bridge's last answer to the `inventory` query.
    pub inventory: Option<Value>,
    /// Bridges started so far.
    pub starts: u32,
    /// The bridge's resident memory at its last heartbeat.
    pub rss_mb: Option<u64>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            health: Health::down("the Wan2GP bridge is starting"),
            ready: None,
            loaded_model: None,
            inventory: None,
            starts: 0,
            rss_mb: None,
        }
    }
}

/// Why a query got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("Wan2GP answered: {0}")]
    Refused(String),
    #[error("the Wan2GP bridge is not available: {0}")]
    Unavailable(String),
    #[error("cancelled")]
    Cancelled,
}

enum Work {
    Submit(Map<String, Value>),
    Warmup(String),
}

struct JobRequest {
    key: String,
    work: Work,
    progress: Option<ProgressSink>,
    cancel: CancellationToken,
    done: oneshot::Sender<JobEnd>,
}

enum Request {
    Job(JobRequest),
    Query {
        op: String,
        args: Value,
        reply: oneshot::Sender<Result<Value, QueryError>>,
    },
}

/// The backend's handle on the actor.
pub struct Supervisor {
    tx: mpsc::Sender<Request>,
    shared: Arc<Mutex<Snapshot>>,
    stopping: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts the actor, which starts the bridge at once. Needs a tokio runtime.
    pub fn start(settings: Settings) -> Supervisor {
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::new(Mutex::new(Snapshot::default()));
        let stopping = CancellationToken::new();
        let actor = Actor {
            s: settings,
            rx,
            shared: shared.clone(),
            stopping: stopping.clone(),
            bridge: None,
            start_failures: 0,
            quick_crashes: 0,
            last_error: String::new(),
            next_req_id: 0,
            inventory_at: None,
        };
        let task = tokio::spawn(actor.run());
        Supervisor {
            tx,
            shared,
            stopping,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().expect("not poisoned").clone()
    }

    /// Runs one job. Returns [`JobEnd::Cancelled`] as soon as `cancel` fires; the
    /// supervisor then stops the job in the background (escalating if needed), and
    /// the next job waits for that.
    pub async fn run_job(
        &self,
        key: String,
        settings: Map<String, Value>,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> JobEnd {
        let (done, rx) = oneshot::channel();
        let req = Request::Job(JobRequest {
            key,
            work: Work::Submit(settings),
            progress: Some(progress),
            cancel: cancel.clone(),
            done,
        });
        tokio::select! {
            sent = self.tx.send(req) => if sent.is_err() {
                return JobEnd::Failed(JobError::new(FailureKind::Internal, "the Wan2GP supervisor has stopped", true));
            },
            _ = cancel.cancelled() => return JobEnd::Cancelled,
        }
        tokio::select! {
            end = rx => end.unwrap_or_else(|_| JobEnd::Failed(JobError::new(FailureKind::Internal, "the Wan2GP supervisor dropped the job", true))),
            _ = cancel.cancelled() => JobEnd::Cancelled,
        }
    }

    /// Asks the bridge a discovery question (answered between jobs).
    pub async fn query(
        &self,
        op: &str,
        args: Value,
        cancel: &CancellationToken,
    ) -> Result<Value, QueryError> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Query {
            op: op.into(),
            args,
            reply,
        };
        tokio::select! {
            sent = self.tx.send(req) => if sent.is_err() {
                return Err(QueryError::Unavailable("the supervisor has stopped".into()));
            },
            _ = cancel.cancelled() => return Err(QueryError::Cancelled),
        }
        tokio::select! {
            r = rx => r.unwrap_or_else(|_| Err(QueryError::Unavailable("the supervisor dropped the query".into()))),
            _ = cancel.cancelled() => Err(QueryError::Cancelled),
        }
    }

    /// Stops the bridge (cancelling any job) and waits for the actor to end.
    pub async fn shutdown(&self) {
        self.stopping.cancel();
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stopping.cancel();
    }
}

/// A bridge that said `ready`.
struct Live {
    proc: Process,
    ready: Ready,
    started: Instant,
    jobs: u32,
    last_heard: Instant,
    rss_mb: Option<u64>,
    garbage: u32,
}

struct Actor {
    s: Settings,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Mutex<Snapshot>>,
    stopping: CancellationToken,
    bridge: Option<Live>,
    /// Starts in a row that did not reach `ready`.
    start_failures: u32,
    /// Bridges in a row that died soon after `ready`.
    quick_crashes: u32,
    last_error: String,
    next_req_id: u64,
    inventory_at: Option<Instant>,
}

impl Actor {
    fn set(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.shared.lock().expect("not poisoned"));
    }

    async fn run(mut self) {
        loop {
            if self.stopping.is_cancelled() {
                self.stop_bridge("the worker is stopping").await;
                self.set(|s| s.health = Health::down("stopped"));
                return;
            }
            if self.bridge.is_none() {
                self.bring_up().await;
                continue;
            }
            let live = self.bridge.as_mut().expect("checked");
            let wedged_at = live.last_heard + self.s.heartbeat_timeout;
            let inventory_due = self
                .inventory_at
                .map_or_else(Instant::now, |t| t + INVENTORY_EVERY);
            tokio::select! {
                biased;
                _ = self.stopping.cancelled() => {}
                req = self.rx.recv() => match req {
                    None => self.stopping.cancel(),
                    Some(Request::Job(job)) => {
                        self.drive(job).await;
                        self.after_job().await;
                    }
                    Some(Request::Query { op, args, reply }) => {
                        let answer = self.query(&op, args).await;
                        let _ = reply.send(answer);
                    }
                },
                inc = live.proc.rx.recv() => self.while_idle(inc.unwrap_or(Incoming::Closed)).await,
                _ = tokio::time::sleep_until(wedged_at) => {
                    let why = format!("no heartbeat for {:?}", self.s.heartbeat_timeout);
                    self.kill(&why).await;
                }
                // LoRAs and weights come and go while the worker runs.
                _ = tokio::time::sleep_until(inventory_due) => self.refresh_inventory().await,
            }
        }
    }
}
